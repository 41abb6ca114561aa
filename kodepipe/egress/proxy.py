"""The egress proxy: a container's only way out, by domain name.

A container run with ``--allow`` still has no network of its own: its
network namespace holds only ``lo``.  kp-run creates two sockets *inside*
that namespace from the host (setns in a short-lived thread; a socket stays
in the namespace it was made in): a TCP listener on 127.0.0.1:3128 for HTTP
proxying and a UDP socket on 127.0.0.1:53 for DNS.  They are served by this
module's asyncio loop, which runs in kp-run on the host and connects out
from the host's namespace.  Hence:

- nothing but the sandbox can reach the proxy (the listener exists in no
  other namespace), and the sandbox can reach nothing but the proxy;
- it fails closed: if the proxy (or kp-run) dies, its sockets close, and
  the container is left with a loopback interface and nothing else;
- names are checked, never addresses: a raw IP is refused, and a name is
  resolved on the host, where addresses in link-local and cloud-metadata
  ranges, and loopback or any of the host's own addresses (unless the name
  was pinned with --resolve), are refused too;
- plain HTTP (an absolute http:// URL) carries exactly one request per
  connection: its head, with the Host header set to the checked host and
  ``Connection: close``, and exactly the body it declares; ambiguous
  framing (Content-Length and Transfer-Encoding, two Content-Lengths, a
  malformed chunk) is refused, and whatever the client sends after that
  one request is dropped, never forwarded;
- CONNECT, on every port, carries TLS only: the tunnel opens upstream only
  once a complete ClientHello (reassembled across TCP segments and TLS
  records, at most HELLO_LIMIT bytes within HELLO_TIMEOUT seconds) names
  the host that was asked for in its SNI.  Anything else (another protocol,
  a garbled, truncated or SSLv2-style hello, no SNI, two names, an
  encrypted ClientHello) is refused: nothing unchecked leaves;
- DNS answers only allowed names (with their permitted addresses); others
  get REFUSED.

What it cannot see: inside a TLS tunnel to an allowed name, the encrypted
HTTP Host header, so a front end that serves other sites behind the same
name (domain fronting by Host) is reachable through it.

Every decision is a JSON line in the run's folder (out of the agent's
reach): {"kind": "egress", "decision": "allow"|"deny"|"error", "method",
"host", "port", "address", "sni", "reason", "bytes_up", "bytes_down",
"dropped" (bytes after the one request, not forwarded), "seconds", "container", "ts"}.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from kodepipe.core.errors import BadInput, KpError

PROXY_PORT = 3128
DNS_PORT = 53
DEFAULT_PORTS = (80, 443)
HEAD_LIMIT = 64 * 1024  # bytes of a request head (and of a chunked body's trailers)
HEAD_TIMEOUT = 30.0
HELLO_LIMIT = 64 * 1024  # bytes of TLS records held while a ClientHello is incomplete (real ones: < 4 KiB)
HELLO_TIMEOUT = 30.0  # seconds from the CONNECT reply to a complete ClientHello
READ_SIZE = 1 << 18
CONNECT_TIMEOUT = 10.0
MAX_CONNECTIONS = 400
CLONE_NEWNET = 0x40000000

# never a destination, whatever name leads there
BLOCKED = [ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4", "100.100.100.200/32", "168.63.129.16/32",
    "192.0.0.192/32", "::/128", "fe80::/10", "ff00::/8", "fd00:ec2::254/128")]
NAT64 = ipaddress.ip_network("64:ff9b::/96")
MAX_DNS_INFLIGHT = 32
LOG_LIMIT = 64 << 20  # bytes of decisions per run; then one last line says the rest was dropped

_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_NAME_RE = re.compile(rf"(\*\.)?{_LABEL}(\.{_LABEL})*")


class Denied(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Rule:
    pattern: str  # "example.com" or "*.example.com"
    ports: tuple[int, ...]

    def matches(self, host: str, port: int | None) -> bool:
        if port is not None and port not in self.ports:
            return False
        if self.pattern.startswith("*."):
            return host.endswith(self.pattern[1:]) and len(host) > len(self.pattern) - 1
        return host == self.pattern


def parse_rule(text: str) -> Rule:
    """DOMAIN, *.DOMAIN, or either with :PORT[,PORT...] (default ports 80 and 443)."""
    spec = text.strip().lower().rstrip(".")
    host, sep, ports_text = spec.partition(":")
    host = host.rstrip(".")
    if not _NAME_RE.fullmatch(host) or "." not in host.lstrip("*."):
        raise BadInput(f"--allow {text!r}: not a domain name (e.g. api.example.com or *.example.com)")
    ports: tuple[int, ...] = DEFAULT_PORTS
    if sep:
        try:
            ports = tuple(int(p) for p in ports_text.split(","))
        except ValueError:
            raise BadInput(f"--allow {text!r}: ports must be numbers, e.g. example.com:443,8443") from None
        if not all(0 < p < 65536 for p in ports):
            raise BadInput(f"--allow {text!r}: a port must be between 1 and 65535")
    return Rule(host, ports)


def read_rules(path: Path) -> list[str]:
    """Allowlist lines from a file: one rule per line, # comments."""
    from kodepipe.core.records import decode_text, open_regular

    try:  # a regular file only, and only its first MiB: never /dev/zero, a FIFO or a directory
        with open_regular(str(path), "--allow-file") as handle:
            data = handle.read((1 << 20) + 1)
    except KpError as exc:
        raise BadInput(exc.message) from None
    if len(data) > 1 << 20:
        raise BadInput(f"--allow-file {path} is larger than 1 MiB: is it the right file?")
    rules = []
    for number, line in enumerate(data.splitlines(), start=1):
        try:
            rule = decode_text(line, number).split("#", 1)[0].strip()
        except BadInput as exc:
            raise BadInput(f"--allow-file {path}: {exc.message}") from None
        if rule:
            rules.append(rule)
    return rules


def parse_pin(text: str) -> tuple[str, str]:
    """NAME=ADDRESS for --resolve."""
    name, sep, addr = text.partition("=")
    name = name.strip().lower().rstrip(".")
    try:
        ipaddress.ip_address(addr.strip())
    except ValueError:
        raise BadInput(f"--resolve {text!r}: use NAME=ADDRESS, e.g. git.internal=10.0.0.5") from None
    if not sep or not _NAME_RE.fullmatch(name) or name.startswith("*."):
        raise BadInput(f"--resolve {text!r}: use NAME=ADDRESS, e.g. git.internal=10.0.0.5")
    return name, addr.strip()


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


@dataclass
class Policy:
    rules: list[Rule]
    pins: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def build(cls, allow: Iterable[str], pins: Iterable[str] = ()) -> Policy:
        pinned: dict[str, list[str]] = {}
        for name, addr in map(parse_pin, pins):
            pinned.setdefault(name, []).append(addr)
        return cls([parse_rule(a) for a in allow], pinned)

    def allowed(self, host: str, port: int | None) -> bool:
        return any(rule.matches(host, port) for rule in self.rules)

    def check(self, host: str, port: int | None) -> str:
        """The host, normalised, or Denied with the reason."""
        host = host.strip().lower().rstrip(".")
        if is_address(host):
            raise Denied("a raw IP address: only names on the allowlist are reachable")
        if not _NAME_RE.fullmatch(host):
            raise Denied("not a valid host name")
        if not self.allowed(host, None):
            raise Denied("not on the allowlist")
        if port is not None and not self.allowed(host, port):
            raise Denied(f"port {port} is not allowed for this host")
        return host

    def addresses(self, host: str, port: int) -> list[str]:
        """The permitted addresses of an allowed host (Denied if none is)."""
        pinned = host in self.pins
        if pinned:
            candidates = list(self.pins[host])
        else:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise Denied(f"does not resolve: {exc.strerror}") from None
            candidates = list(dict.fromkeys(str(info[4][0]) for info in infos))
        good, bad = [], []
        for addr in candidates:
            if forbidden(addr, allow_loopback=pinned):
                loopback = _unwrap(ipaddress.ip_address(addr)).is_loopback
                bad.append(f"{addr}: {'loopback' if loopback else 'link-local, metadata, multicast or reserved'}")
                continue
            if not pinned:
                # the host's own addresses, on any interface, lead to its services as loopback does
                try:
                    own = host_address(addr)
                except OSError as exc:
                    raise Denied(f"could not ask the kernel whether {addr} is this host's own address: "
                                 f"{exc.strerror or exc}") from None
                if own:
                    bad.append(f"{addr}: this host's own")
                    continue
            good.append(addr)
        if not good:
            raise Denied(f"resolves only to forbidden addresses ({'; '.join(bad)})")
        return good


def _unwrap(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The IPv4 address inside an IPv4-mapped, 6to4 or NAT64 IPv6 address; else the address itself."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour
        if inner is None and ip in NAT64:
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if inner is not None:
            return inner
    return ip


def forbidden(addr: str, *, allow_loopback: bool = False) -> bool:
    """True for addresses no name may lead to: link-local (cloud metadata), multicast,
    unspecified, reserved, and loopback unless allowed; IPv4 inside IPv6 forms is unwrapped."""
    ip = _unwrap(ipaddress.ip_address(addr))
    if ip.is_loopback:
        return not allow_loopback
    return (ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved
            or any(ip in net for net in BLOCKED))


# rtnetlink (linux/rtnetlink.h): ask the kernel how it would route an address, as `ip route get` does
_RTM_NEWROUTE, _RTM_GETROUTE, _NLMSG_ERROR, _NLM_F_REQUEST, _RTA_DST = 24, 26, 2, 1, 1
_RTN_LOCAL, _RTN_BROADCAST, _RTN_ANYCAST = 2, 3, 4
_NO_ROUTE = (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EACCES)


def route_type(addr: str) -> int | None:
    """The type (RTN_*) of the kernel's route to ``addr`` in this thread's network namespace, or
    None when there is no route there.  OSError when the kernel cannot be asked."""
    ip = ipaddress.ip_address(addr)
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    body = struct.pack("=BBBBBBBBI", family, ip.max_prefixlen, 0, 0, 0, 0, 0, 0, 0)
    body += struct.pack("=HH", 4 + len(ip.packed), _RTA_DST) + ip.packed  # 4 or 16 bytes: aligned
    message = struct.pack("=IHHII", 16 + len(body), _RTM_GETROUTE, _NLM_F_REQUEST, 1, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as nl:
        nl.settimeout(5)
        nl.sendto(message, (0, 0))
        reply = nl.recv(65536)
    if len(reply) < 16 + 12:
        raise OSError("a short reply from rtnetlink")
    kind = struct.unpack_from("=H", reply, 4)[0]
    if kind == _NLMSG_ERROR:
        code = -struct.unpack_from("=i", reply, 16)[0]
        if code in _NO_ROUTE:
            return None
        raise OSError(code, os.strerror(code))
    if kind != _RTM_NEWROUTE:
        raise OSError(f"an unexpected reply from rtnetlink (type {kind})")
    return reply[16 + 7]  # struct rtmsg's rtm_type


def host_address(addr: str) -> bool:
    """True when the kernel delivers packets for ``addr`` to this host itself: any address of any
    of its interfaces (and broadcast, anycast and local routes), read fresh for each lookup."""
    return route_type(str(_unwrap(ipaddress.ip_address(addr)))) in (_RTN_LOCAL, _RTN_BROADCAST, _RTN_ANYCAST)


class DecisionLog:
    def __init__(self, path: Path, container: str) -> None:
        self.path, self.container = path, container
        self._file: IO[bytes] = open(path, "ab")  # noqa: SIM115 - closed by close()
        self.counts = {"allow": 0, "deny": 0, "error": 0}
        self.written = 0

    def write(self, **fields: Any) -> None:
        decision = fields.get("decision", "error")
        self.counts[decision] = self.counts.get(decision, 0) + 1
        if self.written >= LOG_LIMIT:
            return  # counted, not written: a flood must not fill the host's disk
        record = {"kind": "egress", "ts": round(time.time(), 6), "container": self.container, **fields}
        line = orjson.dumps(record) + b"\n"
        self.written += len(line)
        if self.written >= LOG_LIMIT:
            line = orjson.dumps({"kind": "egress", "ts": record["ts"], "container": self.container,
                                 "decision": "error", "reason": "log full: later decisions are only counted"}) + b"\n"
        self._file.write(line)
        self._file.flush()

    def close(self) -> None:
        self._file.close()


# -- the sockets inside the sandbox ---------------------------------------------------------------


def sockets_in_netns(pid: int) -> tuple[socket.socket, socket.socket]:
    """A TCP listener on 127.0.0.1:PROXY_PORT and a UDP socket on 127.0.0.1:DNS_PORT, made
    inside the network namespace of process ``pid`` (a container's init)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    result: dict[str, Any] = {}

    def make() -> None:
        target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                result["error"] = OSError(err, os.strerror(err))
                return
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind(("127.0.0.1", PROXY_PORT))
            tcp.listen(512)
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("127.0.0.1", DNS_PORT))
            result["sockets"] = (tcp, udp)
        except OSError as exc:
            result["error"] = exc
        finally:
            os.close(target)

    # setns changes only the calling thread, and this thread ends right after
    thread = threading.Thread(target=make, name="kp-netns")
    thread.start()
    thread.join()
    if "error" in result:
        raise OSError(f"could not open the proxy's sockets in the container: {result['error']}")
    return result["sockets"]  # type: ignore[no-any-return]


def container_env(host: str = "127.0.0.1", port: int = PROXY_PORT) -> dict[str, str]:
    url = f"http://{host}:{port}"
    env = {"HTTP_PROXY": url, "HTTPS_PROXY": url, "NO_PROXY": "localhost,127.0.0.1,::1"}
    env.update({k.lower(): v for k, v in env.items()})
    return env


RESOLV_CONF = "nameserver 127.0.0.1\noptions ndots:0 attempts:1 timeout:2\n"


# -- the proxy ----------------------------------------------------------------------------------------


class Proxy:
    """Serves one sandbox's sockets on an asyncio loop in a thread of its own."""

    def __init__(self, policy: Policy, log: DecisionLog) -> None:
        self.policy, self.log = policy, log
        self.loop = asyncio.new_event_loop()
        self.thread: threading.Thread | None = None
        self.active = 0
        self._ready = threading.Event()
        self._servers: list[Any] = []
        # the loop holds tasks only weakly, and once a client has half-closed, nothing else may hold a
        # connection's task, its streams and transports: the garbage collector would end it mid-flight
        self.tasks: set[asyncio.Task[Any]] = set()

    def start(self, tcp: socket.socket, udp: socket.socket | None) -> None:
        def main() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self._open(tcp, udp))
            self._ready.set()
            self.loop.run_forever()
            for server in self._servers:
                server.close()
            # connections still open when the sandbox ends are cut, and logged as such
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.close()

        self.thread = threading.Thread(target=main, name="kp-egress", daemon=True)
        self.thread.start()
        self._ready.wait(10)

    async def _open(self, tcp: socket.socket, udp: socket.socket | None) -> None:
        tcp.setblocking(False)
        server = await asyncio.start_server(self._handle, sock=tcp, limit=HEAD_LIMIT)
        self._servers.append(server)
        if udp is not None:
            udp.setblocking(False)
            transport, _ = await self.loop.create_datagram_endpoint(lambda: _Dns(self), sock=udp)
            self._servers.append(transport)

    def stop(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    # -- HTTP ----------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        started = time.monotonic()
        fields: dict[str, Any] = {"method": None, "host": None, "port": None}
        # what the client was last told: nothing yet, a tunnel (it speaks TLS now), or a response
        said = {"tunnel": False, "tls": False, "response": False}
        self.active += 1
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)

        def seconds() -> float:
            return round(time.monotonic() - started, 6)

        try:
            if self.active > MAX_CONNECTIONS:
                raise Denied("too many connections at once")
            try:
                async with asyncio.timeout(HEAD_TIMEOUT):  # a deadline, without a task of its own
                    head = await reader.readuntil(b"\r\n\r\n")
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                raise BadRequest("no complete request") from None
            request = parse_request(head)
            fields.update(method=request.method, host=request.host, port=request.port)
            host = self.policy.check(request.host, request.port)
            if host in self.policy.pins:  # no lookup: no need to leave the loop
                addrs = self.policy.addresses(host, request.port)
            else:
                addrs = await self.loop.run_in_executor(None, self.policy.addresses, host, request.port)
            if request.method == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                said["tunnel"] = True
                await writer.drain()
                # nothing goes upstream, not even a connection, before the ClientHello names this host
                hello, sni = await self._client_hello(reader, said, fields)
                if sni.lower().rstrip(".") != host:
                    raise Denied(f"TLS server name {sni!r} is not the host asked for")
                upstream_r, upstream_w, fields["address"] = await self._connect(addrs, request.port)
                upstream_w.write(hello)
                up, down = await _pipe(reader, writer, upstream_r, upstream_w)
                up += len(hello)
            else:
                upstream_r, upstream_w, fields["address"] = await self._connect(addrs, request.port)
                up, down, dropped = await _one_request(reader, writer, upstream_r, upstream_w, request, said)
                if dropped:
                    fields["dropped"] = dropped
            self.log.write(decision="allow", bytes_up=up, bytes_down=down, seconds=seconds(), **fields)
        except Denied as exc:
            self.log.write(decision="deny", reason=exc.reason, seconds=seconds(), **fields)
            with contextlib.suppress(OSError):
                await self._refuse(writer, said, 403, "Forbidden",
                                   f"kodepipe: {fields.get('host')} is not reachable from this sandbox: {exc.reason}\n")
        except BadRequest as exc:
            self.log.write(decision="error", reason=str(exc), seconds=seconds(), **fields)
            with contextlib.suppress(OSError):
                await self._refuse(writer, said, 400, "Bad Request", f"kodepipe: {exc}\n")
        except OSError as exc:
            self.log.write(decision="error", reason=f"upstream: {exc.strerror or exc}", seconds=seconds(), **fields)
            with contextlib.suppress(OSError):
                await self._refuse(writer, said, 502, "Bad Gateway",
                                   f"kodepipe: could not reach {fields.get('host')}\n")
        except asyncio.CancelledError:
            # the sandbox ended: logged, and not raised on: asyncio's start_server callback prints a
            # traceback for a cancelled connection task (Python < 3.12); the loop is stopping anyway
            self.log.write(decision="error", reason="cut: the sandbox ended", seconds=seconds(), **fields)
        finally:
            self.active -= 1
            self.tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _client_hello(self, reader: asyncio.StreamReader, said: dict[str, bool],
                            fields: dict[str, Any]) -> tuple[bytes, str]:
        """The bytes of a complete TLS ClientHello (and whatever came with it) and its server name;
        Denied for anything else, within HELLO_LIMIT bytes and HELLO_TIMEOUT seconds."""
        hello = HelloBuffer()

        async def collect() -> str:
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    raise BadHello("the client closed before a complete ClientHello")
                said["tls"] = (hello.data[:1] or data[:1]) == b"\x16"  # then a refusal is a TLS alert
                name = hello.feed(data)
                if name is not None:
                    return name

        try:
            async with asyncio.timeout(HELLO_TIMEOUT):
                sni = await collect()
        except TimeoutError:
            raise Denied(f"no complete TLS ClientHello within {HELLO_TIMEOUT:g} s: a tunnel carries only TLS "
                         "that names the host") from None
        except BadHello as exc:
            raise Denied(f"a tunnel carries only TLS that names the host: {exc}") from None
        fields["sni"] = sni
        return bytes(hello.data), sni

    async def _connect(self, addrs: list[str], port: int) -> tuple[Any, Any, str]:
        last: OSError | None = None
        for addr in addrs:
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    r, w = await asyncio.open_connection(addr, port)
                return r, w, addr
            except (TimeoutError, OSError) as exc:
                last = exc if isinstance(exc, OSError) else OSError(f"timed out connecting to {addr}")
        raise last or OSError("no address")

    @staticmethod
    async def _refuse(writer: asyncio.StreamWriter, said: dict[str, bool], code: int, reason: str,
                      body: str) -> None:
        if said["response"]:
            return  # part of the upstream's response went out already: only closing is left
        if said["tunnel"] and said["tls"]:
            # the client speaks TLS by now: a fatal access_denied alert, which it can read
            writer.write(b"\x15\x03\x01\x00\x02\x02\x31")
            await writer.drain()
            return
        data = body.encode()
        writer.write(f"HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(data)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + data)
        await writer.drain()

    # -- DNS -----------------------------------------------------------------------------------

    def answer_dns(self, query: bytes) -> bytes | None:
        import dns.flags
        import dns.message
        import dns.rcode
        import dns.rdatatype
        import dns.rrset

        try:
            msg = dns.message.from_wire(query)
        except Exception:
            return None
        reply = dns.message.make_response(msg)
        reply.flags |= dns.flags.RA
        for question in msg.question:
            name = question.name.to_text().rstrip(".").lower()
            qtype = dns.rdatatype.to_text(question.rdtype)
            try:
                host = self.policy.check(name, None)
                addrs = self.policy.addresses(host, 443)
            except Denied as exc:
                reply.set_rcode(dns.rcode.REFUSED)
                self.log.write(decision="deny", method="DNS", host=name, qtype=qtype, reason=exc.reason)
                return reply.to_wire()
            want = {"A": 4, "AAAA": 6}.get(qtype)
            chosen = [a for a in addrs if ipaddress.ip_address(a).version == want]
            if chosen:
                reply.answer.append(dns.rrset.from_text_list(question.name, 60, "IN", qtype, chosen))
            self.log.write(decision="allow", method="DNS", host=name, qtype=qtype, addresses=chosen)
        return reply.to_wire()


class _Dns(asyncio.DatagramProtocol):
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.transport: Any = None
        self.inflight = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        loop = self.proxy.loop
        if self.inflight >= MAX_DNS_INFLIGHT:
            return  # dropped, as a busy resolver would: the client retries
        self.inflight += 1

        async def answer() -> None:
            try:
                reply = await loop.run_in_executor(None, self.proxy.answer_dns, data)
                if reply is not None:
                    self.transport.sendto(reply, addr)
            finally:
                self.inflight -= 1

        task = loop.create_task(answer())
        self.proxy.tasks.add(task)
        task.add_done_callback(self.proxy.tasks.discard)


class BadRequest(Exception):
    pass


class BadHello(Exception):
    pass


_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_RE = re.compile(rb"([A-Z]{3,10}) ([\x21-\x7e]+) HTTP/1\.[01]")
_HEADER_RE = re.compile(rb"(" + _TOKEN + rb"):([ \t\x21-\x7e\x80-\xff]*)")
_URL_RE = re.compile(r"http://(\[[0-9a-fA-F:.]+\]|[^/:\s]+)(?::(\d+))?(/\S*)?$")
_CHUNK_RE = re.compile(rb"([0-9A-Fa-f]{1,15})\r\n")
# hop-by-hop: not forwarded (Upgrade would turn the connection into an unchecked stream)
_HOP = (b"proxy-", b"connection", b"host", b"keep-alive", b"upgrade", b"te")


@dataclass(frozen=True)
class Request:
    method: str
    host: str
    port: int
    head: bytes = b""  # what goes upstream: the request line and headers (nothing for CONNECT)
    length: int = 0  # the body's bytes, from Content-Length
    chunked: bool = False  # the body is chunked (then length is 0)


def parse_request(head: bytes) -> Request:
    """A proxy request from its head (ending in an empty line), or BadRequest.  The framing must be
    unambiguous: one Content-Length, or Transfer-Encoding: chunked alone, or neither (no body)."""
    lines = head.split(b"\r\n")
    if len(lines) < 3 or lines[-2:] != [b"", b""]:
        raise BadRequest("a request head ends with an empty line")
    m = _REQUEST_RE.fullmatch(lines[0])
    if m is None:
        raise BadRequest("not an HTTP/1 proxy request")
    method, target = m.group(1).decode(), m.group(2).decode("latin-1")
    headers: list[tuple[bytes, bytes, bytes]] = []
    for line in lines[1:-2]:
        h = _HEADER_RE.fullmatch(line)
        if h is None:
            # folded lines, a space before the colon, bare CR or LF, NUL: read differently by different servers
            raise BadRequest("a malformed header line")
        headers.append((h.group(1).lower(), h.group(2).strip(b" \t"), line))
    if method == "CONNECT":
        host, sep, port_text = target.rpartition(":")
        if not sep or not port_text.isdigit():
            raise BadRequest("CONNECT needs host:port")
        return Request(method, host.strip("[]"), int(port_text))
    u = _URL_RE.match(target)
    if u is None:
        raise BadRequest("a proxy request needs an absolute http:// URL (https goes through CONNECT)")
    host, port, path = u.group(1).strip("[]"), int(u.group(2) or 80), u.group(3) or "/"
    lengths = [value for name, value, _ in headers if name == b"content-length"]
    codings = [value for name, value, _ in headers if name == b"transfer-encoding"]
    if lengths and codings:
        raise BadRequest("both Content-Length and Transfer-Encoding: ambiguous framing")
    if len(lengths) > 1 or len(codings) > 1:
        raise BadRequest("more than one Content-Length or Transfer-Encoding: ambiguous framing")
    if lengths and not re.fullmatch(rb"[0-9]{1,18}", lengths[0]):
        raise BadRequest("a Content-Length that is not one number")
    if codings and codings[0].lower() != b"chunked":
        raise BadRequest("a Transfer-Encoding other than chunked")
    # the Host header is the checked one: a different Host would reach another site behind a shared front end
    kept = [line for name, _, line in headers if not name.startswith(_HOP[0]) and name not in _HOP[1:]]
    first = f"{method} {path} HTTP/1.1".encode("latin-1")
    host_header = f"Host: {host}" + ("" if port == 80 else f":{port}")
    forward = b"\r\n".join([first, host_header.encode("latin-1"), *kept, b"Connection: close", b"", b""])
    return Request(method, host, port, forward, int(lengths[0]) if lengths else 0, bool(codings))


# -- TLS: the server name of a ClientHello ----------------------------------------------------------

_ECH = (0xFE0D, 0xFFCE)  # encrypted_client_hello, and the older encrypted_server_name


class HelloBuffer:
    """Collects TLS records until they hold one complete ClientHello (RFC 8446 5.1: a handshake
    message may span records), and reads its server name.  Each byte is examined once."""

    def __init__(self) -> None:
        self.data = bytearray()  # everything fed, forwarded as it came once the hello is checked
        self._pos = 0  # where the first incomplete record starts
        self._handshake = bytearray()

    def feed(self, chunk: bytes) -> str | None:
        """The server name once the ClientHello is complete, None while more bytes are needed;
        BadHello when these bytes can never be one."""
        self.data += chunk
        while True:
            header = self.data[self._pos:self._pos + 5]
            if header[:1] and header[0] != 0x16:
                first = header[0]
                if first & 0x80 and self._pos == 0:
                    raise BadHello("an SSLv2-style ClientHello, which carries no server name")
                raise BadHello(f"not a TLS handshake record (type {first})" if self._pos else
                               "does not start with a TLS handshake record")
            if (len(header) > 1 and header[1] != 3) or (len(header) > 2 and header[2] > 4):
                raise BadHello("not a TLS record version")
            if len(header) < 5:
                return None
            size = int.from_bytes(header[3:5], "big")
            if not 0 < size <= 1 << 14:
                raise BadHello(f"a TLS record of {size} bytes (1 to 16384)")
            if self._pos + 5 + size > HELLO_LIMIT:
                raise BadHello(f"no complete ClientHello in the first {HELLO_LIMIT} bytes")
            if len(self.data) < self._pos + 5 + size:
                return None
            self._handshake += self.data[self._pos + 5:self._pos + 5 + size]
            self._pos += 5 + size
            if self._handshake[0] != 1:
                raise BadHello(f"a handshake message of type {self._handshake[0]}, not a ClientHello")
            if len(self._handshake) < 4:
                continue
            length = int.from_bytes(self._handshake[1:4], "big")
            if 4 + length > HELLO_LIMIT:
                raise BadHello(f"a ClientHello of {length} bytes (the limit is {HELLO_LIMIT})")
            if len(self._handshake) > 4 + length:
                raise BadHello("more handshake data after the ClientHello")
            if len(self._handshake) == 4 + length:
                return client_hello_name(bytes(self._handshake[4:]))


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise BadHello("a truncated ClientHello")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def number(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, n: int) -> bytes:
        return self.take(self.number(n))

    def left(self) -> int:
        return len(self.data) - self.pos


def client_hello_name(body: bytes) -> str:
    """The one host name in a ClientHello's server_name extension (``body`` is the handshake
    message without its 4-byte header); BadHello if it has none, or more than one, or hides it."""
    hello = _Cursor(body)
    if hello.take(2)[0] != 3:
        raise BadHello("not a TLS ClientHello version")
    hello.take(32)  # random
    if len(hello.vector(1)) > 32:
        raise BadHello("a session id longer than 32 bytes")
    suites = hello.vector(2)
    if not suites or len(suites) % 2:
        raise BadHello("a malformed cipher suite list")
    if not hello.vector(1):
        raise BadHello("no compression methods")
    if not hello.left():
        raise BadHello("no server name (SNI): the host cannot be checked")
    extensions = _Cursor(hello.vector(2))
    if hello.left():
        raise BadHello("bytes after the extensions")
    seen: set[int] = set()
    name = None
    while extensions.left():
        kind, data = extensions.number(2), extensions.vector(2)
        if kind in seen:
            raise BadHello(f"extension {kind} twice")  # which one would the server read?
        seen.add(kind)
        if kind in _ECH:
            raise BadHello("an encrypted ClientHello, which hides the real server name")
        if kind == 0:
            outer = _Cursor(data)
            names = _Cursor(outer.vector(2))
            if outer.left():
                raise BadHello("a malformed server_name extension")
            kind_of_name, value = names.number(1), names.vector(2)
            if names.left():
                raise BadHello("more than one server name")
            if kind_of_name != 0 or not value:
                raise BadHello("a server name that is not a host name")
            try:
                name = value.decode("ascii")
            except UnicodeDecodeError:
                raise BadHello("a server name that is not ASCII") from None
    if name is None:
        raise BadHello("no server name (SNI): the host cannot be checked")
    return name


def server_name(data: bytes) -> str:
    """The server name of the complete ClientHello at the start of ``data`` (TLS records, as sent);
    BadHello when there is none, or it is incomplete."""
    name = HelloBuffer().feed(data)
    if name is None:
        raise BadHello("an incomplete ClientHello")
    return name


# -- forwarding ---------------------------------------------------------------------------------------


async def _copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter, counts: list[int], index: int,
                said: dict[str, bool] | None = None) -> None:
    while True:
        data = await src.read(READ_SIZE)
        if not data:
            return
        counts[index] += len(data)
        if said is not None:
            said["response"] = True
        dst.write(data)
        await dst.drain()


async def _exactly(reader: asyncio.StreamReader, up: asyncio.StreamWriter, size: int) -> None:
    while size:
        data = await reader.read(min(size, READ_SIZE))
        if not data:
            raise BadRequest("the request body ended early")
        up.write(data)
        await up.drain()
        size -= len(data)


async def _send_body(reader: asyncio.StreamReader, up: asyncio.StreamWriter, request: Request) -> int:
    """Forward exactly the body the head declared; return its size in bytes on the wire."""
    if not request.chunked:
        await _exactly(reader, up, request.length)
        return request.length
    sent = 0
    try:
        while True:
            line = await reader.readuntil(b"\r\n")
            m = _CHUNK_RE.fullmatch(line)
            if m is None:
                raise BadRequest("a malformed chunk size (chunk extensions are refused)")
            size = int(m.group(1), 16)
            up.write(line)
            sent += len(line)
            if size == 0:
                break
            await _exactly(reader, up, size)
            if await reader.readexactly(2) != b"\r\n":
                raise BadRequest("a chunk longer than its size")
            up.write(b"\r\n")
            sent += size + 2
        trailers = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            trailers += len(line)
            if trailers > HEAD_LIMIT:
                raise BadRequest("trailers too large")
            if line != b"\r\n" and _HEADER_RE.fullmatch(line[:-2]) is None:
                raise BadRequest("a malformed trailer field")
            up.write(line)
            sent += len(line)
            if line == b"\r\n":
                break
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        raise BadRequest("the chunked request body ended early or is malformed") from None
    await up.drain()
    return sent


async def _one_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter, request: Request,
                       said: dict[str, bool]) -> tuple[int, int, int]:
    """Send one request (its head and exactly its body) upstream while its response comes back;
    what the client sends after it is read and dropped, never forwarded.  (up, down, dropped)."""
    counts = [0, 0, 0]

    async def send() -> None:
        up_writer.write(request.head)
        try:
            counts[0] += len(request.head) + await _send_body(reader, up_writer, request)
        except BadRequest:
            up_writer.close()  # nothing more goes up, and the answer's copy below ends
            raise
        while data := await reader.read(READ_SIZE):
            counts[2] += len(data)
        with contextlib.suppress(OSError):
            if up_writer.can_write_eof():  # the client is done: so is the upstream's reader
                up_writer.write_eof()

    sender = asyncio.ensure_future(send())
    try:
        with contextlib.suppress(OSError):
            await _copy(up_reader, writer, counts, 1, said)
    finally:
        sender.cancel()  # still reading what follows the request, or done
        with contextlib.suppress(Exception):
            up_writer.close()
    failed = sender.exception() if sender.done() and not sender.cancelled() else None
    if isinstance(failed, BadRequest):
        raise failed  # a malformed body: what was valid went up, then nothing more
    return counts[0], counts[1], counts[2]


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter) -> tuple[int, int]:
    counts = [0, 0]

    async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter, index: int) -> None:
        try:
            await _copy(src, dst, counts, index)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(Exception):
                if dst.can_write_eof():
                    dst.write_eof()

    try:
        await asyncio.gather(copy(reader, up_writer, 0), copy(up_reader, writer, 1))
    finally:
        with contextlib.suppress(Exception):
            up_writer.close()
    return counts[0], counts[1]
