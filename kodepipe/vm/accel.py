"""Choosing QEMU's accelerator: KVM only when it really runs guests, else TCG.

A /dev/kvm that opens is no proof that KVM works.  Where virtualisation is
emulated or nested virtualisation is broken, a guest under KVM hangs or
crawls.  So "auto" decides in three steps, none of which trusts a duration
measured on some other machine:

1. facts about the host: no /dev/kvm, or one we cannot open; the kvm_pvm
   module (a software hypervisor for PVM-enabled guest kernels: a stock
   kernel hangs under it, as on this project's CI hosts); an x86 CPU
   without the vmx or svm flag (no hardware virtualisation at all).  Each
   means TCG, with that reason.
2. a race on this machine, in this run: the same 512-byte boot sector under
   TCG and under KVM.  Real hardware virtualisation runs it about as fast as
   TCG or faster (both pay the same QEMU start-up; TCG also translates the
   BIOS), while emulated or broken nested KVM was measured 7 to 40 times
   slower (1.4-4.9 s against TCG's 0.1-0.2 s).  KVM wins when it takes at
   most RATIO times TCG's best time; the probe is repeated up to ROUNDS
   times so that one scheduling hiccup does not decide.  The verdict is
   kept until the host reboots (a versioned file in the runtime dir).
3. the real guest (kodepipe.vm.lifecycle): under KVM a cold boot must write to
   its serial console within SILENT_BOUND, else "auto" stops it, boots it
   again under TCG, says so in ``accel_reason`` and remembers the verdict.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kodepipe.core import paths, proc
from kodepipe.core.errors import BadInput, KpError
from kodepipe.vm import qemu

EXIT_PORT = 0xF4
# real mode: cli; mov al,1; out 0xf4,al; hlt; jmp back to the hlt
_CODE = bytes([0xFA, 0xB0, 0x01, 0xE6, EXIT_PORT, 0xF4, 0xEB, 0xFD])
BOOT_SECTOR = _CODE.ljust(510, b"\0") + b"\x55\xaa"
# isa-debug-exit turns the guest's write of 1 into QEMU's exit status (1 << 1) | 1
RAN = 3
# KVM may take at most this many times TCG's time on the same probe (see the module's docstring:
# working KVM is ~1x or faster, emulated or broken KVM 7-40x); a slower KVM probe is killed then.
RATIO = 3.0
ROUNDS = 3
# a bound on "QEMU can run a boot sector at all" under TCG, not a speed: it takes well under a second
TCG_BOUND = 60.0
# a cold-booted guest kernel writes its first line to the serial console (console=ttyS0, no "quiet")
# within a second or two even under TCG; silence past this bound means the guest is not running
SILENT_BOUND = 30.0
CACHE = "accel.json"
CACHE_VERSION = 2  # version 1 (no "version" key) trusted a fixed 2 s threshold: never reuse its verdict
KVM_DEVICE = Path("/dev/kvm")
PVM_MODULE = Path("/sys/module/kvm_pvm")
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class Probe:
    status: int | None  # QEMU's exit status; None when it was killed at the timeout
    seconds: float
    output: str

    @property
    def ran(self) -> bool:
        return self.status == RAN


@dataclass(frozen=True)
class Host:
    """What the host says about KVM before anything runs."""

    device: bool  # /dev/kvm exists
    usable: bool  # and we may open it for reading and writing
    pvm: bool  # the kvm_pvm module is loaded
    hardware: bool | None  # the CPU has vmx or svm; None off x86, where those flags do not exist


def host() -> Host:
    device = KVM_DEVICE.exists()
    hardware: bool | None = None
    if platform.machine() in ("x86_64", "i386", "i686", "amd64", "AMD64"):
        hardware = False
        with contextlib.suppress(OSError), CPUINFO.open() as info:
            for line in info:
                if line.startswith("flags"):
                    flags = line.partition(":")[2].split()
                    hardware = "vmx" in flags or "svm" in flags
                    break
    return Host(device=device, usable=device and os.access(KVM_DEVICE, os.R_OK | os.W_OK),
                pvm=PVM_MODULE.exists(), hardware=hardware)


def refusal(facts: Host) -> str | None:
    """Why KVM cannot run a stock guest here, from the host's facts alone; None when only a probe can tell."""
    if not facts.device:
        return f"there is no {KVM_DEVICE} (no hardware virtualisation, or the kvm module is not loaded)"
    if not facts.usable:
        return f"{KVM_DEVICE} exists but you cannot open it for reading and writing (join the kvm group)"
    if facts.pvm:
        return (f"this host's KVM is kvm_pvm ({PVM_MODULE}), a software hypervisor that runs only "
                "PVM-enabled guest kernels: a stock guest kernel hangs under it")
    if facts.hardware is False:
        return (f"{KVM_DEVICE} exists but the CPU has no hardware virtualisation (no vmx or svm flag in "
                f"{CPUINFO}): a stock guest kernel cannot run under this KVM")
    return None


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
        child = proc.spawn(argv, stdout=proc.PIPE, stderr=proc.STDOUT)
        try:
            try:
                out, _ = child.communicate(timeout=timeout)
                status: int | None = child.returncode
            except proc.Expired:
                child.kill()
                out, _ = child.communicate()
                status = None
        finally:
            if child.poll() is None:  # interrupted: no stray QEMU either way
                child.kill()
                child.wait()
        return Probe(status, time.monotonic() - started, proc.tail(out))


RULE = f"KVM is used when it takes at most {RATIO:g}x TCG's time on the same test guest"


def compare(tcg: float, kvm: Probe) -> tuple[bool, str]:
    """The verdict of one KVM probe against TCG's best time (in seconds) on the same probe."""
    if kvm.ran and kvm.seconds <= RATIO * tcg:
        return True, f"KVM ran the test guest in {kvm.seconds:.2f} s, TCG in {tcg:.2f} s ({RULE})"
    if kvm.ran or kvm.status is None:
        took = f"took {kvm.seconds:.2f} s" if kvm.ran else f"did not finish within {RATIO * tcg:.2f} s"
        return False, (f"KVM is present but the test guest {took} under it, against {tcg:.2f} s under TCG "
                       f"({RULE}): virtualisation is emulated or nested virtualisation is broken")
    return False, f"KVM is present but QEMU failed under it (exit status {kvm.status}): {kvm.output or 'no message'}"


def measure(run: Callable[[str, float], Probe]) -> tuple[bool, str]:
    """Race KVM against TCG on the test guest with ``run`` (``probe``, or a fake), up to ROUNDS times."""
    best: float | None = None
    verdict = (False, "no probe ran")
    for _ in range(ROUNDS):
        tcg = run("tcg", TCG_BOUND)
        if tcg.ran:
            best = tcg.seconds if best is None else min(best, tcg.seconds)
        if best is None:
            how = f"exit status {tcg.status}" if tcg.status is not None else f"killed after {TCG_BOUND:g} s"
            return False, (f"QEMU could not run the test guest under TCG ({how}: {tcg.output or 'no message'}), "
                           "so KVM could not be compared with it")
        kvm = run("kvm", RATIO * best)  # a KVM probe slower than this has lost already
        verdict = compare(best, kvm)
        if verdict[0] or not (kvm.ran or kvm.status is None):
            return verdict  # KVM won, or QEMU refused it: a second round would say the same
    return verdict


def decide(facts: Host, run: Callable[[str, float], Probe]) -> tuple[bool, str]:
    """Whether KVM runs guests here, and why (or why not): the host's facts, then the race."""
    why_not = refusal(facts)
    return (False, why_not) if why_not else measure(run)


def _cache() -> Path:
    return paths.runtime_dir() / CACHE


def cached_verdict() -> tuple[bool, str] | None:
    """The verdict kept for this host boot, if there is one in this format."""
    boot = proc.boot_id()
    if not boot:
        return None
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
        saved = json.loads(_cache().read_text())
        if (saved.get("version") == CACHE_VERSION and saved["boot_id"] == boot
                and isinstance(saved["kvm"], bool) and isinstance(saved["reason"], str)):
            return saved["kvm"], saved["reason"]
    return None


def remember(kvm: bool, reason: str) -> None:
    """Keep the verdict until the host reboots."""
    boot = proc.boot_id()
    if not boot:
        return
    cache = _cache()
    tmp = cache.with_name(f".{CACHE}.{os.getpid()}")
    tmp.write_text(json.dumps({"version": CACHE_VERSION, "boot_id": boot, "kvm": kvm, "reason": reason}))
    os.replace(tmp, cache)  # readers see the old answer or the new one, never half of one


def kvm_works(*, cached: bool = True) -> tuple[bool, str]:
    """Whether KVM runs guests here, and why (or why not).  ``cached=False`` neither reads nor writes the verdict."""
    facts = host()
    why_not = refusal(facts)  # cheap, and the host's facts are re-read every time
    if why_not:
        return False, why_not
    if cached:
        saved = cached_verdict()
        if saved is not None:
            return saved[0], f"{saved[1]} (cached since the host booted)"
    result = measure(probe)
    if cached:
        remember(*result)
    return result


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


def watch_console(log: Path, since: int | tuple[int, int], alive: Callable[[], bool], bound: float = SILENT_BOUND,
                  *, clock: Callable[[], float] = time.monotonic,
                  sleep: Callable[[float], None] = time.sleep) -> str:
    """How a freshly started guest's serial console behaves: "printed" once ``log`` grew past
    ``since`` (a size, or seriallog.mark's (inode, size): a log rotated away since has grown too),
    "exited" when QEMU died first, "silent" when neither happened within ``bound`` seconds."""
    from kodepipe.vm import seriallog

    mark = since if isinstance(since, tuple) else (0, since)

    def printed() -> bool:
        return seriallog.grew(log, mark)

    deadline = clock() + bound
    while not printed():
        if not alive():
            return "printed" if printed() else "exited"  # it may have printed just before it ended
        if clock() >= deadline:
            return "silent"
        sleep(0.1)
    return "printed"
