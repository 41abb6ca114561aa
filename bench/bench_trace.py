#!/usr/bin/env python3
"""kp-trace: parser throughput on a large real trace, and what each capture mode costs.

    .venv/bin/python bench/bench_trace.py [--lines 200000] [--runs 3]

Makes a real trace (strace in full mode over a loop of git and python
workloads) of at least --lines lines in a temporary folder, then measures
the parser in lines per second on one core (parse only, and parse plus JSON
output), best of --runs.  Then runs three workloads untraced and under each
capture mode, interleaved, and reports the median traced/untraced ratio.
Writes JSON lines on stdout and a summary on stderr.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kodepipe.audit import strace  # noqa: E402

PY = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
WRITE_FILES = ("import os\nfor i in range(300):\n"
               "    open(f'f{i}', 'w').write('x' * 100)\n    os.rename(f'f{i}', f'g{i}')")


def workloads(tmp: Path) -> dict[str, list[str]]:
    repo = tmp / "repo"
    if not repo.exists():
        subprocess.run(["git", "init", "-q", str(repo)], check=True)
        for i in range(200):
            (repo / f"file{i}.txt").write_text(f"line {i}\n" * 50)
        subprocess.run(["git", "-C", str(repo), "add", "."], check=True)
        subprocess.run(["git", "-C", str(repo), "-c", "user.name=b", "-c", "user.email=b@example.invalid",
                        "commit", "-qm", "init"], check=True)
    return {
        "git-status-x20": ["sh", "-c", f"for i in $(seq 20); do git -C {repo} status --short >/dev/null; done"],
        "python-300-files": [PY, "-I", "-S", "-c", WRITE_FILES],
        "shell-pipes-x100": ["sh", "-c", "for i in $(seq 100); do echo hello | tr a-z A-Z | wc -c >/dev/null; done"],
    }


def timed(argv: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(argv, cwd=cwd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def make_trace(tmp: Path, want: int) -> Path:
    log = tmp / "big.strace"
    work = workloads(tmp)
    script = " ; ".join(" ".join(f"'{a}'" for a in argv) for argv in work.values())
    rounds = 1
    while True:
        subprocess.run(["strace", *strace.CAPTURE_FLAGS, "-o", str(log), "sh", "-c",
                        f"for r in $(seq {rounds}); do {script}; done"], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with log.open("rb") as f:
            count = sum(1 for _ in f)
        if count >= want:
            return log
        rounds = max(rounds + 1, int(rounds * want / max(count, 1) * 1.1) + 1)


def throughput(log: Path, runs: int) -> dict[str, float]:
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    best_parse = best_json = float("inf")
    errors = 0
    for _ in range(runs):
        started = time.perf_counter()
        parser = strace.Parser()
        for line in lines:
            parser.feed(line)
        parser.finish()
        best_parse = min(best_parse, time.perf_counter() - started)
        started = time.perf_counter()
        parser = strace.Parser()
        dumps = orjson.dumps
        with open(os.devnull, "wb") as sink:
            for line in lines:
                for ev in parser.feed(line):
                    sink.write(dumps(ev) + b"\n")
                    errors += ev["type"] == "parse_error"
        best_json = min(best_json, time.perf_counter() - started)
    return {"lines": len(lines), "parse_lines_per_s": round(len(lines) / best_parse),
            "parse_and_json_lines_per_s": round(len(lines) / best_json), "parse_errors": errors // runs}


def slowdown(tmp: Path, runs: int) -> list[dict[str, object]]:
    results = []
    for name, argv in workloads(tmp).items():
        times: dict[str, list[float]] = {"untraced": [], **{m: [] for m in strace.MODES}}
        for _ in range(runs):
            for mode in times:
                cwd = tmp / "run"
                cwd.mkdir(exist_ok=True)
                if mode == "untraced":
                    times[mode].append(timed(argv, cwd))
                else:
                    cmd = ["strace", *strace.CAPTURE_FLAGS, *strace.MODES[mode], "-o", str(tmp / "mode.log"), *argv]
                    times[mode].append(timed(cmd, cwd))
        base = statistics.median(times["untraced"])
        results.append({"workload": name, "untraced_s": round(base, 3),
                        **{f"{m}_ratio": round(statistics.median(times[m]) / base, 2) for m in strace.MODES}})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kp-bench-trace-") as name:
        tmp = Path(name)
        log = make_trace(tmp, args.lines)
        parsed = throughput(log, args.runs)
        print(orjson.dumps({"bench": "parser", **parsed}).decode(), flush=True)
        print(f"parser: {parsed['lines']:,} lines, {parsed['parse_lines_per_s']:,} lines/s parse only, "
              f"{parsed['parse_and_json_lines_per_s']:,} lines/s with JSON output, "
              f"{parsed['parse_errors']} parse errors", file=sys.stderr)
        for row in slowdown(tmp, args.runs):
            print(orjson.dumps({"bench": "capture", **row}).decode(), flush=True)
            print(f"{row['workload']}: untraced {row['untraced_s']} s; " + ", ".join(
                f"{m} x{row[f'{m}_ratio']}" for m in strace.MODES), file=sys.stderr)


if __name__ == "__main__":
    main()
