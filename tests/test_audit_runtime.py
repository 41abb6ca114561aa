"""kp-run --audit's OCI runtime wrapper and plans (strace.runtime_wrapper, runtime_plan), run for real
with a stand-in runtime; where the runtime's setup ends in a log (setup_end); proc.Foreign; and the
engine's standard-library HTTP client against a real unix socket."""

from __future__ import annotations

import http.server
import os
import re
import signal
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from kodepipe.audit import strace
from kodepipe.container import engine
from kodepipe.core import proc

ID = "0123456789abcdef" * 4


@pytest.fixture
def wrapper(tmp_path: Path) -> Path:
    runtime = tmp_path / "runc"
    runtime.write_text('#!/bin/sh\necho "runtime $*"\n')
    runtime.chmod(0o755)
    plans = tmp_path / "plans"
    plans.mkdir()
    script = tmp_path / "oci" / "runc"
    script.parent.mkdir()
    script.write_text(strace.runtime_wrapper(str(runtime), str(plans)))
    script.chmod(0o700)
    return script


def call(wrapper: Path, *args: str) -> str:
    return subprocess.run([str(wrapper), *args], capture_output=True, text=True, check=True, timeout=30).stdout


def test_the_wrapper_runs_a_plan_only_for_the_create_it_was_left_for(wrapper: Path) -> None:
    plans = wrapper.parent.parent / "plans"
    (plans / ID).write_text('echo "plan $*"\n')
    runtime = wrapper.parent.parent / "runc"
    assert call(wrapper, "--root", "/r", "create", "--bundle", "/b", ID) == \
        f"plan {runtime} --root /r create --bundle /b {ID}\n"  # the plan is given the runtime the wrapper wraps
    assert call(wrapper, "start", ID) == f"runtime start {ID}\n"  # every other command goes to the runtime
    other = "f" * 64
    assert call(wrapper, "create", "--bundle", "/b", other) == f"runtime create --bundle /b {other}\n"
    # an id that is not hexadecimal never names a file: a path cannot be smuggled in
    (plans / "x").write_text('echo "plan"\n')
    assert call(wrapper, "create", "../plans/x") == "runtime create ../plans/x\n"
    assert call(wrapper, "create", "x") == "runtime create x\n"


def test_the_plan_runs_the_runtime_under_strace_with_the_modes_filter(tmp_path: Path) -> None:
    plan = strace.runtime_plan("/usr/bin/strace", "default", str(tmp_path / "a log"), str(tmp_path / "err"))
    assert plan.endswith('"$runtime" "$@"\n') and 'rm -f -- "$0"' in plan  # it runs once
    argv = plan.splitlines()[-1].split()
    assert argv[:3] == ["exec", "/usr/bin/strace", "-DDD"] and "--seccomp-bpf" in argv
    assert argv[argv.index("--") + 1] == "/bin/sh" and f"'{tmp_path}/a log'" in plan
    assert "trace=%process,%file" not in plan and "openat" in plan and "newfstatat" not in plan


def test_a_plan_is_used_once_and_stracess_messages_stay_out_of_the_containers_output(tmp_path: Path) -> None:
    """A plan removes itself before anything else (a later create of the same container, as Podman
    makes for a restart, must not truncate the first run's log); strace's own stderr goes to the
    run's file, while the runtime, and so the container, keep the stderr they were given."""
    runtime = tmp_path / "runc"
    runtime.write_text('#!/bin/sh\necho "runtime says" >&2\n')
    runtime.chmod(0o755)
    plans = tmp_path / "plans"
    plans.mkdir()
    script = tmp_path / "wrapper"
    script.write_text(strace.runtime_wrapper(str(runtime), str(plans)))
    script.chmod(0o700)
    errors = tmp_path / "strace.err"

    def create(log: Path) -> subprocess.CompletedProcess[str]:
        (plans / ID).write_text(strace.runtime_plan(proc.require("strace"), "default", str(log), str(errors)))
        done = subprocess.run([str(script), "create", ID], capture_output=True, text=True, timeout=60)
        assert not (plans / ID).exists()
        return done

    done = create(tmp_path / "audit.strace")
    assert done.stderr == "runtime says\n" and "runtime says" not in errors.read_text()
    assert "execve(" in (tmp_path / "audit.strace").read_text()  # it ran under strace
    failed = create(tmp_path / "no" / "log")  # a strace that cannot write its log says so, in the file
    assert "strace" in errors.read_text() and "strace" not in failed.stderr and failed.returncode != 0
    again = subprocess.run([str(script), "create", ID], capture_output=True, text=True, timeout=60)
    assert again.stderr == "runtime says\n"  # no plan now: the runtime alone


def test_a_real_strace_started_this_way_filters_and_traces_the_runtimes_children(tmp_path: Path) -> None:
    """The plan's strace, the wrapper's dispatch, a stand-in runtime that starts "the container": the
    child is traced with strace's seccomp filter, by a tracer that is not its parent."""
    runtime = tmp_path / "runc"
    runtime.write_text('#!/bin/sh\nsh -c \'grep -E "^(TracerPid|Seccomp):" /proc/self/status > "$0"; echo x > "$0.w"\' '
                       f'{tmp_path}/child\n')
    runtime.chmod(0o755)
    log = tmp_path / "audit.strace"
    plans = tmp_path / "plans"
    plans.mkdir()
    (plans / ID).write_text(strace.runtime_plan(proc.require("strace"), "default", str(log), str(tmp_path / "err")))
    script = tmp_path / "wrapper"
    script.write_text(strace.runtime_wrapper(str(runtime), str(plans)))
    script.chmod(0o700)
    subprocess.run([str(script), "create", ID], check=True, timeout=60)
    status = dict(line.split(":\t") for line in (tmp_path / "child").read_text().splitlines())
    assert status["Seccomp"] == "2" and int(status["TracerPid"]) not in (0, os.getpid())
    # the tracer is nobody's child here: the log is whole once the runtime's own exit is in it
    deadline = time.monotonic() + 60
    # (strace pads its pid column: "5662  1796..." when another pid is wider)
    while not re.search(rb"^(\d+) +.*execve\(.*\n(?:.*\n)*\1 +[\d.]+ \+\+\+ exited", log.read_bytes(), re.M):
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.05)
    text = log.read_text()
    assert f'"{tmp_path}/child.w"' in text and "O_WRONLY|O_CREAT" in text  # the child's write, at its open
    assert "newfstatat(" not in text and "wait4(" not in text  # the default mode's look-only calls are not
    lines = log.read_bytes().splitlines(keepends=True)
    first = int(lines[0].split()[0])
    assert strace.setup_end(lines, first) is not None
    assert strace.setup_end(lines, 1) is None


def test_setup_end_counts_the_runtimes_lines() -> None:
    log = [b"10 1.0 openat(AT_FDCWD, \"/x\", O_RDONLY) = 3\n",
           b"12 1.1 execve(\"/proc/self/exe\", [\"runc\", \"init\"], 0x1 /* 3 vars */) = 0\n",
           b"12 1.2 openat(AT_FDCWD, \"exec.fifo\", O_WRONLY <unfinished ...>\n",
           b"121 1.25 execve(\"/bin/true\", [\"true\"], 0x1 /* 3 vars */) = 0\n",
           b"12 1.3 execve(\"/bin/sh\", [\"sh\"], 0x2 /* 3 vars */ <unfinished ...>\n",
           b"12 1.4 <... execve resumed>) = 0\n"]
    assert strace.setup_end(log[:1] + log[2:], 12) == 3  # pid 121 is not pid 12
    assert strace.setup_end(log, 12) == 1  # the first execve of the process, whatever it runs
    assert strace.setup_end(log, 99) is None and strace.setup_end(log, 12, limit=1) is None


def test_a_foreign_process_is_watched_and_signalled_by_its_pidfd() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        foreign = proc.Foreign(child.pid)
        assert foreign.poll() is None
        with pytest.raises(subprocess.TimeoutExpired):
            foreign.wait(timeout=0.05)
        foreign.send_signal(signal.SIGTERM)
        child.wait(timeout=30)  # reaped: the pidfd still tells that it ended, and signals go nowhere
        assert foreign.wait(timeout=30) == 0 and foreign.poll() == 0
        with pytest.raises(ProcessLookupError):
            foreign.send_signal(signal.SIGKILL)
        foreign.kill()  # quietly nothing
        foreign.close()
    finally:
        child.kill()
        child.wait()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: ClassVar[list[tuple[str, str, bytes]]] = []

    def _answer(self, body: bytes, status: int = 200) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.seen.append((self.command, self.path, self.rfile.read(length)))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer(b'{"Id": "abc"}' if self.path.endswith("/json") else b"nope", 200 if "json" in self.path else 404)

    def do_POST(self) -> None:
        self._answer(b"0\n")

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        pass


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


@pytest.fixture
def service(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "podman.sock")
    server = _UnixServer(path, _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield path
    server.shutdown()
    server.server_close()


def test_the_engines_http_client_speaks_to_a_unix_socket(service: str) -> None:
    _Handler.seen.clear()
    eng = engine.Engine(f"unix://{service}")
    assert eng.ping()
    assert eng.inspect("abc") == {"Id": "abc"}
    assert eng.wait("abc") == 0
    eng.kill("abc", "TERM")
    assert ("GET", "/v4.0.0/libpod/containers/abc/json", b"") in _Handler.seen
    assert ("POST", "/v4.0.0/libpod/containers/abc/kill?signal=TERM", b"") in _Handler.seen
    wait = [p for m, p, _ in _Handler.seen if p.startswith("/v4.0.0/libpod/containers/abc/wait")]
    assert wait == ["/v4.0.0/libpod/containers/abc/wait?condition=exited&interval=10ms"]


def test_a_service_that_is_gone_is_engine_lost(tmp_path: Path) -> None:
    eng = engine.Engine(f"unix://{tmp_path}/none.sock")
    assert not eng.ping()
    with pytest.raises(engine.EngineLost):
        eng.inspect("abc")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "mute.sock"))
    listener.listen(1)

    def hang_up() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.close()  # no answer at all

    threading.Thread(target=hang_up, daemon=True).start()
    with pytest.raises(engine.EngineLost):
        engine.Engine(f"unix://{tmp_path}/mute.sock").inspect("abc")
    listener.close()


def test_kp_runs_own_service_is_not_pinged_when_its_socket_is_there(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # kp-run's start-up: an existing socket is trusted, and the first real request proves it
    rt = tmp_path / "rt"
    rt.mkdir(mode=0o700)
    monkeypatch.setenv("KODEPIPE_RUNTIME_DIR", str(rt))
    server = _UnixServer(str(rt / "podman.sock"), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    started: list[Path] = []
    monkeypatch.setattr(engine, "_start_service", started.append)
    try:
        _Handler.seen.clear()
        eng = engine.Engine.connect()
        assert eng.inspect("abc") == {"Id": "abc"}
        assert [(m, p) for m, p, _ in _Handler.seen] == [("GET", "/v4.0.0/libpod/containers/abc/json")]
        assert started == []
    finally:
        server.shutdown()
        server.server_close()


def test_a_stale_socket_of_kp_runs_own_service_starts_it_and_the_request_is_made_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rt = tmp_path / "rt"
    rt.mkdir(mode=0o700)
    monkeypatch.setenv("KODEPIPE_RUNTIME_DIR", str(rt))
    sock = rt / "podman.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()  # the file of a service that ended: nobody listens on it
    servers: list[Any] = []

    def start(path: Path) -> None:
        path.unlink()
        servers.append(_UnixServer(str(path), _Handler))
        threading.Thread(target=servers[-1].serve_forever, daemon=True).start()

    monkeypatch.setattr(engine, "_start_service", start)
    told: list[str] = []
    try:
        _Handler.seen.clear()
        eng = engine.Engine.connect(told.append)
        assert eng.wait("abc") == 0
        assert told == ["starting a Podman API service"] and len(servers) == 1
        waits = [p for m, p, _ in _Handler.seen if "/wait" in p]
        assert len(waits) == 1  # asked once, after the start: the refused attempt sent nothing
        # proven now: a service that goes away later is a lost engine, never started again silently
        servers[0].shutdown()
        servers[0].server_close()
        with pytest.raises(engine.EngineLost):
            eng.inspect("abc")
        assert len(servers) == 1
    finally:
        for server in servers:
            server.server_close()
