"""A live QEMU that runs no guest code is "frozen", never "running": the mapping from QMP's
run state to kp-ls's state, problem and hint (pure, table-driven), what kp-stop --resume asks
QEMU in each case (a scripted monitor), and how kp-ip and kp-ssh refuse such a VM.  The same
on real QEMU: tests/integration/test_frozen.py."""

from __future__ import annotations

from typing import Any

import pytest

from kodepipe.core.errors import KpError
from kodepipe.vm import qemu, ssh, vms
from kodepipe.vm.qemu import DiskError, Facts
from kodepipe.vm.qmp import Monitor

RESUME = "kp-stop --resume vm1"
RESTART = "kp-stop --kill vm1, then kp-boot vm1"
FULL = DiskError("nospace", "/state/vms/vm1/disk.qcow2", 0)


@pytest.mark.parametrize("facts, ours, starting, state, problem, hint", [
    # running, and kodepipe's own suspend
    (Facts("running"), False, False, "running", None, None),
    (Facts("paused"), True, False, "suspended", None, None),
    (Facts("paused", "failed", "Broken pipe"), True, False, "suspended", None, None),  # a later suspend wins
    # a kp-stop --save cut off: still writing, finished (postmigrate), failed
    (Facts("paused", "active"), False, False, "frozen", "still being written", "cancels the save"),
    (Facts("paused", "active"), True, False, "frozen", "still being written", "cancels the save"),
    (Facts("finish-migrate", "device"), False, False, "frozen", "still being written", RESUME),
    (Facts("postmigrate", "completed"), False, False, "frozen", "a save of its state was interrupted", RESUME),
    (Facts("postmigrate", "completed"), True, False, "frozen", "a save of its state was interrupted", RESUME),
    (Facts("finish-migrate"), False, False, "frozen", "a save of its state was interrupted", RESUME),
    (Facts("paused", "failed", "Unable to write to file: Broken pipe"), False, False, "frozen",
     "a save of its state failed: Unable to write to file: Broken pipe", RESUME),
    (Facts("paused", "cancelled"), False, False, "frozen", "a save of its state cancelled", RESUME),
    # paused by someone else, through the monitor
    (Facts("paused"), False, False, "frozen", "paused outside kodepipe", RESUME),
    (Facts("paused", "completed"), False, False, "frozen", "paused outside kodepipe", RESUME),
    # a full disk, an I/O error
    (Facts("io-error", disk_errors=(FULL,)), False, False, "frozen",
     "no space left on the filesystem holding its disk /state/vms/vm1/disk.qcow2 (0 bytes free now)",
     "free space on the filesystem holding /state/vms/vm1, then " + RESUME),
    (Facts("io-error", disk_errors=(DiskError("nospace", "/x/d.qcow2"),)), True, False, "frozen",
     "no space left on the filesystem holding its disk /x/d.qcow2", "holding /x, then " + RESUME),
    (Facts("io-error", disk_errors=(DiskError("failed", "/x/d.qcow2"),)), False, False, "frozen",
     "an I/O error on its disk /x/d.qcow2", "(dmesg)"),
    (Facts("io-error"), False, False, "frozen", "an I/O error on its disk", "free space"),
    # kp-boot resuming a saved state: running while it holds the lock, else stuck
    (Facts("inmigrate"), False, True, "running", None, None),
    (Facts("inmigrate"), False, False, "frozen", "kp-boot was interrupted", "kp-stop --kill vm1, then kp-boot"),
    # states only a restart leaves
    (Facts("internal-error"), False, False, "frozen", "internal error", RESTART),
    (Facts("guest-panicked"), False, False, "frozen", "kernel panicked", RESTART),
    (Facts("shutdown"), False, False, "frozen", "did not exit", RESTART),
    # the rest
    (Facts("suspended"), False, False, "suspended", "suspended itself", "wakes it"),
    (Facts("prelaunch"), False, False, "frozen", "never told to run", RESUME),
    (Facts("watchdog"), False, False, "frozen", "watchdog", RESUME),
    (Facts("debug"), False, False, "frozen", "debugger", RESUME),
    (Facts("save-vm"), False, False, "frozen", "snapshot", "wait for it"),
    (Facts("restore-vm"), False, False, "frozen", "snapshot", "wait for it"),
    (Facts("colo"), False, False, "frozen", "'colo'", RESUME),
    (Facts("something-new"), False, False, "frozen", "'something-new'", RESTART),
])
def test_qmp_status_to_state(facts: Facts, ours: bool, starting: bool, state: str, problem: str | None,
                             hint: str | None) -> None:
    live = qemu.classify("vm1", facts, paused_by_kodepipe=ours, starting=starting)
    assert live.state == state
    fields = live.fields()
    if problem is None:
        assert "problem" not in fields and "hint" not in fields and "qemu_status" not in fields
    else:
        assert problem in fields["problem"] and hint is not None and hint in fields["hint"]
    if state == "frozen":
        assert fields["qemu_status"] == facts.status


def test_every_state_kp_ls_shows_is_documented() -> None:
    from kodepipe.inventory import STATES

    for status in ("running", "paused", "postmigrate", "io-error", "suspended", "internal-error"):
        for ours in (False, True):
            assert qemu.classify("a", Facts(status), paused_by_kodepipe=ours).state in STATES
    assert "frozen" in STATES and "io-error" in STATES["frozen"] and "postmigrate" in STATES["frozen"]


def test_disk_errors_come_from_query_block() -> None:
    blocks: list[dict[str, Any]] = [
        {"device": "virtio0", "io-status": "nospace", "inserted": {"file": "/s/vms/a/disk.qcow2"}},
        {"device": "ide1-cd0", "io-status": "ok", "inserted": {"file": "/x.iso"}},
        {"device": "virtio1", "io-status": "failed", "inserted": {"file": "/s/extra.raw"}},
        {"device": "floppy0"},  # no medium, no io-status
    ]
    assert qemu.disk_errors(blocks) == [DiskError("nospace", "/s/vms/a/disk.qcow2"),
                                        DiskError("failed", "/s/extra.raw")]


@pytest.mark.parametrize("record, code, words", [
    ({"name": "a", "state": "running"}, None, None),
    ({"name": "a", "state": "frozen", "problem": "QEMU stopped it on a write error", "hint": "free space"},
     "frozen", "a is frozen: QEMU stopped it on a write error; free space"),
    ({"name": "a", "state": "suspended"}, "suspended", "a is suspended; kp-stop --resume a"),
    ({"name": "a", "state": "stopped"}, "not_running", "a is not running (it is stopped); kp-boot a"),
    ({"name": "a", "state": "crashed"}, "not_running", "(it is crashed)"),
])
def test_what_kp_ip_and_kp_ssh_say_about_a_vm_that_cannot_answer(record: dict[str, Any], code: str | None,
                                                                  words: str | None) -> None:
    problem = vms.unusable(record)
    if code is None:
        assert problem is None
        return
    assert problem is not None and problem.code == code and words is not None and words in problem.message
    with pytest.raises(KpError) as info:
        ssh.endpoint({**record, "ssh": {"host": "127.0.0.1", "port": 22, "user": "kp"}})
    assert info.value.code == code and words in info.value.message


class ScriptedMonitor(Monitor):
    """A monitor that answers from a script of run states and records what it was asked."""

    def __init__(self, statuses: list[str], migrations: list[str] | None = None,
                 blocks: list[dict[str, Any]] | None = None) -> None:
        self.statuses, self.migrations, self.blocks = statuses, migrations or [], blocks or []
        self.asked: list[str] = []

    def execute(self, command: str, arguments: dict[str, Any] | None = None, *,
                timeout: float | None = None) -> Any:
        self.asked.append(command)
        if command == "query-status":
            return {"status": self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]}
        if command == "query-migrate":
            if len(self.migrations) > 1:
                status: str | None = self.migrations.pop(0)
            else:
                status = self.migrations[0] if self.migrations else None
            return {"status": status} if status else {}
        if command == "query-block":
            return self.blocks
        return {}


def full_disk(tmp_path: Any) -> list[dict[str, Any]]:
    return [{"device": "virtio0", "io-status": "nospace", "inserted": {"file": str(tmp_path / "disk.qcow2")}}]


@pytest.mark.parametrize("statuses, migrations, sent, code", [
    (["running"], [], [], None),
    (["paused", "running"], [None], ["cont"], None),  # kp-stop --suspend, or anyone's stop
    (["postmigrate", "running"], ["completed"], ["cont"], None),  # a save cut off after it ended
    (["paused", "running"], ["failed"], ["cont"], None),  # a save that failed, unwatched
    # a save still being written: cancelled first, or it would freeze the VM again when it ends
    (["paused", "paused", "running"], ["active", "cancelling", "cancelled", "cancelled"],
     ["migrate_cancel", "cont"], None),
    (["suspended"], [], ["system_wakeup"], None),
    (["internal-error"], [], [], "frozen"),
    (["shutdown"], [], [], "frozen"),
    (["guest-panicked"], [], [], "frozen"),
    (["inmigrate"], [], [], "frozen"),
    (["postmigrate", "io-error"], ["completed"], ["cont"], "frozen"),  # stopped again at once
])
def test_resume_asks_qemu_for_what_it_allows(statuses: list[str], migrations: list[str], sent: list[str],
                                             code: str | None) -> None:
    monitor = ScriptedMonitor(statuses, migrations)
    if code is None:
        monitor.resume("vm1")
    else:
        with pytest.raises(KpError) as info:
            monitor.resume("vm1")
        assert info.value.code == code and info.value.hint
    assert [c for c in monitor.asked if not c.startswith("query-")] == sent


def test_resume_refuses_a_disk_that_is_still_full(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monitor = ScriptedMonitor(["io-error"], blocks=full_disk(tmp_path))
    monkeypatch.setattr(qemu, "free_bytes", lambda file: 4096)
    with pytest.raises(KpError) as info:
        monitor.resume("vm1")
    assert info.value.code == "no_space" and "has 4.0 KiB free" in info.value.message
    assert f"{tmp_path}/disk.qcow2" in info.value.message and "kp-stop --resume vm1" in info.value.message
    assert "cont" not in monitor.asked


def test_resume_continues_once_space_is_free(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monitor = ScriptedMonitor(["io-error", "running"], blocks=full_disk(tmp_path))
    monkeypatch.setattr(qemu, "free_bytes", lambda file: 5 << 30)
    monitor.resume("vm1")
    assert "cont" in monitor.asked


@pytest.mark.parametrize("size, text", [(0, "0 bytes"), (4096, "4.0 KiB"), (1 << 20, "1.0 MiB"),
                                        (3 << 30, "3.0 GiB"), (5 << 40, "5.0 TiB")])
def test_human_bytes(size: int, text: str) -> None:
    assert qemu.human_bytes(size) == text
