"""The JSON-lines record contract (see kodepipe(7)).

One JSON object per line, UTF-8, compact.  Stdout carries records only and
is flushed after every record so pipelines stream.  A stage enriches the
records it handles and passes every other key and record through unchanged.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from typing import IO, Any

from kodepipe.errors import BadInput, BadName

Record = dict[str, Any]

NAME_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
NAME_RULE = ("names are 1 to 63 characters of lowercase a-z, 0-9 and '-', "
             "starting and ending with a letter or digit (a hostname label)")


def check_name(name: object, what: str = "name") -> str:
    """Return ``name`` if it is hostname-safe, else raise BadName.

    Checked before any side effect: a name becomes a folder, a lock file, a
    socket path and a guest hostname, so '../x', '-rf' and unicode never get
    that far.
    """
    if not isinstance(name, str):
        raise BadName(f"{what} must be a string, not {type(name).__name__}")
    if not NAME_RE.fullmatch(name):
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise BadName(f"invalid {what} {shown!r}: {NAME_RULE}")
    return name


class PipeClosed(Exception):
    """The reader of stdout went away."""


class Writer:
    """Writes records to a binary stream, one compact JSON line each, flushed."""

    def __init__(self, stream: IO[bytes] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout.buffer
        self.count = 0

    def __call__(self, record: Record) -> None:
        import orjson  # loaded on first use: --help never pays for it

        try:
            self.stream.write(orjson.dumps(record) + b"\n")
            self.stream.flush()
        except BrokenPipeError as exc:
            raise PipeClosed() from exc
        self.count += 1


def parse_line(line: bytes, lineno: int) -> Record:
    """Parse one line into a record, or raise BadInput naming the line."""
    import orjson

    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise BadInput(f"line {lineno}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise BadInput(f"line {lineno}: expected a JSON object, got {_json_type(value)}")
    kind = value.get("kind")
    if kind is not None and not isinstance(kind, str):
        raise BadInput(f"line {lineno}: \"kind\" must be a string, got {_json_type(kind)}")
    return value


def read(stream: IO[bytes], on_bad: Callable[[BadInput], None]) -> Iterator[tuple[int, Record]]:
    """Yield (line number, record) for each JSON object line of ``stream``.

    Blank lines are skipped.  A line that is not a JSON object is reported
    through ``on_bad`` and skipped; the caller decides the exit status.
    Lines are read as they arrive, so an upstream stage can stream.
    """
    for lineno, line in enumerate(iter(stream.readline, b""), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, parse_line(line, lineno)
        except BadInput as exc:
            on_bad(exc)


def with_error(record: Record, code: str, message: str) -> Record:
    out = dict(record)
    out["error"] = {"code": code, "message": message}
    return out


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)
