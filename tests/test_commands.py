"""kp-clone, kp-ls and kp-rm through click's runner: records on stdout,
messages on stderr, documented exit statuses, and no change on bad input."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from tests.cli import invoke
from tests.conftest import make_image, snapshot


def state() -> Path:
    return Path(os.environ["KODEPIPE_STATE_DIR"])


def test_clone_writes_one_vm_record_per_name_and_a_real_overlay() -> None:
    make_image("base", size="20G")
    result = invoke("kp-clone", "base", "a", "b")
    assert result.status == 0, result.stderr
    assert result.stderr == ""
    records = result.records
    assert [(r["kind"], r["name"], r["state"], r["base"]) for r in records] == [
        ("vm", "a", "stopped", "base"), ("vm", "b", "stopped", "base")]
    assert records[0]["id"] != records[1]["id"]
    disk = Path(str(records[0]["disk"]))
    assert disk.stat().st_size < 1024 * 1024  # an overlay, not a copy of 20 GiB
    # the backing file is relative, so the state directory can move
    header = disk.read_bytes()[:4096]
    assert b"../../images/base/disk.qcow2" in header


def test_clone_refuses_existing_name_without_touching_it() -> None:
    make_image("base")
    first = invoke("kp-clone", "base", "a").records[0]
    before = snapshot(state())
    result = invoke("kp-clone", "base", "a", "b")
    assert result.status == 1
    assert "a already exists" in result.stderr
    failed, made = result.records
    assert failed["error"]["code"] == "exists" and "id" not in failed
    assert made["name"] == "b" and "error" not in made
    assert snapshot(state())["vms/a/meta.json"] == before["vms/a/meta.json"]
    assert invoke("kp-ls", "a").records[0]["id"] == first["id"]


@pytest.mark.parametrize("base, code, message", [
    ("nope", "base_missing", "there is no image named nope"),
    ("vm1", "base_missing", "vm1 is a vm, not an image"),
])
def test_clone_of_a_missing_base_fails_and_makes_nothing(base: str, code: str, message: str) -> None:
    make_image("base")
    invoke("kp-clone", "base", "vm1")
    before = snapshot(state())
    result = invoke("kp-clone", base, "x")
    assert result.status == 1
    assert result.records[0]["error"]["code"] == code
    assert message in result.records[0]["error"]["message"]
    assert snapshot(state()) == before


def test_clone_of_an_image_still_building_or_broken_is_refused() -> None:
    make_image("base", state="building")  # builder gone: broken
    result = invoke("kp-clone", "base", "x")
    assert result.status == 1
    assert result.records[0]["error"]["code"] == "base_not_ready"
    assert "build was interrupted" in result.records[0]["error"]["message"]


def test_clone_from_image_records_on_stdin_passes_others_through() -> None:
    make_image("base")
    records = [{"kind": "event", "n": 1}, {"kind": "image", "name": "base", "id": "0123456789ab", "extra": 1}]
    result = invoke("kp-clone", "-", "p", input=b"\n".join(orjson.dumps(r) for r in records))
    assert result.status == 0, result.stderr
    out = result.records
    assert out[0] == records[0] and out[1] == records[1]
    assert out[2]["name"] == "p" and out[2]["base"] == "base"


def test_clone_from_a_stale_image_record_is_refused() -> None:
    make_image("base")
    result = invoke("kp-clone", "-", "p", input='{"kind":"image","name":"base","id":"ffffffffffff"}')
    assert result.status == 1
    assert result.records[1]["error"]["code"] == "stale_record"
    assert not (state() / "vms" / "p").exists()


HOSTILE = ["../x", "-rf", "", "x" * 64, "caf\u00e9", "A", "a/b", "a b", "$(id)"]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_on_the_command_line_are_usage_errors(name: str) -> None:
    make_image("base")
    before = snapshot(state())
    for args in (["base", "ok", name], [name, "ok"]):
        result = invoke("kp-clone", *args)
        assert result.status == 2, (args, result.stderr)
        assert result.stdout == b""
    assert invoke("kp-rm", "ok", name).status == 2
    assert snapshot(state()) == before


@pytest.mark.parametrize("line", [
    b"this is not json", b"[1,2,3]", b'"vm"', b"42", b'{"kind": 1, "name": "base"}', b"\xff\xfe",
])
def test_bad_lines_exit_65_name_the_line_and_change_nothing(line: bytes) -> None:
    make_image("base")
    invoke("kp-clone", "base", "keep")
    before = snapshot(state())
    for prog, args in (("kp-rm", ()), ("kp-clone", ("-", "new")), ("kp-ls", ())):
        result = invoke(prog, *args, input=b"\n" + line + b"\n")
        assert result.status == 65, (prog, result.stderr)
        assert "line 2" in result.stderr
        assert snapshot(state()) == before


@pytest.mark.parametrize("record", [
    {"kind": "vm", "name": "../keep"}, {"kind": "vm", "name": "-rf"}, {"kind": "vm", "name": ""},
    {"kind": "vm", "name": 7}, {"kind": "vm", "name": None}, {"kind": "vm", "name": ["keep"]},
    {"kind": "vm", "name": "k" * 64}, {"kind": "vm", "name": "k\u00e9ep"}, {"kind": "vm"},
    {"kind": "image", "name": "../../etc"},
])
def test_records_with_invalid_names_exit_65_and_change_nothing(record: dict[str, object]) -> None:
    make_image("base")
    invoke("kp-clone", "base", "keep")
    before = snapshot(state())
    result = invoke("kp-rm", input=orjson.dumps(record))
    assert result.status == 65, result.stderr
    assert result.records == [{**record, "error": result.records[0]["error"]}]
    assert result.records[0]["error"]["code"] == "bad_name"
    assert snapshot(state()) == before


def test_good_records_are_still_handled_after_a_bad_line() -> None:
    make_image("base")
    invoke("kp-clone", "base", "a", "b")
    result = invoke("kp-rm", input='{"kind":"vm","name":"a"}\nnot json\n{"kind":"vm","name":"b"}\n')
    assert result.status == 65
    assert [r["name"] for r in result.records] == ["a", "b"]
    assert not (state() / "vms" / "a").exists() and not (state() / "vms" / "b").exists()


def test_ls_lists_records_with_live_state_and_filters() -> None:
    make_image("base", created="2020-01-01T00:00:00Z")
    invoke("kp-clone", "base", "vm2", "vm10")
    records = invoke("kp-ls").records
    assert [(r["kind"], r["name"]) for r in records] == [("image", "base"), ("vm", "vm2"), ("vm", "vm10")]
    assert records[0]["clones"] == ["vm2", "vm10"]
    assert all(isinstance(r["disk_bytes"], int) for r in records)
    assert [r["name"] for r in invoke("kp-ls", "--kind", "vm").records] == ["vm2", "vm10"]
    assert [r["name"] for r in invoke("kp-ls", "--older-than", "1d").records] == ["base"]
    assert [r["name"] for r in invoke("kp-ls", "--newer-than", "1h", "vm1*").records] == ["vm10"]
    assert invoke("kp-ls", "--older-than", "soon").status == 2


def test_ls_reports_a_clone_whose_base_was_removed_as_broken() -> None:
    make_image("base")
    invoke("kp-clone", "base", "a")
    assert invoke("kp-rm", "--force", "base").status == 0
    (record,) = invoke("kp-ls").records
    assert record["state"] == "broken" and "base image base is gone" in record["problem"]
    assert invoke("kp-ls", "--state", "broken").records == [record]
    assert invoke("kp-rm", input=orjson.dumps(record)).records[0]["removed"] is True


def test_ls_shows_the_current_state_of_piped_records() -> None:
    make_image("base")
    made = invoke("kp-clone", "base", "a", "b").stdout
    invoke("kp-rm", "b")
    result = invoke("kp-ls", input=made + b'{"kind":"note","text":"kept"}\n')
    assert [(r.get("name"), r.get("state")) for r in result.records] == [
        ("a", "stopped"), ("b", "gone"), (None, None)]
    assert result.records[2] == {"kind": "note", "text": "kept"}


def test_ls_table_for_people() -> None:
    make_image("base")
    invoke("kp-clone", "base", "a")
    out = invoke("kp-ls", "--table").stdout.decode()
    header, image, vm = out.splitlines()
    assert header.split() == ["KIND", "NAME", "STATE", "AGE", "DISK", "DETAIL"]
    assert image.split()[:3] == ["image", "base", "ready"] and "1 clone(s)" in image
    assert vm.split()[:3] == ["vm", "a", "stopped"] and vm.endswith("base base")


def test_rm_is_idempotent_and_says_so() -> None:
    make_image("base")
    invoke("kp-clone", "base", "a")
    first = invoke("kp-rm", "a")
    assert first.status == 0 and first.records[0]["removed"] is True
    again = invoke("kp-rm", "a")
    assert again.status == 0 and again.records == [] and "already removed" in again.stderr
    piped = invoke("kp-rm", input=first.stdout)
    assert piped.status == 0 and piped.records[0]["removed"] is False


def test_rm_refuses_a_base_with_clones_unless_forced() -> None:
    make_image("base")
    invoke("kp-clone", "base", "a")
    result = invoke("kp-rm", "base")
    assert result.status == 1
    assert result.records[0]["error"]["code"] == "in_use" and "a" in result.records[0]["error"]["message"]
    assert (state() / "images" / "base").is_dir()
    assert invoke("kp-rm", "--force", "base").status == 0
    assert not (state() / "images" / "base").exists()
    assert (state() / "vms" / "a").is_dir()  # never delete what the user did not name


def test_ls_piped_to_rm_removes_everything_whatever_the_order() -> None:
    make_image("base")
    invoke("kp-clone", "base", "a", "b")
    listed = invoke("kp-ls").stdout  # the image comes first
    result = invoke("kp-rm", "--images", input=listed)  # a pipe removes an image only with --images
    assert result.status == 0, result.stderr
    assert sorted(r["name"] for r in result.records) == ["a", "b", "base"]
    assert invoke("kp-ls").records == []


def test_rm_leaves_a_re_created_name_alone() -> None:
    make_image("base")
    old = invoke("kp-clone", "base", "a").stdout
    invoke("kp-rm", "a")
    new = invoke("kp-clone", "base", "a").records[0]
    result = invoke("kp-rm", input=old)
    assert result.status == 1 and result.records[0]["error"]["code"] == "stale_record"
    assert invoke("kp-ls", "a").records[0]["id"] == new["id"]


def test_rm_passes_through_error_records_that_name_nothing_made() -> None:
    make_image("base")
    invoke("kp-clone", "base", "a")
    failed = invoke("kp-clone", "base", "a").stdout  # "exists": names the existing a, without an id
    result = invoke("kp-rm", input=failed)
    assert result.status == 0
    assert result.records[0]["error"]["code"] == "exists"
    assert (state() / "vms" / "a").is_dir()


def test_rm_dry_run_removes_nothing() -> None:
    make_image("base")
    invoke("kp-clone", "base", "a")
    before = snapshot(state())
    result = invoke("kp-rm", "--dry-run", "a")
    assert result.records[0]["dry_run"] is True and result.records[0]["removed"] is False
    assert snapshot(state()) == before


def test_rm_cleans_what_a_killed_clone_left() -> None:
    make_image("base")
    folder = state() / "vms" / "half"
    folder.mkdir(parents=True)  # a crash between mkdir and the first metadata write
    (record,) = invoke("kp-ls", "half").records
    assert record["state"] == "broken" and "interrupted" in record["problem"]
    assert invoke("kp-rm", "half").records[0]["removed"] is True
    assert not folder.exists()


def test_rm_without_names_on_a_terminal_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kodepipe.commands.cli.stdin_is_piped", lambda: False)
    result = invoke("kp-rm")
    assert result.status == 2 and "give NAMEs" in result.stderr
