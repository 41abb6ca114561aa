"""A VM's egress proxy: kodepipe's proxy for a whole guest booted with ``kp-boot --allow``.

The guest is sealed by the loopback guard (kodepipe.vm.netguard.Seal): its only way out is TCP to
10.0.2.2:3128 and UDP to port 53, which the guard translates to this process's two sockets on the
host's 127.0.0.1.  They are bound by kp-boot and handed over open, so the ports are known before
the guest starts; this process serves them with the same Proxy, the same policy checks and the
same decision log (``egress.jsonl`` in the VM's folder) as kp-run's sandboxes.

    python -m kodepipe.egress.gate FOLDER TCP_FD UDP_FD LIFE_FD [--user=UID:GID]

FOLDER/egress.json holds the policy (``rules``, ``pins``) and the VM's name.  LIFE_FD is the read
end of a pipe whose write end only the guard holds: when the guard ends (QEMU ended, or the guard
was killed), the pipe reads end of file and the proxy ends too.  Started as root, it drops to the
user QEMU runs as once its log is open.
"""

from __future__ import annotations

import os
import select
import socket
import sys
from pathlib import Path

SPEC = "egress.json"
LOG = "egress.jsonl"


def _warm() -> None:
    """Import now what the proxy would import on its first request: once it runs as QEMU's user, the
    interpreter's own library may be out of its reach (a root-only Python), and an import then fails."""
    import concurrent.futures.thread  # noqa: F401 - run_in_executor's pool
    import encodings.idna  # noqa: F401 - getaddrinfo of a name

    import dns.message
    import dns.rrset

    from kodepipe.egress import credentials, sources  # noqa: F401 - imported by the proxy when it needs them

    query = dns.message.make_query("kodepipe.invalid", "A")
    reply = dns.message.make_response(dns.message.from_wire(query.to_wire()))
    for kind, addr in (("A", "192.0.2.1"), ("AAAA", "2001:db8::1")):
        reply.answer.append(dns.rrset.from_text_list(query.question[0].name, 60, "IN", kind, [addr]))
    reply.to_wire()


def _drop(spec: str) -> None:
    if os.geteuid() != 0 or not spec:
        return
    uid, gid = (int(part) for part in spec.split(":"))
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def main(argv: list[str]) -> int:
    import orjson

    from kodepipe.egress.policy import Policy
    from kodepipe.egress.proxy import DecisionLog, Proxy

    user = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--user=")), "")
    args = [arg for arg in argv if not arg.startswith("--user=")]
    folder, tcp_fd, udp_fd, life_fd = Path(args[0]), int(args[1]), int(args[2]), int(args[3])
    spec = orjson.loads((folder / SPEC).read_bytes())
    policy = Policy.build(spec["rules"], spec.get("pins", []))
    log = DecisionLog(folder / LOG, str(spec["name"]))
    _warm()
    _drop(user)
    tcp = socket.socket(fileno=tcp_fd)
    udp = socket.socket(fileno=udp_fd)
    proxy = Proxy(policy, log)
    proxy.start(tcp, udp)
    # serving: from now on what the proxy decides is in the decision log (capped); what Python might print
    # about a connection a guest cut off is not kept, so no guest can fill the host's disk with it
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.close(null)
    try:
        while True:  # until the guard ends: its end of the pipe is the only one
            select.select([life_fd], [], [])
            if not os.read(life_fd, 1):
                break
    except KeyboardInterrupt:
        pass
    finally:
        proxy.stop()
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
