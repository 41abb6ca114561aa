#!/usr/bin/env python3
"""A VM from a warm pool against the fastest way to a VM without one: the warm resume by hand.

    .venv/bin/python bench/bench_pool.py [--image base] [--runs 3]

Needs a built image in kodepipe's state directory (kp-image build base); it
is warmed first if it is not.  Each run, alternating:

- by hand: qemu-img create + the QEMU resume from the warm state with exactly
  the argv kodepipe would use, timed until sshd sends its banner
  (bench_boot.by_hand; no identity of its own, no key set-up);
- kodepipe's warm clone without a pool: kp-clone | kp-boot | kp-ip;
- the pool: with `kp-pool IMAGE --size 1` whole, `kp-clone IMAGE NAME` (the
  hand-out: the record with the SSH endpoint), then the first `kp-ssh NAME --
  true` (a command run in it).

The figures are ratios of medians against the by-hand resume.  The pool is
emptied at the end (kp-pool IMAGE --size 0).  JSON lines on stdout, a
summary on stderr.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_boot import BIN, by_hand
from kodepipe.core.state import Store
from kodepipe.vm import images
from kodepipe.vm.accel import choose


def kp(*argv: str, stdin: bytes | None = None) -> bytes:
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], check=True, capture_output=True, input=stdin).stdout


def pool_ready(image: str, bound: float = 900.0) -> None:
    deadline = time.monotonic() + bound
    while True:
        record = orjson.loads(kp("kp-ls", "--kind", "image", image).splitlines()[0])
        pool = record.get("pool") or {}
        if pool.get("problem"):
            sys.exit(f"bench: the pool failed: {pool['problem']}")
        if pool.get("ready", 0) >= 1:
            return
        if time.monotonic() > deadline:
            sys.exit(f"bench: the pool was not ready within {bound:g} s: {pool}")
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="base")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    store = Store()
    image = images.view(store, args.image)
    if image.get("state") != "ready":
        sys.exit(f"bench: no ready image {args.image!r}: kp-image build {args.image}")
    if not image.get("warm"):
        kp("kp-image", "warm", args.image)
        image = images.view(store, args.image)
    accel = choose("auto")[0]
    raw, warm, handout, first = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="kp-bench-") as tmp:
        try:
            for i in range(args.runs):
                raw.append(by_hand(image, accel, Path(tmp), warm=True))
                kp("kp-pool", args.image, "--size", "0")  # the warm clone without a pool
                started = time.perf_counter()
                subprocess.run(["bash", "-o", "pipefail", "-c", f"{BIN}/kp-clone {args.image} bench-warm-{i} | "
                                f"{BIN}/kp-boot | {BIN}/kp-ip --timeout 600 >/dev/null"], check=True)
                warm.append(time.perf_counter() - started)
                kp("kp-rm", "-q", f"bench-warm-{i}")
                kp("kp-pool", args.image, "--size", "1")
                pool_ready(args.image)
                started = time.perf_counter()
                record = orjson.loads(kp("kp-clone", args.image, f"bench-pool-{i}").splitlines()[0])
                handout.append(time.perf_counter() - started)
                if not record.get("from_pool"):
                    sys.exit(f"bench: kp-clone did not take a pooled VM: {record}")
                kp("kp-ssh", f"bench-pool-{i}", "--", "true")
                first.append(time.perf_counter() - started)
                kp("kp-rm", "-q", f"bench-pool-{i}")
        finally:
            subprocess.run([str(BIN / "kp-pool"), args.image, "--size", "0"], capture_output=True)
    base = statistics.median(raw)
    result = {"kind": "bench", "name": "warm pool", "accel": accel, "runs": args.runs,
              "by_hand_resume_s": [round(t, 2) for t in raw], "warm_clone_s": [round(t, 2) for t in warm],
              "handout_s": [round(t, 3) for t in handout], "handout_to_first_command_s": [round(t, 2) for t in first],
              "ratio_warm_clone": round(statistics.median(warm) / base, 2),
              "ratio_handout": round(statistics.median(handout) / base, 3),
              "ratio_handout_to_first_command": round(statistics.median(first) / base, 2)}
    print(orjson.dumps(result).decode(), flush=True)
    print(f"warm pool ({accel}): by-hand resume {base:.2f} s; warm clone {statistics.median(warm):.2f} s "
          f"(x{result['ratio_warm_clone']}); hand-out {statistics.median(handout) * 1000:.0f} ms "
          f"(x{result['ratio_handout']}); to its first command {statistics.median(first):.2f} s "
          f"(x{result['ratio_handout_to_first_command']})", file=sys.stderr)


if __name__ == "__main__":
    main()
