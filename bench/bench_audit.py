#!/usr/bin/env python3
"""What kp-run --audit costs the agent: a workload's own run time in a container, untraced
and under each audit mode, interleaved in one run.

    sudo .venv/bin/python bench/bench_audit.py [--runs 3] [--image TAG]

The workload measures itself from inside (so container start-up and the
attach are not counted): 200 fork+exec of /bin/true, Python writing 300
files into the workspace, and git init/add/commit of them.  strace attaches
with -p, which ignores --seccomp-bpf, so every mode stops the agent at each
system call; the modes differ in what they format and log.
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
t0=$(date +%s.%N)
for i in $(seq 200); do /bin/true; done
python3 -c 'import os
os.makedirs("/workspace/files", exist_ok=True)
for i in range(300):
    with open("/workspace/files/f%d.txt" % i, "w") as f: f.write("x" * 1000)'
cd /workspace && git init -q && git add -A && git -c user.email=a@b -c user.name=a commit -qm m
t1=$(date +%s.%N)
echo "INNER $(echo "$t1 - $t0" | python3 -c 'import sys; print(eval(sys.stdin.read()))')"
"""


def inner(argv: list[str], env: dict[str, str]) -> float:
    proc = subprocess.run(argv, env=env, capture_output=True, check=True)
    for line in proc.stderr.decode().splitlines():
        if line.startswith("INNER "):
            return float(line.split()[1])
    raise RuntimeError(proc.stderr.decode()[-2000:])


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
    samples: dict[str, list[float]] = {"untraced": [], "minimal": [], "default": [], "full": []}
    with tempfile.TemporaryDirectory(prefix="kp-bench-") as tmp:
        env = {**os.environ, "KODEPIPE_STATE_DIR": f"{tmp}/state", "KODEPIPE_RUNTIME_DIR": f"{tmp}/run"}
        for n in range(args.runs):
            for mode in samples:
                ws = Path(tmp) / f"ws-{mode}-{n}"
                ws.mkdir()
                os.chown(ws, 4321, 4321)
                audit = [] if mode == "untraced" else ["--audit", "--audit-mode", mode]
                samples[mode].append(inner([kp_run, "--image", image, "-w", str(ws), "--pids", "2048", *audit,
                                            "--", "bash", "-c", WORKLOAD], env))
        subprocess.run(["pkill", "-f", f"unix://{tmp}/run/podman.sock"], check=False)
    med = {k: statistics.median(v) for k, v in samples.items()}
    result = {"bench": "audit", "image": image, "runs": args.runs,
              "inner_median_s": {k: round(v, 3) for k, v in med.items()},
              "slowdown": {k: round(v / med["untraced"], 2) for k, v in med.items() if k != "untraced"}}
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    print("workload inside the container, median: " + ", ".join(
        f"{k} {v:.2f} s" + ("" if k == "untraced" else f" (x{v / med['untraced']:.2f})") for k, v in med.items()),
        file=sys.stderr)


if __name__ == "__main__":
    main()
