"""Quarantined workspaces: review what an agent changed, then apply or discard.

``kp-run --quarantine`` mounts the project checkout into the container as a
kernel overlayfs (podman's ``-v WS:/workspace:O,upperdir=UPPER,workdir=WORK``):
the host checkout is the read-only *lower* dir and every write lands in the
*upper* dir, kept in the container's state folder.  The host checkout is not
touched until the user applies the changes; discarding is deleting the folder.
This module is the pure filesystem half of that: it runs no programs.

- ``prepare(folder)`` makes the upper and work dirs.
- ``changes(upper, lower)`` reads the upper dir and says what the merged view
  differs in from the lower one: a sorted list of ``Change``.
- ``summary(changes)`` is the record's form of them, and ``findings(changes)``
  the lines to say on a terminal about what deserves a look: symlinks that
  may point out of the workspace, setuid/setgid files, entries not applied.
- ``fingerprint(lower, changes)`` records the lower's state of every changed
  path (take it as soon as the run ends); ``apply(...)`` refuses with
  ``Conflict`` if any of them changed on the host since, unless forced.
- ``apply(upper, lower, changes, ...)`` makes the lower equal to the merged
  view for the given changes.  Its temporary files have names derived from
  a prefix the caller chooses (``temp_prefix()``) and the change's index, so
  that after a crash ``remove_temps(lower, changes, prefix)`` finds every one
  of them, and ``apply(..., resume=True)`` finishes the job.

Hostile trees.  The agent chooses the tree: any depth (deeper than a path
may be long), any number of entries, any bytes in names.  Every tree here is
read, compared and written one name at a time relative to open directory
fds (``fdtree``), iteratively, never following a symlink, with a bounded
number of fds.  What cannot be bounded is refused past a cap, clearly and
before memory runs out: ``changes()`` raises ``TooManyChanges`` past
``MAX_ENTRIES`` entries read, ``MAX_CHANGES`` changes, or ``MAX_PATH_CHARS``
characters of paths in all (a chain of directories N deep has N paths of up
to N names each).  The upper dir stays as it is: kp-rm discards it.

Names are bytes.  Inside, a path is a ``str`` as ``os.fsdecode`` makes it
(lossless: a byte that is not UTF-8 is a lone surrogate).  In a record (see
``Change.as_dict``), ``path`` is the name itself whenever it is UTF-8 (JSON
escapes newlines and other control characters, losslessly); when it is not,
``path`` is a display form with each such byte written as ``\\xHH`` and
``path_b64`` holds the exact bytes (standard base64), and readers use
``path_b64`` whenever it is there.  Symlink targets likewise (``target``,
``target_b64``).  A fingerprint is keyed by the path, or by NUL followed by
the base64 of its bytes when it is not UTF-8 (no real path contains NUL).
Every message that names a path escapes control characters
(``terminal.escape``), so a name cannot rewrite the user's terminal.

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
ownership, timestamps, xattrs and hard links are not (each name of a hard
link is applied as a file of its own).  ``apply`` strips the setuid and
setgid bits from everything it writes and says so in its warnings, never
writes through a symlink in the lower tree (every parent is opened with
``O_NOFOLLOW | O_DIRECTORY`` and every operation is relative to it), writes
each file and symlink under a temporary name in its directory
(``.kp-apply-TOKEN-INDEX``) and renames it into place, and does not apply
fifos, sockets or devices.  What it wrote reaches the disk at the end, in
one ``syncfs`` of the workspace's filesystem (an fsync per file would make
a tree of 100,000 files take many minutes); until then the caller's journal
(apply.py) covers it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import functools
import hashlib
import os
import secrets
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

from kodepipe.core import fdtree
from kodepipe.core.errors import BadInput, Exists, KpError, NotFound
from kodepipe.core.fdtree import Cursor, Unreachable, display, is_utf8, join
from kodepipe.core.terminal import escape

ChangeKind = Literal["added", "modified", "deleted"]
EntryType = Literal["file", "dir", "symlink", "fifo", "socket", "chardev", "blockdev", "other"]
KINDS: tuple[ChangeKind, ...] = ("added", "modified", "deleted")
TYPES: tuple[EntryType, ...] = ("file", "dir", "symlink", "fifo", "socket", "chardev", "blockdev", "other")
APPLIED_TYPES = ("file", "dir", "symlink")  # the rest is reported, never copied to the workspace

# Only trusted.*: kodepipe mounts the overlay as root, so the kernel reads only these, while
# user.overlay.* is an ordinary attribute the agent could set to fake an opaque directory.
XATTR_PREFIXES = ("trusted.overlay.",)
# Overlay features whose upper entries cannot be read without the lower (see the docstring).
UNSUPPORTED_XATTRS = ("redirect", "metacopy", "whiteout")
SETID = stat.S_ISUID | stat.S_ISGID
CHUNK = 1 << 20
CONFLICTS_NAMED = 10
FINDINGS_SAID = 20  # lines findings() gives at most, then how many more
SHOWN_CHARS = 200  # a path longer than this is shortened in messages
TEMP_PREFIX = ".kp-apply-"  # every temporary name apply() makes in the workspace starts with this
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# Caps on what changes() reads and returns (see the docstring): past them it refuses.
MAX_ENTRIES = 2_000_000
MAX_CHANGES = 250_000
MAX_PATH_CHARS = 32 << 20

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


class TooManyChanges(KpError):
    """The upper dir holds more than a review can carry."""

    code = "too_many_changes"


def show(path: str) -> str:
    """A path as a message names it: control characters and bytes that are not UTF-8 escaped, and
    the middle of a very long one left out (a tree thousands of levels deep has paths of many KiB;
    the record carries them whole)."""
    text = escape(path)
    if len(text) > SHOWN_CHARS:
        text = f"{text[:80]}...[{len(text) - 180} more characters]...{text[-100:]}"
    return text


def path_key(path: str) -> str:
    """The key of a path in a JSON object (fingerprints): the path when it is UTF-8, else NUL and
    the base64 of its bytes."""
    return path if is_utf8(path) else "\0" + base64.b64encode(os.fsencode(path)).decode()


def from_key(key: str) -> str:
    """The path of a ``path_key``."""
    return os.fsdecode(base64.b64decode(key[1:])) if key.startswith("\0") else key


def _b64(text: str) -> str:
    return base64.b64encode(os.fsencode(text)).decode()


def _from_b64(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise BadInput(f"{what} is not a base64 string")
    try:
        return os.fsdecode(base64.b64decode(value, validate=True))
    except (binascii.Error, ValueError):
        raise BadInput(f"{what} is not valid base64") from None


def _mode(value: object, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            mode = int(value, 8)
        except ValueError:
            raise BadInput(f"{what} is not an octal mode: {value!r}") from None
    elif isinstance(value, int) and not isinstance(value, bool):
        mode = value
    else:
        raise BadInput(f"{what} is not a mode: {value!r}")
    if not 0 <= mode <= 0o7777:
        raise BadInput(f"{what} is not a mode: {value!r}")
    return mode


def points_out(path: str, target: str) -> bool:
    """Whether a symlink at ``path`` (workspace-relative) with ``target`` may point out of the workspace.

    Absolute targets do (on the host, /x is the host's /x, whatever it was
    in the container), and relative ones that climb above the workspace
    with "..".  A ".." after a name counts too: that name may itself be a
    symlink, from which ".." climbs somewhere else; that cannot be judged
    without resolving it, so it is reported.
    """
    if target.startswith("/"):
        return True
    depth = path.count("/")  # of the directory the link is in, below the workspace
    named = False
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part != "..":
            named = True
        elif named:
            return True
        else:
            depth -= 1
            if depth < 0:
                return True
    return False


@dataclass(frozen=True, slots=True)
class Change:
    """One path (relative to the workspace, "/"-separated) that differs.

    ``type`` is the type of the new entry for added and modified paths, and
    of the removed lower entry for deleted ones.  The rest describes the
    change for a review and does not take part in comparisons: ``mode`` the
    new entry's permission bits (setuid and setgid included), ``old_mode``
    the lower entry's when a modification changed them, ``old_type`` the
    lower entry's type when a modification changed it, ``target`` a new
    symlink's target and ``old_target`` the one it replaced.
    """

    path: str
    kind: ChangeKind
    type: EntryType
    mode: int | None = field(default=None, compare=False)
    old_mode: int | None = field(default=None, compare=False)
    old_type: EntryType | None = field(default=None, compare=False)
    target: str | None = field(default=None, compare=False)
    old_target: str | None = field(default=None, compare=False)

    @property
    def escapes(self) -> bool:
        """A new symlink that may point out of the workspace."""
        return self.kind != "deleted" and self.target is not None and points_out(self.path, self.target)

    @property
    def setid(self) -> bool:
        return self.kind != "deleted" and self.mode is not None and bool(self.mode & SETID)

    def as_dict(self) -> dict[str, object]:
        """The record's form: JSON-safe, whatever bytes the names hold (see the module's docstring)."""
        out: dict[str, object] = {"path": display(self.path)}
        if not is_utf8(self.path):
            out["path_b64"] = _b64(self.path)
        out["change"] = self.kind
        out["type"] = self.type
        if self.mode is not None:
            out["mode"] = f"{self.mode:04o}"
        if self.old_mode is not None:
            out["old_mode"] = f"{self.old_mode:04o}"
        if self.old_type is not None:
            out["old_type"] = self.old_type
        for key, value in (("target", self.target), ("old_target", self.old_target)):
            if value is not None:
                out[key] = display(value)
                if not is_utf8(value):
                    out[f"{key}_b64"] = _b64(value)
        if self.escapes:
            out["escapes"] = True
        if self.setid:
            out["setid"] = True
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Change:
        """A change from its record form (or the older {"path", "kind", "type"})."""
        kind = data.get("change", data.get("kind"))
        typ, old_type = data.get("type"), data.get("old_type")
        try:
            path = _from_b64(data["path_b64"], "path_b64") if "path_b64" in data else data.get("path")
            if not isinstance(path, str) or kind not in KINDS or typ not in TYPES or \
                    old_type not in (None, *TYPES):
                raise BadInput("")
            targets = []
            for key in ("target", "old_target"):
                value = _from_b64(data[f"{key}_b64"], f"{key}_b64") if f"{key}_b64" in data else data.get(key)
                if value is not None and not isinstance(value, str):
                    raise BadInput("")
                targets.append(value)
            mode, old_mode = _mode(data.get("mode"), "mode"), _mode(data.get("old_mode"), "old_mode")
        except BadInput as exc:
            raise BadInput(f"not a workspace change: {escape(repr(dict(data)))[:300]}"
                           + (f" ({exc.args[0]})" if exc.args and exc.args[0] else ""),
                           hint='expected {"path": ..., "change": "added|modified|deleted", "type": ...}') from None
        _check_path(path)
        return cls(path, kind, typ, mode, old_mode, old_type, targets[0], targets[1])


class Applied(NamedTuple):
    changes: list[Change]  # what was applied, in the order it was
    warnings: list[str]  # setuid/setgid bits stripped, entries not applied (control characters escaped)


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


# --- the record's view ----------------------------------------------------------------------


def summary(changes: Iterable[Change]) -> dict[str, list[object]]:
    """The record's form: every change (``changes``, see ``Change.as_dict``), and the paths by kind
    (display forms, sorted): {"added": [...], "modified": [...], "deleted": [...], "changes": [...]}."""
    items = list(changes)
    paths: dict[str, list[str]] = {kind: [] for kind in KINDS}
    for change in items:
        paths[change.kind].append(display(change.path))
    result: dict[str, list[object]] = {kind: list(sorted(found)) for kind, found in paths.items()}
    result["changes"] = [change.as_dict() for change in sorted(items, key=lambda c: c.path)]
    return result


def findings(changes: Iterable[Change], limit: int = FINDINGS_SAID) -> list[str]:
    """What a reviewer should look at, one line each (escaped for a terminal), at most ``limit``
    lines and then how many more: symlinks that may point out of the workspace, setuid/setgid
    entries (stripped on apply), and fifos, sockets and devices (never applied)."""
    lines: list[str] = []
    more = 0
    for change in changes:
        if change.kind == "deleted":
            continue
        if change.escapes:
            line = f"{show(change.path)} -> {show(change.target or '')}: a symlink that may point out of the workspace"
        elif change.setid:
            line = (f"{show(change.path)}: {change.type} with the setuid/setgid bit (mode {change.mode:04o}); "
                    "apply strips it")
        elif change.type not in APPLIED_TYPES:
            line = f"{show(change.path)}: a {change.type}, which apply leaves out"
        else:
            continue
        if len(lines) < limit:
            lines.append(line)
        else:
            more += 1
    if more:
        lines.append(f"... and {more} more (the record's quarantine.changes lists them all)")
    return lines


# --- reading the upper dir -------------------------------------------------------------------


def _check_path(path: str) -> None:
    """Refuses a workspace-relative path that is empty, absolute, or has empty, "." or ".." components."""
    if not path or "\0" in path or path.startswith("/") or path.endswith("/") or "//" in path or \
            f"/{path}/".find("/./") >= 0 or f"/{path}/".find("/../") >= 0:
        raise UnsafePath(f"refusing the workspace path {show(path)[:300]!r}: it is empty, absolute, "
                         "or has empty, '.' or '..' components")


def _parent(path: str) -> str:
    return path[:path.rfind("/")] if "/" in path else ""


def _name(path: str) -> str:
    return path[path.rfind("/") + 1:]


def _entry_type(mode: int) -> EntryType:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "chardev"
    if stat.S_ISBLK(mode):
        return "blockdev"
    return "other"


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _overlay_xattrs(dir_fd: int, name: str) -> dict[str, bytes]:
    """The overlay's own xattrs of the entry ``name`` in the directory on ``dir_fd``, by short name.

    Read through /proc/self/fd/N/NAME, which names that entry whatever the
    depth of its directory, and does not follow it if it is a symlink."""
    where = f"/proc/self/fd/{dir_fd}/{name}"
    try:
        names = os.listxattr(where, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.ENODATA):
            return {}
        raise
    found: dict[str, bytes] = {}
    for attr in names:
        for prefix in XATTR_PREFIXES:
            if attr.startswith(prefix):
                found[attr[len(prefix):]] = os.getxattr(where, attr, follow_symlinks=False)
    return found


def _is_opaque(dir_fd: int, name: str, path: str, upper: Path) -> bool:
    xattrs = _overlay_xattrs(dir_fd, name)
    for attr in UNSUPPORTED_XATTRS:
        if attr in xattrs:
            raise UnsupportedOverlay(
                f"{show(path)} in the upper dir {upper} carries the overlay xattr '{attr}', which is not supported",
                hint="the upper dir was left as it is; mount the overlay with redirect_dir=off,metacopy=off "
                     "or merge it by hand")
    value = xattrs.get("opaque")
    if value not in (None, b"y"):
        raise UnsupportedOverlay(f"{show(path)} in the upper dir {upper} has overlay.opaque={value!r}, "
                                 "which is not supported", hint="the upper dir was left as it is")
    return value == b"y"


def _same_content(a_dir: int, b_dir: int, name: str) -> bool:
    a = os.open(name, _READ_FLAGS, dir_fd=a_dir)
    try:
        b = os.open(name, _READ_FLAGS, dir_fd=b_dir)
        try:
            with os.fdopen(a, "rb", closefd=False) as fa, os.fdopen(b, "rb", closefd=False) as fb:
                while True:
                    chunk = fa.read(CHUNK)
                    if chunk != fb.read(CHUNK):
                        return False
                    if not chunk:
                        return True
        finally:
            os.close(b)
    finally:
        os.close(a)


# what a directory of the walk is: an upper dir merged with the lower dir of its path, an upper
# dir with nothing of the lower's under it, or a lower dir whose whole contents were deleted
_MERGED, _NEW, _DELETED = range(3)


class _Reader:
    """changes(): one iterative walk of the upper dir, with the lower dir beside it."""

    def __init__(self, upper: Path, ucur: Cursor, lcur: Cursor, max_entries: int, max_changes: int,
                 max_chars: int) -> None:
        self.upper, self.ucur, self.lcur = upper, ucur, lcur
        self.max_entries, self.max_changes, self.max_chars = max_entries, max_changes, max_chars
        self.out: list[Change] = []
        self.entries = self.chars = 0

    def _too_many(self, what: str) -> TooManyChanges:
        return TooManyChanges(f"the quarantine holds {what}: too many to review or apply (at most "
                              f"{self.max_entries} entries, {self.max_changes} changes and {self.max_chars} "
                              "characters of paths)", hint="kp-rm discards it; look in the upper dir for what "
                              "you need and copy it by hand")

    def count(self) -> None:
        self.entries += 1
        if self.entries > self.max_entries:
            raise self._too_many(f"more than {self.max_entries} entries")

    def add(self, change: Change) -> None:
        self.chars += len(change.path) + 1
        if len(self.out) >= self.max_changes:
            raise self._too_many(f"more than {self.max_changes} changes")
        if self.chars > self.max_chars:
            raise self._too_many(f"more than {self.max_chars} characters of changed paths")
        self.out.append(change)

    def run(self) -> list[Change]:
        stack: list[tuple[str, int, bool]] = [("", _MERGED, False)]
        while stack:
            path, what, authoritative = stack.pop()
            if what == _DELETED:
                self._deleted(path, stack)
            else:
                self._upper_dir(path, what == _MERGED, authoritative, stack)
        self.out.sort(key=lambda change: change.path)
        return self.out

    def _lower_entries(self, path: str) -> tuple[int, dict[str, os.stat_result]]:
        """The lower dir at ``path``: its fd (borrowed) and entries; (-1, {}) if it is gone or not a directory."""
        try:
            fd = self.lcur.goto(path)
        except Unreachable:
            return -1, {}
        entries = {}
        with os.scandir(fd) as it:
            for entry in it:
                self.count()
                with contextlib.suppress(FileNotFoundError):
                    entries[entry.name] = os.stat(entry.name, dir_fd=fd, follow_symlinks=False)
        return fd, entries

    def _deleted(self, path: str, stack: list[tuple[str, int, bool]]) -> None:
        """Everything in the lower dir at ``path`` is deleted (the directory itself was reported)."""
        _fd, entries = self._lower_entries(path)
        for name, lst in entries.items():
            child = join(path, name)
            self.add(Change(child, "deleted", _entry_type(lst.st_mode)))
            if stat.S_ISDIR(lst.st_mode):
                stack.append((child, _DELETED, False))

    def _upper_dir(self, path: str, merged: bool, authoritative: bool, stack: list[tuple[str, int, bool]]) -> None:
        """Compare the upper dir at ``path`` with the lower dir there (when ``merged``).

        ``authoritative``: the upper dir alone is the merged view (opaque, or new).
        """
        try:
            ufd = self.ucur.goto(path)
        except Unreachable:
            raise KpError(f"{show(path)} in the upper dir {self.upper} vanished while it was read",
                          hint="is the run's container still running?") from None
        lfd, lower = self._lower_entries(path) if merged else (-1, {})
        present: set[str] = set()
        names = []
        with os.scandir(ufd) as it:
            for entry in it:
                self.count()
                names.append(entry.name)
        for name in names:
            child = join(path, name)
            try:
                ust = os.stat(name, dir_fd=ufd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            opaque = _is_opaque(ufd, name, child, self.upper)  # checks every entry for unsupported xattrs
            lst = lower.get(name)
            if _is_whiteout(ust):
                if lst is not None and not authoritative:
                    self.add(Change(child, "deleted", _entry_type(lst.st_mode)))
                    if stat.S_ISDIR(lst.st_mode):
                        stack.append((child, _DELETED, False))
                continue
            present.add(name)
            umode = stat.S_IMODE(ust.st_mode)
            if stat.S_ISDIR(ust.st_mode):
                if lst is not None and stat.S_ISDIR(lst.st_mode):
                    if umode != stat.S_IMODE(lst.st_mode):
                        self.add(Change(child, "modified", "dir", umode, stat.S_IMODE(lst.st_mode)))
                    stack.append((child, _MERGED, authoritative or opaque))
                else:
                    self.add(Change(child, "added" if lst is None else "modified", "dir", umode,
                                    old_type=None if lst is None else _entry_type(lst.st_mode)))
                    stack.append((child, _NEW, True))
                continue
            new_type = _entry_type(ust.st_mode)
            target = os.readlink(name, dir_fd=ufd) if new_type == "symlink" else None
            mode = None if new_type == "symlink" else umode
            if lst is None:
                self.add(Change(child, "added", new_type, mode, target=target))
            elif stat.S_IFMT(lst.st_mode) != stat.S_IFMT(ust.st_mode):
                self.add(Change(child, "modified", new_type, mode, old_type=_entry_type(lst.st_mode), target=target))
                if stat.S_ISDIR(lst.st_mode):
                    stack.append((child, _DELETED, False))
            elif new_type == "symlink":
                old_target = os.readlink(name, dir_fd=lfd)
                if old_target != target:
                    self.add(Change(child, "modified", "symlink", target=target, old_target=old_target))
            else:
                lmode = stat.S_IMODE(lst.st_mode)
                if umode != lmode or (new_type == "file" and (ust.st_size != lst.st_size or
                                                              not _same_content(ufd, lfd, name))) or \
                        (new_type != "file" and ust.st_rdev != lst.st_rdev):
                    self.add(Change(child, "modified", new_type, mode, lmode if lmode != umode else None))
        if authoritative and merged:
            for name, lst in lower.items():
                if name not in present:
                    child = join(path, name)
                    self.add(Change(child, "deleted", _entry_type(lst.st_mode)))
                    if stat.S_ISDIR(lst.st_mode):
                        stack.append((child, _DELETED, False))


def changes(upper: Path, lower: Path, *, max_entries: int | None = None, max_changes: int | None = None,
            max_chars: int | None = None) -> list[Change]:
    """What the merged view differs in from ``lower``, read from ``upper``; sorted by path.

    ``TooManyChanges`` past the caps (MAX_ENTRIES, MAX_CHANGES and MAX_PATH_CHARS unless given;
    see the module's docstring)."""
    max_entries = MAX_ENTRIES if max_entries is None else max_entries
    max_changes = MAX_CHANGES if max_changes is None else max_changes
    max_chars = MAX_PATH_CHARS if max_chars is None else max_chars
    for what, path in (("upper", upper), ("lower", lower)):
        if not path.is_dir():
            raise NotFound(f"the {what} dir {path} does not exist or is not a directory")
    upper_fd = _open_root(upper)
    try:
        lower_fd = _open_root(lower)
        try:
            with Cursor(upper_fd) as ucur, Cursor(lower_fd) as lcur:
                return _Reader(upper, ucur, lcur, max_entries, max_changes, max_chars).run()
        finally:
            os.close(lower_fd)
    finally:
        os.close(upper_fd)


# --- safe access to a tree: every component opened without following symlinks ----------------


def _parts(path: str) -> tuple[str, ...]:
    """The components of a workspace-relative path; refuses anything that could escape it."""
    _check_path(path)
    return tuple(path.split("/"))


def _open_root(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise NotFound(f"cannot open the directory {path}: {exc.strerror}") from exc


class _Tree:
    """One tree (the upper or the lower) read by path through a cursor: never through a symlink."""

    def __init__(self, cursor: Cursor) -> None:
        self.cursor = cursor

    def dir(self, path: str) -> int:
        """An fd of the directory at ``path`` (the caller closes it); Unreachable if it cannot be reached."""
        return os.dup(self.cursor.goto(path))

    def lstat(self, path: str) -> os.stat_result | None:
        return self.cursor.lstat(path)

    def readlink(self, path: str) -> str:
        return os.readlink(_name(path), dir_fd=self.cursor.goto(_parent(path)))

    def sha256(self, path: str) -> str | None:
        try:
            dir_fd = self.cursor.goto(_parent(path))
            fd = os.open(_name(path), _READ_FLAGS, dir_fd=dir_fd)
        except (Unreachable, OSError):
            return None
        digest = hashlib.sha256()
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            for chunk in iter(lambda: f.read(CHUNK), b""):
                digest.update(chunk)
        return digest.hexdigest()

    def children(self, path: str) -> list[str]:
        return sorted(os.listdir(self.cursor.goto(path)))

    def fingerprint(self, path: str) -> dict[str, object] | None:
        st = self.lstat(path)
        if st is None:
            return None
        print_: dict[str, object] = {"type": _entry_type(st.st_mode), "size": st.st_size,
                                     "mtime_ns": st.st_mtime_ns, "mode": stat.S_IMODE(st.st_mode)}
        if stat.S_ISREG(st.st_mode):
            print_["sha256"] = self.sha256(path)
        elif stat.S_ISLNK(st.st_mode):
            target = self.readlink(path)
            print_["target"] = target if is_utf8(target) else path_key(target)
        return print_


def fingerprint(lower: Path, changes: Iterable[Change]) -> dict[str, object]:
    """The lower's state at every changed path: None if absent, else type, size, mtime_ns, mode
    (and sha256 for a file, target for a symlink), keyed by ``path_key``.  JSON-safe, for the
    container's record.

    Take it right after the run: host edits made during the run are not caught.
    """
    root = _open_root(lower)
    try:
        with Cursor(root) as cursor:
            tree = _Tree(cursor)
            return {path_key(change.path): tree.fingerprint(change.path) for change in changes}
    finally:
        os.close(root)


# --- applying ---------------------------------------------------------------------------------


_MISSING = object()


def _removes_lower_dir(change: Change, lst: os.stat_result | None) -> bool:
    return lst is not None and stat.S_ISDIR(lst.st_mode) and (change.kind == "deleted" or change.type != "dir")


def _upper_print(upper: _Tree, change: Change) -> dict[str, object] | None:
    """What the lower holds at ``change.path`` once it is applied (the parts apply() sets), or None."""
    ust = upper.lstat(change.path)
    if ust is None or _entry_type(ust.st_mode) != change.type:
        return None
    print_: dict[str, object] = {"type": change.type, "mode": stat.S_IMODE(ust.st_mode) & ~SETID}
    if change.type == "file":
        print_["sha256"] = upper.sha256(change.path)
    elif change.type == "symlink":
        target = upper.readlink(change.path)
        print_["target"] = target if is_utf8(target) else path_key(target)
    return print_


def _resumable(upper: _Tree, change: Change, expected: object, now: dict[str, object] | None) -> bool:
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
    want = _upper_print(upper, change)
    if want is None:
        return False
    if change.type == "dir":
        # made 0700 by apply() until the modes are set at the end
        return now["type"] == "dir" and now["mode"] in (want["mode"], 0o700)
    if change.type not in APPLIED_TYPES:
        return False
    return all(now.get(key) == value for key, value in want.items())


class _Parents:
    """The state of every directory that some change to apply lies under, computed once each.

    "ok": a real directory in the workspace, kept; "made": (re)made by a
    change in the list (absent, or not a directory, in the workspace), so
    nothing of the workspace's is below it; "missing": absent from the
    workspace and not in the list (with the first such path).
    """

    def __init__(self, lower: _Tree, by_path: Mapping[str, Change]) -> None:
        self.lower, self.by_path = lower, by_path
        self.known: dict[str, tuple[str, str]] = {}

    def state(self, path: str, change: Change) -> tuple[str, str]:
        chain = []
        while path and path not in self.known:
            chain.append(path)
            path = _parent(path)
        state = self.known[path] if path else ("ok", "")
        for prefix in reversed(chain):
            state = self._state(prefix, state, change)
            self.known[prefix] = state
        return state

    def _state(self, prefix: str, above: tuple[str, str], change: Change) -> tuple[str, str]:
        listed = self.by_path.get(prefix)
        if listed is not None:
            if listed.kind == "deleted" or listed.type != "dir":
                raise BadInput(f"the list of changes is inconsistent: {show(change.path)} is {change.kind} "
                               f"but its parent {show(prefix)} is {listed.kind} ({listed.type})")
            if above[0] != "ok":
                return ("made", "")
            lst = self._lstat(prefix)
            return ("made", "") if lst is None or not stat.S_ISDIR(lst.st_mode) else ("ok", "")
        if above[0] == "made":
            raise BadInput(f"the list of changes is inconsistent: {show(change.path)} is {change.kind} "
                           f"but its parent {show(prefix)} is not in the list", hint="include the parent directory")
        if above[0] == "missing":
            return above
        lst = self._lstat(prefix)
        if lst is not None and stat.S_ISLNK(lst.st_mode):
            raise UnsafePath(f"refusing to write {show(change.path)}: its parent {show(prefix)} is a symlink "
                             "in the workspace", hint="it changed on the host since the run; move it away "
                             "or discard the changes")
        if lst is not None and not stat.S_ISDIR(lst.st_mode):
            raise Conflict(f"cannot apply {show(change.path)}: its parent {show(prefix)} is not a directory in "
                           "the workspace", hint="it changed on the host since the run; move it away, or discard "
                           "the changes")
        return ("missing", prefix) if lst is None else ("ok", "")

    def _lstat(self, path: str) -> os.stat_result | None:
        try:
            return self.lower.lstat(path)
        except OSError as exc:
            raise KpError(f"cannot read {show(path)} in the workspace: {exc.strerror}") from exc


def _check(upper: _Tree, lower: _Tree, items: list[Change], fingerprints: Mapping[str, object],
           force: bool, resume: bool = False) -> None:
    """Everything that can be checked before the first change: raises, or returns having changed nothing."""
    by_path = {change.path: change for change in items}
    if len(by_path) != len(items):
        raise BadInput("the list of changes names a path more than once")
    conflicts: dict[str, str] = {}  # path -> why, when there is more to say than that it changed
    if not force:
        for change in items:
            expected = fingerprints.get(path_key(change.path), _MISSING)
            if expected is _MISSING:
                conflicts[change.path] = "no fingerprint of it was taken"
                continue
            now = lower.fingerprint(change.path)
            if expected != now and not (resume and _resumable(upper, change, expected, now)):
                conflicts[change.path] = ""
    parents = _Parents(lower, by_path)
    for change in items:
        # a deletion needs no parents: where there is none (or a symlink) there is nothing to delete
        if change.kind != "deleted":
            state, missing = parents.state(_parent(change.path), change)
            if state == "missing" and not force:
                conflicts[change.path] = (f"its parent {show(missing)} is missing: deleted on the host, "
                                          "or a new directory left out of the changes")
            ust = upper.lstat(change.path)
            if ust is None or _is_whiteout(ust) or _entry_type(ust.st_mode) != change.type:
                raise KpError(f"the upper dir no longer matches the reviewed changes at {show(change.path)}",
                              hint="list the changes again and review them before applying")
        lst = lower.lstat(change.path)
        if not force and _removes_lower_dir(change, lst):
            for name in lower.children(change.path):
                child = by_path.get(join(change.path, name))
                if child is None or child.kind != "deleted":
                    conflicts.setdefault(join(change.path, name), f"new on the host, in {show(change.path)}, "
                                                                  "which the run removed")
    if conflicts:
        named = [f"{show(path)} ({why})" if why else show(path) for path, why in sorted(conflicts.items())]
        more = f" and {len(named) - CONFLICTS_NAMED} more" if len(named) > CONFLICTS_NAMED else ""
        raise Conflict(f"{len(named)} path(s) in the workspace changed on the host since the run: "
                       f"{', '.join(named[:CONFLICTS_NAMED])}{more}",
                       hint="look at them, then apply again with force to overwrite them, or discard the changes")


def _strip(path: str, mode: int, warnings: list[str]) -> int:
    if mode & SETID:
        warnings.append(f"{show(path)}: setuid/setgid bits stripped (mode {mode:04o} applied as "
                        f"{mode & ~SETID:04o})")
    return mode & ~SETID


def temp_prefix() -> str:
    """A new prefix for one apply's temporary names: random, so no workspace entry has it by chance."""
    return f"{TEMP_PREFIX}{secrets.token_hex(8)}-"


def _temp_name(prefix: str, index: int) -> str:
    if not prefix.startswith(TEMP_PREFIX) or "/" in prefix or "\0" in prefix:
        raise BadInput(f"not a temporary name prefix of kp-run --apply: {show(prefix)!r}")
    return f"{prefix}{index}"


def remove_temps(lower: Path, changes: Iterable[Change], prefix: str) -> list[str]:
    """Remove the temporary files that an interrupted ``apply(..., tmp_prefix=prefix)`` of ``changes``
    can have left in ``lower`` (only files and symlinks of exactly those names); returns their paths."""
    removed: list[str] = []
    root = _open_root(lower)
    try:
        with Cursor(root) as cursor:
            for index, change in enumerate(changes):
                if change.kind == "deleted" or change.type not in ("file", "symlink"):
                    continue
                _check_path(change.path)
                name = _temp_name(prefix, index)
                try:
                    parent = cursor.goto(_parent(change.path))
                except Unreachable:
                    continue
                try:
                    st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                        os.unlink(name, dir_fd=parent)
                        removed.append(join(_parent(change.path), name))
                except FileNotFoundError:
                    pass
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
        fdtree.remove(dir_fd, name)  # iterative and fd-based: any depth, never following a symlink
    else:
        os.rmdir(name, dir_fd=dir_fd)


def blob_id(data: bytes) -> str:
    """Git's id of a blob of these bytes (what a review's snapshot names each file by)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def _unexpected(path: str, what: str) -> Conflict:
    return Conflict(f"{show(path)}: {what} differs from the reviewed snapshot (changed since the review)",
                    code="changed_since_review", hint="review it again (kp-review) before applying")


def _copy_file(src_dir: int, dst_dir: int, name: str, path: str, owner: tuple[int, int] | None,
               warnings: list[str], tmp: str, written: Callable[[], None], expect: str | None = None) -> None:
    src = os.open(name, _READ_FLAGS, dir_fd=src_dir)
    try:
        st = os.fstat(src)
        if not stat.S_ISREG(st.st_mode):
            raise KpError(f"{show(path)} in the upper dir is no longer a regular file",
                          hint="list the changes again and review them before applying")
        dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                      dir_fd=dst_dir)
        try:
            # the bytes written are hashed as git names a blob: they must be the reviewed ones
            digest, size = hashlib.sha1(b"blob %d\0" % st.st_size, usedforsecurity=False), 0
            if st.st_size:
                with os.fdopen(src, "rb", closefd=False) as fsrc, os.fdopen(dst, "wb", closefd=False) as fdst:
                    while chunk := fsrc.read(CHUNK):
                        fdst.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
            if expect is not None and (size != st.st_size or digest.hexdigest() != expect):
                raise _unexpected(path, "its content")
            if owner is not None:
                os.fchown(dst, *owner)
            os.fchmod(dst, _strip(path, stat.S_IMODE(st.st_mode), warnings))
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
                  written: Callable[[], None], path: str = "", expect: str | None = None) -> None:
    target = os.readlink(name, dir_fd=src_dir)
    if expect is not None and blob_id(os.fsencode(target)) != expect:
        raise _unexpected(path, "its target")
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

    def __init__(self, upper: _Tree, lower: _Tree, owner: tuple[int, int] | None, force: bool,
                 applied: list[Change], warnings: list[str], modes: dict[str, int]) -> None:
        self.upper_tree, self.lower_tree, self.owner, self.force = upper, lower, owner, force
        self.applied, self.warnings, self.modes = applied, warnings, modes

    def lower(self, path: str) -> int:
        try:
            return self.lower_tree.dir(path)
        except Unreachable as exc:
            if exc.symlink:
                raise UnsafePath(f"refusing to write under {show(exc.prefix)}: it is a symlink in the "
                                 "workspace") from None
            if not self.force or self.lower_tree.lstat(exc.prefix) is not None:
                raise Conflict(f"{show(exc.prefix)} in the workspace is missing or not a directory",
                               hint="it changed on the host since the run") from None
        # forced: make the missing parents, like the upper's
        made, prefix = [], path
        while prefix and self.lower_tree.lstat(prefix) is None:
            made.append(prefix)
            prefix = _parent(prefix)
        for missing in reversed(made):
            self.mkdir(missing)
            self.applied.append(Change(missing, "added", "dir"))
        return self.lower_tree.dir(path)

    def upper(self, path: str) -> int:
        try:
            return self.upper_tree.dir(path)
        except Unreachable as exc:
            raise KpError(f"{show(exc.prefix)} in the upper dir is missing or not a directory",
                          hint="list the changes again and review them before applying") from None

    def mkdir(self, path: str) -> bool:
        """Make path a real directory (replacing a non-directory); True if it was created."""
        parent = self.lower(_parent(path))
        name = _name(path)
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
            ust = self.upper_tree.lstat(path)
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
            raise KpError(f"cannot {what} {show(path)} in the workspace: no space left on its filesystem (ENOSPC)",
                          code="no_space", hint="free some space, then apply again to finish: the upper dir "
                                                "still holds every change") from exc
        raise KpError(f"cannot {what} {show(path)} in the workspace: {exc.strerror or exc}",
                      hint="the upper dir still holds every change; fix the cause, then apply again with force "
                           "to finish") from exc


def _syncfs(fd: int) -> None:
    """Flush the filesystem of ``fd`` to disk: syncfs(2), or sync(2) where it cannot be called."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) == 0:
            return
    except (OSError, AttributeError):
        pass
    os.sync()


Step = Callable[[str, str], None]


def _no_step(event: str, path: str) -> None:
    pass


def apply(upper: Path, lower: Path, changes: Iterable[Change], *, fingerprints: Mapping[str, object],
          owner: tuple[int, int] | None = None, force: bool = False, tmp_prefix: str | None = None,
          resume: bool = False, on_step: Step = _no_step, expect: Mapping[str, str] | None = None) -> Applied:
    """Make ``lower`` equal to the merged view at each of ``changes``; returns what was applied and warnings.

    Checks everything first and changes nothing if a check fails: every path
    must still match ``fingerprints`` (else ``Conflict``, unless ``force``),
    and no path may pass through a symlink in ``lower`` (``UnsafePath``, even
    when forced).  Then removes, deepest first; creates and replaces,
    parents first; and sets directory modes last, deepest first.  Files and
    symlinks are written under a temporary name (``tmp_prefix`` + the
    change's index in ``changes``) and renamed into place; what is created
    (and every file it replaces) is chowned to ``owner`` when given, else it
    belongs to the calling process.  Fifos, sockets and devices are not
    applied (a warning each).  Last, one syncfs.

    Every step is idempotent.  After an interruption half-way, call
    ``remove_temps`` with the same prefix and changes, then apply the same
    changes again with ``resume``: a path may then also be as this apply
    leaves it on its way (already applied, or removed before being
    rewritten) without being a conflict.

    ``on_step(event, path)`` is called with "checked" once the checks passed
    and before the first change (raising there changes nothing), "removed"
    and "wrote" after each change, and "tmp" when a temporary file is
    complete but not yet renamed into place.

    ``expect`` (path -> git blob id, from a review's snapshot): every file
    and symlink written must hash to it, checked on the bytes written before
    they are renamed into place; one that does not stops the apply with
    ``Conflict`` (code changed_since_review).  Files applied before it stay.
    """
    items = list(changes)
    for change in items:
        _check_path(change.path)
    prefix = temp_prefix() if tmp_prefix is None else tmp_prefix
    _temp_name(prefix, 0)
    position = {change.path: index for index, change in enumerate(items)}
    upper_fd = _open_root(upper)
    try:
        lower_fd = _open_root(lower)
        try:
            with Cursor(upper_fd) as ucur, Cursor(lower_fd) as lcur:
                return _apply(_Tree(ucur), _Tree(lcur), items, position, fingerprints, owner, force, prefix,
                              resume, on_step, lower_fd, expect)
        finally:
            os.close(lower_fd)
    finally:
        os.close(upper_fd)


def _apply(upper: _Tree, lower: _Tree, items: list[Change], position: dict[str, int],
           fingerprints: Mapping[str, object], owner: tuple[int, int] | None, force: bool, prefix: str,
           resume: bool, on_step: Step, lower_fd: int, expect: Mapping[str, str] | None = None) -> Applied:
    _check(upper, lower, items, fingerprints, force, resume)
    on_step("checked", "")
    applied: list[Change] = []
    warnings: list[str] = []
    modes: dict[str, int] = {}
    dirs = _Dirs(upper, lower, owner, force, applied, warnings, modes)

    # 1. removals, deepest first (reverse path order puts every path before its parent, and keeps
    #    a subtree together): deleted entries, and directories that a non-directory replaces
    for change in sorted(items, key=lambda c: c.path, reverse=True):
        lst = lower.lstat(change.path)
        if change.kind == "deleted" or _removes_lower_dir(change, lst):
            if lst is None:
                if change.kind == "deleted":
                    applied.append(change)  # already gone (a repeated apply)
                continue
            with _step("remove", change.path):
                parent = dirs.lower(_parent(change.path))
                try:
                    _remove(parent, _name(change.path), force)
                finally:
                    os.close(parent)
            if change.kind == "deleted":
                applied.append(change)
            on_step("removed", change.path)

    # 2. creations and replacements, parents first (path order puts every path after its parent)
    for change in sorted((c for c in items if c.kind != "deleted"), key=lambda c: c.path):
        if change.type not in APPLIED_TYPES:
            warnings.append(f"{show(change.path)}: not applied: a {change.type} is not copied to the workspace")
            continue
        with _step("write", change.path):
            if change.type == "dir":
                dirs.mkdir(change.path)
            else:
                src, dst = dirs.upper(_parent(change.path)), dirs.lower(_parent(change.path))
                tmp = _temp_name(prefix, position[change.path])
                written = functools.partial(on_step, "tmp", change.path)
                try:
                    want = None if expect is None else expect.get(change.path)
                    if expect is not None and want is None:
                        raise _unexpected(change.path, "its presence")
                    if change.type == "file":
                        _copy_file(src, dst, _name(change.path), change.path, owner, warnings, tmp, written, want)
                    else:
                        _copy_symlink(src, dst, _name(change.path), owner, tmp, written, change.path, want)
                finally:
                    os.close(src)
                    os.close(dst)
        applied.append(change)
        on_step("wrote", change.path)

    # 3. directory modes last (a read-only directory would refuse its own contents), deepest first
    for path in sorted(modes, reverse=True):
        with _step("set the mode of", path):
            fd = dirs.lower(path)
            try:
                os.fchmod(fd, modes[path])
            finally:
                os.close(fd)

    with _step("flush", "what was written"):
        _syncfs(lower_fd)
    return Applied(applied, warnings)
