"""The egress policy: which names a sandbox may reach, on which ports, and which addresses no name
may lead to.  Pure: no sockets, no lookups (kodepipe.egress.proxy resolves names and asks the kernel
which addresses are the host's own), so the container layer's policy can hold these values."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kodepipe.core.errors import BadInput

PROXY_PORT = 3128
DNS_PORT = 53
DEFAULT_PORTS = (80, 443)

# never a destination, whatever name leads there
BLOCKED = [ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4", "100.100.100.200/32", "168.63.129.16/32",
    "192.0.0.192/32", "::/128", "fe80::/10", "ff00::/8", "fd00:ec2::254/128")]
NAT64 = ipaddress.ip_network("64:ff9b::/96")

_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_NAME_RE = re.compile(rf"(\*\.)?{_LABEL}(\.{_LABEL})*")


class Denied(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Rule:
    pattern: str  # "example.com" or "*.example.com"
    ports: tuple[int, ...]

    def matches(self, host: str, port: int | None) -> bool:
        if port is not None and port not in self.ports:
            return False
        if self.pattern.startswith("*."):
            return host.endswith(self.pattern[1:]) and len(host) > len(self.pattern) - 1
        return host == self.pattern


def parse_rule(text: str) -> Rule:
    """DOMAIN, *.DOMAIN, or either with :PORT[,PORT...] (default ports 80 and 443)."""
    spec = text.strip().lower().rstrip(".")
    host, sep, ports_text = spec.partition(":")
    host = host.rstrip(".")
    if is_address(host):
        raise BadInput(f"--allow {text!r}: not a domain name but an address: the proxy lets a sandbox reach "
                       "names only (pin a name to it with --resolve NAME=ADDRESS)")
    if not _NAME_RE.fullmatch(host) or "." not in host.lstrip("*."):
        raise BadInput(f"--allow {text!r}: not a domain name (e.g. api.example.com or *.example.com)")
    ports: tuple[int, ...] = DEFAULT_PORTS
    if sep:
        try:
            ports = tuple(int(p) for p in ports_text.split(","))
        except ValueError:
            raise BadInput(f"--allow {text!r}: ports must be numbers, e.g. example.com:443,8443") from None
        if not all(0 < p < 65536 for p in ports):
            raise BadInput(f"--allow {text!r}: a port must be between 1 and 65535")
    return Rule(host, ports)


def parse_pin(text: str) -> tuple[str, str]:
    """NAME=ADDRESS for --resolve."""
    name, sep, addr = text.partition("=")
    name = name.strip().lower().rstrip(".")
    try:
        ipaddress.ip_address(addr.strip())
    except ValueError:
        raise BadInput(f"--resolve {text!r}: use NAME=ADDRESS, e.g. git.internal=10.0.0.5") from None
    if not sep or not _NAME_RE.fullmatch(name) or name.startswith("*."):
        raise BadInput(f"--resolve {text!r}: use NAME=ADDRESS, e.g. git.internal=10.0.0.5")
    return name, addr.strip()


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False

@dataclass
class Policy:
    rules: list[Rule]
    pins: dict[str, list[str]] = field(default_factory=dict)
    grants: dict[str, Any] = field(default_factory=dict)  # credential name -> credentials.Grant
    budgets: dict[str, Any] = field(default_factory=dict)  # credential name or host -> credentials.Budget
    ca: Any = None  # ca.RunCA: interception mode's per-run CA, when a credential intercepts

    def intercepting(self, host: str, port: int) -> Any:
        """The intercepting credential's grant for host:port, or None."""
        for grant in self.grants.values():
            if grant.definition.mode == "intercept" and grant.definition.covers(host, port):
                return grant
        return None

    def intercepted_hosts(self) -> list[str]:
        """The names the run's CA may sign for (a name covers its subdomains): every intercepting
        credential's hosts, *.DOMAIN as DOMAIN."""
        return sorted({rule.pattern.removeprefix("*.") for grant in self.grants.values()
                       if grant.definition.mode == "intercept" for rule in grant.definition.hosts})

    @classmethod
    def build(cls, allow: Iterable[str], pins: Iterable[str] = (), grants: Iterable[Any] = (),
              budgets: Iterable[tuple[str, Any]] = ()) -> Policy:
        pinned: dict[str, list[str]] = {}
        for name, addr in map(parse_pin, pins):
            pinned.setdefault(name, []).append(addr)
        return cls([parse_rule(a) for a in allow], pinned, {g.name: g for g in grants}, dict(budgets))

    def allowed(self, host: str, port: int | None) -> bool:
        return any(rule.matches(host, port) for rule in self.rules)

    def check(self, host: str, port: int | None, *, listed: bool = True) -> str:
        """The host, normalised, or Denied with the reason.  ``listed``: it must be on the allowlist (a
        credential's upstream need not be: the agent reaches it only through the credential's endpoint)."""
        host = host.strip().lower().rstrip(".")
        if is_address(host):
            raise Denied("a raw IP address: only names on the allowlist are reachable")
        if not _NAME_RE.fullmatch(host):
            raise Denied("not a valid host name")
        if not listed:
            return host
        if not self.allowed(host, None):
            raise Denied("not on the allowlist")
        if port is not None and not self.allowed(host, port):
            raise Denied(f"port {port} is not allowed for this host")
        return host


def _unwrap(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The IPv4 address inside an IPv4-mapped, 6to4 or NAT64 IPv6 address; else the address itself."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour
        if inner is None and ip in NAT64:
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if inner is not None:
            return inner
    return ip


def forbidden(addr: str, *, allow_loopback: bool = False) -> bool:
    """True for addresses no name may lead to: link-local (cloud metadata), multicast,
    unspecified, reserved, and loopback unless allowed; IPv4 inside IPv6 forms is unwrapped."""
    ip = _unwrap(ipaddress.ip_address(addr))
    if ip.is_loopback:
        return not allow_loopback
    return (ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved
            or any(ip in net for net in BLOCKED))


def container_env(host: str = "127.0.0.1", port: int = PROXY_PORT) -> dict[str, str]:
    url = f"http://{host}:{port}"
    env = {"HTTP_PROXY": url, "HTTPS_PROXY": url, "NO_PROXY": "localhost,127.0.0.1,::1"}
    env.update({k.lower(): v for k, v in env.items()})
    env["NODE_USE_ENV_PROXY"] = "1"  # Node >= 22.21 and 24.5: fetch() and https follow HTTPS_PROXY too
    return env


RESOLV_CONF = "nameserver 127.0.0.1\noptions ndots:0 attempts:1 timeout:2\n"
