"""Who QEMU runs as (pure, table-driven), and the command line of a QEMU that is handed fds."""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

import pytest

from kodepipe.core.errors import KpError
from kodepipe.vm import qemu, qemuuser

ROOT = pwd.getpwuid(0)
ACCOUNT = pwd.struct_passwd(("kodepipe", "x", 995, 994, "", "/nonexistent", "/usr/sbin/nologin"))


def someone() -> pwd.struct_passwd:
    """An existing user other than root (nobody, on Debian)."""
    return next(p for p in pwd.getpwall() if p.pw_uid not in (0,) and p.pw_name == "nobody")


@pytest.mark.parametrize("environ, euid, want", [
    ({}, 0, ("kodepipe", "account")),  # plain root: the account
    ({"SUDO_UID": "0", "SUDO_GID": "0"}, 0, ("kodepipe", "account")),  # sudo from root is root: the account
    ({"SUDO_UID": "nobody"}, 0, ("kodepipe", "account")),  # not a number
    ({"SUDO_UID": "4000000000"}, 0, ("kodepipe", "account")),  # no such user
    ({"SUDO_UID": "-1"}, 0, ("kodepipe", "account")),
    ({"SUDO_UID": "NOBODY", "SUDO_GID": "NOGROUP"}, 0, ("nobody", "sudo")),  # sudo by a real user: that user
])
def test_root_never_runs_qemu_as_root(environ: dict[str, str], euid: int, want: tuple[str, str]) -> None:
    nobody = someone()
    environ = {k: v.replace("NOBODY", str(nobody.pw_uid)).replace("NOGROUP", str(nobody.pw_gid))
               for k, v in environ.items()}
    user = qemuuser.resolve(environ, euid=euid, ensure=lambda: ACCOUNT)
    assert (user.name, user.why) == want and user.uid != 0
    if want[1] == "sudo":
        assert (user.uid, user.gid) == (nobody.pw_uid, nobody.pw_gid)
    else:
        assert (user.uid, user.gid) == (995, 994)


@pytest.mark.parametrize("environ, owner, want", [
    ({}, (1000, 1001), (1000, 1001, "share-owner")),  # someone's checkout under plain root: its owner
    ({"SUDO_UID": "NOBODY"}, (1000, 1001), (1000, 1001, "share-owner")),  # someone else's under sudo: its owner
    ({"SUDO_UID": "NOBODY", "SUDO_GID": "NOGROUP"}, (0, 0), ("NOBODY", "NOGROUP", "sudo")),  # root's: idmapped
    ({}, (0, 0), (995, 994, "account")),  # root's under plain root: the account, idmapped
])
def test_a_share_not_roots_is_served_by_its_owner(environ: dict[str, str], owner: tuple[int, int],
                                                   want: tuple[object, object, str]) -> None:
    nobody = someone()
    ids = {"NOBODY": nobody.pw_uid, "NOGROUP": nobody.pw_gid}
    environ = {k: str(ids.get(v, v)) for k, v in environ.items()}
    user = qemuuser.resolve(environ, euid=0, ensure=lambda: ACCOUNT, share_owner=owner)
    assert (user.uid, user.gid, user.why) == tuple(ids.get(str(w), w) for w in want)
    assert qemuuser.resolve({}, euid=1234, share_owner=owner).uid == 1234  # a user's QEMU is the user


def test_a_normal_user_runs_qemu_as_itself() -> None:
    user = qemuuser.resolve({"SUDO_UID": "0"}, euid=1234, ensure=lambda: pytest.fail("no account for a user"))
    assert user.uid == 1234 and user.why == "self"


def test_the_sudo_gid_defaults_to_the_users_group() -> None:
    nobody = someone()
    user = qemuuser.resolve({"SUDO_UID": str(nobody.pw_uid), "SUDO_GID": "x"}, euid=0)
    assert user.gid == nobody.pw_gid


@pytest.mark.parametrize("qemu_uid, euid, mapped", [
    (995, 0, True),  # root's checkout, QEMU as the account: its ids map to the checkout's owner
    ("owner", 0, False),  # the share is QEMU's user's own (sudo): nothing to map
    (995, 1000, False),  # a normal user cannot idmap: as it always was
])
def test_the_share_is_idmapped_to_its_owner_when_qemu_is_someone_else(tmp_path: Path, qemu_uid: object, euid: int,
                                                                      mapped: bool) -> None:
    fd = os.open(tmp_path, os.O_PATH)
    try:
        real = os.fstat(fd)
        uid = real.st_uid if qemu_uid == "owner" else int(str(qemu_uid))
        got = qemuuser.share_idmap(fd, qemuuser.QemuUser(uid, 1, "q", "x"), euid=euid)
    finally:
        os.close(fd)
    assert got == ((real.st_uid, real.st_gid) if mapped else None)


def test_the_backing_chain_is_read_from_the_headers(tmp_path: Path) -> None:
    base = tmp_path / "images" / "base" / "disk.qcow2"
    base.parent.mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    warm = base.parent / "warm.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "disk.qcow2", "-F", "qcow2", str(warm)],
                   check=True)
    clone = tmp_path / "vms" / "a" / "disk.qcow2"
    clone.parent.mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "../../images/base/warm.qcow2", "-F", "qcow2",
                    str(clone)], check=True)
    chain = qemuuser.backing_chain(clone)
    assert [os.path.realpath(p) for p in chain] == [str(clone), str(warm), str(base)]
    (tmp_path / "raw").write_bytes(b"\0" * 512)
    with pytest.raises(KpError):
        qemuuser.backing_chain(tmp_path / "raw")


FDS = qemuuser.Fds(qmp=20, qga=21, serial=22, kernel=23, initrd=24, marker=25,
                   disk=(qemuuser.Layer("/s/vms/a/disk.qcow2", (26, 27)),
                         qemuuser.Layer("/s/images/b,1/disk.qcow2", (28,))),
                   share=29, tap=30)
IMAGE = {"kernel": "/img/vmlinuz", "initrd": "/img/initrd.img", "cmdline": "root=/dev/vda rw console=ttyS0"}
SOCKETS = qemu.Sockets(qmp=Path("/run/kp/a.qmp"), qga=Path("/run/kp/a.qga"), serial=Path("/run/kp/a.serial"),
                       pidfile=Path("/run/kp/a.pid"))


def handed_argv(**kw: object) -> list[str]:
    vm = {"name": "a", "id": "0123456789ab", "disk": "/s/vms/a/disk.qcow2"}
    args: dict[str, object] = {"accel": "tcg", "ssh_port": 2222, "serial_fd": 7, "fds": FDS}
    args.update(kw)
    opts = qemu.BootOptions(share=Path("/home/u/proj"), net="bridge:br0")
    return qemu.command_line(vm, IMAGE, opts, SOCKETS, **args)  # type: ignore[arg-type]


def value(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def test_a_handed_qemu_resolves_no_path_of_kodepipes() -> None:
    args = handed_argv()
    joined = " ".join(args)
    # no file of the state directory, no image path, no socket path QEMU would open or bind itself
    for path in ("/img/vmlinuz", "/img/initrd.img", "/home/u/proj", "file=/s/"):
        assert path not in joined, path
    assert "-pidfile" not in args
    assert value(args, "-kernel") == ["/proc/self/fd/23"] and value(args, "-initrd") == ["/proc/self/fd/24"]
    chardevs = value(args, "-chardev")
    assert [c.split(",")[2] for c in chardevs] == ["fd=20", "fd=21", "fd=22"]
    # the QMP socket's path stays on the command line, in an fd set's opaque: qemu.alive's marker
    assert "fd=25,set=30,opaque=qmp:/run/kp/a.qmp" in value(args, "-add-fd")
    assert value(args, "-virtfs") == ["local,path=/proc/self/fd/29,mount_tag=workspace,security_model=mapped-xattr,"
                                      "id=share0"]
    assert value(args, "-netdev") == ["tap,id=n0,fd=30"]


def test_the_disk_is_a_chain_of_explicit_nodes_on_fd_sets() -> None:
    args = handed_argv()
    assert value(args, "-add-fd")[1:4] == ["fd=28,set=11,opaque=/s/images/b,,1/disk.qcow2",
                                          "fd=26,set=10,opaque=/s/vms/a/disk.qcow2",
                                          "fd=27,set=10,opaque=/s/vms/a/disk.qcow2"]
    assert value(args, "-blockdev") == [
        "driver=file,node-name=kplayer1-file,filename=/dev/fdset/11,read-only=on",
        "driver=qcow2,node-name=kplayer1,file=kplayer1-file,read-only=on",
        "driver=file,node-name=kpdisk-file,filename=/dev/fdset/10,discard=unmap",
        "driver=qcow2,node-name=kpdisk,file=kpdisk-file,backing=kplayer1,discard=unmap,detect-zeroes=unmap",
    ]
    # last, where -drive if=virtio put the disk: a saved machine's PCI slots stay the same
    assert args[-2:] == ["-device", "virtio-blk-pci,drive=kpdisk"]


@pytest.mark.parametrize("file, fdsets, want", [
    ("/dev/fdset/10", [{"fdset-id": 10, "fds": [{"fd": 3, "opaque": "/s/vms/a/disk.qcow2"}]}], "/s/vms/a/disk.qcow2"),
    ('json:{"backing": {"driver": "qcow2", "file": {"driver": "file", "filename": "/dev/fdset/11"}}, '
     '"driver": "qcow2", "file": {"driver": "file", "filename": "/dev/fdset/10"}}',
     [{"fdset-id": 10, "fds": [{"fd": 3, "opaque": "/s/vms/a/disk.qcow2"}]}], "/s/vms/a/disk.qcow2"),
    ("/s/vms/a/disk.qcow2", [], "/s/vms/a/disk.qcow2"),
    ("json:{not json", [], "json:{not json"),
])
def test_a_disk_error_names_the_file_kp_boot_opened(file: str, fdsets: list[dict[str, object]], want: str) -> None:
    blocks = [{"io-status": "nospace", "device": "", "inserted": {"file": file}}]
    assert [d.file for d in qemu.disk_errors(blocks, fdsets)] == [want]
