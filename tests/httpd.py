"""A small HTTP origin server for the egress tests: GET or POST /PATH answers "<greeting> /PATH\\n"
(and /PATH?redirect-to=URL a 302 to URL).

``seen`` collects every request the origin received (method, path, Host, body), so a test can say
what reached it, not only what the client got back.  A ``lenient`` origin keeps reading requests on
a connection until the client's end closes, whatever Connection says (as some servers and front
ends do): bytes smuggled after a request then show up as requests of their own.  A ``tls`` origin
speaks HTTPS with a self-signed certificate (clients in the tests do not verify it)."""

from __future__ import annotations

import atexit
import functools
import http.server
import shutil
import ssl
import tempfile
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 512  # the listen backlog: 200 connections arrive at once
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], OSError):  # a client (the proxy) that went away is no news
            super().handle_error(request, client_address)


@functools.cache
def certificate() -> tuple[str, str]:
    """(certificate file, key file) of a self-signed certificate, made once per process."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kodepipe test origin")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            # api.test by name too: a verifying client (the proxy, for a credential) takes no wildcard of one label
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in ("*.test", "api.test", "other.test")]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    folder = Path(tempfile.mkdtemp(prefix="kp-test-cert-"))
    atexit.register(shutil.rmtree, folder, True)
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return str(folder / "cert.pem"), str(folder / "key.pem")


@contextmanager
def origin(address: str, greeting: str, *, seen: list[dict[str, Any]] | None = None, lenient: bool = False,
           tls: bool = False) -> Iterator[int]:
    """Serve on (address, a free port) until the block ends; yields the port."""
    context = None
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*certificate())

    class Handler(http.server.BaseHTTPRequestHandler):
        raw_requestline: bytes  # set by handle_one_request (typeshed does not declare it)
        if lenient:
            protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            if context is not None:  # the handshake in the handler's thread, not the accept loop
                self.request = context.wrap_socket(self.request, server_side=True)
            super().setup()

        def handle_one_request(self) -> None:
            super().handle_one_request()
            if lenient and self.raw_requestline:
                self.close_connection = False  # read the next request, until the client's end closes

        def body(self) -> bytes:
            if (self.headers.get("Transfer-Encoding") or "").lower() == "chunked":
                data = b""
                while (line := self.rfile.readline().split(b";")[0].strip()) not in (b"", b"0"):
                    data += self.rfile.read(int(line, 16))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return data
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def answer(self, body: bytes) -> None:
            if seen is not None:
                seen.append({"method": self.command, "path": self.path, "host": self.headers.get("Host"),
                             "body": body, "headers": [(k.lower(), v) for k, v in self.headers.items()]})
            data = f"{greeting} {self.path}\n".encode()
            if "?redirect-to=" in self.path:  # a redirect to elsewhere, for a client that follows it
                self.send_response(302)
                self.send_header("Location", urllib.parse.unquote(self.path.split("?redirect-to=", 1)[1]))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self.answer(self.body())

        def do_POST(self) -> None:
            self.answer(self.body())

        def log_message(self, *args: Any) -> None:
            pass

    server = Server((address, 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
