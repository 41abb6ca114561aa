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
- HTTPS goes through CONNECT and is checked by the requested host name,
  never by an address: a raw IP is refused, and a name is resolved on the
  host, where addresses in link-local and cloud-metadata ranges (and
  loopback, unless the name was pinned with --resolve) are refused too;
- plain HTTP is checked the same way and forwarded with its Host header
  set to the checked host and ``Connection: close``; a CONNECT tunnel that
  starts a TLS handshake must name the same host in its SNI;
- DNS answers only allowed names (with their permitted addresses); others
  get REFUSED.

Every decision is a JSON line in the run's folder (out of the agent's
reach): {"kind": "egress", "decision": "allow"|"deny"|"error", "method",
"host", "port", "address", "reason", "bytes_up", "bytes_down", "seconds",
"container", "ts"}.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from kodepipe.errors import BadInput

PROXY_PORT = 3128
DNS_PORT = 53
DEFAULT_PORTS = (80, 443)
HEAD_LIMIT = 64 * 1024
HEAD_TIMEOUT = 30.0
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
    try:
        text = path.read_text()
    except OSError as exc:
        raise BadInput(f"--allow-file {path}: {exc.strerror}") from None
    return [line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()]


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
                bad.append(addr)
            else:
                good.append(addr)
        if not good:
            raise Denied(f"resolves only to forbidden addresses ({', '.join(bad)}: link-local, cloud "
                         "metadata, multicast or loopback)")
        return good


def forbidden(addr: str, *, allow_loopback: bool = False) -> bool:
    """True for addresses no name may lead to: link-local (cloud metadata), multicast,
    unspecified, reserved, and loopback unless allowed; IPv4 inside IPv6 forms is unwrapped."""
    ip = ipaddress.ip_address(addr)
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour
        if inner is None and ip in NAT64:
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if inner is not None:
            return forbidden(str(inner), allow_loopback=allow_loopback)
    if ip.is_loopback:
        return not allow_loopback
    return (ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved
            or any(ip in net for net in BLOCKED))


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
        self.active += 1
        try:
            if self.active > MAX_CONNECTIONS:
                raise Denied("too many connections at once")
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                fields["reason"] = "no complete request"
                await self._reply(writer, 400, "Bad Request", "kodepipe: bad proxy request\n")
                self.log.write(decision="error", seconds=round(time.monotonic() - started, 6), **fields)
                return
            method, host, port, forward = parse_request(head)
            fields.update(method=method, host=host, port=port)
            host = self.policy.check(host, port)
            if host in self.policy.pins:  # no lookup: no need to leave the loop
                addrs = self.policy.addresses(host, port)
            else:
                addrs = await self.loop.run_in_executor(None, self.policy.addresses, host, port)
            upstream_r, upstream_w, address = await self._connect(addrs, port)
            fields["address"] = address
            if method == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await writer.drain()
                # TLS: the server name inside must be the host that was allowed (no fronting by SNI)
                # (on other ports the server may speak first, as ssh does: do not wait long for the client)
                try:
                    first = await asyncio.wait_for(reader.read(16384), HEAD_TIMEOUT if port == 443 else 1.0)
                except TimeoutError:
                    first = b""
                sni = server_name(first)
                if sni is not None and sni.lower().rstrip(".") != host:
                    fields["sni"] = sni
                    upstream_w.close()
                    raise Denied(f"TLS server name {sni!r} is not the host asked for")
                upstream_w.write(first)
                early = len(first)
            else:
                upstream_w.write(forward)
                early = 0
            up, down = await _pipe(reader, writer, upstream_r, upstream_w)
            up += early
            self.log.write(decision="allow", bytes_up=up, bytes_down=down,
                           seconds=round(time.monotonic() - started, 6), **fields)
        except Denied as exc:
            self.log.write(decision="deny", reason=exc.reason, seconds=round(time.monotonic() - started, 6),
                           **fields)
            with contextlib.suppress(OSError):
                await self._reply(writer, 403, "Forbidden",
                                  f"kodepipe: {fields.get('host')} is not reachable from this sandbox: {exc.reason}\n")
        except BadRequest as exc:
            self.log.write(decision="error", reason=str(exc), seconds=round(time.monotonic() - started, 6),
                           **fields)
            with contextlib.suppress(OSError):
                await self._reply(writer, 400, "Bad Request", f"kodepipe: {exc}\n")
        except OSError as exc:
            self.log.write(decision="error", reason=f"upstream: {exc.strerror or exc}",
                           seconds=round(time.monotonic() - started, 6), **fields)
            with contextlib.suppress(OSError):
                await self._reply(writer, 502, "Bad Gateway", f"kodepipe: could not reach {fields.get('host')}\n")
        except asyncio.CancelledError:
            self.log.write(decision="error", reason="cut: the sandbox ended",
                           seconds=round(time.monotonic() - started, 6), **fields)
            raise
        finally:
            self.active -= 1
            with contextlib.suppress(Exception):
                writer.close()

    async def _connect(self, addrs: list[str], port: int) -> tuple[Any, Any, str]:
        last: OSError | None = None
        for addr in addrs:
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection(addr, port), CONNECT_TIMEOUT)
                return r, w, addr
            except (TimeoutError, OSError) as exc:
                last = exc if isinstance(exc, OSError) else OSError(f"timed out connecting to {addr}")
        raise last or OSError("no address")

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, code: int, reason: str, body: str) -> None:
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

        loop.create_task(answer())


class BadRequest(Exception):
    pass


_REQUEST_RE = re.compile(rb"([A-Z]{3,10}) (\S+) HTTP/1\.[01]")
_URL_RE = re.compile(r"http://(\[[0-9a-fA-F:.]+\]|[^/:\s]+)(?::(\d+))?(/\S*)?$")


def parse_request(head: bytes) -> tuple[str, str, int, bytes]:
    """(method, host, port, what to send upstream) from a proxy request's head."""
    lines = head.split(b"\r\n")
    m = _REQUEST_RE.fullmatch(lines[0])
    if m is None:
        raise BadRequest("not an HTTP/1 proxy request")
    method, target = m.group(1).decode(), m.group(2).decode("latin-1")
    if method == "CONNECT":
        host, sep, port_text = target.rpartition(":")
        if not sep or not port_text.isdigit():
            raise BadRequest("CONNECT needs host:port")
        return method, host.strip("[]"), int(port_text), b""
    u = _URL_RE.match(target)
    if u is None:
        raise BadRequest("a proxy request needs an absolute http:// URL (https goes through CONNECT)")
    host, port, path = u.group(1).strip("[]"), int(u.group(2) or 80), u.group(3) or "/"
    # the Host header is the checked one: a different Host would reach another site behind a shared front end
    headers = [line for line in lines[1:] if line and not line.lower().startswith(
        (b"proxy-", b"connection:", b"host:", b"keep-alive:"))]
    first = f"{method} {path} HTTP/1.1".encode("latin-1")
    host_header = f"Host: {host}" + ("" if port == 80 else f":{port}")
    forward = b"\r\n".join([first, host_header.encode("latin-1"), *headers, b"Connection: close", b"", b""])
    return method, host, port, forward


def server_name(hello: bytes) -> str | None:
    """The SNI host name of a TLS ClientHello, or None if ``hello`` is not one (or has none)."""
    try:
        if len(hello) < 43 or hello[0] != 0x16 or hello[5] != 0x01:
            return None
        pos = 5 + 4 + 2 + 32  # record header, handshake header, version, random
        pos += 1 + hello[pos]  # session id
        pos += 2 + int.from_bytes(hello[pos:pos + 2], "big")  # cipher suites
        pos += 1 + hello[pos]  # compression methods
        end = pos + 2 + int.from_bytes(hello[pos:pos + 2], "big")
        pos += 2
        while pos + 4 <= end:
            kind, size = int.from_bytes(hello[pos:pos + 2], "big"), int.from_bytes(hello[pos + 2:pos + 4], "big")
            pos += 4
            if kind == 0:  # server_name: list length, type 0 (host_name), name length, name
                name_len = int.from_bytes(hello[pos + 3:pos + 5], "big")
                return hello[pos + 5:pos + 5 + name_len].decode("ascii", "replace")
            pos += size
    except IndexError:
        return None
    return None


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter) -> tuple[int, int]:
    counts = [0, 0]

    async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter, index: int) -> None:
        try:
            while True:
                data = await src.read(1 << 18)
                if not data:
                    break
                counts[index] += len(data)
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(Exception):
                if dst.can_write_eof():
                    dst.write_eof()

    await asyncio.gather(copy(reader, up_writer, 0), copy(up_reader, writer, 1))
    with contextlib.suppress(Exception):
        up_writer.close()
    return counts[0], counts[1]
