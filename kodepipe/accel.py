"""Choosing QEMU's accelerator: KVM only when it really runs guests, else TCG.

A /dev/kvm that opens is no proof that KVM works.  Where nested
virtualisation is broken or emulated (this project's CI hosts have
``kvm_pvm``, a software hypervisor without VT-x/AMD-V) a guest under KVM
hangs or crawls.  So "auto" boots a 512-byte boot sector under KVM, which
must reach its port write quickly, and remembers the verdict until the
host reboots: only the first kp-boot after a reboot pays for the probe.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kodepipe import paths, proc, qemu
from kodepipe.errors import BadInput, KpError

EXIT_PORT = 0xF4
# real mode: cli; mov al,1; out 0xf4,al; hlt; jmp back to the hlt
_CODE = bytes([0xFA, 0xB0, 0x01, 0xE6, EXIT_PORT, 0xF4, 0xEB, 0xFD])
BOOT_SECTOR = _CODE.ljust(510, b"\0") + b"\x55\xaa"
# isa-debug-exit turns the guest's write of 1 into QEMU's exit status (1 << 1) | 1
RAN = 3
# SeaBIOS and the sector take ~0.1 s even under TCG; KVM slower than this is emulating, not virtualising
SLOW = 2.0
CACHE = "accel.json"
KVM_DEVICE = Path("/dev/kvm")


@dataclass(frozen=True)
class Probe:
    status: int | None  # QEMU's exit status; None when it was killed at the timeout
    seconds: float
    output: str


def probe(accel: str, timeout: float) -> Probe:
    """Boot the test sector under ``accel``; QEMU is always gone when this returns."""
    with tempfile.TemporaryDirectory(prefix="accel-", dir=paths.runtime_dir()) as tmp:
        sector = Path(tmp) / "boot.img"
        sector.write_bytes(BOOT_SECTOR)
        drive = str(sector).replace(",", ",,")  # QEMU option values escape a comma by doubling it
        argv = [qemu.QEMU, "-accel", accel, "-machine", "pc", "-m", "16", "-nodefaults", "-no-user-config",
                "-display", "none", "-device", f"isa-debug-exit,iobase={EXIT_PORT:#x},iosize=0x04",
                "-drive", f"format=raw,file={drive},if=ide", "-boot", "order=c,strict=on"]
        started = time.monotonic()
        child = proc.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            try:
                out, _ = child.communicate(timeout=timeout)
                status: int | None = child.returncode
            except subprocess.TimeoutExpired:
                child.kill()
                out, _ = child.communicate()
                status = None
        finally:
            if child.poll() is None:  # interrupted: no stray QEMU either way
                child.kill()
                child.wait()
        return Probe(status, time.monotonic() - started, proc.tail(out))


def kvm_works(timeout: float = 3.0, *, cached: bool = True) -> tuple[bool, str]:
    """Whether KVM runs guests here, and why (or why not)."""
    dev = KVM_DEVICE
    if not dev.exists():
        return False, "there is no /dev/kvm (no hardware virtualisation, or the kvm module is not loaded)"
    if not os.access(dev, os.R_OK | os.W_OK):
        return False, "/dev/kvm exists but you cannot open it for reading and writing (join the kvm group)"
    boot = proc.boot_id()
    cache = paths.runtime_dir() / CACHE
    if cached and boot:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            saved = json.loads(cache.read_text())
            if saved["boot_id"] == boot:
                return bool(saved["kvm"]), f"{saved['reason']} (cached since the host booted)"
    result = _verdict(probe("kvm", timeout), timeout)
    if boot:
        tmp = cache.with_name(f".{CACHE}.{os.getpid()}")
        tmp.write_text(json.dumps({"boot_id": boot, "kvm": result[0], "reason": result[1]}))
        os.replace(tmp, cache)  # readers see the old answer or the new one, never half of one
    return result


def _verdict(result: Probe, timeout: float) -> tuple[bool, str]:
    took = f"{result.seconds:.1f} s"
    pvm = ""
    if Path("/sys/module/kvm_pvm").exists():
        pvm = "; this host's KVM is kvm_pvm, which runs only PVM-enabled guest kernels"
    if result.status == RAN and result.seconds <= SLOW:
        return True, f"KVM ran a test guest in {result.seconds:.2f} s"
    if result.status == RAN:
        return False, (f"KVM is present but a test guest took {took} (TCG needs ~0.1 s): "
                       f"virtualisation is emulated or nested virtualisation is broken{pvm}")
    if result.status is None:
        return False, (f"KVM is present but a test guest did not run within {timeout:g} s "
                       f"(nested virtualisation broken?){pvm}")
    return False, (f"KVM is present but QEMU failed under it (exit status {result.status}): "
                   f"{result.output or 'no message'}")


def choose(requested: str) -> tuple[str, str]:
    """("kvm" or "tcg", the reason) for ``requested`` "auto", "kvm" or "tcg"."""
    if requested == "tcg":
        return "tcg", "requested"
    if requested not in ("auto", "kvm"):
        raise BadInput(f"invalid accelerator {requested!r}: auto, kvm or tcg")
    works, reason = kvm_works()
    if works:
        return "kvm", "requested" if requested == "kvm" else reason
    if requested == "kvm":
        raise KpError(f"cannot use KVM: {reason}", code="kvm_unusable",
                      hint="use --accel tcg (slower, but works without hardware virtualisation)")
    return "tcg", reason
