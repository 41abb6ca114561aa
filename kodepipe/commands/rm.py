"""kp-rm: remove what records or names name."""

from __future__ import annotations

import click

from kodepipe import cli as kpcli
from kodepipe.commands import options
from kodepipe.errors import InUse, KpError


@click.command(context_settings=options.CONTEXT, epilog=options.EPILOG)
@click.argument("names", nargs=-1, metavar="[NAME]...",
                shell_complete=kpcli.name_completion(("image", "vm", "container")))
@click.option("-f", "--force", is_flag=True,
              help="Remove an image even though clones still use it (they become broken).")
@click.option("-n", "--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@options.quiet
def cli(names: tuple[str, ...], force: bool, dry_run: bool, quiet: bool) -> int:
    """Remove the images, VMs and containers that NAMEs, or the records on stdin, name.

    Without NAMEs, reads records (from kp-ls, kp-clone, ...) and removes
    what each image or vm record names; other records pass through.  A
    record carrying an "id" removes only that very object: if the name was
    since re-created, the new one is left alone.  A record that a stage
    failed on is still cleaned up, unless it names nothing that was made.

    Idempotent: something already gone is not an error.  An image that
    clones still use is refused unless --force; workspaces are never
    touched.  Removing a container stops it if it still runs and discards
    its folder: quarantined changes that were not applied, audit logs.  Writes each removed record with "removed": true.

    \b
    Examples:
      kp-rm proj
      kp-ls --older-than 1d --kind vm | kp-rm
      kp-ls --state broken | kp-rm --dry-run
    """
    from kodepipe import inventory
    from kodepipe.records import Record, check_name
    from kodepipe.state import Store

    options.check_names(names)
    if not names and not kpcli.stdin_is_piped():
        raise click.UsageError("give NAMEs, or pipe records in (for example: kp-ls --older-than 1d | kp-rm)")
    out = kpcli.Output("kp-rm", quiet=quiet)
    store = Store()
    if not dry_run:
        store.empty_trash()

    def remove(kind: str, name: str, expect_id: str | None, record: Record, retry: bool) -> bool:
        """Remove one thing and write its record; False if it should be retried later."""
        try:
            removed = inventory.remove(store, kind, name, expect_id=expect_id, force=force, dry_run=dry_run)
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
    deferred: list[tuple[str, str, str | None, Record]] = []
    if names:
        for name in names:
            found = store.lookup(name)
            if found is None:
                out.info(f"{name}: nothing by that name (already removed?)")
                continue
            record = {"kind": found[0], "name": name}
            if not remove(found[0], name, None, record, retry=True):
                deferred.append((found[0], name, None, record))
    else:
        for _, record in out.records():
            kind = record.get("kind")
            if kind not in inventory.KINDS or ("error" in record and "id" not in record):
                out.emit(record)
                continue
            try:
                name = check_name(record.get("name"), f"{kind} name")
            except KpError as exc:
                out.fail(record, exc)
                continue
            rid = record.get("id")
            expect_id = rid if isinstance(rid, str) else None
            if not remove(str(kind), name, expect_id, record, retry=True):
                deferred.append((str(kind), name, expect_id, record))
    for kind, name, expect_id, record in deferred:
        remove(kind, name, expect_id, record, retry=False)
    return out.status()


def main() -> None:
    kpcli.run(cli, "kp-rm")
