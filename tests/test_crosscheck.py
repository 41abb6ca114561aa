"""The audit's cross-check (crosscheck.py): real changes matched against the trace's file events.

Table-driven: each case is strace text as kp-run --audit writes it (strace -f -ttt -T -yy, paths
as the container sees them), the real changes (the quarantine's typed list, or two snapshots of a
direct run's workspace), and the paths that no event explains.
"""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path
from typing import Final

import orjson
import pytest

from kodepipe.audit import crosscheck
from kodepipe.audit.crosscheck import Entry
from kodepipe.audit.strace import Parser
from kodepipe.container.quarantine import Change
from tests.cli import invoke


def _trace(*calls: str) -> crosscheck.Marks:
    """Marks of strace lines given without their pid and time (added here)."""
    parser = Parser()
    events = []
    for n, call in enumerate(calls):
        events += parser.feed(f"100 {1000 + n}.000001 {call}")
    events += parser.finish()
    return crosscheck.marks(events)


def _unaccounted(changes: list[Change], *calls: str) -> list[str]:
    result = crosscheck.check(crosscheck.from_quarantine(changes), _trace(*calls), against="quarantine")
    assert result.complete
    return [r.path for r in result.unaccounted]


ADD: Final = "added"
CWD = "AT_FDCWD</workspace>"
LONG = "x" * 200 + "/" + "y" * 200  # longer than strace's -s 256, which is for data, not paths

CASES = {
    "a file written through open: explained": (
        [Change("f", ADD, "file")],
        [f'openat({CWD}, "f", O_WRONLY|O_CREAT|O_TRUNC, 0666) = 3</workspace/f> <0.000010>'],
        []),
    "an open whose path was rewritten: the fd the kernel returned names the real file": (
        [Change("hidden", ADD, "file")],
        [f'openat({CWD}, "decoy", O_WRONLY|O_CREAT, 0666) = 3</workspace/hidden> <0.000010>'],
        []),
    "a mkdir whose path was rewritten: the real directory is unaccounted, the decoy is not reported": (
        [Change("race/h1", ADD, "dir"), Change("race", ADD, "dir")],
        ['mkdir("/workspace/race", 0777) = 0 <0.000010>', 'mkdir("/workspace/race/d1", 0777) = 0 <0.000010>'],
        ["race/h1"]),
    "a read-only open does not explain a write": (
        [Change("f", "modified", "file")],
        [f'openat({CWD}, "f", O_RDONLY) = 3</workspace/f> <0.000010>'],
        ["f"]),
    "a call that failed explains nothing": (
        [Change("x", ADD, "dir")],
        ['mkdir("/workspace/x", 0777) = -1 EACCES (Permission denied) <0.000010>'],
        ["x"]),
    "a call cut off by the end of the trace may have happened: it explains": (
        [Change("x", ADD, "dir")],
        ['mkdir("/workspace/x", 0777 <unfinished ...>'],
        []),
    "mkdir -p through fchdir and relative names (coreutils' own calls)": (
        [Change("a", ADD, "dir"), Change("a/b", ADD, "dir"), Change("a/b/c", ADD, "dir")],
        [f'openat({CWD}, "/etc/ld.so.cache", O_RDONLY|O_CLOEXEC) = 3</etc/ld.so.cache> <0.000010>',
         'mkdir("a", 0777) = 0 <0.000010>',
         f'openat({CWD}, "a", O_RDONLY|O_NOFOLLOW|O_DIRECTORY) = 3</workspace/a> <0.000010>',
         "fchdir(3</workspace/a>) = 0 <0.000010>",
         'mkdir("b", 0777) = 0 <0.000010>',
         'openat(AT_FDCWD</workspace/a>, "b", O_RDONLY|O_NOFOLLOW|O_DIRECTORY) = 3</workspace/a/b> <0.000010>',
         "fchdir(3</workspace/a/b>) = 0 <0.000010>",
         'mkdir("c", 0777) = 0 <0.000010>'],
        []),
    "a directory made elsewhere and renamed into place: its entries are explained by their old paths": (
        [Change("out", ADD, "dir"), Change("out/f", ADD, "file"), Change("out/sub", ADD, "dir"),
         Change("out/sub/g", ADD, "file"), Change("out/hidden", ADD, "file")],
        ['mkdir("/workspace/.tmp", 0777) = 0 <0.000010>',
         f'openat({CWD}, ".tmp/f", O_WRONLY|O_CREAT, 0666) = 3</workspace/.tmp/f> <0.000010>',
         'mkdir("/workspace/.tmp/sub", 0777) = 0 <0.000010>',
         f'openat({CWD}, ".tmp/sub/g", O_WRONLY|O_CREAT, 0666) = 3</workspace/.tmp/sub/g> <0.000010>',
         f'renameat2({CWD}, ".tmp", {CWD}, "out", RENAME_NOREPLACE) = 0 <0.000010>'],
        ["out/hidden"]),
    "renames in a chain": (
        [Change("c/f", ADD, "file"), Change("c", ADD, "dir")],
        ['mkdir("/workspace/a", 0777) = 0 <0.000010>',
         f'openat({CWD}, "a/f", O_WRONLY|O_CREAT, 0666) = 3</workspace/a/f> <0.000010>',
         'rename("/workspace/a", "/workspace/b") = 0 <0.000010>',
         'rename("/workspace/b", "/workspace/c") = 0 <0.000010>'],
        []),
    "a file renamed over another: the target is put there, the source removed": (
        [Change("f", "modified", "file"), Change("old", "deleted", "file")],
        ['rename("/workspace/old", "/workspace/f") = 0 <0.000010>'],
        []),
    "RENAME_EXCHANGE: each side is removed and put there": (
        [Change("a", "modified", "file"), Change("b", "modified", "file")],
        [f'renameat2({CWD}, "a", {CWD}, "b", RENAME_EXCHANGE) = 0 <0.000010>'],
        []),
    "a symlink explains its own path, never the path it points to": (
        [Change("l", ADD, "symlink", target="/workspace/t"), Change("t", ADD, "file")],
        [f'symlinkat("/workspace/t", {CWD}, "l") = 0 <0.000010>'],
        ["t"]),
    "a hard link's new name": (
        [Change("n", ADD, "file")],
        [f'linkat({CWD}, "f", {CWD}, "n", 0) = 0 <0.000010>'],
        []),
    "deletions: each unlinked, or below a directory removed or renamed away": (
        [Change("f", "deleted", "file"), Change("d", "deleted", "dir"), Change("d/x/y", "deleted", "file"),
         Change("m/z", "deleted", "file"), Change("q", "deleted", "file")],
        [f'unlinkat({CWD}, "f", 0) = 0 <0.000010>', f'unlinkat({CWD}, "d", AT_REMOVEDIR) = 0 <0.000010>',
         'rename("/workspace/m", "/workspace/n") = 0 <0.000010>'],
        ["q"]),
    "a mode change: explained by chmod; new bytes are not": (
        [Change("m", "modified", "file", mode=0o700, old_mode=0o644), Change("w", "modified", "file")],
        ['chmod("/workspace/m", 0700) = 0 <0.000010>', 'chmod("/workspace/w", 0700) = 0 <0.000010>'],
        ["w"]),
    "fchmod and ftruncate name their file by its fd": (
        [Change("m", "modified", "file", mode=0o700, old_mode=0o644), Change("t", "modified", "file")],
        ["fchmod(3</workspace/m>, 0700) = 0 <0.000010>", "ftruncate(4</workspace/t>, 0) = 0 <0.000010>"],
        []),
    "a type change needs the new entry made": (
        [Change("x", "modified", "dir", old_type="file")],
        ['unlink("/workspace/x") = 0 <0.000010>'],
        ["x"]),
    "control characters in names, as strace escapes them": (
        [Change("a\nb\x1b[31m", ADD, "file"), Change("c\td", ADD, "dir")],
        [f'openat({CWD}, "a\\nb\\33[31m", O_WRONLY|O_CREAT, 0666) = 3</workspace/a\\nb\\33[31m> <0.000010>'],
        ["c\td"]),
    "a name that is not UTF-8": (
        [Change(os.fsdecode(b"\xffx"), ADD, "dir"), Change(os.fsdecode(b"\xfey"), ADD, "dir")],
        ['mkdir("/workspace/\\377x", 0777) = 0 <0.000010>'],
        [os.fsdecode(b"\xfey")]),
    "a long path is written whole and explains; one strace cut short explains nothing": (
        [Change(LONG, ADD, "dir"), Change("z" * 200 + "/" + "z" * 100, ADD, "dir")],
        [f'mkdir("/workspace/{LONG}", 0777) = 0 <0.000010>',
         f'mkdir("/workspace/{"z" * 200}/{"z" * 40}"..., 0777) = 0 <0.000010>'],
        ["z" * 200 + "/" + "z" * 100]),
    "a unix socket bound to a name in the workspace (not an abstract one)": (
        [Change("s.sock", ADD, "socket"), Change("t.sock", ADD, "socket")],
        ['bind(3<UNIX:[1234]>, {sa_family=AF_UNIX, sun_path="/workspace/s.sock"}, 110) = 0 <0.000010>',
         'bind(4<UNIX:[1235]>, {sa_family=AF_UNIX, sun_path=@"/workspace/t.sock"}, 110) = 0 <0.000010>'],
        ["t.sock"]),
    "paths outside the workspace explain nothing in it": (
        [Change("tmp/x", ADD, "file")],
        [f'openat({CWD}, "/tmp/x", O_WRONLY|O_CREAT, 0666) = 3</tmp/x> <0.000010>'],
        ["tmp/x"]),
    "dot-dot and doubled slashes are normalised": (
        [Change("a/f", ADD, "file")],
        ['mkdir("/workspace/b/..//a/./f", 0777) = 0 <0.000010>'],
        []),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matching(name: str) -> None:
    changes, calls, expected = CASES[name]
    assert _unaccounted(changes, *calls) == expected


def test_nothing_traced_leaves_every_change_unaccounted_and_the_workspace_root_is_never_one() -> None:
    changes = [Change("a", ADD, "file"), Change("b", "deleted", "file")]
    assert _unaccounted(changes) == ["a", "b"]
    result = crosscheck.check([crosscheck.Real("", "modified", "dir", crosscheck.ADDED)], _trace(), against="x")
    assert result.unaccounted == []


def test_the_record_lists_a_few_counts_all_and_keeps_exact_bytes() -> None:
    odd = os.fsdecode(b"bad\xffname\n")
    real = [crosscheck.Real(odd, ADD, "file", crosscheck.ADDED)] + \
           [crosscheck.Real(f"f{i:03}", ADD, "file", crosscheck.ADDED) for i in range(30)]
    record = crosscheck.check(real, _trace(), against="workspace").record(listed=5)
    assert record["complete"] is True and record["count"] == 31 and record["changes"] == 31
    assert record["more"] == 26 and len(record["paths"]) == 5  # type: ignore[arg-type]
    first = record["paths"][0]  # type: ignore[index]
    assert first["path"] == "bad\\xffname\n" and base64.b64decode(first["path_b64"]) == b"bad\xffname\n"
    assert first["change"] == ADD and first["type"] == "file"
    assert "path_b64" not in record["paths"][1]  # type: ignore[index]
    orjson.dumps(record)  # JSON-safe whatever the names


def test_an_incomplete_trace_says_so_instead_of_flagging_everything() -> None:
    record = crosscheck.incomplete("quarantine", 12, "the audit cap stopped the trace").record()
    assert record == {"against": "quarantine", "complete": False, "changes": 12,
                      "why": "the audit cap stopped the trace"}


def test_parse_errors_are_counted() -> None:
    m = crosscheck.marks(Parser().unreadable("...", "not UTF-8"))
    assert m.parse_errors == 1
    assert crosscheck.check([], m, against="workspace").record()["parse_errors"] == 1


def test_rename_loops_and_long_chains_end() -> None:
    calls = [f'rename("/workspace/{a}", "/workspace/{b}") = 0 <0.000010>' for a, b in (("a", "b"), ("b", "a"))]
    calls += [f'rename("/workspace/r{i}", "/workspace/r{i + 1}") = 0 <0.000010>' for i in range(100)]
    assert _unaccounted([Change("a/x", ADD, "file"), Change("r100/x", ADD, "file")], *calls) == ["a/x", "r100/x"]


# -- a direct run: two snapshots -------------------------------------------------------------------------


def _e(kind: str = "file", size: int = 1, mtime: int = 1, ino: int = 1, mode: int = 0o644, nlink: int = 1) -> Entry:
    return Entry(kind, size, mtime, ino, mode, nlink)


DIFFS = {
    "added, deleted, untouched": (
        {"keep": _e(ino=1), "gone": _e(ino=2)}, {"keep": _e(ino=1), "new": _e(ino=3)},
        [("gone", "deleted", ({"remove"},)), ("new", "added", ({"create"},))]),
    "a file written (size) and one only touched (mtime)": (
        {"w": _e(ino=1), "t": _e(ino=2)}, {"w": _e(ino=1, size=9), "t": _e(ino=2, mtime=5)},
        [("t", "modified", ({"create", "times"},)), ("w", "modified", ({"create"},))]),
    "a mode change, and a mode change with new bytes": (
        {"m": _e(ino=1), "b": _e(ino=2)}, {"m": _e(ino=1, mode=0o755), "b": _e(ino=2, size=3, mode=0o600)},
        [("b", "modified", ({"create"}, {"mode", "create"})), ("m", "modified", ({"mode", "create"},))]),
    "replaced (a new inode) or a new type": (
        {"r": _e(ino=1), "t": _e(ino=2)}, {"r": _e(ino=7), "t": _e("dir", ino=2)},
        [("r", "modified", ({"create"},)), ("t", "modified", ({"create"},))]),
    "a directory's own size and mtime are not changes": (
        {"d": _e("dir", ino=1)}, {"d": _e("dir", size=4096, mtime=9, ino=1)}, []),
}


@pytest.mark.parametrize("name", list(DIFFS))
def test_diff(name: str) -> None:
    before, after, expected = DIFFS[name]
    got = [(r.path, r.change, tuple(set(n) for n in r.needs)) for r in crosscheck.diff(before, after)]
    assert got == expected


def test_a_direct_run_renaming_a_directory_that_was_there_carries_its_entries() -> None:
    before = {"a": _e("dir", ino=1), "a/x": _e(ino=2), "a/y": _e(ino=3)}
    after = {"b": _e("dir", ino=1), "b/x": _e(ino=2), "b/y": _e(ino=3, size=99)}  # y written after the move
    real = crosscheck.diff(before, after)
    m = _trace('rename("/workspace/a", "/workspace/b") = 0 <0.000010>')
    result = crosscheck.check(real, m, against="workspace", same=crosscheck.unmoved(before, after))
    assert [r.path for r in result.unaccounted] == ["b/y"]


def test_a_direct_run_hard_link_is_explained_by_any_of_its_names() -> None:
    before = {"a": _e(ino=5, nlink=2), "b": _e(ino=5, nlink=2), "c": _e(ino=6)}
    after = {"a": _e(ino=5, size=9, nlink=2), "b": _e(ino=5, size=9, nlink=2), "c": _e(ino=6, size=9)}
    m = _trace(f'openat({CWD}, "a", O_WRONLY|O_TRUNC) = 3</workspace/a> <0.000010>')
    result = crosscheck.check(crosscheck.diff(before, after), m, against="workspace")
    assert [r.path for r in result.unaccounted] == ["c"]


def test_snapshot_walks_without_following_links_and_says_when_past_its_cap(tmp_path: Path) -> None:
    tmp_path = tmp_path / "ws"  # tmp_path itself holds the test's home
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "e" / "f").write_text("x")
    (tmp_path / "l").symlink_to("/etc")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        snap = crosscheck.snapshot(fd)
        assert snap.complete and set(snap.entries) == {"d", "d/e", "d/e/f", "l"}
        assert snap.entries["l"].type == "symlink" and snap.entries["d/e/f"].size == 1
        capped = crosscheck.snapshot(fd, cap=2)
        assert not capped.complete and capped.entries == {} and "more than 2 entries" in str(capped.why)
    finally:
        os.close(fd)


def test_a_snapshot_of_a_deep_tree(tmp_path: Path) -> None:
    tmp_path = tmp_path / "ws"
    tmp_path.mkdir()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    here = os.dup(fd)
    try:
        for _ in range(600):  # deeper than a path may be long
            os.mkdir("d" * 10, dir_fd=here)
            nxt = os.open("d" * 10, os.O_RDONLY | os.O_DIRECTORY, dir_fd=here)
            os.close(here)
            here = nxt
        snap = crosscheck.snapshot(fd)
        assert snap.complete and len(snap.entries) == 600
    finally:
        os.close(here)
        os.close(fd)


def test_read_log_parses_an_audit_log(tmp_path: Path) -> None:
    log = tmp_path / "audit.strace"
    log.write_bytes(b'100 1.000001 mkdir("/workspace/a", 0777) = 0 <0.000010>\n'
                    b'100 1.000002 mkdir("/workspace/\xff", 0777) = 0 <0.000010>\n')
    m = crosscheck.read_log(log)
    assert m.roles == {"a": {"create"}} and m.parse_errors == 1


# -- kp-trace shows them -------------------------------------------------------------------------------


def test_kp_trace_shows_unaccounted_changes_as_events_of_their_own(tmp_path: Path) -> None:
    log = tmp_path / "audit.strace"
    log.write_text('100 1.000001 execve("/bin/sh", ["sh"], 0x0 /* 0 vars */) = 0 <0.000010>\n')
    hidden = {"kind": "container", "name": "c1", "audit_log": str(log),
              "audit_unaccounted": {"against": "quarantine", "complete": True, "changes": 3, "count": 2,
                                    "paths": [{"path": "h\\xff", "path_b64": base64.b64encode(b"h\xff").decode(),
                                               "change": "added", "type": "dir"}], "more": 1}}
    capped = {"kind": "container", "name": "c2", "audit_log": str(log),
              "audit_unaccounted": {"against": "workspace", "complete": False, "changes": 3, "why": "capped"}}
    result = invoke("kp-trace", input=b"\n".join(orjson.dumps(r) for r in (hidden, capped)) + b"\n")
    assert result.status == 0, result.stderr
    found = [r for r in result.records if r.get("type") == "unaccounted"]
    assert [(e["container"], e["path"], e.get("path_b64"), e.get("more"), e["complete"]) for e in found] == [
        ("c1", "h\\xff", base64.b64encode(b"h\xff").decode(), None, True),
        ("c1", None, None, 1, True), ("c2", None, None, None, False)]
    assert found[0]["change"] == "added" and found[0]["entry"] == "dir" and found[2]["why"] == "capped"
    # the events follow the audit's own, before the next record
    kinds = [(r.get("name"), r.get("type")) for r in result.records]
    assert kinds.index(("c1", None)) < kinds.index((None, "exec")) < kinds.index((None, "unaccounted"))
    summary = invoke("kp-trace", "--summary", input=orjson.dumps(hidden) + b"\n")
    assert summary.records[-1]["by_type"]["unaccounted"] == 2


def test_kp_trace_refuses_a_malformed_audit_unaccounted(tmp_path: Path) -> None:
    log = tmp_path / "audit.strace"
    log.write_text("")
    bad = {"kind": "container", "name": "c1", "audit_log": str(log), "audit_unaccounted": {"paths": [3]}}
    result = invoke("kp-trace", input=orjson.dumps(bad) + b"\n")
    assert result.status == 65 and "audit_unaccounted" in result.stderr
    assert not [r for r in result.records if r.get("type") == "unaccounted"]


# -- cost -------------------------------------------------------------------------------------------------


def test_snapshot_and_diff_of_20k_files_is_cheap(tmp_path: Path) -> None:
    """Not a timing assertion (no test depends on a duration): the cost is printed for the record
    (pytest -s), and the results are checked."""
    tmp_path = tmp_path / "ws"
    tmp_path.mkdir()
    for d in range(100):
        sub = tmp_path / f"d{d:03}"
        sub.mkdir()
        for f in range(200):
            (sub / f"f{f:03}").write_bytes(b"")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        start = time.perf_counter()
        before = crosscheck.snapshot(fd)
        middle = time.perf_counter()
        (tmp_path / "d000" / "f000").write_bytes(b"x")
        after = crosscheck.snapshot(fd)
        real = crosscheck.diff(before.entries, after.entries)
        end = time.perf_counter()
    finally:
        os.close(fd)
    print(f"snapshot of {len(before.entries)} entries: {middle - start:.3f} s; "
          f"snapshot + diff: {end - middle:.3f} s")
    assert len(before.entries) == 20_100 and [r.path for r in real] == ["d000/f000"]
