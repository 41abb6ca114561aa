"""Man pages and completions are generated from the commands; this fails when they drift."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from kodepipe import docgen
from kodepipe.commands import COMMANDS
from tests.conftest import ROOT


def test_committed_docs_match_the_commands(tmp_path: Path) -> None:
    written = docgen.generate(tmp_path)
    stale = [str(p.relative_to(tmp_path)) for p in written
             if not (ROOT / p.relative_to(tmp_path)).exists()
             or (ROOT / p.relative_to(tmp_path)).read_text() != p.read_text()]
    assert stale == [], f"regenerate with: python -m kodepipe.docgen  (stale: {stale})"


def test_every_command_has_a_page_completions_and_an_entry_point() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    for prog in COMMANDS:
        assert (ROOT / "man" / "man1" / f"{prog}.1").exists()
        assert (ROOT / "completions" / "bash" / prog).exists()
        assert f'{prog} = "{COMMANDS[prog]}:main"' in pyproject
        assert (ROOT / "bin" / prog).resolve() == (ROOT / "bin" / "kp-command")


def test_man_pages_render_without_warnings() -> None:
    for page in sorted((ROOT / "man").rglob("*.[17]")):
        proc = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(page)], capture_output=True, text=True)
        assert proc.returncode == 0 and proc.stderr == "", (page.name, proc.stderr)
        text = subprocess.run(["groff", "-man", "-Tutf8", str(page)], capture_output=True, text=True).stdout
        text = re.sub(".\x08", "", text)  # drop the overstrike of bold text
        assert "EXIT STATUS" in text and "65" in text


def test_the_readme_exit_table_lists_every_exit_status() -> None:
    from kodepipe.core import errors

    section = (ROOT / "README.md").read_text().split("| exit | meaning |", 1)[1].split("\n\n", 1)[0]
    listed = {int(n) for row in section.splitlines()[1:] for n in re.findall(r"\d+", row.split("|")[1])}
    assert listed == {status for status, _ in errors.EXIT_STATUSES}
