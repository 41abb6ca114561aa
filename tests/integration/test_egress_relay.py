"""The egress relay for real, on the host: relay.pl runs in a network namespace of its own (as it will
in a container's, inside a VM), joined to the host's end (egress.relay) by a pipe, and clients in that
namespace reach kodepipe's proxy only through it.  Only servers this test starts are ever targets."""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import hashlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from kodepipe.egress import mux, relay
from kodepipe.egress import policy as egress_policy
from kodepipe.egress import proxy as egress
from tests import httpd
from tests.test_egress import Origin, ask, decisions, https_get, non_loopback_ipv4, resolving_to, tunnel

pytestmark = pytest.mark.integration

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
WAIT = 60.0  # a generous bound on anything this test waits for


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("a network namespace and nsenter need root")
    for program in ("unshare", "nsenter", "perl"):
        if shutil.which(program) is None:
            pytest.skip(f"{program} is not installed")


def in_netns(pid: int, fn: Callable[[], T]) -> T:
    """fn() in a thread that joined the network namespace of ``pid``: the sockets it makes live there."""
    result: dict[str, Any] = {}

    def run() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            result["value"] = fn()
        except BaseException as exc:
            result["error"] = exc
        finally:
            os.close(fd)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]  # type: ignore[no-any-return]


def listening(pid: int) -> set[str]:
    """What listens (TCP) or is bound (UDP) in the network namespace of ``pid``, from /proc/PID/net."""
    found = set()
    for table, proto in (("tcp", "tcp"), ("tcp6", "tcp"), ("udp", "udp"), ("udp6", "udp")):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if proto == "tcp" and fields[3] != "0A":  # LISTEN
                continue
            hexaddr, hexport = fields[1].split(":")
            raw = bytes.fromhex(hexaddr)
            # the kernel prints each 32-bit word in host (little-endian) order
            packed = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(f"{ipaddress.ip_address(packed)}:{int(hexport, 16)}/{proto}")
    return found


RELAY_PORTS = {"127.0.0.1:3128/tcp", "127.0.0.1:53/udp"}


@pytest.fixture
def netns() -> Iterator[int]:
    """A network namespace with only ``lo`` (up, as in a container), held by a process: its pid."""
    needs_root()
    # it says so once it is in its namespace (Popen returns before unshare has made it) and lo is up
    holder = subprocess.Popen(["unshare", "--net", "sh", "-c", "ip link set lo up && echo ready && exec cat"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert holder.stdout.readline() == b"ready\n"
        assert os.stat(f"/proc/{holder.pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino
        yield holder.pid
    finally:
        holder.stdin.close()
        holder.wait(WAIT)
        holder.stdout.close()


@dataclass
class Relayed:
    pid: int  # the namespace's holder
    relay: relay.Relay
    process: subprocess.Popen[bytes]
    proxy: egress.Proxy
    log: Path
    trace: Path | None


def start_relay(pid: int, channel: relay.Channel, proxy: egress.Proxy) -> relay.Relay:
    session = relay.Relay(proxy, channel)
    session.start()
    session.wait_ready(WAIT)
    return session


def spawn(pid: int, trace: Path | None = None, script: str | None = None) -> tuple[subprocess.Popen[bytes],
                                                                                   relay.PipeChannel]:
    """relay.pl in the namespace of ``pid`` (under strace when ``trace``), on two pipes."""
    argv = relay.relay_argv(pid)
    if script is not None:
        argv[-1] = script
    if trace is not None:
        argv = ["strace", "-f", "-qq", "-e", "trace=connect", "-o", str(trace), *argv]
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdin is not None and process.stdout is not None
    channel = relay.PipeChannel(os.dup(process.stdout.fileno()), os.dup(process.stdin.fileno()))
    process.stdin.close()
    process.stdout.close()
    return process, channel


@pytest.fixture
def origins() -> Iterator[tuple[Origin, Origin]]:
    seen: list[dict[str, Any]] = []
    tls_seen: list[dict[str, Any]] = []
    with httpd.origin("127.0.0.1", "hello from", seen=seen) as port, \
            httpd.origin("127.0.0.1", "tls from", seen=tls_seen, tls=True) as tls_port:
        yield Origin(port, seen), Origin(tls_port, tls_seen)


@contextlib.contextmanager
def relayed(netns: int, tmp_path: Path, allow: list[str], pins: list[str]) -> Iterator[Relayed]:
    """The proxy on the host, relay.pl in the namespace (under strace when it is installed), joined."""
    log_path = tmp_path / "egress.jsonl"
    log = egress.DecisionLog(log_path, "c1")
    proxy = egress.Proxy(egress_policy.Policy.build(allow, pins), log)
    proxy.start(None, None)
    trace = tmp_path / "relay.strace" if shutil.which("strace") else None
    process, channel = spawn(netns, trace)
    session = None
    try:
        session = start_relay(netns, channel, proxy)
        yield Relayed(netns, session, process, proxy, log_path, trace)
    finally:
        if session is not None:
            session.stop(WAIT)
        else:
            channel.shutdown_write()
        try:
            process.wait(WAIT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        proxy.stop()
        log.close()
        channel.close()
        assert process.stderr is not None
        process.stderr.close()


@pytest.fixture
def through(netns: int, tmp_path: Path, origins: tuple[Origin, Origin]) -> Iterator[Relayed]:
    origin, tls_origin = origins
    ports = f"{origin.port},{tls_origin.port}"
    with relayed(netns, tmp_path, [f"allowed.test:{ports}", f"meta.test:{ports}"],
                 ["allowed.test=127.0.0.1", "meta.test=169.254.169.254"]) as running:
        yield running


def logged(log: Path, count: int) -> None:
    """Until the log holds ``count`` decisions (within WAIT seconds)."""
    deadline = time.monotonic() + WAIT
    while len(decisions(log)) < count:
        assert time.monotonic() < deadline, f"fewer than {count} decisions after {WAIT:g} s"
        time.sleep(0.01)


def test_allowed_names_pass_through_the_relay_and_nothing_else_does(through: Relayed,
                                                                     origins: tuple[Origin, Origin]) -> None:
    """From inside the namespace, as from a container on the host: the proxy decides, and logs."""
    origin, tls_origin = origins
    pid = through.pid
    reply = in_netns(pid, lambda: ask(3128, f"GET http://allowed.test:{origin.port}/a HTTP/1.1\r\n\r\n".encode()))
    assert reply.startswith(b"HTTP/1.0 200") and b"hello from /a" in reply
    got = in_netns(pid, lambda: https_get(tunnel(3128, f"allowed.test:{tls_origin.port}"), "allowed.test", "/t"))
    assert b"tls from /t" in got
    # a tunnel's decision is written once the proxy has seen the client's close, which reaches it
    # through the relay after https_get has returned: the next decisions must not overtake it
    logged(through.log, 2)
    for request in (f"GET http://denied.test:{origin.port}/d HTTP/1.1\r\n\r\n",
                    f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\n\r\n",
                    f"CONNECT meta.test:{origin.port} HTTP/1.1\r\n\r\n"):
        data = request.encode()
        assert in_netns(pid, lambda: ask(3128, data)).startswith(b"HTTP/1.1 403"), request  # noqa: B023
    # a TLS tunnel that names another host than it asked for is refused before anything goes upstream
    assert in_netns(pid, lambda: https_get(tunnel(3128, f"allowed.test:{tls_origin.port}"), "evil.test", "/e")) == b""
    assert [s["path"] for s in origin.seen] == ["/a"] and [s["path"] for s in tls_origin.seen] == ["/t"]
    log = decisions(through.log)
    assert [d["decision"] for d in log] == ["allow", "allow", "deny", "deny", "deny", "deny"]
    assert log[1]["method"] == "CONNECT" and log[1]["sni"] == "allowed.test" and log[1]["bytes_down"] > 0
    assert "not on the allowlist" in log[2]["reason"] and "raw IP" in log[3]["reason"]
    assert "forbidden" in log[4]["reason"] and log[5]["sni"] == "evil.test"
    assert all(d["container"] == "c1" for d in log)


def test_the_relay_serves_the_ipv6_loopback_too(through: Relayed, origins: tuple[Origin, Origin]) -> None:
    """A namespace with ::1 (a container's, with IPv6 on) gets the proxy there as well."""
    origin, _ = origins
    if "::1:3128/tcp" not in through.relay.listeners:
        pytest.skip("this namespace has no ::1")

    def get() -> bytes:
        with socket.create_connection(("::1", 3128), timeout=WAIT) as s:
            s.sendall(f"GET http://allowed.test:{origin.port}/six HTTP/1.1\r\n\r\n".encode())
            got = b""
            while chunk := s.recv(65536):
                got += chunk
        return got

    assert b"hello from /six" in in_netns(through.pid, get)
    assert [d["decision"] for d in decisions(through.log)] == ["allow"]


def test_names_that_lead_to_the_hosts_loopback_or_own_addresses_are_refused_through_the_relay(
        netns: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The host's refusals hold for the relay's streams: an allowed name that resolves to loopback
    (unpinned) or to one of the host's own addresses is refused, over HTTP, CONNECT and DNS."""
    import dns.message
    import dns.rcode

    own = non_loopback_ipv4()
    seen: list[dict[str, Any]] = []
    with httpd.origin("0.0.0.0", "host service", seen=seen) as port:  # noqa: S104 - every address of the host
        resolving_to(monkeypatch, "sneaky.test", "127.0.0.1")
        resolving_to(monkeypatch, "own.test", own)
        with relayed(netns, tmp_path, [f"sneaky.test:{port}", f"own.test:{port}"], []) as running:
            def attempts() -> list[bytes]:
                replies = [ask(3128, f"GET http://{name}:{port}/x HTTP/1.1\r\n\r\n".encode())
                           for name in ("sneaky.test", "own.test")]
                replies += [ask(3128, f"CONNECT {name}:{port} HTTP/1.1\r\n\r\n".encode())
                            for name in ("sneaky.test", "own.test")]
                for name in ("sneaky.test", "own.test"):
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                        s.settimeout(WAIT)
                        s.sendto(dns.message.make_query(name, "A").to_wire(), ("127.0.0.1", 53))
                        replies.append(dns.rcode.to_text(dns.message.from_wire(s.recv(4096)).rcode()).encode())
                return replies

            replies = in_netns(running.pid, attempts)
    assert [r[:12] for r in replies] == [b"HTTP/1.1 403"] * 4 + [b"REFUSED"] * 2
    assert seen == []
    log = decisions(running.log)
    assert [d["decision"] for d in log] == ["deny"] * 6
    assert ["loopback" in d["reason"] for d in log] == [True, False, True, False, True, False]
    assert ["this host's own" in d["reason"] for d in log] == [False, True, False, True, False, True]


def test_dns_through_the_relay_answers_only_allowed_names(through: Relayed) -> None:
    import dns.message
    import dns.rcode

    def query(name: str, server: str = "127.0.0.1") -> Any:
        family = socket.AF_INET6 if ":" in server else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.settimeout(WAIT)
            s.sendto(dns.message.make_query(name, "A").to_wire(), (server, 53))
            return dns.message.from_wire(s.recv(4096))

    ok = in_netns(through.pid, lambda: query("allowed.test"))
    assert ok.rcode() == dns.rcode.NOERROR and "127.0.0.1" in ok.answer[0].to_text()
    assert in_netns(through.pid, lambda: query("denied.test")).rcode() == dns.rcode.REFUSED
    assert in_netns(through.pid, lambda: query("meta.test")).rcode() == dns.rcode.REFUSED  # a metadata address
    expected = [("allowed.test", "allow"), ("denied.test", "deny"), ("meta.test", "deny")]
    if "::1:53/udp" in through.relay.listeners:
        assert in_netns(through.pid, lambda: query("denied.test", "::1")).rcode() == dns.rcode.REFUSED
        expected.append(("denied.test", "deny"))
    assert [(d["host"], d["decision"]) for d in decisions(through.log)] == expected


def test_nothing_but_the_relays_ports_is_reachable(through: Relayed, origins: tuple[Origin, Origin]) -> None:
    """The namespace holds the relay's sockets and nothing else; the host's loopback services and its
    other addresses are out of reach; and the relay itself never connects anywhere."""
    origin, _ = origins
    assert RELAY_PORTS <= set(through.relay.listeners) <= RELAY_PORTS | {"::1:3128/tcp", "::1:53/udp"}
    assert listening(through.pid) == set(through.relay.listeners)

    def attempts() -> list[str]:
        outcomes = []
        for address in [("127.0.0.1", origin.port), ("127.0.0.1", 22), *host_addresses(origin.port)]:
            try:
                socket.create_connection(address, timeout=5).close()
                outcomes.append(f"{address}: connected")
            except OSError:
                pass
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            try:
                udp.sendto(b"x", ("192.0.2.1", 53))
                outcomes.append("udp out: sent")
            except OSError:
                pass
        return outcomes

    assert in_netns(through.pid, attempts) == []
    # the proxy port works (so the refusals above are the namespace's, not a broken setup)
    assert in_netns(through.pid, lambda: ask(3128, f"GET http://allowed.test:{origin.port}/ok HTTP/1.1\r\n\r\n"
                                            .encode())).startswith(b"HTTP/1.0 200")
    if through.trace is not None:
        through.relay.stop()
        through.process.wait(WAIT)
        assert "connect(" not in through.trace.read_text()


def host_addresses(port: int) -> list[tuple[str, int]]:
    out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=True).stdout
    return [(line.split()[3].split("/")[0], port) for line in out.splitlines() if " lo " not in line]


class Bulk:
    """An origin for volume: GET /N answers N bytes of a pattern; POST answers the sha256 of its body."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                head += chunk
            head, body = head.split(b"\r\n\r\n", 1)
            method, path = head.split(b" ")[:2]
            if method == b"POST":
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                digest = hashlib.sha256(body)
                left = length - len(body)
                while left:
                    chunk = conn.recv(min(left, 1 << 20))
                    if not chunk:
                        return
                    digest.update(chunk)
                    left -= len(chunk)
                answer = digest.hexdigest().encode()
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
            else:
                size = int(path.strip(b"/"))
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
                block = pattern(1 << 20)
                for at in range(0, size, len(block)):
                    conn.sendall(block[:min(len(block), size - at)])

    def close(self) -> None:
        self.server.close()


def pattern(size: int) -> bytes:
    return bytes(range(251)) * (size // 251) + bytes(range(size % 251))


def test_volume_both_ways_and_many_streams_at_once(netns: int, tmp_path: Path) -> None:
    """Megabytes each way within the streams' credit windows, and 100 connections at once: every byte
    arrives, in order, and the relay's buffers stay bounded (it would die on a frame beyond a window)."""
    bulk = Bulk()
    try:
        with relayed(netns, tmp_path, [f"bulk.test:{bulk.port}"], ["bulk.test=127.0.0.1"]) as through:
            size = 24 << 20

            def download() -> bytes:
                got = ask(3128, f"GET http://bulk.test:{bulk.port}/{size} HTTP/1.1\r\n\r\n".encode())
                return got.split(b"\r\n\r\n", 1)[1]

            body = in_netns(through.pid, download)
            assert len(body) == size and body == pattern(1 << 20) * 24
            upload = os.urandom(9 << 20)
            reply = in_netns(through.pid, lambda: ask(3128, f"POST http://bulk.test:{bulk.port}/up HTTP/1.1\r\n"
                                                      f"Content-Length: {len(upload)}\r\n\r\n".encode() + upload))
            assert reply.endswith(hashlib.sha256(upload).hexdigest().encode())

            def many() -> list[bool]:
                def one(n: int) -> bool:
                    got = ask(3128, f"GET http://bulk.test:{bulk.port}/{1000 + n} HTTP/1.1\r\n\r\n".encode())
                    return got.split(b"\r\n\r\n", 1)[1] == pattern(1000 + n)

                with concurrent.futures.ThreadPoolExecutor(100) as pool:
                    return list(pool.map(one, range(100)))

            assert all(in_netns(through.pid, many))
            assert through.relay.reason is None
            assert sum(d["decision"] == "allow" for d in decisions(through.log)) == 102
    finally:
        bulk.close()


HOST_SIDE = """
import os, socket, sys
from pathlib import Path
from kodepipe.egress import policy, proxy, relay
log = proxy.DecisionLog(Path(sys.argv[2]), "c1")
channel = relay.SocketChannel(socket.socket(fileno=int(sys.argv[1])))
with relay.serving(channel, policy.Policy.build([sys.argv[3]], [sys.argv[4]]), log):
    print("ready", flush=True)
    sys.stdin.read()
"""


def test_killing_the_host_side_ends_the_relay_and_its_ports(netns: int, tmp_path: Path,
                                                             origins: tuple[Origin, Origin]) -> None:
    """The host's end dies (SIGKILL: nothing of it runs): the relay reads EOF, exits, and the namespace
    is left with nothing listening: it fails closed."""
    origin, _ = origins
    ours, theirs = socket.socketpair()
    with ours, theirs:
        process = subprocess.Popen(relay.relay_argv(netns), stdin=ours.fileno(), stdout=ours.fileno(),
                                   stderr=subprocess.PIPE)
        host = subprocess.Popen([sys.executable, "-c", HOST_SIDE, str(theirs.fileno()), str(tmp_path / "log"),
                                 f"allowed.test:{origin.port}", "allowed.test=127.0.0.1"],
                                pass_fds=[theirs.fileno()], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                cwd=Path(__file__).parents[2])
    try:
        assert host.stdout is not None
        assert host.stdout.readline() == b"ready\n"
        assert in_netns(netns, lambda: ask(3128, f"GET http://allowed.test:{origin.port}/k HTTP/1.1\r\n\r\n"
                                           .encode())).startswith(b"HTTP/1.0 200")
        assert listening(netns) >= RELAY_PORTS
        host.send_signal(signal.SIGKILL)
        host.wait(WAIT)
        assert process.wait(WAIT) == 0
        assert listening(netns) == set()
        with pytest.raises(ConnectionRefusedError):
            in_netns(netns, lambda: socket.create_connection(("127.0.0.1", 3128), timeout=5))
    finally:
        for p in (host, process):
            if p.poll() is None:
                p.kill()
                p.wait()
        assert process.stderr is not None and host.stdin is not None and host.stdout is not None
        process.stderr.close()
        host.stdin.close()
        host.stdout.close()


@pytest.mark.parametrize(("frame", "message"), [
    (mux.HEADER.pack(9, 1, 0), "a frame of kind 9"),
    (mux.HEADER.pack(mux.Kind.OPEN, 1, 0), "a frame of kind 2"),  # only the guest opens streams
    (mux.HEADER.pack(mux.Kind.DATA, 1, 20000), "a frame of 20000 bytes"),
    (mux.encode(mux.Kind.DATA, 7, b"x"), "stream 7, which was never opened"),
    (mux.encode(mux.Kind.DNS, 3, b"answer"), "a DNS answer to no query"),
])
def test_a_bad_frame_from_the_host_ends_the_relay(netns: int, frame: bytes, message: str) -> None:
    process, channel = spawn(netns)
    try:
        decoder = mux.Decoder()
        (ready,) = decoder.feed(channel.recv(4096))
        assert ready.kind is mux.Kind.READY and listening(netns) >= RELAY_PORTS
        channel.sendall(frame)
        assert process.wait(WAIT) != 0
        assert process.stderr is not None and message in process.stderr.read().decode()
        assert listening(netns) == set()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        channel.close()
        assert process.stderr is not None
        process.stderr.close()
