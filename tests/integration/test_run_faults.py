"""kp-run under faults, on real Podman and strace: the tracer dies, the Podman service dies, kp-run
is killed between making its container and recording it.  Each time the record tells the truth,
nothing runs on unwatched, kp-ls and kp-rm still see what is left, and nobody prints a traceback."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import BIN, lines
from tests.integration.test_run import one_podman_service  # noqa: F401 - the module's shared service

pytestmark = pytest.mark.integration

OWNER = 4321
BOUND = 120.0  # generous bounds on real conditions, never a duration the test relies on
AGENT = "echo started > /workspace/started; exec sleep 600"  # runs until someone stops it


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    ws = tmp_path / "proj"
    ws.mkdir()
    (ws / "main.py").write_text("print('hello')\n")
    for path in (ws, ws / "main.py"):
        os.chown(path, OWNER, OWNER)
    return ws


def wait_for(condition: Callable[[], Any], what: str, proc: subprocess.Popen[bytes] | None = None) -> Any:
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"kp-run ended before {what}: {proc.returncode}\n{err.decode()}\n{out.decode()}")
        threading.Event().wait(0.05)
    raise AssertionError(f"not within {BOUND:g} s: {what}")


def kp(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    done = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, input=input, timeout=BOUND)
    assert b"Traceback" not in done.stderr, done.stderr.decode()
    return done


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen([str(BIN / "kp-run"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **(env or {})})


def ended(proc: subprocess.Popen[bytes]) -> tuple[int, dict[str, Any], str]:
    """kp-run's status, its one record and its stderr, which must hold no traceback."""
    out, err = proc.communicate(timeout=BOUND)  # the agent sleeps 600 s: kp-run must have stopped it
    text = err.decode()
    assert "Traceback" not in text and "internal error" not in text, text
    (record,) = lines(out)
    return proc.returncode, record, text


def podman_containers(run_id: str) -> list[dict[str, Any]]:
    """The containers of one run, as Podman's own CLI sees them (not through kodepipe)."""
    ps = subprocess.run(["podman", "ps", "-a", "--format", "json", "--filter", f"label=io.kodepipe.id={run_id}"],
                        capture_output=True, check=True, timeout=BOUND)
    found: list[dict[str, Any]] = orjson.loads(ps.stdout or b"[]") or []
    return found


def pids_of(match: Callable[[list[str], int], bool]) -> list[int]:
    """Processes whose argv and parent pid match."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").split("\0")
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if match(argv, ppid):
            found.append(int(entry))
    return found


def services(sock: Path) -> list[int]:
    return pids_of(lambda argv, _ppid: "service" in argv and f"unix://{sock}" in argv)


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def own_service(monkeypatch: pytest.MonkeyPatch, kp_env: dict[str, Path]) -> Iterator[Path]:
    """kp-run starts its own Podman service (in this test's runtime dir); whatever service is left
    on that socket at the end is ended, by its pid."""
    monkeypatch.delenv("KODEPIPE_PODMAN_URL", raising=False)
    monkeypatch.delenv("CONTAINER_HOST", raising=False)
    sock = kp_env["runtime"] / "podman.sock"
    yield sock
    kill_all(services(sock))


# -- the tracer dies ------------------------------------------------------------------------------


def test_a_whole_audit_says_it_is_complete(shell_image: str, ws: Path) -> None:
    proc = start("--image", shell_image, "-w", str(ws), "--audit", "--", "true")
    status, record, _err = ended(proc)
    assert status == 0 and record["audit"] == "complete" and "error" not in record
    assert "audit_problem" not in record and record["outcome"] == "exited"
    kp("kp-rm", record["name"])


def test_a_killed_tracer_stops_the_run_and_the_record_says_the_audit_is_incomplete(
        shell_image: str, ws: Path, kp_env: dict[str, Path]) -> None:
    proc = start("--image", shell_image, "-w", str(ws), "--audit", "--name", "untraced", "--", "sh", "-c", AGENT)
    wait_for(lambda: (ws / "started").exists(), "the agent runs", proc)
    # the tracer: the strace on the host that started the container's runtime (its seccomp filter in the
    # container), writing this run's log
    (tracer,) = wait_for(lambda: pids_of(lambda argv, _ppid: os.path.basename(argv[0]) == "strace"
                                         and any(a.endswith("/untraced/audit.strace") for a in argv)),
                         "strace traces the container", proc)
    os.kill(tracer, signal.SIGKILL)
    status, record, err = ended(proc)
    assert status == 1, err
    assert record["audit"] == "incomplete" and record["outcome"] == "audit-lost"
    assert record["error"]["code"] == "audit_incomplete"
    # not kp-run's child, so how it ended is not kp-run's to see: that it ended while the container ran is
    assert "while the container ran" in record["audit_problem"] and "stopped the container" in record["audit_problem"]
    assert record["audit_tracer"] == "seccomp-bpf"
    assert record["exit_code"] == 137 and record["signal"] == "SIGKILL"  # the agent's own end, as it was
    assert "audit_incomplete" not in err and "strace" in err
    assert podman_containers(record["id"]) == []  # stopped and removed, not left running untraced
    # what was recorded before the tracer died is kept, and kp-ls lists the run truthfully
    log = Path(record["audit_log"])
    assert b"execve(" in log.read_bytes()
    (listed,) = lines(kp("kp-ls", "untraced").stdout)
    assert listed["state"] == "exited" and listed["audit"] == "incomplete"
    assert kp("kp-rm", "untraced").returncode == 0
    assert not (kp_env["state"] / "containers" / "untraced").exists()


# -- the Podman service dies ----------------------------------------------------------------------


def test_kp_run_starts_its_dead_service_again_and_removes_the_container(
        shell_image: str, ws: Path, own_service: Path, kp_env: dict[str, Path]) -> None:
    proc = start("--image", shell_image, "-w", str(ws), "--quarantine", "--name", "unserved", "--", "sh", "-c",
                 "echo work > /workspace/made.txt; " + AGENT)
    upper = kp_env["state"] / "containers" / "unserved" / "upper"
    wait_for(lambda: (upper / "started").exists(), "the agent runs", proc)
    (service,) = services(own_service)
    os.kill(service, signal.SIGKILL)
    status, record, err = ended(proc)
    assert status == 1, err
    assert record["error"]["code"] == "engine_lost" and record["outcome"] == "engine-lost"
    assert "started the service again" in record["error"]["message"]
    assert record["container_removed"] is True
    assert podman_containers(record["id"]) == []
    assert services(own_service) and service not in services(own_service)  # a new service, not the dead one
    # the agent's work waits for review as usual; kp-ls says what is true
    assert record["state"] == "quarantined" and record["quarantine"]["added"] == ["made.txt", "started"]
    (listed,) = lines(kp("kp-ls", "unserved").stdout)
    assert listed["state"] == "quarantined"
    assert kp("kp-rm", "unserved").returncode == 0
    assert not (kp_env["state"] / "containers" / "unserved").exists()
    assert not (ws / "made.txt").exists()


def podman_containers_named(name: str, *, running: bool = False) -> bool:
    ps = subprocess.run(["podman", "ps", "--format", "{{.Names}}", *([] if running else ["-a"]),
                         "--filter", f"name=^{name}$"], capture_output=True, text=True, timeout=BOUND)
    return ps.stdout.split() == [name]


def test_a_dead_service_kodepipe_does_not_own_leaves_a_stopped_container_that_kp_rm_removes(
        shell_image: str, ws: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch,
        kp_env: dict[str, Path]) -> None:
    """A service the user configured is not kodepipe's to start again: kp-run stops the container's
    processes itself, keeps the run's folder, and kp-rm removes the container once Podman answers,
    although the run is quarantined."""
    run_dir = tmp_path_factory.mktemp("their-podman")
    run_dir.chmod(0o700)
    sock = run_dir / "podman.sock"
    monkeypatch.setenv("KODEPIPE_PODMAN_URL", f"unix://{sock}")

    def serve() -> subprocess.Popen[bytes]:
        service = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{sock}"], cwd=run_dir,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: subprocess.run(["podman", "--url", f"unix://{sock}", "version"],
                                        capture_output=True).returncode == 0, "the service answers")
        return service

    service = serve()
    try:
        proc = start("--image", shell_image, "-w", str(ws), "--quarantine", "--name", "stranded", "--", "sh", "-c",
                     "echo work > /workspace/made.txt; " + AGENT)
        upper = kp_env["state"] / "containers" / "stranded" / "upper"
        wait_for(lambda: (upper / "started").exists(), "the agent runs", proc)
        service.kill()
        service.wait()
        status, record, err = ended(proc)
        assert status == 1, err
        assert record["error"]["code"] == "engine_lost" and "kp-rm stranded" in record["error"]["message"]
        assert record["container_removed"] is False and record["state"] == "quarantined"
        (left,) = podman_containers(record["id"])
        # stopped: not left running unwatched, and kp-ls agrees with Podman's own view
        assert left["State"] != "running" and not podman_containers_named("stranded", running=True)
        (listed,) = lines(kp("kp-ls", "stranded").stdout)
        assert listed["state"] == "quarantined"
        # no Podman to ask: kp-rm says so and keeps the folder, so that it can be asked again
        refused = kp("kp-rm", "stranded")
        assert refused.returncode != 0 and b"Podman" in refused.stderr
        assert (kp_env["state"] / "containers" / "stranded").is_dir()
        service = serve()
        removed = kp("kp-rm", "stranded")
        assert removed.returncode == 0, removed.stderr.decode()
        assert podman_containers(record["id"]) == []
        assert not (kp_env["state"] / "containers" / "stranded").exists()
    finally:
        service.kill()
        service.wait()


def test_kp_rm_removes_the_kept_container_of_a_quarantined_run(shell_image: str, ws: Path) -> None:
    proc = start("--image", shell_image, "-w", str(ws), "--quarantine", "--keep", "--", "sh", "-c",
                 "echo work > /workspace/made.txt")
    status, record, err = ended(proc)
    assert status == 0 and record["state"] == "quarantined" and record["container_removed"] is False, err
    assert len(podman_containers(record["id"])) == 1
    assert kp("kp-rm", record["name"]).returncode == 0
    assert podman_containers(record["id"]) == []


# -- kp-run killed between making its container and recording it ----------------------------------


def test_a_kp_run_killed_right_after_creating_its_container_leaves_nothing_kp_rm_cannot_find(
        shell_image: str, ws: Path, kp_env: dict[str, Path]) -> None:
    name = "halfmade"
    folder = kp_env["state"] / "containers" / name
    proc = start("--image", shell_image, "-w", str(ws), "--name", name, "--", "true",
                 env={"KODEPIPE_TEST_STOP_AT": "container-created"})
    wait_for(lambda: "\nState:\tT" in Path(f"/proc/{proc.pid}/status").read_text(), "kp-run stops", proc)
    meta = orjson.loads((folder / "meta.json").read_bytes())
    assert "container_id" not in meta and meta["container_name"] == name
    (made,) = podman_containers(meta["id"])  # Podman made it; kp-run never learnt its id
    assert made["State"] == "created"
    proc.kill()
    proc.wait()
    (listed,) = lines(kp("kp-ls", name).stdout)
    assert listed["state"] == "orphaned"
    removed = kp("kp-rm", name)
    assert removed.returncode == 0, removed.stderr.decode()
    assert podman_containers(meta["id"]) == [] and not podman_containers_named(name)
    assert not folder.exists()
    # the name is free again, in kodepipe and in Podman
    again = start("--image", shell_image, "-w", str(ws), "--name", name, "--", "true")
    status, record, err = ended(again)
    assert status == 0 and record["exit_code"] == 0, err


# SIGHUP is what a closed terminal sends; in a VM once (each TCG run costs ~30-40 s of CI's time)
SIGNALS = [("host", signal.SIGTERM), ("host", signal.SIGHUP), ("vm", signal.SIGHUP)]


@pytest.mark.parametrize(("backend", "signum"), SIGNALS, ids=[f"{b}-{s.name}" for b, s in SIGNALS])
def test_a_kp_run_terminated_or_hung_up_removes_its_container(request: pytest.FixtureRequest, backend: str,
                                                                signum: signal.Signals, shell_image: str,
                                                                ws: Path) -> None:
    """kp-run ends by SIGTERM, or by SIGHUP (its terminal closed): the container goes with it, on every
    backend, the record says it was interrupted, and it exits 143 (SIGHUP once left the container running)."""
    from tests.integration.test_audit import env_of, place, start_run, started
    from tests.integration.test_audit import wait_for as wait_long

    where = place(request, backend, ws)
    name = f"sig-{signum.name.lower()}-{os.getpid()}"
    proc = start_run(request, backend, "--image", shell_image, "-w", where, "--name", name, "--", "sh", "-c", AGENT)
    wait_long(lambda: started(request, backend, where), "the agent runs", proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 143, err.decode()
    (record,) = [r for r in lines(out) if r.get("kind") == "container"]
    assert record["outcome"] == "interrupted" and record["container_removed"] is True, record
    assert b"Traceback" not in err
    if backend == "vm":
        left = request.getfixturevalue("guest_vm").sh(f"podman ps -aq --filter name=^{name}$")
    else:
        left = subprocess.run(["podman", "ps", "-aq", "--filter", f"name=^{name}$"], capture_output=True,
                              check=True).stdout
    assert left.strip() == b"", left
    listed = subprocess.run([str(BIN / "kp-ls"), "container"], env=env_of(request, backend), capture_output=True,
                            timeout=BOUND)
    assert name not in listed.stdout.decode()
