"""The state directory: the single source of truth for images and VMs.

Layout under paths.state_dir():

    images/NAME/meta.json   one folder per golden image
    vms/NAME/meta.json      one folder per VM (clone)
    containers/NAME/        one folder per kp-run (kept for quarantines, audits, --keep)
    locks/NAME.lock         flock(2) files, one per name (never deleted)
    trash/                  folders being deleted (renamed here first)
    KIND/.NAME.ID.new       a folder being made (renamed into place with its meta.json)

Images, VMs and containers share one namespace of names, so ``kp-rm NAME`` is never
ambiguous.  Every change takes the name's lock; metadata is written
atomically (write, fsync, rename), so a crash leaves either the old or the
new file, never half of one.  A new folder appears with its meta.json in one
rename, and an object whose creator still holds the name's lock is shown as
"creating" (or "building"), never as broken.  Records are views of this state.
"""

from __future__ import annotations

import calendar
import contextlib
import errno
import fcntl
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from kodepipe.core import paths
from kodepipe.core.errors import Busy, Exists, KpError, NotFound

KIND_DIRS = {"image": "images", "vm": "vms", "container": "containers", "disk": "disks"}
META = "meta.json"
LOCK_WAIT = 10.0
NEW_SUFFIX = ".new"
# metadata states that exist only while the creator holds the name's lock, and what it means
# when the lock is free but the state is still there: the creator died
# the locks this process holds now (lock file path: depth)
_HELD: dict[str, int] = {}
HELD_STATES = {"image": {"building": "the build was interrupted (its builder is gone)"},
               "vm": {"creating": "creation was interrupted (kp-clone is gone)"},
               "disk": {"creating": "creation was interrupted (kp-disk is gone)"}}


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
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    dirfd = os.open(path, os.O_RDONLY)
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

    from kodepipe.core import fdtree

    # fd-based and iterative: a tree an agent left may be deeper than a path can be long, or than
    # Python's recursion limit (shutil.rmtree recurses); permissions in the way are made the owner's
    parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fdtree.remove(parent, path.name)
    finally:
        os.close(parent)


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
        the record then already says "creating" (its creator holds the
        name's lock), "gone" (the folder vanished) or "broken", and why.  A
        state that exists only while the creator holds the lock (HELD_STATES)
        is settled here too: "broken" only when the creator is gone.
        """
        folder = self.folder(kind, name)
        record: dict[str, Any] = {"kind": kind, "name": name}
        meta, problem = self._try_meta(folder)
        held = HELD_STATES.get(kind, {})
        if meta is None and problem is None and not folder.is_dir():
            return {**record, "state": "gone"}, None
        if problem is None and (meta is None or meta.get("state") in held):
            if self.lock_held(name):
                if meta is None:  # made by something that writes its metadata late: still in the making
                    return {**record, "state": "creating", "path": str(folder)}, None
            else:
                # the lock is free: a creator that held it while we read has written its last
                # metadata (or removed the folder) before letting go, so read again to settle it
                first = meta
                meta, problem = self._try_meta(folder)
                if problem is None and meta is not None and meta.get("state") in held and \
                        meta.get("id") == (first or {}).get("id"):
                    return ({**record, **meta, "kind": kind, "name": name, "path": str(folder),
                             "state": "broken", "problem": held[meta["state"]]}, meta)
        if problem is not None:
            return {**record, "state": "broken", "problem": problem, "path": str(folder)}, None
        if meta is None:
            if not folder.is_dir():
                return {**record, "state": "gone"}, None
            return {**record, "state": "broken", "problem": "no metadata: creation was interrupted",
                    "path": str(folder)}, None
        record.update(meta)
        record["kind"], record["name"], record["path"] = kind, name, str(folder)
        return record, meta

    def _try_meta(self, folder: Path) -> tuple[dict[str, Any] | None, str | None]:
        try:
            return self.read_meta(folder), None
        except KpError as exc:
            return None, exc.message

    def write_meta(self, folder: Path, meta: dict[str, Any]) -> None:
        write_atomic(folder / META, orjson.dumps(meta, option=orjson.OPT_INDENT_2) + b"\n")

    # -- locks --------------------------------------------------------------

    def _lock_path(self, name: str) -> Path:
        locks = self.root / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        return locks / f"{name}.lock"

    @contextmanager
    def lock(self, name: str, *, shared: bool = False, wait: float | None = None) -> Iterator[None]:
        """Hold the per-name lock; raise Busy after ``wait`` seconds (LOCK_WAIT if None)."""
        wait = LOCK_WAIT if wait is None else wait
        path = self._lock_path(name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
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
            _HELD[str(path)] = _HELD.get(str(path), 0) + 1
            try:
                yield
            finally:
                _HELD[str(path)] -= 1
        finally:
            os.close(fd)

    def lock_held(self, name: str) -> bool:
        """True when another process holds the name's lock exclusively right now.

        A lock this process holds does not count: kp-rm, under the name's lock,
        then sees a dead creator's leftovers as broken, not as still in the making.
        """
        path = self.root / "locks" / f"{name}.lock"
        if _HELD.get(str(path)):
            return False
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

        The folder is made under a hidden name (KIND/.NAME.ID.new), given its
        meta.json, and renamed into place: it never exists without its
        metadata, so no one sees it half made.  It exists before the body
        runs, so a crash leaves something kp-ls shows and kp-rm removes.  If
        the body raises (or is interrupted), the folder is removed again.
        """
        existing = self.lookup(name)
        if existing is not None:
            raise Exists(f"{name} already exists (an {existing[0]})" if existing[0] == "image"
                         else f"{name} already exists (a {existing[0]})",
                         hint="choose another name, or remove it first with kp-rm")
        folder = self.folder(kind, name)
        folder.parent.mkdir(parents=True, exist_ok=True)
        new = folder.parent / f".{name}.{new_id()}{NEW_SUFFIX}"
        os.mkdir(new, 0o755)
        try:
            self.write_meta(new, meta)
            # every creator holds the name's lock, so nothing else can appear at ``folder`` meanwhile;
            # rename(2) would replace an empty directory, hence the check
            if folder.exists() or folder.is_symlink():
                raise Exists(f"{name} already exists")
            os.rename(new, folder)
            _fsync_dir(folder.parent)
        except BaseException:
            remove_tree(new)
            raise
        try:
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
        """Finish deletions that a killed kp-rm left half done, and remove the hidden
        folders of creations that were killed before their folder was renamed into place."""
        trash = self.root / "trash"
        # one entry that cannot be removed (still mounted, say) must not stop the rest, nor the
        # kp-rm that called this: it stays in the trash, and the next kp-rm tries it again
        for entry in self.names_in(trash):
            with contextlib.suppress(KpError, OSError):
                remove_tree(trash / entry)
        for kind_dir in KIND_DIRS.values():
            for entry in self.names_in(self.root / kind_dir):
                if entry.startswith(".") and entry.endswith(NEW_SUFFIX):
                    name = entry[1:].split(".", 1)[0]
                    # a creator holds the lock for as long as its hidden folder exists
                    if name and not self.lock_held(name):
                        with contextlib.suppress(KpError, OSError):
                            remove_tree(self.root / kind_dir / entry)

    @staticmethod
    def names_in(folder: Path) -> list[str]:
        try:
            return sorted(os.listdir(folder))
        except FileNotFoundError:
            return []
