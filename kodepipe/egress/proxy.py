"""The egress proxy: a container's only way out, by domain name.

The sockets and lookups live here; the policy (kodepipe.egress.policy) and the parsing of what a
sandbox sends (kodepipe.egress.wire) are pure modules of their own.
A sandbox whose namespace kodepipe cannot enter from here (a container inside a VM) reaches the
same Proxy through relay.pl in that namespace and kodepipe.egress.relay (Proxy.serve, answer_dns).

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
import dataclasses
import errno
import ipaddress
import os
import socket
import ssl
import struct
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import orjson

from kodepipe.core.errors import BadInput, KpError
from kodepipe.egress.credentials import Definition, Grant
from kodepipe.egress.policy import (
    DNS_PORT,
    PROXY_PORT,
    RESOLV_CONF,
    Denied,
    Policy,
    _unwrap,
    container_env,
    forbidden,
)
from kodepipe.egress.wire import (
    CHUNK_RE,
    HEAD_LIMIT,
    HEADER_RE,
    BadHello,
    BadRequest,
    HelloBuffer,
    Request,
    parse_request,
)

# kodepipe.container.hostrun and kodepipe.commands.run still reach these through this module
__all__ = ["DNS_PORT", "PROXY_PORT", "RESOLV_CONF", "DecisionLog", "Policy", "Proxy", "container_env",
           "permitted_addresses", "read_rules", "sockets_in_netns"]

HEAD_TIMEOUT = 30.0
HELLO_TIMEOUT = 30.0  # seconds from the CONNECT reply to a complete ClientHello
READ_SIZE = 1 << 18
CONNECT_TIMEOUT = 10.0
MAX_CONNECTIONS = 400
CLONE_NEWNET = 0x40000000
MAX_DNS_INFLIGHT = 32
LOG_LIMIT = 64 << 20  # bytes of decisions per run; then one last line says the rest was dropped


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



def permitted_addresses(policy: Policy, host: str, port: int) -> list[str]:
    """The permitted addresses of an allowed host (Denied if none is)."""
    pinned = host in policy.pins
    if pinned:
        candidates = list(policy.pins[host])
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
    """The decisions, one JSON line each, hash-chained as they are written (core/chain.py)."""

    def __init__(self, path: Path, container: str, writer: Any = None) -> None:
        """``writer``: where lines go instead of ``path`` and its chain (an object with append and close:
        the egress-proxy image writes to its stdout, for the cluster's log collector)."""
        from kodepipe.core import chain

        self.path, self.container = path, container
        self._file = writer if writer is not None else chain.Chain(path)
        self.counts = {"allow": 0, "deny": 0, "error": 0}
        self.written = 0

    def write(self, **fields: Any) -> None:
        decision = fields.get("decision", "error")
        self.counts[decision] = self.counts.get(decision, 0) + 1
        if fields.get("injected"):
            self.counts["injected"] = self.counts.get("injected", 0) + 1
        if fields.get("budget"):
            self.counts["over_budget"] = self.counts.get("over_budget", 0) + 1
        if self.written >= LOG_LIMIT:
            return  # counted, not written: a flood must not fill the host's disk
        record = {"kind": "egress", "ts": round(time.time(), 6), "container": self.container, **fields}
        line = orjson.dumps(record) + b"\n"
        self.written += len(line)
        if self.written >= LOG_LIMIT:
            line = orjson.dumps({"kind": "egress", "ts": record["ts"], "container": self.container,
                                 "decision": "error", "reason": "log full: later decisions are only counted"}) + b"\n"
        self._file.append(line)

    def close(self) -> None:
        self._file.close()


class OverBudget(Denied):
    """A request over the run's budget for a credential or a host: answered 429."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(reason)
        self.key = key


class CredentialFailed(Exception):
    """A credential's source could not be read again once its lifetime was over: answered 503."""


class Ledger:
    """What the run has used of each budget (requests, bytes up and down), by credential or host."""

    def __init__(self, budgets: dict[str, Any]) -> None:
        self.budgets = budgets
        self.used = {key: [0, 0] for key in budgets}
        self.exceeded: set[str] = set()

    def charge(self, keys: list[str]) -> list[str]:
        """Count one request against each of ``keys`` that has a budget; OverBudget when one is spent."""
        charged = [k for k in dict.fromkeys(keys) if k in self.budgets]
        for key in charged:
            budget, (requests, nbytes) = self.budgets[key], self.used[key]
            if budget.requests is not None and requests >= budget.requests:
                self.exceeded.add(key)
                raise OverBudget(key, f"over budget: {key} has had its {budget.requests} requests in this run")
            if budget.bytes is not None and nbytes >= budget.bytes:
                self.exceeded.add(key)
                raise OverBudget(key, f"over budget: {key} has had its {budget.bytes} bytes in this run")
        for key in charged:
            self.used[key][0] += 1
        return charged

    def add(self, keys: list[str], nbytes: int) -> None:
        for key in keys:
            self.used[key][1] += nbytes

    def record(self) -> dict[str, Any]:
        return {key: {"requests": used[0], "bytes": used[1], "limit": self.budgets[key].record(),
                      "exceeded": key in self.exceeded} for key, used in self.used.items()}


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
        self.ledger = Ledger(policy.budgets)
        # each credential's value and when it was read (a lifetime makes the proxy read it again)
        self._values = {name: (grant.value, time.monotonic()) for name, grant in policy.grants.items()}
        self._contexts: dict[str, ssl.SSLContext] = {}

    def start(self, tcp: socket.socket | None, udp: socket.socket | None) -> None:
        """Serve ``tcp`` (a listener) and ``udp`` (DNS), either may be None (a relay's streams come
        through serve() and answer_dns instead)."""
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

    async def _open(self, tcp: socket.socket | None, udp: socket.socket | None) -> None:
        if tcp is not None:
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

    async def serve(self, sock: socket.socket) -> None:
        """Serve one connected socket (a relay's stream) exactly as a connection accepted on the
        listener: the same checks, the same log."""
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock, limit=HEAD_LIMIT)
        await self._handle(reader, writer)

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
            if request.target:  # for the proxy itself: a credential's endpoint
                up, down = await self._endpoint(request, reader, writer, said, fields)
                self.log.write(decision="allow", bytes_up=up, bytes_down=down, seconds=seconds(), **fields)
                return
            fields.update(method=request.method, host=request.host, port=request.port)
            # a CONNECT to an intercepting credential's host needs no --allow: the credential is its rule
            intercept = (self.policy.intercepting(request.host.strip().lower().rstrip("."), request.port)
                         if request.method == "CONNECT" else None)
            host = self.policy.check(request.host, request.port, listed=intercept is None)
            if host in self.policy.pins:  # no lookup: no need to leave the loop
                addrs = permitted_addresses(self.policy, host, request.port)
            else:
                addrs = await self.loop.run_in_executor(None, permitted_addresses, self.policy, host, request.port)
            charged = self.ledger.charge([host]) if intercept is None else []
            if intercept is not None:
                up, down = await self._intercept(intercept, host, request.port, addrs, reader, writer, said, fields)
            elif request.method == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                said["tunnel"] = True
                await writer.drain()
                # nothing goes upstream, not even a connection, before the ClientHello names this host
                hello, sni = await self._client_hello(reader, said, fields)
                if sni.lower().rstrip(".") != host:
                    raise Denied(f"TLS server name {sni!r} is not the host asked for")
                upstream_r, upstream_w, fields["address"] = await self._connect(addrs, request.port)
                up, down = await _tunnel(reader, writer, upstream_r, upstream_w, hello)
            else:
                upstream_r, upstream_w, fields["address"] = await self._connect(addrs, request.port)
                up, down, dropped = await _one_request(reader, writer, upstream_r, upstream_w, request, said)
                if dropped:
                    fields["dropped"] = dropped
            self.ledger.add(charged, up + down)
            self.log.write(decision="allow", bytes_up=up, bytes_down=down, seconds=seconds(), **fields)
        except OverBudget as exc:
            self.log.write(decision="deny", reason=exc.reason, budget=exc.key, seconds=seconds(), **fields)
            with contextlib.suppress(OSError):
                await self._refuse(writer, said, 429, "Too Many Requests", f"kodepipe: {exc.reason}\n")
        except CredentialFailed as exc:
            self.log.write(decision="error", reason=str(exc), seconds=seconds(), **fields)
            with contextlib.suppress(OSError):
                await self._refuse(writer, said, 503, "Service Unavailable", f"kodepipe: {exc}\n")
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

    async def _endpoint(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        said: dict[str, bool], fields: dict[str, Any]) -> tuple[int, int]:
        """One request at a credential's endpoint: the run's token checked and replaced by the real value,
        sent over verified TLS to the credential's upstream and nowhere else.  (bytes up, bytes down)"""
        from kodepipe.egress import credentials

        fields["method"] = request.method
        name, path = credentials.route(request.target)
        grant = self.policy.grants.get(name)
        if grant is None:
            fields["path"] = credentials.loggable_path(request.target)
            raise Denied(f"this run has no credential {name!r}" if credentials.NAME_RE.fullmatch(name) else
                         "no credential of that name in this run")
        d = grant.definition
        fields.update(credential=name, host=d.upstream, port=d.upstream_port, path=credentials.loggable_path(path))
        host = self.policy.check(d.upstream, d.upstream_port, listed=False)
        value = await self._value(grant)
        head = credentials.endpoint_head(request, grant, path, value)  # the token checked first
        charged = self.ledger.charge([name, host])
        if host in self.policy.pins:
            addrs = permitted_addresses(self.policy, host, d.upstream_port)
        else:
            addrs = await self.loop.run_in_executor(None, permitted_addresses, self.policy, host, d.upstream_port)
        context = await self.loop.run_in_executor(None, self._context, d)
        upstream_r, upstream_w, fields["address"] = await self._connect(addrs, d.upstream_port, context, host)
        fields["injected"] = True
        up, down, dropped = await _one_request(reader, writer, upstream_r, upstream_w,
                                               dataclasses.replace(request, head=head), said)
        if dropped:
            fields["dropped"] = dropped
        self.ledger.add(charged, up + down)
        return up, down

    async def _intercept(self, grant: Grant, host: str, port: int, addrs: list[str],
                         reader: asyncio.StreamReader, writer: asyncio.StreamWriter, said: dict[str, bool],
                         fields: dict[str, Any]) -> tuple[int, int]:
        """A CONNECT to an intercepting credential's host: TLS ended here with the run's CA, once the
        ClientHello names this host; one request read inside, its token checked and replaced by the real
        value as at an endpoint, and sent over verified TLS to the host.  (bytes up, bytes down)"""
        from kodepipe.egress import credentials

        if self.policy.ca is None:
            raise Denied("an intercepting credential, and no CA for it in this run")
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        said["tunnel"] = True
        await writer.drain()
        hello, sni = await self._client_hello(reader, said, fields)
        if sni.lower().rstrip(".") != host:
            raise Denied(f"TLS server name {sni!r} is not the host asked for")
        fields["credential"] = grant.name
        tls = _TlsSide(self.policy.ca.server_context(host), reader, writer, hello)
        try:
            async with asyncio.timeout(HELLO_TIMEOUT):
                await tls.handshake()
        except (TimeoutError, ssl.SSLError, BadHello) as exc:
            # a client that does not trust the run's CA ends here: said, and nothing went upstream
            raise Denied(f"the TLS handshake with the run's CA failed: {getattr(exc, 'reason', None) or exc}") from None
        said["response"] = False
        inner = asyncio.StreamReader(limit=HEAD_LIMIT)
        pump = asyncio.ensure_future(tls.pump(inner))
        try:
            try:
                async with asyncio.timeout(HEAD_TIMEOUT):
                    head = await inner.readuntil(b"\r\n\r\n")
                request = parse_request(head)
                if not request.target:
                    raise BadRequest("an absolute URI inside an intercepted connection")
                fields.update(method=request.method, path=credentials.loggable_path(request.target))
                if credentials.host_header(request) != host:
                    raise Denied(f"the Host header is not {host}, the host this connection is for")
                value = await self._value(grant)
                head = credentials.endpoint_head(request, grant, request.target, value, host, port)
                charged = self.ledger.charge([grant.name, host])
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                await tls.answer(400, "Bad Request", "kodepipe: no complete request\n")
                said["response"] = True
                raise BadRequest("no complete request inside the intercepted connection") from None
            except OverBudget as exc:
                await tls.answer(429, "Too Many Requests", f"kodepipe: {exc.reason}\n")
                said["response"] = True
                raise
            except Denied as exc:
                await tls.answer(403, "Forbidden", f"kodepipe: {exc.reason}\n")
                said["response"] = True
                raise
            except BadRequest as exc:
                await tls.answer(400, "Bad Request", f"kodepipe: {exc}\n")
                said["response"] = True
                raise
            context = await self.loop.run_in_executor(None, self._context, grant.definition)
            upstream_r, upstream_w, fields["address"] = await self._connect(addrs, port, context, host)
            fields["injected"] = True
            up, down, dropped = await _one_request(inner, tls, upstream_r, upstream_w,
                                                   dataclasses.replace(request, head=head), said)
            if dropped:
                fields["dropped"] = dropped
            self.ledger.add(charged, up + down)
            return up, down
        finally:
            pump.cancel()
            tls.close()

    async def _value(self, grant: Grant) -> str:
        """The credential's value, read again from its source once its lifetime is over."""
        value: str
        value, since = self._values[grant.name]
        lifetime = grant.definition.lifetime
        if lifetime is None or time.monotonic() - since < lifetime:
            return value
        from kodepipe.egress import sources

        try:
            value = await self.loop.run_in_executor(None, sources.read, grant.definition.source)
        except KpError as exc:
            raise CredentialFailed(f"credential {grant.name}: its lifetime is over and {exc.message}") from None
        self._values[grant.name] = (value, time.monotonic())
        return value

    def _context(self, definition: Definition) -> ssl.SSLContext:
        """A verifying TLS client context: the system's CAs, or the definition's own CA file."""
        context = self._contexts.get(definition.name)
        if context is None:
            cafile = os.path.expanduser(definition.ca) if definition.ca else None
            try:
                context = ssl.create_default_context(cafile=cafile)
            except (OSError, ssl.SSLError) as exc:
                raise CredentialFailed(f"credential {definition.name}: cannot load its CA file {cafile}: "
                                       f"{getattr(exc, 'strerror', None) or exc}") from None
            self._contexts[definition.name] = context
        return context

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

    async def _connect(self, addrs: list[str], port: int, context: ssl.SSLContext | None = None,
                       server_hostname: str | None = None) -> tuple[Any, Any, str]:
        last: OSError | None = None
        for addr in addrs:
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    if context is None:
                        r, w = await asyncio.open_connection(addr, port)
                    else:  # verified: the certificate must name the host
                        r, w = await asyncio.open_connection(addr, port, ssl=context, server_hostname=server_hostname)
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
                addrs = permitted_addresses(self.policy, host, 443)
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


class _TlsSide:
    """The proxy's server end of an intercepted TLS connection, over the client's stream (memory BIOs: the
    ClientHello is already read).  Once the handshake is done it reads as ``pump`` into a StreamReader and
    writes as a StreamWriter does, for _one_request."""

    def __init__(self, context: ssl.SSLContext, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 first: bytes) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.incoming.write(first)
        self.reader, self.writer = reader, writer

    async def _send(self) -> None:
        data = self.outgoing.read()
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def _more(self) -> bool:
        data = await self.reader.read(READ_SIZE)
        if not data:
            self.incoming.write_eof()
            return False
        self.incoming.write(data)
        return True

    async def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                await self._send()
                return
            except ssl.SSLWantReadError:
                await self._send()
                if not await self._more():
                    raise BadHello("the client closed during the TLS handshake") from None

    async def pump(self, into: asyncio.StreamReader) -> None:
        """What the client sends, decrypted, into ``into`` until it closes."""
        try:
            while True:
                try:
                    data = self.tls.read(READ_SIZE)
                except ssl.SSLWantReadError:
                    await self._send()
                    if await self._more():
                        continue
                    data = b""
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    data = b""
                if not data:
                    break
                into.feed_data(data)
        except (OSError, ssl.SSLError):
            pass
        finally:
            into.feed_eof()

    async def answer(self, code: int, reason: str, body: str) -> None:
        data = body.encode()
        with contextlib.suppress(OSError, ssl.SSLError):
            self.write(f"HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(data)}\r\n"
                       "Connection: close\r\n\r\n".encode() + data)
            await self.drain()

    # as a StreamWriter, for _copy and _one_request
    def write(self, data: bytes) -> None:
        self.tls.write(data)

    async def drain(self) -> None:
        await self._send()

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        with contextlib.suppress(OSError, ssl.SSLError, ValueError):
            self.tls.unwrap()  # close_notify
        with contextlib.suppress(OSError):
            data = self.outgoing.read()
            if data:
                self.writer.write(data)


# -- forwarding ---------------------------------------------------------------------------------------


class Sink(Protocol):
    """Where a response goes: a StreamWriter, or an intercepted connection's TLS side."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def close(self) -> None: ...


async def _copy(src: asyncio.StreamReader, dst: Sink | asyncio.StreamWriter, counts: list[int], index: int,
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
            m = CHUNK_RE.fullmatch(line)
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
            if line != b"\r\n" and HEADER_RE.fullmatch(line[:-2]) is None:
                raise BadRequest("a malformed trailer field")
            up.write(line)
            sent += len(line)
            if line == b"\r\n":
                break
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        raise BadRequest("the chunked request body ended early or is malformed") from None
    await up.drain()
    return sent


async def _one_request(reader: asyncio.StreamReader, writer: Sink,
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


# -- a checked tunnel, copied by the kernel --------------------------------------------------------

SPLICE_CHUNK = 1 << 20  # asked for per splice; a pipe moves at most its size at a time
PIPE_SIZE, BIG_PIPES = 256 << 10, 32  # 8 MiB of pipes at most; the rest keep the default size
_big_pipes = 0  # directions with a big pipe now (the loop's thread only)
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


async def _tunnel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter, hello: bytes) -> tuple[int, int]:
    """Carry a CONNECT tunnel whose ClientHello has been checked: from now on the proxy only counts
    bytes, so both sockets leave asyncio's streams and the kernel moves the bytes between them
    through a pipe (splice(2)), never through Python buffers.  What the streams had already read
    goes first.  Sockets that cannot splice (or a loop without file descriptors) are copied as before.
    Returns the bytes sent up (the ClientHello included) and down."""
    client, upstream = _detach(writer), _detach(up_writer)
    if client is None or upstream is None:
        for sock in (client, upstream):
            if sock is not None:
                sock.close()
        up_writer.write(hello)
        up, down = await _pipe(reader, writer, up_reader, up_writer)
        return up + len(hello), down
    loop = asyncio.get_running_loop()
    try:
        early_up = hello + _take_buffered(reader)
        early_down = _take_buffered(up_reader)
        for stream in (writer, up_writer):
            stream.transport.abort()  # its socket is closed; the duplicate carries the connection on
        counts = [0, 0]

        async def one_way(src: socket.socket, dst: socket.socket, early: bytes, index: int) -> None:
            try:
                if early:
                    await loop.sock_sendall(dst, early)
                    counts[index] += len(early)
                try:
                    await _splice(loop, src.fileno(), dst.fileno(), counts, index)
                except NoSplice:
                    while data := await loop.sock_recv(src, READ_SIZE):
                        await loop.sock_sendall(dst, data)
                        counts[index] += len(data)
            except OSError:
                pass
            finally:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)

        # a group: an unexpected error in one direction cancels the other before the sockets close
        async with asyncio.TaskGroup() as group:
            group.create_task(one_way(client, upstream, early_up, 0))
            group.create_task(one_way(upstream, client, early_down, 1))
        return counts[0], counts[1]
    finally:
        client.close()
        upstream.close()


def _detach(writer: asyncio.StreamWriter) -> socket.socket | None:
    """A duplicate of the stream's socket, non-blocking, with reading paused on the stream so that it
    buffers nothing more; None if the stream has no real socket."""
    transport = writer.transport
    sock = transport.get_extra_info("socket")
    if sock is None or sock.type != socket.SOCK_STREAM or transport.get_write_buffer_size():
        return None
    transport.pause_reading()  # type: ignore[attr-defined]
    dup = socket.socket(fileno=os.dup(sock.fileno()))
    dup.setblocking(False)
    return dup


def _take_buffered(reader: asyncio.StreamReader) -> bytes:
    """What the stream has read and nobody has consumed yet (StreamReader keeps it in ``_buffer``)."""
    buffer = getattr(reader, "_buffer", None)
    if not isinstance(buffer, bytearray):
        return b""
    data = bytes(buffer)
    buffer.clear()
    return data


class NoSplice(Exception):
    """The socket cannot be spliced (EINVAL before a byte moved), or no pipe could be made."""


async def _splice(loop: asyncio.AbstractEventLoop, src: int, dst: int, counts: list[int], index: int) -> None:
    """Move bytes from socket ``src`` to socket ``dst`` until ``src`` ends, through a pipe, waiting on
    the loop whenever either side would block; ``counts[index]`` counts them as they go."""
    import fcntl

    try:
        pipe_r, pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:  # out of descriptors or pipes: copied instead, never dropped
        raise NoSplice from exc
    # a pipe bigger than the default 64 KiB moves more per call, but pipes count against the user's pipe
    # quota (fs.pipe-user-pages-soft, 64 MiB), which the agent's tunnels must not use up: only the first
    # BIG_PIPES directions get one
    global _big_pipes
    big = _big_pipes < BIG_PIPES
    if big:
        with contextlib.suppress(OSError):
            fcntl.fcntl(pipe_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        _big_pipes += 1
    pending, first = 0, True
    try:
        while True:
            if not pending:
                try:
                    pending = os.splice(src, pipe_w, SPLICE_CHUNK, flags=SPLICE_FLAGS)
                except BlockingIOError:
                    await _ready(loop, src, write=False)
                    continue
                except OSError as exc:
                    if exc.errno == errno.EINVAL and first:
                        raise NoSplice from exc
                    raise
                if not pending:
                    return
                first = False
            try:
                sent = os.splice(pipe_r, dst, pending, flags=SPLICE_FLAGS)
            except BlockingIOError:
                await _ready(loop, dst, write=True)
                continue
            pending -= sent
            counts[index] += sent
    finally:
        os.close(pipe_r)
        os.close(pipe_w)
        if big:
            _big_pipes -= 1


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, *, write: bool) -> None:
    waiter = loop.create_future()

    def wake() -> None:
        if not waiter.done():
            waiter.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, wake)
    try:
        await waiter
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)
