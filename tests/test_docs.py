"""Man pages and completions are generated from the commands; this fails when they drift."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

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


# -- kodepipe(7): KINDS, STATES, ERROR CODES and ENVIRONMENT come from the code ------------------------


def rendered(page: Path) -> str:
    argv = ["groff", "-man", "-Tutf8", "-rLL=300n", "-rHY=0", str(page)]  # wide, unhyphenated: one key, one word
    text = subprocess.run(argv, capture_output=True, text=True).stdout
    return re.sub(".\x08", "", text)


def section(text: str, name: str) -> str:
    """The body of a man page's section, up to the next section heading."""
    return re.split(r"\n(?=[A-Z][A-Z ]+\n)", text.split(f"\n{name}\n", 1)[1], maxsplit=1)[0]


def test_kodepipe_7_lists_every_kind_state_error_code_and_environment_variable(tmp_path: Path) -> None:
    from kodepipe.core import errors, schema

    text = rendered(docgen.generate(tmp_path)[-2])  # kodepipe.7 (test_committed_docs_match_the_commands: = committed)
    kinds, states, codes, env = (section(text, name) for name in ("KINDS", "STATES", "ERROR CODES", "ENVIRONMENT"))
    for kind in schema.KINDS:
        assert re.search(rf"^ {{7}}{kind}\b", kinds, re.M), kind
        for key in schema.keys(kind):
            assert key in kinds, (kind, key)
    for kind, spec in schema.KINDS.items():
        if spec.states is not None:
            block = re.split(r"\n {3}(?=\S)", ("\n" + states).split(f"\n   {kind}\n", 1)[1], maxsplit=1)[0]
            listed = re.findall(r"^ {7}([a-z_]+)", block, re.M)
            assert listed == [str(s) for s in spec.states], (kind, listed)
    listed_codes = re.findall(r"^ {7}([a-z_]+)", codes, re.M)
    assert listed_codes == [str(code) for code in errors.Code]
    assert len(listed_codes) >= 60
    assert re.findall(r"^ {7}([A-Z_]+)", env, re.M) == list(docgen.ENVIRONMENT)


def test_the_environment_section_is_what_the_code_reads() -> None:
    docgen.check_environment()  # raises when the code reads a variable the table does not explain, or v.v.
    assert {"KODEPIPE_STATE_DIR", "NO_COLOR", "SUDO_UID", "CONTAINER_HOST"} <= docgen.environment_names()


def test_the_environment_walk_finds_each_way_of_reading_a_variable(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text(
        "import os\n"
        "A = os.environ.get('A_VAR')\n"
        "B = os.environ['B_VAR']\n"
        "C = 'C_VAR' in os.environ\n"
        "D = os.getenv('D_VAR')\n"
        "for var in ('E_VAR', 'F_VAR'):\n    os.environ.get(var)\n"
        "STOP = 'KODEPIPE_G'\n"
        "def f(env): return env.get('H_VAR', '')\n"
        "os.environ.setdefault('NOT_READ', '1')\n"
        "x = {'NOT_ENV': 1}.get('NOT_ENV')\n")
    assert docgen.environment_names(tmp_path) == {"A_VAR", "B_VAR", "C_VAR", "D_VAR", "E_VAR", "F_VAR",
                                                  "KODEPIPE_G", "H_VAR"}
    with pytest.raises(ValueError, match="say what these mean"):
        docgen.check_environment(tmp_path)
