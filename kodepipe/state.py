"""The state directory: the single source of truth for images and VMs.

Layout under paths.state_dir():

    images/NAME/meta.json   one folder per golden image
    vms/NAME/meta.json      one folder per VM (clone)
    containers/NAME/        one folder per kp-run (kept for quarantines, audits, --keep)
    locks/NAME.lock         flock(2) files, one per name (never deleted)
    trash/                  folders being deleted (renamed here first)

Images, VMs and containers share one namespace of names, so ``kp-rm NAME`` is never
ambiguous.  Every change takes the name's lock; metadata is written
atomically (write, fsync, rename), so a crash leaves either the old or the
new file, never half of one.  Records are views of this state.
"""

from __future__ import annotations

import calendar
import errno
import fcntl
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from kodepipe import paths
from kodepipe.errors import Busy, Exists, KpError, NotFound

KIND_DIRS = {"image": "images", "vm": "vms", "container": "containers"}
META = "meta.json"
LOCK_WAIT = 10.0


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def parse_iso(text: object) -> float | None:
    """Seconds since the epoch for 'YYYY-MM-DDTHH:MM:SSZ', else None."""
    if not isinstance(text, str) or len(text) != 20 or text[10] != "T" or text[19] != "Z":
        return None
    try:
        parts = (int(text[0:4]), int(text[5:7]), int(text[8:10]),
                 int(text[11:13]), int(text[14:16]), int(text[17:19]))
    except ValueError:
        return None
    return float(calendar.timegm((*parts, 0, 0, 0)))


def natural_key(name: str) -> list[object]:
    """Sort key that puts vm2 before vm10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def new_id() -> str:
    return os.urandom(6).hex()


def check_id(record: dict[str, Any], expect_id: str | None) -> None:
    """Refuse to act on a record that names an older object of the same name."""
    if expect_id is not None and record.get("id") not in (None, expect_id):
        raise NotFound(f"{record['name']} was re-created since the record was made "
                       f"(its id is {record.get('id')}, the record names {expect_id}); left alone",
                       code="stale_record", hint="run kp-ls again to get current records")


def write_atomic(path: Path, data: bytes) -> None:
    """Write, fsync, rename: the old file or the new, never half of one, and no .tmp left on an error.

    A full disk is a KpError (code no_space) that says so, not an OSError."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:  # a write to a nearly full disk can be short
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        from contextlib import suppress

        with suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise KpError(f"cannot write {path}: no space left on its filesystem (ENOSPC)", code="no_space",
                          hint="free some space, then try again") from None
        raise
    dirfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` in this process's mount namespace."""
    root = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as info:
        for line in info:
            fields = line.split()
            if len(fields) < 5:
                continue
            # mountinfo escapes space, tab, newline and backslash as octal
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            if point == root or point.startswith(root.rstrip("/") + "/"):
                found.append(point)
    return found


def remove_tree(path: Path, *, mount_wait: float = 0.0) -> None:
    """Delete a folder kodepipe owns, refusing to cross into a mount point.

    A killed namespace's mounts vanish with its last process: ``mount_wait``
    gives them that long.  Read-only files and folders (the golden disk is
    0444) are made writable first.
    """
    if not path.exists() and not path.is_symlink():
        return
    deadline = time.monotonic() + mount_wait
    while (mounted := mounts_under(path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if mounted:
        raise KpError(f"refusing to delete {path}: {mounted[0]} is mounted inside it", code="mounted",
                      hint=f"unmount it first (umount -R {mounted[0]}), then remove {path} by hand")

    def onerror(func: Any, name: str, exc_info: Any) -> None:
        if isinstance(exc_info[1], PermissionError):
            os.chmod(os.path.dirname(name), 0o700)
            if os.path.isdir(name) and not os.path.islink(name):
                os.chmod(name, 0o700)
            func(name)
        elif not isinstance(exc_info[1], FileNotFoundError):
            raise exc_info[1]

    shutil.rmtree(path, onerror=onerror)


class Store:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else paths.state_dir()

    # -- layout -------------------------------------------------------------

    def folder(self, kind: str, name: str) -> Path:
        return self.root / KIND_DIRS[kind] / name

    def lookup(self, name: str) -> tuple[str, Path] | None:
        """The kind and folder that own ``name``, if any."""
        for kind in KIND_DIRS:
            folder = self.folder(kind, name)
            if folder.is_dir():
                return kind, folder
        return None

    def names(self, kind: str) -> list[str]:
        try:
            entries = os.listdir(self.root / KIND_DIRS[kind])
        except FileNotFoundError:
            return []
        return sorted((e for e in entries if not e.startswith(".")), key=natural_key)

    # -- metadata -----------------------------------------------------------

    def read_meta(self, folder: Path) -> dict[str, Any] | None:
        """The folder's metadata; None when missing; KpError when unreadable."""
        try:
            data = (folder / META).read_bytes()
        except FileNotFoundError:
            return None
        try:
            meta = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise KpError(f"{folder / META} is corrupt ({exc})") from None
        if not isinstance(meta, dict):
            raise KpError(f"{folder / META} is corrupt (not an object)")
        return meta

    def metas(self, kind: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """(name, metadata) of every readable entry of ``kind``."""
        for name in self.names(kind):
            try:
                meta = self.read_meta(self.folder(kind, name))
            except KpError:
                continue
            if meta is not None:
                yield name, meta

    def record_base(self, kind: str, name: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The start of a record view: metadata laid over kind, name and path.

        Returns the metadata too, or None when it is missing or unreadable;
        the record then already says "broken" and why.
        """
        folder = self.folder(kind, name)
        record: dict[str, Any] = {"kind": kind, "name": name}
        try:
            meta = self.read_meta(folder)
        except KpError as exc:
            return {**record, "state": "broken", "problem": exc.message, "path": str(folder)}, None
        if meta is None:
            return {**record, "state": "broken", "problem": "no metadata: creation was interrupted",
                    "path": str(folder)}, None
        record.update(meta)
        record["kind"], record["name"], record["path"] = kind, name, str(folder)
        return record, meta

    def write_meta(self, folder: Path, meta: dict[str, Any]) -> None:
        write_atomic(folder / META, orjson.dumps(meta, option=orjson.OPT_INDENT_2) + b"\n")

    # -- locks --------------------------------------------------------------

    def _lock_path(self, name: str) -> Path:
        locks = self.root / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        return locks / f"{name}.lock"

    @contextmanager
    def lock(self, name: str, *, shared: bool = False, wait: float = LOCK_WAIT) -> Iterator[None]:
        """Hold the per-name lock; raise Busy after ``wait`` seconds."""
        fd = os.open(self._lock_path(name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
            deadline = time.monotonic() + wait
            delay = 0.01
            while True:
                try:
                    fcntl.flock(fd, mode)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise Busy(f"{name} is busy: another kodepipe command holds its lock",
                                   hint="wait for it to finish, or see kp-ls") from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.2)
            yield
        finally:
            os.close(fd)

    def lock_held(self, name: str) -> bool:
        """True when some process holds the name's lock exclusively right now."""
        path = self.root / "locks" / f"{name}.lock"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    # -- creation and removal ------------------------------------------------

    @contextmanager
    def creating(self, kind: str, name: str, meta: dict[str, Any]) -> Iterator[Path]:
        """Make the folder for a new ``name`` (caller holds its lock).

        The folder and an initial meta.json exist before the body runs, so a
        crash leaves something kp-ls shows and kp-rm removes.  If the body
        raises (or is interrupted), the folder is removed again.
        """
        existing = self.lookup(name)
        if existing is not None:
            raise Exists(f"{name} already exists (an {existing[0]})" if existing[0] == "image"
                         else f"{name} already exists (a {existing[0]})",
                         hint="choose another name, or remove it first with kp-rm")
        folder = self.folder(kind, name)
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(folder, 0o755)
        except FileExistsError:
            raise Exists(f"{name} already exists") from None
        try:
            self.write_meta(folder, meta)
            yield folder
        except BaseException:
            self.discard(folder)
            raise

    def discard(self, folder: Path) -> None:
        """Remove a folder: rename it into trash/ first so the name is free at once."""
        trash = self.root / "trash"
        trash.mkdir(parents=True, exist_ok=True)
        target = trash / f"{folder.name}.{new_id()}"
        try:
            os.rename(folder, target)
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            target = folder
        remove_tree(target, mount_wait=5.0)

    def empty_trash(self) -> None:
        """Finish deletions that a killed kp-rm left half done."""
        trash = self.root / "trash"
        for entry in self.names_in(trash):
            remove_tree(trash / entry)

    @staticmethod
    def names_in(folder: Path) -> list[str]:
        try:
            return sorted(os.listdir(folder))
        except FileNotFoundError:
            return []
