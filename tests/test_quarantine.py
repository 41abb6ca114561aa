"""Quarantined workspaces: reading an overlay upper dir, fingerprints, and applying it safely.

Most tests build upper and lower trees by hand (whiteouts are character
devices 0/0 and opaque dirs carry trusted.overlay.opaque, which needs root);
the last ones mount a real overlayfs and check that apply() reproduces what
the merged view showed.
"""

from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
import pytest

from kodepipe.container import quarantine as q
from kodepipe.container.quarantine import Change, Conflict, UnsafePath, UnsupportedOverlay
from kodepipe.core.errors import BadInput, Exists, KpError
from kodepipe.core.state import remove_tree

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts, trusted xattrs and mounts need root")

Tree = dict[str, tuple[object, ...]]


# --- helpers ------------------------------------------------------------------------------


def put(root: Path, rel: str, content: bytes | str = b"", mode: int = 0o644) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    os.chmod(path, mode)
    return path


def mkdir(root: Path, rel: str, mode: int = 0o755) -> Path:
    path = root / rel
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    return path


def link(root: Path, rel: str, target: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)
    return path


def whiteout(root: Path, rel: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def opaque(root: Path, rel: str, mode: int = 0o755) -> Path:
    path = mkdir(root, rel, mode)
    os.setxattr(path, "trusted.overlay.opaque", b"y")
    return path


def tree(root: Path) -> Tree:
    """Every entry under root with its type, permission bits and content (or symlink target)."""
    out: Tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", stat.S_IMODE(st.st_mode), path.read_bytes())
            else:
                out[rel] = ("other", st.st_mode)
    return out


def kinds(changes: list[Change]) -> dict[str, tuple[str, str]]:
    return {c.path: (c.kind, c.type) for c in changes}


@pytest.fixture(autouse=True)
def no_deep_tree_left(tmp_path: Path) -> Iterator[None]:
    """Remove what a test made: pytest's own clean-up (shutil.rmtree, recursive) fails on a deep tree."""
    yield
    for entry in os.listdir(tmp_path):
        remove_tree(tmp_path / entry)


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    upper, lower = tmp_path / "upper", tmp_path / "lower"
    upper.mkdir()
    lower.mkdir()
    return upper, lower


def apply_all(upper: Path, lower: Path, **kwargs: object) -> q.Applied:
    found = q.changes(upper, lower)
    prints = orjson.loads(orjson.dumps(q.fingerprint(lower, found)))  # as it comes back from a record
    return q.apply(upper, lower, found, fingerprints=prints, **kwargs)  # type: ignore[arg-type]


# --- prepare, summary, Change -----------------------------------------------------------------


def test_prepare_makes_upper_and_work_with_their_modes(tmp_path: Path) -> None:
    folder = tmp_path / "ctr" / "quarantine"
    upper, work = q.prepare(folder)
    assert (upper, work) == (folder / "upper", folder / "work")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(upper.stat().st_mode) == 0o755
    assert stat.S_IMODE(work.stat().st_mode) == 0o700
    assert q.prepare(folder) == (upper, work)  # again, while upper is empty


def test_prepare_refuses_when_upper_holds_unapplied_changes(tmp_path: Path) -> None:
    upper, _ = q.prepare(tmp_path / "f")
    put(upper, "left-over", "x")
    with pytest.raises(Exists) as info:
        q.prepare(tmp_path / "f")
    assert "apply or discard" in info.value.message
    assert (upper / "left-over").read_text() == "x"


def test_summary_lists_each_change_and_the_paths_by_kind() -> None:
    changes = [Change("b", "added", "file", 0o644), Change("a", "deleted", "dir"),
               Change("a/x", "deleted", "file"), Change("c", "modified", "symlink", target="d", old_target="e")]
    assert q.summary(changes) == {
        "added": ["b"], "modified": ["c"], "deleted": ["a", "a/x"],
        "changes": [{"path": "a", "change": "deleted", "type": "dir"},
                    {"path": "a/x", "change": "deleted", "type": "file"},
                    {"path": "b", "change": "added", "type": "file", "mode": "0644"},
                    {"path": "c", "change": "modified", "type": "symlink", "target": "d", "old_target": "e"}]}
    assert q.summary([]) == {"added": [], "modified": [], "deleted": [], "changes": []}


NOT_UTF8 = os.fsdecode(b"caf\xe9-\xff\xfe")  # bytes that are not UTF-8, as os.fsdecode gives them


@pytest.mark.parametrize("change", [
    Change("src/a.py", "modified", "file", 0o755, 0o644),
    Change("d", "modified", "dir", 0o700, old_type="file"),
    Change("new\nline/\x1b[31mred\x1b[0m", "added", "file", 0o4755),
    Change(f"{NOT_UTF8}/x", "added", "symlink", target=f"../{NOT_UTF8}"),
    Change("gone", "deleted", "fifo"),
])
def test_change_round_trips_through_a_record(change: Change) -> None:
    data = orjson.loads(orjson.dumps(change.as_dict()))  # JSON-safe whatever the bytes
    back = Change.from_dict(data)
    assert back == change
    assert (back.mode, back.old_mode, back.old_type, back.target, back.old_target) == \
        (change.mode, change.old_mode, change.old_type, change.target, change.old_target)
    assert data["change"] == change.kind and data["type"] == change.type


def test_a_record_carries_names_that_are_not_utf8_exactly_and_a_display_form() -> None:
    data = Change(f"d/{NOT_UTF8}", "added", "symlink", target=f"/{NOT_UTF8}").as_dict()
    assert data["path"] == "d/caf\\xe9-\\xff\\xfe" and data["target"] == "/caf\\xe9-\\xff\\xfe"
    assert base64.b64decode(data["path_b64"]) == b"d/caf\xe9-\xff\xfe"  # type: ignore[arg-type]
    assert base64.b64decode(data["target_b64"]) == b"/caf\xe9-\xff\xfe"  # type: ignore[arg-type]
    assert data["escapes"] is True
    # readers take the exact bytes over the display form
    assert Change.from_dict({**data, "path": "something else"}).path == f"d/{NOT_UTF8}"
    plain = Change("a\nb", "added", "file").as_dict()
    assert plain["path"] == "a\nb" and "path_b64" not in plain  # UTF-8: the name itself (JSON escapes it)


def test_an_older_record_of_a_change_is_still_read() -> None:
    assert Change.from_dict({"path": "a", "kind": "added", "type": "other"}) == Change("a", "added", "other")


@pytest.mark.parametrize("bad", [
    {"path": "a", "change": "renamed", "type": "file"}, {"path": 3, "change": "added", "type": "file"},
    {"path": "a", "change": "added", "type": "pipe"}, {"path_b64": "not base64!", "change": "added", "type": "file"},
    {"path": "a", "change": "added", "type": "file", "mode": "9"},
    {"path": "a", "change": "added", "type": "file", "mode": 0o10000},
    {"path": "a", "change": "added", "type": "symlink", "target": 5}])
def test_a_malformed_change_is_bad_input(bad: dict[str, object]) -> None:
    with pytest.raises(BadInput):
        Change.from_dict(bad)


def test_a_change_that_could_escape_the_workspace_is_refused() -> None:
    for path in ("../etc/passwd", "/etc/passwd", "a//b", "a/./b", "a/..", "", "a/"):
        with pytest.raises(UnsafePath):
            Change.from_dict({"path": path, "change": "added", "type": "file"})
    with pytest.raises(UnsafePath):
        Change.from_dict({"path_b64": base64.b64encode(b"../x").decode(), "change": "added", "type": "file"})


# --- changes() ------------------------------------------------------------------------------


def test_plain_files_added_modified_and_not_changed(dirs: tuple[Path, Path]) -> None:
    upper, lower = dirs
    put(lower, "same", "same\n")
    put(lower, "edited", "old\n")
    put(lower, "longer", "abc")
    put(lower, "chmodded", "x", 0o644)
    put(lower, "src/kept", "kept")
    put(upper, "same", "same\n")  # rewritten identically: a copy-up, not a change
    put(upper, "edited", "new\n")  # same size, other bytes
    put(upper, "longer", "abcd")
    put(upper, "chmodded", "x", 0o755)
    put(upper, "src/new.py", "print()")
    put(upper, "fresh", "")
    assert kinds(q.changes(upper, lower)) == {
        "chmodded": ("modified", "file"), "edited": ("modified", "file"), "fresh": ("added", "file"),
        "longer": ("modified", "file"), "src/new.py": ("added", "file")}


def test_changes_are_sorted_by_path(dirs: tuple[Path, Path]) -> None:
    upper, _ = dirs
    for name in ("z", "a/b", "m", "a/a"):
        put(upper, name, "x")
    assert [c.path for c in q.changes(upper, dirs[1])] == ["a", "a/a", "a/b", "m", "z"]


def test_touched_file_is_not_a_change_but_a_large_rewrite_is(dirs: tuple[Path, Path]) -> None:
    upper, lower = dirs
    big = os.urandom(3 * q.CHUNK + 5)
    put(lower, "big", big)
    put(upper, "big", big)
    os.utime(upper / "big", ns=(1, 1))
    assert q.changes(upper, lower) == []
    put(upper, "big", big[:-1] + bytes([big[-1] ^ 1]))
    assert kinds(q.changes(upper, lower)) == {"big": ("modified", "file")}


@needs_root
def test_whiteouts_delete_files_and_whole_directories(dirs: tuple[Path, Path]) -> None:
    upper, lower = dirs
    put(lower, "gone.txt", "x")
    put(lower, "lib/a.py", "a")
    put(lower, "lib/sub/b.py", "b")
    link(lower, "lib/sub/l", "../a.py")
    whiteout(upper, "gone.txt")
    whiteout(upper, "lib")
    whiteout(upper, "tmpfile")  # made and removed by the agent: the lower never had it
    mkdir(upper, "new")
    whiteout(upper, "new/scratch")
    assert kinds(q.changes(upper, lower)) == {
        "gone.txt": ("deleted", "file"), "lib": ("deleted", "dir"), "lib/a.py": ("deleted", "file"),
        "lib/sub": ("deleted", "dir"), "lib/sub/b.py": ("deleted", "file"), "lib/sub/l": ("deleted", "symlink"),
        "new": ("added", "dir")}


def test_copied_up_directory_is_reported_only_when_its_mode_changed(dirs: tuple[Path, Path]) -> None:
    upper, lower = dirs
    put(lower, "a/b/c", "c")
    put(lower, "x/y", "y")
    mkdir(upper, "a/b")
    put(upper, "a/b/d", "d")
    mkdir(upper, "x", 0o700)
    assert kinds(q.changes(upper, lower)) == {"a/b/d": ("added", "file"), "x": ("modified", "dir")}


def test_new_directory_is_added_with_all_its_contents(dirs: tuple[Path, Path]) -> None:
    upper, lower = dirs
    put(upper, "pkg/mod/__init__.py", "")
    link(upper, "pkg/alias", "mod")
    mkdir(upper, "pkg/empty")
    assert kinds(q.changes(upper, lower)) == {
        "pkg": ("added", "dir"), "pkg/alias": ("added", "symlink"), "pkg/empty": ("added", "dir"),
        "pkg/mod": ("added", "dir"), "pkg/mod/__init__.py": ("added", "file")}


@needs_root
def test_opaque_directory_hides_the_lower_contents(dirs: tuple[Path, Path]) -> None:
    upper, lower = dirs
    put(lower, "d/same", "same")
    put(lower, "d/differs", "old")
    put(lower, "d/sub/c", "c")
    put(lower, "d/sub/d", "d")
    put(lower, "keep", "k")
    opaque(upper, "d")
    put(upper, "d/same", "same")  # re-created identically under the opaque dir: no change
    put(upper, "d/differs", "new")
    put(upper, "d/new", "n")
    mkdir(upper, "d/sub")  # under an opaque parent, the lower d/sub is hidden too
    put(upper, "d/sub/d", "d")
    assert kinds(q.changes(upper, lower)) == {
        "d/differs": ("modified", "file"), "d/new": ("added", "file"), "d/sub/c": ("deleted", "file")}
    expected = {**tree(lower)}
    del expected["d/sub/c"]
    expected["d/differs"] = ("file", 0o644, b"new")
    expected["d/new"] = ("file", 0o644, b"n")
    apply_all(upper, lower)
    assert tree(lower) == expected


@needs_root
def test_file_replaced_by_directory_and_directory_by_file(dirs: tuple[Path, Path]) -> None:
    upper, lower = dirs
    put(lower, "was-file", "f")
    put(lower, "was-dir/a", "a")
    put(lower, "was-dir/deep/b", "b")
    link(lower, "was-link", "was-file")
    opaque(upper, "was-file", 0o750)
    put(upper, "was-file/inner", "i")
    put(upper, "was-dir", "now a file")
    mkdir(upper, "was-link")
    put(upper, "was-link/x", "x")
    found = q.changes(upper, lower)
    assert kinds(found) == {
        "was-dir": ("modified", "file"), "was-dir/a": ("deleted", "file"), "was-dir/deep": ("deleted", "dir"),
        "was-dir/deep/b": ("deleted", "file"), "was-file": ("modified", "dir"),
        "was-file/inner": ("added", "file"), "was-link": ("modified", "dir"), "was-link/x": ("added", "file")}
    applied, warnings = apply_all(upper, lower)
    assert sorted(applied, key=lambda c: c.path) == found
    assert warnings == []
    assert tree(lower) == {
        "was-dir": ("file", 0o644, b"now a file"), "was-file": ("dir", 0o750),
        "was-file/inner": ("file", 0o644, b"i"), "was-link": ("dir", 0o755), "was-link/x": ("file", 0o644, b"x")}


def test_symlinks_compare_by_target_and_are_never_followed(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    upper, lower = dirs
    outside = put(tmp_path, "outside/secret", "secret")
    link(lower, "same", "target")
    link(lower, "retargeted", "a")
    link(lower, "to-outside", str(outside))
    link(upper, "same", "target")
    link(upper, "retargeted", "b")
    link(upper, "new", "/etc/passwd")
    put(upper, "to-outside", "replaced")  # the agent removed the link and wrote a file there
    assert kinds(q.changes(upper, lower)) == {
        "new": ("added", "symlink"), "retargeted": ("modified", "symlink"), "to-outside": ("modified", "file")}
    apply_all(upper, lower)
    assert outside.read_text() == "secret"
    assert os.readlink(lower / "new") == "/etc/passwd"
    assert os.readlink(lower / "retargeted") == "b"
    assert tree(lower)["to-outside"] == ("file", 0o644, b"replaced")


@needs_root
@pytest.mark.parametrize("xattr", ["trusted.overlay.redirect", "trusted.overlay.metacopy",
                                   "trusted.overlay.whiteout"])
def test_redirect_and_metacopy_are_refused(dirs: tuple[Path, Path], xattr: str) -> None:
    upper, lower = dirs
    put(lower, "d/f", "data")
    put(upper, "d/f", b"\0\0\0\0")
    os.setxattr(upper / "d/f", xattr, b"")
    with pytest.raises(UnsupportedOverlay, match=xattr.rsplit(".", 1)[1]) as info:
        q.changes(upper, lower)
    assert "d/f" in info.value.message and "left as it is" in info.value.message


@needs_root
def test_user_overlay_xattrs_the_agent_can_set_are_ignored(dirs: tuple[Path, Path]) -> None:
    """The kernel reads only trusted.* on kodepipe's (root) mount; an agent-made user.overlay.opaque
    must not turn unchanged lower files into deletions."""
    upper, lower = dirs
    put(lower, "d/old", "o")
    mkdir(upper, "d")
    os.setxattr(upper / "d", "user.overlay.opaque", b"y")
    os.setxattr(upper / "d", "user.overlay.redirect", b"/elsewhere")
    assert kinds(q.changes(upper, lower)) == {}


def test_missing_dirs_are_reported(tmp_path: Path) -> None:
    with pytest.raises(KpError, match="upper dir"):
        q.changes(tmp_path / "nope", tmp_path)


# --- fingerprint() --------------------------------------------------------------------------


def test_fingerprint_records_the_lower_state_of_each_changed_path(dirs: tuple[Path, Path]) -> None:
    _, lower = dirs
    put(lower, "f", "hello", 0o640)
    link(lower, "l", "f")
    mkdir(lower, "d", 0o700)
    changes = [Change("f", "modified", "file"), Change("l", "modified", "symlink"),
               Change("d", "modified", "dir"), Change("new", "added", "file"), Change("f/x", "added", "file")]
    prints = q.fingerprint(lower, changes)
    assert orjson.loads(orjson.dumps(prints)) == prints
    f = prints["f"]
    assert isinstance(f, dict)
    assert f == {"type": "file", "size": 5, "mtime_ns": (lower / "f").stat().st_mtime_ns, "mode": 0o640,
                 "sha256": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}
    assert prints["l"] == {"type": "symlink", "size": 1, "mtime_ns": (lower / "l").lstat().st_mtime_ns,
                           "mode": 0o777, "target": "f"}
    d = prints["d"]
    assert isinstance(d, dict) and d["type"] == "dir" and d["mode"] == 0o700
    assert prints["new"] is None and prints["f/x"] is None


# --- apply() --------------------------------------------------------------------------------


def test_apply_makes_lower_equal_to_the_merged_view(dirs: tuple[Path, Path]) -> None:
    upper, lower = dirs
    put(lower, "a.py", "old")
    put(lower, "b.py", "b")
    put(upper, "a.py", "new", 0o600)
    put(upper, "pkg/c.py", "c", 0o755)
    mkdir(upper, "pkg", 0o750)
    applied, warnings = apply_all(upper, lower)
    assert {c.path for c in applied} == {"a.py", "pkg", "pkg/c.py"}
    assert warnings == []
    assert tree(lower) == {"a.py": ("file", 0o600, b"new"), "b.py": ("file", 0o644, b"b"),
                           "pkg": ("dir", 0o750), "pkg/c.py": ("file", 0o755, b"c")}
    assert not [p for p in lower.rglob("*") if ".kp-tmp-" in p.name]
    assert q.changes(upper, lower) == []  # applied: nothing left to do


@needs_root
def test_apply_deletes_deepest_first_and_sets_readonly_dir_modes_last(dirs: tuple[Path, Path]) -> None:
    upper, lower = dirs
    put(lower, "old/x/y/z", "z")
    put(lower, "old/w", "w")
    whiteout(upper, "old")
    put(upper, "ro/inside", "i")
    mkdir(upper, "ro", 0o555)  # read-only: its contents must be written before its mode
    apply_all(upper, lower)
    assert tree(lower) == {"ro": ("dir", 0o555), "ro/inside": ("file", 0o644, b"i")}


def test_setuid_and_setgid_bits_are_stripped_and_reported(dirs: tuple[Path, Path]) -> None:
    upper, lower = dirs
    put(upper, "suid", "#!/bin/sh", 0o4755)
    put(upper, "sgid", "#!/bin/sh", 0o2750)
    mkdir(upper, "shared", 0o2775)
    put(upper, "plain", "x", 0o755)
    _, warnings = apply_all(upper, lower)
    assert tree(lower) == {"suid": ("file", 0o755, b"#!/bin/sh"), "sgid": ("file", 0o750, b"#!/bin/sh"),
                           "shared": ("dir", 0o775), "plain": ("file", 0o755, b"x")}
    assert sorted(w.split(":")[0] for w in warnings) == ["sgid", "shared", "suid"]
    assert any("4755" in w and "0755" in w for w in warnings)


def test_fifo_is_reported_but_not_applied(dirs: tuple[Path, Path]) -> None:
    upper, lower = dirs
    os.mkfifo(upper / "pipe")
    put(upper, "f", "f")
    found = q.changes(upper, lower)
    assert kinds(found) == {"f": ("added", "file"), "pipe": ("added", "fifo")}
    assert q.findings(found) == ["pipe: a fifo, which apply leaves out"]
    applied, warnings = apply_all(upper, lower)
    assert [c.path for c in applied] == ["f"]
    assert len(warnings) == 1 and warnings[0].startswith("pipe: not applied")
    assert not (lower / "pipe").exists()


@needs_root
def test_conflict_after_a_host_edit_then_force(dirs: tuple[Path, Path]) -> None:
    upper, lower = dirs
    put(lower, "edited-by-both", "base")
    put(lower, "deleted-by-agent", "base")
    put(lower, "untouched-by-host", "base")
    put(upper, "edited-by-both", "agent")
    whiteout(upper, "deleted-by-agent")
    put(upper, "untouched-by-host", "agent")
    put(upper, "added-by-both", "agent")
    found = q.changes(upper, lower)
    prints = q.fingerprint(lower, found)
    # the user keeps working on the host before reviewing
    put(lower, "edited-by-both", "host")
    put(lower, "deleted-by-agent", "host edit")
    put(lower, "added-by-both", "host")
    before = tree(lower)
    with pytest.raises(Conflict) as info:
        q.apply(upper, lower, found, fingerprints=prints)
    message = info.value.message
    assert "3 path(s)" in message
    for path in ("added-by-both", "deleted-by-agent", "edited-by-both"):
        assert path in message
    assert "untouched-by-host" not in message and "force" in message
    assert tree(lower) == before  # nothing was changed
    q.apply(upper, lower, found, fingerprints=prints, force=True)
    assert tree(lower) == {"added-by-both": ("file", 0o644, b"agent"), "edited-by-both": ("file", 0o644, b"agent"),
                           "untouched-by-host": ("file", 0o644, b"agent")}


def test_conflict_names_at_most_ten_paths(dirs: tuple[Path, Path]) -> None:
    upper, lower = dirs
    for i in range(12):
        put(upper, f"f{i:02}", "agent")
    found = q.changes(upper, lower)
    prints = q.fingerprint(lower, found)
    for i in range(12):
        put(lower, f"f{i:02}", "host")
    with pytest.raises(Conflict, match=r"12 path\(s\).*f09 and 2 more") as info:
        q.apply(upper, lower, found, fingerprints=prints)
    assert "f10" not in info.value.message


@needs_root
def test_conflict_when_the_host_adds_a_file_to_a_deleted_directory(dirs: tuple[Path, Path]) -> None:
    upper, lower = dirs
    put(lower, "build/out.o", "o")
    whiteout(upper, "build")
    found = q.changes(upper, lower)
    prints = q.fingerprint(lower, found)
    put(lower, "build/precious.c", "host work")
    with pytest.raises(Conflict, match=r"2 path\(s\).*: build, build/precious.c \(new on the host"):
        q.apply(upper, lower, found, fingerprints=prints)
    assert (lower / "build/precious.c").exists()
    q.apply(upper, lower, found, fingerprints=prints, force=True)
    assert not (lower / "build").exists()


def test_conflict_when_a_fingerprint_is_missing_or_a_parent_vanished(dirs: tuple[Path, Path]) -> None:
    upper, lower = dirs
    put(lower, "src/a", "a")
    put(upper, "src/a", "changed")
    put(upper, "src/b", "new")
    found = q.changes(upper, lower)
    with pytest.raises(Conflict, match=r"1 path\(s\).*src/a \(no fingerprint"):
        q.apply(upper, lower, found, fingerprints={"src/b": None})
    prints = q.fingerprint(lower, found)
    (lower / "src/a").unlink()
    (lower / "src").rmdir()  # the copied-up parent is gone from the host
    with pytest.raises(Conflict, match=r"2 path\(s\).*src/a \(its parent src is missing.*src/b \(its parent src"):
        q.apply(upper, lower, found, fingerprints=prints)
    q.apply(upper, lower, found, fingerprints=prints, force=True)  # forced: the parent is made again
    assert tree(lower) == {"src": ("dir", 0o755), "src/a": ("file", 0o644, b"changed"),
                           "src/b": ("file", 0o644, b"new")}


def test_apply_never_writes_through_a_symlink_in_the_lower_tree(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    upper, lower = dirs
    outside = mkdir(tmp_path, "outside")
    put(lower, "src/a.py", "a")
    put(upper, "src/a.py", "agent")
    put(upper, "src/new.py", "agent")
    found = q.changes(upper, lower)
    prints = q.fingerprint(lower, found)
    # the host replaces the directory with a symlink pointing out of the workspace
    os.rename(lower / "src", tmp_path / "src.moved")
    link(lower, "src", str(outside))
    for force in (False, True):
        with pytest.raises(UnsafePath, match="src is a symlink"):
            q.apply(upper, lower, found, fingerprints=prints, force=force)
    assert list(outside.iterdir()) == []


def test_apply_refuses_paths_that_escape_or_pass_through_a_symlink(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    upper, lower = dirs
    outside = mkdir(tmp_path, "outside")
    link(lower, "escape", str(outside))
    put(upper, "escape/pwned", "x")  # a hand-made upper: the kernel would never put this here
    bad = [Change("escape/pwned", "added", "file")]
    with pytest.raises(UnsafePath):
        q.apply(upper, lower, bad, fingerprints={"escape/pwned": None}, force=True)
    for path in ("../outside/pwned", "/etc/passwd", "a//b", "./a", "", "a/.."):
        with pytest.raises(UnsafePath):
            q.apply(upper, lower, [Change(path, "added", "file")], fingerprints={path: None}, force=True)
    assert list(outside.iterdir()) == []
    # changes() sees that upper has a directory where lower has a symlink, and apply replaces the link
    assert kinds(q.changes(upper, lower)) == {"escape": ("modified", "dir"), "escape/pwned": ("added", "file")}
    apply_all(upper, lower)
    assert list(outside.iterdir()) == []
    assert tree(lower) == {"escape": ("dir", 0o755), "escape/pwned": ("file", 0o644, b"x")}


def test_apply_refuses_an_inconsistent_list(dirs: tuple[Path, Path]) -> None:
    upper, lower = dirs
    put(upper, "d/f", "x")
    changes = [Change("d", "deleted", "dir"), Change("d/f", "added", "file")]
    with pytest.raises(BadInput, match="inconsistent"):
        q.apply(upper, lower, changes, fingerprints={}, force=True)
    put(upper, "d/e/f", "x")
    changes = [Change("d", "added", "dir"), Change("d/e/f", "added", "file")]
    with pytest.raises(BadInput, match="parent d/e is not in the list"):  # d is new, so d/e must be listed
        q.apply(upper, lower, changes, fingerprints={"d": None, "d/e/f": None})
    with pytest.raises(Conflict, match="parent d is missing"):
        q.apply(upper, lower, [Change("d/f", "added", "file")], fingerprints={"d/f": None})
    assert tree(lower) == {}


def test_apply_refuses_when_the_upper_no_longer_matches(dirs: tuple[Path, Path]) -> None:
    upper, lower = dirs
    put(upper, "f", "x")
    found = q.changes(upper, lower)
    (upper / "f").unlink()
    mkdir(upper, "f")
    with pytest.raises(KpError, match="no longer matches"):
        q.apply(upper, lower, found, fingerprints=q.fingerprint(lower, found))


def test_a_subset_of_changes_can_be_applied(dirs: tuple[Path, Path]) -> None:
    upper, lower = dirs
    put(upper, "keep", "k")
    put(upper, "skip", "s")
    found = [c for c in q.changes(upper, lower) if c.path == "keep"]
    q.apply(upper, lower, found, fingerprints=q.fingerprint(lower, found))
    assert tree(lower) == {"keep": ("file", 0o644, b"k")}


@needs_root
def test_apply_again_with_force_is_idempotent(dirs: tuple[Path, Path]) -> None:
    upper, lower = dirs
    put(lower, "gone/x", "x")
    put(lower, "f", "f")
    whiteout(upper, "gone")
    put(upper, "f", "g")
    put(upper, "n/m", "m")
    found = q.changes(upper, lower)
    prints = q.fingerprint(lower, found)
    q.apply(upper, lower, found, fingerprints=prints)
    once = tree(lower)
    applied, _ = q.apply(upper, lower, found, fingerprints=prints, force=True)
    assert tree(lower) == once
    assert sorted(applied, key=lambda c: c.path) == found


@needs_root
def test_what_apply_creates_is_chowned_to_the_owner(dirs: tuple[Path, Path]) -> None:
    upper, lower = dirs
    put(lower, "existing", "e")
    mkdir(lower, "olddir")
    put(upper, "existing", "changed")
    put(upper, "newdir/file", "f")
    link(upper, "newdir/link", "file")
    mkdir(upper, "olddir", 0o700)
    apply_all(upper, lower, owner=(4321, 8765))
    for rel in ("existing", "newdir", "newdir/file", "newdir/link"):
        st = (lower / rel).lstat()
        assert (rel, st.st_uid, st.st_gid) == (rel, 4321, 8765)
    st = (lower / "olddir").lstat()  # only its mode was changed: it keeps its owner
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)


# --- interrupted applies: temporary names, resuming ------------------------------------------


class Stop(BaseException):
    """Stands for a kill at one step of apply() (a BaseException, like SIGTERM's)."""


def every_change(upper: Path, lower: Path) -> None:
    put(lower, "main.py", "old")
    put(lower, "old.txt", "old")
    put(lower, "gone/a", "a")
    put(lower, "gone/b", "b")
    put(lower, "replaced/r", "r")
    put(lower, "becomes-dir", "f")
    link(lower, "link", "main.py")
    put(upper, "main.py", "new")
    put(upper, "new.txt", "new")
    whiteout(upper, "old.txt")
    whiteout(upper, "gone")
    put(upper, "replaced", "now a file")
    put(upper, "becomes-dir/inside", "i")
    put(upper, "dir/d", "d", 0o600)
    mkdir(upper, "dir", 0o711)  # a mode of its own, which apply() sets last
    link(upper, "link", "new.txt")


def steps_of(upper: Path, lower: Path) -> list[tuple[str, str]]:
    """Every on_step event of an uninterrupted apply, on a copy of lower (left at tmp_path/copy)."""
    events: list[tuple[str, str]] = []
    copy = lower.parent / "copy"
    shutil.copytree(lower, copy, symlinks=True)
    found = q.changes(upper, copy)
    q.apply(upper, copy, found, fingerprints=q.fingerprint(copy, found),
            on_step=lambda event, path: events.append((event, path)))
    return events


@needs_root
def test_apply_resumes_after_an_interruption_at_every_step(tmp_path: Path) -> None:
    base_upper, base_lower = tmp_path / "u", tmp_path / "l"
    every_change(base_upper, base_lower)
    events = steps_of(base_upper, base_lower)
    assert events[0] == ("checked", "") and {e for e, _ in events} == {"checked", "removed", "tmp", "wrote"}
    want = tree(tmp_path / "copy")
    for stop_at in range(len(events)):
        upper, lower = tmp_path / f"u{stop_at}", tmp_path / f"l{stop_at}"
        every_change(upper, lower)
        found = q.changes(upper, lower)
        prints = orjson.loads(orjson.dumps(q.fingerprint(lower, found)))
        prefix = q.temp_prefix()
        seen: list[tuple[str, str]] = []

        def step(event: str, path: str, stop_at: int = stop_at, seen: list[tuple[str, str]] = seen,
                 lower: Path = lower, prefix: str = prefix) -> None:
            seen.append((event, path))
            if event == "tmp":  # the temporary file is in place, under the prefix
                assert any(p.name.startswith(prefix) for p in (lower / path).parent.iterdir())
            if len(seen) - 1 == stop_at:
                raise Stop

        with pytest.raises(Stop):
            q.apply(upper, lower, found, fingerprints=prints, tmp_prefix=prefix, on_step=step)
        # without resume, what the interrupted apply already did looks like host edits
        if any(event in ("removed", "wrote") for event, _ in seen):
            with pytest.raises(Conflict):
                q.apply(upper, lower, found, fingerprints=prints, tmp_prefix=prefix)
        q.remove_temps(lower, found, prefix)
        assert not [p for p in lower.rglob(".kp-*")], stop_at
        applied, _ = q.apply(upper, lower, found, fingerprints=prints, tmp_prefix=prefix, resume=True)
        assert tree(lower) == want, (stop_at, seen[-1])
        assert sorted(applied, key=lambda c: c.path) == found


@needs_root
def test_resume_still_refuses_host_edits(dirs: tuple[Path, Path]) -> None:
    upper, lower = dirs
    put(lower, "a", "a")
    put(lower, "b", "b")
    put(upper, "a", "A")
    put(upper, "b", "B")
    found = q.changes(upper, lower)
    prints = q.fingerprint(lower, found)
    with pytest.raises(Stop):
        q.apply(upper, lower, found, fingerprints=prints,
                on_step=lambda event, path: (_ for _ in ()).throw(Stop) if event == "wrote" else None)
    assert (lower / "a").read_text() == "A" and (lower / "b").read_text() == "b"
    for edit in ("b", "a"):  # a path not yet applied, and one already applied, edited on the host since
        (lower / edit).write_text("the user's")
        with pytest.raises(Conflict, match=f"changed on the host since the run: {edit}"):
            q.apply(upper, lower, found, fingerprints=prints, resume=True)
        (lower / edit).write_text("A" if edit == "a" else "b")
    os.chmod(lower / "a", 0o600)  # the applied file's mode changed: neither state
    with pytest.raises(Conflict):
        q.apply(upper, lower, found, fingerprints=prints, resume=True)


def test_remove_temps_removes_only_its_own_temporary_names(dirs: tuple[Path, Path]) -> None:
    _upper, lower = dirs
    changes = [Change("f", "added", "file"), Change("sub/g", "modified", "file"), Change("gone", "deleted", "file"),
               Change("sub/link", "added", "symlink"), Change("d", "added", "dir")]
    prefix = q.temp_prefix()
    put(lower, f"{prefix}0", "tmp")  # f's
    put(lower, f"sub/{prefix}1", "tmp")  # sub/g's
    link(lower, f"sub/{prefix}3", "anywhere")  # sub/link's
    put(lower, f"{prefix}2", "not a temporary name of a file or symlink change")
    mkdir(lower, f"sub/{prefix}0")  # a name of another directory's change, and a directory
    put(lower, f"{prefix[:-1]}x-0", "another prefix")
    assert sorted(q.remove_temps(lower, changes, prefix)) == sorted([f"{prefix}0", f"sub/{prefix}1",
                                                                      f"sub/{prefix}3"])
    assert sorted(p.name for p in lower.rglob("*")) == sorted([f"{prefix}2", "sub", f"{prefix}0",
                                                                f"{prefix[:-1]}x-0"])
    assert q.remove_temps(lower, changes, prefix) == []
    with pytest.raises(BadInput):
        q.remove_temps(lower, changes, "../x")


def test_temporary_names_are_random_and_recognisable() -> None:
    one, two = q.temp_prefix(), q.temp_prefix()
    assert one != two and one.startswith(".kp-apply-") and two.startswith(q.TEMP_PREFIX)


# --- against a real kernel overlayfs ----------------------------------------------------------


@contextmanager
def overlay(root: Path, options: str = "") -> Iterator[tuple[Path, Path, Path]]:
    """Mount root/merged over root/lower with root/upper; always unmounted again."""
    if os.geteuid() != 0:
        pytest.skip("mounting an overlay needs root")
    lower, upper, work, merged = (root / name for name in ("lower", "upper", "work", "merged"))
    for path in (upper, work, merged):
        path.mkdir(exist_ok=True)
    lower.mkdir(exist_ok=True)
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}" + (f",{options}" if options else "")
    done = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount an overlay here: {done.stderr.strip()}")
    try:
        yield lower, upper, merged
    finally:
        if subprocess.run(["umount", str(merged)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(merged)], check=False)


def make_lower(lower: Path) -> None:
    lower.mkdir()
    for rel, content in {"f": "one\n", "same": "same\n", "touched": "t\n", "x": "gone\n", "again": "again\n",
                         "old-name": "moved\n", "chmodded": "mode\n", "d/a": "a", "d/sub/b": "b",
                         "e/keep": "keep", "e/old": "old", "p": "p file", "q/z": "z", "r/inside": "r"}.items():
        put(lower, rel, content)
    for rel in ("d", "d/sub", "e", "q", "r"):
        mkdir(lower, rel)
    link(lower, "t", "f")


def edit_through_merged(m: Path) -> None:
    with open(m / "f", "a") as f:
        f.write("two\n")
    (m / "same").write_text("same\n")
    os.utime(m / "touched")
    put(m, "n", "new\n", 0o640)
    (m / "x").unlink()
    (m / "again").unlink()
    (m / "again").write_text("again\n")
    os.rename(m / "old-name", m / "new-name")
    os.chmod(m / "chmodded", 0o600)
    subprocess.run(["rm", "-rf", str(m / "d")], check=True)
    subprocess.run(["rm", "-rf", str(m / "e")], check=True)
    mkdir(m, "e")  # a directory made over a deleted one
    put(m, "e/keep", "keep")
    put(m, "e/new", "new")
    (m / "p").unlink()
    put(m, "p/inner", "i")
    subprocess.run(["rm", "-rf", str(m / "q")], check=True)
    put(m, "q", "now a file")
    os.chmod(m / "r", 0o700)
    put(m, "newdir/a/b", "deep")
    put(m, "scratch", "tmp")
    (m / "scratch").unlink()
    link(m, "s", "f")
    (m / "t").unlink()
    link(m, "t", "n")


@needs_root
def test_real_overlay_changes_and_apply_reproduce_the_merged_view(tmp_path: Path) -> None:
    make_lower(tmp_path / "lower")
    with overlay(tmp_path) as (lower, upper, merged):
        edit_through_merged(merged)
        expected = tree(merged)
    assert not os.path.ismount(tmp_path / "merged")
    # what the kernel wrote: whiteouts, and opaque dirs where a directory was made over a deleted name
    assert stat.S_ISCHR((upper / "x").lstat().st_mode) and (upper / "x").lstat().st_rdev == 0
    assert os.getxattr(upper / "e", "trusted.overlay.opaque") == b"y"
    assert os.getxattr(upper / "p", "trusted.overlay.opaque") == b"y"
    assert (upper / "same").exists() and (upper / "touched").exists()  # copied up, yet no change

    found = q.changes(upper, lower)
    assert {kind: paths for kind, paths in q.summary(found).items() if kind != "changes"} == {
        "added": ["e/new", "n", "new-name", "newdir", "newdir/a", "newdir/a/b", "p/inner", "s"],
        "modified": ["chmodded", "f", "p", "q", "r", "t"],
        "deleted": ["d", "d/a", "d/sub", "d/sub/b", "e/old", "old-name", "q/z", "x"]}
    prints = orjson.loads(orjson.dumps(q.fingerprint(lower, found)))
    before = tree(lower)
    assert before != expected
    applied, warnings = q.apply(upper, lower, found, fingerprints=prints)
    assert sorted(applied, key=lambda c: c.path) == found and warnings == []
    assert tree(lower) == expected


@needs_root
def test_real_overlay_with_redirect_dir_is_refused(tmp_path: Path) -> None:
    put(tmp_path / "lower", "dir/f", "f")
    with overlay(tmp_path, "redirect_dir=on") as (lower, upper, merged):
        os.rename(merged / "dir", merged / "renamed")
    with pytest.raises(UnsupportedOverlay, match="redirect"):
        q.changes(upper, lower)


@needs_root
def test_real_overlay_with_metacopy_is_refused(tmp_path: Path) -> None:
    put(tmp_path / "lower", "f", "data")
    with overlay(tmp_path, "redirect_dir=on,metacopy=on") as (lower, upper, merged):
        os.chmod(merged / "f", 0o600)
    assert (upper / "f").read_bytes() != b"data"  # outside the mount, the upper copy has no data
    with pytest.raises(UnsupportedOverlay, match="metacopy"):
        q.changes(upper, lower)


# --- hostile trees: any names, any depth, any size, any file type ----------------------------


HOSTILE = ["new\nline", "\x1b[31mred\x1b[0m", NOT_UTF8, "tab\there", "\u202eevil"]


def assert_printable(text: str) -> None:
    """No control character, and no byte that is not UTF-8, reaches a terminal."""
    assert text.isprintable(), repr(text)
    text.encode()  # raises on a lone surrogate


def make_chain(root: Path, depth: int, name: str = "d") -> int:
    """root/name/name/... ``depth`` levels deep, made through fds (the path is far longer than PATH_MAX);
    returns an fd of the deepest directory (the caller closes it)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir(name, dir_fd=fd)
        child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    return fd


def write_at(dir_fd: int, name: str, content: bytes = b"", mode: int = 0o644) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dir_fd)
    os.write(fd, content)
    os.fchmod(fd, mode)
    os.close(fd)


def chain_depth(root: Path, name: str = "d") -> tuple[int, list[str]]:
    """How deep the chain of ``name`` directories under root goes, and what the deepest one holds."""
    depth, fd = 0, os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    while True:
        try:
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        except FileNotFoundError:
            inside = sorted(os.listdir(fd))
            os.close(fd)
            return depth, inside
        os.close(fd)
        fd, depth = child, depth + 1


def test_names_of_any_bytes_are_listed_applied_exactly_and_escaped_in_messages(dirs: tuple[Path, Path]) -> None:
    upper, lower = dirs
    put(lower, NOT_UTF8, "old")
    put(upper, NOT_UTF8, "new")  # modified: a name that is not UTF-8 in both trees
    for name in HOSTILE:
        put(upper, f"dir-{name}/{name}", name.encode(errors="surrogateescape"), 0o4755)
        link(upper, f"link-{name}", f"/{name}")
    found = q.changes(upper, lower)
    assert len(found) == 1 + 3 * len(HOSTILE)
    record = orjson.loads(orjson.dumps({"quarantine": q.summary(found), "fingerprints": q.fingerprint(lower, found)}))
    listed = [Change.from_dict(c) for c in record["quarantine"]["changes"]]
    assert listed == found  # lossless through JSON
    assert {c.path: c.target for c in listed if c.type == "symlink"} == {f"link-{n}": f"/{n}" for n in HOSTILE}
    for line in q.findings(found, limit=100):
        assert_printable(line)
    assert sum("\\x1b[31m" in line for line in q.findings(found, limit=100)) == 2  # the setuid file, the link
    applied, warnings = q.apply(upper, lower, listed, fingerprints=record["fingerprints"])
    assert len(applied) == len(found) and len(warnings) == len(HOSTILE)
    for line in warnings:
        assert_printable(line)
    names = set(os.listdir(os.fsencode(lower)))
    for name in HOSTILE:
        raw = name.encode(errors="surrogateescape")
        assert {b"dir-" + raw, b"link-" + raw} <= names
        assert (lower / f"dir-{name}" / name).read_bytes() == raw
        assert stat.S_IMODE((lower / f"dir-{name}" / name).stat().st_mode) == 0o755  # setuid stripped
        assert os.readlink(lower / f"link-{name}") == f"/{name}"
    assert (lower / NOT_UTF8).read_text() == "new"


DEPTH = 2500  # paths of ~5,000 bytes: past PATH_MAX (4096) and Python's recursion limit (1000)


def test_a_tree_deeper_than_a_path_can_be_long_is_listed_applied_and_removed(dirs: tuple[Path, Path]) -> None:
    upper, lower = dirs
    bottom = make_chain(upper, DEPTH)
    write_at(bottom, "suid", b"#!/bin/sh\n", 0o4755)
    os.symlink("/etc/shadow", "up", dir_fd=bottom)  # points out: reported however deep
    os.symlink("../" * 1000 + "inside", "in", dir_fd=bottom)  # stays in (a target is at most 4095 bytes)
    os.close(bottom)
    found = q.changes(upper, lower)
    assert len(found) == DEPTH + 3
    by_name = {c.path.rsplit("/", 1)[-1]: c for c in found if not c.path.endswith("/d") and c.path != "d"}
    deep = "d/" * DEPTH
    assert by_name["suid"].path == deep + "suid" and by_name["suid"].setid
    assert by_name["up"].escapes and not by_name["in"].escapes
    assert [c.as_dict().get("escapes") for c in (by_name["up"], by_name["in"])] == [True, None]
    said = q.findings(found)
    assert len(said) == 2 and all(len(line) < 400 for line in said)  # long paths shortened in messages
    assert said[0].endswith("a symlink that may point out of the workspace") or "setuid" in said[0]
    prints = orjson.loads(orjson.dumps(q.fingerprint(lower, found)))
    applied, warnings = q.apply(upper, lower, found, fingerprints=prints)
    assert len(applied) == len(found)
    assert [w.split(": ", 1)[1].split(" (")[0] for w in warnings] == ["setuid/setgid bits stripped"]
    assert chain_depth(lower) == (DEPTH, ["in", "suid", "up"])
    assert [c.path for c in q.changes(upper, lower)] == [deep + "suid"]  # only its setuid bit is left out
    remove_tree(lower)
    assert not lower.exists()


@needs_root
def test_a_deleted_tree_deeper_than_a_path_can_be_long_is_listed_and_removed(dirs: tuple[Path, Path]) -> None:
    upper, lower = dirs
    os.close(make_chain(lower, DEPTH))
    whiteout(upper, "d")
    found = q.changes(upper, lower)
    assert len(found) == DEPTH and {c.kind for c in found} == {"deleted"}
    q.apply(upper, lower, found, fingerprints=q.fingerprint(lower, found))
    assert os.listdir(lower) == []


@needs_root
def test_hard_links_sockets_and_devices(dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    upper, lower = dirs
    put(upper, "a", "shared")
    os.link(upper / "a", upper / "b")
    os.mknod(upper / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(upper / "disk", stat.S_IFBLK | 0o600, os.makedev(7, 0))
    monkeypatch.chdir(upper)  # a socket's path must be short
    sock = socket.socket(socket.AF_UNIX)
    sock.bind("sock")
    sock.close()
    found = q.changes(upper, lower)
    assert kinds(found) == {"a": ("added", "file"), "b": ("added", "file"), "disk": ("added", "blockdev"),
                            "null": ("added", "chardev"), "sock": ("added", "socket")}
    applied, warnings = apply_all(upper, lower)
    assert sorted(c.path for c in applied) == ["a", "b"]
    assert sorted(w.split(":")[0] for w in warnings) == ["disk", "null", "sock"]
    assert tree(lower) == {"a": ("file", 0o644, b"shared"), "b": ("file", 0o644, b"shared")}
    assert (lower / "a").stat().st_ino != (lower / "b").stat().st_ino  # each name a file of its own


@pytest.mark.parametrize(("path", "target", "out"), [
    ("l", "/etc/passwd", True), ("l", "/workspace/x", True), ("l", "..", True), ("l", "../x", True),
    ("d/l", "..", False), ("d/l", "../x", False), ("d/l", "../..", True), ("d/e/l", "../../x", False),
    ("l", "x", False), ("l", "x/y", False), ("l", "./x/./y/", False), ("l", ".", False), ("l", "", False),
    ("d/l", "x/../..", True),  # ".." after a name: x may be a symlink, so it is reported
    ("d/l", "x/..", True), ("d/l", "../x/..", True), ("a/b/c/l", "../../../x", False),
    ("a/b/c/l", "../../../../x", True)])
def test_symlinks_that_may_point_out_of_the_workspace(path: str, target: str, out: bool) -> None:
    assert q.points_out(path, target) is out
    assert Change(path, "added", "symlink", target=target).escapes is out


def test_symlinks_out_are_flagged_in_the_record_and_said(dirs: tuple[Path, Path]) -> None:
    upper, lower = dirs
    link(upper, "abs", "/root/.ssh/id_ed25519")
    link(upper, "sub/rel", "../../home")
    link(upper, "sub/ok", "../abs")
    found = q.changes(upper, lower)
    entries = {}
    for entry in q.summary(found)["changes"]:
        assert isinstance(entry, dict)
        entries[entry["path"]] = entry
    assert entries["abs"] == {"path": "abs", "change": "added", "type": "symlink",
                              "target": "/root/.ssh/id_ed25519", "escapes": True}
    assert entries["sub/rel"]["escapes"] is True and "escapes" not in entries["sub/ok"]
    assert q.findings(found) == [
        "abs -> /root/.ssh/id_ed25519: a symlink that may point out of the workspace",
        "sub/rel -> ../../home: a symlink that may point out of the workspace"]


def test_many_entries_are_listed_in_bounded_time(dirs: tuple[Path, Path]) -> None:
    upper, lower = dirs
    many = mkdir(upper, "many")
    fd = os.open(many, os.O_RDONLY | os.O_DIRECTORY)
    for i in range(20_000):
        os.close(os.open(f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    os.close(fd)
    found = q.changes(upper, lower)
    assert len(found) == 20_001
    applied, _ = apply_all(upper, lower)
    assert len(applied) == 20_001 and len(os.listdir(lower / "many")) == 20_000


@pytest.mark.parametrize(("cap", "said"), [({"max_entries": 500}, "more than 500 entries"),
                                           ({"max_changes": 100}, "more than 100 changes"),
                                           ({"max_chars": 5000}, "more than 5000 characters")])
def test_past_a_cap_the_quarantine_is_refused_clearly(dirs: tuple[Path, Path], cap: dict[str, int],
                                                      said: str) -> None:
    upper, lower = dirs
    for i in range(1000):
        put(upper, f"f{i:04}", "")
    with pytest.raises(q.TooManyChanges, match=said) as info:
        q.changes(upper, lower, **cap)
    assert "kp-rm discards it" in info.value.message and info.value.code == "too_many_changes"


def test_messages_shorten_and_escape_paths() -> None:
    long = "d/" * 3000 + "\x1bx"
    shown = q.show(long)
    assert len(shown) < 250 and shown.startswith("d/d/") and shown.endswith("d/\\x1bx")
    assert "more characters" in shown
    assert q.show("a\nb\x9b") == "a\\nb\\x9b"
    assert q.show(NOT_UTF8) == "caf\\xe9-\\xff\\xfe"
