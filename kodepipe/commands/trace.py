"""kp-trace: system-call traces as JSON-lines events and summaries."""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import click

from kodepipe.commands import cli as kpcli
from kodepipe.commands import options

Record = dict[str, Any]


class _TraceCommand(click.Command):
    """Tells ``kp-trace RUN...`` from ``kp-trace -- COMMAND...``: the ``--`` is what says a command."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["kp_command"] = "--" in args
        return super().parse_args(ctx, args)


@click.command(cls=_TraceCommand, context_settings=options.CONTEXT, epilog=options.EPILOG)
@click.argument("command", nargs=-1, metavar="[RUN]... | -- COMMAND [ARG]...")
@click.option("--mode", type=click.Choice(["minimal", "default", "full"]), default="default", show_default=True,
              help="What to capture when tracing COMMAND: minimal = processes only (near native speed); "
                   "default = files, processes and network through --seccomp-bpf; full = every system call "
                   "(slow, but also sees what another seccomp filter denied).")
@click.option("--summary", is_flag=True,
              help="Instead of events, write one record per file written, file read, program run (argv, exit "
                   "code), network destination and denied operation, then totals.")
@click.option("--log", "log", type=click.Path(dir_okay=False, path_type=Path),
              help="Keep strace's raw output of COMMAND in this file (default: a temporary file, removed).")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "ocsf"]), default="jsonl", show_default=True,
              help="jsonl: kodepipe's records (kodepipe-events(7)); ocsf: each one as an OCSF event "
                   "(Process, File System, Network, HTTP and DNS Activity...), for a SIEM.")
@click.option("--verify", is_flag=True,
              help="Check each run's logs against their hash chains and the heads sealed in the host's index: "
                   "one verify record per run, naming the first broken link; exit 1 if any does not verify.")
@click.option("--key", type=click.Path(dir_okay=False, exists=True, path_type=Path), metavar="PUBKEY",
              help="With --verify: every head must be signed by this ed25519 public key (kp-run --sign).")
@click.option("--report", is_flag=True,
              help="Write one self-contained HTML page about the run (facts, processes, files, network, "
                   "findings, timeline, integrity) instead of records.")
@options.quiet
def cli(command: tuple[str, ...], mode: str, summary: bool, log: Path | None, fmt: str, verify: bool,
        key: Path | None, report: bool, quiet: bool) -> int:
    """Turn system-call traces into JSON-lines events (see kodepipe-events(7)).

    With a COMMAND, kp-trace runs it under strace from the outside, in the
    chosen --mode, and streams its events as strace writes them.  The first
    record (kind "trace") says what the mode cannot see; the last one
    carries the command's exit status.  The command's own output goes to
    standard error, so standard output carries records only.

    Without a COMMAND it reads standard input: either strace text (from
    strace -f -ttt -T -yy -o FILE, or -tt, or strace's terminal output), or
    records, of which those with an "audit_log" key (a raw strace log, as
    kp-run --audit writes) are passed through and followed by the events of
    their log, each with a "container" key naming the record.  Such a log
    is read from the container's first execve on: what comes before is the
    container runtime starting, not the agent.  Records with an
    "egress_log" (kp-run --allow) are followed by the proxy's decisions
    (kind "egress"; with --summary, counted per host and decision).

    kp-trace RUN (or a run's record on stdin, as kp-ls NAME | kp-trace)
    writes the run's record, then one timeline: its system-call events,
    its egress decisions (credential injections among them) and its
    review log (the quarantine's changes when the run ended, each
    kp-review, each apply or export), merged in time order, each item
    with the run's name and id ("run", "run_id").  Each source keeps its
    own order; nothing is dropped.

    Every log kodepipe keeps for a run is hash-chained as it is written
    (a FILE.chain beside it, whose entries each carry the link before
    them), and when the run ends, and after each apply, the chains'
    heads are sealed in the host's index (STATE/evidence/index.jsonl,
    itself chained), signed with kp-run --sign.  --verify checks each
    log against its chain and its sealed head: a line edited, deleted,
    inserted, reordered or cut off is found, and the verify record
    names the first broken link (log, chain entry, first line).  A log
    and chain recomputed by a forger and an index rewritten to match are
    caught only by a signature: --verify --key PUBKEY (the .pub of
    CONFIG/audit_ed25519, which kp-run --sign makes) requires every head
    to be signed by it.  Paths are relative to the run's folder, so a
    moved state directory verifies.  Exit 1 when a run does not verify.

    --format ocsf writes each record and event as an OCSF event (the
    schema version is in each event's metadata) for a SIEM; --report
    writes one self-contained HTML page of the run (facts and loosened
    defaults, a process tree with argv, files written and deleted,
    network decisions, findings, the timeline and the integrity check)
    that loads nothing from anywhere.  --summary on a terminal is a table.

    A line strace printed that kp-trace cannot read becomes a "parse_error"
    event with the raw text: nothing is dropped.  The audit of a run whose
    tracer died or whose Podman service was lost (error audit_incomplete or
    engine_lost) is still read: it is the evidence of what happened.

    What a trace cannot prove: strace reads a system call's arguments from
    the traced process's memory when the call starts, and the kernel reads
    them again when it runs the call.  Another thread of the traced program
    can rewrite a path in between, so the event names the path the program
    showed, not always the one the kernel used (a limit of ptrace itself,
    not of kodepipe).  Paths resolved from file descriptors (strace -yy,
    the "resolved" key) come from the kernel after the call and do not have
    this gap.  For what an agent changed, trust the quarantine's change
    list (kp-run --quarantine), which comes from the filesystem itself, over
    the trace's file events.  kp-run --audit checks the two against each
    other after the run (in a direct run, against snapshots of the
    workspace taken before and after): each real change no traced call
    explains (a rewritten path, or a file the kernel wrote, such as a core
    dump) is in the record's audit_unaccounted, and kp-trace shows it after
    the run's events as an event of type "unaccounted" (path relative to the
    workspace, change, entry).  One with "complete" false says the check
    could not be made whole (the trace was cut short) and why.  That check
    proves each changed path was named by a call that could make that
    change; not that the file holds what the traced program wrote.

    \b
    Examples:
      kp-trace -- make test
      kp-trace --mode full -- python3 agent.py | jq 'select(.denied)'
      strace -f -ttt -T -yy -o log -- sh -c 'git status'; kp-trace < log
      kp-trace --summary -- git commit -am wip | jq 'select(.item=="file_written").path'
      kp-trace run-1a2b3c4d | jq 'select(.kind=="egress" and .decision=="deny")'
      kp-trace --verify --key ~/.config/kodepipe/audit_ed25519.pub run-1a2b3c4d
      kp-trace --report run-1a2b3c4d > report.html
      kp-ls --kind container | kp-trace --format ocsf > ocsf.jsonl
    """
    ctx = click.get_current_context()
    traced = bool(ctx.meta.get("kp_command")) and bool(command)
    runs = () if traced else command
    _check_usage(ctx, traced, runs, summary=summary, fmt=fmt, verify=verify, key=key, report=report)
    if log is not None:
        _check_log(log)
    out = kpcli.Output("kp-trace", quiet=quiet)
    if verify:
        _verify(out, runs, key)
        return out.status()
    sink = _Sink(out, summary, fmt=fmt, report=report)
    if traced:
        _trace_command(list(command), mode, log, out, sink)
    elif runs:
        _read_runs(runs, out, sink)
    elif kpcli.stdin_is_piped():
        _read_stdin(sys.stdin.buffer, out, sink)
    else:
        raise click.UsageError("name a RUN, give a COMMAND after --, or pipe strace output or records")
    sink.close()
    return out.status()


def _check_usage(ctx: click.Context, traced: bool, runs: tuple[str, ...], *, summary: bool, fmt: str, verify: bool,
                 key: Path | None, report: bool) -> None:
    """Options that contradict each other are a usage error (2), all named at once."""
    given = {name for name in ctx.params
             if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    problems = []
    if not traced and given & {"mode", "log"}:
        problems.append("--mode and --log only matter with -- COMMAND")
    if traced and (verify or report):
        problems.append("--verify and --report read runs (RUN, or records on stdin), not a COMMAND")
    if key is not None and not verify:
        problems.append("--key only matters with --verify")
    if verify and (summary or report or fmt != "jsonl"):
        problems.append("--verify writes verify records: drop --summary, --report and --format")
    if report and (summary or fmt != "jsonl"):
        problems.append("--report writes a page: drop --summary and --format")
    if report and len(runs) > 1:
        problems.append("--report takes one RUN")
    if problems:
        raise click.UsageError("; ".join(problems))
    options.check_names(list(runs))


def _check_log(log: Path) -> None:
    """--log is written by strace and read back: a regular file or nothing yet, never a FIFO,
    a device or a directory."""
    import stat

    try:
        mode = os.stat(log).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise click.BadParameter(f"{log}: {exc.strerror}", param_hint="'--log'") from None
    if not stat.S_ISREG(mode):
        raise click.BadParameter(f"{log} exists and is not a regular file", param_hint="'--log'")


class _Sink:
    """Where records go: straight out (as kodepipe's records or as OCSF events), into a summary
    written at the end, or into a report page written at the end."""

    def __init__(self, out: kpcli.Output, summary: bool, fmt: str = "jsonl", report: bool = False) -> None:
        from kodepipe.audit import strace

        self.out = out
        self.summary = strace.Summary() if summary else None
        self.egress_counts: dict[tuple[Any, bool, Any], int] = {}
        self.review_counts: dict[Any, int] = {}
        self.convert: Callable[[Record], Record | None] | None = None
        if fmt == "ocsf":
            from kodepipe.audit import ocsf

            self.convert = ocsf.event
        # --report: the items spooled to a temporary file (a big audit's events do not fit in memory),
        # read back once into the page at the end
        self.report: IO[bytes] | None = None
        if report:
            import tempfile

            self.report = tempfile.SpooledTemporaryFile(max_size=16 << 20)  # noqa: SIM115 - closed in close()
        self.run: Record | None = None

    def _emit(self, item: Record) -> None:
        if self.report is not None:
            import orjson

            self.report.write(orjson.dumps(item, default=str) + b"\n")
            return
        if self.convert is not None:
            converted = self.convert(item)
            if converted is None:
                return
            item = converted
        self.out.emit(item)

    def events(self, evs: Iterable[Record], extra: Record | None = None) -> None:
        for ev in evs:
            if extra:
                ev.update(extra)
            if self.summary is not None:
                self.summary.add(ev)
            else:
                self._emit(ev)

    def record(self, record: Record) -> None:
        if self.report is not None:
            self.run = record  # the last state of the run (a failure's record follows its events)
            return
        self._emit(record)

    def egress(self, decision: Record) -> None:
        if self.summary is None:
            self._emit(decision)
            return
        key = (decision.get("decision"), decision.get("method") == "DNS", decision.get("host"))
        self.egress_counts[key] = self.egress_counts.get(key, 0) + 1

    def review(self, entry: Record) -> None:
        if self.summary is None:
            self._emit(entry)
            return
        action = entry.get("action")
        self.review_counts[action] = self.review_counts.get(action, 0) + 1

    def item(self, item: Record) -> None:
        """One item of a run's merged timeline, by its kind."""
        kind = item.get("kind")
        if kind == "egress":
            self.egress(item)
        elif kind == "review":
            self.review(item)
        else:
            self.events([item])

    def close(self) -> None:
        if self.report is not None:
            self._write_report()
            return
        if self.summary is None:
            return
        items: list[Record] = []
        for (decision, dns, host), count in sorted(self.egress_counts.items(), key=str):
            items.append({"kind": "summary", "item": "egress", "decision": decision, "dns": dns, "host": host,
                          "count": count})
        for action, count in sorted(self.review_counts.items(), key=str):
            items.append({"kind": "summary", "item": "review", "action": action, "count": count})
        items.extend(self.summary.items())
        if sys.stdout.isatty():
            sys.stdout.write(summary_table(items))
            sys.stdout.flush()
            return
        for item in items:
            self.out.emit(item)

    def _write_report(self) -> None:
        from kodepipe.audit import report

        spool = self.report
        if self.run is None or spool is None:
            return

        def spooled() -> Iterator[Record]:
            import orjson

            spool.seek(0)
            for line in spool:
                yield orjson.loads(line)

        try:
            page = report.render(self.run, spooled(), verify=self.verified,
                                 generated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        finally:
            spool.close()
        sys.stdout.buffer.write(page.encode("utf-8", "replace"))
        sys.stdout.flush()

    verified: Record | None = None


SUMMARY_COLUMNS = (("item", "what"), ("count", "count"), ("path", "path / host / program"), ("decision", "decision"),
                   ("exit_code", "exit"))


def summary_table(items: list[Record]) -> str:
    """--summary on a terminal: one compact, escaped row per item."""
    from kodepipe.core.terminal import escape

    def cell(item: Record, key: str) -> str:
        if key == "path":
            value = item.get("path") or item.get("host") or item.get("argv") or item.get("address") \
                or item.get("action") or ""
            if isinstance(value, list):
                value = " ".join(str(v) for v in value)
        else:
            value = item.get(key, "")
        text = escape(str("" if value is None else value))
        return text if len(text) <= 70 else text[:69] + "\u2026"

    rows = [[title for _, title in SUMMARY_COLUMNS]] + [[cell(i, key) for key, _ in SUMMARY_COLUMNS] for i in items]
    widths = [max(len(row[c]) for row in rows) for c in range(len(SUMMARY_COLUMNS))]
    return "".join("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() + "\n" for row in rows)


# strace writes strings of at most 256 bytes (-s 256) and as many array elements: a line of its
# own is far shorter than this.  A longer one is not read into memory whole.
STRACE_LINE = 4 << 20
# an egress log line is one proxy decision
EGRESS_LINE = 1 << 20
SHOWN_BAD = 5  # bad lines of one input said one by one on stderr; the rest are counted


class _BadLines:
    """The bad lines of one input: the first few said on stderr, the rest counted; each one makes
    the exit status 65 (bad input)."""

    def __init__(self, out: kpcli.Output, where: str) -> None:
        self.out, self.where, self.count = out, where, 0

    def __call__(self, exc: Any) -> None:
        from kodepipe.core.errors import BAD_INPUT

        self.count += 1
        self.out.statuses.add(BAD_INPUT)
        if self.count <= SHOWN_BAD:
            self.out.error(f"{self.where} {exc.message}")

    def close(self) -> None:
        if self.count > SHOWN_BAD:
            self.out.error(f"{self.where}: {self.count - SHOWN_BAD} more bad line(s) not shown")


Unreadable = tuple[str, str]  # (the line shown escaped and shortened, why it was not read)


def _text(numbered: Iterable[tuple[int, Any]], bad: _BadLines, limit: int = STRACE_LINE) -> Iterator[str | Unreadable]:
    """strace text lines, each checked: a NUL byte, bytes that are not UTF-8 or a line over ``limit``
    is reported as bad input and passed on as Unreadable (the parser makes it a parse_error event)."""
    from kodepipe.core.errors import BadInput
    from kodepipe.core.records import TooLong, decode_text, too_long

    for lineno, raw in numbered:
        if isinstance(raw, TooLong) or len(raw) > limit:
            head = raw.head if isinstance(raw, TooLong) else raw[:120]
            exc = too_long(lineno, TooLong(head, limit))
            bad(exc)
            yield head[:120].decode("utf-8", "backslashreplace") + "...", f"longer than {limit >> 20} MiB"
            continue
        try:
            yield decode_text(raw, lineno)
        except BadInput as exc:
            bad(exc)
            yield raw[:240].rstrip(b"\r\n").decode("utf-8", "backslashreplace"), exc.message.split(": ", 1)[-1]


def _parse_stream(lines: Iterable[str | Unreadable], sink: _Sink, extra: Record | None = None) -> None:
    sink.events(_events(lines, extra or {}))


# A run that failed in these ways still ran: what its audit recorded up to the failure is
# exactly the evidence a reader wants, so its logs are read like those of a run that succeeded.
EVIDENCE_OF_FAILED_RUNS = ("audit_incomplete", "engine_lost")


def _read_stdin(stream: IO[bytes], out: kpcli.Output, sink: _Sink) -> None:
    from kodepipe.core.errors import BadInput
    from kodepipe.core.records import MAX_LINE, TooLong, bounded_lines

    numbered = bounded_lines(stream, MAX_LINE)
    for first in numbered:
        if isinstance(first[1], TooLong) or first[1].strip():
            break
    else:
        return  # nothing but blank lines
    if isinstance(first[1], TooLong) or not first[1].lstrip().startswith(b"{"):
        bad = _BadLines(out, "stdin")
        _parse_stream(_text(_chain(first, numbered), bad), sink)
        bad.close()
        return
    for line in out.records(numbered=_chain(first, numbered)):
        record = line.record
        error = record.get("error")
        code = error.get("code") if isinstance(error, dict) else None
        if line.failed and code not in EVIDENCE_OF_FAILED_RUNS:
            sink.record(record)
            continue
        try:
            log, egress_log = line.path("audit_log"), line.path("egress_log")
        except BadInput as exc:
            out.fail(record, exc)
            continue
        if log is None and egress_log is None:
            sink.record(record)
            continue
        _timeline(record, log, egress_log, _review_log(record, log, egress_log), out, sink)


def _review_log(record: Record, *logs: str | None) -> Path | None:
    """The review log beside a run's other logs (in its folder), if it has one."""
    from kodepipe.container.evidence import REVIEW_LOG

    folder = record.get("path")
    places = [Path(folder)] if isinstance(folder, str) and folder.startswith("/") else []
    places += [Path(log).parent for log in logs if log is not None]
    for place in places:
        if (place / REVIEW_LOG).is_file():
            return place / REVIEW_LOG
    return None


def _timeline(record: Record, log: str | None, egress_log: str | None, review_log: Path | None,
              out: kpcli.Output, sink: _Sink) -> None:
    """The run's record, then its sources merged into one time-ordered stream (audit/timeline.py),
    each item with the run's name and id; a source that fails is said after the rest, with the record."""
    from kodepipe.audit import timeline
    from kodepipe.core.errors import KpError
    from kodepipe.core.records import bounded_lines, open_regular

    name = record.get("name") or record.get("id")
    extra: Record = {"container": name}
    extra.update({k: v for k, v in (("run", record.get("name")), ("run_id", record.get("id"))) if isinstance(v, str)})
    handle = None
    if log is not None:
        try:
            handle = open_regular(log, "the audit log")
        except KpError as exc:
            out.fail(record, exc)
            return
    sink.record(record)
    failures: list[KpError] = []
    sources: list[Iterable[Record]] = []
    with contextlib.ExitStack() as stack:
        if handle is not None and log is not None:
            stack.enter_context(handle)
            bad = _BadLines(out, f"{name}: the audit log {log}")
            stack.callback(bad.close)
            setup = record.get("audit_setup_lines")
            setup = setup if isinstance(setup, int) and not isinstance(setup, bool) and setup > 0 else 0
            lines = after_runtime(_text(_reading(bounded_lines(handle, STRACE_LINE), "the audit log", log), bad),
                                  setup)
            sources.append(_guarded(_events(lines, extra), failures))
        if egress_log is not None:
            sources.append(_guarded(_egress(egress_log, record, out, extra), failures))
        if review_log is not None:
            sources.append(_guarded(_reviews(review_log, record, out), failures))
        for item in timeline.merge(sources):
            sink.item(item)
    if log is not None and not failures:
        _unaccounted(record, out, sink, extra)
    for failure in failures:  # what was read is out: the record follows it, with why
        out.fail(record, failure)


def _guarded(items: Iterable[Record], failures: list[Any]) -> Iterator[Record]:
    """A source whose failure ends it, kept for later, not the whole timeline."""
    from kodepipe.core.errors import KpError

    try:
        yield from items
    except KpError as exc:
        failures.append(exc)


def _events(lines: Iterable[str | Unreadable], extra: Record) -> Iterator[Record]:
    from kodepipe.audit.strace import Parser

    parser = Parser()
    for line in lines:
        for ev in parser.unreadable(*line) if isinstance(line, tuple) else parser.feed(line):
            ev.update(extra)
            yield ev
    for ev in parser.finish():
        ev.update(extra)
        yield ev


def _read_runs(names: tuple[str, ...], out: kpcli.Output, sink: _Sink) -> None:
    """kp-trace RUN...: each run's record and timeline, its logs found in its folder."""
    from kodepipe.container import evidence, folders
    from kodepipe.core.errors import NotFound
    from kodepipe.core.state import Store

    store = Store()
    for name in names:
        record = folders.view(store, name)
        if record.get("state") == "gone" or not store.folder(folders.KIND, name).is_dir():
            out.fail({"kind": "container", "name": name}, NotFound(f"no run named {name}"))
            continue
        folder = store.folder(folders.KIND, name)
        log = str(folder / evidence.AUDIT_LOG) if isinstance(record.get("audit_log"), str) else None
        egress_log = str(folder / evidence.EGRESS_LOG) if isinstance(record.get("egress_log"), str) else None
        review = folder / evidence.REVIEW_LOG
        if sink.report is not None:
            meta = store.read_meta(folder) or {}
            sink.verified = evidence.verify(folder, meta)
        if log is None and egress_log is None and not review.is_file():
            sink.record(record)
            continue
        _timeline(record, log, egress_log, review if review.is_file() else None, out, sink)


def _verify(out: kpcli.Output, names: tuple[str, ...], key: Path | None) -> None:
    """kp-trace --verify: a verify record per run (named, or container records on stdin)."""
    from kodepipe.container import evidence, folders
    from kodepipe.core.errors import BadInput, KpError, NotFound
    from kodepipe.core.state import Store

    public = key.read_bytes() if key is not None else None
    if public is not None:
        try:
            from kodepipe.core.chain import fingerprint

            fingerprint(public)
        except (ValueError, IndexError):
            raise click.BadParameter(f"{key} is not an OpenSSH public key", param_hint="'--key'") from None
    targets: list[tuple[str, str | None, Record]] = [(n, None, {"kind": "container", "name": n}) for n in names]
    if not names:
        if not kpcli.stdin_is_piped():
            raise click.UsageError("name a RUN to verify, or pipe its record (kp-ls NAME | kp-trace --verify)")
        targets = [(n, rid, line.record) for line, n, rid in out.objects(("container",))]
    from kodepipe.core import chain

    store = Store()
    index = chain.read_index(evidence.index_path())
    for name, rid, record in targets:
        folder = store.folder(folders.KIND, name)
        meta = store.read_meta(folder) if folder.is_dir() else None
        if meta is None:
            out.fail(record, NotFound(f"no run named {name}"))
            continue
        if rid is not None and meta.get("id") != rid:
            out.fail(record, BadInput(f"{name}: the run here is {meta.get('id')}, not the record's {rid}"))
            continue
        try:
            result = evidence.verify(folder, meta, public, index)
        except (KpError, OSError) as exc:
            out.fail(record, exc if isinstance(exc, KpError) else KpError(f"{name}: {exc}"))
            continue
        out.emit(result)
        if not result["verified"]:
            out.statuses.add(1)
            out.error(f"{name}: does not verify: {result.get('problem')}")


def _reviews(path: Path, record: Record, out: kpcli.Output) -> Iterator[Record]:
    """The run's review log: each entry as it was written (bad lines reported and skipped)."""
    from kodepipe.core.records import bounded_lines, lines_of, open_regular

    handle = open_regular(str(path), "the review log")
    bad = _BadLines(out, f"{record.get('name') or record.get('id')}: the review log {path}")
    try:
        with handle:
            for line in lines_of(_reading(bounded_lines(handle, EGRESS_LINE), "the review log", str(path)), bad):
                if line.record.get("kind") == "review":
                    yield line.record
    finally:
        bad.close()


def _unaccounted(record: Record, out: kpcli.Output, sink: _Sink, extra: Record) -> None:
    """After a run's audit events, the real changes its trace does not explain (the record's
    audit_unaccounted, from kp-run's cross-check), as events of type "unaccounted": one per path the
    record lists, one saying how many more, or one saying the cross-check was incomplete."""
    from kodepipe.audit.strace import SCHEMA
    from kodepipe.core.errors import BAD_INPUT

    found = record.get("audit_unaccounted")
    if found is None:
        return
    base: Record = {"kind": "event", "schema": SCHEMA, "type": "unaccounted", "line": None, "ts": None,
                    "pid": None, "tid": None, "denied": False}
    listed = found.get("paths", []) if isinstance(found, dict) else None
    if not isinstance(found, dict) or not isinstance(listed, list) or \
            not all(isinstance(p, dict) and isinstance(p.get("path"), str) for p in listed):
        out.statuses.add(BAD_INPUT)
        out.error(f"{record.get('name')}: audit_unaccounted is not what kp-run writes: not read")
        return
    against = found.get("against")
    if found.get("complete") is not True:
        sink.events([{**base, "path": None, "complete": False, "against": against,
                      "why": found.get("why"),
                      "message": "the cross-check of the trace against the real changes is incomplete"}], extra)
        return
    events = [{**base, **{k: p[k] for k in ("path", "path_b64") if isinstance(p.get(k), str)},
               "change": p.get("change"), "entry": p.get("type"), "complete": True, "against": against,
               "message": f"a real change in the {against} that no event of the trace explains"}
              for p in listed]
    more = found.get("more")
    if isinstance(more, int) and not isinstance(more, bool) and more > 0:
        events.append({**base, "path": None, "more": more, "complete": True, "against": against,
                       "message": f"{more} more unaccounted change(s), not listed in the record"})
    sink.events(events, extra)


def _egress(path: str, record: Record, out: kpcli.Output, extra: Record) -> Iterator[Record]:
    """The egress proxy's decisions of a kp-run --allow, as they were logged: each line a JSON object
    (bad lines are reported and skipped), read a line at a time from a regular file only."""
    from kodepipe.core.errors import BadInput
    from kodepipe.core.records import bounded_lines, lines_of, open_regular

    handle = open_regular(path, "the egress log")
    bad = _BadLines(out, f"{record.get('name') or record.get('id')}: the egress log {path}")
    try:
        with handle:
            for line in lines_of(_reading(bounded_lines(handle, EGRESS_LINE), "the egress log", path), bad):
                try:
                    for key in ("decision", "method", "host"):  # what a summary counts by
                        line.text(key)
                except BadInput as exc:
                    bad(exc)
                    continue
                decision = line.record
                decision.update({k: v for k, v in extra.items() if k != "container" or "container" not in decision})
                yield decision
    finally:
        bad.close()


def _reading(numbered: Iterator[tuple[int, Any]], what: str, path: str) -> Iterator[tuple[int, Any]]:
    """The lines of an opened file; an error while reading it (EIO) is a KpError naming it."""
    from kodepipe.core.errors import KpError

    try:
        yield from numbered
    except OSError as exc:
        raise KpError(f"cannot read {what} {path}: {exc.strerror}", code="unreadable") from None


def after_runtime(lines: Iterable[str | Unreadable], setup: int = 0) -> Iterator[str | Unreadable]:
    """An audit log from its first execve on: the lines before it are the container
    runtime's own start-up (runc's init writing to its exec fifo), not the agent.  ``setup``:
    the record's audit_setup_lines, the runtime's own lines when strace started it."""
    it = iter(lines)
    for _ in itertools.islice(it, setup):
        pass
    for line in it:
        if isinstance(line, str) and "execve(" in line:
            yield line
            break
    yield from it


def _chain(first: tuple[int, Any], rest: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, Any]]:
    yield first
    yield from rest


def _trace_command(command: list[str], mode: str, log: Path | None, out: kpcli.Output, sink: _Sink) -> None:
    import secrets
    import tempfile

    from kodepipe.audit import strace
    from kodepipe.core import proc

    tmp = None
    if log is None:
        tmp = tempfile.TemporaryDirectory(prefix="kp-trace-")
        log = Path(tmp.name) / "strace.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(b"")
    argv = ["strace", *strace.CAPTURE_FLAGS, *strace.MODES[mode], "-o", str(log), "--", *command]
    record: Record = {"kind": "trace", "id": secrets.token_hex(6), "mode": mode, "command": command,
                      "strace": argv, "log": None if tmp else str(log.resolve()), "blind": strace.BLIND[mode],
                      "state": "running"}
    sink.record(dict(record))
    out.progress(f"tracing {command[0]} ({mode} mode)")
    child = proc.spawn(argv, stdin=None, stdout=sys.stderr.fileno(), stderr=None)
    try:
        bad = _BadLines(out, f"strace's log {log}")
        _parse_stream(_text(follow(log, child.poll), bad), sink)
        bad.close()
        status = child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if tmp is not None:
            tmp.cleanup()
    # strace exits with the traced command's status, or dies of its signal
    record.update(state="exited", exit_code=status if status >= 0 else None,
                  signal=_signal_name(-status) if status < 0 else None)
    sink.record(record)


def follow(path: Path, finished: Callable[[], int | None], interval: float = 0.05,
           limit: int = STRACE_LINE) -> Iterator[tuple[int, bytes | Any]]:
    """Yield (number, line) for the lines of a file that another process is still writing, until it
    has finished.  A partial last line is held back until its newline arrives (or the writer ends);
    a line longer than ``limit`` is yielded as a records.TooLong once, and its rest skipped."""
    from kodepipe.core.records import TooLong

    with open(path, "rb") as handle:
        rest, lineno, skipping = b"", 0, False
        while True:
            done = finished() is not None
            chunk = handle.read(1 << 20)
            if chunk:
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop()
                for line in lines:
                    if skipping:
                        skipping = False  # the end of an over-long line
                        continue
                    lineno += 1
                    yield lineno, line if len(line) <= limit else TooLong(line[:120], limit)
                if len(rest) > limit and not skipping:
                    lineno += 1
                    yield lineno, TooLong(rest[:120], limit)
                    skipping = True
                if skipping:
                    rest = b""
                continue
            if done:
                break
            time.sleep(interval)
        if rest and not skipping:
            yield lineno + 1, rest


def _signal_name(number: int) -> str:
    import signal

    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def main() -> None:
    # the traced command's output and ours share the terminal: keep ours unbuffered per record
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    kpcli.run(cli, "kp-trace")
