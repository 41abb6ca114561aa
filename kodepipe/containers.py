"""Containers that kp-run made: their folders, live state, and removal.

Each kp-run has a folder containers/NAME/ in the state dir from the moment
it starts: meta.json (who, what, which Podman container, the kp-run
process), and when asked for, the quarantine's upper dir, the audit log and
the secrets' private copies.  A plain run's folder is removed when the run
ends; one with a quarantine to review, an audit log or --keep stays until
kp-rm (or kp-run --apply) ends it.

States: creating, running, exited (kept), quarantined (changes to review),
applied, orphaned (kp-run was killed while the container ran: the
container may still be there; kp-rm removes it).
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kodepipe import proc
from kodepipe.errors import KpError
from kodepipe.records import Record
from kodepipe.state import Store, check_id, mounts_under

KIND = "container"
MERGED = "merged"


def owner_alive(meta: dict[str, Any]) -> bool:
    pid, started = meta.get("pid"), meta.get("pid_start")
    if not isinstance(pid, int) or meta.get("boot_id") != proc.boot_id():
        return False
    return proc.start_time(pid) == started


def view(store: Store, name: str) -> Record:
    record, meta = store.record_base(KIND, name)
    if meta is None:  # record_base says why: creating (its kp-run holds the lock), gone or broken
        return record
    if record.get("state") in ("creating", "running") and not owner_alive(meta):
        record["state"] = "orphaned"
        record["problem"] = "the kp-run that ran it is gone; the container may still exist"
    folder = store.folder(KIND, name)
    if mounts_under(folder):
        record["mounted"] = True
    for key in ("pid", "pid_start", "boot_id"):
        record.pop(key, None)
    return record


def unmount(folder: Path) -> None:
    """Unmount the quarantine overlay (and anything else) under a container's folder."""
    for mount in sorted(mounts_under(folder), key=len, reverse=True):
        result = subprocess.run([proc.require("umount"), mount], capture_output=True, check=False)
        if result.returncode != 0:
            # busy (a shell still in it): detach it now, the kernel frees it when the last user goes
            subprocess.run([proc.require("umount"), "-l", mount], capture_output=True, check=False)


def remove(store: Store, name: str, *, expect_id: str | None, dry_run: bool,
           check: Callable[[Record], None] | None = None) -> Record | None:
    """Remove a run's folder (and its container); ``check`` sees the current record under
    the lock and may raise to leave it alone."""
    folder = store.folder(KIND, name)
    with store.lock(name):
        if not folder.is_dir():
            return None
        record = view(store, name)
        check_id(record, expect_id)
        if check is not None:
            check(record)
        if dry_run:
            return record
        cid = record.get("container_id")
        if isinstance(cid, str) and record.get("host", "local") == "local" and record.get("state") != "quarantined":
            _remove_container(cid)
        unmount(folder)
        from kodepipe import apply  # an apply killed half-way: its temporary files in the workspace

        apply.abandon(folder)
        store.discard(folder)
    return record


def _remove_container(cid: str) -> None:
    from kodepipe import engine

    with contextlib.suppress(KpError):
        eng = engine.Engine.connect()
        eng.kill(cid)
        eng.remove(cid)


def names_running(store: Store) -> list[str]:
    return [name for name, meta in store.metas(KIND) if meta.get("state") == "running" and owner_alive(meta)]
