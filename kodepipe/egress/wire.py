"""What the egress proxy reads from a sandbox, parsed without I/O: an HTTP/1 proxy request's head,
and the server name of a TLS ClientHello reassembled across records and segments."""

from __future__ import annotations

import re
from dataclasses import dataclass

HEAD_LIMIT = 64 * 1024  # bytes of a request head (and of a chunked body's trailers)
HELLO_LIMIT = 64 * 1024  # bytes of TLS records held while a ClientHello is incomplete (real ones: < 4 KiB)


class BadRequest(Exception):
    pass


class BadHello(Exception):
    pass


_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_RE = re.compile(rb"([A-Z]{3,10}) ([\x21-\x7e]+) HTTP/1\.[01]")
HEADER_RE = re.compile(rb"(" + _TOKEN + rb"):([ \t\x21-\x7e\x80-\xff]*)")
_URL_RE = re.compile(r"http://(\[[0-9a-fA-F:.]+\]|[^/:\s]+)(?::(\d+))?(/\S*)?$")
CHUNK_RE = re.compile(rb"([0-9A-Fa-f]{1,15})\r\n")
# hop-by-hop: not forwarded (Upgrade would turn the connection into an unchecked stream), nor are
# Proxy-* headers; Host is set to the checked host
HOP_HEADERS = (b"connection", b"keep-alive", b"upgrade", b"te")
_HOP = (b"proxy-", b"host", *HOP_HEADERS)


@dataclass(frozen=True)
class Request:
    method: str
    host: str
    port: int
    head: bytes = b""  # what goes upstream: the request line and headers (nothing for CONNECT)
    length: int = 0  # the body's bytes, from Content-Length
    chunked: bool = False  # the body is chunked (then length is 0)
    target: str = ""  # an origin-form request (for the proxy itself: a credential's endpoint): its path
    headers: tuple[tuple[bytes, bytes, bytes], ...] = ()  # of an origin-form request: (lower name, value, line)


def parse_request(head: bytes) -> Request:
    """A proxy request from its head (ending in an empty line), or BadRequest.  The framing must be
    unambiguous: one Content-Length, or Transfer-Encoding: chunked alone, or neither (no body)."""
    lines = head.split(b"\r\n")
    if len(lines) < 3 or lines[-2:] != [b"", b""]:
        raise BadRequest("a request head ends with an empty line")
    m = _REQUEST_RE.fullmatch(lines[0])
    if m is None:
        raise BadRequest("not an HTTP/1 proxy request")
    method, target = m.group(1).decode(), m.group(2).decode("latin-1")
    headers: list[tuple[bytes, bytes, bytes]] = []
    for line in lines[1:-2]:
        h = HEADER_RE.fullmatch(line)
        if h is None:
            # folded lines, a space before the colon, bare CR or LF, NUL: read differently by different servers
            raise BadRequest("a malformed header line")
        headers.append((h.group(1).lower(), h.group(2).strip(b" \t"), line))
    if method == "CONNECT":
        host, sep, port_text = target.rpartition(":")
        if not sep or not port_text.isdigit():
            raise BadRequest("CONNECT needs host:port")
        return Request(method, host.strip("[]"), int(port_text))
    lengths = [value for name, value, _ in headers if name == b"content-length"]
    codings = [value for name, value, _ in headers if name == b"transfer-encoding"]
    if lengths and codings:
        raise BadRequest("both Content-Length and Transfer-Encoding: ambiguous framing")
    if len(lengths) > 1 or len(codings) > 1:
        raise BadRequest("more than one Content-Length or Transfer-Encoding: ambiguous framing")
    if lengths and not re.fullmatch(rb"[0-9]{1,18}", lengths[0]):
        raise BadRequest("a Content-Length that is not one number")
    if codings and codings[0].lower() != b"chunked":
        raise BadRequest("a Transfer-Encoding other than chunked")
    length, chunked = int(lengths[0]) if lengths else 0, bool(codings)
    if target.startswith("/"):  # origin-form: a request for the proxy itself (a credential's endpoint)
        return Request(method, "", 0, b"", length, chunked, target=target, headers=tuple(headers))
    u = _URL_RE.match(target)
    if u is None:
        raise BadRequest("a proxy request needs an absolute http:// URL (https goes through CONNECT)")
    host, port, path = u.group(1).strip("[]"), int(u.group(2) or 80), u.group(3) or "/"
    # the Host header is the checked one: a different Host would reach another site behind a shared front end
    kept = [line for name, _, line in headers if not name.startswith(_HOP[0]) and name not in _HOP[1:]]
    first = f"{method} {path} HTTP/1.1".encode("latin-1")
    host_header = f"Host: {host}" + ("" if port == 80 else f":{port}")
    forward = b"\r\n".join([first, host_header.encode("latin-1"), *kept, b"Connection: close", b"", b""])
    return Request(method, host, port, forward, length, chunked)


# -- TLS: the server name of a ClientHello ----------------------------------------------------------

_ECH = (0xFE0D, 0xFFCE)  # encrypted_client_hello, and the older encrypted_server_name


class HelloBuffer:
    """Collects TLS records until they hold one complete ClientHello (RFC 8446 5.1: a handshake
    message may span records), and reads its server name.  Each byte is examined once."""

    def __init__(self) -> None:
        self.data = bytearray()  # everything fed, forwarded as it came once the hello is checked
        self._pos = 0  # where the first incomplete record starts
        self._handshake = bytearray()

    def feed(self, chunk: bytes) -> str | None:
        """The server name once the ClientHello is complete, None while more bytes are needed;
        BadHello when these bytes can never be one."""
        self.data += chunk
        while True:
            header = self.data[self._pos:self._pos + 5]
            if header[:1] and header[0] != 0x16:
                first = header[0]
                if first & 0x80 and self._pos == 0:
                    raise BadHello("an SSLv2-style ClientHello, which carries no server name")
                raise BadHello(f"not a TLS handshake record (type {first})" if self._pos else
                               "does not start with a TLS handshake record")
            if (len(header) > 1 and header[1] != 3) or (len(header) > 2 and header[2] > 4):
                raise BadHello("not a TLS record version")
            if len(header) < 5:
                return None
            size = int.from_bytes(header[3:5], "big")
            if not 0 < size <= 1 << 14:
                raise BadHello(f"a TLS record of {size} bytes (1 to 16384)")
            if self._pos + 5 + size > HELLO_LIMIT:
                raise BadHello(f"no complete ClientHello in the first {HELLO_LIMIT} bytes")
            if len(self.data) < self._pos + 5 + size:
                return None
            self._handshake += self.data[self._pos + 5:self._pos + 5 + size]
            self._pos += 5 + size
            if self._handshake[0] != 1:
                raise BadHello(f"a handshake message of type {self._handshake[0]}, not a ClientHello")
            if len(self._handshake) < 4:
                continue
            length = int.from_bytes(self._handshake[1:4], "big")
            if 4 + length > HELLO_LIMIT:
                raise BadHello(f"a ClientHello of {length} bytes (the limit is {HELLO_LIMIT})")
            if len(self._handshake) > 4 + length:
                raise BadHello("more handshake data after the ClientHello")
            if len(self._handshake) == 4 + length:
                return client_hello_name(bytes(self._handshake[4:]))


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise BadHello("a truncated ClientHello")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def number(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, n: int) -> bytes:
        return self.take(self.number(n))

    def left(self) -> int:
        return len(self.data) - self.pos


def client_hello_name(body: bytes) -> str:
    """The one host name in a ClientHello's server_name extension (``body`` is the handshake
    message without its 4-byte header); BadHello if it has none, or more than one, or hides it."""
    hello = _Cursor(body)
    if hello.take(2)[0] != 3:
        raise BadHello("not a TLS ClientHello version")
    hello.take(32)  # random
    if len(hello.vector(1)) > 32:
        raise BadHello("a session id longer than 32 bytes")
    suites = hello.vector(2)
    if not suites or len(suites) % 2:
        raise BadHello("a malformed cipher suite list")
    if not hello.vector(1):
        raise BadHello("no compression methods")
    if not hello.left():
        raise BadHello("no server name (SNI): the host cannot be checked")
    extensions = _Cursor(hello.vector(2))
    if hello.left():
        raise BadHello("bytes after the extensions")
    seen: set[int] = set()
    name = None
    while extensions.left():
        kind, data = extensions.number(2), extensions.vector(2)
        if kind in seen:
            raise BadHello(f"extension {kind} twice")  # which one would the server read?
        seen.add(kind)
        if kind in _ECH:
            raise BadHello("an encrypted ClientHello, which hides the real server name")
        if kind == 0:
            outer = _Cursor(data)
            names = _Cursor(outer.vector(2))
            if outer.left():
                raise BadHello("a malformed server_name extension")
            kind_of_name, value = names.number(1), names.vector(2)
            if names.left():
                raise BadHello("more than one server name")
            if kind_of_name != 0 or not value:
                raise BadHello("a server name that is not a host name")
            try:
                name = value.decode("ascii")
            except UnicodeDecodeError:
                raise BadHello("a server name that is not ASCII") from None
    if name is None:
        raise BadHello("no server name (SNI): the host cannot be checked")
    return name


def server_name(data: bytes) -> str:
    """The server name of the complete ClientHello at the start of ``data`` (TLS records, as sent);
    BadHello when there is none, or it is incomplete."""
    name = HelloBuffer().feed(data)
    if name is None:
        raise BadHello("an incomplete ClientHello")
    return name
