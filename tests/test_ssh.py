"""kp-ssh against a real SSH server (paramiko, in a thread on 127.0.0.1) standing
in for a VM's sshd: command mode, records, host-key policy, retries, exit
statuses, the interactive shell on a pty, and --config."""

from __future__ import annotations

import os
import pty
import select
import shlex
import socket
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from kodepipe.vm import ssh
from kodepipe.vm.sshkeys import own_key
from tests.cli import invoke
from tests.conftest import BIN
from tests.fakevm import FakeVM, SSHServer, ed25519_key, ed25519_pem, make_vm, public_line, serve, wait_raw


@pytest.fixture
def server() -> Iterator[SSHServer]:
    yield from serve(own_key()[1].split()[1])


@pytest.fixture
def vm(server: SSHServer) -> Iterator[FakeVM]:
    """VM "s1", running, with the server as its sshd and its true host key in known_hosts."""
    made = make_vm("s1")
    made.set_ssh(server.port, server.host_key)
    yield made
    made.stop()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_runs_the_command_and_writes_vm_then_result_records(vm: FakeVM, server: SSHServer) -> None:
    result = invoke("kp-ssh", "s1", "--", "sh", "-c", "echo out; echo err >&2; printf 'it''s'")
    assert result.status == 0, result.stderr
    assert result.stderr == ""
    record, outcome = result.records
    assert record["kind"] == "vm" and record["name"] == "s1" and record["state"] == "running"
    assert outcome["kind"] == "result" and outcome["name"] == "s1" and outcome["vm_id"] == record["id"]
    assert outcome["command"] == ["sh", "-c", "echo out; echo err >&2; printf 'it''s'"]
    assert outcome["exit_status"] == 0
    assert outcome["stdout"] == "out\nits" and outcome["stderr"] == "err\n"
    assert isinstance(outcome["seconds"], float) and "error" not in outcome
    # the words are quoted for the remote shell, not re-split by it
    assert [shlex.split(c) for c in server.commands] == [outcome["command"]]


def test_a_failing_command_exits_1_with_an_error_on_its_result(vm: FakeVM) -> None:
    result = invoke("kp-ssh", "s1", "--", "sh", "-c", "echo no >&2; exit 3")
    assert result.status == 1
    record, outcome = result.records
    assert "error" not in record
    assert outcome["exit_status"] == 3 and outcome["stderr"] == "no\n"
    assert outcome["error"]["code"] == "exit_status"
    assert "exited with status 3" in result.stderr


def test_binary_output_keeps_its_exact_bytes_in_base64(vm: FakeVM) -> None:
    outcome = invoke("kp-ssh", "s1", "--", "printf", "\\377\\000ok").records[1]
    assert outcome["stdout"] == "\ufffd\x00ok"
    assert outcome["stdout_base64"] == "/wBvaw=="
    assert "stderr_base64" not in outcome


def test_records_from_stdin_are_refreshed_and_others_pass_through(vm: FakeVM, server: SSHServer) -> None:
    stale = {"kind": "vm", "name": "s1", "id": vm.meta["id"], "ssh": {"host": "127.0.0.1", "port": 1, "user": "kp"},
             "extra": [1, 2]}
    other = {"kind": "event", "n": 1}
    failed = {"kind": "vm", "name": "zz", "error": {"code": "x", "message": "earlier"}}
    stdin = b"\n".join(orjson.dumps(r) for r in (other, stale, failed))
    result = invoke("kp-ssh", "--", "true", input=stdin)
    assert result.status == 0, result.stderr
    passed, record, outcome, failed_out = result.records
    assert passed == other and failed_out == failed
    assert record["extra"] == [1, 2] and record["ssh"]["port"] == server.port  # the current endpoint, not port 1
    assert outcome["exit_status"] == 0


def test_a_record_for_a_re_created_vm_is_refused(vm: FakeVM, server: SSHServer) -> None:
    stale = {"kind": "vm", "name": "s1", "id": "000000000000"}
    result = invoke("kp-ssh", "--", "true", input=orjson.dumps(stale))
    assert result.status == 1
    assert result.records[0]["error"]["code"] == "stale_record"
    assert server.commands == []


def test_a_wrong_host_key_is_refused_as_a_mismatch(vm: FakeVM, server: SSHServer) -> None:
    impostor = ed25519_key()
    vm.set_ssh(server.port, impostor)  # known_hosts holds another key than the server's
    result = invoke("kp-ssh", "s1", "--", "touch", "/tmp/should-not-run")
    assert result.status == 1
    (record,) = result.records
    assert record["error"]["code"] == "host_key_mismatch"
    assert server.host_key.fingerprint in record["error"]["message"]
    assert impostor.fingerprint in record["error"]["message"]
    assert server.commands == []


def test_a_known_hosts_without_this_endpoint_is_refused_never_learned(vm: FakeVM, server: SSHServer) -> None:
    known = vm.folder / "known_hosts"
    known.write_text(f"[127.0.0.1]:1 {public_line(server.host_key)}\n")  # the key of an earlier boot's port
    result = invoke("kp-ssh", "s1", "--", "true")
    assert result.status == 1
    assert result.records[0]["error"]["code"] == "host_key_unknown"
    assert "kp-ip s1" in result.records[0]["error"]["message"]
    assert known.read_text() == f"[127.0.0.1]:1 {public_line(server.host_key)}\n"  # nothing added
    assert server.commands == []


def test_without_known_hosts_it_says_to_run_kp_ip_first(vm: FakeVM, server: SSHServer) -> None:
    vm.set_ssh(server.port, None)
    result = invoke("kp-ssh", "s1", "--", "true")
    assert result.status == 1
    error = result.records[0]["error"]
    assert error["code"] == "host_key_unknown" and "run kp-ip s1 first" in error["message"]
    assert server.commands == []


def test_a_key_the_vm_does_not_authorize_fails_without_retrying(vm: FakeVM, server: SSHServer,
                                                               tmp_path: Path) -> None:
    other = tmp_path / "id_other"
    other.write_bytes(ed25519_pem())
    result = invoke("kp-ssh", "--identity", str(other), "s1", "--", "true")
    assert result.status == 1
    assert result.records[0]["error"]["code"] == "auth_failed"
    assert server.auth_attempts == ["kp"]  # one attempt: the refusal was not retried


def test_a_stopped_vm_and_an_unknown_name_fail_in_band_and_the_rest_still_run(vm: FakeVM) -> None:
    stopped = make_vm("s2", running=False)
    try:
        result = invoke("kp-ssh", "nope", "s2", "s1", "--", "true")
    finally:
        stopped.stop()
    assert result.status == 1
    assert len(result.records) == 4, result.records
    nope, s2, s1, outcome = result.records
    assert nope["error"]["code"] == "not_found"
    assert s2["error"]["code"] == "not_running" and "kp-boot s2" in s2["error"]["message"]
    assert "error" not in s1 and outcome["exit_status"] == 0


def test_connection_refused_is_retried_until_the_timeout_then_75() -> None:
    made = make_vm("s1")
    try:
        made.set_ssh(free_port(), ed25519_key())
        started = time.monotonic()
        result = invoke("kp-ssh", "--timeout", "1", "s1", "--", "true")
    finally:
        made.stop()
    assert result.status == 75
    assert result.records[0]["error"]["code"] == "timeout"
    assert "did not accept a connection within 1 s" in result.records[0]["error"]["message"]
    assert time.monotonic() - started >= 1.0  # it kept trying until its (monotonic) deadline


def test_a_port_that_closes_before_the_banner_is_retried_quietly() -> None:
    """QEMU's user-mode network accepts the connection and then drops it while the guest's sshd is down."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted: list[int] = []

    def drop() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(1)
            conn.close()

    threading.Thread(target=drop, daemon=True).start()
    made = make_vm("s1")
    try:
        made.set_ssh(listener.getsockname()[1], ed25519_key())
        # in a process of its own: pytest's log capture would hide paramiko's tracebacks
        # long enough for a second attempt whatever the load (one attempt takes milliseconds)
        proc = subprocess.run([str(BIN / "kp-ssh"), "--timeout", "5", "s1", "--", "true"],
                              capture_output=True, text=True, timeout=60)
    finally:
        listener.close()
        made.stop()
    assert proc.returncode == 75
    assert len(accepted) >= 2  # retried
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "did not accept a connection within 5 s" in proc.stderr


def test_a_server_that_comes_up_late_is_reached(server: SSHServer) -> None:
    port = free_port()
    made = make_vm("s1")
    late = SSHServer(server.authorized, host_key=server.host_key)
    made.set_ssh(port, late.host_key)
    timer = threading.Timer(1.0, late.start, kwargs={"port": port})
    timer.start()
    try:
        result = invoke("kp-ssh", "--timeout", "120", "s1", "--", "echo", "late")
    finally:
        timer.join()
        late.close()
        made.stop()
    assert result.status == 0, result.stderr
    assert result.records[1]["stdout"] == "late\n"


def test_stream_copies_the_output_to_stderr_as_well(vm: FakeVM) -> None:
    result = invoke("kp-ssh", "--stream", "s1", "--", "sh", "-c", "echo one; echo two >&2")
    assert result.status == 0
    assert "one\n" in result.stderr and "two\n" in result.stderr
    assert result.records[1]["stdout"] == "one\n"


@pytest.mark.parametrize("args, message", [
    ((), "give a COMMAND after '--'"),
    (("s1",), "an interactive shell needs a terminal"),
    (("s1", "--"), "nothing after '--'"),
    (("--config", "s1", "--", "true"), "it takes no COMMAND"),
    (("../x", "--", "true"), "invalid name"),
])
def test_usage_errors_exit_2_before_doing_anything(args: tuple[str, ...], message: str) -> None:
    result = invoke("kp-ssh", *args, input=b"")
    assert result.status == 2
    assert message in result.stderr
    assert result.stdout == b""


# -- the interactive shell ------------------------------------------------------


def test_interactive_shell_on_a_pty_relays_and_exits_with_the_shell_status(vm: FakeVM, server: SSHServer) -> None:
    leader, follower = pty.openpty()
    _set_size(follower, 33, 101)
    before = termios.tcgetattr(follower)
    env = {**os.environ, "TERM": "vt220"}
    proc = subprocess.Popen([str(BIN / "kp-ssh"), "s1"], stdin=follower, stdout=follower, stderr=follower,
                            env=env, start_new_session=True)
    seen = _read_until(leader, b"fake shell ready")
    wait_raw(follower)
    os.write(leader, b"echo hi\r")
    seen += _read_until(leader, b"echo hi")
    _set_size(follower, 40, 120)
    os.kill(proc.pid, 28)  # SIGWINCH, as the terminal sends on a resize
    _wait(lambda: (120, 40) in server.sizes)
    os.write(leader, b"exit\r")
    seen += _read_until(leader, b"bye")
    assert proc.wait(timeout=60) == 3
    assert server.terms == ["vt220"] and server.sizes[0] == (101, 33)
    assert termios.tcgetattr(follower) == before  # the terminal left as it was found
    os.close(leader)
    os.close(follower)


def _set_size(fd: int, rows: int, cols: int) -> None:
    import fcntl
    import struct

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _read_until(fd: int, marker: bytes, timeout: float = 60.0) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while marker not in data:
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            raise AssertionError(f"no {marker!r} in {data!r}")
        data += os.read(fd, 4096)
    return data


def _wait(predicate: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# -- --config -------------------------------------------------------------------


def test_config_stanza_quotes_paths_and_escapes_percent() -> None:
    ep = ssh.Endpoint("proj", "abc", "127.0.0.1", 2222, "kp", Path("/st ate/vms/proj/known_hosts"))
    text = ssh.config_stanza(ep, Path("/home/u/100%/id_ed25519"))
    assert text.splitlines() == [
        "# proj: generated by kp-ssh --config; the endpoint changes when the VM reboots, so run it again then",
        "Host kp-proj",
        "    HostName 127.0.0.1",
        "    Port 2222",
        "    User kp",
        "    IdentityFile /home/u/100%%/id_ed25519",
        "    IdentitiesOnly yes",
        '    UserKnownHostsFile "/st ate/vms/proj/known_hosts"',
        "    StrictHostKeyChecking yes",
    ]


def test_config_lists_every_running_vm_with_an_endpoint(vm: FakeVM, server: SSHServer) -> None:
    stopped = make_vm("s2", running=False)
    unknown = make_vm("s3")
    unknown.set_ssh(free_port(), None)  # booted, kp-ip not run yet
    try:
        result = invoke("kp-ssh", "--config")
    finally:
        stopped.stop()
        unknown.stop()
    assert result.status == 0, result.stderr
    text = result.stdout.decode()
    assert "Host kp-s1\n" in text and "kp-s2" not in text and "kp-s3" not in text
    assert f"    Port {server.port}\n" in text
    assert f"    IdentityFile {own_key()[0]}\n" in text
    assert f"    UserKnownHostsFile {vm.folder / 'known_hosts'}\n" in text
    assert "s3: left out" in result.stderr


def test_config_for_named_vms_fails_for_one_without_an_endpoint(vm: FakeVM) -> None:
    stopped = make_vm("s2", running=False)
    try:
        result = invoke("kp-ssh", "--config", "s1", "s2")
    finally:
        stopped.stop()
    assert result.status == 1
    assert result.stdout.decode().count("Host ") == 1
    assert "s2 is not running" in result.stderr


def test_config_works_with_openssh(vm: FakeVM, server: SSHServer, tmp_path: Path) -> None:
    """The stanza is what the real ssh accepts: parse it with ssh -G."""
    if subprocess.run(["which", "ssh"], capture_output=True).returncode != 0:
        pytest.skip("no OpenSSH client")
    conf = tmp_path / "kodepipe.conf"
    conf.write_bytes(invoke("kp-ssh", "--config", "s1").stdout)
    shown = subprocess.run(["ssh", "-F", str(conf), "-G", "kp-s1"], capture_output=True, text=True, check=True)
    settings = dict(line.split(" ", 1) for line in shown.stdout.splitlines())
    assert settings["hostname"] == "127.0.0.1" and settings["port"] == str(server.port)
    assert settings["user"] == "kp" and settings["stricthostkeychecking"] == "true"
    assert settings["userknownhostsfile"] == str(vm.folder / "known_hosts")


def test_help_is_fast_and_does_not_load_paramiko() -> None:
    code = ("import sys; from kodepipe.commands import attach, cli, ssh\n"
            "for c in (ssh.cli, attach.cli):\n"
            "    try: c.main(['--help'], standalone_mode=False)\n"
            "    except SystemExit: pass\n"
            "assert 'paramiko' not in sys.modules, 'paramiko loaded'\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_each_vm_is_reached_with_its_own_key_and_only_the_states_path_of_it(tmp_path: Path) -> None:
    own = tmp_path / "ssh_key"
    own.write_text("key\n")
    record = {"name": "p", "id": "abc", "state": "running", "ssh": {"host": "127.0.0.1", "port": 2222, "user": "kp"},
              "known_hosts": str(tmp_path / "known_hosts"), "ssh_key": {"path": str(own), "fingerprint": "x"}}
    (tmp_path / "known_hosts").write_text("")
    ep = ssh.endpoint(record)
    assert ep.identity == own and ep.key_path() == own
    assert ep.key_path(Path("/chosen")) == Path("/chosen")  # kp-ssh --identity wins
    assert f"    IdentityFile {own}\n" in ssh.config([ep]) + "\n"
    # a key that is not there (a record from before clones had keys, a removed file): kodepipe's own
    missing = ssh.endpoint({**record, "ssh_key": {"path": str(tmp_path / "gone")}})
    assert missing.identity is None and missing.key_path() == own_key()[0]
