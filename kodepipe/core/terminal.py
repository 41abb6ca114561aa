"""Relaying a local terminal (or plain stdin/stdout) to a remote byte stream.

Used by kp-ssh's interactive shell (a paramiko channel) and kp-attach (the
serial console's unix socket): both have fileno(), recv() and sendall().
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import termios
import tty
from collections.abc import Callable, Iterator
from typing import Any, Protocol

ESCAPE = b"\x1d"  # Ctrl-], as in telnet and virsh console
CHUNK = 65536

# C0 and C1 controls, DEL, the lone surrogates that stand for bytes that are not UTF-8 (as
# os.fsdecode makes them), and the line separators and bidirectional overrides that reorder text
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte
        return f"\\x{code - 0xDC00:02x}"
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def escape(text: str) -> str:
    """``text`` safe to print on a terminal: every control character (and a byte that is not UTF-8)
    written as an escape (``\\n``, ``\\x1b``, ``\\u202e``), so a file name or anything else that
    came from an agent or a guest cannot move the cursor, recolour the screen or hide what follows.
    Printable text is left as it is; escaping twice changes nothing more."""
    return _UNSAFE.sub(_escaped, text)


# the same, but for text whose lines are meant as lines: newlines and tabs pass
_UNSAFE_IN_LINES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def escape_lines(text: str) -> str:
    """Like ``escape``, but newlines and tabs are kept: for a message that quotes a program's or a
    serial console's lines.  A carriage return is escaped (it would let a line overwrite itself).
    A single value quoted into a message (a file name) is escaped with ``escape`` first, so it
    cannot begin a line of its own."""
    return _UNSAFE_IN_LINES.sub(_escaped, text)


class Escaper:
    """A guest's output (a serial log) made safe for a terminal, chunk by chunk: decoded as UTF-8
    (a byte that is not UTF-8 shown as ``\\xNN``), CR LF line ends as newlines, and every other
    control character escaped (``escape_lines``).  A sequence split between chunks is kept whole."""

    def __init__(self) -> None:
        import codecs

        self._decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self._cr = False

    def feed(self, data: bytes, final: bool = False) -> bytes:
        text = ("\r" if self._cr else "") + self._decoder.decode(data, final)
        self._cr = not final and text.endswith("\r")
        if self._cr:
            text = text[:-1]  # the first half of a CR LF, perhaps: wait for the next chunk
        return escape_lines(text.replace("\r\n", "\n")).encode("utf-8", "surrogateescape")


class Stream(Protocol):
    def fileno(self) -> int: ...

    def recv(self, size: int, /) -> bytes: ...

    def sendall(self, data: bytes, /) -> Any: ...


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """The terminal on ``fd`` in raw mode, restored however the block ends."""
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        # TCSAFLUSH would drop what the user typed ahead; TCSADRAIN keeps it
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def size(fd: int) -> tuple[int, int]:
    """(columns, rows) of the terminal on ``fd``; 80x24 when it has none."""
    try:
        cols, rows = os.get_terminal_size(fd)
    except OSError:
        return 80, 24
    return (cols or 80), (rows or 24)


@contextlib.contextmanager
def on_resize(fd: int, resized: Callable[[int, int], None]) -> Iterator[None]:
    """Call ``resized(columns, rows)`` whenever the terminal on ``fd`` changes size (SIGWINCH)."""

    def handler(signum: int, frame: Any) -> None:
        with contextlib.suppress(Exception):  # a resize must never break the session
            resized(*size(fd))

    previous = signal.signal(signal.SIGWINCH, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGWINCH, previous)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def relay(local_in: int, local_out: int, remote: Stream, *, escape: bytes | None = None,
          linger: float | None = None) -> str:
    """Copy local_in -> remote and remote -> local_out until one side ends.

    Returns why it stopped: "escape" (the escape byte was typed; what came
    before it is still sent), "remote_closed", or "local_eof".  With
    ``linger``, after local EOF the remote's output is still copied until it
    has been quiet for that many seconds (a script's last command gets its
    answer).
    """
    local_open = True
    while True:
        watched: list[Any] = [remote, local_in] if local_open else [remote]
        ready, _, _ = select.select(watched, [], [], None if local_open else linger)
        if not ready:
            return "local_eof"  # quiet for `linger` seconds after local EOF
        if remote in ready:
            try:
                data = remote.recv(CHUNK)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            if not data:
                return "remote_closed"
            write_all(local_out, data)
        if local_open and local_in in ready:
            data = os.read(local_in, CHUNK)
            if escape is not None and escape in data:
                before = data.split(escape, 1)[0]
                if before:
                    remote.sendall(before)
                return "escape"
            if not data:
                if linger is None:
                    return "local_eof"
                local_open = False
                continue
            remote.sendall(data)
