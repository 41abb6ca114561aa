"""hostpath: paths through a workspace are opened without following a symlink; fds are handed to
Podman through read-only staging mounts; a container's mounts are checked against fds."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from kodepipe.core.errors import BadInput
from kodepipe.host import hostpath
from kodepipe.host.hostpath import UnsafePath

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    (root / "dir" / "deeper").mkdir(parents=True)
    (root / "dir" / "deeper" / "file").write_text("inside\n")
    (tmp_path / "secret").write_text("host secret\n")
    (root / "link-out").symlink_to(tmp_path / "secret")
    (root / "link-in").symlink_to("dir/deeper/file")
    (root / "dirlink").symlink_to("dir")
    (root / "dirlink-out").symlink_to(tmp_path)
    return root


@pytest.mark.parametrize("rel", ["", "/etc/passwd", "a//b", "a/../b", "..", ".", "a/.", "a/", "a\0b"])
def test_unsafe_relative_paths_are_refused(rel: str) -> None:
    with pytest.raises(UnsafePath):
        hostpath.check_rel(rel)


@pytest.fixture(params=[False, True], ids=["openat2", "fd-walk"])
def fallback(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.mark.parametrize(("rel", "problem"), [
    ("dir/deeper/file", None),
    ("dir", None),
    ("link-out", UnsafePath),  # the last component a symlink out of the workspace
    ("link-in", UnsafePath),  # even one that stays inside
    ("dirlink/deeper/file", UnsafePath),  # a directory on the way
    ("dirlink-out/secret", UnsafePath),
    ("dir/../link-out", UnsafePath),
    ("missing", FileNotFoundError),
    ("dir/deeper/file/x", NotADirectoryError),
])
def test_open_beneath_never_follows_a_symlink(tree: Path, fallback: bool, rel: str,
                                              problem: type[BaseException] | None) -> None:
    root = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if problem is not None:
            with pytest.raises(problem):
                hostpath.open_beneath(root, rel, fallback=fallback)
            return
        fd = hostpath.open_beneath(root, rel, fallback=fallback)
        try:
            assert os.fstat(fd).st_ino == os.lstat(tree / rel).st_ino
        finally:
            os.close(fd)
    finally:
        os.close(root)


def test_open_beneath_reads_with_other_flags(tree: Path, fallback: bool) -> None:
    root = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = hostpath.open_beneath(root, "dir/deeper/file", os.O_RDONLY, fallback=fallback)
        with os.fdopen(fd) as f:
            assert f.read() == "inside\n"
        with pytest.raises(UnsafePath):  # O_RDONLY | O_NOFOLLOW on a link: ELOOP, said as a symlink
            hostpath.open_beneath(root, "link-in", os.O_RDONLY, fallback=fallback)
    finally:
        os.close(root)


def test_open_host_refuses_links_anyone_but_root_could_make(tree: Path, tmp_path: Path) -> None:
    fd = hostpath.open_host(tree / "dir" / "deeper" / "file")
    with os.fdopen(fd) as f:
        assert f.read() == "inside\n"
    # tmp_path is below /tmp, which anybody may write: no link there is root's alone, even root's own
    for path in (tree / "link-out", tree / "dirlink" / "deeper" / "file", tree / "link-in"):
        with pytest.raises(UnsafePath, match="symbolic link"):
            hostpath.open_host(path)
    with pytest.raises(FileNotFoundError):
        hostpath.open_host(tree / "nothing")
    with pytest.raises(NotADirectoryError):
        hostpath.open_host(tree / "dir" / "deeper" / "file" / "x")
    # ".." is walked like the kernel does: physically, from where it is
    fd = hostpath.open_host(f"{tree}/dir/deeper/../deeper/file", os.O_PATH)
    assert os.fstat(fd).st_ino == (tree / "dir" / "deeper" / "file").stat().st_ino
    os.close(fd)


def test_open_host_follows_a_link_only_root_could_have_made() -> None:
    # Debian's merged /usr: /lib -> usr/lib, root's, in /, which only root may write
    lib = Path("/lib")
    if not lib.is_symlink() or lib.lstat().st_uid != 0 or not Path("/usr/lib/os-release").exists():
        pytest.skip("no root-owned /lib symlink here")
    fd = hostpath.open_host("/lib/os-release", os.O_PATH)
    try:
        assert os.fstat(fd).st_ino == os.stat("/usr/lib/os-release").st_ino
    finally:
        os.close(fd)


def test_root_only_means_roots_and_writable_by_nobody_else(tmp_path: Path) -> None:
    st = os.stat("/")
    assert hostpath._root_only(st) == (st.st_uid == 0 and not st.st_mode & 0o022)
    assert not hostpath._root_only(os.stat("/tmp"))  # sticky and world-writable


def test_a_secret_is_copied_from_one_fd_and_never_through_a_link(tree: Path, tmp_path: Path) -> None:
    dest = tmp_path / "copy"
    hostpath.copy_secret(tree / "dir" / "deeper" / "file", dest)
    assert dest.read_text() == "inside\n" and stat.S_IMODE(dest.stat().st_mode) == 0o400
    for src in (tree / "link-out", tree / "dirlink-out" / "secret", tree / "dirlink" / "deeper" / "file"):
        with pytest.raises(BadInput, match="symbolic link"):
            hostpath.copy_secret(src, tmp_path / "never")
    assert not (tmp_path / "never").exists()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(BadInput, match="not a regular file"):  # refused before it is opened: no hang
        hostpath.copy_secret(fifo, tmp_path / "never")
    with pytest.raises(BadInput, match="not a regular file"):
        hostpath.copy_secret(tree / "dir", tmp_path / "never")
    big = tmp_path / "big"
    big.write_bytes(b"x" * 2048)
    with pytest.raises(BadInput, match="larger than"):
        hostpath.copy_secret(big, tmp_path / "never", max_bytes=1024)


@pytest.mark.parametrize(("field", "text"), [("/a\\040b", "/a b"), ("/x\\011y\\012z", "/x\ty\nz"),
                                             ("/back\\134slash", "/back\\slash"), ("/plain", "/plain")])
def test_mountinfo_fields_are_unescaped(field: str, text: str) -> None:
    assert hostpath._unescape(field) == text


@ROOT_ONLY
def test_staging_binds_the_fd_not_the_path_read_only(tmp_path: Path) -> None:
    repo = tmp_path / "ws" / ".git"
    repo.mkdir(parents=True)
    (repo / "config").write_text("[core]\n")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("host file\n")
    stage = hostpath.Staging(tmp_path / "run" / "binds")
    (tmp_path / "run").mkdir()
    fd = os.open(repo, os.O_PATH | os.O_DIRECTORY)
    try:
        # the path is swapped for a symlink after the fd was taken: the staged mount is still the fd's
        os.rename(repo, tmp_path / "ws" / "old")
        (tmp_path / "ws" / ".git").symlink_to(tmp_path / "etc")
        dir_point = stage.bind(fd)
        assert os.listdir(dir_point) == ["config"]
        with pytest.raises(OSError) as err:
            (Path(dir_point) / "config").write_text("[core]\nfsmonitor = evil\n")
        assert err.value.errno == 30  # EROFS
        fd2 = os.open(tmp_path / "ws" / "old" / "config", os.O_PATH)
        file_point = stage.bind(fd2)
        assert Path(file_point).read_text() == "[core]\n"
        # the checks a container gets: a read-only mount point holding that very file
        me = os.getpid()
        good = [hostpath.Expect.of(dir_point, fd, True), hostpath.Expect.of(file_point, fd2, True)]
        assert hostpath.verify_mounts(me, good) == []
        wrong_file = hostpath.Expect(dir_point, good[1].dev, good[1].ino, True)
        not_mounted = hostpath.Expect.of(str(tmp_path / "ws" / "old"), fd, True)
        through_link = hostpath.Expect.of(str(tmp_path / "ws" / ".git" / "passwd"), fd, True)
        problems = hostpath.verify_mounts(me, [wrong_file, not_mounted, through_link])
        assert "is not the file kp-run bound there" in problems[0]
        assert "not a mount point" in problems[1]
        assert "symbolic link" in problems[2]
        os.close(fd2)
    finally:
        os.close(fd)
        stage.close()
    assert not (tmp_path / "run" / "binds").exists()
    assert not any(str(tmp_path) in line for line in Path("/proc/self/mountinfo").read_text().splitlines())
    stage.close()  # idempotent


def test_openat2_is_what_resolves_where_the_kernel_has_it(tree: Path) -> None:
    root = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = hostpath._openat2(root, "dir/deeper", os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        if fd is None:
            pytest.skip("no openat2 here: the fd walk does the job (tested above)")
        os.close(fd)
        with pytest.raises(OSError) as err:
            hostpath._openat2(root, "dirlink/deeper", os.O_PATH | os.O_CLOEXEC)
        assert err.value.errno == 40  # ELOOP: RESOLVE_NO_SYMLINKS
        with pytest.raises(OSError) as err:
            hostpath._openat2(root, "dir/../..", os.O_PATH | os.O_CLOEXEC)
        assert err.value.errno == 18  # EXDEV: RESOLVE_BENEATH
    finally:
        os.close(root)


def _in_own_namespace(spec: hostpath.InPlace, probe: list[tuple[str, str]]) -> list[str]:
    """Fork; in the child make ``spec`` read-only in a mount namespace of its own, then try each
    (operation, path) of ``probe``; the errno names (or "ok") it met, as the child saw them."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        out = []
        try:
            hostpath.private_namespace()
            hostpath.read_only_in_place(spec)
            for op, path in probe:
                try:
                    if op == "write":
                        with open(path, "a") as f:
                            f.write("x")
                    elif op == "create":
                        Path(path).write_text("x")
                    else:
                        os.rename(path, path + ".moved")
                    out.append("ok")
                except OSError as exc:
                    out.append(os.strerror(exc.errno or 0))
        except Exception as exc:  # the child reports everything and never returns into pytest
            out.append(f"setup: {exc}")
        finally:
            os.write(write, "\n".join(out).encode())
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        said = f.read().split("\n")
    os.waitpid(pid, 0)
    return said


@ROOT_ONLY
def test_read_only_in_place_holds_in_the_namespace_and_nowhere_else(tmp_path: Path) -> None:
    (tmp_path / "repo" / ".git").mkdir(parents=True)
    (tmp_path / "repo" / ".git" / "config").write_text("[core]\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".git").write_text("gitdir: ../repo/.git\n")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        spec = hostpath.InPlace.of(tmp_path, fd, ["repo/.git", "sub/.git"])
    finally:
        os.close(fd)
    said = _in_own_namespace(spec, [("write", f"{tmp_path}/repo/.git/config"),
                                    ("create", f"{tmp_path}/repo/.git/hooks"),
                                    ("rename", f"{tmp_path}/repo/.git"),
                                    ("write", f"{tmp_path}/sub/.git"),
                                    ("rename", f"{tmp_path}/sub/.git"),
                                    ("create", f"{tmp_path}/repo/other")])
    assert said == ["Read-only file system", "Read-only file system", "Device or resource busy",
                    "Read-only file system", "Device or resource busy", "ok"]
    # the mounts were the child's alone
    (tmp_path / "repo" / ".git" / "config").write_text("[core]\n\tmine = 1\n")


@ROOT_ONLY
def test_read_only_in_place_refuses_an_entry_swapped_since_the_survey(tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        spec = hostpath.InPlace.of(tmp_path, fd, [".git"])
    finally:
        os.close(fd)
    os.rename(tmp_path / ".git", tmp_path / "old")
    (tmp_path / ".git").mkdir()
    said = _in_own_namespace(spec, [("create", f"{tmp_path}/.git/config")])
    assert said[0].startswith("setup: ") and "changed since it was surveyed" in said[0]
    (tmp_path / ".git").rmdir()
    (tmp_path / ".git").symlink_to("old")
    said = _in_own_namespace(spec, [("create", f"{tmp_path}/.git/config")])
    assert said[0].startswith("setup: ") and "symbolic link" in said[0]


def test_the_vm_backend_reads_a_secret_as_the_host_does(tree: Path, tmp_path: Path) -> None:
    """kp-run in a VM sends secrets it read on the host: the same rules (no agent's symlink, regular files, a cap)."""
    from kodepipe.container import vmrun
    from kodepipe.container.policy import SecretSpec

    def spec(src: Path) -> SecretSpec:
        return SecretSpec(str(src), "/f", str(src))

    assert vmrun.read_secrets([spec(tree / "dir" / "deeper" / "file")]) == [b"inside\n"]
    for src in (tree / "link-out", tree / "dirlink-out" / "secret"):
        with pytest.raises(BadInput, match="symbolic link"):
            vmrun.read_secrets([spec(src)])
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(BadInput, match="not a regular file"):
        vmrun.read_secrets([spec(fifo)])
    big = tmp_path / "big"
    big.write_bytes(b"x" * 2048)
    with pytest.raises(BadInput, match="larger than"):
        hostpath.read_secret(big, max_bytes=1024)
