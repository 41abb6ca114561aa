"""kp-run inside a VM: the same locked-down container, run by the guest's Podman over SSH.

The policy is sandbox.py's, rendered as ``podman run`` arguments; this
module only finds out what the guest has and ferries things to it:

- the facts (one probe: podman, runc, zstd, sudo, the SSH user, the image,
  the workspace), then the masks (``find`` in the guest's workspace);
- the image, when the guest lacks it (or has another image under that
  tag): ``podman save`` on the host streamed (zstd-compressed when both
  sides have zstd) into ``sudo podman load``;
- the seccomp profile, derived from the guest's own containers seccomp.json
  and kept in /run/kodepipe; secrets and the mask file in a folder of the
  run's own under /run/kodepipe, removed afterwards;
- the host's side: the run's folder in the host's store (kind container,
  host = the VM), so that kp-ls lists the run and kp-rm removes it, and the
  logs (egress) land there;
- then the container's lifecycle, as on the host: ``podman create`` (the
  rendered arguments) + ``init`` + its pid, in one SSH command; what must
  hold before the agent's first instruction is attached to that pid (the
  egress relay); ``podman start --attach``, its output copied to kp-run's
  stderr, a timer that kills it at the time limit; and ``podman rm -f``
  when it did not end by itself (a failure, an interruption).  VmRun owns
  all of it: whatever path the run takes, what it made is undone.

Everything put into a remote command line goes through shlex.  Paths in
the workspace that Podman's --mount syntax cannot carry (a comma) are
refused rather than passed on: a file name must never become a mount
option.

What holds inside the guest, as on the host:

- **Git** (gitguard.py says why git metadata is code).  Before the run, one
  ``find -P`` in the guest lists every repository of the workspace (each
  ``.git`` of any type, never entered, and each directory that is a bare
  repository, at any depth, never through a symlink; NUL-separated, with
  type, device, inode and change time).  By default each is bound
  read-only over itself (``protected``), so the agent can neither write
  nor rename nor replace it; a ``.git`` that is a symlink is never bound
  nor followed, and said.  ``--writable-git`` binds nothing (loosened,
  recorded the same way).  After a direct run (the container is gone) the
  same survey runs again, and each ``.git`` or bare repository the agent
  made or replaced anywhere is neutralised by a ``rename(2)`` (perl, which
  every Debian guest has; never a copy): into a folder of the run in the
  guest (``/var/lib/kodepipe/runs/NAME-ID/git-planted``), or, on another
  filesystem (the 9p share), to a name git never reads beside it
  (``.git.planted-by-NAME``); a bare repository loses its ``HEAD``.  The
  record lists them (``git_planted``).  Names are data: a repository whose
  path Podman's ``--mount`` cannot carry (a comma, a newline, bytes that
  are not UTF-8) is refused before anything changes in the guest.
  The survey runs in the guest, not on the host's side of a
  ``kp-boot --share`` (gitguard itself), because it must see exactly what
  the guest's Podman binds: a workspace need not be the share, and over
  9p with ``security_model=mapped-xattr`` a symlink the guest makes is a
  regular file on the host, so the host's view of the tree is not the
  guest's.  With ``--writable-git`` (and for repositories past
  gitguard.MAX_BINDS) what git reads as configuration, hooks or pointers
  in each writable repository is noted before the run (gitguard's levels,
  from one ``find`` per repository; the small files kept through ``tar``),
  and what the agent added or changed there is moved away the same way and
  yours put back.  What this does not cover, unlike on the host: between
  the survey and ``podman run`` the bind sources are paths, not fds, and
  the moves after the run go by path (no agent runs at either time: only
  the guest's root could swap them, and the guest's root owns the
  workspace anyway); an ``objects`` directory anywhere in a repository is
  taken for data and not watched.
- **seccomp**: the profile is seccomp.render of the guest's own
  containers profile, the same function as the host's: new namespaces,
  CLONE_UNTRACED (EPERM) and the kernel keyring (ENOSYS) are refused.
- **Audit** (--audit): the guest's root runs strace with the host's
  flags (audit/strace.attach_argv) on the container's first process
  after ``podman init``, before ``podman start``, its log on the guest's
  disk under ``prlimit --fsize`` (the cap plus cap.SLACK); a watcher in a
  session of its own kills the container if strace ends abnormally, so
  that holds with kp-run or SSH gone (AUDIT_START).  The log is copied as
  it grows (``tail -c +0 -f --pid``, a channel of its own) into the
  host's folder of the run, bounded, where cap.SizeCap watches it and has
  the guest halt strace, kill the container and let strace go on
  (AUDIT_STOP); at the end its size and sha256 are checked against the
  guest's (audit_copy).  No cross-check is made there
  (audit_unaccounted).  Only as trustworthy as the guest's kernel and
  root, which see and can rewrite the log before it reaches the host.
- **/etc/hosts** (D7): kodepipe's own file (sandbox.hosts_text: loopback
  and the run's name), written in the run's folder and bound read-only,
  Podman told to make none (``--no-hosts``, the API's use_image_hosts):
  not the guest's names, nor host.containers.internal (its address).
- **The environment** (D8): ``-e`` and a profile's values, with kodepipe's
  own, go in an ``--env-file`` in the run's 0700 folder (root's, 0400,
  removed with it), sent on the channel's stdin: never on a command line,
  which the guest's ps shows and its sudo logs.  A value that file cannot
  carry (a newline, a trailing CR, a line past 64 KiB) is refused,
  naming the variable, before kp-run connects.
- **setuid/setgid files** (D10): a direct, writable run lists them in the
  workspace before and after (``find -P WS -xdev -perm /6000``, names
  NUL-separated data), and what the agent left is recorded
  (``setuid_files``) and said, by the host's rule (hostrun.report_setid).
- **Kernel quotas**: the guest's kernel is the VM's own, so what a
  container could use up there is the disposable guest's, not a host
  account's; the same limits are set all the same, as a share of the
  guest's own quotas (probed): the sigpending and msgqueue rlimits, and the
  inotify and user-namespace limits of the container's user namespace,
  written by an OCI prestart hook (``podman --hooks-dir``) that enters it
  with nsenter after the runtime made it and before the agent's first
  instruction, as hostrun.py does on the host; the container does not
  start if the hook fails.
- **A terminal** (-t): ``podman start --attach --interactive`` on an
  exec channel with a pty of its own in the guest (``Remote.terminal``),
  relayed to the user's terminal in raw mode (standard input and output
  where they are one, else /dev/tty), its size followed (SIGWINCH ->
  resize_pty), restored on every way out; -i alone: kp-run's stdin copied
  to the agent's, its end forwarded.  The exit status is the agent's.
- **--quarantine**, for the folder shared with kp-boot --share only (the
  host holds its lower layer; any other workspace is refused, saying so):
  an overlay in the guest over the share (upper and work dirs on the
  guest's disk, the host backend's options), the container on its merged
  dir; after the run the upper dir comes over one exec channel as tar into
  the run's folder here (upperdir.receive: the guest is hostile), and is
  reviewed and applied here exactly as a host run's, with no VM.
- What the guest cannot do yet (--keep:
  backend.VM_UNSUPPORTED, the VM backend's support table) is refused,
  naming the part, before anything is done in it: nothing is dropped
  silently.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from kodepipe.container import evidence, folders, sandbox
from kodepipe.container.evidence import AUDIT_LOG, EGRESS_LOG
from kodepipe.container.hostrun import new_name
from kodepipe.container.policy import DEFAULT_TERM, Policy, SecretSpec, check_workspace_place
from kodepipe.container.render import Facts, Staged, render
from kodepipe.core import fdtree, proc
from kodepipe.core.errors import BadInput, CommandFailed, Interrupted, KpError, NotFound
from kodepipe.core.records import Record
from kodepipe.core.state import Store, new_id, now_iso
from kodepipe.egress.credentials import TRUST_ENV, TRUST_STORE
from kodepipe.egress.policy import RESOLV_CONF, container_env
from kodepipe.egress.policy import Policy as EgressPolicy
from kodepipe.host import gitguard
from kodepipe.vm.hop import Outcome, Remote, connect

GUEST_DIR = "/run/kodepipe"  # root's, on the guest's tmpfs: gone at its next boot
SHARE_MOUNT = "/workspace"  # where kp-ip mounts kp-boot --share
GUEST_SECCOMP = "/usr/share/containers/seccomp.json"
GUEST_KEEP = "/var/lib/kodepipe/runs"  # root's, on the guest's disk: what a run leaves for the user to look at
CHUNK = 1 << 20
PROGRESS_EVERY = 5.0
KILL_RETRY = 2.0
CREATE_TIMEOUT = 900.0  # podman create + init: a guest's first container waits for its storage
PODMAN_ERRORS = (125, 126, 127)  # podman run's own failures (docker's convention)
TAIL_BYTES = 16384  # of an attached run's output, kept to tell Podman's own failure from the agent's

# One round trip for everything the run depends on.  $1: workspace or "", $2: image tag.
# Answers are NAME=VALUE, NUL-terminated (a path may hold a newline).
PROBE = r"""
say() { printf '%s=%s\0' "$1" "$2"; }
podman=$(command -v podman)
say podman "$podman"
say runc "$(command -v runc)"
say zstd "$(command -v zstd)"
say uid "$(id -u)"
say gid "$(id -g)"
say home "$HOME"
if sudo -n true 2>/dev/null; then say sudo yes; else say sudo no; fi
say strace "$(command -v strace)"
if [ -n "$podman" ]; then
    image=$(sudo -n podman image inspect --format '{{.Id}}' -- "$2" 2>&1)
    say image_status "$?"
    say image "$image"
fi
say inotify "$(cat /proc/sys/fs/inotify/max_user_instances) $(cat /proc/sys/fs/inotify/max_user_watches)"
say limits "$(cat /proc/self/limits)"
if [ -n "$1" ] && real=$(realpath -e -- "$1"); then
    say ws_real "$real"
    say ws_stat "$(stat -c '%u %g %F' -- "$real")"
fi
"""

# As root in the guest, one round trip for everything the run writes there before its container is made
# (each sudo over SSH costs ~1 s under TCG).  $1 GUEST_DIR, $2 Podman's overlay run dir, $3 the seccomp
# profile's path, $4 the hooks directory ("" for none), $5 the run's folder, made here (it must not exist);
# stdin: a tar of the folder's files (owners and modes kept), and the profile and the hook as STAGED_SECCOMP
# and STAGED_HOOK, renamed into place (a concurrent run reads a whole file, old or new).
STAGE = r"""
set -e
umask 022
mkdir -p "$1" "$2"
chmod 0755 "$1"
touch "$2/idmapped-lower-dir-false"
rm -f "$2/idmapped-lower-dir-true"
mkdir -m 0700 "$5"
tar -C "$5" -x -p --numeric-owner -f -
mv -f "$5/.seccomp.json" "$3"
if [ -n "$4" ]; then
    mkdir -p "$4"
    mv -f "$5/.userns-limits.json" "$4/userns-limits.json"
fi
"""
STAGED_SECCOMP, STAGED_HOOK = ".seccomp.json", ".userns-limits.json"


# -- the pure parts ----------------------------------------------------------------------------


def parse_probe(out: bytes) -> dict[str, str]:
    facts = {}
    for item in out.split(b"\0"):
        key, sep, value = item.decode("utf-8", "surrogateescape").partition("=")
        if sep:
            facts[key.strip()] = value
    return facts


def image_answer(status: str, said: str) -> str | None:
    """What the probe's ``podman image inspect`` said: the image's id, "" for an image the guest does not
    have, None for a Podman that failed to answer."""
    if status == "0":
        lines_ = said.strip().splitlines()
        return lines_[-1].strip() if lines_ else None  # warnings on stderr come first
    if status == "125" and "image not known" in said:
        return ""
    return None


def guest_workspace(vm: Record, policy: Policy) -> str | None:
    """The workspace in the guest: the one asked for, else the share kp-ip mounted, else none."""
    if policy.workspace is not None:
        path = PurePosixPath(policy.workspace)
        if not path.is_absolute():
            raise BadInput(f"inside a VM the workspace is a path in the guest and must be absolute, "
                           f"not {policy.workspace}", hint=f"for the folder shared with kp-boot --share: {SHARE_MOUNT}")
        return str(path)
    return SHARE_MOUNT if vm.get("share") else None


def check_workspace(given: str, facts: dict[str, str], vm_name: str) -> tuple[str, int, int]:
    """The guest workspace's real path and owner, or BadInput if it would expose too much."""
    real = facts.get("ws_real")
    if not real:
        hint = f"kp-ip {vm_name} mounts the folder shared with kp-boot --share at {SHARE_MOUNT}" \
            if given == SHARE_MOUNT else None
        raise BadInput(f"the workspace {given} does not exist in {vm_name}", hint=hint)
    uid, gid, kind = [*facts.get("ws_stat", "").split(" ", 2), "", "", ""][:3]
    if kind != "directory":
        raise BadInput(f"the workspace {given} in {vm_name} is not a directory")
    homes = {PurePosixPath("/root")}
    if facts.get("home", "").startswith("/"):
        homes.add(PurePosixPath(facts["home"]))
    # the rule every backend applies (D11): not /, a home, or inside a home's dot-directory
    check_workspace_place(PurePosixPath(real), homes, machine=vm_name, example=SHARE_MOUNT)
    try:
        return real, int(uid), int(gid)
    except ValueError:
        raise KpError(f"could not read the owner of {real} in {vm_name}: {facts.get('ws_stat')!r}") from None


def agent_ids(owner: tuple[int, int] | None, user: tuple[int, int]) -> tuple[int, int, str]:
    """The guest uid and gid the agent acts as, and where they came from; never root.

    The workspace's owner when that is not root (its files stay the owner's);
    else the SSH user kp-run logged in as; else a uid that owns nothing.
    """
    if owner is not None and owner[0] != 0:
        return owner[0], owner[1] or owner[0], "workspace-owner"
    if user[0] != 0:
        return user[0], user[1] or user[0], "ssh-user"
    return sandbox.FALLBACK_HOST_UID, sandbox.FALLBACK_HOST_UID, "nobody"


def _names(patterns: Iterable[str]) -> list[str]:
    """find tests for glob patterns: with a slash, a path from the workspace root; else a name
    at any depth."""
    tests: list[str] = []
    for pattern in patterns:
        if "/" in pattern:
            tests += ["-o", "-path", f"./{pattern.strip('/')}"]
        else:
            tests += ["-o", "-name", pattern]
    return ["(", *tests[1:], ")"] if tests else []


def find_argv(masks: Iterable[str]) -> list[str]:
    """``find`` (run in the workspace) printing M<path>\\0 for files to mask and C<path>\\0 for
    credential-looking files left visible.  Like the host scan, nothing is pruned for masks
    (an agent could move a .env into node_modules/ between runs)."""
    argv = ["find", "."]
    masked = _names(masks)
    if masked:
        argv += ["-type", "f", *masked, "-printf", r"M%P\0", "-o"]
    argv += ["-type", "f", *_names(sandbox.CREDENTIAL_GLOBS), "-printf", r"C%P\0"]
    return argv


def setid_argv(ws: str) -> list[str]:
    """``find`` printing each regular file with a setuid or setgid bit below the guest workspace ``ws``
    (its real path: absolute), relative to it, NUL-terminated (a name may hold any byte but NUL and
    /); never through a symlink, never onto another filesystem.  The same set as fdtree.setid_files on
    the host (D10)."""
    return ["find", "-P", ws, "-xdev", "-type", "f", "-perm", "/6000", "-printf", r"%P\0"]


def parse_setid(out: bytes) -> frozenset[str]:
    """setid_argv's answer; names are data (decoded as the host's walk decodes them: surrogateescape)."""
    return frozenset(item.decode("utf-8", "surrogateescape") for item in out.split(b"\0") if item)


def parse_found(out: bytes) -> tuple[list[str], list[str]]:
    masked, credentials = [], []
    for item in out.split(b"\0"):
        text = item.decode("utf-8", "surrogateescape")
        if text[:1] == "M":
            masked.append(text[1:])
        elif text[:1] == "C" and not set(text[1:].split("/")[:-1]) & sandbox.SKIP_DIRS:
            credentials.append(text[1:])
    return sorted(masked), sorted(credentials)


def guest_quotas(facts: dict[str, str]) -> sandbox.Quotas:
    """The guest's per-user kernel quotas, from the probe (Linux's defaults where it said nothing
    usable): its inotify sysctls and the rlimits its processes get."""
    base = sandbox.LINUX_QUOTAS
    inotify = facts.get("inotify", "").split()
    limits: dict[str, int] = {}
    for line in facts.get("limits", "").splitlines():
        for key, label in (("sigpending", "Max pending signals"), ("msgqueue", "Max msgqueue size")):
            if line.startswith(label):
                words = line[len(label):].split()
                if words and words[0].isdigit() and int(words[0]) > 0:
                    limits[key] = int(words[0])

    def number(i: int, fallback: int) -> int:
        return int(inotify[i]) if len(inotify) > i and inotify[i].isdigit() and int(inotify[i]) > 0 else fallback

    return sandbox.Quotas(inotify_instances=number(0, base.inotify_instances),
                          inotify_watches=number(1, base.inotify_watches),
                          sigpending=limits.get("sigpending", base.sigpending),
                          msgqueue=limits.get("msgqueue", base.msgqueue))


# -- git metadata in the guest's workspace (see the docstring) -----------------------------------

_KINDS = {"d": "dir", "f": "file", "l": "symlink"}
_ENTRY = r"%y %D %i %C@ %P\0"


@dataclass(frozen=True)
class GuestRepo:
    """A repository git would find in the guest's workspace, as ``find`` saw it."""

    path: str  # workspace-relative ("" is the workspace itself)
    kind: str  # the .git entry's type (dir, file, symlink, other), or "bare"
    dev: str
    ino: str
    ctime: str  # a .git file or symlink rewritten in place is a replaced one

    @property
    def ident(self) -> tuple[str, ...]:
        return (self.kind, self.dev, self.ino) if self.kind in ("dir", "bare") else \
            (self.kind, self.dev, self.ino, self.ctime)


def git_survey_argv() -> list[str]:
    """``find`` (run in the workspace, as root) printing, NUL-separated, ``TYPE DEV INODE CTIME PATH`` of
    each entry named .git (never entered), each entry that marks a bare repository, and each directory:
    never following a symlink (-P), at any depth."""
    marks: list[str] = []
    for mark in sorted(gitguard.BARE_MARKS):
        marks += ["-o", "-name", mark]
    return ["find", "-P", ".", "-name", gitguard.NAME, "-printf", _ENTRY, "-prune",
            "-o", "(", *marks[1:], ")", "-printf", _ENTRY, "-o", "-type", "d", "-printf", _ENTRY]


def parse_git_survey(out: bytes) -> dict[str, GuestRepo]:
    """The repositories in a ``git_survey_argv`` listing, by path (as gitguard.find finds them)."""
    dirs: dict[str, tuple[str, str, str]] = {}
    marks: dict[str, set[str]] = {}
    repos: dict[str, GuestRepo] = {}
    for item in out.split(b"\0"):
        fields = item.split(b" ", 4)
        if len(fields) != 5:
            continue
        kind, dev, ino, ctime = (f.decode("ascii", "replace") for f in fields[:4])
        path = os.fsdecode(fields[4])
        parent, _, name = path.rpartition("/")
        if name == gitguard.NAME:
            repos[path] = GuestRepo(path, _KINDS.get(kind, "other"), dev, ino, ctime)
            continue
        if kind == "d":
            dirs[path] = (dev, ino, ctime)
        if path and name in gitguard.BARE_MARKS:
            marks.setdefault(parent, set()).add(name)
    for path, names in marks.items():
        if gitguard.is_bare(names) and path in dirs:
            repos[path] = GuestRepo(path, "bare", *dirs[path])
    return repos


def git_protect(repos: dict[str, GuestRepo], *, writable: bool) -> list[str]:
    """The repositories bound read-only over themselves: real directories and files (never a symlink,
    never the workspace itself), at most gitguard.MAX_BINDS; none with --writable-git."""
    if writable:
        return []
    return [p for p, r in sorted(repos.items()) if p and r.kind in ("dir", "file", "bare")][:gitguard.MAX_BINDS]


def check_git_paths(ws: str, protect: Iterable[str]) -> None:
    """Refuse repositories that Podman's --mount (or a command line over SSH) cannot carry."""
    protect = list(protect)
    gitguard.check_names(protect)  # not UTF-8: refused as on the host (D12)
    check_paths(f"{ws}/{p}" for p in protect)


def git_planted(before: dict[str, GuestRepo], after: dict[str, GuestRepo]) -> list[tuple[str, str, str]]:
    """(path to move away, why, type) of each repository made or replaced since ``before``: a bare
    repository is disarmed by its HEAD, which git needs to see one there."""
    known = {r.ident for r in before.values()}
    out = []
    for path, repo in sorted(after.items()):
        if repo.ident in known:
            continue
        was = before.get(path)
        why = "new bare repository" if repo.kind == "bare" else \
            f"new {gitguard.NAME}" if was is None else f"replaced {gitguard.NAME}"
        out.append((fdtree.join(path, "HEAD") if repo.kind == "bare" else path, why, repo.kind))
    return out


# -- --writable-git: what git reads as configuration in the repositories left writable ----------

_PRINT = r"%y %m %i %s %T@ %C@ %P\0"
SNAPSHOT_FILE = gitguard.SNAPSHOT_FILE
SNAPSHOT_TOTAL = gitguard.SNAPSHOT_TOTAL

# As root in the guest, in the workspace: for each repository directory given as an argument, R<path>\0
# and then, NUL-separated, TYPE MODE INODE SIZE MTIME CTIME PATH of each entry in it (an objects
# directory is not entered: git reads it as data; never through a symlink).
WATCH = r"""
for r in "$@"; do
    printf 'R%s\0' "$r"
    find -P "./$r" -name objects -type d -prune -o -printf '""" + _PRINT + r"""'
done
"""


@dataclass(frozen=True)
class GuestPrint:
    """What identifies one guarded entry's state (gitguard.Print, as ``find`` prints it)."""

    kind: str
    mode: str
    ino: str
    size: int = 0
    mtime: str = ""
    ctime: str = ""


def parse_watch(out: bytes) -> dict[str, dict[str, GuestPrint]]:
    """{repository path: {path in it: print}} of the guarded entries in a WATCH listing: what
    gitguard.guarded notes (everything but a repository's data), with the same levels."""
    listings: dict[str, dict[str, GuestPrint]] = {}
    current: dict[str, GuestPrint] | None = None
    for item in out.split(b"\0"):
        if item[:1] == b"R":
            current = listings.setdefault(os.fsdecode(item[1:]), {})
            continue
        fields = item.split(b" ", 6)
        if current is None or len(fields) != 7:
            continue
        kind, mode, ino, size, mtime, ctime = (f.decode("ascii", "replace") for f in fields[:6])
        kind = _KINDS.get(kind, "other")
        current[os.fsdecode(fields[6])] = GuestPrint(kind, mode, ino) if kind == "dir" else \
            GuestPrint(kind, mode, ino, int(size) if size.isdigit() else -1, mtime, ctime)
    return {repo: _guarded(listing) for repo, listing in listings.items()}


def _guarded(listing: dict[str, GuestPrint]) -> dict[str, GuestPrint]:
    out = {}
    for rel, pr in listing.items():
        level, parent, keep = "repo", "", True
        for name in rel.split("/") if rel else []:
            if level == "nested" and fdtree.join(parent, "HEAD") in listing:
                level = "repo"  # a repository of its own (modules/NAME, worktrees/NAME)
            below = dict(gitguard._guarded_names(level, [name]))
            if name not in below:
                keep = False
                break
            level, parent = below[name], fdtree.join(parent, name)
        if keep:
            out[rel] = pr
    return out


def snapshot_paths(watched: dict[str, dict[str, GuestPrint]]) -> list[str]:
    """The workspace paths of the small regular guarded files whose content is kept (to put back
    what the agent changes), within gitguard's budget."""
    budget, out = SNAPSHOT_TOTAL, []
    for repo, prints in sorted(watched.items()):
        for rel, pr in sorted(prints.items()):
            if pr.kind == "file" and 0 <= pr.size <= min(SNAPSHOT_FILE, budget):
                out.append(_at(repo, rel))
                budget -= pr.size
    return out


def parse_snapshots(tar: bytes) -> dict[str, tuple[bytes, int, int, int]]:
    """{workspace path: (content, mode, uid, gid)} from ``tar -c`` of those files."""
    import io
    import tarfile

    out = {}
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:", encoding="utf-8", errors="surrogateescape") as archive:
        for member in archive:
            if member.isfile() and member.size <= SNAPSHOT_FILE:
                f = archive.extractfile(member)
                if f is not None:
                    out[member.name.removeprefix("./")] = (f.read(), member.mode & 0o7777, member.uid, member.gid)
    return out


def git_changed(watched: dict[str, dict[str, GuestPrint]], repos_before: dict[str, GuestRepo],
                repos_after: dict[str, GuestRepo], now: dict[str, dict[str, GuestPrint]]) -> list[tuple[str, str, str]]:
    """(workspace path, why, type) of each guarded entry added or changed in a watched repository
    (one still there: a moved or replaced one is git_planted's), top-most first."""
    by_ident = {r.ident: p for p, r in repos_after.items()}
    out: list[tuple[str, str, str]] = []
    for repo, before in sorted(watched.items()):
        path = by_ident.get(repos_before[repo].ident) if repo in repos_before else None
        if path is None or path not in now:
            continue
        moved: list[str] = []
        for rel, pr in sorted(now[path].items()):
            if rel == "" or any(rel == m or rel.startswith(m + "/") for m in moved):
                continue
            old = before.get(rel)
            if old == pr:
                continue
            why = ("changed" if old is not None else "new") + (f" in {gitguard.NAME}"
                                                               if repos_after[path].kind != "bare" else "")
            out.append((_at(path, rel), why, pr.kind))
            moved.append(rel)
    return out


def _at(base: str, rel: str) -> str:
    return fdtree.join(base, rel) if base and rel else base or rel


# As root in the guest: $1 the path, $2 owner, $3 mode; stdin: the content.  Never over something
# that is there (noclobber: O_EXCL), which a moved-away entry no longer is.
RESTORE = r"""
set -C
cat > "$1" && chown -h -- "$2" "$1" && chmod -- "$3" "$1"
"""


# As root in the guest: $ARGV[0] the workspace, [1] the folder for what is moved away, [2] the run's
# name; stdin: NUL-terminated workspace-relative paths.  Each is renamed (never copied: rename(2)
# fails across filesystems, then it is renamed in place to a name git never reads).  Prints, for
# each path in turn, M<new path>, or E<why>, NUL-terminated.
NEUTRALISE = r"""
use strict;
my ($ws, $dest, $run) = @ARGV;
chdir $ws or die "cannot enter $ws: $!\n";
$/ = "\0";
my ($n, $made) = (0, 0);
while (my $rel = <STDIN>) {
    chomp $rel;
    my ($parent, $base) = $rel =~ m{\A(?:(.*)/)?([^/]+)\z}s;
    $parent = "." unless defined $parent && length $parent;
    unless ($made) {
        my $p = "";
        for my $c (split m{/}, $dest) { next unless length $c; $p .= "/$c"; mkdir $p, 0700 }
        $made = 1;
    }
    my $to = "$dest/$n-" . substr($base, 0, 200);
    $n++;
    if (rename $rel, $to) { print "M$to\0"; next }
    my $pre = $parent eq "." ? "" : "$parent/";
    my $aside = "$pre$base.planted-by-$run";
    for (my $k = 1; lstat $aside; $k++) { $aside = "$pre$base.planted-by-$run.$k" }
    if (rename $rel, $aside) { print "M$ws/$aside\0" } else { print "E$!\0" }
}
"""


def parse_moved(out: bytes, count: int) -> list[tuple[str | None, str | None]]:
    """(where it went, why not) for each of ``count`` paths, from NEUTRALISE's answer."""
    answers = [os.fsdecode(a) for a in out.split(b"\0") if a]
    result: list[tuple[str | None, str | None]] = []
    for n in range(count):
        text = answers[n] if n < len(answers) else "Eno answer"
        result.append((text[1:], None) if text[:1] == "M" else (None, text[1:] or "unknown"))
    return result


def check_paths(paths: Iterable[str]) -> None:
    """Refuse paths that ``podman run --mount type=bind,source=...,destination=...`` would misread."""
    for path in paths:
        if "," in path or "\n" in path:
            raise BadInput(f"Podman's --mount cannot carry the path {path!r} (it has a comma or a newline)",
                           hint="rename it; a file name must never become a mount option")


def check_mounts(box: sandbox.Sandbox) -> None:
    check_paths(p for mount in box.mounts() for p in (mount.source, mount.dest))


def _podman(hooks_dir: str | None) -> list[str]:
    return ["sudo", "-n", "podman", *(["--hooks-dir", hooks_dir] if hooks_dir else [])]


def create_command(box: sandbox.Sandbox, hooks_dir: str | None = None) -> str:
    """One remote command line (each podman call costs seconds under TCG): ``podman create`` with the
    rendered arguments, ``podman init`` (the runtime makes the container's processes and namespaces,
    and runs the OCI hooks in ``hooks_dir``: nothing of the agent's runs yet), and the container's
    first process from ``podman inspect``, printed as ``id=ID\\0pid=PID\\0``; it stops at the first
    step that fails."""
    if box.image.startswith("-"):
        raise BadInput(f"invalid image name {box.image!r}")
    podman = _podman(hooks_dir)
    inspect = ["sudo", "-n", "podman", "inspect", "--format", "{{.State.Pid}}", "--", box.name]
    return (f"id=$({shlex.join([*podman, 'create', *box.podman_args()])}) && "
            f"{shlex.join([*podman, 'init', '--', box.name])} >/dev/null && "
            f"pid=$({shlex.join(inspect)}) && printf 'id=%s\\0pid=%s\\0' \"$id\" \"$pid\"")


def parse_created(outcome: Outcome, vm_name: str) -> Created:
    """The container create_command made, or why Podman could not make it."""
    if outcome.status != 0:
        lines = [ln for ln in outcome.stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
        said = lines[-1].removeprefix("Error: ") if lines else f"status {outcome.status}"
        raise KpError(f"Podman in {vm_name} could not create the container: {said}", code="podman")
    answers = parse_probe(outcome.stdout)
    pid = answers.get("pid", "")
    if not pid.isdigit() or int(pid) <= 0:
        raise KpError(f"Podman in {vm_name} did not say which process the container's is ({pid!r}): kp-run "
                      "does not start it without what must hold before its first instruction", code="podman")
    return Created(answers.get("id", ""), int(pid))


def start_command(name: str, hooks_dir: str | None = None, *, interactive: bool = False) -> str:
    """The remote command line that starts the created container and stays attached to its output
    until it ends (``interactive``: and copies its own stdin to the container's, -i and -t); its exit
    status is the container's (--rm: then Podman removes it)."""
    return shlex.join([*_podman(hooks_dir), "start", "--attach", *(["--interactive"] if interactive else []),
                       "--", name])


# An OCI prestart hook, run by the runtime as the guest's root once the container's processes and
# namespaces exist and before anything of it runs (as hostrun.py does with nsenter on the host): $1 is
# userns.script's shell commands; stdin the container's state, whose "pid" is its first process.  Run
# as ``sh -c``: no file to execute (Debian mounts /run noexec).
QUOTA_HOOK = r"""
pid=$(sed -n 's/.*"pid": *\([0-9][0-9]*\).*/\1/p' | head -n 1)
if [ -z "$pid" ]; then echo "kodepipe: no pid in the container's state" >&2; exit 1; fi
exec nsenter --user --target "$pid" -- /bin/sh -c "$1"
"""


def quota_hook(values: dict[str, int]) -> tuple[str, bytes]:
    """The hooks directory (named by its content) and the hook's JSON that sets ``values`` in the
    container's user namespace; the container does not start if it fails."""
    import orjson

    from kodepipe.container import userns

    hook = {"version": "1.0.0",
            "hook": {"path": "/bin/sh", "args": ["sh", "-c", QUOTA_HOOK, "userns-limits", userns.script(values)]},
            "when": {"always": True}, "stages": ["prestart"]}
    text = orjson.dumps(hook)
    return f"{GUEST_DIR}/hooks-{hashlib.sha256(text).hexdigest()[:12]}", text




def seccomp_path(text: bytes) -> str:
    return f"{GUEST_DIR}/seccomp-{hashlib.sha256(text).hexdigest()[:12]}.json"


# -- --audit: strace in the guest, outside the container, its log copied to the host -------------

AUDIT_DIR = "audit"  # in the run's folder on the guest's disk (GUEST_KEEP/NAME-ID): the log, strace's words
AUDIT_ATTACH_WAIT = 120  # s: strace attaching in a guest under TCG, at a load of 5-10
AUDIT_END_WAIT = 120  # s: strace writing the processes' ends once the container is gone

# As root in the guest: $1 the run's audit folder, $2 the log's size limit (RLIMIT_FSIZE: the cap plus
# audit/cap.SLACK, the backstop when kp-run is gone), $3 the container's first process, $4 seconds to
# wait for the attach; then strace and its arguments.  A watcher in a session of its own, whose
# stdio is no SSH channel's (it holds when SSH is gone), runs strace, and when strace ends other than
# with 0 (killed, or the log's limit reached: SIGXFSZ) while the container's first process is still
# the one it was, kills that process, which takes the container's every process with it; then writes
# strace's status.  Prints strace=PID\0start=START\0 once strace is attached.
AUDIT_START = r"""
umask 077
dir=$1 limit=$2 pid=$3 wait=$4
shift 4
mkdir -p -- "$dir" || exit 1
started() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f20; }
start=$(started "$pid")
if [ -z "$start" ]; then echo "the container's process $pid is gone" >&2; exit 1; fi
setsid sh -c '
dir=$1 limit=$2 pid=$3 start=$4
shift 4
prlimit --fsize="$limit" -- "$@" 2>"$dir/strace.err" &
echo $! > "$dir/strace.pid"
wait $!
status=$?
if [ "$status" != 0 ] && [ "$(sed "s/.*) //" "/proc/$pid/stat" 2>/dev/null | cut -d" " -f20)" = "$start" ]; then
    kill -KILL "$pid" && echo "$status" > "$dir/container.killed"
fi
echo "$status" > "$dir/strace.status"
' kp-audit "$dir" "$limit" "$pid" "$start" "$@" </dev/null >/dev/null 2>&1 &
n=0
until [ -s "$dir/strace.pid" ] && grep -q ' attached' "$dir/strace.err" 2>/dev/null; do
    if [ -e "$dir/strace.status" ]; then
        echo "strace ended (status $(cat "$dir/strace.status")): $(tail -c 2000 "$dir/strace.err")" >&2
        exit 1
    fi
    n=$((n + 1))
    if [ "$n" -gt $((wait * 10)) ]; then
        echo "strace did not attach within $wait s: $(tail -c 2000 "$dir/strace.err")" >&2
        exit 1
    fi
    sleep 0.1
done
printf 'strace=%s\0start=%s\0' "$(cat "$dir/strace.pid")" "$start"
"""

# As root in the guest: $1 strace's pid, $2 the container's first process, $3 its start time.  The cap
# (audit/cap.py): strace halted (every traced process stops at its next system call), the container
# killed, strace let go on to write the ends.
AUDIT_STOP = r"""
kill -STOP "$1" 2>/dev/null
if [ "$(sed 's/.*) //' "/proc/$2/stat" 2>/dev/null | cut -d' ' -f20)" = "$3" ]; then kill -KILL "$2"; fi
kill -CONT "$1" 2>/dev/null
exit 0
"""

# As root in the guest: $1 the run's audit folder, $2 seconds to wait for strace's end.  How strace
# ended, whether the watcher killed the container, strace's last words, and the log's size and sha256,
# as NAME=VALUE\0.
AUDIT_END = r"""
dir=$1 n=0
while [ ! -e "$dir/strace.status" ] && [ "$n" -lt $(($2 * 10)) ]; do n=$((n + 1)); sleep 0.1; done
printf 'status=%s\0' "$(cat "$dir/strace.status" 2>/dev/null)"
printf 'killed=%s\0' "$(cat "$dir/container.killed" 2>/dev/null)"
printf 'said=%s\0' "$(grep -v ' attached' "$dir/strace.err" 2>/dev/null | tail -n 4 | tail -c 1000)"
printf 'size=%s\0' "$(stat -c %s -- "$dir/audit.strace" 2>/dev/null)"
printf 'sha256=%s\0' "$(sha256sum < "$dir/audit.strace" 2>/dev/null | cut -d' ' -f1)"
"""


def audit_start_command(folder: str, limit: int, pid: int, wait: int, argv: list[str]) -> str:
    """The remote command that attaches strace (``argv``, its arguments) to ``pid`` (AUDIT_START)."""
    return _q("sudo", "-n", "sh", "-c", AUDIT_START, "kp-run", folder, str(limit), str(pid), str(wait),
              "strace", *argv)


def audit_copy_command(log: str, strace_pid: int) -> str:
    """The remote command that writes the log as it grows, from its first byte, until strace has ended
    (and the rest is read)."""
    return _q("sudo", "-n", "tail", "-c", "+0", "-s", "0.2", "-f", f"--pid={strace_pid}", "--", log)


def strace_ending(status: str) -> str:
    """How strace ended, from the status its watcher wrote (the shell's: 128+N for a signal)."""
    import signal

    if status.isdigit() and 128 < int(status) < 160:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(int(status) - 128).name}"
    return f"ended with status {status}" if status else "did not say how it ended"


class LogCopy:
    """Bytes from a channel into a host file (the guest's audit log, copied as strace writes it): at
    most ``limit`` of them (the guest is not trusted with the host's disk), counted and hashed."""

    def __init__(self, channel: Any, path: Path, limit: int) -> None:
        self.channel, self.path, self.limit = channel, path, limit
        self.size = 0
        self.sha256 = hashlib.sha256()
        self.over = False  # the guest sent more than the limit: the rest was not written
        self.failed: str | None = None
        self.thread = threading.Thread(target=self._copy, name="kp-audit-copy", daemon=True)

    def start(self) -> LogCopy:
        self.thread.start()
        return self

    def _copy(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            self.failed = f"could not write {self.path}: {exc.strerror}"
            return
        try:
            while data := self.channel.recv(CHUNK):
                room = self.limit - self.size
                if len(data) > room:
                    data, self.over = data[:room], True
                os.write(fd, data)  # a regular file: written whole
                self.size += len(data)
                self.sha256.update(data)
                if self.over:
                    break
        except Exception as exc:  # the connection went: what was copied stays, and the end says so
            self.failed = f"the copy broke off: {exc!r}"
        finally:
            os.close(fd)

    def wait(self, timeout: float) -> bool:
        """Whether the copy has ended (the channel's end reached, or given up) within ``timeout``."""
        self.thread.join(timeout)
        return not self.thread.is_alive()


def podman_failure(status: int, stderr: bytes) -> str | None:
    """Podman's own error message when ``podman run`` failed before the command ran: status 125
    (Podman), 126 (the runtime could not start it) or 127 (no such command), with Podman's
    "Error: " as the last line (a command's own 126 or 127 comes from its shell, in other words)."""
    if status not in PODMAN_ERRORS:
        return None
    lines = [ln for ln in stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
    return lines[-1].removeprefix("Error: ") if lines and lines[-1].startswith("Error: ") else None


def git_warnings(repos: dict[str, GuestRepo], protect: list[str], *, writable: bool) -> list[str]:
    """What to tell the user about the workspace's repositories before the run."""
    from kodepipe.core.terminal import escape

    out = [f"{escape(fdtree.display(p))} is a symbolic link, not a repository: kp-run does not follow it, and the "
           "agent sees only the link (if you did not make it, an agent may have: look before you run git there)"
           for p, r in sorted(repos.items()) if r.kind in ("symlink", "other")]
    bindable = [p for p, r in repos.items() if p and r.kind in ("dir", "file", "bare")]
    if not writable and len(protect) < len(bindable):
        out.append(f"the workspace holds more than {gitguard.MAX_BINDS} git repositories: the first "
                   f"{gitguard.MAX_BINDS} are read-only, the others are only checked for replacement after the run")
    if "" in repos and not writable:
        out.append("the workspace is itself a bare git repository: it cannot be made read-only without the "
                   "workspace; a replaced one is still moved away after the run")
    return out


def check_env_file(policy: Policy) -> None:
    """Unsupported (naming the variable, never its value) for a -e or profile value that Podman's
    --env-file cannot carry exactly: kp-run passes them in one inside a VM (D8), never on a command line."""
    from kodepipe.container.backend import Part, Unsupported

    for name, value in policy.env:
        why = sandbox.env_file_refusal(name, value)
        if why is not None:
            raise Unsupported(Part.ENV, f"not possible inside a VM for this value: {why}, which Podman's "
                              "--env-file cannot carry", hint="run it on the host, or hand the value over in a "
                              "file with --secret")


def read_secrets(secrets: Iterable[SecretSpec]) -> list[bytes]:
    """Each --secret file, read on the host as the host backend reads it (hostpath.open_secret: no
    symlink but root's followed, regular files only, 64 MiB at most)."""
    from kodepipe.host import hostpath

    return [hostpath.read_secret(Path(s.source)) for s in secrets]


# -- --quarantine: the overlay in the guest, its upper dir reviewed and applied on the host --------

QUARANTINE_DIR = "quarantine"  # in the run's folder on the guest's disk (GUEST_KEEP/NAME-ID): upper, work, merged
UPPER_STALL = 300.0  # s without a byte of the upper dir's stream: the guest stopped sending it
UPPER_DEADLINE = 6 * 3600.0  # s for the whole stream (caps bound its size: upperdir.Caps)
UPPER_STATUS_WAIT = 60.0  # s for the guest tar's exit status once its stream has ended
OVERLAY_OPTIONS = "redirect_dir=off,metacopy=off,index=off,nosuid,nodev"  # the host backend's (hostrun.stage)
ELSEWHERE = ("the workspace's lower layer is only in the guest; review and apply are decided on the host "
             f"(only the folder shared with kp-boot --share, {SHARE_MOUNT} or beneath it, can be quarantined)")

# As root in the guest: $1 the run's quarantine folder (its parent is made here), $2 the workspace (the
# lower dir, on the 9p share), $3 OVERLAY_OPTIONS (the host backend's).  The upper dir takes the
# workspace's owner and mode (the overlay's root takes them from it).
OVERLAY = r"""
set -e
umask 077
if [ "$(findmnt -n -o FSTYPE -T "$2")" != 9p ]; then  # (statfs over 9p says the host's filesystem)
    echo "$2 is not on the folder shared with kp-boot --share (not a 9p mount)" >&2
    exit 3
fi
mkdir -p -- "${1%/*}"
mkdir -- "$1" "$1/upper" "$1/work" "$1/merged"
chown --reference="$2" -- "$1/upper"
chmod --reference="$2" -- "$1/upper"
mount -t overlay overlay -o "lowerdir=$2,upperdir=$1/upper,workdir=$1/work,$3" -- "$1/merged"
"""

# As root in the guest, on one exec channel: $1 the merged dir, $2 the upper dir.  The overlay is
# unmounted (the container is gone), then the upper dir is written as tar on stdout (upperdir.py reads
# it: GNU tar's pax with the overlay's xattrs).  Its exit status must be 0.
UPPER_TAR = r"""
umount -- "$1" || exit 1
exec env LC_ALL=C tar --xattrs --xattrs-include='trusted.overlay.*' -C "$2" -cf - .
"""

# As root in the guest: $1 the run's quarantine folder, $2 "keep" to leave its upper dir (a review that
# failed: kp-rm removes it with the run), else it goes, with the run's folder if nothing else is in it.
OVERLAY_END = r"""
if mountpoint -q -- "$1/merged"; then umount -- "$1/merged" || umount -l -- "$1/merged" || exit 1; fi
if [ "$2" != keep ]; then rm -rf -- "$1" && { rmdir -- "${1%/*}" 2>/dev/null; true; }; fi
"""


def quarantine_share(vm: Record, workspace: str | None) -> str:
    """The workspace's path under the share (``SHARE_MOUNT``: "." for the share itself) of a VM booted
    with kp-boot --share: the one workspace a VM can quarantine, since the host holds its lower layer
    (the review and the apply are the host's).  Any other: Unsupported, before anything is done."""
    from kodepipe.container.backend import Part, Unsupported

    path = PurePosixPath(os.path.normpath(workspace)) if workspace else None
    if not vm.get("share") or path is None or not path.is_relative_to(SHARE_MOUNT):
        where = f"for {path}" if path is not None else "without a workspace"
        raise Unsupported(Part.QUARANTINE, f"refused {where} in {vm.get('name')}: {ELSEWHERE}",
                          hint=f"boot the VM with kp-boot --share DIR and give -w {SHARE_MOUNT}[/SUBDIR], "
                               "or run it on the host (without vm records on stdin)")
    if any(c in str(path) for c in ":\\,\n"):  # the overlay's lowerdir= cannot carry them
        raise Unsupported(Part.QUARANTINE, f"refused for {path!r}: an overlay's lowerdir option cannot carry a "
                          "path with ':', '\\', ',' or a newline", hint="rename it")
    return str(path.relative_to(SHARE_MOUNT))


def host_lower(vm: Record, rel: str) -> Path:
    """The host directory that the guest sees at ``SHARE_MOUNT/rel``: the quarantine's lower layer on the
    host, where the review and the apply happen.  Reached through no symbolic link, and a workspace by
    the host's own rule (the apply writes there); else Unsupported."""
    from kodepipe.container.backend import Part, Unsupported

    share = Path(os.path.realpath(str(vm.get("share"))))
    path = share / rel if rel != "." else share
    if Path(os.path.realpath(path)) != path or not path.is_dir():
        raise Unsupported(Part.QUARANTINE, f"refused for {PurePosixPath(SHARE_MOUNT, rel)}: on the host, {path} is "
                          "not a directory reached without a symbolic link, so the review could not read the lower "
                          "layer the guest's overlay had", hint="give the real directory")
    sandbox.check_workspace(path)  # the host's rule: the apply writes there
    return path


@dataclass(frozen=True)
class GuestQuarantine:
    """A quarantined run in a VM: the overlay in the guest, and the host's side of its review."""

    folder: str  # GUEST_KEEP/NAME-ID/quarantine: upper, work, merged (the guest's disk, not its tmpfs)
    lower: Path  # the host directory the guest's lower dir is (under kp-boot --share)
    owner: tuple[int, int]  # the host ids the extracted upper dir belongs to (as the host backend's would)

    @property
    def upper(self) -> str:
        return f"{self.folder}/upper"

    @property
    def merged(self) -> str:
        return f"{self.folder}/merged"


class ChannelStream:
    """The read end of an exec channel, as upperdir.receive reads it: each read waits at most ``stall``
    seconds, all of them together ``deadline`` seconds; past either, the stream is cut (Truncated).  What
    the command says on stderr is kept (its end), so that the channel's window never fills with it."""

    def __init__(self, channel: Any, *, stall: float | None = None, deadline: float | None = None) -> None:
        self.channel = channel
        self.stall = UPPER_STALL if stall is None else stall
        self.deadline = UPPER_DEADLINE if deadline is None else deadline
        self.ends = time.monotonic() + self.deadline
        self.said = b""
        channel.settimeout(self.stall)

    def read(self, size: int, /) -> bytes:
        from kodepipe.container.tarstream import Truncated

        if time.monotonic() > self.ends:
            raise Truncated(f"the guest took more than {self.deadline:g} s to send the quarantine's upper dir: cut "
                            "off", hint="the upper dir stays in the guest; kp-rm discards the run")
        try:
            data: bytes = self.channel.recv(size)
        except TimeoutError:  # socket.timeout is TimeoutError
            raise Truncated(f"the guest sent nothing of the quarantine's upper dir for {self.stall:g} s: cut off",
                            hint="the upper dir stays in the guest; kp-rm discards the run") from None
        self._stderr()
        return data

    def _stderr(self) -> None:
        with contextlib.suppress(Exception):
            while self.channel.recv_stderr_ready():
                self.said = (self.said + self.channel.recv_stderr(65536))[-4096:]

    def status(self, wait: float | None = None) -> int | None:
        """The command's exit status once it ended (None if it did not say within ``wait``)."""
        deadline = time.monotonic() + (UPPER_STATUS_WAIT if wait is None else wait)
        while not self.channel.exit_status_ready():
            if time.monotonic() > deadline:
                return None
            self._stderr()
            time.sleep(0.05)
        self._stderr()
        return int(self.channel.recv_exit_status())


# -- the guest, over SSH -----------------------------------------------------------------------


def _q(*words: str) -> str:
    return shlex.join(words)


def _script(script: str, *args: str) -> str:
    """``sh -c SCRIPT`` with positional arguments, as one quoted command line."""
    return _q("sh", "-c", script, "kp-run", *args)


# -- one run -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GitBefore:
    """The guest workspace's git repositories as the run found them (what check_git compares with)."""

    workspace: str  # its real path in the guest
    repos: dict[str, GuestRepo]
    watched: dict[str, dict[str, GuestPrint]]  # --writable-git: the guarded entries of the writable ones
    copies: dict[str, tuple[bytes, int, int, int]]  # and their small files' contents


@dataclass(frozen=True)
class Prepared:
    """Everything the container needs, in place: the connection, the rendered container, the guest's
    and the host's folders of the run."""

    remote: Remote
    box: sandbox.Sandbox
    hooks_dir: str | None  # the OCI hook that sets the kernel quotas of its user namespace
    host_folder: Path  # the run's folder in the host's store (kind container, host = the VM)
    git: GitBefore | None = None  # None without a workspace
    egress: EgressPolicy | None = None  # the proxy's rules and pins, when the policy allows any
    quarantine: GuestQuarantine | None = None  # --quarantine: the overlay in the guest, reviewed on the host
    setid_before: frozenset[str] | None = None  # a direct, writable run: setuid/setgid files before it (D10)


@dataclass(frozen=True)
class Created:
    """A container made and initialised, not started: its processes and namespaces exist, the agent
    has not run a single instruction."""

    id: str
    pid: int  # its first process, as the guest sees it


class VmRun:
    """One run in a VM, owned from its first SSH command to its last (as QEMUMachine owns a VM).

    A context manager: whatever the run set up (the SSH connection, the run's folder in the guest and
    its folder in the host's store) is undone on leaving it, on every path.  Each stage takes what the
    stages before it returned and returns its own result, frozen:

    - prepare() -> Prepared: refusals, the probe, the workspace, masks and repositories, the image,
      seccomp, the quota hook, the run's folders, the rendered container;
    - container(prepared) -> Created, a context manager: ``podman create``, ``init`` and the container's
      pid in one SSH command; on leaving it the container is gone (removed here unless it ended);
    - attachments(prepared, created), a context manager: what must hold from before the agent's first
      instruction to its end (the egress relay);
    - start(prepared) -> status: ``podman start --attach``, streamed, under the time limit;
    - finish(prepared, status, outcome) -> the record.

    _run is the order.  A failure carries the record of the run so far (KpError.record).
    """

    def __init__(self, vm: Record, policy: Policy, say: Callable[[str, str], None],
                 remote: Callable[[Record], Remote] = connect,
                 sink: Callable[[bytes], None] | None = None, store: Store | None = None) -> None:
        if policy.image is None:
            raise RuntimeError("kp-run: the profile's image was not built")
        self.vm, self.say = vm, say
        self.image: str = policy.image
        self.vm_name = str(vm.get("name"))
        self.name = policy.name or new_name()
        self.connect = remote
        self.sink = sink or _to_stderr
        self.store = store if store is not None else Store()
        self.timed_out = False
        self.upper_left = False  # --quarantine: a review that failed left the upper dir (kp-rm removes it)
        self.meta: dict[str, Any] = {"kind": "container", "name": self.name, "id": new_id(), "created": now_iso(),
                                     "state": "creating", "host": self.vm_name, "vm_id": vm.get("id"),
                                     "image": policy.image, "profile": policy.profile,
                                     "command": list(policy.command),
                                     **({"evidence": {"signed": True}} if policy.sign else {})}
        self.policy = policy
        self.chainer: Any = None  # core.chain.Follower of the audit log's host copy
        self._undo = contextlib.ExitStack()  # what the run set up, undone in reverse on leaving it

    def __enter__(self) -> VmRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self._undo.close()

    def image_there(self, remote: Remote, facts: dict[str, str]) -> str:
        """The guest's id of the image, or "" when the guest does not have it.  A Podman that could not
        answer (its store locked by another podman, say) is asked again, twice; never taken for "missing",
        which would copy the whole image in for nothing."""
        for attempt in range(3):
            if attempt:
                time.sleep(attempt)
                retry = remote.run(_q("sudo", "-n", "podman", "image", "inspect", "--format", "{{.Id}}", "--",
                                      self.image) + " 2>&1; echo \"image_status=$?\"")
                said, _, status = bytes(retry.stdout).decode(errors="replace").rstrip("\n").rpartition("image_status=")
                facts = {"image_status": status, "image": said}
            answer = image_answer(facts.get("image_status", ""), facts.get("image", ""))
            if answer is not None:
                return answer
        from kodepipe.core.terminal import escape

        raise KpError(f"Podman in {self.vm_name} could not say whether it has the image {self.image}: "
                      f"{escape(facts.get('image', '').strip()[-300:])}", code="podman")

    def prepare(self) -> Prepared:
        from kodepipe.container.backend import VmBackend

        VmBackend(self.vm).refuse(self.policy)  # what the guest cannot honour: refused before connecting
        check_env_file(self.policy)  # the values go in an --env-file (D8): refused if it cannot carry one
        # the workspace in the guest: the one asked for, else the share (its policy: the same as for -w)
        self.policy = policy = self.policy.with_workspace(guest_workspace(self.vm, self.policy))
        wanted = policy.workspace
        remote = self.connect(self.vm)
        self._undo.callback(_close, remote)
        probe = remote.run(_script(PROBE, wanted or "", self.image))
        facts = parse_probe(probe.stdout)
        if not facts.get("podman"):
            raise KpError(f"{self.vm_name} has no Podman: its image was built without it", code="no_podman",
                          hint="rebuild the image with kp-image build NAME (which now includes Podman), "
                               "or add --packages podman")
        if facts.get("sudo") != "yes":
            raise KpError(f"kp-run needs passwordless sudo in {self.vm_name} (to run rootful Podman there), and "
                          "the SSH user has none", code="no_sudo",
                          hint="images from kp-image build give their user passwordless sudo")
        if policy.audit is not None and not facts.get("strace"):  # images built before it joined them
            from kodepipe.container.backend import Part, Unsupported

            raise Unsupported(Part.AUDIT, f"impossible in VM {self.vm_name}: it has no strace",
                              hint="rebuild its image (kp-image build) and clone again")
        try:
            user = int(facts["uid"]), int(facts["gid"])
        except (KeyError, ValueError):
            raise KpError(f"could not learn the SSH user's ids in {self.vm_name}: "
                          f"{probe.stderr.decode(errors='replace')[-500:]}") from None

        ws = owner = None
        setid_before = None
        masked: list[str] = []
        protect: list[str] = []
        git = None
        if wanted is not None:
            ws, ouid, ogid = check_workspace(wanted, facts, self.vm_name)
            owner = (ouid, ogid)
            masked, credentials = self.scan(remote, ws)
            if credentials:
                shown = ", ".join(credentials[:8]) + (" ..." if len(credentials) > 8 else "")
                self.say("warn", f"the workspace holds files that look like credentials, and the agent can "
                                 f"read them: {shown} (hide them with --mask GLOB)")
            repos = self.survey_git(remote, ws)
            protect = git_protect(repos, writable=policy.git_writable)
            check_git_paths(ws, protect)
            watched: dict[str, dict[str, GuestPrint]] = {}
            copies: dict[str, tuple[bytes, int, int, int]] = {}
            if not policy.read_only_workspace and not policy.quarantine:  # quarantine: the share is not written
                watched, copies = self.watch_git(remote, ws, [p for p, r in sorted(repos.items())
                                                              if r.kind in ("dir", "bare") and p not in protect])
            git = GitBefore(ws, repos, watched, copies)
            if not policy.read_only_workspace and not policy.quarantine:  # the host's rule (hostrun.finish)
                setid_before = self.setid_files(remote, ws)
            for warning in git_warnings(repos, protect, writable=policy.git_writable):
                self.say("warn", warning)
        quarantine = self.plan_quarantine(ws) if policy.quarantine else None  # or Unsupported, before anything
        uid, gid, source = agent_ids(owner, user)
        check_paths([*([ws] if ws else []), *(f"{sandbox.WORKSPACE}/{m}" for m in masked),
                     *(s.dest for s in policy.secrets)])
        secret_data = read_secrets(policy.secrets)  # before anything changes in the guest
        egress = None
        if policy.egress is not None:
            egress = EgressPolicy.build(policy.egress.rules, policy.egress.pins, policy.credentials,
                                        policy.budgets)
            if egress.intercepted_hosts():  # interception mode: the run's own CA, in kp-run's memory only
                from kodepipe.egress.ca import RunCA

                egress.ca = RunCA(egress.intercepted_hosts(), policy.name or "run")
            _raise_nofile()

        host_folder = self.host_folder()  # the side effects start here
        # missing, or another image under the same tag (rebuilt on the host since): copy it in
        there = self.image_there(remote, facts)
        if not there or host_image_id(self.image) not in (None, there):
            self.meta["image_transfer"] = self.copy_image(remote, zstd=bool(facts.get("zstd")))
        seccomp = self.guest_seccomp(remote)
        quotas = guest_quotas(facts).share(policy.quota_share)
        hook = self.prepare_hook(quotas.userns_sysctls())
        folder = f"{GUEST_DIR}/{self.name}-{self.meta['id']}"
        files = {"resolv.conf": RESOLV_CONF.encode()} if egress is not None else {}
        files["hosts"] = sandbox.hosts_text(self.name).encode()  # kodepipe's /etc/hosts, as on the host (D7)
        trust_env: dict[str, str] = {}
        if egress is not None and egress.ca is not None:  # the run's CA in the trust store, its key not
            files["ca-certificates.crt"] = egress.ca.bundle()
            trust_env = dict.fromkeys(TRUST_ENV, TRUST_STORE)
        staged, secret_list = self.folder_files(folder, uid, gid, secret_data, files)
        mask_file = f"{folder}/empty" if masked else None
        extra_mounts = [sandbox.Mount(f"{folder}/resolv.conf", "/etc/resolv.conf", True)] if egress else []
        extra_mounts.append(sandbox.Mount(f"{folder}/hosts", "/etc/hosts", True))  # and podman --no-hosts
        if trust_env:
            extra_mounts.append(sandbox.Mount(f"{folder}/ca-certificates.crt", TRUST_STORE, True))

        bound = ws  # what the container gets as its workspace: the overlay's merged dir in quarantine
        if quarantine is not None and ws is not None:
            bound = self.mount_overlay(remote, quarantine, ws)
        guest = Facts(agent_uid=uid, agent_gid=gid, uid_from=source, workspace=bound, seccomp=seccomp[0],
                      # crun is what Debian's podman brings; runc only where the guest has it
                      oci_runtime="runc" if facts.get("runc") else None, quotas=quotas, masked=tuple(masked),
                      protect=tuple(protect), protect_sources={p: f"{bound}/{p}" for p in protect})
        box = render(policy, guest, Staged(name=self.name, run_id=self.meta["id"], secrets=tuple(secret_list),
                                           mask_file=mask_file, extra_mounts=tuple(extra_mounts),
                                           extra_env={**container_env(), **trust_env} if egress is not None
                                           else {},
                                           env_file=f"{folder}/env"))
        check_mounts(box)
        if box.env_file is not None:  # the container's environment: root's, 0400, removed with the folder
            staged.append(StagedFile(PurePosixPath(box.env_file).name, box.env_file_text(), 0o400))
        self.stage(remote, folder, seccomp, hook, staged)
        self.meta.update(
            policy.record(),  # the policy's keys, the same on every backend
            workspace=ws,
            user={"agent_uid": sandbox.AGENT_UID, "host_uid": uid, "host_gid": gid, "from": source},
            masked=masked, protected=protect,
            kernel_quotas=box.quotas.record(),
            engine=f"podman in {self.vm_name}")
        if quarantine is not None:
            self.meta["quarantine"] = {"lower": str(quarantine.lower), "owner": list(quarantine.owner),
                                       "guest": quarantine.upper}
        return Prepared(remote, box, hook[0], host_folder, git, egress, quarantine=quarantine,
                        setid_before=setid_before)

    @contextlib.contextmanager
    def container(self, prepared: Prepared) -> Iterator[Created]:
        """The container made and initialised, not started, and its first process: ``podman create``
        (the rendered arguments), ``podman init`` and ``podman inspect`` in one SSH command (each podman
        call costs seconds under TCG).  On leaving this the container is gone: it went by itself (--rm)
        if start() saw it end; otherwise (a failure, an interruption, a lost connection) it is removed."""
        remote = prepared.remote
        self.meta["container_name"] = self.name
        try:
            made = remote.run(create_command(prepared.box, prepared.hooks_dir), timeout=CREATE_TIMEOUT)
            created = parse_created(made, self.vm_name)
            self.meta["container_id"] = created.id
            yield created
        except BaseException:
            self.meta["container_removed"] = self._remove_container(remote)
            raise
        self.meta["container_removed"] = True

    @contextlib.contextmanager
    def attachments(self, prepared: Prepared, created: Created) -> Iterator[None]:
        """What must hold from before the agent's first instruction to its end, given the container's
        processes and namespaces (``created.pid``): each entered in turn, and undone in reverse once the
        container has ended, or the run failed.  The place for more (a tracer, a terminal)."""
        with contextlib.ExitStack() as attached:
            if prepared.egress is not None:
                attached.enter_context(self.egress_relay(prepared, created))
            if self.policy.audit is not None:
                attached.enter_context(self.audit_tracer(prepared, created))
            yield

    @contextlib.contextmanager
    def egress_relay(self, prepared: Prepared, created: Created) -> Iterator[None]:
        """kodepipe's proxy on the host, reached from the container's network namespace through relay.pl,
        nsentered there by the guest's root on an SSH channel of its own (egress/relay.py): the same
        policy and DecisionLog as on the host, the log in the host's folder of the run.  Fail closed: the
        relay exits when the channel ends, and the namespace has nothing but lo again."""
        from kodepipe.egress import relay
        from kodepipe.egress.proxy import DecisionLog, Proxy

        if prepared.egress is None:
            raise ValueError("egress_relay: the policy allows nothing")
        path = prepared.host_folder / EGRESS_LOG
        log = DecisionLog(path, self.name)
        self.meta["egress_log"] = str(path)
        with contextlib.ExitStack() as undo:
            proxy = Proxy(prepared.egress, log)
            undo.callback(self._egress_counts, log, proxy)
            channel = prepared.remote.open(relay.relay_command(created.pid))
            undo.callback(channel.close)
            proxy.start(None, None)
            undo.callback(proxy.stop)
            session = relay.Relay(proxy, channel)
            session.start()
            undo.callback(session.stop)
            try:
                session.wait_ready()
            except relay.RelayError as exc:
                said = _stderr_of(channel)
                raise relay.RelayError(f"{self.vm_name}: {exc.message}" + (f" ({said})" if said else ""),
                                       code="failed") from None
            yield

    def _egress_counts(self, log: Any, proxy: Any) -> None:
        self.meta["egress"] = dict(log.counts)
        if proxy.ledger.budgets:
            self.meta["budget_used"] = proxy.ledger.record()
        log.close()

    @contextlib.contextmanager
    def audit_tracer(self, prepared: Prepared, created: Created) -> Iterator[None]:
        """--audit: strace attached by the guest's root to the container's first process before its first
        instruction, with the host's flags (audit/strace.attach_argv), its log on the guest's disk under
        RLIMIT_FSIZE, and a watcher in the guest that kills the container if strace ends abnormally, SSH or
        not (AUDIT_START).  The log is copied as it grows, over a channel of its own, into the host's folder
        of the run (audit.strace: kp-trace reads it as a host one), where audit/cap.SizeCap watches it and
        has the guest stop the run at the cap.  At the end, the copy's size and sha256 are compared with
        the log's in the guest (audit_copy)."""
        from kodepipe.audit import cap as auditcap
        from kodepipe.audit import strace

        audit = self.policy.audit
        if audit is None:
            raise ValueError("audit_tracer: the policy has no --audit")
        remote = prepared.remote
        folder = f"{GUEST_KEEP}/{self.name}-{self.meta['id']}/{AUDIT_DIR}"
        guest_log = f"{folder}/{AUDIT_LOG}"
        limit = audit.cap + auditcap.SLACK
        argv = strace.attach_argv(audit.mode, guest_log, created.pid)
        try:
            attached = self._check(remote.run(audit_start_command(folder, limit, created.pid, AUDIT_ATTACH_WAIT, argv),
                                              timeout=AUDIT_ATTACH_WAIT + 60), "attaching strace to the container")
            answers = parse_probe(attached.stdout)
            if not answers.get("strace", "").isdigit():
                raise KpError(f"{self.vm_name}: strace's pid is unknown ({answers.get('strace')!r}): kp-run does "
                              "not start the container without its tracer")
        except BaseException:
            with contextlib.suppress(Exception):
                remote.run(_q("sudo", "-n", "rm", "-rf", "--", folder), timeout=60)
            raise
        stop = _q("sudo", "-n", "sh", "-c", AUDIT_STOP, "kp-run", answers["strace"], str(created.pid),
                  answers.get("start", ""))
        host_log = prepared.host_folder / AUDIT_LOG
        self.meta.update(audit_log=str(host_log), audit_tracer="attached",
                         audit_blind=[*strace.BLIND[audit.mode], strace.ATTACHED_NOTE])
        copy = LogCopy(remote.open(audit_copy_command(guest_log, int(answers["strace"]))), host_log, limit).start()
        from kodepipe.core import chain

        self.chainer = chain.Follower(host_log).start()  # the host's copy, hash-chained as it grows
        cap = auditcap.SizeCap(host_log, audit.cap, None, lambda: self._audit_stop(remote, stop),
                               lambda m: self.say("warn", f"{self.name}: {m}"))
        cap.start()
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            if failed:  # the container may still run: it goes now (it would next), so that strace ends
                with contextlib.suppress(Exception):
                    remote.run(stop, timeout=60)
            self._audit_end(remote, folder, copy, cap, limit)

    @staticmethod
    def _chain_again(log: Path) -> None:
        from kodepipe.core import chain

        chain.chain_path(log).unlink(missing_ok=True)
        fresh = chain.Chain(log)
        try:
            fresh.catch_up(final=True)
        finally:
            fresh.close()

    def _audit_stop(self, remote: Remote, command: str) -> None:
        """The cap reached: strace halted, the container killed, strace let go on (AUDIT_STOP)."""
        try:
            self._check(remote.run(command, timeout=60), "stopping the run at the audit log's cap")
        except Exception as exc:  # strace's RLIMIT_FSIZE still ends it, and the watcher the container
            self.say("warn", f"{self.name}: {exc}")

    def _audit_end(self, remote: Remote, folder: str, copy: LogCopy, cap: Any, limit: int) -> None:
        """Once the container is gone: how strace ended, the copy's end, and the copy checked against the
        guest's log; in the record as on the host (audit, audit_problem, audit_cap, audit_capped), with
        audit_copy and audit_unaccounted.  Never raises."""
        problems: list[str] = []
        guest_log = f"{folder}/{AUDIT_LOG}"
        end: dict[str, str] = {}
        try:
            end = parse_probe(self._check(remote.run(
                _q("sudo", "-n", "sh", "-c", AUDIT_END, "kp-run", folder, str(AUDIT_END_WAIT)),
                timeout=AUDIT_END_WAIT + 60), "reading how strace ended").stdout)
        except Exception as exc:
            problems.append(f"how strace ended in {self.vm_name} is unknown ({exc})")
        if not copy.wait(AUDIT_END_WAIT if end else 5):
            problems.append("the copy of the audit log did not end with strace")
        with contextlib.suppress(Exception):
            copy.channel.close()
        copy.wait(10)
        cap.close()
        chained = self.chainer
        if chained is not None:
            chained.close()
            if chained.problem:
                problems.append(chained.problem)
        status = end.get("status")
        if status == "":
            problems.append(f"strace in {self.vm_name} did not end within {AUDIT_END_WAIT} s of the container: "
                            "the end of the audit log may be missing")
        elif status not in (None, "0"):
            how, said = strace_ending(status), end.get("said", "").strip()
            killed = bool(end.get("killed"))
            problems.append(f"strace in {self.vm_name} {how} while the container ran" + (f" ({said})" if said else "")
                            + (": the audit log misses everything after that, so the guest stopped the container "
                               "(a run whose audit was asked for does not go on unaudited)" if killed else ""))
            if killed:
                self.say("warn", f"{self.name}: the audit's tracer (strace) {how} in {self.vm_name}: the guest "
                                 "stopped the container")
        copied: dict[str, Any] = {"from": f"{self.vm_name}:{guest_log}", "bytes": copy.size,
                                  "sha256": copy.sha256.hexdigest()}
        size, digest = end.get("size", ""), end.get("sha256", "")
        same = size == str(copy.size) and digest == copied["sha256"]
        if end and not same and size.isdigit() and int(size) <= limit:  # the live copy missed some: once more
            try:
                again = LogCopy(remote.open(_q("sudo", "-n", "cat", "--", guest_log)), copy.path, limit).start()
                again.wait(AUDIT_END_WAIT)
                with contextlib.suppress(Exception):
                    again.channel.close()
                again.wait(10)
                copied.update(bytes=again.size, sha256=again.sha256.hexdigest(), pulled_again=True)
                self._chain_again(copy.path)  # the copy was written anew: so is its chain
                same = size == str(again.size) and digest == copied["sha256"]
            except Exception as exc:
                problems.append(f"the audit log could not be copied again: {exc}")
        copied["verified"] = same
        if copy.over:
            problems.append(f"{self.vm_name} sent more than the audit log's limit ({limit} bytes): the host's copy "
                            "stops there")
        if copy.failed:
            problems.append(copy.failed)
        if end and not same:
            problems.append(f"the host's copy of the audit log ({copied['bytes']} bytes) is not the guest's "
                            f"({size or '?'} bytes): the guest's is kept at {guest_log} in {self.vm_name}")
        elif same and not problems:  # the host holds the log now: the guest's copy goes
            with contextlib.suppress(Exception):
                remote.run(_q("sudo", "-n", "rm", "-rf", "--", folder), timeout=60)
        self.meta["audit_copy"] = copied
        self.meta["audit"] = "incomplete" if problems else "complete"
        if problems:
            self.meta["audit_problem"] = "; ".join(problems)
        if self.policy.workspace is not None and not self.policy.read_only_workspace:
            self.meta["audit_unaccounted"] = {"against": "workspace", "complete": False,
                                              "why": "not checked inside a VM"}
        capped = cap.record()
        if problems:
            capped.pop("audit", None)
        self.meta.update(capped)

    def start(self, prepared: Prepared) -> int:
        """``podman start --attach``: the agent runs, its output copied to ``sink`` as it comes, a timer
        killing it at the time limit over a second channel; its exit status."""
        remote = prepared.remote
        self.meta.update(state="running", started=now_iso())
        self.store.write_meta(prepared.host_folder, self.meta)
        streaming = threading.Event()
        streaming.set()
        timer = None
        if self.policy.limits.seconds:
            timer = threading.Timer(self.policy.limits.seconds, self._time_up, args=(remote, streaming))
            timer.daemon = True
            timer.start()
        try:
            if self.policy.tty:  # -t: the agent's terminal is the user's, through a pty in the guest
                with local_terminal() as (tty_in, tty_out):
                    cols, rows = terminal_size(tty_in)
                    channel = remote.terminal(start_command(self.name, prepared.hooks_dir, interactive=True),
                                              self.policy.term or DEFAULT_TERM, cols, rows)
                    try:
                        status, tail = relay_terminal(channel, tty_in, tty_out)
                    finally:
                        channel.close()
            elif self.policy.interactive:  # -i: kp-run's stdin is the agent's
                channel = remote.open(start_command(self.name, prepared.hooks_dir, interactive=True))
                try:
                    status, tail = relay_stdin(channel, sys.stdin.fileno(), self.sink)
                finally:
                    channel.close()
            else:
                status, tail = remote.stream(start_command(self.name, prepared.hooks_dir), self.sink)
        finally:
            streaming.clear()
            if timer is not None:
                timer.cancel()
        failure = podman_failure(status, tail)
        if failure is not None:
            raise KpError(f"Podman in {self.vm_name} could not run the container: {failure}", code="podman")
        if status < 0:
            raise KpError(f"the SSH connection to {self.vm_name} ended before Podman said how the container "
                          "ended", code="connection_lost")
        return status

    def _time_up(self, remote: Remote, streaming: threading.Event) -> None:
        self.timed_out = True
        self.say("warn", f"{self.name}: the time limit ({self.policy.limits.seconds:g} s) is up; stopping it")
        # the container may not be running yet (its storage being prepared, minutes under TCG the first
        # time): one that is not running cannot be killed, so try until it is, or is gone
        while streaming.is_set():
            try:
                if remote.run(_q("sudo", "-n", "podman", "kill", "--", self.name), timeout=60).status == 0:
                    return
            except KpError:
                return  # the connection is gone; Podman's --timeout still ends it
            time.sleep(KILL_RETRY)

    def finish(self, prepared: Prepared | None, exit_code: int | None, outcome: str) -> Record:
        """The record of what happened, once the container is gone (or known not to be)."""
        meta = self.meta
        if prepared is not None and prepared.git is not None and prepared.quarantine is None and "started" in meta:
            if meta.get("container_removed"):  # nothing of the agent's runs any more
                self.check_setid(prepared)  # before check_git moves anything, as on the host
                try:
                    self.check_git(prepared.remote, prepared.git)
                except Exception as exc:
                    meta["git_problem"] = (f"the workspace could not be checked for planted git repositories "
                                           f"({exc}): look before you run git there")
                    self.say("warn", meta["git_problem"])
            else:
                meta["git_problem"] = ("the container may still run, so the workspace was not checked for "
                                       "planted git repositories: look before you run git there")
        if outcome == "exited" and meta.get("audit") in ("incomplete", "capped"):  # as on the host
            outcome = "audit-lost" if meta["audit"] == "incomplete" else "audit-capped"
        meta.update(exit_code=exit_code, finished=now_iso(), timed_out=self.timed_out, outcome=outcome,
                    state="exited")
        if exit_code is not None and 128 < exit_code < 160:  # the shell's convention: killed by a signal
            import signal

            with contextlib.suppress(ValueError):
                meta["signal"] = signal.Signals(exit_code - 128).name
        failure = self.review(prepared, outcome) if prepared is not None and prepared.quarantine is not None \
            else None
        if prepared is not None and self._kept():  # the quarantine's changes logged, the logs' heads sealed
            evidence.close_run(prepared.host_folder, meta, lambda m: self.say("warn", f"{self.name}: {m}"))
        record = {k: v for k, v in meta.items() if k not in (*folders.PRIVATE, "fingerprints")}
        if prepared is not None and self._kept():
            record["path"] = str(prepared.host_folder)
        else:
            record["removed"] = True
        if failure is not None:  # the review failed: never quarantined; the run's record goes with the error
            failure.record = record
            raise failure
        return record

    # -- the run's folders --------------------------------------------------------------------------

    def host_folder(self) -> Path:
        """The run's folder in the host's store (kp-ls lists it, kp-rm removes it), kept after the run
        when it holds something to look at (the egress log; git_planted says where the guest keeps what
        was moved away), else removed when the run is left."""
        with self.store.lock(self.name):
            self.meta.update(pid=os.getpid(), pid_start=proc.start_time(os.getpid()), boot_id=proc.boot_id())
            with self.store.creating(folders.KIND, self.name, self.meta) as folder:
                os.chmod(folder, 0o700)
        self._undo.callback(self._settle, folder)
        return folder

    def _kept(self) -> bool:
        return "egress_log" in self.meta or "git_planted" in self.meta or "audit_log" in self.meta \
            or self.meta.get("state") == "quarantined" or self.upper_left

    def _settle(self, folder: Path) -> None:
        if self._kept():
            self.store.write_meta(folder, self.meta)
        else:
            self.store.discard(folder)

    def folder_files(self, folder: str, uid: int, gid: int, data: list[bytes], files: dict[str, bytes]
                     ) -> tuple[list[StagedFile], list[sandbox.Secret]]:
        """What the run's folder in the guest holds: the empty mask file, kodepipe's own ``files``
        (world-readable), and a copy of each secret only the agent can read (``folder``/N-NAME)."""
        staged = [StagedFile("empty", b"", 0o444)]
        staged += [StagedFile(name, content, 0o444) for name, content in sorted(files.items())]
        secrets = []
        for n, (spec, content) in enumerate(zip(self.policy.secrets, data, strict=True)):
            src = Path(spec.source)
            staged.append(StagedFile(f"{n}-{src.name}", content, 0o400, uid, gid))
            secrets.append(sandbox.Secret(Path(f"{folder}/{n}-{src.name}"), spec.dest, str(src)))
        return staged, secrets

    def setid_files(self, remote: Remote, ws: str) -> frozenset[str]:
        """The setuid/setgid files below the guest workspace ``ws`` (setid_argv, as root)."""
        found = remote.run(f"sudo -n {shlex.join(setid_argv(ws))}", timeout=600)
        # find says why it could not read a directory and goes on; what it found still counts
        if found.status != 0 and not found.stdout:
            self._check(found, f"looking for setuid/setgid files in {ws}")
        return parse_setid(found.stdout)

    def check_setid(self, prepared: Prepared) -> None:
        """What the agent left setuid or setgid in the workspace: reported and recorded (setuid_files) by
        the host backend's rule (hostrun.report_setid); if the guest cannot be asked, as on the host,
        nothing is reported."""
        from kodepipe.container.hostrun import report_setid

        if prepared.git is None or prepared.setid_before is None:
            return
        try:
            after = self.setid_files(prepared.remote, prepared.git.workspace)
        except Exception:
            after = prepared.setid_before
        report_setid(self.meta, prepared.setid_before, after, self.say)

    def _remove_folder(self, remote: Remote, folder: str) -> None:
        try:
            self._check(remote.run(_q("sudo", "-n", "rm", "-rf", "--", folder), timeout=120),
                        "removing the run's folder")
        except Exception as exc:  # said; /run is a tmpfs, gone at the guest's next boot
            self.say("warn", f"{self.name}: could not clean up in {self.vm_name}: {exc}")

    def _remove_container(self, remote: Remote) -> bool:
        """Remove the container, whatever its state (it may not exist); whether it is gone."""
        try:
            self._check(remote.run(_q("sudo", "-n", "podman", "rm", "-f", "-i", "-t", "0", "--", self.name)
                                   + " >/dev/null", timeout=120), "removing the container")
            return True
        except Exception as exc:  # said, and in the record (container_removed: false)
            self.say("warn", f"{self.name}: could not remove its container in {self.vm_name}: {exc}")
            return False

    # -- --quarantine --------------------------------------------------------------------------------

    def plan_quarantine(self, ws: str | None) -> GuestQuarantine:
        """Where the quarantine goes (no side effect): the workspace's real path in the guest must be the
        share or beneath it, and its host directory one the host can review and apply to; else
        Unsupported.  The upper dir's host owner is the one the host backend would give the agent."""
        lower = host_lower(self.vm, quarantine_share(self.vm, ws))
        uid, gid, _source = sandbox.invoker(lower)
        return GuestQuarantine(f"{GUEST_KEEP}/{self.name}-{self.meta['id']}/{QUARANTINE_DIR}", lower, (uid, gid))

    def mount_overlay(self, remote: Remote, q: GuestQuarantine, ws: str) -> str:
        """The overlay in the guest (OVERLAY): the workspace its lower dir, upper and work dirs on the
        guest's disk; undone when the run is left (its upper dir kept if its review failed).  The
        merged dir, which the container gets as its workspace."""
        self._undo.callback(self._end_overlay, remote, q)
        self._check(remote.run(_q("sudo", "-n", "sh", "-c", OVERLAY, "kp-run", q.folder, ws, OVERLAY_OPTIONS)),
                    f"mounting the quarantine's overlay over {ws}")
        return q.merged

    def _end_overlay(self, remote: Remote, q: GuestQuarantine) -> None:
        try:
            self._check(remote.run(_q("sudo", "-n", "sh", "-c", OVERLAY_END, "kp-run", q.folder,
                                      "keep" if self.upper_left else "remove"), timeout=600),
                        "removing the quarantine's overlay")
        except Exception as exc:  # said; kp-rm removes it with the run (vmrun.forget)
            self.upper_left = True
            self.say("warn", f"{self.name}: could not remove the quarantine's overlay in {self.vm_name}: {exc}")

    def review(self, prepared: Prepared, outcome: str) -> KpError | None:
        """After the run, its container gone: the upper dir streamed into the host's folder of the run,
        then reviewed there as the host backend reviews its own (quarantine.changes against the host's
        directory, fingerprints, findings, git metadata): state quarantined when there are changes, and
        ``kp-run --apply`` needs no VM.  A failure at any point is returned (the run is then never
        quarantined, and what it left, here and in the guest, is kp-rm's)."""
        from kodepipe.container import quarantine
        from kodepipe.host import gitguard

        q, meta = prepared.quarantine, self.meta
        if q is None or outcome not in ("exited", "timed-out") or meta.get("container_removed") is not True:
            return None  # cut short, or the container may still run: nothing to review
        try:
            upper, extracted = self.receive_upper(prepared.remote, q, prepared.host_folder)
            changes = quarantine.changes(upper, q.lower)
            fingerprints = quarantine.fingerprint(q.lower, changes)
        except Exception as exc:
            failure = exc if isinstance(exc, KpError) else KpError(f"{exc!r}")
            self.upper_left = True
            meta["quarantine"] = {**meta.get("quarantine", {}), "error": failure.code}
            meta["problem"] = (f"the quarantine could not be reviewed on the host ({failure.message}): nothing "
                               f"was applied; kp-rm {self.name} discards it")
            failure.hint = failure.hint or f"kp-rm {self.name} discards it (here and in {self.vm_name})"
            return failure
        meta["quarantine"] = {**meta.get("quarantine", {}), "path": str(upper), "received": extracted.as_dict(),
                              **quarantine.summary(changes)}
        meta["fingerprints"] = fingerprints
        for finding in quarantine.findings(changes):  # escaped: the agent chose the names
            self.say("warn", finding)
        gitguard.report_changes(changes, q.lower, meta, lambda m: self.say("warn", m))
        if changes:
            meta["state"] = "quarantined"
        return None

    def receive_upper(self, remote: Remote, q: GuestQuarantine, folder: Path) -> tuple[Path, Any]:
        """The guest's upper dir, on one exec channel (UPPER_TAR, under ChannelStream's time bounds), into
        ``folder/upper`` (upperdir.receive: hostile input, unpacked by fd); the guest's tar must end
        with 0 too."""
        from kodepipe.container import upperdir

        channel = remote.open(_q("sudo", "-n", "sh", "-c", UPPER_TAR, "kp-run", q.merged, q.upper))
        try:
            stream = ChannelStream(channel)
            try:
                received = upperdir.receive(folder, stream, owner=q.owner)
            except KpError as exc:
                status = stream.status(wait=5.0)
                said = proc.tail(stream.said)
                if status not in (0, None) and said:  # the guest's own failure says more
                    exc.args = (f"{exc.args[0] if exc.args else exc.code} (in {self.vm_name}: {said})",)
                raise
            status = stream.status()
            if status != 0:
                raise upperdir.Truncated(f"the guest's tar of the quarantine's upper dir ended with status "
                                         f"{status if status is not None else 'unknown'} in {self.vm_name}: "
                                         f"{proc.tail(stream.said) or 'it said nothing'}",
                                         hint="the upper dir stays in the guest; kp-rm discards the run")
            return received
        finally:
            channel.close()

    # -- the steps -------------------------------------------------------------------------------

    def _check(self, outcome: Outcome, what: str) -> Outcome:
        if outcome.status != 0:
            raise CommandFailed(f"{self.vm_name}: {what} failed (status {outcome.status}): "
                                f"{proc.tail(outcome.stderr) or proc.tail(outcome.stdout)}")
        return outcome

    def scan(self, remote: Remote, ws: str) -> tuple[list[str], list[str]]:
        found = remote.run(f"cd -- {shlex.quote(ws)} && sudo -n {shlex.join(find_argv(self.policy.masks))}")
        # find says why it could not read a directory and goes on; what it found still counts
        if found.status != 0 and not found.stdout:
            self._check(found, f"looking for files to mask in {ws}")
        return parse_found(found.stdout)

    def survey_git(self, remote: Remote, ws: str) -> dict[str, GuestRepo]:
        """The repositories in the guest's workspace (git_survey_argv, as root)."""
        found = remote.run(f"cd -- {shlex.quote(ws)} && sudo -n {shlex.join(git_survey_argv())}")
        if found.status != 0:
            # a directory it could not read may hide a repository: no run on half a survey
            self._check(found, f"looking for git repositories in {ws}")
        return parse_git_survey(found.stdout)

    def watch_git(self, remote: Remote, ws: str, repos: list[str]
                  ) -> tuple[dict[str, dict[str, GuestPrint]], dict[str, tuple[bytes, int, int, int]]]:
        """The guarded entries of the repositories left writable, and their small files' contents."""
        if not repos:
            return {}, {}
        check_git_paths(ws, repos)  # they go on a command line
        watched = self._listing(remote, ws, repos)
        keep = snapshot_paths(watched)
        if not keep:
            return watched, {}
        tar = remote.run(f"cd -- {shlex.quote(ws)} && sudo -n tar --null --verbatim-files-from "
                         "--no-recursion -T - -cf -", input=b"".join(os.fsencode(p) + b"\0" for p in keep))
        self._check(tar, "keeping a copy of the git configuration")
        return watched, parse_snapshots(tar.stdout)

    def _listing(self, remote: Remote, ws: str, repos: list[str]) -> dict[str, dict[str, GuestPrint]]:
        listed = remote.run(f"cd -- {shlex.quote(ws)} && sudo -n {_script(WATCH, *repos)}")
        if listed.status != 0:
            self._check(listed, "reading the git configuration of the workspace's repositories")
        return parse_watch(listed.stdout)

    def check_git(self, remote: Remote, git: GitBefore) -> None:
        """After a direct run, the container gone: neutralise what the agent planted (git_planted)."""
        if self.policy.read_only_workspace:
            return
        try:
            now = self.survey_git(remote, git.workspace)
        except KpError as exc:
            self.meta["git_problem"] = (f"the workspace could not be checked for planted git repositories "
                                        f"({exc.message}): look before you run git there")
            self.say("warn", self.meta["git_problem"])
            return
        planted = git_planted(git.repos, now)
        if git.watched:
            by_ident = {r.ident: p for p, r in now.items()}
            still = sorted({by_ident[git.repos[p].ident] for p in git.watched
                            if p in git.repos and git.repos[p].ident in by_ident})
            try:
                planted += git_changed(git.watched, git.repos, now, self._listing(remote, git.workspace, still)
                                       if still else {})
            except KpError as exc:
                self.meta["git_problem"] = f"could not read the git configuration again: {exc.message}"
        if not planted:
            return
        dest = f"{GUEST_KEEP}/{self.name}-{self.meta['id']}/{gitguard.PLANTED}"
        paths = b"".join(os.fsencode(p) + b"\0" for p, _, _ in planted)
        moved = remote.run(_q("sudo", "-n", "perl", "-e", NEUTRALISE, git.workspace, dest, self.name),
                                input=paths)
        entries = []
        for (path, why, kind), (to, problem) in zip(planted, parse_moved(moved.stdout, len(planted)), strict=True):
            entry: dict[str, Any] = {"path": fdtree.display(path), "why": why, "type": kind, "moved_to": to}
            if problem is not None:
                self.meta["git_problem"] = f"could not move {fdtree.display(path)} away: {problem}"
            elif why.startswith("changed") and path in git.copies:  # yours comes back
                content, mode, uid, gid = git.copies[path]
                back = remote.run(_q("sudo", "-n", "sh", "-c", RESTORE, "kp-run", f"{git.workspace}/{path}",
                                          f"{uid}:{gid}", f"{mode:o}"), input=content)
                entry["restored"] = back.status == 0
                if back.status != 0:
                    self.meta["git_problem"] = f"could not put {fdtree.display(path)} back: {proc.tail(back.stderr)}"
            entries.append(entry)
        self.meta["git_planted"] = entries
        from kodepipe.core.terminal import escape

        listed = ", ".join(escape(e["path"] or ".") + f" ({e['why']})" for e in entries[:8])
        self.say("warn", f"the agent left git metadata that your next git command there would read, and could "
                         f"run its code through: {listed}" + (f" and {len(entries) - 8} more" if len(entries) > 8
                                                              else "")
                         + f"; kp-run moved it away in {self.vm_name} (into {dest}, or beside it when that is "
                           "another filesystem; nothing was deleted)")
        if "git_problem" in self.meta:
            self.say("warn", escape(self.meta["git_problem"]))

    def copy_image(self, remote: Remote, *, zstd: bool) -> dict[str, Any]:
        """``podman save`` here, ``podman load`` there; facts for the record."""
        tag = self.image
        compress = zstd and proc.which("zstd") is not None
        self.say("info", f"{self.vm_name} lacks the image {tag}: copying it in (once per VM; minutes under TCG)")
        started = time.monotonic()
        sent = 0
        last = started
        with _saved_image(tag, compress) as (chunks, finished):
            def counted() -> Iterator[bytes]:
                nonlocal sent, last
                for chunk in chunks:
                    sent += len(chunk)
                    now = time.monotonic()
                    if now - last >= PROGRESS_EVERY:
                        last = now
                        self.say("progress", f"{self.vm_name}: {tag}: {sent >> 20} MiB sent in {now - started:.0f} s")
                    yield chunk

            load = "sudo -n podman load"
            command = f"zstd -d -q -c | {load}" if compress else load
            loaded = remote.send(command, counted(), timeout=None)
            finished()
        self._check(loaded, f"loading the image {tag} (podman load)")
        seconds = round(time.monotonic() - started, 1)
        self.say("progress", f"{self.vm_name}: {tag} loaded in {seconds:g} s ({sent >> 20} MiB sent)")
        return {"seconds": seconds, "bytes_sent": sent, "compressed": compress}

    def guest_seccomp(self, remote: Remote) -> tuple[str, bytes]:
        """kp-run's seccomp profile, derived from the guest's own containers profile: its path in the
        guest, and its text (written by stage)."""
        from kodepipe.container import seccomp

        base = remote.run(_q("cat", "--", GUEST_SECCOMP))
        if base.status != 0:
            raise KpError(f"{self.vm_name} has no {GUEST_SECCOMP}: kp-run derives its seccomp profile from it",
                          code="no_seccomp", hint="rebuild the image with kp-image build (its Podman brings it)")
        text = seccomp.render(base.stdout)
        return seccomp_path(text), text

    def prepare_hook(self, values: dict[str, int]) -> tuple[str | None, bytes]:
        """The hook that sets ``values`` in the container's user namespace: its directory and its JSON."""
        return quota_hook(values)

    def stage(self, remote: Remote, folder: str, seccomp: tuple[str, bytes], hook: tuple[str | None, bytes],
              files: list[StagedFile]) -> None:
        """One round trip (STAGE): the seccomp profile, the hook, the guest's overlay settings and the run's
        folder with ``files``; the folder is removed when the run is left.  What a file holds goes on the
        channel's stdin, never on a command line (D8)."""
        from kodepipe.container import engine

        self._undo.callback(self._remove_folder, remote, folder)
        extra = [StagedFile(STAGED_SECCOMP, seccomp[1], 0o644)]
        if hook[0] is not None:
            extra.append(StagedFile(STAGED_HOOK, hook[1], 0o644))
        # the guest's kernel has the same idmapped-overlay trouble as the host's (engine.force_chown_copies)
        self._check(remote.run(_q("sudo", "-n", "sh", "-c", STAGE, "kp-run", GUEST_DIR, str(engine.STORAGE_RUN),
                                  seccomp[0], hook[0] or "", folder), input=staged_tar([*files, *extra])),
                    "writing the run's files (its folder, seccomp profile and hook)")


@dataclass(frozen=True)
class StagedFile:
    """A file of the run's folder in the guest: its name there, what it holds, its mode and owner."""

    name: str
    data: bytes
    mode: int
    uid: int = 0
    gid: int = 0


def staged_tar(files: Iterable[StagedFile]) -> bytes:
    """``files`` as a tar archive that root's tar -x -p --numeric-owner extracts with those modes and owners."""
    import io
    import tarfile

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for f in files:
            info = tarfile.TarInfo(f.name)
            info.size, info.mode, info.uid, info.gid = len(f.data), f.mode, f.uid, f.gid
            tar.addfile(info, io.BytesIO(f.data))
    return out.getvalue()


@contextlib.contextmanager
def _saved_image(tag: str, compress: bool) -> Iterator[tuple[Iterator[bytes], Callable[[], None]]]:
    """``podman save TAG`` (through ``zstd -1`` when ``compress``) as chunks, and a check to call
    after the last one; the processes are killed however the caller leaves."""
    podman = proc.require("podman")
    with tempfile.TemporaryFile() as errors:
        argvs = [[podman, "save", "--format", "docker-archive", tag]]
        if compress:
            argvs.append([proc.require("zstd"), "-1", "-T0", "-q", "-c"])
        children: list[subprocess.Popen[bytes]] = []
        try:
            for argv in argvs:
                children.append(proc.spawn(argv, stdin=children[-1].stdout if children else subprocess.DEVNULL,
                                           stdout=subprocess.PIPE, stderr=errors))
            for child in children[:-1]:
                if child.stdout is not None:
                    child.stdout.close()  # the next one holds it now; this one sees EPIPE if that one dies
            out = children[-1].stdout
            if not (out is not None):
                raise RuntimeError("kp-run: no pipe")

            def chunks() -> Iterator[bytes]:
                while block := out.read(CHUNK):
                    yield block

            def finished() -> None:
                for argv, child in zip(argvs, children, strict=True):
                    if child.wait() != 0:
                        errors.seek(0)
                        text = errors.read().decode("utf-8", "replace")
                        if "image not known" in text or "no such image" in text.lower():
                            raise NotFound(f"image {tag} is not in the host's Podman store",
                                           hint="build it with kp-image base, or name a profile with --profile")
                        raise CommandFailed(f"{shlex.join(argv)} exited with status {child.returncode}: "
                                            f"{proc.tail(text)}")

            yield chunks(), finished
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
                    child.wait()


def forget(meta: Record, remote: Callable[[Record], Remote] | None = None) -> None:
    """kp-rm of a run in a VM: what it left in its guest, if the VM answers: the folder of what was moved
    away (git_planted), and its container if it is not known to be gone.  KpError if the VM does not
    answer (kp-rm removes the run's folder here all the same)."""
    name = str(meta.get("name"))
    guest = (remote or connect)({"kind": "vm", "name": meta.get("host"), "id": meta.get("vm_id")})
    try:
        folder = f"{GUEST_KEEP}/{name}-{meta.get('id')}"
        steps = []
        if meta.get("container_removed") is not True and isinstance(meta.get("container_name"), str):
            steps.append(_q("sudo", "-n", "podman", "rm", "-f", "-i", "-t", "0", "--", meta["container_name"])
                         + " >/dev/null")
        # then a quarantine's overlay, if its kp-run died with it mounted: never removed through it
        steps.append(_q("sudo", "-n", "sh", "-c", OVERLAY_END, "kp-rm", f"{folder}/{QUARANTINE_DIR}", "remove"))
        steps.append(_q("sudo", "-n", "rm", "-rf", "--", folder))
        done = guest.run(" && ".join(steps), timeout=120)
        if done.status != 0:
            raise KpError(f"could not remove what {name} left in {meta.get('host')}: {proc.tail(done.stderr)}")
    finally:
        _close(guest)


def host_image_id(tag: str) -> str | None:
    """The id of ``tag`` in the host's Podman store, if it is there."""
    if proc.which("podman") is None:
        return None
    try:
        return proc.run(["podman", "image", "inspect", "--format", "{{.Id}}", "--", tag],
                        timeout=60).stdout.decode().strip() or None
    except KpError:
        return None


def _close(remote: Remote) -> None:
    with contextlib.suppress(Exception):
        remote.close()


def _stderr_of(channel: Any) -> str:
    """What a channel's command said on stderr so far (why it ended, when it did)."""
    said = b""
    with contextlib.suppress(Exception):
        while channel.recv_stderr_ready() and len(said) < 4096:
            said += channel.recv_stderr(4096)
    return proc.tail(said)


def _raise_nofile() -> None:
    """The proxy holds two descriptors per connection: use the whole hard limit (as hostrun does)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@contextlib.contextmanager
def local_terminal() -> Iterator[tuple[int, int]]:
    """The user's terminal for -t: (the fd to read, the fd to write).  Standard input and output where
    they are the terminal; else /dev/tty (vm records may have come in on stdin, and stdout carries
    records)."""
    if os.isatty(0) and os.isatty(1):
        yield 0, 1
        return
    try:
        tty = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        raise BadInput("-t needs a terminal, and there is none",
                       hint="drop -t, or run kp-run from a terminal") from None
    try:
        yield (0 if os.isatty(0) else tty), (1 if os.isatty(1) else tty)
    finally:
        os.close(tty)


def terminal_size(fd: int) -> tuple[int, int]:
    from kodepipe.core import terminal

    return terminal.size(fd)


class _Tail:
    """A channel whose received bytes are also kept (the last TAIL_BYTES): what Podman said, if it
    failed, is on the terminal with the agent's output."""

    def __init__(self, channel: Any) -> None:
        self.channel, self.tail = channel, bytearray()

    def fileno(self) -> int:
        return int(self.channel.fileno())

    def recv(self, size: int) -> bytes:
        data: bytes = self.channel.recv(size)
        self.tail.extend(data)
        del self.tail[:-TAIL_BYTES]
        return data

    def sendall(self, data: bytes) -> None:
        self.channel.sendall(data)


def relay_terminal(channel: Any, tty_in: int, tty_out: int) -> tuple[int, bytes]:
    """-t: the local terminal in raw mode, relayed to and from ``channel`` (a pty in the guest), its window
    size followed (SIGWINCH -> resize_pty); the terminal restored however this ends.  The remote
    command's exit status (-1 if none came) and the tail of its output."""
    from kodepipe.core import terminal

    tap = _Tail(channel)
    with terminal.raw_mode(tty_in), \
            terminal.on_resize(tty_in, lambda cols, rows: channel.resize_pty(width=cols, height=rows)):
        why = terminal.relay(tty_in, tty_out, tap)
        if why == "local_eof":  # the terminal went away: tell the guest's end, and show what is left
            with contextlib.suppress(OSError, EOFError):
                channel.shutdown_write()
            while data := tap.recv(terminal.CHUNK):
                with contextlib.suppress(OSError):
                    terminal.write_all(tty_out, data)
    return int(channel.recv_exit_status()), bytes(tap.tail)


def relay_stdin(channel: Any, stdin: int, sink: Callable[[bytes], None]) -> tuple[int, bytes]:
    """-i without -t: ``stdin`` copied to ``channel`` as it comes, its end forwarded (shutdown_write), and
    the remote command's output (stdout and stderr) handed to ``sink``, until the command ends.  Its exit
    status (-1 if none came) and the tail of its stderr.  Never blocks on a full window: what is not yet
    sent waits, and no more of stdin is read meanwhile."""
    import select

    tail = bytearray()
    pending = b""
    local_open = True
    while True:
        watched: list[Any] = [channel, stdin] if local_open and not pending else [channel]
        select.select(watched, [], [], 0.05 if pending else 1.0)
        while channel.recv_ready():
            sink(channel.recv(CHUNK))
        while channel.recv_stderr_ready():
            data = channel.recv_stderr(CHUNK)
            sink(data)
            tail.extend(data)
            del tail[:-TAIL_BYTES]
        if local_open and not pending and select.select([stdin], [], [], 0)[0]:
            pending = os.read(stdin, CHUNK)
            if not pending:
                local_open = False
                with contextlib.suppress(OSError, EOFError):
                    channel.shutdown_write()
        if pending:
            try:
                if channel.send_ready():
                    pending = pending[channel.send(pending):]
            except (OSError, EOFError):  # it stopped reading: its status says why
                pending, local_open = b"", False
        if (channel.eof_received or channel.closed) and not channel.recv_ready() \
                and not channel.recv_stderr_ready():
            break
    return int(channel.recv_exit_status()), bytes(tail)


def _to_stderr(data: bytes) -> None:
    sys.stderr.buffer.write(data)
    sys.stderr.buffer.flush()


def run_in_vm(vm: Record, policy: Policy, say: Callable[[str, str], None]) -> tuple[Record, int | None]:
    """Run one container inside the VM of ``vm`` (a vm record from kp-ip); return its record and
    the command's exit status (None if it never ran).

    The same contract as hostrun.run: however the run ends, the container is
    gone (or the record says it is not), and a failure or an interruption
    carries the record of the run so far (``record``) as it propagates.
    """
    return _run(VmRun(vm, policy, say))


def _run(job: VmRun) -> tuple[Record, int | None]:
    with job:
        prepared: Prepared | None = None
        try:
            prepared = job.prepare()
            with job.container(prepared) as created, job.attachments(prepared, created):
                status = job.start(prepared)
        except BaseException as exc:
            record = job.finish(prepared, None, "failed" if isinstance(exc, Exception) else "interrupted")
            if isinstance(exc, KpError | Interrupted):
                exc.record = record
            else:  # KeyboardInterrupt, or a bug: kp-run reads it with getattr all the same
                setattr(exc, "record", record)  # noqa: B010
            raise
        return job.finish(prepared, status, "timed-out" if job.timed_out else "exited"), status
