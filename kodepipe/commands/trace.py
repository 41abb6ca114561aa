"""kp-trace: system-call traces as JSON-lines events and summaries."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import click

from kodepipe import cli as kpcli
from kodepipe.commands import options

Record = dict[str, Any]


@click.command(context_settings=options.CONTEXT, epilog=options.EPILOG)
@click.argument("command", nargs=-1, metavar="[-- COMMAND [ARG]...]")
@click.option("--mode", type=click.Choice(["minimal", "default", "full"]), default="default", show_default=True,
              help="What to capture when tracing COMMAND: minimal = processes only (near native speed); "
                   "default = files, processes and network through --seccomp-bpf; full = every system call "
                   "(slow, but also sees what another seccomp filter denied).")
@click.option("--summary", is_flag=True,
              help="Instead of events, write one record per file written, file read, program run (argv, exit "
                   "code), network destination and denied operation, then totals.")
@click.option("--log", "log", type=click.Path(dir_okay=False, path_type=Path),
              help="Keep strace's raw output of COMMAND in this file (default: a temporary file, removed).")
@options.quiet
def cli(command: tuple[str, ...], mode: str, summary: bool, log: Path | None, quiet: bool) -> int:
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

    A line strace printed that kp-trace cannot read becomes a "parse_error"
    event with the raw text: nothing is dropped.

    \b
    Examples:
      kp-trace -- make test
      kp-trace --mode full -- python3 agent.py | jq 'select(.denied)'
      strace -f -ttt -T -yy -o log -- sh -c 'git status'; kp-trace < log
      kp-trace --summary -- git commit -am wip | jq 'select(.item=="file_written").path'
    """
    out = kpcli.Output("kp-trace", quiet=quiet)
    sink = _Sink(out, summary)
    if command:
        _trace_command(list(command), mode, log, out, sink)
    elif kpcli.stdin_is_piped():
        _read_stdin(sys.stdin.buffer, out, sink)
    else:
        raise click.UsageError("give a COMMAND after --, or strace output or records on stdin")
    sink.close()
    return out.status()


class _Sink:
    """Where events go: straight out, or into a summary written at the end."""

    def __init__(self, out: kpcli.Output, summary: bool) -> None:
        from kodepipe import strace

        self.out = out
        self.summary = strace.Summary() if summary else None
        self.egress_counts: dict[tuple[Any, bool, Any], int] = {}

    def events(self, evs: Iterable[Record], extra: Record | None = None) -> None:
        for ev in evs:
            if extra:
                ev.update(extra)
            if self.summary is not None:
                self.summary.add(ev)
            else:
                self.out.emit(ev)

    def record(self, record: Record) -> None:
        self.out.emit(record)

    def egress(self, decision: Record) -> None:
        if self.summary is None:
            self.out.emit(decision)
            return
        key = (decision.get("decision"), decision.get("method") == "DNS", decision.get("host"))
        self.egress_counts[key] = self.egress_counts.get(key, 0) + 1

    def close(self) -> None:
        if self.summary is not None:
            for (decision, dns, host), count in sorted(self.egress_counts.items(), key=str):
                self.out.emit({"kind": "summary", "item": "egress", "decision": decision,
                               "dns": dns, "host": host, "count": count})
            for item in self.summary.items():
                self.out.emit(item)


def _lines(chunks: Iterable[bytes]) -> Iterator[str]:
    for chunk in chunks:
        yield chunk.decode("utf-8", "replace")


def _parse_stream(lines: Iterable[str], sink: _Sink, extra: Record | None = None) -> None:
    from kodepipe.strace import Parser

    parser = Parser()
    for line in lines:
        sink.events(parser.feed(line), extra)
    sink.events(parser.finish(), extra)


def _read_stdin(stream: IO[bytes], out: kpcli.Output, sink: _Sink) -> None:
    first = b""
    for first in iter(stream.readline, b""):
        if first.strip():
            break
    if not first.strip():
        return
    if not first.lstrip().startswith(b"{"):
        _parse_stream(_lines(_chain(first, stream)), sink)
        return
    from kodepipe.errors import BadInput, NotFound
    from kodepipe.records import parse_line

    for lineno, line in enumerate(_chain(first, stream), start=1):
        if not line.strip():
            continue
        try:
            record = parse_line(line, lineno)
        except BadInput as exc:
            out.bad_line(exc)
            continue
        log = record.get("audit_log")
        egress_log = record.get("egress_log")
        if isinstance(egress_log, str) and "error" not in record and not isinstance(log, str):
            sink.record(record)
            _egress(egress_log, record, out, sink)
            continue
        if not isinstance(log, str) or "error" in record:
            sink.record(record)
            continue
        try:
            handle = open(log, "rb")  # noqa: SIM115 - closed below, after the pass-through
        except OSError as exc:
            out.fail(record, NotFound(f"cannot read the audit log {log}: {exc.strerror}"))
            continue
        sink.record(record)
        name = record.get("name") or record.get("id")
        with handle:
            _parse_stream(after_runtime(_lines(handle)), sink, {"container": name})
        if isinstance(egress_log, str):
            _egress(egress_log, record, out, sink)


def _egress(path: str, record: Record, out: kpcli.Output, sink: _Sink) -> None:
    """The egress proxy's decisions of a kp-run --allow, as they were logged."""
    from kodepipe.errors import NotFound

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        out.fail(record, NotFound(f"cannot read the egress log {path}: {exc.strerror}"))
        return
    import orjson

    for line in data.splitlines():
        if line.strip():
            sink.egress(orjson.loads(line))


def after_runtime(lines: Iterable[str]) -> Iterator[str]:
    """An audit log from its first execve on: the lines before it are the container
    runtime's own start-up (runc's init writing to its exec fifo), not the agent."""
    it = iter(lines)
    for line in it:
        if "execve(" in line:
            yield line
            break
    yield from it


def _chain(first: bytes, stream: IO[bytes]) -> Iterator[bytes]:
    yield first
    yield from iter(stream.readline, b"")


def _trace_command(command: list[str], mode: str, log: Path | None, out: kpcli.Output, sink: _Sink) -> None:
    import secrets
    import tempfile

    from kodepipe import proc, strace

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
        _parse_stream(follow(log, child.poll), sink)
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


def follow(path: Path, finished: Callable[[], int | None], interval: float = 0.05) -> Iterator[str]:
    """Yield the lines of a file that another process is still writing, until it has finished.

    A partial last line is held back until its newline arrives (or the writer ends).
    """
    with open(path, "rb") as handle:
        rest = b""
        while True:
            done = finished() is not None
            chunk = handle.read(1 << 20)
            if chunk:
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop()
                for line in lines:
                    yield line.decode("utf-8", "replace")
                continue
            if done:
                break
            time.sleep(interval)
        if rest:
            yield rest.decode("utf-8", "replace")


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
