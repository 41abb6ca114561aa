#!/usr/bin/env python3
"""kp-run -- true against a bare `podman run --rm` of the same image and options.

    sudo .venv/bin/python bench/bench_run.py [--runs 15] [--image TAG]

Both sides run interleaved in the same process: the bare side gets exactly
the arguments kp-run's policy renders (render.render(...).podman_args(): the
uid map, dropped capabilities, seccomp profile, read-only root, tmpfs,
limits, no network, the workspace), so the ratio is what kodepipe adds:
Python start-up, the API round trips, the record, the clean-up.  Each side
runs once untimed first (the first run of a uid map copies the image).
Writes JSON lines on stdout and a summary on stderr.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kodepipe.container import engine, render, seccomp  # noqa: E402
from kodepipe.container import policy as pol  # noqa: E402
from kodepipe.core import paths  # noqa: E402


def timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--image", default=None, help="default: the shell profile's image (built if missing)")
    args = parser.parse_args()
    # kp-run as installed: compiled once (a checkout's sources are recompiled at every start where
    # PYTHONDONTWRITEBYTECODE is set and a .pyc is stale)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "kodepipe")], check=True,
                   stdout=subprocess.DEVNULL)
    venv_kp_run = Path(sys.executable).parent / "kp-run"
    kp_run = str(venv_kp_run if venv_kp_run.exists() else ROOT / "bin" / "kp-run")
    with tempfile.TemporaryDirectory(prefix="kp-bench-") as tmp:
        env = {**os.environ, "KODEPIPE_STATE_DIR": f"{tmp}/state", "KODEPIPE_RUNTIME_DIR": f"{tmp}/run",
               "KODEPIPE_CACHE_DIR": os.environ.get("KODEPIPE_CACHE_DIR", str(paths.cache_dir()))}
        image = args.image
        if image is None:
            from kodepipe.commands import cli
            from kodepipe.container import profile

            image = profile.ensure_image(profile.load("shell"), cli.Output("bench"))
        ws = Path(tmp) / "ws"
        ws.mkdir()
        os.chown(ws, 4321, 4321)
        # kp-run's own defaults for --image IMAGE -w WS -- true, rendered as kp-run renders them
        policy = pol.resolve(pol.Options(command=("true",), image=image, workspace=str(ws)), None, pol.Config())
        facts = render.Facts(agent_uid=4321, agent_gid=4321, uid_from="bench", workspace=str(ws),
                             seccomp=str(seccomp.ensure(Path(tmp) / "seccomp")), oci_runtime=engine.oci_runtime())
        box = render.render(policy, facts, render.Staged(name="kp-bench-bare", run_id="bench"))
        engine.force_chown_copies()
        bare = ["podman", "run", *box.podman_args()]
        ours = [kp_run, "--image", image, "-w", str(ws), "--", "true"]
        timed(bare, env)
        timed(ours, env)
        samples: dict[str, list[float]] = {"bare": [], "kp-run": []}
        for _ in range(args.runs):
            samples["bare"].append(timed(bare, env))
            samples["kp-run"].append(timed(ours, env))
        subprocess.run(["pkill", "-f", f"unix://{tmp}/run/podman.sock"], check=False)
    result = {"bench": "run", "image": image, "runs": args.runs,
              **{f"{k}_median_s": round(statistics.median(v), 4) for k, v in samples.items()},
              **{f"{k}_min_s": round(min(v), 4) for k, v in samples.items()}}
    result["ratio"] = round(result["kp-run_median_s"] / result["bare_median_s"], 2)
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    print(f"kp-run -- true: median {result['kp-run_median_s']:.3f} s; podman run --rm (same options): "
          f"{result['bare_median_s']:.3f} s; ratio {result['ratio']}", file=sys.stderr)


if __name__ == "__main__":
    main()
