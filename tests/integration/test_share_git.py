"""No host code execution through git over a VM's share: root in a real guest tries every way to
make the user's next git command on the host, in the share or a folder of it, run its code.

The guest has no git: it forges repositories by hand (HEAD, objects, refs, a config with
core.fsmonitor), as an attacker with only a shell would.  Each attack has a marker of its own, a
host file that the planted command would create when the user's git runs it.  The same attacks run
once against a kp-boot/kp-stop with sharegit switched off, where every marker must appear: so the
protected run passing is a run that would have noticed each attack working."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, lines
from tests.integration.conftest import run
from tests.integration.test_git_attacks import OWNER, Place, as_owner, init_repo

pytestmark = pytest.mark.integration

NAME = "gitshare"
WEAKENED = """
import sys
from kodepipe.vm import sharegit
sharegit.prepare = lambda share, folder, writable: sharegit.Prepared(record={"weakened": True})
sharegit.settle = lambda folder, name: ([], None)
from kodepipe.__main__ import main
main()
"""

FORGE = ("mkdir -p {d}/objects {d}/refs && echo 'ref: refs/heads/main' > {d}/HEAD && "
         "printf '[core]\\n\\trepositoryformatversion = 0\\n{extra}\\tfsmonitor = touch {m}\\n' > {d}/config")

# name: (the guest's script, run in /workspace as root; {m} is this attack's marker), what kp-stop must
# rename in place (git_planted), where the user runs git afterwards.  Each attack on a repository of the
# user's aims at one of its own (c1..c4), so that, with sharegit off, each one's marker can appear.
ATTACKS: dict[str, tuple[str, set[str], tuple[str, ...]]] = {
    "top-config": ("printf '[core]\\n\\tfsmonitor = touch {m}\\n' >> .git/config", set(), ("",)),
    "config": ("printf '[core]\\n\\tfsmonitor = touch {m}\\n' >> c1/.git/config", set(), ("c1",)),
    # the user's own executable hook, rewritten (a hook the guest makes is never executable on the host:
    # under 9p's mapped-xattr a guest's mode bits are kept in an extended attribute)
    "hook": ("printf '#!/bin/sh\\ntouch {m}\\n' > c2/.git/hooks/pre-commit", set(), ("c2",)),
    "swap": ("mv c3/.git c3/.git.old || rm -rf c3/.git; " + FORGE.format(d="c3/.git", extra="", m="{m}"), set(),
             ("c3",)),
    "commondir": (FORGE.format(d="evil-common", extra="", m="{m}") + " && echo ../../evil-common > c4/.git/commondir",
                  {"evil-common/HEAD"}, ("c4",)),
    "nested": (FORGE.format(d="sub/.git", extra="", m="{m}"), {"sub/.git"}, ("sub",)),
    "gitdir-pointer": (FORGE.format(d="evil", extra="\\tbare = false\\n\\tworktree = ../ptr\\n", m="{m}")
                       + " && mkdir -p ptr && echo 'gitdir: ../evil' > ptr/.git", {"ptr/.git", "evil/HEAD"},
                       ("ptr",)),
    "symlink": (FORGE.format(d="x/.git", extra="", m="{m}") + " && mkdir -p y && ln -s ../x/.git y/.git",
                {"x/.git", "y/.git"}, ("y",)),
    "bare": (FORGE.format(d="b", extra="\\tbare = false\\n\\tworktree = ..\\n", m="{m}"), {"b/HEAD"}, ("b",)),
}
USERS_REPOS = ("c1", "c2", "c3", "c4")
# attacks that cannot work over 9p's mapped-xattr even when nothing protects the share: a symlink the
# guest makes is a regular file holding its target on the host
INERT = {"symlink"}


def one(proc: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    records = lines(proc.stdout)
    assert len(records) == 1, records
    return records[0]


def kp(env: dict[str, str], prog: str, *args: str, weakened: bool, timeout: float = 300) -> dict[str, Any]:
    if not weakened:
        return one(run(env, prog, *args, timeout=timeout))
    cmd = [sys.executable, "-P", "-c", WEAKENED, prog, *args]
    return one(subprocess.run(cmd, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, timeout=timeout))


@pytest.fixture(scope="module")
def clone(golden: dict[str, Any]) -> Iterator[dict[str, str]]:
    env = golden["env"]
    one(run(env, "kp-clone", "base", NAME))
    try:
        yield env
    finally:
        run(env, "kp-rm", NAME, timeout=300)


def make_place(root: Path) -> Place:
    ws = root / "proj"
    for repo in USERS_REPOS:
        (ws / repo).mkdir(parents=True)
    (ws / "main.py").write_text("print('hello')\n")
    markers = root / "markers"
    markers.mkdir(mode=0o777)
    markers.chmod(0o777)
    home = root / "owner-home"
    home.mkdir()
    (home / ".gitconfig").write_text("[safe]\n\tdirectory = *\n")
    for path in [root, ws, *ws.iterdir(), home, home / ".gitconfig"]:
        os.chown(path, OWNER, OWNER)
    place = Place(ws, markers / "M", home)
    for repo in USERS_REPOS:  # nested repositories of the user's own
        init_repo(place, repo)
    init_repo(place)
    hook = ws / "c2" / ".git" / "hooks" / "pre-commit"
    hook.write_text("#!/bin/sh\nexit 0\n")
    hook.chmod(0o755)
    os.chown(hook, OWNER, OWNER)
    return place


def attack(env: dict[str, str], place: Place, *, weakened: bool) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Boot with the share, attack from the guest as root, stop: kp-boot's and kp-stop's records, and
    what the guest's attempts said."""
    booted = kp(env, "kp-boot", "--accel", "tcg", "--share", str(place.ws), NAME, weakened=weakened)
    kp(env, "kp-ip", NAME, "--timeout", "400", weakened=weakened, timeout=900)
    script = "cd /workspace; " + "; ".join(
        f"( {s.replace('{m}', str(place.marker) + '-' + name)} ) 2>&1 | sed 's/^/{name}: /'"
        for name, (s, _, _) in ATTACKS.items())
    proc = run(env, "kp-ssh", NAME, "--", "sudo", "sh", "-c", script, timeout=300)
    said = "".join(r.get("stdout", "") + r.get("stderr", "") for r in lines(proc.stdout) if r.get("kind") == "result")
    stopped = kp(env, "kp-stop", NAME, weakened=weakened)
    return booted, stopped, said


def users_git(place: Place) -> None:
    for where in {w for _, _, places in ATTACKS.values() for w in places}:
        cwd = place.ws / where
        if cwd.is_dir():
            for args in (["status"], ["add", "-A"], ["-c", "user.email=u@x", "-c", "user.name=u", "commit", "-qm",
                                                     "x"]):
                as_owner(place, *args, cwd=cwd)


def test_root_in_the_guest_cannot_make_the_users_git_run_its_code(clone: dict[str, str], tmp_path: Path) -> None:
    place = make_place(tmp_path)
    booted, stopped, said = attack(clone, place, weakened=False)
    assert booted["share_git"]["read_only"] == [".git", *(f"{r}/.git" for r in USERS_REPOS)]
    # the user's repositories could not be written, renamed or replaced, even by root
    for name in ("top-config", "config", "hook"):
        assert any(line.startswith(f"{name}: ") and "Read-only file system" in line for line in said.splitlines()), said
    planted = {p["path"] for p in stopped.get("git_planted", [])}
    assert planted == set().union(*(p for _, p, _ in ATTACKS.values())), said
    for entry in stopped["git_planted"]:
        assert ".planted-by-" + NAME in entry["moved_to"]
        assert os.path.lexists(place.ws / entry["moved_to"])  # renamed in place, never deleted
    users_git(place)
    made = sorted(p.name for p in place.marker.parent.iterdir())
    assert made == [], f"the user's git ran the guest's code: {made}"


def test_each_attack_works_when_sharegit_is_off(clone: dict[str, str], tmp_path: Path) -> None:
    place = make_place(tmp_path)
    _, stopped, said = attack(clone, place, weakened=True)
    assert "git_planted" not in stopped
    users_git(place)
    made = {p.name for p in place.marker.parent.iterdir()}
    assert made == {f"M-{name}" for name in ATTACKS if name not in INERT}, said
