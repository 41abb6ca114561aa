#!/usr/bin/env python3
"""What the hash chain costs kp-run --audit: the same audited workload with the audit log's chain
and without it (kodepipe.core.chain.Follower switched off for the bench alone), interleaved in one run.

    sudo .venv/bin/python bench/bench_chain.py [--runs 5] [--image TAG]

The workload is bench_audit's (200 fork+exec, Python writing 300 files, git init/add/commit),
measured from inside the container, and the whole kp-run as well (the follower's last catch-up
and the seal happen after the agent ends).  The goal (issue 15): at most 1.05x.
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


def _workload() -> str:
    """bench_audit's workload, so the two benches measure the same thing."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_audit", ROOT / "bench" / "bench_audit.py")
    if spec is None or spec.loader is None:
        raise RuntimeError("bench/bench_audit.py is missing")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.WORKLOAD)


WORKLOAD = _workload()

UNCHAINED = """
from kodepipe.core import chain
class _Off:
    problem = None
    def __init__(self, *a, **k): pass
    def start(self): return self
    def close(self): pass
chain.Follower = _Off
"""


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    started = time.monotonic()
    proc = subprocess.run(argv, env=env, capture_output=True, check=True)
    whole = time.monotonic() - started
    for line in proc.stderr.decode().splitlines():
        if line.startswith("INNER "):
            return float(line.split()[1]), whole
    raise RuntimeError(proc.stderr.decode()[-2000:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--image")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    image = args.image
    if image is None:
        from kodepipe.commands import cli
        from kodepipe.container import profile

        image = profile.ensure_image(profile.load("shell"), cli.Output("bench"))
    inner: dict[str, list[float]] = {"chained": [], "unchained": []}
    whole: dict[str, list[float]] = {"chained": [], "unchained": []}
    log_bytes = 0
    with tempfile.TemporaryDirectory(prefix="kp-bench-") as tmp:
        env = {**os.environ, "KODEPIPE_STATE_DIR": f"{tmp}/state", "KODEPIPE_RUNTIME_DIR": f"{tmp}/run",
               "PYTHONPATH": str(ROOT)}
        for n in range(args.runs):
            for how in inner:
                ws = Path(tmp) / f"ws-{how}-{n}"
                ws.mkdir()
                os.chown(ws, 4321, 4321)
                pre = UNCHAINED if how == "unchained" else ""
                argv = [sys.executable, "-c", pre + "\nfrom kodepipe.__main__ import main\nmain()\n", "kp-run",
                        "--image", image, "-w", str(ws), "--pids", "2048", "--audit", "--", "bash", "-c", WORKLOAD]
                a, b = timed(argv, env)
                inner[how].append(a)
                whole[how].append(b)
        logs = list(Path(tmp, "state", "containers").glob("*/audit.strace"))
        log_bytes = max((p.stat().st_size for p in logs), default=0)
        subprocess.run(["pkill", "-f", f"unix://{tmp}/run/podman.sock"], check=False)
    med = {k: statistics.median(v) for k, v in inner.items()}
    med_whole = {k: statistics.median(v) for k, v in whole.items()}
    result = {"bench": "chain", "image": image, "runs": args.runs, "audit_log_bytes": log_bytes,
              "inner_median_s": {k: round(v, 3) for k, v in med.items()},
              "kp_run_median_s": {k: round(v, 3) for k, v in med_whole.items()},
              "ratio_inner": round(med["chained"] / med["unchained"], 3),
              "ratio_kp_run": round(med_whole["chained"] / med_whole["unchained"], 3)}
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
