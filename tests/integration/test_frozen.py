"""kp-ls tells the truth about a QEMU that is alive but runs no guest code, on real QEMU (TCG):
a kp-stop --save cut off (SIGKILL, SIGTERM), a full disk under the VM's overlay (io-error), a
pause through the monitor.  kp-ls shows "frozen" with QEMU's status, a problem and a hint;
kp-ip, kp-ssh and kp-boot refuse it with that hint instead of waiting; kp-stop --resume runs
it again where QEMU allows it, and the guest really goes on.

The guest is a 512-byte boot sector (no golden image needed) in a kodepipe VM folder, started
with kodepipe's own launcher, sockets and metadata, so every kp-* command sees a kodepipe VM."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from kodepipe.core import paths, proc
from kodepipe.vm import qemu
from kodepipe.vm.qmp import Monitor
from kodepipe.vm.sshkeys import own_key
from tests.conftest import BIN, kp, lines
from tests.fakevm import SSHServer, serve

pytestmark = pytest.mark.integration

# The guest, in 16-bit real mode at 0x7c00 (GNU as, .code16), talking on COM1 (0x3f8):
#   xor ax,ax; mov ds/es/ss,ax; mov sp,0x7c00; sti
#   mov al,'R'; call putc                         ; ready
#   wait: in al,[0x3fd]; test al,1; jz wait       ; a byte from the host
#         in al,[0x3f8]; cmp al,'w'; je write
#         call putc; jmp wait                     ; anything else is echoed
#   write: mov cx,64                              ; 64 one-sector writes 64 KiB apart (BIOS int 13h,
#   again: push cx; mov si,dap; mov ah,0x43         AH=43h, LBA in the packet): each allocates a new
#          xor al,al; mov dl,0x80; int 0x13         qcow2 cluster in the overlay, 4 MiB in all
#          pop cx; jc fail
#          add dword [dap+8],128; loop again
#          mov al,'W'; call putc; jmp wait        ; all written
#   fail:  mov al,'E'; call putc; jmp wait
#   putc:  mov dx,0x3f8; out dx,al; ret
#   dap:   db 16,0; dw 1; dw 0x7c00,0; dq 128
GUEST = bytes.fromhex(
    "31c08ed88ec08ed0bc007cfbb052e84000bafd03eca80174f8baf803ec3c777405e82d00ebebb9400051be567cb443"
    "30c0b280cd135972126681065e7c80000000e2e6b057e80900ebc7b045e80200ebc0baf803eec31000010000"
    "7c00008000000000000000")
BOOT_SECTOR = GUEST.ljust(510, b"\0") + b"\x55\xaa"
WAIT = 120.0  # generous bound on a real condition (a loaded 2-core machine), never a fixed sleep


def wait_for(predicate: Any, what: str, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass
class TinyVM:
    name: str
    folder: Path
    meta: dict[str, Any]

    @property
    def boot(self) -> dict[str, Any]:
        boot: dict[str, Any] = self.meta["boot"]
        return boot

    @property
    def serial_log(self) -> Path:
        return Path(self.boot["serial_log"])

    def write_meta(self) -> None:
        (self.folder / "meta.json").write_bytes(orjson.dumps(self.meta))

    def qmp(self, command: str) -> Any:
        with Monitor(Path(self.boot["sockets"]["qmp"])) as monitor:
            return monitor.execute(command)

    def status(self) -> str:
        return str(self.qmp("query-status")["status"])

    def type(self, data: bytes) -> None:
        """Send bytes to the guest's serial port (QEMU's serial socket serves one client at a time)."""
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(self.boot["sockets"]["serial"])
            conn.sendall(data)

    def printed(self) -> bytes:
        return self.serial_log.read_bytes() if self.serial_log.exists() else b""

    def record(self) -> dict[str, Any]:
        listed = kp("kp-ls", self.name)
        assert listed.returncode == 0, listed.stderr.decode()
        (record,) = lines(listed.stdout)
        return record


def start(name: str, base: Path) -> TinyVM:
    """A kodepipe VM folder (meta.json, a qcow2 overlay on ``base``) whose QEMU runs the boot sector,
    started the way kp-boot starts one: detached, with its QMP, guest-agent and serial sockets and logs."""
    folder = Path(os.environ["KODEPIPE_STATE_DIR"]) / "vms" / name
    folder.mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw",
                    str(folder / "disk.qcow2")], check=True)
    paths.runtime_dir().mkdir(parents=True, exist_ok=True)
    sockets = qemu.Sockets.for_vm(name)
    serial_log = folder / "serial.log"
    boot: dict[str, Any] = {
        "pid": None, "boot_id": proc.boot_id(), "started": "2026-01-01T00:00:00Z", "accel": "tcg",
        "accel_reason": "requested", "memory": "16M", "cpus": 1, "net": "none", "share": None,
        "sockets": {"qmp": str(sockets.qmp), "qga": str(sockets.qga), "serial": str(sockets.serial),
                    "pidfile": str(sockets.pidfile)},
        "serial_log": str(serial_log), "qemu_log": str(folder / "qemu.log"), "resumed": False, "ssh": None}
    meta = {"kind": "vm", "name": name, "id": f"{name:0<12}"[:12], "created": "2026-01-01T00:00:00Z",
            "state": "ready", "base": "base", "base_id": "0123456789ab", "disk": "disk.qcow2", "boot": boot}
    vm = TinyVM(name, folder, meta)
    vm.write_meta()
    argv = [qemu.QEMU, "-name", f"{name},process=kp-{name}", "-accel", "tcg", "-m", "16", "-nodefaults",
            "-no-user-config", "-display", "none", "-pidfile", str(sockets.pidfile),
            "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-drive", f"file={folder / 'disk.qcow2'},format=qcow2,if=ide", "-boot", "order=c,strict=on",
            "-chardev", f"socket,id=qmp0,path={sockets.qmp},server=on,wait=off", "-mon", "chardev=qmp0,mode=control",
            "-chardev", f"socket,id=qga0,path={sockets.qga},server=on,wait=off",
            "-device", "virtio-serial-pci", "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            "-chardev", f"socket,id=ser0,path={sockets.serial},server=on,wait=off,logfile={serial_log},logappend=on",
            "-serial", "chardev:ser0"]
    boot["pid"] = qemu.launch(argv, folder / "qemu.log", sockets.qmp)
    vm.write_meta()
    wait_for(lambda: b"R" in vm.printed(), "the guest to start")
    return vm


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """The 64 MiB raw disk the overlays sit on, outside the state directory, its first sector the guest."""
    path = tmp_path / "sector.raw"
    with open(path, "wb") as f:
        f.write(BOOT_SECTOR)
        f.truncate(64 << 20)
    return path


@pytest.fixture
def vms() -> Iterator[list[TinyVM]]:
    made: list[TinyVM] = []
    yield made
    for vm in made:
        qemu.kill(vm.boot)
        kp("kp-rm", vm.name)


def assert_refused_as_frozen(name: str, hint: str) -> None:
    """kp-ip (with all the time in the world), kp-ssh, kp-boot (which must not start a second QEMU on the
    disk) and kp-stop --save (QEMU refuses a save after a save) say it is frozen, with the hint, at once."""
    for prog, args in (("kp-ip", ["--timeout", "3600"]), ("kp-ssh", ["--", "true"]), ("kp-boot", []),
                       ("kp-stop", ["--save"])):
        done = kp(prog, name, *args, timeout=WAIT)
        assert done.returncode == 1, (prog, done.returncode, done.stderr.decode())
        (record,) = lines(done.stdout)
        assert record["error"]["code"] == "frozen", (prog, record)
        assert f"{name} is frozen: " in record["error"]["message"] and hint in record["error"]["message"]
        assert "still booting" not in done.stderr.decode() and "Traceback" not in done.stderr.decode()


def qemu_count(vm: TinyVM) -> int:
    """Live QEMU processes of this VM: their command line names its QMP socket (unique to this test)."""
    marker = os.fsencode(vm.boot["sockets"]["qmp"])
    found = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if marker in cmdline and stat[stat.rindex(")") + 2] != "Z" and b"qemu-system" in cmdline:
            found += 1
    return found


def assert_runs_again(vm: TinyVM) -> None:
    """The guest runs guest code: it echoes what the host types."""
    since = len(vm.printed())
    vm.type(b"x")
    wait_for(lambda: b"x" in vm.printed()[since:], "the guest to echo a byte")
    record = vm.record()
    assert record["state"] == "running" and "problem" not in record and "qemu_status" not in record


# -- a kp-stop --save cut off -------------------------------------------------------------


def cut_off_save(vm: TinyVM, how: str) -> subprocess.Popen[bytes]:
    """Run kp-stop --save with its state file a FIFO this test reads (so the save can be held in
    the middle), wait until QEMU is writing the state, then kill kp-stop with signal ``how``."""
    partial = vm.folder / "ram.state.partial"
    os.mkfifo(partial)
    reader = os.open(partial, os.O_RDONLY | os.O_NONBLOCK)
    stop = subprocess.Popen([str(BIN / "kp-stop"), "--save", vm.name], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        ready, _, _ = select.select([reader], [], [], WAIT)
        assert ready, "QEMU never started writing the state"
        stop.send_signal(signal.SIGKILL if how == "SIGKILL" else signal.SIGTERM)
        if how == "SIGKILL":
            stop.wait(WAIT)
    except BaseException:
        stop.kill()
        os.close(reader)
        raise
    stop.reader = reader  # type: ignore[attr-defined]
    return stop


@pytest.mark.parametrize("ending, qemu_status, words", [
    # QEMU writes the whole state and keeps the VM stopped after the save (what a real, fast file gives)
    ("written", "postmigrate", "a save of its state was interrupted"),
    # the state file went away mid-save (a full disk, a pipe closed): the save failed, the VM stays paused
    ("failed", "paused", "a save of its state failed: Unable to write to file"),
])
def test_a_save_cut_off_by_sigkill_leaves_a_frozen_vm_that_resume_runs_again(
        base: Path, vms: list[TinyVM], ending: str, qemu_status: str, words: str) -> None:
    vm = start("frz-save", base)
    vms.append(vm)
    assert vm.record()["state"] == "running"
    stop = cut_off_save(vm, "SIGKILL")
    reader: int = stop.reader  # type: ignore[attr-defined]
    if ending == "written":
        os.set_blocking(reader, True)
        while os.read(reader, 1 << 16):  # until QEMU has written it all and closed the file
            pass
    os.close(reader)
    wait_for(lambda: vm.status() == qemu_status, f"QEMU to reach {qemu_status}")

    record = vm.record()
    hint = "kp-stop --resume frz-save"
    assert record["state"] == "frozen" and record["qemu_status"] == qemu_status, record
    assert words in record["problem"] and hint in record["hint"]
    assert [r["name"] for r in lines(kp("kp-ls", "--state", "frozen").stdout)] == ["frz-save"]
    assert lines(kp("kp-ls", "--state", "running").stdout) == []
    table = kp("kp-ls", "--table").stdout.decode()
    assert "frozen" in table and hint in table

    assert_refused_as_frozen("frz-save", hint)
    assert qemu_count(vm) == 1  # kp-boot started no second QEMU on the same disk

    # the cron way: the frozen records themselves go to kp-stop --resume
    resumed = kp("kp-stop", "--resume", input=kp("kp-ls", "--state", "frozen").stdout)
    assert resumed.returncode == 0, resumed.stderr.decode()
    (after,) = lines(resumed.stdout)
    assert after["state"] == "running" and not {"problem", "hint", "qemu_status"} & set(after)  # none left over
    assert not (vm.folder / "ram.state.partial").exists()  # what the cut-off save left is cleared away
    assert_runs_again(vm)


def test_a_save_cut_off_by_sigterm_is_rolled_back(base: Path, vms: list[TinyVM]) -> None:
    vm = start("frz-term", base)
    vms.append(vm)
    stop = cut_off_save(vm, "SIGTERM")
    os.close(stop.reader)  # type: ignore[attr-defined]  # the save cannot finish: kp-stop must undo it
    _, err = stop.communicate(timeout=WAIT)
    assert stop.returncode == 143, err.decode()
    assert "terminated" in err.decode() and "Traceback" not in err.decode()
    assert vm.status() == "running"
    assert not (vm.folder / "ram.state.partial").exists()
    assert_runs_again(vm)


def test_a_vm_paused_through_the_monitor_is_frozen_not_suspended(base: Path, vms: list[TinyVM]) -> None:
    vm = start("frz-paused", base)
    vms.append(vm)
    vm.qmp("stop")
    record = vm.record()
    assert record["state"] == "frozen" and record["qemu_status"] == "paused"
    assert "paused outside kodepipe" in record["problem"] and "kp-stop --resume frz-paused" in record["hint"]
    # kodepipe's own suspend is "suspended"; resume thaws either
    assert lines(kp("kp-stop", "--resume", "frz-paused").stdout)[0]["state"] == "running"
    assert lines(kp("kp-stop", "--suspend", "frz-paused").stdout)[0]["state"] == "suspended"
    assert vm.record()["state"] == "suspended" and "problem" not in vm.record()
    assert lines(kp("kp-stop", "--resume", "frz-paused").stdout)[0]["state"] == "running"
    assert_runs_again(vm)


# -- a full disk -----------------------------------------------------------------------------


@pytest.fixture
def small_state_disk(tmp_path: Path) -> Iterator[Path]:
    """The state directory on a 16 MiB tmpfs of its own."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    state = Path(os.environ["KODEPIPE_STATE_DIR"])
    state.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "kp-test-full", str(state)], check=True)
    try:
        yield state
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """A file that leaves ``leave`` bytes free on the filesystem holding ``disk``."""
    filler = disk / "filler"
    st = os.statvfs(disk)
    with open(filler, "wb") as f:
        f.truncate(0)
        f.write(b"\1" * max(st.f_bavail * st.f_frsize - leave, 0))
    return filler


def qga_clients(vm: TinyVM) -> int:
    """Connections QEMU accepted on the VM's guest-agent socket (besides its listening one)."""
    path = vm.boot["sockets"]["qga"]
    entries = [line for line in Path("/proc/net/unix").read_text().splitlines() if line.endswith(" " + path)]
    return len(entries) - 1


def test_a_full_disk_freezes_the_vm_with_the_free_space_hint(base: Path, vms: list[TinyVM],
                                                             small_state_disk: Path) -> None:
    vm = start("frz-full", base)
    vms.append(vm)
    own_key()  # made long before a disk fills up (kp-image build makes it), as kp-ssh needs it
    filler = fill(small_state_disk, 256 << 10)  # room for a few of the guest's 64 writes, not all
    # kp-ip waits for a guest agent that this guest has not got: it must stop when the VM freezes
    ip = subprocess.Popen([str(BIN / "kp-ip"), "frz-full", "--timeout", "3600"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    try:
        wait_for(lambda: qga_clients(vm) > 0 or ip.poll() is not None, "kp-ip to wait on the guest agent")
        assert ip.poll() is None, ip.stderr.read().decode() if ip.stderr else ""
        vm.type(b"w")
        out, err = ip.communicate(timeout=WAIT)
    finally:
        ip.kill()
    assert ip.returncode == 1, err.decode()  # not 75: it did not wait for its timeout
    (failed,) = lines(out)
    assert failed["error"]["code"] == "frozen" and "no space left" in failed["error"]["message"]

    assert vm.status() == "io-error"
    record = vm.record()
    disk = str(vm.folder / "disk.qcow2")
    assert record["state"] == "frozen" and record["qemu_status"] == "io-error", record
    assert f"no space left on the filesystem holding its disk {disk}" in record["problem"]
    assert record["hint"] == f"free space on the filesystem holding {vm.folder}, then kp-stop --resume frz-full"
    assert b"E" not in vm.printed()  # the guest saw no error: QEMU stopped it instead
    assert_refused_as_frozen("frz-full", "free space on the filesystem holding")

    # still full: resuming would stop it again at once, so kp-stop --resume says what to do first
    refused = kp("kp-stop", "--resume", "frz-full")
    assert refused.returncode == 1
    assert lines(refused.stdout)[0]["error"]["code"] == "no_space", refused.stderr.decode()
    assert "free space there" in refused.stderr.decode() and vm.status() == "io-error"

    filler.unlink()
    resumed = kp("kp-stop", "--resume", "frz-full")
    assert resumed.returncode == 0, resumed.stderr.decode()
    wait_for(lambda: b"W" in vm.printed(), "the guest to finish its writes")  # the failed write was retried
    assert b"E" not in vm.printed()
    assert_runs_again(vm)


# -- kp-ssh while the VM freezes under a command ------------------------------------------------


@pytest.fixture
def server() -> Iterator[SSHServer]:
    yield from serve(own_key()[1].split()[1])


def test_kp_ssh_says_when_the_vm_freezes_under_a_command_and_when_it_runs_again(
        base: Path, vms: list[TinyVM], server: SSHServer, tmp_path: Path) -> None:
    vm = start("frz-ssh", base)
    vms.append(vm)
    # its sshd is a stand-in on the host (the boot sector has none); the VM's state is QEMU's own
    known = vm.folder / "known_hosts"
    known.write_text(f"[127.0.0.1]:{server.port} {server.host_key.get_name()} {server.host_key.get_base64()}\n")
    vm.boot.update(ssh={"host": "127.0.0.1", "port": server.port, "user": "kp"}, known_hosts=str(known))
    vm.write_meta()
    go = tmp_path / "go"
    ssh = subprocess.Popen([str(BIN / "kp-ssh"), "frz-ssh", "--", "sh", "-c",
                            f"while [ ! -e {go} ]; do sleep 0.1; done; echo finished"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    said: list[str] = []
    stderr = ssh.stderr
    assert stderr is not None
    reader = threading.Thread(target=lambda: said.extend(line.decode() for line in stderr), daemon=True)
    reader.start()
    try:
        wait_for(lambda: server.commands, "the command to start")
        vm.qmp("stop")
        wait_for(lambda: any("frz-ssh is frozen" in line for line in said), "kp-ssh to say the VM froze")
        vm.qmp("cont")
        wait_for(lambda: any("running again" in line for line in said), "kp-ssh to say it runs again")
        go.touch()
        out, _ = ssh.communicate(timeout=WAIT)
    finally:
        ssh.kill()
    assert ssh.returncode == 0, "".join(said)
    record, result = lines(out)
    assert record["state"] == "running" and result["exit_status"] == 0 and result["stdout"] == "finished\n"
    assert any("kp-stop --resume frz-ssh" in line for line in said)
