"""Credentials that stay on the host: definitions as data, the real value read on the host and failing
closed, the token checked and swapped at the proxy's endpoint (a real proxy on loopback, a real TLS
origin that verifies nothing but records what it received), budgets, and the policy's conflicts."""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kodepipe.container import gather
from kodepipe.container import policy as pol
from kodepipe.core.errors import BadInput
from kodepipe.egress import credentials as creds
from kodepipe.egress import policy as egress_policy
from kodepipe.egress import proxy as egress
from kodepipe.egress import sources
from tests import httpd
from tests.test_egress import decisions

REAL = "sk-real-9f8e7d6c5b4a"


def definition(**overrides: Any) -> creds.Definition:
    data: dict[str, Any] = {"hosts": ["api.test"], "header": "x-api-key", "source": {"env": "TEST_KEY"},
                            "env": {"TEST_KEY": "{token}", "TEST_BASE_URL": "{endpoint}"}}
    data.update(overrides)
    return creds.parse(data, "t", "test")


# -- definitions -----------------------------------------------------------------------------------


def test_the_built_in_definitions_load_and_say_nothing_of_a_value(tmp_path: Path) -> None:
    names = creds.names(tmp_path)
    assert {"anthropic", "claude-oauth", "openai", "gemini", "github-copilot"} <= set(names)
    for name in names:
        d = creds.load(name, tmp_path)
        assert d.origin == "built-in" and not d.upstream.startswith("*")
        assert d.mode == ("intercept" if name == "github-copilot" else "endpoint")
        env = d.environment("TOKEN")
        assert "TOKEN" in env.values() and all("127.0.0.1:3128/kodepipe/" + name in v for v in env.values()
                                                 if v != "TOKEN")
    anthropic = creds.load("anthropic", tmp_path)
    assert (anthropic.upstream, anthropic.header, anthropic.source.describe()) == (
        "api.anthropic.com", "x-api-key", "the environment variable ANTHROPIC_API_KEY")
    assert creds.load("openai", tmp_path).environment("T")["OPENAI_BASE_URL"].endswith("/kodepipe/openai/v1")


def test_a_users_definition_replaces_the_built_in_one(tmp_path: Path) -> None:
    (tmp_path / "anthropic.json").write_text(json.dumps(
        {"hosts": ["llm.internal:8443"], "header": "authorization", "form": "Bearer {}",
         "source": {"command": ["pass", "show", "llm"]}, "env": {"LLM_KEY": "{token}"}, "lifetime": "30m",
         "ca": "/etc/ssl/internal.pem"}))
    d = creds.load("anthropic", tmp_path)
    assert d.origin == str(tmp_path / "anthropic.json") and (d.upstream, d.upstream_port) == ("llm.internal", 8443)
    assert d.lifetime == 1800 and d.source.describe() == "the command pass show llm"
    with pytest.raises(BadInput, match="no such credential") as info:
        creds.load("nope", tmp_path)
    assert info.value.code == "unknown_credential"
    with pytest.raises(BadInput, match="not a credential name"):
        creds.load("../etc/passwd", tmp_path)


@pytest.mark.parametrize(("change", "says"), [
    ({"colour": "red"}, "unknown key 'colour'"),
    ({"hosts": []}, "non-empty list"),
    ({"hosts": ["*.api.test"]}, "cannot be a wildcard"),
    ({"hosts": ["10.0.0.1"]}, "never addresses"),
    ({"query": "key"}, "exactly one of 'header'"),
    ({"header": "bad header"}, "header or parameter name"),
    ({"header": "Host"}, "'header' cannot be Host"),
    ({"header": "Proxy-Authorization"}, "cannot be"),
    ({"form": "Bearer"}, "one {}"),
    ({"form": "{} {}"}, "one {}"),
    ({"form": "{x}"}, "one {}"),
    ({"form": "Bearer {}\r\nX: y"}, "one {}"),
    ({"form": ["token {}", "x"]}, "one {}"),
    ({"form": [3]}, "one {}"),
    ({"source": {"env": "A", "file": "/x"}}, "'source'"),
    ({"source": {"file": "relative/path"}}, "'source'"),
    ({"source": {"command": []}}, "'source'"),
    ({"env": {"A": "{endpoint}"}}, "{token}"),
    ({"env": {"A": "{token}", "B": "{value}"}}, "only {token} and {endpoint}"),
    ({"env": {"1A": "{token}"}}, "not a variable name"),
    ({"mode": "magic"}, "'mode'"),
    ({"lifetime": 5}, "'lifetime'"),
    ({"budget": {"requests": 0}}, "positive integer"),
    ({"budget": {"requests": True}}, "positive integer"),
    ({"budget": {"bytes": "lots"}}, "bytes"),
    ({"ca": "relative.pem"}, "'ca'"),
    ({"token_prefix": "a b"}, "'token_prefix'"),
])
def test_a_broken_definition_is_refused_naming_what(change: dict[str, Any], says: str) -> None:
    with pytest.raises(BadInput) as info:
        definition(**change)
    assert says in info.value.message and info.value.code == "bad_credential"


def test_budgets_parse_by_credential_or_host() -> None:
    assert creds.parse_budget("anthropic=2000,1g") == ("anthropic", creds.Budget(2000, 1 << 30))
    assert creds.parse_budget("API.example.com.=100") == ("api.example.com", creds.Budget(100, None))
    assert creds.parse_budget("x=-,10m") == ("x", creds.Budget(None, 10 << 20))
    for bad in ("x", "x=", "x=0", "x=-,-", "x=1,2,3", "=5", "x=ten", "bad name=1"):
        with pytest.raises(BadInput):
            creds.parse_budget(bad)


# -- what the proxy sends upstream -----------------------------------------------------------------


def request(head: bytes) -> Any:
    from kodepipe.egress import wire

    return wire.parse_request(head)


def test_the_token_is_checked_and_replaced_by_the_value_in_the_one_header() -> None:
    grant = creds.Grant(definition(), "TOKEN", REAL)
    name, path = creds.route("/kodepipe/t/v1/messages?beta=true")
    assert (name, path) == ("t", "/v1/messages?beta=true")
    head = creds.endpoint_head(request(
        b"POST /kodepipe/t/v1/messages?beta=true HTTP/1.1\r\nHost: evil.test\r\nX-Api-Key: TOKEN\r\n"
        b"Connection: keep-alive\r\nProxy-Authorization: x\r\nContent-Length: 2\r\nX-Other: 1\r\n\r\n"),
        grant, path, REAL)
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/messages?beta=true HTTP/1.1" and lines[1] == b"Host: api.test"
    assert f"x-api-key: {REAL}".encode() in lines and b"TOKEN" not in head and b"evil" not in head
    assert b"X-Other: 1" in lines and b"Content-Length: 2" in lines and b"Connection: close" in lines
    assert b"keep-alive" not in head and b"Proxy-" not in head
    for bad in (b"", b"X-Api-Key: WRONG\r\n", b"X-Api-Key: TOKEN\r\nX-Api-Key: TOKEN\r\n", b"X-Api-Key: TOKENX\r\n",
                b"Authorization: Bearer TOKEN\r\n"):
        with pytest.raises(egress_policy.Denied):
            creds.endpoint_head(request(b"GET /kodepipe/t/ HTTP/1.1\r\n" + bad + b"\r\n"), grant, "/", REAL)
    with pytest.raises(egress_policy.Denied, match="must start with /kodepipe/"):
        creds.route("/v1/messages")


def test_a_list_of_forms_takes_any_and_sends_the_key_in_the_one_used() -> None:
    grant = creds.Grant(definition(header="authorization", form=["token {}", "Bearer {}"]), "TOKEN", REAL)
    for form in ("token", "Bearer"):
        head = creds.endpoint_head(request(f"GET /kodepipe/t/x HTTP/1.1\r\nAuthorization: {form} TOKEN\r\n\r\n"
                                           .encode()), grant, "/x", REAL)
        assert f"authorization: {form} {REAL}".encode() in head and b"TOKEN" not in head
    with pytest.raises(egress_policy.Denied):
        creds.endpoint_head(request(b"GET /kodepipe/t/x HTTP/1.1\r\nAuthorization: Basic TOKEN\r\n\r\n"), grant,
                            "/x", REAL)


def test_a_bearer_form_and_a_query_parameter() -> None:
    bearer = creds.Grant(definition(header="authorization", form="Bearer {}"), "TOKEN", REAL)
    head = creds.endpoint_head(request(b"GET /kodepipe/t/x HTTP/1.1\r\nAuthorization: Bearer TOKEN\r\n\r\n"),
                               bearer, "/x", REAL)
    assert f"authorization: Bearer {REAL}".encode() in head and b"TOKEN" not in head
    query = creds.Grant(definition(header=None, query="key"), "TOKEN", REAL)
    head = creds.endpoint_head(request(b"GET /kodepipe/t/m?key=TOKEN&a=1 HTTP/1.1\r\n\r\n"), query,
                               "/m?key=TOKEN&a=1", REAL)
    assert head.startswith(f"GET /m?key={REAL}&a=1 HTTP/1.1".encode())
    for bad in ("/m", "/m?key=WRONG", "/m?key=TOKEN&key=TOKEN"):
        with pytest.raises(egress_policy.Denied):
            creds.endpoint_head(request(b"GET /kodepipe/t/m HTTP/1.1\r\n\r\n"), query, bad, REAL)
    assert creds.loggable_path("/m?key=TOKEN") == "/m"


# -- the real value, read on the host --------------------------------------------------------------


def test_a_value_from_the_environment_a_file_or_a_command(tmp_path: Path) -> None:
    assert sources.read(creds.Source("env", ("K",)), {"K": REAL}) == REAL
    key = tmp_path / "key"
    key.write_text(REAL + "\n")
    assert sources.read(creds.Source("file", (str(key),)), {}) == REAL
    assert sources.read(creds.Source("command", (sys.executable, "-c", f"print({REAL!r})")), {}) == REAL


@pytest.mark.parametrize(("kind", "spec", "says", "absent"), [
    ("env", ("UNSET_KEY",), "the environment variable UNSET_KEY is not set", True),
    ("file", ("/nonexistent/key",), "the file /nonexistent/key does not exist", True),
    ("file", ("/",), "not a regular file", False),
    ("file", ("/dev/zero",), "not a regular file", False),
    ("command", ("kp-no-such-program",), "is not installed", True),
    ("command", (sys.executable, "-c", "import os, sys; print(os.environ['KP_TEST_VALUE']); sys.exit(3)"),
     "exited with status 3", False),
    ("command", (sys.executable, "-c", "pass"), "is empty", False),
    ("env", ("SPACED",), "spaces, control characters", False),
    ("env", ("NEWLINES",), "spaces, control characters", False),
])
def test_a_source_that_cannot_be_read_fails_closed_naming_it_and_never_the_value(
        kind: str, spec: tuple[str, ...], says: str, absent: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KP_TEST_VALUE", REAL)  # what the failing command prints on stdout
    env = {"SPACED": REAL + " x", "NEWLINES": REAL + "\r\nX-Injected: 1"}
    with pytest.raises(sources.Unavailable) as info:
        sources.read(creds.Source(kind, spec), env)
    assert says in info.value.message and info.value.absent == absent
    assert REAL not in info.value.message and info.value.code == "credential_unavailable"


# -- the policy ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prof:
    name: str = "agent"
    command: tuple[str, ...] = ("agent",)
    memory: str = "2g"
    cpus: float = 2.0
    pids: int = 512
    time: str = "2h"
    allow: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    tty: bool = False
    credentials: tuple[str, ...] = ()


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KODEPIPE_CONFIG_DIR", str(tmp_path))
    (tmp_path / "credentials").mkdir()
    for name, var in (("one", "ONE_KEY"), ("two", "TWO_KEY"), ("same", "SAME_KEY")):
        (tmp_path / "credentials" / f"{name}.json").write_text(json.dumps(
            {"hosts": [f"{name}.test"], "header": "x-key", "source": {"env": var},
             "env": {"SHARED_KEY" if name != "one" else "ONE_KEY": "{token}", f"{name.upper()}_URL": "{endpoint}"},
             "budget": {"requests": 10}}))
    return tmp_path


def resolve(opts: pol.Options, prof: Prof | None, environ: dict[str, str]) -> pol.Policy:
    config = pol.Config(credentials=gather.credentials(opts, prof, environ))
    return pol.resolve(opts, prof, config)


def test_a_credential_gives_the_agent_a_token_and_the_endpoint_never_the_value(config_dir: Path) -> None:
    opts = pol.Options(command=("true",), credentials=("one",))
    policy = resolve(opts, None, {"ONE_KEY": REAL})
    env = policy.environment()
    assert env["ONE_KEY"].startswith("kp-") and env["ONE_KEY"] != REAL
    assert env["ONE_URL"] == "http://127.0.0.1:3128/kodepipe/one"
    assert policy.egress == pol.Egress(())  # the proxy, with nothing else allowed
    record = json.dumps(policy.record())
    assert REAL not in record and env["ONE_KEY"] not in record and REAL not in repr(policy)
    assert "credential:one" in policy.record()["loosened"] and policy.record()["budgets"] == {
        "one": {"requests": 10, "bytes": None}}
    again = resolve(opts, None, {"ONE_KEY": REAL})
    assert again.environment()["ONE_KEY"] != env["ONE_KEY"]  # a token per run


def test_conflicts_are_usage_errors_and_a_missing_source_stops_the_run(config_dir: Path) -> None:
    def problems(**kw: Any) -> str:
        with pytest.raises(pol.PolicyError) as info:
            resolve(pol.Options(command=("true",), **kw), None, {"ONE_KEY": REAL, "TWO_KEY": REAL, "SAME_KEY": REAL})
        return info.value.message

    assert "--credential and --net open exclude each other" in problems(credentials=("one",), network="open")
    assert "-e ONE_KEY: the credential one gives the agent ONE_KEY" in problems(credentials=("one",), env=("ONE_KEY",))
    assert "both set SHARED_KEY" in problems(credentials=("two", "same"))
    assert "no such credential" in problems(credentials=("nope",))
    assert "--budget only matters with --allow or --credential" in problems(budgets=("x.test=1",))
    assert "neither a credential of this run nor an allowed host" in problems(credentials=("one",),
                                                                             budgets=("other.test=1",))
    with pytest.raises(pol.CredentialUnavailable) as info:
        resolve(pol.Options(command=("true",), credentials=("one",)), None, {})
    assert info.value.code == "credential_unavailable" and "ONE_KEY is not set" in info.value.message
    ok = resolve(pol.Options(command=("true",), credentials=("one",), allow=("api.example.com",),
                             budgets=("one=3,1m", "api.example.com=5")), None, {"ONE_KEY": REAL})
    assert dict(ok.budgets) == {"one": creds.Budget(3, 1 << 20), "api.example.com": creds.Budget(5, None)}


def test_a_profiles_credentials_are_used_when_set_up_and_said_when_not(config_dir: Path) -> None:
    prof = Prof(credentials=("one", "two", "same"))
    used = resolve(pol.Options(), prof, {"ONE_KEY": REAL, "TWO_KEY": REAL, "SAME_KEY": REAL})
    # two and same both give SHARED_KEY: the first set up wins, the other is left out
    assert [g.name for g in used.credentials] == ["one", "two"] and not used.credentials_missing
    partly = resolve(pol.Options(), prof, {"SAME_KEY": REAL})
    # two is not missing: same, its alternative (the same variable), serves the agent
    assert [g.name for g in partly.credentials] == ["same"] and partly.credentials_missing == ("one",)
    assert partly.record()["credentials_missing"] == ["one"]
    none = resolve(pol.Options(), prof, {})
    assert not none.credentials and none.credentials_missing == ("one", "two", "same")
    assert not resolve(pol.Options(no_profile_credentials=True), prof, {"ONE_KEY": REAL}).credentials
    assert not resolve(pol.Options(network="open"), prof, {"ONE_KEY": REAL}).credentials
    # a source that is set up and broken is never skipped
    (config_dir / "credentials" / "one.json").write_text(json.dumps(
        {"hosts": ["one.test"], "header": "x-key", "source": {"file": "/"}, "env": {"ONE_KEY": "{token}"}}))
    with pytest.raises(pol.PolicyError, match=r"the profile's credential one: the file /.*not a regular file"):
        resolve(pol.Options(), prof, {})


# -- the proxy's endpoint, on loopback -------------------------------------------------------------------


@dataclass
class Upstream:
    port: int
    seen: list[dict[str, Any]]
    ca: str  # the test certificate's file, which verifies it

    @property
    def ca_pem(self) -> str:
        return Path(self.ca).read_text()


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    seen: list[dict[str, Any]] = []
    with httpd.origin("127.0.0.1", "upstream says", seen=seen, tls=True) as port:
        yield Upstream(port, seen, httpd.certificate()[0])


@dataclass
class Endpoint:
    port: int
    log: Path
    token: str
    proxy: egress.Proxy


def serve(tmp_path: Path, upstream: Upstream, *, ca: str | None = None, budget: str | None = None,
          allow: tuple[str, ...] = ()) -> Endpoint:
    d = definition(hosts=[f"api.test:{upstream.port}"], ca=ca or upstream.ca)
    grant = creds.Grant(d, "TOKEN-1234", REAL)
    budgets = [creds.parse_budget(budget)] if budget else []
    policy = egress_policy.Policy.build(allow, ["api.test=127.0.0.1", "other.test=127.0.0.1"], [grant], budgets)
    log = egress.DecisionLog(tmp_path / "egress.jsonl", "c1")
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(16)
    p = egress.Proxy(policy, log)
    p.start(tcp, None)
    return Endpoint(tcp.getsockname()[1], tmp_path / "egress.jsonl", "TOKEN-1234", p)


@pytest.fixture
def endpoint(tmp_path: Path, upstream: Upstream) -> Iterator[Endpoint]:
    e = serve(tmp_path, upstream, budget="t=3")
    yield e
    e.proxy.stop()
    e.proxy.log.close()


def ask(port: int, data: bytes) -> bytes:
    from tests.test_egress import ask as send

    return send(port, data)


def post(e: Endpoint, path: str = "/v1/messages", key: str | None = None, extra: bytes = b"") -> bytes:
    key_line = b"" if key is None else b"x-api-key: " + key.encode() + b"\r\n"
    return ask(e.port, f"POST /kodepipe/t{path} HTTP/1.1\r\nHost: 127.0.0.1:3128\r\n".encode() + key_line + extra
               + b"Content-Length: 5\r\n\r\nhello")


def test_the_upstream_gets_the_real_key_and_the_agent_only_its_answer(endpoint: Endpoint, upstream: Upstream) -> None:
    answer = post(endpoint, key=endpoint.token)
    assert answer.startswith(b"HTTP/1.0 200") and answer.endswith(b"upstream says /v1/messages\n"), answer
    [got] = upstream.seen
    assert ("x-api-key", REAL) in got["headers"] and got["body"] == b"hello"
    assert got["host"] == f"api.test:{upstream.port}" and endpoint.token not in str(got)
    [entry] = decisions(endpoint.log)
    assert (entry["decision"], entry["credential"], entry["host"], entry["method"], entry["path"],
            entry["injected"]) == ("allow", "t", "api.test", "POST", "/v1/messages", True)
    assert REAL not in endpoint.log.read_text() and endpoint.token not in endpoint.log.read_text()


def test_without_the_token_or_for_another_credential_nothing_goes_upstream(endpoint: Endpoint,
                                                                           upstream: Upstream) -> None:
    for answer in (post(endpoint), post(endpoint, key="WRONG"), post(endpoint, key=REAL),
                   ask(endpoint.port, b"GET /kodepipe/other/x HTTP/1.1\r\nx-api-key: TOKEN-1234\r\n\r\n"),
                   ask(endpoint.port, b"GET /v1/messages HTTP/1.1\r\nx-api-key: TOKEN-1234\r\n\r\n")):
        assert answer.startswith(b"HTTP/1.1 403"), answer
    # an absolute-form request for the credential's host is an ordinary proxy request: not on the
    # allowlist, refused; and it would never carry the key
    assert ask(endpoint.port, b"GET http://api.test/v1 HTTP/1.1\r\nx-api-key: TOKEN-1234\r\n\r\n").startswith(
        b"HTTP/1.1 403")
    assert upstream.seen == []
    log = decisions(endpoint.log)
    assert [d["decision"] for d in log] == ["deny"] * 6 and not any(d.get("injected") for d in log)
    assert REAL not in endpoint.log.read_text()


def test_the_budget_answers_429_at_its_limit(endpoint: Endpoint, upstream: Upstream) -> None:
    answers = [post(endpoint, key=endpoint.token) for _ in range(4)]
    assert [a.split(b" ", 2)[1] for a in answers] == [b"200", b"200", b"200", b"429"], answers
    assert len(upstream.seen) == 3
    last = decisions(endpoint.log)[-1]
    assert (last["decision"], last["budget"]) == ("deny", "t") and "over budget" in last["reason"]
    used = endpoint.proxy.ledger.record()["t"]
    assert used["requests"] == 3 and used["exceeded"] and used["bytes"] > 0
    assert endpoint.proxy.log.counts["over_budget"] == 1 and endpoint.proxy.log.counts["injected"] == 3


def test_an_upstream_whose_certificate_does_not_verify_never_gets_the_key(tmp_path: Path, upstream: Upstream) -> None:
    e = serve(tmp_path, upstream, ca="/etc/ssl/certs/ca-certificates.crt")  # the system's CAs: not the test's
    try:
        answer = post(e, key=e.token)
    finally:
        e.proxy.stop()
        e.proxy.log.close()
    assert answer.startswith(b"HTTP/1.1 502"), answer
    assert upstream.seen == []
    [entry] = decisions(e.log)
    assert entry["decision"] == "error" and "CERTIFICATE_VERIFY_FAILED" in entry["reason"], entry


def test_the_credentials_host_is_no_destination_of_its_own(tmp_path: Path, upstream: Upstream) -> None:
    """In endpoint mode the upstream is reached only through the endpoint: a CONNECT to it is refused (it
    is not on the allowlist), and a tunnel to an allowed name whose TLS names the credential's host (SNI)
    is cut at the ClientHello; neither reaches the upstream, with or without the key."""
    from tests.test_egress import https_get, tunnel

    e = serve(tmp_path, upstream, allow=(f"other.test:{upstream.port}",))
    try:
        refused = ask(e.port, f"CONNECT api.test:{upstream.port} HTTP/1.1\r\n\r\n".encode())
        assert refused.startswith(b"HTTP/1.1 403"), refused
        s = tunnel(e.port, f"other.test:{upstream.port}")
        assert https_get(s, "api.test", "/v1/sni") == b""
        # and the allowed name itself is an ordinary end-to-end tunnel: nothing is added to it
        s = tunnel(e.port, f"other.test:{upstream.port}")
        assert b"upstream says /v1/plain" in https_get(s, "other.test", "/v1/plain")
    finally:
        e.proxy.stop()
        e.proxy.log.close()
    assert [s["path"] for s in upstream.seen] == ["/v1/plain"]
    assert not any(REAL in str(s) for s in upstream.seen)
    reasons = [d.get("reason", "") for d in decisions(e.log) if d["decision"] == "deny"]
    assert any("not on the allowlist" in r for r in reasons) and any("TLS server name" in r for r in reasons)


# -- interception mode: TLS ended at the proxy with the run's CA, for the credential's hosts only -----------


def intercepting(tmp_path: Path, upstream: Upstream) -> Endpoint:
    from kodepipe.egress.ca import RunCA

    d = definition(hosts=[f"api.test:{upstream.port}"], ca=upstream.ca, mode="intercept",
                   env={"TEST_KEY": "{token}"})
    grant = creds.Grant(d, "PLACEHOLDER-77", REAL)
    policy = egress_policy.Policy.build([f"other.test:{upstream.port}"], ["api.test=127.0.0.1", "other.test=127.0.0.1"],
                                        [grant], [("t", creds.Budget(requests=2))])
    policy.ca = RunCA(policy.intercepted_hosts())
    log = egress.DecisionLog(tmp_path / "egress.jsonl", "c1")
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(16)
    p = egress.Proxy(policy, log)
    p.start(tcp, None)
    return Endpoint(tcp.getsockname()[1], tmp_path / "egress.jsonl", "PLACEHOLDER-77", p)


def through_tls(e: Endpoint, target: str, name: str, request: bytes, cadata: str | None) -> bytes:
    """``request`` over TLS to ``name`` through a CONNECT to ``target``, verified with ``cadata`` (None: the
    system's CAs).  The response, or the TLS error's text."""
    import ssl

    from tests.test_egress import tunnel

    context = ssl.create_default_context(cadata=cadata) if cadata else ssl.create_default_context()
    try:
        with context.wrap_socket(tunnel(e.port, target), server_hostname=name) as t:
            t.sendall(request)
            got = b""
            while chunk := t.recv(65536):
                got += chunk
            return got
    except ssl.SSLError as exc:
        return str(exc).encode()


def test_interception_swaps_the_placeholder_for_hosts_that_trust_the_runs_ca(tmp_path: Path,
                                                                               upstream: Upstream) -> None:
    e = intercepting(tmp_path, upstream)
    ca = e.proxy.policy.ca.pem.decode()
    target, authority = f"api.test:{upstream.port}", f"Host: api.test:{upstream.port}\r\n"
    try:
        ok = through_tls(e, target, "api.test", f"POST /v1/messages HTTP/1.1\r\n{authority}x-api-key: "
                         f"{e.token}\r\nContent-Length: 2\r\n\r\nhi".encode(), ca)
        missing = through_tls(e, target, "api.test", f"GET /v1/none HTTP/1.1\r\n{authority}\r\n".encode(), ca)
        other_host = through_tls(e, target, "api.test", f"GET /v1/h HTTP/1.1\r\nHost: other.test\r\nx-api-key: "
                                 f"{e.token}\r\n\r\n".encode(), ca)
        untrusted = through_tls(e, target, "api.test", b"GET / HTTP/1.1\r\n\r\n", None)
        # a CONNECT to the credential's host whose TLS names another host: cut at the ClientHello
        other_sni = through_tls(e, target, "other.test", f"GET /v1/sni HTTP/1.1\r\nHost: other.test\r\n"
                                f"x-api-key: {e.token}\r\n\r\n".encode(), ca)
        # another allowed host stays end to end: the upstream's own certificate, not the run's CA
        plain = through_tls(e, f"other.test:{upstream.port}", "other.test",
                            f"GET /v1/plain HTTP/1.1\r\nHost: other.test\r\nx-api-key: {e.token}\r\n\r\n".encode(),
                            upstream.ca_pem)
        again = through_tls(e, target, "api.test", f"GET /v1/again HTTP/1.1\r\n{authority}x-api-key: "
                            f"{e.token}\r\n\r\n".encode(), ca)
        over = through_tls(e, target, "api.test", f"GET /v1/over HTTP/1.1\r\n{authority}x-api-key: "
                           f"{e.token}\r\n\r\n".encode(), ca)
    finally:
        e.proxy.stop()
        e.proxy.log.close()
    assert ok.startswith(b"HTTP/1.0 200") and ok.endswith(b"upstream says /v1/messages\n"), ok
    assert missing.startswith(b"HTTP/1.1 403") and other_host.startswith(b"HTTP/1.1 403"), (missing, other_host)
    assert b"CERTIFICATE_VERIFY_FAILED" in untrusted, untrusted
    assert not other_sni.startswith(b"HTTP/"), other_sni
    assert any("TLS server name 'other.test'" in d.get("reason", "") for d in decisions(e.log))
    assert plain.endswith(b"upstream says /v1/plain\n") and again.endswith(b"upstream says /v1/again\n")
    assert over.startswith(b"HTTP/1.1 429"), over
    got = {s["path"]: dict(s["headers"]).get("x-api-key") for s in upstream.seen}
    assert got == {"/v1/messages": REAL, "/v1/plain": e.token, "/v1/again": REAL}, got
    log = decisions(e.log)
    assert [d["path"] for d in log if d.get("injected")] == ["/v1/messages", "/v1/again"]
    assert REAL not in e.log.read_text() and e.token not in e.log.read_text()


def test_the_runs_ca_is_a_ca_strict_clients_accept_and_can_sign_for_nothing_else() -> None:
    from cryptography import x509

    from kodepipe.egress.ca import RunCA

    ca = RunCA(["api.test", "llm.example.com"])
    cert = ca.certificate
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).critical
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    constraints = cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert constraints.critical and {n.value for n in constraints.value.permitted_subtrees or []} == {
        "api.test", "llm.example.com"}
    assert cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    leaf = x509.load_pem_x509_certificate(ca.leaf("v1.llm.example.com")[0])
    leaf.verify_directly_issued_by(cert)
    with pytest.raises(ValueError, match="does not sign"):
        ca.leaf("example.com")
    assert RunCA(["api.test"]).pem != RunCA(["api.test"]).pem  # one per run
    bundle = ca.bundle()
    assert bundle.endswith(ca.pem) and b"PRIVATE KEY" not in bundle


def test_a_credential_with_a_lifetime_is_read_again_and_fails_closed_when_it_cannot_be(
        tmp_path: Path, upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    """A short-lived token (a lifetime): the proxy reads its source again once it is over, and answers 503,
    naming the source, when it cannot; the old value is never used past its lifetime."""
    import dataclasses

    d = dataclasses.replace(definition(hosts=[f"api.test:{upstream.port}"], ca=upstream.ca,
                                       source={"env": "KP_ROTATING"}), lifetime=0.0)
    monkeypatch.setenv("KP_ROTATING", "sk-first")
    policy = egress_policy.Policy.build([], ["api.test=127.0.0.1"], [creds.Grant(d, "TOKEN-9", "sk-first")])
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(16)
    e = Endpoint(tcp.getsockname()[1], tmp_path / "egress.jsonl", "TOKEN-9",
                 egress.Proxy(policy, egress.DecisionLog(tmp_path / "egress.jsonl", "c1")))
    e.proxy.start(tcp, None)
    try:
        first = post(e, key=e.token)
        monkeypatch.setenv("KP_ROTATING", "sk-second")
        second = post(e, key=e.token)
        monkeypatch.delenv("KP_ROTATING")
        third = post(e, key=e.token)
    finally:
        e.proxy.stop()
        e.proxy.log.close()
    assert first.startswith(b"HTTP/1.0 200") and second.startswith(b"HTTP/1.0 200"), (first, second)
    assert third.startswith(b"HTTP/1.1 503") and b"KP_ROTATING is not set" in third, third
    assert [dict(s["headers"])["x-api-key"] for s in upstream.seen] == ["sk-first", "sk-second"]
    assert "sk-second" not in e.log.read_text()
