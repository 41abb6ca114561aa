"""proc.run's error paths, with faked processes (the real ones run in the other tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pytest_subprocess import FakeProcess

from kodepipe.core import proc
from kodepipe.core.errors import CommandFailed, MissingProgram, Timeout


@pytest.fixture(autouse=True)
def found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proc, "which", lambda program: f"/usr/bin/{program}")


def test_failure_names_the_command_and_shows_the_tail_of_its_output(fp: FakeProcess) -> None:
    noise = "\n".join(f"line {i}" for i in range(40))
    fp.register(["/usr/bin/qemu-img", "create", "x"], stderr=noise + "\nqemu-img: disk full", returncode=1)
    with pytest.raises(CommandFailed) as info:
        proc.run(["qemu-img", "create", "x"])
    message = info.value.message
    assert message.startswith("/usr/bin/qemu-img create x exited with status 1:")
    assert "qemu-img: disk full" in message and "line 39" in message and "line 10" not in message


def test_failure_with_a_log_reads_the_log(fp: FakeProcess, tmp_path: Path) -> None:
    fp.register(["/usr/bin/debootstrap", "bookworm"], stdout="E: Failed getting release file", returncode=1)
    log = tmp_path / "build.log"
    with pytest.raises(CommandFailed, match="Failed getting release file"):
        proc.run(["debootstrap", "bookworm"], log=log)
    assert log.read_text().startswith("$ /usr/bin/debootstrap bookworm\n")


def test_timeout_is_its_own_error() -> None:
    with pytest.raises(Timeout) as info:
        proc.run(["sleep", "9"], timeout=0.1)
    assert info.value.status == 75


def test_missing_program_has_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proc, "which", lambda program: None)
    with pytest.raises(MissingProgram) as info:
        proc.run(["mkfs.ext4", "x"])
    assert info.value.status == 69
    assert info.value.message == "mkfs.ext4 is not installed; install it with: apt-get install e2fsprogs"
