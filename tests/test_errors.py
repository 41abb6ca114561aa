"""The failure catalogue (errors.Code) is complete and exact: every error code the source writes is a
member, with the exit status its exception carries, and every member is written somewhere.

The source is walked, not imported piecemeal: a ``code="..."`` keyword (KpError and its subclasses),
a ``code = "..."`` in a class body (a KpError subclass), an ``{"code": ..., "message": ...}`` literal
(an error object written by hand) and ``with_error(record, "code", ...)``.  A comparison with a
code (``exc.code == "..."``) must name a member too.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import kodepipe
from kodepipe.core import errors
from kodepipe.core.errors import Code, KpError

SOURCE = Path(kodepipe.__file__).resolve().parent


def sources() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(SOURCE.rglob("*.py")):
        yield str(path.relative_to(SOURCE.parent)), ast.parse(path.read_text(), str(path))


def _text(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def written_codes(tree: ast.Module) -> Iterator[tuple[str, int, str]]:
    """(code, line, how) for every error code this module writes."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            for keyword in node.keywords:
                if keyword.arg == "code" and (code := _text(keyword.value)) is not None:
                    yield code, node.lineno, "code="
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name == "with_error" and len(node.args) >= 2 and (code := _text(node.args[1])) is not None:
                yield code, node.lineno, "with_error"
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.Assign) and [ast.unparse(t) for t in item.targets] == ["code"] \
                        and (code := _text(item.value)) is not None:
                    yield code, item.lineno, f"class {node.name}"
        elif isinstance(node, ast.Dict):
            keys = [_text(k) for k in node.keys]
            if "code" in keys and "message" in keys:
                code = _text(node.values[keys.index("code")])
                if code is not None:
                    yield code, node.lineno, "an error object"


def compared_codes(tree: ast.Module) -> Iterator[tuple[str, int]]:
    """(code, line) for every ``X.code == "..."`` (or !=, in, not in a literal tuple)."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        if not any(isinstance(side, ast.Attribute) and side.attr == "code" for side in sides):
            continue
        for side in sides:
            values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
            for value in values:
                if (code := _text(value)) is not None:
                    yield code, node.lineno


def every_written_code() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path, tree in sources():
        for code, line, how in written_codes(tree):
            found.setdefault(code, []).append(f"{path}:{line} ({how})")
    return found


def test_the_walk_finds_what_it_looks_for() -> None:
    # the walk itself, on a sample of each form: a walk that found nothing would pass the tests below
    tree = ast.parse('''
raise KpError("m", code="one")
class E(KpError):
    code = "two"
out.emit({**r, "error": {"code": "three", "message": "m"}})
out.emit(with_error(r, "four", "m"))
{"code": 5, "message": "not a code"}
{"code": "exit", "pid": 1}
if exc.code == "five" or exc.code in ("six", "seven"): pass
''')
    assert sorted(c for c, _, _ in written_codes(tree)) == ["four", "one", "three", "two"]
    assert sorted(c for c, _ in compared_codes(tree)) == ["five", "seven", "six"]
    assert len(every_written_code()) >= 60


def test_every_code_the_source_writes_is_in_the_catalogue() -> None:
    unknown = {code: where for code, where in every_written_code().items() if code not in Code.__members__}
    assert unknown == {}, "add these to errors.Code, with their exit status and a one-line meaning"


def test_every_code_in_the_catalogue_is_written_somewhere() -> None:
    unused = sorted(set(Code.__members__) - set(every_written_code()))
    assert unused == [], "remove these from errors.Code (or the code that wrote them was lost)"


def test_every_code_compared_against_is_in_the_catalogue() -> None:
    unknown = [(path, line, code) for path, tree in sources() for code, line in compared_codes(tree)
               if code not in Code.__members__]
    assert unknown == []


def test_each_member_is_named_as_it_is_spelt_and_says_what_it_means() -> None:
    statuses = {status for status, _ in errors.EXIT_STATUSES}
    for member in Code:
        assert member.name == member.value == str(member)
        assert member.status in statuses and member.status != errors.OK, member
        assert member.meaning.strip() and "\n" not in member.meaning, member
        assert len(member.meaning) <= 120, member


def _all_error_classes() -> list[type[KpError]]:
    for info in pkgutil.walk_packages([str(SOURCE)], "kodepipe."):
        if info.name != "kodepipe.__main__":
            importlib.import_module(info.name)
    seen: list[type[KpError]] = []
    todo: list[type[KpError]] = [KpError]
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo.extend(sub for sub in cls.__subclasses__() if sub.__module__.startswith("kodepipe."))
    return seen


def test_each_exception_class_exits_as_the_catalogue_says_its_code_does() -> None:
    classes = _all_error_classes()
    assert len(classes) > 15
    wrong = {f"{cls.__module__}.{cls.__qualname__}": (cls.code, cls.status, Code[cls.code].status)
             for cls in classes if cls.status != Code[cls.code].status}
    assert wrong == {}


@pytest.mark.parametrize("code", list(Code), ids=str)
def test_a_code_given_to_a_kperror_brings_its_exit_status(code: Code) -> None:
    assert KpError("m", code=code.value).status == code.status
    assert KpError("m", code=code.value, status=errors.FAILED).status == errors.FAILED  # unless told otherwise
    assert KpError("m", code=code.value).as_error() == {"code": code.value, "message": "m"}


def test_a_code_outside_the_catalogue_keeps_the_class_status() -> None:
    # (the source has none: test_every_code_the_source_writes_is_in_the_catalogue)
    assert errors.BadInput("m", code="elsewhere").status == errors.BAD_INPUT


def test_an_interruption_is_never_the_ok_status() -> None:
    assert errors.worst({errors.INTERRUPTED}) == errors.INTERRUPTED
    assert errors.worst({errors.FAILED, errors.TERMINATED}) == errors.TERMINATED
