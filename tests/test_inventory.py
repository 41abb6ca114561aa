"""Durations and filters of kp-ls (pure)."""

from __future__ import annotations

import pytest

from kodepipe.core.errors import BadInput
from kodepipe.core.units import parse_duration
from kodepipe.inventory import select


@pytest.mark.parametrize("text, seconds", [
    ("90s", 90), ("15m", 900), ("2h", 7200), ("1d", 86400), ("1w", 604800), ("1h30m", 5400),
    ("1.5h", 5400), ("0s", 0), (" 2H ", 7200), ("1d12h", 129600),
])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10", "h", "1y", "1h 30m", "-1h", "1h30", "abc", "1hh"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(BadInput, match="invalid duration"):
        parse_duration(text)


NOW = 1767225600.0  # 2026-01-01T00:00:00Z
ITEMS = [
    {"kind": "image", "name": "base", "state": "ready", "created": "2025-12-01T00:00:00Z"},
    {"kind": "vm", "name": "proj-a", "state": "stopped", "created": "2025-12-31T23:00:00Z"},
    {"kind": "vm", "name": "proj-b", "state": "broken", "created": "2025-12-30T00:00:00Z"},
    {"kind": "vm", "name": "odd", "state": "broken"},
]


@pytest.mark.parametrize("kwargs, names", [
    ({}, ["base", "proj-a", "proj-b", "odd"]),
    ({"states": ["broken"]}, ["proj-b", "odd"]),
    ({"names": ["proj-*"]}, ["proj-a", "proj-b"]),
    ({"names": ["base", "odd"]}, ["base", "odd"]),
    ({"older_than": 86400.0}, ["base", "proj-b", "odd"]),
    ({"newer_than": 86400.0}, ["proj-a"]),
    ({"older_than": 86400.0, "states": ["broken"], "names": ["p*"]}, ["proj-b"]),
])
def test_select(kwargs: dict[str, object], names: list[str]) -> None:
    assert [r["name"] for r in select(ITEMS, now=NOW, **kwargs)] == names  # type: ignore[arg-type]


def test_every_state_is_documented_and_selectable() -> None:
    import click

    from kodepipe import docgen
    from kodepipe.commands import ls
    from kodepipe.inventory import STATES

    (option,) = [p for p in ls.cli.params if p.name == "states"]
    assert isinstance(option.type, click.Choice)
    assert list(option.type.choices) == list(STATES)
    page = docgen.contract_page()  # its STATES, per kind, with meanings: tests/test_docs.py
    for state in STATES:
        assert f".B {docgen.esc(state)}\n" in page.split(".SH STATES", 1)[1].split(".SH ", 1)[0]
    assert "creating" in STATES and "lock" in STATES["creating"]
