"""kp-run -t and -i inside a VM without a VM: the command started on a pty channel, the local terminal
relayed in raw mode and restored, window resizes forwarded, stdin copied with its end, the agent's
exit status (against tests/test_vmrun.py's scripted guest)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import shlex
import signal
import socket
import struct
import sys
import termios
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kodepipe.container import vmrun
from kodepipe.core.errors import KpError
from tests.test_vmrun import FakeGuest, job, request

BOUND = 30.0  # seconds: a generous bound on a condition, never a wait for one


def set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def wait_for(condition: Any) -> None:
    deadline = time.monotonic() + BOUND
    while not condition():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        time.sleep(0.01)


class FakeSession:
    """An exec channel's host end on a socketpair, with what paramiko's Channel adds to it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.closed = False
        self.eof_received = False
        self.status = -1
        self.resized: list[tuple[int, int]] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self, n: int) -> bytes:
        data = self.sock.recv(n)
        self.eof_received = self.eof_received or not data
        return data

    def recv_ready(self) -> bool:
        if self.eof_received or not select.select([self.sock], [], [], 0)[0]:
            return False
        if not self.sock.recv(1, socket.MSG_PEEK):
            self.eof_received = True
            return False
        return True

    def recv_stderr_ready(self) -> bool:
        return False

    def recv_stderr(self, n: int) -> bytes:
        return b""

    def send_ready(self) -> bool:
        return True

    def send(self, data: bytes) -> int:
        return self.sock.send(data)

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def shutdown_write(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def resize_pty(self, width: int, height: int) -> None:
        self.resized.append((width, height))

    def recv_exit_status(self) -> int:
        return self.status

    def close(self) -> None:
        self.closed = True
        self.sock.close()


class TerminalGuest(FakeGuest):
    """The guest's end of ``podman start --attach --interactive``: on a pty channel (-t) or a plain one (-i)."""

    def __init__(self, agent: Any) -> None:
        super().__init__()
        self.agent = agent
        self.opened: list[tuple[str, str | None, int, int]] = []
        self.session: FakeSession | None = None

    def _start(self, command: str) -> FakeSession:
        self.commands.append((command, b""))
        ours, theirs = socket.socketpair()
        self.session = FakeSession(ours)
        threading.Thread(target=self.agent, args=(self.session, theirs), daemon=True).start()
        return self.session

    def terminal(self, command: str, term: str, columns: int, rows: int) -> FakeSession:
        self.opened.append((command, term, columns, rows))
        return self._start(command)

    def open(self, command: str) -> FakeSession:  # type: ignore[override]
        self.opened.append((command, None, 0, 0))
        return self._start(command)


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, int]]:
    """A pty as the user's terminal (master, slave): kp-run relays the slave, the test types on the master."""
    master, slave = os.openpty()
    set_size(slave, 40, 132)

    @contextlib.contextmanager
    def local() -> Iterator[tuple[int, int]]:
        yield slave, slave

    monkeypatch.setattr(vmrun, "local_terminal", local)
    yield master, slave
    os.close(master)
    os.close(slave)


def read_until(fd: int, needle: bytes) -> bytes:
    got = b""
    deadline = time.monotonic() + BOUND
    while needle not in got:
        assert time.monotonic() < deadline, got
        if select.select([fd], [], [], 0.1)[0]:
            got += os.read(fd, 4096)
    return got


def test_t_relays_the_terminal_on_a_pty_follows_resizes_and_restores_it(terminal: tuple[int, int]) -> None:
    master, slave = terminal
    before = termios.tcgetattr(slave)
    typed: list[bytes] = []

    def agent(session: FakeSession, sock: socket.socket) -> None:
        with sock:
            sock.sendall(b"READY\r\n")
            typed.append(sock.recv(100))  # a key typed on the user's terminal, raw (no line discipline)
            set_size(master, 50, 100)  # the user's window changes size: the kernel signals kp-run
            os.kill(os.getpid(), signal.SIGWINCH)
            wait_for(lambda: session.resized)
            sock.sendall(b"BYE\r\n")
            session.status = 7

    guest = TerminalGuest(agent)
    run, output, _ = job(guest, request(tty=True, interactive=True, term="xterm-kp"))
    done = threading.Event()
    seen: list[bytes] = []

    def user() -> None:
        seen.append(read_until(master, b"READY"))
        os.write(master, b"\x03")  # Ctrl-C: a byte for the agent's terminal, not a signal for kp-run
        seen.append(read_until(master, b"BYE"))
        done.set()

    threading.Thread(target=user, daemon=True).start()
    record, status = vmrun._run(run)
    assert done.wait(BOUND)
    assert status == 7 and record["exit_code"] == 7 and record["outcome"] == "exited"
    assert typed == [b"\x03"] and output == []  # the agent's output went to the terminal, not to stderr
    ((command, term, columns, rows),) = guest.opened
    assert shlex.split(command)[-5:] == ["start", "--attach", "--interactive", "--", record["name"]]
    assert (term, columns, rows) == ("xterm-kp", 132, 40)  # the terminal's size when it started
    assert guest.session is not None and guest.session.resized == [(100, 50)] and guest.session.closed
    assert termios.tcgetattr(slave) == before  # raw mode undone
    assert signal.getsignal(signal.SIGWINCH) in (signal.SIG_DFL, None)  # the handler undone


def test_t_restores_the_terminal_when_the_connection_breaks(terminal: tuple[int, int]) -> None:
    _, slave = terminal
    before = termios.tcgetattr(slave)

    def agent(session: FakeSession, sock: socket.socket) -> None:
        sock.close()  # no exit status: the connection went

    guest = TerminalGuest(agent)
    run, _, _ = job(guest, request(tty=True, interactive=True, term="xterm"))
    with pytest.raises(KpError) as caught:
        vmrun._run(run)
    assert caught.value.code == "connection_lost" and caught.value.record["container_removed"] is True
    assert termios.tcgetattr(slave) == before


def test_podman_failing_on_a_terminal_is_an_error_not_an_exit_code(terminal: tuple[int, int]) -> None:
    def agent(session: FakeSession, sock: socket.socket) -> None:
        with sock:
            sock.sendall(b"Error: unable to start container: no terminal\r\n")
            session.status = 125

    run, _, _ = job(TerminalGuest(agent), request(tty=True, interactive=True, term="xterm"))
    with pytest.raises(KpError, match="could not run the container: unable to start") as caught:
        vmrun._run(run)
    assert caught.value.code == "podman"


def test_i_copies_stdin_to_the_agent_and_forwards_its_end(monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"".join(b"line %d\n" % n for n in range(20000))  # more than one read, and than a pipe holds
    received = bytearray()

    def agent(session: FakeSession, sock: socket.socket) -> None:
        with sock:
            while chunk := sock.recv(65536):
                received.extend(chunk)
            sock.sendall(b"%d lines\n" % received.count(b"\n"))  # only after the end of its stdin
            session.status = 0

    r, w = os.pipe()
    def write() -> None:
        os.write(w, data)
        os.close(w)

    threading.Thread(target=write, daemon=True).start()
    with os.fdopen(r, "rb") as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)
        guest = TerminalGuest(agent)
        run, output, _ = job(guest, request(interactive=True))
        record, status = vmrun._run(run)
    assert status == 0 and bytes(received) == data and b"".join(output) == b"20000 lines\n"
    ((command, term, _, _),) = guest.opened
    assert term is None  # no pty
    assert shlex.split(command)[-5:] == ["start", "--attach", "--interactive", "--", record["name"]]
