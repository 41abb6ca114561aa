"""Hash chains over the logs kodepipe writes for a run: evidence that shows any later change.

Each chained log ``FILE`` (the audit's strace log, the egress proxy's decisions, the review
log) has a sidecar ``FILE.chain`` written as the log is: one JSON line per span of whole
lines of FILE, and each entry carries the link of the one before it::

    {"n": 0, "from": 0, "to": 812, "lines": 3, "sha256": "<the span's bytes>", "prev": "000...0"}

An entry's link is the SHA-256 of ``prev``, ``n``, ``from``, ``to`` and ``sha256`` (see
``link``).  A JSON-lines log that kodepipe writes itself gets one entry per line; strace's
log, written by strace, gets one entry per stretch a follower found appended (at most one
each POLL seconds).  Bytes that a writer finds in a log beyond its chain's end (written by
no chained writer) are chained as a ``"foreign": true`` entry first, and verifying reports
them.

When a run ends (and after each later append, such as an apply), the chain's head (its
last link, entry count and bytes) is *sealed*: appended to an index outside the run's
folder, ``STATE/evidence/index.jsonl``, whose lines are themselves chained (``prev`` is
the SHA-256 of the previous index line) and, with a key, signed with ed25519 over the head
and that ``prev``.  Verifying needs the log, its chain and the index (and only the public
key for signatures).  Nothing here stores an absolute path: a state directory that moved
verifies as well.

What it proves: that a log is the one sealed, to the byte.  An edit, deletion,
insertion, reordering or truncation of lines breaks a span's hash or the head; a log and
chain recomputed by a forger, and an index rewritten to match, are caught only by a
signature whose private key the forger does not have.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

SUFFIX = ".chain"
GENESIS = "0" * 64
INDEX = Path("evidence") / "index.jsonl"
POLL = 0.2  # a follower's interval
SPAN = 8 << 20  # a follower's entry covers at most this much: a huge burst is several entries
HEAD_CONTEXT = b"kodepipe-chain-head-v1\n"
MAX_ENTRY = 4096  # a chain or index line longer than this is not one kodepipe wrote


def link(prev: str, n: int, start: int, end: int, digest: str) -> str:
    """The link of one entry: what the next entry carries as ``prev``."""
    return hashlib.sha256(f"{prev}\n{n}\n{start}\n{end}\n{digest}".encode()).hexdigest()


def chain_path(log: Path) -> Path:
    return log.with_name(log.name + SUFFIX)


@dataclass
class _Tip:
    n: int = 0  # the next entry's number
    end: int = 0  # the byte the chain covers up to
    lines: int = 0
    link: str = GENESIS


class Chain:
    """Appends to a log and to its chain.  ``append`` for a log kodepipe writes itself (whole
    lines), ``catch_up`` for one another program writes (strace).  Processes that append to the
    same log take turns through an flock on the chain file."""

    def __init__(self, log: Path) -> None:
        self.log = log
        # both read and written through these descriptors only: a writer that drops its privileges once
        # they are open (a VM's egress proxy) may not be able to open either by its path again
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
        self._log_fd = os.open(log, flags, 0o600)
        self._chain_fd = os.open(chain_path(log), flags, 0o600)
        self._lock = threading.Lock()

    def _tip(self) -> _Tip:
        """Where the chain ends, from its last entry (read under the flock)."""
        last = _last_line_of(self._chain_fd)
        if last is None:
            return _Tip()
        try:
            entry = _entry(orjson.loads(last))
        except (orjson.JSONDecodeError, ValueError):
            # a broken last entry: verifying reports it; new entries go on from the log's end
            size = os.fstat(self._log_fd).st_size
            return _Tip(n=-1, end=size, link=hashlib.sha256(last).hexdigest())
        return _Tip(n=entry["n"] + 1, end=entry["to"], lines=0,
                    link=link(entry["prev"], entry["n"], entry["from"], entry["to"], entry["sha256"]))

    def _write_entry(self, tip: _Tip, start: int, data: bytes, foreign: bool = False) -> _Tip:
        digest = hashlib.sha256(data).hexdigest()
        n = max(tip.n, 0)
        entry: dict[str, Any] = {"n": n, "from": start, "to": start + len(data), "lines": data.count(b"\n"),
                                 "sha256": digest, "prev": tip.link}
        if foreign:
            entry["foreign"] = True
        os.write(self._chain_fd, orjson.dumps(entry) + b"\n")
        return _Tip(n=n + 1, end=start + len(data), link=link(tip.link, n, start, start + len(data), digest))

    @contextlib.contextmanager
    def _turn(self) -> Iterator[_Tip]:
        with self._lock:
            fcntl.flock(self._chain_fd, fcntl.LOCK_EX)
            try:
                yield self._tip()
            finally:
                fcntl.flock(self._chain_fd, fcntl.LOCK_UN)

    def append(self, data: bytes) -> None:
        """Write ``data`` (whole lines) to the log and chain it."""
        with self._turn() as tip:
            size = os.fstat(self._log_fd).st_size
            if size > tip.end:  # bytes no chained writer wrote: chained as foreign, for verify to report
                tip = self._write_entry(tip, tip.end, _pread(self._log_fd, tip.end, size - tip.end), foreign=True)
            os.write(self._log_fd, data)
            self._write_entry(tip, size, data)

    def catch_up(self, final: bool = False) -> int:
        """Chain what another program appended since the chain's end: whole lines only, unless
        ``final`` (the writer has ended), when a last partial line is chained too.  Returns the
        bytes chained."""
        done = 0
        with self._turn() as tip:
            while True:
                size = os.fstat(self._log_fd).st_size
                if size <= tip.end:
                    return done
                data = _pread(self._log_fd, tip.end, min(size - tip.end, SPAN))
                cut = data.rfind(b"\n") + 1
                if not final and len(data) < SPAN:
                    data = data[:cut]
                if not data:
                    return done
                tip = self._write_entry(tip, tip.end, data)
                done += len(data)

    def close(self) -> None:
        for fd in (self._log_fd, self._chain_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def _pread(fd: int, start: int, size: int) -> bytes:
    chunks = []
    while size > 0:
        chunk = os.pread(fd, size, start)
        if not chunk:
            break
        chunks.append(chunk)
        start += len(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _last_line_of(fd: int, most: int = MAX_ENTRY) -> bytes | None:
    size = os.fstat(fd).st_size
    tail = _pread(fd, max(0, size - most), min(size, most))
    return tail.rstrip(b"\n").rsplit(b"\n", 1)[-1] or None


def last_line(path: Path, most: int = MAX_ENTRY) -> bytes | None:
    """The last complete line of a file (read from its end), or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        return _last_line_of(fd, most)
    finally:
        os.close(fd)


def _entry(value: Any) -> dict[str, Any]:
    """A chain entry, its types checked (ValueError otherwise)."""
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    for key in ("n", "from", "to", "lines"):
        if not isinstance(value.get(key), int) or isinstance(value.get(key), bool) or value[key] < 0:
            raise ValueError(f"{key} is not a count")
    for key in ("sha256", "prev"):
        if not isinstance(value.get(key), str) or len(value[key]) != 64:
            raise ValueError(f"{key} is not a SHA-256")
    if value["to"] < value["from"]:
        raise ValueError("it ends before it starts")
    return value


class Follower:
    """Chains a log that another program (strace) writes, as it grows, from a thread."""

    def __init__(self, log: Path, poll: float = POLL) -> None:
        self.chain = Chain(log)
        self.poll = poll
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kp-chain", daemon=True)
        self.problem: str | None = None

    def start(self) -> Follower:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._done.wait(self.poll):
            try:
                self.chain.catch_up()
            except OSError as exc:
                self.problem = f"chaining {self.chain.log.name} failed: {exc.strerror}"
                return

    def close(self) -> None:
        """The writer has ended: chain the rest, stop."""
        self._done.set()
        self._thread.join(timeout=30)
        try:
            self.chain.catch_up(final=True)
        except OSError as exc:
            self.problem = f"chaining {self.chain.log.name} failed: {exc.strerror}"
        self.chain.close()


# --- the index of heads ---------------------------------------------------------------------


def head_of(log: Path) -> dict[str, Any] | None:
    """The head of a log's chain as it is now: entries, bytes, lines, head (the last link)."""
    tip = _Tip()
    entries = lines = 0
    try:
        with open(chain_path(log), "rb") as handle:
            for raw in handle:
                entry = _entry(orjson.loads(raw))
                tip.link = link(entry["prev"], entry["n"], entry["from"], entry["to"], entry["sha256"])
                tip.end = entry["to"]
                entries += 1
                lines += entry["lines"]
    except FileNotFoundError:
        return None
    except (orjson.JSONDecodeError, ValueError):
        return None
    return {"entries": entries, "bytes": tip.end, "lines": lines, "head": tip.link}


def payload(entry: dict[str, Any]) -> bytes:
    """What a head's signature covers: the run, the log, the head and the index line before it."""
    return HEAD_CONTEXT + "\n".join(str(entry.get(k)) for k in
                                    ("run_id", "log", "entries", "bytes", "head", "prev")).encode()


class Signer:
    """An ed25519 private key (OpenSSH format) that signs heads."""

    def __init__(self, private: Path) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import load_ssh_private_key

        key = load_ssh_private_key(private.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{private} is not an ed25519 key")
        self.key = key
        self.fingerprint = fingerprint(public_bytes(key))

    def sign(self, data: bytes) -> str:
        return base64.b64encode(self.key.sign(data)).decode()


def public_bytes(key: Any) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return bytes(key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH))


def fingerprint(openssh_public: bytes) -> str:
    blob = base64.b64decode(openssh_public.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def make_key(private: Path) -> Path:
    """A new ed25519 key pair: ``private`` (0600) and ``private``.pub; returns the public one."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    key = Ed25519PrivateKey.generate()
    private.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption()))
    public = private.with_name(private.name + ".pub")
    public.write_bytes(public_bytes(key) + b" kodepipe-audit\n")
    return public


def check_signature(public: bytes, entry: dict[str, Any]) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    key = load_ssh_public_key(public)
    if not isinstance(key, Ed25519PublicKey) or not isinstance(entry.get("sig"), str):
        return False
    try:
        key.verify(base64.b64decode(entry["sig"], validate=True), payload(entry))
    except (InvalidSignature, ValueError):
        return False
    return True


def seal(index: Path, folder: Path, run: str, run_id: str, logs: list[str],
         signer: Signer | None = None) -> list[dict[str, Any]]:
    """Append the heads of a run's chained logs (those present in ``folder``) to the index."""
    index.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    sealed = []
    fd = os.open(index, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        last = last_line(index)
        prev = hashlib.sha256(last + b"\n").hexdigest() if last is not None else GENESIS
        for name in logs:
            head = head_of(folder / name)
            if head is None:
                continue
            entry: dict[str, Any] = {"kind": "head", "ts": round(time.time(), 3), "run": run, "run_id": run_id,
                                     "log": name, **head, "prev": prev}
            if signer is not None:
                entry.update(key=signer.fingerprint, sig=signer.sign(payload(entry)))
            line = orjson.dumps(entry) + b"\n"
            os.write(fd, line)
            prev = hashlib.sha256(line).hexdigest()
            sealed.append(entry)
    finally:
        os.close(fd)
    return sealed


# --- verifying ------------------------------------------------------------------------------


@dataclass
class Index:
    """The index as read: the latest head of each (run id, log), and the index's own problems."""

    heads: dict[tuple[str, str], dict[str, Any]]
    problem: str | None = None


def read_index(index: Path) -> Index:
    heads: dict[tuple[str, str], dict[str, Any]] = {}
    problem = None
    prev = GENESIS
    try:
        handle = open(index, "rb")  # noqa: SIM115
    except FileNotFoundError:
        return Index(heads, None)
    with handle:
        for lineno, raw in enumerate(handle, 1):
            try:
                entry = orjson.loads(raw)
                if not isinstance(entry, dict):
                    raise ValueError
            except (orjson.JSONDecodeError, ValueError):
                problem = problem or f"index line {lineno} is not a JSON object"
                prev = hashlib.sha256(raw).hexdigest()
                continue
            if entry.get("prev") != prev and problem is None:
                problem = f"index line {lineno} does not follow the line before it (edited, inserted or deleted)"
            prev = hashlib.sha256(raw).hexdigest()
            if entry.get("kind") == "head" and isinstance(entry.get("run_id"), str) and \
                    isinstance(entry.get("log"), str):
                heads[(entry["run_id"], entry["log"])] = entry
    return Index(heads, problem)


def verify_log(log: Path, head: dict[str, Any] | None, *, public: bytes | None = None) -> dict[str, Any]:
    """Check one log against its chain and its sealed head.  The result: log, ok, entries, lines,
    bytes, signed, and for a failure the first broken link (problem; entry and lines where known)."""
    result: dict[str, Any] = {"log": log.name, "ok": False, "entries": 0, "lines": 0, "bytes": 0,
                              "signed": bool(head and head.get("sig"))}

    def broken(problem: str, **where: Any) -> dict[str, Any]:
        result.update(problem=problem, **where)
        return result

    try:
        log_handle = open(log, "rb")  # noqa: SIM115
    except FileNotFoundError:
        return broken("the log is missing")
    with log_handle:
        try:
            chain = open(chain_path(log), "rb")  # noqa: SIM115
        except FileNotFoundError:
            return broken(f"the log has no chain ({chain_path(log).name} is missing)")
        prev, pos, lines, count, foreign = GENESIS, 0, 0, 0, None
        with chain:
            for number, raw in enumerate(chain):
                if len(raw) > MAX_ENTRY:
                    return broken(f"chain entry {number} is not one kodepipe wrote (too long)", entry=number)
                try:
                    entry = _entry(orjson.loads(raw))
                except (orjson.JSONDecodeError, ValueError) as exc:
                    return broken(f"chain entry {number} is malformed ({exc})", entry=number)
                where = {"entry": number, "first_line": lines + 1}
                if entry["n"] != number or entry["prev"] != prev:
                    return broken(f"chain entry {number} does not follow the one before it "
                                  "(the chain was edited, or entries inserted, deleted or reordered)", **where)
                if entry["from"] != pos:
                    return broken(f"chain entry {number} starts at byte {entry['from']}, not where the one "
                                  f"before ended ({pos})", **where)
                data = log_handle.read(entry["to"] - entry["from"])
                if len(data) < entry["to"] - entry["from"]:
                    return broken(f"the log ends at byte {pos + len(data)}, inside chain entry {number} "
                                  f"(from line {lines + 1}): it was truncated", **where)
                span = f"line {lines + 1}" if entry["lines"] <= 1 else f"lines {lines + 1}-{lines + entry['lines']}"
                if hashlib.sha256(data).hexdigest() != entry["sha256"] or data.count(b"\n") != entry["lines"]:
                    return broken(f"{span} (chain entry {number}) differ from what was chained: edited, "
                                  "deleted, inserted or reordered", **where)
                if entry.get("foreign") and foreign is None:
                    foreign = f"{span} (bytes {pos}-{entry['to']}) were written by no chained writer"
                prev = link(entry["prev"], entry["n"], entry["from"], entry["to"], entry["sha256"])
                pos, lines, count = entry["to"], lines + entry["lines"], count + 1
        result.update(entries=count, lines=lines, bytes=pos)
        rest = log_handle.read(1)
        if rest:
            size = os.fstat(log_handle.fileno()).st_size
            return broken(f"the log goes on past its chain's end: bytes {pos}-{size} (from line {lines + 1}) were "
                          "added afterwards", first_line=lines + 1)
    if foreign is not None:
        return broken(foreign)
    if head is None:
        return broken("the index holds no head for this log: it was never sealed (the run did not end "
                      "normally), or the index lost it")
    if not isinstance(head.get("entries"), int) or not isinstance(head.get("head"), str):
        return broken("the index's head for this log is malformed")
    if count < head["entries"]:
        return broken(f"the chain has {count} entries, the sealed head {head['entries']}: the log and its chain "
                      "were truncated")
    if count > head["entries"]:
        return broken(f"the chain has {count} entries, the sealed head {head['entries']}: entries were added "
                      "after it was sealed")
    if prev != head["head"]:
        return broken("the chain's head is not the sealed one: the log and its chain were replaced")
    if public is not None:
        if not head.get("sig"):
            return broken("the sealed head is not signed")
        if not check_signature(public, head):
            return broken("the sealed head's signature does not verify with the given key: the head was forged "
                          "or signed by another key")
    result["ok"] = True
    return result
