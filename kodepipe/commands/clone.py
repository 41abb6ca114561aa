"""kp-clone: copy-on-write clones of a golden image."""

from __future__ import annotations

import click

from kodepipe.commands import cli as kpcli
from kodepipe.commands import options
from kodepipe.core.errors import Exists, KpError


@click.command(context_settings=options.CONTEXT, epilog=options.EPILOG)
@click.argument("base", shell_complete=kpcli.name_completion(("image",)))
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
@click.option("--cold", is_flag=True, help="Boot cold even when BASE is warm (kp-image warm); never take a pooled VM.")
@options.quiet
def cli(base: str, names: tuple[str, ...], cold: bool, quiet: bool) -> int:
    """Make VMs as copy-on-write clones of the golden image BASE.

    Each NAME becomes a VM whose disk is a qcow2 overlay on BASE's disk: it
    takes constant time and a few hundred kilobytes whatever BASE's size.
    Writes one vm record per clone, with state "stopped"; kp-boot starts it.

    When BASE is warm (kp-image warm), clones resume from its saved running
    state at their first kp-boot, unless --cold.  When BASE has a pool
    (kp-pool) with a ready VM, NAME is that VM, handed out at once: its
    record has state "running", its SSH endpoint and "from_pool": true, and
    a kp-pool --refill starts in the background to replace it.

    BASE "-" reads image records from stdin (from kp-image or kp-ls) and
    clones every NAME from each of them; other records pass through
    unchanged.  An existing NAME, or a BASE that is missing or not ready,
    fails that clone (an error record) and changes nothing.

    \b
    Examples:
      kp-clone base proj
      kp-clone base a b c | kp-ls
      kp-ls --kind image base | kp-clone - proj
    """
    from kodepipe.core import proc
    from kodepipe.core.state import Store
    from kodepipe.vm import vms

    options.check_names(names)
    if base != "-":
        options.check_names([base], "BASE")
        if base in names:  # refused at once: its lock would be waited on by the clone itself
            raise click.BadParameter(f"{base!r} is BASE itself: a clone needs a name of its own",
                                     param_hint="NAME")
    proc.require("qemu-img")
    out = kpcli.Output("kp-clone", quiet=quiet)
    store = Store()

    def make(base_name: str, base_id: str | None) -> None:
        from kodepipe.vm import pool

        adopted = False
        for name in names:
            try:
                if name == base_name:  # never wait on the lock it holds itself
                    raise Exists(f"{name} is the base image itself: a clone needs a name of its own")
                record = None if cold else pool.adopt(store, base_name, name, base_id=base_id)
                if record is not None:
                    adopted = True
                    out.progress(f"{name}: handed out by {base_name}'s pool")
                    out.emit(record)
                    continue
                out.emit(vms.clone(store, base_name, name, base_id=base_id, cold=cold))
            except KpError as exc:
                out.fail({"kind": "vm", "name": name, "base": base_name}, exc)
        # after a hand-out, or when the pool had none ready (a host reboot stops every member): refill it
        if adopted or (not cold and pool.settings_or_none(store, base_name) is not None):
            try:
                pool.spawn_refill(store, base_name)
            except KpError as exc:
                out.warn(f"{base_name}: could not start refilling its pool: {exc.message}")

    if base != "-":
        make(base, None)
        return out.status()
    for line, image_name, image_id in out.objects(("image",)):
        out.emit(line.record)
        make(image_name, image_id)
    return out.status()


def main() -> None:
    kpcli.run(cli, "kp-clone")
