"""A real audited, quarantined run's evidence, on both backends: one timeline that loses nothing and is
in time order, logs whose hash chains verify and catch tampering, a signed run checked with the public
key alone, and an HTML report that renders in a real headless Chromium."""

from __future__ import annotations

import math
import os
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import BIN, lines
from tests.integration.test_audit import env_of, place, remove
from tests.integration.test_run import one_podman_service  # noqa: F401 - the module's shared service
from tests.integration.vmbackend import kprun_on

pytestmark = pytest.mark.integration

AGENT = r"""
echo made > /workspace/made.txt
rm /workspace/old.txt
cat /workspace/keep.txt > /dev/null
echo '<script>alert(1)</script>' > '/workspace/<script>alert(1)<\script>'
"""


def kp(request: pytest.FixtureRequest, backend: str, *args: str, stdin: bytes | None = None
       ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(BIN / args[0]), *args[1:]], input=stdin, env=env_of(request, backend),
                          capture_output=True, timeout=600)


def audited_run(request: pytest.FixtureRequest, backend: str, shell_image: str, tmp_path: Path,
                *more: str) -> dict[str, Any]:
    """An audited run of AGENT: in quarantine on the host; on the guest's disk in a VM (a quarantine there
    needs the VM's share: test_vmrun_quarantine)."""
    ws = tmp_path / "proj"
    ws.mkdir()
    for name in ("old.txt", "keep.txt"):
        (ws / name).write_text(name)
        os.chown(ws / name, 4321, 4321)
    os.chown(ws, 4321, 4321)
    where = place(request, backend, ws)
    quarantine = ["--quarantine"] if backend == "host" else []
    proc, record = kprun_on(request, backend, "--image", shell_image, "-w", where, "--audit", *quarantine,
                            *more, "--", "bash", "-c", AGENT)
    assert record.get("exit_code") == 0, proc.stderr[-4000:]
    return record


def running_max_keys(items: list[dict[str, Any]]) -> list[float]:
    """Each item's sort key as the merge defines it: the latest time its own source has shown so far."""
    latest: dict[str, float] = {}
    keys = []
    for item in items:
        source = item["kind"]
        ts = item.get("ts")
        if isinstance(ts, (int, float)) and not isinstance(ts, bool):
            latest[source] = max(latest.get(source, -math.inf), float(ts))
        keys.append(latest.get(source, -math.inf))
    return keys


def test_a_runs_evidence_end_to_end(request: pytest.FixtureRequest, backend: str, shell_image: str,
                                    tmp_path: Path) -> None:
    record = audited_run(request, backend, shell_image, tmp_path)
    name, folder = record["name"], Path(record["path"])
    host = backend == "host"
    assert record["state"] == ("quarantined" if host else "exited")
    assert record["evidence"]["logs"] == ["audit.strace", *(["review.jsonl"] if host else [])]
    assert record["evidence"]["signed"] is False

    # one timeline: every source's items, each with the run's name and id, in time order
    traced = kp(request, backend, "kp-trace", name)
    assert traced.returncode == 0, traced.stderr.decode()
    out = lines(traced.stdout)
    assert out[0]["kind"] == "container" and out[0]["id"] == record["id"]
    items = out[1:]
    only_audit = {k: v for k, v in record.items() if k not in ("path",)}
    audit_alone = [e for e in lines(kp(request, backend, "kp-trace", stdin=orjson.dumps(only_audit)).stdout)
                   if e.get("kind") == "event" and e.get("type") != "unaccounted"]
    reviews = [orjson.loads(raw) for raw in (folder / "review.jsonl").read_bytes().splitlines()] if host else []
    assert [r["action"] for r in reviews] == (["quarantine"] if host else [])
    events = [i for i in items if i["kind"] == "event" and i["type"] != "unaccounted"]
    assert len(events) == len(audit_alone) and events == [{**e, "run": name, "run_id": record["id"]}
                                                          for e in audit_alone]
    assert [i for i in items if i["kind"] == "review"] == reviews
    assert all(i.get("run") == name and i.get("run_id") == record["id"] for i in items)
    keys = running_max_keys(items)
    assert keys == sorted(keys)
    if host:  # the quarantine's changes come after the agent's
        assert items.index(reviews[0]) > items.index(events[0])

    # it verifies; then a review and an apply are logged, sealed again, and still verify
    verified = lines(kp(request, backend, "kp-trace", "--verify", name).stdout)
    assert verified[0]["verified"] is True, verified
    assert {log["log"] for log in verified[0]["logs"]} == set(record["evidence"]["logs"])
    ocsf_validates(request, backend, name, len(items) + 1)
    if host:
        review_and_apply(request, backend, name, folder)
    report_renders(request, backend, name, tmp_path)
    tamper(request, backend, name, folder)
    remove(request, backend, name)


def ocsf_validates(request: pytest.FixtureRequest, backend: str, name: str, count: int) -> None:
    """--format ocsf of this real run: one OCSF event per record and timeline item, each valid."""
    from tests.test_ocsf import problems

    converted = kp(request, backend, "kp-trace", "--format", "ocsf", name)
    assert converted.returncode == 0, converted.stderr.decode()
    events = lines(converted.stdout)
    assert len(events) == count
    assert {e["class_uid"] for e in events} >= {1007, 1001}  # process and file system activity
    assert [(n, p) for n, e in enumerate(events) for p in problems(e)] == []


def review_and_apply(request: pytest.FixtureRequest, backend: str, name: str, folder: Path) -> None:
    assert kp(request, backend, "kp-review", "--findings", name).returncode == 0
    applied = kp(request, backend, "kp-run", "--apply", name, "--force")
    assert applied.returncode == 0, applied.stderr.decode()
    reviews = [orjson.loads(raw) for raw in (folder / "review.jsonl").read_bytes().splitlines()]
    assert [r["action"] for r in reviews] == ["quarantine", "findings", "apply"]
    assert lines(kp(request, backend, "kp-trace", "--verify", name).stdout)[0]["verified"] is True


def report_renders(request: pytest.FixtureRequest, backend: str, name: str, tmp_path: Path) -> None:
    """The report of this real run, rendered by a real Chromium: every section there, no planted element."""
    report = kp(request, backend, "kp-trace", "--report", name)
    assert report.returncode == 0, report.stderr.decode()
    page = tmp_path / "report.html"
    page.write_bytes(report.stdout)
    from tests.browser import dom

    rendered = dom(page)
    ids = found_ids(rendered)
    for section in ("facts", "processes", "files", "network", "findings", "timeline", "integrity"):
        assert section in ids, f"section {section} is not on the rendered page"
    assert "made.txt" in rendered and "bash" in rendered
    assert script_elements(rendered) == 0  # the planted file name stayed text


def tamper(request: pytest.FixtureRequest, backend: str, name: str, folder: Path) -> None:
    """One byte of one line of the real audit log changed: --verify fails, and names where."""
    log = folder / "audit.strace"
    data = log.read_bytes()
    at = data.index(b"made.txt")
    log.write_bytes(data[:at] + b"xade.txt" + data[at + 8:])
    broken = kp(request, backend, "kp-trace", "--verify", name)
    assert broken.returncode == 1
    result = lines(broken.stdout)[0]
    assert result["verified"] is False and "audit.strace" in result["problem"]
    assert next(g for g in result["logs"] if g["log"] == "audit.strace")["first_line"] >= 1


def test_a_signed_run_verifies_with_the_public_key_alone(request: pytest.FixtureRequest, backend: str,
                                                          shell_image: str, tmp_path: Path) -> None:
    record = audited_run(request, backend, shell_image, tmp_path, "--sign")
    name, folder = record["name"], Path(record["path"])
    assert record["evidence"]["signed"] is True
    config = config_dir(env_of(request, backend))
    public = tmp_path / "audit.pub"
    public.write_bytes((config / "audit_ed25519.pub").read_bytes())
    good = kp(request, backend, "kp-trace", "--verify", "--key", str(public), name)
    assert good.returncode == 0 and lines(good.stdout)[0]["signed"] is True, good.stderr.decode()
    if backend == "host":  # a discard: the changes go, the decision is logged and sealed (signed) again
        discarded = kp(request, backend, "kp-run", "--discard", name)
        assert discarded.returncode == 0, discarded.stderr.decode()
        assert lines(discarded.stdout)[0]["state"] == "discarded"
        assert not (tmp_path / "proj" / "made.txt").exists() and (tmp_path / "proj" / "old.txt").exists()
        assert list((folder / "upper").iterdir()) == []
        reviews = [orjson.loads(raw) for raw in (folder / "review.jsonl").read_bytes().splitlines()]
        assert [r["action"] for r in reviews] == ["quarantine", "discard"]
        good = kp(request, backend, "kp-trace", "--verify", "--key", str(public), name)
        assert good.returncode == 0 and lines(good.stdout)[0]["signed"] is True, good.stderr.decode()
    # a forger with write access and no private key: the log replaced, re-chained, the index re-sealed
    from kodepipe.core import chain

    index = Path(env_of(request, backend)["KODEPIPE_STATE_DIR"]) / "evidence" / "index.jsonl"
    log = folder / "audit.strace"
    forged = log.read_bytes().replace(b"made.txt", b"xade.txt")
    log.unlink()
    chain.chain_path(log).unlink()
    writer = chain.Chain(log)
    writer.append(forged)
    writer.close()
    chain.seal(index, folder, name, record["id"], record["evidence"]["logs"])
    bad = kp(request, backend, "kp-trace", "--verify", "--key", str(public), name)
    assert bad.returncode == 1 and "not signed" in lines(bad.stdout)[0]["problem"]
    remove(request, backend, name)


def config_dir(env: dict[str, str]) -> Path:
    """kodepipe's config directory for the kp-* commands of ``env`` (KODEPIPE_CONFIG_DIR, or XDG's under
    HOME: the VM backend's environment sets only HOME)."""
    import sys

    code = "from kodepipe.core import paths; print(paths.config_dir())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                          check=True)
    return Path(done.stdout.strip())


class _Ids(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.ids.update(v for k, v in attrs if k == "id" and v)
        self.scripts += tag == "script"


def found_ids(html: str) -> set[str]:
    parser = _Ids()
    parser.feed(html)
    return parser.ids


def script_elements(html: str) -> int:
    parser = _Ids()
    parser.feed(html)
    return parser.scripts
