"""Credentials that stay on the host: their definitions, and what the proxy does with them.  Pure.

A credential is defined as data: a JSON object, built in (kodepipe/egress/credentials.d/NAME.json) or
the user's ($KODEPIPE_CONFIG_DIR/credentials/NAME.json, ~/.config/kodepipe/credentials/NAME.json,
which replaces a built-in one of that name as a whole).  Unknown keys are refused:

    {
      "description": "Anthropic API key",
      "hosts": ["api.anthropic.com"],            # DOMAIN[:PORTS]; the first is the upstream (port 443)
      "header": "x-api-key",                     # or "query": "key", a query parameter
      "form": "{}",                              # the header's value around the key: "Bearer {}"; a list
                                                 # takes any of them, and sends the key in the one used
      "source": {"env": "ANTHROPIC_API_KEY"},    # or {"file": PATH} or {"command": [ARGV...]}, on the host
      "env": {"ANTHROPIC_API_KEY": "{token}",    # what the agent gets instead: the run's token and
              "ANTHROPIC_BASE_URL": "{endpoint}"},  # the proxy's endpoint for this credential
      "mode": "endpoint",                        # or "intercept"
      "lifetime": "1h",                          # optional: read the source again after this long
      "budget": {"requests": 5000, "bytes": "2g"},  # optional: the run's default budget
      "ca": "/path/ca.pem",                      # optional: verify the upstream with this CA file
      "token_prefix": "sk-kp-"                   # optional: for clients that check a key's shape
    }

Endpoint mode (the default, no CA): the agent holds a random per-run token ({token}) where the key
would be, and talks plain HTTP to {endpoint}, http://127.0.0.1:3128/kodepipe/NAME: the egress proxy's
own listener in the container's namespace (in a VM, the same proxy on the host through its relay).
For each request there, the proxy checks the token in the configured header (or query parameter),
takes it out, puts the real value in, and sends the request over verified TLS to the credential's
first host, and to nothing else.  A request without the token, or with another, is refused (403).

Interception mode (opt-in, for clients that cannot change their URL): the agent keeps the real URL and
holds the token as a placeholder.  A CONNECT to one of the credential's hosts is answered by the
proxy itself: once the ClientHello names that host, it ends TLS with a certificate from the run's own
CA, which is in the container's trust store (/etc/ssl/certs/ca-certificates.crt, and SSL_CERT_FILE,
REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE, GIT_SSL_CAINFO, NODE_EXTRA_CA_CERTS name it).  Inside, one request
is read, its Host must be that host, and the placeholder is swapped in the configured header only, as
at an endpoint.  The CA is made when the run starts, can sign only for the credential's hosts (name
constraints), and its key never leaves kp-run's memory.  Every other allowed host stays end-to-end TLS.

The token is worth nothing anywhere else: the upstream does not know it, and the proxy that knows it
lives as long as the run.  The real value is read on the host (kodepipe.egress.sources) before the
run starts, held by the proxy alone, and never written to a record, a log, the container's
environment or an error.  If it cannot be read, the run does not start.
"""

from __future__ import annotations

import hmac
import json
import re
import string
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kodepipe.core.errors import BadInput
from kodepipe.egress.policy import PROXY_PORT, Denied, Rule, is_address, parse_rule
from kodepipe.egress.wire import HOP_HEADERS, Request

BUILTIN_DIR = Path(__file__).resolve().parent / "credentials.d"
ENDPOINT_PREFIX = "/kodepipe/"
NAME_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_HEADER_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PREFIX_RE = re.compile(r"[A-Za-z0-9_-]{0,32}")
MODES = ("endpoint", "intercept")
# interception mode: the run's CA is added to the container's trust store, which these name
TRUST_STORE = "/etc/ssl/certs/ca-certificates.crt"
TRUST_ENV = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO", "NODE_EXTRA_CA_CERTS")
KEYS = {"description", "hosts", "header", "query", "form", "source", "env", "lifetime", "budget", "ca",
        "token_prefix", "mode"}
VALUE_LIMIT = 16 << 10  # bytes of a real value: keys and tokens are far shorter
# a value that goes into a header or a URL: printable ASCII, nothing that could end a line
VALUE_RE = re.compile(r"[\x21-\x7e]+")


@dataclass(frozen=True)
class Source:
    """Where a credential's real value comes from on the host."""

    kind: str  # "env", "file" or "command"
    spec: tuple[str, ...]  # the variable's name, the file's path, or the command's argv

    def describe(self) -> str:
        if self.kind == "env":
            return f"the environment variable {self.spec[0]}"
        if self.kind == "file":
            return f"the file {self.spec[0]}"
        return "the command " + " ".join(self.spec)


@dataclass(frozen=True)
class Budget:
    requests: int | None = None
    bytes: int | None = None

    def record(self) -> dict[str, int | None]:
        return {"requests": self.requests, "bytes": self.bytes}


@dataclass(frozen=True)
class Definition:
    name: str
    hosts: tuple[Rule, ...]
    source: Source
    header: str | None = None  # lower case
    query: str | None = None
    forms: tuple[str, ...] = ("{}",)  # what the header's value may look like; the first for a query
    env: tuple[tuple[str, str], ...] = ()  # NAME -> template with {token} and {endpoint}
    mode: str = "endpoint"
    lifetime: float | None = None
    budget: Budget | None = None
    ca: str | None = None
    token_prefix: str = "kp-"  # noqa: S105 - the start of the run's token, not a password
    description: str = ""
    origin: str = "built-in"

    @property
    def upstream(self) -> str:
        return self.hosts[0].pattern

    @property
    def upstream_port(self) -> int:
        ports = self.hosts[0].ports
        return 443 if 443 in ports else ports[0]

    def endpoint(self, host: str = "127.0.0.1", port: int = PROXY_PORT) -> str | None:
        return f"http://{host}:{port}{ENDPOINT_PREFIX}{self.name}" if self.mode == "endpoint" else None

    def environment(self, token: str) -> dict[str, str]:
        return {name: template.format(token=token, endpoint=self.endpoint()) for name, template in self.env}

    def covers(self, host: str, port: int) -> bool:
        """Whether requests to host:port are this (intercepting) credential's."""
        return any(rule.matches(host, port) for rule in self.hosts)

    def record(self) -> dict[str, Any]:
        """What the run's record says of it: never the value, never the token."""
        return {"name": self.name, "mode": self.mode, "upstream": self.upstream, "source": self.source.describe(),
                "env": [name for name, _ in self.env], "endpoint": self.endpoint(),
                "hosts": [_rule_text(r) for r in self.hosts], "lifetime": self.lifetime, "origin": self.origin}


@dataclass(frozen=True)
class Grant:
    """A credential in one run: its definition, the run's token and the real value (kept out of repr)."""

    definition: Definition
    token: str = field(repr=False)
    value: str = field(repr=False)

    @property
    def name(self) -> str:
        return self.definition.name


def _rule_text(rule: Rule) -> str:
    return rule.pattern + ("" if rule.ports == (80, 443) else ":" + ",".join(map(str, rule.ports)))


# -- definitions ---------------------------------------------------------------------------------


def _fail(origin: str, message: str) -> BadInput:
    return BadInput(f"credential {origin}: {message}", code="bad_credential")


def parse(data: object, name: str, origin: str) -> Definition:
    """A Definition from a JSON value, or BadInput naming ``origin`` and what is wrong."""
    from kodepipe.core.units import parse_duration, parse_size

    if not isinstance(data, dict):
        raise _fail(origin, f"expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise _fail(origin, f"unknown key {unknown[0]!r} (known: {', '.join(sorted(KEYS))})")
    hosts = data.get("hosts")
    if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) for h in hosts):
        raise _fail(origin, "'hosts' must be a non-empty list of DOMAIN[:PORTS]")
    if any(is_address(h.split(":", 1)[0].strip().rstrip(".")) for h in hosts):
        raise _fail(origin, "'hosts' are names, never addresses (--resolve pins a name to an address)")
    try:
        rules = tuple(parse_rule(h) for h in hosts)
    except BadInput as exc:
        raise _fail(origin, exc.message) from None
    if rules[0].pattern.startswith("*."):
        raise _fail(origin, "the first host is the upstream, and cannot be a wildcard")
    header, query = data.get("header"), data.get("query")
    if (header is None) == (query is None):
        raise _fail(origin, "give exactly one of 'header' (e.g. \"x-api-key\") and 'query' (a parameter name)")
    for key, value in (("header", header), ("query", query)):
        if value is not None and (not isinstance(value, str) or not _HEADER_RE.fullmatch(value)):
            raise _fail(origin, f"'{key}' must be a header or parameter name")
    refused = (*HOP_HEADERS, b"host", b"content-length", b"transfer-encoding")
    if isinstance(header, str) and (header.lower().encode() in refused or header.lower().startswith("proxy-")):
        raise _fail(origin, f"'header' cannot be {header}")
    form = data.get("form", "{}")
    forms = tuple(form) if isinstance(form, list) and form else (form,)
    for one in forms:
        if not isinstance(one, str) or _fields(one) != ["value"] or not VALUE_RE.fullmatch(one.replace("{}", "x")
                                                                                          .replace(" ", "x")):
            raise _fail(origin, "'form' must hold one {} where the key goes, e.g. \"Bearer {}\" (or a list of such)")
    source = _source(data.get("source"), origin)
    env = data.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise _fail(origin, "'env' must map variable names to templates")
    for var, template in env.items():
        if not _ENV_RE.fullmatch(var):
            raise _fail(origin, f"'env': {var!r} is not a variable name")
        if not set(_fields(template)) <= {"token", "endpoint"}:
            raise _fail(origin, f"'env': {var}: only {{token}} and {{endpoint}} can be filled in")
    if not any("{token}" in t for t in env.values()):
        raise _fail(origin, "'env' must give the agent the run's {token} in some variable")
    mode = data.get("mode", "endpoint")
    if mode not in MODES:
        raise _fail(origin, f"'mode' must be one of {', '.join(MODES)}")
    if mode == "intercept" and any("{endpoint}" in t for t in env.values()):
        raise _fail(origin, "'env': an intercepting credential has no {endpoint} (clients keep their own URL)")
    lifetime = None
    if data.get("lifetime") is not None:
        if not isinstance(data["lifetime"], str):
            raise _fail(origin, "'lifetime' must be a duration such as \"55m\"")
        try:
            lifetime = parse_duration(data["lifetime"])
        except BadInput as exc:
            raise _fail(origin, f"'lifetime': {exc.message}") from None
    budget = None
    if data.get("budget") is not None:
        spec = data["budget"]
        if not isinstance(spec, dict) or set(spec) - {"requests", "bytes"}:
            raise _fail(origin, "'budget' must be {\"requests\": N, \"bytes\": SIZE}")
        requests = spec.get("requests")
        if requests is not None and (type(requests) is not int or requests < 1):
            raise _fail(origin, "'budget': requests must be a positive integer")
        size = spec.get("bytes")
        try:
            nbytes = None if size is None else parse_size(str(size))
        except BadInput as exc:
            raise _fail(origin, f"'budget': bytes: {exc.message}") from None
        budget = Budget(requests, nbytes)
    ca = data.get("ca")
    if ca is not None and (not isinstance(ca, str) or not ca.startswith(("/", "~"))):
        raise _fail(origin, "'ca' must be an absolute path to a PEM file")
    prefix = data.get("token_prefix", "kp-")
    if not isinstance(prefix, str) or not _PREFIX_RE.fullmatch(prefix):
        raise _fail(origin, "'token_prefix' must be at most 32 letters, digits, '-' or '_'")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise _fail(origin, "'description' must be a string")
    return Definition(name=name, hosts=rules, source=source, header=header.lower() if header else None,
                      query=query, forms=forms, env=tuple(env.items()), mode=mode, lifetime=lifetime,
                      budget=budget, ca=ca, token_prefix=prefix, description=description, origin=origin)


def _fields(template: str) -> list[str]:
    try:
        return ["value" if f == "" else f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError:
        return ["?"]


def parse_source(spec: object, origin: str) -> Source:
    """{"env": NAME}, {"file": PATH} or {"command": [ARGV]}, as a credential's (and a disk key's) source."""
    return _source(spec, origin)


def _source(spec: object, origin: str) -> Source:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise _fail(origin, "'source' must be one of {\"env\": NAME}, {\"file\": PATH}, {\"command\": [ARGV]}")
    (kind, value), = spec.items()
    if kind == "env" and isinstance(value, str) and _ENV_RE.fullmatch(value):
        return Source("env", (value,))
    if kind == "file" and isinstance(value, str) and value.startswith(("/", "~")):
        return Source("file", (value,))
    if kind == "command" and isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return Source("command", tuple(value))
    raise _fail(origin, "'source' must be {\"env\": NAME}, {\"file\": ABSOLUTE PATH} or {\"command\": [ARGV, ...]}")


def load(name: str, user_dir: Path) -> Definition:
    """The definition of credential ``name``: the user's (``user_dir/NAME.json``) or the built-in one.
    BadInput (unknown_credential, bad_credential) when there is none, or it is broken."""
    if not NAME_RE.fullmatch(name):
        raise BadInput(f"--credential {name!r}: not a credential name (a-z, 0-9 and '-')", code="unknown_credential")
    for path in (user_dir / f"{name}.json", BUILTIN_DIR / f"{name}.json"):
        try:
            with open(path, "rb") as handle:
                text = handle.read(1 << 20)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise _fail(str(path), exc.strerror or str(exc)) from None
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise _fail(str(path), f"not JSON: {exc}") from None
        return parse(data, name, "built-in" if path.parent == BUILTIN_DIR else str(path))
    raise BadInput(f"--credential {name}: no such credential (known: {', '.join(names(user_dir))})",
                   code="unknown_credential", hint=f"define your own in {user_dir / (name + '.json')}")


def names(user_dir: Path) -> list[str]:
    found = set()
    for folder in (BUILTIN_DIR, user_dir):
        try:
            found |= {p.stem for p in folder.glob("*.json") if NAME_RE.fullmatch(p.stem)}
        except OSError:
            continue
    return sorted(found)


def check_value(value: str, source: Source) -> str:
    """The value as it goes into a header: one line of printable ASCII (a trailing newline, as
    `pass show` prints, is dropped), or BadInput naming the source and never the value."""
    value = value.removesuffix("\n").removesuffix("\r")
    if not value:
        raise BadInput(f"{source.describe()} is empty", code="credential_unavailable")
    if len(value) > VALUE_LIMIT:
        raise BadInput(f"{source.describe()} holds more than {VALUE_LIMIT} bytes: not a key",
                       code="credential_unavailable")
    if not VALUE_RE.fullmatch(value):
        raise BadInput(f"{source.describe()} holds spaces, control characters or non-ASCII: not a key "
                       "that can go into a header", code="credential_unavailable")
    return value


# -- budgets -------------------------------------------------------------------------------------


def parse_budget(text: str) -> tuple[str, Budget]:
    """--budget KEY=REQUESTS[,BYTES]: KEY a credential's name or a host; REQUESTS or BYTES may be '-'."""
    from kodepipe.core.units import parse_size

    key, sep, spec = text.partition("=")
    key = key.strip().lower().rstrip(".")
    parts = spec.split(",")
    if not sep or not key or len(parts) > 2:
        raise BadInput(f"--budget {text!r}: use NAME=REQUESTS[,BYTES], e.g. anthropic=2000,1g or api.example.com=100")
    requests: int | None = None
    if parts[0].strip() not in ("", "-"):
        if not parts[0].strip().isdigit() or int(parts[0]) < 1:
            raise BadInput(f"--budget {text!r}: REQUESTS must be a positive number (or '-' for no limit)")
        requests = int(parts[0])
    nbytes = None
    if len(parts) == 2 and parts[1].strip() not in ("", "-"):
        nbytes = parse_size(parts[1].strip())
    if requests is None and nbytes is None:
        raise BadInput(f"--budget {text!r}: give a number of requests, a size, or both")
    if not (NAME_RE.fullmatch(key) or "." in key):
        raise BadInput(f"--budget {text!r}: {key!r} is neither a credential name nor a host name")
    return key, Budget(requests, nbytes)


# -- what the proxy does with an endpoint request ---------------------------------------------------


def route(target: str) -> tuple[str, str]:
    """(credential name, the path upstream) of an origin-form target at the endpoint; Denied if it is
    not under /kodepipe/NAME."""
    if not target.startswith(ENDPOINT_PREFIX):
        raise Denied(f"this is kodepipe's proxy: a request for the proxy itself must start with "
                     f"{ENDPOINT_PREFIX}NAME (a credential's endpoint)")
    where, _, query = target.partition("?")
    name, _, rest = where[len(ENDPOINT_PREFIX):].partition("/")
    return name, "/" + rest + ("?" + query if query else "")


def _same(given: bytes, wanted: str) -> bool:
    return hmac.compare_digest(given, wanted.encode("ascii"))


def endpoint_head(request: Request, grant: Grant, path: str, value: str, host: str | None = None,
                  port: int | None = None) -> bytes:
    """The head that goes upstream for a credential's request (at its endpoint, or intercepted for
    ``host``:``port``): the token checked and taken out, the real ``value`` put in its place, Host the
    upstream's; Denied when the token is missing or wrong."""
    d = grant.definition
    kept: list[bytes] = []
    tokens = 0
    form = d.forms[0]
    for name, raw_value, line in request.headers:
        if name in HOP_HEADERS or name in (b"host",) or name.startswith(b"proxy-"):
            continue
        if d.header is not None and name == d.header.encode():
            matched = [f for f in d.forms if _same(raw_value, f.format(grant.token))]
            if not matched:
                raise Denied(f"the {d.header} header does not hold this run's token for {d.name}")
            form = matched[0]
            tokens += 1
            continue
        kept.append(line)
    if d.query is not None:
        base, _, query = path.partition("?")
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        given = [v for k, v in pairs if k == d.query]
        if len(given) != 1 or not _same(given[0].encode("utf-8", "surrogateescape"), form.format(grant.token)):
            raise Denied(f"the {d.query} parameter does not hold this run's token for {d.name}")
        tokens = 1
        pairs = [(k, form.format(value) if k == d.query else v) for k, v in pairs]
        path = base + "?" + urllib.parse.urlencode(pairs)
    elif tokens != 1:
        raise Denied(f"no {d.header} header with this run's token for {d.name}" if not tokens else
                     f"{tokens} {d.header} headers: one is expected")
    port = d.upstream_port if port is None else port
    authority = (d.upstream if host is None else host) + ("" if port == 443 else f":{port}")
    lines = [f"{request.method} {path} HTTP/1.1".encode("latin-1"), f"Host: {authority}".encode("latin-1")]
    if d.header is not None:
        lines.append(f"{d.header}: {form.format(value)}".encode("latin-1"))
    return b"\r\n".join([*lines, *kept, b"Connection: close", b"", b""])


def host_header(request: Request) -> str | None:
    """The one Host header of an origin-form request (without a port), lower case; None if there is not one."""
    hosts = [value for name, value, _ in request.headers if name == b"host"]
    if len(hosts) != 1:
        return None
    text = hosts[0].decode("latin-1").strip().lower()
    if text.startswith("["):
        return text.partition("]")[0] + "]"
    return text.rpartition(":")[0] if ":" in text else text


def loggable_path(path: str) -> str:
    """A path for the decision log: without its query string (a query may carry a key)."""
    return path.partition("?")[0][:512]
