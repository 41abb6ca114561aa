#!/usr/bin/env python3
"""A sealed guest's network (kp-boot --allow) against the same guest on plain --net user.

    .venv/bin/python bench/bench_vm_egress.py [--image base] [--mib 64] [--requests 30]

Needs a built image with curl in it (kp-image build base --packages curl).  One clone is booted
open, measured, stopped, booted sealed and measured again (so both sides are the same guest
on the same machine in the same run).  The target is an HTTP server this bench starts on one of
the host's non-loopback addresses (an open guest cannot reach the host's loopback): the open
guest fetches it directly, the sealed one through its proxy, by a name pinned to that address.
- throughput: curl downloads a file of --mib MiB, three times; the median MiB/s;
- latency: --requests fetches of an empty file, one connection each; the median seconds.
The figures are the ratios sealed/open (throughput: sealed over open).  JSON lines on stdout,
a summary on stderr.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent if (Path(sys.executable).parent / "kp-ip").exists() else ROOT / "bin"
NAME = "bench-egress"


def kp(*args: str, timeout: float = 900) -> list[dict[str, Any]]:
    done = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, timeout=timeout)
    if done.returncode != 0:
        sys.exit(f"{' '.join(args)} failed: {done.stderr.decode()[-2000:]}")
    return [orjson.loads(line) for line in done.stdout.splitlines() if line.strip()]


def host_address() -> str:
    links = json.loads(subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, check=True).stdout)
    for link in links:
        for info in link.get("addr_info", []):
            if not info["local"].startswith("127."):
                return str(info["local"])
    sys.exit("this host has no non-loopback IPv4 address")


def in_guest(script: str) -> str:
    (result,) = [r for r in kp("kp-ssh", NAME, "--", "bash", "-c", script, timeout=1800) if r.get("kind") == "result"]
    return str(result["stdout"])


def measure(url: str, mib: int, requests: int) -> tuple[float, float]:
    """(median MiB/s of a download of the big file, median seconds of one small request)."""
    big = [float(line) for line in in_guest(
        f"for i in 1 2 3; do curl -sS -o /dev/null -w '%{{speed_download}}\\n' {url}/big; done").split()]
    small = [float(line) for line in in_guest(
        f"for i in $(seq {requests}); do curl -sS -o /dev/null -w '%{{time_total}}\\n' {url}/small; done").split()]
    return statistics.median(big) / (1 << 20), statistics.median(small)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image", default="base")
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--requests", type=int, default=30)
    args = parser.parse_args()
    address = host_address()
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work)
        (folder / "big").write_bytes(os.urandom(args.mib << 20))
        (folder / "small").write_bytes(b"")

        class Quiet(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a: Any, **k: Any) -> None:
                super().__init__(*a, directory=str(folder), **k)

            def log_message(self, *a: Any) -> None:
                pass

        server = http.server.ThreadingHTTPServer((address, 0), Quiet)
        port = server.server_address[1]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        kp("kp-clone", "--cold", args.image, NAME)
        try:
            kp("kp-boot", NAME)
            kp("kp-ip", NAME, "--timeout", "600")
            open_figures = measure(f"http://{address}:{port}", args.mib, args.requests)
            kp("kp-stop", NAME)
            kp("kp-boot", "--allow", f"bench.test:{port}", "--resolve", f"bench.test={address}", NAME)
            kp("kp-ip", NAME, "--timeout", "600")
            sealed_figures = measure(f"http://bench.test:{port}", args.mib, args.requests)
        finally:
            subprocess.run([str(BIN / "kp-rm"), "-q", NAME], check=False, stdout=subprocess.DEVNULL)
            server.shutdown()
    result = {"kind": "bench", "bench": "vm_egress", "mib": args.mib, "requests": args.requests,
              "open_mib_s": round(open_figures[0], 1), "sealed_mib_s": round(sealed_figures[0], 1),
              "throughput_ratio": round(sealed_figures[0] / open_figures[0], 2),
              "open_request_s": round(open_figures[1], 4), "sealed_request_s": round(sealed_figures[1], 4),
              "latency_ratio": round(sealed_figures[1] / open_figures[1], 2)}
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    print(f"throughput: open {result['open_mib_s']} MiB/s, sealed {result['sealed_mib_s']} MiB/s "
          f"({result['throughput_ratio']}x); a request: open {result['open_request_s']} s, sealed "
          f"{result['sealed_request_s']} s ({result['latency_ratio']}x)", file=sys.stderr)


if __name__ == "__main__":
    main()
