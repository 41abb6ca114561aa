"""Git as the review's engine: the one adapter that runs git for a review.

A review snapshots a quarantine into a private bare repository in the run's
folder (``review.git``, out of the agent's reach) with one ``git
fast-import``: a *base* commit holding the workspace's version of every
changed path, and a *reviewed* commit on top of it holding the agent's.
kodepipe streams every byte itself, read through directory fds (never by a
path the agent could have changed), so git never opens a file of the
workspace or the quarantine.  The diff is then git's own (``git diff`` of
the two commits): for text it is byte for byte what ``git diff --no-index``
prints, with git's quoting of odd names, and ``git apply`` and ``git am``
take it.

``export(...)`` makes a commit on a new branch of the workspace's own
repository the same way (``fast-import`` into it, run as the workspace's
owner): HEAD, the index and the working tree are not touched.

Git runs with no system or global configuration (``GIT_CONFIG_NOSYSTEM``,
``GIT_CONFIG_GLOBAL=/dev/null``) in the review's repository, so a user's
``diff.external``, ``color.ui`` or ``diff.noprefix`` cannot change what the
review shows.  In the workspace's repository the owner's configuration is
read as git always would (it names the committer), and fast-import runs no
hook.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from kodepipe.core import proc
from kodepipe.core.errors import CommandFailed, Exists, KpError, NotFound
from kodepipe.review.scan import Added

CHUNK = 1 << 20
F_SETPIPE_SZ, PIPE_SIZE = 1031, 1 << 20
EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
GIT_TIMEOUT = 600.0
_SAFE_BYTES = set(range(0x20, 0x7F)) - {ord('"'), ord("\\")}


@dataclass(frozen=True)
class User:
    """Whom git runs as in the workspace's repository (when kodepipe runs as root for another user)."""

    uid: int
    gid: int
    home: str
    name: str
    known: bool = True  # in the user database: its groups are set too

    def setpriv(self) -> list[str]:
        groups = ["--init-groups"] if self.known else ["--clear-groups"]
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", *groups, "--"]


def quote(path: str) -> str:
    """A path as fast-import reads it: C-style quoted, every byte outside printable ASCII in octal."""
    out = ['"']
    for byte in os.fsencode(path):
        if byte in _SAFE_BYTES:
            out.append(chr(byte))
        elif byte == ord('"'):
            out.append('\\"')
        elif byte == ord("\\"):
            out.append("\\\\")
        else:
            out.append(f"\\{byte:03o}")
    out.append('"')
    return "".join(out)


_ESCAPES = {"a": 7, "b": 8, "t": 9, "n": 10, "v": 11, "f": 12, "r": 13, '"': 34, "\\": 92}


def unquote(text: bytes) -> str:
    """A path as git prints it (C-style quoted when it has odd bytes, core.quotePath) back to a str."""
    if not text.startswith(b'"'):
        return os.fsdecode(text)
    out, i, body = bytearray(), 1, text[:-1] if text.endswith(b'"') else text
    while i < len(body):
        c = body[i]
        if c == 92 and i + 1 < len(body):  # backslash
            nxt = chr(body[i + 1])
            if nxt in "01234567" and i + 3 < len(body) + 1:
                out.append(int(body[i + 1:i + 4], 8))
                i += 4
                continue
            out.append(_ESCAPES.get(nxt, body[i + 1]))
            i += 2
            continue
        out.append(c)
        i += 1
    return os.fsdecode(bytes(out))


def _env(home: str | None = None, *, own_config: bool = False) -> dict[str, str]:
    env = {"PATH": os.defpath + ":/usr/local/bin", "LC_ALL": "C", "GIT_TERMINAL_PROMPT": "0",
           "HOME": home or "/nonexistent", "GIT_PAGER": "cat", "PAGER": "cat"}
    if not own_config:
        env.update(GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL="/dev/null")
    return env


class Stream:
    """What is written to a fast-import: blobs (from an fd or bytes) and commits."""

    def __init__(self, sink: IO[bytes]) -> None:
        self.sink = sink
        self.marks = 0

    def blob_bytes(self, data: bytes) -> int:
        self.marks += 1
        self.sink.write(b"blob\nmark :%d\ndata %d\n" % (self.marks, len(data)) + data + b"\n")
        return self.marks

    def blob_fd(self, fd: int, size: int) -> int:
        """A blob of exactly ``size`` bytes read from ``fd``; KpError if the file is not that size."""
        self.marks += 1
        self.sink.write(b"blob\nmark :%d\ndata %d\n" % (self.marks, size))
        left = size
        while left:
            chunk = os.read(fd, min(CHUNK, left))
            if not chunk:
                raise KpError("a file changed while it was read for the review (it grew shorter)",
                              hint="review it again")
            self.sink.write(chunk)
            left -= len(chunk)
        if os.read(fd, 1):
            raise KpError("a file changed while it was read for the review (it grew longer)", hint="review it again")
        self.sink.write(b"\n")
        return self.marks

    def commit(self, ref: str, *, author: str, committer: str, when: int, message: str, parent: str | None,
               ops: Iterable[tuple[str, ...]]) -> None:
        """``ops``: ("M", mode, ":MARK" or a blob id, path) and ("D", path)."""
        data = message.encode()
        lines = [f"commit {ref}", f"author {author} {when} +0000", f"committer {committer} {when} +0000",
                 f"data {len(data)}"]
        self.sink.write("\n".join(lines).encode() + b"\n" + data + b"\n")
        if parent is not None:
            self.sink.write(f"from {parent}\n".encode())
        for op in ops:
            if op[0] == "M":
                self.sink.write(f"M {op[1]} {op[2]} {quote(op[3])}\n".encode())
            else:
                self.sink.write(f"D {quote(op[1])}\n".encode())
        self.sink.write(b"\n")


def _git(argv: Sequence[str | Path], *, git_dir: Path | None = None, cwd: Path | None = None,
         user: User | None = None, own_config: bool = False, input: bytes | None = None,
         check: bool = True) -> proc.Completed[bytes]:
    args: list[str | Path] = ["git", *([f"--git-dir={git_dir}"] if git_dir else []), *argv]
    if user is not None:
        args = [*user.setpriv(), *args]
    env = _env(user.home if user else None, own_config=own_config)
    if user is not None:
        env.update(USER=user.name, LOGNAME=user.name)
    return proc.run(args, cwd=cwd, env=env, input=input, timeout=GIT_TIMEOUT, check=check)


@contextmanager
def fast_import(git_dir: Path | None, *, cwd: Path | None = None, user: User | None = None,
                own_config: bool = False, fast: bool = False) -> Iterator[tuple[Stream, dict[int, str]]]:
    """Run ``git fast-import`` and yield (the stream to write, the marks: filled in once it is done).
    ``fast``: no compression and no deltas (the review's own short-lived repository: zlib at its
    default level is most of the time a snapshot takes)."""
    extra = ["--depth=0"] if fast else []
    marks: dict[int, str] = {}
    with tempfile.TemporaryDirectory(prefix="kp-fast-import-") as tmp:
        marks_file = Path(tmp) / "marks"
        if user is not None:
            os.chown(tmp, user.uid, user.gid)
        options = ["-c", "core.compression=0", "-c", "pack.compression=0"] if fast else []
        args: list[str | Path] = ["git", *([f"--git-dir={git_dir}"] if git_dir else []), *options, "fast-import",
                                  "--quiet",
                                  "--done", f"--export-marks={marks_file}", *extra]
        if user is not None:
            args = [*user.setpriv(), *args]
        env = _env(user.home if user else None, own_config=own_config)
        with open(Path(tmp) / "stderr", "w+b") as err:
            child = proc.spawn(args, stdin=proc.PIPE, stdout=proc.DEVNULL, stderr=err, cwd=cwd, env=env)
            if child.stdin is None:
                raise KpError("git fast-import has no stdin")
            with contextlib.suppress(OSError):  # a bigger pipe: a file's blob fits while git is busy
                fcntl.fcntl(child.stdin.fileno(), F_SETPIPE_SZ, PIPE_SIZE)
            stream = Stream(child.stdin)
            try:
                yield stream, marks
                child.stdin.write(b"done\n")
                child.stdin.close()
            except BaseException:
                child.kill()
                child.wait()
                raise
            except_status = child.wait(timeout=GIT_TIMEOUT)
            if except_status != 0:
                err.seek(0)
                raise CommandFailed(f"git fast-import exited with status {except_status}:\n"
                                    f"{proc.tail(err.read()[-8192:])}")
        for line in marks_file.read_text().splitlines():
            mark, _, oid = line.partition(" ")
            marks[int(mark.lstrip(":"))] = oid


# --- the review's own repository -------------------------------------------------------------


def init(git_dir: Path) -> None:
    """A fresh bare repository for a review (the folder must not exist)."""
    _git(["init", "--bare", "--quiet", str(git_dir)])


def rev(git_dir: Path, name: str) -> str:
    return _git(["rev-parse", "--verify", "--quiet", name], git_dir=git_dir).stdout.decode().strip()


DIFF_OPTIONS = ["--no-renames", "--no-color", "--no-ext-diff", "--no-textconv", "--src-prefix=a/",
                "--dst-prefix=b/", "--ignore-submodules=none"]


def diff_process(git_dir: Path, base: str, head: str, *, binary: bool = False, stat: bool = False,
                 context: int | None = None, stdout: int | IO[bytes] | None = proc.PIPE) -> proc.Process[bytes]:
    """``git diff`` of the review's two commits, started; the caller reads its stdout and waits."""
    args = ["git", f"--git-dir={git_dir}", "diff", *DIFF_OPTIONS]
    if stat:
        args += ["--stat=100,80", "--summary"]
    if binary:
        args.append("--binary")
    if context is not None:
        args.append(f"-U{context}")
    args += [base, head, "--"]
    return proc.spawn(args, stdout=stdout, stderr=proc.DEVNULL, env=_env())


def diff(git_dir: Path, base: str, head: str, **options: object) -> bytes:
    child = diff_process(git_dir, base, head, **options)  # type: ignore[arg-type]
    out, _ = child.communicate(timeout=GIT_TIMEOUT)
    if child.returncode != 0:
        raise CommandFailed(f"git diff exited with status {child.returncode}")
    return out


_HUNK = re.compile(rb"@@ -\d+(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def added_lines(git_dir: Path, base: str, head: str) -> Iterator[tuple[str, Added]]:
    """The added lines of each changed text file, from git's own diff with no context, file by file
    as git writes them (the caller scans one while git diffs the next): (path, Added(numbers in
    the new file, bytes)).  Parsed a hunk at a time: in a -U0 diff a hunk's added lines follow its
    removed ones, as many as its header says."""
    child = diff_process(git_dir, base, head, context=0)
    if child.stdout is None:
        raise KpError("git diff has no stdout")
    try:
        rest = b""
        while True:
            chunk = child.stdout.read(CHUNK)
            data = rest + chunk
            cut = len(data) if not chunk else data.rfind(b"\ndiff --git ")
            if cut <= 0:
                rest = data
                if not chunk:
                    break
                continue
            yield from _files(data[:cut].split(b"\n"))
            rest = data[cut + 1:]
            if not chunk:
                break
    finally:
        child.stdout.close()
        child.wait(timeout=GIT_TIMEOUT)
    if child.returncode != 0:
        raise CommandFailed(f"git diff exited with status {child.returncode}")


def _files(lines: list[bytes]) -> Iterator[tuple[str, Added]]:
    """The files of a run of whole "diff --git" sections of a -U0 diff, with their added lines."""
    numbers: list[int] = []
    chunks: list[bytes] = []
    path: str | None = None
    i, count = 0, len(lines)
    while i < count:
        line = lines[i]
        if line.startswith(b"diff --git "):
            if path is not None and numbers:
                yield path, Added(numbers, b"\n".join(chunks))
            path, numbers, chunks = None, [], []
            i += 1
            while i < count and not lines[i].startswith((b"@@ ", b"diff --git ")):  # the file's header
                if lines[i].startswith(b"+++ ") and lines[i] != b"+++ /dev/null":
                    target = lines[i][4:]
                    # git ends an unquoted name that has a space with a tab (diff.c's "--- a/x y\t")
                    if not target.startswith(b'"') and target.endswith(b"\t"):
                        target = target[:-1]
                    name = unquote(target)
                    path = name[2:] if name.startswith("b/") else name
                i += 1
            continue
        m = _HUNK.match(line) if line.startswith(b"@@ ") else None
        if m is None:
            i += 1
            continue
        removed = 1 if m.group(1) is None else int(m.group(1))
        start, many = int(m.group(2)), 1 if m.group(3) is None else int(m.group(3))
        i += 1
        while i < count and lines[i].startswith(b"\\"):  # "\ No newline at end of file"
            i += 1
        i += removed
        while i < count and lines[i].startswith(b"\\"):
            i += 1
        if many:
            block = lines[i:i + many]
            numbers.extend(range(start, start + len(block)))
            chunks.append(b"\n".join(block)[1:].replace(b"\n+", b"\n"))
            i += many
    if path is not None and numbers:
        yield path, Added(numbers, b"\n".join(chunks))


def format_patch(git_dir: Path, base: str, head: str) -> bytes:
    """An mbox patch of the reviewed commit (``git am`` makes it a commit, authored as the agent)."""
    args = ["format-patch", "--stdout", "--binary", "--no-renames", "--no-signature", "--no-color",
            f"{base}..{head}"]
    return _git(args, git_dir=git_dir).stdout


# --- the workspace's repository -------------------------------------------------------------


@dataclass(frozen=True)
class Repo:
    toplevel: Path
    prefix: str  # the workspace's path in the repository, "" or ending with "/"
    head: str


def find_repo(workspace: Path, user: User | None) -> Repo:
    done = _git(["rev-parse", "--show-toplevel", "--show-prefix"], cwd=workspace, user=user, own_config=True,
                check=False)
    if done.returncode != 0:
        said = done.stderr.decode("utf-8", "replace")
        if user is not None and ("Permission denied" in said or "cannot change to" in said):
            raise KpError(f"git, run as the workspace's owner (uid {user.uid}), cannot reach {workspace}",
                          hint="the export writes to the repository as its owner, never as root: let them reach it")
        raise NotFound(f"{workspace} is not in a git repository", hint="--to-branch needs one; kp-review --patch "
                                                                       "writes a patch instead")
    top, prefix = [*done.stdout.decode("utf-8", "surrogateescape").split("\n"), "", ""][:2]
    head = _git(["rev-parse", "--verify", "--quiet", "HEAD^{commit}"], cwd=workspace, user=user, own_config=True,
                check=False)
    if head.returncode != 0:
        raise NotFound(f"the repository of {workspace} has no commit yet", hint="commit something first")
    return Repo(Path(top), prefix, head.stdout.decode().strip())


def check_branch(repo: Repo, branch: str, user: User | None) -> str:
    """The full ref of a new branch; refuses a bad name or one that exists."""
    ok = _git(["check-ref-format", "--branch", branch], cwd=repo.toplevel, user=user, own_config=True, check=False)
    if ok.returncode != 0 or branch.startswith("-"):
        raise KpError(f"not a valid branch name: {branch!r}", code="usage")
    name = ok.stdout.decode().strip()
    exists = _git(["rev-parse", "--verify", "--quiet", f"refs/heads/{name}"], cwd=repo.toplevel, user=user,
                  own_config=True, check=False)
    if exists.returncode == 0:
        raise Exists(f"the branch {name} already exists in {repo.toplevel}", hint="name a new branch")
    return f"refs/heads/{name}"


def ignored(repo: Repo, paths: Sequence[str], user: User | None) -> set[str]:
    """Which of these repository paths the repository's ignore rules leave out."""
    if not paths:
        return set()
    data = b"\0".join(os.fsencode(p) for p in paths) + b"\0"
    done = _git(["check-ignore", "--stdin", "-z"], cwd=repo.toplevel, user=user, own_config=True, input=data,
                check=False)
    if done.returncode not in (0, 1):
        raise CommandFailed(f"git check-ignore exited with status {done.returncode}: {proc.tail(done.stderr)}")
    return {os.fsdecode(p) for p in done.stdout.split(b"\0") if p}


def committer(repo: Repo, user: User | None) -> str:
    done = _git(["var", "GIT_COMMITTER_IDENT"], cwd=repo.toplevel, user=user, own_config=True, check=False)
    ident = done.stdout.decode("utf-8", "replace").strip() if done.returncode == 0 else ""
    m = re.match(r"^(.*<[^<>\n]*>)", ident)
    return m.group(1) if m else "kodepipe <kodepipe@localhost>"


def delete_ref(repo: Repo, ref: str, oid: str, user: User | None) -> None:
    _git(["update-ref", "-d", ref, oid], cwd=repo.toplevel, user=user, own_config=True, check=False)


def show_ref(repo: Repo, ref: str, user: User | None) -> str:
    return _git(["rev-parse", "--verify", "--quiet", ref], cwd=repo.toplevel, user=user,
                own_config=True).stdout.decode().strip()

