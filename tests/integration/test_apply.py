"""kp-run --apply of quarantines made by real kp-run --quarantine runs in real Podman containers, on
both backends (a VM's: the session VM's kp-boot --share, its quarantine reviewed and applied on the
host): concurrent applies to one workspace never lose an update, and an apply killed half-way is
finished by the next one, leaving no temporary file in the workspace."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BIN
from tests.integration.test_run import one_podman_service  # noqa: F401 - the module's shared service
from tests.test_apply import apply_proc, finish, temps, wait_for_markers

pytestmark = pytest.mark.integration

OWNER = 4321  # the workspace's owner: the "invoking user" when root runs kp-run without sudo


@dataclass(frozen=True)
class Place:
    """A workspace on a backend: the host directory the quarantine reviews and applies to, -w, its owner."""

    dir: Path
    workspace: str
    owner: int


@pytest.fixture
def place(request: pytest.FixtureRequest, backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Place:
    """The host: a directory of the test's.  A VM: a sub-folder of the session VM's kp-boot --share (the
    guest's /workspace/NAME), and this test's kp-* commands use that VM's state dir (kp-run --apply
    runs on the host, with no VM)."""
    if backend == "host":
        return Place(tmp_path / "proj", str(tmp_path / "proj"), OWNER)
    from tests.integration.vmbackend import SESSION, in_share

    vm = request.getfixturevalue("guest_vm")
    for key, value in vm.env.items():
        monkeypatch.setenv(key, value)
    name = f"apply-{SESSION}-{next(vm.counter)}"
    return Place(in_share(request, vm, name), f"/workspace/{name}", vm.share.stat().st_uid)


def reset(place: Place) -> None:
    ws = place.dir
    if ws.exists():
        shutil.rmtree(ws)
    (ws / "sub").mkdir(parents=True)
    (ws / "main.py").write_text("print('hello')\n")
    (ws / "old.txt").write_text("old\n")
    (ws / "sub" / "x.txt").write_text("x\n")
    for path in [ws, *ws.rglob("*")]:
        os.chown(path, place.owner, place.owner)


def quarantine(request: pytest.FixtureRequest, backend: str, image: str, place: Place, script: str) -> dict[str, Any]:
    from tests.integration.vmbackend import kprun_on

    proc, record = kprun_on(request, backend, "--image", image, "-w", place.workspace, "--quarantine", "--",
                            "bash", "-c", script)
    assert record["state"] == "quarantined", proc.stderr[-4000:]
    return record


def test_concurrent_applies_of_real_quarantines_never_lose_an_update(request: pytest.FixtureRequest, backend: str,
                                                                     shell_image: str, tmp_path: Path,
                                                                     place: Place) -> None:
    ws = place.dir
    pause_dir = tmp_path / "pause"
    pause_dir.mkdir()
    # the race is the host's apply (the same code for both backends); in a VM each run costs minutes under TCG
    for _trial in range(3 if backend == "host" else 1):
        reset(place)
        # two agents, each rewriting main.py its own way (and leaving a file of its own)
        runs = {who: quarantine(request, backend, shell_image, place,
                                f"yes {who} | head -c 300000 > /workspace/main.py; echo {who} > /workspace/{who}.txt")
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
        assert (ws / "main.py").stat().st_uid == place.owner
        assert temps(ws) == []
        removed = subprocess.run([str(BIN / "kp-rm"), runs[loser]["name"]], capture_output=True)
        assert removed.returncode == 0, removed.stderr.decode()


EDIT = ("echo changed >> /workspace/main.py; echo new > /workspace/new.txt; rm /workspace/old.txt; "
        "rm -rf /workspace/sub; mkdir -p /workspace/sub /workspace/dir; echo y > /workspace/sub/y.txt; "
        "echo d > /workspace/dir/d.txt; ln -s new.txt /workspace/link")


# The apply that is killed is the host's (the same code for a quarantine made in a VM), so every point is
# on the host and one, mid-way, on a VM's quarantine: a TCG guest spends ~30 s on each run (CI's time).
KILLS = [(point, "host") for point in ("journaled", "tmp-2", "wrote-4", "applied")] + [("wrote-4", "vm")]


@pytest.mark.parametrize(("point", "backend"), KILLS, ids=[f"{b}-{p}" for p, b in KILLS])
def test_a_killed_apply_of_a_real_quarantine_is_finished_by_the_next(request: pytest.FixtureRequest, backend: str,
                                                                     point: str, shell_image: str, tmp_path: Path,
                                                                     place: Place) -> None:
    ws = place.dir
    reset(place)
    record = quarantine(request, backend, shell_image, place, EDIT)
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
    assert {p.stat(follow_symlinks=False).st_uid for p in ws.rglob("*")} == {place.owner}
    assert temps(ws) == []
    assert Path(record["path"]).is_dir()  # the applied quarantine stays until kp-rm

