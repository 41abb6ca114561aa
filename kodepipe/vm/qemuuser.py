"""QEMU never runs as host root: who it runs as, what it is handed, and the exec helper that drops.

A guest that escapes QEMU gets QEMU's uid.  So kp-boot, run by root, never starts QEMU as root:

- under sudo (SUDO_UID/SUDO_GID name an existing, non-root user) QEMU runs as that user;
- as plain root it runs as ``kodepipe``, a system account that owns nothing (no login shell, no
  home), the way libvirt runs QEMU as libvirt-qemu; ./setup makes it, and so does kp-boot when
  it is missing (useradd --system, said once on stderr);
- run by anyone else, QEMU runs as that user, as it always did.

QEMU's own ``-runas`` was measured and refused: it opens everything as root and calls setuid
late, which QEMU's ``-sandbox ...,elevateprivileges=deny`` kills (SIGSYS); allowing it would
weaken the sandbox, and every later open (a qcow2 reopen, a 9p share) would still fail in a
state directory under /root (0700).  So QEMU is exec'd already dropped, by a tiny helper
(``python -S -m kodepipe.vm.qemuuser``), and handed only file descriptors kp-boot opened for it:

- its QMP, guest-agent and serial sockets, bound and listening (``-chardev socket,fd=N``);
- the disk and each layer beneath it (``/dev/fdset/N``, the clone read-write, the layers
  read-only, each an explicit ``-blockdev`` so no backing path is ever resolved by QEMU);
- the kernel and initrd (``/proc/self/fd/N``), the serial log's pipe, a saved state, the tap;
- the shared folder, as a mount tree of its own (``-virtfs local,path=/proc/self/fd/N``).

Its pid file is written by the helper before the exec (the pid does not change).

A shared folder whose owner is not QEMU's uid (a root-owned checkout under plain root) is handed
in as an **idmapped mount** that maps QEMU's uid and gid to the folder's owner: what the guest
writes there belongs to the folder's owner, and QEMU's uid owns nothing on the host.  The
share's read-only entries (``Plan.read_only``: a hostpath.InPlace, as kodepipe.vm.sharegit surveys
it, or ``read_only_of(share, share_fd, fds)`` from O_PATH fds of entries inside the share) are
bound read-only over themselves first, inside QEMU's own mount namespace, each checked to be the
very file surveyed, so they survive the share's recursive clone: the guest can read them, but not
write (EROFS), rename or replace them (EBUSY).  Nothing of this is visible on the host: the
namespace is QEMU's alone.  Run by a user, the helper does the same in a user namespace of its
own that maps the user to itself, so QEMU keeps the user's uid and no capability.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import json
import os
import pwd
import socket
import stat
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kodepipe.host import hostpath

ACCOUNT = "kodepipe"  # the account QEMU runs as when root starts it without sudo
NOLOGIN = "/usr/sbin/nologin"

# syscalls and flags of the new mount API (the unified syscall table); the binds themselves are
# hostpath.read_only_in_place's
SYS_OPEN_TREE, SYS_OPENAT2, SYS_MOUNT_SETATTR = 428, 437, 442
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_EMPTY_PATH, AT_RECURSIVE = 0x1000, 0x8000
MOUNT_ATTR_IDMAP = 0x100000
MS_REC, MS_PRIVATE = 0x4000, 1 << 18
CLONE_NEWNS, CLONE_NEWUSER = 0x20000, 0x10000000
RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS = 0x02, 0x04
PR_SET_NO_NEW_PRIVS = 38


@dataclass(frozen=True)
class QemuUser:
    """Who QEMU runs as, and why."""

    uid: int
    gid: int
    name: str
    why: str  # "self", "sudo", "share-owner" or "account"
    groups: tuple[int, ...] = ()  # supplementary groups kept (only /dev/kvm's group, when it had it)

    def record(self) -> dict[str, Any]:
        return {"uid": self.uid, "gid": self.gid, "name": self.name, "why": self.why}


def resolve(environ: Mapping[str, str] | None = None, *, euid: int | None = None,
            ensure: Callable[[], pwd.struct_passwd] | None = None,
            share_owner: tuple[int, int] | None = None) -> QemuUser:
    """Who QEMU is to run as, started by this process (``euid``) with ``environ``.

    ``share_owner``: the (uid, gid) owning a ``--share`` directory.  When root starts QEMU and
    someone other than root owns the share, QEMU runs as that owner: the guest then sees the share's
    owners as they are on the host (9p shows it the owners QEMU sees), and what it writes there is
    the owner's.  A root-owned share is idmapped instead (``share_idmap``)."""
    environ = os.environ if environ is None else environ
    euid = os.geteuid() if euid is None else euid
    if euid != 0:
        name = _name_of(euid)
        return QemuUser(euid, os.getegid(), name, "self", _kvm_groups(name, os.getegid(), os.getgroups()))
    sudo = _sudo_user(environ)
    if share_owner is not None and share_owner[0] != 0 and (sudo is None or sudo.pw_uid != share_owner[0]):
        uid, gid = share_owner
        name = _name_of(uid)
        return QemuUser(uid, gid, name, "share-owner", _kvm_groups(name, gid))
    if sudo is not None:
        gid = sudo.pw_gid
        with contextlib.suppress(ValueError):
            gid = int(environ.get("SUDO_GID", ""))
        return QemuUser(sudo.pw_uid, gid, sudo.pw_name, "sudo", _kvm_groups(sudo.pw_name, gid))
    account = (ensure or ensure_account)()
    return QemuUser(account.pw_uid, account.pw_gid, account.pw_name, "account",
                    _kvm_groups(account.pw_name, account.pw_gid))


def _name_of(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _sudo_user(environ: Mapping[str, str]) -> pwd.struct_passwd | None:
    """The user who ran sudo, when SUDO_UID names an existing user other than root."""
    try:
        uid = int(environ.get("SUDO_UID", ""))
    except ValueError:
        return None
    if uid <= 0:
        return None
    try:
        return pwd.getpwuid(uid)
    except KeyError:
        return None


def share_owner(share: Path | None) -> tuple[int, int] | None:
    """Who owns the directory ``share`` (uid, gid), or None without one."""
    if share is None:
        return None
    st = os.stat(share)
    return st.st_uid, st.st_gid


def _kvm_groups(name: str, gid: int, groups: Sequence[int] | None = None) -> tuple[int, ...]:
    """/dev/kvm's group, when the user is in it and it is not root's: QEMU keeps no other group."""
    try:
        kvm_gid = os.stat("/dev/kvm").st_gid
    except OSError:
        return ()
    if kvm_gid == 0 or kvm_gid == gid:
        return ()
    if groups is None:
        try:
            groups = os.getgrouplist(name, gid)
        except OSError:
            return ()
    return (kvm_gid,) if kvm_gid in groups else ()


def ensure_account(say: Callable[[str], None] | None = None) -> pwd.struct_passwd:
    """The ``kodepipe`` system account, made (useradd --system, no home, no login shell) if missing."""
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(ACCOUNT)
    import grp

    from kodepipe.core import proc
    from kodepipe.core.errors import KpError

    shell = NOLOGIN if os.path.exists(NOLOGIN) else "/bin/false"
    groups = []
    with contextlib.suppress(KeyError):
        groups = ["--groups", grp.getgrnam("kvm").gr_name]  # /dev/kvm, where its group is kvm
    try:
        useradd = "/usr/sbin/useradd" if os.path.exists("/usr/sbin/useradd") else proc.require("useradd")
        proc.run([useradd, "--system", "--user-group", "--no-create-home",
                  "--home-dir", "/nonexistent", "--shell", shell, "--comment", "kodepipe QEMU", *groups, ACCOUNT])
    except KpError:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(ACCOUNT)  # another kp-boot made it meanwhile
        raise
    (say or (lambda m: sys.stderr.write(m + "\n")))(
        f"kp-boot: made the system account {ACCOUNT!r}: QEMU runs as it, never as root (./setup makes it too)")
    return pwd.getpwnam(ACCOUNT)


# -- what kp-boot hands QEMU ---------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """One qcow2 file of the disk's chain and the fds QEMU gets for it (an fd set)."""

    path: str
    fds: tuple[int, ...]  # the top: read-write and read-only; a backing layer: read-only


@dataclass(frozen=True)
class Fds:
    """The fd numbers QEMU inherits, for ``qemu.command_line``."""

    qmp: int
    qga: int
    serial: int
    kernel: int
    initrd: int
    disk: tuple[Layer, ...]  # the VM's own disk first, then each backing file
    marker: int  # a copy of the QMP socket, in an fd set whose opaque names its path (qemu.alive)
    share: int | None = None  # replaced by the helper with the share's own mount tree
    tap: int | None = None

    def all(self) -> tuple[int, ...]:
        found = [self.qmp, self.qga, self.serial, self.marker, self.kernel, self.initrd]
        found += [fd for layer in self.disk for fd in layer.fds]
        found += [fd for fd in (self.share, self.tap) if fd is not None]
        return tuple(found)


def backing_chain(disk: Path) -> list[Path]:
    """``disk`` and every qcow2 file beneath it, top first, read from their headers (each backing
    name is relative to the file naming it, as qemu-img writes it)."""
    from kodepipe.core.errors import KpError

    chain = [disk]
    while len(chain) < 16:
        with open(chain[-1], "rb") as f:
            header = f.read(20)
            if header[:4] != b"QFI\xfb":
                raise KpError(f"{chain[-1]} is not a qcow2 image", code="bad_disk")
            offset = int.from_bytes(header[8:16], "big")
            size = int.from_bytes(header[16:20], "big")
            if not offset:
                return chain
            if size > 4096:
                raise KpError(f"{chain[-1]} names a backing file longer than 4096 bytes", code="bad_disk")
            f.seek(offset)
            name = os.fsdecode(f.read(size))
        chain.append(chain[-1].parent / name if not name.startswith("/") else Path(name))
    raise KpError(f"{disk}'s chain of backing files is longer than 16", code="bad_disk")


def listening_socket(path: Path) -> socket.socket:
    """A unix socket bound at ``path`` and listening, for QEMU to accept on (``fd=``)."""
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    return sock


@contextlib.contextmanager
def handout(sockets: Any, kernel: str, initrd: str, disk: Path, *, share: Path | None = None,
            tap: str | None = None) -> Iterator[Fds]:
    """Open everything QEMU may use, as the caller (root), for QEMU to inherit; closed when the block
    ends (QEMU holds its own copies by then)."""
    opened: list[int] = []
    socks: list[socket.socket] = []

    def keep(fd: int) -> int:
        opened.append(fd)
        os.set_inheritable(fd, False)  # only pass_fds makes them QEMU's
        return fd

    try:
        for path in (sockets.qmp, sockets.qga, sockets.serial):
            socks.append(listening_socket(Path(path)))
        layers = []
        for i, path in enumerate(backing_chain(disk)):
            ro = keep(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
            fds = (keep(os.open(path, os.O_RDWR | os.O_CLOEXEC)), ro) if i == 0 else (ro,)
            layers.append(Layer(os.path.normpath(path), fds))  # the name it is known by (query-fdsets)
        share_fd = keep(os.open(share, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)) if share is not None else None
        tap_fd = keep(open_tap(tap)) if tap else None
        yield Fds(qmp=socks[0].fileno(), qga=socks[1].fileno(), serial=socks[2].fileno(),
                  kernel=keep(os.open(kernel, os.O_RDONLY | os.O_CLOEXEC)),
                  initrd=keep(os.open(initrd, os.O_RDONLY | os.O_CLOEXEC)),
                  disk=tuple(layers), marker=keep(os.dup(socks[0].fileno())), share=share_fd, tap=tap_fd)
    finally:
        for fd in opened:
            os.close(fd)
        for sock in socks:
            sock.close()


@contextlib.contextmanager
def handed(user: QemuUser, sockets: Any, image: Mapping[str, Any], disk: Path, *, share: Path | None = None,
           tap: str | None = None, read_only: hostpath.InPlace | None = None) -> Iterator[tuple[Fds, Plan]]:
    """What QEMU is handed (``handout``) and what its helper does before the exec (a ``Plan``)."""
    with handout(sockets, str(image["kernel"]), str(image["initrd"]), disk, share=share, tap=tap) as fds:
        idmap = share_idmap(fds.share, user) if fds.share is not None else None
        yield fds, Plan(user, str(sockets.pidfile), fds.share, read_only, idmap)


def open_tap(name: str) -> int:
    """An fd on tap device ``name`` (made by kodepipe.vm.tap), as QEMU would open it itself."""
    import fcntl
    import struct

    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        iff_tap, iff_no_pi, iff_vnet_hdr = 0x0002, 0x1000, 0x4000
        fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", name.encode(), iff_tap | iff_no_pi | iff_vnet_hdr))  # TUNSETIFF
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(frozen=True)
class Plan:
    """What the helper does between fork and exec."""

    user: QemuUser
    pidfile: str
    share_fd: int | None = None
    read_only: hostpath.InPlace | None = None  # entries of the share bound read-only over themselves
    idmap: tuple[int, int] | None = None  # the share owner's (uid, gid) that QEMU's uid and gid map to

    def spec(self) -> str:
        ro = self.read_only
        return json.dumps({"uid": self.user.uid, "gid": self.user.gid, "groups": list(self.user.groups),
                           "pidfile": self.pidfile, "share": self.share_fd, "idmap": list(self.idmap) if self.idmap
                           else None, "read_only": None if ro is None else
                           {"root": ro.root, "root_id": list(ro.root_id), "entries": [list(e) for e in ro.entries]}})


def read_only_of(share: Path, share_fd: int, entries: Sequence[int]) -> hostpath.InPlace:
    """The read-only entries of a share, given as O_PATH fds of entries inside it (``.git``
    directories, files): each is bound over itself, as the fd's file, inside QEMU's namespace."""
    from kodepipe.host import hostpath

    root = os.readlink(f"/proc/self/fd/{share_fd}")
    found = []
    for fd in entries:
        rel = os.path.relpath(_fd_path(fd), root)
        if rel == "." or rel == ".." or rel.startswith("../"):
            raise OSError(errno.EXDEV, f"{_fd_path(fd)} is not inside the share {root}")
        st = os.fstat(fd)
        found.append((rel, st.st_dev, st.st_ino))
    st = os.fstat(share_fd)
    return hostpath.InPlace(str(share), (st.st_dev, st.st_ino), tuple(found))


def share_idmap(share_fd: int, user: QemuUser, *, euid: int | None = None) -> tuple[int, int] | None:
    """The (uid, gid) of the share's owner when QEMU's uid is someone else and an idmapped mount can
    map it (only root makes one); None when the share is QEMU's own, or nothing can be done."""
    euid = os.geteuid() if euid is None else euid
    st = os.fstat(share_fd)
    if st.st_uid == user.uid or euid != 0:
        return None
    return st.st_uid, st.st_gid


def helper_argv(plan: Plan, argv: Sequence[str]) -> list[str]:
    return [sys.executable, "-S", "-m", "kodepipe.vm.qemuuser", plan.spec(), *argv]


def helper_env() -> dict[str, str]:
    return {"PYTHONPATH": str(Path(__file__).resolve().parents[2]), "PATH": os.defpath}


# -- the helper: runs between fork and QEMU's exec ----------------------------------------------


_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _syscall(number: int, *args: Any) -> int:
    return int(_lib().syscall(ctypes.c_long(number), *args))


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _openat2(dir_fd: int, rel: str, flags: int, resolve: int) -> int:
    how = _OpenHow(flags=flags | os.O_CLOEXEC, mode=0, resolve=resolve)
    return _check(_syscall(SYS_OPENAT2, ctypes.c_int(dir_fd), os.fsencode(rel), ctypes.byref(how),
                           ctypes.c_size_t(ctypes.sizeof(how))), f"openat2 {rel}")


def _open_tree(fd: int, flags: int) -> int:
    return _check(_syscall(SYS_OPEN_TREE, ctypes.c_int(fd), b"", ctypes.c_uint(flags | AT_EMPTY_PATH
                                                                              | OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)),
                  "open_tree")


def _setattr(fd: int, attr_set: int, *, recursive: bool = False, userns: int = 0) -> None:
    attr = _MountAttr(attr_set=attr_set, attr_clr=0, propagation=0, userns_fd=userns)
    _check(_syscall(SYS_MOUNT_SETATTR, ctypes.c_int(fd), b"",
                    ctypes.c_uint(AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)),
                    ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))), "mount_setattr")


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _fd_path(fd: int) -> str:
    path = os.readlink(f"/proc/self/fd/{fd}")
    if not path.startswith("/") or path.endswith(" (deleted)"):
        raise OSError(errno.ENOENT, f"fd {fd} names no reachable path ({path})")
    return path


def _userns(idmap: tuple[int, int], uid: int, gid: int) -> int:
    """An fd of a user namespace that maps the share owner's ids (inside) to QEMU's (outside)."""
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child only waits
        try:
            os.close(ready_r)
            os.close(hold_w)
            ok = _lib().unshare(CLONE_NEWUSER) == 0
            os.write(ready_w, b"1" if ok else b"0")
            os.read(hold_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(hold_r)
    try:
        if os.read(ready_r, 1) != b"1":
            raise OSError(errno.EPERM, "unshare(CLONE_NEWUSER) failed")
        Path(f"/proc/{pid}/uid_map").write_text(f"{idmap[0]} {uid} 1\n")
        Path(f"/proc/{pid}/gid_map").write_text(f"{idmap[1]} {gid} 1\n")
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(hold_w)
        os.close(ready_r)
        os.waitpid(pid, 0)


def build_share(share_fd: int, read_only: hostpath.InPlace | None, idmap: tuple[int, int] | None,
                uid: int, gid: int) -> int:
    """In a new mount namespace (the caller's own from now on): bind each read-only entry over itself,
    then clone the share with them recursively, idmapped when asked; returns the tree's fd."""
    from kodepipe.host import hostpath

    root = _fd_path(share_fd)
    want = os.fstat(share_fd)
    if os.geteuid() == 0:
        hostpath.private_namespace()
    else:  # a user namespace of its own, mapping the user to itself: QEMU keeps its uid and no capability
        _check(_lib().unshare(CLONE_NEWNS | CLONE_NEWUSER), "unshare")
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1\n")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1\n")
        _check(_lib().mount(b"none", b"/", None, ctypes.c_ulong(MS_REC | MS_PRIVATE), None), "making / private")
    if read_only is not None and read_only.entries:
        hostpath.read_only_in_place(read_only)
    # the share as it is now in this namespace, through the binds on it
    top = _openat2(-100, root, os.O_PATH | os.O_DIRECTORY, RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
    try:
        if not _same(os.fstat(top), want):
            raise OSError(errno.ESTALE, f"the share {root} was replaced")
        tree = _open_tree(top, AT_RECURSIVE)
    finally:
        os.close(top)
    if idmap is not None:
        userns = _userns(idmap, uid, gid)
        try:
            _setattr(tree, MOUNT_ATTR_IDMAP, recursive=True, userns=userns)
        except OSError as exc:
            raise OSError(exc.errno, f"the share {root} cannot be idmapped to its owner (uid {idmap[0]}) for QEMU's "
                                     f"uid {uid} ({exc.strerror}): its filesystem may not support idmapped mounts; "
                                     "run kp-boot with sudo as the share's owner, or share a folder on ext4, xfs, "
                                     "btrfs or tmpfs") from None
        finally:
            os.close(userns)
    return tree


KVM_DEVICE = "/dev/kvm"
MS_BIND, MS_NOSUID, MNT_DETACH = 4096, 2, 2


def _wants_kvm(argv: Sequence[str]) -> bool:
    return any(a == "-accel" and b.split(",")[0] == "kvm" for a, b in itertools.pairwise(argv))


def _may_open(path: str, uid: int, gid: int, groups: Sequence[int]) -> bool:
    """Whether ``uid`` (with ``gid`` and ``groups``) may open ``path`` read-write, by its mode."""
    try:
        st = os.stat(path)
    except OSError:
        return True  # nothing to give: QEMU says there is no KVM, as it would have
    if st.st_uid == uid:
        return st.st_mode & 0o600 == 0o600
    if st.st_gid == gid or st.st_gid in groups:
        return st.st_mode & 0o060 == 0o060
    return st.st_mode & 0o006 == 0o006


def kvm_for(uid: int, gid: int, scratch: Path) -> None:
    """Give QEMU's uid /dev/kvm in its own mount namespace (the caller's, already private): a device
    node of KVM's, owned by that uid, made in a tmpfs mounted a moment over ``scratch`` and bound over
    /dev/kvm.  The host's /dev/kvm keeps its owner and mode."""
    st = os.stat(KVM_DEVICE)
    lib = _lib()
    _check(lib.mount(b"tmpfs", os.fsencode(scratch), b"tmpfs", ctypes.c_ulong(MS_NOSUID), b"mode=700"),
           "mounting a tmpfs for /dev/kvm")
    try:
        node = scratch / "kvm"
        os.mknod(node, stat.S_IFCHR | 0o600, st.st_rdev)
        os.chown(node, uid, gid)
        _check(lib.mount(os.fsencode(node), os.fsencode(KVM_DEVICE), None, ctypes.c_ulong(MS_BIND), None),
               "binding /dev/kvm")
    finally:
        _check(lib.umount2(os.fsencode(scratch), MNT_DETACH), "unmounting the tmpfs for /dev/kvm")


def run_helper(spec: dict[str, Any], argv: list[str]) -> None:
    """Set up QEMU's share, write its pid file, drop to its uid, and become QEMU (never returns)."""
    uid, gid = int(spec["uid"]), int(spec["gid"])
    share = spec.get("share")
    namespaced = False
    if share is not None:
        ro = spec.get("read_only")
        read_only = None
        if ro:
            from kodepipe.host import hostpath

            read_only = hostpath.InPlace(str(ro["root"]), (int(ro["root_id"][0]), int(ro["root_id"][1])),
                                         tuple((str(r), int(d), int(i)) for r, d, i in ro["entries"]))
        idmap = (int(spec["idmap"][0]), int(spec["idmap"][1])) if spec.get("idmap") else None
        if read_only is not None or idmap is not None:
            tree = build_share(int(share), read_only, idmap, uid, gid)
            os.dup2(tree, int(share))  # inheritable: QEMU's -virtfs path is /proc/self/fd/SHARE
            os.close(tree)
            namespaced = True
    groups = [int(g) for g in spec.get("groups") or ()]
    if os.geteuid() == 0 and uid != 0 and _wants_kvm(argv) and not _may_open(KVM_DEVICE, uid, gid, groups):
        if not namespaced:
            from kodepipe.host import hostpath

            hostpath.private_namespace()
        kvm_for(uid, gid, Path(spec["pidfile"]).parent)
    pidfile = os.open(spec["pidfile"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    os.write(pidfile, f"{os.getpid()}\n".encode())
    os.close(pidfile)
    if os.geteuid() == 0 and uid != 0:
        os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    if os.getuid() == 0 or os.geteuid() == 0:
        raise OSError(errno.EPERM, "refusing to run QEMU as root")
    _check(_lib().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    os.chdir("/")
    os.execve(argv[0], argv, {"PATH": os.defpath})  # noqa: S606 - QEMU, by its full path


def main(args: list[str]) -> int:
    if len(args) < 2:
        sys.stderr.write("usage: python -m kodepipe.vm.qemuuser SPEC QEMU ARG...\n")
        return 2
    try:
        run_helper(json.loads(args[0]), args[1:])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        sys.stderr.write(f"kodepipe could not start QEMU as an unprivileged user: {exc}\n")
        return 1
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
