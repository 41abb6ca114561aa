"""sharegit: the survey of a VM's shared folder kept across commands, and what settle neutralises.

The guest's writes are made here by the test itself (the integration test makes them from a real
guest as root, through 9p): a share is only a host directory, so the logic is the same."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import orjson
import pytest

from kodepipe.core.errors import BadInput
from kodepipe.host import gitguard
from kodepipe.vm import sharegit


def git(cwd: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd), "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, check=False)


def forge_repo(where: Path, config: str = "") -> None:
    """A repository made by hand, as a guest without git would: HEAD, objects, refs, config."""
    where.mkdir(parents=True, exist_ok=True)
    (where / "HEAD").write_text("ref: refs/heads/main\n")
    (where / "objects").mkdir()
    (where / "refs").mkdir()
    (where / "config").write_text("[core]\n\trepositoryformatversion = 0\n" + config)


@pytest.fixture
def share(tmp_path: Path) -> Path:
    ws = tmp_path / "proj"
    (ws / "sub").mkdir(parents=True)
    (ws / "lib").mkdir()
    git(ws, "init", "-q", ".")
    git(ws / "lib", "init", "-q", ".")  # a nested repository of the user's own
    (ws / "vendor").mkdir()
    (ws / "vendor" / ".git").write_text("gitdir: ../.git/modules/vendor\n")  # a submodule's pointer
    return ws


def test_prepare_hands_every_repository_read_only_and_keeps_the_survey(share: Path, tmp_path: Path) -> None:
    folder = tmp_path / "vm"
    folder.mkdir()
    prepared = sharegit.prepare(share, folder, writable=False)
    assert prepared.record == {"writable": False, "read_only": [".git", "lib/.git", "vendor/.git"]}
    assert prepared.read_only is not None and prepared.read_only.root == str(share)
    want = [(p, os.lstat(share / p).st_dev, os.lstat(share / p).st_ino) for p in (".git", "lib/.git", "vendor/.git")]
    assert list(prepared.read_only.entries) == want
    assert (folder / sharegit.STATE).is_file()


def test_settle_renames_what_the_guest_planted_in_place(share: Path, tmp_path: Path) -> None:
    folder = tmp_path / "vm"
    folder.mkdir()
    sharegit.prepare(share, folder, writable=False)
    marker = tmp_path / "marker"
    forge_repo(share / "sub" / ".git", f"\tfsmonitor = touch {marker}\n")  # a nested repository
    forge_repo(share / "b", f"\tbare = false\n\tworktree = ..\n\tfsmonitor = touch {marker}\n")  # a bare one
    (share / "c").mkdir()
    (share / "c" / ".git").symlink_to("../sub/.git")  # a .git symlink
    planted, problem = sharegit.settle(folder, "vm1")
    assert problem is None
    assert {(p["path"], p["why"]) for p in planted} == {
        ("sub/.git", "new .git"), ("b/HEAD", "new bare repository"), ("c/.git", "new .git")}
    for p in planted:
        assert ".planted-by-vm1" in p["moved_to"] and os.path.lexists(share / p["moved_to"])
    for where in ("sub", "b", "c", "."):
        git(share / where, "status")
    assert not marker.exists()
    assert not (folder / sharegit.STATE).exists()
    assert sharegit.settle(folder, "vm1") == ([], None)  # settled once: nothing more to do


def test_settle_would_have_noticed_nothing_without_the_survey(share: Path, tmp_path: Path) -> None:
    """The attack above works when nothing settles: git runs the guest's fsmonitor."""
    marker = tmp_path / "marker"
    forge_repo(share / "sub" / ".git", f"\tfsmonitor = touch {marker}\n")
    git(share / "sub", "status")
    assert marker.exists()


def test_a_swapped_repository_of_the_users_is_neutralised(share: Path, tmp_path: Path) -> None:
    folder = tmp_path / "vm"
    folder.mkdir()
    sharegit.prepare(share, folder, writable=False)
    os.rename(share / "lib" / ".git", share / "lib" / "old")
    forge_repo(share / "lib" / ".git", "\tfsmonitor = touch /nonexistent\n")
    planted, _ = sharegit.settle(folder, "vm1")
    # the user's own, moved where git takes it for a bare repository, is disarmed too
    assert [(p["path"], p["why"]) for p in planted] == [("lib/.git", "replaced .git"),
                                                        ("lib/old/HEAD", "new bare repository")]


def test_writable_git_watches_and_restores(share: Path, tmp_path: Path) -> None:
    folder = tmp_path / "vm"
    folder.mkdir()
    config = (share / "vendor" / ".git").read_bytes()
    prepared = sharegit.prepare(share, folder, writable=True)
    assert prepared.read_only is None and prepared.record == {"writable": True, "read_only": []}
    marker = tmp_path / "marker"
    with open(share / ".git" / "config", "a") as f:
        f.write(f"[core]\n\tfsmonitor = touch {marker}\n")
    (share / ".git" / "hooks" / "pre-commit").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (share / "vendor" / ".git").write_text("gitdir: ../b\n")
    planted, problem = sharegit.settle(folder, "vm1")
    assert problem is None
    assert {p["path"] for p in planted} == {".git/config", ".git/hooks/pre-commit", "vendor/.git"}
    assert (share / "vendor" / ".git").read_bytes() == config  # put back from the copy
    assert b"fsmonitor" not in (share / ".git" / "config").read_bytes()
    git(share, "status")
    assert not marker.exists()


def test_non_utf8_paths_survive_the_state_file(tmp_path: Path) -> None:
    ws = tmp_path / "proj"
    odd = os.fsdecode(b"caf\xe9")
    (ws / odd).mkdir(parents=True)
    git(ws / odd, "init", "-q", ".")
    folder = tmp_path / "vm"
    folder.mkdir()
    prepared = sharegit.prepare(ws, folder, writable=False)
    assert prepared.record["read_only"] == ["caf\\xe9/.git"]
    fd = os.open(ws, os.O_RDONLY | os.O_DIRECTORY)
    guard = sharegit.load(orjson.loads((folder / sharegit.STATE).read_bytes()), fd)
    assert set(guard.repos) == {f"{odd}/.git"}
    os.close(fd)


@pytest.mark.parametrize("content", [b"not json", b'{"share": "%s", "repos": [["x"]]}'])
def test_a_bad_state_file_is_a_problem_not_a_crash(share: Path, tmp_path: Path, content: bytes) -> None:
    folder = tmp_path / "vm"
    folder.mkdir()
    (folder / sharegit.STATE).write_bytes(content.replace(b"%s", str(share).encode()))
    planted, problem = sharegit.settle(folder, "vm1")
    assert planted == [] and problem and "look before" in problem


def test_too_many_repositories_or_a_bare_share_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          share: Path) -> None:
    folder = tmp_path / "vm"
    folder.mkdir()
    monkeypatch.setattr(gitguard, "MAX_BINDS", 2)
    with pytest.raises(BadInput, match="holds 3 git repositories"):
        sharegit.prepare(share, folder, writable=False)
    sharegit.prepare(share, folder, writable=True)  # watched instead: allowed
    bare = tmp_path / "bare"
    forge_repo(bare)
    with pytest.raises(BadInput, match="bare git repository"):
        sharegit.prepare(bare, folder, writable=False)
