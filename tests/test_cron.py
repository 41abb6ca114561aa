"""Cron cleanup removes only what is disposable, and kp-rm --dry-run says what the real run
does (issue 9, item 11): the README's pipes against real state, in real processes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest

from kodepipe.inventory import holdings, keep_reason
from tests.cli import invoke
from tests.conftest import BIN, lines, make_image, snapshot

OLD = "2020-01-01T00:00:00Z"


def state() -> Path:
    return Path(os.environ["KODEPIPE_STATE_DIR"])


def pipe(script: str) -> subprocess.CompletedProcess[str]:
    """A shell pipeline of kp-* commands from the checkout, with cron's empty stdin."""
    return subprocess.run(["bash", "-o", "pipefail", "-c", script], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"},
                          timeout=120)


def age(kind: str, name: str, created: str = OLD) -> None:
    meta_file = state() / {"vm": "vms", "image": "images", "container": "containers"}[kind] / name / "meta.json"
    meta = orjson.loads(meta_file.read_bytes())
    meta_file.write_bytes(orjson.dumps({**meta, "created": created}))


def warm_image() -> Path:
    """The golden image "base", a day and more old, with a warm state beside its disk."""
    folder = make_image("base", created=OLD)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "disk.qcow2",
                    str(folder / "warm.qcow2")], check=True)
    (folder / "warm.state").write_bytes(b"the saved machine")
    meta = orjson.loads((folder / "meta.json").read_bytes())
    meta["warm"] = {"id": "cccccccccccc", "created": OLD, "disk": "warm.qcow2", "state": "warm.state",
                    "memory": "1G", "cpus": 1}
    (folder / "meta.json").write_bytes(orjson.dumps(meta))
    return folder


def container(name: str, *, state_: str = "exited", upper: bool = False, meta: bool = True,
              **keys: Any) -> Path:
    """A kept kp-run folder as kp-run leaves it (no Podman container to remove)."""
    folder = state() / "containers" / name
    folder.mkdir(parents=True)
    if upper:
        (folder / "upper").mkdir()
        (folder / "upper" / "main.py").write_text("the agent's work\n")
    if meta:
        record = {"kind": "container", "name": name, "id": f"{name[-1]}" * 12, "created": OLD, "state": state_,
                  "host": "local", **keys}
        (folder / "meta.json").write_bytes(orjson.dumps(record))
    return folder


# -- the rule, pure ------------------------------------------------------------------------------

@pytest.mark.parametrize("record, allowed, kept", [
    ({"kind": "vm", "name": "a", "state": "stopped"}, (), None),
    ({"kind": "vm", "name": "a", "state": "broken"}, (), None),
    ({"kind": "image", "name": "base", "state": "ready"}, (), "image base is not disposable (a golden image); "
                                                              "name it or pass --images"),
    ({"kind": "image", "name": "base", "state": "broken"}, (), "pass --images"),
    ({"kind": "image", "name": "base"}, ("images",), None),
    ({"kind": "image", "name": "base"}, ("quarantines", "evidence"), "pass --images"),
    ({"kind": "container", "name": "r", "state": "exited"}, (), None),
    ({"kind": "container", "name": "r", "state": "exited", "quarantine": {"added": []}}, (), None),
    ({"kind": "container", "name": "r", "state": "quarantined", "quarantine": {}}, (),
     "container r holds an un-applied quarantine; name it or pass --quarantines"),
    ({"kind": "container", "name": "r", "state": "orphaned", "quarantine": {}}, (), "pass --quarantines"),
    ({"kind": "container", "name": "r", "state": "running", "quarantine": {}}, (), "pass --quarantines"),
    ({"kind": "container", "name": "r", "state": "quarantined"}, ("quarantines",), None),
    ({"kind": "container", "name": "r", "state": "exited", "audit_log": "/x/audit.strace"}, (),
     "container r holds audit log; name it or pass --evidence"),
    ({"kind": "container", "name": "r", "state": "exited", "egress_log": "/x/e", "audit_log": "/x/a"}, (),
     "holds audit and egress logs; name it or pass --evidence"),
    ({"kind": "container", "name": "r", "state": "exited", "egress_log": "/x/e"}, ("evidence",), None),
    ({"kind": "container", "name": "r", "state": "quarantined", "egress_log": "/x/e"}, (),
     "holds an un-applied quarantine and egress log; name it or pass --quarantines --evidence"),
    ({"kind": "container", "name": "r", "state": "quarantined", "egress_log": "/x/e"}, ("evidence",),
     "holds an un-applied quarantine; name it or pass --quarantines"),
    ({"kind": "container", "name": "r", "state": "quarantined", "egress_log": "/x/e"},
     ("evidence", "quarantines"), None),
])
def test_what_a_bulk_removal_keeps(record: dict[str, Any], allowed: tuple[str, ...], kept: str | None) -> None:
    why = keep_reason(record, holdings(record), allowed)
    assert (why is None) == (kept is None), why
    if kept is not None:
        assert why is not None and why.endswith(kept), why


def test_a_broken_container_is_judged_by_what_its_folder_holds() -> None:
    folder = container("run-b", upper=True, meta=False)
    (folder / "egress.jsonl").write_text("{}\n")
    (record,) = invoke("kp-ls", "run-b").records
    assert record["state"] == "broken"
    assert set(holdings(record)) == {"quarantines", "evidence"}


# -- the two cron pipes of the issue, for real ---------------------------------------------------

def test_the_readme_cron_recipe_keeps_the_golden_image_and_its_warm_state() -> None:
    folder = warm_image()
    assert invoke("kp-clone", "base", "old", "new").status == 0
    age("vm", "old")
    before = snapshot(folder)
    proc = pipe("kp-ls --older-than 1d | kp-rm")  # the README's line, word for word
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        "kp-rm: kept: image base is not disposable (a golden image); name it or pass --images"]
    out = {r["name"]: r for r in lines(proc.stdout)}
    assert out["old"]["removed"] is True
    assert out["base"]["removed"] is False and "not disposable" in out["base"]["kept"]
    assert snapshot(folder) == before  # the image, its disk and its warm state are all there
    assert sorted(r["name"] for r in lines(pipe("kp-ls").stdout)) == ["base", "new"]


def test_grep_for_a_clone_removes_the_clone_not_its_base() -> None:
    make_image("base")
    assert invoke("kp-clone", "base", "proj", "other").status == 0
    listing = pipe("kp-ls | grep proj").stdout
    assert [r["name"] for r in lines(listing)] == ["base", "proj"]  # the image lists proj among its clones
    proc = pipe("kp-ls | grep proj | kp-rm")
    assert proc.returncode == 0, proc.stderr
    assert "kp-rm: kept: image base is not disposable" in proc.stderr
    assert [(r["name"], r["removed"]) for r in lines(proc.stdout)] == [("base", False), ("proj", True)]
    assert sorted(r["name"] for r in lines(pipe("kp-ls").stdout)) == ["base", "other"]


def test_cron_keeps_quarantines_and_evidence_and_removes_finished_runs() -> None:
    container("run-q", state_="quarantined", upper=True, quarantine={"path": "x", "modified": ["main.py"]})
    container("run-a", audit_log="/somewhere/audit.strace")
    container("run-e", egress_log="/somewhere/egress.jsonl")
    container("run-p")  # --keep, nothing else: disposable
    container("run-b", upper=True, meta=False)  # metadata lost, changes still there
    proc = pipe("kp-ls --older-than 1d | kp-rm")
    assert proc.returncode == 0, proc.stderr
    kept = sorted(line for line in proc.stderr.splitlines())
    assert kept == [
        "kp-rm: kept: container run-a holds audit log; name it or pass --evidence",
        "kp-rm: kept: container run-b holds an un-applied quarantine; name it or pass --quarantines",
        "kp-rm: kept: container run-e holds egress log; name it or pass --evidence",
        "kp-rm: kept: container run-q holds an un-applied quarantine; name it or pass --quarantines",
    ]
    assert sorted(os.listdir(state() / "containers")) == ["run-a", "run-b", "run-e", "run-q"]
    # the flags allow each one
    proc = pipe("kp-ls --kind container | kp-rm --evidence")
    assert sorted(r["name"] for r in lines(proc.stdout) if r["removed"]) == ["run-a", "run-e"]
    proc = pipe("kp-ls --kind container | kp-rm --quarantines")
    assert sorted(r["name"] for r in lines(proc.stdout) if r["removed"]) == ["run-b", "run-q"]
    assert os.listdir(state() / "containers") == []


def test_named_on_the_command_line_everything_goes() -> None:
    warm_image()
    container("run-q", state_="quarantined", upper=True, quarantine={"path": "x"}, audit_log="/a")
    assert invoke("kp-clone", "base", "a").status == 0
    result = invoke("kp-rm", "base")
    assert result.status == 1 and result.records[0]["error"]["code"] == "in_use"  # clones still use it
    result = invoke("kp-rm", "run-q", "a", "base")  # named: the quarantine, the clone, then the image
    assert result.status == 0, result.stderr
    assert [(r["name"], r["removed"]) for r in result.records] == [("run-q", True), ("a", True), ("base", True)]
    assert invoke("kp-ls").records == []


def test_force_still_removes_an_image_its_clones_use_and_only_that() -> None:
    make_image("base")
    assert invoke("kp-clone", "base", "a").status == 0
    image = [r for r in invoke("kp-ls").records if r["kind"] == "image"]
    result = invoke("kp-rm", "--force", input=orjson.dumps(image[0]))  # --force is not --images
    assert result.status == 0 and "kept" in result.records[0]
    result = invoke("kp-rm", "--force", "--images", input=orjson.dumps(image[0]))
    assert result.status == 0 and result.records[0]["removed"] is True
    assert [(r["name"], r["state"]) for r in invoke("kp-ls").records] == [("a", "broken")]


# -- --dry-run says what the real run does -------------------------------------------------------

def outcome(record: dict[str, Any]) -> tuple[str, str]:
    if "error" in record:
        return record["name"], record["error"]["code"]
    if "kept" in record:
        return record["name"], "kept"
    return record["name"], "removed" if record.get("removed") or record.get("dry_run") else "gone"


def setup_state() -> dict[str, bytes]:
    make_image("base")
    container("run-q", state_="quarantined", upper=True, quarantine={"path": "x"})
    assert invoke("kp-clone", "base", "a", "b").status == 0
    return {r["name"]: orjson.dumps(r) for r in invoke("kp-ls").records}


@pytest.mark.parametrize("order, flags", [
    (["base", "a", "b"], ["--images"]),  # the image first: refused, then removed once its clones are
    (["a", "b", "base"], ["--images"]),
    (["base", "a"], ["--images"]),  # b still uses it
    (["base", "a", "b"], []),  # kept
    (["base", "a"], ["--images", "--force"]),
    (["a", "a", "b", "a"], []),  # already gone the second time
    (["run-q", "a"], []),
    (["run-q", "base", "a", "b"], ["--quarantines", "--images"]),
    (["stale-a", "a"], []),
])
def test_dry_run_outcome_is_the_real_outcome(order: list[str], flags: list[str]) -> None:
    listed = setup_state()
    listed["stale-a"] = orjson.dumps({**orjson.loads(listed["a"]), "id": "ffffffffffff"})
    data = b"\n".join(listed[name] for name in order) + b"\n"
    before = snapshot(state())
    dry = invoke("kp-rm", "--dry-run", *flags, input=data)
    assert snapshot(state()) == before
    real = invoke("kp-rm", *flags, input=data)
    assert [outcome(r) for r in dry.records] == [outcome(r) for r in real.records], (dry.stderr, real.stderr)
    assert dry.status == real.status
    assert [line.replace("would remove this", "removed") for line in dry.stderr.splitlines()
            if "kept:" in line or "error:" in line] == \
           [line for line in real.stderr.splitlines() if "kept:" in line or "error:" in line]


def test_dry_run_of_named_image_before_its_clones() -> None:
    setup_state()
    dry = invoke("kp-rm", "--dry-run", "base", "a", "b")
    real = invoke("kp-rm", "base", "a", "b")
    assert [outcome(r) for r in dry.records] == [outcome(r) for r in real.records] == [
        ("a", "removed"), ("b", "removed"), ("base", "removed")]
