"""The egress proxy on its own: the entrypoint of the kodepipe-egress container image.

    python -m kodepipe.egress.serve --config /etc/kodepipe/egress.json

A cluster cannot give a pod kp-run's proxy in its network namespace, and a NetworkPolicy cannot
name domains, so ``kp-run --emit kube --allow ...`` hands the agent's traffic to a Deployment of
this image: the same Proxy, policy checks and decision records as kp-run's, with the allowlist
from a ConfigMap (``allow``, ``resolve``, ``container``: the run it serves, ``listen``:
ADDRESS:PORT, default 0.0.0.0:3128) and every decision a JSON line on stdout, where the cluster's
log collector reads it.  It serves HTTP and CONNECT only (the agent's pod has no resolver), and ends
on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from typing import Any


class _Stdout:
    """The decision log's writer: whole lines to fd 1, never buffered."""

    def append(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(1, view):]

    def close(self) -> None:
        pass


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"listen: {text!r} is not ADDRESS:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - a pod's proxy serves its Service


def load(path: str) -> dict[str, Any]:
    """The ConfigMap's egress.json, its types checked."""
    import orjson

    with open(path, "rb") as handle:
        spec = orjson.loads(handle.read(1 << 20))
    if not isinstance(spec, dict) or not isinstance(spec.get("allow"), list) or \
            not all(isinstance(rule, str) for rule in spec["allow"]):
        raise ValueError(f"{path}: allow must be a list of DOMAIN[:PORTS]")
    pins = spec.get("resolve", [])
    if not isinstance(pins, list) or not all(isinstance(pin, str) for pin in pins):
        raise ValueError(f"{path}: resolve must be a list of NAME=ADDRESS")
    return spec


def main(argv: list[str]) -> int:
    from kodepipe.egress.policy import Policy
    from kodepipe.egress.proxy import DecisionLog, Proxy

    if len(argv) != 2 or argv[0] != "--config":
        sys.stderr.write("usage: python -m kodepipe.egress.serve --config FILE\n")
        return 2
    try:
        spec = load(argv[1])
        host, port = parse_listen(str(spec.get("listen", "0.0.0.0:3128")))
        policy = Policy.build(spec["allow"], spec.get("resolve", []))
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"kodepipe-egress: {exc}\n")
        return 2
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(128)
    proxy = Proxy(policy, DecisionLog(None, str(spec.get("container") or ""), writer=_Stdout()))  # type: ignore[arg-type]
    proxy.start(listener, None)
    sys.stderr.write(f"kodepipe-egress: serving {host}:{port} for {len(spec['allow'])} rule(s)\n")
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
