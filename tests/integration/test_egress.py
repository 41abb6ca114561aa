"""kp-run --allow on real Podman: the proxy is the container's only way out, by name,
and every decision is logged.  Only servers this test starts are ever targets."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests import httpd
from tests.conftest import BIN, lines
from tests.integration.test_run import one_podman_service  # noqa: F401 - the module's shared service

pytestmark = pytest.mark.integration



@pytest.fixture
def origin() -> Iterator[tuple[str, int]]:
    """An HTTP server on all the host's addresses; yields (non-loopback host address, port)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.connect(("10.255.255.255", 1))  # picks the outgoing address; sends nothing
    addr = probe.getsockname()[0]
    probe.close()
    with httpd.origin("0.0.0.0", "origin says") as port:  # noqa: S104 - reached at the host's address
        yield addr, port


PROBE = r"""
set -u
echo "HTTP: $(curl -sS --max-time 10 http://allowed.test:$PORT/plain)"
echo "CONNECT: $(curl -sS --max-time 10 --proxytunnel http://allowed.test:$PORT/tunnel)"
echo "DENIED: $(curl -sS --max-time 10 -o /dev/null -w '%{http_code}' http://denied.test:$PORT/)"
echo "RAWIP: $(curl -sS --max-time 10 -o /dev/null -w '%{http_code}' http://$HOSTIP:$PORT/)"
echo "META: $(curl -sS --max-time 10 -o /dev/null -w '%{http_code}' --proxytunnel http://meta.test:$PORT/)"
echo "DIRECT: $(curl -sS --noproxy '*' --max-time 5 http://$HOSTIP:$PORT/ 2>&1)"
echo "DNS-ALLOWED: $(getent hosts allowed.test)"
echo "DNS-DENIED: $(getent hosts denied.test || echo refused)"
python3 - <<'EOF'
import os, socket, threading
port, ok = int(os.environ["PORT"]), []
def one(n):
    s = socket.create_connection(("127.0.0.1", 3128), timeout=60)
    s.sendall(b"GET http://allowed.test:%d/many%d HTTP/1.1\r\nHost: allowed.test\r\n\r\n" % (port, n))
    got = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    ok.append(got.endswith(b"origin says /many%d\n" % n))
threads = [threading.Thread(target=one, args=(n,)) for n in range(200)]
for t in threads: t.start()
for t in threads: t.join()
print("CONCURRENT:", sum(ok))
EOF"""


def test_the_proxy_is_the_only_way_out(shell_image: str, origin: tuple[str, int], tmp_path: Path,
                                       kp_env: dict[str, Path]) -> None:
    host_ip, port = origin
    env = {"PORT": str(port), "HOSTIP": host_ip}
    proc = subprocess.run(
        [str(BIN / "kp-run"), "--image", shell_image, "--allow", f"allowed.test:{port}",
         "--allow", f"meta.test:{port}", "--resolve", "allowed.test=127.0.0.1",
         "--resolve", "meta.test=169.254.169.254", "--pids", "1024",
         "-e", "PORT", "-e", "HOSTIP", "--", "bash", "-c", PROBE],
        capture_output=True, env={**os.environ, **env}, timeout=300)
    err = proc.stderr.decode()
    (record,) = lines(proc.stdout)
    assert record["exit_code"] == 0, err
    assert "HTTP: origin says /plain" in err
    assert "CONNECT: origin says /tunnel" in err
    assert "DENIED: 403" in err and "RAWIP: 403" in err
    assert "META: 000" in err or "META: 403" in err  # curl reports a refused CONNECT as 000 or 403
    assert "origin says" not in err.split("DIRECT:")[1].split("\n")[0]  # no route around the proxy
    assert "DNS-ALLOWED: 127.0.0.1" in err and "DNS-DENIED: refused" in err
    assert "CONCURRENT: 200" in err, err[-4000:]
    assert record["network"] == "proxy" and f"allow:allowed.test:{port}" in record["loosened"]
    log = [orjson.loads(line) for line in Path(record["egress_log"]).read_bytes().splitlines()]
    by = {(d["decision"], d.get("method"), d.get("host")) for d in log}
    assert ("allow", "GET", "allowed.test") in by and ("allow", "CONNECT", "allowed.test") in by
    assert ("deny", "GET", "denied.test") in by and ("deny", "GET", host_ip) in by
    assert ("deny", "CONNECT", "meta.test") in by and ("deny", "DNS", "denied.test") in by
    assert sum(1 for d in log if d.get("decision") == "allow" and d.get("method") == "GET") >= 201
    assert record["egress"]["deny"] >= 4
    # the log is outside the container's reach: in the run's own folder in the state dir
    assert Path(record["egress_log"]).is_relative_to(kp_env["state"])
    # kp-trace reads the same log from the record: decisions as records, or counted per host
    summary = lines(subprocess.run([str(BIN / "kp-trace"), "--summary"], input=proc.stdout,
                                   capture_output=True, check=True).stdout)
    items = {(s["decision"], s["dns"], s["host"]): s["count"] for s in summary if s.get("item") == "egress"}
    assert items[("allow", False, "allowed.test")] >= 202 and items[("deny", True, "denied.test")] >= 1
    subprocess.run([str(BIN / "kp-rm"), record["name"]], check=True, capture_output=True)


def test_without_allow_there_is_no_proxy_and_no_network(shell_image: str, origin: tuple[str, int]) -> None:
    host_ip, port = origin
    proc = subprocess.run([str(BIN / "kp-run"), "--image", shell_image, "--", "bash", "-c",
                           f"curl -sS --max-time 5 -x http://127.0.0.1:3128 http://x.test/ 2>&1; "
                           f"curl -sS --max-time 5 http://{host_ip}:{port}/ 2>&1; env | grep -ci proxy"],
                          capture_output=True, timeout=120)
    err = proc.stderr.decode()
    assert "origin says" not in err and err.count("Failed to connect") == 2
    (record,) = lines(proc.stdout)
    assert "egress_log" not in record and record["network"] == "none"


def test_the_proxy_refuses_everyone_but_its_sandbox(shell_image: str, origin: tuple[str, int]) -> None:
    """While a sandbox with --allow runs, its proxy is not reachable from the host or another container."""
    host_ip, port = origin
    holder = subprocess.Popen([str(BIN / "kp-run"), "--image", shell_image, "--name", "holder",
                               "--allow", f"allowed.test:{port}", "--resolve", "allowed.test=127.0.0.1",
                               "--", "sleep", "20"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        threading.Event().wait(5)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", 3128), timeout=2).close()
        proc = subprocess.run([str(BIN / "kp-run"), "--image", shell_image, "--net", "open", "--", "bash", "-c",
                               f"curl -sS --max-time 5 -x http://{host_ip}:3128 http://allowed.test:{port}/ 2>&1"],
                              capture_output=True, timeout=120)
        assert "origin says" not in proc.stderr.decode()
    finally:
        holder.terminate()
        holder.communicate(timeout=60)
        subprocess.run([str(BIN / "kp-rm"), "holder"], capture_output=True)


def test_it_fails_closed_when_the_proxy_dies(shell_image: str, origin: tuple[str, int],
                                             kp_env: dict[str, Path]) -> None:
    """SIGKILL the kp-run that serves the proxy: the container lives on, with no way out at all."""
    _, port = origin
    folder = kp_env["state"] / "containers" / "failclosed"
    holder = subprocess.Popen([str(BIN / "kp-run"), "--image", shell_image, "--name", "failclosed",
                               "--allow", f"allowed.test:{port}", "--resolve", "allowed.test=127.0.0.1",
                               "--", "sleep", "120"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(400):
            state = subprocess.run(["podman", "inspect", "-f", "{{.State.Status}}", "failclosed"],
                                   capture_output=True, text=True)
            if state.stdout.strip() == "running":
                break
            threading.Event().wait(0.05)
        probe = ["podman", "exec", "failclosed", "curl", "-sS", "--max-time", "5", f"http://allowed.test:{port}/x"]
        before = subprocess.run(probe, capture_output=True, text=True, timeout=60)
        assert "origin says /x" in before.stdout, before.stderr
        holder.kill()
        holder.wait()
        after = subprocess.run(probe, capture_output=True, text=True, timeout=60)
        assert "origin says" not in after.stdout and "Failed to connect" in after.stderr
        direct = subprocess.run(["podman", "exec", "failclosed", "ip", "-o", "link"], capture_output=True,
                                text=True, timeout=60)
        assert len(direct.stdout.splitlines()) == 1  # still lo only
    finally:
        holder.kill()
        subprocess.run([str(BIN / "kp-rm"), "failclosed"], capture_output=True)
    assert not folder.exists()
