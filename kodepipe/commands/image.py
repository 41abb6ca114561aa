"""kp-image: build golden VM images, the local container base image and the egress proxy's image."""

from __future__ import annotations

import re
from pathlib import Path

import click

from kodepipe.commands import cli as kpcli
from kodepipe.commands import options

PACKAGE_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+")
USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,30}")
SIZE_RE = re.compile(r"[1-9][0-9]*[MGT]")
SUITE_RE = re.compile(r"[a-z][a-z0-9-]*")


@click.group(context_settings=options.CONTEXT, epilog=options.EPILOG)
def cli() -> None:
    """Build golden VM images that kp-clone clones, and the container base image.

    List VM images with kp-ls --kind image and remove them with kp-rm.
    kp-image base makes the local Podman image that kp-run's profiles are
    built on, without any container registry; kp-image egress makes the
    egress proxy's image that kp-run --emit kube --allow deploys.
    """


def _packages(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[str]:
    packages = [p for value in values for p in re.split(r"[,\s]+", value) if p]
    for package in packages:
        if not PACKAGE_RE.fullmatch(package):
            raise click.BadParameter(f"{package!r} is not a Debian package name")
    return packages


def _match(pattern: re.Pattern[str], what: str):  # type: ignore[no-untyped-def]
    def check(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is not None and not pattern.fullmatch(value):
            raise click.BadParameter(f"{value!r} is not {what}")
        return value
    return check


@cli.command(context_settings=options.CONTEXT, epilog=options.EPILOG)
@click.argument("name")
@click.option("--ssh-key", "ssh_keys", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Public key allowed to log in (repeatable). Default: ~/.ssh/id_ed25519.pub, "
                   "id_ecdsa.pub or id_rsa.pub, whichever exists. kodepipe's own key is always added.")
@click.option("--user", default="kp", show_default=True, callback=_match(USER_RE, "a Linux user name"),
              help="The non-root login user (passwordless sudo, key-only SSH).")
@click.option("--packages", multiple=True, callback=_packages, metavar="PKG[,PKG...]",
              help="Extra Debian packages to install (repeatable, comma-separated).")
@click.option("--dotfiles", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Directory copied to ~/.dotfiles; its install.sh (or bootstrap.sh, setup.sh, "
                   "script/bootstrap, ...) runs as the user at build time.")
@click.option("--suite", callback=_match(SUITE_RE, "a Debian suite name"),
              help="Debian release, e.g. bookworm. Default: the one apt is configured with.")
@click.option("--mirror", metavar="URL", help="Debian mirror. Default: the one apt is configured with.")
@click.option("--size", default="8G", show_default=True, callback=_match(SIZE_RE, "a size like 8G"),
              help="Virtual size of the disk (clones grow into it as they write).")
@click.option("-v", "--verbose", is_flag=True, default=None, help="Show progress even when stderr is not a terminal.")
@options.quiet
def build(name: str, ssh_keys: tuple[Path, ...], user: str, packages: list[str], dotfiles: Path | None,
          suite: str | None, mirror: str | None, size: str, verbose: bool | None, quiet: bool) -> int:
    """Build the golden VM image NAME from Debian with debootstrap.

    The image has systemd, openssh-server (key-only login for USER, who has
    passwordless sudo), qemu-guest-agent, DHCP on the virtio NIC and a
    serial console; it has an empty machine-id and no SSH host keys, so
    each clone makes its own at first boot.  A kernel and a small initrd
    sit beside the disk for direct kernel boot.  Packages come from the
    Debian mirror that apt uses, through a local cache; no registry.

    Needs root (debootstrap, chroot).  Takes a minute or two; progress goes
    to stderr on a terminal.  A failed or interrupted build leaves nothing
    behind but its log.  Writes one image record.

    \b
    Examples:
      kp-image build base
      kp-image build dev --packages git,build-essential --dotfiles ~/dotfiles
    """
    import os

    from kodepipe.core import proc
    from kodepipe.core.errors import KpError, NoPermission
    from kodepipe.core.state import Store
    from kodepipe.host.debian import detect_mirror
    from kodepipe.vm import images, sshkeys
    from kodepipe.vm.imagebuild import BuildSpec

    options.check_names([name])
    out = kpcli.Output("kp-image", verbose=verbose, quiet=quiet)
    for program in ("debootstrap", "unshare", "chroot", "mkfs.ext4", "qemu-img"):
        proc.require(program)
    if os.geteuid() != 0:
        raise NoPermission("building an image needs root (debootstrap and chroot)",
                           hint="run it with sudo; clones, VMs and containers then work as your user")
    keys = [sshkeys.read_public_key(p) for p in ssh_keys]
    if not ssh_keys:
        own = sshkeys.default_user_key()
        if own is not None:
            keys.append(sshkeys.read_public_key(own))
        else:
            out.info("no ~/.ssh/id_*.pub found: only kodepipe's own key can log in (kp-ssh uses it)")
    keys.append(sshkeys.own_key()[1])
    if mirror is None or suite is None:
        found_mirror, found_suite = detect_mirror()
        mirror, suite = mirror or found_mirror, suite or found_suite
    spec = BuildSpec(suite=suite, mirror=mirror, user=user, authorized_keys=list(dict.fromkeys(keys)),
                     packages=packages, dotfiles=dotfiles, size=size)
    out.progress(f"building image {name}: Debian {suite} from {mirror}")
    try:
        record = images.build(Store(), name, spec, out.progress)
    except KpError as exc:
        out.fail({"kind": "image", "name": name}, exc)
        return out.status()
    out.progress(f"image {name} is ready ({record.get('build_seconds')} s)")
    out.emit(record)
    return out.status()


@cli.command(context_settings=options.CONTEXT, epilog=options.EPILOG)
@click.argument("name", shell_complete=kpcli.name_completion(("image",)))
@click.option("-m", "--memory", default="1G", show_default=True, help="Guest memory of the warm machine "
              "(its clones keep it).")
@click.option("-c", "--cpus", default=2, show_default=True, type=click.IntRange(1, 64), help="Virtual CPUs.")
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto", show_default=True,
              help="As in kp-boot; clones resume with the same accelerator.")
@click.option("-t", "--timeout", default=300.0, show_default=True, type=options.FiniteRange(10, 3600),
              help="Seconds to wait for the boot.")
@click.option("-f", "--force", is_flag=True, help="Remake the warm state even though clones resume from it "
              "(they become broken).")
@click.option("-v", "--verbose", is_flag=True, default=None, help="Show progress even when stderr is not a terminal.")
@options.quiet
def warm(name: str, memory: str, cpus: int, accel: str, timeout: float, force: bool, verbose: bool | None,
         quiet: bool) -> int:
    """Boot the image NAME once and save the running machine, so clones start in seconds.

    Waits until the guest agent and SSH answer, then saves the device
    state (warm.state) and, apart, the guest's RAM (warm.ram, its zero
    pages left as holes) beside the golden disk.  Clones made afterwards
    (kp-clone, unless --cold) resume from it: SSH-ready in a few seconds
    instead of a cold boot.  Their RAM is mapped copy-on-write from one
    sealed copy of warm.ram that a keeper process holds while clones start
    from it: a page a clone never writes is shared by all of them, so idle
    clones cost little more than one, and a resume copies no RAM.  Nothing,
    not even a QEMU that its guest took over, can write the shared copy.
    Each resumed clone is given its own identity at once: clock, hostname,
    machine-id, SSH host key, MAC, and fresh randomness mixed into its
    kernel RNG.  Writes the image record, with "warm" ("ram", "ram_bytes").
    A warm state made before warm.ram existed holds its RAM in warm.state:
    its clones resume from it unshared; --force remakes it.

    \b
    Examples:
      kp-image warm base && kp-clone base proj | kp-boot | kp-ip | kp-ssh -- uptime
    """
    from kodepipe.core import proc
    from kodepipe.core.errors import BadInput, KpError
    from kodepipe.core.state import Store
    from kodepipe.vm import qemu
    from kodepipe.vm.accel import choose
    from kodepipe.vm.warm import make_warm

    options.check_names([name])
    try:
        qemu.BootOptions(memory=memory, cpus=cpus).check()
    except BadInput as exc:
        raise click.BadParameter(exc.message) from None
    proc.require(qemu.QEMU)
    out = kpcli.Output("kp-image", verbose=verbose, quiet=quiet)
    try:
        record = make_warm(Store(), name, memory=memory, cpus=cpus, accel=choose(accel),
                           timeout=timeout, force=force, progress=out.progress)
    except KpError as exc:
        out.fail({"kind": "image", "name": name}, exc)
        return out.status()
    out.emit(record)
    return out.status()


@cli.command(context_settings=options.CONTEXT, epilog=options.EPILOG)
@click.option("--suite", callback=_match(SUITE_RE, "a Debian suite name"),
              help="Debian release, e.g. bookworm. Default: the one apt is configured with.")
@click.option("--mirror", metavar="URL", help="Debian mirror. Default: the one apt is configured with.")
@click.option("--rebuild", is_flag=True, help="Build it again even if it exists (profile images built on the "
              "old one are rebuilt on their next use).")
@click.option("-v", "--verbose", is_flag=True, default=None, help="Show progress even when stderr is not a terminal.")
@options.quiet
def base(suite: str | None, mirror: str | None, rebuild: bool, verbose: bool | None, quiet: bool) -> int:
    """Build the container base image localhost/kodepipe-base:SUITE for kp-run.

    A minimal Debian (debootstrap --variant=minbase, with no .debs, apt
    lists or temporary files left in it) imported into Podman's store with
    podman import: no container registry is used.  It has a passwd entry
    "agent" for uid and gid 1000 (home /tmp/home), the user kp-run runs
    agents as.  The CA certificates this host trusts locally
    (/usr/local/share/ca-certificates) are copied in, so TLS through a
    proxy the host trusts works in the profile images too.  kp-run's profile
    images are built FROM it; kp-run makes it on first use if it is
    missing, so this command is for doing that ahead of time or again.

    If the image exists, kp-image base only writes its record (unless
    --rebuild).  Building needs root and Podman; it takes about a minute
    and is logged to the cache dir (logs/kodepipe-base-SUITE.log).  Writes
    one container-image record with name, image_id, size and created.

    \b
    Examples:
      sudo kp-image base
      kp-image base --suite trixie --mirror http://deb.debian.org/debian --rebuild
    """
    from kodepipe.container import images as containerimage
    from kodepipe.core import proc
    from kodepipe.core.errors import KpError

    proc.require("podman")
    out = kpcli.Output("kp-image", verbose=verbose, quiet=quiet)
    try:
        record = containerimage.ensure_base(suite, mirror, rebuild=rebuild, progress=out.progress)
    except KpError as exc:
        name = containerimage.base_tag(suite) if suite else containerimage.BASE_REPO
        out.fail({"kind": containerimage.KIND, "name": name}, exc)
        return out.status()
    if "build_seconds" in record:
        out.progress(f"{record['name']} is ready ({record['build_seconds']} s)")
    out.emit(record)
    return out.status()


@cli.command(context_settings=options.CONTEXT, epilog=options.EPILOG)
@click.option("--suite", callback=_match(SUITE_RE, "a Debian suite name"),
              help="Debian release of the base image it is built on. Default: the one apt is configured with.")
@click.option("-v", "--verbose", is_flag=True, default=None, help="Show progress, and the build's output, even "
              "when stderr is not a terminal.")
@options.quiet
def egress(suite: str | None, verbose: bool | None, quiet: bool) -> int:
    """Build the egress proxy's image localhost/kodepipe-egress for kp-run --emit kube.

    kp-run --emit kube --allow DOMAIN hands the agent's traffic to a
    Deployment of this image (kp-run --proxy-image, default
    localhost/kodepipe-egress:latest), which runs python3 -m
    kodepipe.egress.serve: the same proxy, checks and decision records as
    kp-run's own, each decision a JSON line on its stdout.

    It is built FROM the local base image (kp-image base, made first if it
    is missing) with python3 from the Debian mirror, kodepipe's proxy
    modules, and the Python packages they import (orjson, dnspython)
    copied from this kodepipe installation: no container registry and no
    Python index is used.  The base image's python3 must be the version
    kodepipe runs on (the build says so when it is not).  It runs as uid
    65534 and needs no capabilities and no writable file.

    The image is tagged localhost/kodepipe-egress:HASH, HASH covering its
    files and the base image, and :latest.  If that image exists, only its
    record is written: another kodepipe, or a new base image (kp-image base
    --rebuild, for Debian's newer python3), makes a new one.  The build is
    logged to the cache dir (logs/kodepipe-egress.log).  Writes one
    container-image record.  To run it in a cluster, push it to a registry
    the cluster pulls from and pass that name to kp-run --proxy-image.

    \b
    Examples:
      sudo kp-image egress
      podman push localhost/kodepipe-egress:latest registry.example/kodepipe-egress:1
    """
    from kodepipe.container import egress_image
    from kodepipe.container import images as containerimage
    from kodepipe.core import proc
    from kodepipe.core.errors import KpError

    proc.require("podman")
    out = kpcli.Output("kp-image", verbose=verbose, quiet=quiet)
    try:
        record = egress_image.ensure(suite, progress=out.progress, echo=out.verbose and not out.quiet)
    except KpError as exc:
        out.fail({"kind": containerimage.KIND, "name": egress_image.LATEST}, exc)
        return out.status()
    if "build_seconds" in record:
        out.progress(f"{record['name']} is ready ({record['build_seconds']} s)")
    out.emit(record)
    return out.status()


def main() -> None:
    kpcli.run(cli, "kp-image")
