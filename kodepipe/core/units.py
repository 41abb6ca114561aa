"""Units in options and profiles: durations ("1h30m") and sizes ("512m").  Pure: no I/O."""

from __future__ import annotations

import re

from kodepipe.core.errors import BadInput

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_duration(text: str) -> float:
    """Seconds in '90s', '15m', '2h', '1d', '1w' or a sum such as '1h30m'."""
    compact = text.strip().lower()
    pos, total = 0, 0.0
    for match in _DURATION.finditer(compact):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not compact or pos != len(compact):
        raise BadInput(f"invalid duration {text!r}: use a number and a unit (s, m, h, d, w), e.g. 90s, 2h, 1d, 1h30m")
    return total


def parse_size(text: str) -> int:
    """Bytes in '512m', '2g', '64k' or a plain number."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    value = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        if value and value[-1] in units:
            return int(float(value[:-1]) * units[value[-1]])
        return int(value)
    except ValueError:
        raise BadInput(f"invalid size {text!r}: use a number with k, m or g, e.g. 512m, 2g") from None
