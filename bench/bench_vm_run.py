#!/usr/bin/env python3
"""kp-run inside a VM against `kp-ssh NAME -- sudo podman run` with the same options, in one run.

    sudo .venv/bin/python bench/bench_vm_run.py [--vm NAME] [--image base] [--runs 5] [--container-image TAG]

With --vm, an SSH-ready VM of kodepipe's state directory is used as it is; without, one is cloned
cold from --image, booted and removed at the end (under TCG that and the first copy of the
container image take minutes; they are not timed).  "The same options" are exactly the ones kp-run
used: a first kp-run runs `sleep`, and while it runs Podman's own record of the command that made
the container (`.Config.CreateCommand`) is read in the guest; the bare side replays that argv with
`true` as the command and its own name.  Both sides then alternate, so both see the same machine
load, and the figure is the ratio of medians.  kp-run pays for its Python start-up, the SSH
connection, the guest probe (workspace, masks, git survey, image id, seccomp), the record and the
clean-up; the bare side for one kp-ssh (its own start-up and connection).
JSON lines on stdout, a summary on stderr.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent if (Path(sys.executable).parent / "kp-ip").exists() else ROOT / "bin"


def kp(*argv: str, input: bytes | None = None, timeout: float = 1800) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], input=input, capture_output=True, timeout=timeout)


def records(out: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in out.splitlines() if line.strip()]


def guest(vm: str, script: str) -> bytes:
    """stdout of ``script`` as root in the guest (through kp-ssh, which prints a result record)."""
    done = kp("kp-ssh", vm, "--", "sudo", "-n", "sh", "-c", script, timeout=600)
    (result,) = [r for r in records(done.stdout) if r.get("kind") == "result"]
    if result.get("exit_status") != 0:
        raise SystemExit(f"in {vm}: {script!r} failed: {result.get('stderr', '')}")
    return str(result.get("stdout", "")).encode()


RUN_FOLDER = re.compile(r"/run/kodepipe/kp-bench-probe-[0-9a-f]+")
KEPT = "/run/kodepipe/kp-bench-bare"


def create_command(vm: str, record: bytes, image: str) -> list[str]:
    """The argv kp-run's Podman made its container with, read while it runs."""
    name = "kp-bench-probe"
    probe = subprocess.Popen([str(BIN / "kp-run"), "--image", image, "--name", name, "--time", "10m", "--",
                              "sleep", "600"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    assert probe.stdin is not None
    probe.stdin.write(record)
    probe.stdin.close()
    deadline = time.monotonic() + 900  # a bound: Podman under TCG takes seconds per call
    try:
        while True:
            out = guest(vm, f"podman container inspect --format '{{{{json .Config.CreateCommand}}}}' {name} "
                            "2>/dev/null || true").strip()
            if out.startswith(b"["):
                argv: list[str] = orjson.loads(out)
                # the run's own guest folder (its mask file, secrets) goes with it: keep a copy
                folders = sorted({m.group(0) for word in argv for m in [RUN_FOLDER.search(word)] if m})
                for folder in folders:
                    guest(vm, f"rm -rf {KEPT} && cp -a {shlex.quote(folder)} {KEPT}")
                    argv = [word.replace(folder, KEPT) for word in argv]
                break
            if probe.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("kp-run's probe container never appeared in the guest")
            time.sleep(1)
    finally:
        guest(vm, f"podman kill {name} >/dev/null 2>&1 || true")
        probe.wait(timeout=600)
    return argv


def replay(argv: list[str], image: str) -> list[str]:
    """``argv`` (podman [globals] run|create OPTIONS IMAGE sleep 600) as a bare `podman run --rm` of
    ``true`` under a name of its own."""
    verb = next(i for i, word in enumerate(argv) if word in ("run", "create"))
    at = len(argv) - 1 - argv[::-1].index(image)
    options = argv[verb + 1:at]
    kept: list[str] = []
    skip = False
    for word in options:
        if skip:
            skip = False
            continue
        if word == "--name":
            skip = True
            continue
        if word.startswith("--name=") or word == "--rm":
            continue
        kept.append(word)
    return ["sudo", "-n", "podman", *argv[1:verb], "run", "--rm", "--name", "kp-bench-bare", *kept, image, "true"]


def timed(argv: list[str], input: bytes | None = None) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, input=input, capture_output=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{argv[0]} failed: {done.stderr.decode(errors='replace')[-2000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vm", help="an SSH-ready VM to use (default: clone one from --image)")
    parser.add_argument("--image", default="base", help="the golden image to clone from (default: base)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--container-image", default=None,
                        help="default: the shell profile's image (built on the host if missing)")
    args = parser.parse_args()
    image = args.container_image
    if image is None:
        from kodepipe.commands import cli
        from kodepipe.container import profile

        image = profile.ensure_image(profile.load("shell"), cli.Output("bench"))
    made = args.vm is None
    vm = args.vm or f"kp-bench-vm-{os.getpid()}"
    try:
        if made:
            boot = subprocess.run(["bash", "-o", "pipefail", "-c",
                                   f"{BIN}/kp-clone --cold {shlex.quote(args.image)} {vm} | {BIN}/kp-boot | "
                                   f"{BIN}/kp-ip --timeout 600"], capture_output=True, timeout=1800)
            if boot.returncode != 0:
                raise SystemExit(boot.stderr.decode(errors="replace")[-2000:])
        (record,) = [r for r in records(kp("kp-ip", vm).stdout) if r.get("kind") == "vm"]
        line = orjson.dumps(record) + b"\n"
        ours = [str(BIN / "kp-run"), "--image", image, "--", "true"]
        timed(ours, line)  # untimed: copies the image into the guest if it is not there yet
        bare = [str(BIN / "kp-ssh"), vm, "--", *replay(create_command(vm, line, image), image)]
        timed(bare)
        samples: dict[str, list[float]] = {"bare": [], "kp-run": []}
        for _ in range(args.runs):
            samples["bare"].append(timed(bare))
            samples["kp-run"].append(timed(ours, line))
    finally:
        if made:
            kp("kp-rm", vm, timeout=600)
    result = {"bench": "vm_run", "vm": vm, "image": image, "runs": args.runs, "bare": bare[3:],
              **{f"{k}_median_s": round(statistics.median(v), 3) for k, v in samples.items()},
              **{f"{k}_min_s": round(min(v), 3) for k, v in samples.items()}}
    result["ratio"] = round(result["kp-run_median_s"] / result["bare_median_s"], 2)
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    print(f"kp-run -- true in {vm}: median {result['kp-run_median_s']:.2f} s; kp-ssh -- sudo podman run "
          f"(same options): {result['bare_median_s']:.2f} s; ratio {result['ratio']}", file=sys.stderr)


if __name__ == "__main__":
    main()
