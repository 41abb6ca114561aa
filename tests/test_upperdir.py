"""Unpacking a guest's overlay upper dir from a hostile tar stream (upperdir.py, tarstream.py).

The hostile streams are built here, member by member, with tarfile writing
raw TarInfo headers (tarfile only writes them; the code under test reads
them with its own parser).  The last tests make a real upper dir with a
kernel overlayfs, tar it with GNU tar as the guest does, and check that
quarantine sees the extracted copy exactly as it sees the original.
Extracting needs root (whiteouts are made with mknod, opaque dirs carry
trusted.* xattrs, entries are chowned); the parser's own tests do not.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import pytest

from kodepipe.container import quarantine as q
from kodepipe.container import tarstream, upperdir
from kodepipe.container.quarantine import UnsupportedOverlay
from kodepipe.container.tarstream import Refused, TooLarge, Truncated
from kodepipe.container.upperdir import Caps
from kodepipe.core import fdtree
from kodepipe.core.errors import KpError
from kodepipe.core.fdtree import Cursor
from kodepipe.core.state import remove_tree

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mknod, trusted xattrs and chown need root")

OWNER = (4242, 4343)
MTIME = 1_700_000_000
PAX: Literal[2] = tarfile.PAX_FORMAT
GNU: Literal[1] = tarfile.GNU_FORMAT
USTAR: Literal[0] = tarfile.USTAR_FORMAT
END = bytes(1024)
NOT_UTF8 = os.fsdecode(b"caf\xe9-\xff")


# --- building streams -------------------------------------------------------------------------


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", *, mode: int = 0o644,
           mtime: int = MTIME, fmt: Literal[0, 1, 2] = PAX, pax: dict[str, str] | None = None, linkname: str = "",
           dev: tuple[int, int] = (0, 0), size: int | None = None) -> bytes:
    """One member's headers (and data, padded): any name, type and size, as a hostile guest may write."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode, info.mtime, info.linkname = mode, mtime, linkname
    info.size = len(data) if size is None else size
    info.devmajor, info.devminor = dev
    info.pax_headers = dict(pax or {})
    return info.tobuf(fmt, "utf-8", "surrogateescape") + data + bytes(-len(data) % 512)


def d(name: str, **kw: object) -> bytes:
    return member(name, tarfile.DIRTYPE, **kw)  # type: ignore[arg-type]


def f(name: str, data: bytes = b"", **kw: object) -> bytes:
    return member(name, tarfile.REGTYPE, data, **kw)  # type: ignore[arg-type]


def sym(name: str, target: str, **kw: object) -> bytes:
    return member(name, tarfile.SYMTYPE, linkname=target, mode=0o777, **kw)  # type: ignore[arg-type]


def hard(name: str, target: str) -> bytes:
    return member(name, tarfile.LNKTYPE, linkname=target)


def whiteout(name: str) -> bytes:
    return member(name, tarfile.CHRTYPE, mode=0)


def tar(*members: bytes, end: bytes = END) -> io.BytesIO:
    return io.BytesIO(b"".join(members) + end)


class Chunks:
    """A stream made lazily from chunks of bytes (a huge archive without holding it), returning
    short reads as a pipe does."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks: Iterator[bytes] = iter(chunks)
        self.buf = b""

    def read(self, size: int) -> bytes:
        while not self.buf:
            try:
                self.buf = next(self.chunks)
            except StopIteration:
                return b""
        out, self.buf = self.buf[:size], self.buf[size:]
        return out


@pytest.fixture
def dest(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("extracting needs root: mknod, trusted xattrs, chown")
    path = tmp_path / "dest"
    path.mkdir()
    yield path
    for entry in os.listdir(tmp_path):  # iteratively: pytest's clean-up recurses and fails on a deep tree
        remove_tree(tmp_path / entry)


def extract(dest: Path, stream: object, caps: Caps | None = None, **kw: object) -> upperdir.Extracted:
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return upperdir.extract(stream, fd, caps, owner=OWNER, **kw)  # type: ignore[arg-type]
    finally:
        os.close(fd)


def entries(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry below root: type, permission bits, content, target, mtime and opaque marker."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.fsdecode(os.path.relpath(path, os.fsencode(root)))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", os.fsdecode(os.readlink(path)), st.st_mtime_ns)
                continue
            opaque = os.getxattr(path, "trusted.overlay.opaque") if "trusted.overlay.opaque" in \
                os.listxattr(path) else None
            kind = "dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else \
                "fifo" if stat.S_ISFIFO(st.st_mode) else f"chr {st.st_rdev}" if stat.S_ISCHR(st.st_mode) else "other"
            content = Path(os.fsdecode(path)).read_bytes() if kind == "file" else None
            out[rel] = (kind, stat.S_IMODE(st.st_mode), content, st.st_mtime_ns, opaque)
    return out


def owners(root: Path) -> set[tuple[int, int]]:
    found = set()
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            found.add((st.st_uid, st.st_gid))
    return found


# --- what is made, and how --------------------------------------------------------------------


def test_each_kind_is_made_with_its_mode_mtime_and_the_chosen_owner(dest: Path) -> None:
    old = os.umask(0o077)  # modes are exact, whatever the umask
    try:
        done = extract(dest, tar(
            d("./", mode=0o750), d("./ro/", mode=0o555, pax={"mtime": "1600000000.123456789"}),
            f("./ro/setuid", b"#!/bin/sh\n", mode=0o4755, pax={"mtime": "1650000000.5"}),
            f("./ro/plain", b"x" * 5000, mode=0o640), sym("./ro/link", "/etc/passwd"),
            whiteout("./gone"), member("./pipe", tarfile.FIFOTYPE, mode=0o620),
            d("./op/", pax={"SCHILY.xattr.trusted.overlay.opaque": "y",
                            "SCHILY.xattr.trusted.overlay.origin": "\x00\xfb",
                            "SCHILY.xattr.user.evil": "x", "SCHILY.xattr.security.capability": "\x01"})))
    finally:
        os.umask(old)
    got = entries(dest)
    assert got["ro"] == ("dir", 0o555, None, 1_600_000_000_123_456_789, None)  # set after its contents
    assert got["ro/setuid"] == ("file", 0o4755, b"#!/bin/sh\n", 1_650_000_000_500_000_000, None)
    assert got["ro/plain"][:3] == ("file", 0o640, b"x" * 5000)
    assert got["ro/link"] == ("symlink", "/etc/passwd", MTIME * 10**9)
    assert got["gone"][:2] == ("chr 0", 0)
    assert got["pipe"][:2] == ("fifo", 0o620)
    assert got["op"] == ("dir", 0o644, None, MTIME * 10**9, b"y")
    assert os.listxattr(dest / "op") == ["trusted.overlay.opaque"]  # nothing else the guest chose
    assert stat.S_IMODE(dest.stat().st_mode) == 0o750
    assert owners(dest) == {OWNER}
    assert done.counts == {"file": 2, "dir": 2, "symlink": 1, "whiteout": 1, "fifo": 1, "hardlink": 0, "opaque": 1}
    assert done.bytes == 5010


@needs_root
def test_the_owner_is_never_root_and_the_destination_must_be_empty(dest: Path) -> None:
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(ValueError, match="unprivileged"):
            upperdir.extract(tar(), fd, owner=(0, 0))
        (dest / "x").touch()
        with pytest.raises(KpError, match="not empty"):
            upperdir.extract(tar(), fd, owner=OWNER)
    finally:
        os.close(fd)


def test_names_that_are_not_utf8_or_hold_control_characters_are_kept_as_bytes(dest: Path) -> None:
    names = [NOT_UTF8, "new\nline", "\x1b[31mred", "tab\there", "\u202eevil"]
    extract(dest, tar(*(f(f"./{name}", name.encode("utf-8", "surrogateescape")) for name in names),
                      member("./gnu-" + NOT_UTF8, fmt=GNU)))
    assert sorted(os.listdir(os.fsencode(dest))) == sorted(os.fsencode(n) for n in [*names, "gnu-" + NOT_UTF8])
    assert (dest / NOT_UTF8).read_bytes() == b"caf\xe9-\xff"


def test_long_names_in_pax_and_gnu_headers_and_a_ustar_prefix(dest: Path) -> None:
    deep = "/".join(["n" * 200] * 3)
    parts = [d(f"./{'/'.join(['n' * 200] * k)}/") for k in (1, 2)]
    long_target = "t" * 300
    extract(dest, tar(*parts, f(f"./{deep}", b"pax"), sym(f"./{'n' * 200}/lnk", long_target, fmt=GNU),
                      d("./u/"), d("./u/" + "p" * 60 + "/"),
                      f("./u/" + "p" * 60 + "/" + "q" * 90, b"ustar", fmt=USTAR)))
    assert (dest / deep).read_bytes() == b"pax"
    assert os.readlink(dest / ("n" * 200) / "lnk") == long_target
    assert (dest / "u" / ("p" * 60) / ("q" * 90)).read_bytes() == b"ustar"


def test_receive_names_the_upper_dir_only_once_the_whole_stream_was_taken(dest: Path) -> None:
    upper, done = upperdir.receive(dest, tar(d("./", mode=0o755), f("./a", b"x")), owner=OWNER)
    assert upper == dest / "upper" and (upper / "a").read_bytes() == b"x" and done.counts["file"] == 1
    assert sorted(os.listdir(dest)) == ["upper"] and stat.S_IMODE(upper.stat().st_mode) == 0o755
    with pytest.raises(KpError, match="already exists"):
        upperdir.receive(dest, tar(), owner=OWNER)
    other = dest / "other"
    other.mkdir()
    with pytest.raises(Truncated):
        upperdir.receive(other, io.BytesIO(tar(f("./a", b"x")).getvalue()[:700]), owner=OWNER)
    assert os.listdir(other) == ["upper.incoming"]  # never an upper dir to review; kp-rm removes it


# --- hostile names ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../escaped", "./../escaped", "a/../../escaped", "/tmp/kp-upperdir-escaped",
                                  "a//b", "a/./b", "a/..", "x\0y", "a/b/", "", ".//x", "././x"])
def test_names_that_climb_are_absolute_or_have_empty_components_are_refused(dest: Path, name: str) -> None:
    with pytest.raises(Refused, match="absolute, or with an empty"):
        extract(dest, tar(d("./a/"), f("x", b"evil", pax={"path": name})))  # pax: a NUL survives there
    assert not (dest.parent / "escaped").exists() and not Path("/tmp/kp-upperdir-escaped").exists()


def test_a_file_through_a_symlink_an_earlier_member_made_is_refused(dest: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    for through in (str(outside), "../outside", "."):
        with pytest.raises(Refused, match="which is a symlink"):
            extract(dest, tar(sym("./l", through), f("./l/planted", b"evil")))
        remove_tree(dest)
        dest.mkdir()
    assert os.listdir(outside) == []


def test_a_directory_replaced_by_a_symlink_is_refused_as_a_second_member_of_that_name(dest: Path,
                                                                                         tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    with pytest.raises(Refused, match="twice"):
        extract(dest, tar(d("./d/"), sym("./d", str(outside)), f("./d/planted", b"evil")))
    assert os.listdir(outside) == [] and (dest / "d").is_dir() and not (dest / "d").is_symlink()
    remove_tree(dest)
    dest.mkdir()
    with pytest.raises(Refused, match="twice"):
        extract(dest, tar(sym("./d", str(outside)), d("./d/"), f("./d/planted", b"evil")))
    assert os.listdir(outside) == []


@pytest.mark.parametrize("second", [f("./x", b"two"), d("./x/"), sym("./x", "y"), whiteout("./x"), hard("./x", "./y"),
                                    f("x", b"no dot")])
def test_a_name_twice_is_refused_and_the_first_is_kept(dest: Path, second: bytes) -> None:
    with pytest.raises(Refused, match="twice"):
        extract(dest, tar(f("./y"), f("./x", b"one"), second))
    assert (dest / "x").read_bytes() == b"one"


def test_the_top_directory_twice_or_as_a_file_is_refused(dest: Path) -> None:
    with pytest.raises(Refused, match="top directory twice"):
        extract(dest, tar(d("./"), d(".")))
    with pytest.raises(Refused, match="as its top directory"):
        extract(dest, tar(f("./", b"")))


def test_a_member_whose_directory_was_not_made_before_it_is_refused(dest: Path) -> None:
    with pytest.raises(Refused, match="which no earlier member made"):
        extract(dest, tar(f("./missing/x")))
    with pytest.raises(Refused, match="which is not a directory"):
        extract(dest, tar(f("./file"), f("./file/x")))


def test_overlong_names_and_symlink_targets_are_refused(dest: Path) -> None:
    with pytest.raises(Refused, match="longer than 255"):
        extract(dest, tar(f("./" + "n" * 256)))
    for target in ("", "t" * 4096):
        remove_tree(dest)
        dest.mkdir()
        with pytest.raises(Refused, match="target"):
            extract(dest, tar(member("./l", tarfile.SYMTYPE, pax={"linkpath": target} if target else None)))


# --- member types ----------------------------------------------------------------------------


def test_a_hard_link_becomes_a_copy_of_its_earlier_target(dest: Path) -> None:
    done = extract(dest, tar(f("./a", b"data", mode=0o4750), hard("./b", "./a"), sym("./s", "a"), hard("./s2", "s"),
                             whiteout("./w"), hard("./w2", "./w"), member("./p", tarfile.FIFOTYPE),
                             hard("./p2", "./p")))
    a, b = (dest / "a").lstat(), (dest / "b").lstat()
    assert (dest / "b").read_bytes() == b"data" and a.st_ino != b.st_ino and a.st_nlink == 1
    assert stat.S_IMODE(b.st_mode) == 0o4750 and b.st_mtime_ns == a.st_mtime_ns
    assert os.readlink(dest / "s2") == "a"
    assert stat.S_ISCHR((dest / "w2").lstat().st_mode) and (dest / "w2").lstat().st_rdev == 0
    assert stat.S_ISFIFO((dest / "p2").lstat().st_mode)
    assert done.counts["hardlink"] == 4 and done.counts["file"] == 1 and done.bytes == 8
    assert owners(dest) == {OWNER}


@pytest.mark.parametrize(("members", "match"), [
    ((hard("./b", "./a"),), "which no earlier member made"),
    ((d("./dir/"), hard("./b", "./dir")), "not a file, symlink, fifo or whiteout"),
    ((hard("./b", "../../etc/shadow"),), "absolute, or with an empty"),
    ((hard("./b", "/etc/shadow"),), "absolute, or with an empty"),
    ((hard("./b", "./"),), "to its top directory"),
    ((d("./real/"), f("./real/f", b"x"), sym("./l", "real"), hard("./b", "./l/f")), "which is a symlink"),
])
def test_hard_links_that_are_not_to_an_earlier_entry_are_refused(dest: Path, members: tuple[bytes, ...],
                                                                 match: str) -> None:
    with pytest.raises(Refused, match=match):
        extract(dest, tar(*members))
    assert not (dest / "b").exists()


def test_hard_link_copies_count_against_the_byte_caps(dest: Path) -> None:
    with pytest.raises(TooLarge, match="more than 2500 bytes"):
        extract(dest, tar(f("./a", b"x" * 1000), hard("./b", "./a"), hard("./c", "./a")), Caps(bytes=2500))


@pytest.mark.parametrize(("kind", "dev"), [(tarfile.BLKTYPE, (8, 0)), (tarfile.CHRTYPE, (1, 3)),
                                           (tarfile.CHRTYPE, (0, 1)), (tarfile.BLKTYPE, (0, 0))])
def test_devices_other_than_a_whiteout_are_refused_and_never_made(dest: Path, kind: bytes,
                                                                  dev: tuple[int, int]) -> None:
    with pytest.raises(Refused, match="no agent in a kp-run container can make one"):
        extract(dest, tar(member("./dev", kind, dev=dev)))
    assert os.listdir(dest) == []


@pytest.mark.parametrize(("kind", "what"), [(tarfile.CONTTYPE, "contiguous"), (tarfile.GNUTYPE_SPARSE, "sparse"),
                                            (b"M", "multi-volume"), (b"V", "volume label"), (b"D", "dump"),
                                            (b"Z", "type b'Z'")])
def test_other_member_types_are_refused(dest: Path, kind: bytes, what: str) -> None:
    with pytest.raises(Refused, match=what):
        extract(dest, tar(member("./odd", kind, fmt=GNU)))


def test_pax_sparse_files_and_global_headers_are_refused(dest: Path) -> None:
    with pytest.raises(Refused, match="GNU extension"):
        extract(dest, tar(f("./s", b"x", pax={"GNU.sparse.map": "0,1", "GNU.sparse.realsize": "1000000"})))
    glob = tarfile.TarInfo.create_pax_global_header({"path": "elsewhere"})
    with pytest.raises(Refused, match="global pax header"):
        extract(dest, tar(glob, f("./x")))


def test_a_non_file_with_data_is_refused(dest: Path) -> None:
    for kind in (tarfile.SYMTYPE, tarfile.DIRTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE):
        with pytest.raises(Refused, match="bytes of data"):
            extract(dest, tar(member("./x", kind, linkname="y", size=512) + bytes(512)))


# --- overlay xattrs ----------------------------------------------------------------------------


def test_only_the_guest_overlays_namespace_marks_an_opaque_directory(dest: Path) -> None:
    extract(dest, tar(d("./t/", pax={"SCHILY.xattr.trusted.overlay.opaque": "y"}),
                      d("./u/", pax={"SCHILY.xattr.user.overlay.opaque": "y"}),  # the agent can set this one
                      f("./f", pax={"SCHILY.xattr.trusted.overlay.opaque": "y"})))  # meaningless on a file
    assert os.listxattr(dest / "t") == ["trusted.overlay.opaque"]
    assert os.listxattr(dest / "u") == [] and os.listxattr(dest / "f") == []
    remove_tree(dest)
    dest.mkdir()
    extract(dest, tar(d("./t/", pax={"SCHILY.xattr.trusted.overlay.opaque": "y"}),
                      d("./u/", pax={"SCHILY.xattr.user.overlay.opaque": "y"})), prefix=upperdir.USER_PREFIX)
    assert os.listxattr(dest / "t") == [] and os.getxattr(dest / "u", "trusted.overlay.opaque") == b"y"


@pytest.mark.parametrize("xattr", [("redirect", "/elsewhere"), ("metacopy", ""), ("whiteout", "y"), ("opaque", "x")])
def test_overlay_features_quarantine_does_not_read_are_refused(dest: Path, xattr: tuple[str, str]) -> None:
    with pytest.raises(UnsupportedOverlay):
        extract(dest, tar(d("./x/", pax={f"SCHILY.xattr.trusted.overlay.{xattr[0]}": xattr[1]})))


# --- caps: depth, width, bytes ---------------------------------------------------------------


def chain(depth: int) -> Iterator[bytes]:
    """A stream of one chain of directories ``depth`` deep, then a file at the bottom."""
    path = "."
    for _ in range(depth):
        path += "/d"
        yield d(path + "/")
    yield f(path + "/bottom", b"deep")
    yield END


def test_a_10000_deep_tree_under_the_caps_then_over_them_and_kp_rm_removes_what_was_made(dest: Path) -> None:
    done = extract(dest, Chunks(chain(10_000)), Caps(path_chars=10**9))
    assert done.counts["dir"] == 10_000
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with Cursor(fd) as cursor:
            bottom = cursor.goto("/".join(["d"] * 10_000))
            assert os.stat("bottom", dir_fd=bottom, follow_symlinks=False).st_size == 4
    finally:
        os.close(fd)
    remove_tree(dest)
    dest.mkdir()
    with pytest.raises(TooLarge, match="deeper than 1000 levels"):
        extract(dest, Chunks(chain(10_000)), Caps(depth=1000, path_chars=10**9))
    assert sum(1 for _ in walk_fd(dest)) == 1000  # the levels within the cap, and nothing more
    remove_tree(dest)  # what kp-rm does: iteratively, however deep
    assert not dest.exists()
    dest.mkdir()
    # quarantine's own cap on the characters of paths (its MAX_PATH_CHARS by default) stops a deep new
    # tree too: a chain N deep has N paths of up to N names each
    with pytest.raises(TooLarge, match="more than 1000000 characters of paths"):
        extract(dest, Chunks(chain(10_000)), Caps(path_chars=1_000_000))


def renamed(template: bytes, name: str) -> bytes:
    """A one-block ustar header like ``template`` with another short name (tarfile is too slow to
    write 100,000 headers in a unit test)."""
    block = bytearray(template[:512])
    block[0:100] = name.encode().ljust(100, b"\0")
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def walk_fd(root: Path) -> Iterator[str]:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _cursor, name, _st in fdtree.walk(fd):
            yield name
    finally:
        os.close(fd)


def wide(width: int) -> Iterator[bytes]:
    yield d("./w/")
    template = member("./w/x", fmt=USTAR)
    for i in range(width):
        yield renamed(template, f"./w/{i}")
    yield END


def test_a_100000_wide_tree_under_the_caps_then_over_them(dest: Path) -> None:
    done = extract(dest, Chunks(wide(100_000)))
    assert done.counts["file"] == 100_000 and len(os.listdir(dest / "w")) == 100_000
    remove_tree(dest)
    dest.mkdir()
    with pytest.raises(TooLarge, match="more than 1000 entries"):
        extract(dest, Chunks(wide(100_000)), Caps(entries=1000))
    assert len(os.listdir(dest / "w")) == 999  # the top "w" is the first entry


def test_a_huge_declared_size_is_refused_before_its_data_is_read(dest: Path) -> None:
    stream = tar(f("./big", size=1 << 40))  # a header only: the body never comes
    with pytest.raises(TooLarge, match="1099511627776 bytes"):
        extract(dest, stream, Caps(file_bytes=1 << 30))
    assert stream.tell() < 4096 and os.listdir(dest) == []
    with pytest.raises(TooLarge, match="more than 1000 bytes of files"):
        extract(dest, tar(f("./a", b"x" * 600), f("./b", b"x" * 600)), Caps(bytes=1000))


def test_a_huge_declared_size_with_a_short_body_is_a_truncated_stream(dest: Path) -> None:
    with pytest.raises(Truncated, match="ended early, in a file's data"):
        extract(dest, io.BytesIO(f("./big", size=10 << 20)[:512] + b"short"))


@pytest.mark.parametrize("cut", [0, 100, 512, 512 + 100, 1024 + 600, 2048, 2048 + 512])
def test_a_truncated_stream_is_an_error_never_a_shorter_upper(dest: Path, cut: int) -> None:
    whole = tar(d("./a/"), f("./a/f", b"x" * 1000)).getvalue()  # dir, file + 2 blocks, 2 zero blocks
    assert len(whole) == 3072
    with pytest.raises(Truncated, match="ended early"):
        extract(dest, io.BytesIO(whole[:cut]))


def test_the_whole_stream_arrives_in_short_reads(dest: Path) -> None:
    data = tar(d("./a/"), f("./a/f", bytes(range(256)) * 100)).getvalue()
    extract(dest, Chunks(data[i:i + 7] for i in range(0, len(data), 7)))
    assert (dest / "a" / "f").read_bytes() == bytes(range(256)) * 100


# --- the parser's strictness (no root needed) -------------------------------------------------


def read_all(data: bytes, **kw: int) -> list[tarstream.Member]:
    reader = tarstream.Reader(io.BytesIO(data), max_meta=kw.pop("max_meta", 1 << 20), **kw)
    out = []
    for m in reader.members():
        out.append(m)
        b"".join(reader.data())
    return out


def test_the_parser_reads_what_gnu_tar_writes(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(b"hello")
    os.utime(tmp_path / "src" / "f", ns=(1, 1_234_567_890_123_456_789))
    data = subprocess.run(["tar", "--xattrs", "-C", tmp_path / "src", "-cf", "-", "."], capture_output=True,
                          check=True).stdout
    found = {m.name: m for m in read_all(data)}
    assert set(found) == {b"./", b"./f"} and found[b"./f"].size == 5
    assert found[b"./f"].mtime_ns == 1_234_567_890_123_456_789


@pytest.mark.parametrize(("data", "error", "match"), [
    (f("x")[:148] + b"0000000\0" + f("x")[156:] + END, Refused, "wrong checksum"),
    (b"\x01" + bytes(511) + END, Refused, "wrong checksum|neither POSIX nor GNU"),
    (f("x") + END + b"more", Refused, "goes on after the end"),
    (f("x") + END + bytes(10240), None, ""),
    (f("x") + bytes(512) + f("y") + END, Refused, "zero block alone"),
    (f("x") + bytes(512), Truncated, "end-of-archive"),
    (f("x"), Truncated, "ended early"),
    (b"", Truncated, "ended early"),
    (member("x", pax={"comment": "c"})[:512] + b"99 path=x\n" + bytes(502) + END, Refused, "wrong length"),
    (member("x", pax={"comment": "c"})[:512] + b"ab path=x\n" + bytes(502) + END, Refused, "malformed pax"),
    (member("x", pax={"comment": "c"})[:1024] + member("y", pax={"comment": "c"}) + END, Refused, "two pax"),
    (member("x", pax={"comment": "c"})[:1024] + END, Refused, "no member follows"),
    (member("x", pax={"size": "-1"}) + END, Refused, "malformed pax size"),
    (member("x", pax={"mtime": "1e9"}) + END, Refused, "malformed pax mtime"),
])
def test_the_parser_refuses_malformed_streams(data: bytes, error: type[Exception] | None, match: str) -> None:
    if error is None:
        assert [m.name for m in read_all(data)] == [b"x"]
        return
    with pytest.raises(error, match=match):
        read_all(data)


def test_an_oversized_extended_header_is_refused_before_it_is_read() -> None:
    data = member("x" * 5000) + END
    with pytest.raises(TooLarge, match="a pax header of"):
        read_all(data, max_header=1024)
    with pytest.raises(TooLarge, match="bytes of extended headers"):
        read_all(member("a" * 600) + member("b" * 600) + END, max_meta=1000)


def test_base256_numbers_and_clamped_times() -> None:
    header = bytearray(member("x", size=0)[:512])
    header[136:148] = b"\xff" * 12  # mtime -1 in base-256
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}\0 ".encode()
    assert read_all(bytes(header) + END)[0].mtime_ns == -10**9
    far = read_all(member("x", pax={"mtime": "9" * 25}) + END)[0]
    assert far.mtime_ns == tarstream.MAX_SECONDS * 10**9


# --- against a real overlay and GNU tar, as in the guest ----------------------------------------


@contextmanager
def overlay(root: Path) -> Iterator[tuple[Path, Path, Path]]:
    """root/merged over root/lower with root/upper, kp-run's options; always unmounted again."""
    lower, upper, work, merged = (root / name for name in ("lower", "upper", "work", "merged"))
    for path in (upper, work, merged):
        path.mkdir()
    done = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                           f"lowerdir={lower},upperdir={upper},workdir={work},redirect_dir=off,metacopy=off,"
                           "index=off,nosuid,nodev", merged], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount an overlay here: {done.stderr.strip()}")
    try:
        yield lower, upper, merged
    finally:
        if subprocess.run(["umount", merged], check=False).returncode != 0:
            subprocess.run(["umount", "-l", merged], check=False)


def put(root: Path, rel: str, content: bytes = b"", mode: int = 0o644) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    os.chmod(path, mode)


def test_a_real_upper_tarred_by_gnu_tar_and_extracted_reviews_the_same(dest: Path, tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    for rel in ("f", "same", "gone1", "gone2", "gone3", "old-name", "chmodded", "d/a", "d/sub/b", "e/keep",
                "e/old", "p", "q/z", "r/inside", "deep/1/2/3/x", f"{NOT_UTF8}/in", "mvdir/sub/y"):
        put(lower, rel, rel.encode("utf-8", "surrogateescape"))
    os.symlink("f", lower / "t")
    with overlay(tmp_path) as (_, upper, m):
        with open(m / "f", "ab") as fh:
            fh.write(b"more")
        (m / "same").write_bytes(b"same")
        for name in ("gone1", "gone2", "gone3"):  # whiteouts: one shared inode, hard links to each other
            (m / name).unlink()
        os.rename(m / "old-name", m / "new-name")
        os.chmod(m / "chmodded", 0o600)
        subprocess.run(["rm", "-rf", m / "d", m / "e", m / "q"], check=True)
        (m / "e").mkdir()  # opaque: a directory made over a deleted one
        put(m, "e/keep", b"keep")
        put(m, "e/new", b"new")
        (m / "p").unlink()
        put(m, "p/inner", b"i")
        put(m, "q", b"now a file")
        os.chmod(m / "r", 0o700)
        subprocess.run(["mv", m / "mvdir", m / "moved"], check=True)  # redirect_dir=off: EXDEV, mv copies
        put(m, "setuid", b"#!/bin/sh\n", 0o4755)
        os.link(m / "setuid", m / "hardlinked")
        os.mkfifo(m / "fifo")
        (m / "t").unlink()
        os.symlink("/etc/passwd", m / "t")
        put(m, f"new-{NOT_UTF8}\nname", b"odd")
        put(m, "deep/1/2/3/x", b"changed deep down")
        put(m, "newdir/a/b", b"deep new", 0o600)
        os.chmod(m / "newdir" / "a", 0o500)
    assert (upper / "gone1").lstat().st_nlink > 1  # the kernel shares one whiteout: tar sees hard links
    with subprocess.Popen(["tar", "--xattrs", "--xattrs-include=trusted.overlay.*", "-C", upper, "-cf", "-", "."],
                          stdout=subprocess.PIPE, env={**os.environ, "LC_ALL": "C"}) as tar_proc:
        assert tar_proc.stdout is not None
        done = extract(dest, tar_proc.stdout)
    assert tar_proc.returncode == 0
    assert done.counts["whiteout"] + done.counts["hardlink"] >= 3 and done.counts["opaque"] >= 1

    original, copy = q.changes(upper, lower), q.changes(dest, lower)
    assert [c.as_dict() for c in copy] == [c.as_dict() for c in original]
    assert q.findings(copy) == q.findings(original)
    assert {c.path for c in original} >= {"e/old", "gone1", "hardlinked", "setuid", "fifo", "t", "newdir/a/b",
                                          "mvdir/sub/y", "moved/sub/y",
                                          f"new-{NOT_UTF8}\nname", "deep/1/2/3/x"}
    assert entries(dest) == entries(upper)  # types, modes, contents, targets, mtimes, opaque markers
    assert owners(dest) == {OWNER}
