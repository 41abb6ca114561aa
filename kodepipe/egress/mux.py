"""Many TCP streams and DNS datagrams over one byte stream: the framing between the egress relay in a
guest (relay.pl, in a container's network namespace) and the proxy on the host (relay.py), carried
by one SSH channel.  Pure: bytes in, frames out, and the state that says which frame is allowed.

A frame is a 7-byte header, then its payload::

    kind (1 byte)  stream (4 bytes, big-endian)  length (2 bytes, big-endian)  payload (length bytes)

    READY   guest -> host  stream 0, once, first: what the relay listens on ("127.0.0.1:3128/tcp ...")
    OPEN    guest -> host  a client connected; streams are numbered 1, 2, 3 ... in order, never reused
    DATA    both ways      1 to MAX_PAYLOAD bytes of a stream, within the credit the receiver granted
    EOF     both ways      the sender sends no more DATA on this stream (a half-close)
    CLOSE   both ways      the stream is gone: the receiver flushes what it holds, closes, forgets it
    CREDIT  both ways      4 bytes: the receiver of DATA consumed that many more bytes; each side starts
                           with WINDOW bytes of credit per stream, so nothing buffers more than that
    DNS     both ways      a query (guest -> host, its id chosen by the guest) or its one reply
                           (host -> guest, same id; empty when there is no answer)

The guest side may be hostile (guest root could replace the relay): the host parses strictly, and
any frame that breaks a rule ends the session (MuxError).  Frames for a stream that one side closed
while the other was still sending are stale, not errors: they are dropped.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from enum import IntEnum

HEADER = struct.Struct("!BIH")
MAX_PAYLOAD = 16384  # bytes of one frame's payload
WINDOW = 256 * 1024  # bytes of DATA in flight per stream and direction
MAX_STREAMS = 256  # streams open at once
MAX_DNS = 64  # queries in flight at once (the relay drops more, as a busy resolver would)
MIN_DNS = 12  # a DNS message's header
MAX_READY = 512
_READY_RE = re.compile(r"(127\.0\.0\.1|::1):(3128/tcp|53/udp)( (127\.0\.0\.1|::1):(3128/tcp|53/udp))*")


class Kind(IntEnum):
    READY = 1
    OPEN = 2
    DATA = 3
    EOF = 4
    CLOSE = 5
    CREDIT = 6
    DNS = 7


class MuxError(Exception):
    """The other side broke the protocol: the session ends."""


@dataclass(frozen=True)
class Frame:
    kind: Kind
    stream: int
    payload: bytes = b""

    @property
    def credit(self) -> int:
        return int.from_bytes(self.payload, "big")


def encode(kind: Kind, stream: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"a frame payload of {len(payload)} bytes (at most {MAX_PAYLOAD})")
    return HEADER.pack(kind, stream, len(payload)) + payload


def data_frames(stream: int, data: bytes) -> bytes:
    """``data`` as DATA frames of at most MAX_PAYLOAD bytes."""
    return b"".join(encode(Kind.DATA, stream, data[i:i + MAX_PAYLOAD]) for i in range(0, len(data), MAX_PAYLOAD))


def credit(stream: int, n: int) -> bytes:
    return encode(Kind.CREDIT, stream, n.to_bytes(4, "big"))


# what each kind's payload may be: (least, most) bytes
_SIZES = {Kind.READY: (1, MAX_READY), Kind.OPEN: (0, 0), Kind.DATA: (1, MAX_PAYLOAD), Kind.EOF: (0, 0),
          Kind.CLOSE: (0, 0), Kind.CREDIT: (4, 4), Kind.DNS: (0, MAX_PAYLOAD)}


class Decoder:
    """Frames from a byte stream fed in pieces of any size; holds at most one incomplete frame."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames = []
        while len(self._buf) >= HEADER.size:
            kind_byte, stream, length = HEADER.unpack_from(self._buf)
            try:
                kind = Kind(kind_byte)
            except ValueError:
                raise MuxError(f"a frame of unknown kind {kind_byte}") from None
            least, most = _SIZES[kind]
            if not least <= length <= most:
                raise MuxError(f"a {kind.name} frame of {length} bytes ({least} to {most})")
            if (stream == 0) != (kind is Kind.READY):
                raise MuxError(f"a {kind.name} frame on stream {stream}")
            if len(self._buf) < HEADER.size + length:
                break
            payload = bytes(self._buf[HEADER.size:HEADER.size + length])
            del self._buf[:HEADER.size + length]
            frames.append(Frame(kind, stream, payload))
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held."""
        return len(self._buf)


@dataclass
class Stream:
    """One stream as the host sees it."""

    id: int
    credit: int = WINDOW  # bytes the host may still send the guest
    unacked: int = 0  # bytes the guest sent that the host has not yet given credit back for
    guest_eof: bool = False
    host_eof: bool = False


@dataclass
class HostSession:
    """The host's side of the rules: which guest frame is allowed now.  ``receive`` returns the frame
    to act on, or None for a stale one; MuxError for a frame that breaks a rule."""

    listeners: tuple[str, ...] | None = None
    streams: dict[int, Stream] = field(default_factory=dict)
    last_stream: int = 0
    dns: set[int] = field(default_factory=set)

    def receive(self, frame: Frame) -> Frame | None:
        if frame.kind is Kind.READY:
            if self.listeners is not None:
                raise MuxError("READY twice")
            text = frame.payload.decode("ascii", "replace")
            if not _READY_RE.fullmatch(text) or "127.0.0.1:3128/tcp" not in text.split():
                raise MuxError(f"a READY frame that does not list the relay's listeners: {text[:80]!r}")
            self.listeners = tuple(text.split())
            return frame
        if self.listeners is None:
            raise MuxError(f"a {frame.kind.name} frame before READY")
        if frame.kind is Kind.OPEN:
            if frame.stream != self.last_stream + 1:
                raise MuxError(f"OPEN of stream {frame.stream} after stream {self.last_stream}")
            if len(self.streams) >= MAX_STREAMS:
                raise MuxError(f"more than {MAX_STREAMS} streams open at once")
            self.last_stream = frame.stream
            self.streams[frame.stream] = Stream(frame.stream)
            return frame
        if frame.kind is Kind.DNS:
            if frame.stream in self.dns:
                raise MuxError(f"DNS query {frame.stream} while one with that id is unanswered")
            if len(self.dns) >= MAX_DNS:
                raise MuxError(f"more than {MAX_DNS} DNS queries in flight")
            if len(frame.payload) < MIN_DNS:
                raise MuxError(f"a DNS query of {len(frame.payload)} bytes")
            self.dns.add(frame.stream)
            return frame
        if frame.stream > self.last_stream:
            raise MuxError(f"a {frame.kind.name} frame for stream {frame.stream}, which was never opened")
        stream = self.streams.get(frame.stream)
        if stream is None:
            return None  # the host closed it while the guest was still sending
        if frame.kind is Kind.DATA:
            if stream.guest_eof:
                raise MuxError(f"DATA on stream {frame.stream} after its EOF")
            if stream.unacked + len(frame.payload) > WINDOW:
                raise MuxError(f"DATA on stream {frame.stream} beyond the credit it was granted")
            stream.unacked += len(frame.payload)
        elif frame.kind is Kind.EOF:
            if stream.guest_eof:
                raise MuxError(f"EOF twice on stream {frame.stream}")
            stream.guest_eof = True
        elif frame.kind is Kind.CREDIT:
            if not 0 < frame.credit <= WINDOW - stream.credit:
                raise MuxError(f"CREDIT of {frame.credit} on stream {frame.stream}: more than was sent")
            stream.credit += frame.credit
        elif frame.kind is Kind.CLOSE:
            del self.streams[frame.stream]
        return frame

    # what the host sends, kept in step

    def sent_data(self, stream_id: int, n: int) -> None:
        stream = self.streams[stream_id]
        if n > stream.credit:
            raise ValueError(f"{n} bytes on stream {stream_id} with a credit of {stream.credit}")
        stream.credit -= n

    def consumed(self, stream_id: int, n: int) -> bool:
        """The host passed on ``n`` bytes the guest sent: True if the stream is still open (then a
        CREDIT of ``n`` goes back)."""
        stream = self.streams.get(stream_id)
        if stream is None:
            return False
        stream.unacked -= n
        return True

    def answered(self, query: int) -> None:
        self.dns.discard(query)

    def closed(self, stream_id: int) -> None:
        """The host sent CLOSE: what the guest still sends on it is stale."""
        self.streams.pop(stream_id, None)
