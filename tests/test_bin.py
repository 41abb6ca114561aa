"""The bin/kp-* wrappers run the checkout's own code, whatever the current directory holds."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import BIN


def test_a_kodepipe_package_in_the_current_directory_is_never_imported(tmp_path: Path) -> None:
    # kp-run runs as root in the user's project, which the agent wrote: a planted kodepipe/
    # there must not become the code that runs
    planted = tmp_path / "kodepipe"
    planted.mkdir()
    (planted / "__init__.py").write_text("")
    (planted / "__main__.py").write_text("import sys\nprint('PLANTED CODE RAN')\nsys.exit(42)\n")
    proc = subprocess.run([str(BIN / "kp-ls"), "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, check=False)
    assert "PLANTED" not in proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Usage: kp-ls" in proc.stdout
