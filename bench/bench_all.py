#!/usr/bin/env python3
"""Every figure of issue 17's performance table in one run: each bench as a subprocess, one markdown table.

    .venv/bin/python bench/bench_all.py [--only NAME ...] [--quick]

Run it as root (sudo): kp-run and its audit, and the proxy's relay rows, need
it.  Each bench below runs as its own process, from the checkout's root,
one after the other (none of them is fair to the others while it runs), and
bench_all reads the JSON lines each one prints on stdout; their stderr
(progress and their own summaries) is passed through, prefixed with the
bench's name.  Then it prints, on stdout, a table (what | kodepipe | raw
tool | ratio | goal | met?) and the exact command line of every bench it
ran, so the README can quote them.

- boot: bench_boot.py, warm and cold clone to SSH-ready against QEMU by hand (boots TCG VMs: minutes);
- pool: bench_pool.py, the warm pool's hand-out against the by-hand resume (minutes);
- run: bench_run.py, kp-run -- true against podman run --rm;
- audit: bench_audit.py, kp-run --audit's default mode against an untraced run;
- proxy: bench_proxy.py, the egress proxy against a direct connection;
- density: bench_density.py --json, the PSS of 5 idle warm clones against one: their guest RAM, and
  the whole QEMU processes.

--quick gives each bench the fewest runs it allows: the figures are then
single samples, good for checking that everything runs, not for quoting.
A bench that fails (or prints nothing this script can read) shows its rows
as failed with the last lines of its stderr, the others still run, and the
exit status is 1.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
STDERR_TAIL = 12  # lines of a failed bench's stderr shown under the table

Output = list[dict[str, object]]


class BenchOutputError(ValueError):
    """A bench's stdout lacks a figure a row needs, or has it with the wrong type."""


@dataclass(frozen=True)
class Bench:
    name: str
    script: str  # relative to the checkout's root
    args: tuple[str, ...] = ()
    quick_args: tuple[str, ...] = ()
    optional: bool = False  # "not run" rather than failed when the script does not exist


@dataclass(frozen=True)
class Figures:
    kodepipe: str
    raw: str
    ratio: str
    judged: float  # the number the goal is about: a ratio, or seconds for the pool's hand-out


@dataclass(frozen=True)
class Row:
    bench: str
    what: str
    goal: str
    meets: Callable[[float], bool] | None  # None: no goal to meet
    figures: Callable[[Output], Figures]


@dataclass(frozen=True)
class Outcome:
    bench: Bench
    argv: list[str]
    seconds: float
    output: Output
    error: str | None  # why the bench failed, None when it exited 0
    stderr_tail: list[str]


# --- reading a bench's output: pure ---------------------------------------------------------------


def json_objects(stdout: str) -> Output:
    """The JSON objects among a bench's stdout lines; anything else (a tool's chatter) is skipped.

    A stdout that is one indented JSON object as a whole counts as that object."""
    with contextlib.suppress(ValueError):
        whole = json.loads(stdout)
        if isinstance(whole, dict):
            return [whole]
    found: Output = []
    for line in stdout.splitlines():
        if not line.lstrip().startswith("{"):
            continue
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            found.append(value)
    return found


def find(output: Output, key: str, value: object) -> dict[str, object]:
    for obj in output:
        if obj.get(key) == value:
            return obj
    raise BenchOutputError(f"no line with {key} = {value!r}")


def find_having(output: Output, key: str) -> dict[str, object]:
    for obj in output:
        if key in obj:
            return obj
    raise BenchOutputError(f"no line with {key!r}")


def _finite(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BenchOutputError(f"{where} is {value!r}, not a number")
    return float(value)


def _at(obj: dict[str, object], path: Sequence[str]) -> object:
    value: object = obj
    for i, key in enumerate(path):
        if not isinstance(value, dict) or key not in value:
            raise BenchOutputError(f"no {'.'.join(path[:i + 1])}")
        value = value[key]
    return value


def number(obj: dict[str, object], *path: str) -> float:
    return _finite(_at(obj, path), ".".join(path))


def median_of(obj: dict[str, object], *path: str) -> float:
    values = _at(obj, path)
    where = ".".join(path)
    if not isinstance(values, list) or not values:
        raise BenchOutputError(f"{where} is not a list of numbers")
    return statistics.median(_finite(v, where) for v in values)


# --- formatting: pure -----------------------------------------------------------------------------


def secs(value: float) -> str:
    return f"{value:.3g} s"


def millis(value: float) -> str:
    return f"{value:.3g} ms"


def times(value: float) -> str:
    return f"{value:.3g}×"


def mib(value: float) -> str:
    return f"{value / (1 << 20):,.0f} MiB"


def cell(text: str) -> str:
    """Text fit for one markdown table cell and a terminal: no control characters, no column breaks."""
    printable = "".join(ch if ch.isprintable() else " " for ch in text)
    return " ".join(printable.split()).replace("|", "\\|")


def shorten(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def printable_line(text: str) -> str:
    return "".join(ch if ch.isprintable() or ch == "\t" else "?" for ch in text)


# --- the rows of issue 17's table, in its order ---------------------------------------------------


def boot_row(name: str) -> Callable[[Output], Figures]:
    def figures(output: Output) -> Figures:
        obj = find(output, "name", name)
        ratio = number(obj, "ratio")
        return Figures(secs(number(obj, "kodepipe_median_s")),
                       f"the same QEMU {'resume' if 'warm' in name else 'command line'} by hand, "
                       f"{secs(number(obj, 'by_hand_median_s'))}", times(ratio), ratio)
    return figures


def pool_handout(output: Output) -> Figures:
    obj = find(output, "name", "warm pool")
    handout = median_of(obj, "handout_s")
    raw = median_of(obj, "by_hand_resume_s")
    return Figures(secs(handout), f"the warm resume by hand, to sshd's banner, {secs(raw)}",
                   times(number(obj, "ratio_handout")), handout)


def pool_first_command(output: Output) -> Figures:
    obj = find(output, "name", "warm pool")
    ratio = number(obj, "ratio_handout_to_first_command")
    return Figures(secs(median_of(obj, "handout_to_first_command_s")),
                   f"same, {secs(median_of(obj, 'by_hand_resume_s'))}", times(ratio), ratio)


def kp_run(output: Output) -> Figures:
    obj = find(output, "bench", "run")
    ratio = number(obj, "ratio")
    return Figures(secs(number(obj, "kp-run_median_s")),
                   f"`podman run --rm`, same options, {secs(number(obj, 'bare_median_s'))}", times(ratio), ratio)


def audit_part(part: str) -> Callable[[Output], Figures]:
    def figures(output: Output) -> Figures:
        obj = find(output, "bench", "audit")
        ratio = number(obj, "slowdown", "default", part)
        shown = times(ratio)
        with contextlib.suppress(BenchOutputError):  # the workload attached with -p in the same run, if it was
            shown += f" (attached: {times(number(obj, 'slowdown', 'default-attached', part))})"
        return Figures(secs(number(obj, "inner_median_s", "default", part)),
                       f"untraced, {secs(number(obj, 'inner_median_s', 'untraced', part))}", shown, ratio)
    return figures


def proxy_throughput(output: Output) -> Figures:
    obj = find(output, "bench", "proxy")
    ratio = number(obj, "throughput_ratio")
    return Figures(f"{number(obj, 'throughput_mib_s', 'connect'):,.0f} MiB/s",
                   f"direct HTTPS, {number(obj, 'throughput_mib_s', 'direct'):,.0f} MiB/s", times(ratio), ratio)


def proxy_latency(kind: str, direct: str, ratio_key: str, label: str) -> Callable[[Output], Figures]:
    def figures(output: Output) -> Figures:
        obj = find(output, "bench", "proxy")
        ratio = number(obj, ratio_key)
        return Figures(millis(number(obj, "latency_ms", kind)),
                       f"{label}, {millis(number(obj, 'latency_ms', direct))}", times(ratio), ratio)
    return figures


def density(five: str, one: str, ratio_key: str) -> Callable[[Output], Figures]:
    def figures(output: Output) -> Figures:
        obj = find_having(output, "five_pss")
        ratio = number(obj, ratio_key)
        return Figures(f"5 clones: {mib(number(obj, five))} PSS", f"one clone: {mib(number(obj, one))} PSS",
                       times(ratio), ratio)
    return figures


BENCHES = (
    Bench("proxy", "bench/bench_proxy.py", quick_args=("--requests", "1")),
    Bench("run", "bench/bench_run.py", quick_args=("--runs", "1")),
    Bench("audit", "bench/bench_audit.py", quick_args=("--runs", "1")),
    Bench("boot", "bench/bench_boot.py", quick_args=("--runs", "1", "--warm-runs", "1")),
    Bench("pool", "bench/bench_pool.py", quick_args=("--runs", "1")),
    Bench("density", "bench/bench_density.py", args=("--json",)),
)


def at_most(limit: float) -> Callable[[float], bool]:
    return lambda value: value <= limit


def below(limit: float) -> Callable[[float], bool]:
    return lambda value: value < limit


def at_least(limit: float) -> Callable[[float], bool]:
    return lambda value: value >= limit


ROWS = (
    Row("boot", "warm clone → SSH-ready (`kp-clone | kp-boot | kp-ip`, no pool)", "≤ 1.5×", at_most(1.5),
        boot_row("launch-to-ssh warm")),
    Row("pool", "a VM from a warm pool (`kp-clone` hands it out: record with SSH endpoint)", "< 100 ms",
        below(0.1), pool_handout),
    Row("pool", "same, to its first command (`kp-ssh NAME -- true`)", "–", None, pool_first_command),
    Row("boot", "cold clone → SSH-ready", "keep (≤ 1×)", at_most(1.0), boot_row("launch-to-ssh cold")),
    Row("run", "`kp-run -- true`", "≤ 1.3×", at_most(1.3), kp_run),
    Row("audit", "`kp-run --audit` (default mode): git status ×20", "≤ 1.5×", at_most(1.5), audit_part("git")),
    Row("audit", "same: Python creating 300 files", "≤ 1.5×", at_most(1.5), audit_part("python")),
    Row("audit", "same: 100 shell pipelines", "≤ 1.5×", at_most(1.5), audit_part("shell")),
    Row("proxy", "egress proxy, CONNECT throughput", "≥ 0.8×", at_least(0.8), proxy_throughput),
    Row("proxy", "egress proxy, request latency (plain HTTP)", "≤ 1.2×", at_most(1.2),
        proxy_latency("http", "direct", "latency_ratio_http", "direct")),
    Row("proxy", "egress proxy, request latency (HTTPS through CONNECT)", "≤ 1.2×", at_most(1.2),
        proxy_latency("connect", "tls_direct", "latency_ratio_connect", "HTTPS direct")),
    Row("density", "host memory (PSS) of 5 idle warm clones of one image: their guest RAM", "≤ 2× one clone",
        at_most(2.0), density("five_guest_pss", "one_guest_pss", "guest_ratio")),
    Row("density", "same: the whole QEMU processes (under TCG, each its own translated code)", "≤ 2× one clone",
        at_most(2.0), density("five_pss", "one_pss", "ratio")),
)


def table_row(row: Row, outcome: Outcome | None) -> tuple[list[str], str | None]:
    """One row's cells, and why it failed (None when it did not)."""
    if outcome is None:
        return [row.what, "not run", "–", "–", row.goal, "–"], None
    if outcome.error is None:
        try:
            fig = row.figures(outcome.output)
        except BenchOutputError as exc:
            problem = f"unexpected output: {exc}"
        else:
            met = "–" if row.meets is None else ("yes" if row.meets(fig.judged) else "no")
            return [row.what, fig.kodepipe, fig.raw, fig.ratio, row.goal, met], None
    else:
        said = [line for line in outcome.stderr_tail if line.strip()]
        problem = outcome.error + (f": {shorten(said[-1])}" if said else "")
    return [row.what, f"failed ({outcome.bench.name}): {problem}", "–", "–", row.goal, "–"], problem


def markdown(rows: Sequence[Row], outcomes: dict[str, Outcome | None]) -> tuple[str, bool]:
    """The table, and whether any row failed."""
    lines = ["| what | kodepipe | raw tool | ratio | goal | met? |", "|---|---|---|---|---|---|"]
    failed = False
    for row in rows:
        cells, problem = table_row(row, outcomes[row.bench])
        failed = failed or problem is not None
        lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
    return "\n".join(lines), failed


def command_line(argv: Sequence[str]) -> str:
    """argv as a shell line, with paths under the checkout relative to it (the commands run from there)."""
    shown = []
    for arg in argv:
        path = Path(arg)
        if path.is_absolute() and path.is_relative_to(ROOT):
            arg = str(path.relative_to(ROOT))
        shown.append(arg)
    return shlex.join(shown)


def report(rows: Sequence[Row], outcomes: dict[str, Outcome | None], own_argv: Sequence[str]) -> tuple[str, bool]:
    table, failed = markdown(rows, outcomes)
    root = ", as root" if os.geteuid() == 0 else ""
    parts = [table, "", f"Measured by `{command_line(own_argv)}` (from the checkout's root{root}), which ran:"]
    for name, outcome in outcomes.items():
        if outcome is None:
            parts.append(f"- {name}: not run ({next(b.script for b in BENCHES if b.name == name)} does not exist yet)")
            continue
        state = "" if outcome.error is None else f", failed: {outcome.error}"
        parts.append(f"- {name}: `{command_line(outcome.argv)}` ({outcome.seconds:.0f} s{state})")
    for outcome in outcomes.values():
        if outcome is not None and outcome.error is not None and outcome.stderr_tail:
            parts += ["", f"Last lines of {outcome.bench.name}'s stderr:", ""]
            parts += ["    " + printable_line(line) for line in outcome.stderr_tail]
    return "\n".join(parts) + "\n", failed


# --- running the benches -------------------------------------------------------------------------


def _relay(stream: IO[bytes], prefix: str, tail: collections.deque[str]) -> None:
    """The bench's stderr to ours as it comes (its progress), with its last lines kept for a failure."""
    for raw in stream:
        line = raw.decode(errors="replace").rstrip("\n")
        tail.append(line)
        print(f"[{prefix}] {printable_line(line)}", file=sys.stderr, flush=True)


def run(bench: Bench, quick: bool) -> Outcome:
    argv = [sys.executable, str(ROOT / bench.script), *bench.args, *(bench.quick_args if quick else ())]
    print(f"bench_all: {command_line(argv)}", file=sys.stderr, flush=True)
    tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
    started = time.monotonic()
    with subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        relay = threading.Thread(target=_relay, args=(proc.stderr, bench.name, tail), daemon=True)
        relay.start()
        lines = []
        for raw in proc.stdout:  # JSON lines are the figures; any other line is passed on like stderr
            line = raw.decode(errors="replace").rstrip("\n")
            lines.append(line)
            if line.strip() and not json_objects(line):
                print(f"[{bench.name}] {printable_line(line)}", file=sys.stderr, flush=True)
        status = proc.wait()
        relay.join()
    seconds = time.monotonic() - started
    error = None if status == 0 else f"exit status {status}"
    output = json_objects("\n".join(lines))
    if error is None and not output:
        error = "no JSON line on its stdout"
    return Outcome(bench, argv, seconds, output, error, list(tail))


def main() -> None:
    names = [b.name for b in BENCHES]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=names, metavar="NAME",
                        help=f"run only this bench (repeatable): {', '.join(names)}")
    parser.add_argument("--quick", action="store_true", help="the fewest runs each bench allows")
    args = parser.parse_args()
    chosen = [b for b in BENCHES if not args.only or b.name in args.only]
    outcomes: dict[str, Outcome | None] = {}
    for bench in chosen:
        if bench.optional and not (ROOT / bench.script).exists():
            outcomes[bench.name] = None
            continue
        outcomes[bench.name] = run(bench, args.quick)
    rows = [row for row in ROWS if row.bench in outcomes]
    text, failed = report(rows, outcomes, [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]])
    sys.stdout.write(text)
    sys.stdout.flush()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
