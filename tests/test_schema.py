"""The record schema (core/schema.py) against the records the code really writes, so the two cannot drift.

Records are made the way a user gets them: kp-clone, kp-ls, kp-stop and kp-rm on real (never booted)
clones, kp-trace on the golden strace files and on a real strace run, the egress proxy on loopback,
kp-ssh's result record.  Each is checked strictly: a key its kind does not list, a JSON type or a
state its kind does not allow, fails.  (Container and booted-VM records are checked the same way
against real Podman and QEMU in tests/integration/test_schema_live.py.)  The source is walked too:
every dict literal with a constant "kind" names a kind of the schema, and only its keys.
"""

from __future__ import annotations

import ast
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

import kodepipe
from kodepipe import inventory
from kodepipe.core import schema
from kodepipe.core.records import Record
from tests.conftest import ROOT, kp, lines, make_image

STRACE = ROOT / "tests" / "strace"


def assert_fits(records: list[Record], *kinds: str) -> None:
    """Every record is of its kind, strictly, and every kind in ``kinds`` was seen."""
    wrong = {i: (record.get("kind"), found) for i, record in enumerate(records)
             if (found := schema.problems(record, strict=True))}
    assert wrong == {}, "core/schema.py and the records differ: " + repr(wrong)[:3000]
    assert set(kinds) <= {r.get("kind") for r in records}, (kinds, records)


# -- the checker itself --------------------------------------------------------------------------------

GOOD_VM = {"kind": "vm", "name": "a", "id": "0123456789ab", "state": "running", "pid": 7, "ssh": None,
           "memory": "2G", "sockets": {"qmp": "/run/q"}, "error": {"code": "frozen", "message": "m"}}


@pytest.mark.parametrize("change, strict, says", [
    ({}, True, []),
    ({"pid": "7"}, False, ["'pid' must be an integer or null, got a string '7'"]),
    ({"pid": True}, False, ["'pid' must be an integer or null, got a boolean True"]),
    ({"cpus": 2.5}, False, ["'cpus' must be an integer, got a number 2.5"]),
    ({"state": "ready"}, False, ["'state' must be one of creating, stopped, running, suspended, frozen, saved, "
                                 "crashed, broken, gone, got a string 'ready'"]),
    ({"sockets": {"qmp": 5}}, False, ["'sockets' must be an object of strings, got an object"]),
    ({"error": {"code": "no_such_code", "message": "m"}}, False,
     ["'error': 'code' must be an error code (kodepipe(7)), got a string 'no_such_code'"]),
    ({"error": {"code": "frozen"}}, False, ["'error': no 'message'"]),
    ({"from_a_later_stage": 1}, False, []),  # passed through: the record contract
    ({"from_a_later_stage": 1}, True, ["'from_a_later_stage' is not a key of its kind"]),
], ids=str)
def test_problems_names_each_key_that_does_not_fit(change: dict[str, Any], strict: bool, says: list[str]) -> None:
    assert schema.problems({**GOOD_VM, **change}, strict=strict) == says


def test_problems_of_records_of_kinds_it_does_not_know() -> None:
    assert schema.problems({"kind": "note", "x": 1}) == []
    assert schema.problems({"kind": "note"}, strict=True) == ["unknown kind 'note'"]
    assert schema.problems({"kind": "vm"}) == ["no 'name'"]
    assert schema.problems({"kind": "result", "name": "a"}) == [
        "no 'command'", "no 'exit_status'", "no 'seconds'", "no 'stderr'", "no 'stdout'", "no 'vm_id'"]


def test_every_kind_describes_each_key_in_words() -> None:
    for kind in schema.KINDS:
        described = schema.keys(kind)
        assert described["kind"] == f'"{kind}"'
        assert all(text and "typing" not in text and "<class" not in text for text in described.values()), described


# -- states ----------------------------------------------------------------------------------------------


def test_the_states_kp_ls_can_show_are_the_schemas_states() -> None:
    # kp-ls --state and inventory.STATES list what a listing can show; "gone" is only ever a refreshed
    # record (the thing was removed) and "applied" only kp-run --apply's own record (its folder goes)
    listed = {str(state) for kind in ("image", "vm", "container", "disk") for state in schema.KINDS[kind].states or ()}
    assert listed - {"gone"} == set(inventory.STATES)


def test_every_state_says_what_it_means() -> None:
    for spec in schema.KINDS.values():
        for state in spec.states or ():
            assert state.name == state.value and state.meaning.strip() and "\n" not in state.meaning


# -- the source: every literal record names a kind of the schema, and only its keys ----------------------


def literal_records() -> Iterator[tuple[str, int, str, list[str]]]:
    """(file, line, kind, constant keys) of every dict literal in kodepipe with a constant "kind"."""
    source = Path(kodepipe.__file__).resolve().parent
    for path in sorted(source.rglob("*.py")):
        tree = ast.parse(path.read_text())
        # a kind may be named by a module constant (KIND = "container-image")
        constants = {target.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
                     for target in node.targets if isinstance(target, ast.Name)
                     and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Dict):
                continue
            keys = [k.value if isinstance(k, ast.Constant) and isinstance(k.value, str) else None
                    for k in node.keys]
            if "kind" not in keys or "apiVersion" in keys:  # a Kubernetes object (kp-run --emit), not a record
                continue
            value = node.values[keys.index("kind")]
            kind: str | None
            if isinstance(value, ast.Attribute) and value.attr == "KIND":  # images.KIND of another module
                kind = "?" + ast.unparse(value)
            elif isinstance(value, ast.Name):
                kind = constants.get(value.id, "?" + value.id)
            else:
                kind = value.value if isinstance(value, ast.Constant) and isinstance(value.value, str) else None
            if kind is not None and not kind.startswith("?"):
                yield str(path.relative_to(source.parent)), node.lineno, kind, [k for k in keys if k]


def test_every_record_literal_in_the_source_is_of_a_kind_of_the_schema_with_its_keys() -> None:
    found = list(literal_records())
    assert {kind for _, _, kind, _ in found} >= {"image", "vm", "container", "event", "summary", "egress",
                                                 "result", "trace", "container-image"}

    def allowed(kind: str) -> set[str]:
        return set(schema.keys(kind)) | schema.META_ONLY.get(kind, frozenset())

    wrong = [(where, line, kind, sorted(set(keys) - allowed(kind)) if kind in schema.KINDS else "kind")
             for where, line, kind, keys in found if kind not in schema.KINDS or not set(keys) <= allowed(kind)]
    assert wrong == []


# -- image and vm records, from the commands -----------------------------------------------------------


def test_image_and_vm_records_of_clone_ls_stop_and_rm(kp_env: dict[str, Path]) -> None:
    make_image("base")
    made = lines(kp("kp-clone", "base", "a", "b", "c", check=True).stdout)
    failed = lines(kp("kp-clone", "nosuchimage", "d").stdout)  # base_missing: a failed record
    assert failed[0]["error"]["code"] == "base_missing"
    listed = lines(kp("kp-ls", "--json", check=True).stdout)
    assert {r["kind"] for r in listed} == {"image", "vm"} and any(r.get("clones") for r in listed)
    stopped = lines(kp("kp-stop", "a", check=True).stdout)  # already stopped: its record says so
    dry = lines(kp("kp-rm", "--dry-run", "b", check=True).stdout)
    removed = lines(kp("kp-rm", input=b"".join(orjson.dumps(r) + b"\n" for r in made[1:]), check=True).stdout)
    gone = lines(kp("kp-ls", "--json", input=b"".join(orjson.dumps(r) + b"\n" for r in made), check=True).stdout)
    assert {r["name"]: r["state"] for r in gone} == {"a": "stopped", "b": "gone", "c": "gone"}
    kept = lines(kp("kp-rm", input=orjson.dumps(listed[0]) + b"\n", check=True).stdout)  # the image: kept
    assert kept[0].get("kept"), kept
    assert_fits([*made, *failed, *listed, *stopped, *dry, *removed, *gone, *kept], "image", "vm")


# -- events and summaries, from the golden strace files and a real strace run --------------------------


@pytest.mark.parametrize("trace", sorted(STRACE.glob("*.strace")), ids=lambda p: p.stem)
def test_events_and_summaries_of_each_golden_trace(trace: Path) -> None:
    events = lines(kp("kp-trace", input=trace.read_bytes()).stdout)
    summary = lines(kp("kp-trace", "--summary", input=trace.read_bytes()).stdout)
    assert_fits([*events, *summary], "event", "summary")


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_the_trace_records_of_a_real_strace_run(tmp_path: Path) -> None:
    out = lines(kp("kp-trace", "--", "sh", "-c", "echo hi > /dev/null; exit 3").stdout)
    traces = [r for r in out if r["kind"] == "trace"]
    assert [r["state"] for r in traces] == ["running", "exited"] and traces[-1]["exit_code"] == 3
    assert_fits(out, "trace", "event")


# -- egress decisions, from the real proxy on loopback --------------------------------------------------


def _dns_query(port: int, name: str) -> None:
    import dns.message

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(10)
        s.sendto(dns.message.make_query(name, "A").to_wire(), ("127.0.0.1", port))
        s.recv(4096)


def _http(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        return b"".join(iter(lambda: s.recv(65536), b""))


def test_egress_decisions_of_the_proxy_and_kp_traces_summary_of_them(tmp_path: Path) -> None:
    from kodepipe.egress import policy as egress_policy
    from kodepipe.egress import proxy as egress
    from tests import httpd

    with httpd.origin("127.0.0.1", "hello") as origin_port:
        log = egress.DecisionLog(tmp_path / "egress.jsonl", "c1")
        tcp = socket.socket()
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(16)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        proxy = egress.Proxy(egress_policy.Policy.build([f"allowed.test:{origin_port}"], ["allowed.test=127.0.0.1"]),
                             log)
        proxy.start(tcp, udp)
        try:
            port = tcp.getsockname()[1]
            assert b"hello" in _http(port, f"GET http://allowed.test:{origin_port}/x HTTP/1.1\r\n"
                                           f"Host: allowed.test:{origin_port}\r\nConnection: close\r\n\r\n".encode())
            _http(port, b"GET http://denied.test/ HTTP/1.1\r\nHost: denied.test\r\nConnection: close\r\n\r\n")
            _http(port, b"CONNECT denied.test:443 HTTP/1.1\r\nHost: denied.test:443\r\n\r\n")
            _http(port, b"NOT HTTP\r\n\r\n")
            _dns_query(udp.getsockname()[1], "allowed.test")
            _dns_query(udp.getsockname()[1], "denied.test")
        finally:
            proxy.stop()
            log.close()
    decisions = lines(log.path.read_bytes())
    assert {d["decision"] for d in decisions} >= {"allow", "deny"}, decisions
    assert any(d.get("method") == "DNS" for d in decisions)
    container = {"kind": "container", "name": "c1", "egress_log": str(log.path)}
    passed = lines(kp("kp-trace", input=orjson.dumps(container) + b"\n").stdout)
    summary = lines(kp("kp-trace", "--summary", input=orjson.dumps(container) + b"\n").stdout)
    assert_fits([*decisions, *passed, *summary], "egress", "summary")


# -- kp-image base's record ------------------------------------------------------------------------------


def test_the_container_image_record_of_podmans_inspect() -> None:
    from kodepipe.container import images

    info = {"Id": "d684cd7d9028", "Size": 120587501, "Created": "2026-11-23T23:16:04.123456789Z",
            "Labels": {f"{images.LABEL}.suite": "bookworm", f"{images.LABEL}.mirror": "http://deb.example/debian"}}
    record = images.image_record("localhost/kodepipe-base:bookworm", info)
    assert record["suite"] == "bookworm" and record["created"] == "2026-11-23T23:16:04Z", record
    failed = {"kind": images.KIND, "name": images.BASE_REPO, "error": {"code": "no_permission", "message": "m"}}
    assert_fits([record, failed], "container-image")


# -- kp-ssh's result record -------------------------------------------------------------------------------


@pytest.mark.parametrize("stdout", [b"hello\n", b"\xff\xfe not UTF-8"], ids=["text", "bytes"])
def test_the_result_record_of_a_command_in_a_vm(stdout: bytes) -> None:
    from kodepipe.vm import ssh

    ep = ssh.Endpoint("a", "0123456789ab", "127.0.0.1", 2222, "kp", Path("/nonexistent/known_hosts"))
    record = ssh.result_record(ep, ["uname", "-a"], ssh.Outcome(1, stdout, b"", 0.25))
    assert_fits([record, {**record, "error": {"code": "exit_status", "message": "uname -a exited with status 1"}}],
                "result")


def test_kp_ssh_writes_a_failed_record_for_a_vm_that_is_not_running(kp_env: dict[str, Path]) -> None:
    make_image("base")
    kp("kp-clone", "base", "a", check=True)
    proc = subprocess.run([str(ROOT / "bin" / "kp-ssh"), "a", "--", "true"], capture_output=True, timeout=60)
    out = lines(proc.stdout)
    assert proc.returncode == 1 and out and out[0]["error"]["code"] == "not_running", proc.stderr.decode()
    assert_fits(out, "vm")
