"""The state store: atomic metadata, locks, creation and removal."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest

from kodepipe.core.errors import Busy, Exists, KpError
from kodepipe.core.state import Store, mounts_under, natural_key, parse_iso, write_atomic


def test_write_atomic_replaces_whole_file_and_leaves_no_temp(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    target = tmp_path / "d" / "meta.json"
    write_atomic(target, b"one")
    write_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["meta.json"]


def test_creating_removes_the_folder_when_the_body_fails(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with pytest.raises(RuntimeError), store.lock("a"), store.creating("vm", "a", {"kind": "vm"}) as folder:
        assert (folder / "meta.json").exists()
        raise RuntimeError("boom")
    assert not store.folder("vm", "a").exists()
    assert store.lookup("a") is None


def test_names_are_one_namespace_across_kinds(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with store.lock("x"), store.creating("image", "x", {"kind": "image"}):
        pass
    with pytest.raises(Exists, match="an image"), store.lock("x"), store.creating("vm", "x", {}):
        pass
    assert store.lookup("x") == ("image", store.folder("image", "x"))


def _hold(root: str, name: str, ready: multiprocessing.synchronize.Event,
          release: multiprocessing.synchronize.Event) -> None:
    with Store(Path(root)).lock(name):
        ready.set()
        release.wait(60)  # held until the test says so, however long the test takes to get there


def test_lock_is_exclusive_across_processes_and_times_out_as_busy(tmp_path: Path) -> None:
    store = Store(tmp_path)
    ready, release = multiprocessing.Event(), multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold, args=(str(tmp_path), "a", ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        assert store.lock_held("a")
        started = time.monotonic()
        with pytest.raises(Busy) as info, store.lock("a", wait=0.3):
            pass
        assert time.monotonic() - started >= 0.3  # it waited its full (monotonic) wait first
        assert info.value.status == 75
        with store.lock("b", wait=0.1):  # other names are not blocked
            pass
        release.set()
        with store.lock("a", wait=60):  # and the lock is had once released
            pass
    finally:
        release.set()
        holder.join()
    assert not store.lock_held("a")


def test_shared_locks_coexist_but_block_exclusive(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with store.lock("base", shared=True), store.lock("base", shared=True, wait=0.1), \
            pytest.raises(Busy), store.lock("base", wait=0.1):
        pass


def test_discard_renames_then_deletes_read_only_content(tmp_path: Path) -> None:
    store = Store(tmp_path)
    folder = store.folder("image", "a")
    (folder / "sub").mkdir(parents=True)
    (folder / "disk").write_bytes(b"x")
    os.chmod(folder / "disk", 0o444)
    os.chmod(folder / "sub", 0o500)
    store.discard(folder)
    assert not folder.exists()
    assert list((tmp_path / "trash").iterdir()) == []


def test_empty_trash_finishes_an_interrupted_removal(tmp_path: Path) -> None:
    store = Store(tmp_path)
    (tmp_path / "trash" / "a.123").mkdir(parents=True)
    (tmp_path / "trash" / "a.123" / "f").write_text("x")
    store.empty_trash()
    assert list((tmp_path / "trash").iterdir()) == []


def test_corrupt_metadata_is_an_error_not_a_crash(tmp_path: Path) -> None:
    store = Store(tmp_path)
    folder = store.folder("vm", "a")
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text("{half")
    with pytest.raises(KpError, match="corrupt"):
        store.read_meta(folder)
    assert store.read_meta(store.folder("vm", "none")) is None


def test_mounts_under_sees_real_mount_points() -> None:
    assert mounts_under(Path("/proc")) and "/proc" in mounts_under(Path("/proc"))
    assert mounts_under(Path("/proc/self/fdinfo")) == []


@pytest.mark.parametrize("text, expected", [
    ("2026-01-01T00:00:00Z", 1767225600.0),
    ("1970-01-01T00:00:10Z", 10.0),
    ("2026-01-01 00:00:00Z", None), ("2026-01-01T00:00:00", None), ("yesterday", None), (None, None),
    (12, None), ("2026-aa-01T00:00:00Z", None),
])
def test_parse_iso(text: object, expected: float | None) -> None:
    assert parse_iso(text) == expected


def test_natural_order() -> None:
    assert sorted(["vm10", "vm2", "a", "vm1"], key=natural_key) == ["a", "vm1", "vm2", "vm10"]
