"""Applying a quarantined run's changes to its workspace (kp-run --apply).

Two things hold on top of quarantine.apply's checks:

- **One apply at a time per workspace.**  The fingerprint check and the
  writes happen under an exclusive flock on ``locks/workspace.DEV.INO.lock``
  in the state directory (keyed by the workspace directory's device and
  inode, so two paths to one directory share it, and kept where the agent
  cannot reach it).  Two quarantines that changed the same file, applied at
  once: the second sees the first's write and gets ``conflict``.
- **A killed apply is finished by the next one.**  Before the first change
  to the workspace, a journal (``apply.json`` in the run's folder: the list
  of changes, the prefix of every temporary name, the force flag) is
  written.  Temporary files in the workspace are named from that prefix and
  the change's index, so the next ``kp-run --apply NAME`` removes any that a
  killed apply left, then applies the same list again, accepting paths that
  are already as the apply leaves them; ``kp-rm NAME`` removes them too
  (``abandon``).  The journal goes with the run's folder when the apply is
  done.

Before it applies, it says on stderr what deserves a look (symlinks that may
point out of the workspace, setuid/setgid files, fifos, sockets and devices
it leaves out: ``quarantine.findings``), every name escaped; the record of
the apply lists what was applied, and what was left out (``not_applied``).
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from kodepipe.container import folders
from kodepipe.core.errors import BadInput, Busy, KpError, NotFound
from kodepipe.core.records import Record
from kodepipe.core.state import Store, check_id, mounts_under, now_iso, write_atomic

JOURNAL = "apply.json"
WORKSPACE_WAIT = 600.0  # how long an apply waits for another one to the same workspace
# Tests only: "POINT[,POINT...]:DIR" makes the apply stop at each POINT (ready, locked, checked,
# journaled, removed-N, tmp-N, wrote-N, applied; N counts from 1) until the file DIR/POINT.PID it makes is removed.
PAUSE_ENV = "KODEPIPE_TEST_APPLY_PAUSE"


class NotQuarantined(KpError):
    code = "not_quarantined"


def apply(store: Store, name: str, *, expect_id: str | None, force: bool, say: Callable[[str], None],
          paths: Sequence[str] = (), accept: Sequence[str] = (), fail_on: str = "high",
          to_branch: str | None = None, reviewed: str | None = None) -> Record:
    """Apply (all, or ``paths`` and what they need) from a fresh snapshot of the quarantine, or export
    it to a new branch (``to_branch``); the quarantine stays until kp-rm.  Refused when the snapshot
    differs from the one kp-review last showed (or from ``reviewed``), and when findings at or above
    ``fail_on`` are neither accepted nor forced."""
    from kodepipe.container import quarantine, review
    from kodepipe.review import rules as review_rules

    with store.lock(name):
        folder, meta, q, upper, workspace = _open(store, name, expect_id)
        lower = q.get("lower")
        user = meta.get("user") or {}
        owner = (int(user["host_uid"]), int(user["host_gid"])) if "host_uid" in user else None
        if isinstance(lower, str):
            owner = (int(q["owner"][0]), int(q["owner"][1]))
        done_before = [quarantine.from_key(str(p)) for p in q.get("applied_paths") or []]
        rules = review_rules.load()
        _pause("ready")
        with workspace_lock(store, workspace, f"{name}: waiting for another kp-run --apply to {workspace}", say):
            _pause("locked")
            journal = read_journal(folder) if to_branch is None else None
            findings: list[Any] = []
            accepted: list[Any] = []
            if journal is None:
                done = set(done_before)
                every = [c for c in quarantine.changes(upper, workspace) if c.path not in done]
                if not force and not _as_listed(q, every):
                    raise quarantine.Conflict(f"{name}: the quarantine's contents differ from what its record "
                                              "listed after the run (was its container still running?)",
                                              hint="review it again with kp-review; --force applies what is there now")
                snap = review.snapshot(folder, upper, workspace, every, rules, message=review.commit_message(meta))
                shown = review.saved(folder)
                wanted = reviewed or (str(shown["id"]) if shown else None)
                if wanted is not None and wanted != snap.id and not force:
                    raise review.ChangedSinceReview(
                        f"the quarantine is not what was reviewed (snapshot {wanted}; now {snap.id})",
                        hint=f"kp-review {name} shows it as it is now")
                changes = review.select(every, paths) if paths else every
                findings = snap.scan(rules, {c.path for c in changes} if paths else None, workspace)
                _, accepted = review.gate(findings, fail_on=fail_on, accept=accept, force=force, name=name)
                if to_branch is not None:
                    exported = review.export(snap, changes, upper, workspace, to_branch, owner=owner, meta=meta)
                    _note(folder, meta, say, name, "export", review=snap.id, exported=exported,
                          findings=[f.as_dict() for f in findings], accepted=[f.as_dict() for f in accepted],
                          forced=force)
                    store.write_meta(folder, meta)
                    record = {k: v for k, v in meta.items() if k not in (*folders.PRIVATE, "fingerprints")}
                    record.update(review=snap.id, exported=exported, findings=[f.as_dict() for f in findings],
                                  accepted=[f.as_dict() for f in accepted])
                    record["removed"] = False
                    return record
                for finding in quarantine.findings(changes):
                    say(f"{name}: {finding}")
                prefix, resume = quarantine.temp_prefix(), False
                expect: dict[str, str] | None = snap.blobs
                snap_id: str | None = snap.id
            else:
                changes, prefix = journal["changes"], journal["prefix"]
                force, resume = force or journal["force"], True
                expect, snap_id = journal.get("expect"), journal.get("review")
                say(f"{name}: finishing the apply that was interrupted (started {journal['started']})")
                quarantine.remove_temps(workspace, changes, prefix)
            counts: dict[str, int] = {}

            def on_step(event: str, path: str) -> None:
                if event == "checked":
                    counts["checked"] = 1
                    _pause("checked")
                    if not resume:  # before the first change, and only once every check passed
                        write_journal(folder, {"started": now_iso(), "pid": os.getpid(), "workspace": str(workspace),
                                               "force": force, "prefix": prefix, "review": snap_id,
                                               "expect": {quarantine.path_key(p): b for p, b in (expect or {}).items()},
                                               "changes": [c.as_dict() for c in changes]})
                    _pause("journaled")
                    return
                counts[event] = counts.get(event, 0) + 1
                _pause(f"{event}-{counts[event]}")

            try:
                applied, warnings = quarantine.apply(upper, workspace, changes,
                                                     fingerprints=meta.get("fingerprints") or {}, owner=owner,
                                                     force=force, tmp_prefix=prefix, resume=resume, on_step=on_step,
                                                     expect=expect)
            except BaseException as exc:
                if "checked" in counts and (folder / JOURNAL).exists():  # it stopped half-way
                    finish = f"kp-run --apply {name} finishes the apply (kp-rm {name} discards what is left of it)"
                    if isinstance(exc, KpError):
                        exc.hint = f"{'free some space' if exc.code == 'no_space' else 'fix the cause'}, then {finish}"
                    else:
                        say(f"{name}: interrupted half-way; {finish}")
                raise
            _pause("applied")
            done = {change.path for change in applied}
            left_out = [change for change in changes if change.path not in done]  # fifos, sockets, devices
            applied_paths = sorted({*done_before, *done, *(c.path for c in left_out)})
            gone = set(applied_paths)
            remaining = [c for c in _listed(q) if c.path not in gone]
            q_now = {**q, **quarantine.summary(remaining), "applied_paths": [quarantine.path_key(p)
                                                                             for p in applied_paths]}
            meta["quarantine"] = q_now
            if not remaining:
                meta.update(state="applied", applied=now_iso())
            meta["review"] = snap_id
            _note(folder, meta, say, name, "apply", review=snap_id, count=len(applied),
                  applied=[c.as_dict() for c in applied], findings=[f.as_dict() for f in findings],
                  accepted=[f.as_dict() for f in accepted], forced=force, resumed=resume)
            store.write_meta(folder, meta)
            if expect is not None:  # what is left is the rest of the snapshot reviewed
                review.save_id(folder, review.snapshot_id(remaining, {c.path: expect[c.path] for c in remaining
                                                                      if c.path in expect}))
            (folder / JOURNAL).unlink(missing_ok=True)
        for warning in warnings:
            say(f"{name}: {warning}")
        record = {k: v for k, v in meta.items() if k not in (*folders.PRIVATE, "fingerprints")}
        record.update(applied=now_iso(), applied_count=len(applied),
                      quarantine={**q_now, **({"applied": True} if not remaining else {}),
                                  "applied_now": quarantine.summary(applied)["changes"],
                                  **({"not_applied": [c.as_dict() for c in left_out]} if left_out else {})},
                      findings=[f.as_dict() for f in findings], accepted=[f.as_dict() for f in accepted])
        if remaining:
            say(f"{name}: {len(remaining)} change{'s' * (len(remaining) != 1)} stay in quarantine "
                f"(kp-run --apply {name} applies them, kp-rm {name} discards them)")
    record["removed"] = False
    return record


def discard(store: Store, name: str, *, expect_id: str | None, say: Callable[[str], None]) -> Record:
    """Throw a quarantined run's changes away and keep the rest of it: its logs, and the decision,
    logged in its review log and sealed (evidence.py).  State discarded; kp-rm removes the run."""
    from kodepipe.container import evidence, quarantine
    from kodepipe.core.state import remove_tree

    with store.lock(name):
        folder, meta, q, upper, _ = _open(store, name, expect_id)
        if (folder / JOURNAL).exists():
            raise KpError(f"{name}: an apply stopped half-way",
                          hint=f"kp-run --apply {name} finishes it first; kp-rm {name} removes the whole run")
        if upper.parent != folder or upper.name != "upper":
            raise KpError(f"{name}: its quarantine is not in its folder ({quarantine.show(str(upper))})")
        done = {quarantine.from_key(str(p)) for p in q.get("applied_paths") or []}
        thrown = [c for c in _listed(q) if c.path not in done]
        aside = folder / f".discarded-{os.getpid()}"
        if upper.exists():
            os.rename(upper, aside)  # the name is free at once; a kill from here leaves only this to remove
            remove_tree(aside)
        os.mkdir(upper, 0o700)
        meta["quarantine"] = {**q, "discarded": now_iso(), **quarantine.summary([])}
        meta["state"] = "discarded"
        _note(folder, meta, say, name, "discard", discarded=len(thrown),
              **evidence.quarantine_entry([c.as_dict() for c in thrown]))
        store.write_meta(folder, meta)
    record = {k: v for k, v in meta.items() if k not in (*folders.PRIVATE, "fingerprints")}
    record["path"] = str(folder)
    return record


def _note(folder: Path, meta: dict[str, Any], say: Callable[[str], None], name: str, action: str,
          **fields: Any) -> None:
    """The decision, into the run's review log (evidence.py); a failure is said, never the apply's end."""
    from kodepipe.container import evidence

    try:
        evidence.note(folder, meta, action, **fields)
    except Exception as exc:
        say(f"{name}: the review log could not be written: {exc.message if isinstance(exc, KpError) else exc!r}")


def _open(store: Store, name: str, expect_id: str | None) -> tuple[Path, dict[str, Any], dict[str, Any], Path, Path]:
    """(folder, meta, its quarantine, upper, workspace) of a quarantined run whose kp-run has ended."""
    folder = store.folder(folders.KIND, name)
    if not folder.is_dir():
        raise NotFound(f"there is no kp-run named {name}", hint="kp-ls --kind container lists them")
    meta = store.read_meta(folder)
    if meta is None:
        raise KpError(f"{name}: its metadata is unreadable", hint=f"look in {folder}; kp-rm {name} discards it")
    check_id(meta, expect_id)
    q = meta.get("quarantine")
    if meta.get("state") != "quarantined" or not isinstance(q, dict):
        raise NotQuarantined(f"{name} has no quarantined changes (it is {meta.get('state')})")
    if mounts_under(folder):
        raise KpError(f"{name}: its overlay is still mounted (is its kp-run still running?)",
                      hint="wait for it to finish; kp-rm removes a run whose kp-run was killed")
    # a VM run's quarantine names its lower layer on the host (the folder shared with kp-boot --share:
    # the record's workspace is the guest's path) and the host ids its files get (vmrun.review)
    lower = q.get("lower")
    upper, workspace = Path(q["path"]), Path(str(lower if isinstance(lower, str) else meta.get("workspace")))
    return folder, meta, q, upper, workspace


def locate(store: Store, name: str, expect_id: str | None) -> tuple[Path, dict[str, Any], Path, Path, list[Any]]:
    """(folder, meta, upper, workspace, changes not yet applied) of a quarantined run, for a review."""
    from kodepipe.container import quarantine

    folder, meta, q, upper, workspace = _open(store, name, expect_id)
    done = {quarantine.from_key(str(p)) for p in q.get("applied_paths") or []}
    return folder, meta, upper, workspace, [c for c in quarantine.changes(upper, workspace) if c.path not in done]


def _listed(q: dict[str, Any]) -> list[Any]:
    from kodepipe.container import quarantine

    listed = q.get("changes")
    return [quarantine.Change.from_dict(c) for c in listed] if isinstance(listed, list) else []


def _as_listed(q: dict[str, Any], changes: list[Any]) -> bool:
    """Whether ``changes`` are the ones the run's record listed: its "changes" (exact, whatever the
    names' bytes), or in a record made before it had them, the paths by kind."""
    from kodepipe.container import quarantine

    listed = q.get("changes")
    if isinstance(listed, list):
        try:
            return all(isinstance(c, dict) for c in listed) and \
                sorted((quarantine.Change.from_dict(c) for c in listed), key=lambda c: c.path) == changes
        except KpError:
            return False
    paths = {k: sorted(q.get(k) or []) for k in quarantine.KINDS}
    return {k: v for k, v in quarantine.summary(changes).items() if k in quarantine.KINDS} == paths


def abandon(folder: Path) -> list[str]:
    """Remove the temporary files that an interrupted apply of this run left in its workspace
    (kp-rm does this before it discards the run); returns their paths in the workspace."""
    from kodepipe.container import quarantine

    try:
        journal = read_journal(folder)
    except KpError:
        return []
    if journal is None:
        return []
    try:
        return quarantine.remove_temps(Path(journal["workspace"]), journal["changes"], journal["prefix"])
    except (KpError, OSError):
        return []


# -- the journal ---------------------------------------------------------------------------------------


def write_journal(folder: Path, journal: dict[str, Any]) -> None:
    write_atomic(folder / JOURNAL, orjson.dumps(journal) + b"\n")


def read_journal(folder: Path) -> dict[str, Any] | None:
    """The journal of an interrupted apply, checked; None when there is none."""
    from kodepipe.container import quarantine

    path = folder / JOURNAL
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except orjson.JSONDecodeError as exc:
        raise KpError(f"{path} is corrupt ({exc})", hint="kp-rm discards the run") from None
    try:
        if not isinstance(data, dict):
            raise BadInput("not an object")
        changes = data.get("changes")
        if not isinstance(changes, list) or not all(isinstance(c, dict) for c in changes):
            raise BadInput("no list of changes")
        prefix, started = data.get("prefix"), data.get("started")
        if not isinstance(prefix, str) or not prefix.startswith(quarantine.TEMP_PREFIX) or "/" in prefix:
            raise BadInput("no temporary name prefix")
        if not isinstance(data.get("workspace"), str) or not isinstance(data.get("force"), bool):
            raise BadInput("no workspace or force flag")
        expect = data.get("expect")
        if expect is not None and (not isinstance(expect, dict) or
                                   not all(isinstance(v, str) for v in expect.values())):
            raise BadInput("a bad list of reviewed blobs")
        return {"changes": [quarantine.Change.from_dict(c) for c in changes], "prefix": prefix,
                "workspace": data["workspace"], "force": data["force"],
                "started": started if isinstance(started, str) else "?",
                "expect": None if expect is None else {quarantine.from_key(k): v for k, v in expect.items()},
                "review": data.get("review") if isinstance(data.get("review"), str) else None}
    except BadInput as exc:
        raise KpError(f"{path} is corrupt ({exc.message})", hint="kp-rm discards the run") from None


# -- the workspace lock --------------------------------------------------------------------------------


def workspace_lock_path(store: Store, workspace: Path) -> Path:
    """The lock file of a workspace: by its directory's identity, in the state dir (out of the agent's reach)."""
    try:
        st = os.stat(workspace)
    except OSError as exc:
        raise NotFound(f"the workspace {workspace} cannot be reached: {exc.strerror}") from None
    return store.root / "locks" / f"workspace.{st.st_dev:x}.{st.st_ino:x}.lock"


@contextmanager
def workspace_lock(store: Store, workspace: Path, waiting: str, say: Callable[[str], None],
                   wait: float = WORKSPACE_WAIT) -> Iterator[None]:
    """Hold the workspace's exclusive lock; ``say(waiting)`` once if another holds it; Busy after ``wait``."""
    path = workspace_lock_path(store, workspace)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline, delay, said = time.monotonic() + wait, 0.01, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise Busy(f"another kp-run --apply to {workspace} did not finish within {wait:g} s",
                               hint="try again when it is done") from None
                if not said:
                    say(waiting)
                    said = True
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
        yield
    finally:
        os.close(fd)


def _pause(point: str) -> None:
    """A test hook (PAUSE_ENV): stop at a named point until the test releases or kills the process."""
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    points, _, where = spec.partition(":")
    if point not in points.split(","):
        return
    marker = Path(where) / f"{point}.{os.getpid()}"
    marker.write_bytes(b"")
    deadline = time.monotonic() + 300
    while marker.exists() and time.monotonic() < deadline:
        time.sleep(0.005)
