#!/usr/bin/env python3
"""kp-trace --format ocsf: what turning each event into an OCSF event costs, against plain JSON lines.

    .venv/bin/python bench/bench_ocsf.py [--lines 30000] [--runs 5]

Makes a real trace (``strace -f -ttt -T -yy -s 256``, every system call, of a
git and python workload, repeated until it has at least --lines lines) in a
temporary folder, parses it once with kodepipe.audit.strace.Parser, gives each
event the keys a run's timeline adds (container, run, run_id), then, best of
--runs, in the same run:

- json: each event written as a JSON line (orjson.dumps), as kp-trace writes events;
- map: kodepipe.audit.ocsf.event on each event, nothing written;
- ocsf: each event mapped and written as a JSON line, as kp-trace --format ocsf will.

Reports trace lines per second for each, and the ocsf/json time ratio (how many
times slower the OCSF output is than the plain one).  JSON lines on stdout, a
summary on stderr.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kodepipe.audit import ocsf, strace  # noqa: E402

PY = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
TIMELINE = {"container": "bench-1", "run": "bench-1", "run_id": "0123456789ab"}
PYTHON_WORK = ("import os, json\nfor i in range(40):\n    p = f'data/f{i}.json'\n"
               "    with open(p, 'w') as f: json.dump({'i': i}, f)\n    os.rename(p, p + '.done')\n")
GIT = "git -c user.name=b -c user.email=b@example.invalid"


def workload(tmp: Path) -> str:
    """A shell script (ROUNDS to be replaced): git status, log, add and commit in a small repository,
    and Python writing, renaming and the shell removing files."""
    repo = tmp / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    for i in range(50):
        (repo / f"file{i}.txt").write_text(f"line {i}\n" * 20)
    (repo / "data").mkdir()
    (tmp / "work.py").write_text(PYTHON_WORK)
    subprocess.run(f"{GIT} add -A && {GIT} commit -qm init", shell=True, cwd=repo, check=True)  # noqa: S602
    return (f"cd {repo} && for r in $(seq ROUNDS); do {GIT} status --short >/dev/null; "
            f"{GIT} log --oneline -3 >/dev/null; echo $r >> file1.txt; {GIT} add file1.txt; {GIT} commit -qm r$r; "
            f"{PY} -I -S {tmp / 'work.py'}; rm -f data/*; done")


def make_trace(tmp: Path, want: int) -> tuple[Path, int]:
    """A real trace of at least ``want`` lines (and its line count), the workload repeated as needed."""
    log, script, rounds = tmp / "trace.strace", workload(tmp), 2
    while True:
        subprocess.run(["strace", *strace.CAPTURE_FLAGS, "-o", str(log), "--", "sh", "-c",
                        script.replace("ROUNDS", str(rounds))], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with log.open("rb") as f:
            count = sum(1 for _ in f)
        if count >= want:
            return log, count
        rounds = max(rounds + 1, int(rounds * want / max(count, 1) * 1.05) + 1)


def events(log: Path) -> list[dict[str, Any]]:
    parser = strace.Parser()
    out: list[dict[str, Any]] = []
    with log.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            out.extend(parser.feed(line))
    out.extend(parser.finish())
    return [{**ev, **TIMELINE} for ev in out]


def best(runs: int, work: Callable[[], object]) -> float:
    seconds = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        work()
        seconds = min(seconds, time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--lines", type=int, default=30_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kp-bench-ocsf-") as name:
        log, lines = make_trace(Path(name), args.lines)
        evs = events(log)
    dumps, convert = orjson.dumps, ocsf.event
    mapped = [convert(ev) for ev in evs]
    classes = collections.Counter(m["class_name"] for m in mapped if m is not None)

    def json_lines() -> bytes:
        return b"".join([dumps(ev) + b"\n" for ev in evs])

    def map_only() -> None:  # each result dropped at once, as a stream does (no list for the collector)
        for ev in evs:
            convert(ev)

    def ocsf_lines() -> bytes:
        return b"".join([dumps(convert(ev)) + b"\n" for ev in evs])

    out_json, out_ocsf = json_lines(), ocsf_lines()
    json_s, map_s, ocsf_s = best(args.runs, json_lines), best(args.runs, map_only), best(args.runs, ocsf_lines)
    row = {"bench": "ocsf", "lines": lines, "events": len(evs), "json_lines_per_s": round(lines / json_s),
           "map_lines_per_s": round(lines / map_s), "ocsf_lines_per_s": round(lines / ocsf_s),
           "ocsf_events_per_s": round(len(evs) / ocsf_s), "ocsf_over_json": round(ocsf_s / json_s, 2),
           "json_bytes": len(out_json), "ocsf_bytes": len(out_ocsf), "classes": dict(classes.most_common())}
    print(orjson.dumps(row).decode(), flush=True)
    print(f"ocsf: {lines:,} trace lines, {len(evs):,} events; JSON lines {row['json_lines_per_s']:,} lines/s, "
          f"OCSF mapping alone {row['map_lines_per_s']:,} lines/s, OCSF lines {row['ocsf_lines_per_s']:,} lines/s "
          f"({row['ocsf_events_per_s']:,} events/s): {row['ocsf_over_json']}x the time of plain JSON lines, "
          f"{len(out_ocsf) / len(out_json):.1f}x the bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
