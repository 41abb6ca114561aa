"""kp-boot --allow on a real guest (TCG): the VM's only way out is kodepipe's egress proxy, whatever
root in the guest does; and kp-boot --publish forwards a host port to the guest, on loopback only.

Every target is a server this test starts on the host, and each one counts what reached it, so a
test says what got through, not only what the client was told:
- an origin on the host's loopback, reachable by name only through the proxy (allowed.test, pinned
  with --resolve), which also serves a one-package apt repository;
- a loopback listener the guest must never reach (the host's own services);
- a listener on one of the host's other addresses, which stands for "the internet": reachable from
  an open guest, never from a sealed one but through the proxy (and the proxy refuses raw IPs).
Root in the guest tries curl without the proxy, the gateway's other ports, raw Ethernet frames to
each address, other resolvers, and names that are not on the list.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import shlex
import socket
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import lines
from tests.integration.conftest import Golden, run
from tests.integration.test_vm_loopback import RAW_SYN, Listener, as_root, host_address

pytestmark = pytest.mark.integration

NAME = "sealed"
MIRROR = "deb.debian.org"  # the image's mirror: the preset lets the guest's apt reach it
GUEST_PORT = 8000  # the guest's dev server, published on the host


def deb(folder: Path) -> bytes:
    """A tiny Debian package (kp-probe) made here, without dpkg-deb: ar of debian-binary, control, data."""
    def tar(files: dict[str, bytes]) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w:gz") as archive:
            for name, data in files.items():
                parts = name.split("/")
                for depth in range(1, len(parts)):  # each directory before what it holds, as dpkg wants
                    folder = "/".join(parts[:depth]) + "/"
                    if folder not in archive.getnames():
                        info = tarfile.TarInfo(folder)
                        info.type, info.mode = tarfile.DIRTYPE, 0o755
                        archive.addfile(info)
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o644
                archive.addfile(info, io.BytesIO(data))
        return out.getvalue()

    control = tar({"./control": b"Package: kp-probe\nVersion: 1.0\nArchitecture: all\nMaintainer: kodepipe "
                                b"<kp@example.invalid>\nDescription: a probe of apt through the proxy\n"})
    data = tar({"./usr/share/kp-probe/probe": b"came through the proxy\n"})
    members = [(b"debian-binary", b"2.0\n"), (b"control.tar.gz", control), (b"data.tar.gz", data)]
    body = b"!<arch>\n"
    for name, content in members:
        header = name.ljust(16) + b"0".ljust(12) + b"0".ljust(6) + b"0".ljust(6) + b"100644".ljust(8)
        body += header + str(len(content)).encode().ljust(10) + b"`\n" + content + (b"\n" if len(content) % 2 else b"")
    return body


@contextlib.contextmanager
def repository(folder: Path) -> Iterator[tuple[int, list[str]]]:
    """An HTTP server on 127.0.0.1 serving a one-package apt repository; yields its port and the paths
    it was asked for."""
    package = deb(folder)
    (folder / "kp-probe_1.0_all.deb").write_bytes(package)
    (folder / "Packages").write_text(
        "Package: kp-probe\nVersion: 1.0\nArchitecture: all\nMaintainer: kodepipe <kp@example.invalid>\n"
        f"Filename: ./kp-probe_1.0_all.deb\nSize: {len(package)}\nSHA256: {hashlib.sha256(package).hexdigest()}\n"
        "Description: a probe of apt through the proxy\n\n")
    seen: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(folder), **kwargs)

        def do_GET(self) -> None:
            seen.append(self.path)
            super().do_GET()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def sealed(golden: Golden, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One sealed guest, and the host's servers: a repository by name, a loopback listener, an outside one."""
    # a preset of the user's own: sealed, the Debian mirror allowed, and a package kp-ip installs through it
    config = tmp_path_factory.mktemp("config")
    (config / "presets").mkdir()
    (config / "presets" / "sealed-test.json").write_text(orjson.dumps(
        {"description": "the sealed guest's test", "memory": "1G", "network": "allowlist",
         "allow": [f"{MIRROR}:80"], "packages": ["hello"]}).decode())
    env = {**golden["env"], "KODEPIPE_CONFIG_DIR": str(config)}
    loopback, outside = Listener("127.0.0.1"), Listener(host_address())
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        published = probe.getsockname()[1]
    with repository(tmp_path_factory.mktemp("repo")) as (port, seen):
        clone = run(env, "kp-clone", "--cold", "base", NAME)
        assert clone.returncode == 0, clone.stderr.decode()
        booted = run(env, "kp-boot", "--accel", "tcg", "--preset", "sealed-test", "--allow", f"allowed.test:{port}",
                     "--resolve", "allowed.test=127.0.0.1", "--allow", f"raw.test:{outside.port}",
                     "--publish", f"{published}:{GUEST_PORT}", NAME)
        assert booted.returncode == 0, booted.stderr.decode()
        found = run(env, "kp-ip", NAME, "--timeout", "900", timeout=1200)  # it installs the preset's package
        assert found.returncode == 0, found.stderr.decode()
        yield {"env": env, "record": dict(lines(found.stdout)[0]), "port": port, "seen": seen,
               "loopback": loopback, "outside": outside, "published": published}
        run(env, "kp-rm", NAME)
    loopback.close()
    outside.close()


def egress_log(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in Path(record["egress_log"]).read_bytes().splitlines()]


def test_the_record_says_the_guest_is_sealed_and_what_is_published(sealed: dict[str, Any]) -> None:
    record = sealed["record"]
    assert record["network"] == "allowlist" and record["preset"] == "sealed-test"
    # the preset's rule first, then the flags' (which widen the preset, and say so)
    extra = [f"allowed.test:{sealed['port']}", f"raw.test:{sealed['outside'].port}"]
    assert record["egress"]["allow"] == [f"{MIRROR}:80", *extra]
    assert record["egress"]["resolve"] == ["allowed.test=127.0.0.1"]
    published = f"127.0.0.1:{sealed['published']}:{GUEST_PORT}"
    assert record["publish"] == [published]
    assert record["loosened"] == [f"publish:{published}", *(f"preset:allow:{rule}" for rule in extra),
                                  "preset:resolve:allowed.test=127.0.0.1", f"preset:publish:{published}"]
    shown = run(sealed["env"], "kp-ls", NAME, "--table")
    assert f"allow {MIRROR}:80 allowed.test:{sealed['port']} raw.test:" in shown.stdout.decode()
    assert f"publish 127.0.0.1:{sealed['published']}:{GUEST_PORT}" in shown.stdout.decode()


def test_the_presets_package_came_through_the_proxy(sealed: dict[str, Any]) -> None:
    result = as_root(sealed["env"], NAME, "hello")
    assert result["exit_status"] == 0 and result["stdout"] == "Hello, world!\n", result
    decisions = egress_log(sealed["record"])
    assert any(d["decision"] == "allow" and d.get("host") == MIRROR for d in decisions)


def test_an_allowed_name_is_reached_as_root_with_curl_and_apt(sealed: dict[str, Any]) -> None:
    port = sealed["port"]
    script = f"""
set -u
curl -sS -m 60 -o /dev/null -w 'curl %{{http_code}}\\n' http://allowed.test:{port}/Packages
echo 'deb [trusted=yes] http://allowed.test:{port}/ ./' > /tmp/kp-probe.list
apt-get -q -o Dir::Etc::SourceList=/tmp/kp-probe.list -o Dir::Etc::SourceParts=- \\
    -o Acquire::AllowInsecureRepositories=true update >/tmp/apt.log 2>&1 || {{ cat /tmp/apt.log; exit 1; }}
apt-get -q -y -o Dir::Etc::SourceList=/tmp/kp-probe.list -o Dir::Etc::SourceParts=- \\
    --allow-unauthenticated install kp-probe >>/tmp/apt.log 2>&1 || {{ cat /tmp/apt.log; exit 1; }}
cat /usr/share/kp-probe/probe
"""
    result = as_root(sealed["env"], NAME, script)
    assert result["exit_status"] == 0, result["stdout"] + result["stderr"]
    assert "curl 200" in result["stdout"] and "came through the proxy" in result["stdout"]
    # apt asked the origin for the index and the package: through the proxy, by name
    assert any(p.endswith("/kp-probe_1.0_all.deb") for p in sealed["seen"])
    assert any(p.endswith("/Packages") for p in sealed["seen"])
    # and the host logged each decision, which kp-trace reads from the vm record as from a container's
    traced = run(sealed["env"], "kp-trace", input=orjson.dumps(sealed["record"]) + b"\n")
    assert traced.returncode == 0, traced.stderr.decode()
    allowed = [r for r in lines(traced.stdout) if r.get("kind") == "egress" and r["decision"] == "allow"
               and r.get("method") == "GET" and r.get("host") == "allowed.test"]
    assert allowed and all(r["container"] == NAME for r in allowed)


ATTACKS = r"""
set -u
gw=10.0.2.2
say() { echo "$1=$2"; }
# no proxy: the gateway's ports (the host's loopback listener's port), the outside listener, metadata
curl -sS -m 8 --noproxy '*' "http://$gw:$LOOP/" >/dev/null 2>&1; say gw_loopback_port $?
curl -sS -m 8 --noproxy '*' "http://$OUTSIDE:$OPORT/" >/dev/null 2>&1; say outside_direct $?
curl -sS -m 8 --noproxy '*' "http://169.254.169.254/latest/meta-data/" >/dev/null 2>&1; say metadata_direct $?
# through the proxy: a name not on the list, a raw IP (allowed port or not), metadata by address
curl -sS -m 20 -o /dev/null -w '%{http_code}' "http://denied.test:$PORT/" ; echo " denied_name"
curl -sS -m 20 -o /dev/null -w '%{http_code}' "http://$OUTSIDE:$OPORT/" ; echo " raw_ip_by_proxy"
curl -sS -m 20 -o /dev/null -w '%{http_code}' "http://169.254.169.254/" ; echo " metadata_by_proxy"
# DNS: an allowed name resolves, others do not, and another resolver is no way around it
getent hosts allowed.test >/dev/null; say dns_allowed $?
getent hosts example.com >/dev/null; say dns_denied $?
resolvectl query --cache=no -4 ftp.debian.org >/dev/null 2>&1; say dns_denied_resolved $?
# a query sent straight to a public resolver is answered on the host all the same: REFUSED (rcode 5)
perl -MIO::Socket::INET -e '
    my $s = IO::Socket::INET->new(PeerAddr => "1.1.1.1:53", Proto => "udp") or die $!;
    my $name = join("", map { chr(length) . $_ } split /\./, "example.org");
    $s->send(pack("n6", 0x1234, 0x0100, 1, 0, 0, 0) . $name . "\0" . pack("n2", 1, 1));
    my $r = ""; eval { local $SIG{ALRM} = sub { die }; alarm 10; $s->recv($r, 512); alarm 0 };
    print "other_resolver=", (length $r ? (unpack("n", substr($r, 2, 2)) & 15) : "none"), "\n"'

# root routes 127.0.0.0/8 out of the NIC and writes raw frames: SYNs to every address it could try
iface=$(ip -o -4 route show default | awk '{print $5}')
gwmac=$(ip neigh show "$gw" | awk '{print $5}')
[ -n "$gwmac" ] || { ping -c1 -W1 "$gw" >/dev/null 2>&1; gwmac=$(ip neigh show "$gw" | awk '{print $5}'); }
for target in "127.0.0.1 $LOOP" "$OUTSIDE $OPORT" "$gw $LOOP" "169.254.169.254 80" "1.1.1.1 443"; do
    set -- $target
    perl -e "$RAW" "$iface" "$gwmac" 4 10.0.2.15 "$1" "$2" || echo "raw frame to $1 not sent"
done
echo done
"""


def test_root_in_the_guest_reaches_nothing_but_the_proxy(sealed: dict[str, Any]) -> None:
    loopback, outside = sealed["loopback"], sealed["outside"]
    env = sealed["env"]
    exports = (f"LOOP={loopback.port} OUTSIDE={outside.host} OPORT={outside.port} PORT={sealed['port']} "
               f"RAW={shlex.quote(RAW_SYN)}")
    result = as_root(env, NAME, f"export {exports}\n{ATTACKS}")
    out = result["stdout"]
    assert "done" in out, result
    # the oracles first: nothing reached the host's loopback listener, nor the outside one
    assert loopback.seen() == [], "the guest reached a service on the host's loopback"
    assert outside.seen() == [], "the guest reached an address outside without the proxy"
    said = dict(line.split("=", 1) for line in out.splitlines() if "=" in line and " " not in line)
    for probe in ("gw_loopback_port", "outside_direct", "metadata_direct"):  # (a cloud host may answer metadata)
        assert said[probe] != "0", (probe, out)
    assert "403 denied_name" in out
    assert "403 raw_ip_by_proxy" in out and "403 metadata_by_proxy" in out
    assert said["dns_allowed"] == "0", out
    assert said["dns_denied"] != "0" and said["dns_denied_resolved"] != "0", out
    assert said["other_resolver"] == "5", out
    decisions = egress_log(sealed["record"])
    denied = {(d.get("method"), d.get("host")) for d in decisions if d["decision"] == "deny"}
    assert ("GET", "denied.test") in denied and ("DNS", "example.com") in denied and ("DNS", "example.org") in denied
    assert any(d.get("host") == outside.host and "raw IP" in d.get("reason", "") for d in decisions)


def test_a_published_port_is_reached_from_the_hosts_loopback_only(sealed: dict[str, Any]) -> None:
    env = sealed["env"]
    server = (f"perl -MIO::Socket::INET -e '$s = IO::Socket::INET->new(LocalPort => {GUEST_PORT}, Listen => 5, "
              "ReuseAddr => 1) or die $!; while ($c = $s->accept) { $c->getline; print $c \"published says\\n\"; "
              "close $c }'")
    started = as_root(env, NAME, f"setsid -f {server} >/dev/null 2>&1 </dev/null; "
                      f"for i in $(seq 100); do ss -ltn | grep -q ':{GUEST_PORT} ' && exit 0; sleep 0.2; done; exit 1")
    assert started["exit_status"] == 0, started
    with socket.create_connection(("127.0.0.1", sealed["published"]), timeout=60) as conn:
        conn.sendall(b"hello\n")  # passt completes the guest's handshake once the host side speaks
        conn.settimeout(60)
        assert conn.makefile("rb").readline() == b"published says\n"
    with pytest.raises(OSError), socket.create_connection((host_address(), sealed["published"]), timeout=10):
        pass


def test_a_taken_host_port_fails_the_boot_clearly(golden: Golden) -> None:
    env = golden["env"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        clone = run(env, "kp-clone", "--cold", "base", "taken")
        assert clone.returncode == 0, clone.stderr.decode()
        try:
            booted = run(env, "kp-boot", "--accel", "tcg", "--publish", f"{port}:80", "taken")
            assert booted.returncode == 1
            assert f"127.0.0.1:{port} cannot be bound" in booted.stderr.decode()
            (record,) = lines(booted.stdout)
            assert record["error"]["code"] == "port_taken"
            after = run(env, "kp-ls", "taken")
            assert lines(after.stdout)[0]["state"] == "stopped"  # nothing was started
        finally:
            run(env, "kp-rm", "taken")


def test_each_clone_logs_in_with_a_key_of_its_own_which_kp_rm_removes(sealed: dict[str, Any]) -> None:
    from kodepipe.core.errors import KpError
    from kodepipe.vm import ssh, sshkeys

    env = sealed["env"]
    (record,) = lines(run(env, "kp-ls", NAME).stdout)
    own = Path(record["ssh_key"]["path"])
    assert own.is_file() and own.parent == Path(record["path"]) and own.stat().st_mode & 0o077 == 0
    # kp-ssh (every test above) logged in with it; kodepipe's shared key, which the image authorizes, no longer does
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KODEPIPE_STATE_DIR", env["KODEPIPE_STATE_DIR"])
        shared = sshkeys.own_key()[0]
        ep = ssh.endpoint(record)
        with pytest.raises(KpError) as refused:
            ssh.connect(ep, ssh.load_key(shared), timeout=60).close()
        assert refused.value.code == "auth_failed"
        ssh.connect(ep, ssh.load_key(own), timeout=60).close()
    # another clone has another key; kp-rm takes it away with the clone
    (other,) = lines(run(env, "kp-clone", "--cold", "base", "other-key").stdout)
    assert other["ssh_key"]["fingerprint"] != record["ssh_key"]["fingerprint"]
    assert Path(other["ssh_key"]["path"]).is_file()
    assert run(env, "kp-rm", "other-key").returncode == 0
    assert not Path(other["ssh_key"]["path"]).exists()
