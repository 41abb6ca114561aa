"""kp-attach and the terminal relay: escape key, EOF and linger, raw mode
restored, a scripted console, the log, and the errors for VMs that do not run."""

from __future__ import annotations

import os
import pty
import select
import socket
import subprocess
import termios
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from kodepipe.core import terminal
from tests.cli import invoke
from tests.conftest import BIN
from tests.fakevm import FakeVM, make_vm, wait_raw


class Console:
    """A stand-in for QEMU's serial socket: echoes like a tty and answers a line with a prompt."""

    def __init__(self, path: str, *, hang_up: bool = False) -> None:
        self.received = bytearray()
        self.hang_up = hang_up  # close the connection after answering a line
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(1024):
                    self.received += data
                    conn.sendall(data.replace(b"\r", b"\r\nkp@s1:~$ "))
                    if self.hang_up and b"\r" in data:
                        break

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def vm() -> Iterator[FakeVM]:
    made = make_vm("s1")
    yield made
    made.stop()


@pytest.fixture
def console(vm: FakeVM) -> Iterator[Console]:
    served = Console(vm.boot["sockets"]["serial"])
    yield served
    served.close()


# -- the relay ------------------------------------------------------------------


def test_relay_stops_at_the_escape_key_after_sending_what_came_before() -> None:
    ours, theirs = socket.socketpair()
    read_in, write_in = os.pipe()
    read_out, write_out = os.pipe()
    os.write(write_in, b"ab\x1dcd")
    assert terminal.relay(read_in, write_out, ours, escape=terminal.ESCAPE) == "escape"
    assert theirs.recv(100) == b"ab"
    for fd in (read_in, write_in, read_out, write_out):
        os.close(fd)


def test_relay_copies_the_remote_until_it_closes() -> None:
    ours, theirs = socket.socketpair()
    read_in, _write_in = os.pipe()
    read_out, write_out = os.pipe()
    theirs.sendall(b"hello\r\n")
    theirs.close()
    assert terminal.relay(read_in, write_out, ours, escape=terminal.ESCAPE) == "remote_closed"
    assert os.read(read_out, 100) == b"hello\r\n"


def test_relay_lingers_after_local_eof_for_late_output(monkeypatch: pytest.MonkeyPatch) -> None:
    ours, theirs = socket.socketpair()
    read_in, write_in = os.pipe()
    read_out, write_out = os.pipe()
    os.write(write_in, b"uname\r")
    os.close(write_in)
    waits: list[tuple[float | None, bool]] = []  # each wait of the relay: its timeout, and whether it saw data

    def select_(watched: list[Any], w: list[Any], x: list[Any], timeout: float | None = None) -> Any:
        if timeout is not None and all(t is None for t, _ in waits):
            # the relay has seen local EOF and begins to linger: only now does the remote answer
            assert theirs.recv(100) == b"uname\r"
            theirs.sendall(b"Linux\r\n")
        ready = select.select(watched, w, x, timeout)
        waits.append((timeout, bool(ready[0])))
        return ready

    monkeypatch.setattr(terminal, "select", SimpleNamespace(select=select_))
    os.set_blocking(read_out, False)  # a relay that did not wait for the answer fails here, not hangs
    assert terminal.relay(read_in, write_out, ours, linger=1.0) == "local_eof"
    assert os.read(read_out, 100) == b"Linux\r\n"
    # the late answer came while it lingered; it ended after 1.0 s of quiet, not at EOF
    assert waits[-2:] == [(1.0, True), (1.0, False)]
    # without linger, local EOF ends it at once
    assert terminal.relay(read_in, write_out, ours) == "local_eof"


def test_raw_mode_is_undone_even_when_the_session_fails() -> None:
    leader, follower = pty.openpty()
    before = termios.tcgetattr(follower)
    with pytest.raises(RuntimeError), terminal.raw_mode(follower):
        assert termios.tcgetattr(follower)[3] & termios.ECHO == 0
        raise RuntimeError("boom")
    assert termios.tcgetattr(follower) == before
    os.close(leader)
    os.close(follower)


# -- kp-attach ------------------------------------------------------------------


def test_without_a_terminal_stdin_goes_to_the_console_and_its_output_to_stdout(vm: FakeVM) -> None:
    # the console hangs up after its answer, so the idle time is only a bound: nothing here depends
    # on the answer coming within it (test_relay_lingers_after_local_eof_for_late_output tests --idle)
    console = Console(vm.boot["sockets"]["serial"], hang_up=True)
    try:
        proc = subprocess.run([str(BIN / "kp-attach"), "--idle", "60", "s1"], input=b"uname\r",
                              capture_output=True, timeout=120)
    finally:
        console.close()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"uname\r\nkp@s1:~$ "
    assert proc.stderr == b""
    assert bytes(console.received) == b"uname\r"


def test_interactive_attach_announces_the_escape_and_detaches_on_ctrl_bracket(console: Console) -> None:
    leader, follower = pty.openpty()
    before = termios.tcgetattr(follower)
    proc = subprocess.Popen([str(BIN / "kp-attach"), "s1"], stdin=follower, stdout=follower, stderr=follower,
                            start_new_session=True)
    seen = _read_until(leader, b"Ctrl-] to detach")
    assert b"Connected to s1's serial console; Ctrl-] to detach" in seen
    wait_raw(follower)
    os.write(leader, b"ls\r")
    _read_until(leader, b"kp@s1:~$ ")
    os.write(leader, b"\x1d")
    assert proc.wait(timeout=60) == 0
    assert bytes(console.received) == b"ls\r"  # the escape key itself never reaches the VM
    assert termios.tcgetattr(follower) == before
    os.close(leader)
    os.close(follower)


def test_a_vm_that_is_not_running_is_a_clear_error() -> None:
    stopped = make_vm("s2", running=False)
    try:
        result = invoke("kp-attach", "s2")
    finally:
        stopped.stop()
    assert result.status == 1
    assert "s2 is not running (it is stopped); kp-boot s2" in result.stderr
    assert result.stdout == b""


@pytest.mark.parametrize("args, status, message", [
    (("nope",), 1, "there is no VM named nope"),
    (("../x",), 2, "invalid name"),
    (("--follow", "s1"), 2, "--follow goes with --log"),
])
def test_bad_requests(vm: FakeVM, args: tuple[str, ...], status: int, message: str) -> None:
    result = invoke("kp-attach", *args)
    assert result.status == status
    assert message in result.stderr


def test_log_prints_the_serial_log_even_of_a_stopped_vm() -> None:
    stopped = make_vm("s2", running=False)
    try:
        assert "no serial log yet" in invoke("kp-attach", "--log", "s2").stderr
        (stopped.folder / "serial.log").write_bytes(b"[    0.000000] Linux version\r\nlogin: \xff")
        result = invoke("kp-attach", "--log", "s2")
    finally:
        stopped.stop()
    assert result.status == 0
    assert result.stdout == b"[    0.000000] Linux version\r\nlogin: \xff"


def test_log_follow_prints_new_output_until_the_vm_stops(vm: FakeVM) -> None:
    log = vm.folder / "serial.log"
    log.write_bytes(b"first\n")
    proc = subprocess.Popen([str(BIN / "kp-attach"), "--log", "--follow", "s1"], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.read(6) == b"first\n"
    with log.open("ab") as more:
        more.write(b"second\n")
    assert proc.stdout.read(7) == b"second\n"
    with log.open("ab") as more:
        more.write(b"last words\n")
    vm.stop()
    assert proc.wait(timeout=60) == 0
    assert proc.stdout.read() == b"last words\n"


def _read_until(fd: int, marker: bytes, timeout: float = 60.0) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while marker not in data:
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            raise AssertionError(f"no {marker!r} in {data!r}")
        data += os.read(fd, 4096)
    return data
