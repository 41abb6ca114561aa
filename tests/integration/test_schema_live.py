"""The record schema (core/schema.py) against records of real runs: containers in real Podman (plain,
kept, quarantined and applied, audited, with an egress allowlist, removed), the container base
image's record, and a VM really booted under QEMU, found by kp-ip, used by kp-ssh, suspended and
stopped.  Every record is checked strictly (tests/test_schema.py does the same for what needs no
Podman or QEMU)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import orjson
import pytest

from kodepipe.core import schema
from kodepipe.core.records import Record
from tests.conftest import BIN, lines
from tests.integration.conftest import Golden, run

pytestmark = pytest.mark.integration

OWNER = 4321


def fits(records: list[Record]) -> None:
    wrong = {i: (r.get("kind"), found) for i, r in enumerate(records) if (found := schema.problems(r, strict=True))}
    assert wrong == {}, "core/schema.py and the records differ: " + repr(wrong)[:3000]


def kp(*args: str, input: bytes | None = None, env: dict[str, str] | None = None,
       timeout: float = 300) -> list[Record]:
    proc = subprocess.run([str(BIN / args[0]), *args[1:]], input=input, capture_output=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    out = lines(proc.stdout)
    assert out, proc.stderr.decode()
    return out


def feed(records: list[Record]) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in records)


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    ws = tmp_path / "proj"
    ws.mkdir()
    (ws / "main.py").write_text("print('hello')\n")
    for path in (ws, ws / "main.py"):
        os.chown(path, OWNER, OWNER)
    return ws


def test_container_records_of_real_runs(shell_image: str, ws: Path) -> None:
    base = ("kp-run", "--image", shell_image, "-w", str(ws))
    seen = kp("kp-image", "base")  # built already (shell_image): only its record
    seen += kp(*base, "--", "sh", "-c", "exit 3")
    kept = kp(*base, "--keep", "--", "true")
    quarantined = kp(*base, "--quarantine", "--", "sh", "-c",
                     "echo new > /workspace/new.txt; echo 'export API_TOKEN=abcdef0123456789' > /workspace/env.sh")
    assert quarantined[-1]["state"] == "quarantined", quarantined
    audited = kp(*base, "--audit", "--", "sh", "-c", "cat /workspace/main.py")
    assert audited[-1].get("audit_log"), audited
    allowed = kp(*base, "--allow", "example.test", "--", "true")
    assert allowed[-1].get("egress_log"), allowed
    seen += kept + quarantined + audited + allowed
    seen += kp("kp-ls", "--json", "--kind", "container")
    seen += kp("kp-trace", input=feed(audited[-1:]))
    seen += kp("kp-trace", "--summary", input=feed(allowed[-1:]))
    findings = kp("kp-review", "--findings", quarantined[-1]["name"])
    assert [f["rule"] for f in findings] == ["secret-assignment"], findings
    seen += findings
    seen += kp("kp-run", "--apply", quarantined[-1]["name"], "--accept", "env.sh")
    assert seen[-1]["state"] == "applied" and seen[-1]["accepted"], seen[-1]
    seen += kp("kp-rm", input=feed([kept[-1], audited[-1], allowed[-1]]))  # the logs are kept: evidence
    seen += kp("kp-rm", "--evidence", input=feed([audited[-1], allowed[-1]]))
    assert {r["kind"] for r in seen} >= {"container", "event", "summary", "container-image", "finding"}
    fits(seen)


def test_vm_records_of_a_real_boot(golden: Golden) -> None:
    env = golden["env"]
    seen = kp("kp-clone", "base", "schema-vm", env=env)
    try:
        seen += kp("kp-boot", "--accel", "tcg", "schema-vm", env=env)
        seen += kp("kp-ip", "--timeout", "400", "schema-vm", env=env, timeout=600)
        assert seen[-1].get("address") and seen[-1]["state"] == "running", seen[-1]
        seen += kp("kp-ssh", "schema-vm", "--", "uname", "-r", env=env)
        assert any(r["kind"] == "result" for r in seen)
        seen += kp("kp-ls", "--json", env=env)
        seen += kp("kp-stop", "--suspend", "schema-vm", env=env)
        seen += kp("kp-stop", "--resume", "schema-vm", env=env)
        seen += kp("kp-stop", "schema-vm", env=env)
        fits(seen)
    finally:
        run(env, "kp-rm", "schema-vm", timeout=300)

