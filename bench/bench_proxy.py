#!/usr/bin/env python3
"""Throughput and added latency of kp-run's egress proxy, against a direct connection.

    .venv/bin/python bench/bench_proxy.py [--requests 300] [--megabytes 200]

Everything is on loopback, in one process run: an HTTP origin server, and
kodepipe's proxy (egress.Proxy, the code kp-run --allow serves a container
with, listening here on a loopback port instead of inside a container's
network namespace).  The client alternates direct and proxied requests, so
the figures that matter are the ratios:

- latency: a new connection and one small GET, direct vs through the proxy:
  plain HTTP, and HTTPS (TLS to a local origin with a self-signed
  certificate) direct vs through CONNECT, as HTTPS clients use it (a tunnel
  carries only TLS whose ClientHello names the host);
- throughput: one large HTTPS download, direct vs through a CONNECT tunnel.
"""

from __future__ import annotations

import argparse
import http.server
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kodepipe.egress import proxy as egress  # noqa: E402
from tests.httpd import certificate  # noqa: E402

CHUNK = b"x" * (1 << 20)



class _Server(http.server.ThreadingHTTPServer):
    request_queue_size = 512  # the listen backlog: 200 connections arrive at once
    daemon_threads = True


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    tls: ssl.SSLContext | None = None

    def setup(self) -> None:
        if self.tls is not None:  # the handshake in the handler's thread, not the accept loop
            self.request = self.tls.wrap_socket(self.request, server_side=True)
        super().setup()

    def do_GET(self) -> None:
        size = int(self.path.strip("/") or 0)
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        left = size
        while left > 0:
            n = min(left, len(CHUNK))
            self.wfile.write(CHUNK[:n])
            left -= n

    def log_message(self, *args: Any) -> None:
        pass


class TlsHandler(Handler):
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)


CLIENT = ssl.create_default_context()
CLIENT.check_hostname, CLIENT.verify_mode = False, ssl.CERT_NONE


def fetch(port: int, request: bytes, connect: bytes | None = None, tls: bool = False) -> int:
    with socket.create_connection(("127.0.0.1", port)) as raw:
        if connect is not None:
            raw.sendall(connect)
            reply = raw.recv(4096)
            if not reply.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(reply[:100])
        with (CLIENT.wrap_socket(raw, server_hostname="origin.test") if tls else raw) as s:
            s.sendall(request)
            total = 0
            while chunk := s.recv(1 << 20):
                total += len(chunk)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--megabytes", type=int, default=200)
    args = parser.parse_args()
    TlsHandler.tls.load_cert_chain(*certificate())
    origin = _Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    oport = origin.server_address[1]
    tls_origin = _Server(("127.0.0.1", 0), TlsHandler)
    threading.Thread(target=tls_origin.serve_forever, daemon=True).start()
    tport = tls_origin.server_address[1]
    with tempfile.TemporaryDirectory() as tmp:
        policy = egress.Policy.build([f"origin.test:{oport},{tport}"], ["origin.test=127.0.0.1"])
        log = egress.DecisionLog(Path(tmp) / "egress.jsonl", "bench")
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(512)
        proxy = egress.Proxy(policy, log)
        proxy.start(listener, None)
        pport = listener.getsockname()[1]
        small_direct = b"GET /100 HTTP/1.0\r\n\r\n"
        small_proxied = f"GET http://origin.test:{oport}/100 HTTP/1.1\r\n\r\n".encode()
        connect = f"CONNECT origin.test:{tport} HTTP/1.1\r\n\r\n".encode()
        lat: dict[str, list[float]] = {"direct": [], "http": [], "tls_direct": [], "connect": []}
        for _ in range(args.requests):
            for kind in lat:
                t = time.perf_counter()
                if kind == "direct":
                    fetch(oport, small_direct)
                elif kind == "http":
                    fetch(pport, small_proxied)
                elif kind == "tls_direct":
                    fetch(tport, small_direct, tls=True)
                else:
                    fetch(pport, small_direct, connect, tls=True)
                lat[kind].append(time.perf_counter() - t)
        big = f"GET /{args.megabytes << 20} HTTP/1.0\r\n\r\n".encode()
        tput: dict[str, list[float]] = {"direct": [], "connect": []}
        for _ in range(3):
            for kind in tput:
                t = time.perf_counter()
                got = (fetch(tport, big, tls=True) if kind == "direct" else
                       fetch(pport, big, connect, tls=True))
                tput[kind].append(got / (1 << 20) / (time.perf_counter() - t))
        proxy.stop()
        log.close()
    med = {k: statistics.median(v) * 1000 for k, v in lat.items()}
    mbps = {k: statistics.median(v) for k, v in tput.items()}
    result = {"bench": "proxy", "requests": args.requests, "megabytes": args.megabytes,
              "latency_ms": {k: round(v, 3) for k, v in med.items()},
              "latency_ratio_http": round(med["http"] / med["direct"], 2),
              "latency_ratio_connect": round(med["connect"] / med["tls_direct"], 2),
              "added_latency_ms_connect": round(med["connect"] - med["tls_direct"], 3),
              "throughput_mib_s": {k: round(v, 1) for k, v in mbps.items()},
              "throughput_ratio": round(mbps["connect"] / mbps["direct"], 2)}
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    print(f"latency median: direct {med['direct']:.2f} ms, proxied http {med['http']:.2f} ms "
          f"(x{result['latency_ratio_http']}); HTTPS direct {med['tls_direct']:.2f} ms, through CONNECT "
          f"{med['connect']:.2f} ms (x{result['latency_ratio_connect']}); "
          f"HTTPS throughput: direct {mbps['direct']:.0f} MiB/s, CONNECT {mbps['connect']:.0f} MiB/s "
          f"(x{result['throughput_ratio']})", file=sys.stderr)


if __name__ == "__main__":
    main()
