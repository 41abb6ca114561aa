"""kp-ls: list the images, VMs and containers that kodepipe owns."""

from __future__ import annotations

import sys
import time

import click

from kodepipe.commands import cli as kpcli
from kodepipe.commands import options


@click.command(context_settings=options.CONTEXT, epilog=options.EPILOG)
@click.argument("names", nargs=-1, metavar="[NAME]...",
                shell_complete=kpcli.name_completion(("image", "vm", "container", "disk")))
@click.option("--kind", "kinds", multiple=True, type=click.Choice(["image", "vm", "container", "disk"]),
              help="Only this kind (repeatable).")
@click.option("--state", "states", multiple=True,
              # inventory.STATES, written out so that --help stays light (a test keeps them equal)
              type=click.Choice(["creating", "building", "ready", "broken", "stopped", "running", "suspended",
                                 "frozen", "saved", "crashed", "exited", "quarantined", "applied", "discarded",
                                 "orphaned", "attached"]), metavar="STATE",
              help="Only this state (repeatable): creating, building, ready, broken, stopped, running, suspended, "
                   "frozen, saved, crashed, exited, quarantined, applied, discarded, orphaned or attached "
                   "(kodepipe(7), STATES, says what each means for each kind).")
@click.option("--older-than", callback=options.duration, metavar="AGE",
              help="Only things created more than AGE ago (90s, 15m, 2h, 1d, 1w, 1h30m).")
@click.option("--newer-than", callback=options.duration, metavar="AGE", help="Only things created less than AGE ago.")
@click.option("--json", "fmt", flag_value="json", help="Write records (the default when stdout is not a terminal).")
@click.option("--table", "fmt", flag_value="table", help="Write a table (the default on a terminal).")
@click.option("-a", "--all", "all_", is_flag=True, help="List everything even when records arrive on stdin.")
def cli(names: tuple[str, ...], kinds: tuple[str, ...], states: tuple[str, ...],
        older_than: float | None, newer_than: float | None, fmt: str | None, all_: bool) -> int:
    """List the images, VMs and containers that kodepipe owns, as records.

    NAMEs are shell patterns (quote them: 'proj-*').  The state is checked
    now, not only read from metadata: an image whose build was killed, or a
    VM whose base is gone, shows as "broken" (with a "problem" key), and
    kp-rm removes it.  Something still being made is "creating" (an image:
    "building") while its creator holds the name's lock, never "broken", and
    kp-rm leaves it to its creator.  Image records list their "clones".
    Containers are the kp-runs in progress and the ones kept: quarantined
    changes to review, audit logs, --keep; one whose kp-run was killed is
    "orphaned".  A VM whose QEMU is alive but stopped (a kp-stop --save cut
    off, a full disk) is "frozen", never "running": QEMU's own
    "qemu_status", a "problem" and a "hint" say why and what to do.  The
    states are listed with their meanings in kodepipe(7).

    Piped to kp-rm, a listing removes only what is disposable: golden
    images, un-applied quarantines and audit or egress logs are kept (kp-rm
    says so on stderr) unless kp-rm names them or is given --images,
    --quarantines or --evidence.  So the cron job below removes old VMs and
    finished runs, never the image they were cloned from.

    When stdin is a pipe or a file (kp-clone base a | kp-ls), kp-ls shows
    the current state of what the image and vm records on it name ("gone"
    if removed), keeping their other keys, and passes other records
    through.  If no record arrives (cron's empty stdin), or with --all, it
    lists everything.

    \b
    Examples:
      kp-ls
      kp-clone base a b | kp-ls
      kp-ls --older-than 1d | kp-rm
      kp-ls --state broken | jq -r .name
    """
    from kodepipe import inventory
    from kodepipe.core.errors import KpError
    from kodepipe.core.state import Store

    out = kpcli.Output("kp-ls")
    store = Store()
    as_table = fmt == "table" or (fmt is None and sys.stdout.isatty())
    chosen = kinds or inventory.KINDS
    shown: list[dict[str, object]] = []

    def show(items: list[dict[str, object]]) -> None:
        items = inventory.select(items, states=states, names=names, older_than=older_than,
                                 newer_than=newer_than)
        if as_table:
            shown.extend(items)
        else:
            for record in items:
                out.emit(record)

    piped = False
    if not all_ and kpcli.stdin_is_piped():
        for line in out.records():
            piped = True
            record, kind = line.record, line.kind
            if kind not in inventory.KINDS or not isinstance(record.get("name"), str):
                if not as_table:
                    out.emit(record)
                continue
            try:
                line.id()  # a wrong-typed id would show the current object as the one the record named
            except KpError as exc:
                if as_table:
                    out.statuses.add(exc.status)
                    out.error(exc.message)  # it names the line: "stdin line 3: ..."
                else:
                    out.fail(record, exc)
                continue
            if kind in chosen:
                show([inventory.refresh(store, record)])
    if not piped:
        show(inventory.records(store, chosen))
    if as_table:
        click.echo(table(shown, colour=kpcli._colour(sys.stdout)), nl=False)
    return out.status()


STATE_COLOURS = {"ready": "green", "running": "green", "quarantined": "yellow", "orphaned": "red",
                 "stopped": "blue", "saved": "blue", "building": "yellow", "creating": "yellow",
                 "suspended": "yellow", "frozen": "red", "broken": "red", "crashed": "red"}


def human_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{max(int(seconds), 0)}s"


def human_size(size: object) -> str:
    if not isinstance(size, int):
        return "-"
    value = float(size)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{value:.0f}{unit}" if unit == "B" or value >= 10 else f"{value:.1f}{unit}"
        value /= 1024
    return "-"


def table(items: list[dict[str, object]], *, colour: bool) -> str:
    from kodepipe.core import terminal
    from kodepipe.inventory import age

    now = time.time()
    rows: list[tuple[str, ...]] = [("KIND", "NAME", "STATE", "AGE", "DISK", "DETAIL")]
    for r in items:
        if r.get("problem"):
            detail = str(r["problem"]) + (f"; {r['hint']}" if r.get("hint") else "")
        elif r.get("kind") == "container":
            detail = f"{r.get('profile') or r.get('image')}"
            if r.get("workspace"):
                detail += f", {r.get('workspace')}"
            q = r.get("quarantine")
            if r.get("state") == "quarantined" and isinstance(q, dict):
                detail += (f", {len(q.get('added') or [])}+ {len(q.get('modified') or [])}~ "
                           f"{len(q.get('deleted') or [])}-")
        elif r.get("kind") == "disk":
            size = r.get("size")
            detail = f"{human_size(size) if isinstance(size, int) else '?'} luks"
            if r.get("attached_to"):
                detail += f", attached to {r['attached_to']}"
        elif r.get("kind") == "image":
            clones = r.get("clones") or []
            detail = f"{len(clones)} clone(s)" if isinstance(clones, list) else ""
            pool = r.get("pool")
            if isinstance(pool, dict):
                detail += f", pool {pool.get('ready', '?')}/{pool.get('keeps', pool.get('size', '?'))} ready"
                if pool.get("problem"):
                    detail += f" ({pool['problem']})"
        else:
            detail = f"base {r.get('base')}" + (", pooled" if r.get("pool") else "")
            ssh = r.get("ssh")
            if r.get("state") in ("running", "suspended") and isinstance(ssh, dict):
                detail += f", ssh {ssh.get('user')}@{ssh.get('host')}:{ssh.get('port')}"
            egress = r.get("egress")
            if r.get("network") == "allowlist" and isinstance(egress, dict):
                detail += f", allow {' '.join(str(rule) for rule in egress.get('allow') or [])}"
            published = r.get("publish")
            if isinstance(published, list) and published:
                detail += f", publish {' '.join(str(p) for p in published)}"
            loosened = r.get("loosened")
            if isinstance(loosened, list):  # e.g. host-loopback: the guest reaches the host's loopback
                shown = [str(item) for item in loosened if not str(item).startswith("publish:")]  # said above
                if shown:
                    detail += f", loosened: {' '.join(shown)}"
        # a cell may quote what an agent or a guest chose (a workspace path, an address): its control
        # characters are shown escaped, never sent to the terminal
        rows.append(tuple(terminal.escape(cell) for cell in (
            str(r.get("kind")), str(r.get("name")), str(r.get("state")),
            human_age(age(r, now)), human_size(r.get("disk_bytes")), detail)))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[i].ljust(widths[i]) for i in range(5)]
        if colour and n and row[2] in STATE_COLOURS:
            cells[2] = click.style(cells[2], fg=STATE_COLOURS[row[2]])
        lines.append("  ".join([*cells, row[5]]).rstrip() + "\n")
    return "".join(lines) if len(rows) > 1 else ""


def main() -> None:
    kpcli.run(cli, "kp-ls")
