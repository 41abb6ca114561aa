"""The guest agent client against a fake qemu-ga on a unix socket.

The fake behaves like the real agent behind QEMU's chardev, as observed with
qemu-ga 7.2: a 0xFF byte resets its parser and earns a "stray" parse-error
reply, guest-sync-delimited answers after a 0xFF of its own, replies are
newline-terminated JSON, guest-shutdown is never answered, and bytes sent
before the agent "starts" wait in the socket until it does.
"""

from __future__ import annotations

import base64
import itertools
import json
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kodepipe.errors import KpError, Timeout
from kodepipe.guest_agent import AgentError, AgentUnreachable, GuestAgent, wait_for_agent

# A timeout within which a working fake answers: generous, since the wait ends when the answer comes.
# A test of a timeout that must run out uses a small one and bounds the time only by hang_guard.
ANSWERS = 30.0


def hang_guard(started: float, timeout: float) -> None:
    """Only a guard against a wait that ignores its timeout, never the property: 10 times the timeout."""
    assert time.monotonic() - started < 10 * timeout + 1.0


def spy_calls(monkeypatch: pytest.MonkeyPatch, agent: GuestAgent) -> list[tuple[str, str | None]]:
    """Each call the session makes, with the name of the exception it ended with (None: it returned)."""
    made: list[tuple[str, str | None]] = []
    real = agent.call

    def call(command: str, *args: Any, **kwargs: Any) -> Any:
        try:
            result = real(command, *args, **kwargs)
        except Exception as exc:
            made.append((command, type(exc).__name__))
            raise
        made.append((command, None))
        return result

    monkeypatch.setattr(agent, "call", call)
    return made


STRAY = b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'\\uFFFD\'"}}\n'
Reply = dict[str, Any] | str | None  # a reply object, "close" to hang up, None to say nothing


class FakeAgent:
    """A qemu-ga stand-in serving one connection at a time, like QEMU's chardev."""

    def __init__(self, path: Path, *, stale: bytes = b"", mute: bool = False) -> None:
        self.path = path
        self.stale = stale
        self.up = threading.Event()  # a mute agent has not started (yet): up.set() starts it
        if not mute:
            self.up.set()
        self.received: list[dict[str, Any]] = []
        self.connections = 0
        self.files: dict[str, bytearray] = {}
        self.handles: dict[int, list[Any]] = {}
        self.procs: dict[int, dict[str, Any]] = {}
        self.clock: int | None = None
        self.handlers: dict[str, Callable[[dict[str, Any]], Reply]] = {}
        self._ids = itertools.count(1000)
        self._stop = threading.Event()
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(4)
        self._server.settimeout(0.02)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._server.close()

    def commands(self) -> list[str]:
        return [r["execute"] for r in self.received]

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            self.connections += 1
            with conn:
                self._session(conn)

    def _session(self, conn: socket.socket) -> None:
        conn.sendall(self.stale)  # left over from an earlier client
        conn.settimeout(0.02)  # for reading only: each recv wakes up to see whether to stop
        buf = b""
        while not self._stop.is_set():
            if not self.up.wait(0.01):
                continue  # not started: what the client sends waits in the socket
            try:
                data = conn.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                while line.startswith(b"\xff"):
                    line = line[1:]
                    self._send(conn, STRAY)
                if not line.strip():
                    continue
                request = json.loads(line)
                self.received.append(request)
                if self._answer(conn, request) == "close":
                    return

    @staticmethod
    def _send(conn: socket.socket, data: bytes) -> None:
        """Send all of it, however long a loaded machine's client takes to read a large reply."""
        conn.settimeout(None)
        try:
            conn.sendall(data)
        finally:
            conn.settimeout(0.02)

    def _answer(self, conn: socket.socket, request: dict[str, Any]) -> str | None:
        command, args = request["execute"], request.get("arguments", {})
        if command == "guest-sync-delimited":
            self._send(conn, b"\xff" + json.dumps({"return": args["id"]}).encode() + b"\n")
            return None
        handler = self.handlers.get(command) or getattr(self, "do_" + command.replace("-", "_"), None)
        if handler is None:
            reply: Reply = {"error": {"class": "CommandNotFound", "desc": f"The command {command} has not been found"}}
        else:
            reply = handler(args)
        if reply == "close":
            return "close"
        if isinstance(reply, dict):
            self._send(conn, json.dumps(reply).encode() + b"\n")
        return None

    # -- commands -----------------------------------------------------------

    def do_guest_ping(self, args: dict[str, Any]) -> Reply:
        return {"return": {}}

    def do_guest_get_host_name(self, args: dict[str, Any]) -> Reply:
        return {"return": {"host-name": "fake"}}

    def do_guest_network_get_interfaces(self, args: dict[str, Any]) -> Reply:
        return {"return": [{"name": "lo"}, {"name": "ens3", "hardware-address": "52:54:00:12:34:56",
                                            "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "10.0.2.15",
                                                              "prefix": 24}]}]}

    def do_guest_set_time(self, args: dict[str, Any]) -> Reply:
        self.clock = args.get("time")
        return {"return": {}}

    def do_guest_shutdown(self, args: dict[str, Any]) -> Reply:
        if args.get("mode", "powerdown") not in ("halt", "powerdown", "reboot"):
            return {"error": {"class": "GenericError", "desc": "mode is invalid"}}
        return "close"  # the guest goes away without a word

    def do_guest_exec(self, args: dict[str, Any]) -> Reply:
        path, argv = args["path"], args.get("arg", [])
        stdin = base64.b64decode(args.get("input-data", ""))
        results: dict[str, dict[str, Any]] = {
            "echo": {"exitcode": 0, "out": (" ".join(argv) + "\n").encode()},
            "cat": {"exitcode": 0, "out": stdin},
            "fail": {"exitcode": 3, "err": b"boom\n"},
            "killed": {"signal": 9},
            "slow": {"exitcode": 0, "out": b"done\n", "polls": 3},
            "hang": {"polls": 10**9},
        }
        if path not in results:
            return {"error": {"class": "GenericError", "desc": f"Failed to execute child process {path!r}"}}
        pid = next(self._ids)
        self.procs[pid] = dict(results[path])
        return {"return": {"pid": pid}}

    def do_guest_exec_status(self, args: dict[str, Any]) -> Reply:
        proc = self.procs.get(args["pid"])
        if proc is None:
            return {"error": {"class": "GenericError", "desc": "Invalid parameter 'pid'"}}
        if proc.get("polls", 0) > 0:
            proc["polls"] -= 1
            return {"return": {"exited": False}}
        status: dict[str, Any] = {"exited": True}
        for key in ("exitcode", "signal"):
            if key in proc:
                status[key] = proc[key]
        for key in ("out", "err"):  # like qemu-ga: no key at all for empty output
            if proc.get(key):
                status[f"{key}-data"] = base64.b64encode(proc[key]).decode()
                status[f"{key}-truncated"] = False
        del self.procs[args["pid"]]
        return {"return": status}

    def do_guest_file_open(self, args: dict[str, Any]) -> Reply:
        path, mode = args["path"], args.get("mode", "r")
        if mode == "r" and path not in self.files:
            return {"error": {"class": "GenericError",
                              "desc": f"failed to open file '{path}' (mode: 'r'): No such file or directory"}}
        if mode == "w":
            self.files[path] = bytearray()
        self.files.setdefault(path, bytearray())
        handle = next(self._ids)
        self.handles[handle] = [path, 0]
        return {"return": handle}

    def do_guest_file_read(self, args: dict[str, Any]) -> Reply:
        path, pos = self.handles[args["handle"]]
        data = bytes(self.files[path][pos:pos + args["count"]])
        self.handles[args["handle"]][1] = pos + len(data)
        eof = pos + len(data) >= len(self.files[path])
        return {"return": {"count": len(data), "buf-b64": base64.b64encode(data).decode(), "eof": eof}}

    def do_guest_file_write(self, args: dict[str, Any]) -> Reply:
        path, _ = self.handles[args["handle"]]
        data = base64.b64decode(args["buf-b64"])
        data = data[:100_000]  # short writes, as fwrite may do: the client must carry on
        self.files[path] += data
        return {"return": {"count": len(data), "eof": False}}

    def do_guest_file_close(self, args: dict[str, Any]) -> Reply:
        del self.handles[args["handle"]]
        return {"return": {}}


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "qga.sock"
    if len(str(path)) <= 100:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="kpga", dir="/tmp") as short:  # sun_path is 108 bytes
        yield Path(short) / "qga.sock"


@pytest.fixture
def make_agent(sock_path: Path) -> Iterator[Callable[..., FakeAgent]]:
    made: list[FakeAgent] = []

    def make(**kwargs: Any) -> FakeAgent:
        made.append(FakeAgent(sock_path, **kwargs))
        return made[-1]

    yield make
    for fake in made:
        fake.stop()


@pytest.fixture
def fake(make_agent: Callable[..., FakeAgent]) -> FakeAgent:
    return make_agent()


@pytest.fixture
def agent(fake: FakeAgent) -> Iterator[GuestAgent]:
    with GuestAgent(fake.path) as client:
        client.sync(ANSWERS)
        yield client


STALE = [
    pytest.param(b"", id="nothing"),
    pytest.param(b'{"return": {}}\n', id="an-old-reply"),
    pytest.param(b'\xff{"return": 7}\n', id="an-old-sync-reply"),
    pytest.param(b'{"return": {}}\n\xff{"return": 7}\n{"return": {"host-name": "old"}}\n', id="several"),
    pytest.param(b'{"return": {"host-n', id="half-a-reply"),
    pytest.param(b'\xff{"retu', id="half-a-sync-reply"),
    pytest.param(b"\x00\x01 junk \xfe\n\xff\xff\n\xff", id="binary-junk"),
]


@pytest.mark.parametrize("stale", STALE)
def test_sync_skips_whatever_was_left_in_the_socket(make_agent: Callable[..., FakeAgent], stale: bytes) -> None:
    fake = make_agent(stale=stale)
    with GuestAgent(fake.path) as agent:
        agent.sync(ANSWERS)
        assert agent.hostname() == "fake"
        agent.ping()
        assert agent.hostname() == "fake"
    assert fake.commands() == ["guest-sync-delimited", "guest-get-host-name", "guest-ping", "guest-get-host-name"]


def test_first_call_syncs_by_itself(fake: FakeAgent) -> None:
    fake.stale = b'{"return": {"host-name": "stale"}}\n'
    with GuestAgent(fake.path) as agent:
        assert agent.hostname() == "fake"
    assert fake.commands() == ["guest-sync-delimited", "guest-get-host-name"]


def test_sync_ids_are_random(fake: FakeAgent) -> None:
    with GuestAgent(fake.path) as agent:
        agent.sync(ANSWERS)
        agent.sync(ANSWERS)
    first, second = (r["arguments"]["id"] for r in fake.received)
    assert first != second


def test_commands_and_their_replies(agent: GuestAgent, fake: FakeAgent) -> None:
    agent.ping()
    assert agent.hostname() == "fake"
    assert [i["name"] for i in agent.interfaces()] == ["lo", "ens3"]
    assert agent.call("guest-get-host-name") == {"host-name": "fake"}
    assert fake.received[-1] == {"execute": "guest-get-host-name"}  # no "arguments" when there are none


@pytest.mark.parametrize(("command", "arguments", "error_class", "desc"), [
    ("guest-frobnicate", None, "CommandNotFound", "The command guest-frobnicate has not been found"),
    ("guest-file-open", {"path": "/nope"}, "GenericError", "No such file or directory"),
    ("guest-exec-status", {"pid": 1}, "GenericError", "Invalid parameter 'pid'"),
])
def test_errors_from_the_agent(agent: GuestAgent, command: str, arguments: dict[str, Any] | None, error_class: str,
                               desc: str) -> None:
    with pytest.raises(AgentError) as info:
        agent.call(command, arguments)
    assert info.value.code == "guest_agent" and info.value.error_class == error_class
    assert command in info.value.message and desc in info.value.message
    agent.ping()  # the session is still in step


def test_a_silent_agent_times_out(make_agent: Callable[..., FakeAgent]) -> None:
    fake = make_agent(mute=True)
    with GuestAgent(fake.path) as agent:
        started = time.monotonic()
        with pytest.raises(Timeout, match=r"did not answer guest-sync-delimited within 0\.2 s"):
            agent.sync(0.2)
        hang_guard(started, 0.2)


def test_a_late_reply_is_not_taken_for_the_next_one(agent: GuestAgent, fake: FakeAgent) -> None:
    timed_out = threading.Event()

    def slow(args: dict[str, Any]) -> Reply:
        assert timed_out.wait(ANSWERS)  # the reply comes only once the caller has given up on it
        return {"return": "late"}

    fake.handlers["guest-slow"] = slow
    with pytest.raises(Timeout, match="guest-slow"):
        agent.call("guest-slow", timeout=0.05)
    timed_out.set()
    # the late "late" arrives while the next call resynchronises
    assert agent.hostname() == "fake"
    assert fake.commands()[-2:] == ["guest-sync-delimited", "guest-get-host-name"]


def test_no_socket_is_unreachable(sock_path: Path) -> None:
    with GuestAgent(sock_path) as agent, pytest.raises(AgentUnreachable, match="cannot connect"):
        agent.sync(0.2)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock_path))  # a socket file nobody listens on: QEMU has gone
    dead.close()
    with GuestAgent(sock_path) as agent, pytest.raises(AgentUnreachable):
        agent.sync(0.2)


def test_hang_up_mid_call_is_unreachable(agent: GuestAgent, fake: FakeAgent) -> None:
    fake.handlers["guest-crash"] = lambda args: "close"
    with pytest.raises(AgentUnreachable, match="closed"):
        agent.call("guest-crash")
    assert agent.hostname() == "fake"  # the next call connects again


@pytest.mark.parametrize(("argv", "stdin", "expected"), [
    (["echo", "hello", "world"], None, (0, b"hello world\n", b"")),
    (["cat"], b"\x00binary\xff input", (0, b"\x00binary\xff input", b"")),
    (["fail"], None, (3, b"", b"boom\n")),
    (["killed"], None, (-9, b"", b"")),
    (["slow"], None, (0, b"done\n", b"")),
])
def test_exec(agent: GuestAgent, fake: FakeAgent, argv: list[str], stdin: bytes | None,
              expected: tuple[int, bytes, bytes]) -> None:
    assert agent.exec(argv, input=stdin, timeout=ANSWERS) == expected
    request = next(r for r in fake.received if r["execute"] == "guest-exec")
    assert request["arguments"]["capture-output"] is True
    assert request["arguments"]["arg"] == argv[1:]
    assert ("input-data" in request["arguments"]) == (stdin is not None)


def test_exec_timeout(agent: GuestAgent) -> None:
    started = time.monotonic()
    with pytest.raises(Timeout, match=r"hang in the guest did not finish within 0\.3 s"):
        agent.exec(["hang"], timeout=0.3)
    hang_guard(started, 0.3)
    agent.ping()


def test_exec_of_a_missing_program(agent: GuestAgent) -> None:
    with pytest.raises(AgentError, match="Failed to execute child process"):
        agent.exec(["/no/such/program"])


@pytest.mark.parametrize("size", [0, 5, 1 << 18, (1 << 18) * 2 + 3])
def test_file_round_trip(agent: GuestAgent, fake: FakeAgent, size: int) -> None:
    data = bytes(i % 251 for i in range(size))
    agent.write_file("/etc/thing", data)
    assert bytes(fake.files["/etc/thing"]) == data
    assert agent.read_file("/etc/thing", limit=max(size, 1)) == data
    assert fake.handles == {}  # every handle closed


def test_append_and_overwrite(agent: GuestAgent, fake: FakeAgent) -> None:
    agent.write_file("/f", b"one\n")
    agent.write_file("/f", b"two\n", mode="a")
    assert agent.read_file("/f") == b"one\ntwo\n"
    agent.write_file("/f", b"three\n")
    assert agent.read_file("/f") == b"three\n"


def test_read_file_limit_and_errors(agent: GuestAgent, fake: FakeAgent) -> None:
    fake.files["/big"] = bytearray(b"x" * 101)
    with pytest.raises(KpError, match="larger than 100 bytes") as info:
        agent.read_file("/big", limit=100)
    assert info.value.code == "too_large"
    assert agent.read_file("/big", limit=101) == b"x" * 101
    with pytest.raises(AgentError, match="No such file"):
        agent.read_file("/missing")
    assert fake.handles == {}


def test_set_time(agent: GuestAgent, fake: FakeAgent) -> None:
    agent.set_time(1_700_000_000_123_456_789)
    assert fake.clock == 1_700_000_000_123_456_789
    before = time.time_ns()
    agent.set_time()
    assert fake.clock is not None and before <= fake.clock <= time.time_ns()


def test_shutdown_hangs_up_and_that_is_success(agent: GuestAgent, fake: FakeAgent,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_calls(monkeypatch, agent)
    agent.shutdown(wait=ANSWERS)
    # the hang-up itself ended the wait (no timeout ran out)
    assert calls == [("guest-shutdown", "AgentUnreachable")]
    assert fake.received[-1] == {"execute": "guest-shutdown", "arguments": {"mode": "powerdown"}}


def test_shutdown_with_silence_is_success(agent: GuestAgent, fake: FakeAgent,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    fake.handlers["guest-shutdown"] = lambda args: None  # the guest is still on its way down
    calls = spy_calls(monkeypatch, agent)
    started = time.monotonic()
    agent.shutdown("reboot", wait=0.2)
    assert calls == [("guest-shutdown", "Timeout")]
    assert time.monotonic() - started >= 0.2  # it waited out the silence (a monotonic deadline)
    hang_guard(started, 0.2)


def test_shutdown_refused(agent: GuestAgent) -> None:
    with pytest.raises(AgentError, match="mode is invalid"):
        agent.shutdown("sideways")


def test_shutdown_of_an_agent_that_is_not_up_is_not_success(make_agent: Callable[..., FakeAgent]) -> None:
    fake = make_agent(mute=True)
    with GuestAgent(fake.path) as agent, pytest.raises(Timeout):
        agent.shutdown(wait=0.2)
    assert fake.received == []


def test_wait_for_an_agent_that_starts_late(make_agent: Callable[..., FakeAgent]) -> None:
    # several syncs queue up before the agent starts; each 0xFF will earn a parse error,
    # and none of that may be mistaken for a reply afterwards
    fake = make_agent(mute=True, stale=b'{"return": {"host-name": "old"}}\n')
    attempts = itertools.count(1)

    def alive() -> bool:  # asked before each attempt: the agent starts after three unanswered syncs
        if next(attempts) == 4:
            fake.up.set()
        return True

    with wait_for_agent(fake.path, ANSWERS, alive=alive, poll=0.1) as agent:
        assert fake.up.is_set()
        for _ in range(3):
            assert agent.hostname() == "fake"
            agent.ping()
    assert fake.commands().count("guest-sync-delimited") >= 4


def test_wait_for_a_socket_that_appears_late(sock_path: Path, make_agent: Callable[..., FakeAgent]) -> None:
    attempts = itertools.count(1)

    def alive() -> bool:  # asked before each attempt: the socket appears after two attempts found none
        if next(attempts) == 3:
            make_agent()
        return True

    with wait_for_agent(sock_path, ANSWERS, alive=alive, poll=0.05) as agent:
        assert agent.hostname() == "fake"
    assert next(attempts) > 3  # the attempts before the socket appeared failed and were retried


def test_wait_times_out(make_agent: Callable[..., FakeAgent]) -> None:
    fake = make_agent(mute=True)
    started = time.monotonic()
    with pytest.raises(Timeout, match=r"did not answer within 0\.3 s") as info:
        wait_for_agent(fake.path, 0.3, poll=0.1)
    assert "connected, but the agent did not answer" in info.value.message
    hang_guard(started, 0.3)


def test_wait_stops_at_once_when_the_vm_dies(make_agent: Callable[..., FakeAgent]) -> None:
    fake = make_agent(mute=True)
    asked: list[int] = []

    def alive() -> bool:  # QEMU is gone at the third look
        asked.append(1)
        return len(asked) < 3

    with pytest.raises(KpError) as info:
        wait_for_agent(fake.path, ANSWERS, alive=alive, poll=0.05)
    assert info.value.code == "vm_died"  # not the timeout: it stopped at once
    assert len(asked) == 3


def test_close_hangs_up(fake: FakeAgent) -> None:
    agent = GuestAgent(fake.path)
    agent.ping()
    agent.close()
    agent.close()  # twice is fine
    with GuestAgent(fake.path) as again:
        again.ping()
    assert fake.connections == 2
