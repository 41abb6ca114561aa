"""What kodepipe owns: listing, filtering and removing it, by kind."""

from __future__ import annotations

import contextlib
import fnmatch
import os
import time
from collections.abc import Callable, Collection, Iterable
from pathlib import Path

from kodepipe.container import folders
from kodepipe.core import schema
from kodepipe.core.errors import KpError, NotFound
from kodepipe.core.records import NAME_RE, Record
from kodepipe.core.state import Store, parse_iso
from kodepipe.vm import disks, images, vms

KINDS = ("image", "vm", "container", "disk")
# every state kp-ls can show (kp-ls --state), with its meaning per kind: core/schema.py has them
STATES = schema.listed_states()

def view(store: Store, kind: str, name: str) -> Record:
    if kind == "container":
        return folders.view(store, name)
    if kind == "disk":
        return disks.view(store, name)
    return images.view(store, name) if kind == "image" else vms.view(store, name)


def records(store: Store, kinds: Iterable[str] = KINDS) -> list[Record]:
    """Every image, VM and container folder, images first, each with its state checked now."""
    out: list[Record] = []
    if "image" in kinds:
        # clones are counted from metadata: a VM's live view asks its QEMU, which is not needed here
        vm_metas = list(store.metas("vm"))
        for name in store.names("image"):
            record = images.view(store, name)
            record["clones"] = [vm for vm, meta in vm_metas
                                if meta.get("base") == name and meta.get("base_id") == record.get("id")]
            _add_pool(store, name, record)
            out.append(record)
    if "vm" in kinds:
        out.extend(vms.view(store, n) for n in store.names("vm"))
    if "container" in kinds:
        out.extend(folders.view(store, n) for n in store.names("container"))
    if "disk" in kinds:
        out.extend(disks.view(store, n) for n in store.names("disk"))
    # removed while this listing ran
    out = [record for record in out if record.get("state") != "gone"]
    for record in out:
        _add_disk_bytes(record)
    return out


def refresh(store: Store, record: Record) -> Record:
    """The record with its image or VM's current view laid over it ("gone" if removed)."""
    kind, name = record["kind"], record["name"]
    if not NAME_RE.fullmatch(name) or not store.folder(kind, name).is_dir():
        return {**record, "state": "gone"}
    current = view(store, kind, name)
    if kind == "image":
        _add_pool(store, name, current)
    if isinstance(record.get("id"), str) and current.get("id") not in (None, record["id"]):
        # same name, but a different object than the record named
        return {**record, "state": "gone"}
    _add_disk_bytes(current)
    return vms.fresh(record, current)


def _add_pool(store: Store, name: str, record: Record) -> None:
    from kodepipe.vm import pool

    if (store.folder("image", name) / pool.POOL_FILE).exists():
        record["pool"] = pool.summary(store, name, record)


def _add_disk_bytes(record: Record) -> None:
    disk = record.get("disk")
    if isinstance(disk, str):
        with contextlib.suppress(OSError):
            record["disk_bytes"] = os.stat(disk).st_blocks * 512


def age(record: Record, now: float) -> float | None:
    created = parse_iso(record.get("created"))
    return None if created is None else now - created


def select(items: Iterable[Record], *, states: Iterable[str] = (), names: Iterable[str] = (),
           older_than: float | None = None, newer_than: float | None = None,
           now: float | None = None) -> list[Record]:
    """Records that match every filter given; ``names`` are shell globs."""
    now = time.time() if now is None else now
    states, names = set(states), list(names)
    chosen = []
    for record in items:
        if states and record.get("state") not in states:
            continue
        if names and not any(fnmatch.fnmatchcase(str(record.get("name")), pat) for pat in names):
            continue
        if older_than is not None or newer_than is not None:
            seconds = age(record, now)
            # a record without a creation time (broken) counts as old, never as new
            if older_than is not None and seconds is not None and seconds < older_than:
                continue
            if newer_than is not None and (seconds is None or seconds > newer_than):
                continue
        chosen.append(record)
    return chosen


# -- removal (kp-rm) ---------------------------------------------------------------------------

# what a bulk removal (records on kp-rm's stdin) leaves alone unless a flag allows it: the flag
# and the words that name what is kept
KEEP_FLAGS = {"images": "--images", "quarantines": "--quarantines", "evidence": "--evidence"}


class Kept(Exception):
    """Left alone by a bulk removal: not disposable.  The message says why and how to remove it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def holdings(record: Record) -> dict[str, str]:
    """What a container's folder holds that is the user's, by the flag that allows discarding it.

    Reads the record (the current view) and, for one whose metadata is
    unreadable, the folder itself: an un-applied quarantine, audit and
    egress logs.
    """
    if record.get("kind") != "container":
        return {}
    held: dict[str, str] = {}
    folder = Path(str(record["path"])) if isinstance(record.get("path"), str) else None
    quarantine = record.get("quarantine")
    # quarantined; or still running (or killed) with a quarantine; or changes on disk whatever the metadata says
    if record.get("state") == "quarantined" or (
            isinstance(quarantine, dict) and record.get("state") not in ("exited", "applied", "discarded")) or (
            folder is not None and _not_empty(folder / "upper")):
        held["quarantines"] = "an un-applied quarantine"
    from kodepipe.container.evidence import AUDIT_LOG, EGRESS_LOG

    logs = [what for key, file, what in (("audit_log", AUDIT_LOG, "audit"), ("egress_log", EGRESS_LOG, "egress"))
            if isinstance(record.get(key), str) or (folder is not None and (folder / file).exists())]
    if logs:
        held["evidence"] = f"{' and '.join(logs)} log{'s' if len(logs) > 1 else ''}"
    return held


def _not_empty(folder: Path) -> bool:
    try:
        with os.scandir(folder) as entries:
            return any(True for _ in entries)
    except OSError:
        return False


def keep_reason(record: Record, held: dict[str, str], allowed: Collection[str]) -> str | None:
    """Why a bulk removal keeps this (the current record), or None when it is disposable.  Pure."""
    kind, name = record.get("kind"), record.get("name")
    if kind == "disk":
        return f"disk {name} holds data a VM kept: kp-rm removes a disk only when it is named"
    if kind == "image" and "images" not in allowed:
        return f"image {name} is not disposable (a golden image); name it or pass {KEEP_FLAGS['images']}"
    missing = [flag for flag in held if flag not in allowed]
    if not missing:
        return None
    what = " and ".join(held[flag] for flag in missing)
    flags = " ".join(KEEP_FLAGS[flag] for flag in missing)
    return f"{kind} {name} holds {what}; name it or pass {flags}"


def being_made(store: Store, record: Record) -> str | None:
    """Why a bulk removal keeps a run whose kp-run is alive (it holds no lock while it sets
    up and runs the container), or None.  A name on the command line still removes it."""
    if record.get("kind") != "container" or record.get("state") not in ("creating", "running"):
        return None
    try:  # the record leaves out the owner's pid: the metadata has it
        meta = store.read_meta(store.folder("container", str(record.get("name")))) or {}
    except KpError:
        return None
    if not folders.owner_alive(meta):
        return None
    doing = "is still being made by" if record["state"] == "creating" else "is still running under"
    return f"run {record.get('name')} {doing} kp-run {meta.get('pid')}; name it to remove it"


class Removal:
    """One kp-rm: removes, keeps or refuses what it is given, and in a dry run simulates the
    removals, so that what it says it would do is what the real run does (an image whose
    clones come later in the same input is refused, then removed once they are gone)."""

    def __init__(self, store: Store, *, force: bool, dry_run: bool, allowed: Collection[str] = (),
                 say: Callable[[str], None] = lambda _m: None) -> None:
        self.store, self.force, self.dry_run = store, force, dry_run
        self.say = say  # warnings (a VM's guest left git metadata in its share)
        self.allowed = frozenset(allowed)
        self.removed: set[tuple[str, str]] = set()  # (kind, name) removed, or that the dry run would remove

    def remove(self, kind: str, name: str, *, expect_id: str | None, bulk: bool,
               listed: Record | None = None) -> Record | None:
        """Remove one thing; its last record, or None when it is already gone.

        ``bulk``: it came as a record on stdin, not as a name on the command
        line, so what is not disposable is kept (Kept).  ``listed`` is the
        record it came as: one that showed it broken or in the making without
        an id names that id-less thing, never what has an id now.
        """
        if self.dry_run and (kind, name) in self.removed:
            return None

        def check(current: Record) -> None:
            if listed is not None:
                _check_listed(listed, current)
            if bulk:
                why = being_made(self.store, current) or keep_reason(current, holdings(current), self.allowed)
                if why is None and kind == "vm" and isinstance(current.get("pool"), str):
                    why = (f"vm {name} is in the warm pool of {current['pool']} (kp-pool); name it, or empty "
                           f"the pool with kp-pool {current['pool']} --size 0")
                if why is not None:
                    raise Kept(why)

        store, dry_run = self.store, self.dry_run
        if kind == "container":
            record = folders.remove(store, name, expect_id=expect_id, dry_run=dry_run, check=check)
        elif kind == "disk":
            record = disks.remove(store, name, expect_id=expect_id, dry_run=dry_run, check=check)
        elif kind == "image":
            from kodepipe.vm import pool

            # its pool goes with it, but only once every check has passed with the pool's VMs not counted
            # as clones: an image that is kept, refused or no longer the one named keeps its pool too
            pooled = set(pool.members(store, name))
            # a dry run removed nothing: the clones it would have removed still count unless ignored
            ignore = ({n for k, n in self.removed if k == "vm"} if dry_run else set()) | pooled
            if pooled and not dry_run:
                images.remove(store, name, expect_id=expect_id, force=self.force, dry_run=True, check=check,
                              ignore_clones=ignore)
                pool.empty(store, name, progress=self.say)
            record = images.remove(store, name, expect_id=expect_id, force=self.force, dry_run=dry_run,
                                   check=check, ignore_clones=ignore)
            if dry_run and record is not None:
                self.removed.update(("vm", n) for n in pooled)
        else:
            record = vms.remove(store, name, expect_id=expect_id, dry_run=dry_run, check=check, say=self.say)
        if record is not None:
            self.removed.add((kind, name))
        return record


def _check_listed(listed: Record, current: Record) -> None:
    """A record that showed something broken or in the making, without an id, named that
    id-less thing: if the name now has an id, it is something else (finished, or made anew)."""
    if "id" not in listed and listed.get("state") in ("broken", "creating") and isinstance(current.get("id"), str):
        raise NotFound(f"{current['name']} is no longer the {listed['state']} {current['kind']} the record named "
                       f"(it now has id {current['id']}); left alone", code="stale_record",
                       hint="run kp-ls again to get current records")


def remove(store: Store, kind: str, name: str, *, expect_id: str | None, force: bool,
           dry_run: bool) -> Record | None:
    """Remove one thing named on a command line (nothing is kept as not disposable)."""
    return Removal(store, force=force, dry_run=dry_run).remove(kind, name, expect_id=expect_id, bulk=False)
