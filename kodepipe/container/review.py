"""Reviewing a quarantine: its snapshot, its diff and its findings (kp-review, and kp-run --apply).

``snapshot(folder, upper, lower, changes)`` reads every changed entry once,
through directory fds and never through a symlink (``fdtree``), into the
run's private git repository (``review.git``, see ``review.gitstore``): the
workspace's side as the *base* commit, the agent's as the *reviewed* one.
What the review shows (the diff, ``--stat``, ``--patch``) and what it finds
(``review.scan``) come from that snapshot, never from a second read of the
quarantine.  Its id is the SHA-256 of the list of changes with the git blob
id of each new file and symlink: ``kp-review`` prints it and saves it in
``review.json``, and ``kp-run --apply`` takes a snapshot again, refuses if
its id differs from the one reviewed, and, as it copies each file, checks
that the bytes it writes hash to the reviewed blob (``quarantine.apply``'s
``expect``).  A file swapped, a symlink planted or a hard-linked file
rewritten after the review therefore never lands: the apply stops at it.

The findings of a snapshot are scanned from its entries (with their sizes
and file capabilities, read from the same fds), its added lines (git's
own diff of the two commits) and the paths that touch git metadata
(``gitguard.in_changes``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from kodepipe.container import quarantine
from kodepipe.container.quarantine import Change
from kodepipe.core.errors import BadInput, KpError
from kodepipe.core.fdtree import Cursor, Unreachable
from kodepipe.core.state import now_iso, write_atomic
from kodepipe.review import gitstore
from kodepipe.review.rules import Rule
from kodepipe.review.scan import Added, Entry, Finding, scan

GIT_DIR = "review.git"
SAVED = "review.json"
BASE_REF, HEAD_REF = "refs/heads/base", "refs/heads/reviewed"
AGENT = "kodepipe agent <agent@kodepipe.invalid>"
KODEPIPE = "kodepipe <kodepipe@kodepipe.invalid>"
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
COUNT_LIMIT = 1_000_000  # workspace files counted for a share of deletions, at most
MAX_WORKERS, MANY = 4, 64  # fast-imports at once, for a snapshot of at least MANY changes


class ChangedSinceReview(KpError):
    code = "changed_since_review"


class Refused(KpError):
    """Findings at or above the severity that blocks an apply, not accepted."""

    code = "findings"


@dataclass
class Snapshot:
    id: str
    git_dir: Path
    base: str
    head: str
    changes: list[Change]
    blobs: dict[str, str]  # path -> blob id of the new file or symlink
    entries: list[Entry]
    added: dict[str, Added] = field(repr=False)
    git_paths: list[str]
    findings: list[Finding]

    def scan(self, rules: Sequence[Rule], paths: set[str] | None, lower: Path) -> list[Finding]:
        """The findings of the whole snapshot, or of only these paths (a partial apply)."""
        if paths is None:
            return self.findings
        return scan([e for e in self.entries if e.path in paths],
                    {p: v for p, v in self.added.items() if p in paths}, rules,
                    git_paths=[p for p in self.git_paths if p in paths],
                    workspace_files=lambda: count_files(lower))


def _open(cursor: Cursor, path: str) -> int:
    parent, _, name = path.rpartition("/")
    return os.open(name, _READ, dir_fd=cursor.goto(parent))


def _readlink(cursor: Cursor, path: str) -> str:
    parent, _, name = path.rpartition("/")
    return os.readlink(name, dir_fd=cursor.goto(parent))


@contextlib.contextmanager
def _cursors(upper: Path, lower: Path) -> Iterator[tuple[Cursor, Cursor]]:
    ufd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        lfd = os.open(lower, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            with Cursor(ufd) as ucur, Cursor(lfd) as lcur:
                yield ucur, lcur
        finally:
            os.close(lfd)
    finally:
        os.close(ufd)


def _file_blob(stream: gitstore.Stream, cursor: Cursor, path: str) -> tuple[int, int, bool]:
    """(mark, size, has file capabilities) of the regular file at ``path``, streamed as a blob."""
    try:
        fd = _open(cursor, path)
    except (OSError, Unreachable) as exc:
        raise ChangedSinceReview(f"{quarantine.show(path)} cannot be read for the review: "
                                 f"{getattr(exc, 'strerror', None) or exc}", hint="list the changes again") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ChangedSinceReview(f"{quarantine.show(path)} is no longer a regular file",
                                     hint="list the changes again")
        try:
            caps = bool(os.getxattr(fd, "security.capability"))
        except OSError:
            caps = False
        return stream.blob_fd(fd, st.st_size), st.st_size, caps
    finally:
        os.close(fd)


def _lower_type(cursor: Cursor, path: str) -> str | None:
    try:
        st = cursor.lstat(path)
    except Unreachable:
        return None
    if st is None:
        return None
    return "file" if stat.S_ISREG(st.st_mode) else "symlink" if stat.S_ISLNK(st.st_mode) else "other"


Op = tuple[str, ...] | tuple[str, str, tuple[int, int], str]  # ("D", path), ("M", mode, (stream, mark), path)


def feed(streams: Sequence[gitstore.Stream], upper: Cursor, lower: Cursor | None, changes: Sequence[Change]
         ) -> tuple[list[Op], list[Op], dict[str, tuple[int, int]], dict[str, tuple[int, bool]]]:
    """Stream the blobs of these changes, each change's to the next stream in turn (so that several
    fast-imports hash and write at once): (base ops, reviewed ops, path -> (stream, mark) of the new
    side, path -> (size, capabilities) of new files).  ``lower`` None: no base side."""
    base_ops: list[Op] = []
    removals: list[Op] = []
    writes: list[Op] = []
    marks: dict[str, tuple[int, int]] = {}
    info: dict[str, tuple[int, bool]] = {}
    for index, change in enumerate(changes):
        k = index % len(streams)
        stream = streams[k]
        if lower is not None and change.kind != "added":
            old = _lower_type(lower, change.path)
            if old == "file":
                mark, _, _ = _file_blob(stream, lower, change.path)
                base_ops.append(("M", "100755" if _lower_exec(lower, change.path) else "100644", (k, mark),
                                 change.path))
            elif old == "symlink":
                mark = stream.blob_bytes(os.fsencode(_readlink(lower, change.path)))
                base_ops.append(("M", "120000", (k, mark), change.path))
            if old in ("file", "symlink") and (change.kind == "deleted" or change.type not in ("file", "symlink")):
                removals.append(("D", change.path))
        if change.kind == "deleted":
            continue
        if change.type == "file":
            mark, size, caps = _file_blob(stream, upper, change.path)
            info[change.path] = (size, caps)
        elif change.type == "symlink":
            try:
                target = _readlink(upper, change.path)
            except (OSError, Unreachable):
                raise ChangedSinceReview(f"{quarantine.show(change.path)} is no longer a symlink",
                                         hint="list the changes again") from None
            if target != change.target:
                raise ChangedSinceReview(f"{quarantine.show(change.path)}: its target changed",
                                         hint="list the changes again")
            mark = stream.blob_bytes(os.fsencode(target))
        else:
            continue
        marks[change.path] = (k, mark)
        mode = "120000" if change.type == "symlink" else ("100755" if (change.mode or 0) & 0o111 else "100644")
        writes.append(("M", mode, (k, mark), change.path))
    return base_ops, removals + writes, marks, info


def resolve(ops: Iterable[Op], dataref: Callable[[tuple[int, int]], str], prefix: str = "") -> list[tuple[str, ...]]:
    """fast-import's form of ops: each (stream, mark) as ``dataref`` names it, each path after ``prefix``."""
    out: list[tuple[str, ...]] = []
    for op in ops:
        if op[0] == "M":
            where = op[2]
            if not isinstance(where, tuple):
                raise TypeError(f"not a (stream, mark): {where!r}")
            out.append(("M", str(op[1]), dataref(where), prefix + str(op[3])))
        else:
            out.append(("D", prefix + str(op[1])))
    return out


def _lower_exec(cursor: Cursor, path: str) -> bool:
    st = cursor.lstat(path)
    return bool(st is not None and st.st_mode & 0o111)


def snapshot_id(changes: Iterable[Change], blobs: dict[str, str]) -> str:
    items = [{**c.as_dict(), **({"blob": blobs[c.path]} if c.path in blobs else {})}
             for c in sorted(changes, key=lambda c: os.fsencode(c.path))]
    return hashlib.sha256(orjson.dumps(items)).hexdigest()[:24]


def count_files(lower: Path) -> int:
    from kodepipe.core import fdtree

    fd = os.open(lower, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return sum(1 for _, _, st in fdtree.walk(fd, limit=COUNT_LIMIT) if not stat.S_ISDIR(st.st_mode))
    except KpError:
        return COUNT_LIMIT
    finally:
        os.close(fd)


def snapshot(folder: Path, upper: Path, lower: Path, changes: Sequence[Change], rules: Sequence[Rule], *,
             when: int = 0, message: str = "") -> Snapshot:
    """Snapshot the quarantine into ``folder/review.git`` (made afresh) and scan it."""
    from kodepipe.host import gitguard

    git_dir = folder / GIT_DIR
    if git_dir.exists():
        shutil.rmtree(git_dir)
    gitstore.init(git_dir)
    items = sorted(changes, key=lambda c: os.fsencode(c.path))
    # the blobs: one fast-import per core (hashing and writing them is most of a snapshot), then the commits
    workers = max(1, min(MAX_WORKERS, os.cpu_count() or 1)) if len(items) >= MANY else 1
    with contextlib.ExitStack() as stack:
        imports = [stack.enter_context(gitstore.fast_import(git_dir, fast=True)) for _ in range(workers)]
        ucur, lcur = stack.enter_context(_cursors(upper, lower))
        base_ops, head_ops, new_marks, info = feed([stream for stream, _ in imports], ucur, lcur, items)
    marks = [found for _, found in imports]

    def sha1(where: tuple[int, int]) -> str:
        return marks[where[0]][where[1]]

    with gitstore.fast_import(git_dir, fast=True) as (stream, _):
        stream.commit(BASE_REF, author=KODEPIPE, committer=KODEPIPE, when=when, message="the workspace\n",
                      parent=None, ops=resolve(base_ops, sha1))
        stream.commit(HEAD_REF, author=AGENT, committer=KODEPIPE, when=when, message=message or "the agent\n",
                      parent=BASE_REF, ops=resolve(head_ops, sha1))
    blobs = {path: sha1(where) for path, where in new_marks.items()}
    base, head = gitstore.rev(git_dir, BASE_REF), gitstore.rev(git_dir, HEAD_REF)
    entries = [Entry(c.path, c.kind, c.type, c.mode, c.target, c.escapes, *info.get(c.path, (0, False)))
               for c in items]
    git_paths = gitguard.in_changes(items, lower)
    added: dict[str, Added] = {}

    def kept() -> Iterator[tuple[str, Added]]:  # each file scanned while git diffs the next
        for path, lines in gitstore.added_lines(git_dir, base, head):
            added[path] = lines
            yield path, lines

    findings = scan(entries, kept(), rules, git_paths=git_paths, workspace_files=lambda: count_files(lower))
    return Snapshot(snapshot_id(items, blobs), git_dir, base, head, list(items), blobs, entries, added, git_paths,
                    findings)


def save(folder: Path, snap: Snapshot) -> None:
    write_atomic(folder / SAVED, orjson.dumps({"id": snap.id, "reviewed": now_iso(), "base": snap.base,
                                               "head": snap.head, "changes": len(snap.changes),
                                               "findings": len(snap.findings)}) + b"\n")


def save_id(folder: Path, snap_id: str) -> None:
    """After a partial apply: what stays is the rest of the reviewed snapshot, under this id."""
    write_atomic(folder / SAVED, orjson.dumps({"id": snap_id, "reviewed": now_iso(), "rest": True}) + b"\n")


def saved(folder: Path) -> dict[str, object] | None:
    """The last review shown of this run (its id, ...), or None."""
    try:
        data = orjson.loads((folder / SAVED).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError) as exc:
        raise KpError(f"{folder / SAVED} is unreadable ({exc})", hint="kp-review the run again") from None
    if not isinstance(data, dict) or not isinstance(data.get("id"), str):
        raise KpError(f"{folder / SAVED} is corrupt", hint="kp-review the run again")
    return data


def select(changes: Sequence[Change], paths: Sequence[str]) -> list[Change]:
    """The changes a partial apply takes: each named path and everything below it, plus the added
    directories above them (to create them) and, where a named change replaces a directory, what
    the directory held.  A name that matches no change is refused."""
    by_path = {c.path: c for c in changes}
    chosen: set[str] = set()
    for raw in paths:
        name = raw.strip("/")
        while name.startswith("./"):
            name = name[2:]
        found = [c.path for c in changes if c.path == name or c.path.startswith(name + "/")]
        if not name or not found:
            raise BadInput(f"{quarantine.show(raw)} is not among the quarantine's changes",
                           hint="kp-review NAME --stat lists them")
        chosen.update(found)
    for path in list(chosen):
        parent = path.rpartition("/")[0]
        while parent:
            up = by_path.get(parent)
            if up is not None and up.kind != "deleted" and up.type == "dir":
                chosen.add(parent)
            parent = parent.rpartition("/")[0]
    return [c for c in changes if c.path in chosen]


def gate(findings: Sequence[Finding], *, fail_on: str, accept: Sequence[str], force: bool, name: str
         ) -> tuple[list[Finding], list[Finding]]:
    """(blocking, accepted) findings; Refused when something blocks and nothing forces."""
    from kodepipe.review.scan import blocking

    blocked, accepted = blocking(findings, fail_on, accept)
    if blocked and not force:
        shown = "; ".join(_by_rule(blocked))
        raise Refused(f"{len(blocked)} finding{'s' * (len(blocked) != 1)} at or above {fail_on}, not applied: {shown}",
                      hint=f"kp-review {name} shows them; --accept RULE|PATH takes one in, --force all")
    return blocked, accepted


def _by_rule(findings: Sequence[Finding], most: int = 4) -> list[str]:
    """One phrase per rule: its outermost paths (a path under another one named is left out), and how
    many findings it has: "git-metadata b, sub/.git (54)"."""
    rules: dict[str, list[str | None]] = {}
    for f in findings:
        rules.setdefault(f.rule, []).append(f.path)
    out = []
    for rule, paths in rules.items():
        roots: list[str] = []
        for path in sorted(p for p in paths if p is not None):
            if not any(path.startswith(root + "/") for root in roots):
                roots.append(path)
        named = ", ".join(quarantine.show(p) for p in roots[:most]) + (", ..." if len(roots) > most else "")
        out.append(f"{rule} {named or '(the whole change)'}" + (f" ({len(paths)})" if len(paths) > 1 else ""))
    return out


def finding_records(snap: Snapshot, name: str, run_id: str | None, findings: Iterable[Finding] | None = None
                    ) -> list[dict[str, object]]:
    return [{"kind": "finding", "name": name, **({"id": run_id} if run_id else {}), "review": snap.id,
             **f.as_dict()} for f in (snap.findings if findings is None else findings)]


def _git_user(owner: tuple[int, int] | None) -> gitstore.User | None:
    """Git runs in the workspace's repository as its owner, when kodepipe runs as root for them."""
    if os.geteuid() != 0 or owner is None or owner[0] == 0:
        return None
    import pwd

    try:
        entry = pwd.getpwuid(owner[0])
        return gitstore.User(owner[0], owner[1], entry.pw_dir, entry.pw_name)
    except KeyError:
        return gitstore.User(owner[0], owner[1], "/nonexistent", str(owner[0]), known=False)


def export(snap: Snapshot, changes: Sequence[Change], upper: Path, workspace: Path, branch: str, *,
           owner: tuple[int, int] | None, meta: dict[str, object]) -> dict[str, object]:
    """Commit these changes on a new branch of the workspace's repository, on top of its HEAD,
    authored as the agent: HEAD, the index and the working tree stay as they are.  Paths in a .git
    and added paths the repository ignores are left out (``not_exported``).  The blobs written
    must be the snapshot's, else the branch is deleted again and the export refused."""
    user = _git_user(owner)
    repo = gitstore.find_repo(workspace, user)
    ref = gitstore.check_branch(repo, branch, user)
    skipped: list[Change] = [c for c in changes if ".git" in c.path.split("/")]
    rest = [c for c in changes if c not in skipped]
    ignored = gitstore.ignored(repo, [repo.prefix + c.path for c in rest if c.kind == "added" and c.type != "dir"],
                               user)
    skipped += [c for c in rest if repo.prefix + c.path in ignored]
    chosen = sorted((c for c in rest if repo.prefix + c.path not in ignored), key=lambda c: os.fsencode(c.path))
    name = str(meta.get("name"))
    ident = f"kp-run {name} <{name}@agent.kodepipe.invalid>"
    committer = gitstore.committer(repo, user)
    import time

    with gitstore.fast_import(None, cwd=repo.toplevel, user=user, own_config=True) as (stream, marks), \
            _cursors(upper, workspace) as (ucur, _):
        # the upper is read by the workspace-relative path; the commit names the repository path
        _, writes, new_marks, _ = feed([stream], ucur, None, chosen)
        deletions = [("D", repo.prefix + c.path) for c in chosen
                     if c.kind == "deleted" or c.type not in ("file", "symlink")]
        ops = deletions + resolve((op for op in writes if op[0] == "M"), lambda where: f":{where[1]}", repo.prefix)
        stream.commit(ref, author=ident, committer=committer, when=int(time.time()), message=commit_message(meta),
                      parent=repo.head, ops=ops)
    commit = gitstore.show_ref(repo, ref, user)
    wrong = [p for p, (_, mark) in new_marks.items() if marks.get(mark) != snap.blobs.get(p)]
    if wrong:
        gitstore.delete_ref(repo, ref, commit, user)
        raise ChangedSinceReview(f"{quarantine.show(wrong[0])} changed since the snapshot; the branch was not made",
                                 hint="review it again")
    return {"repository": str(repo.toplevel), "branch": ref.removeprefix("refs/heads/"), "commit": commit,
            "base": repo.head, "count": len(chosen),
            **({"not_exported": [c.as_dict() for c in skipped]} if skipped else {})}


def commit_message(meta: dict[str, object]) -> str:
    command = meta.get("command")
    shown = " ".join(str(c) for c in command) if isinstance(command, list) else ""
    return (f"Changes of kp-run {meta.get('name')}\n\nRun: {meta.get('name')} (id {meta.get('id')})\n"
            f"Profile: {meta.get('profile') or '-'}\nImage: {meta.get('image') or '-'}\nCommand: {shown[:500]}\n"
            "Exported by kodepipe from its quarantine after review.\n")
