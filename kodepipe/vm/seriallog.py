"""The serial console's log, bounded: a guest that prints without end must not fill the host's disk.

QEMU's ``-chardev ...,logfile=FILE`` has no size limit, and a guest's root can write to its
serial port as fast as QEMU emulates it.  So QEMU never writes the log file itself.  Its
logfile is the write end of a pipe (``-add-fd fd=N,set=S`` and ``logfile=/dev/fdset/S``), and a
keeper process, started by kp-boot beside QEMU, copies what comes out of the pipe into
``serial.log``.  When serial.log holds CAP bytes it becomes ``serial.log.1`` (replacing the one
before) and a new serial.log begins: the log never takes more than 2 x CAP on disk, however
much the guest prints, and the last CAP bytes at least are always there.

The serial socket stays as it was (kp-attach's interactive console): QEMU gives a chardev one
backend, the socket, and logs what goes to it, connected or not.  Other designs were measured
and refused: a ``ringbuf`` chardev is bounded but lives in QEMU's memory (gone with a crashed
QEMU, whose last words matter most, and kp-attach would lose its socket); trimming the file
from kp-* commands bounds nothing while the guest floods and no command runs.

The keeper runs as QEMU's uid, never as root (kodepipe.vm.qemuuser): it opens serial.log and
serial.log.1 first, in the VM's folder, then drops.  Having dropped, it cannot rename in that
folder (root's), so it rotates by copying: serial.log's CAP bytes are copied over serial.log.1 and
serial.log is truncated (a reader following the log sees it shrink: kp-attach --follow reads the
rest of what it had from serial.log.1, then goes on from the start).  It never makes a file
after that, so once kp-rm removed the folder nothing can make it or its files exist again.

The keeper lives exactly as long as QEMU.  The pipe's write end is QEMU's alone (kp-boot closes
its copy once QEMU holds one), so the keeper reads end-of-file when QEMU exits, however it
ends, and exits too.  It never stops reading: when the disk is full or the folder is gone, what
it reads is dropped, so a guest cannot stall QEMU through its log.  (A keeper that is killed
leaves QEMU writing to a pipe nobody reads: QEMU ignores SIGPIPE, drops the log, and the VM
runs on.)  QEMU writes the log a byte at a time; the keeper reads in batches, pausing briefly
after a small read, so a flood costs it a few wake-ups a second, not one per byte.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CAP = 1 << 20  # bytes in serial.log before it becomes serial.log.1 (so at most 2 MiB on disk)
ROTATED = ".1"  # serial.log.1: the CAP bytes before serial.log's
FDSET = 9  # the -add-fd set QEMU's serial logfile is taken from
_CHUNK = 1 << 16
_BATCH = 0.02  # after a small read, let the pipe fill this long: one wake-up per batch, not per byte
_PIPE_SIZE = 1 << 20  # the most an unprivileged process may ask (fs.pipe-max-size): 1 MiB in flight
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def rotated(log: Path) -> Path:
    return log.with_name(log.name + ROTATED)


def files(log: Path) -> list[Path]:
    """The log's files that exist, oldest first (serial.log.1, then serial.log)."""
    return [path for path in (rotated(log), log) if path.is_file()]


def tail(log: Path, size: int) -> bytes:
    """The last ``size`` bytes the guest printed (across serial.log.1 and serial.log); never more
    than ``size`` bytes are read, and a file that is not a regular file is not read at all."""
    from kodepipe.core.errors import KpError
    from kodepipe.core.records import open_regular

    data = b""
    for path in reversed([rotated(log), log]):
        if len(data) >= size:
            break
        try:
            with open_regular(str(path), "the serial log") as handle:
                end = os.fstat(handle.fileno()).st_size
                want = min(end, size - len(data))
                handle.seek(end - want)
                data = handle.read(want) + data
        except (KpError, OSError):
            continue
    return data[-size:] if size else b""


def mark(log: Path) -> tuple[int, int]:
    """Where the log is now, as (inode, size), for ``grew``: (0, 0) when there is none yet."""
    try:
        st = os.stat(log)
    except OSError:
        return 0, 0
    return st.st_ino, st.st_size


def grew(log: Path, since: tuple[int, int]) -> bool:
    """Whether the guest printed anything since ``mark`` gave ``since``: serial.log is longer, shorter
    (the keeper copied it into serial.log.1 and began it again), or a new file (rotated away)."""
    inode, size = since
    try:
        st = os.stat(log)
    except OSError:
        return False
    return st.st_size != size or (inode != 0 and st.st_ino != inode)


# -- kp-boot's side: the pipe and the keeper ----------------------------------------------------


@contextlib.contextmanager
def pipe(log: Path, user: Any = None) -> Iterator[int]:
    """The write end of a pipe that a keeper copies into ``log`` (bounded), for QEMU to inherit
    (``pass_fds``) as its serial logfile (``qemu.command_line(serial_fd=...)``).  It is closed
    when the block ends: by then QEMU holds its own copy, or has failed to start and holds none,
    and the keeper ends with it.  ``user`` (a qemuuser.QemuUser): the keeper drops to its uid and
    gid once it has opened the log's files."""
    from kodepipe.core import proc  # here: the keeper itself runs under python -S on the stdlib alone

    read_end, write_end = os.pipe()  # both close-on-exec: only QEMU, through pass_fds, inherits one
    try:
        with contextlib.suppress(OSError):
            fcntl.fcntl(write_end, _F_SETPIPE_SZ, _PIPE_SIZE)
        root = str(Path(__file__).resolve().parents[2])
        # -S: no site-packages, so the keeper is a bare interpreter (~10 MB); it needs only the stdlib
        drop = [f"--user={user.uid}:{user.gid}"] if user is not None and user.uid != os.geteuid() else []
        proc.daemon([sys.executable, "-S", "-m", "kodepipe.vm.seriallog", str(log), *drop], stdin=read_end,
                    cwd="/", env={"PYTHONPATH": root, "PATH": os.defpath})
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    try:
        yield write_end
    finally:
        os.close(write_end)


# -- the keeper ---------------------------------------------------------------------------------


class Keeper:
    """Copies a pipe into a log file of at most ``cap`` bytes, rotating it into ``<log>.1``.

    Both files are opened (made if missing) when it starts, relative to the folder, never after:
    it may have dropped to a uid that cannot make files there, and once the folder is removed
    (kp-rm) nothing can make it or its files exist again.  A rotation copies the log over
    ``<log>.1`` and truncates the log.
    """

    def __init__(self, log: Path, cap: int = CAP) -> None:
        self.cap = cap
        self.dropped = 0
        folder = os.open(log.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            self.out: int = os.open(log.name, flags | os.O_APPEND, 0o644, dir_fd=folder)
            try:
                self.old: int = os.open(log.name + ROTATED, flags, 0o644, dir_fd=folder)
            except BaseException:
                os.close(self.out)
                raise
        finally:
            os.close(folder)
        self.size = os.fstat(self.out).st_size

    def _rotate(self) -> None:
        try:
            os.ftruncate(self.old, 0)
            done = 0
            while done < self.size:
                copied = os.copy_file_range(self.out, self.old, self.size - done, done, done)
                if not copied:
                    break
                done += copied
        except OSError:
            pass  # a full disk: serial.log.1 keeps less, the bound holds all the same
        with contextlib.suppress(OSError):
            os.ftruncate(self.out, 0)
            self.size = 0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.size >= self.cap:
                self._rotate()
                if self.size:  # it could not be truncated: drop rather than grow
                    self.dropped += len(view)
                    return
                continue
            piece = view[:self.cap - self.size]
            try:
                written = os.write(self.out, piece)
            except OSError:
                # a full disk (ENOSPC, EDQUOT) or a failing one: drop this, try again with the next
                self.dropped += len(view)
                with contextlib.suppress(OSError):
                    self.size = os.fstat(self.out).st_size
                return
            self.size += written
            view = view[written:]

    def run(self, source: int) -> None:
        while True:
            try:
                data = os.read(source, _CHUNK)
            except InterruptedError:
                continue
            if not data:
                return  # QEMU has exited: every write end is closed
            self.write(data)
            if len(data) < _CHUNK // 2:
                time.sleep(_BATCH)

    def close(self) -> None:
        os.close(self.out)
        os.close(self.old)


def drop(spec: str) -> None:
    """Become ``UID:GID`` for good (no supplementary groups): the keeper needs only its open files."""
    uid, gid = (int(part) for part in spec.split(":"))
    if os.geteuid() == 0 and uid != 0:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)


def main(argv: list[str]) -> int:
    user = [arg.split("=", 1)[1] for arg in argv[1:] if arg.startswith("--user=")]
    if not argv or len(argv) != 1 + len(user) or len(user) > 1:
        sys.stderr.write("usage: python -m kodepipe.vm.seriallog LOG [--user=UID:GID] < PIPE\n")
        return 2
    try:
        keeper = Keeper(Path(argv[0]))
    except OSError:
        if user:
            drop(user[0])
        # no folder to log into: still drain the pipe, so QEMU is never held up by its log
        while os.read(0, _CHUNK):
            time.sleep(_BATCH)
        return 1
    if user:
        drop(user[0])
    try:
        keeper.run(0)
    finally:
        keeper.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
