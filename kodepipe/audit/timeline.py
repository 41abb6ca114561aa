"""One time-ordered stream out of a run's sources (system calls, egress decisions, review log).

Each source is already in its own order (strace's log, the proxy's log, the review log, each
in the order it was written), and that order is kept: an item sorts by the latest time its
source has shown so far, so an item with no time (a parse error) or a time a little behind
its neighbour's (strace interleaves processes) stays where its source put it.  Ties go to
the earlier source.  Nothing is dropped: the merge yields exactly the items it was given.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Iterator
from typing import Any

Item = dict[str, Any]


def time_of(item: Item) -> float | None:
    ts = item.get("ts")
    if isinstance(ts, (int, float)) and not isinstance(ts, bool) and math.isfinite(ts):
        return float(ts)
    return None


def _keyed(number: int, source: Iterable[Item]) -> Iterator[tuple[float, int, int, Item]]:
    latest = -math.inf
    for seq, item in enumerate(source):
        ts = time_of(item)
        if ts is not None and ts > latest:
            latest = ts
        yield latest, number, seq, item


def merge(sources: Iterable[Iterable[Item]]) -> Iterator[Item]:
    """The items of every source, in time order (see the module's docstring); lazily."""
    keyed = [_keyed(number, source) for number, source in enumerate(sources)]
    for _, _, _, item in heapq.merge(*keyed, key=lambda k: (k[0], k[1], k[2])):
        yield item
