"""The QEMU command line (pure) and the launch's error path (real QEMU, no guest)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kodepipe.core.errors import BadInput, KpError
from kodepipe.vm import qemu

IMAGE = {"kernel": "/img/vmlinuz", "initrd": "/img/initrd.img", "cmdline": "root=/dev/vda rw console=ttyS0"}
SOCKETS = qemu.Sockets(qmp=Path("/run/kp/a.qmp"), qga=Path("/run/kp/a.qga"), serial=Path("/run/kp/a.serial"),
                       pidfile=Path("/run/kp/a.pid"))


DEFAULT = qemu.BootOptions()


def argv(opts: qemu.BootOptions = DEFAULT, **kw: object) -> list[str]:
    vm = {"name": "a", "id": "0123456789ab", "disk": "/state/vms/a/disk.qcow2"}
    args: dict[str, object] = {"accel": "tcg", "ssh_port": 2222, "serial_fd": 7, "net_fd": 11}
    args.update(kw)
    return qemu.command_line(vm, IMAGE, opts, SOCKETS, **args)  # type: ignore[arg-type]


def value(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def test_headless_sandboxed_direct_boot_with_every_socket() -> None:
    args = argv()
    assert args[0] == "qemu-system-x86_64" and "-daemonize" not in args
    assert value(args, "-display") == ["none"] and "-nodefaults" in args
    assert value(args, "-sandbox") == ["on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
    assert value(args, "-accel") == ["tcg"] and value(args, "-cpu") == ["max"]
    assert value(args, "-append") == ["root=/dev/vda rw console=ttyS0 systemd.hostname=a"]
    chardevs = " ".join(value(args, "-chardev"))
    for path in (SOCKETS.qmp, SOCKETS.qga, SOCKETS.serial):
        assert f"path={path},server=on,wait=off" in chardevs
    # the serial log goes to the keeper's pipe (fd 7, as an fd set), never to a file QEMU would grow
    assert "logfile=/dev/fdset/9,logappend=on" in chardevs and value(args, "-add-fd") == ["fd=7,set=9"]
    assert "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0" in value(args, "-device")
    assert value(args, "-pidfile") == [str(SOCKETS.pidfile)]


def test_kvm_uses_the_host_cpu() -> None:
    args = argv(accel="kvm")
    assert value(args, "-accel") == ["kvm"] and value(args, "-cpu") == ["host"]


@pytest.mark.parametrize("net, host_loopback, netdev, nic", [
    # the default: passt behind the loopback guard, through the inherited socket (fd 11)
    ("user", False, "stream,id=n0,server=off,addr.type=fd,addr.str=11", True),
    # the loosening: QEMU's slirp, SSH as a hostfwd on loopback
    ("user", True, "user,id=n0,hostname=a,hostfwd=tcp:127.0.0.1:2222-:22", True),
    ("none", False, None, False),
    ("bridge:br0", False, "tap,id=n0,ifname=kp0123,script=no,downscript=no", True),
])
def test_networks(net: str, host_loopback: bool, netdev: str | None, nic: bool) -> None:
    args = argv(qemu.BootOptions(net=net, host_loopback=host_loopback), tap="kp0123", net_fd=11)
    assert value(args, "-netdev") == ([netdev] if netdev else [])
    nics = [d for d in value(args, "-device") if d.startswith("virtio-net-pci")]
    assert nics == ([f"virtio-net-pci,netdev=n0,mac={qemu.mac_address('0123456789ab')}"] if nic else [])


def test_user_networking_without_passts_socket_is_refused() -> None:
    with pytest.raises(KpError, match="passt"):
        argv(qemu.BootOptions(net="user"), net_fd=None)


def test_only_the_shared_folder_is_exported_and_commas_are_escaped(tmp_path: Path) -> None:
    folder = tmp_path / "a,b"
    folder.mkdir()
    assert value(argv(), "-virtfs") == []
    virtfs = value(argv(qemu.BootOptions(share=folder)), "-virtfs")
    assert virtfs == [f"local,path={str(folder).replace(',', ',,')},mount_tag=workspace,"
                      "security_model=mapped-xattr,id=share0"]


def test_incoming_state() -> None:
    assert value(argv(incoming="fd:7"), "-incoming") == ["fd:7"]


def test_mac_addresses_are_stable_local_and_distinct() -> None:
    a, b = qemu.mac_address("one"), qemu.mac_address("two")
    assert a == qemu.mac_address("one") and a != b and a.startswith("52:54:00:")


@pytest.mark.parametrize("opts, fragment", [
    (qemu.BootOptions(memory="lots"), "invalid memory size"),
    (qemu.BootOptions(memory="0G"), "invalid memory size"),
    (qemu.BootOptions(cpus=0), "invalid CPU count"),
    (qemu.BootOptions(accel="hvf"), "invalid accelerator"),
    (qemu.BootOptions(net="bridge:../x"), "invalid network"),
    (qemu.BootOptions(net="tap"), "invalid network"),
    (qemu.BootOptions(share=Path("/nonexistent/kp")), "is not a directory"),
])
def test_bad_boot_options(opts: qemu.BootOptions, fragment: str) -> None:
    with pytest.raises(BadInput, match=fragment):
        opts.check()


def test_a_launch_failure_carries_qemus_own_message(tmp_path: Path) -> None:
    log = tmp_path / "qemu.log"
    with pytest.raises(KpError) as info:
        qemu.launch(["qemu-system-x86_64", "-display", "none", "-no-such-option"], log, tmp_path / "q.qmp")
    assert info.value.code == "qemu_failed"
    assert "-no-such-option" in info.value.message and "invalid option" in info.value.message
    assert str(log) in info.value.message
    assert "$ " in log.read_text()


def test_alive_needs_the_right_process() -> None:
    me = os.getpid()
    assert not qemu.alive(me, Path("/run/kp/not-in-my-command-line.qmp"))
    assert not qemu.alive(None, SOCKETS.qmp) and not qemu.alive(-1, SOCKETS.qmp)
    assert not qemu.alive(2**22 + 1, SOCKETS.qmp)
