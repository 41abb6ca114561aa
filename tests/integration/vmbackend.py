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
        guest = f"{GUEST_ROOT}/ws{next(self.counter)}"
        data = subprocess.run(["tar", "-C", str(host_dir), "-cf", "-", "."], capture_output=True, check=True).stdout
        self.sh('mkdir -p "$1" && tar -C "$1" -xpf -', guest, input=data)
        return guest

    def get(self, guest: str, host_dir: Path) -> None:
        """``host_dir`` becomes a copy of the guest workspace, as the run left it."""
        data = self.sh('tar -C "$1" -cf - .', guest)
        subprocess.run(["rm", "-rf", "--", str(host_dir)], check=True)
        host_dir.mkdir()
        subprocess.run(["tar", "-C", str(host_dir), "-xpf", "-"], input=data, check=True)

    def kprun(self, *args: str, weakened: str = "", timeout: float = 900) -> subprocess.CompletedProcess[str]:
        """kp-run with this VM's record on stdin (``weakened``: Python run before kp-run's main)."""
        if weakened:
            cmd = [sys.executable, "-P", "-c", weakened + "\nfrom kodepipe.__main__ import main\nmain()\n",
                   "kp-run", *args]
            env = {**self.env, "PYTHONPATH": str(ROOT)}
        else:
            cmd, env = [str(BIN / "kp-run"), *args], self.env
        return subprocess.run(cmd, input=orjson.dumps(self.record).decode() + "\n", capture_output=True, text=True,
                              timeout=timeout, env=env)


@pytest.fixture(scope="session")
def guest_vm(golden: dict[str, Any], shell_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuestVm]:
    """One VM with Podman, the shell image and a --share, for every VM-backend test of the session.
    It is made the way a user makes one, in one pipeline whose last stage is the first kp-run (which
    copies the image into the guest: minutes under TCG, once)."""
    from kodepipe.vm import hop

    env: dict[str, str] = golden["env"]
    name = "kp-backend"
    share = tmp_path_factory.mktemp("kp-backend-share")
    os.chown(share, 1000, 1000)  # a developer's checkout, as the guest's user "kp" (uid 1000)
    started = time.monotonic()
    pipeline = (f"{BIN}/kp-clone --cold base {name} | {BIN}/kp-boot --share {share} | {BIN}/kp-ip --timeout 400 "
                f"| {BIN}/kp-run --image {shell_image} --name kp-backend-first -- true")
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", pipeline], env=env, capture_output=True, timeout=1800)
    seconds = time.monotonic() - started
    try:
        assert proc.returncode == 0, proc.stderr.decode()[-4000:]
        record, first = lines(proc.stdout)
        with environ(env):
            remote = hop.connect(record)
        yield GuestVm(env, record, remote, itertools.count(), share, first, seconds)
        remote.close()
    finally:
        subprocess.run([str(BIN / "kp-rm"), name], env=env, capture_output=True, timeout=300)


def kprun_on(request: pytest.FixtureRequest, backend: str, *args: str,
             weakened: str = "") -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """kp-run ARGS on ``backend`` ("host", or "vm": the session's guest_vm); its container record
    (``weakened``: Python run before kp-run's main, for the tests' own sake)."""
    if backend == "vm":
        proc = request.getfixturevalue("guest_vm").kprun(*args, weakened=weakened)
    else:
        if weakened:
            cmd = [sys.executable, "-P", "-c", weakened + "\nfrom kodepipe.__main__ import main\nmain()\n",
                   "kp-run", *args]
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
        else:
            cmd, env = [str(BIN / "kp-run"), *args], dict(os.environ)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    records = [r for r in lines(proc.stdout) if r.get("kind") == "container"]
    assert records, proc.stderr[-4000:]
    return proc, records[-1]
