"""kp-run --allow on real Podman: the proxy is the container's only way out, by name,
and every decision is logged.  Only servers this test starts are ever targets; each one
records the requests it received, so a test says what reached it, not only what the
client was told."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests import httpd
from tests.conftest import BIN, lines
from tests.integration.test_run import one_podman_service  # noqa: F401 - the module's shared service

pytestmark = pytest.mark.integration


def host_ipv4s() -> list[tuple[str, str]]:
    """(interface, address) of this host's global IPv4 addresses, lo excluded, from `ip -j addr`."""
    links = json.loads(subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, check=True).stdout)
    return [(link["ifname"], a["local"]) for link in links if link["ifname"] != "lo"
            for a in link.get("addr_info", []) if a.get("family") == "inet" and a.get("scope") == "global"]


@dataclass
class Origin:
    host_ip: str  # a non-loopback address of this host, where the origin is reachable too
    port: int
    seen: list[dict[str, Any]] = field(default_factory=list)

    def paths(self) -> list[str]:
        return [s["path"] for s in self.seen]


def serving(greeting: str, **kwargs: Any) -> Iterator[Origin]:
    found = host_ipv4s()
    if not found:
        pytest.skip("this host has no global IPv4 address")
    seen: list[dict[str, Any]] = []
    with httpd.origin("0.0.0.0", greeting, seen=seen, **kwargs) as port:  # noqa: S104 - all the host's addresses
        yield Origin(found[0][1], port, seen)


@pytest.fixture
def origin() -> Iterator[Origin]:
    """An HTTP server on all the host's addresses."""
    yield from serving("origin says")


@pytest.fixture
def lenient() -> Iterator[Origin]:
    """An HTTP server that reads every request a connection carries, whatever its Connection header
    says: bytes smuggled after a request reach it as requests of their own."""
    yield from serving("lenient says", lenient=True)


@pytest.fixture
def tls_origin() -> Iterator[Origin]:
    """An HTTPS server (self-signed; the clients inside do not verify it)."""
    yield from serving("tls says", tls=True)


def egress_log(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in Path(record["egress_log"]).read_bytes().splitlines()]


PROBE = r"""
set -u
echo "HTTP: $(curl -sS --max-time 10 http://allowed.test:$PORT/plain)"
echo "CONNECT: $(curl -sS -k --max-time 10 https://allowed.test:$TLSPORT/tunnel)"
echo "TUNNEL-PLAIN: $(curl -sS --max-time 10 --proxytunnel http://allowed.test:$PORT/tunnel 2>&1)"
echo "DENIED: $(curl -sS --max-time 10 -o /dev/null -w '%{http_code}' http://denied.test:$PORT/)"
echo "RAWIP: $(curl -sS --max-time 10 -o /dev/null -w '%{http_code}' http://$HOSTIP:$PORT/)"
echo "META: $(curl -sS --max-time 10 -o /dev/null -w '%{http_code}' --proxytunnel http://meta.test:$PORT/)"
echo "DIRECT: $(curl -sS --noproxy '*' --max-time 5 http://$HOSTIP:$PORT/ 2>&1)"
echo "DNS-ALLOWED: $(getent hosts allowed.test)"
echo "DNS-DENIED: $(getent hosts denied.test || echo refused)"
python3 - <<'EOF'
import os, socket, threading
port, ok = int(os.environ["PORT"]), []
def one(n):
    s = socket.create_connection(("127.0.0.1", 3128), timeout=60)
    s.sendall(b"GET http://allowed.test:%d/many%d HTTP/1.1\r\nHost: allowed.test\r\n\r\n" % (port, n))
    got = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    ok.append(got.endswith(b"origin says /many%d\n" % n))
threads = [threading.Thread(target=one, args=(n,)) for n in range(200)]
for t in threads: t.start()
for t in threads: t.join()
print("CONCURRENT:", sum(ok))
EOF"""


def test_the_proxy_is_the_only_way_out(shell_image: str, origin: Origin, tls_origin: Origin, tmp_path: Path,
                                       kp_env: dict[str, Path]) -> None:
    port = origin.port
    env = {"PORT": str(port), "TLSPORT": str(tls_origin.port), "HOSTIP": origin.host_ip}
    proc = subprocess.run(
        [str(BIN / "kp-run"), "--image", shell_image, "--allow", f"allowed.test:{port},{tls_origin.port}",
         "--allow", f"meta.test:{port}", "--resolve", "allowed.test=127.0.0.1",
         "--resolve", "meta.test=169.254.169.254", "--pids", "1024",
         "-e", "PORT", "-e", "TLSPORT", "-e", "HOSTIP", "--", "bash", "-c", PROBE],
        capture_output=True, env={**os.environ, **env}, timeout=300)
    err = proc.stderr.decode()
    (record,) = lines(proc.stdout)
    assert record["exit_code"] == 0, err
    assert "HTTP: origin says /plain" in err
    assert "CONNECT: tls says /tunnel" in err  # HTTPS, as clients use CONNECT
    assert "says" not in err.split("TUNNEL-PLAIN:")[1].split("\n")[0]  # plain HTTP in a tunnel: refused
    assert "DENIED: 403" in err and "RAWIP: 403" in err
    assert "META: 000" in err or "META: 403" in err  # curl reports a refused CONNECT as 000 or 403
    assert "origin says" not in err.split("DIRECT:")[1].split("\n")[0]  # no route around the proxy
    assert "DNS-ALLOWED: 127.0.0.1" in err and "DNS-DENIED: refused" in err
    assert "CONCURRENT: 200" in err, err[-4000:]
    assert "/tunnel" not in origin.paths() and tls_origin.paths() == ["/tunnel"]
    assert record["network"] == "proxy" and f"allow:allowed.test:{port},{tls_origin.port}" in record["loosened"]
    log = egress_log(record)
    by = {(d["decision"], d.get("method"), d.get("host")) for d in log}
    assert ("allow", "GET", "allowed.test") in by and ("allow", "CONNECT", "allowed.test") in by
    assert ("deny", "GET", "denied.test") in by and ("deny", "GET", origin.host_ip) in by
    assert ("deny", "CONNECT", "meta.test") in by and ("deny", "DNS", "denied.test") in by
    assert sum(1 for d in log if d.get("decision") == "allow" and d.get("method") == "GET") >= 201
    assert record["egress"]["deny"] >= 5
    # the log is outside the container's reach: in the run's own folder in the state dir
    assert Path(record["egress_log"]).is_relative_to(kp_env["state"])
    # kp-trace reads the same log from the record: decisions as records, or counted per host
    summary = lines(subprocess.run([str(BIN / "kp-trace"), "--summary"], input=proc.stdout,
                                   capture_output=True, check=True).stdout)
    items = {(s["decision"], s["dns"], s["host"]): s["count"] for s in summary if s.get("item") == "egress"}
    assert items[("allow", False, "allowed.test")] >= 202 and items[("deny", True, "denied.test")] >= 1
    subprocess.run([str(BIN / "kp-rm"), record["name"]], check=True, capture_output=True)


ATTACKS = r'''
import os, socket, ssl
plain, tls_port = int(os.environ["PORT"]), int(os.environ["TLSPORT"])

def connection():
    s = socket.create_connection(("127.0.0.1", 3128), timeout=60)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s

def rest(s):
    got = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    except ConnectionResetError:
        pass
    s.close()
    return got

def tunnel(port, send=(), half_close=False):
    s = connection()
    s.sendall(b"CONNECT allowed.test:%d HTTP/1.1\r\nHost: allowed.test\r\n\r\n" % port)
    reply = b""
    while not reply.endswith(b"\r\n\r\n"):
        reply += s.recv(1)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    for data in send:
        s.sendall(data)
    if half_close:
        s.shutdown(socket.SHUT_WR)
    return s

def records(hs, cuts):
    bounds = [0, *cuts, len(hs)]
    return b"".join(b"\x16\x03\x01" + (b - a).to_bytes(2, "big") + hs[a:b] for a, b in zip(bounds, bounds[1:]))

def https(name, path, cuts=None, write=0):
    """GET path over TLS through a tunnel; the ClientHello re-cut into records at cuts, sent in writes
    of write bytes.  The response body, or "REFUSED" when the proxy ended the handshake."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    s, first, got = tunnel(tls_port), True, b""
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            data = outgoing.read()
            if first and cuts:
                data = records(data[5:], cuts)
            first = False
            step = write or len(data)
            for at in range(0, len(data), step):
                s.sendall(data[at:at + step])
            chunk = s.recv(65536)
            if not chunk:
                return "REFUSED"
            incoming.write(chunk)
        except ssl.SSLError:
            return "REFUSED"
    tls.write(b"GET %s HTTP/1.0\r\nHost: %s\r\n\r\n" % (path.encode(), (name or "none").encode()))
    s.sendall(outgoing.read())
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        incoming.write(chunk)
        try:
            while True:
                got += tls.read(65536)
        except ssl.SSLWantReadError:
            continue
        except ssl.SSLError:
            break
    return got.decode(errors="replace").split("\r\n\r\n")[-1].strip()

def smuggle(data):
    s = connection()
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    return rest(s).split(b"\r\n")[0].decode(errors="replace") or "CLOSED"

def plain_hello(name):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    outgoing = ssl.MemoryBIO()
    tls = ctx.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()

def show(name, value):
    print(f"{name}: {value}", flush=True)

show("PLAIN-IN-TUNNEL", rest(tunnel(plain, [b"GET /in-tunnel HTTP/1.1\r\nHost: denied.test\r\n\r\n"]))[:12])
show("SPLIT-OK", https("allowed.test", "/split", [2, 130, 134, 300], 97))
show("SPLIT-FRONTED", https("attacker.example", "/fronted", [2, 130, 134, 300], 7))
show("NO-SNI", https(None, "/no-sni"))
show("SSLV2", rest(tunnel(tls_port, [b"\x80\x2e\x01\x03\x01" + bytes(44)]))[:12])
show("TRUNCATED", rest(tunnel(tls_port, [plain_hello("allowed.test")[:200]], half_close=True)))
head = b"http://allowed.test:%d" % plain
show("PIPELINED", smuggle(b"GET %s/first HTTP/1.1\r\nHost: allowed.test\r\n\r\n"
                          b"GET http://denied.test/second HTTP/1.1\r\nHost: denied.test\r\n\r\n"
                          b"GET /third HTTP/1.1\r\nHost: denied.test\r\n\r\n" % head))
show("CL", smuggle(b"POST %s/cl HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
                   b"GET /smuggled-cl HTTP/1.1\r\nHost: denied.test\r\n\r\n" % head))
show("TE", smuggle(b"POST %s/te HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                   b"GET /smuggled-te HTTP/1.1\r\nHost: denied.test\r\n\r\n" % head))
show("CL-TE", smuggle(b"POST %s/clte HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"0\r\n\r\nGET /smuggled-clte HTTP/1.1\r\nHost: denied.test\r\n\r\n" % head))
show("CL-CL", smuggle(b"POST %s/clcl HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 48\r\n\r\n"
                      b"GET /smuggled-clcl HTTP/1.1\r\nHost: denied.test\r\n\r\n" % head))
show("BAD-CHUNK", smuggle(b"POST %s/badchunk HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"5\r\nhello\r\n0\r\nGET /smuggled-trailer HTTP/1.1\r\nHost: denied.test\r\n\r\n" % head))
'''


def test_nothing_unchecked_passes_an_allowed_port(shell_image: str, lenient: Origin, tls_origin: Origin) -> None:
    """From inside a real container: plain HTTP inside a CONNECT tunnel, a ClientHello cut into records
    and writes (naming the allowed host, then another), no SNI, SSLv2, a truncated hello, and every
    form of request smuggling after a checked request head.  Only the checked requests arrive."""
    env = {"PORT": str(lenient.port), "TLSPORT": str(tls_origin.port)}
    proc = subprocess.run(
        [str(BIN / "kp-run"), "--image", shell_image, "--allow", f"allowed.test:{lenient.port},{tls_origin.port}",
         "--resolve", "allowed.test=127.0.0.1", "-e", "PORT", "-e", "TLSPORT", "--", "python3", "-c", ATTACKS],
        capture_output=True, env={**os.environ, **env}, timeout=300)
    err = proc.stderr.decode()
    (record,) = lines(proc.stdout)
    assert record["exit_code"] == 0, err
    said = dict(line.split(": ", 1) for line in err.splitlines() if ": " in line)
    assert said["PLAIN-IN-TUNNEL"] == "b'HTTP/1.1 403'", err
    assert said["SPLIT-OK"] == "tls says /split", err
    assert said["SPLIT-FRONTED"] == said["NO-SNI"] == "REFUSED", err
    assert said["SSLV2"] == "b'HTTP/1.1 403'" and said["TRUNCATED"] in ("b''", "b'\\x15\\x03\\x01\\x00\\x02\\x021'")
    assert said["PIPELINED"] == said["CL"] == said["TE"] == "HTTP/1.1 200 OK", err
    assert said["CL-TE"] == said["CL-CL"] == "HTTP/1.1 400 Bad Request", err
    # what reached the origins: the checked requests, and nothing smuggled after them
    # (/badchunk may arrive: its head and valid chunks went up before the bad trailer line stopped it)
    assert sorted(p for p in lenient.paths() if p != "/badchunk") == ["/cl", "/first", "/te"], lenient.seen
    assert [(s["path"], s["body"]) for s in lenient.seen if s["path"] in ("/cl", "/te")] == [
        ("/cl", b"hello"), ("/te", b"hello")]
    assert tls_origin.paths() == ["/split"]
    log = egress_log(record)
    denied = [d for d in log if d["decision"] == "deny"]
    assert len(denied) == 5 and sum("only TLS" in d["reason"] for d in denied) == 4, denied
    assert sum("not the host asked for" in d["reason"] for d in denied) == 1, denied
    assert {d.get("sni") for d in log if d["method"] == "CONNECT"} >= {"allowed.test", "attacker.example"}
    dropped = [d.get("dropped") for d in log if d["decision"] == "allow" and d["method"] != "CONNECT"]
    assert len(dropped) == 3 and all(dropped)  # the smuggled bytes: read, counted, never sent
    errors = [d["reason"] for d in log if d["decision"] == "error"]
    assert len(errors) == 3 and sum("framing" in r for r in errors) == 2 and "trailer" in errors[2]
    subprocess.run([str(BIN / "kp-rm"), record["name"]], check=True, capture_output=True)


def test_a_name_that_resolves_to_the_hosts_own_address_is_refused(shell_image: str, origin: Origin,
                                                                   tmp_path: Path) -> None:
    """The origin listens on every address of the host.  Names that resolve (through the host's own
    resolver: kp-run runs with a hosts file of the test's) to the host's addresses on other
    interfaces than lo are refused, over HTTP, CONNECT and DNS; the same address pinned is reached."""
    own = host_ipv4s()
    hosts = tmp_path / "hosts"
    names = [f"own{n}.test" for n in range(len(own))]
    hosts.write_text("127.0.0.1\tlocalhost\n" + "".join(f"{addr}\t{name}\n" for name, (_, addr) in zip(
        names, own, strict=True)))
    script = "".join(
        f'echo "HTTP-{name}: $(curl -sS --max-time 10 -o /dev/null -w "%{{http_code}}" http://{name}:$PORT/x)"\n'
        f'echo "CONNECT-{name}: $(curl -sS -k --max-time 10 -o /dev/null -w "%{{http_code}}" '
        f'https://{name}:$PORT/x 2>&1)"\n'
        f'echo "DNS-{name}: $(getent hosts {name} || echo refused)"\n' for name in names)
    script += 'echo "PINNED: $(curl -sS --max-time 10 http://pinned.test:$PORT/pinned)"\n'
    allow = [a for name in names for a in ("--allow", f"{name}:{origin.port}")]
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"',
         str(hosts), str(BIN / "kp-run"), "--image", shell_image, *allow, "--allow", f"pinned.test:{origin.port}",
         "--resolve", f"pinned.test={own[0][1]}", "-e", "PORT", "--", "bash", "-c", script],
        capture_output=True, env={**os.environ, "PORT": str(origin.port)}, timeout=300)
    err = proc.stderr.decode()
    (record,) = lines(proc.stdout)
    assert record["exit_code"] == 0, err
    for name in names:
        assert f"HTTP-{name}: 403" in err and f"DNS-{name}: refused" in err, err
        assert "says" not in err.split(f"CONNECT-{name}:")[1].split("\n")[0]
    assert "PINNED: origin says /pinned" in err, err
    assert origin.paths() == ["/pinned"]
    denied = [d for d in egress_log(record) if d["decision"] == "deny"]
    assert {(d["method"], d["host"]) for d in denied} == {
        (method, name) for name in names for method in ("GET", "CONNECT", "DNS")}
    assert all("this host's own" in d["reason"] for d in denied), denied
    subprocess.run([str(BIN / "kp-rm"), record["name"]], check=True, capture_output=True)


def test_without_allow_there_is_no_proxy_and_no_network(shell_image: str, origin: Origin) -> None:
    proc = subprocess.run([str(BIN / "kp-run"), "--image", shell_image, "--", "bash", "-c",
                           f"curl -sS --max-time 5 -x http://127.0.0.1:3128 http://x.test/ 2>&1; "
                           f"curl -sS --max-time 5 http://{origin.host_ip}:{origin.port}/ 2>&1; env | grep -ci proxy"],
                          capture_output=True, timeout=120)
    err = proc.stderr.decode()
    assert "origin says" not in err and err.count("Failed to connect") == 2
    (record,) = lines(proc.stdout)
    assert "egress_log" not in record and record["network"] == "none"


def wait_for_decision(log: Path, proc: subprocess.Popen[bytes], bound: float = 120.0) -> None:
    """Until the run's egress log holds a decision: its proxy is serving."""
    deadline = time.monotonic() + bound
    while not (log.exists() and log.read_bytes().strip()):
        assert proc.poll() is None, (f"kp-run ended ({proc.returncode}): "
                                     f"{proc.stderr.read().decode(errors='replace') if proc.stderr else ''}")
        assert time.monotonic() < deadline, f"no egress decision within {bound:g} s"
        threading.Event().wait(0.05)


def test_the_proxy_refuses_everyone_but_its_sandbox(shell_image: str, origin: Origin,
                                                    kp_env: dict[str, Path]) -> None:
    """While a sandbox with --allow runs, its proxy is not reachable from the host or another container."""
    port = origin.port
    holder = subprocess.Popen([str(BIN / "kp-run"), "--image", shell_image, "--name", "holder",
                               "--allow", f"allowed.test:{port}", "--resolve", "allowed.test=127.0.0.1",
                               "--", "bash", "-c", f"curl -sS http://allowed.test:{port}/up; sleep 120"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_decision(kp_env["state"] / "containers" / "holder" / "egress.jsonl", holder)
        assert origin.paths() == ["/up"]  # the proxy serves its sandbox
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", 3128), timeout=2).close()
        proc = subprocess.run([str(BIN / "kp-run"), "--image", shell_image, "--net", "open", "--", "bash", "-c",
                               f"curl -sS --max-time 5 -x http://{origin.host_ip}:3128 http://allowed.test:{port}/ "
                               "2>&1"], capture_output=True, timeout=120)
        assert "origin says" not in proc.stderr.decode()
    finally:
        holder.terminate()
        holder.communicate(timeout=60)
        subprocess.run([str(BIN / "kp-rm"), "holder"], capture_output=True)


def test_it_fails_closed_when_the_proxy_dies(shell_image: str, origin: Origin,
                                             kp_env: dict[str, Path]) -> None:
    """SIGKILL the kp-run that serves the proxy: the container lives on, with no way out at all."""
    port = origin.port
    folder = kp_env["state"] / "containers" / "failclosed"
    holder = subprocess.Popen([str(BIN / "kp-run"), "--image", shell_image, "--name", "failclosed",
                               "--allow", f"allowed.test:{port}", "--resolve", "allowed.test=127.0.0.1",
                               "--", "bash", "-c", f"curl -sS http://allowed.test:{port}/up; sleep 120"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_decision(folder / "egress.jsonl", holder)
        probe = ["podman", "exec", "failclosed", "curl", "-sS", "--max-time", "5", f"http://allowed.test:{port}/x"]
        before = subprocess.run(probe, capture_output=True, text=True, timeout=60)
        assert "origin says /x" in before.stdout, before.stderr
        holder.kill()
        holder.wait()
        after = subprocess.run(probe, capture_output=True, text=True, timeout=60)
        assert "origin says" not in after.stdout and "Failed to connect" in after.stderr
        direct = subprocess.run(["podman", "exec", "failclosed", "ip", "-o", "link"], capture_output=True,
                                text=True, timeout=60)
        assert len(direct.stdout.splitlines()) == 1  # still lo only
    finally:
        holder.kill()
        subprocess.run([str(BIN / "kp-rm"), "failclosed"], capture_output=True)
    assert not folder.exists()


# -- the same properties on every backend (the VM's: relay.pl in the container's netns, the proxy on the host) --

EVERYWHERE = r"""
echo "LINKS: $(ls /sys/class/net | tr '\n' ' ')"
echo "HTTP: $(curl -sS --max-time 60 http://allowed.test:{port}/plain)"
echo "CONNECT: $(curl -sS -k --max-time 60 https://allowed.test:{tls}/tunnel)"
echo "DENIED: $(curl -sS --max-time 60 -o /dev/null -w '%{{http_code}}' http://denied.test:{port}/)"
echo "RAWIP: $(curl -sS --max-time 60 -o /dev/null -w '%{{http_code}}' http://{host_ip}:{port}/)"
echo "LOOPBACK: $(curl -sS --max-time 60 --noproxy '' -x http://127.0.0.1:3128 -o /dev/null -w '%{{http_code}}' \
    http://127.0.0.1:{port}/)"
echo "DNS-ALLOWED: $(getent hosts allowed.test)"
echo "DNS-DENIED: $(getent hosts denied.test || echo refused)"
for addr in {host_ip} 10.0.2.2 10.0.2.15 {guest_ip}; do
    echo "DIRECT-$addr: $(curl -sS --noproxy '*' --max-time 5 http://$addr:{port}/ 2>&1)"
done
"""


def backend_env(request: pytest.FixtureRequest, backend: str) -> dict[str, str]:
    """The environment kp-* commands of ``backend``'s runs use (its state dir: kp-ls, kp-rm)."""
    return request.getfixturevalue("guest_vm").env if backend == "vm" else dict(os.environ)


def test_only_the_proxy_is_reachable_and_it_logs_on_the_host(request: pytest.FixtureRequest, backend: str,
                                                               shell_image: str, origin: Origin,
                                                               tls_origin: Origin) -> None:
    """On both backends: an allowed name is reached (HTTP, CONNECT, DNS); a refused name, a raw IP (the
    host's, and loopback through the proxy) and a refused DNS query are refused and logged; no address but
    the proxy's is reachable (the host's; in a VM also the guest's own and its gateway, which passt maps to
    the host's loopback); the log is in the run's folder on the host, which kp-ls lists and kp-rm removes."""
    from tests.integration.vmbackend import kprun_on

    # in a VM: its own address (passt gives it the host's) and its gateway, besides the host's
    guest_ip = (request.getfixturevalue("guest_vm").record.get("address") if backend == "vm" else None) or "10.0.2.15"
    script = EVERYWHERE.format(port=origin.port, tls=tls_origin.port, host_ip=origin.host_ip, guest_ip=guest_ip)
    proc, record = kprun_on(request, backend, "--image", shell_image,
                            "--allow", f"allowed.test:{origin.port},{tls_origin.port}",
                            "--resolve", "allowed.test=127.0.0.1",
                            "--", "bash", "-c", script)
    err = proc.stderr
    assert record["exit_code"] == 0, err[-4000:]
    said = {m[1]: m[2] for m in map(re.compile(r"([A-Z][A-Za-z0-9.-]*): (.*)").fullmatch, err.splitlines()) if m}
    assert said["LINKS"].split() == ["lo"], err
    assert said["HTTP"] == "origin says /plain" and said["CONNECT"] == "tls says /tunnel", err
    assert said["DENIED"] == said["RAWIP"] == said["LOOPBACK"] == "403", err
    assert said["DNS-ALLOWED"].split() == ["127.0.0.1", "allowed.test"] and said["DNS-DENIED"] == "refused", err
    direct = {k: v for k, v in said.items() if k.startswith("DIRECT-")}
    assert len(direct) >= 3 and not any("says" in v for v in direct.values()), direct
    assert origin.paths() == ["/plain"] and tls_origin.paths() == ["/tunnel"]
    by = {(d["decision"], d.get("method"), d.get("host")) for d in egress_log(record)}
    assert {("allow", "GET", "allowed.test"), ("allow", "CONNECT", "allowed.test"), ("deny", "GET", "denied.test"),
            ("deny", "GET", origin.host_ip), ("deny", "GET", "127.0.0.1"), ("deny", "DNS", "denied.test")} <= by, by
    assert record["network"] == "proxy" and record["resolve"] == ["allowed.test=127.0.0.1"]
    assert record["host"] == ("kp-backend" if backend == "vm" else "local")
    # the log is the host's, in the run's folder in the host's store: kp-ls lists the run, kp-rm removes it
    folder = Path(record["path"])
    assert Path(record["egress_log"]) == folder / "egress.jsonl" and folder.parent.name == "containers"
    env = backend_env(request, backend)
    listed = [r for r in lines(subprocess.run([str(BIN / "kp-ls")], env=env, capture_output=True).stdout)
              if r.get("name") == record["name"]]
    assert [(r["kind"], r["state"], r["host"]) for r in listed] == [("container", "exited", record["host"])]
    subprocess.run([str(BIN / "kp-rm"), record["name"]], env=env, check=True, capture_output=True)
    assert not folder.exists()


def test_in_a_vm_it_fails_closed_when_kp_run_dies(request: pytest.FixtureRequest, shell_image: str,
                                                   origin: Origin) -> None:
    """SIGKILL the kp-run whose proxy serves a container in a VM: its SSH channel ends, the relay in the
    container's network namespace reads EOF and exits, and the container, still running, has no way out."""
    import shlex

    vm = request.getfixturevalue("guest_vm")
    name, port = "vm-failclosed", origin.port
    log = Path(vm.env["KODEPIPE_STATE_DIR"]) / "containers" / name / "egress.jsonl"
    holder = subprocess.Popen([str(BIN / "kp-run"), "--image", shell_image, "--name", name,
                               "--allow", f"allowed.test:{port}", "--resolve", "allowed.test=127.0.0.1",
                               "--", "bash", "-c", f"curl -sS http://allowed.test:{port}/up; sleep 900"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=vm.env)
    assert holder.stdin is not None
    holder.stdin.write(orjson.dumps(vm.record) + b"\n")
    holder.stdin.close()

    def in_container(*argv: str) -> Any:
        return vm.remote.run(shlex.join(["sudo", "-n", "podman", "exec", name, *argv]), timeout=300)

    try:
        wait_for_decision(log, holder, bound=900)  # under TCG the container takes a while to start
        before = in_container("curl", "-sS", "--max-time", "60", f"http://allowed.test:{port}/x")
        assert b"origin says /x" in before.stdout, before.stderr
        holder.kill()
        holder.wait()
        deadline = time.monotonic() + 180
        while vm.remote.run("pgrep -x perl", timeout=60).status == 0:  # the relay: perl, nsentered
            assert time.monotonic() < deadline, "the relay outlived its channel"
            threading.Event().wait(0.5)
        after = in_container("curl", "-sS", "--max-time", "10", f"http://allowed.test:{port}/y")
        assert b"origin says" not in after.stdout and after.status != 0
        links = in_container("ls", "/sys/class/net")
        assert links.stdout.split() == [b"lo"]
        assert origin.paths() == ["/up", "/x"]
    finally:
        holder.kill()
        vm.remote.run(shlex.join(["sudo", "-n", "podman", "rm", "-f", "-t", "0", "--", name]), timeout=300)
        subprocess.run([str(BIN / "kp-rm"), name], env=vm.env, capture_output=True)
