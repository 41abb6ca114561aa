"""QEMU processes: the command line, the launch, and whether one is alive.

The command line is a pure function of the VM, its image and the boot
options, so it is tested without starting anything.  A launch failure
carries QEMU's own message and the command line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kodepipe.core import paths, proc
from kodepipe.core.errors import BadInput, KpError

if TYPE_CHECKING:
    from kodepipe.vm import qemuuser

QEMU = "qemu-system-x86_64"
NET_RE = re.compile(r"user|none|bridge:[A-Za-z0-9_.-]{1,15}")
MEMORY_RE = re.compile(r"[1-9][0-9]*[MG]")
SERIAL_FDSET = 9  # the -add-fd set of the serial log's pipe (kodepipe.vm.seriallog)
DISK_FDSET = 10  # the disk's fd sets: 10 the VM's own overlay, 11 the file beneath it, ...
MARKER_FDSET = 30  # an fd set whose opaque names the QMP socket, for qemu.alive
DATA_FDSET = 40  # the fd sets of its encrypted data disks (kp-boot --disk): 40, 41, ...
DISK_NODE = "kpdisk"


@dataclass(frozen=True)
class Sockets:
    """Where a running VM's control sockets and pid file live (the runtime dir)."""

    qmp: Path
    qga: Path
    serial: Path
    pidfile: Path

    @classmethod
    def for_vm(cls, name: str) -> Sockets:
        return cls(qmp=paths.socket_path(name, "qmp"), qga=paths.socket_path(name, "qga"),
                   serial=paths.socket_path(name, "serial"), pidfile=paths.runtime_dir() / f"{name}.pid")

    def paths(self) -> list[Path]:
        return [self.qmp, self.qga, self.serial, self.pidfile]


@dataclass(frozen=True)
class BootOptions:
    memory: str = "1G"
    cpus: int = 2
    accel: str = "auto"
    net: str = "user"
    share: Path | None = None
    share_tag: str = "workspace"
    writable_git: bool = False  # loosened (kp-boot --writable-git): the share's git metadata writable by the guest
    host_loopback: bool = False  # loosened (kp-boot --host-loopback): --net user by QEMU's slirp, not passt
    allow: tuple[str, ...] = ()  # kp-boot --allow: the guest is sealed, its way out the VM's egress proxy
    resolve: tuple[str, ...] = ()  # kp-boot --resolve NAME=ADDRESS for that proxy
    publish: tuple[str, ...] = ()  # kp-boot --publish [HOSTADDR:]HOSTPORT:GUESTPORT
    disks: tuple[tuple[str, str], ...] = ()  # kp-boot --disk: (disk name, mount point in the guest)
    preset: str | None = None  # kp-boot --preset: recorded, with what the flags widened
    widened: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()  # installed by kp-ip when missing (a preset's)

    def check(self) -> None:
        if not MEMORY_RE.fullmatch(self.memory):
            raise BadInput(f"invalid memory size {self.memory!r}: use a number with M or G, e.g. 2G")
        if not 1 <= self.cpus <= 64:
            raise BadInput(f"invalid CPU count {self.cpus}: 1 to 64")
        if self.accel not in ("auto", "kvm", "tcg"):
            raise BadInput(f"invalid accelerator {self.accel!r}: auto, kvm or tcg")
        if not NET_RE.fullmatch(self.net):
            raise BadInput(f"invalid network {self.net!r}: user, none or bridge:NAME")
        if self.share is not None and not self.share.is_dir():
            raise BadInput(f"the shared directory {self.share} is not a directory")
        if (self.allow or self.resolve) and (self.net != "user" or self.host_loopback):
            raise BadInput("--allow seals a guest on --net user (passt): it cannot be combined with "
                           + ("--host-loopback" if self.host_loopback else f"--net {self.net}"))
        if self.resolve and not self.allow:
            raise BadInput("--resolve pins names of the --allow list: give --allow too")
        if self.publish and self.net != "user":
            raise BadInput(f"--publish forwards host ports over --net user: it has no meaning with --net {self.net}")


def mac_address(vm_id: str) -> str:
    """A stable, locally administered MAC for the VM (QEMU's 52:54:00 prefix)."""
    digest = hashlib.sha256(vm_id.encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (QEMU binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True)
class DataDisk:
    """An encrypted data disk (kodepipe.vm.disks) as QEMU gets it: the qcow2 and its key, both open fds."""

    path: str
    fd: int
    key_fd: int  # a sealed memfd holding the key: a secret object reads it, never a command line
    serial: str


def command_line(vm: dict[str, Any], image: dict[str, Any], opts: BootOptions, sockets: Sockets, *,
                 accel: str, ssh_port: int | None, serial_fd: int, incoming: str | None = None,
                 tap: str | None = None, net_fd: int | None = None, fds: qemuuser.Fds | None = None,
                 data_disks: tuple[DataDisk, ...] = (), ram: tuple[int, bool] | None = None) -> list[str]:
    """The whole QEMU command line for ``vm``.  Pure: starts nothing.

    ``ram``: the guest's RAM as an inherited memfd and whether QEMU writes it (kp-image warm's machine)
    or maps it privately (a warm clone sharing it: kodepipe.vm.warmram).

    ``fds``: what kp-boot opened for a QEMU that runs as another user (kodepipe.vm.qemuuser): its
    sockets, disk chain, kernel, initrd, share and tap as inherited fds, so it resolves no path in
    kodepipe's directories.  Without it, QEMU opens them itself (a QEMU run as its caller).

    ``serial_fd`` is the inherited fd QEMU logs the serial console to: a pipe to the keeper that
    bounds serial.log (kodepipe.vm.seriallog), never a file QEMU would grow without limit.

    ``--net user`` is passt behind kodepipe's loopback guard (kodepipe.vm.passt): ``net_fd`` is QEMU's
    inherited end of the socketpair to it.  With ``opts.host_loopback`` it is QEMU's own slirp,
    which lets the guest reach the host's loopback services (10.0.2.2), with SSH as a hostfwd."""
    name = vm["name"]
    if fds is None:
        kernel, initrd = image["kernel"], image["initrd"]
        qmp, qga, serial = (f"path={_comma(p)}" for p in (sockets.qmp, sockets.qga, sockets.serial))
        pidfile = ["-pidfile", str(sockets.pidfile)]
        disk = ["-drive", f"file={_comma(vm['disk'])},if=virtio,format=qcow2,discard=unmap,detect-zeroes=unmap"]
        disk_device: list[str] = []
    else:
        kernel, initrd = f"/proc/self/fd/{fds.kernel}", f"/proc/self/fd/{fds.initrd}"
        qmp, qga, serial = (f"fd={fd}" for fd in (fds.qmp, fds.qga, fds.serial))
        # the helper writes the pid file; the QMP socket's path stays on the command line (qemu.alive's marker)
        pidfile = ["-add-fd", f"fd={fds.marker},set={MARKER_FDSET},opaque=qmp:{_comma(sockets.qmp)}"]
        disk = _blockdevs(fds.disk)
        # last, where -drive if=virtio put it: the PCI slots stay those a saved machine was saved with
        disk_device = ["-device", f"virtio-blk-pci,drive={DISK_NODE}"]
    argv = [
        QEMU, "-name", f"{name},process=kp-{name}",
        "-accel", accel, "-cpu", "host" if accel == "kvm" else "max",
        "-m", opts.memory, "-smp", str(opts.cpus),
        *(_ram_args(ram, opts.memory) if ram is not None else ()),
        # nothing but what is listed here: no default NIC, no VGA, no monitor on stdio
        "-nodefaults", "-no-user-config", "-display", "none",
        *pidfile,
        # QEMU's own seccomp filter: no new processes (so no -daemonize: kp-boot
        # detaches it instead, and migrations go through fds), no privilege changes
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-kernel", kernel, "-initrd", initrd,
        # the clone's own hostname from its first instruction (systemd reads it from the command line)
        "-append", f"{image.get('cmdline') or 'root=/dev/vda rw console=ttyS0'} systemd.hostname={name}",
        *disk,
        "-device", "virtio-rng-pci",
        "-chardev", f"socket,id=qmp0,{qmp},server=on,wait=off",
        "-mon", "chardev=qmp0,mode=control",
        "-chardev", f"socket,id=qga0,{qga},server=on,wait=off",
        "-device", "virtio-serial-pci",
        "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        "-add-fd", f"fd={serial_fd},set={SERIAL_FDSET}",
        "-chardev", f"socket,id=ser0,{serial},server=on,wait=off,"
                    f"logfile=/dev/fdset/{SERIAL_FDSET},logappend=on",
        "-serial", "chardev:ser0",
    ]
    mac = mac_address(vm.get("id") or name)
    if opts.net == "user" and opts.host_loopback:
        from kodepipe.vm.passt import parse_publish

        forward = f",hostfwd=tcp:127.0.0.1:{ssh_port}-:22" if ssh_port else ""
        for each in map(parse_publish, opts.publish):
            forward += f",hostfwd=tcp:{each.host}:{each.port}-:{each.guest_port}"
        argv += ["-netdev", f"user,id=n0,hostname={name}{forward}",
                 "-device", f"virtio-net-pci,netdev=n0,mac={mac}"]
    elif opts.net == "user":
        if net_fd is None:
            raise KpError("user networking without host loopback needs passt's socket")
        argv += ["-netdev", f"stream,id=n0,server=off,addr.type=fd,addr.str={net_fd}",
                 "-device", f"virtio-net-pci,netdev=n0,mac={mac}"]
    elif opts.net.startswith("bridge:"):
        if fds is not None and fds.tap is not None:
            tap_netdev = f"tap,id=n0,fd={fds.tap}"  # opened by kp-boot: QEMU's uid cannot open /dev/net/tun
        elif tap:
            tap_netdev = f"tap,id=n0,ifname={tap},script=no,downscript=no"
        else:
            raise KpError("bridged networking needs a tap device")
        argv += ["-netdev", tap_netdev,
                 "-device", f"virtio-net-pci,netdev=n0,mac={mac}"]
    if opts.share is not None:
        # handed in: the share's own mount tree (idmapped, git metadata read-only), whatever its path's modes
        share = f"/proc/self/fd/{fds.share}" if fds is not None and fds.share is not None else _comma(opts.share)
        argv += ["-virtfs", f"local,path={share},mount_tag={opts.share_tag},"
                            "security_model=mapped-xattr,id=share0"]
    if incoming is not None:
        argv += ["-incoming", incoming]
    return argv + disk_device + _data_disks(data_disks)


def _ram_args(ram: tuple[int, bool], memory: str) -> list[str]:
    from kodepipe.vm import warmram

    return warmram.qemu_args(ram[0], memory, share=ram[1])


def _data_disks(data_disks: tuple[DataDisk, ...]) -> list[str]:
    """Each encrypted data disk after the VM's own: its key a secret object read from an inherited memfd,
    its qcow2 an fd set, LUKS opened by QEMU's qcow2 driver, and a virtio serial the guest finds it by."""
    argv: list[str] = []
    for index, disk in enumerate(data_disks):
        node, fdset = f"kpdata{index}", DATA_FDSET + index
        argv += ["-object", f"secret,id={node}-key,file=/proc/self/fd/{disk.key_fd}",
                 "-add-fd", f"fd={disk.fd},set={fdset},opaque={_comma(disk.path)}",
                 "-blockdev", f"driver=file,node-name={node}-file,filename=/dev/fdset/{fdset},discard=unmap",
                 "-blockdev", f"driver=qcow2,node-name={node},file={node}-file,encrypt.format=luks,"
                              f"encrypt.key-secret={node}-key,"
                              "discard=unmap,detect-zeroes=unmap",
                 "-device", f"virtio-blk-pci,drive={node},serial={disk.serial}"]
    return argv


def _blockdevs(layers: tuple[qemuuser.Layer, ...]) -> list[str]:
    """The disk as -blockdev nodes on fd sets, each backing layer named explicitly (QEMU resolves no
    backing path); each fd set's opaque is the file's path, which query-fdsets gives back."""
    argv: list[str] = []
    below = None
    for depth in range(len(layers) - 1, -1, -1):
        layer, fdset = layers[depth], DISK_FDSET + depth
        for fd in layer.fds:
            argv += ["-add-fd", f"fd={fd},set={fdset},opaque={_comma(layer.path)}"]
        node = DISK_NODE if depth == 0 else f"kplayer{depth}"
        top = depth == 0
        mode = "discard=unmap" if top else "read-only=on"
        argv += ["-blockdev", f"driver=file,node-name={node}-file,filename=/dev/fdset/{fdset},{mode}"]
        backing = f",backing={below}" if below else ""
        extra = ",discard=unmap,detect-zeroes=unmap" if top else ",read-only=on"
        argv += ["-blockdev", f"driver=qcow2,node-name={node},file={node}-file{backing}{extra}"]
        below = node
    return argv


def _comma(value: object) -> str:
    # QEMU option values escape a comma by doubling it
    return str(value).replace(",", ",,")


def launch(argv: list[str], log: Path, qmp_socket: Path, *, timeout: float = 60.0,
           pass_fds: tuple[int, ...] = (), plan: qemuuser.Plan | None = None) -> int:
    """Start QEMU detached from kodepipe and return its pid once its monitor answers.

    QEMU runs in a session of its own with its output in ``log``, so it
    outlives the command that started it.  If it exits during start-up
    (a bad option, a busy port, a missing file), the error carries QEMU's
    own words.  With ``plan`` (kp-boot's QEMUs) it is started through
    kodepipe.vm.qemuuser's helper, which gives it its share (idmapped, git
    metadata read-only, in a mount namespace of its own), writes its pid
    file and drops to ``plan.user`` before the exec: never root.
    """
    from kodepipe.vm import qemuuser
    from kodepipe.vm.qmp import Monitor

    argv = [proc.require(argv[0]), *argv[1:]]
    start = log.stat().st_size if log.exists() else 0
    with open(log, "ab") as out:
        who = f" (as {plan.user.name}, uid {plan.user.uid})" if plan is not None else ""
        out.write(f"$ {shlex.join(argv)}{who}\n".encode())
        out.flush()
        child = proc.daemon(qemuuser.helper_argv(plan, argv) if plan is not None else argv, stdout=out,
                            stderr=proc.STDOUT, pass_fds=pass_fds, cwd="/" if plan is not None else None,
                            env=qemuuser.helper_env() if plan is not None else None)
    deadline = time.monotonic() + timeout
    while True:
        status = child.poll()
        if status is not None:
            with open(log, "rb") as f:
                f.seek(start)
                output = f.read().decode("utf-8", "replace").split("\n", 1)[-1]
            message = proc.tail(output) or f"exit status {status}"
            raise KpError(f"QEMU failed to start: {message}", code="qemu_failed",
                          hint=f"its command line and output are in {log}")
        if qmp_socket.exists():
            try:
                with Monitor(qmp_socket, timeout=2.0) as monitor:
                    monitor.status()
                return child.pid
            except KpError:
                pass
        if time.monotonic() > deadline:
            child.kill()
            raise KpError(f"QEMU did not come up within {timeout:g} s", code="qemu_failed",
                          hint=f"see {log}")
        time.sleep(0.05)


def alive(pid: object, marker: Path) -> bool:
    """True when ``pid`` is a live QEMU whose command line names ``marker``.

    Checking the command line (not only the pid) keeps a reused pid from
    passing for our VM.
    """
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # a zombie (state Z) has exited already
    if status.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    return os.fsencode(str(marker)) in cmdline


def pid_of(boot: dict[str, Any]) -> int | None:
    """The QEMU pid of a boot: recorded, or from its pid file if kp-boot died before recording it."""
    pid = boot.get("pid")
    if isinstance(pid, int):
        return pid
    try:
        return int(Path(boot["sockets"]["pidfile"]).read_text().strip())
    except (KeyError, TypeError, OSError, ValueError):
        return None


def is_alive(boot: dict[str, Any]) -> bool:
    return alive(pid_of(boot), Path(str((boot.get("sockets") or {}).get("qmp", ""))))


def cleanup(boot_meta: dict[str, Any]) -> None:
    """Remove a finished boot's sockets, pid file and tap device, and end its passt if it is still there."""
    if boot_meta.get("passt"):
        from kodepipe.vm import passt

        passt.stop(boot_meta["passt"])
    for path in (boot_meta.get("sockets") or {}).values():
        Path(path).unlink(missing_ok=True)
    if boot_meta.get("tap"):
        from kodepipe.vm import tap

        tap.remove(boot_meta["tap"])


def kill(boot_meta: dict[str, Any], grace: float = 5.0) -> None:
    """End QEMU now: SIGTERM (it quits cleanly), then SIGKILL."""
    pid = pid_of(boot_meta)
    if pid is None or not is_alive(boot_meta):
        return
    os.kill(pid, signal.SIGTERM)
    if not wait_gone(boot_meta, grace):
        os.kill(pid, signal.SIGKILL)
        wait_gone(boot_meta, 5.0)


def wait_gone(boot_meta: dict[str, Any], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while is_alive(boot_meta):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


# -- what a live QEMU is doing ------------------------------------------------
#
# QMP's query-status gives QEMU's run state.  kodepipe shows three of them
# as they are (running; suspended: paused by kp-stop --suspend, or by the
# guest itself) and every other one as "frozen": the VM is alive but runs no
# guest code, for a reason the record says ("qemu_status", "problem") with
# what to do about it ("hint").  What each reason means, and which kp-stop
# --resume can undo, was found on QEMU itself (tests/integration/test_frozen.py).

# a migration (kp-stop --save) still going: QEMU writes the state out and keeps the VM stopped
MIGRATING = frozenset({"setup", "active", "pre-switchover", "device", "cancelling", "wait-unplug",
                       "postcopy-active", "postcopy-paused", "postcopy-recover", "colo"})
# run states `cont` cannot leave: only a restart helps
NEEDS_RESTART = frozenset({"internal-error", "shutdown", "guest-panicked"})
# less than this free on the filesystem holding a disk, and a resumed VM stops again at once
# (a qcow2 write allocates a 64 KiB cluster, and may need new L2 and refcount tables too)
MIN_FREE = 1 << 20


@dataclass(frozen=True)
class DiskError:
    """A disk QEMU stopped the VM for (QMP query-block's io-status)."""

    io_status: str  # "nospace" (ENOSPC: the filesystem holding the file is full) or "failed" (EIO, ...)
    file: str
    free: int | None = None  # bytes the filesystem holding ``file`` has free now, when known


@dataclass(frozen=True)
class Facts:
    """What a VM's monitor says: its run state and, for a stopped one, why."""

    status: str
    migration: str | None = None  # query-migrate's status, when the VM is stopped and there was one
    migration_error: str | None = None
    disk_errors: tuple[DiskError, ...] = ()


@dataclass(frozen=True)
class Live:
    """A vm record's live state, with why and what to do when it is not simply running."""

    state: str  # running, suspended, frozen, crashed or stopped
    qemu_status: str | None = None
    problem: str | None = None
    hint: str | None = None

    def fields(self) -> dict[str, str]:
        return {k: v for k, v in (("state", self.state), ("qemu_status", self.qemu_status),
                                  ("problem", self.problem), ("hint", self.hint)) if v is not None}


def classify(name: str, facts: Facts, *, paused_by_kodepipe: bool, starting: bool = False) -> Live:
    """The live state of a VM whose QEMU is alive, from what its monitor said.  Pure.

    ``paused_by_kodepipe``: kp-stop --suspend froze it (the record says so).
    ``starting``: another kodepipe command holds the VM's lock (kp-boot loading a saved state).
    """
    status = facts.status
    resume = f"kp-stop --resume {name}"
    restart = f"kp-stop --kill {name}, then kp-boot {name} (its disk is kept)"

    def frozen(problem: str, hint: str) -> Live:
        return Live("frozen", status, problem, hint)

    if status == "running" or (status == "inmigrate" and starting):
        return Live("running")
    if status == "suspended":
        return Live("suspended", problem="the guest suspended itself (ACPI sleep)", hint=f"{resume} wakes it")
    if status in ("paused", "finish-migrate", "postmigrate") and facts.migration in MIGRATING:
        return frozen("a save of its state (kp-stop --save) is still being written, but the command that started "
                      "it is gone", f"{resume} cancels the save and runs it again")
    if status == "paused":
        if paused_by_kodepipe:
            return Live("suspended")
        if facts.migration in ("failed", "cancelled"):
            why = f": {facts.migration_error}" if facts.migration_error else ""
            return frozen(f"a save of its state {facts.migration}{why}, and left it paused",
                          f"{resume} runs it again")
        return frozen("it was paused outside kodepipe (QMP stop)", f"{resume} runs it again")
    if status in ("postmigrate", "finish-migrate"):
        return frozen("a save of its state was interrupted (kp-stop --save did not end QEMU): QEMU keeps the VM "
                      "stopped after a save", f"{resume} runs it again (then kp-stop --save {name} to save it)")
    if status == "io-error":
        return _disk_error(facts.disk_errors, resume)
    if status == "inmigrate":
        return frozen("QEMU still waits for the saved state it was to resume from (kp-boot was interrupted)",
                      f"kp-stop --kill {name}, then kp-boot {name} resumes it again")
    if status == "prelaunch":
        return frozen("QEMU was started but never told to run the guest", f"{resume} runs it")
    if status in ("save-vm", "restore-vm"):
        return frozen("QEMU is saving or loading a snapshot (savevm/loadvm, outside kodepipe)",
                      "wait for it to finish, then kp-ls again")
    if status == "internal-error":
        return frozen("QEMU stopped it on an internal error (it could not emulate the guest any further)", restart)
    if status == "guest-panicked":
        return frozen("the guest's kernel panicked", restart)
    if status == "shutdown":
        return frozen("the guest shut down, but QEMU did not exit", restart)
    if status == "watchdog":
        return frozen("the guest's watchdog fired and QEMU paused it", f"{resume} runs it again")
    if status == "debug":
        return frozen("a debugger (QEMU's gdb stub) stopped it", f"{resume} runs it again")
    return frozen(f"QEMU reports it as {status!r}, not running", f"{resume}, or {restart}")


def _disk_error(errors: tuple[DiskError, ...], resume: str) -> Live:
    full = [e for e in errors if e.io_status == "nospace"]
    if full:
        where = os.path.dirname(full[0].file) or full[0].file
        free = f" ({human_bytes(full[0].free)} free now)" if full[0].free is not None else ""
        return Live("frozen", "io-error", f"QEMU stopped it on a write error: no space left on the filesystem "
                                          f"holding its disk {full[0].file}{free}",
                    f"free space on the filesystem holding {where}, then {resume}")
    if errors:
        return Live("frozen", "io-error", f"QEMU stopped it on an I/O error on its disk {errors[0].file}",
                    f"check the disk holding {errors[0].file} (dmesg), free space on it if it is full, then {resume}")
    return Live("frozen", "io-error", "QEMU stopped it on an I/O error on its disk (a full disk?)",
                f"free space on the filesystem holding its disk, then {resume}")


def disk_errors(blocks: list[dict[str, Any]], fdsets: list[dict[str, Any]] | None = None) -> list[DiskError]:
    """The devices of QMP query-block that failed (io-status not "ok"), with their image files.  Pure.

    A disk handed in as an fd set (/dev/fdset/N) is named by the path its fd set's opaque holds
    (QMP query-fdsets), the path kp-boot opened."""
    named = {}
    for fdset in fdsets or ():
        opaque = next((fd.get("opaque") for fd in fdset.get("fds") or () if fd.get("opaque")), None)
        if opaque:
            named[f"/dev/fdset/{fdset.get('fdset-id')}"] = str(opaque)
    found = []
    for block in blocks:
        status = block.get("io-status")
        if status in ("nospace", "failed"):
            inserted = block.get("inserted") or {}
            file = str(inserted.get("file") or block.get("device") or block.get("qdev") or "?")
            if file.startswith("json:"):  # a node with explicit backing: the top file's name is inside
                with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):
                    file = str(json.loads(file[5:])["file"]["filename"])
            found.append(DiskError(str(status), named.get(file, file)))
    return found


def free_bytes(file: str) -> int | None:
    """Bytes QEMU (running as this user) can still write on the filesystem holding ``file``."""
    try:
        st = os.statvfs(os.path.dirname(file) or ".")
    except (OSError, ValueError):
        return None
    # root may use the blocks a filesystem reserves for it; others may not
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def live(boot: dict[str, Any], name: str, *, busy: Callable[[], bool] = lambda: False) -> Live:
    """Checked now: crashed or stopped when QEMU is gone, else what its monitor says.

    When the monitor does not answer at once (it serves one client at a time, and
    kp-stop --save or kp-boot may be using it), kodepipe's own record answers.
    ``busy`` says whether another command holds the VM's lock.
    """
    if not is_alive(boot):
        if boot.get("boot_id") == proc.boot_id():
            return Live("crashed", problem="QEMU exited without kp-stop; see the serial log",
                        hint=f"kp-boot {name} starts it again")
        return Live("stopped")  # the host rebooted since: nothing crashed, nothing runs
    facts = ask(boot)
    if facts is None:
        return Live("suspended" if boot.get("paused") else "running")
    return classify(name, facts, paused_by_kodepipe=bool(boot.get("paused")),
                    starting=facts.status == "inmigrate" and busy())


def ask(boot: dict[str, Any], timeout: float = 0.5) -> Facts | None:
    """What the VM's monitor says now, or None when it does not answer within ``timeout``."""
    from kodepipe.vm.qmp import Monitor

    try:
        with Monitor(Path(boot["sockets"]["qmp"]), timeout=timeout) as monitor:
            return monitor.facts()
    except (KpError, KeyError, TypeError, OSError):
        return None
