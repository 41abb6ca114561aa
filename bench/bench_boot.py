#!/usr/bin/env python3
"""Launch-to-SSH: `kp-clone | kp-boot | kp-ip` against the same QEMU command line run by hand.

    .venv/bin/python bench/bench_boot.py [--image base] [--runs 2] [--warm-runs 3]

Needs a built image in kodepipe's state directory (kp-image build base); the
warm half warms it first if it is not (kp-image warm base).  "By hand" is
qemu-img create + qemu-system-x86_64 with exactly the argv kodepipe would
use (kodepipe.vm.qemu.command_line), timed until sshd sends its banner on the
forwarded port; for warm, the same resume from the warm state, without the
identity reseed kodepipe adds.  Runs alternate, so both sides see the same
machine load; the figure is the ratio of medians.  JSON lines on stdout,
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

from kodepipe.core.state import Store
from kodepipe.vm import address, images, passt, qemu, qemu_img, seriallog, warmram
from kodepipe.vm.accel import choose
from kodepipe.vm.qmp import Monitor

ROOT = Path(__file__).resolve().parent.parent
# the installed commands when the venv has them all, else the checkout's bin/
BIN = Path(sys.executable).parent if (Path(sys.executable).parent / "kp-ip").exists() else ROOT / "bin"


def kp_pipeline(name: str, image: str, cold: bool) -> float:
    started = time.perf_counter()
    flag = "--cold " if cold else ""
    subprocess.run(["bash", "-o", "pipefail", "-c",
                    f"{BIN}/kp-clone {flag}{image} {name} | {BIN}/kp-boot | {BIN}/kp-ip --timeout 600 >/dev/null"],
                   check=True)
    seconds = time.perf_counter() - started
    subprocess.run([str(BIN / "kp-rm"), "-q", name], check=True, stdout=subprocess.DEVNULL)
    return seconds


def by_hand(image: dict[str, object], accel: str, work: Path, warm: bool) -> float:
    """The same machine, started with plain qemu-img and qemu-system-x86_64."""
    started = time.perf_counter()
    folder = Path(str(image["path"]))
    backing = folder / "warm.qcow2" if warm else Path(str(image["disk"]))
    disk = work / "disk.qcow2"
    disk.unlink(missing_ok=True)
    qemu_img.create_overlay(backing, disk)
    sockets = qemu.Sockets(qmp=work / "q.qmp", qga=work / "q.qga", serial=work / "q.serial",
                           pidfile=work / "q.pid")
    port = qemu.free_port()
    fds: tuple[int, ...] = ()
    incoming = None
    ram = None
    if warm:
        fd = os.open(folder / "warm.state", os.O_RDONLY)
        fds, incoming = (fd,), f"fd:{fd}"
        if warmram.shared(image):
            # the RAM apart: QEMU maps warm.ram itself, privately (root opens the read-only file read-write)
            ram = os.open(folder / warmram.RAM_FILE, os.O_RDONLY)
            fds, incoming = (fd, ram), "defer"
    # the default --net user: passt behind the loopback guard, as kp-boot starts it
    with seriallog.pipe(work / "serial.log") as serial_fd, \
            passt.serving(work / "passt.log", port, output=work / "passt.out") as net:
        argv = qemu.command_line({"name": "bench", "id": "bench", "disk": str(disk)}, image,
                                 qemu.BootOptions(), sockets, accel=accel, ssh_port=port,
                                 serial_fd=serial_fd, incoming=incoming, net_fd=net.qemu_fd,
                                 ram=(ram, False) if ram is not None else None)
        child = subprocess.Popen(argv, pass_fds=(*fds, serial_fd, net.qemu_fd), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    try:
        if warm:
            while not sockets.qmp.exists():
                time.sleep(0.02)
            time.sleep(0.1)
            with Monitor(sockets.qmp) as monitor:
                if ram is not None:
                    monitor.execute("migrate-set-capabilities",
                                    {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})
                    monitor.execute("migrate-incoming", {"uri": f"fd:{fds[0]}"})
                while monitor.execute("query-migrate").get("status") != "completed":
                    time.sleep(0.05)
                monitor.execute("cont")
        while not address.ssh_banner("127.0.0.1", port, timeout=2.0):
            if child.poll() is not None:
                raise RuntimeError("QEMU exited")
            time.sleep(0.2)
        return time.perf_counter() - started
    finally:
        child.kill()
        child.wait()
        for each in fds:
            os.close(each)


def row(name: str, kp: list[float], raw: list[float]) -> dict[str, object]:
    return {"kind": "bench", "name": name, "runs": len(kp), "kodepipe_s": [round(t, 2) for t in kp],
            "by_hand_s": [round(t, 2) for t in raw], "kodepipe_median_s": round(statistics.median(kp), 2),
            "by_hand_median_s": round(statistics.median(raw), 2),
            "ratio": round(statistics.median(kp) / statistics.median(raw), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="base")
    parser.add_argument("--runs", type=int, default=2, help="cold boots per side")
    parser.add_argument("--warm-runs", type=int, default=3, help="warm resumes per side")
    args = parser.parse_args()
    store = Store()
    image = images.view(store, args.image)
    if image.get("state") != "ready":
        sys.exit(f"bench: no ready image {args.image!r}: kp-image build {args.image}")
    accel = choose("auto")[0]
    with tempfile.TemporaryDirectory(prefix="kp-bench-") as tmp:
        work = Path(tmp)
        kp, raw = [], []
        for i in range(args.runs):
            raw.append(by_hand(image, accel, work, warm=False))
            kp.append(kp_pipeline(f"bench-cold-{i}", args.image, cold=True))
        cold = row("launch-to-ssh cold", kp, raw)
        print(orjson.dumps(cold).decode(), flush=True)
        if not image.get("warm"):
            subprocess.run([str(BIN / "kp-image"), "warm", args.image], check=True, stdout=subprocess.DEVNULL)
            image = images.view(store, args.image)
        kp, raw = [], []
        for i in range(args.warm_runs):
            raw.append(by_hand(image, accel, work, warm=True))
            kp.append(kp_pipeline(f"bench-warm-{i}", args.image, cold=False))
        warm = row("launch-to-ssh warm", kp, raw)
        print(orjson.dumps(warm).decode(), flush=True)
    for result in (cold, warm):
        print(f"{result['name']} ({accel}): kodepipe {result['kodepipe_median_s']} s, by hand "
              f"{result['by_hand_median_s']} s, ratio {result['ratio']}", file=sys.stderr)


if __name__ == "__main__":
    main()
