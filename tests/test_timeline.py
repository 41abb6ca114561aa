"""The merge of a run's sources into one timeline (kodepipe.audit.timeline): in time order, each source's
own order kept, and nothing lost."""

from __future__ import annotations

import math
import random

from hypothesis import given
from hypothesis import strategies as st

from kodepipe.audit import timeline

stamps = st.one_of(st.none(), st.floats(min_value=0, max_value=2e9), st.just(math.nan), st.just("soon"),
                   st.booleans())


@given(st.lists(st.lists(stamps, max_size=30), max_size=5))
def test_the_merge_keeps_every_item_and_each_sources_order(sources: list[list[object]]) -> None:
    items = [[{"src": s, "seq": n, "ts": ts} for n, ts in enumerate(source)] for s, source in enumerate(sources)]
    merged = list(timeline.merge(items))
    assert sorted((i["src"], i["seq"]) for i in merged) == [(i["src"], i["seq"]) for src in items for i in src]
    for s in range(len(items)):  # each source's order is kept
        assert [i["seq"] for i in merged if i["src"] == s] == list(range(len(items[s])))
    # and the items that carry a time come in time order, against every source's latest time so far
    latest: dict[int, float] = {}
    keys = []
    for item in merged:
        ts = timeline.time_of(item)
        if ts is not None:
            latest[item["src"]] = max(latest.get(item["src"], -math.inf), ts)
        keys.append(latest.get(item["src"], -math.inf))
    assert keys == sorted(keys)


def test_interleaved_sources_come_out_in_time_order() -> None:
    rng = random.Random(7)  # noqa: S311 - test data
    times = sorted(rng.uniform(0, 100) for _ in range(300))
    a = [{"kind": "event", "ts": t} for t in times[::3]]
    b = [{"kind": "egress", "ts": t} for t in times[1::3]]
    c = [{"kind": "review", "ts": t} for t in times[2::3]]
    merged = list(timeline.merge([a, b, c]))
    assert [i["ts"] for i in merged] == times
    assert timeline.time_of({"ts": True}) is None and timeline.time_of({"ts": math.inf}) is None
