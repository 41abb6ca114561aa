"""Directory trees of any depth and size, walked and removed through directory fds.

An agent can leave a tree deeper than a path may be long (PATH_MAX is 4096
bytes: 2048 levels of one-letter names), deeper than Python's recursion
limit, with names of any bytes and with millions of entries.  Everything
here works one name at a time relative to an open directory (openat with
``O_NOFOLLOW | O_DIRECTORY``, fstatat, unlinkat), without recursion, and
holds at most ``MAX_OPEN`` directory fds however deep it goes: a directory
whose fd was closed on the way down is reopened on the way up through its
child's "..", and must be the very directory it was (device and inode), so
a tree moved while it is walked is an error (``TreeChanged``), never a walk
somewhere else.  Symlinks are never followed: a symlink where a directory is
expected is ``Unreachable``.

Names are ``str`` as ``os.fsdecode`` makes them (a byte that is not UTF-8 is
a lone surrogate, losslessly); a path is names joined by "/", relative to
the root fd, and "" is the root itself.  ``display(path)`` is the form a
JSON record can carry (undecodable bytes written as ``\\xHH``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from types import TracebackType

from kodepipe.core.errors import KpError

MAX_OPEN = 32  # directory fds a cursor keeps open, however deep it is
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# how often a directory that is not empty after its contents were removed is cleared again
# (something was writing into it meanwhile) before the removal gives up
CLEAR_AGAIN = 3


class TreeChanged(KpError):
    """A directory was moved or replaced while the tree was walked."""

    code = "tree_changed"


class TooMany(KpError):
    """A walk met more entries than its limit allows."""

    code = "too_many_entries"


class Unreachable(Exception):
    """A component of a path is missing, not a directory, or a symlink."""

    def __init__(self, prefix: str, symlink: bool, err: int) -> None:
        super().__init__(prefix)
        self.prefix = prefix  # the path up to and including the component that failed
        self.symlink = symlink
        self.errno = err


def display(path: str) -> str:
    """``path`` as a JSON string can carry it: bytes that are not UTF-8 as ``\\xHH`` (lossy; a record
    carries the exact bytes next to it); every other character as it is."""
    try:
        path.encode()
        return path
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")


def is_utf8(path: str) -> bool:
    try:
        path.encode()
        return True
    except UnicodeEncodeError:
        return False


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _common(a: str, b: str) -> int:
    """The length of the longest common prefix of two paths that ends between components in both."""
    n = min(len(a), len(b))
    if a[:n] != b[:n]:
        lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]: slices compare in C, however long
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if a[:mid] == b[:mid]:
                lo = mid
            else:
                hi = mid
        n = lo
    while n > 0 and not ((n == len(a) or a[n] == "/") and (n == len(b) or b[n] == "/")):
        n = max(a.rfind("/", 0, n), 0)
    return n


class Cursor:
    """An open directory somewhere below a root fd, moved with ``goto(path)``.

    The fd it gives (``fd``, or what ``goto`` returns) is borrowed: valid
    until the cursor moves again.  The root fd is the caller's; the cursor
    never closes it.  Moving between nearby paths costs a few syscalls, so
    visiting paths in sorted order walks each directory about once.
    """

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self.names: list[str] = []
        self._fds: list[int] = []  # -1 where closed to stay under MAX_OPEN
        self._ids: list[tuple[int, int]] = []
        self._path: str | None = ""

    def __enter__(self) -> Cursor:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close every fd and go back to the root."""
        for fd in self._fds:
            if fd >= 0:
                os.close(fd)
        self.names.clear()
        self._fds.clear()
        self._ids.clear()
        self._path = ""

    @property
    def fd(self) -> int:
        return self._fds[-1] if self._fds else self.root_fd

    @property
    def depth(self) -> int:
        return len(self.names)

    @property
    def path(self) -> str:
        if self._path is None:
            self._path = "/".join(self.names)
        return self._path

    @property
    def ident(self) -> tuple[int, int] | None:
        """(device, inode) of the current directory; None at the root."""
        return self._ids[-1] if self._ids else None

    def down(self, name: str) -> int:
        """Enter the directory ``name`` of the current one (OSError if it is not one: ELOOP for a symlink)."""
        fd = os.open(name, DIR_FLAGS, dir_fd=self.fd)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        self.names.append(name)
        self._fds.append(fd)
        self._ids.append((st.st_dev, st.st_ino))
        self._path = None
        if len(self._fds) > MAX_OPEN:
            old = len(self._fds) - MAX_OPEN - 1
            if self._fds[old] >= 0:
                os.close(self._fds[old])
                self._fds[old] = -1
        return fd

    def next(self, pending: list[tuple[int, str]]) -> bool:
        """Go to the next directory of a depth-first walk: ``pending`` holds (depth of its parent,
        name), last out first.  One removed or replaced since it was listed is skipped.  False when
        none is left."""
        while pending:
            parent_depth, name = pending.pop()
            while self.depth > parent_depth:
                self.up()
            try:
                self.down(name)
                return True
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
        return False

    def up(self) -> int:
        """Go to the parent directory (reopened through "..", and checked, if its fd was closed)."""
        fd = self._fds.pop()
        self.names.pop()
        self._ids.pop()
        self._path = None
        try:
            if self._fds and self._fds[-1] < 0:
                parent = os.open("..", DIR_FLAGS, dir_fd=fd)
                st = os.fstat(parent)
                if (st.st_dev, st.st_ino) != self._ids[-1]:
                    os.close(parent)
                    raise TreeChanged(f"{display('/'.join(self.names))} was moved or replaced while it was read",
                                      hint="make sure nothing else changes it, and try again")
                self._fds[-1] = parent
        except BaseException:
            self.close()
            raise
        finally:
            os.close(fd)
        return self.fd

    def goto(self, path: str) -> int:
        """Move to the directory at ``path`` ("" is the root); its fd.  ``Unreachable`` if a component
        is missing, not a directory or a symlink (the cursor is then at its deepest directory)."""
        current = self.path
        if path == current:
            return self.fd
        common = _common(current, path)
        keep = path[:common].count("/") + 1 if common else 0
        while len(self.names) > keep:
            self.up()
        rest = path[common + 1:] if common else path
        if rest:
            for name in rest.split("/"):
                try:
                    self.down(name)
                except OSError as exc:
                    if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                        raise
                    symlink = False
                    if exc.errno != errno.ENOENT:
                        with contextlib.suppress(OSError):
                            symlink = stat.S_ISLNK(os.stat(name, dir_fd=self.fd, follow_symlinks=False).st_mode)
                    raise Unreachable(join(self.path, name), symlink, exc.errno or 0) from None
        self._path = path
        return self.fd

    def lstat(self, path: str) -> os.stat_result | None:
        """lstat of root/path; None if it or a parent is missing, or a parent is not a real directory."""
        parent, _, name = path.rpartition("/")
        try:
            fd = self.goto(parent)
        except Unreachable:
            return None
        try:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None


# --- walking --------------------------------------------------------------------------------


def walk(root_fd: int, *, limit: int | None = None) -> Iterator[tuple[Cursor, str, os.stat_result]]:
    """Every entry below ``root_fd`` (depth first, no order among siblings) as (cursor at its
    directory, its name, its lstat).  ``cursor.path`` is the directory's path; do not move the
    cursor.  Directories are entered after they are yielded; symlinks are never followed; an
    entry removed meanwhile is skipped.  ``TooMany`` past ``limit`` entries."""
    seen = 0
    pending: list[tuple[int, str]] = []  # (depth of its parent, name) of each directory still to enter
    with Cursor(root_fd) as cursor:
        while True:
            fd, depth, subdirs = cursor.fd, cursor.depth, []
            with os.scandir(fd) as entries:
                for entry in entries:
                    seen += 1
                    if limit is not None and seen > limit:
                        raise TooMany(f"more than {limit} entries", hint="a tree this large is not read")
                    try:
                        st = os.stat(entry.name, dir_fd=fd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    yield cursor, entry.name, st
                    if stat.S_ISDIR(st.st_mode):
                        subdirs.append(entry.name)
            pending.extend((depth, name) for name in reversed(subdirs))
            if not cursor.next(pending):
                return


def setid_files(root: str | os.PathLike[str], *, limit: int | None = None) -> list[str]:
    """The paths of the regular files with a setuid or setgid bit below the directory ``root``
    (which is opened following symlinks; nothing below it is), however deep; sorted."""
    found = []
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for cursor, name, st in walk(root_fd, limit=limit):
            if stat.S_ISREG(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                found.append(join(cursor.path, name))
    finally:
        os.close(root_fd)
    return sorted(found)


# --- removing -------------------------------------------------------------------------------


def _writable(fd: int) -> None:
    """Make the directory on ``fd`` writable and searchable by its owner (root needs none of it)."""
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    os.fchmod(fd, mode | 0o700)


def _unlink(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except PermissionError:
        _writable(dir_fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)


def _rmdir(dir_fd: int, name: str) -> None:
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except PermissionError:
        _writable(dir_fd)
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(name, dir_fd=dir_fd)


def _enter(cursor: Cursor, name: str, dev: int) -> bool:
    """Enter the subdirectory ``name`` to remove its contents; False if it is no longer a directory
    (it was then removed as a file) or gone.  A directory on another device is refused."""
    try:
        cursor.down(name)
    except PermissionError:
        # no read or search permission (not root): make it the owner's, through an fd to that very
        # directory (an O_PATH fd's /proc link), never through a name that could become a symlink
        fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cursor.fd)
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
            os.chmod(f"/proc/self/fd/{fd}", mode | 0o700)
        finally:
            os.close(fd)
        cursor.down(name)
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        _unlink(cursor.fd, name)
        return False
    ident = cursor.ident
    if ident is not None and ident[0] != dev:
        cursor.up()
        raise OSError(errno.EXDEV, f"{display(join(cursor.path, name))} is a mount point, not removed")
    return True


def _clear(fd: int) -> list[str]:
    """Remove every non-directory in the directory on ``fd``; return the names of its subdirectories."""
    subdirs = []
    with os.scandir(fd) as entries:
        for entry in entries:
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if is_dir:
                subdirs.append(entry.name)
            else:
                _unlink(fd, entry.name)
    return subdirs


def remove(parent_fd: int, name: str) -> None:
    """Remove ``name`` in the directory on ``parent_fd``: a file, or a directory and everything in it,
    however deep or large; never following a symlink, never crossing into another filesystem (OSError
    EXDEV), and making directories writable first where permissions stand in the way.  Absent is fine."""
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        _unlink(parent_fd, name)
        return
    with Cursor(parent_fd) as cursor:
        if not _enter(cursor, name, st.st_dev):
            return
        pending = [_clear(cursor.fd)]  # per level: the subdirectories still to remove
        again = 0
        while pending:
            if pending[-1]:
                sub = pending[-1].pop()
                if _enter(cursor, sub, st.st_dev):
                    pending.append(_clear(cursor.fd))
                continue
            pending.pop()
            here = cursor.names[-1]
            cursor.up()
            try:
                _rmdir(cursor.fd, here)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or again >= CLEAR_AGAIN:
                    raise
                again += 1  # something wrote into it meanwhile: clear it again
                if _enter(cursor, here, st.st_dev):
                    pending.append(_clear(cursor.fd))
