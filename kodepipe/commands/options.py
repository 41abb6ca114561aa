"""Options and checks that several commands share."""

from __future__ import annotations

from collections.abc import Iterable

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
EPILOG = "Exit statuses and the record format: man kodepipe(7)."

quiet = click.option("-q", "--quiet", is_flag=True, help="Print no messages except errors.")


def check_names(names: Iterable[str], what: str = "NAME") -> None:
    """Refuse hostile or duplicate names on the command line (exit 2) before any side effect."""
    from kodepipe.errors import BadName
    from kodepipe.records import check_name

    seen = set()
    for name in names:
        try:
            check_name(name)
        except BadName as exc:
            raise click.BadParameter(exc.message, param_hint=what) from None
        if name in seen:
            raise click.BadParameter(f"{name!r} is given twice", param_hint=what)
        seen.add(name)


def duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """A click callback: '90s', '2h', '1d', '1h30m' as seconds."""
    if value is None:
        return None
    from kodepipe.errors import BadInput
    from kodepipe.inventory import parse_duration

    try:
        return parse_duration(value)
    except BadInput as exc:
        raise click.BadParameter(exc.message) from None
