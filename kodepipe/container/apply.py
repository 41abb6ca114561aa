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
from collections.abc import Callable, Iterator
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


def apply(store: Store, name: str, *, expect_id: str | None, force: bool,
          say: Callable[[str], None]) -> Record:
    """Apply, then remove the quarantine; nothing is removed if applying fails."""
    from kodepipe.container import quarantine

    folder = store.folder(folders.KIND, name)
    with store.lock(name):
        if not folder.is_dir():
            raise NotFound(f"there is no kp-run named {name}", hint="kp-ls --kind container lists them")
        meta = store.read_meta(folder)
        if meta is None:
            raise KpError(f"{name}: its metadata is unreadable", hint=f"look in {folder}; kp-rm {name} discards it")
        check_id(meta, expect_id)
        q = meta.get("quarantine")
        if meta.get("state") != "quarantined" or not isinstance(q, dict):
            raise NotQuarantined(f"{name} has no quarantined changes (it is {meta.get('state')})")
        # a VM run's quarantine names its lower layer on the host (the folder shared with kp-boot --share:
        # the record's workspace is the guest's path) and the host ids its files get (vmrun.review)
        lower = q.get("lower")
        upper, workspace = Path(q["path"]), Path(str(lower if isinstance(lower, str) else meta.get("workspace")))
        if mounts_under(folder):
            raise KpError(f"{name}: its overlay is still mounted (is its kp-run still running?)",
                          hint="wait for it to finish; kp-rm removes a run whose kp-run was killed")
        user = meta.get("user") or {}
        owner = (int(user["host_uid"]), int(user["host_gid"])) if "host_uid" in user else None
        if isinstance(lower, str):
            owner = (int(q["owner"][0]), int(q["owner"][1]))
        _pause("ready")
        with workspace_lock(store, workspace, f"{name}: waiting for another kp-run --apply to {workspace}", say):
            _pause("locked")
            journal = read_journal(folder)
            if journal is None:
                changes = quarantine.changes(upper, workspace)
                if not force and not _as_listed(q, changes):
                    raise quarantine.Conflict(f"{name}: the quarantine's contents differ from what its record "
                                              "listed after the run (was its container still running?)",
                                              hint="review it again with kp-ls; --force applies what is there now")
                from kodepipe.host import gitguard

                # any .git, and anything in or making a bare repository: git would read it as its
                # configuration (hooks, core.fsmonitor, ...) and run the agent's code as you
                risky = gitguard.in_changes(changes, workspace)
                if risky and not force:
                    raise quarantine.Conflict(f"{name}: the agent changed git metadata: {gitguard.shown(risky)}: git "
                                              "reads it as configuration, hooks or a repository and can run its code "
                                              "as you", hint=f"inspect them in {upper}; --force applies them anyway")
                for finding in quarantine.findings(changes):
                    say(f"{name}: {finding}")
                prefix, resume = quarantine.temp_prefix(), False
            else:
                changes, prefix = journal["changes"], journal["prefix"]
                force, resume = force or journal["force"], True
                say(f"{name}: finishing the apply that was interrupted (started {journal['started']})")
                quarantine.remove_temps(workspace, changes, prefix)
            counts: dict[str, int] = {}

            def on_step(event: str, path: str) -> None:
                if event == "checked":
                    counts["checked"] = 1
                    _pause("checked")
                    if not resume:  # before the first change, and only once every check passed
                        write_journal(folder, {"started": now_iso(), "pid": os.getpid(), "workspace": str(workspace),
                                               "force": force, "prefix": prefix,
                                               "changes": [c.as_dict() for c in changes]})
                    _pause("journaled")
                    return
                counts[event] = counts.get(event, 0) + 1
                _pause(f"{event}-{counts[event]}")

            try:
                applied, warnings = quarantine.apply(upper, workspace, changes,
                                                     fingerprints=meta.get("fingerprints") or {}, owner=owner,
                                                     force=force, tmp_prefix=prefix, resume=resume, on_step=on_step)
            except BaseException as exc:
                if "checked" in counts and (folder / JOURNAL).exists():  # it stopped half-way
                    finish = f"kp-run --apply {name} finishes the apply (kp-rm {name} discards what is left of it)"
                    if isinstance(exc, KpError):
                        exc.hint = f"{'free some space' if exc.code == 'no_space' else 'fix the cause'}, then {finish}"
                    else:
                        say(f"{name}: interrupted half-way; {finish}")
                raise
            _pause("applied")
        for warning in warnings:
            say(f"{name}: {warning}")
        record = {k: v for k, v in meta.items() if k not in (*folders.PRIVATE, "fingerprints")}
        done = {change.path for change in applied}
        left_out = [change.as_dict() for change in changes if change.path not in done]  # fifos, sockets, devices
        record.update(state="applied", applied=now_iso(), applied_count=len(applied),
                      quarantine={**q, **quarantine.summary(applied), "applied": True,
                                  **({"not_applied": left_out} if left_out else {})})
        store.discard(folder)
    record["removed"] = True
    return record


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
        return {"changes": [quarantine.Change.from_dict(c) for c in changes], "prefix": prefix,
                "workspace": data["workspace"], "force": data["force"],
                "started": started if isinstance(started, str) else "?"}
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
