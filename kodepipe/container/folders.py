"""Containers that kp-run made: their folders, live state, and removal.

Each kp-run has a folder containers/NAME/ in the state dir from the moment
it starts: meta.json (who, what, which Podman container, the kp-run
process), and when asked for, the quarantine's upper dir, the audit log and
the secrets' private copies.  A plain run's folder is removed when the run
ends; one with a quarantine to review, an audit log or --keep stays until
kp-rm (or kp-run --apply) ends it.

States: creating, running, exited (kept), quarantined (changes to review),
applied, orphaned (kp-run was killed while the container ran, or its
container still runs though kp-run has ended: kp-rm removes it).

meta.json names the Podman container before it is made (container_name,
with the run's id as its io.kodepipe.id label), then its id and its first
process (container_pid, checked against its start time, so kp-ls sees
whether it still runs without asking Podman), and at the end whether kp-run
removed it (container_removed).  kp-rm removes a container that is not
known to be gone, whatever the run's state.

A run inside a VM has its folder here too (host: the VM's name): its
egress log, and the record of what it did; kp-rm removes it, and what the
run left in the guest (vmrun.forget) if the VM answers.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kodepipe.core import proc
from kodepipe.core.errors import KpError
from kodepipe.core.records import Record
from kodepipe.core.state import Store, check_id, mounts_under

KIND = "container"
MERGED = "merged"
# meta.json keys that identify processes of this boot: kept out of records
PRIVATE = ("pid", "pid_start", "boot_id", "container_pid", "container_pid_start")


def owner_alive(meta: dict[str, Any]) -> bool:
    pid, started = meta.get("pid"), meta.get("pid_start")
    if not isinstance(pid, int) or meta.get("boot_id") != proc.boot_id():
        return False
    return isinstance(started, int) and proc.start_time(pid) == started  # None: never "alive" when gone


def process_running(pid: int, started: object) -> bool:
    """True when ``pid`` is still the process that started at ``started`` and has not ended
    (a zombie has ended: its parent just has not collected it yet)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0] not in ("Z", "X", "x") and int(fields[19]) == started
    except (OSError, IndexError, ValueError):
        return False


def container_running(meta: dict[str, Any]) -> bool:
    """Whether the run's container still runs, from its first process (no Podman call: fast)."""
    pid = meta.get("container_pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or meta.get("boot_id") != proc.boot_id():
        return False
    return process_running(pid, meta.get("container_pid_start"))


def view(store: Store, name: str) -> Record:
    record, meta = store.record_base(KIND, name)
    if meta is None:  # record_base says why: creating (its kp-run holds the lock), gone or broken
        return record
    state = record.get("state")
    if state in ("creating", "running") and not owner_alive(meta):
        record["state"] = "orphaned"
        record["problem"] = ("the kp-run that ran it is gone and its container still runs; kp-rm stops and "
                             "removes it" if container_running(meta) else
                             "the kp-run that ran it is gone; the container may still exist (kp-rm removes it)")
    elif state in ("exited", "quarantined") and meta.get("container_removed") is not True \
            and container_running(meta):
        # kp-run ended without stopping it (it lost Podman, say): never "exited" while it runs
        record["state"] = "orphaned"
        record["problem"] = (f"kp-run has ended but its container still runs (the run was {state}); "
                             "kp-rm stops and removes it")
    folder = store.folder(KIND, name)
    if mounts_under(folder):
        record["mounted"] = True
    for key, file in (("audit_log", "audit.strace"), ("egress_log", "egress.jsonl")):
        # the logs where the folder is now: a state directory that was moved is still read (kp-trace)
        if isinstance(record.get(key), str) and Path(record[key]).name == file:
            record[key] = str(folder / file)
    for key in PRIVATE:
        record.pop(key, None)
    return record


def unmount(folder: Path) -> None:
    """Unmount the quarantine overlay (and anything else) under a container's folder."""
    for mount in sorted(mounts_under(folder), key=len, reverse=True):
        result = proc.run(["umount", mount], check=False)
        if result.returncode != 0:
            # busy (a shell still in it): detach it now, the kernel frees it when the last user goes
            proc.run(["umount", "-l", mount], check=False)


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
        try:
            meta = store.read_meta(folder) or {}
        except KpError:
            meta = {}  # unreadable: it names no container
        if needs_removal(meta):
            _remove_container(name, meta)
        elif meta.get("host", "local") != "local":
            _forget_in_guest(meta)
        unmount(folder)
        from kodepipe.container import apply  # an apply killed half-way: its temporary files in the workspace

        apply.abandon(folder)
        store.discard(folder)
    return record


def needs_removal(meta: dict[str, Any]) -> bool:
    """Whether a run's Podman container may still exist: named, on this host, not known gone.
    Whatever the run's state: a quarantine or an audit whose kp-run lost Podman keeps one too."""
    named = isinstance(meta.get("container_id"), str) or isinstance(meta.get("container_name"), str)
    return named and meta.get("host", "local") == "local" and meta.get("container_removed") is not True


def _forget_in_guest(meta: dict[str, Any]) -> None:
    """A run in a VM: what it left in its guest goes too, if the VM answers (vmrun.forget); a VM that is
    stopped or gone took it along, or will (its /run is a tmpfs, and the VM is disposable)."""
    from kodepipe.container import vmrun

    with contextlib.suppress(KpError):
        vmrun.forget(meta)


def _remove_container(name: str, meta: dict[str, Any]) -> None:
    """Stop and remove the run's container: by id, or by the name it was to get (if it carries
    the run's id label).  Its folder stays if Podman cannot be asked, so a later kp-rm can."""
    from kodepipe.container import engine
    from kodepipe.core.errors import MissingProgram

    cid, pname = meta.get("container_id"), meta.get("container_name")
    try:
        eng = engine.Engine.connect()
        if not isinstance(cid, str):
            cid = eng.find(pname if isinstance(pname, str) else name, str(meta.get("id")))
        if cid is not None:
            eng.kill(cid)
            eng.remove(cid)
    except MissingProgram:
        return  # no Podman on this host: no container either
    except KpError as exc:
        pid = meta.get("container_pid")
        if container_running(meta) and isinstance(pid, int):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)  # stopped at least; Podman removes it later
        raise KpError(f"could not remove its container {str(cid or pname)[:12]}: {exc.message}",
                      code=exc.code, hint=f"kp-rm {name} again once Podman answers") from None


def names_running(store: Store) -> list[str]:
    return [name for name, meta in store.metas(KIND) if meta.get("state") == "running" and owner_alive(meta)]
