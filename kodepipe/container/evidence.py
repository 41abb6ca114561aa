"""A run's evidence: its chained logs, the review log, and their heads sealed in the host's index.

The logs kodepipe keeps for a run, each with a hash chain (core/chain.py) written as it is:

- ``audit.strace``: strace's own log of the agent's system calls (kp-run --audit), chained by a
  follower as strace writes it;
- ``egress.jsonl``: the egress proxy's decisions, credential injections among them;
- ``review.jsonl``: what happened to the quarantine: its changes when the run ended, the findings
  kp-review showed, each apply, export or discard.

When a run ends, and after each entry added to its review log, the heads are sealed in
``STATE/evidence/index.jsonl``, outside every run's folder, and signed when the run was started
with --sign (the key: ``CONFIG/audit_ed25519``, made on first use; its ``.pub`` is all
``kp-trace --verify --key`` needs).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from kodepipe.core import chain, paths
from kodepipe.core.errors import KpError

AUDIT_LOG = "audit.strace"
EGRESS_LOG = "egress.jsonl"
REVIEW_LOG = "review.jsonl"
LOGS = (AUDIT_LOG, EGRESS_LOG, REVIEW_LOG)
KEY = "audit_ed25519"
CHANGES_LOGGED = 10_000  # changes a quarantine entry lists; then how many more


def index_path() -> Path:
    return paths.state_dir() / chain.INDEX


def key_path() -> Path:
    return paths.config_dir() / KEY


def signer(make: bool = True) -> tuple[chain.Signer, bool]:
    """The host's signing key, and whether it was made just now."""
    private = key_path()
    made = False
    if not private.exists():
        if not make:
            raise KpError(f"there is no signing key ({private})", code="no_key")
        chain.make_key(private)
        made = True
    try:
        return chain.Signer(private), made
    except (OSError, ValueError) as exc:
        raise KpError(f"cannot use the signing key {private}: {exc}", code="bad_key",
                      hint="remove it to have a new one made, or put an unencrypted OpenSSH ed25519 key there",
                      ) from None


def seal(folder: Path, meta: dict[str, Any]) -> dict[str, Any] | None:
    """Seal the heads of the run's chained logs; the record's ``evidence`` field (or None: nothing
    chained).  Signed when meta's evidence asks for it (kp-run --sign)."""
    logs = [name for name in LOGS if chain.chain_path(folder / name).exists()]
    if not logs:
        return None
    wanted = isinstance(meta.get("evidence"), dict) and meta["evidence"].get("signed") is True
    key = signer()[0] if wanted else None
    sealed = chain.seal(index_path(), folder, str(meta.get("name")), str(meta.get("id")), logs, key)
    evidence: dict[str, Any] = {"logs": [e["log"] for e in sealed], "signed": key is not None,
                                "sealed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if key is not None:
        evidence["key"] = key.fingerprint
    return evidence


def note(folder: Path, meta: dict[str, Any], action: str, **fields: Any) -> None:
    """Add one entry to the run's review log and seal it again; meta's ``evidence`` is updated."""
    entry = {"kind": "review", "ts": round(time.time(), 6), "action": action, "run": meta.get("name"),
             "run_id": meta.get("id"), **fields}
    writer = chain.Chain(folder / REVIEW_LOG)
    try:
        writer.append(orjson.dumps(entry, default=str) + b"\n")
    finally:
        writer.close()
    sealed = seal(folder, meta)
    if sealed is not None:
        meta["evidence"] = sealed


def close_run(folder: Path, meta: dict[str, Any], warn: Callable[[str], None]) -> None:
    """At a run's end, on every backend: a quarantine's changes are the review log's first entry, and
    the heads of the run's logs are sealed.  meta's ``evidence`` says what was sealed, or the problem
    (said with ``warn``): the run's record stands whatever happens here."""
    try:
        q = meta.get("quarantine")
        if meta.get("state") == "quarantined" and isinstance(q, dict) and not (folder / REVIEW_LOG).exists():
            note(folder, meta, "quarantine", **quarantine_entry(list(q.get("changes") or [])))
            return
        sealed = seal(folder, meta)
        if sealed is not None:
            meta["evidence"] = sealed
    except Exception as exc:
        message = exc.message if isinstance(exc, KpError) else repr(exc)
        warn(f"the run's logs could not be sealed: {message}")
        meta["evidence"] = {**(meta.get("evidence") or {}), "problem": message}


def quarantine_entry(changes: list[dict[str, Any]]) -> dict[str, Any]:
    """The review log's entry for a quarantine's changes: each change (path, change, type), capped."""
    listed = [{k: c[k] for k in ("path", "path_b64", "change", "type", "mode") if k in c}
              for c in changes[:CHANGES_LOGGED]]
    out: dict[str, Any] = {"changes": listed, "count": len(changes)}
    if len(changes) > CHANGES_LOGGED:
        out["more"] = len(changes) - CHANGES_LOGGED
    return out
