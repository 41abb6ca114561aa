"""Concurrent creation against cron cleanup, in real processes (issue 9, item 3).

Many kp-clone runs make VMs while cron-like loops run the cleanup of broken
things, `kp-ls --state broken | kp-rm`, as fast as they can.  No VM that kp-clone
reported as made may be removed: an object in creation is never broken.  The
deterministic tests of the same rule are in tests/test_creating.py.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import BIN, lines, make_image

pytestmark = pytest.mark.integration

CLONERS = 6  # concurrent kp-clone processes
NAMES = 40  # VMs each one makes, one after the other
CRON_LOOPS = 2
BOUND = 600.0  # seconds: generous, only so that a hung command fails the test instead of CI


def test_cron_cleanup_never_removes_a_clone_being_made(tmp_path: Path) -> None:
    make_image("base")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    stop = tmp_path / "stop"
    crons = []
    for n in range(CRON_LOOPS):
        # cron, as fast as it can go; each pass appends kp-rm's records and a line to count passes
        script = (f"while [ ! -e {stop} ]; do kp-ls --state broken | kp-rm -q >> {tmp_path}/rm{n}.jsonl; "
                  f"echo pass >> {tmp_path}/passes{n}; done")
        crons.append(subprocess.Popen(["bash", "-c", script], env=env, stdin=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE))
    passes = [tmp_path / f"passes{n}" for n in range(CRON_LOOPS)]
    try:
        # both loops are going before the first clone is made (a real condition, with a bound)
        deadline = time.monotonic() + BOUND
        while not all(p.exists() for p in passes):
            assert time.monotonic() < deadline and all(c.poll() is None for c in crons), "cron loops did not start"
            time.sleep(0.05)
        before = sum(len(p.read_text().splitlines()) for p in passes)
        cloners = [subprocess.Popen(["kp-clone", "base", *(f"c{i}-{j}" for j in range(NAMES))], env=env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                   for i in range(CLONERS)]
        made: dict[str, str] = {}
        for cloner in cloners:
            out, err = cloner.communicate(timeout=BOUND)
            assert cloner.returncode == 0, err.decode()
            for record in lines(out):
                made[str(record["name"])] = str(record["id"])
        during = sum(len(p.read_text().splitlines()) for p in passes) - before
    finally:
        stop.touch()
        for cron in crons:
            cron.communicate(timeout=BOUND)
    assert len(made) == CLONERS * NAMES
    assert during >= 1, "the cron loops never ran while the clones were made"
    removed = [r for n in range(CRON_LOOPS) for r in lines((tmp_path / f"rm{n}.jsonl").read_bytes())
               if r.get("removed")]
    assert [r["name"] for r in removed if r.get("name") in made] == []
    listed = {str(r["name"]): r for r in lines(subprocess.run(["kp-ls", "--kind", "vm"], env=env, check=True,
                                                              capture_output=True).stdout)}
    assert {name: (listed[name]["id"], listed[name]["state"]) for name in made if name in listed} == \
           {name: (made[name], "stopped") for name in made}
