"""Git metadata in a VM's shared folder: the guest, even as root, must not make a later git command
on the host run its code.

``kp-boot --share DIR`` hands a host checkout to a guest that kodepipe takes for hostile.  Over 9p,
root in the guest can write anything in DIR that QEMU can, and git, run later by the user on the host
in DIR or any folder below it, runs what the repository it finds tells it to (gitguard.py lists how).
This module is gitguard's survey and neutralisation, applied to the lifetime of a VM instead of one
container run:

1. **At boot** (``prepare``), every repository in DIR is listed (gitguard.find: each ``.git`` of any
   type, each bare repository, at any depth, never through a symlink).  By default each is handed to
   QEMU **read-only**: an O_PATH fd of it goes to qemu.launch, which binds it read-only over itself in
   QEMU's own mount namespace.  The guest reads history (``git log`` in the guest works), but cannot
   write, rename, remove or replace it (EROFS, EBUSY), whatever uid it has.
2. With ``kp-boot --writable-git`` (a loosening, recorded in the vm record) nothing is bound: each
   repository is *watched* as kp-run watches one (what git reads as configuration, hooks or
   pointers is noted, and small files are copied).
3. What was found is kept in the VM's folder (``share-git.json``), because the VM outlives the
   command that booted it.
4. **When QEMU is gone** (kp-stop, kp-stop --save, kp-rm, or a crash noticed by the next kp-boot),
   ``settle`` lists the repositories again.  Each one the guest made or swapped anywhere in DIR (a
   new ``.git`` of any type, a new bare repository), and in a watched repository each guarded entry
   it added or changed, is **neutralised**: renamed in place to a name git never reads
   (``.git.planted-by-VM``; a bare repository loses its ``HEAD`` that way), never deleted, and put
   back from its copy where there was one.  The record lists them (``git_planted``) and the command
   warns.  Renamed in place, not moved into the VM's folder: kp-rm removes that folder, and what the
   guest left is the user's to look at.

What it does not cover: while the VM runs, a repository the guest creates in a new folder of the
share is live: a git command run on the host inside that folder before the VM stops would use it
(run git in the share's top folder, or stop the VM first).  This is the same window as during a
kp-run, only as long as the VM runs; closing it would take a share that is not live (a quarantine of
the share), which kodepipe does not have yet.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kodepipe.core import fdtree
from kodepipe.core.errors import BadInput
from kodepipe.core.fdtree import display
from kodepipe.host import gitguard, hostpath
from kodepipe.host.gitguard import Print, Repo, Snapshot, Watched

STATE = "share-git.json"


def _b(path: str) -> str:
    return base64.b64encode(os.fsencode(path)).decode()


def _p(text: str) -> str:
    return os.fsdecode(base64.b64decode(text))


def dump(guard: gitguard.Guard, share: Path) -> dict[str, Any]:
    """What ``settle`` needs, as JSON-safe data (paths as base64 bytes: they need not be UTF-8)."""
    return {
        "share": str(share),
        "writable": guard.writable,
        "repos": [[_b(r.path), r.kind, r.dev, r.ino] for r in guard.repos.values()],
        "watched": [{
            "repo": _b(w.repo.path),
            "prints": [[_b(rel), p.kind, p.mode, p.ino, p.size, p.mtime_ns, p.ctime_ns] for rel, p in w.prints.items()],
            "copies": [[_b(rel), base64.b64encode(s.content).decode(), s.mode, s.uid, s.gid]
                       for rel, s in w.copies.items()],
        } for w in guard.watched],
    }


def load(data: dict[str, Any], root_fd: int) -> gitguard.Guard:
    """The Guard ``dump`` described, on ``root_fd`` (the share, opened again)."""
    repos = {}
    for path64, kind, dev, ino in data["repos"]:
        path = _p(path64)
        repos[path] = Repo(path, str(kind), int(dev), int(ino))
    guard = gitguard.Guard(root_fd, repos, writable=bool(data.get("writable")))
    for item in data.get("watched", []):
        repo = repos[_p(item["repo"])]
        prints = {_p(rel): Print(str(kind), int(mode), int(ino), int(size), int(mtime), int(ctime))
                  for rel, kind, mode, ino, size, mtime, ctime in item["prints"]}
        copies = {_p(rel): Snapshot(base64.b64decode(content), int(mode), int(uid), int(gid))
                  for rel, content, mode, uid, gid in item["copies"]}
        guard.watched.append(Watched(repo, prints, copies))
    return guard


@dataclass
class Prepared:
    """One boot's share: what QEMU sees read-only, what the vm record says, what to warn about."""

    read_only: hostpath.InPlace | None = None
    record: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def prepare(share: Path, folder: Path, *, writable: bool) -> Prepared:
    """Survey ``share`` before QEMU starts, keep the survey in ``folder`` and return what to bind
    read-only over itself in QEMU's mount namespace (nothing with ``writable``).  A share with more
    repositories than can be bound, or that is itself a bare repository, is refused (BadInput) unless
    ``writable``: it could not be held."""
    import orjson

    from kodepipe.core.state import write_atomic

    root_fd = hostpath.open_workspace(share)
    out = Prepared()
    try:
        try:
            guard = gitguard.Guard(root_fd, gitguard.find(root_fd), writable=writable)
        except fdtree.TooMany as exc:
            raise BadInput(f"--share {share} has {exc.args[0]}: too many to look for git repositories in",
                           hint="share a smaller project directory") from None
        bindable = sorted(p for p, r in guard.repos.items() if r.kind in ("dir", "file", "bare") and p)
        if not writable:
            if "" in guard.repos and guard.repos[""].kind == "bare":
                raise BadInput(f"--share {share} is itself a bare git repository: it cannot be shared read-write "
                               "with its git metadata read-only", hint="share a checkout, or add --writable-git")
            if len(bindable) > gitguard.MAX_BINDS:
                raise BadInput(f"--share {share} holds {len(bindable)} git repositories: at most "
                               f"{gitguard.MAX_BINDS} can be handed to the guest read-only",
                               hint="share a smaller directory, or add --writable-git (they are then checked "
                                    "when the VM stops)")
            out.read_only = hostpath.InPlace.of(share, root_fd, bindable)
        else:
            guard.watch()
        out.warnings = guard.warnings(share)
        if guard.problem:
            out.warnings.append(guard.problem)
        out.record = {"writable": writable, "read_only": [display(p) for p in ([] if writable else bindable)]}
        if guard.symlinks:
            out.record["symlinks"] = [display(p) for p in guard.symlinks]
        write_atomic(folder / STATE, orjson.dumps(dump(guard, share)))
    finally:
        os.close(root_fd)
    return out


def settle(folder: Path, name: str) -> tuple[list[dict[str, Any]], str | None]:
    """After QEMU is gone: neutralise what the guest planted in the share (see the docstring);
    ([planted entries], a problem) — both empty when the VM had no share or was settled already."""
    import orjson

    state = folder / STATE
    try:
        data = orjson.loads(state.read_bytes())
    except FileNotFoundError:
        return [], None
    except (OSError, orjson.JSONDecodeError) as exc:
        state.unlink(missing_ok=True)
        return [], f"the survey of the share's git repositories was unreadable ({exc}): look before you run git there"
    share = Path(str(data.get("share")))
    try:
        root_fd = hostpath.open_workspace(share)
    except BadInput as exc:
        state.unlink(missing_ok=True)
        return [], f"the share {share} could not be checked for planted git repositories ({exc.args[0]})"
    try:
        try:
            guard = load(data, root_fd)
        except (KeyError, TypeError, ValueError) as exc:
            return [], f"the survey of the share's git repositories was unreadable ({exc}): look before running git"
        planted = guard.after(folder, name, in_place=True)
    finally:
        os.close(root_fd)
    state.unlink(missing_ok=True)
    return planted, guard.problem


def report(planted: list[dict[str, Any]], problem: str | None, share: str, record: dict[str, Any]) -> list[str]:
    """Put ``settle``'s findings on ``record`` and return the warnings to print."""
    from kodepipe.core.terminal import escape

    out = []
    if planted:
        record["git_planted"] = planted
        listed = ", ".join(escape(p["path"] or ".") + f" ({p['why']})" for p in planted[:8])
        out.append(f"the guest left git metadata in the share {escape(share)} that your next git command there would "
                   f"read, and could run its code through: {listed}"
                   + (f" and {len(planted) - 8} more" if len(planted) > 8 else "")
                   + "; each was renamed in place to a name git does not read (nothing was deleted)")
    if problem:
        record["git_problem"] = problem
        out.append(escape(problem))
    return out
