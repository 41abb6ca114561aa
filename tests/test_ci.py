""".ci/run runs the README's two commands word for word (issue 9, item 2): the set-up with the test
extra, the quickstart on its default path, the test command; the quickstart first, as on a fresh
machine (it sets itself up), then the test command, stopping at the first
failure, with each step's time on stderr.  Between the set-up and the suite it runs the lint the
README's "Development" asks for: ruff, mypy and lint-imports (issue 11, item 8).  Run here against
stand-ins for every step."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

STEPS = ["./quickstart", "./setup --test", ".venv/bin/pytest"]
LINT = [".venv/bin/ruff check kodepipe tests bench", ".venv/bin/mypy", ".venv/bin/lint-imports"]
CI = [*STEPS[:2], *LINT, STEPS[2]]


def readme_commands() -> list[str]:
    section = (ROOT / "README.md").read_text().split("## Two commands", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    return [command.strip() for block in blocks for line in block.splitlines() for command in line.split("&&")]


def test_the_readme_and_ci_name_the_same_commands() -> None:
    assert sorted(readme_commands()) == sorted(STEPS)
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.findall(r"^step (.+)$", ci, re.M) == CI
    readme = " ".join((ROOT / "README.md").read_text().split())
    for command in LINT:  # the README says CI runs them
        assert f"`{command}`" in readme
    assert "set -euo pipefail" in ci


def test_the_quickstart_takes_the_default_accelerator() -> None:
    code = [line for line in (ROOT / "quickstart").read_text().splitlines() if not line.lstrip().startswith("#")]
    boots = [line for line in code if "| kp-boot |" in line and not line.lstrip().startswith("step ")]
    assert boots and not any("--accel" in line for line in code)  # as a newcomer runs it: --accel auto


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A checkout whose steps are stand-ins that log their arguments; each fails if told to (fail-NAME)."""
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    for step in ("setup", "quickstart", *(f".venv/bin/{name}" for name in ("pytest", "ruff", "mypy", "lint-imports"))):
        script = tmp_path / step
        script.write_text(f'#!/bin/sh\necho "{step} $*" >> "$(dirname "$0")/{"../../" if "/" in step else ""}log"\n'
                          f'[ ! -e "$(dirname "$0")/{"../../" if "/" in step else ""}fail-{Path(step).name}" ]\n')
        script.chmod(0o755)
    return tmp_path


def test_ci_runs_the_steps_in_order(checkout: Path) -> None:
    proc = subprocess.run(["bash", str(checkout / ".ci" / "run")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (checkout / "log").read_text().splitlines() == [
        "quickstart ", "setup --test", ".venv/bin/ruff check kodepipe tests bench", ".venv/bin/mypy ",
        ".venv/bin/lint-imports ", ".venv/bin/pytest "]
    for step in CI:
        assert re.search(rf"ci: == {re.escape(step)}: exit 0 after \d+ s", proc.stderr), proc.stderr
    assert re.search(r"ci: passed in \d+ s", proc.stderr)
    assert proc.stdout == ""


def test_ci_stops_at_a_failing_quickstart(checkout: Path) -> None:
    (checkout / "fail-quickstart").touch()
    proc = subprocess.run(["bash", str(checkout / ".ci" / "run")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert (checkout / "log").read_text().splitlines() == ["quickstart "]
    assert re.search(r"ci: == \./quickstart: exit 1 after \d+ s", proc.stderr), proc.stderr
    assert "passed" not in proc.stderr


@pytest.mark.parametrize("failing", LINT)
def test_ci_stops_at_a_failing_lint_step_before_the_suite(checkout: Path, failing: str) -> None:
    (checkout / f"fail-{Path(failing.split()[0]).name}").touch()
    proc = subprocess.run(["bash", str(checkout / ".ci" / "run")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    ran = (checkout / "log").read_text().splitlines()
    assert ran[-1].startswith(failing) and not any(line.startswith(".venv/bin/pytest") for line in ran), ran
    assert len(ran) == 3 + LINT.index(failing)
    assert re.search(rf"ci: == {re.escape(failing)}: exit 1 after \d+ s", proc.stderr), proc.stderr
    assert "passed" not in proc.stderr
