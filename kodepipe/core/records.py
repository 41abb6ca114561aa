"""The JSON-lines record contract (see kodepipe(7)).

One JSON object per line, UTF-8, compact.  Stdout carries records only and
is flushed after every record so pipelines stream.  A stage enriches the
records it handles and passes every other key and record through unchanged.

Reading is bounded and typed: a line longer than ``MAX_LINE``, nested deeper
than ``MAX_DEPTH`` (what orjson can write back), or a field of the wrong type
is bad input naming the line.  Every command reads its records through
``read`` and the typed accessors of ``Line``, so each says what it expects.
Files that a record or an option names are opened with ``open_regular``
and read with ``bounded_lines``: never a device, a FIFO or a directory, and
never a whole unbounded line in memory.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, BinaryIO, NamedTuple

from kodepipe.core.errors import BadInput, BadName, KpError, NoPermission, NotFound

Record = dict[str, Any]

NAME_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
NAME_RULE = ("names are 1 to 63 characters of lowercase a-z, 0-9 and '-', "
             "starting and ending with a letter or digit (a hostname label)")

# orjson reads up to 1024 levels of nesting but writes only 254: a deeper record
# could be read and then never written back, so it is refused as it is read.
MAX_DEPTH = 254
# A record line longer than this is refused (its rest is skipped, never held in memory).
MAX_LINE = 64 << 20
MAX_ID = 128


def check_name(name: object, what: str = "name") -> str:
    """Return ``name`` if it is hostname-safe, else raise BadName.

    Checked before any side effect: a name becomes a folder, a lock file, a
    socket path and a guest hostname, so '../x', '-rf' and unicode never get
    that far.
    """
    if not isinstance(name, str):
        raise BadName(f"{what} must be a string, not {json_type(name)}")
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
            data = orjson.dumps(record) + b"\n"
        except orjson.JSONEncodeError as exc:
            # reading refuses what cannot be written back; this is the last line of defence
            raise BadInput(f"a record cannot be written as JSON ({exc})") from None
        try:
            self.stream.write(data)
            self.stream.flush()
        except BrokenPipeError as exc:
            raise PipeClosed() from exc
        self.count += 1


# -- reading lines, bounded -----------------------------------------------------------------------


class TooLong(NamedTuple):
    """What ``bounded_lines`` yields for a line over its limit (whose bytes were skipped)."""

    head: bytes  # the first bytes of the line, to show in a message
    limit: int


def bounded_lines(stream: IO[bytes], limit: int) -> Iterator[tuple[int, bytes | TooLong]]:
    """Yield (line number, line) for each line of ``stream``, as the lines arrive.

    A line longer than ``limit`` bytes is yielded as a ``TooLong`` and its rest is
    read and dropped in pieces: memory stays bounded whatever the input
    (``/dev/zero`` has a single endless line).
    """
    lineno = 0
    while True:
        line = stream.readline(limit + 1)
        if not line:
            return
        lineno += 1
        if len(line) > limit and not line.endswith(b"\n"):
            while True:
                rest = stream.readline(1 << 20)
                if not rest or rest.endswith(b"\n"):
                    break
            yield lineno, TooLong(line[:120], limit)
            continue
        yield lineno, line


def decode_text(line: bytes, lineno: int) -> str:
    """A line of a text file as str, or BadInput for a NUL byte or bytes that are not UTF-8."""
    nul = line.find(b"\0")
    if nul >= 0:
        raise BadInput(f"line {lineno}: contains a NUL byte (byte {nul + 1}): not a text line")
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"line {lineno}: not UTF-8 (byte {exc.start + 1} is {line[exc.start]:#04x})") from None


def too_long(lineno: int, what: TooLong, where: str = "") -> BadInput:
    return BadInput(f"{_at(where, lineno)}: longer than {_bytes(what.limit)} (it starts "
                    f"{what.head[:40].decode('utf-8', 'backslashreplace')!r}); it was skipped")


def _at(where: str, lineno: int) -> str:
    """How a message names a line: "line 3", or "stdin line 3" when ``where`` says where it is."""
    return f"{where} line {lineno}" if where else f"line {lineno}"


def _bytes(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and not n % (1 << 20) else f"{n} bytes"


def open_regular(path: object, what: str) -> BinaryIO:
    """Open ``path`` for reading if it is a regular file, else raise a KpError saying why.

    ``what`` names the file for messages ("the audit log").  Symbolic links are
    followed (a user may keep a file anywhere), but what is opened is checked
    with fstat, so a device (/dev/zero), a FIFO (opened without blocking), a
    socket or a directory is refused, however it was named.  A missing file is
    not_found (1), an unreadable one no_permission (77), anything else that is
    not a regular file bad input (65).
    """
    if not isinstance(path, str) or not path or "\0" in path:
        raise BadInput(f"{what} must be a path, not {json_type(path) if not isinstance(path, str) else repr(path)}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"cannot read {what} {path}: there is no such file") from None
    except PermissionError:
        raise NoPermission(f"cannot read {what} {path}: permission denied") from None
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG):
            raise BadInput(f"cannot read {what} {path}: {exc.strerror}") from None
        raise KpError(f"cannot read {what} {path}: {exc.strerror}", code="unreadable") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise BadInput(f"{what} {path} is {_file_type(mode)}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _file_type(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


# -- records ------------------------------------------------------------------------------------


def parse_line(line: bytes, lineno: int, where: str = "") -> Record:
    """Parse one line into a record, or raise BadInput naming the line (and ``where`` it is: "stdin")."""
    import orjson

    at = _at(where, lineno)
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise BadInput(f"{at}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise BadInput(f"{at}: expected a JSON object, got {json_type(value)}")
    # a line can only nest as deep as it has brackets: the walk is for the rare line with many
    if line.count(b"[") + line.count(b"{") > MAX_DEPTH and too_deep(value):
        raise BadInput(f"{at}: nested deeper than {MAX_DEPTH} levels, which cannot be written back")
    kind = value.get("kind")
    if kind is not None and not isinstance(kind, str):
        raise BadInput(f"{at}: \"kind\" must be a string, got {json_type(kind)}")
    return value


def too_deep(value: object, limit: int = MAX_DEPTH) -> bool:
    """True if ``value`` nests more than ``limit`` arrays and objects (iteratively: no recursion limit)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


class Line(NamedTuple):
    """One record read from a stream, with its line number, and typed reads of its fields.

    Each accessor says what the command expects of a field; a field of another
    type is a BadInput that names the line and the field, so nothing is done
    with a record whose "id" is a number (which would switch off the stale-record
    check) or whose port is a string.  Absent and null optional fields read as None.
    """

    number: int
    record: Record

    @property
    def at(self) -> str:
        """How messages name this line: "line 3" (a StdinLine: "stdin line 3")."""
        return _at("", self.number)

    @property
    def kind(self) -> str | None:
        kind = self.record.get("kind")
        return kind if isinstance(kind, str) else None  # parse_line refused any other type

    @property
    def failed(self) -> bool:
        """An earlier stage failed on this record (it carries an "error")."""
        return "error" in self.record

    def bad(self, key: str, expected: str) -> BadInput:
        return BadInput(f"{self.at}: \"{key}\" must be {expected}, "
                        f"got {json_type(self.record.get(key))}")

    def name(self, what: str = "name", key: str = "name") -> str:
        """The record's name, required and hostname-safe (BadName, 65)."""
        value = self.record.get(key)
        if key not in self.record:
            raise BadName(f"{self.at}: the record has no \"{key}\"")
        try:
            return check_name(value, what)
        except BadName as exc:
            raise BadName(f"{self.at}: {exc.message}") from None

    def id(self, key: str = "id") -> str | None:
        """The record's identity, if it has one: a non-empty string (kodepipe writes 12 hex digits)."""
        value = self.record.get(key)
        if value is None and key not in self.record:
            return None
        if not isinstance(value, str) or not value or len(value) > MAX_ID or not value.isprintable():
            raise self.bad(key, "a string (the id kodepipe gave the object)")
        return value

    def identity(self, what: str) -> tuple[str, str | None]:
        """(name, id) of a record that names an object of kodepipe's."""
        return self.name(what), self.id()

    def text(self, key: str, *, required: bool = False) -> str | None:
        value = self.record.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, str):
            raise self.bad(key, "a string")
        return value

    def path(self, key: str) -> str | None:
        """A file path: a non-empty string without NUL bytes, or None when absent or null."""
        value = self.text(key)
        if value is not None and (not value or "\0" in value):
            raise BadInput(f"{self.at}: \"{key}\" must be a file path, got {value!r}")
        return value

    def integer(self, key: str, *, low: int | None = None, high: int | None = None) -> int | None:
        value = self.record.get(key)
        if value is None:
            return None
        wanted = "an integer" + (f" from {low} to {high}" if low is not None and high is not None else "")
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.bad(key, wanted)
        if (low is not None and value < low) or (high is not None and value > high):
            raise BadInput(f"{self.at}: \"{key}\" must be {wanted}, got {value}")
        return value

    def mapping(self, key: str) -> dict[str, Any] | None:
        value = self.record.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.bad(key, "an object")
        return value

    def strings(self, key: str) -> list[str] | None:
        value = self.record.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.bad(key, "an array of strings")
        return value


class StdinLine(Line):
    """A record read from stdin: every message about it names it "stdin line 3"."""

    __slots__ = ()

    @property
    def at(self) -> str:
        return _at(STDIN, self.number)


STDIN = "stdin"


def read(stream: IO[bytes], on_bad: Callable[[BadInput], None], *, limit: int = MAX_LINE,
         stdin: bool = False) -> Iterator[Line]:
    """Yield a ``Line`` (line number, record) for each JSON object line of ``stream``.

    Blank lines are skipped.  A line that is not a JSON object (or is too long,
    or too deep) is reported through ``on_bad`` and skipped; the caller decides
    the exit status.  Lines are read as they arrive, so an upstream stage can stream.
    With ``stdin``, every message names a line as "stdin line 3" (and the lines are StdinLines).
    """
    return lines_of(bounded_lines(stream, limit), on_bad, stdin=stdin)


def lines_of(numbered: Iterable[tuple[int, bytes | TooLong]], on_bad: Callable[[BadInput], None], *,
             stdin: bool = False) -> Iterator[Line]:
    """``read`` of lines already numbered by ``bounded_lines`` (kp-trace looks at the first before it
    knows whether records or strace text follow)."""
    where, make = (STDIN, StdinLine) if stdin else ("", Line)
    for lineno, line in numbered:
        if isinstance(line, TooLong):
            on_bad(too_long(lineno, line, where))
            continue
        if not line.strip():
            continue
        try:
            yield make(lineno, parse_line(line, lineno, where))
        except BadInput as exc:
            on_bad(exc)


def with_error(record: Record, code: str, message: str) -> Record:
    out = dict(record)
    out["error"] = {"code": code, "message": message}
    return out


def json_type(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


_json_type = json_type  # the old private name
