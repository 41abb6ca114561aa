"""kp-boot: start VMs headless."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from kodepipe.commands import cli as kpcli
from kodepipe.commands import options, vmargs


@click.command(context_settings=options.CONTEXT, epilog=options.EPILOG)
@click.argument("names", nargs=-1, metavar="[NAME]...", shell_complete=kpcli.name_completion(("vm",)))
@click.option("-m", "--memory", default="1G", show_default=True, help="Guest memory (M or G).")
@click.option("-c", "--cpus", default=2, show_default=True, type=click.IntRange(1, 64), help="Virtual CPUs.")
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto", show_default=True,
              help="auto uses KVM only where the host has hardware virtualisation (not kvm_pvm) and a test "
                   "guest runs under KVM at least about as fast as under TCG (at most 3x TCG's time), and boots "
                   "a guest again under TCG if its serial console stays silent for 30 s under KVM; kvm fails "
                   "instead of falling back; tcg never uses KVM.")
@click.option("--net", default="user", show_default=True, metavar="user|none|bridge:BR",
              help="user: private NAT by passt (Debian package passt), SSH forwarded to a free port on 127.0.0.1 "
                   "(no privileges); the guest reaches the network and the host's non-loopback addresses as the "
                   "host would, but no service listening on the host's loopback (127.0.0.0/8, ::1), whatever "
                   "address or raw packet it tries; none: no NIC at all; bridge:BR: a tap on host bridge BR for a "
                   "routable address (root).")
@click.option("--host-loopback", is_flag=True,
              help="Loosened: --net user by QEMU's own user networking (slirp) instead of passt, as before "
                   "kodepipe kept guests away from the host's loopback: the guest then reaches every service "
                   "listening on the host's 127.0.0.1 (through 10.0.2.2). Recorded in the vm record "
                   "(host_loopback, loosened). A saved VM resumes with the network it was saved with.")
@click.option("--share", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="One host directory shared read-write into the guest (9p, tag 'workspace'; mounted at "
                   "/workspace by kp-ip). Nothing else of the host is visible. The guest sees the host's owners "
                   "and modes (its user is uid 1000); what it creates is owned on the host by the directory's owner "
                   "(run by root, QEMU runs as the owner of a directory someone else owns; a root-owned one is "
                   "an idmapped mount in QEMU's own mount namespace), with the guest's owner and mode kept in "
                   "extended attributes, so a guest can never plant a setuid file on the host.")
@click.option("--writable-git", is_flag=True,
              help="Loosened: let the guest write the git metadata of the --share (to commit in the guest). By "
                   "default every git repository in the share (each .git, nested ones and bare repositories) is "
                   "read-only to the guest, even as root, so nothing it writes there can make your next git command "
                   "on the host run its code. Either way, when the VM stops (kp-stop, kp-rm) a repository the guest "
                   "made or swapped in the share, and with this flag a changed config or hook, is renamed to a name "
                   "git does not read and listed in the record (git_planted). Recorded in the vm record (loosened).")
@click.option("--allow", "allow", multiple=True, metavar="DOMAIN[:PORTS]",
              help="Seal the guest: its only way out is kodepipe's egress proxy on the host, which lets it reach "
                   "DOMAIN (or *.DOMAIN) on PORTS (default 80,443) and nothing else, with the policy code and "
                   "decision log of kp-run --allow (egress.jsonl in the VM's folder; kp-trace reads it). The "
                   "guest finds the proxy at http://10.0.2.2:3128 (kp-ip sets it up system-wide: the "
                   "environment, apt, sudo); every DNS query it sends, to any resolver, is answered by the proxy "
                   "(names not on the list are refused); any other packet it sends, as root or not, is dropped "
                   "on the host: no other address, no raw IP, no host loopback service, no cloud metadata. "
                   "Repeatable; --net user only.")
@click.option("--allow-file", type=click.Path(dir_okay=False, path_type=Path),
              help="More --allow rules, one per line (# comments).")
@click.option("--resolve", "resolve", multiple=True, metavar="NAME=ADDRESS",
              help="Pin an allowed NAME to ADDRESS for the proxy (which may then be the host's loopback).")
@click.option("--publish", "publish", multiple=True, metavar="[HOSTADDR:]HOSTPORT:GUESTPORT",
              help="Loosened: forward HOSTPORT on the host (127.0.0.1 unless HOSTADDR is given) to GUESTPORT in "
                   "the guest, as SSH is, for a dev server in the VM. Listed in the vm record (publish, "
                   "loosened) and kp-ls. A host port that is taken fails the boot. Repeatable; --net user only.")
@click.option("--disk", "disk", multiple=True, metavar="NAME[:MOUNTPOINT]",
              help="Attach the encrypted data disk NAME (made by kp-disk), its key read now from its source and "
                   "handed to QEMU as a secret object; kp-ip formats it on first use and mounts it at MOUNTPOINT "
                   "(default /mnt/NAME). One VM at a time: a disk another running VM has fails the boot "
                   "(disk_in_use). Not on a warm or saved clone (its hardware is saved). Repeatable.")
@click.option("--preset", "preset_name", metavar="NAME",
              help="Start from the VM preset NAME: dev (open network), agent (sealed: package registries, source "
                   "hosts and model APIs only), offline (no network), credentials (no network, no share), or one of "
                   "yours ($KODEPIPE_CONFIG_DIR/presets/NAME.json). Flags override it, list flags add to it, and "
                   "what they make wider than the preset is recorded in loosened (preset:...).")
@options.quiet
def cli(names: tuple[str, ...], memory: str, cpus: int, accel: str, net: str, host_loopback: bool,
        share: Path | None, writable_git: bool, allow: tuple[str, ...], allow_file: Path | None,
        resolve: tuple[str, ...], publish: tuple[str, ...], disk: tuple[str, ...], preset_name: str | None,
        quiet: bool) -> int:
    """Start VMs headless, from NAMEs or the vm records on stdin.

    Each VM runs as a detached QEMU under QEMU's seccomp sandbox, with a
    QMP socket, a guest-agent socket and a serial console socket (whose
    output is also logged to serial.log in the VM's folder, capped: at
    1 MiB it becomes serial.log.1); direct kernel boot from its image.
    Returns at once: kp-ip waits for the guest (under
    KVM, a cold boot waits for the guest's first line on its serial console,
    at most 30 s; with --accel auto a silent guest is booted again under TCG
    and accel_reason says why).  A VM that is already running passes
    through as it is, unless an option given asks for something it does not
    run with (--allow on an open VM, another --memory, a --preset): that
    fails with running_differently, naming each difference.  One saved with
    kp-stop --save resumes where it was.
    A launch failure carries QEMU's own message.

    QEMU never runs as root: run by root it runs as the owner of the --share
    directory when that is not root, else under sudo as the user who ran
    sudo, else as the system account kodepipe (made if missing); run by a
    user, as that user.  The record's qemu_user says which.  It is
    handed its sockets, disk, kernel, share and tap as open files, and its
    serial log's keeper runs as the same user, so a guest that escapes QEMU
    gets that user, not root.

    \b
    Examples:
      kp-clone base proj | kp-boot | kp-ip
      kp-boot --memory 4G --cpus 2 --share ~/code/proj proj
    """
    from kodepipe.core.errors import BadInput
    from kodepipe.core.state import Store
    from kodepipe.vm import lifecycle, qemu
    from kodepipe.vm.accel import choose

    rules = _rules(allow, allow_file, resolve)
    preset: Any = None
    widened: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()
    if preset_name is not None:
        from kodepipe.core.errors import KpError
        from kodepipe.egress.policy import parse_pin, parse_rule
        from kodepipe.vm import presets

        try:
            preset = presets.load(preset_name)
            for rule in preset.allow:
                parse_rule(rule)
            for pin in preset.resolve:
                parse_pin(pin)
        except KpError as exc:
            where = "" if exc.message.startswith("preset ") else f"preset {preset_name}: "
            raise click.BadParameter(where + exc.message, param_hint="'--preset'") from None
        memory, cpus, net, share, rules, resolve, publish, disk, widened = _apply_preset(
            preset, memory, cpus, net, share, rules, resolve, publish, disk)
        packages = preset.packages
        if packages and net == "none":
            raise click.UsageError(f"preset {preset_name} installs packages through the network: not with --net none")
        share = share.resolve() if share is not None else None
    if writable_git and share is None:
        raise click.UsageError("--writable-git loosens the git protection of a --share: give --share DIR too")
    if host_loopback and net != "user":
        raise click.UsageError("--host-loopback loosens --net user: it has no meaning with --net " + net)
    from kodepipe.vm import disks

    try:
        attached = tuple(disks.parse_attach(d) for d in disk)
    except BadInput as exc:
        raise click.BadParameter(exc.message, param_hint="'--disk'") from None
    if len({n for n, _ in attached}) != len(attached) or len({m for _, m in attached}) != len(attached):
        raise click.BadParameter("each disk once, each at a mount point of its own", param_hint="'--disk'")
    if len(attached) > disks.MAX_DISKS:
        raise click.BadParameter(f"at most {disks.MAX_DISKS} disks per VM", param_hint="'--disk'")
    opts = qemu.BootOptions(memory=memory, cpus=cpus, accel=accel, net=net, share=share.resolve() if share else None,
                            writable_git=writable_git, host_loopback=host_loopback, allow=rules, resolve=resolve,
                            publish=publish, disks=attached, preset=preset_name, widened=widened,
                            packages=packages)
    try:
        from kodepipe.vm.passt import parse_publish

        for each in publish:
            parse_publish(each)
        opts.check()
    except BadInput as exc:
        raise click.BadParameter(exc.message) from None
    # every option is checked before any VM's metadata is touched
    _check_memory(memory)
    if net.startswith("bridge:"):
        _check_bridge(net.split(":", 1)[1])
    out = kpcli.Output("kp-boot", quiet=quiet)
    store = Store()
    chosen: list[tuple[str, str]] = []
    given = _given(preset)

    def act(name: str, expect_id: str | None, record: dict[str, object]) -> dict[str, object]:
        if not chosen:  # probe the accelerator once, and only when there is something to boot
            from kodepipe.core import proc

            proc.require(qemu.QEMU)
            chosen.append(choose(accel))
            out.progress(f"accelerator: {chosen[0][0]} ({chosen[0][1]})")
        _check_saved(store, name, opts, given)
        result, already = lifecycle.boot(store, name, opts, chosen[0], expect_id=expect_id, say=out.warn,
                                         disk_key=_disk_key)
        if not already and chosen[0][0] == "kvm" and result.get("accel") == "tcg":
            # the guest stayed silent under KVM and was booted again under TCG: so will the next ones be
            chosen[0] = ("tcg", str(result.get("accel_reason")))
            out.warn(f"{name}: {chosen[0][1]}")
        if already:
            differ = _differences(result, opts, given)
            if differ:
                from kodepipe.core.errors import KpError

                raise KpError(f"{name} is already {result['state']}, and not as asked: " + "; ".join(differ),
                              code="running_differently",
                              hint=f"kp-stop {name} first to boot it so, or clone another VM (kp-clone --cold "
                                   "for a VM that is neither pooled nor resumed with saved hardware)")
            out.info(f"{name}: already {result['state']}")
        else:
            out.progress(f"{name}: started (pid {result.get('pid')})")
        return result

    return vmargs.run_each(out, names, act)


def _given(preset: Any = None) -> frozenset[str]:
    """The options on the command line (or in the environment), not left at their defaults, and those
    the preset sets."""
    from click.core import ParameterSource

    context = click.get_current_context()
    given = {name for name in context.params
             if context.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)}
    if "allow_file" in given:
        given.add("allow")
    if preset is not None:
        given.add("net")  # a preset always says which network
        for key, sets in (("memory", preset.memory is not None), ("cpus", preset.cpus is not None),
                          ("allow", preset.network == "allowlist"), ("resolve", bool(preset.resolve)),
                          ("publish", bool(preset.publish)), ("disk", bool(preset.disks)),
                          ("share", isinstance(preset.share, str))):
            if sets:
                given.add(key)
    return frozenset(given)


def _check_saved(store: Any, name: str, opts: Any, given: frozenset[str]) -> None:
    """A warm clone or a saved VM resumes with the memory, CPUs and network it was saved with: options
    given that ask for others are refused, never dropped (--net none must not resume an open VM)."""
    if not given & {"memory", "cpus", "net"}:
        return  # nothing asked that a resume could ignore: no view of the VM needed (lifecycle makes one)
    from kodepipe.core.errors import KpError
    from kodepipe.vm import vms

    current = vms.view(store, name)
    saved = current.get("saved")
    if current.get("state") not in ("stopped", "saved") or not isinstance(saved, dict):
        return
    differ = _differences({"memory": saved.get("memory"), "cpus": saved.get("cpus"), "net": saved.get("net")},
                          opts, given & {"memory", "cpus", "net"})
    if differ:
        how = "a warm clone" if saved.get("warm") else "a saved VM"
        raise KpError(f"{name} is {how}: it resumes with what it was saved with, not as asked: " + "; ".join(differ),
                      code="net_on_saved",
                      hint="kp-clone --cold makes a clone that boots as asked" if saved.get("warm")
                      else "boot it without those options, or kp-stop and boot a fresh clone")


def _size(memory: object) -> object:
    """Guest memory in bytes ("1G" and "1024M" are the same), or the value itself when it is not a size."""
    from kodepipe.core.errors import BadInput
    from kodepipe.core.units import parse_size

    try:
        return parse_size(str(memory))
    except BadInput:
        return memory


def _differences(record: dict[str, object], opts: Any, given: frozenset[str]) -> list[str]:
    """How VM ``record``, already running, differs from what the options ``given`` ask for: a running VM
    is never silently taken for one booted as asked (a pooled or warm one above all: --allow must not
    pass as done on an open VM)."""
    out: list[str] = []

    def differ(flag: str, want: object, have: object) -> None:
        if want != have:
            out.append(f"{flag} {want} asked, it runs with {have if have not in (None, [], '') else 'none'}")

    def listed(key: str, within: Any = record) -> list[Any]:
        value = within.get(key) if isinstance(within, dict) else None
        return value if isinstance(value, list) else []

    egress = record.get("egress")
    if "memory" in given and _size(opts.memory) != _size(record.get("memory")):
        differ("--memory", opts.memory, record.get("memory"))
    if "cpus" in given:
        differ("--cpus", opts.cpus, record.get("cpus"))
    if "net" in given:
        differ("--net", opts.net, record.get("net"))
    if "share" in given:
        differ("--share", str(opts.share) if opts.share else None, record.get("share"))
    if "allow" in given or opts.allow:
        differ("--allow", sorted(opts.allow), sorted(map(str, listed("allow", egress))))
    if "resolve" in given:
        differ("--resolve", sorted(opts.resolve), sorted(map(str, listed("resolve", egress))))
    if "publish" in given:
        from kodepipe.vm.passt import parse_publish

        differ("--publish", sorted(str(parse_publish(p)) for p in opts.publish),
               sorted(map(str, listed("publish"))))
    if "disk" in given:
        differ("--disk", sorted(f"{n}:{m}" for n, m in opts.disks),
               sorted(f"{d.get('name')}:{d.get('mountpoint')}" for d in listed("disks") if isinstance(d, dict)))
    if "preset_name" in given:
        differ("--preset", opts.preset, record.get("preset"))
    if "host_loopback" in given:
        differ("--host-loopback", opts.host_loopback, bool(record.get("host_loopback")))
    if "writable_git" in given:
        differ("--writable-git", opts.writable_git, "writable-git" in listed("loosened"))
    if "accel" in given and opts.accel != "auto":
        differ("--accel", opts.accel, record.get("accel"))
    return out


def _apply_preset(preset: Any, memory: str, cpus: int, net: str, share: Path | None, rules: tuple[str, ...],
                  resolve: tuple[str, ...], publish: tuple[str, ...], disk: tuple[str, ...]) -> tuple[Any, ...]:
    """The options as the preset sets them and the flags override (list flags add to the preset's), and
    what the flags made wider than the preset."""
    import dataclasses

    from click.core import ParameterSource

    from kodepipe.vm import presets

    context = click.get_current_context()

    def given(param: str) -> bool:
        return context.get_parameter_source(param) not in (ParameterSource.DEFAULT, None)

    memory = memory if given("memory") or preset.memory is None else preset.memory
    cpus = cpus if given("cpus") or preset.cpus is None else preset.cpus
    if not given("net"):
        net = "none" if preset.network == "none" and not rules else "user"
    if net.startswith("bridge:"):
        network = "open"
    elif net == "none":
        network = "none"
    elif rules or (preset.network == "allowlist" and not given("net")):
        network = "allowlist"
    else:
        network = "open"
    if network == "allowlist":
        rules = (*(preset.allow if preset.network == "allowlist" else ()),
                 *(r for r in rules if r not in preset.allow))
        resolve = (*preset.resolve, *(p for p in resolve if p not in preset.resolve))
    else:
        rules, resolve = (), ()
    if share is None and isinstance(preset.share, str):
        share = Path(preset.share).expanduser()
        if not share.is_dir():
            raise click.BadParameter(f"preset {preset.origin} shares {share}, which is not a directory",
                                     param_hint="'--preset'")
    from kodepipe.core.errors import BadInput
    from kodepipe.vm.passt import parse_publish

    try:  # compared as kp-boot records them (127.0.0.1:8080:80), whichever way they were written
        publish = tuple(dict.fromkeys(str(parse_publish(p)) for p in (*preset.publish, *publish)))
        ours = {str(parse_publish(p)) for p in preset.publish}
    except BadInput as exc:
        raise click.BadParameter(exc.message) from None
    preset = dataclasses.replace(preset, publish=tuple(ours))
    disk = (*preset.disks, *(d for d in disk if d not in preset.disks))
    wider = presets.widenings(preset, network=network, allow=rules, resolve=resolve,
                              share=share is not None and preset.share is False, publish=publish)
    return memory, cpus, net, share, rules, resolve, publish, disk, tuple(wider)


def _disk_key(source: dict[str, object]) -> str:
    """A data disk's key, read from the source its metadata names (as a credential's is read)."""
    from kodepipe.egress import credentials, sources

    return sources.read(credentials.parse_source(source, "the disk's key"))


def _rules(allow: tuple[str, ...], allow_file: Path | None, resolve: tuple[str, ...]) -> tuple[str, ...]:
    """The --allow rules (with --allow-file's), each checked as kp-run checks them, and the pins."""
    from kodepipe.core.errors import BadInput
    from kodepipe.egress.policy import parse_pin, parse_rule

    rules = list(allow)
    try:
        if allow_file is not None:
            from kodepipe.egress.proxy import read_rules

            rules += read_rules(allow_file)
            if not rules:
                raise BadInput(f"--allow-file {allow_file} holds no rule: the guest would reach nothing")
        for rule in rules:
            parse_rule(rule)
        for pin in resolve:
            parse_pin(pin)
    except BadInput as exc:
        raise click.BadParameter(exc.message) from None
    return tuple(rules)


def _check_memory(memory: str) -> None:
    """At least 64M, and no more than the host has (RAM and swap): QEMU would fail to start."""
    mib = int(memory[:-1]) * (1024 if memory.endswith("G") else 1)
    if mib < 64:
        raise click.BadParameter(f"{memory} is too little memory for a guest: at least 64M", param_hint="'--memory'")
    try:
        with open("/proc/meminfo") as info:
            kib = sum(int(line.split()[1]) for line in info if line.startswith(("MemTotal:", "SwapTotal:")))
    except (OSError, ValueError, IndexError):
        return
    if kib and mib > kib // 1024:
        raise click.BadParameter(f"{memory} is more memory than this host has ({kib >> 20} GiB with swap)",
                                 param_hint="'--memory'")


def _check_bridge(bridge: str) -> None:
    """The bridge exists and kp-boot may add a tap to it (CAP_NET_ADMIN), or a clear error now."""
    from kodepipe.core.errors import NoPermission

    if not (Path("/sys/class/net") / bridge / "bridge").is_dir():
        raise click.BadParameter(f"there is no bridge {bridge} on this host: create one (ip link add {bridge} "
                                 "type bridge) with DHCP on it (dnsmasq), or use --net user", param_hint="'--net'")
    try:
        with open("/proc/self/status") as status:
            caps = next((int(line.split()[1], 16) for line in status if line.startswith("CapEff:")), None)
    except (OSError, ValueError):
        caps = None
    cap_net_admin = 12
    if caps is not None and not caps >> cap_net_admin & 1:
        raise NoPermission(f"a tap device on bridge {bridge} needs root (CAP_NET_ADMIN)",
                           hint="run kp-boot with sudo, or use --net user")


def main() -> None:
    kpcli.run(cli, "kp-boot")
