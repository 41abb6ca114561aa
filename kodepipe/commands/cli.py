"""What every kp-* command shares: output, messages, exit statuses.

A command module is a thin click layer: it builds an ``Output``, feeds
records through its core and returns ``out.status()``.  ``run`` maps every
way a command can end to one documented exit status, in one place.
"""

from __future__ import annotations

import io
import os
import signal
import stat
import sys
from collections.abc import Iterable, Iterator
from typing import IO, Any, NoReturn

import click

from kodepipe.core import errors
from kodepipe.core.errors import BadInput, KpError
from kodepipe.core.records import Line, PipeClosed, Record, TooLong, Writer, lines_of, read, with_error
from kodepipe.core.terminal import escape_lines


def _colour(stream: IO[str]) -> bool:
    return (stream.isatty() and "NO_COLOR" not in os.environ
            and os.environ.get("TERM") != "dumb")


class Output:
    """Records to stdout, messages to stderr, and the statuses seen so far.

    Every message is escaped on its way out (``terminal.escape_lines``): a control character in
    it, whoever chose it (an agent's file name, a guest's address or console output, an error
    text quoted from the guest agent), is shown as an escape such as ``\\x1b``, never obeyed."""

    def __init__(self, prog: str, *, verbose: bool | None = None, quiet: bool = False) -> None:
        self.prog = prog
        self.write = Writer()
        self.statuses: set[int] = set()
        self.quiet = quiet
        # progress is for a person watching; a pipe or a log gets only the outcome
        self.verbose = sys.stderr.isatty() if verbose is None else verbose
        self.colour = _colour(sys.stderr)

    # -- messages ------------------------------------------------------------

    def _say(self, label: str, colour: str, message: str) -> None:
        # messages quote file names, guest addresses, console lines and agents' words: no control
        # character of theirs reaches the terminal (records on stdout keep the raw data)
        message = escape_lines(message)
        if self.colour and label:
            label = click.style(label, fg=colour, bold=True)
        click.echo(f"{self.prog}: {label}{message}", err=True)

    def error(self, message: str) -> None:
        self._say("error: ", "red", message)

    def warn(self, message: str) -> None:
        if not self.quiet:
            self._say("warning: ", "yellow", message)

    def info(self, message: str) -> None:
        if not self.quiet:
            self._say("", "", message)

    def progress(self, message: str) -> None:
        if self.verbose and not self.quiet:
            self._say("", "", message)

    # -- records ---------------------------------------------------------------

    def emit(self, record: Record) -> None:
        self.write(record)

    def fail(self, record: Record, exc: KpError) -> None:
        """Write ``record`` with an error object, say why, and remember the status."""
        self.statuses.add(exc.status)
        name = record.get("name")
        self.error(f"{name}: {exc.message}" if isinstance(name, str) and name else exc.message)
        self.emit(with_error(record, exc.code, exc.message))

    def bad_line(self, exc: BadInput) -> None:
        self.statuses.add(exc.status)
        self.error(f"{exc.message}; the line was skipped")

    def records(self, stream: IO[bytes] | None = None, *,
                numbered: Iterable[tuple[int, bytes | TooLong]] | None = None) -> Iterator[Line]:
        """Each record on stdin (or ``stream``) as a ``Line``: its number and typed reads of its fields.

        The one reader of records on stdin: every command's records come through here, and every
        message about one names its line ("stdin line 3: ...").  A line that is not a JSON object is
        reported and skipped (65).  ``numbered``: stdin's lines already read by ``bounded_lines``."""
        if numbered is not None:
            return lines_of(numbered, self.bad_line, stdin=True)
        return read(stream if stream is not None else sys.stdin.buffer, self.bad_line, stdin=True)

    def objects(self, kinds: tuple[str, ...], *, honour_failed: bool = False, fields: tuple[str, ...] = (),
                stream: IO[bytes] | None = None) -> Iterator[tuple[Line, str, str | None]]:
        """The records on stdin that name one of kodepipe's objects of ``kinds``: (line, name, id).

        Every other record is written through unchanged, and so is a record
        that an earlier stage failed on (it carries an "error"), unless
        ``honour_failed`` (kp-rm still cleans up what a failed record names
        by an "id").  A name that is not hostname-safe, or an "id" that is
        not a string (a number, null, ...), is bad input (65) naming the
        line: the record fails and nothing is done for it, so a malformed
        record can never switch off the stale-record check.  A failed record
        with such an identity is passed through as it is, and nothing is done.
        ``fields`` are the other string fields the command reads (absent or null is fine).
        """
        for line in self.records(stream):
            kind = line.kind
            if kind not in kinds:
                self.emit(line.record)
                continue
            if line.failed and not (honour_failed and "id" in line.record):
                self.emit(line.record)
                continue
            try:
                name, rid = line.identity(f"{kind} name")
                for key in fields:
                    line.text(key)
            except KpError as exc:
                if line.failed:
                    self.statuses.add(exc.status)
                    self.error(f"{exc.message}; nothing was done for it")
                    self.emit(line.record)
                else:
                    self.fail(line.record, exc)
                continue
            yield line, name, rid

    def status(self) -> int:
        return errors.worst(self.statuses)


def stdin_is_piped() -> bool:
    """True when stdin is a pipe or a file: records may come from it.

    A terminal, /dev/null, a socket or a closed stdin are not read, so a
    command run by hand, from cron or over ssh -n never waits for input.
    """
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return sys.stdin is not None  # an in-memory stream (click's test runner): read it
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def _terminated(signum: int, frame: Any) -> None:
    raise errors.Interrupted()


def run(command: click.Command, prog: str, args: list[str] | None = None) -> NoReturn:
    """Run a click command and exit with a documented status."""
    signal.signal(signal.SIGTERM, _terminated)
    # the terminal closed under it: cleaned up as for SIGTERM (never under nohup, which ignores SIGHUP)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, _terminated)
    status = errors.SOFTWARE
    try:
        result = command.main(args=args, prog_name=prog, standalone_mode=False)
        status = result if isinstance(result, int) else errors.OK
    except click.exceptions.Exit as exc:
        status = exc.exit_code
    except click.exceptions.Abort:
        click.echo(f"{prog}: interrupted", err=True)
        status = errors.INTERRUPTED
    except click.ClickException as exc:
        exc.show()
        status = errors.USAGE if isinstance(exc, click.UsageError) else exc.exit_code
    except KpError as exc:
        Output(prog).error(exc.message)
        status = exc.status
    except PipeClosed:
        # the reader went away: stop quietly, and keep the interpreter's final
        # flush of stdout from complaining about the broken pipe
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        status = errors.PIPE_CLOSED
    except errors.Interrupted:
        click.echo(f"{prog}: terminated", err=True)
        status = errors.TERMINATED
    except KeyboardInterrupt:
        click.echo(f"{prog}: interrupted", err=True)
        status = errors.INTERRUPTED
    except Exception:
        import traceback

        traceback.print_exc()
        click.echo(f"{prog}: internal error; please report it with the traceback above", err=True)
        status = errors.SOFTWARE
    sys.exit(status)


def name_completion(kinds: tuple[str, ...]) -> Any:
    """A click shell_complete callback that offers existing names of ``kinds``."""

    def complete(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
        from kodepipe.core.state import Store

        store = Store()
        return [n for kind in kinds for n in store.names(kind) if n.startswith(incomplete)]

    return complete
