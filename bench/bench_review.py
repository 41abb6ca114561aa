#!/usr/bin/env python3
"""kp-review's cost on a big quarantine: the snapshot, the scan and the diff, against git itself.

    .venv/bin/python bench/bench_review.py [--files 10000] [--megabytes 100] [--runs 3]

Makes a workspace of --files text files of about --megabytes in all, and a
quarantine's upper dir (a plain folder: the overlay's encoding of added and
modified files) in which every file is changed: a third rewritten in places,
a third replaced, a third new.  Then, best of --runs, in the same run:

- review: what kp-review does before it shows anything, in parts: reading
  the changes (quarantine.changes), the snapshot (every byte streamed into
  git fast-import), the added lines (git's diff of the snapshot) and the
  scan of the findings rules;
- diff: kp-review's diff of the snapshot written to /dev/null;
- raw: ``git diff --no-index`` of the two folders to /dev/null, the raw tool
  that shows the same diff (it reads the files itself, with no snapshot and
  no scan).

Reports seconds, seconds per 1,000 files and the ratio of review + diff to
the raw diff.  JSON lines on stdout, a summary on stderr.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kodepipe.container import quarantine, review  # noqa: E402
from kodepipe.review import gitstore, rules  # noqa: E402

WORDS = ("def", "return", "value", "self", "import", "class", "for", "in", "if", "else", "print", "result",
         "config", "data", "items", "name", "path", "open", "with", "as", "None", "True", "list", "dict")


def text(rng: random.Random, size: int) -> str:
    lines, total = [], 0
    while total < size:
        line = "    " * rng.randrange(3) + " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 12)))
        lines.append(line)
        total += len(line) + 1
    return "\n".join(lines) + "\n"


def make(tmp: Path, files: int, megabytes: int) -> tuple[Path, Path]:
    rng = random.Random(7)  # noqa: S311 - reproducible filler text, not a secret
    lower, upper = tmp / "lower", tmp / "upper"
    size = megabytes * 1_000_000 // files
    for i in range(files):
        sub = f"pkg{i % 100:02d}"
        rel = f"{sub}/mod{i}.py"
        kind = i % 3
        if kind != 2:  # an existing file: rewritten in places, or replaced
            body = text(rng, size)
            (lower / sub).mkdir(parents=True, exist_ok=True)
            (lower / rel).write_text(body)
            if kind == 0:
                lines = body.split("\n")
                for j in range(0, len(lines), 25):
                    lines[j] = lines[j] + " # changed"
                new = "\n".join(lines)
            else:
                new = text(rng, size)
        else:
            new = text(rng, size)
        (upper / sub).mkdir(parents=True, exist_ok=True)
        (upper / rel).write_text(new)
    return lower, upper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--megabytes", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    loaded = rules.load()
    with tempfile.TemporaryDirectory(prefix="kp-bench-review-") as name:
        tmp = Path(name)
        lower, upper = make(tmp, args.files, args.megabytes)
        folder = tmp / "run"
        folder.mkdir()
        best: dict[str, float] = {}
        findings = 0
        for _ in range(args.runs):
            parts: dict[str, float] = {}
            started = time.perf_counter()
            changes = quarantine.changes(upper, lower)
            parts["changes"] = time.perf_counter() - started
            started = time.perf_counter()
            snap = review.snapshot(folder, upper, lower, changes, loaded)
            parts["snapshot+scan"] = time.perf_counter() - started
            findings = len(snap.findings)

            started = time.perf_counter()
            gitstore.diff_process(snap.git_dir, snap.base, snap.head, stdout=subprocess.DEVNULL).wait()
            parts["diff"] = time.perf_counter() - started
            env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null"}
            started = time.perf_counter()
            subprocess.run(["git", "diff", "--no-index", "--no-renames", str(lower), str(upper)],
                           stdout=subprocess.DEVNULL, env=env, check=False)
            parts["raw git diff --no-index"] = time.perf_counter() - started
            for key, value in parts.items():
                best[key] = min(best.get(key, value), value)
            shutil.rmtree(folder / review.GIT_DIR)
        ours = best["changes"] + best["snapshot+scan"] + best["diff"]
        per_1000 = ours / (len(changes) / 1000)
        out = {"bench": "review", "files": len(changes), "megabytes": args.megabytes, "findings": findings,
               **{k: round(v, 3) for k, v in best.items()}, "review_and_diff": round(ours, 3),
               "seconds_per_1000_files": round(per_1000, 3),
               "ratio_to_raw_diff": round(ours / best["raw git diff --no-index"], 2)}
        sys.stdout.write(orjson.dumps(out).decode() + "\n")
        print(f"{len(changes)} changes, {args.megabytes} MB: review + diff {ours:.2f} s "
              f"({per_1000:.3f} s per 1,000 files; changes {best['changes']:.2f}, snapshot and scan "
              f"{best['snapshot+scan']:.2f}, diff {best['diff']:.2f}); git diff --no-index "
              f"{best['raw git diff --no-index']:.2f} s; ratio {out['ratio_to_raw_diff']}×; "
              f"{findings} findings", file=sys.stderr)


if __name__ == "__main__":
    main()
