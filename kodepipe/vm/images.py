"""Golden images: building, viewing and removing them."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kodepipe.core import paths
from kodepipe.core.errors import InUse, KpError
from kodepipe.core.records import Record
from kodepipe.core.state import Store, check_id, new_id, now_iso

if TYPE_CHECKING:
    from kodepipe.vm.imagebuild import BuildSpec

DISK = "disk.qcow2"
KERNEL = "vmlinuz"
INITRD = "initrd.img"


def view(store: Store, name: str) -> Record:
    """The image record for ``name``: its metadata plus the state checked now."""
    record, meta = store.record_base("image", name)
    if meta is None:
        return record
    folder = store.folder("image", name)
    for key in ("disk", "kernel", "initrd"):
        if isinstance(meta.get(key), str):
            record[key] = str(folder / meta[key])
    # "building" while its builder holds the lock; Store.record_base has already made it "broken" if not
    if meta.get("state") == "ready":
        missing = [k for k in ("disk", "kernel", "initrd") if not Path(record.get(k, "")).is_file()]
        if missing:
            record["state"] = "broken"
            record["problem"] = f"missing {', '.join(missing)} file"
        warm = meta.get("warm")
        if isinstance(warm, dict):
            # cold clones do not need it: the image stays ready, its warm state says what it lacks
            gone = [str(warm[k]) for k in ("disk", "state", "ram")
                    if isinstance(warm.get(k), str) and not (folder / warm[k]).is_file()]
            if gone:
                record["warm"] = {**warm, "problem": f"missing {', '.join(gone)}"}
    return record


def clones_of(store: Store, name: str, image_id: str | None) -> list[str]:
    """Names of VMs whose disk is an overlay on this image."""
    return [vm for vm, meta in store.metas("vm")
            if meta.get("base") == name and (image_id is None or meta.get("base_id") == image_id)]


def build(store: Store, name: str, spec: BuildSpec, progress: Callable[[str], None]) -> Record:
    """Build a golden image called ``name``; nothing is left behind on failure."""
    from kodepipe.vm import imagebuild

    started = time.monotonic()
    meta: dict[str, Any] = {"kind": "image", "name": name, "id": new_id(), "created": now_iso(),
                            "state": "building", "builder_pid": os.getpid()}
    with store.lock(name, wait=1.0), store.creating("image", name, meta) as folder:
        log = folder / "build.log"
        try:
            facts = imagebuild.build(spec, folder, progress=progress, log=log,
                                     cache_dir=paths.cache_dir() / "debs")
        except BaseException as exc:
            kept = _keep_log(name, log)
            if isinstance(exc, KpError) and kept:
                exc.hint = f"{exc.hint}; full log: {kept}" if exc.hint else f"full log: {kept}"
            raise
        # the golden disk is only ever read (clones write to their overlays)
        os.chmod(folder / DISK, 0o444)
        meta.update(facts)
        from kodepipe.vm.sshkeys import fingerprint

        meta["ssh_keys"] = [fingerprint(k) for k in spec.authorized_keys]
        meta.update(state="ready", disk=DISK, kernel=KERNEL, initrd=INITRD,
                    build_seconds=round(time.monotonic() - started, 1))
        meta.pop("builder_pid", None)
        store.write_meta(folder, meta)
    return view(store, name)


def _keep_log(name: str, log: Path) -> Path | None:
    """Copy a failed build's log out of the folder that is about to be removed."""
    if not log.exists():
        return None
    logs = paths.cache_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    kept = logs / f"build-{name}-{time.strftime('%Y%m%dT%H%M%S')}.log"
    shutil.copyfile(log, kept)
    return kept


def remove(store: Store, name: str, *, expect_id: str | None, force: bool, dry_run: bool,
           check: Callable[[Record], None] | None = None, ignore_clones: Collection[str] = ()) -> Record | None:
    """Remove image ``name``; None when there is none (already removed).

    ``check`` sees the current record under the lock and may raise to leave
    the image alone; ``ignore_clones`` are clones that a dry run counts as
    removed already, so that it refuses exactly what the real run would.
    """
    with store.lock(name):
        folder = store.folder("image", name)
        if not folder.is_dir():
            return None
        record = view(store, name)
        check_id(record, expect_id)
        if check is not None:
            check(record)
        clones = [c for c in clones_of(store, name, record.get("id")) if c not in ignore_clones]
        if clones and not force:
            shown = ", ".join(clones[:5]) + (", ..." if len(clones) > 5 else "")
            raise InUse(f"image {name} is the base of {len(clones)} clone(s): {shown}",
                        hint="remove the clones first, or use --force (the clones then stop working)")
        if not dry_run:
            store.discard(folder)
        return record
