"""A full disk, for real: the state dir (or a workspace) on a 1 MiB tmpfs, filled up.  Every
command that fails on it says so ("no space left ... (ENOSPC) ...; free some space"), exits 1
with the error in the record, prints no traceback and leaves no temporary file; kp-ls and kp-rm
still work on the full disk, and a re-run after freeing space finishes the job."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from kodepipe.core.errors import KpError
from kodepipe.core.state import write_atomic
from tests.conftest import BIN, lines, make_image
from tests.test_apply import apply_proc, finish, put, quarantined, temps

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")]


@contextmanager
def small_tmpfs(path: Path, size: str = "1m") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave: int = 0) -> Path:
    """Fill path's filesystem with one file until ``leave`` bytes are free (0: not one byte more)."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        want = free(path) - leave
        while want > 0:
            want -= os.write(fd, b"\0" * min(want, 1 << 16))
        if leave == 0:
            for size in (1 << 16, 1 << 12, 1):
                try:
                    while True:
                        os.write(fd, b"\0" * size)
                except OSError:
                    pass
    finally:
        os.close(fd)
    assert leave or free(path) == 0
    return filler


def leftovers(root: Path) -> list[str]:
    """Temporary files and half-made folders: *.tmp, .NAME.ID.new, .kp-apply-*."""
    return [str(p.relative_to(root)) for p in root.rglob("*")
            if p.name.endswith((".tmp", ".new")) or p.name.startswith(".kp-")]


def says_no_space(proc: subprocess.CompletedProcess[bytes] | tuple[int, list[dict[str, object]], str],
                  ) -> dict[str, object]:
    """The command failed on the full disk the documented way; returns the failed record."""
    if isinstance(proc, tuple):
        status, records, err = proc
    else:
        status, records, err = proc.returncode, lines(proc.stdout), proc.stderr.decode()
    assert status == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert "(ENOSPC)" in err and "free some space" in err, err
    error = records[-1]["error"]
    assert isinstance(error, dict) and error["code"] == "no_space", records
    return records[-1]


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir() and "locks" not in p.parts)


def kp(prog: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(BIN / prog), *args], capture_output=True, timeout=60)


@pytest.mark.parametrize("room", [0, 64 << 10], ids=["full", "room-for-metadata-only"])
def test_kp_clone_on_a_full_state_dir(room: int, kp_env: dict[str, Path]) -> None:
    with small_tmpfs(kp_env["state"]) as state:
        make_image("base")
        fill(state, room)
        before = files(state)
        record = says_no_space(kp("kp-clone", "base", "a"))
        assert record["name"] == "a"
        assert leftovers(state) == [] and files(state) == before and not (state / "vms" / "a").exists()
        # still full: kp-ls tells the truth, kp-rm removes
        listed = kp("kp-ls")
        assert listed.returncode == 0, listed.stderr.decode()
        assert [(r["name"], r["state"]) for r in lines(listed.stdout)] == [("base", "ready")]
        removed = kp("kp-rm", "base")
        assert removed.returncode == 0, removed.stderr.decode()
        assert lines(kp("kp-ls").stdout) == [] and leftovers(state) == []


def test_a_metadata_write_on_a_full_disk_keeps_the_old_file(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk") as disk:
        meta = disk / "meta.json"
        meta.write_bytes(b'{"old": true}\n')
        fill(disk, 4096)  # room for the first page of the new file, not for all of it
        with pytest.raises(KpError) as caught:
            write_atomic(meta, b"x" * (64 << 10))
        assert caught.value.code == "no_space" and "(ENOSPC)" in caught.value.message
        assert "free some space" in caught.value.message
        assert meta.read_bytes() == b'{"old": true}\n'
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "meta.json"]


def test_kp_run_apply_on_a_full_workspace_says_so_and_finishes_once_there_is_room(
        tmp_path: Path, kp_env: dict[str, Path]) -> None:
    with small_tmpfs(tmp_path / "proj") as ws:
        put(ws, "a.txt", "a\n")
        put(ws, "b.txt", "b\n")
        big_a, big_b = b"A" * (300 << 10), b"B" * (300 << 10)
        folder = quarantined("run-f", ws, lambda upper: (put(upper, "a.txt", big_a), put(upper, "b.txt", big_b)))
        filler = fill(ws, 400 << 10)  # room for a.txt's new version, not for b.txt's too
        record = says_no_space(finish(apply_proc("run-f")))
        assert "kp-run --apply run-f finishes the apply" in str(record["error"])
        assert (ws / "a.txt").read_bytes() == big_a and (ws / "b.txt").read_text() == "b\n"  # half-way
        assert temps(ws) == [] and leftovers(ws) == [] and leftovers(kp_env["state"]) == []
        listed = kp("kp-ls", "run-f")
        assert listed.returncode == 0 and lines(listed.stdout)[0]["state"] == "quarantined"
        filler.unlink()
        status, records, err = finish(apply_proc("run-f"))
        assert status == 0, err
        assert records[-1]["state"] == "applied"
        assert (ws / "a.txt").read_bytes() == big_a and (ws / "b.txt").read_bytes() == big_b
        assert temps(ws) == [] and folder.is_dir()  # the applied quarantine stays until kp-rm


def test_kp_run_apply_on_a_full_state_dir_changes_nothing(tmp_path: Path, kp_env: dict[str, Path]) -> None:
    ws = tmp_path / "proj"
    put(ws, "a.txt", "a\n")
    with small_tmpfs(kp_env["state"]) as state:
        folder = quarantined("run-s", ws, lambda upper: put(upper, "a.txt", "A\n"))
        fill(state)
        says_no_space(finish(apply_proc("run-s")))  # its journal cannot be written: it stops before any change
        assert (ws / "a.txt").read_text() == "a\n" and temps(ws) == []
        assert leftovers(state) == [] and not (folder / "apply.json").exists()
        listed = kp("kp-ls", "run-s")
        assert listed.returncode == 0 and lines(listed.stdout)[0]["state"] == "quarantined"
        removed = kp("kp-rm", "run-s")
        assert removed.returncode == 0, removed.stderr.decode()
        assert not folder.exists() and leftovers(state) == []


# -- kp-run and kp-boot on a full state dir -----------------------------------------------------

OWNER = 4321  # the workspace's owner, as in test_run.py


@pytest.fixture
def run_ws(tmp_path: Path) -> Path:
    ws = tmp_path / "proj"
    ws.mkdir()
    (ws / "main.py").write_text("print('hello')\n")
    for path in (ws, ws / "main.py"):
        os.chown(path, OWNER, OWNER)
    return ws


def kprun(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(BIN / "kp-run"), *args], capture_output=True, timeout=600)


def no_containers(name: str) -> bool:
    ps = subprocess.run(["podman", "ps", "-a", "--format", "{{.ID}}", "--filter", f"label=io.kodepipe.name={name}"],
                        capture_output=True, text=True, check=True)
    return ps.stdout.strip() == ""


def still_works(state: Path) -> None:
    """On the full disk, kp-ls tells the truth and a bulk kp-rm (then a named one) removes every run."""
    listed = kp("kp-ls")
    assert listed.returncode == 0 and b"Traceback" not in listed.stderr, listed.stderr.decode()
    records = lines(listed.stdout)
    removed = subprocess.run([str(BIN / "kp-rm"), "--quarantines", "--evidence"], input=listed.stdout,
                             capture_output=True, timeout=120)
    assert removed.returncode == 0 and b"Traceback" not in removed.stderr, removed.stderr.decode()
    assert lines(kp("kp-ls").stdout) == [] and leftovers(state) == []
    assert not any((state / "containers").iterdir()) if (state / "containers").exists() else True
    for record in records:
        assert no_containers(str(record["name"]))


@pytest.mark.parametrize("room", [0, 64 << 10], ids=["full", "room-for-metadata-only"])
def test_a_plain_kp_run_on_a_full_state_dir(room: int, shell_image: str, run_ws: Path,
                                            kp_env: dict[str, Path]) -> None:
    with small_tmpfs(kp_env["state"]) as state:
        fill(state, room)
        proc = kprun("--image", shell_image, "-w", str(run_ws), "--", "bash", "-c", "echo made > /workspace/m")
        err = proc.stderr.decode()
        assert "Traceback" not in err and "internal error" not in err, err
        if proc.returncode != 0:
            says_no_space(proc)
        else:  # room enough for its metadata: it ran, and said so
            assert lines(proc.stdout)[-1]["exit_code"] == 0, err
        assert leftovers(state) == []
        still_works(state)


def test_a_quarantined_agent_that_fills_the_state_dir(shell_image: str, run_ws: Path,
                                                      kp_env: dict[str, Path]) -> None:
    """The quarantine's upper dir lives in the state dir: an agent that writes more than it holds
    gets ENOSPC itself, and kp-run ends with a clear record or a clear error."""
    with small_tmpfs(kp_env["state"], "4m") as state:
        proc = kprun("--image", shell_image, "-w", str(run_ws), "--quarantine", "--", "bash", "-c",
                     "head -c 16M /dev/zero > /workspace/big; echo agent-done $?")
        err = proc.stderr.decode()
        assert "Traceback" not in err and "internal error" not in err, err
        assert "agent-done" in err, err  # the agent ran, and its write failed (not kp-run)
        record = says_no_space(proc)  # kp-run's last metadata could not be written ...
        # ... and its record still names the run and says what it did
        assert str(record["name"]).startswith("run-") and record["state"] == "quarantined", record
        assert "big" in str(record["quarantine"]) and record["outcome"] == "exited", record
        assert not (run_ws / "big").exists()  # the workspace itself is untouched
        assert leftovers(state) == []
        listed = kp("kp-ls", str(record["name"]))
        assert listed.returncode == 0 and b"Traceback" not in listed.stderr, listed.stderr.decode()
        # a bulk kp-rm keeps the agent's work; named, it goes
        kept = subprocess.run([str(BIN / "kp-rm")], input=listed.stdout, capture_output=True, timeout=120)
        assert kept.returncode == 0 and b"kept: " in kept.stderr and "quarantine" in kept.stderr.decode(), kept.stderr
        assert (state / "containers" / str(record["name"])).is_dir()
        removed = kp("kp-rm", str(record["name"]))
        assert removed.returncode == 0, removed.stderr.decode()
        assert lines(kp("kp-ls").stdout) == [] and leftovers(state) == []
        assert not (state / "containers" / str(record["name"])).exists() and no_containers(str(record["name"]))


@pytest.mark.parametrize("room", [0, 64 << 10], ids=["full", "room-for-metadata-only"])
def test_kp_boot_on_a_full_state_dir(room: int, kp_env: dict[str, Path]) -> None:
    with small_tmpfs(kp_env["state"]) as state:
        make_image("base")
        assert kp("kp-clone", "base", "a").returncode == 0
        meta = (state / "vms" / "a" / "meta.json").read_bytes()
        fill(state, room)
        proc = kp("kp-boot", "--accel", "tcg", "a")
        err = proc.stderr.decode()
        assert proc.returncode != 0 and "Traceback" not in err and "internal error" not in err, err
        if room == 0:
            says_no_space(proc)
            assert (state / "vms" / "a" / "meta.json").read_bytes() == meta  # the metadata is as it was
        assert leftovers(state) == []
        listed = kp("kp-ls", "a")
        assert listed.returncode == 0, listed.stderr.decode()
        assert lines(listed.stdout)[0]["state"] in ("stopped", "crashed"), lines(listed.stdout)
        removed = kp("kp-rm", "a", "base")
        assert removed.returncode == 0, removed.stderr.decode()
        assert lines(kp("kp-ls").stdout) == [] and leftovers(state) == []
