"""accel's decisions with fakes: the host's facts (device, kvm_pvm, CPU flags) x the probes' results,
the versioned per-boot cache, and the console watch on a fake clock.  No test here measures time;
tests/integration/test_accel.py runs the real probe and the real fallback."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kodepipe.core import proc
from kodepipe.core.errors import BadInput, KpError
from kodepipe.vm import accel

P = accel.Probe
RAN = accel.RAN


def ran(seconds: float) -> accel.Probe:
    return P(RAN, seconds, "")


KILLED = P(None, 0.0, "")
REFUSED = P(1, 0.01, "qemu-system-x86_64: -accel kvm: failed to initialize kvm: Permission denied")


@dataclass
class FakeProbe:
    """Answers each kind's probes in order; remembers (kind, timeout) of every call."""

    tcg: list[accel.Probe] = field(default_factory=list)
    kvm: list[accel.Probe] = field(default_factory=list)
    calls: list[tuple[str, float]] = field(default_factory=list)

    def __call__(self, kind: str, timeout: float) -> accel.Probe:
        self.calls.append((kind, timeout))
        queue = self.tcg if kind == "tcg" else self.kvm
        result = queue.pop(0)
        if kind == "kvm" and result.status is None:
            return P(None, timeout, "")  # killed at the timeout it was given
        return result


HW = accel.Host(device=True, usable=True, pvm=False, hardware=True)
NO_DEVICE = accel.Host(device=False, usable=False, pvm=False, hardware=True)
DENIED = accel.Host(device=True, usable=False, pvm=False, hardware=True)
PVM = accel.Host(device=True, usable=True, pvm=True, hardware=False)  # this project's CI hosts
PVM_WITH_FLAGS = accel.Host(device=True, usable=True, pvm=True, hardware=True)
NO_FLAGS = accel.Host(device=True, usable=True, pvm=False, hardware=False)
NOT_X86 = accel.Host(device=True, usable=True, pvm=False, hardware=None)

FAST_KVM = ([ran(0.10)], [ran(0.05)])


@pytest.mark.parametrize(("facts", "tcg", "kvm", "works", "words", "kinds"), [
    # the host's facts decide before any probe, whatever a probe would have said
    (NO_DEVICE, *FAST_KVM, False, "there is no /dev/kvm", ""),
    (DENIED, *FAST_KVM, False, "cannot open it for reading and writing", ""),
    (PVM, *FAST_KVM, False, "kvm_pvm", ""),
    (PVM_WITH_FLAGS, *FAST_KVM, False, "only PVM-enabled guest kernels", ""),
    (NO_FLAGS, *FAST_KVM, False, "no vmx or svm flag", ""),
    # hardware virtualisation: the race on this machine decides
    (HW, *FAST_KVM, True, "KVM ran the test guest in 0.05 s, TCG in 0.10 s", "tk"),
    (NOT_X86, *FAST_KVM, True, "KVM ran the test guest in 0.05 s", "tk"),
    (HW, [ran(0.10)], [ran(0.30)], True, "at most 3x TCG's time", "tk"),  # the bound is inclusive
    # the machine: 1.39 s under KVM, TCG 0.15 s; "fast" by the old fixed 2 s threshold
    (HW, [ran(0.15)] * 3, [ran(1.39)] * 3, False, "took 1.39 s under it, against 0.15 s under TCG", "tktktk"),
    (HW, [ran(4.0)] * 3, [ran(4.5)] * 3, True, "KVM ran the test guest in 4.50 s, TCG in 4.00 s", "tk"),  # slow box
    (HW, [ran(0.10)] * 3, [KILLED] * 3, False, "did not finish within 0.30 s", "tktktk"),
    # one scheduling hiccup does not decide: a later round may win
    (HW, [ran(0.10), ran(0.10)], [ran(0.50), ran(0.09)], True, "KVM ran the test guest in 0.09 s", "tktk"),
    # the best TCG time counts, whichever round measured it
    (HW, [ran(0.50), ran(0.10), ran(0.40)], [ran(1.60), ran(0.40), ran(0.35)], False,
     "took 0.35 s under it, against 0.10 s", "tktktk"),
    # QEMU refusing KVM will refuse it again: no second round
    (HW, [ran(0.10)], [REFUSED], False, "QEMU failed under it (exit status 1): qemu-system", "tk"),
    # TCG itself cannot run the guest: nothing to compare with, and no KVM probe
    (HW, [P(1, 0.01, "qemu: no bios")], [], False, "could not run the test guest under TCG (exit status 1", "t"),
    (HW, [P(None, 60.0, "")], [], False, "killed after 60 s", "t"),
])
def test_decide(facts: accel.Host, tcg: list[accel.Probe], kvm: list[accel.Probe], works: bool, words: str,
                kinds: str) -> None:
    fake = FakeProbe(list(tcg), list(kvm))
    result = accel.decide(facts, fake)
    assert result[0] is works and words in result[1], result
    assert "".join(kind[0] for kind, _ in fake.calls) == kinds


def test_the_kvm_probe_is_killed_at_ratio_times_the_best_tcg_time() -> None:
    fake = FakeProbe([ran(0.20), ran(0.10), ran(0.30)], [KILLED] * 3)
    accel.decide(HW, fake)
    assert fake.calls == [("tcg", accel.TCG_BOUND), ("kvm", pytest.approx(0.60)),
                          ("tcg", accel.TCG_BOUND), ("kvm", pytest.approx(0.30)),
                          ("tcg", accel.TCG_BOUND), ("kvm", pytest.approx(0.30))]


@pytest.mark.parametrize(("machine", "cpuinfo", "hardware"), [
    ("x86_64", "processor\t: 0\nflags\t\t: fpu vme vmx sse2\n", True),
    ("x86_64", "flags\t\t: fpu svm lm\nflags\t\t: fpu svm lm\n", True),
    ("x86_64", "flags\t\t: fpu vme sse2 hypervisor\n", False),  # this project's CI hosts
    ("x86_64", "flags\t\t: fpu vmxx nosvm\n", False),  # words, not substrings
    ("x86_64", None, False),  # no /proc/cpuinfo to show the flag
    ("aarch64", "Features\t: fp asimd\n", None),  # the flags are x86's: only the race can tell
])
def test_host_facts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, machine: str, cpuinfo: str | None,
                    hardware: bool | None) -> None:
    monkeypatch.setattr(platform, "machine", lambda: machine)
    monkeypatch.setattr(accel, "CPUINFO", tmp_path / "cpuinfo")
    monkeypatch.setattr(accel, "PVM_MODULE", tmp_path / "kvm_pvm")
    monkeypatch.setattr(accel, "KVM_DEVICE", tmp_path / "kvm")
    if cpuinfo is not None:
        (tmp_path / "cpuinfo").write_text(cpuinfo)
    assert accel.host() == accel.Host(device=False, usable=False, pvm=False, hardware=hardware)
    (tmp_path / "kvm").touch()
    (tmp_path / "kvm_pvm").mkdir()
    assert accel.host() == accel.Host(device=True, usable=True, pvm=True, hardware=hardware)


@pytest.fixture
def fake_host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeProbe:
    """An x86 host with hardware virtualisation, a usable /dev/kvm stand-in, no kvm_pvm; a fake probe."""
    device, cpuinfo = tmp_path / "kvm", tmp_path / "cpuinfo"
    device.touch()
    cpuinfo.write_text("flags\t\t: fpu vmx\n")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(accel, "KVM_DEVICE", device)
    monkeypatch.setattr(accel, "CPUINFO", cpuinfo)
    monkeypatch.setattr(accel, "PVM_MODULE", tmp_path / "no-kvm_pvm")
    monkeypatch.setattr(proc, "boot_id", lambda: "boot-1")
    fake = FakeProbe()
    monkeypatch.setattr(accel, "probe", fake)
    return fake


def cache_of(kp_env: dict[str, Path]) -> dict[str, object]:
    loaded: dict[str, object] = json.loads((kp_env["runtime"] / accel.CACHE).read_text())
    return loaded


def test_the_verdict_is_cached_for_the_host_boot(fake_host: FakeProbe, monkeypatch: pytest.MonkeyPatch,
                                                kp_env: dict[str, Path]) -> None:
    fake_host.tcg, fake_host.kvm = [ran(0.1)] * 3, [KILLED] * 3
    first = accel.kvm_works()
    assert first[0] is False
    assert accel.kvm_works() == (False, f"{first[1]} (cached since the host booted)")  # no second probe
    assert cache_of(kp_env) == {"version": accel.CACHE_VERSION, "boot_id": "boot-1", "kvm": False,
                                "reason": first[1]}
    monkeypatch.setattr(proc, "boot_id", lambda: "boot-2")  # the host rebooted: probe again
    fake_host.tcg, fake_host.kvm = [ran(0.1)], [ran(0.05)]
    assert accel.kvm_works()[0] is True
    assert fake_host.tcg == fake_host.kvm == []


def test_the_hosts_facts_come_before_the_cache(fake_host: FakeProbe, monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    accel.remember(True, "KVM ran the test guest in 0.05 s")
    (tmp_path / "no-kvm_pvm").mkdir()  # kvm_pvm loaded since: a cached "yes" must not win
    works, reason = accel.kvm_works()
    assert not works and "kvm_pvm" in reason and fake_host.calls == []


@pytest.mark.parametrize("junk", [
    "", "{", "[]", "null", '{"boot_id": "boot-1"}',
    # version 1, written by the fixed 2 s threshold that picked a KVM which hangs: never trusted
    '{"boot_id": "boot-1", "kvm": true, "reason": "KVM ran a test guest in 1.39 s"}',
    '{"version": 1, "boot_id": "boot-1", "kvm": true, "reason": "old"}',
    '{"version": 2, "boot_id": "boot-1", "kvm": "yes", "reason": "wrong type"}',
    '{"version": 2, "boot_id": "boot-0", "kvm": true, "reason": "another host boot"}',
])
def test_a_cache_in_another_format_means_probing_again(fake_host: FakeProbe, kp_env: dict[str, Path],
                                                      junk: str) -> None:
    kp_env["runtime"].mkdir(mode=0o700, exist_ok=True)
    (kp_env["runtime"] / accel.CACHE).write_text(junk)
    fake_host.tcg, fake_host.kvm = [ran(0.15)] * 3, [ran(1.39)] * 3
    works, reason = accel.kvm_works()
    assert not works and "took 1.39 s" in reason and "cached" not in reason
    assert cache_of(kp_env)["version"] == accel.CACHE_VERSION


def test_what_the_console_watch_remembers_wins_over_the_probe(fake_host: FakeProbe) -> None:
    fake_host.tcg, fake_host.kvm = [ran(0.1)], [ran(0.05)]
    assert accel.choose("auto")[0] == "kvm"
    accel.remember(False, "the guest under KVM wrote nothing on its serial console within 30 s")
    assert accel.choose("auto") == ("tcg", "the guest under KVM wrote nothing on its serial console within 30 s "
                                           "(cached since the host booted)")
    with pytest.raises(KpError) as info:
        accel.choose("kvm")
    assert info.value.code == "kvm_unusable" and "serial console" in info.value.message
    assert fake_host.calls == [("tcg", accel.TCG_BOUND), ("kvm", pytest.approx(0.3))]


def test_uncached_neither_reads_nor_writes(fake_host: FakeProbe, kp_env: dict[str, Path]) -> None:
    accel.remember(False, "kept")
    fake_host.tcg, fake_host.kvm = [ran(0.1)], [ran(0.05)]
    assert accel.kvm_works(cached=False)[0] is True
    assert cache_of(kp_env)["reason"] == "kept"


def test_no_device_means_no_probe(fake_host: FakeProbe, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(accel, "KVM_DEVICE", tmp_path / "absent")
    assert accel.choose("auto") == ("tcg", "there is no " f"{tmp_path / 'absent'} (no hardware virtualisation, "
                                           "or the kvm module is not loaded)")
    assert fake_host.calls == []


@pytest.mark.parametrize(("requested", "tcg", "kvm", "expected"), [
    ("tcg", [], [], ("tcg", "requested")),
    ("auto", [ran(0.1)], [ran(0.05)], ("kvm", "KVM ran the test guest in 0.05 s")),
    ("auto", [ran(0.1)] * 3, [KILLED] * 3, ("tcg", "KVM is present but the test guest did not finish")),
    ("kvm", [ran(0.1)], [ran(0.05)], ("kvm", "requested")),
])
def test_choose(fake_host: FakeProbe, requested: str, tcg: list[accel.Probe], kvm: list[accel.Probe],
                expected: tuple[str, str]) -> None:
    fake_host.tcg, fake_host.kvm = list(tcg), list(kvm)
    chosen, reason = accel.choose(requested)
    assert chosen == expected[0] and reason.startswith(expected[1])
    assert fake_host.tcg == fake_host.kvm == []


def test_choose_kvm_when_it_does_not_work(fake_host: FakeProbe, monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    (tmp_path / "no-kvm_pvm").mkdir()
    with pytest.raises(KpError) as info:
        accel.choose("kvm")
    assert info.value.code == "kvm_unusable"
    assert "kvm_pvm" in info.value.message and "--accel tcg" in info.value.message


def test_choose_rejects_other_names(fake_host: FakeProbe) -> None:
    with pytest.raises(BadInput):
        accel.choose("hvf")


class Clock:
    """A fake monotonic clock that advances only when the watch sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.mark.parametrize(("writes_at", "dies_at", "seen", "waited"), [
    (None, None, "silent", accel.SILENT_BOUND),  # a hung guest: stopped at the bound, not before
    (1.5, None, "printed", 1.5),
    (accel.SILENT_BOUND - 0.5, None, "printed", accel.SILENT_BOUND - 0.5),
    (None, 2.0, "exited", 2.0),  # QEMU died under KVM (an MSR error, say): no need to wait for the bound
    (2.0, 2.0, "printed", 2.0),  # it printed, then ended: the console did speak
    (5.0, 1.0, "exited", 1.0),
])
def test_watch_console(tmp_path: Path, writes_at: float | None, dies_at: float | None, seen: str,
                       waited: float) -> None:
    log = tmp_path / "serial.log"
    log.write_bytes(b"the previous boot's lines\n")
    since = log.stat().st_size
    clock = Clock()

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        if writes_at is not None and clock.now >= writes_at - 1e-9 and log.stat().st_size == since:
            with log.open("ab") as f:
                f.write(b"[    0.000000] Linux version 6.1.0\n")

    alive: Callable[[], bool] = lambda: dies_at is None or clock.now < dies_at - 1e-9  # noqa: E731
    assert accel.watch_console(log, since, alive, clock=clock, sleep=sleep) == seen
    assert clock.now == pytest.approx(waited, abs=0.11)


def test_watch_console_without_a_log_yet(tmp_path: Path) -> None:
    clock = Clock()
    assert accel.watch_console(tmp_path / "none", 0, lambda: True, 3.0, clock=clock, sleep=clock.sleep) == "silent"
    assert clock.now == pytest.approx(3.0, abs=0.11)


def test_kp_boot_help_states_the_ratio_and_the_bound() -> None:
    from kodepipe.commands import boot

    text = " ".join(getattr(p, "help", None) or "" for p in boot.cli.params) + " " + (boot.cli.help or "")
    text = " ".join(text.split())
    assert f"{accel.RATIO:g}x TCG's time" in text and f"{accel.SILENT_BOUND:g} s" in text


@pytest.mark.parametrize(("kvm", "fallback", "launched", "chosen", "error", "remembered"), [
    ("printed", True, ["kvm"], "kvm", None, None),
    ("printed", False, ["kvm"], "kvm", None, None),
    ("silent", True, ["kvm", "tcg"], "tcg", None, "wrote nothing on its serial console within 30 s, so it was"),
    ("silent", False, ["kvm"], "kvm", "kvm_silent", "wrote nothing on its serial console within 30 s"),
    ("exited", True, ["kvm", "tcg"], "tcg", None, "QEMU ended under KVM before the guest wrote anything on its "
                                                  "serial console (error: failed to set MSR 0x38d), so it was"),
    ("exited", False, ["kvm"], "kvm", "kvm_silent", "QEMU ended under KVM"),
    ("refused", True, ["kvm", "tcg"], "tcg", None, "QEMU failed to start under KVM (QEMU failed to start: "
                                                   "kvm: no), so it was stopped and booted again under TCG"),
    ("refused", False, ["kvm"], "kvm", "qemu_failed", None),  # QEMU's own error, as without the watch
    ("tcg fails too", True, ["kvm", "tcg"], "tcg", "qemu_failed", None),  # then KVM was not the cause
])
def test_the_console_watch_decides(fake_host: FakeProbe, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                   kvm: str, fallback: bool, launched: list[str], chosen: str,
                                   error: str | None, remembered: str | None) -> None:
    """runtime's second line of defence, with fakes for QEMU: what is launched, what the record's accel
    becomes, what fails, and what is remembered for the host's boot."""
    from kodepipe.vm import lifecycle as runtime
    from kodepipe.vm import qemu

    calls: list[str] = []
    saves: list[str] = []
    qemu_log = tmp_path / "qemu.log"
    qemu_log.write_text("$ qemu-system-x86_64 -accel kvm\nerror: failed to set MSR 0x38d\n")

    def launch(how: str) -> tuple[int, int | None]:
        calls.append(how)
        if (how == "kvm" and kvm in ("refused", "tcg fails too")) or (how == "tcg" and kvm == "tcg fails too"):
            raise KpError("QEMU failed to start: kvm: no", code="qemu_failed")
        return 1234, 2222

    monkeypatch.setattr(accel, "watch_console", lambda *args, **kwargs: kvm)
    monkeypatch.setattr(qemu, "kill", lambda boot_meta: None)
    boot_meta: dict[str, object] = {"accel": "kvm", "accel_reason": "KVM ran the test guest"}
    sockets = qemu.Sockets.for_vm("vm")
    try:
        result = runtime._launch_under_kvm("vm", boot_meta, launch, sockets, tmp_path / "serial.log", qemu_log,
                                           fallback=fallback, save=lambda: saves.append(str(boot_meta["accel"])))
    except KpError as exc:
        assert exc.code == error, exc.message
        assert "--accel tcg" in exc.message or exc.code == "qemu_failed"
    else:
        assert error is None and result == (1234, 2222)
    assert calls == launched and boot_meta["accel"] == chosen
    if chosen == "tcg":
        assert saves == ["tcg"] and str(boot_meta["accel_reason"]).endswith("booted again under TCG")
    cached = accel.cached_verdict()
    if remembered is None:
        assert cached is None
    else:
        assert cached is not None and cached[0] is False and remembered in cached[1]
