"""The record contract: parsing, writing, names."""

from __future__ import annotations

import io

import pytest

from kodepipe.errors import BadInput, BadName
from kodepipe.records import PipeClosed, Writer, check_name, parse_line, read, with_error


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
