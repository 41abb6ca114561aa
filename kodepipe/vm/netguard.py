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
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
from collections.abc import Callable

ETH_HEADER = 14
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


def _upstream(guest: socket.socket, passt: socket.socket) -> None:
    """Frames from the guest: checked, then passed to passt."""
    pending = bytearray()
    while True:
        data = guest.recv(_CHUNK)
        if not data:
            return
        pending += data
        passed, used = filter_stream(pending)
        del pending[:used]
        if passed:
            passt.sendall(passed)


def _downstream(passt: socket.socket, guest: socket.socket) -> None:
    """Frames from passt to the guest: copied as they are."""
    while True:
        data = passt.recv(_CHUNK)
        if not data:
            return
        guest.sendall(data)


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


def serve(guest_fd: int, passt_fd: int) -> None:
    """Relay between QEMU's socket and passt's until either ends; then end both (the process exits)."""
    guest = socket.socket(fileno=guest_fd)
    passt = socket.socket(fileno=passt_fd)

    def run(direction: Callable[[socket.socket, socket.socket], None], *ends: socket.socket) -> None:
        with contextlib.suppress(OSError, ValueError):
            direction(*ends)
        os._exit(0)  # one direction ended: so does the guard, and with it both sockets

    threading.Thread(target=run, args=(_downstream, passt, guest), daemon=True).start()
    run(_upstream, guest, passt)


def main(argv: list[str]) -> None:
    # argv: GUEST_FD PASST_FD [LABEL]; the label (the VM's folder) only names the process in ps and /proc
    guest_fd, passt_fd = int(argv[0]), int(argv[1])
    _drop_root()
    serve(guest_fd, passt_fd)


if __name__ == "__main__":
    main(sys.argv[1:])
