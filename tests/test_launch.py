"""How a host run ends when its tracer or its Podman service dies, with a fake engine and real
processes standing in for the container and the tracer."""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from kodepipe.container import engine
from kodepipe.container import folders as containers
from kodepipe.container import hostrun as launch
from kodepipe.container.policy import Policy
from kodepipe.core import proc
from kodepipe.core.errors import KpError
from kodepipe.core.state import Store, new_id, now_iso
from tests import policies


class FakeEngine:
    """Podman as kp-run sees it; ``lost`` makes every call fail as if the service had died."""

    url = "unix:///nowhere/podman.sock"

    def __init__(self, *, lost: bool = False, revives: bool = True, own: bool = True,
                 state: dict[str, Any] | None = None, named: str | None = None) -> None:
        self.lost, self.revives, self.own = lost, revives, own
        self.state = state or {"Status": "exited", "ExitCode": 0}
        self.named = named
        self.calls: list[tuple[str, ...]] = []

    def _call(self, *what: str) -> None:
        self.calls.append(what)
        if self.lost:
            raise engine.EngineLost(f"{what[0]}: the Podman service at {self.url} stopped answering")

    def inspect(self, cid: str) -> dict[str, Any]:
        self._call("inspect", cid)
        return {"State": self.state}

    def kill(self, cid: str, signal: str = "KILL") -> None:
        self._call("kill", cid)

    def remove(self, cid: str) -> None:
        self._call("remove", cid)

    def find(self, name: str, run_id: str) -> str | None:
        self._call("find", name, run_id)
        return self.named

    def revive(self, progress: Any = None) -> FakeEngine:
        self.calls.append(("revive",))
        if not self.revives:
            raise engine.EngineLost("the Podman service does not answer any more")
        return FakeEngine(own=self.own, state={"Status": "exited", "ExitCode": 137}, named=self.named)


@pytest.fixture
def container_process() -> Iterator[subprocess.Popen[bytes]]:
    """A real process in the role of the container's first process."""
    stand_in = subprocess.Popen(["sleep", "600"])
    yield stand_in
    stand_in.kill()
    stand_in.wait()


def job(eng: FakeEngine, said: list[str], *, cid: str | None = "c1d", keep: bool = False,
        pid: int | None = None, audit: str | None = None) -> launch.Run:
    """A Run as start() leaves it: its folder and meta.json exist, a container was asked for."""
    req = policies.policy(keep=keep, audit=audit)
    run = launch.Run(Store(), req, lambda level, message: said.append(f"{level}: {message}"))
    run.folder = Store().folder("container", run.name)
    run.folder.mkdir(parents=True)
    run.meta.update(id=new_id(), created=now_iso(), state="running", container_name=run.name, host="local",
                    pid=1, pid_start=1, boot_id=proc.boot_id())
    run.engine, run.made, run.cid = eng, True, cid
    if pid is not None:
        run.container_pid, run.container_pid_start = pid, proc.start_time(pid)
        run.meta.update(container_pid=pid, container_pid_start=run.container_pid_start)
    return run


def test_a_lost_own_service_is_started_again_and_the_container_removed(
        container_process: subprocess.Popen[bytes]) -> None:
    said: list[str] = []
    run = job(FakeEngine(lost=True), said, pid=container_process.pid)
    record = run.finish(None, "engine-lost")
    assert container_process.wait(timeout=30) == -signal.SIGKILL  # stopped at once, before any restart
    assert run.engine.calls == [("inspect", "c1d"), ("kill", "c1d"), ("remove", "c1d")]
    assert record["container_removed"] is True and record["removed"] is True
    assert "container_pid" not in record and "pid" not in record
    assert any("starting it again" in s for s in said)


def test_a_service_that_stays_lost_leaves_a_stopped_container_and_a_folder_for_kp_rm(
        container_process: subprocess.Popen[bytes]) -> None:
    said: list[str] = []
    run = job(FakeEngine(lost=True, revives=False, own=False), said, pid=container_process.pid)
    record = run.finish(None, "engine-lost")
    assert container_process.wait(timeout=30) == -signal.SIGKILL
    assert record["container_removed"] is False and "kp-rm removes it" in record["problem"]
    assert run.folder is not None and run.folder.is_dir() and record["path"] == str(run.folder)
    meta = Store().read_meta(run.folder)
    assert meta is not None and containers.needs_removal(meta)


def test_a_container_whose_id_never_came_back_is_found_by_name_and_removed() -> None:
    said: list[str] = []
    run = job(FakeEngine(named="f00d"), said, cid=None)
    record = run.finish(None, "failed")
    assert ("find", run.name, run.meta["id"]) in run.engine.calls and ("remove", "f00d") in run.engine.calls
    assert record["container_id"] == "f00d" and record["container_removed"] is True
    nothing: list[str] = []
    run = job(FakeEngine(named=None), nothing, cid=None)
    assert run.finish(None, "failed")["container_removed"] is True and run.engine.calls[-1][0] == "find"


def test_engine_lost_is_reported_with_what_became_of_the_container(monkeypatch: pytest.MonkeyPatch) -> None:
    def attached_run(self: launch.Run) -> int:
        raise engine.EngineLost("waiting for the container: the Podman service stopped answering")

    for revives, words in [(True, "started the service again, and stopped and removed"),
                           (False, "could not remove it: kp-rm")]:
        monkeypatch.setattr(launch.Run, "prepare", lambda self: None)
        monkeypatch.setattr(launch.Run, "start", lambda self, box, r=revives: _started(self, r))
        monkeypatch.setattr(launch.Run, "attached_run", attached_run)
        monkeypatch.setattr(launch, "refuse", lambda policy: None)  # as root
        req = policies.policy()
        with pytest.raises(engine.EngineLost) as caught:
            launch.run(Store(), req, lambda level, message: None)
        assert caught.value.code == "engine_lost" and words in caught.value.message
        record = caught.value.record
        assert record["outcome"] == "engine-lost" and record["container_removed"] is revives


def _started(run: launch.Run, revives: bool) -> None:
    fake = job(FakeEngine(lost=True, revives=revives, own=revives), [])
    run.folder, run.meta, run.engine, run.made, run.cid = fake.folder, fake.meta, fake.engine, True, "c1d"
    run.name = fake.name


@pytest.mark.parametrize("how", ["SIGKILL", "exit 1", "exit 0"])
def test_a_tracer_that_dies_stops_the_container_and_the_audit_says_so(
        how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    killed: list[str] = []

    class Podman:
        def __init__(self, url: str) -> None:
            pass

        def kill(self, cid: str, signal: str = "KILL") -> None:
            killed.append(cid)

    monkeypatch.setattr(engine, "Engine", Podman)
    said: list[str] = []
    run = job(FakeEngine(), said, audit="default")
    script = {"SIGKILL": "exec sleep 600", "exit 1": "echo 'strace: ptrace(PTRACE_SEIZE): no' >&2; exit 1",
              "exit 0": "exit 0"}[how]
    tracer = subprocess.Popen(["sh", "-c", script], stderr=subprocess.PIPE)
    run.strace = tracer
    reader = run.tracer_reader = threading.Thread(target=run._read_tracer, args=(tracer.stderr,), daemon=True)
    reader.start()
    run.tracer_watch = threading.Thread(target=run._watch_tracer, args=(tracer,), daemon=True)
    run.tracer_watch.start()
    if how == "SIGKILL":
        tracer.kill()
    run.tracer_watch.join(timeout=30)
    reader.join(timeout=30)
    record = run.finish(137 if how != "exit 0" else 0, "exited")
    if how == "exit 0":  # strace's own end when the last traced process has ended: all recorded
        assert record["audit"] == "complete" and "audit_problem" not in record and killed == []
        assert record["outcome"] == "exited"
        return
    assert killed == ["c1d"] and record["audit"] == "incomplete" and record["outcome"] == "audit-lost"
    assert record["exit_code"] == 137
    problem = record["audit_problem"]
    assert ("killed by SIGKILL" if how == "SIGKILL" else "ended with status 1") in problem
    assert "stopped the container" in problem
    if how == "exit 1":
        assert "PTRACE_SEIZE" in problem  # strace's own last words say why


def test_a_tracer_ended_by_kp_run_itself_is_not_a_lost_audit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "STRACE_END_WAIT", 0.2)
    said: list[str] = []
    run = job(FakeEngine(), said, audit="default")
    tracer = subprocess.Popen(["sleep", "600"], stderr=subprocess.PIPE)  # a tracer that never ends by itself
    run.strace = tracer
    run.tracer_watch = threading.Thread(target=run._watch_tracer, args=(tracer,), daemon=True)
    run.tracer_watch.start()
    record = run.finish(0, "exited")
    assert tracer.wait(timeout=30) == -signal.SIGKILL
    assert record["audit"] == "incomplete" and "did not end within" in record["audit_problem"]


def test_kp_run_reports_an_incomplete_audit_as_a_failed_record(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.cli import invoke

    def fake_run(store: Store, req: Policy, say: Any) -> tuple[dict[str, Any], int]:
        return ({"kind": "container", "name": "r", "id": "abc", "exit_code": 0, "audit": "incomplete",
                 "audit_problem": "strace (pid 1) was killed by SIGKILL while the container ran"}, 0)

    monkeypatch.setattr(launch, "run", fake_run)
    monkeypatch.setattr(launch, "refuse", lambda policy: None)  # as root
    result = invoke("kp-run", "--image", "x", "--", "true")
    assert result.status == 1 and "Traceback" not in result.stderr
    (record,) = result.records
    assert record["error"]["code"] == "audit_incomplete" and record["exit_code"] == 0
    assert "killed by SIGKILL" in result.stderr


def test_kp_run_reports_a_lost_engine_without_a_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.cli import invoke

    def fake_run(store: Store, req: Policy, say: Any) -> tuple[dict[str, Any], int]:
        lost = engine.EngineLost("the Podman service stopped answering; kp-run stopped and removed the container")
        lost.record = {"kind": "container", "name": "r", "id": "abc", "outcome": "engine-lost"}
        raise lost

    monkeypatch.setattr(launch, "run", fake_run)
    monkeypatch.setattr(launch, "refuse", lambda policy: None)  # as root
    result = invoke("kp-run", "--image", "x", "--", "true")
    assert result.status == 1 and "Traceback" not in result.stderr
    (record,) = result.records
    assert record["error"]["code"] == "engine_lost" and record["outcome"] == "engine-lost"


def test_a_service_that_does_not_answer_is_a_lost_engine() -> None:
    assert issubclass(engine.EngineLost, KpError) and engine.EngineLost.code == "engine_lost"
    eng = engine.Engine("unix:///nonexistent/kodepipe-test/podman.sock")
    with pytest.raises(engine.EngineLost) as caught:
        eng.inspect("c1d")
    assert "stopped answering" in caught.value.message and "Traceback" not in caught.value.message
    with pytest.raises(engine.EngineLost):
        eng.attach("c1d")
