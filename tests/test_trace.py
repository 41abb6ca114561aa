"""kp-trace through click's runner (strace text and container records on stdin)
and, marked integration, tracing real commands with real strace."""

from __future__ import annotations

import shutil
from pathlib import Path

import orjson
import pytest

from tests.cli import invoke
from tests.conftest import kp, lines

HERE = Path(__file__).resolve().parent / "strace"


def test_strace_text_on_stdin_becomes_events() -> None:
    text = (HERE / "net.strace").read_bytes()
    result = invoke("kp-trace", input=text)
    assert result.status == 0, result.stderr
    assert result.stderr == ""
    evs = result.records
    assert all(e["kind"] == "event" and e["schema"] == 1 for e in evs)
    assert evs == [orjson.loads(x) for x in (HERE / "net.expected.jsonl").read_bytes().splitlines()]


def test_summary_lists_writes_programs_destinations_and_denials() -> None:
    result = invoke("kp-trace", "--summary", input=(HERE / "denied.strace").read_bytes())
    assert result.status == 0, result.stderr
    items = result.records
    assert all(r["kind"] == "summary" for r in items)
    execs = {r["path"]: (r["exit_code"], r["signal"]) for r in items if r["item"] == "exec"}
    assert execs["/usr/bin/cat"] == (1, None)
    assert execs["/tmp/kp-fixture.sHEl1u/seccomp"] == (None, "SIGSYS")
    denied = {(r["path"] or r["syscall"], r["errno"]) for r in items if r["item"] == "denied"}
    assert {("/root/.bashrc", "EACCES"), ("/etc/kp-denied", "EACCES"), ("/tmp/kp-denied-dir", "EPERM"),
            ("socket", None)} <= denied
    totals = items[-1]
    assert totals["item"] == "totals" and totals["denied"] == len(denied) and totals["parse_errors"] == 0


def test_container_records_with_an_audit_log_are_passed_through_then_their_events(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    log.write_bytes((HERE / "minimal.strace").read_bytes())
    records = [{"kind": "container", "name": "c1", "audit_log": str(log), "x": 1},
               {"kind": "vm", "name": "v"},
               {"kind": "container", "name": "c2", "audit_log": str(tmp_path / "gone.log")}]
    result = invoke("kp-trace", input=b"\n".join(orjson.dumps(r) for r in records) + b"\nnot json\n")
    assert result.status == 65  # the bad line wins over the failed record
    out = result.records
    assert out[0] == records[0]
    evs = [r for r in out if r["kind"] == "event"]
    assert evs and all(e["container"] == "c1" for e in evs)
    assert out[len(evs) + 1] == records[1]
    assert out[-1]["name"] == "c2" and out[-1]["error"]["code"] == "not_found"
    assert "line 4" in result.stderr


def test_the_audit_of_a_run_whose_tracer_died_is_still_read_but_other_failures_pass_through(
        tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    log.write_bytes((HERE / "minimal.strace").read_bytes())
    lost = {"kind": "container", "name": "c1", "audit_log": str(log), "audit": "incomplete",
            "error": {"code": "audit_incomplete", "message": "strace was killed"}}
    other = {"kind": "container", "name": "c2", "audit_log": str(log),
             "error": {"code": "failed", "message": "Podman refused the spec"}}
    result = invoke("kp-trace", input=orjson.dumps(lost) + b"\n" + orjson.dumps(other) + b"\n")
    assert result.status == 0, result.stderr
    out = result.records
    assert out[0] == lost and out[-1] == other
    evs = out[1:-1]
    assert evs and all(e["kind"] == "event" and e["container"] == "c1" for e in evs)


def test_nothing_to_read_is_a_usage_error() -> None:
    result = invoke("kp-trace", input=None)
    assert result.status in (0, 2)  # the test runner's stdin is an empty stream: nothing to do


needs_strace = pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")


@pytest.mark.integration
@needs_strace
@pytest.mark.parametrize("mode", ["minimal", "default", "full"])
def test_tracing_a_real_command_in_each_mode(mode: str, tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    proc = kp("kp-trace", "--mode", mode, "--log", str(tmp_path / "raw.log"), "--", "sh", "-c",
              f"echo hi > {target}; cat {target}; ls /nonexistent; exit 7")
    assert proc.returncode == 0, proc.stderr
    records = lines(proc.stdout)
    first, last = records[0], records[-1]
    assert first["kind"] == "trace" and first["mode"] == mode and first["blind"]
    assert last["state"] == "exited" and last["exit_code"] == 7
    assert b"hi" in proc.stderr  # the command's output never mixes with records
    evs = [r for r in records if r["kind"] == "event"]
    assert [e for e in evs if e["type"] == "parse_error"] == []
    programs = [e["argv"][0] for e in evs if e["type"] == "exec" and e["outcome"] == "ok"]
    assert programs == ["sh", "cat", "ls"]
    writes = {e["path"] for e in evs if e["type"] == "file" and e.get("write")}
    assert (str(target) in writes) == (mode != "minimal")
    assert (tmp_path / "raw.log").stat().st_size > 0


@pytest.mark.integration
@needs_strace
def test_a_denied_network_attempt_is_an_event(tmp_path: Path) -> None:
    code = "import socket\ns = socket.socket()\ntry: s.connect(('127.0.0.1', 9))\nexcept OSError: pass"
    proc = kp("kp-trace", "--summary", "--", "python3", "-I", "-S", "-c", code)
    assert proc.returncode == 0, proc.stderr
    # Only the inet attempts: the C library may also try local sockets (nscd) on some machines.
    nets = [r for r in lines(proc.stdout) if r.get("item") == "net" and r["address"]["family"] == "AF_INET"]
    assert nets == [{"kind": "summary", "item": "net", "op": "connect",
                     "address": {"family": "AF_INET", "address": "127.0.0.1", "port": 9}, "count": 1,
                     "outcomes": {"ECONNREFUSED": 1}}]
