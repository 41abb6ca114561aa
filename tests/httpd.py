"""A small HTTP origin server for the egress tests: GET /PATH answers "<greeting> /PATH\\n"."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 512  # the listen backlog: 200 connections arrive at once
    daemon_threads = True


@contextmanager
def origin(address: str, greeting: str) -> Iterator[int]:
    """Serve on (address, a free port) until the block ends; yields the port."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = f"{greeting} {self.path}\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = Server((address, 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
