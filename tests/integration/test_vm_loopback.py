"""A guest does not reach the host's loopback services unless asked (kp-boot --host-loopback).

Root in a real guest (TCG) tries every way it can think of to reach TCP listeners on the host's
127.0.0.1 and ::1: the gateway (10.0.2.2, as QEMU's slirp maps it), the DNS server's address and
its other ports, the rest of the virtual network, the IPv6 gateway (link-local), then its own
kernel routing 127.0.0.0/8 out of its NIC (route_localnet), and last raw Ethernet frames written
with an AF_PACKET socket: TCP SYNs to 127.0.0.1, 0.0.0.0, ::1, ::ffff:127.0.0.1 and ::.  The
oracle is on the host: a loopback listener that accepts any connection means the attack worked.
Meanwhile the guest reaches a listener on one of the host's non-loopback addresses and resolves
a name, so the network works.  With --host-loopback (QEMU's slirp) the loopback listener IS
reached through 10.0.2.2: the check notices a successful attack.

passt and the guard end with QEMU, however it ends: kp-stop, kp-rm, or QEMU killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from kodepipe.vm import passt
from tests.conftest import lines
from tests.integration.conftest import run

pytestmark = pytest.mark.integration

NAME = "loopy"
OPEN = "loopy-open"

# TCP SYNs in raw Ethernet frames, written by root with an AF_PACKET socket: no kernel routing of the
# guest's stands in the way.  perl is in every Debian (perl-base); the frame's lengths are exact.
RAW_SYN = r"""
use strict; use warnings; use Socket qw(inet_pton AF_INET AF_INET6);
my ($if, $dstmac, $fam, $src, $dst, $port) = @ARGV;
sub csum { my $d = shift; $d .= "\0" if length($d) % 2; my $s = 0; $s += $_ for unpack("n*", $d);
           $s = ($s >> 16) + ($s & 0xffff) while $s >> 16; return ~$s & 0xffff; }
sub mac { my $m = shift; $m =~ s/://g; return pack("H12", $m); }
open(my $f, "<", "/sys/class/net/$if/address") or die; my $srcmac = <$f>; chomp $srcmac; close $f;
open($f, "<", "/sys/class/net/$if/ifindex") or die; my $ifindex = <$f>; chomp $ifindex; close $f;
my $sport = 20000 + int(rand(30000));
my ($s, $d) = $fam == 4 ? (inet_pton(AF_INET, $src), inet_pton(AF_INET, $dst))
                        : (inet_pton(AF_INET6, $src), inet_pton(AF_INET6, $dst));
my $tcp = pack("nnNNCCnnn", $sport, $port, int(rand(2**31)), 0, 5 << 4, 0x02, 64240, 0, 0);
my ($l3, $type);
if ($fam == 4) {
    my $pseudo = $s . $d . pack("CCn", 0, 6, length($tcp));
    substr($tcp, 16, 2) = pack("n", csum($pseudo . $tcp));
    my $ip = pack("CCnnnCCn", 0x45, 0, 20 + length($tcp), int(rand(65535)), 0x4000, 64, 6, 0) . $s . $d;
    substr($ip, 10, 2) = pack("n", csum($ip));
    ($l3, $type) = ($ip . $tcp, 0x0800);
} else {
    my $pseudo = $s . $d . pack("NxxxC", length($tcp), 6);
    substr($tcp, 16, 2) = pack("n", csum($pseudo . $tcp));
    ($l3, $type) = (pack("NnCC", 6 << 28, length($tcp), 6, 64) . $s . $d . $tcp, 0x86DD);
}
my $frame = mac($dstmac) . mac($srcmac) . pack("n", $type) . $l3;
socket(my $sock, 17, 3, 0) or die "socket: $!";   # AF_PACKET, SOCK_RAW
my $sll = pack("SnIsCCa8", 17, $type, $ifindex, 0, 0, 6, mac($dstmac));
for (1 .. 3) { defined(send($sock, $frame, 0, $sll)) or die "send: $!"; select(undef, undef, undef, 0.3); }
"""


class Listener:
    """A TCP listener on the host that counts every connection made to it.  Nothing accepts them
    until ``seen`` is asked: a connection the kernel completed waits in the queue, so nothing is
    missed however late the check comes."""

    def __init__(self, host: str) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(128)
        self.sock.setblocking(False)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.accepted: list[Any] = []

    def seen(self) -> list[Any]:
        while True:
            try:
                conn, peer = self.sock.accept()
            except BlockingIOError:
                return self.accepted
            conn.close()
            self.accepted.append(peer)

    def close(self) -> None:
        self.sock.close()


def host_address() -> str:
    """One of the host's own addresses that is not loopback (the one its default route leaves from)."""
    routes = json.loads(subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, check=True).stdout)
    for link in routes:
        for info in link.get("addr_info", []):
            if not info["local"].startswith("127.") and link.get("operstate") in ("UP", "UNKNOWN"):
                return str(info["local"])
    pytest.skip("the host has no non-loopback IPv4 address")


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def as_root(env: dict[str, str], name: str, script: str, timeout: float = 600) -> dict[str, Any]:
    proc = run(env, "kp-ssh", name, "--", "sudo", "bash", "-c", script, timeout=timeout)
    results = [r for r in lines(proc.stdout) if r.get("kind") == "result"]
    assert len(results) == 1, proc.stderr.decode()
    return results[0]


def boot(env: dict[str, str], name: str, *flags: str) -> dict[str, Any]:
    clone = run(env, "kp-clone", "--cold", "base", name)
    assert clone.returncode == 0, clone.stderr.decode()
    booted = run(env, "kp-boot", "--accel", "tcg", *flags, name)
    assert booted.returncode == 0, booted.stderr.decode()
    found = run(env, "kp-ip", name, "--timeout", "400", timeout=900)
    assert found.returncode == 0, found.stderr.decode()
    return dict(lines(found.stdout)[0])


@pytest.fixture(scope="module")
def listeners() -> Iterator[dict[str, Listener]]:
    made = {"v4": Listener("127.0.0.1"), "routed": Listener("127.0.0.1"), "raw4": Listener("127.0.0.1"),
            "any4": Listener("127.0.0.1"), "mapped": Listener("127.0.0.1"), "outside": Listener(host_address())}
    if has_ipv6_loopback():
        made.update(v6=Listener("::1"), raw6=Listener("::1"), any6=Listener("::1"))
    yield made
    for listener in made.values():
        listener.close()


@pytest.fixture(scope="module")
def guest(golden: dict[str, Any]) -> Iterator[tuple[dict[str, str], dict[str, Any]]]:
    env = golden["env"]
    try:
        yield env, boot(env, NAME)
    finally:
        run(env, "kp-rm", NAME, timeout=300)


def attack_script(ports: dict[str, int], outside: str, dns_name: str) -> str:
    """Root's attempts, each a line "NAME open" or "NAME closed"; then the raw frames."""
    v4, v6 = ports["v4"], ports.get("v6", ports["v4"])
    tries = [("gateway", "10.0.2.2", v4), ("dns-address", "10.0.2.3", v4), ("net-address", "10.0.2.1", v4),
             ("broadcast-ish", "10.0.2.255", v4), ("net-99", "10.0.2.99", v4),
             ("outside", outside, ports["outside"])]
    lines_ = ["set -u", "IF=$(ip -o link show | awk -F': ' '$2 != \"lo\" {print $2; exit}')",
              # connected means reached: passt (and slirp) answer the guest's SYN only once the host's
              # connect() succeeded
              "try() { if timeout 10 bash -c \"exec 3<>/dev/tcp/$2/$3\" 2>/dev/null;"
              " then echo \"$1 open\"; else echo \"$1 closed\"; fi; }"]
    lines_ += [f"try {label} {host} {port}" for label, host, port in tries]
    # every resolver the guest was given, on the loopback listener's port (DNS is port 53 only)
    lines_.append(f"for ns in $(resolvectl dns \"$IF\" | awk '{{for (i = 4; i <= NF; i++) print $i}}') "
                  f"$(awk '/^nameserver/ {{print $2}}' /etc/resolv.conf); do try dns-server-$ns $ns {v4}; done")
    lines_.append(f"getent ahostsv4 {dns_name} >/dev/null && echo 'dns resolves' || echo 'dns fails'")
    # the IPv6 gateway and every link-local router the guest knows, with its scope
    lines_.append(f"for gw in $(ip -6 route show default | awk '{{print $3}}'); do try v6-gateway-$gw \"$gw%$IF\" {v6};"
                  f" try v6-gateway4-$gw \"$gw%$IF\" {v4}; done")
    # the guest's kernel sends 127.0.0.0/8 out of its NIC: route_localnet, its own loopback routes gone
    routed = ports["routed"]
    lines_ += ["sysctl -qw net.ipv4.conf.all.route_localnet=1 \"net.ipv4.conf.$IF.route_localnet=1\"",
               "GW=$(ip -4 route show default | awk '{print $3; exit}')",
               "ip route del local 127.0.0.0/8 dev lo table local 2>/dev/null; "
               "ip route del local 127.0.0.1 dev lo table local 2>/dev/null",
               "ip route add 127.0.0.0/8 via \"$GW\" dev \"$IF\" onlink",
               f"try routed-127 127.0.0.1 {routed}",
               "ip route del 127.0.0.0/8 via \"$GW\" dev \"$IF\"; ip addr del 127.0.0.1/8 dev lo 2>/dev/null; "
               "ip addr add 127.0.0.1/8 dev lo"]
    # ::1 out of the NIC: the guest's kernel refuses it, which the raw frames below go around
    lines_ += [f"ip -6 route add ::1/128 via $(ip -6 route show default | awk '{{print $3; exit}}') dev \"$IF\" "
               f"2>/dev/null && try routed-v6 ::1 {v6}; ip -6 route del ::1/128 dev \"$IF\" 2>/dev/null; true"]
    # raw frames: SYNs the guest's kernel would never send
    syn = "perl /run/rawsyn.pl \"$IF\" \"$MAC\""
    addr6 = "ip -6 addr show dev \"$IF\" scope"
    first = "awk '/inet6/ {sub(/\\/.*/, \"\", $2); print $2; exit}'"
    lines_ += ["echo $RAW | base64 -d > /run/rawsyn.pl",
               "MAC=$(ip neigh show \"$GW\" | awk '{print $5; exit}'); MAC=${MAC:-ff:ff:ff:ff:ff:ff}",
               f"SRC6=$({addr6} global | {first}); SRC6=${{SRC6:-$({addr6} link | {first})}}",
               f"{syn} 4 10.0.2.15 127.0.0.1 {ports['raw4']} && echo 'sent raw4'",
               f"{syn} 4 10.0.2.15 0.0.0.0 {ports['any4']} && echo 'sent any4'",
               f"{syn} 6 \"$SRC6\" ::ffff:127.0.0.1 {ports['mapped']} && echo 'sent mapped'"]
    if "raw6" in ports:
        lines_ += [f"{syn} 6 \"$SRC6\" ::1 {ports['raw6']} && echo 'sent raw6'",
                   f"{syn} 6 \"$SRC6\" :: {ports['any6']} && echo 'sent any6'"]
    # last, through the same passt: it handles the guest's frames in order, so by the time this
    # connection is made, passt has acted on every SYN above
    lines_.append(f"try outside-after {outside} {ports['outside']}")
    import base64

    return f"RAW={base64.b64encode(RAW_SYN.encode()).decode()}\n" + "\n".join(lines_) + "\n"


def wait_for(condition: Any, bound: float, what: str) -> None:
    deadline = time.monotonic() + bound  # a bound against a hang, not a measured time
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_a_guest_reaches_no_loopback_service_of_the_host(guest: tuple[dict[str, str], dict[str, Any]],
                                                         listeners: dict[str, Listener],
                                                         golden: dict[str, Any]) -> None:
    env, record = guest
    assert record["host_loopback"] is False and "host-loopback" not in record.get("loosened", [])
    assert record["passt"]["pid"] and record["passt"]["guard_pid"]
    ports = {key: listener.port for key, listener in listeners.items()}
    dns_name = urlparse(str(golden["record"].get("mirror") or "http://deb.debian.org/")).hostname or "deb.debian.org"
    result = as_root(env, NAME, attack_script(ports, listeners["outside"].host, dns_name))
    said = result["stdout"]
    # the network works: the host's own non-loopback address answers, and names resolve
    assert "outside open" in said and "outside-after open" in said, said + result["stderr"]
    with contextlib.suppress(OSError):
        socket.getaddrinfo(dns_name, 80, socket.AF_INET)  # only if the host itself resolves it
        assert "dns resolves" in said, said
    for sent in ("raw4", "any4", "mapped", *(("raw6", "any6") if "raw6" in ports else ())):
        assert f"sent {sent}" in said, said + result["stderr"]  # the raw frames did leave the guest
    opened = [line for line in said.splitlines() if line.endswith(" open") and not line.startswith("outside")]
    reached = {key: listener.seen() for key, listener in listeners.items() if key != "outside" and listener.seen()}
    assert not opened and not reached, f"the guest reached the host's loopback: {opened} {reached}\n{said}"


def test_host_loopback_is_a_recorded_loosening_that_opens_it(golden: dict[str, Any],
                                                             listeners: dict[str, Listener]) -> None:
    env = golden["env"]
    try:
        record = boot(env, OPEN, "--host-loopback")
        assert record["host_loopback"] is True and "host-loopback" in record["loosened"]
        assert "passt" not in record
        listed = [r for r in lines(run(env, "kp-ls", OPEN).stdout) if r.get("name") == OPEN]
        assert listed and listed[0]["host_loopback"] is True
        port = listeners["v4"].port
        before = len(listeners["v4"].seen())
        result = as_root(env, OPEN, f"timeout 10 bash -c 'exec 3<>/dev/tcp/10.0.2.2/{port}' && echo reached")
        assert result["stdout"] == "reached\n", result
        # the oracle of the test above notices a success
        wait_for(lambda: len(listeners["v4"].seen()) > before, 30, "the loopback listener saw nothing")
    finally:
        run(env, "kp-rm", OPEN, timeout=300)
        listeners["v4"].accepted.clear()


def passt_pids(record: dict[str, Any]) -> list[int]:
    return passt.running(record.get("passt"))


def test_passt_and_its_guard_end_with_qemu(guest: tuple[dict[str, str], dict[str, Any]],
                                          golden: dict[str, Any]) -> None:
    env, record = guest
    assert len(passt_pids(record)) == 2
    # neither runs as root (passt drops to nobody; the guard too)
    for pid in passt_pids(record):
        uid = int(Path(f"/proc/{pid}/status").read_text().split("\nUid:")[1].split()[1])
        assert uid != 0, pid
    # kp-stop: gone
    stopped = run(env, "kp-stop", "--kill", NAME, timeout=300)
    assert stopped.returncode == 0, stopped.stderr.decode()
    assert passt_pids(record) == []
    # QEMU killed behind kodepipe's back: they end by themselves, without any kodepipe command
    booted = run(env, "kp-boot", "--accel", "tcg", NAME)
    assert booted.returncode == 0, booted.stderr.decode()
    again = lines(booted.stdout)[0]
    assert len(passt_pids(again)) == 2
    os.kill(again["pid"], signal.SIGKILL)
    wait_for(lambda: passt_pids(again) == [], 60, "passt or its guard outlived a killed QEMU")
    assert lines(run(env, "kp-ls", NAME).stdout)[0]["state"] == "crashed"
    # and kp-rm of a running one leaves none behind
    booted = run(env, "kp-boot", "--accel", "tcg", NAME)
    third = lines(booted.stdout)[0]
    assert len(passt_pids(third)) == 2
    assert run(env, "kp-rm", NAME, timeout=300).returncode == 0
    assert passt_pids(third) == []


def test_warm_clones_resume_with_passt_and_an_old_slirp_warm_state_is_refused(
        golden: dict[str, Any], listeners: dict[str, Listener]) -> None:
    env, state = golden["env"], Path(golden["state"])
    image = lines(run(env, "kp-ls", "base").stdout)[0]
    if not isinstance(image.get("warm"), dict):
        image = lines(run(env, "kp-image", "warm", "base", timeout=900).stdout)[0]
    assert image["warm"]["netdev"] == "passt"  # warm states are made with the default network
    names = ["warm-loopy", "warm-loose", "warm-old"]
    meta_file = state / "images" / "base" / "meta.json"
    original = meta_file.read_bytes()
    try:
        for name in names:
            assert run(env, "kp-clone", "base", name).returncode == 0
        # a warm clone resumes with passt behind the guard, and the gateway is not the host's loopback
        booted = run(env, "kp-boot", "--accel", "tcg", names[0])
        assert booted.returncode == 0, booted.stderr.decode()
        record = lines(booted.stdout)[0]
        assert record["host_loopback"] is False and len(passt_pids(record)) == 2
        assert run(env, "kp-ip", names[0], "--timeout", "300", timeout=600).returncode == 0
        port = listeners["v4"].port
        probe = as_root(env, names[0], f"timeout 10 bash -c 'exec 3<>/dev/tcp/10.0.2.2/{port}' && echo reached; "
                                       f"timeout 10 bash -c 'exec 3<>/dev/tcp/{listeners['outside'].host}/"
                                       f"{listeners['outside'].port}' && echo outside")
        assert probe["stdout"] == "outside\n", probe
        assert listeners["v4"].seen() == []
        # it was saved with passt: --host-loopback cannot change that, and nothing is started
        loose = run(env, "kp-boot", "--accel", "tcg", "--host-loopback", names[1])
        assert loose.returncode == 1 and lines(loose.stdout)[0]["error"]["code"] == "net_on_saved", loose.stderr
        assert lines(run(env, "kp-ls", names[1]).stdout)[0]["state"] == "stopped"
        # a warm state made before kp-boot used passt (no "netdev": slirp's) is refused with the way out
        meta = json.loads(original)
        del meta["warm"]["netdev"]
        meta_file.write_text(json.dumps(meta))
        old = run(env, "kp-boot", "--accel", "tcg", names[2])
        assert old.returncode == 1, old.stderr.decode()
        error = lines(old.stdout)[0]["error"]
        assert error["code"] == "warm_outdated" and "slirp" in error["message"]
        assert b"kp-image warm --force base" in old.stderr
    finally:
        meta_file.write_bytes(original)
        for name in names:
            run(env, "kp-rm", name, timeout=300)
