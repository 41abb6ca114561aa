"""Container folders as kp-ls and kp-rm see them, and the Podman stream framing."""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import orjson

from kodepipe import containers, engine, inventory, proc
from kodepipe.state import Store


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

