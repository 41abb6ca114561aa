"""How the VM commands (kp-boot, kp-ip, kp-ssh, kp-stop) take their VMs:
names as arguments, or vm records on stdin; other records pass through."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from kodepipe.commands import cli as kpcli
from kodepipe.commands import options
from kodepipe.core.errors import KpError
from kodepipe.core.records import Record


def each_vm(out: kpcli.Output, names: tuple[str, ...]) -> Iterator[tuple[str, str | None, Record]]:
    """Yield (name, expected id, record) for each VM to act on.

    Records that are not vm records, or that an earlier stage failed on,
    are written through unchanged; a vm record with a bad name or "id"
    fails (65) and nothing is done for it.
    """
    if names:
        options.check_names(names)
        for name in names:
            yield name, None, {"kind": "vm", "name": name}
        return
    if not kpcli.stdin_is_piped():
        import click

        raise click.UsageError("give VM NAMEs, or pipe vm records in (for example: kp-clone base a | kp-boot)")
    for line, name, rid in out.objects(("vm",)):
        yield name, rid, line.record


def run_each(out: kpcli.Output, names: tuple[str, ...], act: Callable[[str, str | None, Record], Record]) -> int:
    """Apply ``act`` to every VM; write its result over the incoming record, or the error."""
    from kodepipe.vm import vms

    for name, expect_id, record in each_vm(out, names):
        try:
            out.emit(vms.fresh(record, act(name, expect_id, record)))
        except KpError as exc:
            out.fail(record, exc)
    return out.status()
