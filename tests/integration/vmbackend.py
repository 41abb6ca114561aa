"""The VM backend of kp-run, for tests that attack one property on both backends: one real VM
(TCG: never KVM-dependent) with Podman, booted once per test session and shared by every VM-backend
test (under TCG a boot and the image's first copy take minutes), and the means to hand a workspace
to it and take the workspace back as the agent left it.

A workspace lives on the guest's own disk (not on a kp-boot --share, whose repositories kp-boot
protects on its own: the layer under test here is kp-run's).  After a run it is copied back to the
host byte for byte (tar, symlinks as symlinks), where the user's git is run on it: whatever that git
executes is what the user's git in the guest would have executed."""

from __future__ import annotations

import contextlib
import itertools
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import BIN, ROOT, lines

GUEST_ROOT = "/srv/kp-test"  # workspaces on the guest's own disk
SESSION = f"{os.getpid()}-{os.urandom(3).hex()}"  # names of this session's things in a guest it may share
# A developer's guest made once by `python -m tests.integration.vmbackend DIR` and named by this variable
# (DIR/guest.json) is used instead of booting one per session: minutes saved per run under TCG.
# CI never sets it.
REUSE = "KODEPIPE_TEST_GUEST"
# kp-run with its VM backend's git layer switched off, for the tests' own sake only
WEAKENED_VM = """
from kodepipe.container import vmrun
vmrun.git_protect = lambda repos, writable: []
vmrun.git_planted = lambda before, after: []
vmrun.git_changed = lambda *args: []
"""


@contextlib.contextmanager
def environ(env: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@dataclass
class GuestVm:
    env: dict[str, str]
    record: dict[str, Any]
    remote: Any  # vmrun.Remote
    counter: Iterator[int]
    share: Path  # the host folder kp-boot --share gave it (the guest's /workspace), owned by uid 1000
    first: dict[str, Any]  # the container record of the pipeline's first run, which copied the image in
    first_seconds: float  # that pipeline's time: boot, image copy and the run

    def sh(self, script: str, *args: str, input: bytes = b"") -> bytes:
        """A script as root in the guest; its stdout (it must succeed)."""
        done = self.remote.run(shlex.join(["sudo", "-n", "sh", "-c", script, "sh", *args]), input=input,
                               timeout=600)
        assert done.status == 0, done.stderr.decode(errors="replace")
        return bytes(done.stdout)

    def put(self, host_dir: Path) -> str:
        """A fresh guest workspace holding a copy of ``host_dir`` (owners, modes and links kept)."""
        guest = f"{GUEST_ROOT}/ws-{SESSION}-{next(self.counter)}"
        data = subprocess.run(["tar", "-C", str(host_dir), "-cf", "-", "."], capture_output=True, check=True).stdout
        self.sh('mkdir -p "$1" && tar -C "$1" -xpf -', guest, input=data)
        return guest

    def get(self, guest: str, host_dir: Path) -> None:
        """``host_dir`` becomes a copy of the guest workspace, as the run left it."""
        data = self.sh('tar -C "$1" -cf - .', guest)
        subprocess.run(["rm", "-rf", "--", str(host_dir)], check=True)
        host_dir.mkdir()
        subprocess.run(["tar", "-C", str(host_dir), "-xpf", "-"], input=data, check=True)

    def kprun(self, *args: str, weakened: str = "", timeout: float = 900,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """kp-run with this VM's record on stdin (``weakened``: Python run before kp-run's main; ``env``:
        more variables for kp-run's environment)."""
        if weakened:
            cmd = [sys.executable, "-P", "-c", weakened + "\nfrom kodepipe.__main__ import main\nmain()\n",
                   "kp-run", *args]
            env = {**self.env, "PYTHONPATH": str(ROOT), **(env or {})}
        else:
            cmd, env = [str(BIN / "kp-run"), *args], {**self.env, **(env or {})}
        return subprocess.run(cmd, input=orjson.dumps(self.record).decode() + "\n", capture_output=True, text=True,
                              timeout=timeout, env=env)


def in_share(request: pytest.FixtureRequest, vm: GuestVm, name: str) -> Path:
    """The host side of a sub-folder of the guest's share (its /workspace/NAME), removed after the test: a
    run on the whole share (kp-run with no -w) surveys everything in it, and a hostile test's deep tree
    there costs every later run minutes over 9p."""
    host = vm.share / name
    request.addfinalizer(lambda: subprocess.run(["rm", "-rf", "--", str(host)], check=True))
    return host


def make_guest(env: dict[str, str], share: Path, shell_image: str, name: str = "kp-backend"
               ) -> tuple[dict[str, Any], dict[str, Any], float]:
    """A VM made the way a user makes one, in one pipeline whose last stage is the first kp-run (which
    copies the image into the guest: minutes under TCG, once): its vm record, that first container
    record, and the pipeline's time."""
    os.chown(share, 1000, 1000)  # a developer's checkout, as the guest's user "kp" (uid 1000)
    started = time.monotonic()
    pipeline = (f"{BIN}/kp-clone --cold base {name} | {BIN}/kp-boot --share {share} | {BIN}/kp-ip --timeout 400 "
                f"| {BIN}/kp-run --image {shell_image} --name {name}-first -- true")
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", pipeline], env=env, capture_output=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr.decode()[-4000:]
    record, first = lines(proc.stdout)
    return record, first, time.monotonic() - started


@pytest.fixture(scope="session")
def guest_vm(request: pytest.FixtureRequest, shell_image: str,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuestVm]:
    """One VM with Podman, the shell image and a --share, for every VM-backend test of the session."""
    from kodepipe.vm import hop

    if os.environ.get(REUSE):
        saved = orjson.loads(Path(os.environ[REUSE]).read_bytes())
        with environ(saved["env"]):
            remote = hop.connect(saved["record"])
        yield GuestVm(saved["env"], saved["record"], remote, itertools.count(), Path(saved["share"]), saved["first"],
                      saved["seconds"])
        remote.close()
        return
    golden: dict[str, Any] = request.getfixturevalue("golden")
    env: dict[str, str] = golden["env"]
    name = "kp-backend"
    share = tmp_path_factory.mktemp("kp-backend-share")
    try:
        record, first, seconds = make_guest(env, share, shell_image, name)
        with environ(env):
            remote = hop.connect(record)
        yield GuestVm(env, record, remote, itertools.count(), share, first, seconds)
        remote.close()
    finally:
        subprocess.run([str(BIN / "kp-rm"), name], env=env, capture_output=True, timeout=300)


def kprun_on(request: pytest.FixtureRequest, backend: str, *args: str, weakened: str = "",
             env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """kp-run ARGS on ``backend`` ("host", or "vm": the session's guest_vm); its container record
    (``weakened``: Python run before kp-run's main, for the tests' own sake; ``env``: more variables for
    kp-run's environment)."""
    if backend == "vm":
        proc = request.getfixturevalue("guest_vm").kprun(*args, weakened=weakened, env=env)
    else:
        if weakened:
            cmd = [sys.executable, "-P", "-c", weakened + "\nfrom kodepipe.__main__ import main\nmain()\n",
                   "kp-run", *args]
            env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        else:
            cmd, env = [str(BIN / "kp-run"), *args], {**os.environ, **(env or {})}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    records = [r for r in lines(proc.stdout) if r.get("kind") == "container"]
    assert records, proc.stderr[-4000:]
    return proc, records[-1]


def main() -> None:
    """Make a developer's guest in DIR (a golden image built from this checkout, one VM booted from it
    with a share, the shell image copied in) and write DIR/guest.json for KODEPIPE_TEST_GUEST.  As root;
    `kp-rm kp-backend` with DIR/state as KODEPIPE_STATE_DIR removes the VM."""
    from tests.integration.conftest import kp_env

    root = Path(sys.argv[1]).resolve()
    (root / "home" / ".ssh").mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ.get("KODEPIPE_TEST_CACHE", root / "cache"))
    env = kp_env(root / "state", root / "home", cache)
    if not (root / "state" / "images" / "base").exists():
        built = subprocess.run([str(BIN / "kp-image"), "build", "base", "--size", "4G"], env=env, timeout=3600)
        assert built.returncode == 0
    from kodepipe.commands.cli import Output
    from kodepipe.container import profile

    image = profile.ensure_image(profile.load("shell"), Output("kp-test", verbose=False))
    share = root / "share"
    share.mkdir(exist_ok=True)
    record, first, seconds = make_guest(env, share, image)
    (root / "guest.json").write_bytes(orjson.dumps({"env": env, "record": record, "share": str(share),
                                                     "first": first, "seconds": seconds}))
    print(f"export {REUSE}={root / 'guest.json'}")


if __name__ == "__main__":
    main()
