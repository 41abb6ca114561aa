"""One real golden image per test run, built with debootstrap, shared by the
integration tests (each makes and removes its own clones); and the container
image of kp-run's shell profile, on the local base image."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import TypedDict

import pytest

from kodepipe.core.records import Record
from tests.conftest import BIN, lines


class Golden(TypedDict):
    record: Record  # kp-image build's record of "base"
    env: dict[str, str]  # the environment the kp-* commands of the session use
    state: Path
    home: Path
    root: Path
    stderr: str


def kp_env(state: Path, home: Path, cache: Path) -> dict[str, str]:
    return {**os.environ, "KODEPIPE_STATE_DIR": str(state), "KODEPIPE_CACHE_DIR": str(cache),
            "KODEPIPE_RUNTIME_DIR": str(state.parent / "run"), "HOME": str(home), "NO_COLOR": "1"}


@pytest.fixture(scope="session")
def golden(tmp_path_factory: pytest.TempPathFactory) -> Golden:
    """Build the image "base" once, with extra packages (less; curl for the sealed guest), dotfiles and
    the user's key."""
    root = tmp_path_factory.mktemp("golden")
    home = root / "home"
    (home / ".ssh").mkdir(parents=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "user@test",
                    "-f", str(home / ".ssh" / "id_ed25519")], check=True)
    dotfiles = root / "dotfiles"
    dotfiles.mkdir()
    (dotfiles / "install.sh").write_text(
        '#!/bin/sh\nset -e\necho "ran as $(id -un) in $HOME" > "$HOME/.dotfiles-ran"\n')
    (dotfiles / "install.sh").chmod(0o755)
    # the .deb cache outlives the run when KODEPIPE_TEST_CACHE names a folder (developers' re-runs)
    cache = Path(os.environ.get("KODEPIPE_TEST_CACHE", root / "cache"))
    env = kp_env(root / "state", home, cache)
    proc = subprocess.run([str(BIN / "kp-image"), "build", "base", "--packages", "less,curl",
                           "--dotfiles", str(dotfiles), "--size", "4G"],
                          env=env, capture_output=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr.decode()[-4000:]
    (record,) = lines(proc.stdout)
    return {"record": record, "env": env, "state": root / "state", "home": home, "root": root,
            "stderr": proc.stderr.decode()}


def run(env: dict[str, str], prog: str, *args: str, input: bytes | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(BIN / prog), *args], env=env, input=input, capture_output=True, timeout=timeout)


@pytest.fixture(scope="session")
def shell_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tag of kp-run's "shell" profile image, built (with the base image under it) once per
    run in the real Podman store.  Both stay there: a later run finds them and builds nothing."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed")
    if os.geteuid() != 0:
        pytest.skip("building the container base image needs root")
    from kodepipe.commands.cli import Output
    from kodepipe.container import profile

    root = tmp_path_factory.mktemp("container")
    # the .deb cache outlives the run when KODEPIPE_TEST_CACHE names a folder (developers' re-runs)
    cache = Path(os.environ.get("KODEPIPE_TEST_CACHE", root / "cache"))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("KODEPIPE_STATE_DIR", str(root / "state"))
        env.setenv("KODEPIPE_CACHE_DIR", str(cache))
        env.setenv("KODEPIPE_CONFIG_DIR", str(root / "config"))  # the built-in profile, not a developer's own
        return profile.ensure_image(profile.load("shell"), Output("kp-test", verbose=False))


@pytest.fixture(params=["host", "vm"])
def backend(request: pytest.FixtureRequest) -> str:
    """The backend a property is attacked on: this host's Podman, or the session's VM (guest_vm, through
    vmbackend.kprun_on): one definition, and a property that holds on one and not the other fails."""
    param: str = request.param
    return param


# one VM for every test that attacks a property on the VM backend too (tests/integration/vmbackend.py)
from tests.integration.vmbackend import guest_vm  # noqa: E402, F401
