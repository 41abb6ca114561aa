"""The egress policy and proxy on real loopback sockets (the netns part is in the integration tests)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import json
import logging
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from kodepipe.core.errors import BadInput
from kodepipe.egress import policy as egress_policy
from kodepipe.egress import proxy as egress
from kodepipe.egress import wire
from tests import httpd


def test_rules_and_wildcards() -> None:
    policy = egress_policy.Policy.build(["api.example.com", "*.pkg.test", "git.test:22,443"])
    assert policy.check("API.example.com.", 443) == "api.example.com"
    assert policy.check("a.pkg.test", 80) == "a.pkg.test" and policy.check("a.b.pkg.test", 443)
    for host, port, reason in [("pkg.test", 443, "allowlist"), ("evil.com", 443, "allowlist"),
                               ("api.example.com", 8080, "port 8080"), ("git.test", 80, "port 80"),
                               ("1.2.3.4", 443, "raw IP"), ("[::1]", 443, "raw IP"),
                               ("api.example.com.evil.com", 443, "allowlist")]:
        with pytest.raises(egress_policy.Denied, match=reason):
            policy.check(host, port)
    assert policy.check("git.test", 22)
    for bad in ("", "*", "com", "*.com", "exa mple.com", "a..b", "-a.com", "x.com:0", "x.com:http"):
        with pytest.raises(BadInput):
            egress_policy.parse_rule(bad)


def test_addresses_refuse_metadata_link_local_and_unpinned_loopback() -> None:
    policy = egress_policy.Policy.build(["meta.test", "local.test", "ok.test", "localhost.test"],
                                 ["meta.test=169.254.169.254", "local.test=127.0.0.1", "ok.test=192.0.2.7",
                                  "ok.test=fe80::1"])
    with pytest.raises(egress_policy.Denied, match="forbidden"):
        egress.permitted_addresses(policy, "meta.test", 443)
    assert egress.permitted_addresses(policy, "local.test", 80) == ["127.0.0.1"]  # pinned: the user named it
    assert egress.permitted_addresses(policy, "ok.test", 443) == ["192.0.2.7"]  # the link-local one is dropped
    for bad in ("x", "a=b", "*.a.test=1.2.3.4", "a.test=999.1.1.1"):
        with pytest.raises(BadInput):
            egress_policy.parse_pin(bad)


def resolving_to(monkeypatch: pytest.MonkeyPatch, name: str, *addrs: str) -> None:
    """Make ``name`` resolve to ``addrs`` on this host, as a hosts file or a DNS server could."""
    real = socket.getaddrinfo

    def fake(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == name:
            return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                    for a in addrs]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)


def test_unpinned_loopback_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = egress_policy.Policy.build(["sneaky.test"])
    resolving_to(monkeypatch, "sneaky.test", "127.0.0.1")
    with pytest.raises(egress_policy.Denied, match="loopback"):
        egress.permitted_addresses(policy, "sneaky.test", 443)


def host_addresses() -> list[str]:
    """This host's own addresses on every interface but lo, as `ip -j addr` lists them."""
    links = json.loads(subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, check=True).stdout)
    return [a["local"] for link in links if link["ifname"] != "lo" for a in link.get("addr_info", [])]


def non_loopback_ipv4() -> str:
    found = [a for a in host_addresses() if "." in a and not a.startswith("169.254.")]
    if not found:
        pytest.skip("this host has no IPv4 address but loopback")
    return found[0]


def test_a_name_that_resolves_to_one_of_the_hosts_own_addresses_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every address of every interface (read from `ip -j addr`, not from kodepipe's own code), and
    its IPv4-mapped form, leads to the host's services as loopback does: refused unless pinned."""
    own = [a for a in host_addresses() if not egress_policy.forbidden(a)]  # link-local ones are refused anyway
    assert own, "no interface but lo: nothing to attack"
    policy = egress_policy.Policy.build(["sneaky.test", "pinned.test"], [f"pinned.test={own[0]}"])
    for addr in own + [f"::ffff:{a}" for a in own if "." in a]:
        resolving_to(monkeypatch, "sneaky.test", addr)
        with pytest.raises(egress_policy.Denied, match="this host's own"):
            egress.permitted_addresses(policy, "sneaky.test", 443)
    assert egress.permitted_addresses(policy, "pinned.test", 443) == [own[0]]  # the user named it
    # an address elsewhere (TEST-NET-2) passes; among several, only the host's own are dropped
    resolving_to(monkeypatch, "sneaky.test", own[0], "198.51.100.7")
    assert egress.permitted_addresses(policy, "sneaky.test", 443) == ["198.51.100.7"]
    assert egress.route_type("127.0.0.1") == 2 and not egress.host_address("198.51.100.7")


def test_parse_request() -> None:
    connect = wire.parse_request(b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n")
    assert (connect.method, connect.host, connect.port, connect.head) == ("CONNECT", "a.test", 443, b"")
    req = wire.parse_request(
        b"GET http://a.test:8080/x?y=1 HTTP/1.1\r\nHost: a.test\r\nProxy-Authorization: secret\r\n"
        b"Connection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nTE: trailers\r\n\r\n")
    assert (req.method, req.host, req.port, req.length, req.chunked) == ("GET", "a.test", 8080, 0, False)
    assert req.head.startswith(b"GET /x?y=1 HTTP/1.1\r\n") and b"Proxy-" not in req.head
    assert b"Connection: close" in req.head and b"keep-alive" not in req.head and b"pgrade" not in req.head
    assert b"TE:" not in req.head
    post = wire.parse_request(b"POST http://a.test/ HTTP/1.1\r\nContent-Length: 12\r\n\r\n")
    assert post.length == 12 and b"Content-Length: 12\r\n" in post.head
    assert wire.parse_request(b"POST http://a.test/ HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n").chunked
    # an origin-form request is for the proxy itself (a credential's endpoint): its target and headers
    own = wire.parse_request(b"GET /kodepipe/x/v1?a=1 HTTP/1.1\r\nX-Api-Key: t\r\n\r\n")
    assert own.target == "/kodepipe/x/v1?a=1" and own.host == "" and own.head == b""
    assert own.headers == ((b"x-api-key", b"t", b"X-Api-Key: t"),)
    for bad in (b"GET relative HTTP/1.1\r\n\r\n", b"garbage\r\n\r\n", b"CONNECT nohost HTTP/1.1\r\n\r\n"):
        with pytest.raises(wire.BadRequest):
            wire.parse_request(bad)


@pytest.mark.parametrize(("headers", "reason"), [
    (b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", "both"),
    (b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", "both"),
    (b"Content-Length: 5\r\nContent-Length: 5\r\n", "more than one"),
    (b"Content-Length: 5\r\ncontent-length: 50\r\n", "more than one"),
    (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", "more than one"),
    (b"Content-Length: 5, 5\r\n", "not one number"),
    (b"Content-Length: -5\r\n", "not one number"),
    (b"Content-Length: 0x5\r\n", "not one number"),
    (b"Transfer-Encoding: gzip, chunked\r\n", "other than chunked"),
    (b"Transfer-Encoding: xchunked\r\n", "other than chunked"),
    (b"Content-Length : 5\r\n", "malformed header"),  # a space before the colon
    (b"X: a\r\n Transfer-Encoding: chunked\r\n", "malformed header"),  # an obsolete folded line
    (b"X: a\nTransfer-Encoding: chunked\r\n", "malformed header"),  # a bare LF
    (b"X: a\rTransfer-Encoding: chunked\r\n", "malformed header"),  # a bare CR
    (b"X: a\x00b\r\n", "malformed header"),
    (b": nameless\r\n", "malformed header"),
])
def test_ambiguous_request_framing_is_refused(headers: bytes, reason: str) -> None:
    with pytest.raises(wire.BadRequest, match=reason):
        wire.parse_request(b"POST http://a.test/ HTTP/1.1\r\nHost: a.test\r\n" + headers + b"\r\n")


def test_read_rules(tmp_path: Path) -> None:
    f = tmp_path / "allow"
    f.write_text("# agents\napi.example.com  # model API\n\n*.npmjs.org\n")
    assert egress.read_rules(f) == ["api.example.com", "*.npmjs.org"]


# -- ClientHellos --------------------------------------------------------------------------------------


def client_hello(name: str | None) -> bytes:
    """A real ClientHello (one TLS record) from Python's ssl module; no SNI when ``name`` is None."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def records(handshake: bytes, cuts: list[int], kind: int = 0x16) -> bytes:
    """``handshake`` bytes in TLS records, a new record at each offset in ``cuts``."""
    bounds = [0, *cuts, len(handshake)]
    return b"".join(bytes([kind, 3, 1]) + (b - a).to_bytes(2, "big") + handshake[a:b]
                    for a, b in itertools.pairwise(bounds))


def handshake_of(hello: bytes) -> bytes:
    assert hello[0] == 0x16 and int.from_bytes(hello[3:5], "big") == len(hello) - 5
    return hello[5:]


def hello_body(extensions: list[tuple[int, bytes]]) -> bytes:
    """A ClientHello handshake message with these extensions (no record header)."""
    body = b"\x03\x03" + b"r" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    exts = b"".join(k.to_bytes(2, "big") + len(v).to_bytes(2, "big") + v for k, v in extensions)
    body += len(exts).to_bytes(2, "big") + exts
    return b"\x01" + len(body).to_bytes(3, "big") + body


def sni(*names: bytes, kind: int = 0) -> bytes:
    entries = b"".join(bytes([kind]) + len(n).to_bytes(2, "big") + n for n in names)
    return len(entries).to_bytes(2, "big") + entries


def test_the_server_name_is_read_from_a_complete_reassembled_client_hello() -> None:
    hello = client_hello("api.example.com")
    hs = handshake_of(hello)
    at = hs.find(b"api.example.com")
    assert wire.server_name(hello) == "api.example.com"
    # across records: the handshake header itself split, the name split, one byte per record at the end
    for cuts in ([1], [2, 3], [at + 3], [10, at, at + 5, at + 9], list(range(len(hs) - 20, len(hs)))):
        assert wire.server_name(records(hs, cuts)) == "api.example.com", cuts
    # and across TCP reads: fed a byte at a time, it waits, then reads the name once the last byte is in
    split = records(hs, [2, at + 4])
    buffer = wire.HelloBuffer()
    assert [buffer.feed(split[i:i + 1]) for i in range(len(split) - 1)] == [None] * (len(split) - 1)
    assert buffer.feed(split[-1:]) == "api.example.com" and bytes(buffer.data) == split
    # what follows the hello (early data, the next flight) is kept, to be forwarded as it came
    buffer = wire.HelloBuffer()
    assert buffer.feed(hello + b"\x17\x03\x03\x00\x01X") == "api.example.com"
    assert bytes(buffer.data).endswith(b"X")
    assert wire.server_name(records(hello_body([(0, sni(b"x.test"))]), [])) == "x.test"


_GOOD = hello_body([(0, sni(b"x.test"))])
_PADDED = hello_body([(0, sni(b"x.test")), (21, bytes(64))])


@pytest.mark.parametrize(("data", "reason"), [
    (b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\n", "does not start with a TLS handshake"),
    (b"SSH-2.0-OpenSSH_9.2\r\n", "does not start with a TLS handshake"),
    (b"\x80\x2e\x01\x03\x01\x00\x15\x00\x00\x00\x10" + b"\x00" * 37, "SSLv2"),
    (b"\x16\x02\x01\x00\x05", "version"),
    (b"\x16\x03\x09\x00\x05", "version"),
    (b"\x16\x03\x01\x00\x00", "of 0 bytes"),  # an empty record: never sent, and a cheap way to stall
    (b"\x16\x03\x01\x40\x01", "of 16385 bytes"),
    (records(b"\x02\x00\x00\x01\x00", []), "type 2"),  # a ServerHello
    (records(b"\x01\xff\xff\xff", []), "limit"),  # 16 MiB announced: refused before any of it is read
    (records(_GOOD[:10], []) + b"\x15\x03\x01\x00\x02\x01\x00", "type 21"),  # an alert mid-hello
    (records(_GOOD + b"\x01\x00\x00\x00", []), "after the ClientHello"),
    (records(hello_body([]), []), "no server name"),
    (records(b"\x01\x00\x00\x29" + _GOOD[4:45], []), "no server name"),  # no extensions at all
    (records(hello_body([(10, b"\x00\x02\x00\x17")]), []), "no server name"),
    (records(hello_body([(0, sni(b"x.test")), (0, sni(b"y.test"))]), []), "twice"),
    (records(hello_body([(0, sni(b"x.test", b"y.test"))]), []), "more than one server name"),
    (records(hello_body([(0, sni(b"x.test", kind=1))]), []), "not a host name"),
    (records(hello_body([(0, sni(b""))]), []), "not a host name"),
    (records(hello_body([(0, sni("é.test".encode()))]), []), "ASCII"),
    (records(hello_body([(0, sni(b"x.test") + b"\x00")]), []), "malformed server_name"),
    (records(hello_body([(0, sni(b"x.test")), (0xFE0D, b"\x00" * 8)]), []), "encrypted ClientHello"),
    (records(hello_body([(0, sni(b"x.test")), (0xFFCE, b"\x00" * 8)]), []), "encrypted ClientHello"),
    (records(_GOOD[:45] + (int.from_bytes(_GOOD[45:47], "big") + 1).to_bytes(2, "big") + _GOOD[47:], []),
     "truncated"),  # the extensions' length says one byte more than the message holds
    (records(_GOOD[:39] + b"\x00\x03" + _GOOD[41:], []), "cipher suite"),
    (records(_PADDED[:38] + b"\x21" + _PADDED[39:], []), "session id"),
    (records(_GOOD[:4] + b"\x02" + _GOOD[5:], []), "version"),
    (records(_GOOD + b"\x00", []), "after the ClientHello"),
])
def test_what_is_not_one_checkable_client_hello_is_refused(data: bytes, reason: str) -> None:
    with pytest.raises(wire.BadHello, match=reason):
        wire.HelloBuffer().feed(data)


def test_an_incomplete_hello_waits_and_a_big_one_is_refused_within_the_limit() -> None:
    hello = client_hello("x.test")
    assert wire.HelloBuffer().feed(hello[:-1]) is None
    with pytest.raises(wire.BadHello, match="incomplete"):
        wire.server_name(hello[:-1])
    # a plausible length, in 1-byte records: refused once the records held pass the limit
    buffer, fed = wire.HelloBuffer(), 0
    with pytest.raises(wire.BadHello, match=f"first {wire.HELLO_LIMIT} bytes"):
        for piece in [records(b"\x01\x00\xea\x60", [1, 2, 3])] + [b"\x16\x03\x01\x00\x01\x00"] * 20000:
            fed += len(piece)
            buffer.feed(piece)
    assert wire.HELLO_LIMIT - 6 < fed <= wire.HELLO_LIMIT + 6


# -- the proxy on loopback -----------------------------------------------------------------------


@dataclass
class Origin:
    port: int
    seen: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
def origin() -> Iterator[Origin]:
    seen: list[dict[str, Any]] = []
    with httpd.origin("127.0.0.1", "hello from", seen=seen) as port:
        yield Origin(port, seen)


@pytest.fixture
def lenient() -> Iterator[Origin]:
    """An origin that reads every request a connection carries, whatever its Connection header."""
    seen: list[dict[str, Any]] = []
    with httpd.origin("127.0.0.1", "lenient", seen=seen, lenient=True) as port:
        yield Origin(port, seen)


@pytest.fixture
def tls_origin() -> Iterator[Origin]:
    seen: list[dict[str, Any]] = []
    with httpd.origin("127.0.0.1", "tls from", seen=seen, tls=True) as port:
        yield Origin(port, seen)


@dataclass
class Running:
    port: int
    log: Path
    dns_port: int
    proxy: egress.Proxy


def start_proxy(tmp_path: Path, allow: list[str], pins: list[str]) -> tuple[egress.Proxy, Running]:
    policy = egress_policy.Policy.build(allow, pins)
    log = egress.DecisionLog(tmp_path / "egress.jsonl", "c1")
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(512)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    p = egress.Proxy(policy, log)
    p.start(tcp, udp)
    return p, Running(tcp.getsockname()[1], tmp_path / "egress.jsonl", udp.getsockname()[1], p)


@pytest.fixture
def proxy(tmp_path: Path, origin: Origin, lenient: Origin, tls_origin: Origin) -> Iterator[Running]:
    ports = f"{origin.port},{lenient.port},{tls_origin.port}"
    p, running = start_proxy(tmp_path, [f"allowed.test:{ports}", f"meta.test:{ports}", f"other.test:{ports}"],
                             ["allowed.test=127.0.0.1", "meta.test=169.254.169.254", "other.test=127.0.0.1"])
    yield running
    p.stop()
    p.log.close()


def ask(port: int, data: bytes, *, half_close: bool = False) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def decisions(log: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in log.read_bytes().splitlines()]


def logged(log: Path, count: int) -> list[dict[str, Any]]:
    """The log once it holds ``count`` decisions: a tunnel's line is written when the proxy sees it end,
    which can be after the client has moved on (bounded: a hang fails the test)."""
    deadline = time.monotonic() + 30
    while len(got := decisions(log)) < count:
        assert time.monotonic() < deadline, got
        time.sleep(0.01)
    return got


def tunnel(port: int, target: str, send: list[bytes] | None = None) -> socket.socket:
    """A connection to the proxy with a CONNECT to ``target`` answered 200; then ``send``, one write each."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    reply = b""
    while not reply.endswith(b"\r\n\r\n"):
        reply += s.recv(1)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    for data in send or []:
        s.sendall(data)
    return s


def rest(s: socket.socket) -> bytes:
    got = b""
    with s:
        while chunk := s.recv(65536):
            got += chunk
    return got


def https_get(s: socket.socket, name: str | None, path: str, cuts: list[int] | None = None,
              write: int = 0) -> bytes:
    """GET ``path`` over TLS on ``s`` (verification off); the ClientHello in records cut at ``cuts``
    and sent in writes of ``write`` bytes.  The response, or b"" when the other end just closed."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    first, got = True, b""
    with s:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                data = outgoing.read()
                if first and cuts is not None:
                    data = records(handshake_of(data), cuts)
                first = False
                for at in range(0, len(data), write or len(data) or 1):
                    s.sendall(data[at:at + (write or len(data))])
                chunk = s.recv(65536)
                if not chunk:
                    return b""
                incoming.write(chunk)
            except ssl.SSLError:
                return b""
        tls.write(f"GET {path} HTTP/1.0\r\nHost: {name}\r\n\r\n".encode())
        s.sendall(outgoing.read())
        while chunk := s.recv(65536):
            incoming.write(chunk)
            try:
                while True:
                    got += tls.read(65536)
            except ssl.SSLWantReadError:
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break
    return got


def test_allowed_http_and_tls_connect_pass_denied_ones_do_not(proxy: Running, origin: Origin,
                                                               tls_origin: Origin) -> None:
    reply = ask(proxy.port, f"GET http://allowed.test:{origin.port}/a HTTP/1.1\r\nHost: allowed.test\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.0 200") and b"hello from /a" in reply
    got = https_get(tunnel(proxy.port, f"allowed.test:{tls_origin.port}"), "allowed.test", "/tunnel")
    assert b"tls from /tunnel" in got
    logged(proxy.log, 2)  # the tunnel's line first, so that the order below is the order of the requests
    for request in (f"GET http://denied.test:{origin.port}/ HTTP/1.1\r\n\r\n",
                    f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\n\r\n",
                    f"CONNECT meta.test:{origin.port} HTTP/1.1\r\n\r\n"):
        assert ask(proxy.port, request.encode()).startswith(b"HTTP/1.1 403")
    got_log = decisions(proxy.log)
    assert [d["decision"] for d in got_log] == ["allow", "allow", "deny", "deny", "deny"]
    assert got_log[0]["bytes_down"] > 0 and got_log[1]["method"] == "CONNECT" and got_log[1]["bytes_up"] > 0
    assert got_log[1]["sni"] == "allowed.test"
    assert "raw IP" in got_log[3]["reason"] and "forbidden" in got_log[4]["reason"]
    assert all(d["container"] == "c1" for d in got_log)
    from kodepipe.core import chain  # each decision was hash-chained as it was written

    assert chain.verify_log(proxy.log, chain.head_of(proxy.log))["entries"] == len(got_log)
    assert chain.verify_log(proxy.log, chain.head_of(proxy.log))["ok"] is True


def test_two_hundred_concurrent_connections(proxy: Running, origin: Origin) -> None:
    def one(n: int) -> bool:
        reply = ask(proxy.port, f"GET http://allowed.test:{origin.port}/{n} HTTP/1.1\r\n\r\n".encode())
        return f"hello from /{n}".encode() in reply

    with concurrent.futures.ThreadPoolExecutor(200) as pool:
        results = list(pool.map(one, range(200)))
    assert all(results)
    assert sum(d["decision"] == "allow" for d in decisions(proxy.log)) == 200


def test_dns_answers_only_allowed_names(proxy: Running) -> None:
    import dns.message
    import dns.rcode

    def query(name: str) -> Any:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.sendto(dns.message.make_query(name, "A").to_wire(), ("127.0.0.1", proxy.dns_port))
            return dns.message.from_wire(s.recv(4096))

    ok = query("allowed.test")
    assert ok.rcode() == dns.rcode.NOERROR and "127.0.0.1" in ok.answer[0].to_text()
    assert query("denied.test").rcode() == dns.rcode.REFUSED
    assert query("meta.test").rcode() == dns.rcode.REFUSED  # allowed, but only a metadata address
    assert [(d["host"], d["decision"]) for d in decisions(proxy.log)] == [
        ("allowed.test", "allow"), ("denied.test", "deny"), ("meta.test", "deny")]


def test_a_tls_tunnel_must_name_the_allowed_host(proxy: Running, tls_origin: Origin) -> None:
    got = https_get(tunnel(proxy.port, f"allowed.test:{tls_origin.port}"), "attacker.example", "/fronted")
    assert got == b"" and tls_origin.seen == []
    (decision,) = decisions(proxy.log)
    assert decision["decision"] == "deny" and decision["sni"] == "attacker.example"


def test_a_client_hello_split_across_records_and_writes_is_checked_whole(proxy: Running,
                                                                         tls_origin: Origin) -> None:
    target = f"allowed.test:{tls_origin.port}"
    # the handshake header cut, the name cut in two records, and every record cut across 97-byte writes
    assert b"tls from /split" in https_get(tunnel(proxy.port, target), "allowed.test", "/split",
                                           cuts=[2, 130, 134, 300], write=97)
    # the same with another name: the part of the name in a later record is read too, and refused
    assert https_get(tunnel(proxy.port, target), "attacker.example", "/x", cuts=[2, 130, 134, 300], write=7) == b""
    assert https_get(tunnel(proxy.port, target), "allowed.test.attacker.example", "/x", cuts=[130], write=1) == b""
    assert [s["path"] for s in tls_origin.seen] == ["/split"]
    got = decisions(proxy.log)
    assert [(d["decision"], d.get("sni")) for d in got] == [
        ("allow", "allowed.test"), ("deny", "attacker.example"), ("deny", "allowed.test.attacker.example")]


def test_connect_carries_only_tls_on_every_port(proxy: Running, origin: Origin, lenient: Origin,
                                                tls_origin: Origin) -> None:
    """CONNECT to an allowed plain-HTTP port with HTTP inside, naming another host: refused, and the
    origin never sees a byte (nothing is even connected before the ClientHello is checked)."""
    for port in (origin.port, lenient.port):
        got = rest(tunnel(proxy.port, f"allowed.test:{port}",
                          [b"GET /smuggled HTTP/1.1\r\nHost: denied.test\r\n\r\n"]))
        assert got.startswith(b"HTTP/1.1 403") and b"/smuggled" not in got
    attacks = [
        [client_hello(None)],  # no SNI: the name cannot be checked
        [b"\x80\x2e\x01\x03\x01" + bytes(44)],  # SSLv2-style
        [b"SSH-2.0-x\r\n"],  # another protocol
        [records(hello_body([(0, sni(b"allowed.test")), (0xFE0D, bytes(8))]), [])],  # ECH
        [records(hello_body([(0, sni(b"allowed.test", b"denied.test"))]), [])],
        [records(hello_body([(0, sni(b"allowed.test")), (0, sni(b"denied.test"))]), [])],
    ]
    for send in attacks:
        got = rest(tunnel(proxy.port, f"allowed.test:{tls_origin.port}", send))
        assert b"tls from" not in got
    # truncated: the client gives up half-way
    s = tunnel(proxy.port, f"allowed.test:{tls_origin.port}", [client_hello("allowed.test")[:100]])
    s.shutdown(socket.SHUT_WR)
    rest(s)
    assert origin.seen == [] and lenient.seen == [] and tls_origin.seen == []
    logged = decisions(proxy.log)
    assert len(logged) == 2 + len(attacks) + 1 and all(d["decision"] == "deny" for d in logged)
    assert all("only TLS" in d["reason"] for d in logged)
    assert "does not start with a TLS" in logged[0]["reason"] and "no server name" in logged[2]["reason"]
    assert "closed before a complete ClientHello" in logged[-1]["reason"]


def test_waiting_for_a_client_hello_is_bounded_in_time_and_bytes(proxy: Running, tls_origin: Origin,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(egress, "HELLO_TIMEOUT", 0.5)
    s = tunnel(proxy.port, f"allowed.test:{tls_origin.port}", [client_hello("allowed.test")[:100]])
    s.settimeout(30)  # the proxy closes after HELLO_TIMEOUT: this only bounds a broken test
    assert b"tls from" not in rest(s)
    # records that never complete a hello: refused as soon as they pass HELLO_LIMIT, long before the time is up
    monkeypatch.setattr(egress, "HELLO_TIMEOUT", 3600.0)
    header = records(b"\x01\x00\xea\x60", [1, 2, 3])  # 60000 bytes announced, in 1-byte records
    s = tunnel(proxy.port, f"allowed.test:{tls_origin.port}",
               [header + b"\x16\x03\x01\x00\x01\x00" * ((wire.HELLO_LIMIT - len(header)) // 6 + 1)])
    s.settimeout(30)  # the proxy closes at the limit: this only bounds a broken test
    with contextlib.suppress(ConnectionResetError):
        assert b"tls from" not in rest(s)
    got = decisions(proxy.log)
    assert "within 0.5 s" in got[0]["reason"] and f"first {wire.HELLO_LIMIT} bytes" in got[1]["reason"]
    assert tls_origin.seen == []


def smuggle(port: int, data: bytes) -> bytes:
    """Everything in one write, then the client's end closed: a lenient origin then reads to the end
    whatever the proxy forwarded, and answers each request it finds."""
    return ask(port, data, half_close=True)


def test_pipelined_requests_never_pass_unchecked(proxy: Running, lenient: Origin) -> None:
    """A second request in the same write, for a denied host: not forwarded, dropped and counted."""
    first = f"GET http://allowed.test:{lenient.port}/first HTTP/1.1\r\nHost: allowed.test\r\n\r\n"
    second = "GET http://denied.test/second HTTP/1.1\r\nHost: denied.test\r\n\r\n"
    got = smuggle(proxy.port, (first + second + second.replace("http://denied.test", "")).encode())
    assert b"lenient /first" in got and b"second" not in got
    assert [(s["path"], s["host"]) for s in lenient.seen] == [("/first", f"allowed.test:{lenient.port}")]
    (decision,) = decisions(proxy.log)
    assert decision["decision"] == "allow" and decision["dropped"] == len(second) * 2 - len("http://denied.test")


@pytest.mark.parametrize(("framing", "body"), [
    ("Content-Length: 5\r\n", "hello"),
    ("Content-Length: 0\r\n", ""),
    ("", ""),  # no framing: no body
    ("Transfer-Encoding: chunked\r\n", "5\r\nhello\r\n0\r\n\r\n"),
    ("Transfer-Encoding: chunked\r\n", "5\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n"),
])
def test_a_body_carries_exactly_what_it_declares(proxy: Running, lenient: Origin, framing: str, body: str) -> None:
    """The body's framing is followed to its last byte: a request smuggled after it is not forwarded."""
    smuggled = "GET /smuggled HTTP/1.1\r\nHost: denied.test\r\nContent-Length: 0\r\n\r\n"
    request = f"POST http://allowed.test:{lenient.port}/post HTTP/1.1\r\nHost: a\r\n{framing}\r\n{body}"
    got = smuggle(proxy.port, (request + smuggled).encode())
    assert b"lenient /post" in got and b"smuggled" not in got
    assert [(s["path"], s["body"]) for s in lenient.seen] == [("/post", b"hello" if "hello" in body else b"")]
    assert decisions(proxy.log)[0]["dropped"] == len(smuggled)


@pytest.mark.parametrize(("framing", "body"), [
    ("Content-Length: 0\r\nTransfer-Encoding: chunked\r\n", "0\r\n\r\n"),
    ("Transfer-Encoding: chunked\r\nContent-Length: 70\r\n", "0\r\n\r\n"),
    ("Content-Length: 0\r\nContent-Length: 70\r\n", ""),
    ("Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n", "0\r\n\r\n"),
    ("Transfer-Encoding: identity, chunked\r\n", "0\r\n\r\n"),
    ("Content-Length : 0\r\n", ""),
    ("X: y\r\n Transfer-Encoding: chunked\r\n", "0\r\n\r\n"),
])
def test_ambiguous_framing_is_refused_before_anything_is_forwarded(proxy: Running, lenient: Origin,
                                                                   framing: str, body: str) -> None:
    smuggled = "GET /smuggled HTTP/1.1\r\nHost: denied.test\r\n\r\n"
    request = f"POST http://allowed.test:{lenient.port}/post HTTP/1.1\r\nHost: a\r\n{framing}\r\n{body}"
    assert smuggle(proxy.port, (request + smuggled).encode()).startswith(b"HTTP/1.1 400")
    assert lenient.seen == []
    (decision,) = decisions(proxy.log)
    assert decision["decision"] == "error" and decision["reason"]


@pytest.mark.parametrize("body", [
    "5\r\nhello\r\n0\r\n",  # a request in the trailer section
    "5;ext=1\r\nhello\r\n0\r\n\r\n",  # a chunk extension
    "5\r\nhelloXX\r\n0\r\n\r\n",  # a chunk longer than its size
    "5 \r\nhello\r\n0\r\n\r\n",
    "+5\r\nhello\r\n0\r\n\r\n",
    "5\nhello\r\n0\r\n\r\n",
])
def test_a_malformed_chunked_body_stops_the_forwarding(proxy: Running, lenient: Origin, body: str) -> None:
    smuggled = "GET /smuggled HTTP/1.1\r\nHost: denied.test\r\n\r\n"
    request = (f"POST http://allowed.test:{lenient.port}/post HTTP/1.1\r\nHost: a\r\n"
               f"Transfer-Encoding: chunked\r\n\r\n{body}")
    got = smuggle(proxy.port, (request + smuggled).encode())
    assert b"smuggled" not in got
    assert all(s["path"] == "/post" for s in lenient.seen)
    (decision,) = decisions(proxy.log)
    assert decision["decision"] == "error"


def test_the_host_header_is_the_checked_host(origin: Origin) -> None:
    request = wire.parse_request(
        f"GET http://allowed.test:{origin.port}/h HTTP/1.1\r\nHost: attacker.example\r\n\r\n".encode())
    assert f"Host: allowed.test:{origin.port}".encode() in request.head and b"attacker" not in request.head


def test_a_name_that_resolves_to_the_hosts_own_address_is_refused_by_the_proxy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An origin on the host's non-loopback address; an allowed name that resolves there is refused,
    over HTTP, CONNECT and DNS alike.  The same address pinned with --resolve is reached."""
    import dns.message
    import dns.rcode

    addr = non_loopback_ipv4()
    seen: list[dict[str, Any]] = []
    with httpd.origin(addr, "own", seen=seen) as port:
        resolving_to(monkeypatch, "sneaky.test", addr)
        p, running = start_proxy(tmp_path, [f"sneaky.test:{port}", f"pinned.test:{port}"],
                                 [f"pinned.test={addr}"])
        try:
            assert ask(running.port, f"GET http://sneaky.test:{port}/x HTTP/1.1\r\n\r\n".encode()).startswith(
                b"HTTP/1.1 403")
            assert ask(running.port, f"CONNECT sneaky.test:{port} HTTP/1.1\r\n\r\n".encode()).startswith(
                b"HTTP/1.1 403")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(10)
                s.sendto(dns.message.make_query("sneaky.test", "A").to_wire(), ("127.0.0.1", running.dns_port))
                assert dns.message.from_wire(s.recv(4096)).rcode() == dns.rcode.REFUSED
            pinned = ask(running.port, f"GET http://pinned.test:{port}/pinned HTTP/1.1\r\n\r\n".encode())
            assert b"own /pinned" in pinned
        finally:
            p.stop()
            p.log.close()
    assert [s["path"] for s in seen] == ["/pinned"]
    got = decisions(running.log)
    assert [d["decision"] for d in got] == ["deny", "deny", "deny", "allow"]
    assert all("this host's own" in d["reason"] for d in got[:3])


def test_a_connection_cut_when_the_sandbox_ends_prints_no_traceback(
        tmp_path: Path, tls_origin: Origin, caplog: pytest.LogCaptureFixture) -> None:
    """An open tunnel when the proxy stops is logged as cut; asyncio prints no "Exception in callback"."""
    p, running = start_proxy(tmp_path, [f"allowed.test:{tls_origin.port}"], ["allowed.test=127.0.0.1"])
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    s = tunnel(running.port, f"allowed.test:{tls_origin.port}")
    with caplog.at_level(logging.DEBUG, logger="asyncio"), ctx.wrap_socket(s, server_hostname="allowed.test"):
        # the handshake is done: the tunnel is open, piping, when the proxy stops
        p.stop()
        p.log.close()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    (decision,) = decisions(running.log)
    assert decision["reason"] == "cut: the sandbox ended"


def test_ipv4_inside_ipv6_and_other_forbidden_forms() -> None:
    for addr in ("::ffff:169.254.169.254", "::ffff:127.0.0.1", "64:ff9b::a9fe:a9fe", "2002:a9fe:a9fe::1",
                 "168.63.129.16", "fe80::1", "0.0.0.0", "127.0.0.2", "::1"):  # noqa: S104
        assert egress_policy.forbidden(addr), addr
    assert not egress_policy.forbidden("192.0.2.7") and not egress_policy.forbidden("2001:db8::1")
    assert not egress_policy.forbidden("127.0.0.1", allow_loopback=True)


def test_a_connection_whose_client_half_closed_lives_until_its_answer(tmp_path: Path) -> None:
    """Once a client has sent its request and closed its end, only the proxy's own reference keeps the
    connection's task alive (the loop's is weak): a garbage collection must not end it unanswered."""
    import gc

    with socket.create_server(("127.0.0.1", 0)) as upstream:
        port = upstream.getsockname()[1]
        p, running = start_proxy(tmp_path, [f"slow.test:{port}"], ["slow.test=127.0.0.1"])
        try:
            client = socket.create_connection(("127.0.0.1", running.port), timeout=10)
            client.sendall(f"GET http://slow.test:{port}/ HTTP/1.1\r\n\r\n".encode())
            client.shutdown(socket.SHUT_WR)
            upstream.settimeout(10)
            conn, _ = upstream.accept()
            with conn:
                conn.settimeout(10)
                while conn.recv(65536):  # the request, then the client's end passed on
                    pass
                # let the proxy's loop settle (the request's sender finishing takes a few rounds),
                # then collect: only what is still referenced survives
                settled = threading.Event()

                def hop(rounds: int) -> None:
                    if rounds:
                        p.loop.call_soon(hop, rounds - 1)
                    else:
                        settled.set()

                p.loop.call_soon_threadsafe(hop, 20)
                assert settled.wait(10)
                gc.collect()
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
            assert rest(client).endswith(b"\r\n\r\nok")
        finally:
            p.stop()
            p.log.close()
    (decision,) = decisions(running.log)
    assert decision["decision"] == "allow" and decision["bytes_down"] > 0


def test_a_checked_tunnel_is_spliced_whole_both_ways(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once its ClientHello is checked, a tunnel's bytes are moved by the kernel (splice), not copied
    through Python: what the client sent with its ClientHello in one write comes first, megabytes
    arrive whole and in order both ways, a half-close passes through, and the log counts every byte."""
    def no_copy(*_args: Any) -> Any:
        raise AssertionError("the tunnel was copied through Python buffers")

    monkeypatch.setattr(egress, "_pipe", no_copy)
    payload = bytes(range(256)) * (12 << 12)  # 12 MiB, more than a pipe holds
    hello = client_hello("echo.test")
    with socket.create_server(("127.0.0.1", 0)) as upstream:
        port = upstream.getsockname()[1]
        p, running = start_proxy(tmp_path, [f"echo.test:{port}"], ["echo.test=127.0.0.1"])

        upstream.settimeout(30)  # bounded: a broken tunnel fails the test instead of hanging it

        def echo() -> int:
            conn, _ = upstream.accept()
            conn.settimeout(30)
            total = 0
            with conn:
                while data := conn.recv(1 << 16):
                    conn.sendall(data)
                    total += len(data)
            return total

        try:
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                echoed = pool.submit(echo)
                s = tunnel(running.port, f"echo.test:{port}", [hello + b"early"])
                s.settimeout(30)

                def send() -> None:
                    s.sendall(payload)
                    s.shutdown(socket.SHUT_WR)

                pool.submit(send)
                got = rest(s)
                assert echoed.result(30) == len(hello) + 5 + len(payload)
        finally:
            p.stop()
            p.log.close()
    assert got == hello + b"early" + payload
    (decision,) = logged(running.log, 1)
    assert decision["decision"] == "allow" and decision["sni"] == "echo.test"
    assert decision["bytes_up"] == decision["bytes_down"] == len(got)
