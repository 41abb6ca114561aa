"""kp-review: the diff and the findings of a quarantined run, before kp-run --apply."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import IO, Any

import click

from kodepipe.commands import cli as kpcli
from kodepipe.commands import options

_COLOURS = {"+": "\x1b[32m", "-": "\x1b[31m", "@": "\x1b[36m", "d": "\x1b[1m", "i": "\x1b[1m", "n": "\x1b[1m",
            "B": "\x1b[33m", "o": "\x1b[1m", "r": "\x1b[1m", "s": "\x1b[1m", "G": "\x1b[33m", "\\": "\x1b[2m"}
_RESET = "\x1b[0m"


@click.command(context_settings=options.CONTEXT, epilog=options.EPILOG)
@click.argument("names", nargs=-1, metavar="[NAME]...", shell_complete=kpcli.name_completion(("container",)))
@click.option("--stat", is_flag=True, help="The summary only: git's --stat and --summary, and what git does not "
                                           "show (directories, special files, permission bits).")
@click.option("--findings", "as_findings", is_flag=True,
              help="Write the findings as records (kind \"finding\"), one per line, instead of the diff.")
@click.option("--patch", "patch_file", metavar="FILE",
              help="Also write an mbox patch of the changes to FILE ('-': stdout instead of the diff), binary "
                   "files included: git am makes it a commit authored as the agent.")
@click.option("--binary", is_flag=True, help="Show binary files as git binary patches (git apply takes them).")
@click.option("--color", "colour", type=click.Choice(["auto", "always", "never"]), default="auto",
              show_default=True, help="Colour the diff: auto colours it on a terminal unless NO_COLOR is set.")
@options.quiet
def cli(names: tuple[str, ...], stat: bool, as_findings: bool, patch_file: str | None, binary: bool, colour: str,
        quiet: bool) -> int:
    """Show what a quarantined kp-run changed, and what deserves a look, before kp-run --apply.

    Takes a snapshot of each NAMEd run's quarantine (or of the container
    records on stdin), read once through directory fds, and shows it as
    git's own unified diff of the workspace's files and the agent's: in a
    pipe it is plain, so "kp-review run-x | less" and "kp-review run-x |
    git apply" work (text changes; --binary adds binary ones); on a
    terminal it is coloured, and every control character an agent put in
    a file is escaped.  Names with odd bytes are quoted as git quotes them.

    Then the findings, on stderr, one line each: secrets in added lines
    (detect-secrets' format plugins, private keys, KEY=value assignments;
    never the secret itself, only a redacted excerpt and a fingerprint),
    mass deletions, changes to what runs outside the sandbox later (.git,
    CI definitions, package install scripts, build files, shell start-up
    files, .envrc, editor tasks), setuid/setgid bits, file capabilities,
    symlinks out of the workspace, devices and fifos, names with control
    characters and very large additions.  The rules are data: kodepipe(7)
    lists them, and $KODEPIPE_CONFIG_DIR/review/*.json adds to them or
    changes them.

    The snapshot's id is saved with the run: kp-run --apply takes a new
    snapshot and refuses if it is not the one reviewed, and it checks every
    file it writes against the snapshot, so what lands is what was shown.
    It also refuses on findings at or above --fail-on (high) unless
    --accept or --force.

    \b
    Examples:
      kp-review run-1a2b3c4d | less -R
      kp-review --stat run-1a2b3c4d
      kp-review --findings run-1a2b3c4d | jq -r 'select(.severity == "high") | .path'
      kp-review --patch agent.patch run-1a2b3c4d && git am agent.patch
      kp-ls --kind container --state quarantined | kp-review --stat
    """
    from kodepipe.core.errors import KpError
    from kodepipe.core.records import check_name
    from kodepipe.core.state import Store

    out = kpcli.Output("kp-review", quiet=quiet)
    store = Store()
    options.check_names(names)
    targets: list[tuple[str, str | None, dict[str, Any]]] = []
    if names:
        targets = [(name, None, {"kind": "container", "name": name}) for name in names]
    elif kpcli.stdin_is_piped():
        targets = [(n, rid, line.record) for line, n, rid in out.objects(("container",))]
    else:
        raise click.UsageError("name a quarantined run, or pipe its record (kp-run ... --quarantine | kp-review)")
    stdout = sys.stdout.buffer
    paint = colour == "always" or (colour == "auto" and kpcli._colour(sys.stdout))
    for name, rid, record in targets:
        try:
            check_name(name, "container name")
            _review(out, store, name, rid, stdout, stat=stat, as_findings=as_findings, patch_file=patch_file,
                    binary=binary, paint=paint)
        except KpError as exc:
            out.fail(record, exc)
    return out.status()


def _review(out: kpcli.Output, store: Any, name: str, rid: str | None, stdout: IO[bytes], *, stat: bool,
            as_findings: bool, patch_file: str | None, binary: bool, paint: bool) -> None:
    from kodepipe.container import apply as applying
    from kodepipe.container import review
    from kodepipe.review import gitstore, rules

    with store.lock(name):
        folder, meta, upper, workspace, changes = applying.locate(store, name, rid)
        snap = review.snapshot(folder, upper, workspace, changes, rules.load(),
                               message=review.commit_message(meta))
        review.save(folder, snap)
        _log_review(out, store, folder, meta, name, snap)
    if patch_file is not None:
        data = gitstore.format_patch(snap.git_dir, snap.base, snap.head)
        if patch_file == "-":
            stdout.write(data)
        else:
            _write_private(Path(patch_file), data)
    if as_findings:
        for record in review.finding_records(snap, name, meta.get("id")):
            out.emit(record)
    elif stat:
        stdout.write(gitstore.diff(snap.git_dir, snap.base, snap.head, stat=True))
        for line in _beyond_git(snap):
            stdout.write(line.encode("utf-8", "surrogateescape") + b"\n")
    elif patch_file != "-":
        _diff(snap, stdout, binary=binary, paint=paint)
    stdout.flush()
    for finding in snap.findings:
        out.warn(f"{name}: {finding.shown()}")
    out.info(f"{name}: review {snap.id}: {len(snap.changes)} change(s), {len(snap.findings)} finding(s); "
             f"kp-run --apply {name} applies exactly this, kp-rm {name} discards it")


def _log_review(out: kpcli.Output, store: Any, folder: Path, meta: dict[str, Any], name: str, snap: Any) -> None:
    """What this review showed (its snapshot and findings), into the run's review log (evidence.py)."""
    from kodepipe.container import evidence
    from kodepipe.core.errors import KpError

    try:
        evidence.note(folder, meta, "findings", review=snap.id, changes=len(snap.changes),
                      findings=[f.as_dict() for f in snap.findings])
        store.write_meta(folder, meta)
    except (KpError, OSError) as exc:
        out.warn(f"{name}: the review log could not be written: {getattr(exc, 'message', None) or exc}")


def _write_private(path: Path, data: bytes) -> None:
    import os

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _beyond_git(snap: Any) -> list[str]:
    """What git's summary leaves out: directories, special files, permission bits besides x."""
    from kodepipe.container.quarantine import show

    lines = []
    for c in snap.changes:
        if c.type == "dir" and c.kind != "modified":
            lines.append(f" {c.kind} directory {show(c.path)}")
        elif c.type not in ("file", "dir", "symlink"):
            lines.append(f" {c.kind} {c.type} {show(c.path)} (never applied)")
        if c.kind == "modified" and c.old_mode is not None and c.mode is not None:
            lines.append(f" mode {c.old_mode:04o} => {c.mode:04o} {show(c.path)}")
        elif c.kind == "added" and c.mode is not None and c.mode & 0o6000:
            lines.append(f" setuid/setgid mode {c.mode:04o} {show(c.path)} (apply strips it)")
    return lines


def _diff(snap: Any, stdout: IO[bytes], *, binary: bool, paint: bool) -> None:
    from kodepipe.core.terminal import escape_lines
    from kodepipe.review import gitstore

    child = gitstore.diff_process(snap.git_dir, snap.base, snap.head, binary=binary)
    if child.stdout is None:
        return
    try:
        for raw in child.stdout:
            if not paint:
                stdout.write(raw)
                continue
            text = escape_lines(raw.decode("utf-8", "surrogateescape").rstrip("\n"))
            colour = _COLOURS.get(text[:1], "")
            if text.startswith(("+++", "---")):
                colour = "\x1b[1m"
            stdout.write((f"{colour}{text}{_RESET}" if colour else text).encode("utf-8", "replace") + b"\n")
    finally:
        child.stdout.close()
        child.wait()


def main() -> None:
    kpcli.run(cli, "kp-review")
