"""gitguard: which repositories git would find, what in them git reads as configuration, and what
kp-run does about what an agent planted or changed (the real attacks: tests/integration/test_git_attacks.py)."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from kodepipe.core import fdtree
from kodepipe.core.errors import BadInput
from kodepipe.host import gitguard


def git(*args: str) -> None:
    subprocess.run(["git", *args], check=True, capture_output=True)


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    git("init", "-q", str(ws))
    (ws / "src").mkdir()
    (ws / "src" / "main.py").write_text("print(1)\n")
    return ws


@pytest.fixture
def root_fd(ws: Path) -> Iterator[int]:
    fd = os.open(ws, os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


@pytest.mark.parametrize(("names", "bare"), [
    ({"HEAD", "objects", "refs"}, True),
    ({"HEAD", "commondir"}, True),
    ({"HEAD", "objects", "refs", "config", "hooks"}, True),
    ({"HEAD", "objects"}, False),
    ({"objects", "refs"}, False),
    ({"commondir", "objects", "refs"}, False),
    (set(), False),
])
def test_what_git_takes_for_a_bare_repository(names: set[str], bare: bool) -> None:
    assert gitguard.is_bare(names) is bare


def test_find_lists_every_repository_git_would_find(ws: Path) -> None:
    git("init", "-q", str(ws / "vendor" / "lib"))  # a nested repository
    (ws / "sub").mkdir()
    (ws / "sub" / ".git").write_text("gitdir: ../.git/modules/sub\n")  # a pointer
    (ws / "deep" / "a").mkdir(parents=True)
    (ws / "deep" / "a" / ".git").symlink_to("/etc")  # a symlink: listed, never followed
    git("init", "-q", "--bare", str(ws / "fixtures" / "bare.git"))
    (ws / "almost").mkdir()
    (ws / "almost" / "HEAD").write_text("ref: refs/heads/main\n")  # no objects, no refs: not one
    # a chain deeper than any recursion limit, with a repository at the bottom
    deep = ws / "chain"
    fd = os.open(ws, os.O_RDONLY | os.O_DIRECTORY)
    os.mkdir("chain", dir_fd=fd)
    cur = os.open("chain", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
    os.close(fd)
    for _ in range(1500):
        os.mkdir("d", dir_fd=cur)
        nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=cur)
        os.close(cur)
        cur = nxt
    os.mkdir(".git", dir_fd=cur)
    os.close(cur)
    fd = os.open(ws, os.O_RDONLY | os.O_DIRECTORY)
    try:
        found = gitguard.find(fd)
    finally:
        fdtree.remove(fd, "chain")  # pytest's own clean-up recurses, and would fail on it
        os.close(fd)
    deepest = "chain/" + "/".join(["d"] * 1500) + "/.git"
    assert {p: r.kind for p, r in found.items()} == {
        ".git": "dir", "vendor/lib/.git": "dir", "sub/.git": "file", "deep/a/.git": "symlink",
        "fixtures/bare.git": "bare", deepest: "dir"}
    assert not deep.exists()


def test_find_does_not_enter_a_dot_git(ws: Path, root_fd: int) -> None:
    git("init", "-q", str(ws / ".git" / "modules" / "m"))  # inside .git: not a place git looks from
    assert sorted(gitguard.find(root_fd)) == [".git"]
    with pytest.raises(fdtree.TooMany):
        gitguard.find(root_fd, limit=2)


def test_guarded_is_everything_git_reads_but_data(ws: Path, root_fd: int) -> None:
    git("-C", str(ws), "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "--allow-empty", "-m", "x")
    dot = ws / ".git"
    (dot / "info" / "attributes").write_text("* filter=x\n")
    (dot / "config.worktree").write_text("")
    git("init", "-q", "--bare", str(dot / "modules" / "sub"))
    (dot / "worktrees" / "w").mkdir(parents=True)
    for name in ("HEAD", "commondir", "gitdir"):
        (dot / "worktrees" / "w" / name).write_text("x\n")
    prints = gitguard.guarded(root_fd, gitguard.find(root_fd)[".git"])
    paths = set(prints)
    for guarded in ("", "config", "config.worktree", "hooks", "hooks/pre-commit.sample", "info",
                    "info/attributes", "modules/sub", "modules/sub/config", "modules/sub/hooks",
                    "worktrees/w", "worktrees/w/commondir", "worktrees/w/gitdir"):
        assert guarded in paths, guarded
    for data in ("HEAD", "index", "objects", "refs", "logs", "description", "COMMIT_EDITMSG", "info/exclude",
                 "modules/sub/objects", "modules/sub/refs", "modules/sub/HEAD", "worktrees/w/HEAD"):
        assert data not in paths, data


def test_a_pointer_or_a_symlink_is_guarded_as_itself(ws: Path, root_fd: int) -> None:
    (ws / "sub").mkdir()
    (ws / "sub" / ".git").write_text("gitdir: ../.git/modules/sub\n")
    found = gitguard.find(root_fd)
    assert list(gitguard.guarded(root_fd, found["sub/.git"])) == [""]


@pytest.mark.parametrize(("config", "hooks"), [
    ("[core]\n\thooksPath = .husky\n", ".husky"),
    ("[core]\n\tbare = false\n[alias]\n\thookspath = x\n", None),
    ('[core] HooksPath = "/etc/hooks"\n', "/etc/hooks"),
    ("", None),
])
def test_core_hooks_path_is_read_as_text(ws: Path, root_fd: int, config: str, hooks: str | None) -> None:
    (ws / ".git" / "config").write_text(config)
    assert gitguard.hooks_path(root_fd, gitguard.find(root_fd)[".git"]) == hooks


def test_by_default_repositories_are_bound_and_symlinks_only_reported(ws: Path, root_fd: int) -> None:
    git("init", "-q", str(ws / "nested"))
    (ws / "linked").mkdir()
    (ws / "linked" / ".git").symlink_to("/etc")
    guard = gitguard.Guard(os.dup(root_fd), gitguard.find(root_fd), writable=False)
    try:
        assert guard.protect == [".git", "nested/.git"]
        assert guard.symlinks == ["linked/.git"]
        said = guard.warnings(ws)
        assert len(said) == 1 and "linked/.git is a symbolic link (to /etc)" in said[0]
        assert gitguard.Guard(root_fd, gitguard.find(root_fd), writable=True).protect == []
    finally:
        guard.close()


def test_past_max_binds_the_rest_are_watched(ws: Path, root_fd: int, monkeypatch: pytest.MonkeyPatch) -> None:
    for n in range(3):
        git("init", "-q", str(ws / f"r{n}"))
    monkeypatch.setattr(gitguard, "MAX_BINDS", 2)
    guard = gitguard.Guard(root_fd, gitguard.find(root_fd), writable=False)
    guard.watch()
    assert guard.protect == [".git", "r0/.git"]
    assert sorted(w.repo.path for w in guard.watched) == ["r1/.git", "r2/.git"]
    assert any("more than 2 git repositories" in line for line in guard.warnings(ws))


def plant(ws: Path) -> None:
    """What an agent leaves: a nested repository, a pointer, a bare repository, a symlink."""
    git("init", "-q", str(ws / "src" / "evil"))
    (ws / "p").mkdir()
    (ws / "p" / ".git").write_text("gitdir: ../elsewhere\n")
    git("init", "-q", "--bare", str(ws / "b"))
    (ws / "l").mkdir()
    (ws / "l" / ".git").symlink_to("../src/evil/.git")


def test_after_a_run_what_was_planted_is_moved_into_the_run_folder(ws: Path, tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    guard = gitguard.Guard.survey(os.open(ws, os.O_RDONLY | os.O_DIRECTORY), writable=False, direct=True)
    plant(ws)
    meta: dict[str, object] = {}
    said: list[str] = []
    assert guard.check(folder, "run-x", meta, said.append) is True
    planted = {p["path"]: p for p in meta["git_planted"]}  # type: ignore[attr-defined]
    assert set(planted) == {"src/evil/.git", "p/.git", "b/HEAD", "l/.git"}
    assert planted["b/HEAD"]["why"] == "new bare repository" and planted["p/.git"]["type"] == "file"
    for entry in planted.values():
        assert Path(entry["moved_to"]).parent == folder / "git-planted"
        assert os.path.lexists(entry["moved_to"])
    assert not os.path.lexists(ws / "src" / "evil" / ".git") and not (ws / "b" / "HEAD").exists()
    assert (ws / "b" / "config").exists()  # the rest of it stays: without HEAD git does not see a repository
    assert (ws / ".git" / "config").exists() and "git_problem" not in meta
    assert "moved it into" in said[0]
    assert gitguard.find(os.open(ws, os.O_RDONLY | os.O_DIRECTORY)) .keys() == {".git"}
    guard.close()


def test_a_repository_moved_whole_by_the_agent_is_not_planted(ws: Path, tmp_path: Path) -> None:
    git("init", "-q", str(ws / "sub"))
    guard = gitguard.Guard.survey(os.open(ws, os.O_RDONLY | os.O_DIRECTORY), writable=False, direct=True)
    os.rename(ws / "sub", ws / "sub2")  # a bound .git moves with its parent: still the user's own
    assert guard.after(tmp_path, "run-x") == []
    guard.close()


def test_with_writable_git_changed_configuration_is_moved_and_yours_put_back(ws: Path, tmp_path: Path) -> None:
    config = (ws / ".git" / "config").read_bytes()
    (ws / ".git" / "hooks" / "pre-commit").write_text("#!/bin/sh\necho mine\n")
    (ws / ".git" / "hooks" / "pre-commit").chmod(0o755)
    guard = gitguard.Guard.survey(os.open(ws, os.O_RDONLY | os.O_DIRECTORY), writable=True, direct=True)
    assert guard.protect == []
    # the agent commits (data: fine) and plants code (not fine)
    (ws / "src" / "x").write_text("x\n")
    git("-C", str(ws), "add", ".")
    git("-C", str(ws), "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "-m", "agent")
    git("-C", str(ws), "config", "core.fsmonitor", "touch /tmp/pwned")
    (ws / ".git" / "hooks" / "pre-commit").write_text("#!/bin/sh\necho agent\n")
    (ws / ".git" / "hooks" / "post-checkout").write_text("#!/bin/sh\n")
    (ws / ".git" / "info" / "attributes").write_text("* filter=evil\n")
    (ws / ".git" / "commondir").write_text("../../elsewhere\n")
    planted = guard.after(tmp_path, "run-x")
    by_path = {p["path"]: p for p in planted}
    assert set(by_path) == {".git/config", ".git/hooks/pre-commit", ".git/hooks/post-checkout",
                            ".git/info/attributes", ".git/commondir"}
    assert by_path[".git/config"]["restored"] is True and by_path[".git/hooks/pre-commit"]["restored"] is True
    assert "restored" not in by_path[".git/commondir"]
    assert (ws / ".git" / "config").read_bytes() == config
    assert (ws / ".git" / "hooks" / "pre-commit").read_text() == "#!/bin/sh\necho mine\n"
    assert (ws / ".git" / "hooks" / "pre-commit").stat().st_mode & 0o777 == 0o755
    assert b"fsmonitor" in Path(by_path[".git/config"]["moved_to"]).read_bytes()
    assert not (ws / ".git" / "info" / "attributes").exists()
    log = subprocess.run(["git", "-C", str(ws), "log", "--oneline"], capture_output=True, text=True, check=True)
    assert "agent" in log.stdout  # the commit stays
    guard.close()


def test_a_pointer_rewritten_or_replaced_comes_back(ws: Path, tmp_path: Path) -> None:
    (ws / "sub").mkdir()
    (ws / "sub" / ".git").write_text("gitdir: ../.git/modules/sub\n")
    (ws / "sub2").mkdir()
    (ws / "sub2" / ".git").write_text("gitdir: ../.git/modules/sub2\n")
    guard = gitguard.Guard.survey(os.open(ws, os.O_RDONLY | os.O_DIRECTORY), writable=True, direct=True)
    (ws / "sub" / ".git").write_text("gitdir: ../evil\n")  # in place
    os.unlink(ws / "sub2" / ".git")
    (ws / "sub2" / ".git").write_text("gitdir: ../evil\n")  # replaced
    planted = {p["path"]: p for p in guard.after(tmp_path, "run-x")}
    assert set(planted) == {"sub/.git", "sub2/.git"}
    assert all(p["restored"] for p in planted.values())
    assert (ws / "sub" / ".git").read_text() == "gitdir: ../.git/modules/sub\n"
    assert (ws / "sub2" / ".git").read_text() == "gitdir: ../.git/modules/sub2\n"
    guard.close()


def test_across_filesystems_a_planted_entry_is_renamed_in_place(ws: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    guard = gitguard.Guard.survey(os.open(ws, os.O_RDONLY | os.O_DIRECTORY), writable=False, direct=True)
    git("init", "-q", str(ws / "n"))
    real = os.rename

    def rename(src: str, dst: object, *, src_dir_fd: int | None = None, dst_dir_fd: int | None = None) -> None:
        if dst_dir_fd is None:  # into the state directory
            raise OSError(errno.EXDEV, "cross-device")
        real(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "rename", rename)  # the os module gitguard calls
    (planted,) = guard.after(tmp_path, "run-x")
    assert planted["moved_to"] == "n/.git.planted-by-run-x"
    assert (ws / "n" / ".git.planted-by-run-x" / "config").exists() and not (ws / "n" / ".git").exists()
    guard.close()


def change(path: str, kind: str = "added") -> SimpleNamespace:
    return SimpleNamespace(path=path, kind=kind)


def test_quarantined_changes_to_git_metadata(ws: Path) -> None:
    git("init", "-q", "--bare", str(ws / "fixtures" / "bare.git"))
    (ws / "half").mkdir()
    (ws / "half" / "objects").mkdir()
    (ws / "half" / "refs").mkdir()
    changes = [
        change(".git/config", "modified"), change(".git/hooks/pre-commit"), change("sub/.git"),
        change("sub/.git/config"), change("src/main.py", "modified"), change("a/.gitignore"),
        change(".github/workflows/x.yml"),
        change("fixtures/bare.git/hooks/post-checkout"),  # in a bare repository the workspace has
        change("half/HEAD"),  # makes one of a directory that had objects and refs
        change("new"), change("new/HEAD"), change("new/objects"), change("new/refs"), change("new/refs/x"),
        change("only/HEAD"),  # HEAD alone is not a repository
        change(".git", "deleted"),
    ]
    found = gitguard.in_changes(changes, ws)
    assert found == sorted([".git", ".git/config", ".git/hooks/pre-commit", "sub/.git", "sub/.git/config",
                            "fixtures/bare.git/hooks/post-checkout", "half/HEAD", "new", "new/HEAD",
                            "new/objects", "new/refs", "new/refs/x"])
    # a repository whose HEAD is deleted is no longer one after the apply
    assert gitguard.in_changes([change("fixtures/bare.git/HEAD", "deleted")], ws) == []
    assert gitguard.shown(found) == ".git, fixtures/bare.git/hooks/post-checkout, half/HEAD, new, sub/.git (12 paths)"
    assert gitguard.shown(["a\nb"]) == "a\\nb"


def test_quarantined_changes_deep_and_many_stay_linear(ws: Path) -> None:
    chain = "/".join(["d"] * 3000)
    changes = [change("/".join(["d"] * n)) for n in range(1, 3001)] + [change(chain + "/.git")]
    assert gitguard.in_changes(changes, ws) == [chain + "/.git"]


# -- D12: a repository whose name is not UTF-8 is refused, on every backend ---------------------------

ODD = os.fsdecode(b"caf\xe9")  # latin-1, not UTF-8


@pytest.mark.parametrize("writable", [False, True])
@pytest.mark.parametrize("where", [f"{ODD}/.git", f"sub/{ODD}"])
def test_a_repository_named_in_no_utf8_is_refused_on_the_host(ws: Path, writable: bool, where: str) -> None:
    """The host used to watch it silently instead of binding it read-only (D12); a VM refuses it: both
    refuse now, with the name escaped, whatever the mode."""
    if where.endswith(".git"):
        git("init", "-q", str(ws / ODD))
    else:  # a bare repository
        git("init", "-q", "--bare", str(ws / where))
    fd = os.open(ws, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(BadInput) as caught:
            gitguard.Guard.survey(fd, writable=writable, direct=True)
        assert "caf\\xe9" in caught.value.message and "not UTF-8" in caught.value.message
        os.fstat(fd)  # still open: a failed survey does not take it
    finally:
        os.close(fd)


def test_the_same_refusal_in_a_vm() -> None:
    from kodepipe.container import vmrun

    messages = []
    with pytest.raises(BadInput) as caught:
        gitguard.check_names([f"{ODD}/.git"])  # Guard.survey's, on the host
    messages.append(caught.value.message)
    with pytest.raises(BadInput) as caught:
        vmrun.check_git_paths("/workspace", [f"{ODD}/.git"])
    messages.append(caught.value.message)
    assert messages[0] == messages[1] and "caf\\xe9/.git" in messages[0]
    gitguard.check_names(["café/.git", "a/.git"])  # UTF-8, whatever the script: accepted


def test_a_utf8_repository_is_bound_and_kp_boot_share_still_watches_the_rest(ws: Path, root_fd: int) -> None:
    git("init", "-q", str(ws / "café"))
    guard = gitguard.Guard.survey(os.dup(root_fd), writable=False, direct=True)
    try:
        assert "café/.git" in guard.protect
    finally:
        guard.close()
    git("init", "-q", str(ws / ODD))
    # kp-boot --share binds in place without Podman: its Guard (not the survey) still takes such a name
    guard = gitguard.Guard(os.dup(root_fd), gitguard.find(root_fd), writable=False)
    try:
        assert f"{ODD}/.git" not in guard.protect and "café/.git" in guard.protect
    finally:
        guard.close()
