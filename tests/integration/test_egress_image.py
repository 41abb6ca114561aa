"""The egress proxy's image (kp-image egress) enforces the allowlist where a cluster would run it.

kp-run --emit kube --allow puts the agent in a pod whose only way out is a Service in front of a
Deployment of localhost/kodepipe-egress, configured by a ConfigMap.  Here Podman plays the cluster,
sharing between the containers only what a cluster would let them share:

    agent (kp-run's shell image) -- internal network A (no route out) -- proxy -- internal network B -- web

The proxy runs as the Deployment says (uid 65534, read-only root, no capabilities) with its allowlist as
a mounted file; the web container serves a file and logs each request it receives, so a test says what
reached it, not only what the agent was told.  Both networks are internal: nothing leaves this machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from kodepipe.core import schema
from tests import httpd
from tests.conftest import BIN, lines
from tests.integration.conftest import kp_env

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the container images are built as root"),
]

PREFIX = "kp-egtest-"
# runc, not crun (cgroups in hybrid mode); runc needs the rlimits set (no CAP_SYS_RESOURCE here)
RUN = ["podman", "run", "--runtime", "runc", "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]
# the Deployment's securityContext: runAsUser/runAsGroup 65534, readOnlyRootFilesystem, drop ALL,
# allowPrivilegeEscalation false
AS_DEPLOYED = ["--user", "65534:65534", "--read-only", "--cap-drop", "all", "--security-opt", "no-new-privileges"]
PODMAN_TIMEOUT = 60
WEB_PORT = 8080
ALLOWED, REFUSED = "web.test", "other.test"


def podman(*args: str, timeout: float = PODMAN_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"podman {' '.join(args)}: {proc.stderr[-2000:]}"
    return proc


def address_on(container: str, network: str) -> str:
    networks = json.loads(podman("inspect", "--format", "{{json .NetworkSettings.Networks}}", container).stdout)
    address: str = networks[network]["IPAddress"]
    assert address, networks
    return address


def host_ipv4() -> str | None:
    """A global IPv4 address of this host (lo excluded), where a container with a route out reaches it."""
    links = json.loads(subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, check=True).stdout)
    found = [a["local"] for link in links if link["ifname"] != "lo" for a in link.get("addr_info", [])
             if a.get("family") == "inet" and a.get("scope") == "global"]
    return found[0] if found else None


def wait_for_log(container: str, text: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        logs = podman("logs", container, check=False)
        if text in logs.stderr or text in logs.stdout:
            return
        if podman("inspect", "--format", "{{.State.Running}}", container, check=False).stdout.strip() != "true":
            break
        time.sleep(0.3)
    logs = podman("logs", container, check=False)
    pytest.fail(f"{container} did not say {text!r}: {logs.stdout[-2000:]} {logs.stderr[-2000:]}")


# --------------------------------------------------------------------------- the image, by its command

@pytest.fixture(scope="module")
def egress_image(shell_image: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """kp-image egress's record, on the base image shell_image was built on (built once, then found)."""
    root = tmp_path_factory.mktemp("egress-image")
    cache = Path(os.environ.get("KODEPIPE_TEST_CACHE", root / "cache"))
    env = {**kp_env(root / "state", root / "home", cache), "KODEPIPE_CONFIG_DIR": str(root / "config")}
    proc = subprocess.run([str(BIN / "kp-image"), "egress"], env=env, capture_output=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr.decode()[-4000:]
    (record,) = lines(proc.stdout)
    return record


def test_kp_image_egress_writes_one_record_and_tags_latest(egress_image: dict[str, Any]) -> None:
    assert egress_image["kind"] == "container-image", egress_image
    assert egress_image["name"].startswith("localhost/kodepipe-egress:"), egress_image
    assert schema.problems(egress_image, strict=True) == [], egress_image
    info = json.loads(podman("image", "inspect", "--format", "json", "localhost/kodepipe-egress:latest").stdout)[0]
    assert info["Id"] == egress_image["image_id"]  # :latest (kp-run --proxy-image's default) is this build
    config = info["Config"]
    assert config["User"] == "65534:65534"
    assert config["Entrypoint"] == ["python3", "-m", "kodepipe.egress.serve"]
    assert config["Cmd"] == ["--config", "/etc/kodepipe/egress.json"]  # the Deployment's args


# --------------------------------------------------------------------------- the pod-like setting

@dataclass
class Setting:
    web_ip: str
    proxy_ip: str
    host_ip: str | None
    token: str
    probes: dict[str, dict[str, str]]  # the agent's view: probe name -> curl's exit, status, body, error
    decisions: list[dict[str, Any]]  # the proxy's stdout, one JSON line each
    proxy_stderr: str
    web_requests: list[str]  # what reached the web server (its request log lines)
    host_requests: list[dict[str, Any]]  # what reached the server on this host's own address
    status: dict[str, str]  # /proc/1/status of the proxy's process
    mounts: str  # /proc/1/mounts of the proxy's process
    cmdline: list[str] = field(default_factory=list)


PROBES = r"""
probe() {  # NAME CURL-ARGS...: one line "NAME EXIT STATUS BODY-OR-ERROR"
  name=$1; shift
  status=$(curl -sS --max-time 15 --connect-timeout 5 -o /tmp/body -w '%{http_code}' "$@" 2>/tmp/err)
  code=$?
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$code" "$status" "$(head -c 200 /tmp/body 2>/dev/null | tr '\t\n' '  ')" \
    "$(tr '\t\n' '  ' < /tmp/err)"
  rm -f /tmp/body /tmp/err
}
probe allowed   "http://web.test:8080/hello.txt"
probe refused   "http://other.test:8080/hello.txt"
probe raw_ip    "http://$WEB_IP:8080/hello.txt"
probe direct    --noproxy '*' "http://$WEB_IP:8080/hello.txt"
[ -n "$HOST_IP" ] && probe host --noproxy '*' "http://$HOST_IP:$HOST_PORT/from-the-agent"
printf 'routes\t0\t\t%s\t\n' "$(ip -4 route | tr '\n' ';')"
for target in "web=$WEB_IP" "host=$HOST_IP"; do  # how the kernel would route to each (curl hides why it failed)
  [ -n "${target#*=}" ] || continue
  answer=$(ip route get "${target#*=}" 2>&1); code=$?
  printf 'route_%s\t%s\t\t%s\t\n' "${target%%=*}" "$code" "$(printf '%s' "$answer" | tr '\t\n' '  ')"
done
"""


def _probes(output: str) -> dict[str, dict[str, str]]:
    found = {}
    for line in output.splitlines():
        name, code, status, body, error = (line.split("\t") + [""] * 5)[:5]
        found[name] = {"exit": code, "status": status, "body": body, "error": error}
    return found


@pytest.fixture(scope="module")
def setting(egress_image: dict[str, Any], shell_image: str, tmp_path_factory: pytest.TempPathFactory,
            ) -> Iterator[Setting]:
    image = egress_image["name"]
    run_id = secrets.token_hex(4)
    agent_net, web_net = f"{PREFIX}agent-{run_id}", f"{PREFIX}web-{run_id}"
    web, proxy, agent = f"{PREFIX}web-{run_id}", f"{PREFIX}proxy-{run_id}", f"{PREFIX}agent-{run_id}"
    root = tmp_path_factory.mktemp("egress-pod")
    token = secrets.token_hex(8)
    docroot, config = root / "docroot", root / "config"
    for folder in (docroot, config):  # read by uid 65534 in the containers
        folder.mkdir()
        folder.chmod(0o755)
    (docroot / "hello.txt").write_text(f"hello {token}\n")
    (docroot / "hello.txt").chmod(0o644)
    networks: list[str] = []
    containers = [web, proxy, agent]
    try:
        for net in (agent_net, web_net):
            podman("network", "create", "--internal", net)
            networks.append(net)
        # the web target: the image's own python3 serving a folder (a stand-in for an allowed site)
        podman(*RUN[1:], "-d", "--name", web, "--network", web_net, *AS_DEPLOYED, "-v", f"{docroot}:/srv:ro",
               "--entrypoint", "python3", image, "-m", "http.server", str(WEB_PORT), "--directory", "/srv")
        wait_for_log(web, "Serving HTTP")
        web_ip = address_on(web, web_net)
        # the ConfigMap: the allowlist; both names are pinned to the web server, so only the allowlist
        # keeps other.test out
        spec = {"allow": [f"{ALLOWED}:{WEB_PORT}"], "resolve": [f"{ALLOWED}={web_ip}", f"{REFUSED}={web_ip}"],
                "container": f"{PREFIX}{run_id}", "listen": "0.0.0.0:3128"}
        (config / "egress.json").write_text(json.dumps(spec))
        (config / "egress.json").chmod(0o644)
        podman(*RUN[1:], "-d", "--name", proxy, "--network", agent_net, "--network", web_net, *AS_DEPLOYED,
               "-v", f"{config}:/etc/kodepipe:ro", image)  # the image's CMD: --config /etc/kodepipe/egress.json
        wait_for_log(proxy, "kodepipe-egress: serving")
        proxy_ip = address_on(proxy, agent_net)
        url = f"http://{proxy_ip}:3128"
        host_ip = host_ipv4()
        seen: list[dict[str, Any]] = []
        # a server on this host's own address: reachable from a container with a route out
        with httpd.origin("0.0.0.0", "host says", seen=seen) as host_port:  # noqa: S104 - all the host's addresses
            agent_run = subprocess.run(
                [*RUN, "--rm", "--name", agent, "--network", agent_net, "--user", "1000:1000", "--read-only",
                 "--cap-drop", "all", "--tmpfs", "/tmp:size=16m", "-e", "HOME=/tmp",
                 *[a for k in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy") for a in ("-e", f"{k}={url}")],
                 "-e", f"WEB_IP={web_ip}", "-e", f"HOST_IP={host_ip or ''}", "-e", f"HOST_PORT={host_port}",
                 shell_image, "bash", "-c", PROBES],
                capture_output=True, text=True, timeout=180)
        assert agent_run.returncode in (0, 1), agent_run.stderr[-2000:]
        status_text = podman("exec", proxy, "cat", "/proc/1/status").stdout
        mounts = podman("exec", proxy, "cat", "/proc/1/mounts").stdout
        cmdline = podman("exec", proxy, "cat", "/proc/1/cmdline").stdout.split("\0")[:-1]
        time.sleep(0.5)  # the last decision is written as its connection ends
        logs = podman("logs", proxy)
        web_logs = podman("logs", web)
        yield Setting(
            web_ip=web_ip, proxy_ip=proxy_ip, host_ip=host_ip, token=token, probes=_probes(agent_run.stdout),
            decisions=[orjson.loads(line) for line in logs.stdout.splitlines() if line.strip()],
            proxy_stderr=logs.stderr, web_requests=[ln for ln in web_logs.stderr.splitlines() if '"GET ' in ln],
            host_requests=list(seen),
            status=dict(ln.split(":\t", 1) for ln in status_text.splitlines() if ":\t" in ln),
            mounts=mounts, cmdline=cmdline)
    finally:
        for container in containers:  # one at a time: podman 4.3's rm -f stops at a name that is not there
            subprocess.run(["podman", "rm", "-f", "-t", "0", container], capture_output=True, timeout=120)
        for net in networks:
            subprocess.run(["podman", "network", "rm", "-f", net], capture_output=True, timeout=120)


def test_the_allowed_name_is_fetched_through_the_proxy(setting: Setting) -> None:
    allowed = setting.probes["allowed"]
    assert (allowed["exit"], allowed["status"]) == ("0", "200"), setting.probes
    assert allowed["body"].strip() == f"hello {setting.token}"
    # exactly one request reached the web server: the allowed one
    assert len(setting.web_requests) == 1 and "GET /hello.txt" in setting.web_requests[0], setting.web_requests


def test_a_name_not_allowed_is_refused_by_the_proxy(setting: Setting) -> None:
    for probe in ("refused", "raw_ip"):
        assert setting.probes[probe]["status"] == "403", (probe, setting.probes)


def test_the_agent_has_no_route_but_to_the_proxy(setting: Setting) -> None:
    assert "default" not in setting.probes["routes"]["body"], setting.probes["routes"]
    direct = setting.probes["direct"]  # the web server's own address, without the proxy
    assert direct["exit"] != "0" and direct["status"] == "000", direct
    assert setting.probes["route_web"]["exit"] != "0", setting.probes["route_web"]  # no route: not refused, unreachable
    assert "unreachable" in setting.probes["route_web"]["body"].lower(), setting.probes["route_web"]
    if setting.host_ip is None:
        pytest.skip("this host has no global IPv4 address")
    host = setting.probes["host"]  # a raw IP with a server behind it: this host's own address
    assert host["exit"] != "0" and host["status"] == "000", host
    assert "unreachable" in setting.probes["route_host"]["body"].lower(), setting.probes["route_host"]
    assert setting.host_requests == [], setting.host_requests


def test_each_request_is_one_egress_record_on_the_proxys_stdout(setting: Setting) -> None:
    assert "kodepipe-egress: serving 0.0.0.0:3128" in setting.proxy_stderr
    decisions = setting.decisions
    assert [schema.problems(d, strict=True) for d in decisions] == [[]] * len(decisions), decisions
    assert all(d["kind"] == "egress" for d in decisions)
    by_host = {(d["host"], d["decision"]) for d in decisions}
    # the three requests that reached the proxy, one decision each; the direct ones never did
    assert len(decisions) == 3, decisions
    assert by_host == {(ALLOWED, "allow"), (REFUSED, "deny"), (setting.web_ip, "deny")}, decisions
    refused = next(d for d in decisions if d["host"] == REFUSED)
    assert refused["reason"] == "not on the allowlist" and refused["port"] == WEB_PORT, refused
    allowed = next(d for d in decisions if d["host"] == ALLOWED)
    assert allowed["address"] == setting.web_ip and allowed["bytes_down"] > 0, allowed


def test_the_proxy_runs_unprivileged_on_a_read_only_root(setting: Setting) -> None:
    assert setting.cmdline == ["python3", "-m", "kodepipe.egress.serve", "--config", "/etc/kodepipe/egress.json"]
    status = setting.status
    assert status["Uid"].split() == ["65534"] * 4 and status["Gid"].split() == ["65534"] * 4, status
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[caps], 16) == 0, (caps, status[caps])
    assert status["NoNewPrivs"].strip() == "1"
    root = [line.split() for line in setting.mounts.splitlines() if line.split()[1:2] == ["/"]]
    assert root and "ro" in root[-1][3].split(","), setting.mounts
