#!/usr/bin/env python3
"""kp-clone against a bare `qemu-img create -b`, and the start-up time of every kp-* command.

    .venv/bin/python bench/bench_clone.py [--runs 30]

Both sides run in the same process, interleaved, on the same 20 GiB
(virtual) base, so the figure that matters is the ratio, not the absolute
time (these machines are noisy).  Start-up is compared with a bare
`python -c pass` of the same interpreter.  Writes JSON lines on stdout and
a summary on stderr.
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
VENV_BIN = Path(sys.executable).parent


def timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def command(name: str) -> str:
    installed = VENV_BIN / name
    return str(installed if installed.exists() else ROOT / "bin" / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--size", default="20G", help="virtual size of the base image")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="kp-bench-") as tmp:
        state = Path(tmp) / "state"
        env = {**os.environ, "KODEPIPE_STATE_DIR": str(state), "KODEPIPE_RUNTIME_DIR": f"{tmp}/run"}
        base = state / "images" / "base"
        base.mkdir(parents=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base / "disk.qcow2"), args.size], check=True)
        # a gigabyte of real data in the base, so "whatever the base size" is not only virtual
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1G", str(base / "disk.qcow2")],
                       check=True, stdout=subprocess.DEVNULL)
        (base / "vmlinuz").write_bytes(b"k")
        (base / "initrd.img").write_bytes(b"i")
        (base / "meta.json").write_bytes(orjson.dumps({
            "kind": "image", "name": "base", "id": "b" * 12, "created": "2026-01-01T00:00:00Z",
            "state": "ready", "disk": "disk.qcow2", "kernel": "vmlinuz", "initrd": "initrd.img"}))
        raw_dir = Path(tmp) / "raw"
        raw_dir.mkdir()

        kp_times, raw_times = [], []
        for i in range(args.runs):
            raw_times.append(timed(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                                    str(base / "disk.qcow2"), str(raw_dir / f"o{i}.qcow2")], env))
            kp_times.append(timed([command("kp-clone"), "-q", "base", f"c{i}"], env))
        overlay = state / "vms" / "c0" / "disk.qcow2"
        clone = {
            "kind": "bench", "name": "clone", "runs": args.runs, "base_virtual": args.size,
            "base_bytes": (base / "disk.qcow2").stat().st_blocks * 512,
            "kp_clone_median_s": round(statistics.median(kp_times), 4),
            "qemu_img_median_s": round(statistics.median(raw_times), 4),
            "ratio": round(statistics.median(kp_times) / statistics.median(raw_times), 2),
            "overlay_bytes": overlay.stat().st_blocks * 512,
        }
        print(orjson.dumps(clone).decode(), flush=True)

        bare = [timed([sys.executable, "-c", "pass"], env) for _ in range(args.runs)]
        python_median = statistics.median(bare)
        for name in ("kp-image", "kp-clone", "kp-ls", "kp-rm"):
            times = [timed([command(name), "--help"], env) for _ in range(args.runs)]
            row = {"kind": "bench", "name": f"{name} --help", "runs": args.runs,
                   "median_s": round(statistics.median(times), 4), "max_s": round(max(times), 4),
                   "python_pass_median_s": round(python_median, 4),
                   "ratio_to_python": round(statistics.median(times) / python_median, 2)}
            print(orjson.dumps(row).decode(), flush=True)
            print(f"{name} --help: median {row['median_s'] * 1000:.0f} ms "
                  f"(bare python {python_median * 1000:.0f} ms)", file=sys.stderr)
        print(f"kp-clone {clone['kp_clone_median_s'] * 1000:.0f} ms vs qemu-img create "
              f"{clone['qemu_img_median_s'] * 1000:.0f} ms: ratio {clone['ratio']}; overlay "
              f"{clone['overlay_bytes'] // 1024} KiB on a {args.size} base holding "
              f"{clone['base_bytes'] >> 20} MiB", file=sys.stderr)


if __name__ == "__main__":
    main()
