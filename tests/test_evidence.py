"""A run's evidence through the real commands, on a run folder made as kp-run makes one (no container):
kp-trace RUN's timeline, --verify (and after the state directory moved), --key, kp-ls and kp-rm of an
audited run, and kp-trace's usage errors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import orjson
import pytest

from kodepipe.container import evidence
from kodepipe.core import chain
from kodepipe.core.state import Store
from tests.cli import invoke

STRACE = b"".join(
    f'{100 + i % 3} 1700000000.{100000 + i * 1000:06d} openat(AT_FDCWD, "/workspace/f{i}", O_RDONLY) = 3 <0.000010>\n'
    .encode() for i in range(20))
EXEC = b'100 1699999999.900000 execve("/bin/sh", ["sh", "-c", "x"], 0x7ffd /* 3 vars */) = 0 <0.000100>\n'


def make_run(name: str = "run-0badc0de", *, signed: bool = False) -> tuple[Path, dict[str, Any]]:
    """A finished, audited run with egress decisions, as kp-run leaves one: chained logs, sealed."""
    store = Store()
    meta: dict[str, Any] = {"kind": "container", "name": name, "id": "a1b2c3d4e5f6", "state": "exited",
                            "created": "2026-11-30T10:00:00Z", "exit_code": 0, "outcome": "exited"}
    if signed:
        meta["evidence"] = {"signed": True}
        evidence.signer()
    with store.creating("container", name, meta) as folder:
        pass
    log = folder / evidence.AUDIT_LOG
    log.write_bytes(EXEC + STRACE)
    follower = chain.Follower(log, poll=0.01).start()
    follower.close()
    egress = chain.Chain(folder / evidence.EGRESS_LOG)
    for i, ts in enumerate((1700000000.1005, 1700000000.1105)):
        egress.append(orjson.dumps({"kind": "egress", "ts": ts, "container": name, "decision": "deny" if i else "allow",
                                    "method": "CONNECT", "host": f"h{i}.example", "port": 443}) + b"\n")
    egress.close()
    meta.update(audit_log=str(log), egress_log=str(folder / evidence.EGRESS_LOG))
    evidence.close_run(folder, meta, lambda m: None)
    store.write_meta(folder, meta)
    return folder, meta


def test_the_timeline_of_a_run(kp_env: dict[str, Path]) -> None:
    _folder, meta = make_run()
    result = invoke("kp-trace", meta["name"])
    assert result.status == 0, result.stderr
    records = result.records
    assert records[0]["kind"] == "container" and records[0]["evidence"]["logs"] == ["audit.strace", "egress.jsonl"]
    items = records[1:]
    assert [i["kind"] for i in items].count("egress") == 2
    events = [i for i in items if i["kind"] == "event"]
    assert len(events) == 21 and all(i["run"] == meta["name"] and i["run_id"] == meta["id"] for i in items)
    # the first decision (at .1005) between the events of .100 and .101, the second (.1105) after .110
    order = [i.get("path", i.get("host")) for i in items]
    assert order.index("h0.example") == order.index("/workspace/f0") + 1
    assert order.index("h1.example") == order.index("/workspace/f10") + 1


def test_verify_and_a_moved_state_directory(kp_env: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    _folder, meta = make_run()
    good = invoke("kp-trace", "--verify", meta["name"])
    assert good.status == 0 and good.records[0]["verified"] is True, good.stderr
    assert {g["log"] for g in good.records[0]["logs"]} == {"audit.strace", "egress.jsonl"}
    moved = kp_env["state"].with_name("moved-state")
    shutil.move(kp_env["state"], moved)
    monkeypatch.setenv("KODEPIPE_STATE_DIR", str(moved))
    again = invoke("kp-trace", "--verify", meta["name"])
    assert again.status == 0 and again.records[0]["verified"] is True, again.stderr
    assert len(invoke("kp-trace", meta["name"]).records) == 24  # its logs found where the folder is now
    piped = invoke("kp-trace", input=invoke("kp-ls", meta["name"]).stdout)  # and through its record
    assert piped.status == 0 and len(piped.records) == 24, piped.stderr
    log = moved / "containers" / meta["name"] / "egress.jsonl"
    log.write_bytes(log.read_bytes().replace(b'"deny"', b'"allow"'))
    bad = invoke("kp-trace", "--verify", meta["name"])
    assert bad.status == 1 and bad.records[0]["verified"] is False
    assert bad.records[0]["problem"].startswith("egress.jsonl: line 2 (chain entry 1)")
    assert "does not verify" in bad.stderr


def test_verify_of_records_on_stdin_and_their_ids(kp_env: dict[str, Path]) -> None:
    _, meta = make_run()
    listed = invoke("kp-ls", meta["name"])
    assert listed.records[0]["evidence"]["signed"] is False
    ok = invoke("kp-trace", "--verify", input=listed.stdout)
    assert ok.status == 0 and ok.records[0]["verified"] is True
    other = orjson.dumps({**listed.records[0], "id": "ffffffffffff"})
    wrong = invoke("kp-trace", "--verify", input=other)
    assert wrong.status != 0 and "not the record's" in wrong.stderr


def test_a_signed_run_needs_its_key(kp_env: dict[str, Path]) -> None:
    _, meta = make_run(signed=True)
    public = kp_env["config"] / "audit_ed25519.pub"
    assert invoke("kp-trace", "--verify", "--key", str(public), meta["name"]).records[0]["signed"] is True
    # the host's key gone (verifying elsewhere): a signed run needs --key
    os.rename(public, kp_env["config"] / "kept.pub")
    result = invoke("kp-trace", "--verify", meta["name"])
    assert result.status == 1 and "no key" in result.records[0]["problem"]
    assert invoke("kp-trace", "--verify", "--key", str(kp_env["config"] / "kept.pub"), meta["name"]).status == 0
    # another key does not do
    other = chain.make_key(kp_env["config"] / "other")
    refused = invoke("kp-trace", "--verify", "--key", str(other), meta["name"])
    assert refused.status == 1 and "signature" in refused.records[0]["problem"]


def test_an_audited_run_is_listed_kept_by_bulk_removal_and_removed_when_named(kp_env: dict[str, Path]) -> None:
    folder, meta = make_run()
    listed = invoke("kp-ls", "--kind", "container")
    assert [r["name"] for r in listed.records] == [meta["name"]]
    kept = invoke("kp-rm", input=listed.stdout)  # a pipe keeps evidence unless --evidence
    assert folder.is_dir(), kept.stderr
    assert invoke("kp-rm", meta["name"]).status == 0
    assert not folder.exists()
    # the index keeps its heads: verify says the run is gone
    assert invoke("kp-trace", "--verify", meta["name"]).status != 0


@pytest.mark.parametrize(("args", "message"), [
    (("--mode", "full", "run-1"), "only matter with -- COMMAND"),
    (("--verify", "--", "true"), "not a COMMAND"),
    (("--key", "/etc/hostname", "run-1"), "only matters with --verify"),
    (("--verify", "--summary", "run-1"), "drop --summary"),
    (("--report", "--format", "ocsf", "run-1"), "drop --summary and --format"),
    (("--report", "run-1", "run-2"), "takes one RUN"),
    (("bad/name",), "bad/name"),
])
def test_usage_errors(args: tuple[str, ...], message: str) -> None:
    result = invoke("kp-trace", *args)
    assert result.status == 2 and message in result.stderr, result.stderr


def test_a_run_that_is_not_there(kp_env: dict[str, Path]) -> None:
    result = invoke("kp-trace", "run-00000000")
    assert result.status != 0 and "no run named run-00000000" in result.stderr


def test_discard_throws_the_changes_away_and_keeps_the_evidence(kp_env: dict[str, Path], tmp_path: Path) -> None:
    folder, meta = make_run("run-0d15ca4d")
    ws = tmp_path / "ws"
    ws.mkdir()
    upper = folder / "upper"
    (upper / "sub").mkdir(parents=True)
    (upper / "sub" / "new.txt").write_text("agent")
    meta.update(state="quarantined", workspace=str(ws),
                quarantine={"path": str(upper), "changes": [{"path": "sub", "change": "added", "type": "dir"},
                                                            {"path": "sub/new.txt", "change": "added",
                                                             "type": "file"}]})
    Store().write_meta(folder, meta)
    assert invoke("kp-run", "--discard", meta["name"], "-w", str(ws)).status == 2  # nothing else goes with it
    result = invoke("kp-run", "--discard", meta["name"])
    assert result.status == 0, result.stderr
    record = result.records[0]
    assert record["state"] == "discarded" and record["quarantine"]["discarded"]
    assert list(upper.iterdir()) == [] and list(ws.iterdir()) == []
    entries = [orjson.loads(line) for line in (folder / "review.jsonl").read_bytes().splitlines()]
    assert entries[-1]["action"] == "discard" and entries[-1]["discarded"] == 2
    assert [c["path"] for c in entries[-1]["changes"]] == ["sub", "sub/new.txt"]
    assert invoke("kp-trace", "--verify", meta["name"]).records[0]["verified"] is True
    timeline = invoke("kp-trace", meta["name"]).records
    assert timeline[-1]["kind"] == "review" and timeline[-1]["action"] == "discard"
    assert invoke("kp-ls", "--state", "discarded").records[0]["name"] == meta["name"]
    again = invoke("kp-run", "--discard", meta["name"])
    assert again.status != 0 and "no quarantined changes" in again.stderr


def test_the_report_of_a_run(kp_env: dict[str, Path]) -> None:
    _, meta = make_run()
    page = invoke("kp-trace", "--report", meta["name"])
    assert page.status == 0, page.stderr
    html = page.stdout.decode()
    assert html.startswith("<!DOCTYPE html>") or html.lower().startswith("<!doctype html>")
    for section in ("facts", "processes", "files", "network", "findings", "timeline", "integrity"):
        assert f'id="{section}"' in html
    assert "h1.example" in html and "/workspace/f19" in html  # from the spooled timeline


def test_the_summary_table_is_compact_and_escaped() -> None:
    from kodepipe.commands.trace import summary_table

    table = summary_table([{"kind": "summary", "item": "file_written", "path": "/w/\x1b[2Jevil\nrow", "ops": ["write"]},
                           {"kind": "summary", "item": "egress", "decision": "deny", "host": "x.example", "count": 3},
                           {"kind": "summary", "item": "exec", "argv": ["sh", "-c", "y" * 200], "exit_code": 0}])
    rows = table.splitlines()
    assert len(rows) == 4 and rows[0].split() == ["what", "count", "path", "/", "host", "/", "program", "decision",
                                                  "exit"]
    assert "\x1b" not in table and "\\x1b[2Jevil\\nrow" in table
    assert all(len(row) < 160 for row in rows)
