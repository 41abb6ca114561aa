#!/usr/bin/env python3
"""Host memory of idle warm clones of one image: five against one, in the same run.

    .venv/bin/python bench/bench_density.py [--image base] [--json]

Needs a warm image in kodepipe's state directory whose RAM is kept apart
(kp-image warm; a warm state made before warm.ram existed: kp-image warm
--force), and no running VM resumed from it (a pool's members would share
the pages too: kp-pool IMAGE --size 0).

It boots one warm clone (kp-clone | kp-boot | kp-ip, then one kp-ssh
command), waits until its QEMU's memory stops growing, and reads its PSS
from /proc/PID/smaps: the whole QEMU, and the guest's RAM mapping alone.
Then four more the same way, and the five together.  Copies of the RAM
would make five cost five times one; pages a clone never writes are
counted once, split among the five.  The keeper's memfd (the shared RAM
no QEMU has touched yet is in it, and mapped by nobody) is shown apart.

JSON lines on stdout (--json: one JSON document with one_pss, five_pss,
ratio, in bytes), a summary on stderr.  The clones are removed at the end.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_boot import BIN
from kodepipe.core.state import Store
from kodepipe.vm import images, warmram

NAMES = [f"bench-dense-{n}" for n in range(1, 6)]


def kp(*argv: str) -> bytes:
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], check=True, capture_output=True).stdout


def boot(image: str, *names: str) -> dict[str, int]:
    """Each clone's QEMU pid, once kp-ip said it is ready and one command ran in it."""
    out = subprocess.run(["bash", "-o", "pipefail", "-c", f"{BIN}/kp-clone {image} {' '.join(names)} | "
                          f"{BIN}/kp-boot | {BIN}/kp-ip --timeout 300"], check=True, capture_output=True).stdout
    pids = {r["name"]: int(r["pid"]) for r in map(orjson.loads, out.splitlines())}
    for name in names:
        kp("kp-ssh", name, "--", "true")
    return pids


def pss(pid: int) -> tuple[int, int]:
    """(the guest RAM mapping's PSS, the whole process's PSS), in bytes."""
    guest = total = 0
    in_ram = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0] if line else ""
        if "-" in head and not head.endswith(":"):
            in_ram = warmram.MEMFD_NAME in line
        elif head == "Pss:":
            kib = int(line.split()[1]) * 1024
            total += kib
            guest += kib if in_ram else 0
    return guest, total


def settled(pids: list[int], bound: float = 120.0) -> tuple[int, int]:
    """The summed PSS once two readings 3 s apart differ by under 1% (an idle guest), or at the bound."""
    deadline = time.monotonic() + bound
    last = (0, 0)
    while True:
        now = tuple(map(sum, zip(*(pss(pid) for pid in pids), strict=True)))
        if abs(now[1] - last[1]) < 0.01 * now[1] or time.monotonic() > deadline:
            return now[0], now[1]
        last = (now[0], now[1])
        time.sleep(3)


def keeper_bytes(image: dict[str, object]) -> int | None:
    """What the keeper's memfd holds in memory (its pages, mapped or not)."""
    warm = image.get("warm")
    if not isinstance(warm, dict):
        return None
    for pid in (entry.name for entry in Path("/proc").iterdir() if entry.name.isdigit()):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"kodepipe.vm.warmram" in argv and any(f"ram-{warm['id']}".encode() in a for a in argv):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    if str(fd.readlink()).startswith(f"/memfd:{warmram.MEMFD_NAME}"):
                        return fd.stat().st_blocks * 512
                except OSError:
                    continue
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="base")
    parser.add_argument("--json", action="store_true", help="one JSON document for bench_all")
    args = parser.parse_args()
    store = Store()
    image = images.view(store, args.image)
    if not warmram.shared(image):
        sys.exit(f"bench: {args.image} has no warm state with its RAM apart: kp-image warm --force {args.image}")
    running = [r["name"] for r in map(orjson.loads, kp("kp-ls", "--kind", "vm").splitlines())
               if r.get("base") == args.image and r.get("state") == "running"]
    if running:
        sys.exit(f"bench: VMs of {args.image} run ({', '.join(running[:5])}): they would share the pages too")
    try:
        first = boot(args.image, NAMES[0])
        one_guest, one_total = settled(list(first.values()))
        others = boot(args.image, *NAMES[1:])
        five_guest, five_total = settled([*first.values(), *others.values()])
        held = keeper_bytes(image)
    finally:
        subprocess.run([str(BIN / "kp-rm"), *NAMES], capture_output=True)
    result = {"kind": "bench", "name": "density", "image": args.image, "one_pss": one_total, "five_pss": five_total,
              "ratio": round(five_total / one_total, 2), "one_guest_pss": one_guest, "five_guest_pss": five_guest,
              "guest_ratio": round(five_guest / one_guest, 2), "keeper_bytes": held,
              "warm_ram_bytes": image["warm"].get("ram_bytes") if isinstance(image.get("warm"), dict) else None}
    mib = 1 << 20
    print(f"one warm clone: {one_total / mib:.0f} MiB PSS ({one_guest / mib:.0f} MiB of it guest RAM); five: "
          f"{five_total / mib:.0f} MiB ({result['ratio']}x; guest RAM {five_guest / mib:.0f} MiB, "
          f"{result['guest_ratio']}x); the keeper's memfd: {(held or 0) / mib:.0f} MiB", file=sys.stderr)
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2 if args.json else 0).decode())


if __name__ == "__main__":
    main()
