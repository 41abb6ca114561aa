"""kp-pool: keep VMs of a warm image resumed and SSH-ready, for kp-clone to hand out."""

from __future__ import annotations

import click

from kodepipe.commands import cli as kpcli
from kodepipe.commands import options


@click.command(context_settings=options.CONTEXT, epilog=options.EPILOG)
@click.argument("base", shell_complete=kpcli.name_completion(("image",)))
@click.option("--size", type=click.IntRange(0, 64), metavar="N",
              help="Keep N VMs ready (0 empties the pool and removes its settings).")
@click.option("--max-memory", callback=options.size, metavar="SIZE",
              help="At most SIZE of guest memory in the pool (default: half of this host's RAM); the pool "
                   "keeps fewer than --size VMs when they would not fit, and says so (limited_by).")
@click.option("--refill", is_flag=True,
              help="Only make the pool whole again, quietly; at once if another kp-pool is filling it "
                   "(kp-clone starts this in the background after it hands a VM out).")
@click.option("-t", "--timeout", default=300.0, show_default=True, type=options.FiniteRange(1, 3600),
              help="Seconds for each VM, from its clone until SSH answers.")
@options.quiet
def cli(base: str, size: int | None, max_memory: int | None, refill: bool, timeout: float, quiet: bool) -> int:
    """Keep VMs of the warm image BASE resumed, reseeded and SSH-ready.

    Each pooled VM is a clone of BASE's warm state (kp-image warm), booted
    with kp-boot's defaults, given its own identity (hostname, machine-id,
    SSH host key and its own SSH client key) and set up as kp-ip sets a VM
    up, until SSH answers. kp-clone BASE NAME then hands the oldest ready
    one out at once instead of making a clone: it renames it NAME (folder,
    record and the guest's hostname), and its record says "from_pool":
    true, with state "running" and its SSH endpoint. kp-clone --cold never
    takes one. After a hand-out, kp-clone starts kp-pool BASE --refill in
    the background; what it could not do is kept, and kp-ls shows it in
    the image record's "pool" (with "problem").

    Pooled VMs are named pool-ID and carry "pool": BASE in their records;
    kp-ls lists them. kp-rm removes one only when it is named: a listing
    piped to kp-rm (kp-ls --older-than 1d | kp-rm from cron) keeps them.
    kp-pool BASE --size 0 empties the pool; so does kp-rm of BASE itself.

    With --size, sets the pool's size, then fills it (or shrinks it) and
    waits until it is whole; without, fills it to the size it has. Writes
    BASE's image record, whose "pool" says the size, the memory budget, how
    many it keeps, its members and how many are ready.

    \b
    Examples:
      kp-image warm base && kp-pool base --size 3
      kp-clone base proj | kp-ssh proj -- uname -n
      kp-pool base --size 0
    """
    from kodepipe.core.errors import KpError
    from kodepipe.core.state import Store
    from kodepipe.vm import images, pool

    options.check_names([base], "BASE")
    out = kpcli.Output("kp-pool", quiet=quiet)
    store = Store()
    say = out.progress
    if refill:  # its stderr is pool.log: each step goes there, with the time, for whoever reads why it failed
        import time

        def say(message: str) -> None:
            out.info(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {message}")
    try:
        if size == 0:
            for name in pool.empty(store, base, progress=out.progress):
                out.info(f"{name}: removed")
        else:
            if size is not None or max_memory is not None:
                current = pool.settings(store, base) or {}
                if size is None and not current:
                    raise click.UsageError(f"{base} has no pool yet: give --size N")
                pool.configure(store, base, size if size is not None else int(current["size"]),
                               max_memory if max_memory is not None else
                               (int(current["max_memory"]) if current else None))
            elif pool.settings(store, base) is None:
                raise click.UsageError(f"{base} has no pool: kp-pool {base} --size N makes one")
            made = pool.fill(store, base, progress=say, timeout=timeout, wait=0.0 if refill else 600.0)
            if made:
                out.progress(f"{base}: {made} VM(s) made ready")
    except KpError as exc:
        if refill and exc.code == "busy":
            return 0  # another kp-pool fills it
        raise
    if not refill:
        record = images.view(store, base)
        record["pool"] = pool.summary(store, base, record)
        out.emit(record)
    return out.status()


def main() -> None:
    kpcli.run(cli, "kp-pool")
