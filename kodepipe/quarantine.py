"""Quarantined workspaces: review what an agent changed, then apply or discard.

``kp-run --quarantine`` mounts the project checkout into the container as a
kernel overlayfs (podman's ``-v WS:/workspace:O,upperdir=UPPER,workdir=WORK``):
the host checkout is the read-only *lower* dir and every write lands in the
*upper* dir, kept in the container's state folder.  The host checkout is not
touched until the user applies the changes; discarding is deleting the folder.
This module is the pure filesystem half of that: it runs no programs.

- ``prepare(folder)`` makes the upper and work dirs.
- ``changes(upper, lower)`` reads the upper dir and says what the merged view
  differs in from the lower one: a sorted list of ``Change(path, kind, type)``.
- ``fingerprint(lower, changes)`` records the lower's state of every changed
  path (take it as soon as the run ends); ``apply(...)`` refuses with
  ``Conflict`` if any of them changed on the host since, unless forced.
- ``apply(upper, lower, changes, ...)`` makes the lower equal to the merged
  view for the given changes, and ``summary(changes)`` is the short form for
  the record.  Its temporary files have names derived from a prefix the
  caller chooses (``temp_prefix()``) and the change's index, so that after a
  crash ``remove_temps(lower, changes, prefix)`` finds every one of them, and
  ``apply(..., resume=True)`` finishes the job.

How the upper dir encodes the merged view (kernel overlayfs), and how it is read:

- A regular file, symlink, fifo, ... in upper hides the lower entry of the
  same path.  It is *added* if the lower has nothing there, otherwise
  *modified*, but only if it differs: for a file the permission bits or the
  bytes (size first, then content), for a symlink its target.  A file that
  was copied up but rewritten identically (or only touched) is no change.
- A whiteout (a character device 0/0) deletes the lower entry: *deleted*, and
  when the lower entry is a directory, everything under it is reported as
  deleted too, so a review shows each lost file.  A whiteout of something the
  lower does not have (the agent made it and removed it) is no change.
- A directory in upper over a lower directory is merged with it (a copy-up):
  it is reported only if its permission bits changed, and its entries are
  read by the same rules.
- An opaque directory (xattr ``overlay.opaque`` = ``y``) hides the lower
  directory's contents: the upper subtree is the whole truth below it.  Lower
  entries under it that upper lacks are *deleted*; upper entries are added,
  or modified when the lower has the same path and it differs (an identical
  file re-created under an opaque dir is no change).
- A directory in upper where the lower has none is *added* (type dir) with
  all its contents; over a lower non-directory it is *modified* (type dir).
  A file over a lower directory is *modified* and the directory's contents
  are *deleted*.

Only ``trusted.overlay.*`` is read (kodepipe mounts as root, and the kernel
then ignores ``user.overlay.*``, which the agent could set itself); reading trusted.*
needs root.  Other overlay xattrs (``origin``, ``impure``, ``uuid``,
``nlink``, ...) are bookkeeping and are ignored.

Redirects and metacopy (``overlay.redirect``, ``overlay.metacopy``: a renamed
directory that still points at its lower origin; a file whose upper copy has
metadata only and its data elsewhere) and xattr whiteouts
(``overlay.whiteout``, or ``overlay.opaque`` = ``x``) are *refused*:
``changes()`` raises ``UnsupportedOverlay``.  Copying such an upper entry
"fully" would be wrong: a metacopy file reads as zeros outside the mount.
Podman's ``:O`` mounts use the kernel's defaults, which leave them off unless
the kernel was built or booted otherwise (/sys/module/overlay/parameters);
nothing is lost by the refusal, the upper dir stays where it is.

Only content, permission bits and symlink targets are compared and applied;
ownership, timestamps, xattrs and hard links are not.  ``apply`` strips the
setuid and setgid bits from everything it writes and says so in its
warnings, never writes through a symlink in the lower tree (every parent is
opened with ``O_NOFOLLOW | O_DIRECTORY`` and every operation is relative to
it), writes each file and symlink under a temporary name in its directory
(``.kp-apply-TOKEN-INDEX``) and renames it into place, and does not apply
fifos, sockets or devices.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

from kodepipe.errors import BadInput, Exists, KpError, NotFound

ChangeKind = Literal["added", "modified", "deleted"]
EntryType = Literal["file", "dir", "symlink", "other"]
KINDS: tuple[ChangeKind, ...] = ("added", "modified", "deleted")
TYPES: tuple[EntryType, ...] = ("file", "dir", "symlink", "other")

# Only trusted.*: kodepipe mounts the overlay as root, so the kernel reads only these, while
# user.overlay.* is an ordinary attribute the agent could set to fake an opaque directory.
XATTR_PREFIXES = ("trusted.overlay.",)
# Overlay features whose upper entries cannot be read without the lower (see the docstring).
UNSUPPORTED_XATTRS = ("redirect", "metacopy", "whiteout")
SETID = stat.S_ISUID | stat.S_ISGID
CHUNK = 1 << 20
CONFLICTS_NAMED = 10
TEMP_PREFIX = ".kp-apply-"  # every temporary name apply() makes in the workspace starts with this
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class Conflict(KpError):
    """The host checkout changed since the run, where the changes would land."""

    code = "conflict"


class UnsupportedOverlay(KpError):
    """The upper dir uses an overlay feature this module does not read."""

    code = "unsupported_overlay"


class UnsafePath(KpError):
    """A path that would escape the workspace or pass through a symlink."""

    code = "unsafe_path"


@dataclass(frozen=True)
class Change:
    """One path (relative to the workspace, "/"-separated) that differs.

    ``type`` is the type of the new entry for added and modified paths, and
    of the removed lower entry for deleted ones.
    """

    path: str
    kind: ChangeKind
    type: EntryType

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "kind": self.kind, "type": self.type}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Change:
        path, kind, typ = data.get("path"), data.get("kind"), data.get("type")
        if not isinstance(path, str) or kind not in KINDS or typ not in TYPES:
            raise BadInput(f"not a workspace change: {dict(data)!r}",
                           hint='expected {"path": ..., "kind": "added|modified|deleted", "type": ...}')
        _parts(path)
        return cls(path, kind, typ)


class Applied(NamedTuple):
    changes: list[Change]  # what was applied, in the order it was
    warnings: list[str]  # setuid/setgid bits stripped, entries not applied


def prepare(folder: Path) -> tuple[Path, Path]:
    """Create ``folder`` (0700), ``folder/upper`` (0755) and ``folder/work`` (0700); return (upper, work).

    Refuses if the upper dir already holds changes: they are a previous run's,
    not yet applied or discarded.
    """
    upper, work = folder / "upper", folder / "work"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    if upper.is_dir() and any(upper.iterdir()):
        raise Exists(f"{upper} already holds changes from an earlier run",
                     hint="apply or discard them before starting another quarantined run")
    for path, mode in ((upper, 0o755), (work, 0o700)):
        path.mkdir(mode=mode, exist_ok=True)
        os.chmod(path, mode)
    return upper, work


# --- reading the upper dir -------------------------------------------------------------------


def changes(upper: Path, lower: Path) -> list[Change]:
    """What the merged view differs in from ``lower``, read from ``upper``; sorted by path."""
    for what, path in (("upper", upper), ("lower", lower)):
        if not path.is_dir():
            raise NotFound(f"the {what} dir {path} does not exist or is not a directory")
    out: list[Change] = []
    _diff_dir(upper, lower, "", False, out)
    return sorted(out, key=lambda change: change.path)


def summary(changes: Iterable[Change]) -> dict[str, list[str]]:
    """The paths by kind, for the record: {"added": [...], "modified": [...], "deleted": [...]}."""
    result: dict[str, list[str]] = {kind: [] for kind in KINDS}
    for change in changes:
        result[change.kind].append(change.path)
    for paths in result.values():
        paths.sort()
    return result


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


def _check_name(path: str) -> None:
    try:
        path.encode()
    except UnicodeEncodeError:
        raise UnsupportedOverlay(f"{path!r} is not a UTF-8 name, which a record cannot carry",
                                 hint="the upper dir was left as it is; rename it and list the changes again, "
                                      "or merge by hand") from None


def _entry_type(mode: int) -> EntryType:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _overlay_xattrs(path: Path) -> dict[str, bytes]:
    """The overlay's own xattrs of an upper entry, by short name ("opaque", ...)."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.ENODATA):
            return {}
        raise
    found: dict[str, bytes] = {}
    for name in names:
        for prefix in XATTR_PREFIXES:
            if name.startswith(prefix):
                found[name[len(prefix):]] = os.getxattr(path, name, follow_symlinks=False)
    return found


def _is_opaque(path: Path, rel: str) -> bool:
    xattrs = _overlay_xattrs(path)
    for name in UNSUPPORTED_XATTRS:
        if name in xattrs:
            raise UnsupportedOverlay(
                f"{rel} in the upper dir {path.parent} carries the overlay xattr '{name}', which is not supported",
                hint="the upper dir was left as it is; mount the overlay with redirect_dir=off,metacopy=off "
                     "or merge it by hand")
    value = xattrs.get("opaque")
    if value not in (None, b"y"):
        raise UnsupportedOverlay(f"{rel} in the upper dir {path.parent} has overlay.opaque={value!r}, "
                                 "which is not supported", hint="the upper dir was left as it is")
    return value == b"y"


def _lower_entries(ldir: Path | None) -> dict[str, os.stat_result]:
    if ldir is None:
        return {}
    with os.scandir(ldir) as it:
        return {entry.name: entry.stat(follow_symlinks=False) for entry in it}


def _diff_dir(udir: Path, ldir: Path | None, rel: str, authoritative: bool, out: list[Change]) -> None:
    """Compare one upper dir with the lower dir at the same path (None when the lower has none).

    ``authoritative``: the upper dir alone is the merged view (opaque, or new).
    """
    lower = _lower_entries(ldir)
    present: set[str] = set()
    with os.scandir(udir) as it:
        entries = sorted(it, key=lambda entry: entry.name)
    for entry in entries:
        name, path = entry.name, _join(rel, entry.name)
        _check_name(path)
        upath = udir / name
        ust = entry.stat(follow_symlinks=False)
        opaque = _is_opaque(upath, path)  # checks every entry for unsupported xattrs
        lst = lower.get(name)
        lpath = ldir / name if ldir is not None else None
        if _is_whiteout(ust):
            if lst is not None and lpath is not None and not authoritative:
                _deleted(lpath, path, lst, out, include_self=True)
            continue
        present.add(name)
        if stat.S_ISDIR(ust.st_mode):
            if lst is not None and lpath is not None and stat.S_ISDIR(lst.st_mode):
                if stat.S_IMODE(ust.st_mode) != stat.S_IMODE(lst.st_mode):
                    out.append(Change(path, "modified", "dir"))
                _diff_dir(upath, lpath, path, authoritative or opaque, out)
            else:
                out.append(Change(path, "added" if lst is None else "modified", "dir"))
                _diff_dir(upath, None, path, True, out)
            continue
        new_type = _entry_type(ust.st_mode)
        if lst is None or lpath is None:
            out.append(Change(path, "added", new_type))
        elif stat.S_IFMT(lst.st_mode) != stat.S_IFMT(ust.st_mode):
            out.append(Change(path, "modified", new_type))
            if stat.S_ISDIR(lst.st_mode):
                _deleted(lpath, path, lst, out, include_self=False)
        elif _differs(upath, ust, lpath, lst):
            out.append(Change(path, "modified", new_type))
    if authoritative:
        for name, lst in lower.items():
            if name not in present and ldir is not None:
                _deleted(ldir / name, _join(rel, name), lst, out, include_self=True)


def _deleted(lpath: Path, rel: str, lst: os.stat_result, out: list[Change], *, include_self: bool) -> None:
    """Report a lower entry and, for a directory, everything under it as deleted."""
    _check_name(rel)
    if include_self:
        out.append(Change(rel, "deleted", _entry_type(lst.st_mode)))
    if stat.S_ISDIR(lst.st_mode):
        for name, child in sorted(_lower_entries(lpath).items()):
            _deleted(lpath / name, _join(rel, name), child, out, include_self=True)


def _differs(upath: Path, ust: os.stat_result, lpath: Path, lst: os.stat_result) -> bool:
    """Same-type entries: do they differ in what apply would write?"""
    if stat.S_ISLNK(ust.st_mode):
        return os.readlink(upath) != os.readlink(lpath)
    if stat.S_IMODE(ust.st_mode) != stat.S_IMODE(lst.st_mode):
        return True
    if not stat.S_ISREG(ust.st_mode):
        return ust.st_rdev != lst.st_rdev
    if ust.st_size != lst.st_size:
        return True
    with open(upath, "rb") as a, open(lpath, "rb") as b:
        while True:
            chunk = a.read(CHUNK)
            if chunk != b.read(CHUNK):
                return True
            if not chunk:
                return False


# --- safe access to a tree: every component opened without following symlinks ----------------


def _parts(path: str) -> tuple[str, ...]:
    """The components of a workspace-relative path; refuses anything that could escape it."""
    parts = tuple(path.split("/"))
    if not path or "\0" in path or any(part in ("", ".", "..") for part in parts):
        raise UnsafePath(f"refusing the workspace path {path!r}: it is empty, absolute, "
                         "or has empty, '.' or '..' components")
    return parts


def _open_root(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise NotFound(f"cannot open the directory {path}: {exc.strerror}") from exc


class _Unreachable(Exception):
    """A parent component is missing, not a directory, or a symlink."""

    def __init__(self, prefix: tuple[str, ...], symlink: bool) -> None:
        super().__init__("/".join(prefix))
        self.prefix = prefix
        self.symlink = symlink


def _open_dir(root_fd: int, parts: tuple[str, ...]) -> int:
    """Open root/parts as a directory, refusing to follow a symlink at any component."""
    fd = os.dup(root_fd)
    for i, part in enumerate(parts):
        try:
            child = os.open(part, _DIR_FLAGS, dir_fd=fd)
        except OSError as exc:
            symlink = False
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                with contextlib.suppress(OSError):
                    symlink = stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode)
            os.close(fd)
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                raise _Unreachable(parts[:i + 1], symlink) from exc
            raise
        os.close(fd)
        fd = child
    return fd


def _lstat_at(root_fd: int, parts: tuple[str, ...]) -> os.stat_result | None:
    """lstat of root/parts, or None if it or a parent is missing or a parent is not a real directory."""
    try:
        fd = _open_dir(root_fd, parts[:-1])
    except _Unreachable:
        return None
    try:
        return os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    finally:
        os.close(fd)


def _sha256_at(root_fd: int, parts: tuple[str, ...]) -> str | None:
    try:
        dir_fd = _open_dir(root_fd, parts[:-1])
    except _Unreachable:
        return None
    try:
        fd = os.open(parts[-1], _READ_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None
    finally:
        os.close(dir_fd)
    digest = hashlib.sha256()
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fingerprint_at(root_fd: int, parts: tuple[str, ...]) -> dict[str, object] | None:
    st = _lstat_at(root_fd, parts)
    if st is None:
        return None
    print_: dict[str, object] = {"type": _entry_type(st.st_mode), "size": st.st_size,
                                 "mtime_ns": st.st_mtime_ns, "mode": stat.S_IMODE(st.st_mode)}
    if stat.S_ISREG(st.st_mode):
        print_["sha256"] = _sha256_at(root_fd, parts)
    elif stat.S_ISLNK(st.st_mode):
        parent = _open_dir(root_fd, parts[:-1])
        try:
            print_["target"] = os.readlink(parts[-1], dir_fd=parent)
        finally:
            os.close(parent)
    return print_


def fingerprint(lower: Path, changes: Iterable[Change]) -> dict[str, object]:
    """The lower's state at every changed path: None if absent, else type, size, mtime_ns, mode
    (and sha256 for a file, target for a symlink).  JSON-safe, for the container's record.

    Take it right after the run: host edits made during the run are not caught.
    """
    root = _open_root(lower)
    try:
        return {change.path: _fingerprint_at(root, _parts(change.path)) for change in changes}
    finally:
        os.close(root)


# --- applying ---------------------------------------------------------------------------------


_MISSING = object()


def _depth_key(change: Change) -> tuple[str, ...]:
    return tuple(change.path.split("/"))


def _children(root_fd: int, parts: tuple[str, ...]) -> list[str]:
    fd = _open_dir(root_fd, parts)
    try:
        return sorted(os.listdir(fd))
    finally:
        os.close(fd)


def _removes_lower_dir(change: Change, lst: os.stat_result | None) -> bool:
    return lst is not None and stat.S_ISDIR(lst.st_mode) and (change.kind == "deleted" or change.type != "dir")


def _upper_print(upper_fd: int, change: Change, warnings: list[str]) -> dict[str, object] | None:
    """What the lower holds at ``change.path`` once it is applied (the parts apply() sets), or None."""
    parts = _parts(change.path)
    ust = _lstat_at(upper_fd, parts)
    if ust is None or _entry_type(ust.st_mode) != change.type:
        return None
    print_: dict[str, object] = {"type": change.type, "mode": _strip(change.path, stat.S_IMODE(ust.st_mode),
                                                                      warnings)}
    if change.type == "file":
        print_["sha256"] = _sha256_at(upper_fd, parts)
    elif change.type == "symlink":
        parent = _open_dir(upper_fd, parts[:-1])
        try:
            print_["target"] = os.readlink(parts[-1], dir_fd=parent)
        finally:
            os.close(parent)
    return print_


def _resumable(upper_fd: int, change: Change, expected: object, now: dict[str, object] | None) -> bool:
    """After an interrupted apply: is ``now`` a state that apply() itself leaves on its way?

    That is the intended result, or the state before (where applying a
    directory's children changed its mtime and size), or nothing where apply()
    removes the old entry before it writes the new one.
    """
    old = expected if isinstance(expected, dict) else None
    if now is None:
        return change.kind == "deleted" or (change.kind == "modified" and old is not None)
    if old is not None and old.get("type") == now["type"] == "dir" and old.get("mode") == now["mode"]:
        return True  # the directory as it was, but for the entries this apply removed or wrote in it
    if change.kind == "deleted":
        return False
    want = _upper_print(upper_fd, change, [])
    if want is None:
        return False
    if change.type == "dir":
        # made 0700 by apply() until the modes are set at the end
        return now["type"] == "dir" and now["mode"] in (want["mode"], 0o700)
    if change.type == "other":
        return False
    return all(now.get(key) == value for key, value in want.items())


def _check(upper_fd: int, lower_fd: int, items: list[Change], fingerprints: Mapping[str, object],
           force: bool, resume: bool = False) -> None:
    """Everything that can be checked before the first change: raises, or returns having changed nothing."""
    by_path = {change.path: change for change in items}
    if len(by_path) != len(items):
        raise BadInput("the list of changes names a path more than once")
    conflicts: dict[str, str] = {}  # path -> why, when there is more to say than that it changed
    if not force:
        for change in items:
            expected = fingerprints.get(change.path, _MISSING)
            if expected is _MISSING:
                conflicts[change.path] = "no fingerprint of it was taken"
                continue
            now = _fingerprint_at(lower_fd, _parts(change.path))
            if expected != now and not (resume and _resumable(upper_fd, change, expected, now)):
                conflicts[change.path] = ""
    for change in items:
        parts = _parts(change.path)
        made = False  # an ancestor is (re)made by an earlier change, so what the lower has below it is moot
        # a deletion needs no parents: where there is none (or a symlink) there is nothing to delete
        for i in range(1, len(parts) if change.kind != "deleted" else 0):
            prefix = "/".join(parts[:i])
            parent = by_path.get(prefix)
            if parent is not None:
                if parent.kind == "deleted" or parent.type != "dir":
                    raise BadInput(f"the list of changes is inconsistent: {change.path} is {change.kind} "
                                   f"but its parent {prefix} is {parent.kind} ({parent.type})")
                if not made:
                    lst = _lstat_at(lower_fd, parts[:i])
                    made = lst is None or not stat.S_ISDIR(lst.st_mode)
                continue
            if made:
                raise BadInput(f"the list of changes is inconsistent: {change.path} is {change.kind} "
                               f"but its parent {prefix} is not in the list", hint="include the parent directory")
            try:
                lst = _lstat_at(lower_fd, parts[:i])
            except OSError as exc:
                raise KpError(f"cannot read {prefix} in the workspace: {exc.strerror}") from exc
            if lst is not None and stat.S_ISLNK(lst.st_mode):
                raise UnsafePath(f"refusing to write {change.path}: its parent {prefix} is a symlink "
                                 "in the workspace", hint="it changed on the host since the run; move it away "
                                 "or discard the changes")
            if lst is not None and not stat.S_ISDIR(lst.st_mode):
                raise Conflict(f"cannot apply {change.path}: its parent {prefix} is not a directory in the "
                               "workspace", hint="it changed on the host since the run; move it away, or discard "
                               "the changes")
            if lst is None:
                if not force:
                    conflicts[change.path] = (f"its parent {prefix} is missing: deleted on the host, "
                                              "or a new directory left out of the changes")
                break
        if change.kind != "deleted":
            ust = _lstat_at(upper_fd, parts)
            if ust is None or _is_whiteout(ust) or _entry_type(ust.st_mode) != change.type:
                raise KpError(f"the upper dir no longer matches the reviewed changes at {change.path}",
                              hint="list the changes again and review them before applying")
        lst = _lstat_at(lower_fd, parts)
        if not force and _removes_lower_dir(change, lst):
            for name in _children(lower_fd, parts):
                child = by_path.get(_join(change.path, name))
                if child is None or child.kind != "deleted":
                    conflicts.setdefault(_join(change.path, name), f"new on the host, in {change.path}, "
                                                                   "which the run removed")
    if conflicts:
        named = [f"{path} ({why})" if why else path for path, why in sorted(conflicts.items())]
        more = f" and {len(named) - CONFLICTS_NAMED} more" if len(named) > CONFLICTS_NAMED else ""
        raise Conflict(f"{len(named)} path(s) in the workspace changed on the host since the run: "
                       f"{', '.join(named[:CONFLICTS_NAMED])}{more}",
                       hint="look at them, then apply again with force to overwrite them, or discard the changes")


def _strip(path: str, mode: int, warnings: list[str]) -> int:
    if mode & SETID:
        warnings.append(f"{path}: setuid/setgid bits stripped (mode {mode:04o} applied as {mode & ~SETID:04o})")
    return mode & ~SETID


def temp_prefix() -> str:
    """A new prefix for one apply's temporary names: random, so no workspace entry has it by chance."""
    return f"{TEMP_PREFIX}{secrets.token_hex(8)}-"


def _temp_name(prefix: str, index: int) -> str:
    if not prefix.startswith(TEMP_PREFIX) or "/" in prefix or "\0" in prefix:
        raise BadInput(f"not a temporary name prefix of kp-run --apply: {prefix!r}")
    return f"{prefix}{index}"


def remove_temps(lower: Path, changes: Iterable[Change], prefix: str) -> list[str]:
    """Remove the temporary files that an interrupted ``apply(..., tmp_prefix=prefix)`` of ``changes``
    can have left in ``lower`` (only files and symlinks of exactly those names); returns their paths."""
    removed: list[str] = []
    root = _open_root(lower)
    try:
        for index, change in enumerate(changes):
            if change.kind == "deleted" or change.type not in ("file", "symlink"):
                continue
            parts = _parts(change.path)
            name = _temp_name(prefix, index)
            try:
                parent = _open_dir(root, parts[:-1])
            except _Unreachable:
                continue
            try:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                    os.unlink(name, dir_fd=parent)
                    removed.append(_join("/".join(parts[:-1]), name))
            except FileNotFoundError:
                pass
            finally:
                os.close(parent)
    finally:
        os.close(root)
    return removed


def _remove(dir_fd: int, name: str, force: bool) -> None:
    """Remove one entry (a directory must be empty unless forced); absent is fine."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
    elif force:
        shutil.rmtree(name, dir_fd=dir_fd)  # the fd-based rmtree, which never follows symlinks
    else:
        os.rmdir(name, dir_fd=dir_fd)


def _copy_file(src_dir: int, dst_dir: int, name: str, path: str, owner: tuple[int, int] | None,
               warnings: list[str], tmp: str, written: Callable[[], None]) -> None:
    src = os.open(name, _READ_FLAGS, dir_fd=src_dir)
    try:
        st = os.fstat(src)
        if not stat.S_ISREG(st.st_mode):
            raise KpError(f"{path} in the upper dir is no longer a regular file",
                          hint="list the changes again and review them before applying")
        dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                      dir_fd=dst_dir)
        try:
            with os.fdopen(src, "rb", closefd=False) as fsrc, os.fdopen(dst, "wb", closefd=False) as fdst:
                shutil.copyfileobj(fsrc, fdst, CHUNK)
            if owner is not None:
                os.fchown(dst, *owner)
            os.fchmod(dst, _strip(path, stat.S_IMODE(st.st_mode), warnings))
            os.fsync(dst)
        finally:
            os.close(dst)
        written()
        os.rename(tmp, name, src_dir_fd=dst_dir, dst_dir_fd=dst_dir)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dst_dir)
        raise
    finally:
        os.close(src)


def _copy_symlink(src_dir: int, dst_dir: int, name: str, owner: tuple[int, int] | None, tmp: str,
                  written: Callable[[], None]) -> None:
    target = os.readlink(name, dir_fd=src_dir)
    os.symlink(target, tmp, dir_fd=dst_dir)
    try:
        if owner is not None:
            os.chown(tmp, *owner, dir_fd=dst_dir, follow_symlinks=False)
        written()
        os.rename(tmp, name, src_dir_fd=dst_dir, dst_dir_fd=dst_dir)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dst_dir)
        raise


class _Dirs:
    """Open parent directories of the upper and lower trees, creating missing lower ones when forced."""

    def __init__(self, upper_fd: int, lower_fd: int, owner: tuple[int, int] | None, force: bool,
                 applied: list[Change], warnings: list[str], modes: dict[str, int]) -> None:
        self.upper_fd, self.lower_fd, self.owner, self.force = upper_fd, lower_fd, owner, force
        self.applied, self.warnings, self.modes = applied, warnings, modes

    def lower(self, parts: tuple[str, ...]) -> int:
        try:
            return _open_dir(self.lower_fd, parts)
        except _Unreachable as exc:
            prefix = "/".join(exc.prefix)
            if exc.symlink:
                raise UnsafePath(f"refusing to write under {prefix}: it is a symlink in the workspace") from exc
            if not self.force or _lstat_at(self.lower_fd, exc.prefix) is not None:
                raise Conflict(f"{prefix} in the workspace is missing or not a directory",
                               hint="it changed on the host since the run") from exc
        # forced: make the missing parents, like the upper's
        for i in range(1, len(parts) + 1):
            if _lstat_at(self.lower_fd, parts[:i]) is None:
                self.mkdir(parts[:i])
                self.applied.append(Change("/".join(parts[:i]), "added", "dir"))
        return _open_dir(self.lower_fd, parts)

    def upper(self, parts: tuple[str, ...]) -> int:
        try:
            return _open_dir(self.upper_fd, parts)
        except _Unreachable as exc:
            raise KpError(f"{'/'.join(exc.prefix)} in the upper dir is missing or not a directory",
                          hint="list the changes again and review them before applying") from exc

    def mkdir(self, parts: tuple[str, ...]) -> bool:
        """Make parts a real directory (replacing a non-directory); True if it was created."""
        parent = self.lower(parts[:-1])
        name, path = parts[-1], "/".join(parts)
        try:
            try:
                st: os.stat_result | None = os.stat(name, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None and stat.S_ISDIR(st.st_mode):
                created = False
            else:
                if st is not None:
                    os.unlink(name, dir_fd=parent)
                os.mkdir(name, 0o700, dir_fd=parent)
                created = True
                if self.owner is not None:
                    os.chown(name, *self.owner, dir_fd=parent, follow_symlinks=False)
            ust = _lstat_at(self.upper_fd, parts)
            if ust is not None and stat.S_ISDIR(ust.st_mode):
                self.modes[path] = _strip(path, stat.S_IMODE(ust.st_mode), self.warnings)
            return created
        finally:
            os.close(parent)


@contextmanager
def _step(what: str, path: str) -> Iterator[None]:
    """Turn an OSError half-way through applying into a KpError that says how to finish."""
    try:
        yield
    except OSError as exc:
        if exc.errno in NO_SPACE:
            raise KpError(f"cannot {what} {path} in the workspace: no space left on its filesystem (ENOSPC)",
                          code="no_space", hint="free some space, then apply again to finish: the upper dir "
                                                "still holds every change") from exc
        raise KpError(f"cannot {what} {path} in the workspace: {exc.strerror or exc}",
                      hint="the upper dir still holds every change; fix the cause, then apply again with force "
                           "to finish") from exc


Step = Callable[[str, str], None]


def _no_step(event: str, path: str) -> None:
    pass


def apply(upper: Path, lower: Path, changes: Iterable[Change], *, fingerprints: Mapping[str, object],
          owner: tuple[int, int] | None = None, force: bool = False, tmp_prefix: str | None = None,
          resume: bool = False, on_step: Step = _no_step) -> Applied:
    """Make ``lower`` equal to the merged view at each of ``changes``; returns what was applied and warnings.

    Checks everything first and changes nothing if a check fails: every path
    must still match ``fingerprints`` (else ``Conflict``, unless ``force``),
    and no path may pass through a symlink in ``lower`` (``UnsafePath``, even
    when forced).  Then removes, deepest first; creates and replaces,
    parents first; and sets directory modes last, deepest first.  Files and
    symlinks are written under a temporary name (``tmp_prefix`` + the
    change's index in ``changes``) and renamed into place; what is created
    (and every file it replaces) is chowned to ``owner`` when given, else it
    belongs to the calling process.

    Every step is idempotent.  After an interruption half-way, call
    ``remove_temps`` with the same prefix and changes, then apply the same
    changes again with ``resume``: a path may then also be as this apply
    leaves it on its way (already applied, or removed before being
    rewritten) without being a conflict.

    ``on_step(event, path)`` is called with "checked" once the checks passed
    and before the first change (raising there changes nothing), "removed"
    and "wrote" after each change, and "tmp" when a temporary file is
    complete but not yet renamed into place.
    """
    items = list(changes)
    for change in items:
        _parts(change.path)
    prefix = temp_prefix() if tmp_prefix is None else tmp_prefix
    _temp_name(prefix, 0)
    position = {change.path: index for index, change in enumerate(items)}
    upper_fd, lower_fd = _open_root(upper), _open_root(lower)
    try:
        _check(upper_fd, lower_fd, items, fingerprints, force, resume)
        on_step("checked", "")
        applied: list[Change] = []
        warnings: list[str] = []
        modes: dict[str, int] = {}
        dirs = _Dirs(upper_fd, lower_fd, owner, force, applied, warnings, modes)
        touched: set[tuple[str, ...]] = set()

        # 1. removals, deepest first: deleted entries, and directories that a non-directory replaces
        for change in sorted(items, key=lambda c: (-len(_depth_key(c)), _depth_key(c))):
            parts = _parts(change.path)
            lst = _lstat_at(lower_fd, parts)
            if change.kind == "deleted" or _removes_lower_dir(change, lst):
                if lst is None:
                    if change.kind == "deleted":
                        applied.append(change)  # already gone (a repeated apply)
                    continue
                with _step("remove", change.path):
                    parent = dirs.lower(parts[:-1])
                    try:
                        _remove(parent, parts[-1], force)
                    finally:
                        os.close(parent)
                touched.add(parts[:-1])
                if change.kind == "deleted":
                    applied.append(change)
                on_step("removed", change.path)

        # 2. creations and replacements, parents first
        for change in sorted((c for c in items if c.kind != "deleted"), key=_depth_key):
            parts = _parts(change.path)
            if change.type == "other":
                warnings.append(f"{change.path}: not applied: a fifo, socket or device is not copied to the workspace")
                continue
            with _step("write", change.path):
                if change.type == "dir":
                    dirs.mkdir(parts)
                else:
                    src, dst = dirs.upper(parts[:-1]), dirs.lower(parts[:-1])
                    tmp = _temp_name(prefix, position[change.path])
                    written = functools.partial(on_step, "tmp", change.path)
                    try:
                        if change.type == "file":
                            _copy_file(src, dst, parts[-1], change.path, owner, warnings, tmp, written)
                        else:
                            _copy_symlink(src, dst, parts[-1], owner, tmp, written)
                    finally:
                        os.close(src)
                        os.close(dst)
            applied.append(change)
            touched.add(parts[:-1])
            on_step("wrote", change.path)

        # 3. directory modes last (a read-only directory would refuse its own contents), deepest first
        for path in sorted(modes, key=lambda p: (-p.count("/"), p)):
            with _step("set the mode of", path):
                fd = dirs.lower(_parts(path))
                try:
                    os.fchmod(fd, modes[path])
                finally:
                    os.close(fd)

        for parts in touched:
            try:
                fd = _open_dir(lower_fd, parts)
            except _Unreachable:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return Applied(applied, warnings)
    finally:
        os.close(upper_fd)
        os.close(lower_fd)

