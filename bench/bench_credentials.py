#!/usr/bin/env python3
"""What a credential kept on the host costs: its two modes against a direct TLS connection, as ratios.

    .venv/bin/python bench/bench_credentials.py [--requests 200] [--megabytes 100]

One process, all on loopback: a TLS origin (bench_proxy's, with the tests' certificate), and
kodepipe's proxy (egress.Proxy, as kp-run serves it) holding one credential of each mode for it.
Each request is a new connection and one GET, as the proxy allows one request per connection:

- direct: TLS straight to the origin, the key in the header (what the agent would do holding the key);
- endpoint: plain HTTP to the proxy's endpoint with the token; the proxy swaps it and talks verified TLS;
- intercept: CONNECT, then TLS to the proxy with the run's CA (trusted), the token swapped inside, and
  verified TLS from the proxy to the origin.

Latency: a small response, the median over --requests alternating rounds.  Throughput: one large
download of --megabytes, best of three.  Ratios are against direct, in the same run.
"""

from __future__ import annotations

import argparse
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_proxy import TlsHandler, _Server  # noqa: E402
from kodepipe.egress import credentials as creds  # noqa: E402
from kodepipe.egress import policy as egress_policy  # noqa: E402
from kodepipe.egress import proxy as egress  # noqa: E402
from kodepipe.egress.ca import RunCA  # noqa: E402
from tests.httpd import certificate  # noqa: E402

KEY, TOKEN = "sk-bench-real-key", "kp-bench-token"


def get(port: int, request: bytes, *, tls: ssl.SSLContext | None = None, name: str = "api.test",
        connect: bytes | None = None) -> int:
    with socket.create_connection(("127.0.0.1", port)) as raw:
        if connect is not None:
            raw.sendall(connect)
            reply = raw.recv(4096)
            if not reply.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(reply[:100])
        with tls.wrap_socket(raw, server_hostname=name) if tls is not None else raw as s:
            s.sendall(request)
            total = 0
            while chunk := s.recv(1 << 20):
                total += len(chunk)
    if total == 0:
        raise RuntimeError("no answer")
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--megabytes", type=int, default=100)
    args = parser.parse_args()
    cert, _ = certificate()
    TlsHandler.tls.load_cert_chain(*certificate())
    origin = _Server(("127.0.0.1", 0), TlsHandler)
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    oport = origin.server_address[1]
    common = {"header": "x-api-key", "source": {"env": "BENCH_KEY"}, "ca": cert}
    endpoint = creds.parse({**common, "hosts": [f"api.test:{oport}"], "env": {"K": "{token}"}}, "ep", "bench")
    intercept = creds.parse({**common, "hosts": [f"api.test:{oport}"], "env": {"K": "{token}"},
                             "mode": "intercept"}, "ic", "bench")
    with tempfile.TemporaryDirectory() as tmp:
        policy = egress_policy.Policy.build([], ["api.test=127.0.0.1"], [creds.Grant(endpoint, TOKEN, KEY)])
        policy.grants["ic"] = creds.Grant(intercept, TOKEN, KEY)
        policy.ca = RunCA(policy.intercepted_hosts())
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(512)
        proxy = egress.Proxy(policy, egress.DecisionLog(Path(tmp) / "egress.jsonl", "bench"))
        proxy.start(listener, None)
        pport = listener.getsockname()[1]
        direct_tls = ssl.create_default_context(cafile=cert)
        run_ca = ssl.create_default_context(cadata=policy.ca.pem.decode())
        connect = f"CONNECT api.test:{oport} HTTP/1.1\r\n\r\n".encode()

        def kinds(size: int) -> dict[str, tuple[int, bytes, ssl.SSLContext | None, bytes | None]]:
            return {
                "direct": (oport, f"GET /{size} HTTP/1.0\r\nx-api-key: {KEY}\r\n\r\n".encode(), direct_tls, None),
                "endpoint": (pport, f"GET /kodepipe/ep/{size} HTTP/1.1\r\nx-api-key: {TOKEN}\r\n\r\n".encode(),
                             None, None),
                "intercept": (pport, f"GET /{size} HTTP/1.1\r\nHost: api.test:{oport}\r\nx-api-key: {TOKEN}\r\n\r\n"
                              .encode(), run_ca, connect)}

        lat: dict[str, list[float]] = {k: [] for k in kinds(0)}
        for _ in range(args.requests):
            for kind, (port, request, tls, tunnel) in kinds(100).items():
                t = time.perf_counter()
                get(port, request, tls=tls, connect=tunnel)
                lat[kind].append(time.perf_counter() - t)
        tput: dict[str, list[float]] = {k: [] for k in lat}
        size = args.megabytes << 20
        for _ in range(3):
            for kind, (port, request, tls, tunnel) in kinds(size).items():
                t = time.perf_counter()
                got = get(port, request, tls=tls, connect=tunnel)
                tput[kind].append(got / (time.perf_counter() - t) / (1 << 20))
        proxy.stop()
        injected = proxy.log.counts.get("injected", 0)
        proxy.log.close()
    base_lat, base_tput = statistics.median(lat["direct"]), max(tput["direct"])
    print(f"{'mode':<10} {'latency ms':>11} {'ratio':>6} {'MiB/s':>8} {'ratio':>6}")
    for kind in lat:
        median, best = statistics.median(lat[kind]), max(tput[kind])
        print(f"{kind:<10} {median * 1000:>11.2f} {median / base_lat:>6.2f} {best:>8.0f} {best / base_tput:>6.2f}")
    print(f"({args.requests} rounds, {args.megabytes} MiB downloads, best of 3; {injected} requests had the key "
          "put in by the proxy)")


if __name__ == "__main__":
    main()
