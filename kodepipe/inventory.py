"""What kodepipe owns: listing, filtering and removing it, by kind."""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import time
from collections.abc import Iterable

from kodepipe import containers, images, vms
from kodepipe.errors import BadInput
from kodepipe.records import NAME_RE, Record
from kodepipe.state import Store, parse_iso

KINDS = ("image", "vm", "container")
STATES = ("building", "ready", "stopped", "running", "suspended", "saved", "crashed", "broken",
          "exited", "quarantined", "orphaned")

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_duration(text: str) -> float:
    """Seconds in '90s', '15m', '2h', '1d', '1w' or a sum such as '1h30m'."""
    compact = text.strip().lower()
    pos, total = 0, 0.0
    for match in _DURATION.finditer(compact):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not compact or pos != len(compact):
        raise BadInput(f"invalid duration {text!r}: use a number and a unit (s, m, h, d, w), e.g. 90s, 2h, 1d, 1h30m")
    return total


def view(store: Store, kind: str, name: str) -> Record:
    if kind == "container":
        return containers.view(store, name)
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
            out.append(record)
    if "vm" in kinds:
        out.extend(vms.view(store, n) for n in store.names("vm"))
    if "container" in kinds:
        out.extend(containers.view(store, n) for n in store.names("container"))
    for record in out:
        _add_disk_bytes(record)
    return out


def refresh(store: Store, record: Record) -> Record:
    """The record with its image or VM's current view laid over it ("gone" if removed)."""
    kind, name = record["kind"], record["name"]
    if not NAME_RE.fullmatch(name) or not store.folder(kind, name).is_dir():
        return {**record, "state": "gone"}
    current = view(store, kind, name)
    if isinstance(record.get("id"), str) and current.get("id") not in (None, record["id"]):
        # same name, but a different object than the record named
        return {**record, "state": "gone"}
    _add_disk_bytes(current)
    return {**record, **current}


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


def remove(store: Store, kind: str, name: str, *, expect_id: str | None, force: bool,
           dry_run: bool) -> Record | None:
    if kind == "container":
        return containers.remove(store, name, expect_id=expect_id, dry_run=dry_run)
    if kind == "image":
        return images.remove(store, name, expect_id=expect_id, force=force, dry_run=dry_run)
    return vms.remove(store, name, expect_id=expect_id, dry_run=dry_run)
