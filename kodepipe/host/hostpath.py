"""Host paths that kp-run (root) opens or mounts, resolved without the agent's symlinks.

kp-run runs as root, and an agent can leave anything in a workspace: a
``.git`` that is a symlink to /etc, ``.git/hooks`` -> /root/.ssh, a ``.env``
that is a link.  A path string handed to ``open`` or ``mount`` is resolved by
the kernel when it is used, following every symlink on the way, so checking
a path first and using it later is a race an agent (or a second run on the
same workspace) can win.  Everything here works on file descriptors instead:

- ``open_beneath(root_fd, rel)`` opens a workspace-relative path with
  ``openat2(RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH)`` (syscall 437, Linux
  5.6), or, where that is missing, one component at a time with
  ``O_PATH | O_NOFOLLOW``; a symlink anywhere, the last component
  included, or a ``..`` is ``UnsafePath``.
- ``open_host(path)`` opens a path the user named (a ``--secret``) from
  ``/`` one component at a time, and follows a symlink only if root alone
  could have made it: the link is root's, and so is every directory from
  ``/`` to it, none writable by anyone else (``/lib -> usr/lib``, or a
  ``/home`` an administrator moved).  No agent can make such a link: every
  file it makes belongs to the invoking user or to kodepipe's unprivileged
  id range, never to root.
- ``Staging`` hands an fd to Podman: Podman (and runc) take a bind mount's
  source as a path, and kp-run's own ``/proc/self/fd/N`` means nothing to
  the Podman service.  So kp-run bind-mounts the fd itself (``mount(2)`` of
  ``/proc/self/fd/N``, which names the very file the fd holds, whatever
  happened to its path since) onto a file or directory in the run's private
  folder, read-only, and gives Podman that path: there is nothing left to
  race.  The staging mounts are removed as soon as the container has its
  own (``close``), and they are read-only, so a clean-up that met one
  could not write through it.
- ``verify_mounts(pid, expected)`` checks, after the container is created
  and before it starts, that each path in it (the workspace, each
  read-only bind, each mask) is a mount point holding the very file kp-run
  meant (device and inode), read-only where it must be: runc resolves a
  mount's destination in the container when it mounts it, and a second
  agent working in the same workspace could have moved a directory
  meanwhile.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from kodepipe.core.errors import BadInput, KpError

SYS_OPENAT2 = 437  # the same number on every architecture (the unified syscall table)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
MAX_LINKS = 40  # symlinks open_host follows in one path, as the kernel does

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND = 1, 2, 4, 32, 4096
MNT_DETACH = 2


class UnsafePath(KpError):
    """A path kp-run would have had to resolve through a symlink it cannot trust."""

    code = "unsafe_path"


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc: ctypes.CDLL | None = None
_openat2_works: bool | None = None  # None: not tried yet


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def check_rel(rel: str) -> list[str]:
    """The components of a workspace-relative path; UnsafePath if it is empty, absolute, or has
    empty, "." or ".." components (nothing kp-run resolves may climb out of the workspace)."""
    parts = rel.split("/")
    if not rel or "\0" in rel or any(p in ("", ".", "..") for p in parts):
        raise UnsafePath(f"refusing the path {rel[:300]!r}: it is empty, absolute, or has empty, '.' or "
                         "'..' components")
    return parts


def _openat2(dir_fd: int, rel: str, flags: int) -> int | None:
    """openat2 with no symlinks and nothing outside dir_fd; None where the kernel (or a seccomp
    filter around kp-run) does not have it."""
    global _openat2_works
    if _openat2_works is False:
        return None
    how = _OpenHow(flags=flags, mode=0, resolve=RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_BENEATH)
    fd = _lib().syscall(SYS_OPENAT2, dir_fd, os.fsencode(rel), ctypes.byref(how), ctypes.sizeof(how))
    if fd >= 0:
        _openat2_works = True
        return int(fd)
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EPERM) and not _openat2_works:
        _openat2_works = False
        return None
    raise OSError(err, os.strerror(err), rel)


def _symlink_error(rel: str, at: str) -> UnsafePath:
    where = "" if at == rel else f" ({at} is one)"
    return UnsafePath(f"{rel}: a symbolic link on the way{where}: kp-run, as root, follows no link in a "
                      "workspace (an agent may have left it)",
                      hint="look at it; remove the link if you did not make it")


def _is_symlink(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def open_beneath(root_fd: int, rel: str, flags: int = os.O_PATH, *, fallback: bool = False) -> int:
    """An fd of root/rel (``flags``, with O_NOFOLLOW and O_CLOEXEC added) reached without following
    any symlink, the last component included, and without leaving the directory on ``root_fd``.

    UnsafePath for a symlink on the way, or a path that is absolute or climbs with "..";
    FileNotFoundError, NotADirectoryError and the like pass through.  ``fallback`` forces the
    component-by-component walk (tests)."""
    parts = check_rel(rel)
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC
    fd: int | None = None
    if not fallback:
        try:
            fd = _openat2(root_fd, rel, flags)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _symlink_error(rel, rel) from None
            if exc.errno == errno.EXDEV:
                raise UnsafePath(f"{rel}: resolves outside the directory it must stay in") from None
            raise
    if fd is None:
        fd = _walk(root_fd, parts, rel, flags)
    try:
        if stat.S_ISLNK(os.fstat(fd).st_mode):  # O_PATH | O_NOFOLLOW opens the link itself
            raise _symlink_error(rel, rel)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _walk(root_fd: int, parts: list[str], rel: str, flags: int) -> int:
    cur = root_fd
    try:
        for i, name in enumerate(parts):
            last = i == len(parts) - 1
            try:
                fd = os.open(name, flags if last else os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=cur)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_symlink(cur, name):
                    raise _symlink_error(rel, "/".join(parts[:i + 1])) from None
                raise
            if cur != root_fd:
                os.close(cur)
            cur = fd
        return cur
    except BaseException:
        if cur != root_fd:
            os.close(cur)
        raise


def _root_only(st: os.stat_result) -> bool:
    """Root's, and writable by nobody else."""
    return st.st_uid == 0 and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def open_host(path: str | os.PathLike[str], flags: int = os.O_RDONLY) -> int:
    """An fd of the host path ``path`` (absolute, or relative to the working directory), opened with
    ``flags`` and O_CLOEXEC.  A symlink is followed only if root alone could have made it: the link
    and every directory from / to it are root's and writable by no one else; any other symlink on
    the way, the last component included, is UnsafePath."""
    text = os.fsdecode(os.path.abspath(os.fspath(path)))
    todo = [p for p in text.split("/") if p not in ("", ".")]
    todo.reverse()
    top = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    cur, trusted, links = os.dup(top), True, 0
    done: list[str] = []
    try:
        while todo:
            name = todo.pop()
            if name == "..":
                parent = os.open("..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=cur)
                os.close(cur)
                cur = parent
                trusted = trusted and _root_only(os.fstat(cur))
                if done:
                    done.pop()
                continue
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
            st = os.fstat(fd)
            done.append(name)
            if stat.S_ISLNK(st.st_mode):
                try:
                    if not (trusted and st.st_uid == 0):  # (a link's own mode is always 0777)
                        raise UnsafePath(
                            f"{text}: /{'/'.join(done)} is a symbolic link that someone other than root could have "
                            "made, and kp-run (root) does not follow it",
                            hint=f"name the file it leads to, if you trust it (realpath {text})")
                    links += 1
                    if links > MAX_LINKS:
                        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), text)
                    target = os.readlink(name, dir_fd=cur)
                finally:
                    os.close(fd)
                done.pop()
                parts = [p for p in target.split("/") if p not in ("", ".")]
                todo.extend(reversed(parts))
                if target.startswith("/"):
                    os.close(cur)
                    cur, trusted, done = os.dup(top), True, []
                continue
            if todo and not stat.S_ISDIR(st.st_mode):
                os.close(fd)
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), text)
            os.close(cur)
            cur = fd
            trusted = trusted and _root_only(st)
        # reopen the very file held (a /proc/self/fd link names it, whatever its path is now)
        return os.open(f"/proc/self/fd/{cur}", flags | os.O_CLOEXEC)
    finally:
        os.close(cur)
        os.close(top)


def open_secret(src: str | os.PathLike[str], *, max_bytes: int = 64 << 20) -> BinaryIO:
    """A --secret file opened for reading through one fd opened by ``open_host``: never through a
    symlink anyone but root could have left, only a regular file, and at most ``max_bytes`` long
    when it was opened (the caller stops reading there too)."""
    try:
        held = open_host(src, os.O_PATH)
    except UnsafePath as exc:
        raise BadInput(f"--secret {src}: {exc.args[0]}", hint=exc.hint) from None
    except OSError as exc:
        raise BadInput(f"--secret {src}: {exc.strerror}") from None
    try:
        st = os.fstat(held)
        if not stat.S_ISREG(st.st_mode):  # checked before it is opened: a fifo or a device is never read
            raise BadInput(f"--secret {src}: not a regular file")
        if st.st_size > max_bytes:
            raise BadInput(f"--secret {src}: larger than {max_bytes >> 20} MiB")
        try:
            fd = os.open(f"/proc/self/fd/{held}", os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as exc:
            raise BadInput(f"--secret {src}: {exc.strerror}") from None
    finally:
        os.close(held)
    return os.fdopen(fd, "rb")


def read_secret(src: str | os.PathLike[str], *, max_bytes: int = 64 << 20) -> bytes:
    """A --secret file's bytes, read as ``open_secret`` opens it (for the VM backend, which sends them)."""
    with open_secret(src, max_bytes=max_bytes) as source:
        data = source.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise BadInput(f"--secret {src}: larger than {max_bytes >> 20} MiB")
    return data


def copy_secret(src: str | os.PathLike[str], dest: Path, *, max_bytes: int = 64 << 20) -> None:
    """Copy a --secret file into kodepipe's folder, read as ``open_secret`` opens it."""
    with open_secret(src, max_bytes=max_bytes) as source:
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o400)
        with os.fdopen(out, "wb") as target:
            copied = 0
            while chunk := source.read(1 << 20):
                copied += len(chunk)
                if copied > max_bytes:
                    raise BadInput(f"--secret {src}: larger than {max_bytes >> 20} MiB")
                target.write(chunk)


# --- handing an fd to Podman ----------------------------------------------------------------


def _mount(source: str | None, target: str, flags: int) -> None:
    res = _lib().mount(None if source is None else os.fsencode(source), os.fsencode(target), None,
                       ctypes.c_ulong(flags), None)
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def _umount(target: str) -> None:
    if _lib().umount2(os.fsencode(target), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # not (or no longer) a mount point
            raise OSError(err, os.strerror(err), target)


class Staging:
    """Read-only bind mounts of fds, at paths in a private folder of kp-run's (see the docstring)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.points: list[Path] = []

    def bind(self, fd: int) -> str:
        """A path whose contents are the file or directory on ``fd``, read-only, nosuid, nodev."""
        if not self.points:
            self.folder.mkdir(mode=0o700, exist_ok=True)
            os.chmod(self.folder, 0o700)
        point = self.folder / str(len(self.points))
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            point.mkdir(mode=0o700)
        else:
            os.close(os.open(point, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o400))
        self.points.append(point)
        _mount(f"/proc/self/fd/{fd}", str(point), MS_BIND)
        _mount(None, str(point), MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
        return str(point)

    def close(self) -> None:
        """Remove the staging mounts (the container keeps its own); idempotent."""
        while self.points:
            point = self.points.pop()
            with contextlib.suppress(OSError):
                _umount(str(point))
                if point.is_dir():
                    point.rmdir()
                else:
                    point.unlink()
        with contextlib.suppress(OSError):
            self.folder.rmdir()


# --- read-only in place, in a mount namespace of one's own (QEMU's share) ---------------------

SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442  # the unified syscall table
CLONE_NEWNS, MS_REC, MS_PRIVATE = 0x00020000, 0x4000, 1 << 18
OPEN_TREE_CLONE, AT_EMPTY_PATH = 1, 0x1000
MOVE_MOUNT_F_EMPTY_PATH, MOVE_MOUNT_T_EMPTY_PATH = 0x4, 0x40
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


@dataclass(frozen=True)
class InPlace:
    """Entries below the directory ``root`` to make read-only where they are, each named by its
    path relative to ``root`` and the (device, inode) it had when it was surveyed."""

    root: str
    root_id: tuple[int, int]
    entries: tuple[tuple[str, int, int], ...]

    @classmethod
    def of(cls, root: Path, root_fd: int, rels: Iterable[str]) -> InPlace:
        entries = []
        for rel in rels:
            fd = open_beneath(root_fd, rel)
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
            entries.append((rel, st.st_dev, st.st_ino))
        st = os.fstat(root_fd)
        return cls(str(root), (st.st_dev, st.st_ino), tuple(entries))


def _sys(number: int, *args: object) -> int:
    res = int(_lib().syscall(number, *args))
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return res


def private_namespace() -> None:
    """Move the calling process into a mount namespace of its own, whose mounts propagate nowhere."""
    if _lib().unshare(CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNS): {os.strerror(err)}")
    _mount(None, "/", MS_REC | MS_PRIVATE)


def read_only_in_place(spec: InPlace) -> None:
    """Bind each entry of ``spec`` read-only, nosuid and nodev over itself, in the caller's own mount
    namespace (``private_namespace`` first).  Each is opened again here, beneath ``spec.root`` and
    without following a symlink, and must still be the very file that was surveyed: OSError if not,
    so nothing is left writable that was meant read-only.  A mount point cannot be renamed, replaced
    or removed (EBUSY), and nothing under it can be written (EROFS)."""
    root_fd = os.open(spec.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = os.fstat(root_fd)
        if (st.st_dev, st.st_ino) != spec.root_id:
            raise OSError(errno.ESTALE, f"{spec.root} changed since it was surveyed")
        attr = _MountAttr(attr_set=MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
        for rel, dev, ino in spec.entries:
            fd = open_beneath(root_fd, rel)
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != (dev, ino):
                    raise OSError(errno.ESTALE, f"{rel} changed since it was surveyed")
                tree = _sys(SYS_OPEN_TREE, fd, b"", OPEN_TREE_CLONE | os.O_CLOEXEC | AT_EMPTY_PATH)
                try:
                    _sys(SYS_MOUNT_SETATTR, tree, b"", AT_EMPTY_PATH, ctypes.byref(attr), ctypes.sizeof(attr))
                    _sys(SYS_MOVE_MOUNT, tree, b"", fd, b"", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH)
                finally:
                    os.close(tree)
            finally:
                os.close(fd)
    finally:
        os.close(root_fd)


# --- checking the container's mounts ----------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    """A path in the container that must be a mount point holding the file (dev, ino)."""

    dest: str
    dev: int
    ino: int
    read_only: bool

    @classmethod
    def of(cls, dest: str, fd: int, read_only: bool) -> Expect:
        st = os.fstat(fd)
        return cls(dest, st.st_dev, st.st_ino, read_only)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), os.fsencode(field)))


def mount_points(pid: int) -> dict[str, list[str]]:
    """{mount point (as the process sees it): per-mount options of the topmost mount there}."""
    found: dict[str, list[str]] = {}
    with open(f"/proc/{pid}/mountinfo", "rb") as info:
        for line in info:
            fields = line.decode("utf-8", "surrogateescape").split(" ")
            if len(fields) >= 6:
                found[_unescape(fields[4])] = fields[5].split(",")
    return found


def expect_tree(root_fd: int, dest: str, read_only: bool, masks: Iterable[str], mask_file: str | None) -> list[Expect]:
    """What the container must show: the tree on ``root_fd`` at ``dest``, and each mask (a path
    relative to it) covered by ``mask_file``, read-only."""
    out = [Expect.of(dest, root_fd, read_only)]
    masks = list(masks)
    if masks and mask_file is not None:
        fd = os.open(mask_file, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            out += [Expect.of(f"{dest}/{rel}", fd, True) for rel in masks]
        finally:
            os.close(fd)
    return out


def open_workspace(path: Path) -> int:
    """An fd of the workspace directory (resolved already): ``open_host``, as a usage error."""
    try:
        return open_host(path, os.O_RDONLY | os.O_DIRECTORY)
    except UnsafePath as exc:
        raise BadInput(f"workspace {path}: {exc.args[0]}", hint=exc.hint) from None
    except OSError as exc:
        raise BadInput(f"workspace {path}: {exc.strerror}") from None


def verify_mounts(pid: int, expected: Iterable[Expect]) -> list[str]:
    """What is wrong with the mounts of process ``pid`` (the container's first process, created but
    not started), one line per expected mount; empty if every one is as kp-run meant it."""
    from kodepipe.core.terminal import escape  # the paths name the agent's files

    wanted = list(expected)
    if not wanted:
        return []
    points = mount_points(pid)
    root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    problems = []
    try:
        for exp in wanted:
            try:
                fd = open_beneath(root, exp.dest.strip("/"))
            except (OSError, UnsafePath) as exc:
                problems.append(f"{escape(exp.dest)}: {exc.args[0] if isinstance(exc, KpError) else exc.strerror}")
                continue
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
            if (st.st_dev, st.st_ino) != (exp.dev, exp.ino):
                problems.append(f"{escape(exp.dest)} is not the file kp-run bound there")
            elif exp.dest not in points:
                problems.append(f"{escape(exp.dest)} is not a mount point")
            elif exp.read_only and "ro" not in points[exp.dest]:
                problems.append(f"{escape(exp.dest)} is not read-only")
    finally:
        os.close(root)
    return problems
