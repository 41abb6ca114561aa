"""--net user without the host's loopback: passt's command line and DNS (pure), the loopback guard's
verdict on frames (pure), the guard and passt as processes on real sockets (no guest), and which
network a saved machine resumes with.  The attack from a real guest: tests/integration/test_vm_loopback.py."""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kodepipe.core.errors import KpError, MissingProgram
from kodepipe.vm import lifecycle as runtime
from kodepipe.vm import netguard, passt, qemu

ROOT = Path(__file__).resolve().parent.parent


# -- DNS -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("resolv", "resolved", "args", "servers", "problem"), [
    # this host: a resolver on the network; passt hands it to the guest, reached like any host
    ("nameserver 10.255.255.53\n", None, (), ("10.255.255.53",), None),
    # systemd-resolved's stub: loopback, so the servers behind it are given instead
    ("nameserver 127.0.0.53\noptions edns0\n", "nameserver 192.0.2.1\nnameserver 2001:db8::1\n",
     ("-D", "192.0.2.1", "-D", "2001:db8::1"), ("192.0.2.1", "2001:db8::1"), None),
    ("nameserver 127.0.0.53\n", "# nothing\nnameserver 127.0.0.1\n", ("-D", "none"), (), "127.0.0.53"),
    ("nameserver 127.0.0.53\n", None, ("-D", "none"), (), "on loopback (127.0.0.53)"),
    # a loopback resolver beside a real one: passt leaves out the loopback one by itself
    ("nameserver 127.0.0.1\nnameserver 9.9.9.9\n", None, (), ("9.9.9.9",), None),
    ("nameserver ::1\n", None, ("-D", "none"), (), "on loopback (::1)"),
    ("nameserver ::ffff:127.0.0.1\nnameserver 0.0.0.0\n", None, ("-D", "none"), (), "resolvers are on loopback"),
    ("", None, ("-D", "none"), (), "no resolver"),
    ("# nameserver 9.9.9.9\nnameserver not-an-address\nsearch example.org\n", None, ("-D", "none"), (),
     "no resolver"),
    # at most three of each family behind the stub
    ("nameserver 127.0.0.53\n", "".join(f"nameserver 192.0.2.{i}\n" for i in range(1, 6)),
     tuple(a for i in range(1, 4) for a in ("-D", f"192.0.2.{i}")), tuple(f"192.0.2.{i}" for i in range(1, 4)), None),
])
def test_dns(resolv: str, resolved: str | None, args: tuple[str, ...], servers: tuple[str, ...],
             problem: str | None) -> None:
    chosen = passt.dns(resolv, resolved)
    assert chosen.args == args and chosen.servers == servers
    if problem is None:
        assert chosen.problem is None
    else:
        assert chosen.problem is not None and problem in chosen.problem
    # whatever it is, the guest is never pointed at a loopback address
    assert not any(ipaddress.ip_address(s).is_loopback for s in chosen.servers)


# -- passt's command line ----------------------------------------------------------------------------

@pytest.mark.parametrize(("kw", "has", "lacks"), [
    ({"ssh_port": 2222}, [("--tcp-ports", "127.0.0.1/2222:22"), ("--udp-ports", "none")], ["--runas", "-D"]),
    ({"ssh_port": None}, [("--tcp-ports", "none")], ["127.0.0.1/"]),
    ({"ssh_port": 2222, "dns_args": ("-D", "192.0.2.1")}, [("-D", "192.0.2.1")], []),
    ({"ssh_port": 2222, "runas": "995:995"}, [("--runas", "995:995")], []),
])
def test_passt_argv(kw: dict[str, Any], has: list[tuple[str, str]], lacks: list[str]) -> None:
    args = passt.argv(fd=9, log=Path("/state/vms/a/passt.log"), **kw)
    assert args[0] == "passt"
    pairs = list(itertools.pairwise(args))
    # always: one client on the inherited socket (it exits when QEMU's side ends), in the foreground,
    # a bounded log that names the VM, no gateway that means the host, the fixed guest network
    for pair in [("--fd", "9"), ("--log-file", "/state/vms/a/passt.log"), ("--address", "10.0.2.15"),
                 ("--netmask", "24"), ("--gateway", "10.0.2.2"), *has]:
        assert pair in pairs, (pair, args)
    assert "--no-map-gw" in args and "--foreground" in args
    for absent in lacks:
        assert not any(absent in a for a in args), (absent, args)
    # nothing of the host is forwarded but SSH on loopback: never all ports, never a wildcard address
    assert "all" not in args and not any(a.startswith(("0.0.0.0", "::/")) for a in args)  # noqa: S104


def test_passt_missing_is_a_missing_program_with_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    from kodepipe.core import proc

    monkeypatch.setattr(proc, "which", lambda program: None)
    with pytest.raises(MissingProgram) as caught:
        passt.start(Path("/nonexistent/passt.log"), 2222, output=Path("/nonexistent/qemu.log"))
    assert caught.value.status == 69
    assert "apt-get install passt" in str(caught.value.hint) and "--host-loopback" in str(caught.value.hint)


# -- the guard's verdict ------------------------------------------------------------------------------

MACS = bytes.fromhex("02fc00000001") + bytes.fromhex("525400123456")


def ipv4(dst: str, src: str = "10.0.2.15") -> bytes:
    return (MACS + b"\x08\x00" + bytes([0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0]) + socket.inet_aton(src)
            + socket.inet_aton(dst) + bytes(20))


def ipv6(dst: str, src: str = "fd00::2") -> bytes:
    return (MACS + b"\x86\xdd" + bytes([0x60, 0, 0, 0, 0, 20, 6, 64])
            + ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed + bytes(20))


@pytest.mark.parametrize(("frame", "blocked"), [
    (MACS + b"\x08\x06" + bytes(28), None),  # ARP
    (ipv4("10.0.2.2"), None),  # the gateway: with --no-map-gw it leads out, not to the host
    (ipv4("192.0.2.2"), None),  # one of the host's own non-loopback addresses, like any host's
    (ipv4("255.255.255.255", "0.0.0.0"), None),  # DHCP  # noqa: S104
    (ipv4("224.0.0.251"), None),
    (ipv4("127.0.0.1"), "loopback"),
    (ipv4("127.255.255.254"), "loopback"),
    (ipv4("0.0.0.0"), "loopback"),  # a host's connect() to 0.0.0.0 lands on its own sockets  # noqa: S104
    (ipv4("0.1.2.3"), "loopback"),
    (ipv6("2001:db8::1"), None),
    (ipv6("fe80::1"), None),
    (ipv6("ff02::2", "fe80::5054:ff:fe12:3456"), None),  # router solicitation
    (ipv6("::1"), "loopback"),
    (ipv6("::"), "loopback"),
    (ipv6("::127.0.0.1"), "loopback"),
    (ipv6("::ffff:127.0.0.1"), "loopback"),  # IPv4-mapped: a dual-stack socket sends it to 127.0.0.1
    (ipv6("::ffff:10.0.2.2"), "loopback"),  # no guest has a reason to send IPv4-mapped packets at all
    (MACS + b"\x81\x00" + b"\x00\x01\x08\x00" + ipv4("127.0.0.1")[14:], "type 0x8100"),  # VLAN-tagged
    (MACS + b"\x88\xb5" + bytes(40), "type 0x88b5"),
    (MACS[:10], "runt"),
    (ipv4("10.0.2.2")[:30], "truncated IPv4"),
    (ipv6("2001:db8::1")[:50], "truncated IPv6"),
])
def test_guard_verdict(frame: bytes, blocked: str | None) -> None:
    said = netguard.verdict(frame)
    if blocked is None:
        assert said is None
    else:
        assert said is not None and blocked in said


def framed(*frames: bytes) -> bytes:
    return b"".join(len(f).to_bytes(4, "big") + f for f in frames)


def test_guard_stream_passes_whole_allowed_frames_and_keeps_a_partial_one() -> None:
    good, bad = ipv4("10.0.2.2"), ipv4("127.0.0.1")
    stream = bytearray(framed(good, bad, good) + framed(good)[:20])
    passed, used = netguard.filter_stream(stream)
    assert passed == framed(good, good)
    assert used == len(framed(good, bad, good))  # the partial frame waits for the rest
    with pytest.raises(ValueError, match="frame of"):
        netguard.filter_stream(bytearray((1 << 20).to_bytes(4, "big") + bytes(16)))


# -- the guard and passt as processes -----------------------------------------------------------------

def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "the socket ended early"
        data += chunk
    return data


def gone(pid: int, bound: float = 30.0) -> bool:
    deadline = time.monotonic() + bound  # a bound against a hang
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
                return True
            time.sleep(0.05)
            continue
        return True
    return False


def test_the_guard_drops_loopback_frames_copies_the_rest_and_ends_with_qemus_socket() -> None:
    qemu_end, guard_guest = socket.socketpair()
    guard_passt, passt_end = socket.socketpair()
    guard = subprocess.Popen(passt.guard_argv(guard_guest.fileno(), guard_passt.fileno(), "/state/vms/a"),
                             pass_fds=(guard_guest.fileno(), guard_passt.fileno()), env={"PYTHONPATH": str(ROOT)})
    guard_guest.close()
    guard_passt.close()
    try:
        good, bad6, bad4 = ipv4("10.0.2.2"), ipv6("::1"), ipv4("127.0.0.1")
        # the stream arrives cut anywhere: frames are checked whole
        data = framed(bad4, good, bad6, good)
        for cut in range(0, len(data), 7):
            qemu_end.sendall(data[cut:cut + 7])
        assert recv_exactly(passt_end, len(framed(good, good))) == framed(good, good)
        # the other way, as it is
        passt_end.sendall(framed(bad4))
        assert recv_exactly(qemu_end, len(framed(bad4))) == framed(bad4)
        # QEMU ends: the guard ends, and passt's socket with it (so passt, one client, exits)
        qemu_end.close()
        assert passt_end.recv(1) == b""
        assert guard.wait(timeout=30) == 0
    finally:
        guard.kill()
        guard.wait()
        passt_end.close()


def uids(pid: int) -> set[str]:
    """The real, effective, saved and filesystem uids of ``pid``."""
    return set(Path(f"/proc/{pid}/status").read_text().split("\nUid:")[1].split("\n")[0].split())


@pytest.mark.skipif(shutil.which("passt") is None, reason="passt is not installed")
def test_a_real_passt_listens_for_ssh_on_loopback_only_and_ends_with_qemus_socket(tmp_path: Path) -> None:
    port = qemu.free_port()
    started = passt.start(tmp_path / "passt.log", port, output=tmp_path / "qemu.log")
    try:
        assert passt._listening(port)
        assert sorted(passt.running(started.record())) == sorted([started.pid, started.guard_pid])
        if os.geteuid() == 0:  # neither stays root: both drop to nobody as they start
            for pid in (started.pid, started.guard_pid):
                deadline = time.monotonic() + 30  # a bound against a hang
                while uids(pid) != {"65534"}:
                    assert time.monotonic() < deadline, uids(pid)
                    time.sleep(0.02)
        # the forward is bound to 127.0.0.1 alone, nowhere else
        with open("/proc/net/tcp") as table:
            ours = [line.split()[1] for line in table if line.split()[1].endswith(f":{port:04X}")]
        assert ours == [f"0100007F:{port:04X}"]
    finally:
        os.close(started.qemu_fd)  # QEMU's end: as when QEMU exits
    assert gone(started.guard_pid) and gone(started.pid)
    assert passt.running(started.record()) == []


@pytest.mark.skipif(shutil.which("passt") is None, reason="passt is not installed")
def test_passt_on_a_busy_port_fails_with_its_own_words(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        with pytest.raises(KpError) as caught:
            passt.start(tmp_path / "passt.log", busy.getsockname()[1], output=tmp_path / "qemu.log")
    assert caught.value.code == "passt_failed" and "bind" in caught.value.message
    assert "Failed to send" not in caught.value.message  # passt's syslog noise is left out


# -- which network a saved machine resumes with -------------------------------------------------------

WARM_PASST = {"name": "base", "warm": {"id": "w1", "netdev": "passt"}}
WARM_SLIRP = {"name": "base", "warm": {"id": "w0"}}  # made before kp-boot used passt: no "netdev"


@pytest.mark.parametrize(("saved", "image", "asked", "outcome"), [
    ({"net": "user", "warm": True}, WARM_PASST, False, False),
    ({"net": "user", "warm": True}, WARM_PASST, True, "net_on_saved"),
    ({"net": "user", "warm": True}, WARM_SLIRP, False, "warm_outdated"),
    ({"net": "user", "warm": True}, WARM_SLIRP, True, True),  # asked for: it resumes as it was
    ({"net": "user", "netdev": "passt"}, {}, False, False),
    ({"net": "user", "netdev": "passt"}, {}, True, "net_on_saved"),
    ({"net": "user", "netdev": "slirp"}, {}, True, True),
    ({"net": "user", "netdev": "slirp"}, {}, False, True),  # a VM of the user's own: resumes as saved, said
    ({"net": "user"}, {}, False, True),  # saved before passt: slirp's
    ({"net": "none"}, {}, False, False),
    ({"net": "bridge:br0"}, {}, False, False),
])
def test_a_saved_machine_resumes_with_the_network_it_was_saved_with(
        saved: dict[str, Any], image: dict[str, Any], asked: bool, outcome: bool | str) -> None:
    said: list[str] = []
    opts = qemu.BootOptions(host_loopback=asked)
    if isinstance(outcome, str):
        with pytest.raises(KpError) as caught:
            runtime._saved_host_loopback("a", saved, image, opts, said.append)
        assert caught.value.code == outcome and caught.value.hint
    else:
        assert runtime._saved_host_loopback("a", saved, image, opts, said.append) is outcome
        # resuming with slirp unasked is said on stderr
        assert bool(said) == (outcome and not asked)


def test_the_guard_module_needs_only_the_standard_library() -> None:
    # it runs under python -S: nothing but the standard library may be imported
    proc = subprocess.run([sys.executable, "-S", "-c", "import kodepipe.vm.netguard, sys; "
                           "print(sorted(m for m in sys.modules if m.startswith('kodepipe')))"],
                          env={"PYTHONPATH": str(ROOT)}, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "['kodepipe', 'kodepipe.vm', 'kodepipe.vm.netguard']"


def test_kp_ls_table_shows_the_loosening() -> None:
    from kodepipe.commands.ls import table

    vm = {"kind": "vm", "name": "a", "state": "running", "base": "base", "host_loopback": True,
          "loosened": ["host-loopback"], "ssh": {"user": "kp", "host": "127.0.0.1", "port": 2222}}
    shown = table([vm, {**vm, "name": "b", "host_loopback": False, "loosened": []}], colour=False).splitlines()
    assert shown[1].endswith("ssh kp@127.0.0.1:2222, loosened: host-loopback")
    assert "loosened" not in shown[2]
