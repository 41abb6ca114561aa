"""kp-run inside a VM without a VM: the remote commands it builds, what it makes of the guest's
answers, and the order of things, against a scripted stand-in for the guest."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from kodepipe.container import hostrun as launch
from kodepipe.container import sandbox, vmrun
from kodepipe.container.policy import Policy
from kodepipe.core import proc
from kodepipe.core.errors import BadInput, KpError
from kodepipe.egress.policy import RESOLV_CONF
from kodepipe.vm.hop import Outcome
from tests import policies
from tests.cli import invoke

LIMITS = sandbox.Limits(memory=512 << 20, cpus=1, pids=64, seconds=60, tmpfs=64 << 20)
VM = {"kind": "vm", "name": "vm-a", "id": "0123456789ab", "state": "running", "share": "/home/u/proj"}
FACTS = {"podman": "/usr/bin/podman", "runc": "", "zstd": "/usr/bin/zstd", "uid": "1000", "gid": "1000",
         "home": "/home/kp", "sudo": "yes", "image_status": "0", "image": "a1b2c3", "ws_real": "/workspace",
         "ws_stat": "1000 1000 directory", "strace": "/usr/bin/strace"}
SECCOMP = orjson.dumps({"defaultAction": "SCMP_ACT_ERRNO",
                        "syscalls": [{"names": ["read", "unshare"], "action": "SCMP_ACT_ALLOW"}]})


@pytest.fixture(autouse=True)
def _host_images(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vmrun, "host_image_id", lambda tag: None)  # not the host's real store


def request(**kw: Any) -> Policy:
    args: dict[str, Any] = {"command": ["bash", "-c", "echo hi"], "image": "localhost/kodepipe-shell:1",
                            "limits": LIMITS}
    args.update(kw)
    return policies.policy(**args)


def probe(facts: dict[str, str]) -> bytes:
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in facts.items())


# -- the pure parts ------------------------------------------------------------------------------


def test_probe_answers_may_hold_newlines_and_equals_signs() -> None:
    facts = vmrun.parse_probe(b"podman=/usr/bin/podman\0ws_real=/w/a=b\nc\0junk\0uid=1000\0")
    assert facts == {"podman": "/usr/bin/podman", "ws_real": "/w/a=b\nc", "uid": "1000"}


def test_the_probe_script_answers_in_a_real_shell(tmp_path: Path) -> None:
    (tmp_path / "ws").mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for program in ("sh", "id", "realpath", "stat"):  # and no podman: the image is not even asked about
        (bin_dir / program).symlink_to(subprocess.run(["sh", "-c", f"command -v {program}"], capture_output=True,
                                                      text=True, check=True).stdout.strip())
    script = vmrun._script(vmrun.PROBE, str(tmp_path / "ws" / ".." / "ws"), "localhost/x:1")
    out = subprocess.run(["/bin/sh", "-c", script], capture_output=True, env={"PATH": str(bin_dir), "HOME": "/h"})
    facts = vmrun.parse_probe(out.stdout)
    assert facts["ws_real"] == str(tmp_path / "ws") and facts["ws_stat"].endswith(" directory")
    assert facts["uid"] == str(os.getuid()) and facts["home"] == "/h" and "image" not in facts


@pytest.mark.parametrize(("workspace", "share", "expected"), [
    (None, "/host/proj", "/workspace"),
    (None, None, None),
    (Path("/home/kp/proj"), None, "/home/kp/proj"),
    (Path("/srv/x/"), "/host/proj", "/srv/x"),
])
def test_the_guest_workspace_is_the_one_asked_for_else_the_share(workspace: Path | None, share: str | None,
                                                                  expected: str | None) -> None:
    assert vmrun.guest_workspace({**VM, "share": share}, request(workspace=workspace)) == expected


def test_a_relative_guest_workspace_is_refused() -> None:
    with pytest.raises(BadInput, match="must be absolute"):
        vmrun.guest_workspace(VM, request(workspace=Path("proj")))


@pytest.mark.parametrize(("real", "stat", "message"), [
    (None, None, "does not exist in vm-a; kp-ip vm-a mounts"),
    ("/workspace", "1000 1000 regular file", "not a directory"),
    ("/", "0 0 directory", "cannot be /"),
    ("/root", "0 0 directory", "home directory /root"),
    ("/home/kp", "1000 1000 directory", "home directory /home/kp"),
    ("/home", "0 0 directory", "contains the home directory /home/kp"),
])
def test_workspaces_that_expose_too_much_are_refused(real: str | None, stat: str | None, message: str) -> None:
    facts = {"home": "/home/kp", **({"ws_real": real} if real else {}), **({"ws_stat": stat} if stat else {})}
    with pytest.raises(BadInput) as caught:
        vmrun.check_workspace("/workspace", facts, "vm-a")
    assert message in caught.value.message


def test_a_project_folder_is_accepted_with_its_owner() -> None:
    facts = {"home": "/home/kp", "ws_real": "/home/kp/proj", "ws_stat": "1001 1002 directory"}
    assert vmrun.check_workspace("/home/kp/proj", facts, "vm-a") == ("/home/kp/proj", 1001, 1002)


@pytest.mark.parametrize(("owner", "user", "expected"), [
    ((1234, 1235), (1000, 1000), (1234, 1235, "workspace-owner")),
    ((1234, 0), (1000, 1000), (1234, 1234, "workspace-owner")),
    ((0, 0), (1000, 1001), (1000, 1001, "ssh-user")),
    (None, (1000, 1001), (1000, 1001, "ssh-user")),
    ((0, 0), (0, 0), (sandbox.FALLBACK_HOST_UID, sandbox.FALLBACK_HOST_UID, "nobody")),
])
def test_the_agent_is_the_workspace_owner_else_the_ssh_user_never_root(
        owner: tuple[int, int] | None, user: tuple[int, int], expected: tuple[int, int, str]) -> None:
    assert vmrun.agent_ids(owner, user) == expected


def test_find_arguments_for_masks() -> None:
    argv = vmrun.find_argv([".env", ".env.*", "config/secret.yml", "/top.key"])
    text = shlex.join(argv)
    assert argv[:3] == ["find", ".", "-type"] and "-prune" not in argv  # masks look everywhere
    assert ("-type f '(' -name .env -o -name '.env.*' -o -path ./config/secret.yml -o -path ./top.key ')' "
            "-printf 'M%P\\0'") in text
    assert vmrun.find_argv([]).count("-printf") == 1  # credentials only


def test_find_in_a_real_tree_agrees_with_the_host_scan(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    for rel in (".env", "sub/.env.local", "sub/deeper/.env.x", ".git/.env", "node_modules/m/.env",
                "config/secret.yml", "other/config/secret.yml", "id_rsa", "keys/server.pem", "main.py",
                "odd name/.env", "new\nline/.env"):
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / rel).write_text("x")
    (ws / "linked").mkdir()
    (ws / "linked" / ".env").symlink_to(ws / "main.py")  # a symlink is never bound over: it would be followed
    masks = [".env", ".env.*", "config/secret.yml"]
    out = subprocess.run(["sh", "-c", f"cd {shlex.quote(str(ws))} && {shlex.join(vmrun.find_argv(masks))}"],
                         capture_output=True, check=True).stdout
    masked, credentials = vmrun.parse_found(out)
    assert masked == sorted(sandbox.scan(ws, masks)[0])
    assert credentials == sorted(sandbox.scan(ws, masks)[1]) == ["id_rsa", "keys/server.pem"]
    assert ".env" in masked and "new\nline/.env" in masked and "config/secret.yml" in masked
    assert "other/config/secret.yml" not in masked
    assert ".git/.env" in masked and "node_modules/m/.env" in masked  # nothing is pruned for masks
    assert "linked/.env" not in masked


def box(**kw: Any) -> sandbox.Sandbox:
    """The container render() makes of a policy and a guest's facts with these settings."""
    args: dict[str, Any] = {"image": "localhost/x:1", "workspace": "/workspace", "host_uid": 1000,
                            "host_gid": 1000, "limits": LIMITS, "seccomp": "/run/kodepipe/s.json", "oci_runtime": None}
    args.update(kw)
    made: sandbox.Sandbox = policies.sandbox(**args)
    return made


FAKE_SUDO = r"""#!/bin/sh
# a stand-in for the guest's sudo: logs each command line (NUL-separated words, one per line), answers
# podman create with an id and podman inspect with a pid, and fails where the test says
printf '%s\0' "$@" >> "$KP_LOG"; echo >> "$KP_LOG"
for word in "$@"; do
    case "$word" in create) echo 0123abcd; exit "${KP_CREATE:-0}";; init) exit "${KP_INIT:-0}";;
                    inspect) echo "${KP_PID-4242}"; exit 0;; esac
done
"""


def in_shell(command: str, tmp_path: Path, **env: str) -> tuple[Outcome, list[list[str]]]:
    """``command`` run by a real sh with a fake sudo: its outcome, and each sudo command line's words."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "sudo").write_text(FAKE_SUDO)
    (bin_dir / "sudo").chmod(0o755)
    log = tmp_path / "sudo.log"
    log.write_bytes(b"")
    done = subprocess.run(["sh", "-c", command], capture_output=True,
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin", "KP_LOG": str(log), **env})
    calls = [[w.decode() for w in line.split(b"\0")[:-1]] for line in log.read_bytes().split(b"\n") if line]
    return Outcome(done.returncode, done.stdout, done.stderr), calls


def test_create_init_and_the_pid_are_one_command_with_every_word_quoted(tmp_path: Path) -> None:
    hostile = box(command=["sh", "-c", "echo $(id) `x`; rm -rf / &) && echo pwned"], env={"TOKEN": "a'b\"c $HOME"},
                  limits=sandbox.Limits(memory=512 << 20, cpus=1, pids=64, seconds=0, tmpfs=64 << 20))
    outcome, calls = in_shell(vmrun.create_command(hostile, "/run/kodepipe/hooks-x"), tmp_path)
    assert calls == [["-n", "podman", "--hooks-dir", "/run/kodepipe/hooks-x", "create", *hostile.podman_args()],
                     ["-n", "podman", "--hooks-dir", "/run/kodepipe/hooks-x", "init", "--", hostile.name],
                     ["-n", "podman", "inspect", "--format", "{{.State.Pid}}", "--", hostile.name]]
    assert vmrun.parse_created(outcome, "vm-a") == vmrun.Created("0123abcd", 4242)
    assert "--rm" in calls[0] and "--runtime" not in calls[0]  # crun, the guest's default, unless runc is there
    assert "--timeout" not in calls[0]
    _, (words, *_) = in_shell(vmrun.create_command(box(oci_runtime="runc")), tmp_path)
    assert words[:3] == ["-n", "podman", "create"]  # no hooks asked for
    assert words[words.index("--runtime") + 1] == "runc" and words[words.index("--timeout") + 1] == "120"
    assert shlex.split(vmrun.start_command("run-x", "/h")) == ["sudo", "-n", "podman", "--hooks-dir", "/h", "start",
                                                               "--attach", "--", "run-x"]
    with pytest.raises(BadInput, match="invalid image"):
        vmrun.create_command(box(image="--privileged"))


@pytest.mark.parametrize(("env", "calls", "message"), [
    ({"KP_CREATE": "125"}, 1, "could not create the container: status 125"),
    ({"KP_INIT": "126"}, 2, "could not create the container: status 126"),
    ({"KP_PID": "0"}, 3, "did not say which process the container's is ('0')"),
    ({"KP_PID": ""}, 3, "did not say which process"),
])
def test_the_first_failing_step_stops_the_command_and_says_so(tmp_path: Path, env: dict[str, str], calls: int,
                                                              message: str) -> None:
    outcome, made = in_shell(vmrun.create_command(box()), tmp_path, **env)
    assert len(made) == calls
    with pytest.raises(KpError, match=re.escape(message)) as caught:
        vmrun.parse_created(outcome, "vm-a")
    assert caught.value.code == "podman"
    said = Outcome(125, b"", b"time=x\nError: creating container storage: no space left\n")
    with pytest.raises(KpError, match="could not create the container: creating container storage: no space"):
        vmrun.parse_created(said, "vm-a")


def test_a_path_podman_mount_would_misread_is_refused() -> None:
    vmrun.check_mounts(box(masks=[".env", "a b/.env"], mask_file="/run/kodepipe/r/empty"))
    with pytest.raises(BadInput, match="comma"):
        vmrun.check_mounts(box(masks=[".env.x,source=/etc/shadow"], mask_file="/run/kodepipe/r/empty"))
    with pytest.raises(BadInput, match="comma"):
        vmrun.check_mounts(box(workspace="/srv/a,b"))


@pytest.mark.parametrize(("status", "stderr", "expected"), [
    (125, b"Error: short-name resolution failed\n", "short-name resolution failed"),
    (126, b"time=x level=error msg=y\nError: mounting storage: permission denied\n",
     "mounting storage: permission denied"),
    (127, b"bash: nope: command not found\n", None),
    (125, b"Error: the command's own\nand then more\n", None),
    (0, b"Error: x\n", None),
    (3, b"", None),
])
def test_podmans_own_failures_are_told_from_the_commands(status: int, stderr: bytes, expected: str | None) -> None:
    assert vmrun.podman_failure(status, stderr) == expected


def test_the_seccomp_path_names_its_content() -> None:
    assert vmrun.seccomp_path(b"a") != vmrun.seccomp_path(b"b")
    assert vmrun.seccomp_path(b"a").startswith("/run/kodepipe/seccomp-")


# -- one run, against a scripted guest --------------------------------------------------------------


class FakeChannel:
    """An SSH channel's host end, on a socketpair."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.closed = False

    def recv(self, n: int) -> bytes:
        return self.sock.recv(n)

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def shutdown_write(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def recv_stderr_ready(self) -> bool:
        return False

    def recv_stderr(self, n: int) -> bytes:
        return b""

    def close(self) -> None:
        self.closed = True
        self.sock.close()


class FakeGuest:
    """Answers the commands vmrun sends, and remembers them."""

    def __init__(self, facts: dict[str, str] | None = None, found: bytes = b"M.env\0", setid: bytes = b"",
                 stream: Callable[[FakeGuest, str, Callable[[bytes], None]], tuple[int, bytes]] | None = None) -> None:
        self.facts = {**FACTS, **(facts or {})}
        self.found = found
        self.setid = [setid]  # find -perm /6000's answers in turn (before the run, after it); the last one stays
        self.commands: list[tuple[str, bytes]] = []
        self.killed = threading.Event()
        self.closed = False
        self.channels: list[FakeChannel] = []
        self._stream = stream
        self.inspects: list[bytes] = []  # the answers to a second "podman image inspect", in turn

    def run(self, command: str, *, input: bytes = b"", timeout: float | None = 60) -> Outcome:
        return self.send(command, [input] if input else [], timeout=timeout)

    def send(self, command: str, chunks: Iterable[bytes], *, timeout: float | None = 60) -> Outcome:
        self.commands.append((command, b"".join(chunks)))
        if "say()" in command:
            return Outcome(0, probe(self.facts), b"")
        if "image inspect" in command:
            return Outcome(0, self.inspects.pop(0), b"")
        if "-perm /6000" in command:
            return Outcome(0, self.setid.pop(0) if len(self.setid) > 1 else self.setid[0], b"")
        if " find . " in command:
            return Outcome(0, self.found, b"")
        if command.startswith("cat "):
            return Outcome(0, SECCOMP, b"")
        if " create --rm " in command:
            return Outcome(0, b"id=0123abcd\0pid=4242\0", b"")
        if "podman kill" in command:
            self.killed.set()
        return Outcome(0, b"", b"")

    def stream(self, command: str, sink: Callable[[bytes], None]) -> tuple[int, bytes]:
        self.commands.append((command, b""))
        if self._stream is not None:
            return self._stream(self, command, sink)
        sink(b"hello from the container\n")
        return 3, b""

    def open(self, command: str) -> FakeChannel:
        """A channel of its own (the egress relay's): ``relay`` plays the guest's end."""
        self.commands.append((command, b""))
        ours, theirs = socket.socketpair()
        channel = FakeChannel(ours)
        self.channels.append(channel)
        threading.Thread(target=self.relay, args=(theirs,), daemon=True).start()
        return channel

    def relay(self, sock: socket.socket) -> None:
        """relay.pl, scripted: listening, then one request for a name the policy refuses, then
        nothing until the host ends the session."""
        from kodepipe.egress.mux import Kind, encode

        request = b"GET http://denied.test/ HTTP/1.1\r\nHost: denied.test\r\n\r\n"
        with sock:
            sock.sendall(encode(Kind.READY, 0, b"127.0.0.1:3128/tcp 127.0.0.1:53/udp") + encode(Kind.OPEN, 1)
                         + encode(Kind.DATA, 1, request) + encode(Kind.EOF, 1))
            while sock.recv(65536):
                pass

    def close(self) -> None:
        self.closed = True

    def sent(self, fragment: str) -> list[tuple[str, bytes]]:
        return [(c, i) for c, i in self.commands if fragment in c]


def job(guest: FakeGuest, req: Policy | None = None, vm: dict[str, Any] | None = None
        ) -> tuple[vmrun.VmRun, list[bytes], list[tuple[str, str]]]:
    output: list[bytes] = []
    said: list[tuple[str, str]] = []
    run = vmrun.VmRun(vm or VM, req or request(), lambda level, message: said.append((level, message)),
                      remote=lambda _vm: guest, sink=output.append)  # type: ignore[arg-type, return-value]
    return run, output, said


def create_words(guest: FakeGuest) -> list[str]:
    """The words of the one ``podman create`` the guest was sent (create_command's first step)."""
    (command, _), = guest.sent(" create --rm ")
    return shlex.split(command[len("id=$("):command.index(") && ")])


def staged(guest: FakeGuest) -> tuple[list[str], dict[str, tuple[bytes, int, int, int]]]:
    """The one stage command's arguments after ``sh -c STAGE kp-run`` (GUEST_DIR, the overlay run dir, the
    profile's path, the hooks dir, the run's folder), and its tar's files: name -> (data, mode, uid, gid)."""
    import io
    import tarfile

    (command, data), = guest.sent("idmapped-lower-dir-false")
    words = shlex.split(command)
    assert words[:5] == ["sudo", "-n", "sh", "-c", vmrun.STAGE] and words[5] == "kp-run"
    files = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            assert member.isfile() and "/" not in member.name, member.name
            got = tar.extractfile(member)
            assert got is not None
            files[member.name] = (got.read(), member.mode, member.uid, member.gid)
    return words[6:], files


def steps(guest: FakeGuest) -> list[str]:
    """What each command sent to the guest did, in order, by a word that names it."""
    names = [("say()", "probe"), ("-perm /6000", "setid"), ("find -P", "git survey"), (" find . ", "masks"),
             ("cat --", "seccomp"), ("idmapped-lower-dir-false", "stage"),
             (" create --rm ", "create+init+pid"), ("nsenter", "relay"),
             ("start --attach", "start"), ("podman rm", "remove"), ("podman kill", "kill"), ("rm -rf", "clean")]
    return [next((name for fragment, name in names if fragment in command), command) for command, _ in
            guest.commands]


def test_a_run_in_the_guest_reports_like_one_on_the_host(kp_env: dict[str, Path]) -> None:
    guest = FakeGuest()
    run, output, _ = job(guest)
    record, status = vmrun._run(run)
    assert status == 3 and output == [b"hello from the container\n"]
    assert record["kind"] == "container" and record["host"] == "vm-a" and record["vm_id"] == "0123456789ab"
    assert record["exit_code"] == 3 and record["outcome"] == "exited" and record["container_removed"] is True
    assert record["workspace"] == "/workspace" and record["workspace_mode"] == "rw" and record["masked"] == [".env"]
    assert record["user"] == {"agent_uid": 1000, "host_uid": 1000, "host_gid": 1000, "from": "workspace-owner"}
    assert record["network"] == "none" and record["loosened"] == [] and record["timed_out"] is False
    for key in ("name", "id", "image", "profile", "command", "limits", "secrets", "env", "started", "finished"):
        assert key in record
    assert record["container_id"] == "0123abcd" and "pid" not in record and "boot_id" not in record
    assert "image_transfer" not in record and guest.closed
    # nothing to look at afterwards: its folder in the host's store is gone too
    assert record["removed"] is True and "path" not in record
    assert not (kp_env["state"] / "containers" / record["name"]).exists()
    # the container: made, initialised and its pid learned in one command, started and streamed in a second;
    # it went by itself (--rm), the workspace was surveyed again, then the run's folder in the guest removed
    assert steps(guest) == ["probe", "masks", "git survey", "setid", "seccomp", "stage", "create+init+pid", "start",
                            "setid", "git survey", "clean"]
    folder = f"/run/kodepipe/{record['name']}-{record['id']}"
    assert guest.commands[-1][0] == f"sudo -n rm -rf -- {folder}"
    start, _ = guest.commands[-4]
    assert shlex.split(start)[-4:] == ["start", "--attach", "--", record["name"]]
    words = create_words(guest)
    assert words[:3] == ["sudo", "-n", "podman"] and words[5] == "create"
    assert words[words.index("--name") + 1] == record["name"]
    # the kernel quotas of its user namespace, set by an OCI hook before the agent runs
    args, files = staged(guest)
    assert args[4] == folder and args[0] == "/run/kodepipe"
    hook, mode, _, _ = files[vmrun.STAGED_HOOK]
    assert words[3:5] == ["--hooks-dir", args[3]] == shlex.split(start)[3:5] and mode == 0o644
    assert b"max_inotify_instances" in hook and b'"prestart"' in hook
    seccomp_path = next(w.split("=", 1)[1] for w in words if w.startswith("seccomp="))
    profile = files[vmrun.STAGED_SECCOMP][0]
    assert seccomp_path == args[2] and b'"unshare"' in profile and b'"clone3"' in profile
    assert files["empty"] == (b"", 0o444, 0, 0)
    assert f"type=bind,source={folder}/empty,destination=/workspace/.env,ro" in words
    assert "type=bind,source=/workspace,destination=/workspace" in words


def test_without_a_share_or_workspace_there_is_nothing_to_mask_and_the_folder_holds_kodepipes_files() -> None:
    guest = FakeGuest(facts={"ws_real": "", "ws_stat": ""})
    run, _, _ = job(guest, vm={**VM, "share": None})
    record, _ = vmrun._run(run)
    assert record["workspace"] is None and record["workspace_mode"] is None and record["masked"] == []
    assert record["user"]["from"] == "ssh-user" and "setuid_files" not in record
    assert not guest.sent(" find . ") and not guest.sent("-perm /6000")
    assert steps(guest) == ["probe", "seccomp", "stage", "create+init+pid", "start",
                            "clean"]  # /etc/hosts and the environment, in a folder removed afterwards
    assert {"hosts", "env"} <= set(staged(guest)[1])
    assert "-w /tmp/home" in guest.sent(" create --rm ")[0][0]


def test_credentials_in_the_workspace_are_warned_about() -> None:
    guest = FakeGuest(found=b"M.env\0Cid_rsa\0Ckeys/a.pem\0")
    run, _, said = job(guest)
    vmrun._run(run)
    assert ("warn", "the workspace holds files that look like credentials, and the agent can read them: "
                    "id_rsa, keys/a.pem (hide them with --mask GLOB)") in said


def test_secrets_are_copied_for_the_agent_alone_and_bound_read_only(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_bytes(b"s3cret")
    guest = FakeGuest(facts={"ws_stat": "1234 1235 directory"})
    run, _, _ = job(guest, request(secrets=[(secret, "/run/secrets/token")]))
    record, _ = vmrun._run(run)
    folder = f"/run/kodepipe/{record['name']}-{record['id']}"
    args, files = staged(guest)
    assert args[4] == folder and files["0-token"] == (b"s3cret", 0o400, 1234, 1235)
    assert f"type=bind,source={folder}/0-token,destination=/run/secrets/token,ro" in create_words(guest)
    assert record["secrets"] == ["/run/secrets/token"] and "secret:/run/secrets/token" in record["loosened"]
    assert guest.commands[-1][0] == f"sudo -n rm -rf -- {folder}"


def test_a_guest_without_podman_says_how_to_get_it() -> None:
    guest = FakeGuest(facts={"podman": ""})
    run, _, _ = job(guest)
    with pytest.raises(KpError) as caught:
        vmrun._run(run)
    assert caught.value.code == "no_podman" and "kp-image build NAME" in caught.value.message
    assert "--packages podman" in caught.value.message
    assert caught.value.record["outcome"] == "failed"
    assert not guest.sent(" create --rm ")


def test_a_guest_without_passwordless_sudo_is_refused_before_anything_else() -> None:
    guest = FakeGuest(facts={"sudo": "no"})
    run, _, _ = job(guest)
    with pytest.raises(KpError) as caught:
        vmrun._run(run)
    assert caught.value.code == "no_sudo" and len(guest.commands) == 1


def test_a_missing_image_is_streamed_in_from_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    from contextlib import contextmanager

    calls: list[tuple[str, bool]] = []

    @contextmanager
    def saved(tag: str, compress: bool) -> Iterator[tuple[Iterator[bytes], Callable[[], None]]]:
        calls.append((tag, compress))
        yield iter([b"a" * 10, b"b" * 5]), lambda: None

    monkeypatch.setattr(vmrun, "_saved_image", saved)
    monkeypatch.setattr(proc, "which", lambda program: f"/usr/bin/{program}")
    monkeypatch.setattr(vmrun, "host_image_id", lambda tag: "a1b2c3")
    guest = FakeGuest(facts={"image_status": "125", "image": "Error: inspecting object: x: image not known\n"})
    run, _, said = job(guest)
    record, _ = vmrun._run(run)
    assert calls == [("localhost/kodepipe-shell:1", True)]
    (command, data), = guest.sent("podman load")
    assert command == "zstd -d -q -c | sudo -n podman load" and data == b"a" * 10 + b"b" * 5
    assert record["image_transfer"]["bytes_sent"] == 15 and record["image_transfer"]["compressed"] is True
    assert any("lacks the image" in message for _, message in said)


@pytest.mark.parametrize(("host", "copied"), [("a1b2c3", False), (None, False), ("d4e5f6", True)])
def test_an_image_rebuilt_on_the_host_under_the_same_tag_is_copied_again(
        monkeypatch: pytest.MonkeyPatch, host: str | None, copied: bool) -> None:
    from contextlib import contextmanager

    @contextmanager
    def saved(tag: str, compress: bool) -> Iterator[tuple[Iterator[bytes], Callable[[], None]]]:
        yield iter([b"x"]), lambda: None

    monkeypatch.setattr(vmrun, "_saved_image", saved)
    monkeypatch.setattr(vmrun, "host_image_id", lambda tag: host)
    guest = FakeGuest()  # it has a1b2c3
    run, _, _ = job(guest)
    record, _ = vmrun._run(run)
    assert bool(guest.sent("podman load")) is copied and ("image_transfer" in record) is copied


def test_a_podman_that_fails_to_say_whether_it_has_the_image_is_asked_again_not_copied_to() -> None:
    """Seen under load: the probe's inspect failed (not "image not known") and the run copied the whole
    image in for nothing, minutes under TCG.  It is asked again; an answer is taken, a third failure is an
    error."""
    busy = {"image_status": "125", "image": "Error: locking the store: resource temporarily unavailable\n"}
    guest = FakeGuest(facts=busy)
    guest.inspects = [b"Error: still locked\nimage_status=125\n", b"WARN[0000] slow\na1b2c3\nimage_status=0\n"]
    run, _, _ = job(guest)
    record, _ = vmrun._run(run)
    assert not guest.sent("podman load") and "image_transfer" not in record and record["exit_code"] == 3
    assert len(guest.sent("image inspect")) == 3  # the probe's, and two more

    guest = FakeGuest(facts=busy)
    guest.inspects = [b"Error: still locked\nimage_status=125\n"] * 2
    run, _, _ = job(guest)
    with pytest.raises(KpError, match="could not say whether it has the image") as caught:
        vmrun._run(run)
    assert caught.value.code == "podman" and not guest.sent("podman load") and not guest.sent(" create ")


@pytest.mark.parametrize(("status", "said", "answer"), [
    ("0", "a1b2c3\n", "a1b2c3"), ("0", "WARN[0000] x\nd4e5f6\n", "d4e5f6"), ("0", "", None),
    ("125", "Error: inspecting object: localhost/x:1: image not known\n", ""),
    ("125", "Error: database is locked\n", None), ("1", "", None), ("", "", None)])
def test_the_probes_image_answer(status: str, said: str, answer: str | None) -> None:
    assert vmrun.image_answer(status, said) == answer


def test_podman_failing_to_start_it_is_an_error_not_an_exit_code() -> None:
    def failing(guest: FakeGuest, command: str, sink: Callable[[bytes], None]) -> tuple[int, bytes]:
        sink(b"Error: mounting storage: permission denied\n")
        return 126, b"Error: mounting storage: permission denied\n"

    run, _, _ = job(FakeGuest(stream=failing))
    with pytest.raises(KpError, match="could not run the container: mounting storage") as caught:
        vmrun._run(run)
    assert caught.value.record["outcome"] == "failed"


def test_the_time_limit_kills_it_over_a_second_channel() -> None:
    def slow(guest: FakeGuest, command: str, sink: Callable[[bytes], None]) -> tuple[int, bytes]:
        assert guest.killed.wait(10)
        return 137, b""

    guest = FakeGuest(stream=slow)
    run, _, said = job(guest, request(limits=sandbox.Limits(memory=512 << 20, cpus=1, pids=64, seconds=0.2,
                                                             tmpfs=64 << 20)))
    record, status = vmrun._run(run)
    assert status == 137 and record["timed_out"] is True and record["outcome"] == "timed-out"
    (kill, _), = guest.sent("podman kill")
    assert kill == f"sudo -n podman kill -- {record['name']}"
    assert "--timeout 60" in guest.sent(" create --rm ")[0][0]  # Podman's own backstop: the limit + 60 s
    assert any(level == "warn" and "time limit" in message for level, message in said)


def test_the_time_limit_keeps_trying_while_podman_is_still_preparing(monkeypatch: pytest.MonkeyPatch) -> None:
    tries: list[str] = []

    class Preparing(FakeGuest):
        def send(self, command: str, chunks: Iterable[bytes], *, timeout: float | None = 60) -> Outcome:
            if "podman kill" in command:
                tries.append(command)
                if len(tries) < 3:  # "can only kill running containers"
                    return Outcome(125, b"", b"Error: can only kill running containers")
            return super().send(command, chunks, timeout=timeout)

    def slow(guest: FakeGuest, command: str, sink: Callable[[bytes], None]) -> tuple[int, bytes]:
        assert guest.killed.wait(10)
        return 137, b""

    monkeypatch.setattr(vmrun, "KILL_RETRY", 0.01)
    run, _, _ = job(Preparing(stream=slow), request(limits=sandbox.Limits(memory=512 << 20, cpus=1, pids=64,
                                                                          seconds=0.1, tmpfs=64 << 20)))
    record, _ = vmrun._run(run)
    assert len(tries) == 3 and record["timed_out"] is True


def test_an_interruption_removes_the_container_and_carries_the_record(kp_env: dict[str, Path]) -> None:
    def interrupted(guest: FakeGuest, command: str, sink: Callable[[bytes], None]) -> tuple[int, bytes]:
        raise KeyboardInterrupt

    guest = FakeGuest(stream=interrupted)
    run, _, _ = job(guest)
    with pytest.raises(KeyboardInterrupt) as caught:
        vmrun._run(run)
    record = caught.value.record  # type: ignore[attr-defined]
    assert record["outcome"] == "interrupted" and record["exit_code"] is None
    assert record["container_removed"] is True and record["removed"] is True
    assert steps(guest)[-5:] == ["start", "remove", "setid", "git survey", "clean"] and guest.closed
    assert guest.commands[-4][0] == f"sudo -n podman rm -f -i -t 0 -- {record['name']} >/dev/null"
    assert not (kp_env["state"] / "containers" / record["name"]).exists()


FAILURES: list[tuple[str, str, list[str]]] = [
    # (the step that fails, how it ends, what is undone after it: nothing that was not made)
    ("probe", "failed", []),
    ("stage", "failed", ["clean"]),
    ("create+init+pid", "failed", ["remove", "clean"]),
    ("start", "failed", ["remove", "setid", "git survey", "clean"]),
    ("start-interrupted", "interrupted", ["remove", "setid", "git survey", "clean"]),
]


@pytest.mark.parametrize(("stage", "outcome", "undone"), FAILURES, ids=[f[0] for f in FAILURES])
def test_a_failure_at_each_stage_undoes_what_was_done_and_carries_the_record(
        stage: str, outcome: str, undone: list[str], kp_env: dict[str, Path]) -> None:
    """Whatever fails (or interrupts), the container is removed if it may exist, the run's folder in
    the guest if it was made, the connection closed, the host's folder of the run gone, and the error
    carries the record so far."""
    fragments = {"probe": "say()", "stage": "idmapped-lower-dir-false",
                 "create+init+pid": " create --rm "}

    class Failing(FakeGuest):
        def send(self, command: str, chunks: Iterable[bytes], *, timeout: float | None = 60) -> Outcome:
            if stage in fragments and fragments[stage] in command:
                self.commands.append((command, b""))
                return Outcome(1, b"", b"Error: it broke\n")
            return super().send(command, chunks, timeout=timeout)

        def stream(self, command: str, sink: Callable[[bytes], None]) -> tuple[int, bytes]:
            self.commands.append((command, b""))
            if stage == "start":
                return -1, b""  # the connection dropped: no exit status
            if stage == "start-interrupted":
                raise KeyboardInterrupt
            return 0, b""

    guest = Failing()
    run, _, _ = job(guest)
    with pytest.raises(BaseException) as caught:
        vmrun._run(run)
    record = caught.value.record  # type: ignore[attr-defined]
    assert record["outcome"] == outcome and record["exit_code"] is None and record["removed"] is True
    done = steps(guest)
    at = max(i for i, name in enumerate(done) if name in (stage, "start"))
    assert done[at + 1:] == undone, done
    assert ("container_removed" in record) is ("remove" in undone) and guest.closed
    assert not (kp_env["state"] / "containers" / record["name"]).exists()
    if isinstance(caught.value, KpError):
        assert caught.value.record is record


def test_a_container_that_could_not_be_removed_is_said_and_the_workspace_left_unchecked() -> None:
    class Stuck(FakeGuest):
        def send(self, command: str, chunks: Iterable[bytes], *, timeout: float | None = 60) -> Outcome:
            if "podman rm" in command:
                self.commands.append((command, b""))
                return Outcome(125, b"", b"Error: cannot remove: device busy\n")
            return super().send(command, chunks, timeout=timeout)

        def stream(self, command: str, sink: Callable[[bytes], None]) -> tuple[int, bytes]:
            raise KeyboardInterrupt

    guest = Stuck()
    run, _, said = job(guest)
    with pytest.raises(KeyboardInterrupt) as caught:
        vmrun._run(run)
    record = caught.value.record  # type: ignore[attr-defined]
    assert record["container_removed"] is False and "may still run" in record["git_problem"]
    assert steps(guest)[-2:] == ["remove", "clean"] and guest.closed  # no survey while it may run
    assert any(level == "warn" and "could not remove its container" in m for level, m in said)


def test_egress_goes_through_the_relay_to_the_hosts_proxy_and_the_log_stays_on_the_host(
        kp_env: dict[str, Path]) -> None:
    """--allow in a VM: after init, the relay is nsentered into the container's network namespace on a channel
    of its own, before the agent starts; the container gets kodepipe's resolv.conf and the proxy's address;
    every decision is logged in the run's folder on the host, which stays for kp-ls and kp-rm."""
    from kodepipe.container import folders
    from kodepipe.core.state import Store
    from kodepipe.egress import relay

    guest = FakeGuest()
    run, _, _ = job(guest, request(allow=["allowed.test:8080"], resolve=["allowed.test=127.0.0.1"]))
    record, status = vmrun._run(run)
    assert status == 3 and record["network"] == "proxy" and record["resolve"] == ["allowed.test=127.0.0.1"]
    assert steps(guest) == ["probe", "masks", "git survey", "setid", "seccomp", "stage", "create+init+pid", "relay",
                            "start", "setid", "git survey", "clean"]
    (relayed, _), = guest.sent("nsenter")
    assert relayed == relay.relay_command(4242)  # the pid create_command learned
    folder = f"/run/kodepipe/{record['name']}-{record['id']}"
    files = staged(guest)[1]
    assert files["resolv.conf"] == (RESOLV_CONF.encode(), 0o444, 0, 0)
    words = create_words(guest)
    assert f"type=bind,source={folder}/resolv.conf,destination=/etc/resolv.conf,ro" in words
    env = files["env"][0]
    assert b"HTTPS_PROXY=http://127.0.0.1:3128\n" in env and words[words.index("--network") + 1] == "none"
    # the decision (the scripted relay asked for a name the policy refuses), in the host's folder of the run
    host = kp_env["state"] / "containers" / record["name"]
    assert record["egress_log"] == str(host / "egress.jsonl") and record["path"] == str(host)
    (decision,) = [orjson.loads(line) for line in (host / "egress.jsonl").read_bytes().splitlines()]
    assert decision["decision"] == "deny" and decision["host"] == "denied.test"
    assert record["egress"] == {"allow": 0, "deny": 1, "error": 0}
    # the channel is closed: the relay in the guest reads EOF and exits (fail closed)
    (channel,) = guest.channels
    assert channel.closed
    listed = folders.view(Store(), record["name"])
    assert listed["state"] == "exited" and listed["host"] == "vm-a" and listed["egress_log"] == record["egress_log"]
    assert folders.remove(Store(), record["name"], expect_id=None, dry_run=False) is not None and not host.exists()


def test_a_relay_that_does_not_start_stops_the_run_before_the_agent(kp_env: dict[str, Path]) -> None:
    class Mute(FakeGuest):
        def relay(self, sock: socket.socket) -> None:
            sock.close()  # nsenter or perl failed: the channel ends at once

    guest = Mute()
    run, _, _ = job(guest, request(allow=["allowed.test"]))
    with pytest.raises(KpError, match="the egress relay did not start") as caught:
        vmrun._run(run)
    assert steps(guest)[-4:] == ["create+init+pid", "relay", "remove", "clean"]  # never started
    assert caught.value.record["container_removed"] is True and "started" not in caught.value.record
    assert guest.channels[0].closed


@pytest.mark.parametrize("removed", [True, False])
def test_kp_rm_of_a_vm_run_removes_what_it_left_in_the_guest(monkeypatch: pytest.MonkeyPatch, removed: bool) -> None:
    from kodepipe.container import folders
    from kodepipe.core.state import Store

    guest = FakeGuest()
    run, _, _ = job(guest, request(allow=["allowed.test"]))
    record, _ = vmrun._run(run)
    if not removed:  # as if its container could not be removed
        meta = Store().read_meta(Path(record["path"])) or {}
        Store().write_meta(Path(record["path"]), {**meta, "container_removed": False})
    connected: list[Any] = []
    after = FakeGuest()

    def connect(vm: Any) -> Any:
        connected.append(vm)
        return after

    monkeypatch.setattr(vmrun, "connect", connect)
    assert folders.remove(Store(), record["name"], expect_id=None, dry_run=False) is not None
    assert not Path(record["path"]).exists() and connected == [{"kind": "vm", "name": "vm-a", "id": "0123456789ab"}]
    (done, _), = after.commands
    folder = f"/var/lib/kodepipe/runs/{record['name']}-{record['id']}"
    assert done.endswith(f"sudo -n rm -rf -- {folder}")
    assert ("podman rm -f" in done) is not removed and after.closed
    # the container first, then a quarantine's overlay unmounted (never removed through), then the folder
    unmount = done.index(f"kp-rm {folder}/quarantine remove")
    assert "umount" in done[:unmount] and unmount < done.index(f"rm -rf -- {folder}")
    assert removed or done.index("podman rm -f") < unmount


def test_kp_rm_of_a_vm_run_whose_vm_does_not_answer_still_removes_its_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    from kodepipe.container import folders
    from kodepipe.core.state import Store

    run, _, _ = job(FakeGuest(), request(allow=["allowed.test"]))
    record, _ = vmrun._run(run)

    def gone(vm: Any) -> Any:
        raise KpError("vm-a is stopped", code="not_running")

    monkeypatch.setattr(vmrun, "connect", gone)
    assert folders.remove(Store(), record["name"], expect_id=None, dry_run=False) is not None
    assert not Path(record["path"]).exists()


# -- kp-run with vm records on stdin ------------------------------------------------------------------


def test_kp_run_runs_in_each_vm_record_and_passes_the_rest_through(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, Policy]] = []

    def fake(vm: dict[str, Any], req: Policy, say: Any) -> tuple[dict[str, Any], int]:
        seen.append((vm["name"], req))
        return {"kind": "container", "name": "run-x", "host": vm["name"], "exit_code": 0}, 0

    def host(*args: Any) -> None:
        raise AssertionError("ran on the host")

    monkeypatch.setattr(vmrun, "run_in_vm", fake)
    monkeypatch.setattr(launch, "run", host)
    lines = [{"kind": "image", "name": "base"}, {**VM, "name": "a"}, {**VM, "name": "b"}]
    result = invoke("kp-run", "--image", "localhost/x:1", "-w", "/srv/proj", "--", "make",
                    input=b"".join(orjson.dumps(r) + b"\n" for r in lines))
    assert result.status == 0, result.stderr
    assert [(r["kind"], r.get("host") or r["name"]) for r in result.records] == [
        ("image", "base"), ("vm", "a"), ("container", "a"), ("vm", "b"), ("container", "b")]
    assert [name for name, _ in seen] == ["a", "b"]
    assert seen[0][1].workspace == "/srv/proj" and seen[0][1].command == ("make",)


def test_kp_run_never_falls_back_to_the_host_for_a_failed_vm(monkeypatch: pytest.MonkeyPatch) -> None:
    def host(*args: Any) -> None:
        raise AssertionError("ran on the host")

    def failing(vm: dict[str, Any], req: Policy, say: Any) -> None:
        exc = KpError("no podman there", code="no_podman")
        exc.record = {"kind": "container", "name": "run-y", "host": vm["name"]}
        raise exc

    monkeypatch.setattr(launch, "run", host)
    monkeypatch.setattr(vmrun, "run_in_vm", failing)
    lines = [{**VM, "name": "a", "error": {"code": "timeout", "message": "x"}}, {**VM, "name": "b"}]
    result = invoke("kp-run", "--image", "localhost/x:1", "--", "true",
                    input=b"".join(orjson.dumps(r) + b"\n" for r in lines))
    assert result.status == 1
    records: list[Any] = result.records
    assert records[0]["name"] == "a" and records[0]["error"]["code"] == "timeout"
    assert records[1]["name"] == "b" and "error" not in records[1]
    assert records[2] == {"kind": "container", "name": "run-y", "host": "b",
                          "error": {"code": "no_podman", "message": "no podman there"}}
    assert "a: not run there" in result.stderr


def test_kp_run_without_vm_records_still_checks_the_host_workspace(tmp_path: Path) -> None:
    result = invoke("kp-run", "--image", "localhost/x:1", "-w", str(tmp_path / "missing"), "--", "true", input=b"")
    assert result.status == 2 and "does not exist" in result.stderr


# -- the same container as on the host: /etc/hosts (D7), the environment (D8), setuid files (D10) ------------


def test_the_container_gets_kodepipes_hosts_file_as_on_the_host() -> None:
    """Not the guest's names, nor Podman's host.containers.internal (the guest's address): the host's file,
    in the run's folder, bound read-only, and Podman told to make none (--no-hosts, the API's
    use_image_hosts)."""
    guest = FakeGuest()
    run, _, _ = job(guest, request(network="open"))
    record, _ = vmrun._run(run)
    folder = f"/run/kodepipe/{record['name']}-{record['id']}"
    content, mode, uid, _ = staged(guest)[1]["hosts"]
    assert content == sandbox.hosts_text(record["name"]).encode() and (mode, uid) == (0o444, 0)
    assert content == f"127.0.0.1\tlocalhost {record['name']}\n::1\tlocalhost ip6-localhost ip6-loopback\n".encode()
    words = create_words(guest)
    assert f"type=bind,source={folder}/hosts,destination=/etc/hosts,ro" in words and "--no-hosts" in words
    assert guest.commands[-1][0] == f"sudo -n rm -rf -- {folder}"
    # the renderer: --no-hosts exactly when kodepipe binds its own, as the host's spec says
    own = box(extra_mounts=[sandbox.Mount("/f/hosts", "/etc/hosts", True)])
    assert "--no-hosts" in own.podman_args() and own.spec()["use_image_hosts"] is True
    assert "--no-hosts" not in box().podman_args() and box().spec()["use_image_hosts"] is False


def test_env_values_never_reach_a_guest_command_line(tmp_path: Path) -> None:
    """-e NAME=VALUE inside a VM: the values go in an --env-file (root's, 0400, in the run's 0700 folder,
    removed with it) sent on the channel's stdin; no command line the guest sees (ps, sudo's log) has them."""
    value = "s3cr3t-v4lue 'quoted' $HOME"
    guest = FakeGuest()
    run, _, _ = job(guest, request(env={"TOKEN": value}, tty=False))
    record, _ = vmrun._run(run)
    assert record["env"] == ["TOKEN"] and "env:TOKEN" in record["loosened"]
    assert not [c for c, _ in guest.commands if "s3cr3t" in c]
    folder = f"/run/kodepipe/{record['name']}-{record['id']}"
    args, files = staged(guest)
    content, mode, uid, gid = files["env"]
    assert args[4] == folder and (mode, uid, gid) == (0o400, 0, 0)
    assert f"TOKEN={value}\n".encode() in content and b"HOME=/tmp/home\n" in content
    words = create_words(guest)
    assert words[words.index("--env-file") + 1] == f"{folder}/env" and "-e" not in words
    assert steps(guest).index("stage") < steps(guest).index("create+init+pid")
    assert guest.commands[-1][0] == f"sudo -n rm -rf -- {folder}"
    # the same words through a real shell and a fake sudo: the value is in no word it was given
    made = box(env={"TOKEN": value}, env_file=f"{folder}/env")
    _, calls = in_shell(vmrun.create_command(made), tmp_path)
    assert calls and not [w for words in calls for w in words if "s3cr3t" in w]
    # what Podman's --env-file reads, one NAME=VALUE a line
    assert made.env_file_text().decode().splitlines() == [f"{k}={v}" for k, v in made.environment().items()]


@pytest.mark.parametrize(("value", "why"), [
    ("a\nb", "has a newline"),
    ("a\r", "ends with a carriage return"),
    ("x" * 70000, "longer than Podman's --env-file takes"),
])
def test_a_value_an_env_file_cannot_carry_is_refused_before_connecting(value: str, why: str) -> None:
    from kodepipe.container.backend import Part, Unsupported

    guest = FakeGuest()
    run, _, _ = job(guest, request(env={"TOKEN": value}))
    with pytest.raises(Unsupported) as caught:
        vmrun._run(run)
    assert caught.value.part is Part.ENV and "TOKEN" in caught.value.message and why in caught.value.message
    assert value not in caught.value.message and guest.commands == [] and caught.value.status == 65
    assert sandbox.env_file_refusal("TOKEN", "a\rb" + "x" * 60000) is None  # a CR inside is carried


def test_setuid_files_the_agent_left_are_reported_as_on_the_host() -> None:
    """The host's rule (hostrun.report_setid): the files with a setuid or setgid bit after the run that were
    not there before are recorded (setuid_files, names escaped) and said; names are NUL-separated data."""
    guest = FakeGuest(setid=b"old-suid\0")
    guest.setid.append(b"old-suid\0bin/x\0new\xff\nsuid\0")  # the second find: after the run
    run, _, said = job(guest)
    record, _ = vmrun._run(run)
    assert record["setuid_files"] == ["bin/x", "new\\xff\nsuid"]
    assert ("warn", "the agent left setuid/setgid files in the workspace: bin/x, new\\xff\\nsuid") in said
    (before, _), (after, _) = guest.sent("-perm /6000")
    assert shlex.split(before) == ["sudo", "-n", *vmrun.setid_argv("/workspace")] and before == after
    assert steps(guest).index("start") < steps(guest).index("setid", 4) < len(steps(guest)) - 2
    # nothing new: nothing recorded; a read-only workspace is not looked at, as on the host
    guest = FakeGuest(setid=b"old-suid\0")
    run, _, _ = job(guest)
    assert "setuid_files" not in vmrun._run(run)[0]
    guest = FakeGuest(setid=b"")
    run, _, _ = job(guest, request(read_only_workspace=True))
    vmrun._run(run)
    assert not guest.sent("-perm /6000")


def test_the_guests_setuid_find_agrees_with_the_hosts_walk(tmp_path: Path) -> None:
    from kodepipe.core import fdtree

    ws = tmp_path / "ws"
    for rel, mode in (("plain", 0o755), ("suid", 0o4755), ("sgid", 0o2755), ("deep/er/both", 0o6755),
                      ("odd\nname suid", 0o4700), ("dir/x", 0o644)):
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / rel).write_text("x")
        (ws / rel).chmod(mode)
    (ws / "sgid-dir").mkdir()
    (ws / "sgid-dir").chmod(0o2755)  # a directory: not a file the agent could run
    (ws / "link").symlink_to(ws / "suid")  # never followed
    out = subprocess.run(vmrun.setid_argv(str(ws)), capture_output=True, check=True).stdout
    found = vmrun.parse_setid(out)
    assert found == set(fdtree.setid_files(ws)) == {"suid", "sgid", "deep/er/both", "odd\nname suid"}


def test_the_stage_script_writes_the_runs_files_in_a_real_shell(tmp_path: Path) -> None:
    """STAGE, as root here with this host's tar: the folder made 0700 (refused if it exists), each file with
    its mode and owner, the profile and the hook renamed into place, nothing left under their staged names."""
    if os.geteuid() != 0:
        pytest.skip("the stage script runs as root")
    top, run_dir, folder = tmp_path / "kodepipe", tmp_path / "overlay", tmp_path / "kodepipe" / "run-x"
    profile, hooks = top / "seccomp-1.json", top / "hooks-1"
    files = [vmrun.StagedFile("hosts", b"127.0.0.1 localhost\n", 0o444),
             vmrun.StagedFile("0-to\nken", b"s3cret", 0o400, 1234, 1235),
             vmrun.StagedFile("env", b"A=1\n", 0o400),
             vmrun.StagedFile(vmrun.STAGED_SECCOMP, b"{}", 0o644), vmrun.StagedFile(vmrun.STAGED_HOOK, b"[]", 0o644)]

    def stage(hooks_dir: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["sh", "-c", vmrun.STAGE, "kp-run", str(top), str(run_dir), str(profile), hooks_dir,
                               str(folder)], input=vmrun.staged_tar(files), capture_output=True, timeout=60)

    done = stage(str(hooks))
    assert done.returncode == 0, done.stderr
    assert (folder.stat().st_mode & 0o777, top.stat().st_mode & 0o777) == (0o700, 0o755)
    secret = (folder / "0-to\nken").stat()
    assert (secret.st_mode & 0o777, secret.st_uid, secret.st_gid) == (0o400, 1234, 1235)
    assert (folder / "0-to\nken").read_bytes() == b"s3cret" and (folder / "hosts").stat().st_mode & 0o777 == 0o444
    assert (folder / "env").stat().st_uid == 0 and (folder / "env").stat().st_mode & 0o777 == 0o400
    assert profile.read_bytes() == b"{}" and (hooks / "userns-limits.json").read_bytes() == b"[]"
    assert sorted(p.name for p in folder.iterdir()) == ["0-to\nken", "env", "hosts"]
    assert (run_dir / "idmapped-lower-dir-false").exists()
    assert stage(str(hooks)).returncode != 0  # a folder that exists already is never written into
