"""kp-run --audit: strace from outside records what the agent did, and the agent cannot see it; on both
backends (the host's strace, or the guest root's strace in a VM with its log copied to the host's run folder:
one definition through the ``backend`` parametrization)."""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import BIN, lines
from tests.integration.test_run import one_podman_service  # noqa: F401 - the module's shared service
from tests.integration.vmbackend import SESSION, kprun_on

pytestmark = pytest.mark.integration

BOUND = 600.0  # generous bounds on real conditions (a guest under TCG), never a duration a test relies on


def place(request: pytest.FixtureRequest, backend: str, ws: Path) -> str:
    """The workspace ``ws`` where ``backend`` runs: itself on the host, a copy on the guest's disk in a VM."""
    return request.getfixturevalue("guest_vm").put(ws) if backend == "vm" else str(ws)


def take_back(request: pytest.FixtureRequest, backend: str, where: str, ws: Path) -> None:
    """``ws`` as the run left the workspace (in a VM: copied back from the guest)."""
    if backend == "vm":
        request.getfixturevalue("guest_vm").get(where, ws)


def env_of(request: pytest.FixtureRequest, backend: str) -> dict[str, str]:
    """The environment of ``backend``'s kp-* commands (its state dir: kp-ls, kp-rm)."""
    return request.getfixturevalue("guest_vm").env if backend == "vm" else dict(os.environ)


def remove(request: pytest.FixtureRequest, backend: str, name: str) -> None:
    done = subprocess.run([str(BIN / "kp-rm"), name], env=env_of(request, backend), capture_output=True,
                          timeout=BOUND)
    assert done.returncode == 0, done.stderr.decode()


def guest_audit_folder(request: pytest.FixtureRequest, record: dict[str, Any]) -> str:
    from kodepipe.container import vmrun

    return f"{vmrun.GUEST_KEEP}/{record['name']}-{record['id']}/{vmrun.AUDIT_DIR}"


def check_copy(request: pytest.FixtureRequest, backend: str, record: dict[str, Any]) -> None:
    """In a VM: the host's log is the guest's, byte for byte (verified at the end, and recorded), the guest's
    copy is gone once verified, and the record says the cross-check was not made there."""
    if backend != "vm":
        assert "audit_copy" not in record
        return
    import hashlib

    log = Path(record["audit_log"]).read_bytes()
    copy = record["audit_copy"]
    assert copy["verified"] is True and copy["bytes"] == len(log), copy
    assert copy["sha256"] == hashlib.sha256(log).hexdigest()
    assert copy["from"].startswith(f"{record['host']}:/var/lib/kodepipe/runs/")
    gone = request.getfixturevalue("guest_vm").sh('test -e "$1" && echo there || echo gone',
                                                  guest_audit_folder(request, record))
    assert gone == b"gone\n"
    if record.get("workspace_mode") == "rw":
        assert record["audit_unaccounted"] == {"against": "workspace", "complete": False,
                                               "why": "not checked inside a VM"}


AGENT = r"""
grep TracerPid /proc/self/status
echo written > /workspace/audit.txt
cat /workspace/main.py > /dev/null
python3 -c 'import socket
s = socket.socket()
try: s.connect(("192.0.2.1", 443))
except OSError as e: print("connect:", e)'
exit 7
"""


@pytest.mark.parametrize("mode", ["minimal", "default", "full"])
def test_audit_records_the_agent_from_outside(request: pytest.FixtureRequest, backend: str, shell_image: str,
                                              tmp_path: Path, mode: str) -> None:
    ws = tmp_path / "proj"
    ws.mkdir()
    (ws / "main.py").write_text("print(1)\n")
    os.chown(ws, 4321, 4321)
    os.chown(ws / "main.py", 4321, 4321)
    where = place(request, backend, ws)
    proc, record = kprun_on(request, backend, "--image", shell_image, "-w", where, "--audit",
                            "--audit-mode", mode, "--", "bash", "-c", AGENT)
    err = proc.stderr
    assert record["exit_code"] == 7 and "TracerPid:\t0" in err, err[-4000:]  # the tracer is invisible inside
    assert record["audit"] == "complete" and record["outcome"] == "exited", record
    log = Path(record["audit_log"])
    assert log.is_file() and record["audit_mode"] == mode and record["audit_blind"]
    # on the host strace took the container at its creation (its seccomp filter applies); a guest attaches
    assert record["audit_tracer"] == ("seccomp-bpf" if backend == "host" else "attached")
    assert not str(log).startswith(str(ws))  # out of the agent's reach: not in the workspace
    assert log.parent == Path(record["path"]) and log.parent.parent.name == "containers"  # the run's folder here
    check_copy(request, backend, record)
    # kp-trace turns the container record into events of the agent (runc's start-up skipped)
    traced = subprocess.run([str(BIN / "kp-trace")], input=proc.stdout.encode(), capture_output=True, timeout=120)
    assert traced.returncode == 0, traced.stderr.decode()
    out = lines(traced.stdout)
    # the record passes through first (in a VM, after the vm record kp-run passed on)
    assert [r["name"] for r in out if r.get("kind") != "event"] == [*(["kp-backend"] if backend == "vm" else []),
                                                                      record["name"]]
    assert out.index(record) < min(n for n, e in enumerate(out) if e.get("kind") == "event")
    events = [e for e in out if e.get("kind") == "event"]
    assert all(e["container"] == record["name"] for e in events)
    assert [e for e in events if e["type"] == "parse_error"] == []
    execs = [e["argv"][0] for e in events if e["type"] == "exec" and e["outcome"] == "ok"]
    assert execs[:1] == ["bash"] and "grep" in execs and "cat" in execs and "python3" in execs
    assert not any("runc" in str(e.get("path")) or "crun" in str(e.get("path")) for e in events)
    exits = [e for e in events if e["type"] == "exit" and e.get("code") == 7]
    assert exits
    if mode != "minimal":
        writes = {e["path"] for e in events if e["type"] == "file" and e.get("write")}
        assert "/workspace/audit.txt" in writes
        nets = [e for e in events if e["type"] == "net" and e.get("op") == "connect"]
        assert any(n["address"].get("address") == "192.0.2.1" and n["errno"] == "ENETUNREACH" for n in nets)
    summary = lines(subprocess.run([str(BIN / "kp-trace"), "--summary"], input=proc.stdout.encode(),
                                   capture_output=True, timeout=120).stdout)
    assert any(s.get("item") == "exec" and s["argv"][0] == "python3" for s in summary)
    remove(request, backend, record["name"])
    assert not log.exists()


# clone(CLONE_UNTRACED|SIGCHLD) made a child that strace -f does not follow: the file it wrote was
# there, its exec missing from the audit log (checked with the seccomp rule removed).  Refused now
# (EPERM); clone3, which carries its flags in memory where seccomp cannot see them, says ENOSYS;
# ordinary children (fork, posix_spawn's CLONE_VM|CLONE_VFORK, threads) still work and are recorded.
# perl, because python3-minimal has no ctypes.
UNTRACED = r"""
my $pid = syscall(56, 0x00800000 | 17, 0, 0, 0, 0);
if ($pid == 0) { exec("/bin/bash", "-c", "echo > /workspace/\$0", "kp-untraced-marker"); exit 99 }
if ($pid < 0) { print "clone: errno ", $! + 0, "\n" } else { waitpid($pid, 0); print "clone: child ran\n" }
my $args = pack("Q*", 0x00800000, 0, 0, 0, 17, 0, 0, 0, 0, 0, 0);  # struct clone_args
my $r = syscall(435, $args, length($args));
if ($r == 0) { exec("/bin/bash", "-c", "echo > /workspace/\$0", "kp-clone3-marker"); exit 99 }
if ($r < 0) { print "clone3: errno ", $! + 0, "\n" } else { waitpid($r, 0); print "clone3: child ran\n" }
my $f = fork();
if ($f == 0) { exec("/bin/true", "kp-fork-marker"); exit 99 }
waitpid($f, 0);
print "fork: $?\n";
"""
SPAWN = ("import subprocess, threading; subprocess.run(['/bin/true', 'kp-spawn-marker'], check=True); "
         "t = threading.Thread(target=print, args=('thread: ok',)); t.start(); t.join()")


def test_a_child_cannot_escape_the_audit_with_clone_untraced(request: pytest.FixtureRequest, backend: str,
                                                            shell_image: str, tmp_path: Path) -> None:
    ws = tmp_path / "proj"
    ws.mkdir()
    (ws / "untraced.pl").write_text(UNTRACED)
    os.chown(ws, 4321, 4321)
    where = place(request, backend, ws)
    proc, record = kprun_on(request, backend, "--image", shell_image, "-w", where, "--audit", "--",
                            "bash", "-c", f'perl /workspace/untraced.pl; python3 -c "{SPAWN}"')
    err = proc.stderr
    assert record["exit_code"] == 0, err[-4000:]
    take_back(request, backend, where, ws)
    log = Path(record["audit_log"]).read_text()
    for marker in ("kp-untraced-marker", "kp-clone3-marker"):
        # the property: a process that ran is on record; here, because it was never made
        assert marker in log or not (ws / marker).exists(), f"{marker} ran, and the audit log does not show it"
        assert not (ws / marker).exists()
    assert "clone: errno 1\n" in err  # EPERM
    assert "clone3: errno 38\n" in err  # ENOSYS: the C library falls back to clone
    assert "fork: 0\n" in err and "thread: ok\n" in err
    assert "kp-fork-marker" in log and "kp-spawn-marker" in log  # what children do is on record
    if record["audit_tracer"] == "attached":  # strace stops at every call: the refused attempt is on record
        assert "CLONE_UNTRACED" in log
    else:  # strace's seccomp filter never sees a call the container's own filter refuses: the record says so
        assert any("denied with an errno" in line for line in record["audit_blind"])
    check_copy(request, backend, record)
    remove(request, backend, record["name"])


# opens a file again and again (each open is a line of the audit log), and every 100 opens
# writes how many it has done into /workspace/progress
BUSY = r"""
my $n = 0;
while (1) {
    open(my $f, "<", "/workspace/busy.pl") or die;
    close $f;
    # written aside and renamed into place: a kill between open and print never leaves it empty
    if (++$n % 100 == 0) {
        open(my $p, ">", "/workspace/progress.new") or die; print $p "$n\n"; close $p;
        rename("/workspace/progress.new", "/workspace/progress") or die;
    }
}
"""


def test_the_audit_log_has_a_cap_and_the_run_stops_there(request: pytest.FixtureRequest, backend: str,
                                                         shell_image: str, tmp_path: Path) -> None:
    from kodepipe.audit import cap as auditcap

    ws = tmp_path / "proj"
    ws.mkdir()
    (ws / "busy.pl").write_text(BUSY)
    os.chown(ws, 4321, 4321)
    # a traced guest under TCG writes its log at a few KB/s: a smaller cap there (the minimum is 64k)
    cap, size_arg = (1 << 20, "1m") if backend == "host" else (128 << 10, "128k")
    where = place(request, backend, ws)
    proc, record = kprun_on(request, backend, "--image", shell_image, "-w", where, "--audit",
                            "--audit-cap", size_arg, "--time", "30m", "--", "perl", "/workspace/busy.pl")
    err = proc.stderr
    assert proc.returncode == 1 and "stopped when its audit log reached its cap" in err, err[-4000:]
    # stopped at the cap, not at the time limit, and the record says so
    assert record["audit"] == "capped" and record["outcome"] == "audit-capped", record
    assert record["audit_cap"] == cap and record["audit_capped"]["run"] == "stopped"
    assert record["exit_code"] == 137 and record["signal"] == "SIGKILL" and not record["timed_out"]
    log = Path(record["audit_log"])
    size = log.stat().st_size
    assert record["audit_capped"]["log_bytes"] == size
    # the log stops at the cap: past it by what the agent did in the moment before it was halted (in a VM,
    # also while the host's copy caught up with the guest's log)
    assert cap <= size < cap + 8 * (1 << 20) < cap + auditcap.SLACK
    text = log.read_text()
    assert text.endswith("+++ killed by SIGKILL +++\n")  # the end of the agent is on record ...
    take_back(request, backend, where, ws)
    done = int((ws / "progress").read_text())
    assert text.count('"/workspace/busy.pl", O_RDONLY') >= done > 0  # ... and all that it did before
    check_copy(request, backend, record)
    traced = subprocess.run([str(BIN / "kp-trace")], input=proc.stdout.encode(), capture_output=True, timeout=300)
    assert traced.returncode == 0, traced.stderr.decode()
    assert not [e for e in lines(traced.stdout) if e.get("type") == "parse_error"]
    remove(request, backend, record["name"])


def test_an_audit_cap_below_the_minimum_is_a_usage_error(shell_image: str) -> None:
    small = subprocess.run([str(BIN / "kp-run"), "--image", shell_image, "--audit", "--audit-cap", "1k", "--",
                            "true"], capture_output=True, timeout=60)
    assert small.returncode == 2 and b"--audit-cap" in small.stderr and not small.stdout


# -- the tracer dies while the agent runs --------------------------------------------------------------

AGENT_RUNS = "echo started > /workspace/started; exec sleep 900"  # runs until someone stops it


def wait_for(condition: Callable[[], Any], what: str, proc: subprocess.Popen[bytes] | None = None) -> Any:
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            _out, err = proc.communicate()
            raise AssertionError(f"kp-run ended before {what}: {proc.returncode}\n{err.decode()[-4000:]}")
        time.sleep(0.1)  # a poll interval, not a wait for a state
    raise AssertionError(f"not within {BOUND:g} s: {what}")


def start_run(request: pytest.FixtureRequest, backend: str, *args: str) -> subprocess.Popen[bytes]:
    """kp-run ARGS on ``backend``, in the background (in a VM: the session VM's record on its stdin)."""
    if backend == "vm":
        guest = request.getfixturevalue("guest_vm")
        proc = subprocess.Popen([str(BIN / "kp-run"), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=guest.env)
        assert proc.stdin is not None
        proc.stdin.write(orjson.dumps(guest.record) + b"\n")
        proc.stdin.close()
        proc.stdin = None  # written and closed: communicate() must not flush it
        return proc
    return subprocess.Popen([str(BIN / "kp-run"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def started(request: pytest.FixtureRequest, backend: str, where: str) -> bool:
    if backend == "vm":
        said: bytes = request.getfixturevalue("guest_vm").sh('test -e "$1/started" && echo yes || true', where)
        return said == b"yes\n"
    return (Path(where) / "started").exists()


def tracer_of(request: pytest.FixtureRequest, backend: str, proc: subprocess.Popen[bytes], name: str) -> int | None:
    """The pid of the run's strace where it runs: kp-run's child on the host, the guest root's in a VM."""
    if backend == "vm":
        from kodepipe.container import vmrun

        said = request.getfixturevalue("guest_vm").sh(
            'cat "$1"/"$2"-*/"$3"/strace.pid 2>/dev/null || true', vmrun.GUEST_KEEP, name, vmrun.AUDIT_DIR)
        return int(said) if said.strip().isdigit() else None
    from tests.integration.test_run_faults import pids_of

    # strace started the OCI runtime's create (its seccomp filter then applies), writing the run's log
    found = pids_of(lambda argv, ppid: os.path.basename(argv[0]) == "strace"
                    and any(a.endswith(f"/{name}/audit.strace") for a in argv))
    return found[0] if found else None


def kill_tracer(request: pytest.FixtureRequest, backend: str, pid: int) -> None:
    if backend == "vm":
        request.getfixturevalue("guest_vm").sh('kill -KILL "$1"', str(pid))
    else:
        os.kill(pid, 9)


def test_a_killed_tracer_stops_the_run_and_the_record_says_the_audit_is_incomplete(
        request: pytest.FixtureRequest, backend: str, shell_image: str, tmp_path: Path) -> None:
    ws = tmp_path / "proj"
    ws.mkdir()
    os.chown(ws, 4321, 4321)
    where = place(request, backend, ws)
    name = f"untraced-{SESSION}"
    proc = start_run(request, backend, "--image", shell_image, "-w", where, "--audit", "--name", name,
                     "--", "sh", "-c", AGENT_RUNS)
    wait_for(lambda: started(request, backend, where), "the agent runs", proc)
    kill_tracer(request, backend, wait_for(lambda: tracer_of(request, backend, proc, name), "strace runs", proc))
    out, err_bytes = proc.communicate(timeout=BOUND)  # the agent sleeps 900 s: its tracer's end must stop it
    err = err_bytes.decode()
    assert "Traceback" not in err, err
    (record,) = [r for r in lines(out) if r.get("kind") == "container"]
    assert proc.returncode == 1, err[-4000:]
    assert record["audit"] == "incomplete" and record["outcome"] == "audit-lost", record
    assert record["error"]["code"] == "audit_incomplete"
    problem = record["audit_problem"]
    assert "while the container ran" in problem and "stopped the container" in problem, problem
    if backend == "vm":  # strace is the guest script's child there, so its status is known
        assert "killed by SIGKILL" in problem
    assert record["exit_code"] == 137 and record["signal"] == "SIGKILL"  # the agent's own end, as it was
    assert b"execve(" in Path(record["audit_log"]).read_bytes()  # what was recorded before is kept
    if backend == "vm":
        assert record["audit_copy"]["verified"] is True  # the host has all the guest's log had
    remove(request, backend, name)


def test_in_a_vm_the_guest_stops_an_untraced_container_when_ssh_is_gone(
        request: pytest.FixtureRequest, shell_image: str, tmp_path: Path) -> None:
    """The watcher is the guest's: with kp-run and its SSH connection gone (SIGKILL), a tracer that dies
    still takes the container with it."""
    import signal

    guest = request.getfixturevalue("guest_vm")
    ws = tmp_path / "proj"
    ws.mkdir()
    os.chown(ws, 4321, 4321)
    where = place(request, "vm", ws)
    name = f"orphan-{SESSION}"
    proc = start_run(request, "vm", "--image", shell_image, "-w", where, "--audit", "--name", name,
                     "--", "sh", "-c", AGENT_RUNS)
    try:
        wait_for(lambda: started(request, "vm", where), "the agent runs", proc)
        tracer = wait_for(lambda: tracer_of(request, "vm", proc, name), "strace runs", proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=BOUND)

        def state() -> str:
            # (podman 4.3's ps says "Up 4 seconds ago" for {{.State}}); "" once the container is gone
            said: bytes = guest.sh(shlex.join(["podman", "container", "inspect", "--format", "{{.State.Status}}",
                                               "--", name]) + " 2>/dev/null || true")
            return said.decode().strip()

        assert state() == "running"  # kp-run is gone, its container goes on (as the time limit's --timeout allows)
        guest.sh('kill -KILL "$1"', str(tracer))
        wait_for(lambda: state() in ("", "exited", "stopped"), "the guest's watcher stops the container")
    finally:
        subprocess.run([str(BIN / "kp-rm"), name], env=guest.env, capture_output=True, timeout=BOUND)
        guest.sh(shlex.join(["podman", "rm", "-f", "-i", "--", name]) + " >/dev/null")


def test_the_guests_audit_scripts_here(tmp_path: Path) -> None:
    """vmrun's guest scripts (AUDIT_START, the copy, AUDIT_STOP, AUDIT_END) run as root on this host with its
    strace, on a real process: attached before the first instruction we let it run; a tracer killed takes
    the traced process with it (the watcher); the cap's stop ends it with its end on record; the copy is
    the log, byte for byte."""
    import hashlib
    import signal

    from kodepipe.audit import strace
    from kodepipe.container import vmrun

    if os.geteuid() != 0:
        pytest.skip("the guest's scripts run as root")

    def local(command: str) -> str:
        return command.replace("sudo -n ", "", 1)

    def traced(folder: Path, script: str) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
        target = subprocess.Popen(["sh", "-c", f"read go; {script}"], stdin=subprocess.PIPE, start_new_session=True)
        argv = strace.attach_argv("default", str(folder / "audit.strace"), target.pid)
        attached = subprocess.run(["sh", "-c", local(vmrun.audit_start_command(str(folder), 1 << 30, target.pid, 60,
                                                                                argv))], capture_output=True,
                                  timeout=BOUND)
        assert attached.returncode == 0, attached.stderr
        return target, vmrun.parse_probe(attached.stdout)

    def end(folder: Path) -> dict[str, str]:
        done = subprocess.run(["sh", "-c", vmrun.AUDIT_END, "kp-run", str(folder), "60"], capture_output=True,
                              timeout=BOUND)
        return vmrun.parse_probe(done.stdout)

    # a whole run: the copy (tail until strace ends) is the log, and strace ended with 0
    folder = tmp_path / "whole"
    target, pids = traced(folder, "cat /etc/hostname >/dev/null; exit 3")
    copy = subprocess.Popen(["sh", "-c", local(vmrun.audit_copy_command(str(folder / "audit.strace"),
                                                                        int(pids["strace"])))], stdout=subprocess.PIPE)
    assert target.stdin is not None
    target.stdin.close()
    assert target.wait(timeout=BOUND) == 3
    copied, _ = copy.communicate(timeout=BOUND)
    ended = end(folder)
    assert ended["status"] == "0" and ended["killed"] == ""
    assert ended["size"] == str(len(copied)) and ended["sha256"] == hashlib.sha256(copied).hexdigest()
    assert b'execve("/bin/cat"' in copied or b"cat" in copied
    assert copied.endswith(b"+++ exited with 3 +++\n")
    # the tracer killed: the watcher kills what it traced, and says so
    folder = tmp_path / "killed"
    target, pids = traced(folder, "exec sleep 900")
    os.kill(int(pids["strace"]), signal.SIGKILL)
    assert target.wait(timeout=BOUND) == -signal.SIGKILL
    ended = end(folder)
    assert ended["status"] == "137" and ended["killed"] == "137"
    assert vmrun.strace_ending(ended["status"]) == "was killed by SIGKILL"
    # the cap's stop: strace halted, the traced process killed, strace let go on: it writes the end
    folder = tmp_path / "capped"
    target, pids = traced(folder, "exec sleep 900")
    stop = subprocess.run(["sh", "-c", vmrun.AUDIT_STOP, "kp-run", pids["strace"], str(target.pid), pids["start"]],
                          capture_output=True, timeout=BOUND)
    assert stop.returncode == 0
    assert target.wait(timeout=BOUND) == -signal.SIGKILL
    ended = end(folder)
    assert ended["status"] == "0" and ended["killed"] == ""
    assert (folder / "audit.strace").read_bytes().endswith(b"+++ killed by SIGKILL +++\n")


# Every way the agent can change a file's contents or names, each on its own file: a write through an
# open descriptor, a write through a shared mapping (no write call on the file: the bytes go into the
# mapping through /proc/self/mem), a rename, a hard link and a truncate by path.  Perl, because
# python3-minimal has neither mmap nor ctypes.
WRITE_PATHS = r"""
chdir "/workspace" or die "chdir: $!";
open(my $w, ">", "written.txt") or die "open: $!"; print $w "written"; close $w;
open(my $fh, "+<", "mapped.bin") or die "open: $!";
my $addr = syscall(9, 0, 4096, 3, 1, fileno($fh), 0);  # mmap(PROT_READ|PROT_WRITE, MAP_SHARED)
die "mmap: $!" if $addr == -1;
open(my $mem, "+<", "/proc/self/mem") or die "mem: $!";
sysseek($mem, $addr, 0) or die "seek: $!";
syswrite($mem, "mapped") == 6 or die "poke: $!";
syscall(26, $addr, 4096, 4) == 0 or die "msync: $!";  # MS_SYNC
close $fh;
rename("before.txt", "renamed.txt") or die "rename: $!";
link("linked-from.txt", "linked.txt") or die "link: $!";
truncate("truncated.txt", 3) or die "truncate: $!";
"""


def test_every_way_of_writing_a_file_is_in_the_default_audit(request: pytest.FixtureRequest, backend: str,
                                                             shell_image: str, tmp_path: Path) -> None:
    ws = tmp_path / "proj"
    ws.mkdir()
    (ws / "mapped.bin").write_bytes(b"\0" * 4096)
    for name in ("before.txt", "linked-from.txt", "truncated.txt"):
        (ws / name).write_text("0123456789")
    for path in (ws, *ws.iterdir()):
        os.chown(path, 4321, 4321)
    where = place(request, backend, ws)
    proc, record = kprun_on(request, backend, "--image", shell_image, "-w", where, "--audit",
                            "--", "perl", "-e", WRITE_PATHS)
    assert record["exit_code"] == 0 and record["audit"] == "complete", (record, proc.stderr[-3000:])
    take_back(request, backend, where, ws)
    assert (ws / "mapped.bin").read_bytes()[:6] == b"mapped" and (ws / "truncated.txt").read_text() == "012"
    assert (ws / "linked.txt").is_file() and (ws / "renamed.txt").is_file()  # it all happened
    traced = subprocess.run([str(BIN / "kp-trace")], input=proc.stdout.encode(), capture_output=True, timeout=120)
    assert traced.returncode == 0, traced.stderr.decode()
    files = [e for e in lines(traced.stdout) if e.get("kind") == "event" and e["type"] == "file"
             and e["outcome"] == "ok"]

    def seen(op: str, path: str, **fields: Any) -> bool:
        return any(e["op"] == op and path in (e.get("path"), e.get("target"))
                   and all(e.get(k) == v for k, v in fields.items()) for e in files)

    assert seen("open", "/workspace/written.txt", write=True)
    assert seen("open", "/workspace/mapped.bin", write=True)  # the mapping's writes need no write call
    assert seen("rename", "/workspace/renamed.txt") and seen("rename", "/workspace/before.txt")
    assert seen("link", "/workspace/linked.txt")
    assert seen("truncate", "/workspace/truncated.txt")
    # and, on the host, the run's own check: every change in the workspace is explained by a traced call
    # (a guest's trace is only as good as the guest, and is not cross-checked: the record says so)
    if backend == "host":
        assert record["audit_unaccounted"]["complete"] is True and record["audit_unaccounted"]["paths"] == []
    else:
        assert record["audit_unaccounted"]["complete"] is False
    remove(request, backend, record["name"])


def test_on_a_service_kodepipe_did_not_start_strace_attaches_and_records_the_same(
        shell_image: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain Podman service runs no kodepipe wrapper, so nothing can create the container under strace:
    strace attaches to its first process before it starts (audit_tracer "attached"), as in a VM."""
    run_dir = tmp_path_factory.mktemp("plain-podman")
    run_dir.chmod(0o700)
    sock = run_dir / "podman.sock"
    service = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{sock}"], cwd=run_dir,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: subprocess.run(["podman", "--url", f"unix://{sock}", "version"],
                                        capture_output=True).returncode == 0, "the service answers")
        monkeypatch.setenv("KODEPIPE_PODMAN_URL", f"unix://{sock}")
        ws = tmp_path / "proj"
        ws.mkdir()
        os.chown(ws, 4321, 4321)
        proc = subprocess.run([str(BIN / "kp-run"), "--image", shell_image, "-w", str(ws), "--audit", "--",
                               "sh", "-c", "echo x > /workspace/made.txt"], capture_output=True, timeout=BOUND)
        (record,) = lines(proc.stdout)
        assert proc.returncode == 0 and record["audit"] == "complete", (record, proc.stderr.decode()[-3000:])
        assert record["audit_tracer"] == "attached" and "audit_setup_lines" not in record
        traced = lines(subprocess.run([str(BIN / "kp-trace")], input=proc.stdout, capture_output=True,
                                      timeout=120).stdout)
        assert any(e.get("type") == "file" and e.get("path") == "/workspace/made.txt" and e.get("write")
                   for e in traced)
        subprocess.run([str(BIN / "kp-rm"), record["name"]], capture_output=True, timeout=BOUND, check=True)
    finally:
        service.kill()
        service.wait()
