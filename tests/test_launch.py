"""The host run as an owned lifecycle, with a fake engine and real processes standing in for the container
and the tracer: the stages in their order (learn, stage, render, start, run, finish), the clean-up when each
one fails, and how a run ends when its tracer or its Podman service dies."""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kodepipe.container import engine, seccomp, userns
from kodepipe.container import folders as containers
from kodepipe.container import hostrun as launch
from kodepipe.container.policy import Policy
from kodepipe.container.sandbox import DEFAULT_QUOTAS
from kodepipe.core import proc
from kodepipe.core.errors import BadInput, KpError
from kodepipe.core.records import Record
from kodepipe.core.state import Store, new_id, now_iso
from kodepipe.host import hostpath
from tests import policies


class FakeEngine:
    """Podman as kp-run sees it; ``lost`` makes every call fail as if the service had died; ``fail``:
    the call that raises (and what), for the lifecycle's failure at each stage."""

    url = "unix:///nowhere/podman.sock"

    def __init__(self, *, lost: bool = False, revives: bool = True, own: bool = True,
                 state: dict[str, Any] | None = None, named: str | None = None, pid: int = 0,
                 fail: dict[str, BaseException] | None = None, log: list[str] | None = None) -> None:
        self.lost, self.revives, self.own = lost, revives, own
        self.state = state or {"Status": "exited", "ExitCode": 0, "Pid": pid}
        self.named = named
        self.fail = fail or {}
        self.calls: list[tuple[str, ...]] = []
        self.log = log if log is not None else []

    def _call(self, *what: str) -> None:
        self.calls.append(what)
        self.log.append(what[0])
        if self.lost:
            raise engine.EngineLost(f"{what[0]}: the Podman service at {self.url} stopped answering")
        if what[0] in self.fail:
            raise self.fail.pop(what[0])

    def create(self, spec: dict[str, Any]) -> str:
        self._call("create")
        return "c1d"

    def init(self, cid: str) -> None:
        self._call("init", cid)

    def inspect(self, cid: str) -> dict[str, Any]:
        self._call("inspect", cid)
        return {"State": self.state}

    def attach(self, cid: str) -> object:
        self._call("attach", cid)
        return object()

    def start(self, cid: str) -> None:
        self._call("start", cid)

    def stream(self, cid: str, writers: dict[int, Any], attached: object) -> None:
        self._call("stream", cid)

    def wait(self, cid: str) -> int:
        self._call("wait", cid)
        return int(self.state.get("ExitCode", 0))

    def kill(self, cid: str, signal: str = "KILL") -> None:
        self._call("kill", cid)

    def remove(self, cid: str) -> None:
        self._call("remove", cid)

    def find(self, name: str, run_id: str) -> str | None:
        self._call("find", name, run_id)
        return self.named

    def revive(self, progress: Any = None) -> FakeEngine:
        self.calls.append(("revive",))
        self.log.append("revive")
        if not self.revives:
            raise engine.EngineLost("the Podman service does not answer any more")
        return FakeEngine(own=self.own, state={"Status": "exited", "ExitCode": 137}, named=self.named, log=self.log)


def bare_facts() -> launch.HostFacts:
    """The host's facts for a run without a workspace."""
    return launch.HostFacts(name="host", workspace=None, uid=1000, gid=1000, uid_from="test",
                            seccomp=Path("/nowhere/seccomp.json"), seccomp_text=b"{}", oci_runtime=None,
                            quotas=DEFAULT_QUOTAS)


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
    run = launch.Run(Store(), req, bare_facts(), lambda level, message: said.append(f"{level}: {message}"))
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


def test_engine_lost_is_reported_with_what_became_of_the_container(
        lifecycle: Lifecycle, container_process: subprocess.Popen[bytes]) -> None:
    for revives, words in [(True, "started the service again, and stopped and removed"),
                           (False, "could not remove it: kp-rm")]:
        eng = FakeEngine(pid=container_process.pid, revives=revives, own=revives)

        def lost(*what: str, eng: FakeEngine = eng) -> None:  # the service dies while the container runs
            eng.lost = True
            raise engine.EngineLost("waiting for the container: the Podman service stopped answering")

        eng.wait = lost  # type: ignore[method-assign,assignment]
        with pytest.raises(engine.EngineLost) as caught:
            lifecycle.run(policies.policy(), eng)
        assert caught.value.code == "engine_lost" and words in caught.value.message
        record = caught.value.record
        assert record["outcome"] == "engine-lost" and record["container_removed"] is revives


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

    def fake_run(store: Store, req: Policy, say: Any, **kw: Any) -> tuple[dict[str, Any], int]:
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

    def fake_run(store: Store, req: Policy, say: Any, **kw: Any) -> tuple[dict[str, Any], int]:
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


# -- the lifecycle, stage by stage ------------------------------------------------------------------


class Lifecycle:
    """The host run with a fake engine: what each stage did, in order; nothing is mounted and no Podman
    service is started (the quarantine's mount and the container's mount check are stand-ins)."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.log: list[str] = []
        self.facts: list[launch.HostFacts] = []
        self.wrong: list[str] = []  # what verify_mounts finds wrong
        self.said: list[str] = []
        self.ws = tmp_path / "ws"
        self.ws.mkdir()
        (self.ws / "a.txt").write_text("a\n")
        (self.ws / ".env").write_text("SECRET=1\n")
        self.secret = tmp_path / "token"
        self.secret.write_text("t")
        log = self.log
        monkeypatch.setattr(launch, "refuse", lambda policy: None)  # as root, whoever runs the tests
        monkeypatch.setattr(seccomp, "planned", lambda folder: (tmp_path / "seccomp.json", b"{}"))
        real_run, real_creating, real_unmount = proc.run, Store.creating, containers.unmount

        def run(argv: list[Any], **kw: Any) -> Any:
            if argv[0] != "mount":
                return real_run(argv, **kw)
            log.append("mount")  # the quarantine's overlay: not mounted here
            return subprocess.CompletedProcess(argv, 0, b"", b"")

        def creating(store: Store, kind: str, name: str, meta: dict[str, Any]) -> Any:
            log.append("folder")
            return real_creating(store, kind, name, meta)

        def unmount(folder: Path) -> None:
            log.append("unmount")
            real_unmount(folder)

        def verify(pid: int, expected: Any) -> list[str]:
            log.append("verify")
            return list(self.wrong)

        monkeypatch.setattr(proc, "run", run)
        monkeypatch.setattr(Store, "creating", creating)
        monkeypatch.setattr(containers, "unmount", unmount)
        monkeypatch.setattr(hostpath, "verify_mounts", verify)
        monkeypatch.setattr(userns, "limit", lambda pid, values: log.append("quotas"))

    def learned(self, policy: Policy) -> launch.HostFacts:
        self.log.append("learn")
        facts = launch.learn(policy)
        self.facts.append(facts)
        return facts

    def run(self, policy: Policy, eng: FakeEngine, *,
            learned: Callable[[Policy], launch.HostFacts] | None = None,
            connect: Callable[[Any], Any] | None = None) -> tuple[Record, int | None]:
        eng.log = self.log

        def connected(progress: Any) -> FakeEngine:
            self.log.append("connect")
            return eng

        return launch.run(Store(), policy, lambda level, message: self.said.append(f"{level}: {message}"),
                          learned=learned or self.learned, connect=connect or connected)

    def policy(self, **kw: Any) -> Policy:
        return policies.policy(name="run-life", workspace=self.ws, secrets=[(self.secret, "/run/secrets/t")], **kw)

    def left(self) -> list[str]:
        """What of the run is left: its folder (or a half-made one), and any workspace fd still open."""
        parent = Store().folder("container", "run-life").parent
        out = [p.name for p in parent.glob("*run-life*")] if parent.is_dir() else []
        out += [f"fd of {f.workspace}" for f in self.facts if f.git is not None and f.git.root_fd >= 0]
        return out


@pytest.fixture
def lifecycle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Lifecycle:
    return Lifecycle(tmp_path, monkeypatch)


def test_learn_reads_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """learn: the workspace checked and scanned, its repositories surveyed, the seccomp profile's text
    derived; no folder, no seccomp file, no Podman service (Engine.connect is never called)."""
    from kodepipe.core import paths

    ws = tmp_path / "ws"
    (ws / ".git").mkdir(parents=True)
    (ws / ".env").write_text("x")
    (ws / "id_rsa").write_text("k")
    monkeypatch.setattr(launch, "refuse", lambda policy: None)
    monkeypatch.setattr(engine.Engine, "connect", classmethod(lambda cls, progress=None: pytest.fail("connected")))
    cache, state = paths.cache_dir(), Store().folder("container", "x").parent.parent
    before = [sorted(d.rglob("*")) if d.exists() else None for d in (cache, state)]
    with launch.learn(policies.policy(workspace=ws)) as facts:
        assert facts.workspace == ws.resolve() and facts.masked == (".env",)
        assert facts.credentials == ("id_rsa",) and any("id_rsa" in w for w in facts.warnings)
        assert facts.git is not None and ".git" in facts.git.repos and facts.git.root_fd >= 0
        assert not facts.seccomp.exists() and facts.seccomp_text
    assert facts.git.root_fd == -1  # closed with the facts
    assert [sorted(d.rglob("*")) if d.exists() else None for d in (cache, state)] == before


def test_the_stages_run_in_their_order_and_a_run_leaves_nothing(
        lifecycle: Lifecycle, container_process: subprocess.Popen[bytes]) -> None:
    record, status = lifecycle.run(lifecycle.policy(), FakeEngine(pid=container_process.pid))
    assert status == 0 and record["outcome"] == "exited" and record["removed"] is True
    assert lifecycle.log == ["learn", "connect", "folder", "create", "init", "inspect", "verify", "quotas",
                             "attach", "start", "stream", "wait", "inspect", "remove", "unmount"]
    assert record["masked"] == [".env"] and record["container_removed"] is True
    assert lifecycle.left() == []


# each stage's failure: (what fails, the call that fails, the log from there on, the outcome)
FAILURES: list[tuple[str, str, list[str], str]] = [
    ("learn", "learn", ["learn"], "failed"),
    ("connect", "connect", ["learn", "connect"], "failed"),
    ("overlay", "mount", ["folder", "mount", "unmount"], "failed"),
    ("secret", "secret", ["folder", "unmount"], "failed"),
    ("create", "create", ["create", "find", "unmount"], "failed"),
    ("init", "init", ["init", "inspect", "kill", "remove", "unmount"], "failed"),
    ("mounts", "verify", ["verify", "inspect", "kill", "remove", "unmount"], "failed"),
    ("stream", "stream", ["stream", "inspect", "kill", "remove", "unmount"], "failed"),
    ("interrupt", "wait", ["wait", "inspect", "kill", "remove", "unmount"], "interrupted"),
]


@pytest.mark.parametrize(("stage", "at", "tail", "outcome"), FAILURES, ids=[f[0] for f in FAILURES])
def test_a_stage_that_fails_leaves_nothing_and_its_error_carries_the_record(
        stage: str, at: str, tail: list[str], outcome: str, lifecycle: Lifecycle,
        container_process: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    boom: BaseException = KeyboardInterrupt() if stage == "interrupt" else KpError(f"{stage} failed")
    eng = FakeEngine(pid=container_process.pid, fail={at: boom})
    learned: Callable[[Policy], launch.HostFacts] | None = None
    connect: Callable[[Any], Any] | None = None
    if stage == "learn":
        def refused(policy: Policy) -> launch.HostFacts:
            lifecycle.log.append("learn")
            raise BadInput("the workspace is refused")

        learned = refused
    elif stage == "connect":
        def lost(progress: Any) -> Any:
            lifecycle.log.append("connect")
            raise boom

        connect = lost
    elif stage == "mounts":
        lifecycle.wrong = ["/workspace is not the workspace"]
    elif stage == "secret":
        def copy_secret(src: Any, dest: Path, **kw: Any) -> None:
            dest.write_text("half")  # a partial copy: gone with the folder
            raise boom

        monkeypatch.setattr(hostpath, "copy_secret", copy_secret)
    elif stage == "overlay":
        def mount_fails(argv: list[Any], **kw: Any) -> Any:
            lifecycle.log.append("mount")
            raise boom

        monkeypatch.setattr(proc, "run", mount_fails)
    with pytest.raises((KpError, KeyboardInterrupt)) as caught:
        lifecycle.run(lifecycle.policy(quarantine=stage == "overlay"), eng, learned=learned, connect=connect)
    record = getattr(caught.value, "record")  # noqa: B009 - a KeyboardInterrupt's is set, not declared
    assert record["outcome"] == outcome
    log = lifecycle.log
    assert log[len(log) - len(tail):] == tail, log
    assert lifecycle.left() == [], (stage, lifecycle.left())
    if "create" in log:
        assert record["container_removed"] is True
    if stage not in ("learn", "connect"):
        assert record["id"] and record["workspace"] == str(lifecycle.ws.resolve())


def test_a_failure_after_the_run_keeps_its_record(
        lifecycle: Lifecycle, container_process: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """The last metadata cannot be written (a full disk): the error still says what ran."""
    real = Store.write_meta

    def write_meta(store: Store, folder: Path, meta: dict[str, Any]) -> None:
        if meta.get("outcome") is not None:
            raise KpError("no space left on device")
        real(store, folder, meta)

    monkeypatch.setattr(Store, "write_meta", write_meta)
    with pytest.raises(KpError) as caught:
        lifecycle.run(lifecycle.policy(keep=True), FakeEngine(pid=container_process.pid))
    record = caught.value.record
    assert record["outcome"] == "exited" and record["exit_code"] == 0 and "pid" not in record


def test_kp_run_says_which_of_the_profiles_variables_it_does_not_have(monkeypatch: pytest.MonkeyPatch) -> None:
    """D6: sudo resets the environment; the profile's names it dropped are said and in the record."""
    from dataclasses import dataclass

    from kodepipe.container import gather
    from tests.cli import invoke

    @dataclass(frozen=True)
    class Prof:
        name: str = "agent"
        command: tuple[str, ...] = ("true",)
        memory: str = "2g"
        cpus: float = 2.0
        pids: int = 512
        time: str = "2h"
        allow: tuple[str, ...] = ()
        env: tuple[str, ...] = ("KP_TEST_SET", "KP_TEST_UNSET_A", "KP_TEST_UNSET_B")
        tty: bool = False
        credentials: tuple[str, ...] = ()

    def fake_run(store: Store, policy: Policy, say: Any, **kw: Any) -> tuple[dict[str, Any], int]:
        return {"kind": "container", "name": "r", "id": "abc", "exit_code": 0, **policy.record()}, 0

    monkeypatch.setattr(gather, "profile", lambda opts: Prof())
    monkeypatch.setattr(launch, "run", fake_run)
    monkeypatch.setattr(launch, "refuse", lambda policy: None)  # as root
    monkeypatch.setenv("KP_TEST_SET", "v")
    monkeypatch.delenv("KP_TEST_UNSET_A", raising=False)
    monkeypatch.delenv("KP_TEST_UNSET_B", raising=False)
    result = invoke("kp-run", "--profile", "agent", "--image", "x", "--", "true")
    assert result.status == 0, result.stderr
    (record,) = result.records
    assert record["env"] == ["KP_TEST_SET"] and record["env_missing"] == ["KP_TEST_UNSET_A", "KP_TEST_UNSET_B"]
    assert "KP_TEST_UNSET_A, KP_TEST_UNSET_B" in result.stderr and "--preserve-env=KP_TEST_UNSET_A,KP_TEST_UNSET_B" \
        in result.stderr
