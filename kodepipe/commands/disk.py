"""kp-disk: encrypted persistent data disks for VMs."""

from __future__ import annotations

import click

from kodepipe.commands import cli as kpcli
from kodepipe.commands import options


@click.command(context_settings=options.CONTEXT, epilog=options.EPILOG)
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
@click.option("--size", required=True, metavar="SIZE", help="The disk's size (e.g. 20G, 512M).")
@click.option("--key-env", metavar="VAR",
              help="The key is the value of environment variable VAR, read at kp-disk and at each kp-boot.")
@click.option("--key-file", metavar="PATH",
              help="The key is the content of the file PATH (absolute, or ~/...), read at kp-disk and at each kp-boot.")
@click.option("--key-command", metavar="COMMAND",
              help="The key is what COMMAND prints (split as a shell would, run without a shell; under sudo as "
                   "the user who ran sudo), e.g. 'pass show kodepipe/disk'.")
@options.quiet
def cli(names: tuple[str, ...], size: str, key_env: str | None, key_file: str | None, key_command: str | None,
        quiet: bool) -> int:
    """Make encrypted data disks that VMs keep across clones.

    Each NAME becomes an empty qcow2 of SIZE with QEMU's built-in LUKS
    encryption, in its own folder of the state directory (disks/NAME).
    kp-boot --disk NAME[:MOUNTPOINT] attaches it to one VM at a time;
    kp-ip formats it (ext4) on first use and mounts it in the guest
    (at /mnt/NAME unless told).  It outlives kp-rm of the VM; kp-ls lists
    it (kind "disk"), and kp-rm removes it only when it is named, never
    from records on stdin.

    The key is one line of printable ASCII from exactly one of --key-env,
    --key-file and --key-command.  The disk's metadata keeps where the
    key comes from, never the key: kp-boot reads it again each time and
    hands it to QEMU as a secret object on an inherited pipe, so it is
    never on a command line, in a record or in the guest.

    \b
    Examples:
      kp-disk data --size 20G --key-command 'pass show kodepipe/data'
      kp-clone base proj | kp-boot --disk data:/data | kp-ip
    """
    import shlex

    from kodepipe.core import proc
    from kodepipe.core.errors import BadInput, KpError
    from kodepipe.core.state import Store
    from kodepipe.core.units import parse_size
    from kodepipe.egress import credentials, sources
    from kodepipe.vm import disks

    options.check_names(names)
    given = [(kind, value) for kind, value in (("env", key_env), ("file", key_file), ("command", key_command))
             if value is not None]
    if len(given) != 1:
        raise click.UsageError("give the key's source: exactly one of --key-env, --key-file and --key-command")
    kind, value = given[0]
    if kind == "file" and not value.startswith(("/", "~")):
        import os

        value = os.path.abspath(value)  # kept in the disk's metadata: kp-boot may run elsewhere
    spec: dict[str, object] = {kind: shlex.split(value) if kind == "command" else value}
    try:
        bytes_ = parse_size(size)
        source = credentials.parse_source(spec, "the disk's key")
    except BadInput as exc:
        raise click.BadParameter(exc.message) from None
    proc.require("qemu-img")
    out = kpcli.Output("kp-disk", quiet=quiet)
    key = sources.read(source)  # a key that cannot be read stops here: credential_unavailable
    store = Store()
    for name in names:
        try:
            out.emit(disks.create(store, name, size=bytes_, key=key, source=spec))
            out.progress(f"{name}: {size} encrypted disk made")
        except KpError as exc:
            out.fail({"kind": "disk", "name": name}, exc)
    return out.status()


def main() -> None:
    kpcli.run(cli, "kp-disk")
