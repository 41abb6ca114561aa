"""The hash chains over a run's logs (kodepipe.core.chain): every kind of tampering is caught."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from kodepipe.core import chain

LINES = [orjson.dumps({"kind": "egress", "n": i, "host": f"h{i}.example"}) + b"\n" for i in range(12)]


def written(folder: Path, name: str = "egress.jsonl", lines: list[bytes] = LINES) -> Path:
    log = folder / name
    writer = chain.Chain(log)
    for line in lines:
        writer.append(line)
    writer.close()
    return log


def sealed(folder: Path, signer: chain.Signer | None = None, name: str = "egress.jsonl") -> tuple[Path, Path]:
    log = written(folder, name)
    index = folder.parent / "index.jsonl"
    chain.seal(index, folder, "run-1", "abc123", [name], signer)
    return log, index


def check(log: Path, index: Path, public: bytes | None = None) -> dict[str, object]:
    heads = chain.read_index(index).heads
    return chain.verify_log(log, heads.get(("abc123", log.name)), public=public)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    run = tmp_path / "run-1"
    run.mkdir()
    return run


def test_an_untouched_log_verifies(folder: Path) -> None:
    log, index = sealed(folder)
    result = check(log, index)
    assert result["ok"] is True, result
    assert result["entries"] == len(LINES) and result["lines"] == len(LINES)
    assert result["bytes"] == sum(map(len, LINES))


def lines_of(log: Path) -> list[bytes]:
    return log.read_bytes().splitlines(keepends=True)


TAMPERINGS: dict[str, Callable[[list[bytes]], list[bytes]]] = {
    "edit": lambda ls: [*ls[:5], ls[5].replace(b"h5.example", b"h5.exampla"), *ls[6:]],
    "delete": lambda ls: [*ls[:5], *ls[6:]],
    "insert": lambda ls: [*ls[:5], b'{"kind":"egress","host":"evil"}\n', *ls[5:]],
    "reorder": lambda ls: [*ls[:5], ls[6], ls[5], *ls[7:]],
    "truncate": lambda ls: ls[:8],
    "append": lambda ls: [*ls, b'{"kind":"egress","host":"later"}\n'],
    "same length edit": lambda ls: [*ls[:5], ls[5].replace(b'"n":5', b'"n":7'), *ls[6:]],
}


@pytest.mark.parametrize("how", TAMPERINGS)
def test_each_kind_of_tampering_with_a_log_is_caught(folder: Path, how: str) -> None:
    log, index = sealed(folder)
    log.write_bytes(b"".join(TAMPERINGS[how](lines_of(log))))
    result = check(log, index)
    assert result["ok"] is False
    assert isinstance(result["problem"], str)
    if how in ("edit", "delete", "insert", "reorder", "same length edit"):
        # the first broken link is named: line 6, the sixth entry
        assert result["entry"] == 5 and result["first_line"] == 6, result
    if how == "truncate":
        assert "truncated" in result["problem"]


@pytest.mark.parametrize("how", ["truncate both", "drop the last entry", "edit an entry", "reorder entries"])
def test_tampering_with_the_log_and_its_chain_together_is_caught(folder: Path, how: str) -> None:
    log, index = sealed(folder)
    side = chain.chain_path(log)
    entries = lines_of(side)
    if how == "truncate both":  # the log and the chain cut back consistently: the sealed head tells
        log.write_bytes(b"".join(lines_of(log)[:8]))
        side.write_bytes(b"".join(entries[:8]))
        assert "truncated" in str(check(log, index)["problem"])
    elif how == "drop the last entry":
        side.write_bytes(b"".join(entries[:-1]))
        assert check(log, index)["ok"] is False
    elif how == "edit an entry":
        side.write_bytes(b"".join([*entries[:3], entries[3].replace(b'"lines":1', b'"lines":2'), *entries[4:]]))
        assert check(log, index)["ok"] is False
    else:
        side.write_bytes(b"".join([*entries[:3], entries[4], entries[3], *entries[5:]]))
        assert check(log, index)["entry"] == 3


def forge(folder: Path, index: Path, signer: chain.Signer | None = None) -> Path:
    """A whole log replaced by a re-chained forgery, and the index rewritten to match (without the
    original index lines for this run): all a forger with write access but no private key can do."""
    log = folder / "egress.jsonl"
    log.unlink()
    chain.chain_path(log).unlink()
    written(folder, lines=[line.replace(b"h3.example", b"innocent.example") for line in LINES])
    index.unlink()
    chain.seal(index, folder, "run-1", "abc123", ["egress.jsonl"], signer)
    return log


def test_a_rechained_forgery_passes_without_a_signature_and_fails_with_one(folder: Path, tmp_path: Path) -> None:
    key = tmp_path / "keys" / "audit_ed25519"
    public = chain.make_key(key).read_bytes()
    log, index = sealed(folder, chain.Signer(key))
    assert check(log, index, public)["ok"] is True
    forge(folder, index)  # unsigned
    assert check(log, index)["ok"] is True  # what a chain alone cannot tell: the reason for --sign
    result = check(log, index, public)
    assert result["ok"] is False and "not signed" in str(result["problem"])
    # signed with the forger's own key
    other = tmp_path / "keys" / "forger"
    chain.make_key(other)
    forge(folder, index, chain.Signer(other))
    result = check(log, index, public)
    assert result["ok"] is False and "signature" in str(result["problem"])


def test_a_signature_moved_to_another_head_does_not_verify(folder: Path, tmp_path: Path) -> None:
    key = tmp_path / "audit_ed25519"
    public = chain.make_key(key).read_bytes()
    _log, index = sealed(folder, chain.Signer(key))
    entry = orjson.loads(chain.last_line(index) or b"")
    entry["entries"] = 8  # a truncated log, under the old signature
    assert chain.check_signature(public, entry) is False


def test_the_index_is_chained_too(folder: Path) -> None:
    _log, index = sealed(folder)
    chain.seal(index, folder, "run-1", "abc123", ["egress.jsonl"])
    assert chain.read_index(index).problem is None
    _first, second = lines_of(index)
    index.write_bytes(second)
    assert "does not follow" in str(chain.read_index(index).problem)


def test_bytes_written_past_the_chain_are_chained_as_foreign_and_reported(folder: Path) -> None:
    log = written(folder)
    with open(log, "ab") as out:
        out.write(b'{"kind":"egress","host":"smuggled"}\n')
    writer = chain.Chain(log)
    writer.append(b'{"kind":"egress","host":"next"}\n')
    writer.close()
    index = folder.parent / "index.jsonl"
    chain.seal(index, folder, "run-1", "abc123", ["egress.jsonl"])
    result = check(log, index)
    assert result["ok"] is False and "no chained writer" in str(result["problem"])
    assert "line 13" in str(result["problem"])


def test_a_log_never_sealed_is_not_verified(folder: Path) -> None:
    log = written(folder)
    result = chain.verify_log(log, None)
    assert result["ok"] is False and "never sealed" in str(result["problem"])


def test_a_moved_folder_still_verifies(folder: Path, tmp_path: Path) -> None:
    _log, index = sealed(folder)
    moved = tmp_path / "elsewhere"
    os.rename(folder, moved)
    assert check(moved / "egress.jsonl", index)["ok"] is True


def test_a_follower_chains_a_log_another_program_writes(folder: Path) -> None:
    log = folder / "audit.strace"
    log.write_bytes(b"")
    follower = chain.Follower(log, poll=0.01).start()
    stop = threading.Event()

    def strace_like() -> None:
        with open(log, "ab", buffering=0) as out:
            for i in range(400):
                out.write(f"{i} 1700000000.{i:06d} openat(AT_FDCWD, \"/w/f{i}\", O_RDONLY) = 3".encode())
                if i % 7 == 0:
                    time.sleep(0.001)  # the follower sees half-written lines
                out.write(b"\n")
        stop.set()

    writer = threading.Thread(target=strace_like)
    writer.start()
    writer.join()
    with open(log, "ab") as out:
        out.write(b"a last line without its newline")
    follower.close()
    index = folder.parent / "index.jsonl"
    chain.seal(index, folder, "run-1", "abc123", ["audit.strace"])
    result = check(log, index)
    assert result["ok"] is True, result
    assert result["bytes"] == log.stat().st_size and result["lines"] == 400
    # the follower cut spans at line ends: an edit names the lines of its span
    data = log.read_bytes()
    log.write_bytes(data.replace(b"/w/f200\"", b"/w/f201\""))
    result = check(log, index)
    assert result["ok"] is False and isinstance(result["first_line"], int) and result["first_line"] <= 201


@pytest.mark.parametrize("raw", [b"[]\n", b'{"n": "0"}\n', b"not json\n", b'{"n": true, "from": 0}\n',
                                 b"x" * 5000 + b"\n"])
def test_a_malformed_chain_is_a_clear_problem(folder: Path, raw: bytes) -> None:
    log, index = sealed(folder)
    side = chain.chain_path(log)
    side.write_bytes(raw + side.read_bytes())
    result = check(log, index)
    assert result["ok"] is False and "chain entry 0" in str(result["problem"])


def test_missing_pieces(folder: Path) -> None:
    log, index = sealed(folder)
    chain.chain_path(log).unlink()
    assert "no chain" in str(check(log, index)["problem"])
    log.unlink()
    assert "missing" in str(check(log, index)["problem"])


def test_a_rechained_log_under_the_old_index_is_caught(folder: Path) -> None:
    log, index = sealed(folder)
    log.unlink()
    chain.chain_path(log).unlink()
    written(folder, lines=[line.replace(b"h3.example", b"innocent.example") for line in LINES])
    result = check(log, index)
    assert result["ok"] is False and "replaced" in str(result["problem"])


def test_a_writer_needs_no_path_once_it_is_open(folder: Path, tmp_path: Path) -> None:
    """A VM's egress proxy opens its log as root, then runs as QEMU's user, who cannot open the VM's
    folder: every later read and write goes through the descriptors (here: the folder moved away)."""
    writer = chain.Chain(folder / "egress.jsonl")
    writer.append(LINES[0])
    moved = tmp_path / "moved"
    os.rename(folder, moved)
    for line in LINES[1:]:
        writer.append(line)
    writer.close()
    log = moved / "egress.jsonl"
    assert chain.verify_log(log, chain.head_of(log))["entries"] == len(LINES)
    assert chain.verify_log(log, chain.head_of(log))["ok"] is True
