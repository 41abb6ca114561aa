"""kp-run --apply as real processes on quarantines made by hand: concurrent applies to one
workspace never lose an update, and an apply killed at any point leaves no temporary file once
it is re-run (or the run is removed), and the re-run finishes the job.

The quarantined runs are folders as kp-run leaves them (meta.json with the changes and the
fingerprints, an upper dir); no container runs here (tests/integration/test_apply.py does that).
The kill points are reached through kp-run's test hook (KODEPIPE_TEST_APPLY_PAUSE): the apply
stops there, making a marker file, and the test kills it.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from kodepipe.container import apply as applying
from kodepipe.container import quarantine as q
from kodepipe.core.state import Store
from tests.conftest import BIN, lines

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts need root (mknod)")
WAIT = 60.0  # a generous bound on waiting for a real condition; never a measured duration


# --- making quarantined runs ------------------------------------------------------------------


def put(root: Path, rel: str, content: bytes | str = b"", mode: int = 0o644) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    os.chmod(path, mode)
    return path


def whiteout(root: Path, rel: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def quarantined(name: str, workspace: Path, build: Callable[[Path], object]) -> Path:
    """A run folder as kp-run --quarantine leaves it: ``build(upper)`` makes the agent's changes."""
    folder = Store().folder("container", name)
    upper = folder / "upper"
    upper.mkdir(parents=True)
    build(upper)
    changes = q.changes(upper, workspace)
    meta = {"kind": "container", "name": name, "id": os.urandom(6).hex(), "state": "quarantined",
            "workspace": str(workspace), "created": "2026-01-01T00:00:00Z",
            "quarantine": {"path": str(upper), **q.summary(changes)},
            "fingerprints": q.fingerprint(workspace, changes)}
    (folder / "meta.json").write_bytes(orjson.dumps(meta))
    return folder


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), path.read_bytes())
    return out


def state_of(folder: Path) -> object:
    """The state in a run's metadata (an applied quarantine stays until kp-rm)."""
    return orjson.loads((folder / "meta.json").read_bytes())["state"]


def temps(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.name.startswith(".kp-")]


def apply_proc(*names: str, pause: str | None = None, pause_dir: Path | None = None,
               accept: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    if pause is not None:
        env[applying.PAUSE_ENV] = f"{pause}:{pause_dir}"
    args = [str(BIN / "kp-run")] + [arg for name in names for arg in ("--apply", name)]
    args += [arg for rule in accept for arg in ("--accept", rule)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def wait_for_markers(pause_dir: Path, count: int, *procs: subprocess.Popen[bytes]) -> list[Path]:
    """Wait (bounded) until ``count`` processes stopped at their pause point; fail if one ended first."""
    import time

    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        found = sorted(pause_dir.iterdir())
        if len(found) >= count:
            return found
        for proc in procs:
            if proc.poll() is not None:
                _out, err = proc.communicate()
                raise AssertionError(f"kp-run --apply ended ({proc.returncode}) before its pause point: "
                                     f"{err.decode()}")
        time.sleep(0.005)
    raise AssertionError(f"no process reached its pause point in {WAIT} s")


def finish(proc: subprocess.Popen[bytes]) -> tuple[int, list[dict[str, Any]], str]:
    out, err = proc.communicate(timeout=WAIT)
    return proc.returncode, lines(out), err.decode()


# --- concurrent applies ---------------------------------------------------------------------------

BIG = 1 << 20  # a version is ~1 MiB, so a torn or mixed write would show


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "proj"
    put(ws, "shared.txt", "the original\n")
    put(ws, "other.txt", "untouched\n")
    return ws


def two_runs(ws: Path) -> dict[str, bytes]:
    """Two quarantines that both changed shared.txt, each in its own way; returns their versions."""
    versions = {"qa": b"A" * BIG + b"\n", "qb": b"B" * BIG + b"\n"}
    for name, content in versions.items():
        def build(upper: Path, c: bytes = content, n: str = name) -> None:
            put(upper, "shared.txt", c)
            put(upper, f"{n}.txt", n)
        quarantined(name, ws, build)
    return versions


def test_the_second_of_two_concurrent_applies_waits_and_gets_a_conflict(workspace: Path, tmp_path: Path,
                                                                         kp_env: dict[str, Path]) -> None:
    """Deterministic: A stops between its fingerprint check and its first write; B must wait for A's
    workspace lock (and say so) instead of checking the unchanged file and overwriting A's write."""
    versions = two_runs(workspace)
    pause_dir = tmp_path / "pause"
    pause_dir.mkdir()
    first = apply_proc("qa", pause="checked", pause_dir=pause_dir)
    (marker,) = wait_for_markers(pause_dir, 1, first)
    second = apply_proc("qb")
    assert second.stderr is not None
    said = ""
    while "waiting for another kp-run --apply" not in said:
        line = second.stderr.readline().decode()  # EOF ("") if B ended without waiting
        assert line, f"the second apply did not wait for the first: {said}"
        said += line
    marker.unlink()  # let A write
    status_a, _records_a, err_a = finish(first)
    status_b, records_b, err_b = finish(second)
    assert status_a == 0, err_a
    assert status_b == 1 and records_b[-1]["error"]["code"] == "conflict", err_b
    assert "shared.txt" in records_b[-1]["error"]["message"]
    assert (workspace / "shared.txt").read_bytes() == versions["qa"]
    assert not (workspace / "qb.txt").exists() and (workspace / "qa.txt").exists()
    assert (kp_env["state"] / "containers" / "qb").is_dir()  # B's quarantine is kept for the user
    assert state_of(kp_env["state"] / "containers" / "qa") == "applied"  # A's stays too, applied, until kp-rm
    assert temps(workspace) == []


def test_concurrent_applies_to_one_workspace_never_lose_an_update(workspace: Path, tmp_path: Path,
                                                                  kp_env: dict[str, Path]) -> None:
    """Both released at one moment (after their start-up) from a barrier, ten times over."""
    pause_dir = tmp_path / "pause"
    pause_dir.mkdir()
    original = tree(workspace)
    for _trial in range(10):
        shutil.rmtree(workspace)
        put(workspace, "shared.txt", "the original\n")
        put(workspace, "other.txt", "untouched\n")
        shutil.rmtree(kp_env["state"] / "containers", ignore_errors=True)
        versions = two_runs(workspace)
        procs = {name: apply_proc(name, pause="ready", pause_dir=pause_dir) for name in versions}
        for marker in wait_for_markers(pause_dir, 2, *procs.values()):
            marker.unlink()
        ended = {name: finish(proc) for name, proc in procs.items()}
        statuses = sorted(status for status, _, _ in ended.values())
        assert statuses == [0, 1], ended
        (winner,) = [name for name, (status, _, _) in ended.items() if status == 0]
        (loser,) = [name for name in versions if name != winner]
        assert ended[loser][1][-1]["error"]["code"] == "conflict", ended[loser][2]
        assert (workspace / "shared.txt").read_bytes() == versions[winner]  # one version, wholly
        assert tree(workspace) == {**original, "shared.txt": ("file", 0o644, versions[winner]),
                                   f"{winner}.txt": ("file", 0o644, winner.encode())}
        assert (kp_env["state"] / "containers" / loser).is_dir()


def test_applies_to_different_workspaces_do_not_wait_for_each_other(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    for ws, name in ((one, "qa"), (two, "qb")):
        put(ws, "f.txt", "old\n")
        quarantined(name, ws, lambda upper: put(upper, "f.txt", "new\n"))
    pause_dir = tmp_path / "pause"
    pause_dir.mkdir()
    first = apply_proc("qa", pause="checked", pause_dir=pause_dir)
    (marker,) = wait_for_markers(pause_dir, 1, first)
    status, _, err = finish(apply_proc("qb"))  # ends while A holds its own workspace's lock
    assert status == 0 and "waiting" not in err, err
    marker.unlink()
    assert finish(first)[0] == 0
    assert (one / "f.txt").read_text() == (two / "f.txt").read_text() == "new\n"


def test_the_workspace_lock_is_in_the_state_dir_by_the_directorys_identity(tmp_path: Path,
                                                                           kp_env: dict[str, Path]) -> None:
    ws = tmp_path / "proj"
    ws.mkdir()
    alias = tmp_path / "alias"
    alias.symlink_to(ws)
    store = Store()
    path = applying.workspace_lock_path(store, ws)
    assert path == applying.workspace_lock_path(store, alias)  # two paths to one directory: one lock
    assert path.parent == kp_env["state"] / "locks" and ws not in path.parents
    st = ws.stat()
    assert path.name == f"workspace.{st.st_dev:x}.{st.st_ino:x}.lock"


# --- killed applies -----------------------------------------------------------------------------------


def agent_changes(upper: Path) -> None:
    """Every kind of change: files added, modified, deleted; a directory deleted, added, merged into,
    and replaced by a file; a symlink retargeted; an executable."""
    put(upper, "main.py", "print('hello')\nchanged\n")
    put(upper, "new.txt", "new\n")
    whiteout(upper, "old.txt")
    whiteout(upper, "gone")
    os.makedirs(upper / "sub")
    put(upper, "sub/x.txt", "x changed\n")
    put(upper, "sub/y.txt", "y\n")
    put(upper, "dir/d.txt", "d\n")
    os.chmod(upper / "dir", 0o700)  # a mode of its own, set last
    put(upper, "replaced", "now a file\n")
    os.symlink("new.txt", upper / "link")
    put(upper, "tool.sh", "#!/bin/sh\n", 0o755)


def project(ws: Path) -> None:
    put(ws, "main.py", "print('hello')\n")
    put(ws, "old.txt", "old\n")
    put(ws, "sub/x.txt", "x\n")
    put(ws, "gone/a.txt", "a\n")
    put(ws, "gone/b.txt", "b\n")
    put(ws, "replaced/r.txt", "r\n")
    os.symlink("main.py", ws / "link")


def intended(tmp_path: Path) -> dict[str, tuple[object, ...]]:
    """The workspace after an uninterrupted apply of the same changes."""
    ref, upper = tmp_path / "ref", tmp_path / "ref-upper"
    project(ref)
    agent_changes(upper)
    found = q.changes(upper, ref)
    q.apply(upper, ref, found, fingerprints=orjson.loads(orjson.dumps(q.fingerprint(ref, found))))
    return tree(ref)


KILL_POINTS = ["journaled", "removed-2", "removed-5", "tmp-1", "wrote-2", "tmp-4", "wrote-7", "applied"]


@needs_root
@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_killed_apply_is_finished_by_the_next_and_leaves_no_temporary_file(point: str, tmp_path: Path,
                                                                             kp_env: dict[str, Path]) -> None:
    ws = tmp_path / "proj"
    project(ws)
    want = intended(tmp_path)
    folder = quarantined("run-k", ws, agent_changes)
    pause_dir = tmp_path / "pause"
    pause_dir.mkdir()
    proc = apply_proc("run-k", pause=point, pause_dir=pause_dir)
    wait_for_markers(pause_dir, 1, proc)
    proc.kill()
    proc.wait()
    assert (folder / applying.JOURNAL).is_file()  # the journal was written before the first change
    if point.startswith("tmp-"):
        assert len(temps(ws)) == 1 and temps(ws)[0].split("/")[-1].startswith(".kp-apply-")
    # the re-run finishes the job: no --force needed for the paths the killed apply already wrote
    status, records, err = finish(apply_proc("run-k"))
    assert status == 0, err
    assert "finishing the apply that was interrupted" in err
    assert records[-1]["state"] == "applied" and records[-1]["applied_count"] == 14
    assert tree(ws) == want
    assert temps(ws) == []
    assert state_of(folder) == "applied" and not (folder / applying.JOURNAL).exists()


@needs_root
def test_kp_rm_of_a_killed_apply_removes_its_temporary_files(tmp_path: Path, kp_env: dict[str, Path]) -> None:
    ws = tmp_path / "proj"
    project(ws)
    folder = quarantined("run-k", ws, agent_changes)
    pause_dir = tmp_path / "pause"
    pause_dir.mkdir()
    proc = apply_proc("run-k", pause="tmp-3", pause_dir=pause_dir)
    wait_for_markers(pause_dir, 1, proc)
    proc.kill()
    proc.wait()
    assert len(temps(ws)) == 1
    removed = subprocess.run([str(BIN / "kp-rm"), "run-k"], capture_output=True)
    assert removed.returncode == 0, removed.stderr.decode()
    assert temps(ws) == [] and not folder.exists()


@needs_root
def test_a_host_edit_after_a_killed_apply_is_still_a_conflict(tmp_path: Path, kp_env: dict[str, Path]) -> None:
    ws = tmp_path / "proj"
    project(ws)
    folder = quarantined("run-k", ws, agent_changes)
    pause_dir = tmp_path / "pause"
    pause_dir.mkdir()
    proc = apply_proc("run-k", pause="wrote-1", pause_dir=pause_dir)
    wait_for_markers(pause_dir, 1, proc)
    proc.kill()
    proc.wait()
    (ws / "sub" / "x.txt").write_text("the user's own edit\n")  # not yet applied when it was killed
    status, records, err = finish(apply_proc("run-k"))
    assert status == 1 and records[-1]["error"]["code"] == "conflict" and "sub/x.txt" in err, err
    assert (ws / "sub" / "x.txt").read_text() == "the user's own edit\n"
    assert folder.is_dir() and temps(ws) == []
    status, _records, err = finish(subprocess.Popen([str(BIN / "kp-run"), "--apply", "run-k", "--force"],
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    assert status == 0, err
    assert (ws / "sub" / "x.txt").read_text() == "x changed\n"


def test_an_interrupted_apply_says_how_to_finish_it(tmp_path: Path, kp_env: dict[str, Path]) -> None:
    ws = tmp_path / "proj"
    put(ws, "a.txt", "a\n")
    put(ws, "b.txt", "b\n")
    quarantined("run-t", ws, lambda upper: (put(upper, "a.txt", "A\n"), put(upper, "b.txt", "B\n")))
    pause_dir = tmp_path / "pause"
    pause_dir.mkdir()
    proc = apply_proc("run-t", pause="tmp-1", pause_dir=pause_dir)
    wait_for_markers(pause_dir, 1, proc)
    proc.terminate()
    status, _records, err = finish(proc)
    assert status == 143 and "kp-run --apply run-t finishes the apply" in err, err
    assert temps(ws) == []  # SIGTERM: the temporary file is removed on the way out
    status, _records, err = finish(apply_proc("run-t"))
    assert status == 0, err
    assert (ws / "a.txt").read_text() == "A\n" and (ws / "b.txt").read_text() == "B\n"


# --- hostile trees ------------------------------------------------------------------------------------

DEPTH = 2500  # paths of ~5,000 bytes: past PATH_MAX (4096) and Python's recursion limit (1000)
ODD = ["new\nline", "\x1b[31mred\x1b[0m", os.fsdecode(b"caf\xe9-\xff"), "\u202eevil"]


@pytest.fixture
def no_deep_tree_left(tmp_path: Path, kp_env: dict[str, Path]) -> Any:
    """pytest's own clean-up (shutil.rmtree, recursive) fails on a deep tree: remove what the test made."""
    from kodepipe.core.state import remove_tree

    yield
    for entry in os.listdir(tmp_path):
        remove_tree(tmp_path / entry)


def deep_chain(root: Path, depth: int) -> int:
    """root/d/d/... ``depth`` deep, made through fds; an fd of the deepest (the caller closes it)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    return fd


def hostile(upper: Path) -> None:
    """What a hostile agent leaves: a tree deeper than a path can be long with a setuid file and a symlink
    out at the bottom, names with control characters and bytes that are not UTF-8, a fifo."""
    bottom = deep_chain(upper, DEPTH)
    fd = os.open("suid", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=bottom)
    os.write(fd, b"#!/bin/sh\n")
    os.fchmod(fd, 0o4755)
    os.close(fd)
    os.symlink("/root/.ssh", "out", dir_fd=bottom)
    os.close(bottom)
    for name in ODD:  # setuid too, so that warnings name them
        put(upper, f"odd/{name}", name.encode(errors="surrogateescape"), 0o4755)
    os.mkfifo(upper / "odd" / "fifo")


def printable_lines(text: str) -> None:
    """Every line on stderr is free of control characters (and of bytes that are not UTF-8)."""
    for line in text.splitlines():
        assert line.isprintable(), repr(line)


def test_kp_run_apply_of_a_hostile_tree(tmp_path: Path, kp_env: dict[str, Path], no_deep_tree_left: None) -> None:
    ws = tmp_path / "proj"
    put(ws, "main.py", "print('hello')\n")
    folder = quarantined("run-h", ws, hostile)
    status, records, err = finish(apply_proc("run-h"))
    assert status == 1 and records[-1]["error"]["code"] == "findings"  # the review's findings refuse it first
    assert "symlink-out" in err and "setid" in err and "control-characters" in err
    status, records, err = finish(apply_proc("run-h", accept=("symlink-out", "setid", "control-characters")))
    assert status == 0, err[-3000:]
    assert "Traceback" not in err
    printable_lines(err)
    assert "odd/\\x1b[31mred\\x1b[0m: setuid/setgid bits stripped" in err and "odd/caf\\xe9-\\xff: setuid" in err
    assert "odd/new\\nline: setuid" in err and "odd/fifo: a fifo, which apply leaves out" in err
    assert "a symlink that may point out of the workspace" in err and "setuid/setgid bits stripped" in err
    (record,) = records
    assert record["state"] == "applied" and record["applied_count"] == DEPTH + 2 + 1 + len(ODD)
    entries = record["quarantine"]["applied_now"]
    assert {e["path"].rsplit("/", 1)[-1]: (e.get("setid"), e.get("escapes")) for e in entries
            if e["path"].startswith("d/d/") and e["type"] != "dir"} == {"suid": (True, None), "out": (None, True)}
    assert "odd/fifo" not in [e["path"] for e in entries]
    assert record["quarantine"]["not_applied"] == [{"path": "odd/fifo", "change": "added", "type": "fifo",
                                                    "mode": "0644"}]
    # the workspace has every name's exact bytes, the deep file without its setuid bit, and no fifo
    assert sorted(os.listdir(os.fsencode(ws / "odd"))) == sorted(n.encode(errors="surrogateescape") for n in ODD)
    fd = os.open(ws, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(DEPTH):
        child = os.open("d", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        os.close(fd)
        fd = child
    assert stat.S_IMODE(os.stat("suid", dir_fd=fd).st_mode) == 0o755 and os.readlink("out", dir_fd=fd) == "/root/.ssh"
    os.close(fd)
    assert state_of(folder) == "applied"  # the quarantine stays until kp-rm, which removes even its deep tree
    removed = subprocess.run([str(BIN / "kp-rm"), "run-h"], capture_output=True)
    assert removed.returncode == 0 and not folder.exists(), removed.stderr.decode()


def test_kp_rm_of_a_hostile_run_and_then_of_another(tmp_path: Path, kp_env: dict[str, Path],
                                                    no_deep_tree_left: None) -> None:
    ws = tmp_path / "proj"
    put(ws, "main.py", "print('hello')\n")
    hostile_run = quarantined("run-h", ws, hostile)
    others = [quarantined(name, ws, lambda upper: put(upper, "new.txt", "new\n")) for name in ("run-a", "run-b")]
    removed = subprocess.run([str(BIN / "kp-rm"), "run-h"], capture_output=True)
    assert removed.returncode == 0, removed.stderr.decode()[-3000:]
    assert not hostile_run.exists()
    # a kp-rm killed half-way through the same tree left it in the trash: later ones still work
    trash = kp_env["state"] / "trash" / "run-x.0123456789ab"
    trash.mkdir(parents=True)
    os.close(deep_chain(trash, DEPTH))
    removed = subprocess.run([str(BIN / "kp-rm"), "run-a"], capture_output=True)
    assert removed.returncode == 0, removed.stderr.decode()[-3000:]
    assert not others[0].exists() and not trash.exists()
    listed = subprocess.run([str(BIN / "kp-ls")], capture_output=True)
    assert listed.returncode == 0 and [r["name"] for r in lines(listed.stdout)] == ["run-b"]
    removed = subprocess.run([str(BIN / "kp-rm"), "run-b"], capture_output=True)
    assert removed.returncode == 0 and not others[1].exists()
    assert (ws / "main.py").read_text() == "print('hello')\n" and sorted(os.listdir(ws)) == ["main.py"]


def test_a_quarantine_past_the_caps_is_refused_clearly_and_kp_rm_discards_it(tmp_path: Path, kp_env: dict[str, Path],
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from kodepipe.container import folders as containers
    from kodepipe.core.errors import KpError

    ws = tmp_path / "proj"
    put(ws, "main.py", "print('hello')\n")
    folder = quarantined("run-big", ws, lambda upper: [put(upper, f"f{i}", "") for i in range(50)])
    monkeypatch.setattr(q, "MAX_CHANGES", 20)
    said: list[str] = []
    with pytest.raises(KpError) as info:
        applying.apply(Store(), "run-big", expect_id=None, force=True, say=said.append)
    assert info.value.code == "too_many_changes" and "more than 20 changes" in info.value.message
    assert "kp-rm discards it" in info.value.message
    assert folder.is_dir() and sorted(os.listdir(ws)) == ["main.py"]  # nothing applied, nothing lost
    assert containers.remove(Store(), "run-big", expect_id=None, dry_run=False) is not None
    assert not folder.exists()
