"""kp-run runs as root: no host path it opens or mounts through the workspace may follow a symlink
an agent left there.  A real agent (or the test, standing in for an earlier tool's agent) leaves
links to a host directory of its choosing; the next run must not show that directory to the agent,
must not copy a host file as a --secret through it, and must not start a container whose mounts
are not the files kp-run checked.  Each attack is also run against a deliberately weakened kp-run
(its old path-based binds, its old secret copy, no check of the mounts), where it must work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BIN, ROOT, lines

pytestmark = pytest.mark.integration

OWNER = 4321
HOST_ONLY = "HOST-ONLY-CONTENT"
# kp-run as it was, for the tests' own sake only (the user's kp-run has no such switch):
WEAKENED = """
import os, stat, shutil
from kodepipe.host import gitguard, hostpath
def stage(self, root_fd, staging, dest, *, same):  # bind .git/config and .git/hooks by path
    if self.writable:
        return [], {}, []
    ws = os.readlink(f"/proc/self/fd/{root_fd}")
    rels = [r for r in (".git/config", ".git/hooks") if os.path.exists(os.path.join(ws, r))]
    return rels, {r: os.path.join(ws, r) for r in rels}, []
def copy_secret(src, dest, **kwargs):  # O_NOFOLLOW on the last component only
    with open(os.open(src, os.O_RDONLY | os.O_NOFOLLOW), "rb") as s, open(dest, "wb") as d:
        shutil.copyfileobj(s, d)
gitguard.Guard.stage = stage
gitguard.Guard.after = lambda self, *args, **kwargs: []
hostpath.copy_secret = copy_secret
hostpath.verify_mounts = lambda *args, **kwargs: []
from kodepipe.__main__ import main
main()
"""


def command(*args: str, weakened: bool) -> tuple[list[str], dict[str, str]]:
    if weakened:
        return [sys.executable, "-P", "-c", WEAKENED, "kp-run", *args], {**os.environ, "PYTHONPATH": str(ROOT)}
    return [str(BIN / "kp-run"), *args], dict(os.environ)


def kprun(*args: str, weakened: bool = False) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    cmd, env = command(*args, weakened=weakened)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    records = lines(proc.stdout)
    assert records, proc.stderr
    return proc, records[-1]


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    ws = tmp_path / "proj"
    ws.mkdir()
    (ws / "main.py").write_text("print('hello')\n")
    subprocess.run(["git", "init", "-q", str(ws)], check=True, capture_output=True)
    for path in [ws, *ws.rglob("*")]:
        os.chown(path, OWNER, OWNER, follow_symlinks=False)
    return ws


@pytest.fixture
def hostdir(tmp_path: Path) -> Path:
    """A host directory the agent would like to see: root's, outside the workspace."""
    host = tmp_path / "host-secrets"
    (host / "hooks").mkdir(parents=True)
    for name in ("config", "id_ed25519", "hooks/id_ed25519"):
        (host / name).write_text(f"{HOST_ONLY}\n")
    host.chmod(0o755)
    return host


WEAKENED_IDS = [False, True]


@pytest.mark.parametrize("weakened", WEAKENED_IDS, ids=["kp-run", "weakened"])
@pytest.mark.parametrize("plant", ["dotgit", "hooks"])
def test_a_link_left_by_one_run_shows_the_next_nothing_of_the_host(shell_image: str, ws: Path, hostdir: Path,
                                                                   plant: str, weakened: bool) -> None:
    """Run 1's agent (given a writable .git) replaces .git, or .git/hooks, with a link to a host
    directory; run 2 on the same workspace must not show that directory to its agent."""
    link = ".git" if plant == "dotgit" else ".git/hooks"
    first = (f"cd /workspace && mv {link} {link}.mine && ln -s {hostdir} {link} && echo PLANTED")
    proc, record = kprun("--image", shell_image, "-w", str(ws), "--writable-git", "--", "bash", "-c", first,
                         weakened=weakened)
    assert "PLANTED" in proc.stderr, proc.stderr
    if not weakened:  # moved away after run 1 already
        assert link in {p["path"] for p in record["git_planted"]}
        assert not os.path.islink(ws / link)
    second = ("cat /workspace/.git/config /workspace/.git/id_ed25519 /workspace/.git/hooks/id_ed25519 "
              "/workspace/.git/hooks/config 2>&1; true")
    proc, record = kprun("--image", shell_image, "-w", str(ws), "--", "bash", "-c", second, weakened=weakened)
    if weakened:
        assert HOST_ONLY in proc.stderr, "the weakened kp-run should have shown the host directory"
        return
    assert record["exit_code"] == 0, proc.stderr
    assert HOST_ONLY not in proc.stderr


@pytest.mark.parametrize("weakened", WEAKENED_IDS, ids=["kp-run", "weakened"])
@pytest.mark.parametrize("link", [".git", ".git/hooks"])
def test_a_link_already_in_the_workspace_is_never_followed(shell_image: str, ws: Path, hostdir: Path, link: str,
                                                           weakened: bool) -> None:
    """The same links, left by a tool that did not clean up after its agent: not followed, reported."""
    target = ws / link
    os.rename(target, ws / f"{link}.mine")
    target.symlink_to(hostdir)
    os.lchown(target, OWNER, OWNER)
    script = ("cat /workspace/.git/config /workspace/.git/id_ed25519 /workspace/.git/hooks/id_ed25519 "
              "/workspace/.git/hooks/config 2>&1; ls -la /workspace/.git/ 2>&1; true")
    proc, record = kprun("--image", shell_image, "-w", str(ws), "--", "bash", "-c", script, weakened=weakened)
    if weakened:
        assert HOST_ONLY in proc.stderr, "the weakened kp-run should have shown the host directory"
        return
    assert record["exit_code"] == 0, proc.stderr
    assert HOST_ONLY not in proc.stderr
    if link == ".git":  # reported, not followed, not bound (the real one, renamed, is a bare repository to git)
        assert record["protected"] == [".git.mine"] and "is a symbolic link" in proc.stderr
    else:  # the repository is bound read-only as a whole: the link inside is only a link
        assert record["protected"] == [".git"]
    assert os.path.islink(target) and os.readlink(target) == str(hostdir)  # left as it was: never deleted


def test_a_masked_name_that_is_a_link_shows_nothing_of_the_host(shell_image: str, ws: Path, hostdir: Path) -> None:
    """A mask covers regular files only; a .env that is a link, or a directory that is one, is
    resolved in the container's own filesystem, where the host directory does not exist."""
    (ws / ".env").symlink_to(hostdir / "id_ed25519")
    (ws / "linked").symlink_to(hostdir)
    proc, record = kprun("--image", shell_image, "-w", str(ws), "--", "bash", "-c",
                         "cat /workspace/.env /workspace/linked/id_ed25519 2>&1; true")
    assert record["exit_code"] == 0 and HOST_ONLY not in proc.stderr, proc.stderr
    assert record["masked"] == []


@pytest.mark.parametrize("weakened", WEAKENED_IDS, ids=["kp-run", "weakened"])
def test_a_secret_is_never_read_through_a_link(shell_image: str, ws: Path, hostdir: Path, tmp_path: Path,
                                               weakened: bool) -> None:
    (ws / "config").mkdir()
    (ws / "config" / "dirlink").symlink_to(hostdir)  # a directory on the way
    (ws / "config" / "token").symlink_to(hostdir / "id_ed25519")  # the file itself
    proc, record = kprun("--image", shell_image, "-w", str(ws), "--secret",
                         f"{ws}/config/dirlink/id_ed25519:/run/secrets/tok", "--", "cat", "/run/secrets/tok",
                         weakened=weakened)
    if weakened:  # the old copy refused a link as the last component only
        assert HOST_ONLY in proc.stderr
        return
    assert proc.returncode != 0 and HOST_ONLY not in proc.stderr
    assert record["error"]["code"] == "bad_input" and "symbolic link" in record["error"]["message"]
    proc, record = kprun("--image", shell_image, "-w", str(ws), "--secret", f"{ws}/config/token", "--", "true")
    assert proc.returncode != 0 and "symbolic link" in record["error"]["message"]
    # a real file is still fine
    (tmp_path / "tok").write_text("fine\n")
    proc, record = kprun("--image", shell_image, "-w", str(ws), "--secret", f"{tmp_path / 'tok'}:/run/secrets/tok",
                         "--", "cat", "/run/secrets/tok")
    assert record["exit_code"] == 0 and "fine" in proc.stderr


def wait_for(check: Any, what: str, proc: subprocess.Popen[str], limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while not check():
        assert proc.poll() is None, f"kp-run ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"{what}: not within {limit:g} s"
        time.sleep(0.05)


@pytest.mark.parametrize("weakened", WEAKENED_IDS, ids=["kp-run", "weakened"])
def test_a_swap_after_the_check_stops_the_container_before_it_starts(shell_image: str, ws: Path, hostdir: Path,
                                                                     weakened: bool) -> None:
    """A second agent in the same workspace swaps .git for a link between kp-run's checks and runc's
    mounts (here: while kp-run is stopped right after Podman created the container).  The staged
    source is still the real .git, but runc mounts it where the link leads inside the container:
    kp-run sees that /workspace/.git is not its mount, and never starts the container."""
    cmd, env = command("--image", shell_image, "-w", str(ws), "--", "bash", "-c", "echo RAN; ls /workspace/.git",
                       weakened=weakened)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**env, "KODEPIPE_TEST_STOP_AT": "container-created"})
    try:
        wait_for(lambda: "\nState:\tT" in Path(f"/proc/{proc.pid}/status").read_text(), "kp-run stops", proc)
        os.rename(ws / ".git", ws / ".git.real")
        (ws / ".git").symlink_to(hostdir)
        os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    (record,) = lines(out)
    if weakened:
        assert "RAN" in err, err
        return
    assert "RAN" not in err, err
    assert proc.returncode != 0 and record["error"]["code"] == "unsafe_path", err
    assert "/workspace/.git" in record["error"]["message"] and record.get("container_removed") is True
    assert HOST_ONLY not in err
