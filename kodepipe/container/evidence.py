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


def signer() -> tuple[chain.Signer, bool]:
    """The host's signing key (made on first use), and whether it was made just now."""
    private = key_path()
    made = False
    if not private.exists():
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


def verify(folder: Path, meta: dict[str, Any], public: bytes | None = None,
           index: chain.Index | None = None) -> dict[str, Any]:
    """kp-trace --verify of one run: each of its logs (those in its folder, and those the index has
    heads for) against its chain and sealed head.  With ``public`` every head must be signed by it;
    without, heads that are signed are checked against this host's key when it has one, and a run
    whose record says it was signed must have signed heads."""
    index = index if index is not None else chain.read_index(index_path())  # read once for many runs
    run_id = str(meta.get("id"))
    names = {name for name in LOGS if (folder / name).exists() or chain.chain_path(folder / name).exists()}
    names |= {log for (rid, log) in index.heads if rid == run_id and log in LOGS}
    local = key_path().with_name(KEY + ".pub")
    key = public if public is not None else (local.read_bytes() if local.is_file() else None)
    evidence = meta.get("evidence")
    must_sign = public is not None or (isinstance(evidence, dict) and evidence.get("signed") is True)
    logs = []
    for name in sorted(names):
        head = index.heads.get((run_id, name))
        checked_with = key if (must_sign or (head is not None and head.get("sig"))) else None
        logs.append(chain.verify_log(folder / name, head, public=checked_with))
    problems = [f"{r['log']}: {r['problem']}" for r in logs if not r["ok"]]
    if must_sign and key is None:
        problems.append(f"the run's heads are signed, and there is no key to check them: give --key (its .pub), "
                        f"or keep this host's at {local}")
    if not logs:
        problems.append("the run has no chained log (no --audit, --allow or quarantine, or it predates chaining)")
    if index.problem:
        problems.append(f"the index ({index_path()}): {index.problem}")
    record: dict[str, Any] = {"kind": "verify", "name": meta.get("name"), "id": meta.get("id"),
                              "verified": not problems,
                              "signed": bool(logs) and key is not None and all(r["signed"] for r in logs),
                              "logs": logs}
    if problems:
        record["problem"] = problems[0]
    if index.problem:
        record["index_problem"] = index.problem
    return record
