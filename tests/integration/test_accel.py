"""The accelerator probe with real QEMU: the boot sector really runs (under TCG),
and on hosts where KVM is broken the probe says so in time and leaves no QEMU behind."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from kodepipe import accel
from kodepipe.errors import KpError

pytestmark = pytest.mark.integration

# this project's CI hosts: /dev/kvm is kvm_pvm, which cannot run an ordinary guest
BROKEN_KVM = Path("/sys/module/kvm_pvm").exists()
needs_kvm_device = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no usable /dev/kvm")


def qemus_using(runtime: Path) -> list[int]:
    """QEMU processes whose command line names this test's runtime dir (where the sector lives)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-system" in cmdline and os.fsencode(runtime) in cmdline:
                found.append(int(entry.name))
    return found


def test_the_boot_sector_runs_under_tcg(kp_env: dict[str, Path]) -> None:
    result = accel.probe("tcg", timeout=10)
    print(f"TCG probe: {result.seconds:.2f} s")
    assert result.status == accel.RAN, result.output
    assert result.seconds < accel.SLOW
    assert qemus_using(kp_env["runtime"]) == []
    assert list(kp_env["runtime"].iterdir()) == []  # the sector's temp dir is gone


@needs_kvm_device
def test_a_probe_that_hangs_is_killed_at_the_timeout(kp_env: dict[str, Path]) -> None:
    if not BROKEN_KVM:
        pytest.skip("KVM works here: the test guest would not hang")
    started = time.monotonic()
    works, reason = accel.kvm_works(timeout=1.0, cached=False)
    took = time.monotonic() - started
    print(f"KVM probe killed after {took:.2f} s")
    assert not works and "did not run within 1 s" in reason and "kvm_pvm" in reason
    assert took < 2.0
    assert qemus_using(kp_env["runtime"]) == []


@needs_kvm_device
def test_kvm_works_answers_within_the_timeout_and_is_cached(kp_env: dict[str, Path]) -> None:
    started = time.monotonic()
    works, reason = accel.kvm_works()
    took = time.monotonic() - started
    print(f"KVM probe: {took:.2f} s -> {works}: {reason}")
    assert took < 5.0 + 1.0
    assert qemus_using(kp_env["runtime"]) == []
    if BROKEN_KVM:
        assert not works and "KVM is present but" in reason
    saved = json.loads((kp_env["runtime"] / accel.CACHE).read_text())
    assert saved["kvm"] == works and saved["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()

    started = time.monotonic()
    assert accel.kvm_works() == (works, f"{reason} (cached since the host booted)")
    assert time.monotonic() - started < 0.1


@needs_kvm_device
def test_choose_on_this_host(kp_env: dict[str, Path]) -> None:
    if not BROKEN_KVM:
        pytest.skip("KVM works here")
    chosen, reason = accel.choose("auto")
    assert chosen == "tcg" and "KVM is present but" in reason
    with pytest.raises(KpError) as info:
        accel.choose("kvm")  # answered from the cache: no second probe
    assert info.value.code == "kvm_unusable" and "--accel tcg" in info.value.message
    assert accel.choose("tcg") == ("tcg", "requested")
    assert qemus_using(kp_env["runtime"]) == []
