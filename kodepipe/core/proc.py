"""Running external programs: the one place kodepipe starts processes (an import-linter contract
keeps ``subprocess`` out of every other module).

Three kinds of child: ``run`` (to completion), ``spawn`` (a child whose fate a clock decides: it dies
with kodepipe, even by SIGKILL) and ``daemon`` (a process that outlives the command on purpose, in
its own session: QEMU, passt, the Podman service, the serial-log keeper).  Every failure becomes a
KpError that names the program, its command line and the tail of what it printed, so an error
explains itself.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import IO, Any

from kodepipe.core.errors import CommandFailed, MissingProgram, Timeout

# what callers pass and get back, so that they need not import subprocess themselves
DEVNULL, PIPE, STDOUT = subprocess.DEVNULL, subprocess.PIPE, subprocess.STDOUT
Process = subprocess.Popen
Completed = subprocess.CompletedProcess
Expired = subprocess.TimeoutExpired
Stream = int | IO[Any] | None

# program -> Debian package that provides it, for the "install it" hint.
PACKAGES = {
    "qemu-img": "qemu-utils",
    "qemu-system-x86_64": "qemu-system-x86",
    "debootstrap": "debootstrap",
    "mmdebstrap": "mmdebstrap",
    "mkfs.ext4": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "unshare": "util-linux",
    "chroot": "coreutils",
    "podman": "podman",
    "runc": "runc",
    "tar": "tar",
    "strace": "strace",
    "ip": "iproute2",
    "git": "git",
    "setpriv": "util-linux",
}


def which(program: str) -> str | None:
    found = shutil.which(program)
    if found is None and not os.path.isabs(program):
        # root's PATH may lack the sbin directories when run from cron or sudo -E
        found = shutil.which(program, path="/usr/local/sbin:/usr/sbin:/sbin")
    return found


def require(program: str) -> str:
    """Return the path of ``program`` or raise MissingProgram with an install hint."""
    path = which(program)
    if path is None:
        package = PACKAGES.get(program, program)
        raise MissingProgram(f"{program} is not installed",
                             hint=f"install it with: apt-get install {package}")
    return path


def _die_with_parent(parent: int) -> None:
    """Runs in the child before exec: if kodepipe dies, even by SIGKILL, the child
    gets SIGKILL too, so no debootstrap or qemu-img outlives the command that
    started it (unshare --kill-child carries this on to a whole namespace)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def tail(text: str | bytes | None, lines: int = 15) -> str:
    if not text:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run(argv: Sequence[str | Path], *, timeout: float | None = None, cwd: Path | None = None,
        env: dict[str, str] | None = None, log: Path | None = None,
        input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """Run a program to completion and return its result.

    Output is captured (or appended to ``log`` when given, so a long build
    keeps a full record); a non-zero exit raises CommandFailed with the
    command line and the last lines of output, unless ``check`` is false
    (the caller reads the status itself).
    """
    args = [str(a) for a in argv]
    args[0] = require(args[0])
    if log is not None:
        with open(log, "ab") as out:
            out.write(f"$ {shlex.join(args)}\n".encode())
            out.flush()
            try:
                proc = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                                      if input is None else None, input=input, timeout=timeout, cwd=cwd,
                                      env=env, check=False, preexec_fn=partial(_die_with_parent, os.getpid()))
            except subprocess.TimeoutExpired as exc:
                raise Timeout(f"{Path(args[0]).name} did not finish within {timeout:g} s",
                              hint=f"see {log}") from exc
        if proc.returncode != 0 and check:
            logged = log.read_bytes()[-8192:]
            raise _failed(f"{shlex.join(args)} exited with status {proc.returncode}:\n{tail(logged)}")
        return proc
    try:
        proc = subprocess.run(args, capture_output=True, timeout=timeout, cwd=cwd, env=env, check=False,
                              stdin=subprocess.DEVNULL if input is None else None, input=input,
                              preexec_fn=partial(_die_with_parent, os.getpid()))
    except subprocess.TimeoutExpired as exc:
        raise Timeout(f"{shlex.join(args)} did not finish within {timeout:g} s") from exc
    if proc.returncode != 0 and check:
        output = tail(proc.stderr) or tail(proc.stdout)
        raise _failed(f"{shlex.join(args)} exited with status {proc.returncode}:\n{output}")
    return proc


def _failed(message: str) -> CommandFailed:
    """A program that failed on a full disk: the error says so, and what to do."""
    if "No space left on device" in message or "Disk quota exceeded" in message:
        return CommandFailed(message, code="no_space", hint="no space left (ENOSPC): free some space, then try again")
    return CommandFailed(message)


def spawn(argv: Sequence[str | Path], *, stdout: int | IO[Any] | None = subprocess.DEVNULL,
          stderr: int | IO[Any] | None = subprocess.DEVNULL,
          stdin: int | IO[Any] | None = subprocess.DEVNULL, cwd: Path | None = None,
          env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a program and return at once; the caller must wait for it or kill it.

    For a child whose fate is decided by a clock (a probe that may hang):
    like run(), it dies with kodepipe even if kodepipe is SIGKILLed.
    """
    args = [str(a) for a in argv]
    args[0] = require(args[0])
    return subprocess.Popen(args, stdin=stdin, stdout=stdout, stderr=stderr, cwd=cwd, env=env,
                            preexec_fn=partial(_die_with_parent, os.getpid()))


def daemon(argv: Sequence[str | Path], *, stdin: Stream = DEVNULL, stdout: Stream = DEVNULL,
           stderr: Stream = DEVNULL, pass_fds: Sequence[int] = (), cwd: str | Path | None = None,
           env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a program that outlives this command on purpose, in a session of its own, with no file
    descriptor but its three and ``pass_fds``.  ``argv[0]`` is looked up on PATH unless it is a
    path.  A program that cannot start raises CommandFailed (or MissingProgram)."""
    args = [str(a) for a in argv]
    if "/" not in args[0]:
        args[0] = require(args[0])
    try:
        return subprocess.Popen(args, stdin=stdin, stdout=stdout, stderr=stderr, pass_fds=tuple(pass_fds),
                                close_fds=True, start_new_session=True, cwd=cwd, env=env)
    except OSError as exc:
        raise CommandFailed(f"could not start {Path(args[0]).name}: {exc.strerror or exc}") from exc


def boot_id() -> str:
    """This boot of the host: pids and process states recorded in another boot mean nothing."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def tracer_of(pid: int) -> int | None:
    """The pid of the process that ptraces ``pid`` (as this pid namespace sees it), or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("TracerPid:"):
                return int(line.split()[1]) or None
    except (OSError, IndexError, ValueError):
        return None
    return None


class Foreign:
    """A process that is not this one's child, held by a pidfd: a signal never reaches a pid that was
    reused, and its end is seen on the pidfd.  It cannot be waited for, so its exit status is not
    known: ``returncode`` is 0 once it has ended.  Popen's interface, as far as it goes."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd = os.pidfd_open(pid)  # ProcessLookupError if it is gone already
        self.returncode: int | None = None

    def _ended(self, timeout: float | None) -> bool:
        import select

        if self.returncode is None and self.fd < 0:  # closed: nothing more can be learnt or sent
            return True
        if self.returncode is None:
            poller = select.poll()
            poller.register(self.fd, select.POLLIN)
            if poller.poll(None if timeout is None else int(timeout * 1000)):
                self.returncode = 0
        return self.returncode is not None

    def poll(self) -> int | None:
        self._ended(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended(timeout):
            raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
        return 0

    def send_signal(self, sig: int) -> None:
        """ProcessLookupError once it has ended (or its pidfd was closed)."""
        if self.fd < 0:
            raise ProcessLookupError(self.pid)
        signal.pidfd_send_signal(self.fd, sig)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.send_signal(signal.SIGKILL)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
