"""kp-run inside a VM, git and the other host defaults: the guest-side survey of the workspace's
repositories (the very ``find`` and ``perl`` the guest runs, run here on real trees), what is bound
read-only, what is moved away after the run, what is refused before anything happens in the guest,
and the guest's kernel quotas."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kodepipe.container import sandbox, vmrun
from kodepipe.core.errors import BadInput
from kodepipe.host import gitguard, hostpath
from kodepipe.vm.hop import Outcome
from tests import policies
from tests.test_vmrun import LIMITS, FakeGuest, create_words, job, request


def survey(root: Path) -> dict[str, vmrun.GuestRepo]:
    out = subprocess.run(vmrun.git_survey_argv(), cwd=root, capture_output=True, check=True).stdout
    return vmrun.parse_git_survey(out)


def bare(path: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", "init", "-q", "--bare", str(path)], check=True)


TREES: dict[str, Any] = {
    "dotgit-dir": lambda ws: subprocess.run(["git", "init", "-q", str(ws)], check=True),
    "nested-deep": lambda ws: subprocess.run(["git", "init", "-q", str(ws / "a" / "b" / "c" / "d")], check=True),
    "gitdir-file": lambda ws: (ws / "sub").mkdir() or (ws / "sub" / ".git").write_text("gitdir: ../x\n"),
    "dotgit-symlink": lambda ws: (ws / ".git").symlink_to("/etc"),
    "bare-in-subdir": lambda ws: bare(ws / "b"),
    "bare-at-the-top": lambda ws: bare(ws),
    "odd-names": lambda ws: subprocess.run(["git", "init", "-q", str(ws / "a b\nc" / "-x,y")], check=True),
    "inside-a-dotgit-is-not-entered": lambda ws: (subprocess.run(["git", "init", "-q", str(ws)], check=True),
                                                  bare(ws / ".git" / "modules" / "m")),
    "bare-behind-a-symlink-is-not-followed": lambda ws: (bare(ws.parent / "elsewhere"),
                                                         (ws / "link").symlink_to(ws.parent / "elsewhere")),
}


@pytest.mark.parametrize("name", list(TREES))
def test_the_guest_survey_finds_what_gitguard_finds(tmp_path: Path, name: str) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    TREES[name](ws)
    found = survey(ws)
    fd = hostpath.open_workspace(ws)
    try:
        expected = gitguard.find(fd)
    finally:
        os.close(fd)
    assert bool(expected) != name.endswith("not-followed"), "the tree has a repository, or one behind a link"
    assert {p: r.kind for p, r in found.items()} == {p: r.kind for p, r in expected.items()}
    for path, repo in found.items():  # the same identity as the host's survey
        assert (int(repo.dev), int(repo.ino)) == (expected[path].dev, expected[path].ino)


def test_only_real_repositories_are_bound_never_a_symlink_nor_the_workspace() -> None:
    repos = {p: vmrun.GuestRepo(p, k, "1", str(n), "0") for n, (p, k) in enumerate(
        [("", "bare"), (".git", "dir"), ("a/.git", "file"), ("b/.git", "symlink"), ("c", "bare"), ("d/.git", "other")])}
    assert vmrun.git_protect(repos, writable=False) == [".git", "a/.git", "c"]
    assert vmrun.git_protect(repos, writable=True) == []
    many = {f"r{n:03}/.git": vmrun.GuestRepo(f"r{n:03}/.git", "dir", "1", str(n), "0") for n in range(200)}
    assert len(vmrun.git_protect(many, writable=False)) == gitguard.MAX_BINDS
    said = vmrun.git_warnings(many, vmrun.git_protect(many, writable=False), writable=False)
    assert any("more than 128" in w for w in said)
    said = vmrun.git_warnings(repos, vmrun.git_protect(repos, writable=False), writable=False)
    assert any(w.startswith("b/.git is a symbolic link") for w in said)
    assert any("itself a bare git repository" in w for w in said)


@pytest.mark.parametrize("path", ["a,b/.git", "a\nb/.git", os.fsdecode(b"\xff/.git")])
def test_a_repository_podman_cannot_bind_is_refused(path: str) -> None:
    with pytest.raises(BadInput):
        vmrun.check_git_paths("/workspace", [path])


def _repo(path: str, kind: str, ino: str, ctime: str = "1") -> vmrun.GuestRepo:
    return vmrun.GuestRepo(path, kind, "8", ino, ctime)


PLANTED = [
    ("nothing-new", {".git": _repo(".git", "dir", "5")}, {".git": _repo(".git", "dir", "5", "9")}, []),
    ("new-nested", {}, {"sub/.git": _repo("sub/.git", "dir", "6")}, [("sub/.git", "new .git", "dir")]),
    ("swapped", {".git": _repo(".git", "dir", "5")}, {".git": _repo(".git", "dir", "7")},
     [(".git", "replaced .git", "dir")]),
    ("gitdir-file-rewritten", {".git": _repo(".git", "file", "5", "1")}, {".git": _repo(".git", "file", "5", "2")},
     [(".git", "replaced .git", "file")]),
    ("moved-is-not-new", {"a/.git": _repo("a/.git", "dir", "5")}, {"b/.git": _repo("b/.git", "dir", "5")}, []),
    ("bare-loses-its-head", {}, {"b": _repo("b", "bare", "9")}, [("b/HEAD", "new bare repository", "bare")]),
    ("bare-top", {}, {"": _repo("", "bare", "9")}, [("HEAD", "new bare repository", "bare")]),
    ("symlink", {}, {"s/.git": _repo("s/.git", "symlink", "3")}, [("s/.git", "new .git", "symlink")]),
]


@pytest.mark.parametrize(("before", "after", "expected"), [p[1:] for p in PLANTED], ids=[p[0] for p in PLANTED])
def test_what_is_planted(before: dict[str, vmrun.GuestRepo], after: dict[str, vmrun.GuestRepo],
                         expected: list[tuple[str, str, str]]) -> None:
    assert vmrun.git_planted(before, after) == expected


def neutralise(ws: Path, dest: Path, paths: list[str]) -> list[tuple[str | None, str | None]]:
    data = b"".join(os.fsencode(p) + b"\0" for p in paths)
    out = subprocess.run(["perl", "-e", vmrun.NEUTRALISE, str(ws), str(dest), "run-x"], input=data,
                         capture_output=True, check=True).stdout
    return vmrun.parse_moved(out, len(paths))


def test_planted_entries_are_renamed_into_the_runs_folder(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    odd = "a b\nc,-d"
    for rel in (".git", f"{odd}/.git", "b"):
        (ws / rel).mkdir(parents=True)
    (ws / "b" / "HEAD").write_text("ref: refs/heads/main\n")
    (ws / "n").mkdir()
    (ws / "n" / ".git").symlink_to("/etc")
    dest = tmp_path / "keep" / "runs" / "r" / "git-planted"
    moved = neutralise(ws, dest, [".git", f"{odd}/.git", "b/HEAD", "n/.git", "gone/.git"])
    assert moved[:4] == [(f"{dest}/0-.git", None), (f"{dest}/1-.git", None), (f"{dest}/2-HEAD", None),
                         (f"{dest}/3-.git", None)]
    assert moved[4][0] is None and moved[4][1]  # why it could not
    assert not (ws / ".git").exists() and not (ws / odd / ".git").exists() and not (ws / "b" / "HEAD").exists()
    assert (dest / "3-.git").is_symlink() and os.readlink(dest / "3-.git") == "/etc"  # moved, never followed
    assert oct((tmp_path / "keep").stat().st_mode & 0o777) == "0o700"


def test_across_filesystems_they_are_renamed_in_place_never_copied(tmp_path: Path) -> None:
    ws = Path("/dev/shm") / f"kp-test-{os.getpid()}"  # a tmpfs: another filesystem than tmp_path's
    if os.stat("/dev/shm").st_dev == tmp_path.stat().st_dev:
        pytest.skip("/dev/shm is on the same filesystem here")
    try:
        (ws / "sub" / ".git").mkdir(parents=True)
        (ws / "sub" / ".git.planted-by-run-x").mkdir()
        (ws / ".git").write_text("gitdir: /x\n")
        moved = neutralise(ws, tmp_path / "keep", ["sub/.git", ".git"])
        assert moved == [(f"{ws}/sub/.git.planted-by-run-x.1", None), (f"{ws}/.git.planted-by-run-x", None)]
        assert (ws / "sub" / ".git.planted-by-run-x.1").is_dir() and (ws / ".git.planted-by-run-x").is_file()
        assert not list((tmp_path / "keep").rglob("*-.git"))
    finally:
        subprocess.run(["rm", "-rf", "--", str(ws)], check=True)


# -- one run, against a scripted guest ----------------------------------------------------------------


class GitGuest(FakeGuest):
    """A guest whose workspace has a repository before the run and a planted one after it."""

    def __init__(self, before: bytes, after: bytes, **kw: Any) -> None:
        super().__init__(**kw)
        self.surveys = [before, after]

    def send(self, command: str, chunks: Any, *, timeout: float | None = 60) -> Outcome:
        if "find -P . -name .git" in command:
            self.commands.append((command, b""))
            return Outcome(0, self.surveys.pop(0) if self.surveys else b"", b"")
        if " perl -e " in command:
            data = b"".join(chunks)
            self.commands.append((command, data))
            return Outcome(0, b"".join(b"M/var/lib/kodepipe/runs/x/git-planted/" + p + b"\0"
                                             for p in data.split(b"\0") if p), b"")
        return super().send(command, chunks, timeout=timeout)


BEFORE = b"d 8 1 0 \0d 8 5 0 .git\0d 8 6 0 sub\0l 8 9 0 ln/.git\0"
AFTER = BEFORE + b"d 8 7 0 sub/.git\0d 8 10 0 b\0f 8 11 0 b/HEAD\0d 8 12 0 b/objects\0d 8 13 0 b/refs\0"


def test_a_run_binds_each_repository_read_only_and_moves_the_planted_ones_away() -> None:
    guest = GitGuest(BEFORE, AFTER)
    run, _, said = job(guest)
    record, _ = vmrun._run(run)
    words = create_words(guest)
    assert "type=bind,source=/workspace/.git,destination=/workspace/.git,ro" in words
    assert not any("ln/.git" in w for w in words)  # a symlink is never bound
    assert record["protected"] == [".git"] and record["loosened"] == []
    ((moving, paths),) = guest.sent(" perl -e ")
    assert paths == b"b/HEAD\0sub/.git\0"
    assert shlex.split(moving)[-3:] == ["/workspace", f"/var/lib/kodepipe/runs/{record['name']}-{record['id']}"
                                        "/git-planted", record["name"]]
    assert record["git_planted"] == [
        {"path": "b/HEAD", "why": "new bare repository", "type": "bare",
         "moved_to": "/var/lib/kodepipe/runs/x/git-planted/b/HEAD"},
        {"path": "sub/.git", "why": "new .git", "type": "dir",
         "moved_to": "/var/lib/kodepipe/runs/x/git-planted/sub/.git"}]
    assert any(level == "warn" and "kp-run moved it away in vm-a" in m for level, m in said)
    assert any(level == "warn" and m.startswith("ln/.git is a symbolic link") for level, m in said)


def test_writable_git_binds_nothing_and_is_loosened_and_still_moves_planted_ones() -> None:
    guest = GitGuest(BEFORE, AFTER)
    run, _, _ = job(guest, request(writable_git_config=True))
    record, _ = vmrun._run(run)
    assert "destination=/workspace/.git" not in guest.sent(" create --rm ")[0][0]
    assert record["protected"] == [] and record["loosened"] == ["writable-git"]
    assert [p["path"] for p in record["git_planted"]] == ["b/HEAD", "sub/.git"]


def test_a_read_only_workspace_is_not_surveyed_after_the_run() -> None:
    guest = GitGuest(BEFORE, AFTER)
    run, _, _ = job(guest, request(read_only_workspace=True))
    record, _ = vmrun._run(run)
    assert len(guest.sent("find -P")) == 1 and "git_planted" not in record


def test_a_failed_survey_stops_the_run_before_the_guest_is_changed() -> None:
    class Failing(FakeGuest):
        def send(self, command: str, chunks: Any, *, timeout: float | None = 60) -> Outcome:
            if "find -P" in command:
                self.commands.append((command, b""))
                return Outcome(1, b"d 8 1 0 \0", b"find: './x': Permission denied\n")
            return super().send(command, chunks, timeout=timeout)

    guest = Failing()
    run, _, _ = job(guest)
    with pytest.raises(Exception, match="looking for git repositories"):
        vmrun._run(run)
    assert not guest.sent("idmapped") and not guest.sent(" create --rm ") and not guest.sent("podman load")


def test_a_repository_with_a_comma_is_refused_before_the_guest_is_changed() -> None:
    guest = GitGuest(b"d 8 5 0 x,ro=false/.git\0", b"")
    run, _, _ = job(guest)
    with pytest.raises(BadInput, match="cannot carry"):
        vmrun._run(run)
    assert not guest.sent("idmapped") and not guest.sent(" create --rm ") and not guest.sent("podman load")


REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"keep": True}, "--keep"),
]


@pytest.mark.parametrize(("kw", "flag"), REFUSED, ids=[r[1] + str(n) for n, r in enumerate(REFUSED)])
def test_what_a_vm_cannot_honour_is_refused_before_any_side_effect(kw: dict[str, Any], flag: str) -> None:
    guest = FakeGuest()
    connected: list[Any] = []
    def connect(vm: Any) -> Any:
        connected.append(vm)
        return guest

    run = vmrun.VmRun(vmrun_vm(), request(**kw), lambda level, message: None, remote=connect)
    with pytest.raises(BadInput, match=f"{flag}.* is not supported inside a VM yet .host-only for now."):
        vmrun._run(run)
    assert connected == [] and guest.commands == []


def vmrun_vm() -> dict[str, Any]:
    from tests.test_vmrun import VM

    return dict(VM)


def test_an_unreadable_secret_is_refused_before_the_guest_is_changed(tmp_path: Path) -> None:
    guest = FakeGuest()
    run, _, _ = job(guest, request(secrets=[(tmp_path / "missing", "/run/secrets/x")]))
    with pytest.raises(BadInput, match=r"--secret .*missing: No such file"):
        vmrun._run(run)
    assert not guest.sent("idmapped") and not guest.sent("mkdir") and not guest.sent(" create --rm ")


def test_the_guests_own_quotas_are_shared_out() -> None:
    limits = ("Limit                     Soft Limit           Hard Limit           Units\n"
              "Max pending signals       15788                15788                signals\n"
              "Max msgqueue size         819200               819200               bytes\n")
    quotas = vmrun.guest_quotas({"inotify": "128 29000", "limits": limits})
    assert quotas == sandbox.Quotas(128, 29000, 15788, 819200)
    assert vmrun.guest_quotas({"inotify": "x", "limits": "junk"}) == sandbox.LINUX_QUOTAS
    guest = FakeGuest(facts={"inotify": "128 29000", "limits": limits})
    run, _, _ = job(guest)
    record, _ = vmrun._run(run)
    assert record["kernel_quotas"] == {"inotify_instances": 16, "inotify_watches": 3625, "sigpending": 1973,
                                       "msgqueue": 102400}
    assert "--ulimit sigpending=1973:1973" in guest.sent(" create --rm ")[0][0]


def test_the_seccomp_profile_is_the_hosts_function_on_the_guests_base() -> None:
    """One function for both backends: what the guest gets is seccomp.render of its own profile."""
    from kodepipe.container import seccomp
    from tests.test_vmrun import SECCOMP, staged

    guest = FakeGuest()
    run, _, _ = job(guest)
    vmrun._run(run)
    assert staged(guest)[1][vmrun.STAGED_SECCOMP] == (seccomp.render(SECCOMP), 0o644, 0, 0)
    assert policies.policy(limits=LIMITS).git_writable is False


# -- --writable-git: the guarded entries of writable repositories ---------------------------------------


def watch(root: Path, repos: list[str]) -> dict[str, dict[str, vmrun.GuestPrint]]:
    out = subprocess.run(["sh", "-c", vmrun.WATCH, "kp-run", *repos], cwd=root, capture_output=True,
                         check=True).stdout
    return vmrun.parse_watch(out)


def test_the_guarded_entries_are_gitguards(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    subprocess.run(["git", "init", "-q", str(ws)], check=True)
    subprocess.run(["git", "-C", str(ws), "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q",
                    "--allow-empty", "-m", "x"], check=True)
    dotgit = ws / ".git"
    (dotgit / "info" / "attributes").write_text("* filter=x\n")
    (dotgit / "modules" / "m" / "hooks").mkdir(parents=True)
    (dotgit / "modules" / "m" / "HEAD").write_text("ref: refs/heads/main\n")
    (dotgit / "modules" / "m" / "config").write_text("[core]\n")
    (dotgit / "modules" / "m" / "objects").mkdir()
    (dotgit / "hooks" / "pre-commit").write_text("#!/bin/sh\n")
    bare(ws / "b")
    found = watch(ws, [".git", "b"])
    fd = hostpath.open_workspace(ws)
    try:
        for path in (".git", "b"):
            repo = gitguard.find(fd)[path]
            expected = gitguard.guarded(fd, repo)
            assert set(found[path]) == set(expected), path
            for rel, pr in expected.items():
                assert (found[path][rel].kind, int(found[path][rel].ino)) == (pr.kind, pr.ino)
    finally:
        os.close(fd)
    assert "config" in found[".git"] and "hooks/pre-commit" in found[".git"] and "modules/m/config" in found[".git"]
    assert "HEAD" not in found[".git"] and "index" not in found[".git"] and "modules/m/HEAD" not in found[".git"]


def test_changed_and_new_guarded_entries_are_moved_and_changed_ones_put_back(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    subprocess.run(["git", "init", "-q", str(ws)], check=True)
    repos = survey(ws)
    before = watch(ws, [".git"])
    keep = vmrun.snapshot_paths(before)
    assert ".git/config" in keep and ".git/description" not in keep
    tar = subprocess.run(["tar", "--null", "--verbatim-files-from", "--no-recursion", "-T", "-", "-cf", "-"],
                         cwd=ws, input=b"".join(os.fsencode(p) + b"\0" for p in keep), capture_output=True,
                         check=True).stdout
    copies = vmrun.parse_snapshots(tar)
    assert copies[".git/config"][0] == (ws / ".git" / "config").read_bytes()
    subprocess.run(["git", "-C", str(ws), "config", "core.fsmonitor", "touch /x"], check=True)
    (ws / ".git" / "hooks" / "pre-commit").write_text("#!/bin/sh\ntouch /x\n")
    subprocess.run(["git", "-C", str(ws), "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q",
                    "--allow-empty", "--no-verify", "-m", "x"], check=True)
    after = survey(ws)
    changed = vmrun.git_changed(before, repos, after, watch(ws, [".git"]))
    assert changed == [(".git/config", "changed in .git", "file"), (".git/hooks/pre-commit", "new in .git", "file")]


@pytest.mark.skipif(os.geteuid() != 0, reason="entering another user namespace as its owner needs root")
def test_the_quota_hook_sets_the_limits_in_the_processes_user_namespace(tmp_path: Path) -> None:
    """The hook's very command line, fed a container state as a runtime feeds it, against a process
    in a user namespace of its own (a stand-in for the container's first process)."""
    import orjson

    _, text = vmrun.quota_hook({"max_inotify_instances": 17, "max_user_namespaces": 0})
    hook = orjson.loads(text)
    assert hook["stages"] == ["prestart"] and hook["hook"]["path"] == "/bin/sh"
    child = subprocess.Popen(["unshare", "--user", "--map-root-user", "sleep", "60"])
    try:
        ns = f"/proc/{child.pid}/ns/user"
        for _ in range(1000):  # until unshare has made the namespace and exec'd sleep
            if os.readlink(ns) != os.readlink("/proc/self/ns/user") and \
                    Path(f"/proc/{child.pid}/cmdline").read_bytes().startswith(b"sleep"):
                break
            subprocess.run(["true"], check=True)
        state = orjson.dumps({"ociVersion": "1.0", "id": "x", "pid": child.pid, "status": "created",
                              "annotations": {"a": "b"}})
        subprocess.run(hook["hook"]["args"], executable="/bin/sh", input=state, check=True, timeout=30)
        read = subprocess.run(["nsenter", "--user", "--target", str(child.pid), "cat",
                               "/proc/sys/user/max_inotify_instances", "/proc/sys/user/max_user_namespaces"],
                              capture_output=True, check=True, timeout=30).stdout.split()
        assert read == [b"17", b"0"]  # two digits: the read-back reads whole files
        with pytest.raises(subprocess.CalledProcessError):  # no pid: the container must not start
            subprocess.run(hook["hook"]["args"], executable="/bin/sh", input=b"{}", check=True, timeout=30,
                           capture_output=True)
    finally:
        child.kill()
        child.wait()
