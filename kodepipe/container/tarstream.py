"""Reading a tar stream that a hostile party wrote: the headers, strictly, one member at a time.

The stream is the one ``tar --xattrs --xattrs-include='trusted.overlay.*' -C
UPPER -cf - .`` writes in a guest (GNU tar: with --xattrs it writes POSIX
pax archives, a local pax header before every member with its mtime, atime,
ctime, long names and ``SCHILY.xattr.*``); GNU-format long names (``L``,
``K``) and base-256 numbers are read too.  Whoever controls the guest
controls every byte, so this parser is written for that, and is the reason
it exists instead of Python's ``tarfile`` (which kodepipe uses to *write*
tests' archives, never to read a guest's):

- every header is bounded: a pax or GNU long-name header larger than
  ``MAX_HEADER`` is refused, and all of them together at most ``max_meta``
  bytes (tarfile reads a pax header of any declared size into memory);
- a malformed header is an error, never the end of the archive (tarfile's
  streaming mode takes a bad header after the first member for the end
  and returns a silently shortened archive), and the stream must end with
  the two zero blocks GNU tar writes, followed by nothing but zeros:
  anything else is ``Truncated`` or ``Refused``;
- nothing is guessed: a member type GNU tar does not write for that
  command (contiguous files, global pax headers, sparse, multi-volume,
  incremental dumps) is refused rather than interpreted; the size of a
  member that is not a regular file must be 0; a pax key this reader does
  not use is ignored unless it is one of GNU's (``GNU.*``: sparse maps,
  dump dirs, volumes), which is refused;
- names, link targets and xattr values are bytes, exactly as stored
  (pax ``path`` records are taken as bytes whatever ``hdrcharset`` says:
  GNU tar writes a name that is not UTF-8 as it is).

It does no I/O but ``read`` on the stream it is given: no file is made here
(``upperdir`` does that).  Exceptions are ``KpError`` with the codes the
quarantine's extraction reports (kp-run exits 1 with them):
``upper_refused`` (a stream this reader does not accept), ``upper_truncated``
(it ended early) and ``upper_too_large`` (past a cap).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from kodepipe.core.errors import KpError

BLOCK = 512
CHUNK = 1 << 20
MAX_HEADER = 1 << 20  # one pax header or GNU long name: a path of 4,000 levels of 255-byte names fits
MAX_TRAILER = 1 << 20  # zeros after the end-of-archive blocks (GNU tar pads to 10 KiB records)
MAX_NUMBER_DIGITS = 30  # of a decimal in a pax record
NS = 1_000_000_000
MAX_SECONDS = 1 << 62  # mtimes are clamped to this many seconds either side of the epoch

MemberType = Literal["file", "hardlink", "symlink", "chardev", "blockdev", "dir", "fifo"]
TYPES: dict[bytes, MemberType] = {b"0": "file", b"\0": "file", b"1": "hardlink", b"2": "symlink",
                                  b"3": "chardev", b"4": "blockdev", b"5": "dir", b"6": "fifo"}
REFUSED_TYPES = {b"7": "a contiguous file", b"g": "a global pax header", b"S": "a GNU sparse file",
                 b"M": "a multi-volume continuation", b"V": "a volume label", b"N": "an old GNU long name",
                 b"D": "a GNU incremental dump directory"}
PAX, LONGNAME, LONGLINK = b"x", b"L", b"K"
POSIX_MAGIC, GNU_MAGIC = b"ustar\x0000", b"ustar  \x00"
XATTR_KEY = b"SCHILY.xattr."
_OCTAL = re.compile(rb" *([0-7]*)[ \0]*")


class Refused(KpError):
    """The guest's tar stream holds something the extractor does not accept."""

    code = "upper_refused"


class Truncated(Refused):
    """The stream ended before the end of the archive."""

    code = "upper_truncated"


class TooLarge(KpError):
    """The stream goes past one of the caps."""

    code = "upper_too_large"


class Stream(Protocol):
    def read(self, size: int, /) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Member:
    """One archive member, its extended headers applied.  ``size`` bytes of data follow it (a
    regular file's); ``name`` and ``linkname`` are raw bytes, not yet checked (see upperdir)."""

    name: bytes
    type: MemberType
    mode: int  # the 12 permission bits
    size: int
    mtime_ns: int
    linkname: bytes = b""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    offset: int = 0  # of its first header in the stream, for messages


def _cstring(raw: bytes) -> bytes:
    end = raw.find(b"\0")
    return raw if end < 0 else raw[:end]


def _number(raw: bytes, what: str, offset: int) -> int:
    """A numeric header field: octal digits (leading spaces, then NUL or space to the end), or
    GNU's base-256 (first byte 0x80 positive, 0xff negative)."""
    if raw[:1] == b"\x80":
        return int.from_bytes(raw[1:], "big")
    if raw[:1] == b"\xff":
        return int.from_bytes(raw, "big", signed=True)
    found = _OCTAL.fullmatch(raw)
    if found is None:
        raise Refused(f"the guest's tar stream has a malformed {what} field at byte {offset}: {raw!r}")
    return int(found.group(1), 8) if found.group(1) else 0


def _decimal(value: bytes, what: str, offset: int, *, fraction: bool = False) -> int:
    """A pax decimal: digits (and for a time a sign and up to 9 places of fraction, else
    truncated): the integer, or nanoseconds when ``fraction``."""
    sign = 1
    text = value
    if fraction and text[:1] == b"-":
        sign, text = -1, text[1:]
    whole, dot, frac = text.partition(b".") if fraction else (text, b"", b"")
    if not whole or len(value) > MAX_NUMBER_DIGITS or not whole.isdigit() or (dot and not frac.isdigit()):
        raise Refused(f"the guest's tar stream has a malformed pax {what} at byte {offset}: {value[:40]!r}")
    if not fraction:
        return int(whole)
    seconds = max(-MAX_SECONDS, min(MAX_SECONDS, sign * int(whole)))
    nanos = int((frac[:9] or b"0").ljust(9, b"0"))
    return seconds * NS + sign * nanos


def _pax_records(data: bytes, offset: int) -> list[tuple[bytes, bytes]]:
    """The records of a pax extended header: "LENGTH KEY=VALUE\\n", LENGTH counting itself."""
    records = []
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 12)
        length_text = data[pos:space] if space > pos else b""
        if not length_text.isdigit():
            raise Refused(f"the guest's tar stream has a malformed pax record at byte {offset + pos}")
        length = int(length_text)
        end = pos + length
        if end > len(data) or end <= space + 1 or data[end - 1:end] != b"\n":
            raise Refused(f"the guest's tar stream has a pax record of a wrong length at byte {offset + pos}")
        key, eq, value = data[space + 1:end - 1].partition(b"=")
        if not eq or not key:
            raise Refused(f"the guest's tar stream has a pax record without a key at byte {offset + pos}")
        records.append((key, value))
        pos = end
    return records


class Reader:
    """The members of a tar stream, in order (``members()``); read each regular file's data with
    ``data()`` before asking for the next member (what is left unread is skipped).

    ``max_meta`` bounds the bytes of all extended headers together (pax, long names);
    past it, ``TooLarge``.  ``consumed`` counts the bytes read from the stream."""

    def __init__(self, stream: Stream, *, max_meta: int, max_header: int = MAX_HEADER) -> None:
        self.stream = stream
        self.max_meta, self.max_header = max_meta, max_header
        self.consumed = 0
        self.meta = 0
        self._left = 0  # data bytes of the current member not yet read
        self._pad = 0  # then this many bytes of padding
        self.ended = False

    def _read(self, size: int, what: str) -> bytes:
        parts = []
        want = size
        while want:
            chunk = self.stream.read(min(want, CHUNK))
            if not chunk:
                raise Truncated(f"the guest's tar stream ended early, in {what} (byte {self.consumed})",
                                hint="did the guest's tar fail, or the connection drop? the upper dir "
                                     "stays in the guest")
            parts.append(chunk)
            want -= len(chunk)
            self.consumed += len(chunk)
        return b"".join(parts)

    def _skip(self) -> None:
        while self._left:
            self._read(min(self._left, CHUNK), "a file's data")
            self._left -= min(self._left, CHUNK)
        if self._pad:
            self._read(self._pad, "a file's padding")
            self._pad = 0

    def data(self) -> Iterator[bytes]:
        """The current member's data, in chunks of at most CHUNK bytes; then its padding is read."""
        while self._left:
            chunk = self._read(min(self._left, CHUNK), "a file's data")
            self._left -= len(chunk)
            yield chunk
        self._skip()

    def _header(self) -> tuple[bytes, int] | None:
        """The next header block (checked) and its offset; None for the end of the archive."""
        offset = self.consumed
        block = self._read(BLOCK, "a header")
        if block == bytes(BLOCK):
            if self._read(BLOCK, "the end-of-archive marker") != bytes(BLOCK):
                raise Refused(f"the guest's tar stream has a zero block alone at byte {offset}, not the "
                              "end of the archive")
            self._trailer()
            return None
        stored = _number(block[148:156], "checksum", offset)
        unsigned = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
        # some old tars summed signed chars: the same less 256 for each byte above 127
        signed = unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b > 127) if stored != unsigned else stored
        if stored not in (unsigned, signed):
            raise Refused(f"the guest's tar stream has a header with a wrong checksum at byte {offset}")
        if block[257:265] not in (POSIX_MAGIC, GNU_MAGIC):
            raise Refused(f"the guest's tar stream has a header that is neither POSIX nor GNU at byte {offset}")
        return block, offset

    def _trailer(self) -> None:
        """After the end-of-archive blocks: zeros only, then the end of the stream."""
        seen = 0
        while True:
            chunk = self.stream.read(CHUNK)
            if not chunk:
                self.ended = True
                return
            self.consumed += len(chunk)
            seen += len(chunk)
            if chunk.count(0) != len(chunk) or seen > MAX_TRAILER:
                raise Refused("the guest's tar stream goes on after the end of the archive")

    def _extended(self, size: int, offset: int, what: str) -> bytes:
        if size > self.max_header:
            raise TooLarge(f"the guest's tar stream has {what} of {size} bytes at byte {offset} (at most "
                           f"{self.max_header})")
        self.meta += size
        if self.meta > self.max_meta:
            raise TooLarge(f"the guest's tar stream has more than {self.max_meta} bytes of extended headers")
        data = self._read(size, what)
        pad = -size % BLOCK
        if pad:
            self._read(pad, f"the padding of {what}")
        return data

    def members(self) -> Iterator[Member]:
        """Each member in turn; returns at the end of the archive (``Truncated`` or ``Refused`` if
        the stream does not end as GNU tar ends one)."""
        while True:
            self._skip()
            pax: dict[bytes, bytes] | None = None
            longname = longlink = None
            first: int | None = None
            while True:
                found = self._header()
                if found is None:
                    if first is not None:
                        raise Refused(f"the guest's tar stream ends with an extended header at byte {first} "
                                      "that no member follows")
                    return
                block, offset = found
                first = offset if first is None else first
                flag = block[156:157]
                size = _number(block[124:136], "size", offset)
                if size < 0:
                    raise Refused(f"the guest's tar stream has a negative size at byte {offset}")
                if flag == PAX:
                    if pax is not None:
                        raise Refused(f"the guest's tar stream has two pax headers for one member at byte {offset}")
                    pax = self._pax(self._extended(size, offset, "a pax header"), offset)
                elif flag in (LONGNAME, LONGLINK):
                    if (longname if flag == LONGNAME else longlink) is not None:
                        raise Refused(f"the guest's tar stream has two GNU long names for one member at byte {offset}")
                    value = _cstring(self._extended(size, offset, "a GNU long name"))
                    if flag == LONGNAME:
                        longname = value
                    else:
                        longlink = value
                else:
                    break
            yield self._member(block, offset, first, size, pax or {}, longname, longlink)

    def _pax(self, data: bytes, offset: int) -> dict[bytes, bytes]:
        found: dict[bytes, bytes] = {}
        for key, value in _pax_records(data, offset):
            if key.startswith(b"GNU."):
                raise Refused(f"the guest's tar stream uses the GNU extension {key[:60]!r} at byte {offset} "
                              "(sparse files, dump dirs or volumes), which is not accepted")
            if key in found and (key in (b"path", b"linkpath", b"size", b"mtime") or key.startswith(XATTR_KEY)):
                raise Refused(f"the guest's tar stream has the pax key {key[:60]!r} twice at byte {offset}")
            found[key] = value
        return found

    def _member(self, block: bytes, offset: int, first: int, size: int, pax: dict[bytes, bytes],
                longname: bytes | None, longlink: bytes | None) -> Member:
        flag = block[156:157]
        kind = TYPES.get(flag)
        if kind is None:
            what = REFUSED_TYPES.get(flag, f"a member of type {flag!r}")
            raise Refused(f"the guest's tar stream holds {what} at byte {offset}, which is not accepted")
        name = _cstring(block[0:100])
        if block[257:265] == POSIX_MAGIC and block[345] != 0:
            name = _cstring(block[345:500]) + b"/" + name
        linkname = _cstring(block[157:257])
        if longname is not None:
            name = longname
        if longlink is not None:
            linkname = longlink
        if b"path" in pax:
            if longname is not None:
                raise Refused(f"the guest's tar stream names the member at byte {offset} twice (pax and GNU)")
            name = pax[b"path"]
        if b"linkpath" in pax:
            if longlink is not None:
                raise Refused(f"the guest's tar stream names the link at byte {offset} twice (pax and GNU)")
            linkname = pax[b"linkpath"]
        if b"size" in pax:
            size = _decimal(pax[b"size"], "size", offset)
        if b"mtime" in pax:
            mtime_ns = _decimal(pax[b"mtime"], "mtime", offset, fraction=True)
        else:
            mtime_ns = max(-MAX_SECONDS, min(MAX_SECONDS, _number(block[136:148], "mtime", offset))) * NS
        if kind != "file" and size:
            raise Refused(f"the guest's tar stream has a {kind} with {size} bytes of data at byte {offset}")
        mode = _number(block[100:108], "mode", offset) & 0o7777
        devmajor = devminor = 0
        if kind in ("chardev", "blockdev"):
            devmajor = _number(block[329:337], "devmajor", offset)
            devminor = _number(block[337:345], "devminor", offset)
        xattrs = {key[len(XATTR_KEY):]: value for key, value in pax.items() if key.startswith(XATTR_KEY)}
        self._left, self._pad = size, -size % BLOCK
        return Member(name, kind, mode, size, mtime_ns, linkname, devmajor, devminor, xattrs, first)
