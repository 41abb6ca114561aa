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

from kodepipe.core.errors import KpError, Timeout
from kodepipe.vm import guest_agent
from kodepipe.vm.guest_agent import AgentBadReply, AgentError, AgentUnreachable, GuestAgent, wait_for_agent

# A timeout within which a working fake answers: generous, since the wait ends when the answer comes.
# A test of a timeout that must run out uses a small one and bounds the time only by hang_guard.
ANSWERS = 30.0


def hang_guard(started: float, timeout: float) -> None:
    """Only a guard against a wait that ignores its timeout, never the property: a minute, far past
    any timeout these tests use, so a loaded machine never trips it."""
    assert time.monotonic() - started < max(60.0, 10 * timeout)


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
# a reply object, "close" to hang up, None to say nothing, bytes to send as they are (a hostile
# agent's reply line), or a function given the connection (a reply that trickles or never ends)
Reply = dict[str, Any] | str | None | bytes | Callable[[socket.socket], None]


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
        try:
            conn.sendall(self.stale)  # left over from an earlier client
        except OSError:
            return  # the client has gone already
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
        if isinstance(reply, bytes) or callable(reply):
            try:
                self._send(conn, reply) if isinstance(reply, bytes) else reply(conn)
            except OSError:
                return "close"  # the client gave up on it and hung up
            return None if isinstance(reply, bytes) else "close"
        elif isinstance(reply, dict):
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
            "/bin/sh": {"exitcode": 0},  # kp-ip's set-up scripts (the proxy settings, the clone's key)
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

    def make(path: Path | None = None, **kwargs: Any) -> FakeAgent:
        made.append(FakeAgent(path or sock_path, **kwargs))
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



# -- a broken or hostile agent ----------------------------------------------------------------------
#
# The guest may be hostile: whatever its agent answers, the client ends with a KpError (never a
# traceback), holds at most a bounded reply in memory, and gives up by its deadline.


def bad(line: bytes) -> Callable[[dict[str, Any]], Reply]:
    return lambda args: line


def answer(value: object) -> Callable[[dict[str, Any]], Reply]:
    return lambda args: (json.dumps({"return": value}, allow_nan=True) + "\n").encode()


BAD_HOSTNAME_REPLIES = [
    pytest.param(answer({}), "has no 'host-name'", id="missing-key"),
    pytest.param(answer({"host-name": 5}), "'host-name' is a number, not a string", id="wrong-type"),
    pytest.param(answer({"host-name": None}), "has no 'host-name'", id="null"),
    pytest.param(answer(["host-name"]), "is an array, not an object", id="not-an-object"),
    pytest.param(answer("fake"), "is a string, not an object", id="a-bare-string"),
    pytest.param(bad(b'{"return": {"host-name": "\\ud800"}}\n'), "not valid Unicode", id="lone-surrogate"),
    pytest.param(bad(b'{"return": {"host-name": "caf\xe9"}}\n'), "is not UTF-8", id="latin-1"),
    pytest.param(bad(b'{"return": {"host-name": "\xff\xfe"}}\n'), "is not UTF-8", id="invalid-bytes"),
    pytest.param(bad(b'\x00{\x00"\x00r\x00"\x00}\x00\n'), "not UTF-8|not JSON", id="utf-16-is-not-guessed"),
    pytest.param(bad(b'{"return": NaN}\n'), "NaN is not JSON", id="nan"),
    pytest.param(bad(b'{"return": {"host-name": "a"}\n'), "is not JSON", id="truncated"),
    pytest.param(bad(b"[1, 2]\n"), 'without "return" or "error"', id="an-array"),
    pytest.param(bad(b'{"neither": 1}\n'), 'without "return" or "error"', id="neither-key"),
    pytest.param(bad(b"garbage\n"), "is not JSON", id="garbage"),
    pytest.param(bad(b"[" * 5000 + b"]" * 5000 + b"\n"), "nested too deeply", id="deep"),
    pytest.param(bad(b'{"return": [' + b"{}," * 200_000 + b"{}]}\n"), "more than 100000 entries", id="many-objects"),
    pytest.param(bad(b'{"return": {"host-name": 1' + b"0" * 10_000 + b"}}\n"), "is not JSON", id="a-huge-number"),
]


@pytest.mark.parametrize(("handler", "message"), BAD_HOSTNAME_REPLIES)
def test_a_malformed_reply_is_a_clean_error_and_the_session_recovers(
        agent: GuestAgent, fake: FakeAgent, handler: Callable[[dict[str, Any]], Reply], message: str) -> None:
    fake.handlers["guest-get-host-name"] = handler
    with pytest.raises(AgentBadReply, match=message) as info:
        agent.hostname()
    assert info.value.code == "guest_agent_bad_reply" and info.value.status == 1
    info.value.message.encode("utf-8")  # the message itself can be written into a record
    del fake.handlers["guest-get-host-name"]
    assert agent.hostname() == "fake"  # the next call resynchronises and is in step


def test_a_reply_line_that_never_ends_is_cut_at_the_cap(agent: GuestAgent, fake: FakeAgent,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guest_agent, "MAX_REPLY", 1 << 20)
    sent = [0]

    def endless(conn: socket.socket) -> None:  # '{"return": "xxxxxxx... without end
        conn.settimeout(ANSWERS)
        conn.sendall(b'{"return": "')
        while sent[0] < 100 << 20:  # a guard: the client must hang up long before
            conn.sendall(b"x" * 65536)
            sent[0] += 65536

    fake.handlers["guest-get-host-name"] = lambda args: endless
    with pytest.raises(AgentBadReply, match="longer than 1 MiB"):
        agent.hostname()
    assert sent[0] < 100 << 20  # the client hung up: it did not read on without end
    del fake.handlers["guest-get-host-name"]
    assert agent.hostname() == "fake"  # a new connection, in step again


def test_a_reply_that_trickles_in_cannot_outlast_the_timeout(agent: GuestAgent, fake: FakeAgent) -> None:
    def trickle(conn: socket.socket) -> None:  # one byte at a time, a valid reply that never ends
        conn.settimeout(ANSWERS)
        conn.sendall(b'{"return": {"host-name": "')
        # a client that waited for each byte anew would wait this long: longer than hang_guard allows
        until = time.monotonic() + 120.0
        while not fake._stop.is_set() and time.monotonic() < until:
            conn.sendall(b"x")
            time.sleep(0.005)

    fake.handlers["guest-get-host-name"] = lambda args: trickle
    started = time.monotonic()
    with pytest.raises(Timeout, match=r"guest-get-host-name within 0\.3 s"):
        agent.call("guest-get-host-name", timeout=0.3)
    hang_guard(started, 0.3)


def test_the_sessions_deadline_bounds_every_call(agent: GuestAgent, fake: FakeAgent) -> None:
    """kp-ip's --timeout: however long a call may take by itself, the session ends by its deadline."""
    fake.handlers["guest-get-host-name"] = lambda args: None  # never answers
    agent.deadline = time.monotonic() + 0.3
    started = time.monotonic()
    with pytest.raises(Timeout, match="before the session's deadline"):
        agent.call("guest-get-host-name", timeout=ANSWERS)
    hang_guard(started, 0.3)
    with pytest.raises(Timeout):
        agent.exec(["hang"], timeout=ANSWERS)  # a program that never exits, bounded the same way
    with pytest.raises(Timeout):
        agent.read_file("/any", timeout=ANSWERS)
    hang_guard(started, 0.3)


def test_a_guest_that_reads_nothing_cannot_hold_a_send_past_the_deadline(make_agent: Callable[..., FakeAgent]) -> None:
    fake = make_agent(mute=True)  # connected, reading nothing: the channel fills up
    with GuestAgent(fake.path) as agent:
        agent._synced = True  # as if synced earlier: the call goes straight to sending
        started = time.monotonic()
        with pytest.raises(Timeout, match="did not take guest-file-write"):
            agent.call("guest-file-write", {"handle": 1, "buf-b64": "A" * (8 << 20)}, timeout=0.3)
        hang_guard(started, 0.3)


def test_sync_survives_a_flood_of_garbage(make_agent: Callable[..., FakeAgent]) -> None:
    # megabytes after a stray marker, with no newline: not a sync reply, dropped (never held whole)
    fake = make_agent(stale=b"\xff" + b"x" * (4 << 20) + b"\xff\xff" + b"y" * (1 << 20))
    with GuestAgent(fake.path) as agent:
        agent.sync(ANSWERS)
        assert agent.hostname() == "fake"


def interfaces_reply(*ifaces: object) -> Callable[[dict[str, Any]], Reply]:  # any JSON: replies may be malformed
    return lambda args: {"return": list(ifaces)}


GOOD_IFACE: dict[str, Any] = {"name": "ens3", "hardware-address": "52:54:00:12:34:56",
              "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "10.0.2.15", "prefix": 24}]}


def iface(**changes: Any) -> dict[str, Any]:
    return {**GOOD_IFACE, **changes}


def address(**changes: Any) -> dict[str, Any]:
    return iface(**{"ip-addresses": [{**GOOD_IFACE["ip-addresses"][0], **changes}]})


@pytest.mark.parametrize(("reply", "message"), [
    (answer({"name": "ens3"}), "guest-network-get-interfaces is an object, not an array"),
    (interfaces_reply("ens3"), r"\[0\] is a string, not an object"),
    (interfaces_reply(iface(name=None)), "has no 'name'"),
    (interfaces_reply(iface(name=["ens3"])), "'name' is an array, not a string"),
    (interfaces_reply(iface(name="")), "is not one"),
    (interfaces_reply(iface(**{"hardware-address": "52:54:00:12:34:56\n1.2.3.4"})), "not a hardware address"),
    (interfaces_reply(iface(**{"ip-addresses": {"ip-address": "10.0.2.15"}})), "is an object, not an array"),
    (interfaces_reply(address(**{"ip-address": "10.0.2.15\x1b[2J"})), "is not an IP address"),
    (interfaces_reply(address(**{"ip-address": "localhost"})), "is not an IP address"),
    (interfaces_reply(address(**{"ip-address": 167772687})), "'ip-address' is a number, not a string"),
    (interfaces_reply(address(**{"ip-address": "fe80::1"})), "is not an ipv4 address"),
    (interfaces_reply(address(**{"ip-address-type": "ipx"})), "unknown address type"),
    (interfaces_reply(address(prefix="24")), "'prefix' is a string, not an integer"),
    (interfaces_reply(address(prefix=33)), "out of range"),
    (interfaces_reply(address(prefix=True)), "not an integer"),
    (interfaces_reply(*[iface(name=f"veth{n}") for n in range(1025)]), "1025 entries, more than the 1024"),
    (interfaces_reply(iface(**{"ip-addresses": [GOOD_IFACE["ip-addresses"][0]] * 5000})),
     "5000 entries, more than the 1024"),
])
def test_interfaces_are_read_typed_and_bounded(agent: GuestAgent, fake: FakeAgent,
                                               reply: Callable[[dict[str, Any]], Reply], message: str) -> None:
    fake.handlers["guest-network-get-interfaces"] = reply
    with pytest.raises(AgentBadReply, match=message):
        agent.interfaces()


def test_interfaces_are_normalised(agent: GuestAgent, fake: FakeAgent) -> None:
    fake.handlers["guest-network-get-interfaces"] = interfaces_reply(
        {"name": "lo", "ip-addresses": [{"ip-address-type": "ipv6", "ip-address": "::1", "prefix": 128}],
         "statistics": {"rx-bytes": 1}},
        iface(**{"ip-addresses": [{"ip-address-type": "ipv6", "ip-address": "FE80:0::1", "prefix": 64}]}))
    assert agent.interfaces() == [
        {"name": "lo", "hardware-address": None,
         "ip-addresses": [{"ip-address": "::1", "ip-address-type": "ipv6", "prefix": 128}]},
        {"name": "ens3", "hardware-address": "52:54:00:12:34:56",
         "ip-addresses": [{"ip-address": "fe80::1", "ip-address-type": "ipv6", "prefix": 64}]}]


def exec_status(**status: Any) -> Callable[[dict[str, Any]], Reply]:
    return lambda args: {"return": status}


@pytest.mark.parametrize(("command", "reply", "message"), [
    ("guest-exec", answer({"pid": "1000"}), "'pid' is a string, not an integer"),
    ("guest-exec", answer({}), "has no 'pid'"),
    ("guest-exec", answer(1000), "is a number, not an object"),
    ("guest-exec-status", exec_status(exited="yes"), "'exited' is a string, not true or false"),
    ("guest-exec-status", exec_status(), "has no 'exited'"),
    ("guest-exec-status", exec_status(exited=True, exitcode="0"), "'exitcode' is a string"),
    ("guest-exec-status", exec_status(exited=True, signal=[9]), "'signal' is an array"),
    ("guest-exec-status", exec_status(exited=True, exitcode=1 << 40), "out of range"),
    ("guest-exec-status", exec_status(exited=True, **{"out-data": "not base64!"}), "not valid base64"),
    ("guest-exec-status", exec_status(exited=True, **{"err-data": 12}), "'err-data' is a number"),
])
def test_exec_replies_are_read_typed(agent: GuestAgent, fake: FakeAgent, command: str,
                                     reply: Callable[[dict[str, Any]], Reply], message: str) -> None:
    fake.handlers[command] = reply
    if command == "guest-exec-status":
        fake.handlers["guest-exec"] = answer({"pid": 1000})
    with pytest.raises(AgentBadReply, match=message):
        agent.exec(["echo"], timeout=ANSWERS)


def test_a_file_read_that_never_ends(agent: GuestAgent, fake: FakeAgent) -> None:
    """A guest file that is endless (/dev/zero as the host key, say): the size limit ends it."""
    fake.files["/etc/ssh/key.pub"] = bytearray()
    fake.handlers["guest-file-read"] = lambda args: {"return": {
        "count": args["count"], "eof": False, "buf-b64": base64.b64encode(b"\0" * args["count"]).decode()}}
    with pytest.raises(KpError, match="larger than 1048576 bytes") as info:
        agent.read_file("/etc/ssh/key.pub")
    assert info.value.code == "too_large"


def test_a_file_read_that_claims_data_it_never_sends_ends_by_the_timeout(agent: GuestAgent, fake: FakeAgent) -> None:
    fake.files["/f"] = bytearray()
    fake.handlers["guest-file-read"] = lambda args: {"return": {"count": 0, "eof": False, "buf-b64": ""}}
    assert agent.read_file("/f") == b""  # no bytes and no eof: the end (qemu-ga says count 0 at the end)
    fake.handlers["guest-file-read"] = lambda args: {"return": {"count": 1, "eof": False, "buf-b64": ""}}
    with pytest.raises(AgentBadReply, match="said 1 bytes and sent 0"):
        agent.read_file("/f")


@pytest.mark.parametrize(("reply", "message"), [
    ({"count": 5, "eof": True, "buf-b64": base64.b64encode(b"abc").decode()}, "said 5 bytes and sent 3"),
    ({"count": 1 << 30, "eof": True, "buf-b64": ""}, "out of range"),  # more than was asked for
    ({"count": 3, "eof": "true", "buf-b64": base64.b64encode(b"abc").decode()}, "'eof' is a string"),
    ({"count": 3, "eof": True, "buf-b64": "!!!"}, "not valid base64"),
    ({"eof": True, "buf-b64": ""}, "has no 'count'"),
])
def test_file_reads_are_read_typed(agent: GuestAgent, fake: FakeAgent, reply: dict[str, Any], message: str) -> None:
    fake.files["/f"] = bytearray(b"abc")
    fake.handlers["guest-file-read"] = lambda args: {"return": reply}
    with pytest.raises(AgentBadReply, match=message):
        agent.read_file("/f")
    assert fake.handles == {}  # closed all the same


def test_a_file_handle_must_be_an_integer(agent: GuestAgent, fake: FakeAgent) -> None:
    fake.handlers["guest-file-open"] = answer("/etc/shadow")
    with pytest.raises(AgentBadReply, match="guest-file-open is a string, not a handle"):
        agent.read_file("/f")


def test_a_write_that_claims_more_than_it_was_given(agent: GuestAgent, fake: FakeAgent) -> None:
    fake.handlers["guest-file-write"] = answer({"count": 10**6, "eof": False})
    with pytest.raises(AgentBadReply, match="out of range"):
        agent.write_file("/f", b"abc")
    assert fake.handles == {}


@pytest.mark.parametrize(("error", "shown"), [
    ({"class": "GenericError", "desc": "boom \x1b[2J\x07"}, "boom \x1b[2J\x07"),  # kept: Output escapes it
    ({"class": 5, "desc": ["not", "text"]}, "{'class': 5, 'desc': ['not', 'text']}"),
    ("just a string", "'just a string'"),
    ({"class": "GenericError", "desc": "\udc80 surrogate"}, "\\udc80 surrogate"),
    ({"class": "GenericError", "desc": "x" * 5000}, "x" * 1000),
])
def test_error_replies_of_any_shape(agent: GuestAgent, fake: FakeAgent, error: object, shown: str) -> None:
    fake.handlers["guest-get-host-name"] = lambda args: {"error": error}
    with pytest.raises(AgentError) as info:
        agent.hostname()
    assert info.value.message == f"guest agent: guest-get-host-name failed: {shown}"
    info.value.message.encode("utf-8")
    assert info.value.error_class in ("GenericError",)


# -- kp-ip against a hostile agent -------------------------------------------------------------------


@pytest.fixture
def vm_agent(make_agent: Callable[..., FakeAgent]) -> Iterator[FakeAgent]:
    from tests.fakevm import make_vm

    vm = make_vm("g1")
    fake = make_agent(path=Path(vm.boot["sockets"]["qga"]))
    fake.files["/etc/ssh/ssh_host_ed25519_key.pub"] = bytearray(
        b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHd1bXVkdW11ZHVtdWR1bXVkdW11ZHVtdWR1bXVkdW11 root@g1\n")
    yield fake
    vm.stop()


def test_kp_ip_with_a_working_agent(vm_agent: FakeAgent) -> None:
    from tests.cli import invoke

    result = invoke("kp-ip", "g1", "--timeout", str(ANSWERS))
    assert result.status == 0, result.stderr
    assert result.records[0]["address"] == "10.0.2.15"
    from kodepipe.core.schema import problems

    assert problems(result.records[0], strict=True) == []  # bookkeeping such as set_up stays in the meta
    # an open guest that was never sealed is asked for nothing more; a second kp-ip of the same boot
    # asks for no set-up at all
    def scripts() -> list[list[str]]:
        return [r["arguments"]["arg"][2:] for r in vm_agent.received
                if r["execute"] == "guest-exec" and r["arguments"]["path"] == "/bin/sh"]

    assert scripts() == []
    from kodepipe.core.state import Store

    store = Store()
    folder = store.folder("vm", "g1")
    meta = store.read_meta(folder) or {}
    meta["guest_proxy"] = True  # an earlier boot was sealed: its settings are taken away
    meta["boot"].pop("set_up", None)
    store.write_meta(folder, meta)
    assert invoke("kp-ip", "g1", "--timeout", str(ANSWERS)).status == 0
    assert scripts() == [["kp-proxy", ""]]
    assert (store.read_meta(folder) or {})["guest_proxy"] is False
    assert invoke("kp-ip", "g1", "--timeout", str(ANSWERS)).status == 0
    assert scripts() == [["kp-proxy", ""]]


@pytest.mark.parametrize(("command", "reply", "status", "code"), [
    ("guest-network-get-interfaces", interfaces_reply(address(**{"ip-address": "10.0.2.15\x1b]0;pwned\x07"})),
     1, "guest_agent_bad_reply"),
    ("guest-network-get-interfaces", bad(b'{"return": [{"name": "\xff"}]}\n'), 1, "guest_agent_bad_reply"),
    ("guest-file-open", answer({"handle": 1}), 1, "guest_agent_bad_reply"),
    ("guest-file-read", bad(b'{"return": {"count": 3, "eof": true, "buf-b64": 3}}\n'), 1, "guest_agent_bad_reply"),
    ("guest-network-get-interfaces", lambda args: None, 75, "timeout"),  # never answers: --timeout holds
])
def test_kp_ip_ends_cleanly_whatever_the_agent_answers(vm_agent: FakeAgent, command: str,
                                                      reply: Callable[[dict[str, Any]], Reply],
                                                      status: int, code: str) -> None:
    from tests.cli import invoke

    vm_agent.handlers[command] = reply
    started = time.monotonic()
    result = invoke("kp-ip", "g1", "--timeout", "2")
    hang_guard(started, 2)
    assert result.status == status, result.stderr
    assert result.records[0]["error"]["code"] == code
    assert "Traceback" not in result.stderr and "\x1b" not in result.stderr and "\x07" not in result.stderr
    if code == "timeout":  # ended by --timeout, not by the call's own 10 s
        assert "before the session's deadline (the --timeout)" in result.records[0]["error"]["message"]
