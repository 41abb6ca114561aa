"""kodepipe.audit.ocsf: every kind of timeline item, real and hostile, becomes an OCSF event that
validates against the OCSF schema (ocsf.VERSION) with the profiles it names.

The validator is the JSON Schema that the ocsf-json-schema package generates from the OCSF schema
export it ships for that version (required attributes, enums and constants, types, patterns such
as ip_t's, at_least_one / just_one constraints, and no attribute the class does not define), run
by jsonschema, plus what JSON Schema cannot say: type_uid = class_uid * 100 + activity_id and the
captions beside each id.  ``test_the_validator_refuses_a_broken_event`` shows it refuses what it
should.  The trace events are the real captures in tests/strace/.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import time
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from ocsf_json_schema import OcsfJsonSchemaEmbedded, get_ocsf_schema  # type: ignore[import-untyped]

from kodepipe.audit import ocsf

Item = dict[str, Any]
HERE = Path(__file__).resolve().parent
TRACES = sorted((HERE / "strace").glob("*.expected.jsonl"))
RUN = {"container": "proj-1", "run": "proj-1", "run_id": "0123456789ab"}


# -- the validator -----------------------------------------------------------------------------


@cache
def _schema() -> tuple[Any, Item]:
    raw = get_ocsf_schema(version=ocsf.VERSION)
    return OcsfJsonSchemaEmbedded(raw), raw


@cache
def _validator(class_uid: int, profiles: tuple[str, ...]) -> Any:
    embedded, _ = _schema()
    name = embedded.lookup_class_name_from_uid(class_uid)
    return jsonschema.Draft202012Validator(embedded.get_class_schema(name, list(profiles)))


def _captions(cls: Item, attribute: str) -> dict[Any, str]:
    return {int(k): v["caption"] for k, v in cls["attributes"][attribute].get("enum", {}).items()}


def problems(ev: Item) -> list[str]:
    """What makes ``ev`` not a valid OCSF event of ocsf.VERSION (empty: valid)."""
    embedded, raw = _schema()
    class_uid = ev.get("class_uid")
    if type(class_uid) is not int:
        return [f"class_uid {class_uid!r} is not an integer"]
    try:
        name = embedded.lookup_class_name_from_uid(class_uid)
    except ValueError:
        return [f"no OCSF class {class_uid}"]
    meta = ev.get("metadata")
    profiles = meta.get("profiles", []) if isinstance(meta, dict) else []
    if not (isinstance(profiles, list) and all(type(p) is str for p in profiles)):
        return ["metadata.profiles is not a list of names"]
    found = [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}"
             for e in _validator(class_uid, tuple(sorted(profiles))).iter_errors(ev)]
    cls = raw["classes"][name]
    activity, severity, status = ev.get("activity_id"), ev.get("severity_id"), ev.get("status_id")
    if type(activity) is int and ev.get("type_uid") != class_uid * 100 + activity:
        found.append(f"type_uid {ev.get('type_uid')} is not class_uid * 100 + activity_id")
    expected = {
        "class_name": cls["caption"],
        "category_name": _captions(cls, "category_uid").get(ev.get("category_uid")),
        "type_name": _captions(cls, "type_uid").get(ev.get("type_uid")),
        "severity": _captions(cls, "severity_id").get(severity) if severity != 99 else ev.get("severity"),
    }
    if activity != 99:  # Other: activity_name says what it was
        expected["activity_name"] = _captions(cls, "activity_id").get(activity)
    if "status_id" in ev and status != 99:
        expected["status"] = _captions(cls, "status_id").get(status)
    for key, caption in expected.items():
        if key in ev and ev[key] != caption:
            found.append(f"{key} {ev[key]!r} is not the caption {caption!r}")
    if isinstance(meta, dict) and meta.get("version") != ocsf.VERSION:
        found.append(f"metadata.version {meta.get('version')!r} is not {ocsf.VERSION}")
    return found


def mapped(item: Item) -> Item:
    """``item`` as an event, through the mapping without event()'s safety net (so a bug raises),
    checked valid and serialisable."""
    ev = ocsf._map(copy.deepcopy(item))
    assert ev is not None, item
    assert problems(ev) == [], (item, ev)
    orjson.dumps(ev)
    return ev


# -- realistic items ---------------------------------------------------------------------------


def trace_events(name: str | None = None) -> list[Item]:
    paths = [HERE / "strace" / f"{name}.expected.jsonl"] if name else TRACES
    return [orjson.loads(line) for path in paths for line in path.read_bytes().splitlines()]


def trace_event(name: str, **match: Any) -> Item:
    """The first event of tests/strace/NAME whose keys have these values, as a timeline item."""
    for ev in trace_events(name):
        if all(ev.get(k) == v for k, v in match.items()):
            return {**ev, **RUN}
    raise LookupError(f"{name}: no event with {match}")


EGRESS = {  # as the proxy logs them (kodepipe/egress/proxy.py)
    "connect": {"kind": "egress", "ts": 1795470200.123456, "container": "proj-1", "method": "CONNECT",
                "host": "pypi.org", "port": 443, "sni": "pypi.org", "address": "151.101.0.223", "decision": "allow",
                "bytes_up": 1534, "bytes_down": 88211, "seconds": 0.412},
    "get-denied": {"kind": "egress", "ts": 1795470201.5, "container": "proj-1", "method": "GET",
                   "host": "attacker.example", "port": 80, "decision": "deny",
                   "reason": "attacker.example is not in the allowlist", "seconds": 0.000812},
    "connect-bad-sni": {"kind": "egress", "ts": 1795470202.0, "container": "proj-1", "method": "CONNECT",
                        "host": "github.com", "port": 443, "sni": "attacker.example", "decision": "deny",
                        "reason": "TLS server name 'attacker.example' is not the host asked for", "seconds": 0.01},
    "dns": {"kind": "egress", "ts": 1795470203.25, "container": "proj-1", "decision": "allow", "method": "DNS",
            "host": "pypi.org", "qtype": "A", "addresses": ["151.101.0.223", "151.101.64.223"]},
    "dns-denied": {"kind": "egress", "ts": 1795470203.5, "container": "proj-1", "decision": "deny", "method": "DNS",
                   "host": "exfil.attacker.example", "qtype": "TXT", "reason": "not in the allowlist"},
    "injected": {"kind": "egress", "ts": 1795470204.0, "container": "proj-1", "method": "POST",
                 "credential": "anthropic", "host": "api.anthropic.com", "port": 443, "path": "/v1/messages",
                 "address": "160.79.104.10", "injected": True, "decision": "allow", "bytes_up": 2048,
                 "bytes_down": 9000, "seconds": 1.5},
    "injected-by-name": {"kind": "egress", "ts": 1795470204.5, "container": "proj-1", "method": "GET",
                         "host": "api.github.com", "port": 443, "path": "/repos/o/r", "injected": "github",
                         "decision": "allow", "bytes_up": 300, "bytes_down": 4000, "seconds": 0.2},
    "over-budget": {"kind": "egress", "ts": 1795470205.0, "container": "proj-1", "method": "POST",
                    "credential": "anthropic", "host": "api.anthropic.com", "port": 443, "path": "/v1/messages",
                    "decision": "deny", "reason": "over budget: anthropic has had its 100 requests in this run",
                    "budget": "anthropic", "seconds": 0.0004},
    "bad-request": {"kind": "egress", "ts": 1795470206.0, "container": "proj-1", "method": None, "host": None,
                    "port": None, "decision": "error", "reason": "no complete request", "seconds": 30.0},
    "relay": {"kind": "egress", "ts": 1795470207.0, "container": "proj-1", "decision": "error", "method": "RELAY",
              "reason": "the relay broke the protocol: a frame of 70000 bytes"},
    "log-full": {"kind": "egress", "ts": 1795470208.0, "container": "proj-1", "decision": "error",
                 "reason": "log full: later decisions are only counted"},
}

FINDING = {"name": "proj-1", "id": "0123456789ab", "review": "r-5f2c", "severity": "high", "rule": "secret",
           "path": "config/settings.py", "line": 12, "excerpt": "API_KEY = \"sk-***\"",
           "fingerprint": "sha256:0123456789abcdef", "message": "a credential of a known format"}
REVIEW = {  # as kodepipe.container.evidence.note writes them
    "quarantine": {"kind": "review", "ts": 1795470300.0, "action": "quarantine", "run": "proj-1",
                   "run_id": "0123456789ab", "count": 3,
                   "changes": [{"path": "src/app.py", "change": "modified", "type": "file"},
                               {"path": "build", "change": "added", "type": "dir"},
                               {"path": ".git/hooks/pre-commit", "change": "added", "type": "file"}]},
    "findings": {"kind": "review", "ts": 1795470310.0, "action": "findings", "run": "proj-1",
                 "run_id": "0123456789ab", "review": "r-5f2c",
                 "findings": [{k: v for k, v in FINDING.items()},
                              {"name": "proj-1", "review": "r-5f2c", "severity": "medium", "rule": "git-hooks",
                               "path": ".git/hooks/pre-commit", "message": "a git hook runs on the host"},
                              {"name": "proj-1", "review": "r-5f2c", "severity": "low", "rule": "mass-deletion",
                               "message": "214 files deleted"}]},
    "findings-none": {"kind": "review", "ts": 1795470311.0, "action": "findings", "run": "proj-1",
                      "run_id": "0123456789ab", "review": "r-5f2d", "findings": []},
    "apply": {"kind": "review", "ts": 1795470320.0, "action": "apply", "run": "proj-1", "run_id": "0123456789ab",
              "review": "r-5f2c", "count": 3, "applied": ["src/app.py", "build", ".git/hooks/pre-commit"],
              "findings": [FINDING], "accepted": [FINDING], "forced": True},
    "apply-partial": {"kind": "review", "ts": 1795470321.0, "action": "apply", "run": "proj-1",
                      "run_id": "0123456789ab", "review": "r-5f2c", "count": 3, "applied": ["src/app.py"],
                      "findings": [], "accepted": [], "forced": False},
    "export": {"kind": "review", "ts": 1795470330.0, "action": "export", "run": "proj-1", "run_id": "0123456789ab",
               "branch": "kodepipe/proj-1", "commit": "9fceb02d0ae598e95dc970b74767f19372d61af8"},
    "discard": {"kind": "review", "ts": 1795470340.0, "action": "discard", "run": "proj-1",
                "run_id": "0123456789ab"},
}

CONTAINER = {  # a kp-run record after the run (kodepipe.core.schema.ContainerRecord)
    "kind": "container", "name": "proj-1", "id": "0123456789ab", "state": "quarantined", "host": "local",
    "image": "localhost/kodepipe-claude:7d1c", "profile": "claude", "command": ["claude", "--print", "fix it"],
    "workspace": "/home/u/proj", "workspace_mode": "quarantine", "container_name": "kp-proj-1-0123456789ab",
    "container_id": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "network": "allowlist",
    "created": "2026-11-30T17:35:00Z", "started": "2026-11-30T17:35:02Z", "finished": "2026-11-30T17:41:09Z",
    "exit_code": 0, "outcome": "exited", "engine": "podman", "loosened": [], "allow": ["pypi.org"],
    "audit_mode": "default", "audit": "complete"}

TRACED = {"kind": "trace", "id": "5a1c0ffee123", "mode": "default", "command": ["make", "test"],
          "strace": ["strace", "-f", "-ttt", "-T", "-yy", "-s", "256", "-o", "/tmp/t.strace", "--", "make", "test"],
          "log": None, "blind": ["data: reads and writes on descriptors already open"], "state": "running"}

UNACCOUNTED = {"kind": "event", "schema": 1, "type": "unaccounted", "line": None, "ts": None, "pid": None,
               "tid": None, "denied": False, "path": "src/backdoor.py", "change": "added", "entry": "file",
               "complete": True, "against": "quarantine",
               "message": "a real change in the quarantine that no event of the trace explains", **RUN}


def realistic() -> dict[str, Item]:
    """One item of every kind and type, named."""
    items: dict[str, Item] = {
        "exec": trace_event("denied", type="exec", argv=["cat", "/root/.bashrc"]),
        "exec-failed": {**trace_event("shell", type="exec"), "outcome": "error", "errno": "ENOENT",
                        "path": "/usr/local/bin/nope", "argv": ["nope"]},
        "fork": trace_event("attach", type="process", op="fork"),
        "clone": trace_event("shell", type="process", op="clone", thread=False),
        "thread": trace_event("threads", type="process", op="clone", thread=True),
        "kill": trace_event("minimal", type="process", op="kill"),
        "setuid": trace_event("denied", type="process", op="setuid"),
        "wait": trace_event("attach", type="process", op="wait"),
        "exit": trace_event("shell", type="exit", code=0),
        "exit-signal": trace_event("default", type="exit", signal="SIGSYS"),
        "signal": trace_event("default", type="signal", signal="SIGCHLD"),
        "seccomp": trace_event("default", type="signal", denied=True),
        "open": trace_event("shell", type="file", op="open"),
        "open-denied": trace_event("denied", type="file", op="open", denied=True),
        "mkdir-denied": trace_event("denied", type="file", op="mkdir", denied=True),
        "write": trace_event("python-files", type="file", op="write"),
        "rename": trace_event("python-files", type="file", op="rename"),
        "unlink": trace_event("git", type="file", op="unlink"),
        "symlink": trace_event("git", type="file", op="symlink"),
        "chmod": trace_event("git", type="file", op="chmod"),
        "stat": trace_event("attach", type="file", op="stat"),
        "socket": trace_event("net", type="net", op="socket"),
        "socket-bare": trace_event("denied", type="net", op="socket", socket=None),
        "connect-refused": trace_event("net", type="net", op="connect", errno="ECONNREFUSED"),
        "connect": trace_event("net", type="net", op="connect", outcome="ok"),
        "connect-unix": trace_event("net", type="net", op="connect", errno="ENOENT"),
        "bind": trace_event("net", type="net", op="bind"),
        "listen": trace_event("net", type="net", op="listen"),
        "accept": trace_event("net", type="net", op="accept"),
        "sendto": trace_event("net", type="net", op="sendto"),
        "syscall": trace_event("threads", type="syscall", syscall="mmap"),
        "attach": trace_event("attach", type="attach"),
        "detach": trace_event("attach", type="detach"),
        "tracer": {"kind": "event", "schema": 1, "type": "tracer", "line": 7, "ts": 1795470105.1, "pid": None,
                   "tid": None, "denied": False, "message": "Process 16691 resumed (parent 16690 ready)", **RUN},
        "parse_error": {"kind": "event", "schema": 1, "type": "parse_error", "line": 44, "ts": 1795470105.2,
                        "pid": 16691, "tid": 16691, "denied": False, "raw": "16691 1795470105.2 ??? garbled\n",
                        "reason": "not a system call, signal or exit line", **RUN},
        "unaccounted": UNACCOUNTED,
        "unaccounted-more": {**UNACCOUNTED, "path": None, "more": 12, "change": None, "entry": None,
                             "message": "12 more unaccounted change(s), not listed in the record"},
        "unaccounted-incomplete": {**UNACCOUNTED, "path": None, "complete": False, "why": "the trace was capped",
                                   "change": None, "entry": None},
        "finding": {"kind": "finding", **FINDING},
        "container": CONTAINER,
        "container-running": {**{k: v for k, v in CONTAINER.items() if k not in ("finished", "exit_code", "outcome")},
                              "state": "running"},
        "container-failed": {**CONTAINER, "state": "exited", "exit_code": 137, "oom_killed": True,
                             "error": {"code": "oom", "message": "the container ran out of memory"}},
        "trace-running": TRACED,
        "trace-exited": {**TRACED, "state": "exited", "exit_code": 2, "signal": None},
    }
    items.update({f"egress-{k}": v for k, v in EGRESS.items()})
    items.update({f"review-{k}": v for k, v in REVIEW.items()})
    return items


REALISTIC = realistic()

# what each item becomes: class uid, activity id
EXPECTED = {
    "exec": (1007, 1), "exec-failed": (1007, 1), "fork": (1007, 1), "clone": (1007, 1), "thread": (1007, 99),
    "kill": (1007, 99), "setuid": (1007, 5), "wait": (1007, 99), "exit": (1007, 2), "exit-signal": (1007, 2),
    "signal": (1007, 99), "seccomp": (1007, 99), "open": (1001, 14), "open-denied": (1001, 14),
    "mkdir-denied": (1001, 1), "write": (1001, 3), "rename": (1001, 5), "unlink": (1001, 4), "symlink": (1001, 1),
    "chmod": (1001, 7), "stat": (1001, 8), "socket": (4001, 99), "socket-bare": (4001, 99),
    "connect-refused": (4001, 5),
    "connect": (4001, 1), "connect-unix": (4001, 4), "bind": (4001, 99), "listen": (4001, 7), "accept": (4001, 1),
    "sendto": (4001, 6), "syscall": (0, 99), "attach": (1008, 6), "detach": (1008, 7), "tracer": (1008, 99),
    "parse_error": (0, 99), "unaccounted": (2004, 1), "unaccounted-more": (2004, 1),
    "unaccounted-incomplete": (2004, 1), "finding": (2004, 1), "container": (1007, 2),
    "container-running": (1007, 1), "container-failed": (1007, 2), "trace-running": (1007, 1),
    "trace-exited": (1007, 2),
    "egress-connect": (4001, 6), "egress-get-denied": (4002, 3), "egress-connect-bad-sni": (4001, 5),
    "egress-dns": (4003, 6), "egress-dns-denied": (4003, 6), "egress-injected": (6003, 1),
    "egress-injected-by-name": (6003, 2), "egress-over-budget": (4002, 6), "egress-bad-request": (4001, 4),
    "egress-relay": (4001, 4), "egress-log-full": (4001, 4),
    "review-quarantine": (7001, 1), "review-findings": (2004, 1), "review-findings-none": (2004, 1),
    "review-apply": (7001, 3), "review-apply-partial": (7001, 3), "review-export": (7001, 99),
    "review-discard": (7001, 2),
}


def test_every_realistic_item_has_an_expected_class() -> None:
    assert set(REALISTIC) == set(EXPECTED)
    kinds = {(i["kind"], i.get("type") or i.get("action") or i.get("method")) for i in REALISTIC.values()}
    types = {t for k, t in kinds if k == "event"}
    assert types == {"exec", "process", "exit", "signal", "file", "net", "syscall", "attach", "detach", "tracer",
                     "parse_error", "unaccounted"}
    assert {t for k, t in kinds if k == "review"} == {"quarantine", "findings", "apply", "export", "discard"}


@pytest.mark.parametrize("name", sorted(REALISTIC))
def test_each_kind_of_item_maps_to_its_class_and_validates(name: str) -> None:
    item = REALISTIC[name]
    ev = mapped(item)
    assert (ev["class_uid"], ev["activity_id"]) == EXPECTED[name], ev
    assert ev["metadata"]["product"] == {"name": "kodepipe", "vendor_name": "kodepipe",
                                         "version": ev["metadata"]["product"]["version"]}
    assert ev["metadata"]["version"] == ocsf.VERSION == "1.7.0"
    run_id = item.get("run_id", item.get("id") if item["kind"] in ("container", "finding") else None)
    assert ev["metadata"].get("correlation_uid") == run_id
    assert type(ev["time"]) is int
    if type(item.get("ts")) is float:
        assert ev["time"] == int(item["ts"] * 1000)
    if ocsf._epoch_ms(item.get("ts")) is not None or item["kind"] == "container":
        assert ocsf.event(copy.deepcopy(item)) == ev  # the same, through the safety net


@pytest.mark.parametrize("path", TRACES, ids=[p.name.split(".")[0] for p in TRACES])
def test_every_event_of_the_real_traces_validates(path: Path) -> None:
    by_type = {"exec": {1007}, "process": {1007}, "exit": {1007}, "signal": {1007}, "file": {1001},
               "net": {4001}, "syscall": {0}, "attach": {1008}, "detach": {1008}, "tracer": {1008},
               "parse_error": {0}}
    for n, raw in enumerate(path.read_bytes().splitlines()):
        item = orjson.loads(raw)
        if n % 2:  # half as a run's timeline has them, half as a bare kp-trace writes them
            item.update(RUN)
        ev = mapped(item)
        assert ev["class_uid"] in by_type[item["type"]], (item, ev)
        if item["ts"] is not None:
            assert ev["time"] == int(item["ts"] * 1000)
        if ev["class_uid"] != 0:
            assert ev["device"]["name"] == ("proj-1" if n % 2 else "unknown")


# -- concrete mappings -------------------------------------------------------------------------


def test_exec_is_a_launch_of_the_new_program_by_its_parent() -> None:
    item = REALISTIC["exec"]
    ev = mapped(item)
    assert (ev["class_name"], ev["activity_name"], ev["type_uid"]) == ("Process Activity", "Launch", 100701)
    assert ev["launch_type_id"] == 3 and ev["status"] == "Success" and ev["severity_id"] == 1
    assert ev["time"] == int(item["ts"] * 1000) and 1_700_000_000_000 < ev["time"] < 2_000_000_000_000
    process = ev["process"]
    assert process["pid"] == item["pid"] and process["file"] == {"name": "cat", "path": "/usr/bin/cat", "type_id": 1}
    assert process["cmd_line"] == "cat /root/.bashrc" and process["parent_process"] == {"pid": item["ppid"]}
    assert process["uid"] == f"0123456789ab/{item['exec_id']}"
    assert ev["actor"]["process"] == {"pid": item["ppid"]}
    assert ev["device"] == {"type_id": 99, "type": "Container", "name": "proj-1", "container": {"name": "proj-1"}}
    assert ev["metadata"]["event_code"] == "execve" and ev["metadata"]["sequence"] == item["line"]
    assert ev["unmapped"]["args"] == item["args"] and "argv" not in ev["unmapped"]
    failed, tried = mapped(REALISTIC["exec-failed"]), REALISTIC["exec-failed"]
    assert (failed["status"], failed["status_code"]) == ("Failure", "ENOENT")
    assert failed["process"]["file"]["path"] == "/usr/local/bin/nope" and failed["process"]["cmd_line"] == "nope"
    assert failed["unmapped"]["exe"] == tried["exe"]  # the program that tried


def test_fork_launches_the_child_and_exit_terminates_with_its_code() -> None:
    fork, item = mapped(REALISTIC["fork"]), REALISTIC["fork"]
    assert fork["process"]["pid"] == item["child"] and fork["actor"]["process"]["pid"] == item["pid"]
    assert fork["launch_type_id"] == 2
    ex = mapped(REALISTIC["exit"])
    assert (ex["activity_name"], ex["exit_code"], ex["status_id"]) == ("Terminate", 0, 1)
    killed = mapped(REALISTIC["exit-signal"])
    assert "exit_code" not in killed and killed["status_detail"] == "killed by SIGSYS"


def test_a_denied_open_is_a_failed_blocked_file_open() -> None:
    item = REALISTIC["open-denied"]
    ev = mapped(item)
    assert (ev["class_uid"], ev["activity_name"]) == (1001, "Open")
    assert (ev["status_id"], ev["status"], ev["status_code"]) == (2, "Failure", "EACCES")
    assert (ev["action"], ev["disposition"], ev["severity"]) == ("Denied", "Blocked", "Low")
    assert ev["file"] == {"name": ".bashrc", "path": "/root/.bashrc", "type_id": 0}
    assert ev["actor"]["process"]["file"]["path"] == "/usr/bin/cat"
    assert ev["unmapped"]["flags"] == "O_RDONLY" and ev["unmapped"]["write"] is False


def test_a_seccomp_kill_names_the_call_it_denied() -> None:
    ev = mapped(REALISTIC["seccomp"])
    assert (ev["activity_name"], ev["status"], ev["status_detail"]) == ("Receive Signal", "Failure",
                                                                        "seccomp denied socket")
    assert ev["status_code"] == "SIGSYS" and ev["actor"] == {"app_name": "kernel"} and ev["action_id"] == 2


def test_rename_has_the_new_name_as_its_result() -> None:
    item = REALISTIC["rename"]
    ev = mapped(item)
    assert ev["file"]["path"] == item["path"] and ev["file_result"]["path"] == item["target"]


def test_network_calls_name_their_endpoints() -> None:
    refused = mapped(REALISTIC["connect-refused"])
    assert (refused["activity_name"], refused["status_code"]) == ("Refuse", "ECONNREFUSED")
    assert refused["dst_endpoint"] == {"ip": "127.0.0.1", "port": 9}
    assert refused["connection_info"] == {"direction_id": 2, "protocol_name": "tcp", "protocol_ver_id": 4}
    accept = mapped(REALISTIC["accept"])
    assert accept["connection_info"]["direction_id"] == 1
    assert accept["src_endpoint"]["ip"] == "127.0.0.1" and accept["dst_endpoint"] == {"ip": "127.0.0.1",
                                                                                      "port": 36015}
    unix = mapped(REALISTIC["connect-unix"])
    assert unix["dst_endpoint"] == {"name": "/nonexistent.sock"} and unix["activity_name"] == "Fail"
    assert mapped(REALISTIC["socket"])["src_endpoint"] == {"name": "proj-1"}


def test_egress_decisions() -> None:
    tunnel = mapped(EGRESS["connect"])
    assert (tunnel["class_name"], tunnel["activity_name"], tunnel["status"]) == ("Network Activity", "Traffic",
                                                                                "Success")
    assert tunnel["dst_endpoint"] == {"hostname": "pypi.org", "ip": "151.101.0.223", "port": 443}
    assert tunnel["traffic"] == {"bytes_out": 1534, "bytes_in": 88211, "bytes": 89745}
    assert tunnel["duration"] == 412 and tunnel["time"] == 1795470200123
    assert tunnel["src_endpoint"] == {"name": "proj-1", "container": {"name": "proj-1"}}
    assert tunnel["unmapped"] == {"sni": "pypi.org"}
    denied = mapped(EGRESS["get-denied"])
    assert (denied["class_uid"], denied["activity_name"], denied["http_request"]) == (4002, "Get",
                                                                                     {"http_method": "GET"})
    assert (denied["status"], denied["action"], denied["status_detail"]) == (
        "Failure", "Denied", "attacker.example is not in the allowlist")
    dns = mapped(EGRESS["dns"])
    assert dns["query"] == {"hostname": "pypi.org", "class": "IN", "type": "A"} and dns["rcode"] == "NoError"
    assert [a["rdata"] for a in dns["answers"]] == ["151.101.0.223", "151.101.64.223"]
    assert mapped(EGRESS["dns-denied"])["rcode_id"] == 5
    budget = mapped(EGRESS["over-budget"])
    assert budget["unmapped"] == {"credential": "anthropic", "budget": "anthropic"}
    assert budget["http_request"]["url"] == {"path": "/v1/messages", "hostname": "api.anthropic.com", "port": 443}


def test_a_credential_injection_is_an_api_call_that_names_the_credential() -> None:
    ev = mapped(EGRESS["injected"])
    assert (ev["class_name"], ev["activity_name"], ev["status"]) == ("API Activity", "Create", "Success")
    assert ev["actor"] == {"app_name": "kodepipe egress proxy",
                           "user": {"name": "anthropic", "credential_uid": "anthropic"}}
    assert ev["api"] == {"operation": "POST /v1/messages", "service": {"name": "api.anthropic.com"}}
    assert ev["dst_endpoint"]["ip"] == "160.79.104.10"
    assert ev["unmapped"] == {"bytes_up": 2048, "bytes_down": 9000}
    by_name = mapped(EGRESS["injected-by-name"])
    assert by_name["actor"]["user"]["credential_uid"] == "github" and by_name["activity_name"] == "Read"


def test_review_entries() -> None:
    quarantine = mapped(REVIEW["quarantine"])
    assert (quarantine["class_name"], quarantine["activity_name"], quarantine["disposition"]) == (
        "Remediation Activity", "Isolate", "Quarantined")
    assert quarantine["unmapped"]["changes"] == REVIEW["quarantine"]["changes"]
    findings = mapped(REVIEW["findings"])
    assert (findings["class_name"], findings["severity"], findings["status"]) == ("Detection Finding", "High", "New")
    assert findings["finding_info"]["types"] == ["git-hooks", "mass-deletion", "secret"]
    assert [e.get("file", {}).get("path") for e in findings["evidences"]] == [
        "config/settings.py", ".git/hooks/pre-commit", None]
    assert mapped(REVIEW["findings-none"])["severity"] == "Informational"
    forced = mapped(REVIEW["apply"])
    assert (forced["activity_name"], forced["severity"], forced["status"]) == ("Restore", "Medium", "Success")
    assert forced["command_uid"] == "r-5f2c" and forced["unmapped"]["forced"] is True
    assert mapped(REVIEW["apply-partial"])["status"] == "Partial"
    assert mapped(REVIEW["export"])["activity_name"] == "Export"
    assert mapped(REVIEW["discard"])["activity_name"] == "Evict"


def test_unaccounted_changes_are_findings() -> None:
    ev = mapped(UNACCOUNTED)
    assert (ev["class_uid"], ev["severity"]) == (2004, "High")
    assert ev["evidences"] == [{"file": {"name": "backdoor.py", "path": "src/backdoor.py", "type_id": 1},
                                "data": {"change": "added", "entry": "file", "against": "quarantine",
                                         "complete": True}}]
    assert ev["unmapped"] == {"ts": None}  # its time is the conversion's, and the reader can tell
    assert mapped(REALISTIC["unaccounted-incomplete"])["severity"] == "Medium"


def test_the_run_record_is_its_command_s_life() -> None:
    ev = mapped(CONTAINER)
    assert (ev["class_name"], ev["activity_name"], ev["exit_code"], ev["status"]) == (
        "Process Activity", "Terminate", 0, "Success")
    assert ev["time"] == ev["end_time"] == 1796060469000  # 2026-11-30T17:41:09Z
    assert ev["start_time"] == 1796060102000 and ev["duration"] == 367000
    assert ev["process"]["cmd_line"] == "claude --print 'fix it'" and ev["process"]["name"] == "claude"
    assert ev["device"]["container"] == {"name": "kp-proj-1-0123456789ab", "uid": CONTAINER["container_id"],
                                         "runtime": "podman"}
    assert ev["unmapped"]["image"] == CONTAINER["image"]
    failed = mapped(REALISTIC["container-failed"])
    assert (failed["status"], failed["status_code"], failed["exit_code"]) == ("Failure", "oom", 137)
    assert mapped(REALISTIC["container-running"])["activity_name"] == "Launch"
    traced = mapped(REALISTIC["trace-exited"])
    assert (traced["process"], traced["exit_code"], traced["status"]) == (
        {"uid": "5a1c0ffee123", "cmd_line": "make test", "name": "make"}, 2, "Failure")


def test_record_times_are_read_as_utc() -> None:
    import calendar

    for text in ("2026-11-30T17:35:02Z", "2024-02-29T00:00:00Z", "2001-09-09T01:46:40Z", "2099-12-31T23:59:59Z"):
        expected = calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")) * 1000
        assert ocsf._iso_ms(text) == expected, text
    for bad in ("2026-11-30 17:35:02Z", "2026-13-01T00:00:00Z", "２０２６-11-30T17:35:02Z", "1970-01-01T00:00:00Z",
                "2026-11-30T17:35:02+01:00", None, 17):
        assert ocsf._iso_ms(bad) is None, bad


def test_what_is_not_an_event() -> None:
    assert ocsf.event({"kind": "summary", "item": "totals", "events": 3}) is None
    for junk in (None, 3, "text", ["kind", "event"]):
        assert ocsf.event(junk) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("item", [
    {"kind": "vm", "name": "dev", "state": "running"},
    {"kind": "event", "type": "teleport", "ts": 1795470105.0},
    {"no": "kind"},
    {"kind": "review", "action": "rewrite-history", "ts": 1795470105.0},
    {"kind": "event", "type": "file", "op": "open", "path": None, "pid": 12, "ts": 1795470105.0},
    {"kind": "event", "type": "exec", "pid": None, "exec_id": None, "path": None},
    {"kind": "egress", "method": "DNS", "host": None, "decision": "error"},
    {"kind": "container", "state": "exited"},
], ids=lambda i: str(i.get("kind")) + "-" + str(i.get("type") or i.get("action") or len(i)))
def test_an_item_no_class_fits_is_a_base_event_with_all_of_it(item: Item) -> None:
    ev = mapped(item)
    assert (ev["class_uid"], ev["category_uid"], ev["type_uid"]) == (0, 0, 99)
    assert ev["unmapped"] == item and ev["severity"] == "Unknown"


# -- hostile items -----------------------------------------------------------------------------

HOSTILE_VALUES: list[Any] = [None, "", "<script>alert(1)</script>\x1b[2J\u202e\x00", -1, 2**70, 1.5, True, [],
                             {}, [None, 1], {"a": {"b": []}}, math.nan, -math.inf]


def _variants(item: Item) -> list[Item]:
    """The item with each key missing or replaced by each hostile value, and the same one level down
    (in address, info, error, each change and finding)."""
    out = []
    for key, value in item.items():
        out.append({k: v for k, v in item.items() if k != key})
        out.extend({**item, key: hostile} for hostile in HOSTILE_VALUES)
        inner = [value] if isinstance(value, dict) else [v for v in value if isinstance(v, dict)] \
            if isinstance(value, list) else []
        for n, part in enumerate(inner):
            for sub in part:
                for hostile in [*HOSTILE_VALUES, "missing"]:
                    changed = {k: v for k, v in part.items() if k != sub or hostile != "missing"}
                    if hostile != "missing":
                        changed[sub] = hostile
                    if isinstance(value, dict):
                        out.append({**item, key: changed})
                    else:
                        listed = [v for v in value if isinstance(v, dict)]
                        listed[n] = changed
                        out.append({**item, key: listed})
    return out


@pytest.mark.parametrize("name", sorted(REALISTIC))
def test_hostile_variants_never_crash_and_still_validate(name: str) -> None:
    """Every key of every realistic item (and of the objects in it) missing, or replaced by a value
    of every wrong type: no exception, and a valid event."""
    for variant in _variants(REALISTIC[name]):
        ev = ocsf._map(copy.deepcopy(variant))
        assert ev is not None
        assert problems(ev) == [], (variant, ev, problems(ev))
        # what the mapping placed is always encodable (64-bit integers, finite numbers); the rest of
        # the item, kept in unmapped, is as encodable as the item was (orjson reads neither NaN nor
        # integers past 64 bits, so no item from a log has one)
        assert not _unencodable({k: v for k, v in ev.items() if k not in ("unmapped", "evidences")}), ev
        if not _unencodable(variant):
            orjson.dumps(ev)


def _unencodable(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if type(value) is int:
        return not -(1 << 63) <= value < 1 << 63
    if isinstance(value, dict):
        return any(_unencodable(v) for v in value.values())
    if isinstance(value, list):
        return any(_unencodable(v) for v in value)
    return False


@pytest.mark.parametrize("item", [
    {**REALISTIC["open"], "path": "/tmp/a\x00b\nc\x1b]0;pwned\x07/\u202eexe.txt", "flags": 7},
    {**REALISTIC["open"], "path": "/", "exe": ""},
    {**REALISTIC["rename"], "target": "../../etc/passwd\r\n", "op": "rename"},
    {**REALISTIC["exec"], "argv": ["sh", "-c", "echo '\x1b[31m' $(id)\n"], "path": "/bin/\tsh"},
    {**REALISTIC["connect"], "address": {"family": "AF_INET", "address": "999.1.1.1", "port": 70000}},
    {**REALISTIC["connect"], "address": {"family": "AF_INET6", "address": "fe80::1%" + "x" * 60, "port": 22}},
    {**REALISTIC["connect"], "address": {"family": "AF_INET6", "address": "::ffff:10.0.0.1", "port": 443}},
    {**REALISTIC["accept"], "peer_socket": "TCP:[[::1]:99999->nonsense]", "address": {"family": "AF_INET"}},
    {**REALISTIC["accept"], "peer_socket": "TCPv6:[[::1]:8080->[::1]:50000]", "address": None},
    {**REALISTIC["seccomp"], "info": {"si_code": "SI_USER", "si_pid": "1"}, "syscall": ["socket"]},
    {**REALISTIC["signal"], "info": {"si_code": "SI_USER", "si_pid": 4242}},
    {**REALISTIC["kill"], "target": -1},
    {**EGRESS["dns"], "addresses": ["1.2.3.4", 5], "qtype": 28},
    {**EGRESS["injected"], "injected": "", "credential": "<b>x</b>"},
    {**EGRESS["injected"], "method": None, "path": 3},
    {**EGRESS["connect"], "address": "not-an-ip", "port": -5, "bytes_up": -1, "seconds": math.inf},
    {**EGRESS["get-denied"], "method": "PROPFIND\x00", "host": "a" * 5000},
    {**REVIEW["findings"], "findings": [None, "x", {"severity": "apocalyptic", "rule": 3, "path": ["a"]}]},
    {**REVIEW["apply"], "count": "3", "applied": "all", "forced": "yes"},
    {**CONTAINER, "command": [], "finished": "2026-02-30T25:00:00Z", "exit_code": "0", "signal": "SIGKILL"},
    {**REALISTIC["exec"], "ts": 61234.5},  # strace -tt: seconds since midnight
    {**REALISTIC["exec"], "ts": None},
    {k: v for k, v in REALISTIC["exec"].items() if k != "ts"},
], ids=lambda i: f"{i['kind']}-{i.get('type') or i.get('action') or i.get('method')}")
def test_hostile_items_map_and_validate(item: Item) -> None:
    before = int(time.time() * 1000)
    ev = mapped(item)
    after = int(time.time() * 1000)
    if ocsf._epoch_ms(item.get("ts")) is None and item["kind"] in ("event", "egress"):
        assert before <= ev["time"] <= after  # the conversion's time...
        if "ts" in item:
            assert ev["unmapped"]["ts"] == item["ts"]  # ...and the reader can tell


def test_control_characters_in_a_path_are_kept_as_they_are() -> None:
    path = "/tmp/a\x00b\nc\x1b]0;pwned\x07/\u202eexe.txt"
    ev = mapped({**REALISTIC["open"], "path": path})
    assert ev["file"] == {"name": "\u202eexe.txt", "path": path, "type_id": 0}
    assert b"\\u001b]0;pwned\\u0007" in orjson.dumps(ev)  # escaped on the way out, by the encoder


def test_event_never_raises_even_on_a_bug(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(item: Item) -> Item:
        raise KeyError("a bug")

    monkeypatch.setitem(ocsf._KINDS, "egress", broken)
    ev = ocsf.event(dict(EGRESS["connect"]))
    assert ev is not None and ev["class_uid"] == 0 and ev["unmapped"] == EGRESS["connect"]
    assert problems(ev) == []


# -- the validator itself ----------------------------------------------------------------------


def _break(ev: Item, how: str) -> Item:
    ev = copy.deepcopy(ev)
    if how == "class_uid":
        ev["class_uid"] = 1001
    elif how == "unknown class":
        ev["class_uid"] = 1234
    elif how == "no process":
        del ev["process"]
    elif how == "no time":
        del ev["time"]
    elif how == "time in seconds":
        ev["time"] = ev["time"] / 1000
    elif how == "activity 42":
        ev["activity_id"], ev["type_uid"] = 42, 100742
    elif how == "type_uid":
        ev["type_uid"] = 100702
    elif how == "caption":
        ev["activity_name"] = "Terminate"
    elif how == "pid as text":
        ev["process"]["pid"] = str(ev["process"]["pid"])
    elif how == "made-up attribute":
        ev["process"]["favourite_colour"] = "blue"
    elif how == "file without a name":
        del ev["process"]["file"]["name"]
    elif how == "bad ip":
        ev["device"]["ip"] = "999.0.0.1"
    elif how == "no product":
        del ev["metadata"]["product"]
    elif how == "profile not declared":
        ev["metadata"]["profiles"] = ["host"]
        ev["device"]["container"] = {"name": "x"}
    elif how == "version":
        ev["metadata"]["version"] = "1.0.0"
    return ev


@pytest.mark.parametrize("how", ["class_uid", "unknown class", "no process", "no time", "time in seconds",
                                 "activity 42", "type_uid", "caption", "pid as text", "made-up attribute",
                                 "file without a name", "bad ip", "no product", "profile not declared", "version"])
def test_the_validator_refuses_a_broken_event(how: str) -> None:
    good = mapped(REALISTIC["exec"])
    assert problems(good) == []
    assert problems(_break(good, how)) != []


def test_the_mapping_stays_light() -> None:
    """No pydantic, no validator, no heavy import at run time: it runs once per event."""
    code = ("import sys, kodepipe.audit.ocsf as o; o.event({'kind': 'event', 'type': 'exec', 'pid': 1}); "
            "print(' '.join(sorted(sys.modules)))")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                cwd=HERE.parent).stdout.split())
    assert not loaded & {"pydantic", "jsonschema", "ocsf_json_schema", "orjson", "datetime", "json", "ipaddress",
                         "kodepipe.core.schema"}
