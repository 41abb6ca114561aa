"""Building a bootable Debian guest image: debootstrap -> rootfs -> ext4 -> qcow2.

The result is three files in the work directory: ``disk.qcow2`` (one ext4
file system, no partition table, mounted as /dev/vda), and ``vmlinuz`` +
``initrd.img`` for QEMU's direct kernel boot.  No loop mounts are used: the
file system is written by ``mkfs.ext4 -d`` straight from the rootfs tree.

Every step that mounts something (debootstrap, each chroot step) runs inside
``unshare --mount --propagation private --pid --fork --kill-child``, so its
proc/sys/dev mounts and any stray daemons vanish with the process even if
kodepipe itself is SIGKILLed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from kodepipe.core import proc
from kodepipe.core.errors import BadInput, CommandFailed, KpError
from kodepipe.core.state import remove_tree
from kodepipe.host.debian import MOUNT_WAIT, debootstrap

# What every guest needs: init, device manager, D-Bus (for logind/resolved),
# sshd, the guest agent and sudo/ip for the agent's convenience.
BASE_PACKAGES = ["systemd", "systemd-sysv", "udev", "dbus", "openssh-server", "qemu-guest-agent",
                 "sudo", "iproute2"]
# Installed before the kernel, in its own apt run: when it comes in the same run
# as the kernel its trigger builds the initrd a second time.
INITRD_PACKAGES = ["initramfs-tools", "zstd"]
# Units that cost boot time or CPU in a disposable VM (apt-daily would also hold
# the dpkg lock just when an agent wants to install something).
DISABLED_UNITS = ["e2scrub_reap.service", "e2scrub_all.timer", "apt-daily.timer", "apt-daily-upgrade.timer",
                  "dpkg-db-backup.timer", "fstrim.timer", "systemd-networkd-wait-online.service"]
# Installed after the initramfs configuration is in place (see _install_kernel).
KERNEL_PACKAGE = "linux-image-amd64"
# So that kp-run can run its containers inside the VM: rootful Podman, which
# brings an OCI runtime (crun), conmon and containers-common (its seccomp.json
# is what kp-run derives its profile from).  Installed with the kernel, by apt:
# debootstrap's --include cannot choose between the providers of a virtual
# package (containers-common's network stack).  No uidmap: kp-run gives
# rootful Podman its id maps explicitly.  strace: kp-run --audit traces the
# agent from the guest, outside its container (+3 MB).  The egress relay needs
# only perl-base (Essential), which every Debian has.
CONTAINER_PACKAGES = ["podman", "strace"]
# Split out of systemd in bookworm; older suites have resolved inside systemd.
RESOLVED_PACKAGE = "systemd-resolved"

HOSTNAME = "kodepipe"
# Kernel command line the image is meant to be booted with ("quiet" made no measurable
# difference under TCG and hides why a boot failed).  No "mitigations=off"
# or the like: the VM is a security boundary.
CMDLINE = "root=/dev/vda rw rootfstype=ext4 console=ttyS0"

# GitHub Codespaces' dotfiles convention: the first of these that exists is run.
DOTFILES_SCRIPTS = ["install.sh", "install", "bootstrap.sh", "bootstrap", "script/bootstrap",
                    "setup.sh", "setup", "script/setup"]

APT_TIMEOUT = 3600.0
DOTFILES_TIMEOUT = 3600.0
STEP_TIMEOUT = 600.0

USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
SUITE_RE = re.compile(r"^[a-z][a-z0-9.-]*$")
PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+(:[a-z0-9-]+)?(=[A-Za-z0-9.+~:-]+)?$")

# Runs as the namespace's first process: mount what a chroot needs, then exec
# the command.  $1 = rootfs, $2 = apt archive cache to bind in (or "").
_NS_SETUP = r"""
r=$1; cache=$2; shift 2
mount -t proc proc "$r/proc"
mount -t sysfs sysfs "$r/sys"
mount --rbind /dev "$r/dev"
if [ -n "$cache" ]; then mount --bind "$cache" "$r/var/cache/apt/archives"; fi
exec "$@"
"""

_CHROOT_ENV = ["/usr/bin/env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOME=/root", "LC_ALL=C.UTF-8", "DEBIAN_FRONTEND=noninteractive", "DEBCONF_NONINTERACTIVE_SEEN=true"]


@dataclass
class BuildSpec:
    suite: str  # e.g. "bookworm"
    mirror: str  # e.g. "http://deb.debian.org/debian"
    user: str  # non-root login user, e.g. "kp"
    authorized_keys: list[str]  # OpenSSH public key lines
    packages: list[str] = field(default_factory=list)  # extra Debian packages
    dotfiles: Path | None = None  # directory copied to ~/.dotfiles (its install script is run)
    size: str = "8G"  # virtual disk size for mkfs, e.g. "8G"


# --------------------------------------------------------------------------- helpers

def _guest_files() -> Traversable:
    return resources.files("kodepipe.vm").joinpath("guest", "rootfs")


def _walk(node: Traversable, rel: str = "") -> Iterator[tuple[str, Traversable]]:
    for child in sorted(node.iterdir(), key=lambda c: c.name):
        path = f"{rel}/{child.name}" if rel else child.name
        if child.is_dir():
            yield from _walk(child, path)
        else:
            yield path, child


def install_guest_files(rootfs: Path, user: str) -> list[str]:
    """Copy the packaged guest configuration into ``rootfs``; returns the guest paths written."""
    written = []
    for rel, src in _walk(_guest_files()):
        rel = rel.replace("@USER@", user)
        dest = rootfs / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_symlink() or dest.exists():
            dest.unlink()
        dest.write_text(src.read_text(encoding="utf-8").replace("@USER@", user), encoding="utf-8")
        # sudo ignores a sudoers.d file that is group/world writable or readable by others
        dest.chmod(0o440 if rel.startswith("etc/sudoers.d/") else 0o644)
        written.append("/" + rel)
    return written


def find_dotfiles_script(dotfiles: Path) -> str | None:
    for name in DOTFILES_SCRIPTS:
        if (dotfiles / name).is_file():
            return name
    return None


def _user_ids(rootfs: Path, user: str) -> tuple[int, int, str]:
    for line in (rootfs / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if len(fields) >= 7 and fields[0] == user:
            return int(fields[2]), int(fields[3]), fields[5]
    raise KpError(f"user {user} was not created in the image")


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.lchown(path, uid, gid)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), uid, gid)


def validate(spec: BuildSpec) -> None:
    if not USER_RE.match(spec.user) or spec.user == "root":
        raise BadInput(f"bad user name {spec.user!r}",
                       hint="use a lower-case login name such as kp (not root)")
    if not SUITE_RE.match(spec.suite):
        raise BadInput(f"bad suite {spec.suite!r}", hint="pass a Debian suite such as --suite bookworm")
    if not re.match(r"^(https?|file|ftp)://\S+$", spec.mirror):
        raise BadInput(f"bad mirror URL {spec.mirror!r}",
                       hint="pass --mirror http://deb.debian.org/debian or a local mirror")
    for name in spec.packages:
        if not PACKAGE_RE.match(name):
            raise BadInput(f"bad package name {name!r}", hint="give Debian package names")
    if not re.match(r"^[0-9]+[KMGT]?$", spec.size):
        raise BadInput(f"bad disk size {spec.size!r}", hint="use a size such as 8G")
    for key in spec.authorized_keys:
        if "\n" in key.strip() or not key.strip():
            raise BadInput("an authorized key must be one non-empty line")
    if spec.dotfiles is not None and not spec.dotfiles.is_dir():
        raise BadInput(f"dotfiles {spec.dotfiles} is not a directory")


# --------------------------------------------------------------------------- the build

class _Builder:
    def __init__(self, spec: BuildSpec, workdir: Path, progress: Callable[[str], None], log: Path,
                 cache_dir: Path | None) -> None:
        self.spec = spec
        self.workdir = workdir
        self.progress = progress
        self.log = log
        self.cache_dir = cache_dir.resolve() if cache_dir is not None else None
        self.rootfs = Path()
        self.timings: dict[str, float] = {}
        self.created: list[Path] = []
        self.current = ""

    def step(self, name: str) -> _Timer:
        self.current = name
        self.progress(name)
        return _Timer(self.timings, name)

    def in_namespace(self, argv: list[str], *, timeout: float, apt_cache: bool = False) -> None:
        cache = ""
        if apt_cache and self.cache_dir is not None:
            cache = str(self.cache_dir / "apt")
            (self.cache_dir / "apt" / "partial").mkdir(parents=True, exist_ok=True)
        proc.run(["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child",
                  "--", "sh", "-euc", _NS_SETUP, "kp-chroot", str(self.rootfs), cache, *argv],
                 log=self.log, timeout=timeout)

    def chroot(self, script: str, *, timeout: float = STEP_TIMEOUT, apt_cache: bool = False) -> None:
        self.in_namespace([proc.require("chroot"), str(self.rootfs), *_CHROOT_ENV, "/bin/sh", "-euxc", script],
                          timeout=timeout, apt_cache=apt_cache)

    def host_resolv_conf(self) -> None:
        # apt and the dotfiles script need DNS inside the chroot
        target = self.rootfs / "etc/resolv.conf"
        if target.is_symlink() or target.exists():
            target.unlink()
        try:
            shutil.copyfile("/etc/resolv.conf", target)
        except OSError:
            target.write_text("")

    def run(self) -> dict[str, Any]:
        spec = self.spec
        for program in ("debootstrap", "unshare", "chroot", "mkfs.ext4", "qemu-img"):
            proc.require(program)
        self.workdir.mkdir(parents=True, exist_ok=True)
        for name in ("disk.qcow2", "vmlinuz", "initrd.img", "disk.raw"):
            if (self.workdir / name).exists():
                raise KpError(f"{self.workdir / name} already exists", code="exists",
                              hint="build into an empty directory")
        # The rootfs lives beside the outputs so mkfs -d reads from the same file system.
        self.rootfs = Path(tempfile.mkdtemp(prefix=".rootfs-", dir=self.workdir))
        self.rootfs.chmod(0o755)

        with self.step("debootstrap"):
            self.debootstrap()
        with self.step("configure"):
            self.configure()
        with self.step("kernel"):
            packages = self.install_packages()
        if spec.dotfiles is not None:
            with self.step("dotfiles"):
                self.dotfiles(spec.dotfiles)
        with self.step("cleanup"):
            self.finalize()
            kernel_version = self.copy_kernel()
        with self.step("mkfs"):
            raw = self.workdir / "disk.raw"
            self.created.append(raw)
            proc.run(["mkfs.ext4", "-q", "-F", "-L", "kp-root", "-d", self.rootfs, raw, spec.size],
                     log=self.log, timeout=STEP_TIMEOUT)
            rootfs_bytes = _tree_size(self.rootfs)
            remove_tree(self.rootfs, mount_wait=MOUNT_WAIT)
        with self.step("convert"):
            qcow = self.workdir / "disk.qcow2"
            self.created.append(qcow)
            proc.run(["qemu-img", "convert", "-O", "qcow2", raw, qcow], log=self.log, timeout=STEP_TIMEOUT)
            raw.unlink()
        return {
            "suite": spec.suite,
            "mirror": spec.mirror,
            "user": spec.user,
            "packages": packages,
            "kernel_version": kernel_version,
            "cmdline": CMDLINE,
            "disk_size": spec.size,
            "disk_bytes": qcow.stat().st_size,
            "rootfs_bytes": rootfs_bytes,
            "kernel_bytes": (self.workdir / "vmlinuz").stat().st_size,
            "initrd_bytes": (self.workdir / "initrd.img").stat().st_size,
            "timings": {k: round(v, 1) for k, v in self.timings.items()},
        }

    def debootstrap(self) -> None:
        debootstrap(self.spec.suite, self.spec.mirror, self.rootfs, log=self.log, cache_dir=self.cache_dir,
                    include=BASE_PACKAGES)

    def configure(self) -> None:
        spec = self.spec
        r = self.rootfs
        self.host_resolv_conf()
        # keep maintainer scripts from starting daemons inside the chroot
        policy = r / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        install_guest_files(r, spec.user)
        keys = "".join(k.strip() + "\n" for k in spec.authorized_keys)
        user = shlex.quote(spec.user)
        self.chroot(f"""
useradd --create-home --shell /bin/bash --user-group {user}
# "*": no password (not even an empty one) and not "locked", so sshd key logins work
usermod --password '*' {user}
usermod --password '*' root
install -d -m 0700 -o {user} -g {user} /home/{user}/.ssh
""")
        ak = r / "home" / spec.user / ".ssh" / "authorized_keys"
        ak.write_text(keys)
        uid, gid, _ = _user_ids(r, spec.user)
        os.chown(ak, uid, gid)
        ak.chmod(0o600)

    def install_packages(self) -> list[str]:
        """Install the kernel (after the initramfs config is in place, so its initrd is
        built once and small), Podman, systemd-resolved when the suite has it, and the extras."""
        extras = " ".join(shlex.quote(p) for p in self.spec.packages)
        try:
            self.chroot(f"""
pkgs="{KERNEL_PACKAGE} {" ".join(CONTAINER_PACKAGES)} {extras}"
if apt-cache show {RESOLVED_PACKAGE} >/dev/null 2>&1; then pkgs="$pkgs {RESOLVED_PACKAGE}"; fi
apt-get install -y --no-install-recommends -o Dpkg::Options::=--force-confold {' '.join(INITRD_PACKAGES)}
apt-get install -y --no-install-recommends -o Dpkg::Options::=--force-confold $pkgs
""", timeout=APT_TIMEOUT, apt_cache=True)
        except CommandFailed as exc:
            text = str(exc)
            hint = f"see the full log in {self.log}"
            if "Unable to locate package" in text or "has no installation candidate" in text:
                hint = f"check the package names given to --package (suite {self.spec.suite})"
            elif re.search(r"Failed to fetch|Could not resolve|Temporary failure", text):
                hint = f"check that the mirror {self.spec.mirror} is reachable, or pass another with --mirror"
            raise KpError(f"installing {KERNEL_PACKAGE} and packages failed: {text}",
                          code="packages_failed", hint=hint) from exc
        installed = set(BASE_PACKAGES + INITRD_PACKAGES + [KERNEL_PACKAGE, *CONTAINER_PACKAGES] + self.spec.packages)
        if self.has_resolved():
            installed.add(RESOLVED_PACKAGE)
        return sorted(installed)

    def has_resolved(self) -> bool:
        return any((self.rootfs / d / "systemd-resolved.service").exists()
                   for d in ("lib/systemd/system", "usr/lib/systemd/system"))

    def dotfiles(self, src: Path) -> None:
        spec = self.spec
        uid, gid, home = _user_ids(self.rootfs, spec.user)
        dest = self.rootfs / home.lstrip("/") / ".dotfiles"
        shutil.copytree(src, dest, symlinks=True)
        _chown_tree(dest, uid, gid)
        script = find_dotfiles_script(dest)
        if script is None:
            return
        self.host_resolv_conf()  # the script may download things
        run = f"./{script}" if os.access(dest / script, os.X_OK) else f"sh ./{script}"
        start = self.log.stat().st_size if self.log.exists() else 0
        try:
            self.in_namespace([
                proc.require("chroot"), f"--userspec={uid}:{gid}", str(self.rootfs),
                "/usr/bin/env", "-i", f"HOME={home}", f"USER={spec.user}", f"LOGNAME={spec.user}",
                "SHELL=/bin/bash", "PATH=/usr/local/bin:/usr/bin:/bin", "LC_ALL=C.UTF-8", "TERM=dumb",
                "/bin/sh", "-c", f'cd "$HOME/.dotfiles" && exec {run}'], timeout=DOTFILES_TIMEOUT)
        except CommandFailed as exc:
            # show only what the script printed, not the namespace set-up before it
            with open(self.log, "rb") as f:
                f.seek(start)
                output = f.read().decode("utf-8", "replace")
            marker = f"exec {run}'\n"
            output = output.split(marker, 1)[-1]
            status = re.search(r"exited with status (-?\d+)", str(exc))
            raise KpError(f"the dotfiles script {script} failed (exit status {status.group(1) if status else '?'}):"
                          f"\n{proc.tail(output)}", code="dotfiles_failed",
                          hint=f"fix {src / script} (it runs as {spec.user} with HOME={home}) "
                          "or build without --dotfiles") from exc

    def finalize(self) -> None:
        r = self.rootfs
        resolved = self.has_resolved()
        units = "systemd-networkd.service kp-ssh-hostkey.service ssh.service"
        if resolved:
            units += " systemd-resolved.service"
        self.chroot(f"""
systemctl enable {units}
# first boot must not stop at an interactive locale/timezone/password prompt
systemctl mask systemd-firstboot.service
for unit in {" ".join(DISABLED_UNITS)}; do
    if [ -e "/lib/systemd/system/$unit" ]; then systemctl disable "$unit"; fi
done
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/debconf/*-old /var/lib/dpkg/*-old
# per-clone identity: made at first boot, never shared through the image
rm -f /etc/ssh/ssh_host_* /var/lib/systemd/random-seed /var/lib/systemd/credential.secret
rm -f /var/lib/dbus/machine-id
: > /etc/machine-id
ln -s /etc/machine-id /var/lib/dbus/machine-id
rm -rf /var/log/apt/* /var/log/*.log /tmp/* /var/tmp/* /root/.bash_history
""")
        (r / "usr/sbin/policy-rc.d").unlink(missing_ok=True)
        conf = r / "etc/resolv.conf"
        conf.unlink(missing_ok=True)
        if resolved:
            conf.symlink_to("../run/systemd/resolve/stub-resolv.conf")
        else:
            conf.write_text("")

    def copy_kernel(self) -> str:
        boot = self.rootfs / "boot"
        kernels = sorted(boot.glob("vmlinuz-*"))
        if not kernels:
            raise KpError(f"no kernel was installed in {boot}", hint=f"see the full log in {self.log}")
        version = kernels[-1].name.removeprefix("vmlinuz-")
        initrd = boot / f"initrd.img-{version}"
        if not initrd.exists():
            raise KpError(f"no initrd was built for kernel {version}", hint=f"see the full log in {self.log}")
        for src, name in ((kernels[-1], "vmlinuz"), (initrd, "initrd.img")):
            dest = self.workdir / name
            self.created.append(dest)
            shutil.copyfile(src, dest)
            dest.chmod(0o644)
        return version

    def cleanup(self) -> None:
        if self.rootfs != Path() and self.rootfs.exists():
            remove_tree(self.rootfs, mount_wait=MOUNT_WAIT)
        for path in self.created:
            path.unlink(missing_ok=True)


class _Timer:
    def __init__(self, timings: dict[str, float], name: str) -> None:
        self.timings = timings
        self.name = name

    def __enter__(self) -> None:
        self.start = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        self.timings[self.name] = time.monotonic() - self.start


def _tree_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def build(spec: BuildSpec, workdir: Path, *, progress: Callable[[str], None], log: Path,
          cache_dir: Path | None) -> dict[str, Any]:
    """Build disk.qcow2, vmlinuz and initrd.img into ``workdir``; return facts for the image record.

    On failure or interruption the temporary rootfs and every partial output
    are removed; failures are re-raised as KpError, interruptions
    (KeyboardInterrupt, errors.Interrupted) as themselves after the cleanup.
    """
    validate(spec)
    builder = _Builder(spec, workdir, progress, log, cache_dir)
    try:
        return builder.run()
    except BaseException as exc:
        try:
            builder.cleanup()
        except KpError as cleanup_error:
            exc.add_note(f"cleanup failed too: {cleanup_error.message}")
        if type(exc) is CommandFailed or isinstance(exc, OSError):
            # a step without its own explanation: at least say which step it was
            raise KpError(f"building the image failed at the {builder.current} step: {exc}",
                          code="build_failed", hint=f"see the full log in {log}") from exc
        raise
