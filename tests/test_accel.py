"""accel's decisions with a faked probe (tests/integration/test_accel.py runs the real one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kodepipe import accel, proc
from kodepipe.errors import BadInput, KpError


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[accel.Probe]:
    """The probe answers with the next Probe pushed here; a usable /dev/kvm stand-in."""
    queue: list[accel.Probe] = []
    calls: list[str] = []
    device = tmp_path / "kvm"
    device.touch()
    monkeypatch.setattr(accel, "KVM_DEVICE", device)
    monkeypatch.setattr(accel, "probe", lambda kind, timeout: (calls.append(kind), queue.pop(0))[1])
    monkeypatch.setattr(proc, "boot_id", lambda: "boot-1")
    return queue


@pytest.mark.parametrize(("status", "seconds", "works", "words"), [
    (3, 0.08, True, "KVM ran a test guest in 0.08 s"),
    (3, 4.5, False, "a test guest took 4.5 s"),
    (None, 5.0, False, "did not run within 5 s (nested virtualisation broken?)"),
    (1, 0.02, False, "QEMU failed under it (exit status 1): kvm: no"),
])
def test_verdicts(probes: list[accel.Probe], status: int | None, seconds: float, works: bool, words: str) -> None:
    probes.append(accel.Probe(status, seconds, "kvm: no" if status == 1 else ""))
    result = accel.kvm_works(5.0)
    assert result[0] is works and words in result[1]


def test_the_answer_is_cached_for_the_host_boot(probes: list[accel.Probe], monkeypatch: pytest.MonkeyPatch,
                                               kp_env: dict[str, Path]) -> None:
    probes.append(accel.Probe(None, 3.0, ""))
    first = accel.kvm_works()
    assert accel.kvm_works() == (False, f"{first[1]} (cached since the host booted)")  # no second probe
    assert json.loads((kp_env["runtime"] / accel.CACHE).read_text())["boot_id"] == "boot-1"
    monkeypatch.setattr(proc, "boot_id", lambda: "boot-2")  # the host rebooted: probe again
    probes.append(accel.Probe(3, 0.1, ""))
    assert accel.kvm_works()[0] is True
    assert probes == []


@pytest.mark.parametrize("junk", ["", "{", "[]", '{"boot_id": "boot-1"}'])
def test_a_broken_cache_means_probing_again(probes: list[accel.Probe], kp_env: dict[str, Path], junk: str) -> None:
    kp_env["runtime"].mkdir(mode=0o700, exist_ok=True)
    (kp_env["runtime"] / accel.CACHE).write_text(junk)
    probes.append(accel.Probe(3, 0.1, ""))
    assert accel.kvm_works()[0] is True


def test_no_device_means_no_probe(probes: list[accel.Probe], monkeypatch: pytest.MonkeyPatch,
                                  tmp_path: Path) -> None:
    monkeypatch.setattr(accel, "KVM_DEVICE", tmp_path / "absent")
    works, reason = accel.kvm_works()
    assert not works and "no /dev/kvm" in reason


@pytest.mark.parametrize(("requested", "kvm", "expected"), [
    ("tcg", None, ("tcg", "requested")),
    ("auto", accel.Probe(3, 0.1, ""), ("kvm", "KVM ran a test guest in 0.10 s")),
    ("auto", accel.Probe(None, 3.0, ""), ("tcg", "KVM is present but a test guest did not run within 3 s")),
    ("kvm", accel.Probe(3, 0.1, ""), ("kvm", "requested")),
])
def test_choose(probes: list[accel.Probe], requested: str, kvm: accel.Probe | None,
                expected: tuple[str, str]) -> None:
    if kvm is not None:
        probes.append(kvm)
    chosen, reason = accel.choose(requested)
    assert chosen == expected[0] and reason.startswith(expected[1])
    assert probes == []


def test_choose_kvm_when_it_does_not_work(probes: list[accel.Probe]) -> None:
    probes.append(accel.Probe(None, 3.0, ""))
    with pytest.raises(KpError) as info:
        accel.choose("kvm")
    assert info.value.code == "kvm_unusable"
    assert "did not run within 3 s" in info.value.message and "--accel tcg" in info.value.message


def test_choose_rejects_other_names(probes: list[accel.Probe]) -> None:
    with pytest.raises(BadInput):
        accel.choose("hvf")
