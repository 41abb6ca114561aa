"""Walking and removing trees through directory fds (fdtree), and what kp-rm builds on it
(state.remove_tree, Store.discard, Store.empty_trash): any depth, any names, a bounded number of
open fds, never a symlink followed, and one entry that cannot be removed never stops the rest."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kodepipe.core import fdtree
from kodepipe.core.fdtree import Cursor, TooMany, TreeChanged, Unreachable
from kodepipe.core.state import Store, remove_tree

DEPTH = 2500  # paths of ~5,000 bytes: past PATH_MAX (4096) and Python's recursion limit (1000)
ODD = ["new\nline", "\x1b[31mred", os.fsdecode(b"caf\xe9\xff"), " lead", "-dash"]


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    """An empty directory for the test; removed after it (pytest's own clean-up, shutil.rmtree, is
    recursive and fails on a deep tree)."""
    path = tmp_path / "t"
    path.mkdir()
    yield path
    if not os.path.ismount(path):
        remove_tree(path)


def chain(root: Path, depth: int, name: str = "d") -> int:
    """root/name/name/... ``depth`` deep, made through fds; an fd of the deepest (the caller closes it)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir(name, dir_fd=fd)
        child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    return fd


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def dir_fd(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


# --- the cursor --------------------------------------------------------------------------------


def test_a_cursor_reaches_any_depth_with_a_bounded_number_of_fds(root: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fdtree, "MAX_OPEN", 8)
    os.close(chain(root, DEPTH))
    deep = "/".join(["d"] * DEPTH)
    fd, before = dir_fd(root), open_fds()
    with Cursor(fd) as cursor:
        cursor.goto(deep)
        assert cursor.depth == DEPTH and open_fds() - before <= 9
        os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=cursor.fd))
        assert stat.S_ISREG(cursor.lstat(deep + "/f").st_mode)  # type: ignore[union-attr]
        cursor.goto("d/d/d")  # back up through "..": the closed ones are reopened, and checked
        assert cursor.depth == 3 and open_fds() - before <= 9
        assert os.fstat(cursor.fd).st_ino == os.stat(root / "d/d/d").st_ino
        cursor.goto("")
        assert cursor.fd == fd and open_fds() - before <= 1
    assert open_fds() == before
    os.close(fd)


def test_a_cursor_never_follows_a_symlink(root: Path) -> None:
    (root / "real").mkdir()
    (root / "outside").mkdir()
    os.symlink(root / "outside", root / "real" / "link")
    (root / "real" / "file").write_text("")
    fd = dir_fd(root)
    with Cursor(fd) as cursor:
        with pytest.raises(Unreachable) as info:
            cursor.goto("real/link/x")
        assert (info.value.prefix, info.value.symlink) == ("real/link", True)
        with pytest.raises(Unreachable) as info:
            cursor.goto("real/file/x")
        assert (info.value.prefix, info.value.symlink) == ("real/file", False)
        with pytest.raises(Unreachable) as info:
            cursor.goto("nothing/x")
        assert info.value.prefix == "nothing"
        assert cursor.lstat("real/link/x") is None
        assert stat.S_ISLNK(cursor.lstat("real/link").st_mode)  # type: ignore[union-attr]
    os.close(fd)


def test_a_directory_moved_under_a_cursor_is_an_error_not_a_walk_elsewhere(root: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fdtree, "MAX_OPEN", 2)
    os.close(chain(root, 6))
    fd = dir_fd(root)
    with Cursor(fd) as cursor:
        cursor.goto("d/d/d/d/d/d")
        os.rename(root / "d" / "d", root / "moved")  # the top levels' fds were closed
        with pytest.raises(TreeChanged):
            cursor.goto("")
        assert cursor.depth == 0  # back at the root, every fd closed
        cursor.goto("moved/d")
    os.close(fd)


# --- walking ---------------------------------------------------------------------------------


def test_walk_sees_every_entry_of_a_deep_tree_with_odd_names(root: Path) -> None:
    bottom = chain(root, DEPTH)
    for name in ODD:
        os.close(os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=bottom))
    os.mkfifo("fifo", dir_fd=bottom)
    os.symlink("/etc", "link", dir_fd=bottom)
    os.close(bottom)
    fd = dir_fd(root)
    seen = [(cursor.path, name, stat.S_IFMT(st.st_mode)) for cursor, name, st in fdtree.walk(fd)]
    os.close(fd)
    deep = "/".join(["d"] * DEPTH)
    assert len(seen) == DEPTH + len(ODD) + 2
    assert sorted((n, kind) for p, n, kind in seen if p == deep) == sorted(
        [(n, stat.S_IFREG) for n in ODD] + [("fifo", stat.S_IFIFO), ("link", stat.S_IFLNK)])


def test_walk_stops_past_its_limit(root: Path) -> None:
    for i in range(20):
        (root / f"f{i}").write_text("")
    fd = dir_fd(root)
    with pytest.raises(TooMany):
        list(fdtree.walk(fd, limit=10))
    assert len(list(fdtree.walk(fd, limit=20))) == 20
    os.close(fd)


def test_setid_files_are_found_however_deep(root: Path) -> None:
    bottom = chain(root, DEPTH)
    for name, mode in (("suid", 0o4755), ("sgid", 0o2755), ("plain", 0o755)):
        fd = os.open(name, os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=bottom)
        os.fchmod(fd, mode)
        os.close(fd)
    os.mkdir("shared", dir_fd=bottom)
    os.chmod(f"/proc/self/fd/{bottom}/shared", 0o2750)  # noqa: S103 (a setgid directory is no setid file)
    os.close(bottom)
    (root / os.fsdecode(b"top-\xff")).write_bytes(b"")
    os.chmod(root / os.fsdecode(b"top-\xff"), 0o4700)
    deep = "/".join(["d"] * DEPTH)
    assert fdtree.setid_files(root) == [f"{deep}/sgid", f"{deep}/suid", os.fsdecode(b"top-\xff")]


# --- removing ---------------------------------------------------------------------------------


def test_remove_takes_a_tree_of_any_depth_and_names_and_never_follows_a_symlink(root: Path) -> None:
    outside = root / "outside"
    outside.mkdir()
    (outside / "keep").write_text("precious")
    victim = root / "victim"
    victim.mkdir()
    bottom = chain(victim, DEPTH)
    for name in ODD:
        os.mkdir(name, dir_fd=bottom)
        os.close(os.open(f"{name}/x", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=bottom))
    os.symlink(outside, "to-outside", dir_fd=bottom)
    os.symlink(outside / "keep", "to-file", dir_fd=bottom)
    os.mkfifo("fifo", dir_fd=bottom)
    os.close(bottom)
    os.symlink(outside, victim / "top-link")
    fd, before = dir_fd(root), open_fds()
    fdtree.remove(fd, "victim")
    assert open_fds() == before
    os.close(fd)
    assert not victim.exists()
    assert (outside / "keep").read_text() == "precious"


def test_remove_gets_past_permissions_in_its_way(root: Path) -> None:
    victim = root / "victim"
    (victim / "a" / "b").mkdir(parents=True)
    (victim / "a" / "b" / "f").write_text("")
    (victim / "a" / "b" / "f").chmod(0o444)
    (victim / "a" / "b").chmod(0o500)
    (victim / "a").chmod(0o000)
    remove_tree(victim)
    assert not victim.exists()


def test_remove_of_a_file_or_of_nothing(root: Path) -> None:
    (root / "f").write_text("")
    os.symlink("/etc/passwd", root / "l")
    fd = dir_fd(root)
    fdtree.remove(fd, "f")
    fdtree.remove(fd, "l")
    fdtree.remove(fd, "nothing")
    os.close(fd)
    assert os.listdir(root) == [] and os.path.exists("/etc/passwd")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_remove_never_crosses_into_another_filesystem(root: Path) -> None:
    inner = root / "victim" / "mnt"
    inner.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(inner)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (inner / "other-fs").write_text("kept")
        fd = dir_fd(root)
        with pytest.raises(OSError, match="mount point"):
            fdtree.remove(fd, "victim")
        os.close(fd)
        assert (inner / "other-fs").read_text() == "kept"
    finally:
        subprocess.run(["umount", str(inner)], check=False)


# --- what kp-rm builds on it --------------------------------------------------------------------


def test_discard_and_empty_trash_handle_deep_trees(root: Path) -> None:
    store = Store(root / "state")
    folder = store.folder("container", "deep-run")
    (folder / "upper").mkdir(parents=True)
    os.close(chain(folder / "upper", DEPTH))
    store.discard(folder)
    assert not folder.exists() and store.names_in(store.root / "trash") == []
    # a deep tree left in the trash by a kp-rm that was killed: the next one finishes it
    trash = store.root / "trash" / "killed-run.0123"
    trash.mkdir(parents=True)
    os.close(chain(trash, DEPTH))
    store.empty_trash()
    assert store.names_in(store.root / "trash") == []


def test_one_entry_that_cannot_be_removed_does_not_stop_the_rest(root: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from kodepipe.core import state
    from kodepipe.core.errors import KpError

    store = Store(root / "state")
    for name in ("a", "b", "c"):
        (store.root / "trash" / name / "x").mkdir(parents=True)
    real = state.remove_tree

    def stuck(path: Path, **kwargs: object) -> None:
        if path.name == "b":
            raise KpError(f"refusing to delete {path}: something is mounted inside it", code="mounted")
        real(path)

    monkeypatch.setattr(state, "remove_tree", stuck)
    store.empty_trash()
    assert store.names_in(store.root / "trash") == ["b"]  # kept for the next kp-rm to try again
