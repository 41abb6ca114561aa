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
- throughput: one large HTTPS download, direct vs through a CONNECT tunnel;
- through the relay (as root): the same proxy reached from a network namespace of
  its own through relay.pl and egress.relay over a pipe, as a container in a VM
  will reach it over SSH (without SSH's cost here): its latency and throughput
  as ratios to the proxy reached directly, in the same run.  Every request is
  made from one of two worker threads (one of them in the namespace), so both
  pay the same hand-off.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import http.server
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kodepipe.egress import policy as egress_policy  # noqa: E402
from kodepipe.egress import proxy as egress  # noqa: E402
from kodepipe.egress import relay  # noqa: E402
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


class Namespace:
    """A network namespace with only lo, relay.pl in it joined to ``proxy`` by a pipe, and a worker
    thread inside it; None of it without root."""

    def __init__(self, proxy: egress.Proxy) -> None:
        self.holder = subprocess.Popen(["unshare", "--net", "sh", "-c", "ip link set lo up && echo ready && exec cat"],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.holder.stdout is not None and self.holder.stdout.readline() == b"ready\n"
        self.relay_process = subprocess.Popen(relay.relay_argv(self.holder.pid), stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE)
        assert self.relay_process.stdin is not None and self.relay_process.stdout is not None
        self.channel = relay.PipeChannel(os.dup(self.relay_process.stdout.fileno()),
                                         os.dup(self.relay_process.stdin.fileno()))
        self.relay_process.stdin.close()
        self.relay_process.stdout.close()
        self.relay = relay.Relay(proxy, self.channel)
        self.relay.start()
        self.relay.wait_ready(60)
        self.worker = concurrent.futures.ThreadPoolExecutor(1, initializer=self._enter)

    def _enter(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/proc/{self.holder.pid}/ns/net", os.O_RDONLY)
        try:
            if libc.setns(fd, 0x40000000) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)

    def close(self) -> None:
        self.worker.shutdown()
        self.relay.stop()
        self.relay_process.wait(60)
        self.channel.close()
        assert self.holder.stdin is not None and self.holder.stdout is not None
        self.holder.stdin.close()
        self.holder.wait(60)
        self.holder.stdout.close()


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
    host_worker = concurrent.futures.ThreadPoolExecutor(1)
    with tempfile.TemporaryDirectory() as tmp:
        policy = egress_policy.Policy.build([f"origin.test:{oport},{tport}"], ["origin.test=127.0.0.1"])
        log = egress.DecisionLog(Path(tmp) / "egress.jsonl", "bench")
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(512)
        proxy = egress.Proxy(policy, log)
        proxy.start(listener, None)
        pport = listener.getsockname()[1]
        ns = None
        if os.geteuid() == 0:
            ns = Namespace(proxy)
        else:
            print("not root: no namespace, so no rows through the relay", file=sys.stderr)
        small_direct = b"GET /100 HTTP/1.0\r\n\r\n"
        small_proxied = f"GET http://origin.test:{oport}/100 HTTP/1.1\r\n\r\n".encode()
        connect = f"CONNECT origin.test:{tport} HTTP/1.1\r\n\r\n".encode()
        # each kind: (worker, port, request, CONNECT, TLS)
        kinds: dict[str, tuple[Any, int, bytes, bytes | None, bool]] = {
            "direct": (host_worker, oport, small_direct, None, False),
            "http": (host_worker, pport, small_proxied, None, False),
            "tls_direct": (host_worker, tport, small_direct, None, True),
            "connect": (host_worker, pport, small_direct, connect, True)}
        if ns is not None:
            kinds["relay_http"] = (ns.worker, egress.PROXY_PORT, small_proxied, None, False)
            kinds["relay_connect"] = (ns.worker, egress.PROXY_PORT, small_direct, connect, True)
        lat: dict[str, list[float]] = {kind: [] for kind in kinds}
        for _ in range(args.requests):
            for kind, (worker, port, request, tunnel, tls) in kinds.items():
                t = time.perf_counter()
                worker.submit(fetch, port, request, tunnel, tls).result()
                lat[kind].append(time.perf_counter() - t)
        big = f"GET /{args.megabytes << 20} HTTP/1.0\r\n\r\n".encode()
        bulk = {"direct": (host_worker, tport, None), "connect": (host_worker, pport, connect)}
        if ns is not None:
            bulk["relay_connect"] = (ns.worker, egress.PROXY_PORT, connect)
        tput: dict[str, list[float]] = {kind: [] for kind in bulk}
        for _ in range(3):
            for kind, (worker, port, tunnel) in bulk.items():
                t = time.perf_counter()
                got = worker.submit(fetch, port, big, tunnel, True).result()
                tput[kind].append(got / (1 << 20) / (time.perf_counter() - t))
        if ns is not None:
            ns.close()
        host_worker.shutdown()
        proxy.stop()
        log.close()
    med = {k: statistics.median(v) * 1000 for k, v in lat.items()}
    mbps = {k: statistics.median(v) for k, v in tput.items()}
    result: dict[str, Any] = {
        "bench": "proxy", "requests": args.requests, "megabytes": args.megabytes,
        "latency_ms": {k: round(v, 3) for k, v in med.items()},
        "latency_ratio_http": round(med["http"] / med["direct"], 2),
        "latency_ratio_connect": round(med["connect"] / med["tls_direct"], 2),
        "added_latency_ms_connect": round(med["connect"] - med["tls_direct"], 3),
        "throughput_mib_s": {k: round(v, 1) for k, v in mbps.items()},
        "throughput_ratio": round(mbps["connect"] / mbps["direct"], 2)}
    if ns is not None:  # the relay against the same proxy reached directly
        result["relay"] = {"latency_ratio_http": round(med["relay_http"] / med["http"], 2),
                           "latency_ratio_connect": round(med["relay_connect"] / med["connect"], 2),
                           "added_latency_ms_connect": round(med["relay_connect"] - med["connect"], 3),
                           "throughput_ratio": round(mbps["relay_connect"] / mbps["connect"], 2)}
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    print(f"latency median: direct {med['direct']:.2f} ms, proxied http {med['http']:.2f} ms "
          f"(x{result['latency_ratio_http']}); HTTPS direct {med['tls_direct']:.2f} ms, through CONNECT "
          f"{med['connect']:.2f} ms (x{result['latency_ratio_connect']}); "
          f"HTTPS throughput: direct {mbps['direct']:.0f} MiB/s, CONNECT {mbps['connect']:.0f} MiB/s "
          f"(x{result['throughput_ratio']})", file=sys.stderr)
    if ns is not None:
        r = result["relay"]
        print(f"through the relay: http {med['relay_http']:.2f} ms (x{r['latency_ratio_http']} of the proxy's), "
              f"CONNECT {med['relay_connect']:.2f} ms (x{r['latency_ratio_connect']}), "
              f"throughput {mbps['relay_connect']:.0f} MiB/s (x{r['throughput_ratio']})", file=sys.stderr)


if __name__ == "__main__":
    main()
