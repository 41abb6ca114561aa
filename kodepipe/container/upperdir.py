"""A VM run's quarantine on the host: its overlay upper dir, streamed as tar by the guest, unpacked safely.

Inside a VM, ``kp-run --quarantine`` mounts the overlay in the guest (the
9p share as its lower dir); after the run the guest streams the upper dir
as tar (``tar --xattrs --xattrs-include='trusted.overlay.*' -C UPPER -cf -
.``), and ``extract(stream, dest_dir_fd, caps, owner=...)`` unpacks it into
a fresh, empty host directory that then *is* the run's upper dir:
``quarantine.changes``, ``findings``, ``fingerprint`` and ``kp-run --apply``
read it exactly as they read the host backend's upper dir, with no VM.

The guest is hostile (its root may be the agent's), so is every byte of the
stream.  The headers are read by ``tarstream`` (strict, bounded, no
tarfile: see there why), and this module makes the tree one name at a time
relative to directory fds (``fdtree.Cursor``: openat with ``O_NOFOLLOW |
O_DIRECTORY`` for every parent, at most ``fdtree.MAX_OPEN`` fds however
deep), never through a path string, with no recursion:

- **Names.**  Relative only: a leading "./" is dropped (GNU tar writes one)
  and "." is the destination itself; an absolute name, an empty, "." or
  ".." component, or a NUL is refused (``upper_refused``).  Other bytes are
  kept exactly, not UTF-8 and control characters included (quarantine's
  records carry them losslessly and its messages escape them).  A member's
  parent must be a directory an earlier member made: one that goes through
  a symlink (any member's), a missing parent or a non-directory is
  refused.  Every entry is made with O_EXCL (or mkdirat, symlinkat,
  mknodat, which fail on an existing name), so a name twice is refused, and
  nothing is ever replaced, followed or removed: a directory can never
  become a symlink under a later member.
- **Types.**  Regular files, directories, symlinks (stored as links, never
  followed), fifos (the agent can make them; quarantine reports them and
  ``apply`` leaves them out), and whiteouts: character devices 0/0, made
  with mknod (root).  A hard link becomes a new entry of the same type,
  content and mode as its target, which must be a file, symlink, fifo or
  whiteout made earlier in the stream (the overlay shares one whiteout
  inode among many names, and quarantine treats each name of a hard link
  as a file of its own); its data counts against the byte caps again, as
  ``apply`` writes it again.  Refused outright: any other device (no agent
  in a kp-run container can make one, so the guest is lying or broken),
  and what ``tarstream`` refuses (contiguous and sparse files, multi-volume
  and incremental members, global headers).  Sockets cannot be in a tar.
  The extraction stops at the first refusal: a review of part of an upper
  dir would be a review of something the agent did not leave.
- **Overlay xattrs.**  Only the guest overlay's namespace counts
  (``prefix``: ``trusted.overlay.`` for a mount made by root, as kp-run's
  is; ``user.overlay.`` if the guest mounts with ``userxattr``), and from it
  only ``opaque``: ``y`` on a directory is written here as
  ``trusted.overlay.opaque`` (what ``quarantine.changes`` reads).  Redirects,
  metacopy, xattr whiteouts and any other opaque value are refused with
  ``quarantine.UnsupportedOverlay``, as ``changes()`` refuses them on the
  host; the rest (origin, impure, uuid, nlink) is bookkeeping and ignored,
  and so is every other xattr: nothing the guest chose but that one marker
  is written as an xattr on the host (no file capabilities, no ACLs, no
  security labels).
- **Metadata.**  Modes are set exactly (fchmod after the umask-affected
  create; a directory's once the stream has left it, with its mtime),
  setuid and setgid bits included: they are data that the review reports
  ("apply strips it"), on files that belong to ``owner`` (never root: it is
  refused) in kp-run's root-only run folder.  mtimes are kept (nanoseconds,
  from the pax header).  Every entry belongs to ``owner``, the run's agent
  uid and gid on the host, as the host backend's upper dir does; the
  stream's uids, gids and names are ignored.
- **Caps** (``Caps``): members (``quarantine.MAX_ENTRIES``), path depth
  (``MAX_DEPTH``), characters of all paths (``quarantine.MAX_PATH_CHARS``),
  bytes of file data written (``MAX_BYTES``; hard link copies count again),
  bytes of one file (``MAX_FILE_BYTES``), and bytes of extended headers
  (``Caps.meta``).  A size is checked as declared, before any of its data
  is read: one past a cap is refused at once, and one within them whose
  body is short is a truncated stream.  Past a cap: ``TooLarge``
  (``upper_too_large``).

Failures are ``KpError``s with these codes, for the run's record (a failed
extraction fails the run: kp-run exits 1):
``upper_refused``, ``upper_truncated`` (the stream ended early: the guest's
tar failed or the connection dropped), ``upper_too_large``,
``unsupported_overlay``, and ``no_space`` or ``failed`` for a host write
that fails.  On any of them the destination is left as far as it got: not
an upper dir to review (the caller must not record it as one), but a tree
that ``state.remove_tree`` (kp-rm) removes, however deep, as it is made
only of ordinary entries.  ``receive(folder, ...)`` does that part for a
run's folder: it extracts into ``folder/upper.incoming`` and renames it to
``folder/upper`` only once the whole stream was taken.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kodepipe.container import quarantine
from kodepipe.container.quarantine import UnsupportedOverlay, show
from kodepipe.container.tarstream import Member, Reader, Refused, Stream, TooLarge, Truncated
from kodepipe.core.errors import KpError
from kodepipe.core.fdtree import DIR_FLAGS, Cursor, Unreachable

__all__ = ["Caps", "Extracted", "Refused", "TooLarge", "Truncated", "UnsupportedOverlay", "extract", "receive"]

TRUSTED_PREFIX = b"trusted.overlay."
USER_PREFIX = b"user.overlay."
OPAQUE_XATTR = "trusted.overlay.opaque"  # what quarantine.changes() reads
MAX_DEPTH = 16_384
MAX_BYTES = 64 << 30
MAX_FILE_BYTES = MAX_BYTES
NAME_MAX = 255
SYMLINK_MAX = 4095
META_PER_ENTRY = 2048  # bytes of extended headers a member may have besides its path (GNU tar: ~100)
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
COUNTED = ("file", "dir", "symlink", "whiteout", "fifo", "hardlink", "opaque")


@dataclass(frozen=True, slots=True)
class Caps:
    """Bounds on what ``extract`` makes; past one it stops with ``TooLarge``."""

    entries: int = quarantine.MAX_ENTRIES  # members
    depth: int = MAX_DEPTH  # components of one path
    path_chars: int = quarantine.MAX_PATH_CHARS  # characters of all the members' paths
    bytes: int = MAX_BYTES  # file data written, hard link copies included
    file_bytes: int = MAX_FILE_BYTES  # one file

    @property
    def meta(self) -> int:
        """Bytes of extended headers (pax, GNU long names) in all."""
        return self.entries * META_PER_ENTRY + 2 * self.path_chars


@dataclass(frozen=True, slots=True)
class Extracted:
    """What an extraction made: entries by kind (COUNTED) and bytes of file data written."""

    counts: Mapping[str, int] = field(default_factory=dict)
    bytes: int = 0

    def as_dict(self) -> dict[str, object]:
        return {**self.counts, "bytes": self.bytes}


def extract(stream: Stream, dest_dir_fd: int, caps: Caps | None = None, *, owner: tuple[int, int],
            prefix: bytes = TRUSTED_PREFIX) -> Extracted:
    """Unpack the tar ``stream`` of a guest's overlay upper dir into the empty directory on
    ``dest_dir_fd`` (see the module's docstring); every entry is ``owner``'s (uid, gid), never
    root's.  ``prefix`` is the namespace of the guest overlay's xattrs."""
    caps = caps or Caps()
    uid, gid = owner
    if not (isinstance(uid, int) and isinstance(gid, int) and uid > 0 and gid > 0):
        raise ValueError(f"the owner of an extracted upper dir must be an unprivileged uid and gid, not {owner!r}")
    if prefix not in (TRUSTED_PREFIX, USER_PREFIX):
        raise ValueError(f"not an overlay xattr namespace: {prefix!r}")
    if not stat.S_ISDIR(os.fstat(dest_dir_fd).st_mode):
        raise ValueError("the destination of an extraction must be a directory")
    with os.scandir(dest_dir_fd) as entries:
        if any(True for _ in entries):
            raise KpError("the directory to extract a guest's upper dir into is not empty", code="exists")
    reader = Reader(stream, max_meta=caps.meta)
    with Cursor(dest_dir_fd) as cursor:
        return _Extractor(reader, cursor, dest_dir_fd, caps, (uid, gid), prefix).run()


UPPER, INCOMING = "upper", "upper.incoming"


def receive(folder: Path, stream: Stream, caps: Caps | None = None, *, owner: tuple[int, int],
            prefix: bytes = TRUSTED_PREFIX) -> tuple[Path, Extracted]:
    """Extract into ``folder/upper.incoming`` (made here, 0700 until the stream's top directory sets
    its mode), then rename it to ``folder/upper``: a run's folder has an upper dir only if the
    whole stream was taken.  On a failure the incoming dir stays for kp-rm.  Returns the upper dir."""
    upper, incoming = folder / UPPER, folder / INCOMING
    if os.path.lexists(upper):
        raise KpError(f"{upper} already exists: refusing to receive another upper dir over it", code="exists")
    os.mkdir(incoming, 0o700)
    fd = os.open(incoming, DIR_FLAGS)
    try:
        done = extract(stream, fd, caps, owner=owner, prefix=prefix)
    finally:
        os.close(fd)
    os.rename(incoming, upper)
    return upper, done


class _Extractor:
    def __init__(self, reader: Reader, cursor: Cursor, root_fd: int, caps: Caps, owner: tuple[int, int],
                 prefix: bytes) -> None:
        self.reader, self.cursor, self.root_fd, self.caps = reader, cursor, root_fd, caps
        self.owner, self.prefix = owner, prefix
        self.counts = dict.fromkeys(COUNTED, 0)
        self.entries = self.chars = self.written = 0
        self.root: tuple[int, int] | None = None  # the "." member's mode and mtime
        # Directories whose mode and mtime are still to set (when the stream has left them): a chain,
        # each an ancestor of the next; ``chain_path`` is the deepest one's path, and each entry holds
        # where its own path ends in it, its name, mode and mtime.  O(depth) memory, not O(depth²).
        self.chain_path = ""
        self.chain: list[tuple[int, str, int, int]] = []

    def run(self) -> Extracted:
        for member in self.reader.members():
            self.member(member)
        self._leave(None)
        if self.root is not None:
            os.fchmod(self.root_fd, self.root[0])
            os.utime(self.root_fd, ns=(self.root[1], self.root[1]))
        return Extracted(dict(self.counts), self.written)

    # --- checks -----------------------------------------------------------------------------

    def _path(self, raw: bytes, member: Member, what: str = "a name") -> str | None:
        """The member's path (None for the destination itself), or a refusal."""
        shown = show(os.fsdecode(raw))
        if raw in (b".", b"./"):
            return None
        text = raw[2:] if raw.startswith(b"./") else raw
        if member.type == "dir" and what == "a name" and text.endswith(b"/"):
            text = text[:-1]
        if not text or b"\0" in text or text.startswith(b"/") or b"//" in text or text.endswith(b"/") or \
                b"/./" in b"/" + text + b"/" or b"/../" in b"/" + text + b"/":
            raise Refused(f"the guest's tar stream has {what} {shown!r} (at byte {member.offset}): absolute, "
                          "or with an empty, '.' or '..' component", hint="nothing was applied; the upper dir "
                          "stays in the guest")
        if text.count(b"/") >= self.caps.depth:
            raise TooLarge(f"the guest's upper dir is deeper than {self.caps.depth} levels, at {shown}")
        if len(text) - text.rfind(b"/") - 1 > NAME_MAX:
            raise Refused(f"the guest's tar stream has a name longer than {NAME_MAX} bytes: {shown}")
        return os.fsdecode(text)

    def _opaque(self, member: Member, path: str) -> bool:
        found = {key[len(self.prefix):]: value for key, value in member.xattrs.items()
                 if key.startswith(self.prefix)}
        for attr in quarantine.UNSUPPORTED_XATTRS:
            if attr.encode() in found:
                raise UnsupportedOverlay(f"{show(path)} in the guest's upper dir carries the overlay xattr "
                                         f"'{attr}', which is not supported",
                                         hint="the guest must mount the overlay with redirect_dir=off,metacopy=off")
        value = found.get(b"opaque")
        if value not in (None, b"y"):
            raise UnsupportedOverlay(f"{show(path)} in the guest's upper dir has overlay.opaque={value!r}, which "
                                     "is not supported")
        return value == b"y" and member.type == "dir"

    def _parent(self, parent: str, path: str, member: Member) -> int:
        """The directory ``parent`` (borrowed fd), reached without a symlink, or a refusal."""
        try:
            return self.cursor.goto(parent)
        except Unreachable as exc:
            if exc.symlink:
                why = "which is a symlink"
            elif exc.errno == errno.ENOENT:
                why = "which no earlier member made"
            else:
                why = "which is not a directory"
            raise Refused(f"the guest's tar stream has {show(path)} (at byte {member.offset}) under "
                          f"{show(exc.prefix)}, {why}", hint="nothing was applied; the upper dir stays in the "
                          "guest") from None

    # --- members --------------------------------------------------------------------------------

    def member(self, member: Member) -> None:
        self.entries += 1
        if self.entries > self.caps.entries:
            raise TooLarge(f"the guest's upper dir has more than {self.caps.entries} entries",
                           hint="kp-rm discards the run; the upper dir stays in the guest")
        path = self._path(member.name, member)
        opaque = self._opaque(member, path or ".")
        if path is None:
            if member.type != "dir":
                raise Refused(f"the guest's tar stream has a {member.type} as its top directory")
            if self.root is not None:
                raise Refused("the guest's tar stream has its top directory twice")
            self.root = (member.mode, member.mtime_ns)
            return
        self.chars += len(path) + 1
        if self.chars > self.caps.path_chars:
            raise TooLarge(f"the guest's upper dir has more than {self.caps.path_chars} characters of paths")
        parent, _, name = path.rpartition("/")
        self._leave(parent)
        try:
            if member.type == "hardlink":
                self._hardlink(member, path, parent, name)
            else:
                fd = self._parent(parent, path, member)
                if member.type == "dir":
                    self._dir(fd, name, path, member, opaque)
                elif member.type == "file":
                    self._file(fd, name, path, member)
                elif member.type == "symlink":
                    self._symlink(fd, name, path, member.linkname, member.mtime_ns)
                else:
                    self._node(fd, name, path, member)
        except FileExistsError:
            raise Refused(f"the guest's tar stream has {show(path)} twice (at byte {member.offset})",
                          hint="nothing was applied; the upper dir stays in the guest") from None
        except OSError as exc:
            if exc.errno in quarantine.NO_SPACE:
                raise KpError(f"cannot extract {show(path)} from the guest's upper dir: no space left on the "
                              "host's filesystem", code="no_space") from exc
            raise KpError(f"cannot extract {show(path)} from the guest's upper dir: {exc.strerror or exc}") from exc

    def _dir(self, fd: int, name: str, path: str, member: Member, opaque: bool) -> None:
        os.mkdir(name, 0o700, dir_fd=fd)
        os.chown(name, *self.owner, dir_fd=fd, follow_symlinks=False)
        if opaque:
            dfd = os.open(name, DIR_FLAGS, dir_fd=fd)
            try:
                os.setxattr(dfd, OPAQUE_XATTR, b"y")
            finally:
                os.close(dfd)
            self.counts["opaque"] += 1
        self.counts["dir"] += 1
        self.chain.append((len(path), name, member.mode, member.mtime_ns))
        self.chain_path = path

    def _leave(self, parent: str | None) -> None:
        """Set the mode and mtime of every pending directory that is not ``parent`` or above it
        (all of them for None): the stream has left them."""
        while self.chain:
            top = self.chain_path
            if parent is not None and parent.startswith(top) and (len(parent) == len(top) or parent[len(top)] == "/"):
                return
            _end, name, mode, mtime = self.chain.pop()
            fd = self.cursor.goto(top[:len(top) - len(name) - 1] if len(top) > len(name) else "")
            dfd = os.open(name, DIR_FLAGS, dir_fd=fd)
            try:
                os.fchmod(dfd, mode)
                os.utime(dfd, ns=(mtime, mtime))
            finally:
                os.close(dfd)
            self.chain_path = top[:self.chain[-1][0]] if self.chain else ""

    def _count_bytes(self, path: str, size: int) -> None:
        if size > self.caps.file_bytes:
            raise TooLarge(f"{show(path)} in the guest's upper dir is {size} bytes (at most {self.caps.file_bytes} "
                           "for one file)", hint="kp-rm discards the run; the upper dir stays in the guest")
        if self.written + size > self.caps.bytes:
            raise TooLarge(f"the guest's upper dir holds more than {self.caps.bytes} bytes of files (at "
                           f"{show(path)})", hint="kp-rm discards the run; the upper dir stays in the guest")
        self.written += size

    def _file(self, fd: int, name: str, path: str, member: Member) -> None:
        self._count_bytes(path, member.size)
        out = os.open(name, _CREATE, 0o600, dir_fd=fd)
        try:
            os.fchown(out, *self.owner)  # before the mode: a chown clears setuid and setgid bits
            for chunk in self.reader.data():
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view):]
            os.fchmod(out, member.mode)
            os.utime(out, ns=(member.mtime_ns, member.mtime_ns))
        finally:
            os.close(out)
        self.counts["file"] += 1

    def _symlink(self, fd: int, name: str, path: str, target: bytes, mtime_ns: int) -> None:
        if not target or b"\0" in target or len(target) > SYMLINK_MAX:
            raise Refused(f"the guest's tar stream has a symlink {show(path)} with an empty, too long or NUL-holding "
                          "target")
        os.symlink(os.fsdecode(target), name, dir_fd=fd)
        os.chown(name, *self.owner, dir_fd=fd, follow_symlinks=False)
        os.utime(name, ns=(mtime_ns, mtime_ns), dir_fd=fd, follow_symlinks=False)
        self.counts["symlink"] += 1

    def _node(self, fd: int, name: str, path: str, member: Member) -> None:
        """A whiteout (character device 0/0) or a fifo; any other device is refused."""
        if member.type == "chardev" and (member.devmajor, member.devminor) == (0, 0):
            os.mknod(name, stat.S_IFCHR | 0o600, os.makedev(0, 0), dir_fd=fd)
            kind = "whiteout"
        elif member.type == "fifo":
            os.mkfifo(name, 0o600, dir_fd=fd)
            kind = "fifo"
        else:
            raise Refused(f"the guest's tar stream has {show(path)}, a {member.type} "
                          f"{member.devmajor}:{member.devminor}: no agent in a kp-run container can make one, so "
                          "the guest's upper dir is not what the overlay left", hint="nothing was applied; inspect "
                          "the guest")
        os.chown(name, *self.owner, dir_fd=fd, follow_symlinks=False)  # before the mode (setid bits)
        os.chmod(name, member.mode, dir_fd=fd, follow_symlinks=False)
        os.utime(name, ns=(member.mtime_ns, member.mtime_ns), dir_fd=fd, follow_symlinks=False)
        self.counts[kind] += 1

    def _hardlink(self, member: Member, path: str, parent: str, name: str) -> None:
        """A new entry like the link's target, an earlier member (see the module's docstring)."""
        target = self._path(member.linkname, member, "a hard link to")
        if target is None:
            raise Refused(f"the guest's tar stream has {show(path)}, a hard link to its top directory")
        tparent, _, tname = target.rpartition("/")
        tfd = self._parent(tparent, target, member)
        try:
            st = os.stat(tname, dir_fd=tfd, follow_symlinks=False)
        except FileNotFoundError:
            raise Refused(f"the guest's tar stream has {show(path)}, a hard link to {show(target)}, which no "
                          "earlier member made") from None
        mode, mtime = stat.S_IMODE(st.st_mode), st.st_mtime_ns
        if stat.S_ISREG(st.st_mode):
            self._count_bytes(path, st.st_size)
            src = os.open(tname, _READ, dir_fd=tfd)
            try:
                if os.fstat(src).st_ino != st.st_ino:
                    raise Refused(f"{show(target)} changed while it was extracted")
                fd = self._parent(parent, path, member)
                out = os.open(name, _CREATE, 0o600, dir_fd=fd)
                try:
                    os.fchown(out, *self.owner)
                    with os.fdopen(src, "rb", closefd=False) as fin, os.fdopen(out, "wb", closefd=False) as fout:
                        while chunk := fin.read(quarantine.CHUNK):
                            fout.write(chunk)
                    os.fchmod(out, mode)
                    os.utime(out, ns=(mtime, mtime))
                finally:
                    os.close(out)
            finally:
                os.close(src)
        elif stat.S_ISLNK(st.st_mode):
            link = os.fsencode(os.readlink(tname, dir_fd=tfd))
            self._symlink(self._parent(parent, path, member), name, path, link, mtime)
            self.counts["symlink"] -= 1
        elif stat.S_ISFIFO(st.st_mode) or (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0):
            like = Member(member.name, "fifo" if stat.S_ISFIFO(st.st_mode) else "chardev", mode, 0, mtime)
            self._node(self._parent(parent, path, member), name, path, like)
            self.counts["whiteout" if stat.S_ISCHR(st.st_mode) else "fifo"] -= 1
        else:
            raise Refused(f"the guest's tar stream has {show(path)}, a hard link to {show(target)}, which is not "
                          "a file, symlink, fifo or whiteout")
        self.counts["hardlink"] += 1
