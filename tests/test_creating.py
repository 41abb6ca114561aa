"""An object in creation is never reported or removed as broken (issue 9, item 3).

A creator holds the name's lock (flock on locks/NAME.lock) from before its
folder appears until its last metadata is written.  These tests hold that lock
in another process, deterministically, and check what kp-ls says and what kp-rm
does; tests/integration/test_races.py races real kp-clone runs against a cron loop.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.synchronize
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest

from kodepipe.core import proc
from kodepipe.core import state as state_module
from kodepipe.core.state import Store
from tests.cli import invoke
from tests.conftest import BIN, make_image

WAIT = 60.0  # a generous bound for another process to reach a point; never a duration to sleep


def root() -> Path:
    return Path(os.environ["KODEPIPE_STATE_DIR"])


def _creator(root: str, kind: str, name: str, meta: dict[str, Any], made: multiprocessing.synchronize.Event,
             release: multiprocessing.synchronize.Event, finish: str | None) -> None:
    """What kp-clone and kp-image build do, stopped in the middle until ``release``."""
    store = Store(Path(root))
    with store.lock(name), store.creating(kind, name, meta) as folder:
        made.set()
        release.wait(WAIT)
        if finish is None:
            os._exit(3)  # killed mid-way: no clean-up, the lock goes with the process
        (folder / "disk.qcow2").write_bytes(b"")
        store.write_meta(folder, {**meta, "state": finish, "disk": "disk.qcow2"})


def _holder(root: str, name: str, held: multiprocessing.synchronize.Event,
            release: multiprocessing.synchronize.Event) -> None:
    with Store(Path(root)).lock(name):
        held.set()
        release.wait(WAIT)


@contextmanager
def creator(kind: str, name: str, meta: dict[str, Any], finish: str | None = "ready") -> Iterator[Any]:
    made, release = multiprocessing.Event(), multiprocessing.Event()
    proc = multiprocessing.Process(target=_creator, args=(str(root()), kind, name, meta, made, release, finish))
    proc.start()
    try:
        assert made.wait(WAIT), "the creator did not get going"
        yield release
    finally:
        release.set()
        proc.join(WAIT)


@contextmanager
def holding(name: str) -> Iterator[None]:
    held, release = multiprocessing.Event(), multiprocessing.Event()
    proc = multiprocessing.Process(target=_holder, args=(str(root()), name, held, release))
    proc.start()
    try:
        assert held.wait(WAIT)
        yield
    finally:
        release.set()
        proc.join(WAIT)


def vm_meta(name: str) -> dict[str, Any]:  # as vms.clone writes it first
    return {"kind": "vm", "name": name, "id": "aaaaaaaaaaaa", "created": "2026-01-01T00:00:00Z",
            "state": "creating", "base": "base", "base_id": "0123456789ab"}


def listed(*args: str) -> list[dict[str, Any]]:
    result = invoke("kp-ls", *args)
    assert result.status == 0, result.stderr
    return result.records


def test_a_clone_being_made_is_creating_and_kp_rm_leaves_it_to_its_creator(monkeypatch: pytest.MonkeyPatch) -> None:
    make_image("base")
    monkeypatch.setattr(state_module, "LOCK_WAIT", 0.3)
    with creator("vm", "x", vm_meta("x"), finish="ready") as release:
        (record,) = listed("x")
        assert record["state"] == "creating" and "problem" not in record
        assert listed("--state", "broken") == []
        assert [r["name"] for r in listed("--state", "creating")] == ["x"]
        # the cron job finds nothing; named or piped, kp-rm waits for the lock, then reports busy
        assert invoke("kp-rm", input=invoke("kp-ls", "--state", "broken").stdout).records == []
        for result in (invoke("kp-rm", "x"), invoke("kp-rm", input=orjson.dumps(record))):
            assert result.status == 75, result.stderr
            assert result.records[0]["error"]["code"] == "busy"
        assert (root() / "vms" / "x" / "meta.json").is_file()
        release.set()
    (record,) = listed("x")
    assert record["state"] == "stopped" and record["id"] == "aaaaaaaaaaaa"


def test_a_killed_creation_is_broken_and_kp_rm_removes_it() -> None:
    make_image("base")
    with creator("vm", "x", vm_meta("x"), finish=None):
        assert listed("x")[0]["state"] == "creating"
    (record,) = listed("--state", "broken")
    assert record["name"] == "x" and "interrupted" in record["problem"] and record["id"] == "aaaaaaaaaaaa"
    removed = invoke("kp-rm", input=orjson.dumps(record))
    assert removed.status == 0 and removed.records[0]["removed"] is True
    assert removed.records[0]["state"] == "broken"  # kp-rm's own lock does not make it look in the making
    assert not (root() / "vms" / "x").exists()


@pytest.mark.parametrize("kind", ["vm", "container", "image"])
def test_a_folder_without_metadata_is_creating_while_its_lock_is_held(kind: str) -> None:
    """Whatever made it: a creator that writes its metadata late is still in the making."""
    folder = root() / state_module.KIND_DIRS[kind] / "half"
    with holding("half"):
        folder.mkdir(parents=True)
        (record,) = listed("half")
        assert record["state"] == "creating" and "problem" not in record, record
        assert listed("--state", "broken") == []
    (record,) = listed("half")
    assert record["state"] == "broken" and "interrupted" in record["problem"]


def test_an_image_being_built_is_building_while_its_builder_holds_the_lock() -> None:
    meta = {"kind": "image", "name": "img", "id": "bbbbbbbbbbbb", "created": "2020-01-01T00:00:00Z",
            "state": "building"}
    with creator("image", "img", meta, finish=None):
        assert listed("img")[0]["state"] == "building"
        assert listed("--state", "broken") == []
    assert "build was interrupted" in listed("img")[0]["problem"]


def test_an_id_less_broken_record_never_removes_what_its_creator_then_finished() -> None:
    """The race of issue 9, replayed: a listing saw the folder before its metadata and said
    "broken" (no id); kp-rm waits for the creator's lock and then finds a finished VM."""
    make_image("base")
    stale = {"kind": "vm", "name": "x", "state": "broken", "problem": "no metadata: creation was interrupted"}
    with creator("vm", "x", vm_meta("x"), finish="ready") as release:
        rm = subprocess.Popen([str(BIN / "kp-rm")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
        release.set()  # kp-rm gets the lock whether it was waiting for it already or not
        out, err = rm.communicate(orjson.dumps(stale) + b"\n", timeout=WAIT)
    assert rm.returncode == 1, err
    (record,) = [orjson.loads(line) for line in out.splitlines()]
    assert record["error"]["code"] == "stale_record"
    assert listed("x")[0]["state"] == "stopped"


def test_a_folder_never_exists_without_its_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(root())
    seen = []
    write_meta = Store.write_meta

    def spy(self: Store, folder: Path, meta: dict[str, Any]) -> None:
        seen.append((folder.name, store.folder("vm", "x").exists(), store.names("vm")))
        write_meta(self, folder, meta)

    monkeypatch.setattr(Store, "write_meta", spy)
    with store.lock("x"), store.creating("vm", "x", {"kind": "vm", "state": "creating"}) as folder:
        assert (folder / "meta.json").is_file() and folder == store.folder("vm", "x")
    (name, exists, names), = seen
    assert name.startswith(".x.") and name.endswith(".new")  # written under a hidden name ...
    assert not exists and names == []  # ... while the real name does not exist and nothing is listed
    assert sorted(os.listdir(root() / "vms")) == ["x"]


def test_a_creation_that_fails_leaves_no_hidden_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(root())

    def full(self: Store, folder: Path, meta: dict[str, Any]) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Store, "write_meta", full)
    with pytest.raises(OSError), store.lock("x"), store.creating("vm", "x", {}):
        pass
    assert os.listdir(root() / "vms") == []


def test_the_listing_settles_a_creation_that_ends_between_its_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The creator writes its last metadata and lets go of the lock just after kp-ls read
    "creating" and just before it tests the lock: kp-ls reads again, and never says broken."""
    store = Store(root())
    make_image("base")
    with store.lock("x"), store.creating("vm", "x", vm_meta("x")):
        pass  # left "creating", as by a creator still at work
    folder = store.folder("vm", "x")
    finished = {**vm_meta("x"), "state": "ready", "disk": "disk.qcow2"}
    (folder / "disk.qcow2").write_bytes(b"")

    def creator_finishes_now(self: Store, name: str) -> bool:
        store.write_meta(folder, finished)
        return False

    monkeypatch.setattr(Store, "lock_held", creator_finishes_now)
    (record,) = listed("x")
    assert record["state"] == "stopped", record
    # same moment, but the creator died instead: nothing changed between the reads
    store.write_meta(folder, vm_meta("x"))
    monkeypatch.setattr(Store, "lock_held", lambda self, name: False)
    assert listed("x")[0]["state"] == "broken"


def test_kp_rm_sweeps_hidden_folders_of_killed_creations_but_not_live_ones() -> None:
    dead = root() / "vms" / ".dead.0123456789ab.new"
    live = root() / "vms" / ".live.0123456789ab.new"
    for folder in (dead, live):
        folder.mkdir(parents=True)
        (folder / "meta.json").write_text("{}")
    assert listed() == []  # never listed
    with holding("live"):
        Store(root()).empty_trash()
        assert not dead.exists() and live.is_dir()


# -- a run that kp-run is still making (it holds no lock while it sets up and runs) ---------------

def run_folder(name: str, state: str, pid: int, started: int | None) -> Path:
    """A kp-run folder as kp-run writes it first, naming ``pid`` as its kp-run (no Podman
    container named: nothing for kp-rm to ask Podman about)."""
    folder = root() / "containers" / name
    folder.mkdir(parents=True)
    meta = {"kind": "container", "name": name, "id": "cccccccccccc", "created": "2020-01-01T00:00:00Z",
            "state": state, "host": "local", "pid": pid, "pid_start": started,
            "boot_id": proc.boot_id()}
    (folder / "meta.json").write_bytes(orjson.dumps(meta))
    return folder


@pytest.mark.parametrize("state, says", [("creating", "is still being made by"),
                                         ("running", "is still running under")])
def test_a_bulk_kp_rm_keeps_a_run_whose_kp_run_is_alive_and_a_named_one_removes_it(state: str, says: str) -> None:
    folder = run_folder("r", state, os.getpid(), proc.start_time(os.getpid()))  # this test plays the live kp-run
    (record,) = listed("r")
    assert record["state"] == state, record
    for piped in (invoke("kp-ls", "--older-than", "1d").stdout, orjson.dumps(record) + b"\n"):
        kept = invoke("kp-rm", input=piped)
        assert kept.status == 0, kept.stderr
        assert kept.records[0]["removed"] is False and says in kept.records[0]["kept"]
        assert f"kept: run r {says} kp-run {os.getpid()}" in kept.stderr
        assert (folder / "meta.json").is_file()
    # the dry run says the same
    dry = invoke("kp-rm", "--dry-run", input=orjson.dumps(record) + b"\n")
    assert "kept" in dry.records[0] and folder.is_dir()
    named = invoke("kp-rm", "r")
    assert named.status == 0 and named.records[0]["removed"] is True, named.stderr
    assert not folder.exists()


def test_a_bulk_kp_rm_removes_a_run_whose_kp_run_is_gone() -> None:
    child = subprocess.Popen(["cat"], stdin=subprocess.PIPE)
    started = proc.start_time(child.pid)
    child.communicate(b"", timeout=WAIT)  # that kp-run has ended
    folder = run_folder("r", "creating", child.pid, started)
    (record,) = listed("r")
    assert record["state"] == "orphaned"
    removed = invoke("kp-rm", input=orjson.dumps(record) + b"\n")
    assert removed.status == 0 and removed.records[0]["removed"] is True, removed.stderr
    assert not folder.exists()
