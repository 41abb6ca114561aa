"""kp-run --audit: strace from the host records what the agent did, and the agent cannot see it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BIN, lines
from tests.integration.test_run import one_podman_service  # noqa: F401 - the module's shared service

pytestmark = pytest.mark.integration

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
def test_audit_records_the_agent_from_outside(shell_image: str, tmp_path: Path, mode: str) -> None:
    ws = tmp_path / "proj"
    ws.mkdir()
    (ws / "main.py").write_text("print(1)\n")
    os.chown(ws, 4321, 4321)
    os.chown(ws / "main.py", 4321, 4321)
    proc = subprocess.run([str(BIN / "kp-run"), "--image", shell_image, "-w", str(ws), "--audit",
                           "--audit-mode", mode, "--", "bash", "-c", AGENT], capture_output=True, timeout=300)
    err = proc.stderr.decode()
    (record,) = lines(proc.stdout)
    assert record["exit_code"] == 7 and "TracerPid:\t0" in err  # the tracer is invisible inside
    log = Path(record["audit_log"])
    assert log.is_file() and record["audit_mode"] == mode and record["audit_blind"]
    assert not str(log).startswith(str(ws))  # out of the agent's reach: not in the workspace
    # kp-trace turns the container record into events of the agent (runc's start-up skipped)
    traced = subprocess.run([str(BIN / "kp-trace")], input=proc.stdout, capture_output=True, timeout=120)
    assert traced.returncode == 0, traced.stderr.decode()
    out = lines(traced.stdout)
    assert out[0]["name"] == record["name"]  # the record passes through first
    events = [e for e in out if e.get("kind") == "event"]
    assert all(e["container"] == record["name"] for e in events)
    assert [e for e in events if e["type"] == "parse_error"] == []
    execs = [e["argv"][0] for e in events if e["type"] == "exec" and e["outcome"] == "ok"]
    assert execs[:1] == ["bash"] and "grep" in execs and "cat" in execs and "python3" in execs
    assert not any("runc" in str(e.get("path")) for e in events)
    exits = [e for e in events if e["type"] == "exit" and e.get("code") == 7]
    assert exits
    if mode != "minimal":
        writes = {e["path"] for e in events if e["type"] == "file" and e.get("write")}
        assert "/workspace/audit.txt" in writes
        nets = [e for e in events if e["type"] == "net" and e.get("op") == "connect"]
        assert any(n["address"].get("address") == "192.0.2.1" and n["errno"] == "ENETUNREACH" for n in nets)
    summary = lines(subprocess.run([str(BIN / "kp-trace"), "--summary"], input=proc.stdout,
                                   capture_output=True, timeout=120).stdout)
    assert any(s.get("item") == "exec" and s["argv"][0] == "python3" for s in summary)
    subprocess.run([str(BIN / "kp-rm"), record["name"]], check=True, capture_output=True)
    assert not log.exists()
