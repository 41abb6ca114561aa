"""One reader of records on stdin: Output.records (commands/cli.py), which names lines "stdin line N".

Walks the source: no module but core/records.py parses a record line itself (parse_line, Line(...)),
and only cli.py reads stdin's records (kp-trace's first look at stdin, to tell strace text from
records, hands the lines on to Output.records).  tests/test_bad_input.py checks each command's
messages against bad lines for real.
"""

from __future__ import annotations

import ast
from pathlib import Path

import kodepipe

SOURCE = Path(kodepipe.__file__).resolve().parent
PARSERS = {"parse_line", "Line", "StdinLine", "read", "lines_of"}


def calls(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            found.add(func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else "")
    return found


def imported_from_records(tree: ast.AST) -> set[str]:
    return {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            and node.module == "kodepipe.core.records" for alias in node.names}


def test_only_the_records_module_parses_record_lines_and_only_cli_reads_them_from_stdin() -> None:
    wrong = {}
    for path in sorted(SOURCE.rglob("*.py")):
        where = str(path.relative_to(SOURCE))
        if where == "core/records.py":
            continue
        tree = ast.parse(path.read_text())
        used = calls(tree) & imported_from_records(tree) & PARSERS
        allowed = {"commands/cli.py": {"read", "lines_of"},  # Output.records
                   "commands/trace.py": {"lines_of"}}.get(where, set())  # the egress log, a file
        if used - allowed:
            wrong[where] = sorted(used - allowed)
        if "stdin.buffer" in path.read_text() and where not in ("commands/cli.py", "commands/trace.py"):
            wrong[where] = ["reads sys.stdin.buffer"]
    assert wrong == {}, "read records from stdin with Output.records (or Output.objects)"


def test_kp_trace_hands_stdins_records_to_output_records() -> None:
    source = (SOURCE / "commands" / "trace.py").read_text()
    body = source.split("def _read_stdin(", 1)[1].split("\ndef ", 1)[0]
    assert "out.records(numbered=" in body and "parse_line" not in body


def test_the_walk_sees_a_hand_written_reader() -> None:
    tree = ast.parse("from kodepipe.core.records import Line, parse_line\nLine(1, parse_line(b'{}', 1))\n")
    assert calls(tree) & imported_from_records(tree) & PARSERS == {"Line", "parse_line"}
