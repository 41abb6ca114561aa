"""The commands as real processes: pipelines, a reader that goes away,
concurrency, missing programs, signals."""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import BIN, kp, lines, make_image


def test_clone_piped_into_ls_shows_the_clones() -> None:
    make_image("base")
    pipeline = f"{BIN}/kp-clone base a b | {BIN}/kp-ls"
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", pipeline], capture_output=True, check=True)
    assert [(r["name"], r["state"]) for r in lines(proc.stdout)] == [("a", "stopped"), ("b", "stopped")]
    assert proc.stderr == b""


def test_ls_older_than_piped_into_rm_like_cron_does() -> None:
    make_image("base", created="2020-01-01T00:00:00Z")
    kp("kp-clone", "base", "new", check=True)
    # cron's stdin is empty: kp-ls must still list, and kp-rm must remove what it got
    pipeline = f"{BIN}/kp-ls --older-than 1d --kind image | {BIN}/kp-rm --images --force"
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", pipeline], stdin=subprocess.DEVNULL,
                          capture_output=True, check=True)
    assert [(r["name"], r["removed"]) for r in lines(proc.stdout)] == [("base", True)]
    assert [r["name"] for r in lines(kp("kp-ls", check=True).stdout)] == ["new"]


def test_a_reader_that_goes_away_ends_the_writer_quietly() -> None:
    make_image("base")
    kp("kp-clone", "base", *[f"v{i}" for i in range(40)], check=True)
    # the listing is larger than a pipe buffer once repeated, so the writer really meets EPIPE
    script = f"for i in 1 2 3 4 5 6 7 8; do cat; done < <({BIN}/kp-ls) | {BIN}/kp-rm | head -c 1 >/dev/null;" \
             " echo ${PIPESTATUS[1]}"
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert proc.stdout.strip() == "141"
    assert "Traceback" not in proc.stderr and "Broken pipe" not in proc.stderr
    # what was removed before the reader left is gone; the rest is listed truthfully
    left = lines(kp("kp-ls", check=True).stdout)
    assert all(r["state"] in ("ready", "stopped") for r in left)


def test_concurrent_clones_of_one_name_exactly_one_wins() -> None:
    make_image("base")
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: kp("kp-clone", "base", "same"), range(8)))
    assert sorted(r.returncode for r in results) == [0] + [1] * 7
    errors = [lines(r.stdout)[0]["error"]["code"] for r in results if r.returncode]
    assert set(errors) == {"exists"}
    assert len(lines(kp("kp-ls", "same").stdout)) == 1


def test_missing_qemu_img_exits_69_with_an_install_hint(tmp_path: Path) -> None:
    make_image("base")
    # a PATH with everything the command needs except qemu-img
    lonely = tmp_path / "bin"
    lonely.mkdir()
    for tool in ("sh", "dirname", "env"):
        found = shutil.which(tool)
        assert found
        (lonely / tool).symlink_to(found)
    env = {**os.environ, "PATH": str(lonely)}
    proc = kp("kp-clone", "base", "a", env=env)
    assert proc.returncode == 69
    assert b"qemu-img is not installed" in proc.stderr and b"apt-get install qemu-utils" in proc.stderr
    assert proc.stdout == b""
    assert not (Path(os.environ["KODEPIPE_STATE_DIR"]) / "vms" / "a").exists()


def test_help_is_fast_to_import_no_heavy_modules() -> None:
    # start-up time itself is measured in bench/; here: --help must not load the heavy libraries
    for prog in ("kp-image", "kp-clone", "kp-ls", "kp-rm"):
        code = ("import sys; sys.argv=['x','--help']\n"
                f"from kodepipe.commands import COMMANDS; import importlib\n"
                f"m = importlib.import_module(COMMANDS['{prog}'])\n"
                "try: m.main()\nexcept SystemExit: pass\n"
                "heavy = [n for n in ('paramiko','podman','cryptography','qemu','kodepipe.vm.imagebuild') "
                "if n in sys.modules]\nprint(heavy, file=sys.stderr)\n")
        proc = subprocess.run([os.environ["KODEPIPE_PYTHON"], "-c", code], capture_output=True, text=True,
                              check=True)
        assert proc.stderr.strip() == "[]", prog
        assert "Usage:" in proc.stdout


@pytest.mark.parametrize("prog", ["kp-image", "kp-clone", "kp-ls", "kp-rm"])
def test_every_command_has_help_and_version_free_usage(prog: str) -> None:
    proc = kp(prog, "--help")
    assert proc.returncode == 0 and proc.stdout.startswith(b"Usage: " + prog.encode())
    bad = kp(prog, "--no-such-option")
    assert bad.returncode == 2 and b"No such option" in bad.stderr and bad.stdout == b""
