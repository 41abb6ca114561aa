"""The audit's file events checked against what really changed.

ptrace reads a system call's path from the traced process's memory before
the kernel does, and another thread can rewrite it in between: the trace
then names a file other than the one created, renamed or removed (see
kp-trace(1)).  After an audited run (``kp-run --audit``), every real change
(the quarantine's change list, or the difference between two metadata
snapshots of the workspace taken before and after a direct run) must be
explained by a trace event that names its path: an open for writing, creat,
truncate, mkdir, mknod, symlink, link, rename, unlink, rmdir, chmod, utime.
A change no event explains is *unaccounted*: the trace does not show how it
was made.  Events that name a change which did not happen are normal
(failed calls, files created and removed again) and are not reported.

The matching is pure: ``marks(events)`` folds trace events (``strace.Parser``)
into what they say about each workspace path, ``from_quarantine(changes)``
and ``diff(before, after)`` give the real changes, and ``check(real, marks)``
the ones no event explains.  ``snapshot(root_fd)`` (a bounded walk of the
workspace through fds, never following a link) and ``read_log(path)`` (the
audit log, parsed) are the two functions here that do I/O.

Each real change needs one or more *aspects* explained, each by one of a set
of roles an event can play for a path:

- ``create``: it was written, made or put there (open for writing, creat,
  truncate, write, mkdir, mknod, symlink, link's new name, rename's target,
  bind of a unix socket);
- ``remove``: it was taken away (unlink, rmdir, rename's source), here or at
  a directory above it;
- ``mode``: its permission bits were set (chmod, fchmod, fchmodat);
- ``times``: its times were set (utime, utimes, utimensat): a direct run's
  snapshot sees a file touched without being written.

An added or a replaced entry needs ``create``; a deleted one ``remove`` at it
or above it; a file whose content changed ``create`` (``times`` too when
only its mtime moved); new permission bits ``mode`` or ``create``.  Below the
target of a rename, a path is also explained by the same path below its
source (``a/x`` explains ``b/x`` after ``rename(a, b)``), or, in a direct run,
by being the very entry that was at that path before (same inode, size,
mtime and mode).  A direct run's file with several hard links is explained
by an event on any of its names.

Paths: the trace's are the container's (``/workspace/...``), relative ones
taken from the process's working directory as the parser follows it, else
from the workspace (the container's working directory); only those below
the workspace count.  strace writes paths whole (its ``-s`` limit is for
data); a path it did cut short (``"..."...``, longer than the kernel takes)
explains nothing.  Names that
are not UTF-8 are compared in the form both sides can write them
(``fdtree.display``: each undecodable byte as ``\\xHH``).  An open's path is
also taken from the descriptor it returned (``-yy``), which the kernel
names after the call, so an open is never fooled by a rewritten path.

What this does not prove: that a file holds what the traced program wrote
(an event that names a path explains every change of it during the run),
nor anything about a path reached through a symlink the agent made (the
trace names the link, the change list the file: reported as unaccounted).
In a direct run, whatever else changed the workspace during the run (an
editor on the host) is unaccounted too.
It proves that each path that changed was named by a traced call that did
the right kind of thing to it.

If the trace is incomplete (the tracer died, the audit cap stopped the run,
the minimal mode records no file events) or a snapshot passed its cap, the
check says so (``Result.complete`` false, with why) instead of calling
every change unaccounted.
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from kodepipe.core.fdtree import display, is_utf8, join

MOUNT = "/workspace"  # where the workspace is in the container (sandbox.WORKSPACE)
LISTED = 20  # unaccounted changes the record names; the rest are counted
SNAPSHOT_CAP = 200_000  # entries a direct run's snapshot holds at most; past it, no cross-check
ALIASES = 16  # other names of a hard-linked file that can explain its change
RENAME_DEPTH = 32  # renames followed back from one path
STEPS = 4096  # lookups spent on explaining one change through renames; past them it is unaccounted
LOG_LINE = 4 << 20  # an audit log line longer than this is not read whole (strace writes far shorter ones)

CREATE, REMOVE, MODE, TIMES = "create", "remove", "mode", "times"


@dataclass(frozen=True, slots=True)
class Real:
    """One real change: a workspace-relative path (``os.fsdecode`` form), what happened to it, the
    type of entry, and the aspects to explain (each a set of roles, any of which explains it)."""

    path: str
    change: str  # added, modified, deleted
    type: str
    needs: tuple[frozenset[str], ...]
    aliases: tuple[str, ...] = field(default=())  # other names of the same file (hard links)

    def as_dict(self) -> dict[str, object]:
        """The record's form, like the quarantine's change list: ``path`` as JSON can carry it and
        ``path_b64`` with the exact bytes when the name is not UTF-8."""
        import base64

        out: dict[str, object] = {"path": display(self.path)}
        if not is_utf8(self.path):
            out["path_b64"] = base64.b64encode(os.fsencode(self.path)).decode()
        out["change"] = self.change
        out["type"] = self.type
        return out


ADDED = (frozenset((CREATE,)),)
DELETED = (frozenset((REMOVE,)),)


def from_quarantine(changes: Iterable[Any]) -> list[Real]:
    """The quarantine's changes (``quarantine.Change``) as real changes to explain.  A modification
    that changed the permission bits may or may not have changed the bytes (the list does not say):
    ``create`` or ``mode`` explains it."""
    out = []
    for c in changes:
        if c.kind == "added":
            needs = ADDED
        elif c.kind == "deleted":
            needs = DELETED
        elif c.old_type is None and c.old_mode is not None:
            needs = (frozenset((CREATE, MODE)),)
        else:
            needs = ADDED
        out.append(Real(c.path, c.kind, c.type, needs))
    return out


# -- a direct run's snapshots ------------------------------------------------------------------------


class Entry(NamedTuple):
    type: str
    size: int
    mtime_ns: int
    ino: int
    mode: int  # permission bits
    nlink: int


@dataclass
class Snapshot:
    """A workspace's metadata: path -> Entry; ``complete`` false past the cap (then ``entries`` is
    partial and unusable for a cross-check)."""

    entries: dict[str, Entry]
    complete: bool = True
    cap: int = SNAPSHOT_CAP
    why: str | None = None


def _type(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "chardev"),
                       (stat.S_ISBLK, "blockdev")):
        if test(mode):
            return name
    return "other"


def snapshot(root_fd: int, cap: int = SNAPSHOT_CAP) -> Snapshot:
    """Every entry below the directory ``root_fd`` with (type, size, mtime_ns, inode, mode, links),
    walked through fds without following a link, at any depth (fdtree.walk).  Past ``cap`` entries
    it stops and says so."""
    from kodepipe.core import fdtree

    entries: dict[str, Entry] = {}
    try:
        for cursor, name, st in fdtree.walk(root_fd, limit=cap):
            entries[join(cursor.path, name)] = Entry(_type(st.st_mode), st.st_size, st.st_mtime_ns, st.st_ino,
                                                     stat.S_IMODE(st.st_mode), st.st_nlink)
    except fdtree.TooMany:
        return Snapshot({}, complete=False, cap=cap, why=f"the workspace has more than {cap} entries, "
                                                         "past the snapshot's cap")
    except (OSError, fdtree.TreeChanged) as exc:
        return Snapshot({}, complete=False, cap=cap, why=f"the workspace could not be read whole: {exc}")
    return Snapshot(entries, cap=cap)


def diff(before: Mapping[str, Entry], after: Mapping[str, Entry]) -> list[Real]:
    """What changed between two snapshots, with the aspects each change needs explained.  A
    directory's own size and mtime move with its entries: only its type, inode and mode count."""
    out: list[Real] = []
    by_ino: dict[int, list[str]] = {}
    for path, new in after.items():
        if new.nlink > 1 and new.type != "dir":
            names = by_ino.setdefault(new.ino, [])
            if len(names) <= ALIASES:
                names.append(path)
    for path, new in after.items():
        old = before.get(path)
        if old is None:
            out.append(Real(path, "added", new.type, ADDED))
            continue
        needs: list[frozenset[str]] = []
        if old.type != new.type or old.ino != new.ino:
            needs.append(frozenset((CREATE,)))  # replaced
        else:
            if new.type != "dir" and old.size != new.size:
                needs.append(frozenset((CREATE,)))
            elif new.type != "dir" and old.mtime_ns != new.mtime_ns:
                needs.append(frozenset((CREATE, TIMES)))
            if old.mode != new.mode:
                needs.append(frozenset((MODE, CREATE)))
        if needs:
            aliases = tuple(p for p in by_ino.get(new.ino, ()) if p != path)[:ALIASES]
            out.append(Real(path, "modified", new.type, tuple(needs), aliases))
    for path, old in before.items():
        if path not in after:
            out.append(Real(path, "deleted", old.type, DELETED))
    out.sort(key=lambda r: r.path)
    return out


def unmoved(before: Mapping[str, Entry], after: Mapping[str, Entry]) -> Callable[[str, str], bool]:
    """Whether the entry now at ``new`` is the one that was at ``old`` before, untouched (a
    directory renamed as a whole carries its entries along).  Both are display forms."""
    odd_before = {display(p): p for p in before if not is_utf8(p)}
    odd_after = {display(p): p for p in after if not is_utf8(p)}

    def same(old: str, new: str) -> bool:
        a, b = before.get(odd_before.get(old, old)), after.get(odd_after.get(new, new))
        if a is None or b is None:
            return False
        if a.type == "dir":
            return b.type == "dir" and (a.ino, a.mode) == (b.ino, b.mode)
        return a[:5] == b[:5]
    return same


# -- what the trace says ---------------------------------------------------------------------------


@dataclass
class Marks:
    """What the trace's file events say about workspace paths (display form, relative)."""

    roles: dict[str, set[str]] = field(default_factory=dict)
    renames: dict[str, set[str]] = field(default_factory=dict)  # target -> sources
    events: int = 0
    parse_errors: int = 0

    def add(self, path: str | None, role: str) -> str | None:
        rel = relative(path)
        if rel is not None:
            self.roles.setdefault(rel, set()).add(role)
        return rel

    def of(self, path: str) -> set[str]:
        """The roles the trace gives the path ``path`` (display form)."""
        return self.roles.get(path, set())


def relative(path: str | None, mount: str = MOUNT) -> str | None:
    """A container path as a workspace-relative one ("" for the workspace itself), or None when
    it is not below the workspace.  A relative path is taken from the workspace."""
    if not path:
        return None
    if not path.startswith("/"):
        path = f"{mount}/{path}"
    path = posixpath.normpath(path)
    if path == mount:
        return ""
    if path.startswith(mount + "/"):
        return path[len(mount) + 1:]
    return None


_CREATES = frozenset(("truncate", "write", "mkdir", "mknod", "symlink"))


def marks(events: Iterable[Mapping[str, Any]], into: Marks | None = None) -> Marks:
    """Fold trace events into Marks.  Only file events whose call did not fail count (one that never
    returned, cut off by the end of the trace, may have happened, and counts)."""
    m = into if into is not None else Marks()
    for ev in events:
        m.events += 1
        kind = ev.get("type")
        if kind == "parse_error":
            m.parse_errors += 1
            continue
        if ev.get("outcome") == "error":
            continue
        if kind == "net" and ev.get("op") == "bind":  # a unix socket bound to a name makes a file
            address = ev.get("address")
            if isinstance(address, dict) and isinstance(address.get("path"), str) and \
                    not address["path"].startswith("@"):
                m.add(address["path"], CREATE)
            continue
        if kind != "file" or any(isinstance(a, str) and a.endswith('"...') for a in ev.get("args") or ()):
            continue  # a path strace cut short names no file for sure
        op = ev.get("op")
        path = ev.get("path")
        if op == "open":
            if ev.get("write"):
                m.add(path, CREATE)
                m.add(ev.get("resolved"), CREATE)  # the kernel's own name for what it opened
        elif op in _CREATES:
            m.add(path, CREATE)
        elif op == "link":
            m.add(ev.get("target"), CREATE)
        elif op == "rename":
            target = ev.get("target")
            source_rel, target_rel = m.add(path, REMOVE), m.add(target, CREATE)
            pairs = [(source_rel, target_rel)]
            if any("RENAME_EXCHANGE" in a for a in ev.get("args") or () if isinstance(a, str)):
                m.add(path, CREATE)  # the two swap places: each is both removed and put there
                m.add(target, REMOVE)
                pairs.append((target_rel, source_rel))
            for source, dest in pairs:
                if source is not None and dest is not None:
                    m.renames.setdefault(dest, set()).add(source)
        elif op in ("unlink", "rmdir"):
            m.add(path, REMOVE)
        elif op == "chmod":
            m.add(path, MODE)
        elif op == "utime":
            m.add(path, TIMES)
    return m


def read_log(path: str | os.PathLike[str], skip: int = 0) -> Marks:
    """Parse an audit log (strace text, as kp-run --audit writes it) into Marks; its first ``skip``
    lines are the container runtime's own (the record's audit_setup_lines)."""
    from kodepipe.audit.strace import Parser
    from kodepipe.core.records import TooLong, bounded_lines

    parser = Parser()
    result = Marks()
    with open(path, "rb") as handle:
        for number, raw in bounded_lines(handle, LOG_LINE):
            if number <= skip:
                continue
            if isinstance(raw, TooLong):
                marks(parser.unreadable("...", "too long"), result)
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                marks(parser.unreadable("...", "not UTF-8"), result)
                continue
            marks(parser.feed(line), result)
        marks(parser.finish(), result)
    return result


# -- matching ---------------------------------------------------------------------------------------


def _ancestors(path: str) -> Iterator[tuple[str, str]]:
    """(directory, rest) for each directory above ``path``, nearest first: "a/b/c" -> ("a/b", "c"),
    ("a", "b/c")."""
    i = path.rfind("/")
    while i > 0:
        yield path[:i], path[i + 1:]
        i = path.rfind("/", 0, i)


class _Matcher:
    def __init__(self, m: Marks, same: Callable[[str, str], bool] | None) -> None:
        self.m, self.same = m, same
        self.steps = 0  # spent on the change at hand

    def explains(self, key: str, roles: frozenset[str], depth: int = 0) -> bool:
        """Whether the trace explains an aspect (any of ``roles``) of the path ``key`` (display form)."""
        if self.m.of(key) & roles:
            return True
        if REMOVE in roles:
            return any(REMOVE in self.m.of(d) for d, _ in _ancestors(key))
        if depth >= RENAME_DEPTH or not self.m.renames:
            return False
        for directory, rest in _ancestors(key):
            self.steps += 1
            if self.steps > STEPS:
                return False
            for source in self.m.renames.get(directory, ()):
                self.steps += 1
                if self.steps > STEPS:
                    return False
                old = f"{source}/{rest}" if source else rest
                if self.same is not None and self.same(old, key):
                    return True
                if self.explains(old, roles, depth + 1):
                    return True
        return False


@dataclass
class Result:
    against: str  # "quarantine" or "workspace"
    changes: int  # real changes checked
    unaccounted: list[Real]
    complete: bool = True
    why: str | None = None
    parse_errors: int = 0

    def record(self, listed: int = LISTED) -> dict[str, object]:
        """The run record's audit_unaccounted."""
        out: dict[str, object] = {"against": self.against, "complete": self.complete, "changes": self.changes}
        if not self.complete:
            out["why"] = self.why
            return out
        out["count"] = len(self.unaccounted)
        out["paths"] = [r.as_dict() for r in self.unaccounted[:listed]]
        if len(self.unaccounted) > listed:
            out["more"] = len(self.unaccounted) - listed
        if self.parse_errors:
            out["parse_errors"] = self.parse_errors
        return out


def check(real: Iterable[Real], m: Marks, *, against: str,
          same: Callable[[str, str], bool] | None = None) -> Result:
    """The real changes no trace event explains (see the module's docstring)."""
    matcher = _Matcher(m, same)
    items = list(real)
    missing = []
    for r in items:
        if r.path == "":
            continue
        for needed in r.needs:
            matcher.steps = 0
            names = (r.path, *r.aliases) if r.change == "modified" else (r.path,)
            if not any(matcher.explains(display(name), needed) for name in names):
                missing.append(r)
                break
    return Result(against, len(items), missing, parse_errors=m.parse_errors)


def incomplete(against: str, changes: int, why: str) -> Result:
    return Result(against, changes, [], complete=False, why=why)
