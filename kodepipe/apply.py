"""Applying a quarantined run's changes to its workspace (kp-run --apply)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kodepipe import containers
from kodepipe.errors import KpError, NotFound
from kodepipe.records import Record
from kodepipe.state import Store, check_id, mounts_under, now_iso


class NotQuarantined(KpError):
    code = "not_quarantined"


def apply(store: Store, name: str, *, expect_id: str | None, force: bool,
          say: Callable[[str], None]) -> Record:
    """Apply, then remove the quarantine; nothing is removed if applying fails."""
    from kodepipe import quarantine

    folder = store.folder(containers.KIND, name)
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
        upper, workspace = Path(q["path"]), Path(str(meta.get("workspace")))
        if mounts_under(folder):
            raise KpError(f"{name}: its overlay is still mounted (is its kp-run still running?)",
                          hint="wait for it to finish; kp-rm removes a run whose kp-run was killed")
        user = meta.get("user") or {}
        owner = (int(user["host_uid"]), int(user["host_gid"])) if "host_uid" in user else None
        changes = quarantine.changes(upper, workspace)
        listed = {k: sorted(q.get(k) or []) for k in ("added", "modified", "deleted")}
        if {k: sorted(v) for k, v in quarantine.summary(changes).items()} != listed and not force:
            raise quarantine.Conflict(f"{name}: the quarantine's contents differ from what its record listed "
                                      "after the run (was its container still running?)",
                                      hint="review it again with kp-ls; --force applies what is there now")
        risky = [c.path for c in changes if c.path == ".git/config" or c.path.startswith(".git/hooks")]
        if risky and not force:
            raise quarantine.Conflict(f"{name}: the agent changed {', '.join(risky[:5])}: git runs hooks and "
                                      "core.fsmonitor commands as you", hint="inspect them in "
                                      f"{upper}; --force applies them anyway")
        applied, warnings = quarantine.apply(upper, workspace, changes, fingerprints=meta.get("fingerprints") or {},
                                             owner=owner, force=force)
        for warning in warnings:
            say(f"{name}: {warning}")
        record = {k: v for k, v in meta.items() if k not in ("pid", "pid_start", "boot_id", "fingerprints")}
        record.update(state="applied", applied=now_iso(), applied_count=len(applied),
                      quarantine={**q, **quarantine.summary(applied), "applied": True})
        store.discard(folder)
    record["removed"] = True
    return record
