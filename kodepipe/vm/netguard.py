"""The loopback guard: the one path between a guest's NIC (QEMU) and passt, which drops every frame
the guest addresses to the host's loopback.

passt (0.0~git20230309, Debian 12) with ``--no-map-gw`` no longer turns the gateway's address into
the host's 127.0.0.1, but it still opens a host socket to whatever address a guest's packet names:
a guest's root that routes 127.0.0.0/8 out of its NIC (``route_localnet``) or writes a raw frame to
127.0.0.1, 0.0.0.0, ::1 or ::ffff:127.0.0.1 reaches every service on the host's loopback (measured:
tests/integration/test_vm_loopback.py).  So QEMU's end of the network is not passt's socket but
this guard's: it reads the stream QEMU writes (``-netdev stream``: each frame a 4-byte big-endian
length and an Ethernet frame), passes on the frames passt can serve safely and drops the rest
(``verdict``).  What passt sends back to the guest is copied as it is.

It is a bare interpreter (``python -S``, standard library only), started by kp-boot beside passt
and QEMU, holding only its two sockets, and it drops to nobody when started as root.  It lives as
long as both ends do: when QEMU exits (its socket ends), the guard exits and closes passt's socket,
and passt (``--fd``: one client) exits too; when passt ends, the guest's network is gone.  A guard
that is killed ends both sockets: passt exits, the guest is offline; nothing is ever passed on
unchecked.

A guest booted with ``kp-boot --allow`` is *sealed* (``Seal``): it opens no connection of its own,
whatever it writes.  Its TCP frames pass only on a connection the host side opened to one of its
forwarded ports (SSH, ``--publish``), and a new one only to the egress proxy at 10.0.2.2:3128, which
the guard translates to the VM's proxy on the host's 127.0.0.1 (kodepipe.egress.gate).  Every UDP
datagram to port 53, whatever resolver it names, goes to the proxy's DNS answerer instead, and its
answer comes back from the address it was sent to.  DHCP (UDP to port 67) goes to passt, which
answers it itself.  Anything else is dropped: IPv6, ICMP, fragments, other UDP, and TCP elsewhere.
Replies are translated back as they pass to the guest, with their checksums fixed (RFC 1624).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

ETH_HEADER = 14
GATEWAY = bytes((10, 0, 2, 2))  # the guest's gateway (kodepipe.vm.passt.GATEWAY), where it finds the proxy
LOOPBACK = bytes((127, 0, 0, 1))
PROXY_PORT = 3128  # the guest's proxy: 10.0.2.2:3128 (the port of kodepipe.egress.policy.PROXY_PORT)
DNS_PORT, DHCP_PORT = 53, 67
TCP, UDP = 6, 17
SYN, RST, ACK = 0x02, 0x04, 0x10
MAX_FLOWS = 4096  # connections the host opened, and DNS queries in flight, remembered (the oldest forgotten)
ETH_IPV4, ETH_IPV6, ETH_ARP = 0x0800, 0x86DD, 0x0806
MAX_FRAME = 1 << 17  # QEMU and passt frames are at most 64 KiB and a header; anything longer is not the protocol
_CHUNK = 1 << 18


def _v4_blocked(addr: bytes) -> bool:
    # 127.0.0.0/8 is the host's loopback; a connect() to 0.0.0.0/8 reaches the host's own sockets too
    return addr[0] in (127, 0)


def _v6_blocked(addr: bytes) -> bool:
    # ::/96 holds :: and ::1 (and the old IPv4-compatible form); ::ffff:0:0/96 is IPv4-mapped, which a
    # host's dual-stack socket sends to the IPv4 address (::ffff:127.0.0.1 is the host's loopback)
    return addr[:12] == bytes(12) or addr[:12] == bytes(10) + b"\xff\xff"


def verdict(frame: bytes) -> str | None:
    """Why a frame from the guest must not reach passt, or None when it may.  Pure.

    ARP, IPv4 and IPv6 are what passt serves; any other frame type, or an IP frame too short to
    hold its addresses, is dropped.  An IPv4 destination in 127.0.0.0/8 or 0.0.0.0/8, or an IPv6
    one in ::/96 (::1, ::) or ::ffff:0:0/96 (IPv4-mapped), is the host itself as seen from passt.
    """
    if len(frame) < ETH_HEADER:
        return "a runt frame"
    kind = int.from_bytes(frame[12:14], "big")
    if kind == ETH_ARP:
        return None
    if kind == ETH_IPV4:
        if len(frame) < ETH_HEADER + 20:
            return "a truncated IPv4 header"
        if _v4_blocked(frame[ETH_HEADER + 16:ETH_HEADER + 20]):
            return "an IPv4 packet to the host's loopback"
        return None
    if kind == ETH_IPV6:
        if len(frame) < ETH_HEADER + 40:
            return "a truncated IPv6 header"
        if _v6_blocked(frame[ETH_HEADER + 24:ETH_HEADER + 40]):
            return "an IPv6 packet to the host's loopback"
        return None
    return f"a frame of type 0x{kind:04x}"


def filter_stream(buffer: bytearray) -> tuple[bytes, int]:
    """The frames of ``buffer`` (QEMU's stream) that may pass, re-framed, and how many bytes of it
    were whole frames (the caller keeps the rest for the next read).  Pure.  Raises ValueError on a
    length no frame can have: the stream is not QEMU's, and the guard ends it."""
    out = bytearray()
    view = memoryview(buffer)
    at = 0
    while len(buffer) - at >= 4:
        size = int.from_bytes(view[at:at + 4], "big")
        if size > MAX_FRAME:
            raise ValueError(f"a frame of {size} bytes")
        if len(buffer) - at - 4 < size:
            break
        frame = view[at + 4:at + 4 + size]
        if verdict(bytes(frame[:ETH_HEADER + 40])) is None:
            out += view[at:at + 4 + size]
        at += 4 + size
    view.release()
    return bytes(out), at


def _checksum(data: bytes | bytearray | memoryview) -> int:
    """The Internet checksum of ``data`` (even length)."""
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _adjusted(check: int, old: bytes, new: bytes) -> int:
    """A checksum after 16-bit words ``old`` became ``new`` (RFC 1624, eqn. 3)."""
    total = ~check & 0xFFFF
    for i in range(0, len(old), 2):
        total += (~int.from_bytes(old[i:i + 2], "big") & 0xFFFF) + int.from_bytes(new[i:i + 2], "big")
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _translate(frame: bytearray, ip: int, l4: int, proto: int, *, source: bool, addr: bytes, port: int) -> None:
    """Rewrite an IPv4 frame's source (or destination) address and port in place, and its checksums."""
    at_addr, at_port = ip + (12 if source else 16), l4 + (0 if source else 2)
    old = bytes(frame[at_addr:at_addr + 4]) + bytes(frame[at_port:at_port + 2])
    new = addr + port.to_bytes(2, "big")
    frame[at_addr:at_addr + 4], frame[at_port:at_port + 2] = new[:4], new[4:]
    frame[ip + 10:ip + 12] = b"\0\0"
    frame[ip + 10:ip + 12] = _checksum(frame[ip:l4]).to_bytes(2, "big")
    at_check = l4 + (16 if proto == TCP else 6)
    check = int.from_bytes(frame[at_check:at_check + 2], "big")
    if proto == UDP and check == 0:
        return  # a UDP datagram sent without a checksum keeps none
    check = _adjusted(check, old, new)
    if proto == UDP and check == 0:
        check = 0xFFFF
    frame[at_check:at_check + 2] = check.to_bytes(2, "big")


def _ipv4(frame: bytes | bytearray) -> tuple[int, int, int] | None:
    """(IP header offset, L4 offset, protocol) of an unfragmented IPv4 frame whose TCP or UDP header is
    whole, else None."""
    ip = ETH_HEADER
    if len(frame) < ip + 20 or frame[ip] >> 4 != 4:
        return None
    l4 = ip + (frame[ip] & 0x0F) * 4
    proto = frame[ip + 9]
    if l4 < ip + 20 or int.from_bytes(frame[ip + 6:ip + 8], "big") & 0x3FFF:
        return None  # a bad header length, or a fragment (its ports are not where they seem)
    if len(frame) < l4 + (20 if proto == TCP else 8):
        return None
    return ip, l4, proto


class Seal:
    """What a guest booted with ``kp-boot --allow`` may send (see the module's docstring)."""

    def __init__(self, inbound: frozenset[int], proxy_port: int, dns_port: int) -> None:
        self.inbound = inbound  # the guest's TCP ports the host forwards to (22, --publish)
        self.proxy_port, self.dns_port = proxy_port, dns_port  # the VM's proxy, on the host's 127.0.0.1
        # (guest port, peer address, peer port) of each connection the host side opened to the guest
        self.flows: dict[tuple[int, bytes, int], None] = {}
        # a DNS query's (guest port, query id) -> the resolver address it was sent to
        self.queries: dict[tuple[int, bytes], bytes] = {}

    @staticmethod
    def _remember(table: dict[Any, Any], key: Any, value: Any) -> None:
        table[key] = value
        while len(table) > MAX_FLOWS:
            del table[next(iter(table))]

    def outgoing(self, frame: bytearray) -> str | None:
        """Why a frame from the guest must be dropped, or None: then it may pass, translated in place
        when it is for the proxy or a resolver."""
        kind = int.from_bytes(frame[12:14], "big") if len(frame) >= ETH_HEADER else -1
        if kind == ETH_ARP:
            return None
        if kind != ETH_IPV4:
            return "not IPv4 (a sealed guest has IPv4 only)" if kind >= 0 else "a runt frame"
        found = _ipv4(frame)
        if found is None:
            return "an IPv4 fragment, or a packet without a whole TCP or UDP header"
        ip, l4, proto = found
        dst = bytes(frame[ip + 16:ip + 20])
        sport, dport = int.from_bytes(frame[l4:l4 + 2], "big"), int.from_bytes(frame[l4 + 2:l4 + 4], "big")
        if proto == UDP:
            if dport == DHCP_PORT:
                return None  # passt answers DHCP itself
            if dport != DNS_PORT or len(frame) < l4 + 10:
                return "UDP other than DNS and DHCP"
            self._remember(self.queries, (sport, bytes(frame[l4 + 8:l4 + 10])), dst)
            _translate(frame, ip, l4, proto, source=False, addr=LOOPBACK, port=self.dns_port)
            return None
        if proto != TCP:
            return f"IP protocol {proto}"
        if dst == GATEWAY and dport == PROXY_PORT:
            _translate(frame, ip, l4, proto, source=False, addr=LOOPBACK, port=self.proxy_port)
            return None
        flags = frame[l4 + 13]
        if flags & (SYN | ACK) == SYN:
            return "a new TCP connection not to the proxy"
        if (sport, dst, dport) not in self.flows:
            return "TCP on no connection the host opened"
        return None

    def incoming(self, frame: bytearray) -> None:
        """Translate a frame from passt to the guest in place (a reply of the proxy or of the DNS
        answerer), and remember each connection the host side opens to a forwarded port."""
        if len(frame) < ETH_HEADER or int.from_bytes(frame[12:14], "big") != ETH_IPV4:
            return
        found = _ipv4(frame)
        if found is None:
            return
        ip, l4, proto = found
        src = bytes(frame[ip + 12:ip + 16])
        sport, dport = int.from_bytes(frame[l4:l4 + 2], "big"), int.from_bytes(frame[l4 + 2:l4 + 4], "big")
        # passt gives what comes from the host's loopback as it was addressed (TCP) or as from the
        # gateway (UDP, measured with passt 0.0~git20230309): either way it is the proxy's
        ours = src in (LOOPBACK, GATEWAY)
        if proto == TCP:
            if ours and sport == self.proxy_port:
                _translate(frame, ip, l4, proto, source=True, addr=GATEWAY, port=PROXY_PORT)
            elif frame[l4 + 13] & (SYN | ACK) == SYN and dport in self.inbound:
                self._remember(self.flows, (dport, src, sport), None)
        elif proto == UDP and ours and sport == self.dns_port and len(frame) >= l4 + 10:
            resolver = self.queries.pop((dport, bytes(frame[l4 + 8:l4 + 10])), None)
            if resolver is not None:
                _translate(frame, ip, l4, proto, source=True, addr=resolver, port=DNS_PORT)

    @classmethod
    def parse(cls, text: str) -> Seal:
        """From the guard's command line: JSON {"inbound": [PORT...], "proxy": PORT, "dns": PORT}."""
        import json

        spec = json.loads(text)
        return cls(frozenset(int(p) for p in spec["inbound"]), int(spec["proxy"]), int(spec["dns"]))


def sealed_stream(buffer: bytearray, seal: Seal, *, upstream: bool) -> tuple[bytes, int]:
    """As filter_stream, for a sealed guest: ``upstream``, the frames of the guest's stream that may
    pass (translated); else passt's frames to the guest, translated.  Pure but for ``seal``'s tables."""
    out = bytearray()
    at = 0
    while len(buffer) - at >= 4:
        size = int.from_bytes(buffer[at:at + 4], "big")
        if size > MAX_FRAME:
            raise ValueError(f"a frame of {size} bytes")
        if len(buffer) - at - 4 < size:
            break
        frame = bytearray(buffer[at + 4:at + 4 + size])
        at += 4 + size
        if upstream:
            if seal.outgoing(frame) is not None:
                continue
        else:
            seal.incoming(frame)
        out += size.to_bytes(4, "big") + frame
    return bytes(out), at


def _upstream(guest: socket.socket, passt: socket.socket, seal: Seal | None = None) -> None:
    """Frames from the guest: checked, then passed to passt."""
    pending = bytearray()
    while True:
        data = guest.recv(_CHUNK)
        if not data:
            return
        pending += data
        passed, used = filter_stream(pending) if seal is None else sealed_stream(pending, seal, upstream=True)
        del pending[:used]
        if passed:
            passt.sendall(passed)


def _downstream(passt: socket.socket, guest: socket.socket, seal: Seal | None = None) -> None:
    """Frames from passt to the guest: copied as they are (translated, for a sealed guest)."""
    pending = bytearray()
    while True:
        data = passt.recv(_CHUNK)
        if not data:
            return
        if seal is None:
            guest.sendall(data)
            continue
        pending += data
        passed, used = sealed_stream(pending, seal, upstream=False)
        del pending[:used]
        if passed:
            guest.sendall(passed)


def _drop_root() -> None:
    if os.geteuid() != 0:
        return
    import pwd

    try:
        nobody = pwd.getpwnam("nobody")
        uid, gid = nobody.pw_uid, nobody.pw_gid
    except KeyError:
        uid = gid = 65534
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def serve(guest_fd: int, passt_fd: int, seal: Seal | None = None) -> None:
    """Relay between QEMU's socket and passt's until either ends; then end both (the process exits)."""
    guest = socket.socket(fileno=guest_fd)
    passt = socket.socket(fileno=passt_fd)

    def run(direction: Callable[..., None], *ends: socket.socket) -> None:
        with contextlib.suppress(OSError, ValueError):
            direction(*ends, seal)
        os._exit(0)  # one direction ended: so does the guard, and with it both sockets

    threading.Thread(target=run, args=(_downstream, passt, guest), daemon=True).start()
    run(_upstream, guest, passt)


def main(argv: list[str]) -> None:
    # argv: GUEST_FD PASST_FD [LABEL [SEAL]]; the label (the VM's folder) only names the process in ps and
    # /proc; SEAL (JSON, see Seal.parse) seals the guest.  Any other descriptor it inherits it only holds:
    # the VM's proxy ends when the guard does (kodepipe.egress.gate)
    guest_fd, passt_fd = int(argv[0]), int(argv[1])
    seal = Seal.parse(argv[3]) if len(argv) > 3 else None
    _drop_root()
    serve(guest_fd, passt_fd, seal)


if __name__ == "__main__":
    main(sys.argv[1:])
