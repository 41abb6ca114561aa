#!/usr/bin/env python3
"""What kp-run --audit costs the agent: a workload's own run time in a container, untraced
and under each audit mode, interleaved in one run.

    sudo .venv/bin/python bench/bench_audit.py [--runs 3] [--image TAG]

The workload measures its three parts from inside (so container start-up is
not counted), each reported as its own ratio to the untraced run: git status
x20 in a repository of 300 files, Python creating 300 files, and 100 shell
pipelines (echo | tr | cat).  On kodepipe's own Podman service strace starts
the runtime's create, so its --seccomp-bpf filter applies: the agent stops
only at the mode's system calls.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent

WORKLOAD = r"""
ms() { date +%s%N; }
cd /workspace && git init -q && python3 -c 'import os
os.makedirs("tracked", exist_ok=True)
for i in range(300):
    open("tracked/t%d.txt" % i, "w").write("x" * 100)'
git add -A && git -c user.email=a@b -c user.name=a commit -qm m
t0=$(ms); for i in $(seq 20); do git status >/dev/null; done; t1=$(ms)
echo "INNER git $(( (t1 - t0) / 1000 ))"
t0=$(ms); python3 -c 'import os
os.makedirs("/workspace/files", exist_ok=True)
for i in range(300):
    with open("/workspace/files/f%d.txt" % i, "w") as f: f.write("x" * 1000)'; t1=$(ms)
echo "INNER python $(( (t1 - t0) / 1000 ))"
t0=$(ms); for i in $(seq 100); do echo a | tr a b | cat >/dev/null; done; t1=$(ms)
echo "INNER shell $(( (t1 - t0) / 1000 ))"
"""
PARTS = ("git", "python", "shell")


def inner(argv: list[str], env: dict[str, str]) -> dict[str, float]:
    """Each part's time inside the container, in seconds."""
    proc = subprocess.run(argv, env=env, capture_output=True, check=True)
    got = {}
    for line in proc.stderr.decode().splitlines() + proc.stdout.decode().splitlines():
        if line.startswith("INNER "):
            _, part, micros = line.split()
            got[part] = int(micros) / 1e6
    if set(got) != set(PARTS):
        raise RuntimeError(proc.stderr.decode()[-2000:])
    return got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--image")
    args = parser.parse_args()
    venv = Path(sys.executable).parent / "kp-run"
    kp_run = str(venv if venv.exists() else ROOT / "bin" / "kp-run")
    sys.path.insert(0, str(ROOT))
    image = args.image
    if image is None:
        from kodepipe.commands import cli
        from kodepipe.container import profile

        image = profile.ensure_image(profile.load("shell"), cli.Output("bench"))
    # "default-attached": a plain Podman service (no kodepipe wrapper) named by KODEPIPE_PODMAN_URL, so
    # strace attaches with -p, as in a VM: every system call stops the agent
    modes = ("untraced", "minimal", "default", "full", "default-attached")
    samples: dict[str, dict[str, list[float]]] = {m: {p: [] for p in PARTS} for m in modes}
    with tempfile.TemporaryDirectory(prefix="kp-bench-") as tmp:
        env = {**os.environ, "KODEPIPE_STATE_DIR": f"{tmp}/state", "KODEPIPE_RUNTIME_DIR": f"{tmp}/run"}
        plain = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{tmp}/plain.sock"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp)
        for n in range(args.runs):
            for mode in modes[n % len(modes):] + modes[:n % len(modes)]:  # no mode always first
                ws = Path(tmp) / f"ws-{mode}-{n}"
                ws.mkdir()
                os.chown(ws, 4321, 4321)
                audit = [] if mode == "untraced" else ["--audit", "--audit-mode", mode.split("-")[0]]
                extra = {"KODEPIPE_PODMAN_URL": f"unix://{tmp}/plain.sock"} if mode.endswith("attached") else {}
                got = inner([kp_run, "--image", image, "-w", str(ws), "--pids", "2048", *audit,
                             "--", "bash", "-c", WORKLOAD], {**env, **extra})
                for part in PARTS:
                    samples[mode][part].append(got[part])
        subprocess.run(["pkill", "-f", f"unix://{tmp}/run/podman.sock"], check=False)
        plain.terminate()
        plain.wait(30)
    med = {m: {p: statistics.median(v) for p, v in parts.items()} for m, parts in samples.items()}
    result = {"bench": "audit", "image": image, "runs": args.runs,
              "inner_median_s": {m: {p: round(v, 3) for p, v in parts.items()} for m, parts in med.items()},
              "slowdown": {m: {p: round(med[m][p] / med["untraced"][p], 2) for p in PARTS}
                           for m in modes if m != "untraced"}}
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    for mode in modes[1:]:
        print(f"{mode:16} " + ", ".join(f"{p} x{result['slowdown'][mode][p]}" for p in PARTS)
              + "  (untraced: " + ", ".join(f"{p} {med['untraced'][p]:.2f} s" for p in PARTS) + ")", file=sys.stderr)


if __name__ == "__main__":
    main()
