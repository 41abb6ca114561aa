"""The warm pool (kp-pool) on real QEMU (TCG here) and the real guest agent: two kp-clones at once
get two different members and the pool fills up again; a member named to kp-rm goes; a refill that
fails is kept and shown by kp-ls until kp-pool mends it.

tests/integration/test_vm.py has the pool's first test (one hand-out, its identity, the refill, the
bulk kp-rm that keeps a member); these cover what it does not.  Each pool member is a TCG VM: the
tests fill as few as they can, and wait on conditions (a record, a process), never on a duration.
Every test leaves the shared image "base" as it found it: no pool, no VM of its own."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from kodepipe.core.state import parse_iso
from tests.conftest import BIN, lines
from tests.integration.conftest import run
from tests.integration.test_vm import one, qemu_processes, ssh

pytestmark = pytest.mark.integration

T = TypeVar("T")

MEMBER_BOUND = 600.0  # seconds for one member under TCG, from its clone to SSH answering, on a busy host
STUB_MESSAGE = "kp-test stub: this QEMU refuses to start"


def _live(pid: str) -> bool:
    """Whether /proc/PID is a process that has not exited (a zombie only waits for its parent's wait())."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def refills(state: Path) -> list[int]:
    """Live ``kp-pool base --refill`` processes of this session's state folder (kp-clone starts them
    detached; another engineer's kodepipe on this machine has another state folder)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[-3:] == [b"kp-pool", b"base", b"--refill"] and \
                f"KODEPIPE_STATE_DIR={state}".encode() in environ and _live(pid):
            found.append(int(pid))
    return found


def wait_for(check: Callable[[], T | None], bound: float, what: str) -> T:
    """Poll ``check`` until it returns something other than None; fail after ``bound`` seconds,
    saying what was awaited and what was last seen."""
    deadline = time.monotonic() + bound
    while True:
        seen = check()
        if seen is not None:
            return seen
        assert time.monotonic() < deadline, f"still waiting for {what} after {bound:g} s"
        time.sleep(1)


def pool_of(env: dict[str, str]) -> dict[str, Any]:
    """The "pool" of base's image record, as kp-ls shows it now."""
    pool = one(run(env, "kp-ls", "--kind", "image", "base")).get("pool")
    assert isinstance(pool, dict), pool
    return pool


def vms(env: dict[str, str]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in lines(run(env, "kp-ls", "--kind", "vm").stdout)}


def pooled(env: dict[str, str]) -> list[str]:
    return [name for name, record in vms(env).items() if record.get("pool")]


def warm(env: dict[str, str]) -> None:
    """A pool needs base warm: test_vm.py warms it when it runs first; else this does."""
    if not isinstance(one(run(env, "kp-ls", "--kind", "image", "base")).get("warm"), dict):
        one(run(env, "kp-image", "warm", "base", timeout=900))


def fill(env: dict[str, str], *args: str, count: int) -> dict[str, Any]:
    """kp-pool base ARGS, which returns once the pool keeps ``count`` ready members; its "pool"."""
    proc = run(env, "kp-pool", "base", *args, "--timeout", str(int(MEMBER_BOUND)),
               timeout=MEMBER_BOUND * (count + 1))
    pool = one(proc)["pool"]
    assert isinstance(pool, dict) and "problem" not in pool, pool
    assert pool["keeps"] == count and pool["ready"] == count and len(pool["members"]) == count, pool
    return pool


def leave_as_found(env: dict[str, str], state: Path, names: Iterable[str]) -> None:
    """Empty base's pool and remove this test's VMs.  A refill still running when the settings go
    removes what it made itself once it sees them gone: it is waited for, then emptied again in case."""
    run(env, "kp-pool", "base", "--size", "0")
    wait_for(lambda: True if not refills(state) else None, MEMBER_BOUND, "the background refills to end")
    run(env, "kp-pool", "base", "--size", "0")
    run(env, "kp-rm", *names)


def test_two_kp_clones_at_once_get_two_different_members_and_the_pool_fills_again(
        golden: dict[str, Any]) -> None:
    env, state = golden["env"], Path(golden["env"]["KODEPIPE_STATE_DIR"])
    warm(env)
    names = ("twin-a", "twin-b")
    members: list[str] = []
    fresh: list[str] = []
    try:
        members = fill(env, "--size", "2", count=2)["members"]
        # kp-pool returned once the pool was whole: kp-ls, which kp-clone's choice goes by, says so too
        assert pool_of(env)["ready"] == 2
        listed = vms(env)
        before = {m: {"pid": listed[m]["pid"], "port": listed[m]["ssh"]["port"],
                      "machine_id": ssh(env, m, "cat", "/etc/machine-id")["stdout"].strip()} for m in members}
        assert len({b["machine_id"] for b in before.values()}) == 2, before

        clones = [subprocess.Popen([str(BIN / "kp-clone"), "base", name], env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE) for name in names]
        outputs = [clone.communicate(timeout=300) for clone in clones]
        records = {}
        for clone, (stdout, stderr) in zip(clones, outputs, strict=True):
            assert clone.returncode == 0, stderr.decode()
            (record,) = lines(stdout)
            records[record["name"]] = record
        print("pool: two hand-outs at once, their hostnames set in "
              f"{[r.get('hostname_seconds') for r in records.values()]} s")
        assert sorted(records) == sorted(names), records
        for name, record in records.items():
            # (a kp-clone waits 2 s at most for the other's hand-out, then makes an ordinary clone)
            assert record.get("from_pool") is True and record["state"] == "running", (record, records)
            assert "pool" not in record and record["name"] == name, record
        # each member was handed out once: two QEMUs, two SSH ports, and neither member is left under
        # its pool name
        assert sorted(r["pid"] for r in records.values()) == sorted(b["pid"] for b in before.values()), records
        assert sorted(r["ssh"]["port"] for r in records.values()) == sorted(b["port"] for b in before.values())
        for member in members:
            assert not (state / "vms" / member).exists(), member
        after = {n: ssh(env, n, "sh", "-c", "hostname; cat /etc/machine-id")["stdout"].split() for n in names}
        assert [after[n][0] for n in names] == list(names), after
        assert sorted(a[1] for a in after.values()) == sorted(b["machine_id"] for b in before.values()), after
        # each kept the machine-id its QEMU had as a member (the hand-out renames, it does not reseed)
        for name, record in records.items():
            (member,) = [m for m in members if before[m]["pid"] == record["pid"]]
            assert after[name][1] == before[member]["machine_id"], (name, member, after, before)

        # both hand-outs started a refill: one fills the pool, the other finds it busy and leaves it
        def whole() -> dict[str, Any] | None:
            pool = pool_of(env)
            assert "problem" not in pool, pool
            return pool if pool["ready"] == 2 and not set(pool["members"]) & set(members) else None

        fresh = wait_for(whole, MEMBER_BOUND * 2, "the pool to keep two new ready members")["members"]
        assert len(fresh) == 2, fresh  # never more than its size, though two refills were started
        wait_for(lambda: True if not refills(state) else None, MEMBER_BOUND, "the refills to end")
        assert pool_of(env)["members"] == fresh

        # naming a member removes it: the pool then says it keeps two with one ready, and nothing
        # refills it until the next hand-out or kp-pool
        gone = one(run(env, "kp-rm", fresh[0]))
        assert gone["name"] == fresh[0] and gone["removed"] is True, gone
        assert qemu_processes(fresh[0]) == []
        assert not refills(state)
        pool = pool_of(env)
        assert pool["members"] == [fresh[1]] and pool["ready"] == 1 and pool["keeps"] == 2, pool
        assert pool["size"] == 2 and "problem" not in pool, pool

        # --size 0 empties it: no settings, no member, no member's QEMU; the VMs handed out stay
        emptied = one(run(env, "kp-pool", "base", "--size", "0"))
        assert emptied.get("pool") is None, emptied
        assert not (state / "images" / "base" / "pool.json").exists()
        assert pooled(env) == []
        assert qemu_processes(fresh[1]) == []
        listed = vms(env)
        assert all(listed[n]["state"] == "running" for n in names), listed
    finally:
        leave_as_found(env, state, names)
    assert pooled(env) == []
    assert all(qemu_processes(m) == [] for m in [*members, *fresh]), (members, fresh)


@pytest.fixture
def stub_qemu() -> Iterator[Path]:
    """A folder holding a qemu-system-x86_64 that says STUB_MESSAGE and exits 1.  Outside pytest's
    private temporary folders: kodepipe runs QEMU as an unprivileged user, who must reach it."""
    with tempfile.TemporaryDirectory(prefix="kp-stub-qemu-") as folder:
        stubs = Path(folder)
        stubs.chmod(0o755)
        (stubs / "qemu-system-x86_64").write_text(f"#!/bin/sh\necho '{STUB_MESSAGE}' >&2\nexit 1\n")
        (stubs / "qemu-system-x86_64").chmod(0o755)
        yield stubs


def test_a_refill_that_fails_is_shown_by_kp_ls_until_kp_pool_mends_it(
        golden: dict[str, Any], stub_qemu: Path) -> None:
    env, state = golden["env"], Path(golden["env"]["KODEPIPE_STATE_DIR"])
    warm(env)
    # a QEMU that cannot start: the hand-out needs none (the member runs already), the refill it
    # starts in the background inherits kp-clone's PATH, and with it this QEMU
    broken = {**env, "PATH": f"{stub_qemu}:{env['PATH']}"}
    log = state / "images" / "base" / "pool.log"
    name = "unlucky"
    member = ""
    try:
        (member,) = fill(env, "--size", "1", count=1)["members"]
        logged = log.stat().st_size if log.exists() else 0  # what earlier refills wrote

        handed = one(run(broken, "kp-clone", "base", name))
        assert handed.get("from_pool") is True and handed["state"] == "running", handed
        assert qemu_processes(member), member  # the member handed out kept its QEMU
        # the refill ends once its member fails (tried twice): kp-ls then shows why, and when
        wait_for(lambda: True if not refills(state) else None, MEMBER_BOUND, "the failing refill to end")
        pool = pool_of(env)
        print(f"pool: the failed refill, as kp-ls shows it: {pool}")
        problem, failed = pool.get("problem"), pool.get("failed")
        assert isinstance(problem, str) and problem.startswith("making pool-"), pool
        assert "QEMU failed to start" in problem and STUB_MESSAGE in problem, pool
        assert isinstance(failed, str) and parse_iso(failed) is not None, pool
        # the member it could not make is not left behind
        assert pool["members"] == [] and pool["ready"] == 0 and pool["keeps"] == 1, pool
        assert pooled(env) == []
        # pool.log in the image's folder says what the refill did: a first try, a second, the failure
        assert log.is_file()
        written = log.read_bytes()[logged:].decode("utf-8", "replace")
        assert "trying a new one" in written and STUB_MESSAGE in written, written
        # the problem points at a log that is there: the failed member's own went with its folder
        assert "/vms/pool-" not in problem and f"{log} (copied from pool-" in problem, problem
        assert "'s qemu.log ---" in written and "$ " in written, written  # its QEMU's command line and output

        # kp-pool base, with a QEMU that starts, makes the pool whole and forgets the problem
        mended = fill(env, count=1)
        assert "failed" not in mended and mended["size"] == 1, mended
        pool = pool_of(env)
        assert "problem" not in pool and "failed" not in pool and pool["ready"] == 1, pool
        assert one(run(env, "kp-ls", name))["state"] == "running"  # what was handed out is the user's
    finally:
        leave_as_found(env, state, [name])
    assert pooled(env) == []
    assert member and qemu_processes(member) == []  # its QEMU kept the member's name: gone with unlucky
