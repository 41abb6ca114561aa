"""Git metadata in a workspace: nothing an agent writes may make a later git command run its code.

Git runs programs that its repository tells it to: hooks, ``core.fsmonitor``,
``core.pager``, ``core.hooksPath``, filter and diff drivers, aliases, and
more, from the repository's config, its ``config.worktree``, files it
includes, ``info/attributes``, and the repositories it is pointed at by
``commondir``, ``gitdir:`` files and ``.git`` symlinks.  And git finds a
repository by walking up from the directory it runs in, taking the first
``.git`` (a directory, a ``gitdir:`` file or a symlink) or the first
directory that is itself a bare repository (``HEAD`` with ``objects`` and
``refs``, or with ``commondir``).  So the class to close is: the agent
changes the metadata of a repository git will use, or leaves metadata where
git will find it.

What kp-run does (``Guard``):

1. **Before the run**, it lists every repository in the workspace (``find``:
   each entry named ``.git``, of any type, and each directory that looks
   like a bare repository; an iterative walk through directory fds that
   never follows a symlink and never enters a ``.git``).
2. **By default, each is handed in read-only** (``protect``): bound
   read-only over itself, from an fd (hostpath.Staging), never through a
   path.  A mount point cannot be renamed, replaced or removed from inside
   (EBUSY), and nothing under it can be written (EROFS), so ``git log``,
   ``diff`` and ``status`` work and commits fail.  A ``.git`` that is a
   symlink is never followed nor bound (an agent may have left it): it is
   reported (``git_symlinks``), and inside the container it is only a link.
   Past ``MAX_BINDS`` repositories, the rest are watched like below.
3. **With --writable-git** (loosened), nothing is bound and every
   repository is *watched*: before the run kp-run notes each entry git reads
   as configuration, hooks or pointers (``guarded``: everything in the
   repository except its data: objects, refs, logs, the index, HEAD and
   the like; ``modules/*`` and ``worktrees/*`` are read as repositories of
   their own) and keeps a copy of the small regular files.
4. **After a direct run** (the container is gone), it lists the
   repositories again.  Each entry the agent made or replaced (a new
   ``.git`` anywhere, a new bare repository, one whose identity changed),
   and in a watched repository each guarded entry it added or changed, is
   **neutralised**: moved into the run's folder (``git-planted/``, never
   deleted: the user may inspect it; if the state directory is on another
   filesystem, renamed in place to a name git does not read), and a file
   that was there before is put back from its copy.  The record lists them
   (``git_planted``) and kp-run warns.  A new bare repository is
   neutralised by moving its ``HEAD`` (git needs it to see a repository).
5. **In quarantine**, the host is not touched until ``--apply``: the change
   list shows every path, ``in_changes`` names those with a component named
   ``.git`` or inside (or making) a bare repository, the record lists them
   (``git_changes``), and the apply refuses them unless ``--force``.

What it does not cover: git run with ``--git-dir`` or ``GIT_DIR`` pointing
into the workspace, a ``core.hooksPath`` (as husky sets) that names a
directory of the worktree (its hooks are project files the agent may change
like any other: kp-run warns when a repository's config sets one), and git
run from inside a ``.git`` directory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kodepipe.core import fdtree
from kodepipe.core.errors import BadInput
from kodepipe.core.fdtree import Cursor, Unreachable, display, is_utf8, join
from kodepipe.host import hostpath

NAME = ".git"
BARE_MARKS = frozenset({"HEAD", "objects", "refs", "commondir"})
MAX_BINDS = 128  # repositories bound read-only in one run; the rest are watched
SCAN_LIMIT = 4_000_000  # entries read when looking for repositories
GUARD_LIMIT = 200_000  # guarded entries noted per run
SNAPSHOT_FILE = 1 << 20
SNAPSHOT_TOTAL = 16 << 20
PLANTED = "git-planted"  # the folder, in the run's folder, that neutralised entries are moved to
CONFIG_READ = 1 << 20

# Inside a repository's directory: what git reads as data, never as configuration or a program.
DATA_DIRS = frozenset({"objects", "refs", "logs", "rebase-merge", "rebase-apply", "sequencer", "lost-found",
                       "branches", "remotes"})
DATA_FILES = frozenset({"HEAD", "ORIG_HEAD", "FETCH_HEAD", "MERGE_HEAD", "MERGE_MSG", "MERGE_MODE", "MERGE_RR",
                        "CHERRY_PICK_HEAD", "REVERT_HEAD", "AUTO_MERGE", "COMMIT_EDITMSG", "TAG_EDITMSG",
                        "SQUASH_MSG", "NOTES_MERGE_PARTIAL", "NOTES_MERGE_REF", "packed-refs", "description",
                        "index", "shallow", "gc.log", "gc.pid", "BISECT_LOG", "BISECT_START", "BISECT_TERMS",
                        "BISECT_NAMES", "BISECT_EXPECTED_REV", "BISECT_ANCESTORS_OK", "BISECT_HEAD", "BISECT_RUN"})
DATA_PATTERN = re.compile(r".*\.lock|sharedindex\.[0-9a-f]+|index\.[A-Za-z0-9_.-]+")
INFO_DATA = frozenset({"exclude", "refs", "packs", "sparse-checkout", "grafts"})
NESTED = frozenset({"modules", "worktrees"})  # their subdirectories are repositories of their own


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def is_bare(names: Iterable[str]) -> bool:
    """Whether a directory with these entries is one git takes for a repository (setup.c,
    is_git_directory: HEAD, and objects and refs, or a commondir that has them)."""
    have = set(names) & BARE_MARKS
    return "HEAD" in have and ("commondir" in have or {"objects", "refs"} <= have)


@dataclass(frozen=True)
class Repo:
    """A repository git would find: a ``.git`` entry, or a bare repository's directory."""

    path: str  # workspace-relative ("" is the workspace itself)
    kind: str  # the .git entry's type (dir, file, symlink, other), or "bare"
    dev: int
    ino: int

    @property
    def ident(self) -> tuple[str, int, int]:
        return self.kind, self.dev, self.ino


def find(root_fd: int, *, limit: int = SCAN_LIMIT) -> dict[str, Repo]:
    """Every repository below the directory on ``root_fd``, by path: iterative, through directory fds,
    never following a symlink, never entering a ``.git``.  fdtree.TooMany past ``limit`` entries."""
    found: dict[str, Repo] = {}
    seen = 0
    pending: list[tuple[int, str]] = []
    with Cursor(root_fd) as cursor:
        while True:
            fd, depth, subdirs, marks = cursor.fd, cursor.depth, [], set()
            dotgit = None
            with os.scandir(fd) as entries:
                for entry in entries:
                    seen += 1
                    if seen > limit:
                        raise fdtree.TooMany(f"more than {limit} entries", hint="a tree this large is not read")
                    name = entry.name
                    if name in BARE_MARKS:
                        marks.add(name)
                    if name == NAME:
                        with contextlib.suppress(FileNotFoundError):
                            dotgit = os.stat(name, dir_fd=fd, follow_symlinks=False)
                        continue
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            subdirs.append(name)
                    except OSError:
                        continue
            here = cursor.path
            if dotgit is not None:
                path = join(here, NAME)
                found[path] = Repo(path, _kind(dotgit.st_mode), dotgit.st_dev, dotgit.st_ino)
            if is_bare(marks):
                st = os.fstat(fd)
                found[here] = Repo(here, "bare", st.st_dev, st.st_ino)
            pending.extend((depth, name) for name in reversed(subdirs))
            if not cursor.next(pending):
                return found


# --- what git reads as configuration, in one repository ------------------------------------------


@dataclass(frozen=True)
class Print:
    """What identifies one entry's state: a change to any of it is a change."""

    kind: str
    mode: int
    ino: int
    size: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0

    @classmethod
    def of(cls, st: os.stat_result) -> Print:
        kind = _kind(st.st_mode)
        if kind == "dir":  # its entries are compared one by one
            return cls(kind, stat.S_IMODE(st.st_mode), st.st_ino)
        return cls(kind, stat.S_IMODE(st.st_mode), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _guarded_names(level: str, names: Iterable[str]) -> list[tuple[str, str]]:
    """(name, level below it) of the entries of a directory at ``level`` that are guarded."""
    out = []
    for name in names:
        if level == "repo":
            if name in DATA_DIRS or name in DATA_FILES or DATA_PATTERN.fullmatch(name):
                continue
            out.append((name, "info" if name == "info" else "nested" if name in NESTED else "all"))
        elif level == "info":
            if name not in INFO_DATA:
                out.append((name, "all"))
        elif level == "nested":
            out.append((name, "nested"))  # a repository's directory is told by its HEAD, below
        else:
            out.append((name, "all"))
    return out


def guarded(root_fd: int, repo: Repo, *, limit: int = GUARD_LIMIT) -> dict[str, Print]:
    """{path relative to the repository ("" is the entry itself): Print} of every entry of ``repo``
    that git reads as configuration, hooks or a pointer.  For a .git that is a file or a symlink,
    that is the entry itself; for a directory, everything but its data (see the docstring)."""
    prints: dict[str, Print] = {}
    with Cursor(root_fd) as cursor:
        st = cursor.lstat(repo.path) if repo.path else os.fstat(root_fd)
        if st is None or (st.st_dev, st.st_ino) != (repo.dev, repo.ino):
            return prints
        prints[""] = Print.of(st)
        if not stat.S_ISDIR(st.st_mode):
            return prints
        stack: list[tuple[str, str]] = [("", "repo")]
        while stack:
            rel, level = stack.pop()
            try:
                fd = cursor.goto(join(repo.path, rel) if rel else repo.path)
            except Unreachable:
                continue
            names = os.listdir(fd)
            if level == "nested" and "HEAD" in names:
                level = "repo"
            for name, below in _guarded_names(level, names):
                try:
                    child = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                path = join(rel, name)
                prints[path] = Print.of(child)
                if len(prints) > limit:
                    raise fdtree.TooMany(f"more than {limit} entries of git metadata")
                if stat.S_ISDIR(child.st_mode):
                    stack.append((path, below))
    return prints


@dataclass
class Snapshot:
    content: bytes
    mode: int
    uid: int
    gid: int


@dataclass
class Watched:
    repo: Repo
    prints: dict[str, Print]
    copies: dict[str, Snapshot] = field(default_factory=dict)


def _read_small(root_fd: int, path: str, max_bytes: int) -> Snapshot | None:
    try:
        fd = hostpath.open_beneath(root_fd, path, os.O_RDONLY | os.O_NONBLOCK)
    except (OSError, hostpath.UnsafePath):
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
            return None
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        return None
    return Snapshot(data, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)


def hooks_path(root_fd: int, repo: Repo) -> str | None:
    """The value of core.hooksPath in a repository's own config, if it sets one (read as text,
    never by running git on it)."""
    if repo.kind not in ("dir", "bare"):
        return None
    found = None
    snap = _read_small(root_fd, join(repo.path, "config") if repo.path else "config", CONFIG_READ)
    if snap is None:
        return None
    section = ""
    for line in snap.content.decode("utf-8", "replace").splitlines():
        line = line.strip()
        head = re.match(r"\[\s*([A-Za-z0-9.-]+)", line)
        if head:
            section = head.group(1).lower()
            line = line[line.find("]") + 1:].strip() if "]" in line else ""
        key = re.match(r"([A-Za-z][A-Za-z0-9-]*)\s*=\s*(.*)", line)
        if section == "core" and key and key.group(1).lower() == "hookspath":
            found = key.group(2).strip().strip('"')
    return found


# --- one run ----------------------------------------------------------------------------------


class _Change(Protocol):
    """A quarantine.Change, as far as this module reads it."""

    @property
    def path(self) -> str: ...

    @property
    def kind(self) -> str: ...


Say = Callable[[str, str], None]


def check_names(paths: Iterable[str]) -> None:
    """BadInput naming the first repository whose name is not UTF-8 (escaped), on every backend (D12).

    Podman takes a mount's source as a UTF-8 string (the API's JSON, or --mount in a guest), so such a
    repository cannot be bound read-only; watching it instead (checked after the run) would be weaker
    than what the record's ``protected`` says of the others, and weaker than a user would assume.  So
    the run is refused, before anything is made, whatever the mode: the user renames it."""
    from kodepipe.core.terminal import escape

    for path in paths:
        if not is_utf8(path):
            raise BadInput(f"the git repository {escape(display(path))} in the workspace has a name that is not "
                           "UTF-8: Podman cannot take it as a mount source, so kp-run cannot bind it read-only, "
                           "and does not run the agent beside a repository it cannot protect",
                           hint="rename it (a file name must never decide what the agent may write)")


class Guard:
    """The git side of one kp-run: ``survey`` before, ``protect`` to bind, ``after`` to check."""

    def __init__(self, root_fd: int, repos: dict[str, Repo], *, writable: bool) -> None:
        self.root_fd = root_fd
        self.repos = repos
        self.writable = writable
        # bound read-only: real directories and files, never a symlink; at most MAX_BINDS (Podman takes
        # UTF-8 paths only: kp-run's survey refuses a name that is not, check_names; kp-boot --share,
        # which binds in place without Podman, watches it instead)
        bindable = [p for p, r in sorted(repos.items()) if r.kind in ("dir", "file", "bare") and p and is_utf8(p)]
        self._bindable = bindable
        self.protect: list[str] = [] if writable else bindable[:MAX_BINDS]
        self.symlinks = sorted(p for p, r in repos.items() if r.kind in ("symlink", "other"))
        self.watched: list[Watched] = []
        self.problem: str | None = None

    @classmethod
    def survey(cls, root_fd: int, *, writable: bool, direct: bool, limit: int = SCAN_LIMIT) -> Guard:
        """The repositories in the workspace on ``root_fd`` (which the Guard now owns: ``close``; not
        if this raises); for a direct run, with the guarded entries of those it will not bind noted
        (``watch``).  BadInput for a repository whose name is not UTF-8, whatever the mode (check_names:
        the same refusal as in a VM)."""
        try:
            repos = find(root_fd, limit=limit)
        except fdtree.TooMany as exc:
            raise BadInput(f"the workspace has {exc.args[0]}: too many to look for git repositories in",
                           hint="give a smaller project directory") from None
        check_names(p for p, r in sorted(repos.items()) if r.kind in ("dir", "file", "bare") and p)
        guard = cls(root_fd, repos, writable=writable)
        if direct:
            guard.watch()
        return guard

    def close(self) -> None:
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    def stage(self, root_fd: int, staging: hostpath.Staging, dest: str, *,
              same: bool) -> tuple[list[str], dict[str, str], list[hostpath.Expect]]:
        """Bind each repository to protect read-only into ``staging``, from an fd opened beneath
        ``root_fd`` (the workspace, or the quarantine's merged view of it: ``same`` is False) without
        following a symlink: (paths, {path: staged source}, what to check in the container under
        ``dest``).  UnsafePath if one became a symlink or another file since the survey."""
        sources: dict[str, str] = {}
        expects = []
        for path in self.protect:
            fd = hostpath.open_beneath(root_fd, path)
            try:
                st = os.fstat(fd)
                repo = self.repos[path]
                if (same and (st.st_dev, st.st_ino) != (repo.dev, repo.ino)) or \
                        _kind(st.st_mode) != ("dir" if repo.kind == "bare" else repo.kind):
                    raise hostpath.UnsafePath(f"{display(path)} changed while kp-run prepared the run",
                                              hint="make sure nothing else changes the workspace, and try again")
                sources[path] = staging.bind(fd)
                expects.append(hostpath.Expect.of(f"{dest}/{path}", fd, True))
            finally:
                os.close(fd)
        return list(self.protect), sources, expects

    def check(self, folder: Path, name: str, meta: dict[str, Any], say: Callable[[str], None]) -> bool:
        """After a direct run: neutralise what the agent planted (``after``), put it on the record
        (``git_planted``, ``git_problem``) and say it; True if anything was moved into ``folder``."""
        from kodepipe.core.terminal import escape

        planted = self.after(folder, name)
        if planted:
            meta["git_planted"] = planted
            listed = ", ".join(escape(p["path"] or ".") + f" ({p['why']})" for p in planted[:8])
            say(f"the agent left git metadata that your next git command there would read, and could run its "
                f"code through: {listed}"
                + (f" and {len(planted) - 8} more" if len(planted) > 8 else "")
                + f"; kp-run moved it into {folder / PLANTED} (look at it there; nothing was deleted)")
        if self.problem:
            meta["git_problem"] = self.problem
            say(escape(self.problem))
        return any(p.get("moved_to") for p in planted)

    def warnings(self, ws: Path) -> list[str]:
        """What to tell the user before the run."""
        from kodepipe.core.terminal import escape

        out = []
        for path in self.symlinks:
            try:
                target = os.readlink(path, dir_fd=self.root_fd)
            except OSError:
                target = "?"
            out.append(f"{escape(str(ws / path))} is a symbolic link (to {escape(target)}), not a repository: kp-run "
                       "does not follow it, and the agent sees only the link (if you did not make it, an agent may "
                       "have: look before you run git there)")
        if not self.writable and len(self.protect) < len(self._bindable):
            out.append(f"the workspace holds more than {MAX_BINDS} git repositories: the first {MAX_BINDS} are "
                       "read-only, the others are checked after the run")
        for repo in self.repos.values():
            hooks = hooks_path(self.root_fd, repo)
            if hooks and not hooks.startswith(("/", "~")):
                out.append(f"{escape(repo.path or '.')}: core.hooksPath is {escape(hooks)}, a directory of the "
                           "worktree: its hooks are project files the agent can change, and git runs them as you")
        return out

    def watch(self) -> None:
        """Note the guarded entries of every repository not bound read-only (call before the run)."""
        budget = SNAPSHOT_TOTAL
        bound = set(self.protect)
        for path, repo in sorted(self.repos.items()):
            if path in bound or repo.kind == "other":
                continue
            try:
                prints = guarded(self.root_fd, repo)
            except (OSError, fdtree.TooMany, fdtree.TreeChanged) as exc:
                self.problem = f"could not read the git metadata of {display(path or '.')}: {exc}"
                continue
            copies = {}
            for rel, pr in prints.items():
                if pr.kind == "file" and pr.size <= SNAPSHOT_FILE and pr.size <= budget:
                    snap = _read_small(self.root_fd, _at(repo.path, rel), SNAPSHOT_FILE)
                    if snap is not None:
                        copies[rel] = snap
                        budget -= len(snap.content)
            self.watched.append(Watched(repo, prints, copies))

    def after(self, folder: Path, name: str, *, limit: int = SCAN_LIMIT,
              in_place: bool = False) -> list[dict[str, Any]]:
        """Find, neutralise and describe what the agent planted or changed (see the docstring);
        the container must be gone.  ``self.problem`` says what could not be checked.  ``in_place``:
        rename each to a name git does not read where it is, rather than move it into ``folder``."""
        try:
            now = find(self.root_fd, limit=limit)
        except (OSError, fdtree.TooMany, fdtree.TreeChanged) as exc:
            self.problem = (f"the workspace could not be checked for planted git repositories ({exc}): "
                            "look before you run git there")
            return []
        mover = _Mover(self.root_fd, None if in_place else folder / PLANTED, name)
        before = {r.ident for r in self.repos.values()}
        for path, repo in sorted(now.items()):
            if repo.ident in before:
                continue
            was = self.repos.get(path)
            why = "new bare repository" if repo.kind == "bare" else f"new {NAME}" if was is None else f"replaced {NAME}"
            # what was there before comes back if it was a file kp-run kept a copy of (a gitdir: pointer)
            copy = next((w.copies.get("") for w in self.watched if was is not None and w.repo == was), None)
            # a bare repository is disarmed by its HEAD: git needs one to see a repository there
            mover.move(_at(path, "HEAD") if repo.kind == "bare" else path, why, repo.kind,
                       restore=copy if repo.kind != "bare" else None)
        by_ident = {r.ident: r for r in now.values()}
        for watched in self.watched:
            current = by_ident.get(watched.repo.ident)
            if current is None:
                continue
            try:
                prints = guarded(self.root_fd, current)
            except (OSError, fdtree.TooMany, fdtree.TreeChanged) as exc:
                self.problem = f"could not read the git metadata of {display(current.path or '.')}: {exc}"
                continue
            moved: list[str] = []
            for rel in sorted(prints):
                if any(rel == m or rel.startswith(m + "/") for m in moved) or rel == "":
                    continue
                old = watched.prints.get(rel)
                if old == prints[rel]:
                    continue
                why = "changed" if old is not None else "new"
                if mover.move(_at(current.path, rel), f"{why} in {NAME}" if current.kind != "bare" else why,
                              prints[rel].kind, restore=watched.copies.get(rel) if old is not None else None):
                    moved.append(rel)
            if "" in prints and prints[""] != watched.prints.get("") and prints[""].kind != "dir":
                # the .git file itself was rewritten in place
                mover.move(current.path, f"changed {NAME}", prints[""].kind, restore=watched.copies.get(""))
        if mover.problem:
            self.problem = mover.problem
        return mover.moved


def _at(base: str, rel: str) -> str:
    return join(base, rel) if rel else base


class _Mover:
    """Moves planted entries into the run's folder (or, across filesystems or without a ``dest``,
    renames them in place to a name git ignores)."""

    def __init__(self, root_fd: int, dest: Path | None, name: str) -> None:
        self.root_fd, self.dest, self.name = root_fd, dest, name
        self.moved: list[dict[str, Any]] = []
        self.problem: str | None = None

    def move(self, path: str, why: str, kind: str, *, restore: Snapshot | None = None) -> bool:
        parent, _, name = path.rpartition("/")
        entry: dict[str, Any] = {"path": display(path), "why": why, "type": kind}
        try:
            pfd = hostpath.open_beneath(self.root_fd, parent, os.O_PATH | os.O_DIRECTORY) if parent \
                else os.dup(self.root_fd)
        except (OSError, hostpath.UnsafePath) as exc:
            self.problem = f"could not move {display(path)} away: {exc}"
            entry["moved_to"] = None
            self.moved.append(entry)
            return False
        try:
            entry["type"] = _kind(os.stat(name, dir_fd=pfd, follow_symlinks=False).st_mode)
            try:
                if self.dest is None:
                    raise OSError(errno.EXDEV, "renamed in place")
                self.dest.mkdir(mode=0o700, exist_ok=True)
                target = f"{len(self.moved)}-{name[:200]}"
                os.rename(name, self.dest / target, src_dir_fd=pfd)
                entry["moved_to"] = str(self.dest / target)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                # another filesystem: renamed in place, to a name git never reads
                n, aside = 0, f"{name}.planted-by-{self.name}"
                while _exists(pfd, aside):
                    n += 1
                    aside = f"{name}.planted-by-{self.name}.{n}"
                os.rename(name, aside, src_dir_fd=pfd, dst_dir_fd=pfd)
                entry["moved_to"] = display(join(parent, aside))
            if restore is not None:
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                             dir_fd=pfd)
                with os.fdopen(fd, "wb") as out:
                    out.write(restore.content)
                    os.fchown(out.fileno(), restore.uid, restore.gid)
                    os.fchmod(out.fileno(), restore.mode)
                entry["restored"] = True
        except OSError as exc:
            self.problem = f"could not move {display(path)} away: {exc.strerror}"
            entry.setdefault("moved_to", None)
        finally:
            os.close(pfd)
        self.moved.append(entry)
        return entry.get("moved_to") is not None


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


# --- quarantine ---------------------------------------------------------------------------------


def in_changes(changes: Iterable[_Change], lower: Path) -> list[str]:
    """The paths of quarantined changes that touch git metadata: a path with a component named
    ``.git``, or one in a directory that is a bare repository in the workspace or after the apply.
    Sorted; the apply refuses them unless forced."""
    items = sorted(changes, key=lambda c: c.path)
    out = [c.path for c in items if NAME in c.path.split("/")]
    rest = [c for c in items if NAME not in c.path.split("/")]
    added: dict[str, set[str]] = {}
    deleted: dict[str, set[str]] = {}
    dirs: set[str] = set()
    for c in rest:
        parent, _, name = c.path.rpartition("/")
        if name in BARE_MARKS:
            (deleted if c.kind == "deleted" else added).setdefault(parent, set()).add(name)
        while parent not in dirs:  # each directory once, however many changes are below it
            dirs.add(parent)
            if not parent:
                break
            parent = parent.rpartition("/")[0]
    bare: set[str] = set()
    try:
        root_fd = os.open(lower, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        root_fd = -1
    try:
        with contextlib.ExitStack() as stack:
            cursor = stack.enter_context(Cursor(root_fd)) if root_fd >= 0 else None
            for d in sorted(dirs):
                names = set(added.get(d, ()))
                if cursor is not None:
                    for mark in BARE_MARKS:
                        if mark not in deleted.get(d, ()) and cursor.lstat(join(d, mark)) is not None:
                            names.add(mark)
                if is_bare(names):
                    bare.add(d)
    finally:
        if root_fd >= 0:
            os.close(root_fd)
    inside: dict[str, bool] = {}
    for d in sorted(dirs):  # a parent sorts before its children
        up = d.rpartition("/")[0]
        inside[d] = d in bare or (bool(d) and inside.get(up, False))
    out += [c.path for c in rest if c.path in bare or inside.get(c.path.rpartition("/")[0], False)]
    return sorted(set(out))


def shown(paths: list[str], limit: int = 5) -> str:
    """The top-most of ``paths`` (those with no other one above them), escaped for a terminal, at most
    ``limit`` of them, and how many paths there are in all."""
    from kodepipe.core.terminal import escape

    tops: list[str] = []
    for path in sorted(paths):
        if not tops or not (path == tops[-1] or path.startswith(tops[-1] + "/")):
            tops.append(path)
    text = ", ".join(escape(display(p)) for p in tops[:limit]) + (" ..." if len(tops) > limit else "")
    return text + (f" ({len(paths)} paths)" if len(paths) > 1 else "")


def report_changes(changes: Iterable[_Change], lower: Path, meta: dict[str, Any], say: Callable[[str], None]) -> None:
    """After a quarantined run: the changes that touch git metadata, on the record (``git_changes``)
    and said; the apply refuses them unless forced."""
    found = in_changes(changes, lower)
    if found:
        meta["git_changes"] = [display(p) for p in found]
        say(f"the agent changed git metadata: {shown(found, 8)}: git reads it as configuration, hooks or a "
            "repository, and can run its code as you; kp-run --apply refuses these unless --force")
