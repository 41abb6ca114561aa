"""A malformed line on kp-run's stdin stops the run before anything runs, with a real image and
real Podman: the command would otherwise run on the host (or in the VMs named before the bad line)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BIN, lines

pytestmark = pytest.mark.integration

OWNER = 4321  # the workspace's owner: the agent writes as this uid when root runs kp-run without sudo


def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "proj"
    ws.mkdir()
    os.chown(ws, OWNER, OWNER)  # writable by the agent: a run that started would leave its mark
    return ws


@pytest.mark.parametrize("stdin", [
    b"not json\n",
    b'{"kind":"note"}\n{"kind":"note","v":' + b"[" * 300 + b"]" * 300 + b"}\n",
    b'{"kind":"vm","name":"a","id":5}\n',
    b'{"kind":"vm","name":"a","id":null}\n',
], ids=["not-json", "too-deep", "id-number", "id-null"])
def test_nothing_runs_anywhere_after_a_bad_stdin_line(shell_image: str, tmp_path: Path, stdin: bytes) -> None:
    ws = workspace(tmp_path)
    proc = subprocess.run([str(BIN / "kp-run"), "--image", shell_image, "-w", str(ws), "--",
                           "sh", "-c", "touch /workspace/ran; echo RAN"],
                          input=stdin, capture_output=True, timeout=300)
    assert proc.returncode == 65, proc.stderr.decode()
    assert b"Traceback" not in proc.stderr and b"nothing was run" in proc.stderr
    assert not (ws / "ran").exists() and b"RAN" not in proc.stderr
    assert [r for r in lines(proc.stdout) if r.get("kind") == "container"] == []


def test_the_same_run_with_good_records_only_runs_on_the_host(shell_image: str, tmp_path: Path) -> None:
    ws = workspace(tmp_path)
    proc = subprocess.run([str(BIN / "kp-run"), "--image", shell_image, "-w", str(ws), "--",
                           "sh", "-c", "touch /workspace/ran"],
                          input=b'{"kind":"note"}\n', capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    assert (ws / "ran").exists()
