"""The record contract: parsing, writing, names."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import orjson
import pytest

from kodepipe.core.errors import BadInput, BadName, KpError, NoPermission, NotFound
from kodepipe.core.records import (
    MAX_DEPTH,
    Line,
    PipeClosed,
    TooLong,
    Writer,
    bounded_lines,
    check_name,
    decode_text,
    open_regular,
    parse_line,
    read,
    too_deep,
    with_error,
)


@pytest.mark.parametrize("line, expected", [
    (b'{"kind":"vm","name":"a"}', {"kind": "vm", "name": "a"}),
    (b'  {"kind":"vm","x":[1,{"y":null}]}  \n', {"kind": "vm", "x": [1, {"y": None}]}),
    (b'{"no_kind":true}', {"no_kind": True}),
    ('{"name":"caf\u00e9"}'.encode(), {"name": "caf\u00e9"}),
])
def test_parse_line_accepts_objects(line: bytes, expected: dict[str, object]) -> None:
    assert parse_line(line, 1) == expected


@pytest.mark.parametrize("line, fragment", [
    (b"not json", "line 7: not valid JSON"),
    (b'{"kind":"vm"', "line 7: not valid JSON"),
    (b"[1,2]", "expected a JSON object, got an array"),
    (b'"vm"', "expected a JSON object, got a string"),
    (b"42", "expected a JSON object, got a number"),
    (b"null", "expected a JSON object, got null"),
    (b"true", "expected a JSON object, got a boolean"),
    (b'{"kind":3}', '"kind" must be a string, got a number'),
    (b'{"kind":["vm"]}', '"kind" must be a string, got an array'),
    (b"\xff\xfe{}", "line 7: not valid JSON"),
])
def test_parse_line_rejects_with_line_number(line: bytes, fragment: str) -> None:
    with pytest.raises(BadInput) as info:
        parse_line(line, 7)
    assert fragment in info.value.message
    assert info.value.status == 65


def test_read_skips_blank_lines_and_reports_bad_ones_by_number() -> None:
    stream = io.BytesIO(b'{"a":1}\n\n   \n[]\n{"b":2}\nnope\n{"c":3}')
    bad: list[str] = []
    got = list(read(stream, lambda exc: bad.append(exc.message)))
    assert got == [(1, {"a": 1}), (5, {"b": 2}), (7, {"c": 3})]
    assert [m.split(":")[0] for m in bad] == ["line 4", "line 6"]


def test_writer_writes_compact_lines_and_flushes_each() -> None:
    class Recorder(io.BytesIO):
        flushes = 0

        def flush(self) -> None:
            self.flushes += 1

    out = Recorder()
    write = Writer(out)
    write({"kind": "vm", "name": "a", "n": [1, 2]})
    write({"kind": "image", "name": "b", "s": "\u00e9"})
    assert out.getvalue() == b'{"kind":"vm","name":"a","n":[1,2]}\n{"kind":"image","name":"b","s":"\xc3\xa9"}\n'
    assert out.flushes == 2


def test_writer_turns_broken_pipe_into_pipe_closed() -> None:
    class Closed(io.BytesIO):
        def write(self, data: object) -> int:
            raise BrokenPipeError()

    with pytest.raises(PipeClosed):
        Writer(Closed())({"kind": "vm"})


def test_with_error_keeps_every_key_and_does_not_mutate() -> None:
    record = {"kind": "vm", "name": "a", "custom": {"k": 1}}
    out = with_error(record, "exists", "a already exists")
    assert out == {**record, "error": {"code": "exists", "message": "a already exists"}}
    assert "error" not in record


@pytest.mark.parametrize("name", ["a", "proj", "a1", "1a", "a-b", "x" * 63, "0", "my-vm-2"])
def test_check_name_accepts_hostname_labels(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", [
    "", "../x", "-rf", "a/b", ".", "..", "x" * 64, "A", "Proj", "a_b", "a.b", "a b", "a-",
    "caf\u00e9", "\u0430", "a\n", "a\x00", "~", "$(id)", None, 3, ["a"],
])
def test_check_name_refuses_everything_else(name: object) -> None:
    with pytest.raises(BadName) as info:
        check_name(name)
    assert info.value.status == 65


# -- typed fields ----------------------------------------------------------------------------


@pytest.mark.parametrize("record, call, expected", [
    ({"name": "a"}, lambda ln: ln.name("vm name"), "a"),
    ({"name": "a", "id": "0123456789ab"}, lambda ln: ln.identity("vm name"), ("a", "0123456789ab")),
    ({"name": "a"}, lambda ln: ln.id(), None),
    ({"share": None}, lambda ln: ln.text("share"), None),
    ({}, lambda ln: ln.text("share"), None),
    ({"share": "/w"}, lambda ln: ln.text("share"), "/w"),
    ({"log": "/var/x.log"}, lambda ln: ln.path("log"), "/var/x.log"),
    ({"port": 22}, lambda ln: ln.integer("port", low=1, high=65535), 22),
    ({"ssh": {"port": 22}}, lambda ln: ln.mapping("ssh"), {"port": 22}),
    ({"argv": ["a", "b"]}, lambda ln: ln.strings("argv"), ["a", "b"]),
])
def test_typed_fields_read_what_is_expected(record: dict[str, object], call: Any, expected: object) -> None:
    assert call(Line(3, record)) == expected


@pytest.mark.parametrize("record, call, fragment", [
    ({"name": "a", "id": 5}, lambda ln: ln.id(), '"id" must be a string'),
    ({"name": "a", "id": None}, lambda ln: ln.id(), "got null"),
    ({"name": "a", "id": []}, lambda ln: ln.id(), "got an array"),
    ({"name": "a", "id": {}}, lambda ln: ln.id(), "got an object"),
    ({"name": "a", "id": True}, lambda ln: ln.id(), "got a boolean"),
    ({"name": "a", "id": ""}, lambda ln: ln.id(), '"id" must be a string'),
    ({"name": "a", "id": "x\ny"}, lambda ln: ln.id(), '"id" must be a string'),
    ({"name": "a", "id": "x" * 200}, lambda ln: ln.id(), '"id" must be a string'),
    ({"name": 5}, lambda ln: ln.name("vm name"), "vm name must be a string, not a number"),
    ({"name": "../x"}, lambda ln: ln.name("vm name"), "invalid vm name '../x'"),
    ({}, lambda ln: ln.name("vm name"), 'has no "name"'),
    ({"name": "a", "id": 1}, lambda ln: ln.identity("vm name"), '"id"'),
    ({"share": 7}, lambda ln: ln.text("share"), '"share" must be a string, got a number'),
    ({"log": ""}, lambda ln: ln.path("log"), '"log" must be a file path'),
    ({"log": "a\0b"}, lambda ln: ln.path("log"), '"log" must be a file path'),
    ({"port": "22"}, lambda ln: ln.integer("port"), '"port" must be an integer, got a string'),
    ({"port": True}, lambda ln: ln.integer("port"), "got a boolean"),
    ({"port": 0}, lambda ln: ln.integer("port", low=1, high=65535), "from 1 to 65535, got 0"),
    ({"ssh": [1]}, lambda ln: ln.mapping("ssh"), '"ssh" must be an object, got an array'),
    ({"argv": ["a", 1]}, lambda ln: ln.strings("argv"), '"argv" must be an array of strings'),
    ({"argv": "a"}, lambda ln: ln.strings("argv"), '"argv" must be an array of strings'),
])
def test_a_wrong_type_is_bad_input_naming_line_and_field(record: dict[str, object], call: Any,
                                                          fragment: str) -> None:
    with pytest.raises(BadInput) as info:
        call(Line(3, record))
    assert info.value.message.startswith("line 3: ") and fragment in info.value.message
    assert info.value.status == 65


def test_read_yields_lines_that_unpack_as_number_and_record() -> None:
    (line,) = read(io.BytesIO(b'{"kind":"vm","error":{}}\n'), lambda exc: None)
    number, record = line
    assert (number, record, line.kind, line.failed) == (1, {"kind": "vm", "error": {}}, "vm", True)


# -- depth: what orjson can read and cannot write back ------------------------------------------


def _nested(depth: int) -> bytes:
    """A record whose outermost object is level 1 and that nests ``depth`` levels in all."""
    return b'{"kind":"x","v":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


@pytest.mark.parametrize("depth, ok", [(2, True), (100, True), (MAX_DEPTH, True), (MAX_DEPTH + 1, False),
                                       (300, False), (1023, False), (1024, False), (1025, False),
                                       (5000, False)])
def test_records_nested_deeper_than_can_be_written_back_are_refused(depth: int, ok: bool) -> None:
    line = _nested(depth)
    if ok:
        record = parse_line(line, 1)
        Writer(io.BytesIO())(record)  # it can be written back
        return
    with pytest.raises(BadInput) as info:
        parse_line(line, 4)
    assert info.value.message.startswith("line 4: ")


def test_depth_counts_objects_too_and_brackets_in_strings_cost_only_a_walk() -> None:
    deep_objects = b'{"kind":"x","v":' + b'{"a":' * MAX_DEPTH + b"1" + b"}" * MAX_DEPTH + b"}"
    with pytest.raises(BadInput):
        parse_line(deep_objects, 1)
    many_brackets_in_a_string = orjson.dumps({"kind": "x", "s": "[" * 5000})
    assert parse_line(many_brackets_in_a_string, 1)["s"] == "[" * 5000
    assert not too_deep({"a": [[{}]] * 1000})


def test_the_writer_says_bad_input_instead_of_a_traceback_for_what_it_cannot_write() -> None:
    deep: list[object] = []
    for _ in range(MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(BadInput):
        Writer(io.BytesIO())({"kind": "x", "v": deep})


# -- bounded reading --------------------------------------------------------------------------


def test_bounded_lines_skip_the_rest_of_a_line_over_the_limit() -> None:
    data = b"short\n" + b"x" * 100 + b"\n" + b"y" * 10 + b"\n" + b"z" * 50
    got = list(bounded_lines(io.BytesIO(data), 20))
    assert got[0] == (1, b"short\n")
    assert got[1][0] == 2 and isinstance(got[1][1], TooLong) and got[1][1].head.startswith(b"x")
    assert got[2] == (3, b"y" * 10 + b"\n")
    assert got[3][0] == 4 and isinstance(got[3][1], TooLong)
    # exactly at the limit is fine, with or without its newline
    assert list(bounded_lines(io.BytesIO(b"a" * 20 + b"\n" + b"b" * 20), 20)) == [(1, b"a" * 20 + b"\n"),
                                                                              (2, b"b" * 20)]


def test_read_reports_a_line_over_the_limit_and_goes_on() -> None:
    bad: list[str] = []
    data = b'{"a":1}\n{"b":"' + b"x" * 500 + b'"}\n{"c":3}\n'
    got = list(read(io.BytesIO(data), lambda exc: bad.append(exc.message), limit=100))
    assert got == [(1, {"a": 1}), (3, {"c": 3})]
    assert len(bad) == 1 and bad[0].startswith("line 2: longer than 100 bytes")


@pytest.mark.parametrize("line, fragment", [
    (b"abc\0def\n", "line 9: contains a NUL byte (byte 4)"),
    (b"caf\xe9\n", "line 9: not UTF-8 (byte 4 is 0xe9)"),
    (b"\xff", "not UTF-8 (byte 1"),
])
def test_text_lines_with_nul_or_bad_utf8_are_bad_input(line: bytes, fragment: str) -> None:
    with pytest.raises(BadInput) as info:
        decode_text(line, 9)
    assert fragment in info.value.message


def test_decode_text_keeps_good_text() -> None:
    assert decode_text("caf\u00e9 \\0\n".encode(), 1) == "caf\u00e9 \\0\n"


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    regular = tmp_path / "regular"
    regular.write_bytes(b"ok\n")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link"
    link.symlink_to(regular)
    zero_link = tmp_path / "zero"
    zero_link.symlink_to("/dev/zero")
    return {"regular": str(regular), "fifo": str(fifo), "link": str(link), "zero": str(zero_link),
            "dir": str(tmp_path), "missing": str(tmp_path / "missing"), "under_file": str(regular / "x")}


@pytest.mark.parametrize("which, error, fragment", [
    ("regular", None, None),
    ("link", None, None),  # a symbolic link is followed: what is opened is checked
    ("fifo", BadInput, "is a FIFO, not a regular file"),  # never blocks on a FIFO without a writer
    ("zero", BadInput, "is a character device, not a regular file"),
    ("dir", BadInput, "is a directory, not a regular file"),
    ("missing", NotFound, "there is no such file"),
    ("under_file", BadInput, "Not a directory"),
])
def test_open_regular_opens_only_regular_files(files: dict[str, str], which: str, error: Any,
                                              fragment: str | None) -> None:
    if error is None:
        with open_regular(files[which], "the log") as handle:
            assert handle.read() == b"ok\n"
        return
    with pytest.raises(error) as info:
        open_regular(files[which], "the log")
    assert fragment in info.value.message and "the log" in info.value.message


@pytest.mark.parametrize("path", ["/dev/null", "/dev/zero", "/proc/self/fd/0", "", "a\0b", 5, None])
def test_open_regular_refuses_devices_and_non_paths(path: object) -> None:
    with pytest.raises(KpError):
        open_regular(path, "the log")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_open_regular_says_permission_denied(files: dict[str, str]) -> None:
    os.chmod(files["regular"], 0)
    with pytest.raises(NoPermission):
        open_regular(files["regular"], "the log")
