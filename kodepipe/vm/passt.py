"""passt: a guest's user-mode network that does not lead to the host's loopback services.

QEMU 7.2's own user networking (slirp) translates every address of its virtual network but the DNS
one to the host's 127.0.0.1, so a guest reaches whatever listens on the host's loopback, and QEMU
7.2 cannot turn that off (libslirp's disable_host_loopback is not exposed).  kp-boot's default
``--net user`` is served by passt instead (Debian's ``passt``), started with ``--no-map-gw`` (no
address of the guest's network means the host) and a fixed guest network like slirp's (the guest is
10.0.2.15/24, its gateway 10.0.2.2), so the saved state of a guest does not depend on the host's
addresses.  SSH is passt's one forward, 127.0.0.1:PORT to the guest's port 22.

passt alone still opens a host socket to any address a guest's packet names, 127.0.0.1 included,
so QEMU never talks to passt directly: kodepipe.vm.netguard sits between them and drops what is
addressed to the host's loopback.  Both are joined by socketpairs kodepipe makes (QEMU's end is an
inherited fd, ``-netdev stream,addr.type=fd``; passt's is ``--fd``), so no socket file and no
file permission is involved, and each ends when its socket does: QEMU exits, the guard exits, passt
(one client) exits.  kodepipe also records both pids (``cleanup`` ends them if they are still
there).  passt drops to nobody by itself when started as root (``--runas`` names another account).

``kp-boot --host-loopback`` keeps slirp, a loosening the vm record shows.

``kp-boot --allow`` seals the guest (kodepipe.vm.netguard.Seal): the guard then passes only the
guest's side of connections the host opened (SSH, ``--publish``) and its traffic to the VM's egress
proxy (kodepipe.egress.gate, started here beside passt and the guard, on two sockets kodepipe binds
on the host's 127.0.0.1 and hands over).  ``--publish`` ports are passt forwards like SSH's.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kodepipe.core.errors import BadInput, KpError, MissingProgram

if TYPE_CHECKING:
    from kodepipe.core import proc

PASST = "passt"
GUEST = "10.0.2.15"
PREFIX = 24
GATEWAY = "10.0.2.2"
PROXY_PORT = 3128  # a sealed guest's proxy is GATEWAY:PROXY_PORT (kodepipe.vm.netguard.Seal)
MAX_DNS = 3  # per family: passt keeps a few
RESOLV_CONF = Path("/etc/resolv.conf")
# systemd-resolved's list of the servers behind its 127.0.0.53 stub
RESOLVED_CONF = Path("/run/systemd/resolve/resolv.conf")
NETDEV = "passt"  # what a saved state's network was made with (vs "slirp")


def nameservers(text: str) -> list[str]:
    """The nameserver addresses of a resolv.conf, in order (scoped or malformed ones left out).  Pure."""
    found = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                found.append(str(ipaddress.ip_address(words[1])))
            except ValueError:
                continue
    return found


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return ip.is_loopback or ip.is_unspecified or bool(mapped and (mapped.is_loopback or mapped.is_unspecified))


@dataclass(frozen=True)
class Dns:
    """What passt is told about DNS, and what the guest gets."""

    args: tuple[str, ...]
    servers: tuple[str, ...]  # the resolvers the guest is given (reached through passt like any host)
    problem: str | None = None  # why the guest has none


def dns(resolv_conf: str, resolved_conf: str | None) -> Dns:
    """DNS for the guest from the host's resolv.conf (and systemd-resolved's upstream list).  Pure.

    passt hands the guest the host's resolvers, which it reaches through passt like any other
    host; with --no-map-gw it leaves out a resolver on loopback (a guest cannot reach loopback).
    When every host resolver is on loopback (systemd-resolved's 127.0.0.53 stub), the servers
    behind the stub are given instead; when none is known the guest has no DNS, and says why.
    """
    host = nameservers(resolv_conf)
    usable = [s for s in host if not _loopback(s)]
    if usable:
        return Dns((), tuple(usable))
    upstream = [s for s in nameservers(resolved_conf or "") if not _loopback(s)]
    v4 = [s for s in upstream if ipaddress.ip_address(s).version == 4][:MAX_DNS]
    v6 = [s for s in upstream if ipaddress.ip_address(s).version == 6][:MAX_DNS]
    if v4 or v6:
        return Dns(tuple(arg for s in (*v4, *v6) for arg in ("-D", s)), (*v4, *v6))
    why = (f"the host's only resolver{'s are' if len(host) > 1 else ' is'} on loopback ({', '.join(host)}), which "
           "a guest cannot reach" if host else "the host has no resolver in /etc/resolv.conf")
    return Dns(("-D", "none"), (), f"the guest has no DNS: {why}")


def host_dns() -> Dns:
    def read(path: Path) -> str | None:
        try:
            return path.read_text(errors="replace")
        except OSError:
            return None

    return dns(read(RESOLV_CONF) or "", read(RESOLVED_CONF))


@dataclass(frozen=True)
class Publish:
    """One ``kp-boot --publish [HOSTADDR:]HOSTPORT:GUESTPORT``: a host port forwarded to the guest."""

    host: str
    port: int
    guest_port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}:{self.guest_port}"


def parse_publish(text: str) -> Publish:
    """``[HOSTADDR:]HOSTPORT:GUESTPORT``, the host address 127.0.0.1 unless given (IPv4).  Pure."""
    parts = text.strip().split(":")
    if len(parts) == 2:
        parts.insert(0, "127.0.0.1")
    usage = f"--publish {text!r}: use [HOSTADDR:]HOSTPORT:GUESTPORT, e.g. 8080:80 or 127.0.0.1:8080:80"
    if len(parts) != 3:
        raise BadInput(usage)
    try:
        host = ipaddress.IPv4Address(parts[0])
        port, guest_port = int(parts[1]), int(parts[2])
    except ValueError:
        raise BadInput(usage + " (the host address is an IPv4 address)") from None
    if not (0 < port < 65536 and 0 < guest_port < 65536):
        raise BadInput(f"--publish {text!r}: a port must be between 1 and 65535")
    if guest_port == 22:
        raise BadInput(f"--publish {text!r}: the guest's SSH port is forwarded already (kp-ip gives its endpoint)")
    return Publish(str(host), port, guest_port)


def port_taken(publish: Publish) -> str | None:
    """Why ``publish``'s host port cannot be bound now, or None (passt binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((publish.host, publish.port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


@dataclass(frozen=True)
class Gate:
    """The VM's egress proxy to start beside passt (kp-boot --allow): its policy file lies in ``folder``."""

    folder: Path
    user: str = ""  # UID:GID it drops to when started as root


def argv(*, fd: int, ssh_port: int | None, log: Path, dns_args: tuple[str, ...] = (),
         runas: str | None = None, publish: tuple[Publish, ...] = ()) -> list[str]:
    """passt's command line.  Pure: starts nothing.

    ``fd`` is passt's end of the socketpair (its one client: passt exits when it closes); ``log``
    is passt's own log (it caps it at 1 MiB) and names the VM in the command line, which is how
    kodepipe tells this passt from another process that got its pid."""
    args = [PASST, "--foreground", "--quiet", "--fd", str(fd), "--log-file", str(log),
            # no address of the guest's network means the host: 10.0.2.2 is a gateway that leads out
            "--no-map-gw",
            "--address", GUEST, "--netmask", str(PREFIX), "--gateway", GATEWAY,
            # nothing of the host is forwarded to the guest but SSH, on loopback; no UDP at all
            "--tcp-ports", f"127.0.0.1/{ssh_port}:22" if ssh_port else "none", "--udp-ports", "none",
            *dns_args]
    for each in publish:  # kp-boot --publish: more forwards, each on the host address it names
        args += ["--tcp-ports", f"{each.host}/{each.port}:{each.guest_port}"]
    if runas:
        args += ["--runas", runas]
    return args


def guard_argv(guest_fd: int, passt_fd: int, label: str, seal: str | None = None) -> list[str]:
    # -S: no site-packages, a bare interpreter (the guard needs the standard library only)
    return [sys.executable, "-S", "-m", "kodepipe.vm.netguard", str(guest_fd), str(passt_fd), label,
            *((seal,) if seal else ())]


def gate_argv(folder: Path, tcp_fd: int, udp_fd: int, life_fd: int, user: str) -> list[str]:
    return [sys.executable, "-m", "kodepipe.egress.gate", str(folder), str(tcp_fd), str(udp_fd), str(life_fd),
            *((f"--user={user}",) if user else ())]


@dataclass(frozen=True)
class Started:
    """A running passt and its guard; ``qemu_fd`` is QEMU's end of the network, for it to inherit."""

    qemu_fd: int
    pid: int
    guard_pid: int
    log: str
    dns: Dns
    gate_pid: int | None = None  # the VM's egress proxy (kp-boot --allow)

    def record(self) -> dict[str, Any]:
        found: dict[str, Any] = {"pid": self.pid, "guard_pid": self.guard_pid, "log": self.log}
        if self.gate_pid is not None:
            found["gate_pid"] = self.gate_pid
        return found


def require() -> str:
    from kodepipe.core import proc

    path = proc.which(PASST)
    if path is None:
        raise MissingProgram("passt is not installed: kp-boot's --net user needs it to keep the guest away from the "
                             "host's loopback services",
                             hint="install it with: apt-get install passt (or boot with --host-loopback, which "
                                  "lets the guest reach every service on the host's 127.0.0.1)")
    return path


@contextlib.contextmanager
def serving(log: Path, ssh_port: int | None, *, output: Path, runas: str | None = None,
            timeout: float = 10.0, publish: tuple[Publish, ...] = (), gate: Gate | None = None) -> Iterator[Started]:
    """Start passt and its guard for one QEMU.  The block starts QEMU with ``qemu_fd``; when it ends,
    kodepipe's copy of that fd is closed (QEMU holds its own).  If the block fails, passt and the
    guard are ended.  ``output`` gets what passt says before its log is open (start-up errors)."""
    started = start(log, ssh_port, output=output, runas=runas, timeout=timeout, publish=publish, gate=gate)
    try:
        yield started
    except BaseException:
        os.close(started.qemu_fd)
        stop(started.record())
        raise
    os.close(started.qemu_fd)


def _start_gate(gate: Gate) -> tuple[Any, int, str]:
    """The VM's egress proxy on two sockets bound here; returns it, the write end of its life pipe (for
    the guard to hold) and the guard's seal without its inbound ports."""
    import json

    from kodepipe.core import proc

    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    life_r, life_w = os.pipe()
    try:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(256)
        udp.bind(("127.0.0.1", 0))
        root = str(Path(__file__).resolve().parents[2])
        with open(gate.folder / "gate.log", "ab") as out:
            child = proc.daemon(gate_argv(gate.folder, tcp.fileno(), udp.fileno(), life_r, gate.user),
                                stdout=out, stderr=out, pass_fds=(tcp.fileno(), udp.fileno(), life_r), cwd="/",
                                env={**os.environ, "PYTHONPATH": root})
        seal = json.dumps({"proxy": tcp.getsockname()[1], "dns": udp.getsockname()[1]})
    except BaseException:
        os.close(life_w)
        raise
    finally:
        tcp.close()
        udp.close()
        os.close(life_r)
    return child, life_w, seal


def start(log: Path, ssh_port: int | None, *, output: Path, runas: str | None = None,
          timeout: float = 10.0, publish: tuple[Publish, ...] = (), gate: Gate | None = None) -> Started:
    """passt and its guard, joined by socketpairs (and the VM's egress proxy, with ``gate``); returns once
    passt listens for SSH."""
    import json

    from kodepipe.core import proc

    path = require()
    chosen = host_dns()
    qemu_end, guard_guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    guard_passt, passt_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    passt = guard = gate_child = None
    life_w = -1
    try:
        seal = None
        if gate is not None:
            gate_child, life_w, ports = _start_gate(gate)
            inbound = sorted({22, *(p.guest_port for p in publish)})
            seal = json.dumps({"inbound": inbound, **json.loads(ports)}, separators=(",", ":"))
        command = argv(fd=passt_end.fileno(), ssh_port=ssh_port, log=log, dns_args=chosen.args, runas=runas,
                       publish=publish)
        start_at = output.stat().st_size if output.exists() else 0
        with open(output, "ab") as out:
            out.write(f"$ {' '.join(command)}\n".encode())
            out.flush()
            passt = proc.daemon([path, *command[1:]], stdout=out, stderr=out, pass_fds=(passt_end.fileno(),),
                                cwd="/")
        root = str(Path(__file__).resolve().parents[2])
        # the guard holds nothing but its two sockets: started as root, it drops to nobody itself once
        # its interpreter is up (which nobody could not start from a root-only virtualenv), like passt
        # the guard holds the egress proxy's life pipe too: the proxy ends when the guard does
        held = (guard_guest.fileno(), guard_passt.fileno(), *((life_w,) if life_w >= 0 else ()))
        guard = proc.daemon(guard_argv(guard_guest.fileno(), guard_passt.fileno(), str(log.parent), seal),
                            pass_fds=held, cwd="/", env={"PYTHONPATH": root, "PATH": os.defpath})
        for end in (guard_guest, guard_passt, passt_end):
            end.close()
        if life_w >= 0:
            os.close(life_w)
            life_w = -1
        _wait_listening(passt, ssh_port, output, start_at, timeout)
    except BaseException:
        qemu_end.close()
        for end in (guard_guest, guard_passt, passt_end):
            end.close()
        if life_w >= 0:
            os.close(life_w)
        for child in (passt, guard, gate_child):
            if child is not None and child.poll() is None:
                child.kill()
                child.wait()
        raise
    return Started(qemu_end.detach(), passt.pid, guard.pid, str(log), chosen,
                   gate_pid=gate_child.pid if gate_child is not None else None)


def _wait_listening(passt: proc.Process[bytes], port: int | None, output: Path, start_at: int,
                    timeout: float) -> None:
    """Until passt listens on 127.0.0.1:``port`` (it binds its forwards before it serves), or its end."""
    deadline = time.monotonic() + timeout
    while True:
        status = passt.poll()
        if status is not None:
            said = _said(output, start_at)
            raise KpError(f"passt failed to start: {said or f'exit status {status}'}", code="passt_failed",
                          hint=f"its command line and output are in {output}")
        if port is None or _listening(port, passt.pid):
            return
        if time.monotonic() > deadline:
            raise KpError(f"passt did not listen on 127.0.0.1:{port} within {timeout:g} s", code="passt_failed",
                          hint=f"see {output}")
        time.sleep(0.02)


def _said(output: Path, start_at: int) -> str:
    from kodepipe.core import proc

    try:
        with open(output, "rb") as f:
            f.seek(start_at)
            text = f.read(65536).decode("utf-8", "replace").split("\n", 1)[-1]
    except OSError:
        return ""
    # passt prints a line for each message it could not send to syslog: not what went wrong
    lines = [line for line in text.splitlines() if not line.startswith("Failed to send")
             and "Changing to nobody" not in line]
    return proc.tail("\n".join(lines), 3)


def _listening(port: int, pid: int | None = None) -> bool:
    """Whether something listens on 127.0.0.1:``port`` (/proc/net/tcp, state 0A); with ``pid``, whether
    that listener is one of its sockets (not another program's that took the port first)."""
    wanted = f"0100007F:{port:04X}"
    try:
        with open("/proc/net/tcp") as table:
            next(table)
            inodes = {fields[9] for fields in (line.split() for line in table)
                      if len(fields) > 9 and fields[1] == wanted and fields[3] == "0A"}
    except (OSError, StopIteration):
        return False
    if pid is None or not inodes:
        return bool(inodes)
    try:
        held = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    except OSError:
        return False
    return any(f"socket:[{inode}]" in held for inode in inodes)


def alive(pid: object, marker: str) -> bool:
    """True when ``pid`` is a live process whose command line names ``marker`` (a reused pid is not)."""
    if not isinstance(pid, int) or pid <= 0 or not marker:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    return os.fsencode(marker) in cmdline


def running(record: object) -> list[int]:
    """The pids of a boot's passt and guard (its ``passt`` record) that are still alive."""
    if not isinstance(record, dict):
        return []
    log = str(record.get("log") or "")
    folder = str(Path(log).parent)
    return [pid for pid, marker in ((record.get("pid"), log), (record.get("guard_pid"), folder),
                                    (record.get("gate_pid"), folder))
            if alive(pid, marker) and isinstance(pid, int)]


def stop(record: object, grace: float = 2.0) -> None:
    """End a boot's passt and guard if they are still there (they end with QEMU by themselves)."""
    pids = running(record)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while running(record) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in running(record):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
