"""Encrypted persistent data disks: a qcow2 with QEMU's own LUKS encryption, attached to one VM at
a time (kp-boot --disk NAME[:MOUNTPOINT]), mounted in the guest by kp-ip and formatted on first use.

A disk lives in its own folder (disks/NAME: disk.qcow2 and meta.json), so it outlives every clone
it was attached to; kp-rm removes it only when it is named.  Its key never lies with it: the
metadata says where kodepipe reads it (an environment variable, a file or a command on the host,
as a credential's source), and the key reaches qemu-img on a pipe and QEMU as a secret object read
from an inherited pipe: never on a command line, never in the guest, never in a record.

The metadata's ``attached`` names the VM that has it (and its boot's id); a second VM is refused
while that VM runs.  QEMU's own lock on the image file stands behind that.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from kodepipe.core.errors import BadInput, CommandFailed, KpError
from kodepipe.core.records import Record
from kodepipe.core.state import Store, check_id, new_id, now_iso

DISK = "disk.qcow2"
MOUNT_ROOT = "/mnt"  # a disk's default mount point in the guest is /mnt/NAME
# an absolute guest path of plain names (the guest's shell and fstab see it)
_MOUNT_RE = re.compile(r"/[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")
MIN_SIZE, MAX_SIZE = 16 << 20, 16 << 40
MAX_DISKS = 8  # per VM


def check_mountpoint(text: str) -> str:
    if not _MOUNT_RE.fullmatch(text) or any(part in (".", "..") for part in text.split("/")) or \
            text.split("/")[1] in ("proc", "sys", "dev", "run", "boot", "etc", "usr", "bin", "sbin", "lib"):
        raise BadInput(f"--disk mount point {text!r}: an absolute path of plain names, not under a system "
                       "directory (e.g. /data or /mnt/cache)")
    return text


def parse_attach(text: str) -> tuple[str, str]:
    """``NAME[:MOUNTPOINT]`` of kp-boot --disk; the mount point defaults to /mnt/NAME.  Pure."""
    from kodepipe.core.records import NAME_RE

    name, _, mountpoint = text.partition(":")
    if not NAME_RE.fullmatch(name):
        raise BadInput(f"--disk {text!r}: NAME[:MOUNTPOINT], where NAME is a disk made by kp-disk")
    return name, check_mountpoint(mountpoint or f"{MOUNT_ROOT}/{name}")


def serial(index: int) -> str:
    """The virtio serial the guest sees the VM's INDEX-th data disk by (/dev/disk/by-id/virtio-...)."""
    return f"kpdata{index}"


def create(store: Store, name: str, *, size: int, key: str, source: dict[str, Any]) -> Record:
    """Make disk ``name``: an empty LUKS-encrypted qcow2 of ``size`` bytes, keyed by ``key``, whose
    source (``{"env": VAR}``, ``{"file": PATH}`` or ``{"command": ARGV}``) the metadata keeps."""

    if not MIN_SIZE <= size <= MAX_SIZE:
        raise BadInput(f"a disk's size is between {MIN_SIZE >> 20} MiB and {MAX_SIZE >> 40} TiB")
    with store.lock(name):
        meta: dict[str, Any] = {"kind": "disk", "name": name, "id": new_id(), "created": now_iso(),
                                "state": "creating", "size": size, "encryption": "luks", "key": source}
        with store.creating("disk", name, meta) as folder:
            _make_qcow2(folder / DISK, size, key)
            os.chmod(folder / DISK, 0o600)
            meta.update(state="ready", disk=DISK)
            store.write_meta(folder, meta)
    return view(store, name)


# qemu-img times its PBKDF benchmark by the thread's CPU time, which many kernels count in scheduler
# ticks (4 ms here): a round that fits inside one tick reads as 0 ms and qemu-img gives up with this
# message.  SHA-512 makes each round about twice as long as SHA-256 on CPUs with SHA extensions, and
# a round that still reads as 0 is tried again, a bounded number of times.
UNTIMED = "Unable to get accurate CPU usage"
CREATE_TRIES = 6


def _make_qcow2(path: Path, size: int, key: str) -> None:
    from kodepipe.core import proc

    # the key goes to qemu-img on its stdin, read as the secret object's file
    argv: list[str | Path] = [
        "qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=kpkey,file=/dev/stdin",
        "-o", "encrypt.format=luks,encrypt.key-secret=kpkey,encrypt.hash-alg=sha512", path, str(size)]
    for attempt in range(CREATE_TRIES):
        try:
            proc.run(argv, input=key.encode())
            return
        except CommandFailed as exc:
            if UNTIMED not in str(exc) or attempt == CREATE_TRIES - 1:
                raise
            path.unlink(missing_ok=True)


def view(store: Store, name: str) -> Record:
    """The disk record: ready, attached (to a running VM) or broken."""
    record, meta = store.record_base("disk", name)
    if meta is None or meta.get("state") == "creating":
        return record
    folder = store.folder("disk", name)
    record["disk"] = str(folder / DISK)
    record["state"] = "ready"
    user = attached_to(store, meta)
    if user is not None:
        record["state"], record["attached_to"] = "attached", user
    record.pop("attached", None)
    if not (folder / DISK).is_file():
        record["state"], record["problem"] = "broken", "its qcow2 file is missing"
    return record


def attached_to(store: Store, meta: dict[str, Any]) -> str | None:
    """The VM that has the disk now: the one its metadata names, while that boot of it runs."""
    attached = meta.get("attached")
    if not isinstance(attached, dict) or not isinstance(attached.get("vm"), str):
        return None
    from kodepipe.vm import qemu

    try:
        vm_meta = store.read_meta(store.folder("vm", attached["vm"])) or {}
    except KpError:
        return None
    boot = vm_meta.get("boot")
    if not isinstance(boot, dict) or boot.get("started") != attached.get("started") or not qemu.is_alive(boot):
        return None
    return str(attached["vm"])


def claim(store: Store, name: str, vm: str, started: str) -> tuple[Path, dict[str, Any]]:
    """Take disk ``name`` for this boot of ``vm`` (under the disk's lock): its qcow2 path and the key's
    source, or KpError (disk_in_use) while another running VM has it."""
    from kodepipe.core.errors import NotFound

    with store.lock(name):
        folder = store.folder("disk", name)
        meta = store.read_meta(folder) if folder.is_dir() else None
        if meta is None or meta.get("kind") != "disk":
            raise NotFound(f"there is no disk named {name}", hint="kp-disk NAME --size SIZE --key-... makes one")
        if meta.get("state") != "ready" or not (folder / DISK).is_file():
            raise KpError(f"disk {name} cannot be attached: {view(store, name).get('problem', 'it is not ready')}",
                          code="broken")
        user = attached_to(store, meta)
        if user is not None and user != vm:
            raise KpError(f"disk {name} is attached to {user}, which is running: a disk is attached to one VM "
                          "at a time", code="disk_in_use", hint=f"kp-stop {user} first")
        meta["attached"] = {"vm": vm, "started": started}
        store.write_meta(folder, meta)
        return folder / DISK, dict(meta["key"])


def remove(store: Store, name: str, *, expect_id: str | None, dry_run: bool,
           check: Any = None) -> Record | None:
    """Remove disk ``name`` (named on kp-rm's command line); refused while a running VM has it."""
    with store.lock(name):
        folder = store.folder("disk", name)
        if not folder.is_dir():
            return None
        record = view(store, name)
        check_id(record, expect_id)
        if check is not None:
            check(record)
        if record.get("state") == "attached":
            raise KpError(f"disk {name} is attached to {record['attached_to']}, which is running",
                          code="disk_in_use", hint=f"kp-stop {record['attached_to']} first")
        if not dry_run:
            store.discard(folder)
        return record
