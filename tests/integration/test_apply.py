"""kp-run --apply of quarantines made by real kp-run --quarantine runs in real Podman containers:
concurrent applies to one workspace never lose an update, and an apply killed half-way is
finished by the next one, leaving no temporary file in the workspace."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BIN, lines
from tests.integration.test_run import one_podman_service  # noqa: F401 - the module's shared service
from tests.test_apply import apply_proc, finish, temps, wait_for_markers

pytestmark = pytest.mark.integration

OWNER = 4321  # the workspace's owner: the "invoking user" when root runs kp-run without sudo


def reset(ws: Path) -> None:
    if ws.exists():
        shutil.rmtree(ws)
    (ws / "sub").mkdir(parents=True)
    (ws / "main.py").write_text("print('hello')\n")
    (ws / "old.txt").write_text("old\n")
    (ws / "sub" / "x.txt").write_text("x\n")
    for path in [ws, *ws.rglob("*")]:
        os.chown(path, OWNER, OWNER)


def quarantine(image: str, ws: Path, script: str) -> dict[str, Any]:
    proc = subprocess.run([str(BIN / "kp-run"), "--image", image, "-w", str(ws), "--quarantine", "--",
                           "bash", "-c", script], capture_output=True, timeout=300)
    records = lines(proc.stdout)
    assert records and records[-1]["state"] == "quarantined", proc.stderr.decode()
    return records[-1]


def test_concurrent_applies_of_real_quarantines_never_lose_an_update(shell_image: str, tmp_path: Path,
                                                                     kp_env: dict[str, Path]) -> None:
    ws = tmp_path / "proj"
    pause_dir = tmp_path / "pause"
    pause_dir.mkdir()
    for _trial in range(3):
        reset(ws)
        # two agents, each rewriting main.py its own way (and leaving a file of its own)
        runs = {who: quarantine(shell_image, ws, f"yes {who} | head -c 300000 > /workspace/main.py; "
                                                 f"echo {who} > /workspace/{who}.txt")
                for who in ("agent-a", "agent-b")}
        # both applies start, and are released together once both are ready
        procs = {who: apply_proc(record["name"], pause="ready", pause_dir=pause_dir) for who, record in runs.items()}
        for marker in wait_for_markers(pause_dir, 2, *procs.values()):
            marker.unlink()
        ended = {who: finish(proc) for who, proc in procs.items()}
        assert sorted(status for status, _, _ in ended.values()) == [0, 1], ended
        (winner,) = [who for who, (status, _, _) in ended.items() if status == 0]
        (loser,) = [who for who in runs if who != winner]
        assert ended[loser][1][-1]["error"]["code"] == "conflict", ended[loser][2]
        assert (ws / "main.py").read_bytes() == (f"{winner}\n".encode() * 40000)[:300000]
        assert (ws / f"{winner}.txt").exists() and not (ws / f"{loser}.txt").exists()
        assert (ws / "main.py").stat().st_uid == OWNER
        assert temps(ws) == []
        removed = subprocess.run([str(BIN / "kp-rm"), runs[loser]["name"]], capture_output=True)
        assert removed.returncode == 0, removed.stderr.decode()


EDIT = ("echo changed >> /workspace/main.py; echo new > /workspace/new.txt; rm /workspace/old.txt; "
        "rm -rf /workspace/sub; mkdir -p /workspace/sub /workspace/dir; echo y > /workspace/sub/y.txt; "
        "echo d > /workspace/dir/d.txt; ln -s new.txt /workspace/link")


@pytest.mark.parametrize("point", ["journaled", "tmp-2", "wrote-4", "applied"])
def test_a_killed_apply_of_a_real_quarantine_is_finished_by_the_next(point: str, shell_image: str, tmp_path: Path,
                                                                     kp_env: dict[str, Path]) -> None:
    ws = tmp_path / "proj"
    reset(ws)
    record = quarantine(shell_image, ws, EDIT)
    pause_dir = tmp_path / "pause"
    pause_dir.mkdir()
    proc = apply_proc(record["name"], pause=point, pause_dir=pause_dir)
    wait_for_markers(pause_dir, 1, proc)
    proc.kill()
    proc.wait()
    if point.startswith("tmp-"):
        assert len(temps(ws)) == 1
    status, records, err = finish(apply_proc(record["name"]))
    assert status == 0, err
    assert records[-1]["state"] == "applied"
    assert (ws / "main.py").read_text() == "print('hello')\nchanged\n"
    assert (ws / "new.txt").read_text() == "new\n" and not (ws / "old.txt").exists()
    assert (ws / "sub" / "y.txt").read_text() == "y\n" and not (ws / "sub" / "x.txt").exists()
    assert (ws / "dir" / "d.txt").read_text() == "d\n" and os.readlink(ws / "link") == "new.txt"
    assert {p.stat(follow_symlinks=False).st_uid for p in ws.rglob("*")} == {OWNER}
    assert temps(ws) == []
    assert not (kp_env["state"] / "containers" / record["name"]).exists()

