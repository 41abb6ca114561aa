"""The sealed guard (kodepipe.vm.netguard.Seal) on frames built here: what a guest booted with
kp-boot --allow may send, how frames to the proxy and to resolvers are translated, and that every
translated frame's checksums are those of the frame it became (computed here from scratch)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import pytest

from kodepipe.vm import netguard

MACS = bytes.fromhex("02fc00000001") + bytes.fromhex("525400123456")
GUEST, GW = "10.0.2.15", "10.0.2.2"
PROXY, DNS = 40001, 40002  # the VM's proxy and DNS answerer on the host's 127.0.0.1


def fold(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def packet(src: str, dst: str, sport: int, dport: int, *, proto: int = 6, flags: int = netguard.SYN,
           payload: bytes = b"", frag: int = 0x4000, qid: bytes = b"\x12\x34") -> bytearray:
    """An Ethernet frame holding one IPv4 TCP segment or UDP datagram, with correct checksums."""
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    if proto == 6:
        l4 = bytearray(sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + bytes(8) + bytes([5 << 4, flags])
                       + (64240).to_bytes(2, "big") + bytes(4) + payload)
        at = 16
    else:
        body = qid + payload
        l4 = bytearray(sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + (8 + len(body)).to_bytes(2, "big")
                       + bytes(2) + body)
        at = 6
    pseudo = s + d + bytes([0, proto]) + len(l4).to_bytes(2, "big")
    l4[at:at + 2] = (~fold(pseudo + bytes(l4)) & 0xFFFF).to_bytes(2, "big")
    ip = bytearray([0x45, 0, *(20 + len(l4)).to_bytes(2, "big"), 0, 1, *frag.to_bytes(2, "big"), 64, proto, 0, 0])
    ip += s + d
    ip[10:12] = (~fold(bytes(ip)) & 0xFFFF).to_bytes(2, "big")
    return bytearray(MACS + b"\x08\x00" + ip + l4)


def valid(frame: bytearray) -> bool:
    """The IPv4 header's and the TCP or UDP checksum hold for the frame as it is."""
    ip = frame[14:34]
    l4 = bytes(frame[34:])
    proto = ip[9]
    pseudo = bytes(ip[12:20]) + bytes([0, proto]) + len(l4).to_bytes(2, "big")
    return fold(bytes(ip)) == 0xFFFF and fold(pseudo + l4) == 0xFFFF


def addr(frame: bytearray, source: bool) -> tuple[str, int]:
    at, port = (26, 34) if source else (30, 36)
    return socket.inet_ntoa(bytes(frame[at:at + 4])), int.from_bytes(frame[port:port + 2], "big")


def sealed() -> netguard.Seal:
    return netguard.Seal(frozenset({22, 8080}), PROXY, DNS)


@pytest.mark.parametrize(("frame", "why"), [
    (packet(GUEST, "1.1.1.1", 40000, 443), "new TCP connection"),  # a raw address
    (packet(GUEST, GW, 40000, 80), "new TCP connection"),  # the gateway, not the proxy's port
    (packet(GUEST, "127.0.0.1", 40000, PROXY), "new TCP connection"),  # the proxy's host port itself
    (packet(GUEST, "169.254.169.254", 40000, 80), "new TCP connection"),  # cloud metadata
    (packet(GUEST, "1.1.1.1", 22, 443), "new TCP connection"),  # from the SSH port: still a new connection
    (packet(GUEST, "1.1.1.1", 22, 443, flags=netguard.ACK), "no connection the host opened"),
    (packet(GUEST, "1.1.1.1", 40000, 443, flags=netguard.RST), "no connection the host opened"),
    (packet(GUEST, "1.1.1.1", 40000, 123, proto=17), "UDP other than DNS"),  # NTP
    (packet(GUEST, GW, 40000, 3128, frag=0x2000), "fragment"),  # more fragments: ports may lie
    (packet(GUEST, GW, 40000, 53, proto=17, frag=0x0010), "fragment"),
    (bytearray(MACS + b"\x86\xdd" + bytes(60)), "not IPv4"),
    (bytearray(MACS + b"\x08\x00" + bytes([0x45, 0, 0, 28, 0, 0, 0, 0, 64, 1, 0, 0]) + bytes(16)),
     "IP protocol 1"),  # ICMP
    (bytearray(MACS[:8]), "runt"),
])
def test_a_sealed_guest_opens_nothing_of_its_own(frame: bytearray, why: str) -> None:
    said = sealed().outgoing(frame)
    assert said is not None and why in said


def test_arp_and_dhcp_pass_as_they_are() -> None:
    arp = bytearray(MACS + b"\x08\x06" + bytes(28))
    dhcp = packet("0.0.0.0", "255.255.255.255", 68, 67, proto=17)  # noqa: S104
    for frame in (arp, dhcp):
        before = bytes(frame)
        assert sealed().outgoing(frame) is None and bytes(frame) == before


def test_the_proxy_is_reached_at_the_gateway_and_answers_from_there() -> None:
    seal = sealed()
    syn = packet(GUEST, GW, 41000, 3128, payload=b"x" * 33)
    assert seal.outgoing(syn) is None
    assert addr(syn, source=False) == ("127.0.0.1", PROXY) and valid(syn)
    reply = packet("127.0.0.1", GUEST, PROXY, 41000, flags=netguard.SYN | netguard.ACK, payload=b"hello")
    seal.incoming(reply)
    assert addr(reply, source=True) == (GW, 3128) and valid(reply)


@pytest.mark.parametrize("resolver", [GW, "8.8.8.8", "192.0.2.53"])
def test_every_dns_query_goes_to_kodepipe_and_its_answer_comes_from_the_resolver_asked(resolver: str) -> None:
    seal = sealed()
    query = packet(GUEST, resolver, 50000, 53, proto=17, payload=b"query", qid=b"\xab\xcd")
    assert seal.outgoing(query) is None
    assert addr(query, source=False) == ("127.0.0.1", DNS) and valid(query)
    # passt gives an answer from the host's loopback as from the gateway
    answer = packet(GW, GUEST, DNS, 50000, proto=17, payload=b"answer", qid=b"\xab\xcd")
    seal.incoming(answer)
    assert addr(answer, source=True) == (resolver, 53) and valid(answer)
    # an answer to no query in flight (or one already answered) is not dressed up as a resolver's
    again = packet(GW, GUEST, DNS, 50000, proto=17, payload=b"answer", qid=b"\xab\xcd")
    seal.incoming(again)
    assert addr(again, source=True) == (GW, DNS)


def test_replies_pass_only_on_connections_the_host_opened_to_a_forwarded_port() -> None:
    seal = sealed()
    # the host opens SSH (22) and a published port (8080); passt presents them from the gateway
    for port in (22, 8080):
        seal.incoming(packet(GW, GUEST, 33000 + port, port))
        assert seal.outgoing(packet(GUEST, GW, port, 33000 + port, flags=netguard.SYN | netguard.ACK)) is None
        assert seal.outgoing(packet(GUEST, GW, port, 33000 + port, flags=netguard.ACK, payload=b"data")) is None
    # a connection to a port that is not forwarded is not one the guest may answer
    seal.incoming(packet(GW, GUEST, 34000, 9999))
    assert seal.outgoing(packet(GUEST, GW, 9999, 34000, flags=netguard.SYN | netguard.ACK)) is not None
    # nor does a known connection let the guest open a new one on the same ports
    assert seal.outgoing(packet(GUEST, GW, 22, 33022)) is not None


def test_the_tables_stay_bounded() -> None:
    seal = sealed()
    for n in range(netguard.MAX_FLOWS + 50):
        seal.incoming(packet(GW, GUEST, 1024 + n, 22))
        seal.outgoing(packet(GUEST, "9.9.9.9", 1024 + n % 60000, 53, proto=17, qid=n.to_bytes(2, "big")))
    assert len(seal.flows) == len(seal.queries) == netguard.MAX_FLOWS
    assert (22, socket.inet_aton(GW), 1024) not in seal.flows  # the oldest forgotten


def test_translation_keeps_checksums_right_for_any_payload() -> None:
    rng = random.Random(14)  # noqa: S311 - reproducible test data
    for _ in range(300):
        payload = rng.randbytes(rng.randrange(0, 200))
        sport = rng.randrange(1, 65536)
        frame = packet(GUEST, GW, sport, 3128, flags=rng.choice([netguard.SYN, netguard.ACK]), payload=payload)
        assert sealed().outgoing(frame) is None and valid(frame)
        query = packet(GUEST, f"{rng.randrange(1, 224)}.{rng.randrange(256)}.0.1", sport, 53, proto=17,
                       payload=payload)
        assert sealed().outgoing(query) is None and valid(query)


def test_the_sealed_stream_drops_and_translates_whole_frames() -> None:
    seal = sealed()
    good, bad = packet(GUEST, GW, 41000, 3128), packet(GUEST, "1.1.1.1", 41000, 443)

    def framed(*frames: bytearray) -> bytearray:
        return bytearray(b"".join(len(f).to_bytes(4, "big") + bytes(f) for f in frames))

    stream = framed(good, bad, good) + framed(good)[:20]
    passed, used = netguard.sealed_stream(stream, seal, upstream=True)
    assert used == len(framed(good, bad, good))
    assert passed.count(socket.inet_aton("127.0.0.1")) == 2  # both translated to the proxy
    assert socket.inet_aton("1.1.1.1") not in passed
    with pytest.raises(ValueError, match="frame of"):
        netguard.sealed_stream(bytearray((1 << 20).to_bytes(4, "big") + bytes(16)), seal, upstream=False)


def test_the_seal_is_read_from_the_guards_command_line() -> None:
    seal = netguard.Seal.parse('{"inbound": [22, 8080], "proxy": 1, "dns": 2}')
    assert seal.inbound == {22, 8080} and (seal.proxy_port, seal.dns_port) == (1, 2)


# -- kp-boot's options: every mistake is a usage error before any VM is touched -----------------------

@pytest.mark.parametrize(("args", "said"), [
    (["--allow", "example.com", "--net", "none"], "--net none"),
    (["--allow", "example.com", "--host-loopback"], "--host-loopback"),
    (["--resolve", "a.test=127.0.0.1"], "give --allow too"),
    (["--allow", "not a name"], "not a domain name"),
    (["--allow", "1.2.3.4"], "not a domain name but an address"),
    (["--allow", "a.test", "--resolve", "a.test"], "NAME=ADDRESS"),
    (["--publish", "8080"], "HOSTPORT:GUESTPORT"),
    (["--publish", "::1:8080:80"], "HOSTPORT:GUESTPORT"),
    (["--publish", "8080:70000"], "between 1 and 65535"),
    (["--publish", "2222:22"], "forwarded already"),
    (["--publish", "8080:80", "--net", "none"], "--net none"),
])
def test_kp_boot_refuses_a_bad_network_option(args: list[str], said: str) -> None:
    from tests.cli import invoke

    result = invoke("kp-boot", *args, "nosuchvm")
    assert result.status == 2, result.stderr
    assert said in result.stderr and "nosuchvm" not in result.stderr


def test_publish_parses_the_host_address_or_takes_loopback() -> None:
    from kodepipe.vm import passt

    assert str(passt.parse_publish("8080:80")) == "127.0.0.1:8080:80"
    assert str(passt.parse_publish("0.0.0.0:8080:80")) == "0.0.0.0:8080:80"
    assert passt.argv(fd=3, ssh_port=2222, log=Path("/x/passt.log"),
                      publish=(passt.parse_publish("8080:80"),))[-2:] == ["--tcp-ports", "127.0.0.1/8080:80"]
