"""No host code execution through git: a real agent in a real container tries every way to make
the user's next git command on the host run its code, and after each run the user's git (as the
workspace's owner, in the workspace and in the subdirectory the attack aims at) must not run it.

Each attack runs on both backends: on the host, and inside a real VM (kp-run with the vm record
on stdin; the guest's workspace is copied back to the host afterwards, byte for byte, and the user's
git runs on that copy: tests/integration/vmbackend.py).

Each attack leaves a command that creates a marker file on the host (core.fsmonitor, a hook, a
filter driver, in the repository's own config or in one git is pointed at).  Each is also run once
against a deliberately weakened kp-run (nothing bound read-only, nothing checked after the run,
nothing refused on apply), where the marker must appear: so a test that passes here is one that
would have noticed the attack working."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BIN, ROOT, lines
from tests.integration.vmbackend import WEAKENED_VM, GuestVm

pytestmark = pytest.mark.integration

OWNER = 4321
# kp-run with gitguard switched off, for the tests' own sake only: the user's kp-run has no such switch
WEAKENED = """
from kodepipe.host import gitguard
gitguard.MAX_BINDS = 0
gitguard.Guard.after = lambda self, *args, **kwargs: []
gitguard.in_changes = lambda *args, **kwargs: []
from kodepipe.__main__ import main
main()
"""


def kprun(*args: str, weakened: bool = False, timeout: float = 180) -> tuple[subprocess.CompletedProcess[str],
                                                                            dict[str, Any]]:
    if weakened:
        cmd = [sys.executable, "-P", "-c", WEAKENED, "kp-run", *args]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
    else:
        cmd, env = [str(BIN / "kp-run"), *args], dict(os.environ)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    records = lines(proc.stdout)
    assert records, proc.stderr
    return proc, records[-1]


@dataclass
class Place:
    ws: Path
    marker: Path
    home: Path


@pytest.fixture
def place(tmp_path: Path) -> Place:
    return new_place(tmp_path)


def as_owner(place: Place, *git_args: str, cwd: Path, check: bool = False) -> subprocess.CompletedProcess[bytes]:
    """git as the user runs it next: no system configuration, a global one that only trusts every
    directory (root runs it here, and the workspace is the owner's: git would stop at that)."""
    env = {"HOME": str(place.home), "PATH": "/usr/bin:/bin", "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_CONFIG_GLOBAL": str(place.home / ".gitconfig")}
    return subprocess.run(["git", *git_args], cwd=cwd, env=env, capture_output=True, timeout=60, check=check)


def init_repo(place: Place, where: str = "") -> None:
    """The user's own repository, with one commit, owned by the user."""
    cwd = place.ws / where
    as_owner(place, "init", "-q", ".", cwd=cwd, check=True)
    as_owner(place, "add", "-A", cwd=cwd, check=True)
    as_owner(place, "-c", "user.email=u@x", "-c", "user.name=u", "commit", "-q", "--allow-empty", "-m", "mine",
             cwd=cwd, check=True)
    for path in [cwd, *cwd.rglob("*")]:
        os.chown(path, OWNER, OWNER, follow_symlinks=False)


def users_git(place: Place, where: str) -> None:
    """What the user does next in the workspace (or a subdirectory), as the user: status (fsmonitor),
    add (filter drivers), commit (hooks).  Failures are fine; a marker is not."""
    cwd = place.ws / where
    if not cwd.is_dir():
        return
    for args in (["status"], ["add", "-A"], ["-c", "user.email=u@x", "-c", "user.name=u", "commit", "-qm", "next"]):
        as_owner(place, *args, cwd=cwd)


@dataclass
class Attack:
    script: str  # run by the agent in /workspace; {M} is the host marker's path
    planted: set[str] = field(default_factory=set)  # what kp-run must move away after the run
    said: tuple[str, ...] = ()  # what must show in the agent's output (its attempts denied, or allowed)
    repo: bool = True  # the workspace is a repository when the run starts
    where: tuple[str, ...] = ("",)  # where the user runs git afterwards
    flags: tuple[str, ...] = ()


FSMONITOR = 'git config core.fsmonitor "touch {M}"'
# a repository made by the agent, whose worktree is WT (relative to it) and whose fsmonitor is the marker
EVIL_GITDIR = ("git init -q --bare {d} && git -C {d} config core.bare false && git -C {d} config core.worktree {wt} "
               "&& git -C {d} config core.fsmonitor 'touch {{M}}'")

ATTACKS = {
    "config-fsmonitor": Attack(f"{FSMONITOR} && echo WROTE || echo DENIED", said=("DENIED",)),
    "hook-pre-commit": Attack("printf '#!/bin/sh\\ntouch {M}\\n' > .git/hooks/pre-commit && "
                              "chmod +x .git/hooks/pre-commit && echo WROTE || echo DENIED", said=("DENIED",)),
    "attributes-filter": Attack("echo '* filter=evil' > .git/info/attributes || echo DENIED-ATTR; "
                                "git config filter.evil.clean 'touch {M}; cat' || echo DENIED-FILTER; "
                                "echo changed >> main.py", said=("DENIED-ATTR", "DENIED-FILTER")),
    "commondir": Attack("mkdir -p evil/objects evil/refs && printf '[core]\\n\\tfsmonitor = touch {M}\\n' > "
                        "evil/config && echo ../evil > .git/commondir && echo WROTE || echo DENIED",
                        said=("DENIED",)),
    "swap-dotgit": Attack(f"mv .git .git.old && echo MOVED || echo MV-DENIED; rm -rf .git 2>/dev/null; "
                          f"test -f .git/config && echo STILL-THERE; git init -q . && {FSMONITOR} || echo DENIED",
                          said=("MV-DENIED", "STILL-THERE", "DENIED")),
    "gitdir-pointer-at-top": Attack(EVIL_GITDIR.format(d="evil.git", wt="..") + " && printf 'gitdir: evil.git\\n' "
                                    "> .git && echo PLANTED", planted={".git", "evil.git/HEAD"}, repo=False),
    "new-dotgit": Attack(f"git init -q . && {FSMONITOR} && echo PLANTED", planted={".git"}, repo=False),
    "nested-repo": Attack("git init -q sub && git -C sub config core.fsmonitor 'touch {M}'",
                          planted={"sub/.git"}, where=("", "sub")),
    "nested-gitdir-pointer": Attack(EVIL_GITDIR.format(d="evil", wt="../sub") + " && printf 'gitdir: ../evil\\n' > "
                                    "sub/.git", planted={"sub/.git", "evil/HEAD"}, where=("", "sub", "evil")),
    "nested-dotgit-symlink": Attack("git init -q other && git -C other config core.fsmonitor 'touch {M}' && "
                                    "ln -s ../other/.git sub/.git", planted={"sub/.git", "other/.git"},
                                    where=("sub", "other")),
    "bare-repo-in-subdir": Attack(EVIL_GITDIR.format(d="b", wt=".."), planted={"b/HEAD"}, where=("b",)),
    "writable-git": Attack("git -c user.email=a@b -c user.name=a commit -q --allow-empty -m agent && echo COMMITTED; "
                           f"{FSMONITOR} && printf '#!/bin/sh\\ntouch {{M}}\\n' > .git/hooks/pre-commit && "
                           "chmod +x .git/hooks/pre-commit", planted={".git/config", ".git/hooks/pre-commit"},
                           said=("COMMITTED",), flags=("--writable-git",)),
}


BACKENDS = ["host", "vm"]


def attack_run(request: pytest.FixtureRequest, backend: str, shell_image: str, place: Place, attack: Attack, *,
               weakened: bool = False) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """The agent runs ``attack`` in the workspace, on ``backend``; afterwards place.ws is the workspace
    as the run left it (for the VM, a copy of the guest's)."""
    script = "cd /workspace; " + attack.script.replace("{M}", str(place.marker))
    if backend == "host":
        return kprun("--image", shell_image, "-w", str(place.ws), *attack.flags, "--", "bash", "-c", script,
                     weakened=weakened)
    vm: GuestVm = request.getfixturevalue("guest_vm")
    ws = vm.put(place.ws)
    proc = vm.kprun("--image", shell_image, "-w", ws, *attack.flags, "--", "bash", "-c", script,
                    weakened=WEAKENED_VM if weakened else "")
    records = lines(proc.stdout)
    assert records and records[-1].get("kind") == "container", proc.stderr
    vm.get(ws, place.ws)
    return proc, records[-1]


def kept_for_the_user(backend: str, record: dict[str, Any], entry: dict[str, Any]) -> bool:
    """A planted entry was moved where the user can look at it, out of git's way."""
    if backend == "host":
        return Path(entry["moved_to"]).is_relative_to(Path(record["path"]))
    return str(entry["moved_to"]).startswith(f"/var/lib/kodepipe/runs/{record['name']}-{record['id']}/git-planted/")


def new_place(root: Path) -> Place:
    """A workspace, the host marker's folder and the owner's home, under ``root``."""
    ws = root / "proj"
    (ws / "sub").mkdir(parents=True)
    (ws / "main.py").write_text("print('hello')\n")
    (ws / "sub" / "x.txt").write_text("x\n")
    markers = root / "markers"
    markers.mkdir(mode=0o777)
    markers.chmod(0o777)
    home = root / "owner-home"
    home.mkdir()
    (home / ".gitconfig").write_text("[safe]\n\tdirectory = *\n")
    for path in [ws, *ws.rglob("*"), home]:
        os.chown(path, OWNER, OWNER)
    return Place(ws, markers / "M", home)


Attempt = tuple[Place, subprocess.CompletedProcess[str], dict[str, Any]]
GUEST_RUNS_AT_ONCE = 3  # each run's SSH round trips leave the guest's CPUs idle part of the time


@pytest.fixture(scope="module")
def vm_attempts(request: pytest.FixtureRequest, shell_image: str,
                tmp_path_factory: pytest.TempPathFactory) -> dict[str, Attempt]:
    """Every attack run once in the session's guest, a few at a time (each in its own workspace, as a
    separate kp-run; under TCG one after the other took ~8 min of CI): name -> (place, kp-run, record)."""
    from concurrent.futures import ThreadPoolExecutor

    request.getfixturevalue("guest_vm")  # made here, before the threads use it

    def attempt(name: str) -> Attempt:
        place = new_place(tmp_path_factory.mktemp(f"attack-{name}"))
        if ATTACKS[name].repo:
            init_repo(place)
        proc, record = attack_run(request, "vm", shell_image, place, ATTACKS[name])
        return place, proc, record

    with ThreadPoolExecutor(GUEST_RUNS_AT_ONCE) as pool:
        return dict(zip(ATTACKS, pool.map(attempt, ATTACKS), strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(ATTACKS))
def test_git_never_runs_the_agents_code(request: pytest.FixtureRequest, shell_image: str, tmp_path: Path, name: str,
                                        backend: str) -> None:
    attack = ATTACKS[name]
    if backend == "vm":
        place, proc, record = request.getfixturevalue("vm_attempts")[name]
    else:
        place = new_place(tmp_path)
        if attack.repo:
            init_repo(place)
        proc, record = attack_run(request, backend, shell_image, place, attack)
    for said in attack.said:
        assert said in proc.stderr, proc.stderr
    assert "MOVED" not in proc.stderr and "WROTE" not in proc.stderr, proc.stderr
    planted = {p["path"] for p in record.get("git_planted", [])}
    assert planted == attack.planted, proc.stderr
    for entry in record.get("git_planted", []):
        assert kept_for_the_user(backend, record, entry), entry
    if attack.planted:
        assert "kp-run moved it" in proc.stderr
    assert ("writable-git" in record["loosened"]) == ("--writable-git" in attack.flags)
    for where in attack.where:
        users_git(place, where)
    assert not place.marker.exists(), f"{name}: the user's git ran the agent's code"


# Against a weakened kp-run every attack runs on the host; in the VM two do (one through a protected
# entry, one through a planted one): that the copy back and the user's git there would notice an attack
# that worked in a guest is shown by them, and a TCG guest spends ~30 s on each run (CI's time).
WEAKENED_RUNS = [(name, backend) for name in ATTACKS for backend in BACKENDS
                 if backend == "host" or name in ("config-fsmonitor", "new-dotgit")]


@pytest.mark.parametrize(("name", "backend"), WEAKENED_RUNS, ids=[f"{n}-{b}" for n, b in WEAKENED_RUNS])
def test_each_attack_works_against_a_weakened_kp_run(request: pytest.FixtureRequest, shell_image: str, place: Place,
                                                     name: str, backend: str) -> None:
    """The same attacks, with kp-run's git layer off (gitguard on the host, vmrun's in a VM): the
    user's git does run the agent's code, so the test above can tell."""
    attack = ATTACKS[name]
    if attack.repo:
        init_repo(place)
    attack_run(request, backend, shell_image, place, attack, weakened=True)
    for where in attack.where:
        users_git(place, where)
    assert place.marker.exists(), f"{name}: the attack did not work even against a weakened kp-run"


@pytest.mark.parametrize("weakened", [False, True], ids=["kp-run", "weakened"])
def test_quarantine_apply_refuses_git_metadata(shell_image: str, place: Place, weakened: bool) -> None:
    init_repo(place)
    script = (f"cd /workspace && git init -q sub && git -C sub config core.fsmonitor 'touch {place.marker}' && "
              f"{EVIL_GITDIR.format(d='b', wt='..').replace('{M}', str(place.marker))}")
    proc, record = kprun("--image", shell_image, "-w", str(place.ws), "--quarantine", "--", "bash", "-c", script,
                         weakened=weakened)
    assert record["state"] == "quarantined", proc.stderr
    applied, result = kprun("--apply", record["name"], weakened=weakened)
    for where in ("", "sub", "b"):
        users_git(place, where)
    if weakened:
        assert applied.returncode == 0 and place.marker.exists(), applied.stderr
        return
    changes = record["git_changes"]
    assert "sub/.git" in changes and "sub/.git/config" in changes and "b/HEAD" in changes and "b/config" in changes
    assert "the agent changed git metadata" in proc.stderr
    assert applied.returncode == 1 and result["error"]["code"] == "findings", applied.stderr
    assert "git-metadata" in result["error"]["message"]
    assert "sub/.git" in result["error"]["message"]
    assert not (place.ws / "sub" / ".git").exists() and not (place.ws / "b").exists()
    assert not place.marker.exists()
    subprocess.run([str(BIN / "kp-rm"), record["name"]], capture_output=True, check=True, timeout=120)


def test_a_big_workspace_of_many_repositories(shell_image: str, place: Place) -> None:
    """Nested repositories are bound read-only, each; the agent cannot write any of them."""
    init_repo(place)
    for n in range(20):
        (place.ws / "vendor" / f"r{n}").mkdir(parents=True)
        init_repo(place, f"vendor/r{n}")
    os.chown(place.ws / "vendor", OWNER, OWNER)
    script = ("cd /workspace; n=0; for r in vendor/*; do git -C $r config core.fsmonitor 'touch " + str(place.marker)
              + "' 2>/dev/null && n=$((n+1)); mv $r/.git $r/.git.old 2>/dev/null && n=$((n+1)); done; echo WRITTEN=$n")
    proc, record = kprun("--image", shell_image, "-w", str(place.ws), "--", "bash", "-c", script)
    assert "WRITTEN=0" in proc.stderr, proc.stderr
    assert len(record["protected"]) == 21 and "git_planted" not in record
    for n in range(20):
        users_git(place, f"vendor/r{n}")
    assert not place.marker.exists()
