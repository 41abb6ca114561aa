"""kp-trace's HTML report (kodepipe.audit.report): its sections and counts, its caps, and that
nothing from a run (all of it hostile) becomes markup, a forged row or an invisible control
character; the last test renders a report in a real Chromium, offline."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import orjson
import pytest

from kodepipe.audit import report
from tests import browser

HERE = Path(__file__).resolve().parent / "strace"
SECTIONS = ("facts", "processes", "files", "network", "findings", "timeline")
VOID = frozenset(("area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track",
                  "wbr"))
HOSTILE = "<script>alert(1)</script>\x1b[2J\n<tr><td>forged</td></tr>\" onmouseover=\"x\u202eevil\udcff\x00"
# what this module writes into attributes: nothing from a run ever goes there
OWN_ATTRIBUTES = {("html", "lang"), ("meta", "charset"), ("meta", "http-equiv"), ("meta", "content"),
                  ("meta", "name"), ("section", "id"), ("a", "href"), ("tr", "class"), ("td", "class"),
                  ("th", "colspan"), ("span", "class"), ("p", "class"), ("ul", "class"), ("table", "class")}


class Page(HTMLParser):
    """What a test needs of a page: ids, tags, attributes, and the text and rows of each section."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: list[str] = []
        self.tags: dict[str, int] = {}
        self.attributes: set[tuple[str, str]] = set()
        self.hrefs: list[str] = []
        self.text: dict[str, str] = {}
        self.rows: dict[str, int] = {}
        self.depth = 0
        self.max_depth = 0
        self._section: str | None = None
        self._inside = 0
        self.feed(page)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] = self.tags.get(tag, 0) + 1
        for name, value in attrs:
            self.attributes.add((tag, name))
            if name == "id" and value is not None:
                self.ids.append(value)
                if value in (*SECTIONS, "integrity"):
                    self._section, self._inside = value, 0
            if name == "href" and value is not None:
                self.hrefs.append(value)
        if tag in VOID:
            return
        self.depth += 1
        self.max_depth = max(self.max_depth, self.depth)
        if self._section is not None:
            self._inside += 1
            if tag == "tr":
                self.rows[self._section] = self.rows.get(self._section, 0) + 1

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        self.depth -= 1
        if self._section is not None:
            self._inside -= 1
            if self._inside == 0:
                self._section = None

    def handle_data(self, data: str) -> None:
        if self._section is not None:
            self.text[self._section] = self.text.get(self._section, "") + data


def events(*names: str) -> list[dict[str, Any]]:
    """Real events: kp-trace's parse of captured strace output (tests/strace)."""
    out: list[dict[str, Any]] = []
    for name in names:
        out.extend(orjson.loads(line) for line in (HERE / f"{name}.expected.jsonl").read_bytes().splitlines())
    return out


RUN: dict[str, Any] = {
    "kind": "container", "name": "fix-tests", "id": "0123456789ab", "state": "quarantined", "host": "local",
    "image": "localhost/kodepipe-claude:bookworm", "profile": "claude", "command": ["claude", "-p", "fix it"],
    "workspace": "/home/u/proj", "workspace_mode": "quarantine", "network": "proxy", "allow": ["pypi.org"],
    "loosened": ["credential:anthropic", "no-time-limit"], "limits": {"cpus": 2, "memory": 2147483648, "pids": 512},
    "started": "2026-11-30T10:00:00Z", "finished": "2026-11-30T10:05:00Z", "exit_code": 0, "timed_out": False,
    "oom_killed": False, "audit": "complete", "audit_mode": "default", "egress": {"allow": 2, "deny": 1},
    "quarantine": {"added": ["copy.txt"], "modified": [], "deleted": [],
                   "changes": [{"path": "copy.txt", "change": "added", "type": "file"}]},
    "findings": [{"severity": "low", "rule": "large-addition", "message": "many lines"}],
}


def timeline() -> list[dict[str, Any]]:
    """Real events of a few traces, then egress decisions and a review, as kp-trace gives them."""
    evs = events("default", "denied", "git", "net")
    end = max(e["ts"] for e in evs if isinstance(e["ts"], float))
    return [*evs,
            {"kind": "egress", "decision": "allow", "method": "CONNECT", "host": "pypi.org", "port": 443,
             "address": "151.101.0.223", "reason": "allowed", "bytes_up": 900, "bytes_down": 5000, "ts": end + 1},
            {"kind": "egress", "decision": "allow", "method": "POST", "host": "api.anthropic.com", "port": 443,
             "credential": "anthropic", "injected": True, "bytes_up": 100, "bytes_down": 200, "ts": end + 2,
             "authorization": "Bearer sk-ant-do-not-show"},
            {"kind": "egress", "decision": "deny", "method": "CONNECT", "host": "evil.example", "port": 443,
             "reason": "not allowed", "ts": end + 3},
            {"kind": "review", "action": "quarantine", "ts": end + 4,
             "changes": [{"path": "copy.txt", "change": "added", "type": "file"},
                         {"path": "old.txt", "change": "deleted", "type": "file"}]},
            {"kind": "review", "action": "findings", "ts": end + 5, "findings": [
                {"severity": "medium", "rule": "ci-config", "path": ".github/workflows/x.yml", "message": "CI changed"},
                {"severity": "critical", "rule": "secret", "path": "copy.txt", "line": 3, "excerpt": "key=***",
                 "message": "a credential"},
                {"severity": "low", "rule": "large-addition", "message": "many lines"}]},
            {"kind": "review", "action": "apply", "ts": end + 6, "count": 2, "applied": True, "forced": False,
             "accepted": [{"severity": "critical", "rule": "secret", "path": "copy.txt", "line": 3,
                           "message": "a credential"}]}]


VERIFY = {"verified": True, "signed": False, "logs": [{"log": "audit.strace", "ok": True, "entries": 612,
                                                       "problem": None},
                                                      {"log": "egress.jsonl", "ok": True, "entries": 3,
                                                       "problem": None}]}


def test_every_section_is_there_with_its_id_and_integrity_only_when_verified() -> None:
    page = Page(report.render(RUN, timeline(), verify=VERIFY, generated="kp-trace 0.1.0"))
    assert set(SECTIONS) | {"integrity"} <= set(page.ids)
    assert len(page.ids) == len(set(page.ids))
    assert "Every hash chain verified" in page.text["integrity"] and "612" in page.text["integrity"]
    assert "integrity" not in Page(report.render(RUN, [])).ids
    failed = Page(report.render(RUN, [], verify={"verified": False, "logs": [
        {"log": "audit.strace", "ok": False, "entries": 7, "problem": "entry 5 does not chain"}]}))
    assert "did NOT verify" in failed.text["integrity"] and "entry 5 does not chain" in failed.text["integrity"]


def test_the_page_needs_nothing_from_anywhere() -> None:
    page = report.render(RUN, timeline(), verify=VERIFY)
    assert "<script" not in page.lower()
    assert "default-src 'none'" in page
    assert browser.references(page) == []
    assert all(href.startswith("#") for href in Page(page).hrefs)


def test_facts_show_the_policy_what_was_loosened_and_how_it_ended() -> None:
    facts = Page(report.render({**RUN, "exit_code": 137, "signal": "SIGKILL", "timed_out": True,
                                "audit": "incomplete", "audit_problem": "strace died"}, [])).text["facts"]
    for said in ("fix-tests", "0123456789ab", "localhost/kodepipe-claude:bookworm", "claude", "pypi.org",
                 "credential:anthropic", "no-time-limit", "pids=512", "exit code 137", "signal SIGKILL", "timed out",
                 "incomplete", "strace died", "claude -p 'fix it'"):
        assert said in facts, said


def test_counts_processes_files_and_network() -> None:
    page = Page(report.render(RUN, timeline()))
    # default: sh runs cat and ./seccomp; denied: sh, ./seccomp, setpriv->sh, cat, touch; git: sh, git init; net: python
    assert "11 processes." in page.text["processes"]
    assert "cat /etc/hostname" in page.text["processes"] and "killed by SIGSYS" in page.text["processes"]
    files = page.text["files"]
    assert "/tmp/kp-fixture.sHEl1u/copy.txt" in files  # sh's "> copy.txt", an open for writing
    assert "1 added, 1 deleted." in files and "old.txt" in files  # the newest review's quarantine wins
    assert "/etc/kp-denied" in files and "EACCES" in files  # denied file operations
    network = page.text["network"]
    assert "2 allow, 1 deny" in network and "1,000 bytes up, 5,200 bytes down" in network
    assert "anthropic (1)" in network and "sk-ant" not in str(page.text)
    assert "127.0.0.1:9" in network and "[::1]:9" in network
    assert page.rows["timeline"] - 1 == len(timeline())


def test_findings_are_sorted_by_severity_once_each_with_what_was_accepted() -> None:
    page = report.render(RUN, timeline())
    findings = Page(page).text["findings"]
    assert findings.index("critical") < findings.index("medium") < findings.index("low")
    assert findings.count("large-addition") == 1  # in the review and in the record: one finding
    assert "1 critical, 1 medium, 1 low." in findings
    assert re.search(r"<td>a credential</td><td>key=\*\*\*</td><td>yes</td>", page)
    assert "apply" in findings  # the review's decision


def test_times_are_utc_with_milliseconds() -> None:
    page = Page(report.render({}, [{"kind": "event", "type": "syscall", "ts": 1700000000.25, "pid": 1}]))
    assert "2023-11-14T22:13:20.250Z" in page.text["timeline"]


def test_each_table_stops_at_its_cap_and_says_how_many_more() -> None:
    writes = [{"kind": "event", "type": "file", "op": "open", "write": True, "outcome": "ok", "path": f"/w/{n}",
               "pid": 1, "ts": 1.0 + n} for n in range(2500)]
    page = Page(report.render({}, writes))
    assert page.rows["timeline"] - 1 == report.TIMELINE_ROWS
    assert "500 more rows not shown (2,000 of 2,500 shown)" in page.text["timeline"]
    assert "2,500 paths." in page.text["files"]
    assert "2,000 more rows not shown (500 of 2,500 shown)" in page.text["files"]
    forks = [{"kind": "event", "type": "process", "op": "fork", "outcome": "ok", "pid": 1, "child": 100 + n}
             for n in range(600)]
    processes = Page(report.render({}, forks)).text["processes"]
    assert "601 processes." in processes and "101 more processes not shown (500 of 601 shown)" in processes


def test_nothing_from_the_run_becomes_markup_or_an_invisible_control_character() -> None:
    items: list[dict[str, Any]] = [
             {"kind": "event", "type": "file", "op": "open", "write": True, "outcome": "ok", "path": HOSTILE,
              "pid": 7, "exe": HOSTILE, "ts": 1.0},
             {"kind": "event", "type": "exec", "outcome": "ok", "pid": 7, "argv": [HOSTILE, "-c", HOSTILE]},
             {"kind": "event", "type": "file", "op": "unlink", "outcome": "error", "errno": HOSTILE,
              "denied": True, "path": HOSTILE, "pid": 7},
             {"kind": "event", "type": "net", "op": "connect", "pid": 7, "address": {"path": HOSTILE}},
             {"kind": "egress", "decision": HOSTILE, "host": HOSTILE, "method": HOSTILE, "injected": HOSTILE},
             {"kind": "review", "action": "quarantine", "changes": [{"path": HOSTILE, "change": HOSTILE}]},
             {"kind": "review", "action": "findings", "findings": [{"severity": HOSTILE, "rule": HOSTILE,
                                                                    "message": HOSTILE, "excerpt": HOSTILE}]},
             {"kind": HOSTILE, HOSTILE: HOSTILE}]
    run = {"name": HOSTILE, "image": HOSTILE, "allow": [HOSTILE], "loosened": [HOSTILE], "limits": {HOSTILE: HOSTILE},
           "audit_problem": HOSTILE, "command": [HOSTILE]}
    out = report.render(run, items, verify={"verified": HOSTILE, "logs": [{"log": HOSTILE, "problem": HOSTILE}]},
                        generated=HOSTILE)
    out.encode("utf-8")  # the lone surrogate (a byte that was not UTF-8) is written as an escape
    page = Page(out)
    assert "script" not in page.tags and "<script" not in out.lower()
    assert page.attributes <= OWN_ATTRIBUTES, page.attributes - OWN_ATTRIBUTES
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in out
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\ud800-\udfff]", out)
    for shown in (r"\x1b", r"\n", r"\u202e", r"\xff", r"\x00"):
        assert f'<span class="ctl">{shown}</span>' in out, shown
    # a newline and a <tr> in a path forged no row: one row per item
    assert page.rows["timeline"] - 1 == len(items)


def hostile(value: Any) -> Any:
    """``value`` with every string in it (keys too, below the top) replaced by HOSTILE."""
    if isinstance(value, str):
        return HOSTILE
    if isinstance(value, list):
        return [hostile(v) for v in value]
    if isinstance(value, dict):
        return {HOSTILE if k not in ("kind", "type", "op", "action") else k: hostile(v) for k, v in value.items()}
    return value


def test_every_string_of_every_kind_of_item_stays_text() -> None:
    """Each kind of event, egress decision and review action, every string in it hostile (kind,
    type, op and action kept, so each is shown the way it is meant to be)."""
    samples = events("default", "denied", "git", "net", "threads", "attach")
    kinds = {(e["type"], e.get("op"), e.get("signal") is None, e.get("thread")): e for e in samples}
    items = [{k: (v if k in ("kind", "type", "op", "action") else hostile(v)) for k, v in item.items()}
             for item in [*kinds.values(), *timeline()[-6:],
                          {"kind": "event", "type": "unaccounted", "path": "p", "change": "added", "entry": "file",
                           "against": "quarantine"},
                          {"kind": "event", "type": "parse_error", "raw": "r", "reason": "why"},
                          {"kind": "event", "type": "exit", "pid": 5, "signal": "SIGKILL", "code": None}]]
    run = {key: hostile(value) for key, value in RUN.items()}
    out = report.render(run, items, verify=hostile(VERIFY), generated=HOSTILE)
    page = Page(out)
    assert "script" not in page.tags
    assert page.attributes <= OWN_ATTRIBUTES, page.attributes - OWN_ATTRIBUTES
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\ud800-\udfff]", out)
    assert page.rows["timeline"] - 1 == len(items)
    assert out.count("&lt;script&gt;alert(1)&lt;/script&gt;") > 100


def test_a_ten_thousand_deep_tree_nests_to_the_cap_and_lists_the_rest_flat() -> None:
    depth = 10_000
    chain = [{"kind": "event", "type": "process", "op": "fork", "outcome": "ok", "pid": n, "child": n + 1}
             for n in range(1, depth + 1)]
    chain += [{"kind": "event", "type": "exec", "outcome": "ok", "pid": n, "ppid": n - 1, "argv": ["sh", str(n)]}
              for n in range(1, depth + 2)]
    page = Page(report.render({}, chain))
    processes = page.text["processes"]
    assert "10,001 processes." in processes
    assert f"deeper than {report.TREE_DEPTH} levels are listed flat" in processes
    assert "[depth 499, child of pid 499]" in processes  # the 500th process shown, flat
    assert page.tags["ul"] == report.TREE_DEPTH + 1
    assert page.max_depth < report.TREE_DEPTH * 2 + 20


def test_parent_cycles_and_missing_parents_do_not_hang_or_crash() -> None:
    items = [{"kind": "event", "type": "exec", "outcome": "ok", "pid": 1, "ppid": 2, "argv": ["one"]},
             {"kind": "event", "type": "exec", "outcome": "ok", "pid": 2, "ppid": 1, "argv": ["two"]},
             {"kind": "event", "type": "process", "op": "fork", "outcome": "ok", "pid": 10, "child": 11},
             {"kind": "event", "type": "process", "op": "fork", "outcome": "ok", "pid": 11, "child": 10},
             {"kind": "event", "type": "exec", "outcome": "ok", "pid": 20, "ppid": 999, "argv": ["orphan"]},
             {"kind": "event", "type": "process", "op": "fork", "outcome": "ok", "pid": 30, "child": 30}]
    processes = Page(report.render({}, items)).text["processes"]
    for said in ("pid 1 ", "pid 2 ", "pid 10 ", "pid 11 ", "one", "two", "orphan", "parent pid 999 not in the trace",
                 "2 cycles of parents", "(its parents form a cycle)"):
        assert said in processes, said


def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value, "x" * 1000]
    return value


WEIRD: list[Any] = [None, "", "x", -1, 2**70, 10**5000, 1.5, float("nan"), float("inf"), True, [], {},
                    [None, {"a": []}], {"path": [1]}, "<b>", "x" * 100_000, nested(5000), [["y" * 10_000] * 60] * 60]


def test_no_key_of_any_wrong_type_breaks_the_report() -> None:
    samples = [e for e in events("default", "denied") if e["type"] in ("exec", "exit", "file", "net", "process")][::9]
    samples += timeline()[-6:]
    samples += [{"kind": "event", "type": t} for t in ("signal", "parse_error", "unaccounted", "tracer", "nope")]
    for sample in samples:
        for key in sample:
            for value in WEIRD:
                report.render({}, [{**sample, key: value}])
    for key in RUN:
        for value in WEIRD:
            report.render({**RUN, key: value}, timeline()[-6:], verify={"verified": value, "logs": value})
    huge = report.render({"name": "x" * 100_000, "limits": [["y" * 10_000] * 60] * 60}, [])
    assert "98,000 more characters" in huge and len(huge) < 100_000
    not_records: list[Any] = [None, 1, "x", [], {}]
    report.render([], not_records, verify=[])  # type: ignore[arg-type]


def test_the_browser_check_sees_a_page_that_loads_from_the_network(tmp_path: Path) -> None:
    """The check the report passes can fail: a page with outside resources is caught both ways."""
    page = ('<!DOCTYPE html><html><head><link rel="stylesheet" href="https://leak.example/s.css"></head>'
            '<body><img src="http://leak.example/i.png"></body></html>')
    (tmp_path / "leak.html").write_text(page)
    loaded = browser.load(tmp_path / "leak.html")
    assert set(loaded.requests) == {"https://leak.example/s.css", "http://leak.example/i.png"}
    assert len(browser.references(page)) == 2


def test_a_real_browser_renders_the_report_and_runs_nothing_from_it(tmp_path: Path) -> None:
    items = [*timeline(), {"kind": "event", "type": "file", "op": "open", "write": True, "outcome": "ok",
                           "path": "/workspace/" + HOSTILE, "pid": 16688, "ts": 1795470200.0}]
    page = report.render({**RUN, "name": HOSTILE}, items, verify=VERIFY, generated="test")
    path = tmp_path / "report.html"
    path.write_text(page, encoding="utf-8")
    rendered = Page(browser.dom(path))
    assert set(SECTIONS) | {"integrity"} <= set(rendered.ids)
    assert rendered.tags.get("script", 0) == 0  # the <script> planted in a path stayed text
    assert "/workspace/<script>alert(1)</script>" in rendered.text["files"]
    assert rendered.rows["timeline"] - 1 == len(items)


@pytest.mark.parametrize("value", [0, 0.5, -1.0, 1e300, float("nan"), "2026-11-30T10:00:00Z", None, True])
def test_utc_never_fails(value: object) -> None:
    assert isinstance(report.utc(value), str)
