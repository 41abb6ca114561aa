"""Container folders as kp-ls and kp-rm see them, and the Podman stream framing."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import threading
from pathlib import Path

import orjson
import pytest

from kodepipe import inventory
from kodepipe.container import engine
from kodepipe.container import folders as containers
from kodepipe.core import proc
from kodepipe.core.errors import KpError, MissingProgram
from kodepipe.core.state import Store


def make(store: Store, name: str, **meta: object) -> Path:
    folder = store.folder("container", name)
    folder.mkdir(parents=True)
    base = {"kind": "container", "name": name, "id": "c0ffee000001", "created": "2026-01-01T00:00:00Z",
            "state": "running", "pid": os.getpid(), "pid_start": proc.start_time(os.getpid()),
            "boot_id": proc.boot_id()}
    (folder / "meta.json").write_bytes(orjson.dumps({**base, **meta}))
    return folder


def test_a_run_whose_kp_run_is_gone_is_orphaned() -> None:
    store = Store()
    make(store, "alive")
    make(store, "dead", pid=os.getpid(), pid_start=1)  # same pid, another process's start time
    make(store, "rebooted", boot_id="another-boot")
    make(store, "kept", state="quarantined", pid=1, pid_start=1)
    states = {r["name"]: r["state"] for r in inventory.records(store, ["container"])}
    assert states == {"alive": "running", "dead": "orphaned", "rebooted": "orphaned", "kept": "quarantined"}
    shown = containers.view(store, "alive")
    assert "pid" not in shown and "boot_id" not in shown and shown["path"].endswith("/alive")


def test_kp_rm_removes_a_kept_run_and_only_that_one(monkeypatch: object) -> None:
    store = Store()
    folder = make(store, "kept", state="quarantined", pid=1, pid_start=1)
    (folder / "upper").mkdir()
    (folder / "upper" / "file").write_text("agent's work")
    assert containers.remove(store, "kept", expect_id="c0ffee000001", dry_run=True) is not None
    assert folder.exists()
    record = containers.remove(store, "kept", expect_id=None, dry_run=False)
    assert record is not None and record["state"] == "quarantined" and not folder.exists()
    assert containers.remove(store, "kept", expect_id=None, dry_run=False) is None


def test_frames_split_stdout_and_stderr_and_survive_short_reads() -> None:
    payload = b"".join(struct.pack(">BxxxL", kind, len(data)) + data
                       for kind, data in [(1, b"out\n"), (2, b"err\n"), (1, b""), (1, b"x" * 70000)])
    stream = io.BytesIO(payload)

    def trickle(n: int) -> bytes:
        return stream.read(min(n, 1000))  # a socket hands out less than asked

    got = list(engine.frames(trickle))
    assert got[:2] == [(1, b"out\n"), (2, b"err\n")] and got[2] == (1, b"x" * 70000)
    truncated = io.BytesIO(payload[:10])
    assert list(engine.frames(truncated.read)) == [(1, b"ou")]  # what arrived is kept, then it ends



def test_kp_ls_never_says_a_run_ended_while_its_container_runs() -> None:
    """The container's first process (pid and start time, from meta.json) says whether it still
    runs: a run that kp-run recorded as ended, but whose container it could not stop, is orphaned."""
    store = Store()
    me, started = os.getpid(), proc.start_time(os.getpid())  # a live process stands in for the container
    cases: list[tuple[dict[str, object], str]] = [
        ({"state": "exited", "container_pid": me, "container_pid_start": started}, "orphaned"),
        ({"state": "quarantined", "container_pid": me, "container_pid_start": started}, "orphaned"),
        ({"state": "exited", "container_pid": me, "container_pid_start": started, "container_removed": True},
         "exited"),
        ({"state": "exited", "container_pid": me, "container_pid_start": 1}, "exited"),  # a reused pid
        ({"state": "exited", "container_pid": me, "container_pid_start": started, "boot_id": "another"}, "exited"),
        ({"state": "exited", "container_pid": True, "container_pid_start": started}, "exited"),
        ({"state": "quarantined", "container_pid": "1", "container_pid_start": started}, "quarantined"),
        ({"state": "exited"}, "exited"),
    ]
    for n, (meta, expected) in enumerate(cases):
        name = f"case{n}"
        make(store, name, **meta)
        shown = containers.view(store, name)
        assert shown["state"] == expected, (meta, shown)
        assert "container_pid" not in shown and "container_pid_start" not in shown
        if expected == "orphaned":
            assert "still runs" in shown["problem"]
    make(store, "killed", pid=me, pid_start=1, container_pid=me, container_pid_start=started)
    assert "still runs" in containers.view(store, "killed")["problem"]
    make(store, "killed-early", pid=me, pid_start=1, state="creating", container_name="killed-early")
    shown = containers.view(store, "killed-early")
    assert shown["state"] == "orphaned" and "may still exist" in shown["problem"]


def test_a_zombie_is_not_a_running_process() -> None:
    child = subprocess.Popen(["true"])
    started = proc.start_time(child.pid)
    for _ in range(2000):  # ended, not yet collected: a zombie
        if Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        threading.Event().wait(0.005)
    assert not containers.process_running(child.pid, started)
    child.wait()
    assert containers.process_running(os.getpid(), proc.start_time(os.getpid()))


class FakePodman:
    def __init__(self, named: str | None = None, fail: Exception | None = None) -> None:
        self.named, self.fail = named, fail
        self.calls: list[tuple[str, ...]] = []

    def find(self, name: str, run_id: str) -> str | None:
        self.calls.append(("find", name, run_id))
        return self.named

    def kill(self, cid: str) -> None:
        self.calls.append(("kill", cid))

    def remove(self, cid: str) -> None:
        if self.fail is not None:
            raise self.fail
        self.calls.append(("remove", cid))


def test_kp_rm_removes_any_container_that_may_still_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the run's state; by id, or by the name recorded before Podman made it; and
    Podman is not asked at all when kp-run removed the container itself."""
    store = Store()
    cases: list[tuple[dict[str, object], str | None, list[tuple[str, ...]] | None]] = [
        ({"state": "quarantined", "container_id": "c1"}, None, [("kill", "c1"), ("remove", "c1")]),
        ({"state": "exited", "container_id": "c1"}, None, [("kill", "c1"), ("remove", "c1")]),
        ({"state": "creating", "container_name": "NAME"}, "c2",
         [("find", "NAME", "c0ffee000001"), ("kill", "c2"), ("remove", "c2")]),
        ({"state": "creating", "container_name": "NAME"}, None, [("find", "NAME", "c0ffee000001")]),
        ({"state": "quarantined", "container_id": "c1", "container_removed": True}, None, None),
        ({"state": "exited", "container_id": "c1", "host": "vm1"}, None, None),
        ({"state": "creating"}, None, None),  # killed before it named a container
    ]
    for n, (meta, named, expected) in enumerate(cases):
        name = f"run{n}"
        meta = {k: (name if v == "NAME" else v) for k, v in meta.items()}
        expected = [tuple(name if part == "NAME" else part for part in call) for call in expected or []] \
            if expected is not None else None
        fake = FakePodman(named)
        connected: list[bool] = []

        def connect(cls: object, progress: object = None, fake: FakePodman = fake,
                    connected: list[bool] = connected) -> FakePodman:
            connected.append(True)
            return fake

        monkeypatch.setattr(engine.Engine, "connect", classmethod(connect))
        folder = make(store, name, pid=1, pid_start=1, **meta)
        assert containers.remove(store, name, expect_id=None, dry_run=False) is not None
        assert not folder.exists(), meta
        assert (fake.calls if connected else None) == expected, meta


def test_kp_rm_keeps_the_folder_when_podman_cannot_remove_the_container(monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store()
    fake = FakePodman(fail=engine.EngineLost("removing the container: the Podman service stopped answering"))
    monkeypatch.setattr(engine.Engine, "connect", classmethod(lambda cls, progress=None: fake))
    folder = make(store, "stuck", state="quarantined", container_id="c1", pid=1, pid_start=1)
    with pytest.raises(KpError) as caught:
        containers.remove(store, "stuck", expect_id=None, dry_run=False)
    assert caught.value.code == "engine_lost" and "kp-rm stuck again" in caught.value.message
    assert folder.is_dir()

    def missing(cls: object, progress: object = None) -> None:
        raise MissingProgram("podman is not installed")

    monkeypatch.setattr(engine.Engine, "connect", classmethod(missing))
    assert containers.remove(store, "stuck", expect_id=None, dry_run=False) is not None  # no Podman: no container
    assert not folder.exists()
