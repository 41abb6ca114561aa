"""The egress policy and proxy on real loopback sockets (the netns part is in the integration tests)."""

from __future__ import annotations

import concurrent.futures
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from kodepipe import egress
from kodepipe.errors import BadInput
from tests import httpd


def test_rules_and_wildcards() -> None:
    policy = egress.Policy.build(["api.example.com", "*.pkg.test", "git.test:22,443"])
    assert policy.check("API.example.com.", 443) == "api.example.com"
    assert policy.check("a.pkg.test", 80) == "a.pkg.test" and policy.check("a.b.pkg.test", 443)
    for host, port, reason in [("pkg.test", 443, "allowlist"), ("evil.com", 443, "allowlist"),
                               ("api.example.com", 8080, "port 8080"), ("git.test", 80, "port 80"),
                               ("1.2.3.4", 443, "raw IP"), ("[::1]", 443, "raw IP"),
                               ("api.example.com.evil.com", 443, "allowlist")]:
        with pytest.raises(egress.Denied, match=reason):
            policy.check(host, port)
    assert policy.check("git.test", 22)
    for bad in ("", "*", "com", "*.com", "exa mple.com", "a..b", "-a.com", "x.com:0", "x.com:http"):
        with pytest.raises(BadInput):
            egress.parse_rule(bad)


def test_addresses_refuse_metadata_link_local_and_unpinned_loopback() -> None:
    policy = egress.Policy.build(["meta.test", "local.test", "ok.test", "localhost.test"],
                                 ["meta.test=169.254.169.254", "local.test=127.0.0.1", "ok.test=192.0.2.7",
                                  "ok.test=fe80::1"])
    with pytest.raises(egress.Denied, match="forbidden"):
        policy.addresses("meta.test", 443)
    assert policy.addresses("local.test", 80) == ["127.0.0.1"]  # pinned: the user named it
    assert policy.addresses("ok.test", 443) == ["192.0.2.7"]  # the link-local one is dropped
    for bad in ("x", "a=b", "*.a.test=1.2.3.4", "a.test=999.1.1.1"):
        with pytest.raises(BadInput):
            egress.parse_pin(bad)


def test_unpinned_loopback_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = egress.Policy.build(["sneaky.test"])
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [(2, 1, 6, "", ("127.0.0.1", 443))])
    with pytest.raises(egress.Denied, match="loopback"):
        policy.addresses("sneaky.test", 443)


def test_parse_request() -> None:
    assert egress.parse_request(b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n")[:3] == \
        ("CONNECT", "a.test", 443)
    method, host, port, fwd = egress.parse_request(
        b"GET http://a.test:8080/x?y=1 HTTP/1.1\r\nHost: a.test\r\nProxy-Authorization: secret\r\n"
        b"Connection: keep-alive\r\n\r\n")
    assert (method, host, port) == ("GET", "a.test", 8080)
    assert fwd.startswith(b"GET /x?y=1 HTTP/1.1\r\n") and b"Proxy-" not in fwd and b"Connection: close" in fwd
    for bad in (b"GET /relative HTTP/1.1\r\n\r\n", b"garbage\r\n\r\n", b"CONNECT nohost HTTP/1.1\r\n\r\n"):
        with pytest.raises(egress.BadRequest):
            egress.parse_request(bad)


def test_read_rules(tmp_path: Path) -> None:
    f = tmp_path / "allow"
    f.write_text("# agents\napi.example.com  # model API\n\n*.npmjs.org\n")
    assert egress.read_rules(f) == ["api.example.com", "*.npmjs.org"]


# -- the proxy on loopback -----------------------------------------------------------------------



@pytest.fixture
def origin() -> Iterator[int]:
    with httpd.origin("127.0.0.1", "hello from") as port:
        yield port


@pytest.fixture
def proxy(tmp_path: Path, origin: int) -> Iterator[tuple[int, Path, int]]:
    policy = egress.Policy.build([f"allowed.test:{origin}", f"meta.test:{origin}"],
                                 ["allowed.test=127.0.0.1", "meta.test=169.254.169.254"])
    log = egress.DecisionLog(tmp_path / "egress.jsonl", "c1")
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(512)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    p = egress.Proxy(policy, log)
    p.start(tcp, udp)
    yield tcp.getsockname()[1], tmp_path / "egress.jsonl", udp.getsockname()[1]
    p.stop()
    log.close()


def ask(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def decisions(log: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in log.read_bytes().splitlines()]


def test_allowed_http_and_connect_pass_denied_ones_do_not(proxy: tuple[int, Path, int], origin: int) -> None:
    port, log, _ = proxy
    reply = ask(port, f"GET http://allowed.test:{origin}/a HTTP/1.1\r\nHost: allowed.test\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.0 200") and b"hello from /a" in reply
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"CONNECT allowed.test:{origin} HTTP/1.1\r\n\r\n".encode())
        assert s.recv(100).startswith(b"HTTP/1.1 200 Connection established")
        s.sendall(b"GET /tunnel HTTP/1.0\r\n\r\n")
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        assert b"hello from /tunnel" in got
    for request in (f"GET http://denied.test:{origin}/ HTTP/1.1\r\n\r\n",
                    f"CONNECT 127.0.0.1:{origin} HTTP/1.1\r\n\r\n",
                    f"CONNECT meta.test:{origin} HTTP/1.1\r\n\r\n"):
        assert ask(port, request.encode()).startswith(b"HTTP/1.1 403")
    got = decisions(log)
    assert [d["decision"] for d in got] == ["allow", "allow", "deny", "deny", "deny"]
    assert got[0]["bytes_down"] > 0 and got[1]["method"] == "CONNECT" and got[1]["bytes_up"] > 0
    assert "raw IP" in got[3]["reason"] and "forbidden" in got[4]["reason"]
    assert all(d["container"] == "c1" for d in got)


def test_two_hundred_concurrent_connections(proxy: tuple[int, Path, int], origin: int) -> None:
    port, log, _ = proxy

    def one(n: int) -> bool:
        reply = ask(port, f"GET http://allowed.test:{origin}/{n} HTTP/1.1\r\n\r\n".encode())
        return f"hello from /{n}".encode() in reply

    with concurrent.futures.ThreadPoolExecutor(200) as pool:
        results = list(pool.map(one, range(200)))
    assert all(results)
    assert sum(d["decision"] == "allow" for d in decisions(log)) == 200


def test_dns_answers_only_allowed_names(proxy: tuple[int, Path, int]) -> None:
    import dns.message
    import dns.rcode

    _, log, dns_port = proxy

    def query(name: str) -> Any:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.sendto(dns.message.make_query(name, "A").to_wire(), ("127.0.0.1", dns_port))
            return dns.message.from_wire(s.recv(4096))

    ok = query("allowed.test")
    assert ok.rcode() == dns.rcode.NOERROR and "127.0.0.1" in ok.answer[0].to_text()
    assert query("denied.test").rcode() == dns.rcode.REFUSED
    assert query("meta.test").rcode() == dns.rcode.REFUSED  # allowed, but only a metadata address
    assert [(d["host"], d["decision"]) for d in decisions(log)] == [
        ("allowed.test", "allow"), ("denied.test", "deny"), ("meta.test", "deny")]


def client_hello(name: str) -> bytes:
    import ssl

    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_server_name_is_read_from_a_client_hello() -> None:
    assert egress.server_name(client_hello("api.example.com")) == "api.example.com"
    assert egress.server_name(b"GET / HTTP/1.1\r\n\r\n") is None
    assert egress.server_name(client_hello("x.test")[:40]) is None


def test_a_tls_tunnel_must_name_the_allowed_host(proxy: tuple[int, Path, int], origin: int) -> None:
    port, log, _ = proxy
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"CONNECT allowed.test:{origin} HTTP/1.1\r\n\r\n".encode())
        assert s.recv(100).startswith(b"HTTP/1.1 200")
        s.sendall(client_hello("attacker.example"))  # domain fronting by SNI
        rest = b""
        while chunk := s.recv(4096):
            rest += chunk
    assert b"origin" not in rest
    (decision,) = decisions(log)
    assert decision["decision"] == "deny" and decision["sni"] == "attacker.example"


def test_the_host_header_is_the_checked_host(proxy: tuple[int, Path, int], origin: int) -> None:
    _port, _, _ = proxy
    _, _, _, forward = egress.parse_request(
        f"GET http://allowed.test:{origin}/h HTTP/1.1\r\nHost: attacker.example\r\n\r\n".encode())
    assert f"Host: allowed.test:{origin}".encode() in forward and b"attacker" not in forward


def test_ipv4_inside_ipv6_and_other_forbidden_forms() -> None:
    for addr in ("::ffff:169.254.169.254", "::ffff:127.0.0.1", "64:ff9b::a9fe:a9fe", "2002:a9fe:a9fe::1",
                 "168.63.129.16", "fe80::1", "0.0.0.0", "127.0.0.2", "::1"):  # noqa: S104
        assert egress.forbidden(addr), addr
    assert not egress.forbidden("192.0.2.7") and not egress.forbidden("2001:db8::1")
    assert not egress.forbidden("127.0.0.1", allow_loopback=True)
