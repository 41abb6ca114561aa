"""A warm image's RAM, shared copy-on-write by all its clones.

kp-image warm runs the machine it saves on guest RAM that is a memfd it
holds (``share=on``), and saves it with QEMU's ``x-ignore-shared``
migration capability: warm.state then holds the devices alone, and the
RAM goes to ``warm.ram`` beside it, its zero pages left as holes.

A warm clone resumes with its RAM mapped privately (``share=off``) from
one memfd that holds warm.ram.  A page the clone never writes stays the
memfd's, the same page for every clone; a page it writes is copied for it
alone.  So N idle clones cost about one copy of what the guests read, not
N, and a resume copies no RAM.

The memfd is sealed (no write, no resize, no unsealing) before any QEMU
sees it: QEMU 7.2 opens a file backend read-write even when it maps it
privately, and a QEMU that its guest took over must not be able to change
what the next clone wakes up in.

One keeper process per warm state holds the memfd and hands it out over a
unix socket in kodepipe's runtime directory (SCM_RIGHTS).  kp-boot starts
it when nobody answers there, under a lock, and checks what it receives
(a memfd, sealed, of the guest's size).  The keeper runs as kodepipe's
user, never as QEMU's, and on the standard library alone (``python -S``).
It ends once no process has mapped its memfd for ``IDLE`` seconds, or when
warm.ram is replaced or removed (kp-image warm --force, kp-rm of the
image): running clones keep their mappings, which hold the memory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RAM_FILE = "warm.ram"
MEMFD_NAME = "kp-warm-ram"
IDLE = 60.0  # seconds the keeper lives on with no clone mapping its memfd and nobody asking
CHECK = 5.0  # how often it looks
START_BOUND = 120.0  # how long kp-boot waits for a keeper to load warm.ram and answer
SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
CHUNK = 1 << 20
BACKEND_ID = "pc.ram"  # the id QEMU gives the RAM of -m: states saved either way load into both


def shared(image: dict[str, Any]) -> bool:
    """Whether ``image``'s warm state keeps its RAM apart (warm.ram), for clones to share."""
    warm = image.get("warm")
    return isinstance(warm, dict) and isinstance(warm.get("ram"), str)


def qemu_args(fd: int, memory: str, *, share: bool) -> list[str]:
    """The guest's RAM as the file behind inherited ``fd`` (QEMU opens it again by /proc/self/fd)."""
    return ["-object", f"memory-backend-file,id={BACKEND_ID},size={memory},mem-path=/proc/self/fd/{fd},"
                       f"share={'on' if share else 'off'}",
            "-machine", f"memory-backend={BACKEND_ID}"]


# -- warming ----------------------------------------------------------------------------------------


def template(size: int) -> int:
    """An empty memfd of ``size`` bytes for the machine kp-image warm saves, which writes it (share=on).
    Close-on-exec: QEMU inherits it through pass_fds only."""
    fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_sparse(source: int, target: Path) -> int:
    """Copy memfd ``source`` into a new file ``target`` of its size, leaving its never-written and its
    all-zero chunks as holes.  Returns the bytes written (what the file takes on disk)."""
    size = os.fstat(source).st_size
    zero = bytes(CHUNK)
    written = 0
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        for start, end in _extents(source, size):
            for offset in range(start, end, CHUNK):
                data = os.pread(source, min(CHUNK, end - offset), offset)
                if data != zero[:len(data)]:
                    os.pwrite(fd, data, offset)
                    written += len(data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def _extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The data extents of ``fd`` (SEEK_DATA/SEEK_HOLE), or the whole file where they are not known."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == 6:  # ENXIO: no data past offset
                return
            yield offset, size  # not supported here: read it all
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end
        offset = end


# -- a clone's side: obtaining the memfd --------------------------------------------------------------


def obtain(image: dict[str, Any]) -> int:
    """The sealed memfd holding ``image``'s warm RAM, from its keeper (started here when none answers).
    The caller closes it once QEMU holds its own copy."""
    from kodepipe.core import paths, units
    from kodepipe.core.errors import KpError

    warm = image["warm"]
    ram = Path(str(image["path"])) / str(warm["ram"])
    size = units.parse_size(str(warm["memory"]))
    where = paths.socket_path(f"ram-{warm['id']}", "sock")
    deadline = time.monotonic() + START_BOUND
    while True:
        try:
            fd = _ask(where)
            if fd is None:
                with _locked(where.with_suffix(".lock")):
                    fd = _ask(where)
                    if fd is None:  # nobody listens: start one (a live keeper's socket is never taken over)
                        fd = _start(ram, where)
            break
        except _Busy as exc:
            if time.monotonic() > deadline:
                raise KpError(f"the keeper of the warm RAM {ram} did not hand it over: {exc}",
                              code="resume_failed", hint="try again") from None
            time.sleep(0.1)
    try:
        _check(fd, size)
    except KpError:
        os.close(fd)
        raise
    return fd


def _check(fd: int, size: int) -> None:
    """What a keeper handed over is a memfd of the guest's size that nothing can write any more."""
    from kodepipe.core.errors import KpError

    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0  # not a memfd
    if seals & SEALS != SEALS or os.fstat(fd).st_size != size:
        raise KpError("the warm RAM's keeper handed over something other than the sealed RAM of this warm state",
                      code="resume_failed", hint="kill the process listening on its socket and boot again")


class _Busy(Exception):
    """A keeper listens but did not hand the memfd over (its queue full, or slow): not a dead one."""


def _ask(where: Path) -> int | None:
    """The memfd from the keeper listening at ``where``; None when nobody listens there (no socket, or
    one whose keeper is gone).  _Busy when one listens and did not answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as conn:
            conn.settimeout(10.0)
            conn.connect(os.fspath(where))
            _pid, uid, _gid = _peer(conn)
            if uid not in (os.geteuid(), 0):
                raise _Busy(f"the socket {where} is not kodepipe's own keeper's")
            fds = _receive(conn)
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    except OSError as exc:
        raise _Busy(str(exc)) from None
    if not fds:
        raise _Busy("the keeper handed nothing over")
    for extra in fds[1:]:
        os.close(extra)
    return fds[0]


def _receive(conn: socket.socket) -> list[int]:
    """The fds of one message, close-on-exec from the start (socket.recv_fds leaves them inheritable)."""
    import array

    ints = array.array("i")
    _msg, ancillary, _flags, _addr = conn.recvmsg(16, socket.CMSG_SPACE(4 * ints.itemsize), socket.MSG_CMSG_CLOEXEC)
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            ints.frombytes(data[:len(data) - len(data) % ints.itemsize])
    return list(ints)


def _peer(conn: socket.socket) -> tuple[int, int, int]:
    import struct

    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _start(ram: Path, where: Path) -> int:
    """Start the keeper of ``ram`` listening at ``where`` and take the memfd from it."""
    from kodepipe.core import proc
    from kodepipe.core.errors import KpError

    log = where.with_suffix(".log")
    where.unlink(missing_ok=True)  # a dead keeper's: under the lock, nobody else starts one
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        root = str(Path(__file__).resolve().parents[2])
        keeper = proc.daemon([sys.executable, "-S", "-m", "kodepipe.vm.warmram", str(ram), str(where)],
                             stderr=out, cwd="/", env={"PYTHONPATH": root, "PATH": os.defpath})
    finally:
        os.close(out)
    deadline = time.monotonic() + START_BOUND
    while True:
        with contextlib.suppress(_Busy):
            fd = _ask(where)
            if fd is not None:
                return fd
        if keeper.poll() is not None or time.monotonic() > deadline:
            if keeper.poll() is None:
                keeper.kill()
            try:
                why = proc.tail(log.read_text(errors="replace"), 3)
            except OSError:
                why = ""
            raise KpError(f"the keeper of the warm RAM {ram} did not start: {why or 'no message'}",
                          code="resume_failed")
        time.sleep(0.05)


# -- the keeper -----------------------------------------------------------------------------------


def load(ram: Path) -> tuple[int, os.stat_result]:
    """A memfd holding ``ram``'s bytes (holes stay holes), sealed for good; and what the file it read was."""
    src = os.open(ram, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        loaded = os.fstat(src)
        size = loaded.st_size
        fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        for start, end in _extents(src, size):
            for offset in range(start, end, CHUNK):
                os.pwrite(fd, os.pread(src, min(CHUNK, end - offset), offset), offset)
    finally:
        os.close(src)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    return fd, loaded


def mapped(inode: int, memfd_dev: int, first: str | None = None) -> str | None:
    """A process that maps the memfd ``inode`` (a QEMU resumed from it), or None.  ``first``: the pid
    that did last time, looked at before all the others (a clone runs for a while)."""
    dev = f"{os.major(memfd_dev):02x}:{os.minor(memfd_dev):02x}"
    needle = f" {dev} {inode} ".encode()
    pids = os.listdir("/proc")
    for pid in ([first] if first else []) + pids:
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/maps", "rb") as maps:
                if any(needle in line and MEMFD_NAME.encode() in line for line in maps):
                    return pid
        except OSError:
            continue
    return None


def keep(ram: Path, where: Path) -> int:
    """Load ``ram``, listen at ``where``, hand the memfd to whoever asks; end when idle or outdated."""
    fd, identity = load(ram)
    info = os.fstat(fd)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    server.bind(os.fspath(where))
    os.chmod(where, 0o600)
    bound = os.stat(where)  # its own socket file: the only one it ever removes
    server.listen(128)
    server.settimeout(CHECK)
    last_asked = time.monotonic()
    user: str | None = None  # a process that mapped it when last looked
    while True:
        try:
            conn, _ = server.accept()
        except TimeoutError:
            conn = None
        if conn is not None:
            with conn:
                _pid, uid, _gid = _peer(conn)
                if uid in (os.geteuid(), 0):
                    with contextlib.suppress(OSError):
                        socket.send_fds(conn, [b"ram"], [fd])
            last_asked = time.monotonic()
            continue
        try:
            now = os.stat(ram, follow_symlinks=False)
            outdated = (now.st_ino, now.st_dev) != (identity.st_ino, identity.st_dev)
        except FileNotFoundError:
            outdated = True
        if not outdated and time.monotonic() - last_asked > IDLE:
            user = mapped(info.st_ino, info.st_dev, user)
        if outdated or (time.monotonic() - last_asked > IDLE and user is None):
            # under kp-boot's lock: one that found nobody answering starts the next keeper only after this
            # one has let go of the socket's name
            with _locked(where.with_suffix(".lock")):
                server.close()
                with contextlib.suppress(FileNotFoundError):
                    now_there = os.stat(where)
                    if (now_there.st_ino, now_there.st_dev) == (bound.st_ino, bound.st_dev):
                        where.unlink()
                with contextlib.suppress(FileNotFoundError):
                    where.with_suffix(".log").unlink()  # its own stderr: nothing went wrong
            return 0


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: python -S -m kodepipe.vm.warmram WARM_RAM SOCKET\n")
        return 2
    try:
        return keep(Path(argv[0]), Path(argv[1]))
    except OSError as exc:
        sys.stderr.write(f"warm RAM keeper: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
