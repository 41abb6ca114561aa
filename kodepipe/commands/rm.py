"""kp-rm: remove what records or names name."""

from __future__ import annotations

import click

from kodepipe.commands import cli as kpcli
from kodepipe.commands import options
from kodepipe.core.errors import InUse, KpError


@click.command(context_settings=options.CONTEXT, epilog=options.EPILOG)
@click.argument("names", nargs=-1, metavar="[NAME]...",
                shell_complete=kpcli.name_completion(("image", "vm", "container", "disk")))
@click.option("-f", "--force", is_flag=True,
              help="Remove an image even though clones still use it (they become broken).")
@click.option("--images", is_flag=True,
              help="Also remove the golden images that records on stdin name (a pipe keeps them otherwise).")
@click.option("--quarantines", is_flag=True,
              help="Also discard the un-applied quarantines of containers that records on stdin name.")
@click.option("--evidence", is_flag=True,
              help="Also discard the audit and egress logs of containers that records on stdin name.")
@click.option("-n", "--dry-run", is_flag=True,
              help="Say what would be removed, kept and refused, exactly as a real run would; remove nothing.")
@options.quiet
def cli(names: tuple[str, ...], force: bool, images: bool, quarantines: bool, evidence: bool, dry_run: bool,
        quiet: bool) -> int:
    """Remove the images, VMs and containers that NAMEs, or the records on stdin, name.

    Without NAMEs, reads records (from kp-ls, kp-clone, ...) and removes
    what each image, vm or container record names; other records pass
    through.  A record carrying an "id" removes only that very object: if
    the name was since re-created, the new one is left alone.  A record
    that a stage failed on is still cleaned up, unless it names nothing that
    was made.  A record that showed something "broken" or "creating" without
    an id names that id-less thing, never what the name holds once it has an
    id (a finished or new object).

    What records on stdin name is removed only if it is disposable, so a
    pipe from cron (kp-ls --older-than 1d | kp-rm) cleans up without losing
    anything that took work to make or that is evidence: a golden image
    (with its warm state) is kept unless --images; a container holding
    changes that were never applied (quarantined, or still running in
    quarantine) is kept unless --quarantines; one holding an audit or egress
    log is kept unless --evidence; a VM of a warm pool (kp-pool) is kept;
    a run whose kp-run is still alive (creating or running) is always kept.  Each one kept is said on stderr, one
    line each ("kept: image base is not disposable (a golden image); name it
    or pass --images"; -q silences it), and written on stdout with
    "removed": false and "kept" (why); keeping is not a failure.  A NAME on
    the command line is always removed, whatever it holds: naming it is the
    explicit choice.

    Something being made is never removed while its creator holds the
    name's lock: kp-rm waits for that lock (up to 10 s, then the record
    fails as busy, status 75), then acts on what is there.  Idempotent:
    something already gone is not an error.  An image that clones still use
    is refused unless --force; one that comes before its clones is tried
    again at the end, so kp-ls | kp-rm --images removes both.  Removing an
    image empties its warm pool (kp-pool) first.  Workspaces are never
    touched.  Removing a container stops it if it still runs and
    discards its folder.

    Writes each removed record with "removed": true.  With --dry-run,
    nothing changes, and each record it would remove is written with
    "removed": false and "dry_run": true; what it keeps, refuses and finds
    gone is written as a real run would, because the dry run counts what it
    would have removed before it.

    \b
    Examples:
      kp-rm proj
      kp-ls --older-than 1d | kp-rm
      kp-ls --state broken | kp-rm --dry-run
      kp-ls 'old-*' | kp-rm --images --force
    """
    from kodepipe import inventory
    from kodepipe.core.records import Record
    from kodepipe.core.state import Store

    options.check_names(names)
    if not names and not kpcli.stdin_is_piped():
        raise click.UsageError("give NAMEs, or pipe records in (for example: kp-ls --older-than 1d | kp-rm)")
    out = kpcli.Output("kp-rm", quiet=quiet)
    store = Store()
    if not dry_run:
        store.empty_trash()
    allowed = [flag for flag, on in (("images", images), ("quarantines", quarantines), ("evidence", evidence))
               if on]
    removal = inventory.Removal(store, force=force, dry_run=dry_run, allowed=allowed, say=out.warn)

    def remove(kind: str, name: str, expect_id: str | None, record: Record, bulk: bool, retry: bool) -> bool:
        """Remove one thing and write its record; False if it should be retried later."""
        try:
            removed = removal.remove(kind, name, expect_id=expect_id, bulk=bulk, listed=record if bulk else None)
        except inventory.Kept as kept:
            out.info(f"kept: {kept.message}")
            out.emit({**record, "removed": False, "kept": kept.message})
            return True
        except InUse as exc:
            if retry:
                return False
            out.fail(record, exc)
            return True
        except KpError as exc:
            out.fail(record, exc)
            return True
        if removed is None:
            out.info(f"{name}: already gone")
            out.emit({**record, "removed": False})
        else:
            removed.update(removed=not dry_run)
            if dry_run:
                removed["dry_run"] = True
                out.info(f"{name}: would remove this {kind}")
            out.emit(removed)
        return True

    # An image is often listed before its clones (kp-ls | kp-rm): retry the
    # images refused as in use once the rest of the input is done.
    deferred: list[tuple[str, str, str | None, Record, bool]] = []
    if names:
        for name in names:
            found = store.lookup(name)
            if found is None:
                out.info(f"{name}: nothing by that name (already removed?)")
                continue
            record = {"kind": found[0], "name": name}
            if not remove(found[0], name, None, record, False, retry=True):
                deferred.append((found[0], name, None, record, False))
    else:
        # a failed record is still cleaned up by its id; a wrong-typed name or id is bad input (65)
        for line, name, expect_id in out.objects(inventory.KINDS, honour_failed=True, fields=("state",)):
            kind, record = line.kind, line.record
            if not remove(str(kind), name, expect_id, record, True, retry=True):
                deferred.append((str(kind), name, expect_id, record, True))
    for kind, name, expect_id, record, bulk in deferred:
        remove(kind, name, expect_id, record, bulk, retry=False)
    return out.status()


def main() -> None:
    kpcli.run(cli, "kp-rm")
