"""Options and checks that several commands share."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
EPILOG = "Exit statuses and the record format: man kodepipe(7)."
MAX_DURATION = 100 * 365 * 86400.0

quiet = click.option("-q", "--quiet", is_flag=True, help="Print no messages except errors.")


def check_names(names: Iterable[str], what: str = "NAME") -> None:
    """Refuse hostile or duplicate names on the command line (exit 2) before any side effect."""
    from kodepipe.core.errors import BadName
    from kodepipe.core.records import check_name

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
    from kodepipe.core.errors import BadInput
    from kodepipe.core.units import parse_duration

    try:
        seconds = parse_duration(value)
    except BadInput as exc:
        raise click.BadParameter(exc.message) from None
    if seconds > MAX_DURATION:  # '9999...9s' is inf as a float, and a timer of it overflows
        raise click.BadParameter(f"invalid duration {value!r}: at most 100 years")
    return seconds


class FiniteRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (nan compares false with every bound, so
    FloatRange lets it through, and a wait of nan seconds never ends)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        import math

        result = super().convert(value, param, ctx)
        if not math.isfinite(result):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return float(result)


def size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """A click callback: '512m', '2g' as a positive number of bytes (0, nan, inf and negatives refused)."""
    if value is None:
        return None
    from kodepipe.core.errors import BadInput
    from kodepipe.core.units import parse_size

    try:
        result = parse_size(value)
    except (BadInput, OverflowError):
        raise click.BadParameter(f"invalid size {value!r}: use a positive number with k, m or g, "
                                 "e.g. 512m, 2g") from None
    if result <= 0:
        raise click.BadParameter(f"invalid size {value!r}: it must be more than 0")
    return result


def regular_file(max_bytes: int) -> Any:
    """A click callback for a file option: only a regular file (following symbolic links) of at most
    ``max_bytes``; a device such as /dev/zero, a FIFO or a directory is a usage error, never read."""

    def check(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        import os
        import stat

        for path in value if isinstance(value, tuple) else (value,):
            if path is None:
                continue
            try:
                info = os.stat(path)
            except OSError as exc:
                raise click.BadParameter(f"{path}: {exc.strerror}") from None
            if not stat.S_ISREG(info.st_mode):
                raise click.BadParameter(f"{path} is not a regular file")
            if info.st_size > max_bytes:
                raise click.BadParameter(f"{path} is larger than {max_bytes >> 10} KiB: is it the right file?")
        return value

    return check
