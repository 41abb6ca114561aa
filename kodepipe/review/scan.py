"""Findings: what a review of a quarantine's changes reports, rule by rule (see ``rules``).

``scan(entries, added, rules, ...)`` takes the changes (``Entry``: path,
kind, type, mode, ...) and the added lines of each changed text file (from
the diff, with their line numbers in the new file) and returns ``Finding``s,
sorted by severity (highest first), then path and line.

A finding never carries a secret.  Every span of a line that a secret rule
or detect-secrets matched is replaced by ``[REDACTED]`` in every excerpt of
that line, whichever rule the excerpt is for; the finding of the secret
itself carries ``fingerprint``: the first 16 hex digits of the SHA-256 of
the secret, so that ``printf %s "$KEY" | sha256sum`` tells whether it is a
key you know.  Excerpts are cut to ``EXCERPT`` characters and escaped for a
terminal.

Speed: a ``lines`` rule is one regular-expression pass over a file's added
text, or, with ``words``, a pass on each line that holds one of them (found
with bytes.find).  detect-secrets' format plugins (about 25 expressions,
slow in Python's engine when run over everything) only see the lines that a
cheap pre-check picks: a run of at least 16 token characters (found in a
translated copy of the text), "private key", or "://".  detect-secrets'
entropy and keyword plugins are left
out: on source code they flag most long identifiers; the ``secret-assignment``
rule covers keyword-style assignments.  This module runs no program.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kodepipe.core.fdtree import display, is_utf8
from kodepipe.core.terminal import escape
from kodepipe.review.rules import Rule, rank

EXCERPT = 160
SHARE_MIN = 5  # deletions below this many are never "mass" by their share alone (a workspace of three files)
REDACTED = "[REDACTED]"
PER_RULE_AND_FILE = 20  # findings of one rule in one file, then one that says how many more
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
APPLIED_TYPES = ("file", "dir", "symlink")


@dataclass(frozen=True)
class Entry:
    """One change, as the scan needs it (``quarantine.Change`` plus what the review read)."""

    path: str
    kind: str  # added, modified, deleted
    type: str  # file, dir, symlink, fifo, socket, chardev, blockdev, other
    mode: int | None = None
    target: str | None = None
    escapes: bool = False
    size: int = 0  # of the new file
    caps: bool = False  # the new file has security.capability


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: str
    path: str | None
    message: str
    line: int | None = None
    excerpt: str | None = None
    fingerprint: str | None = None

    def key(self) -> tuple[int, str, int]:
        return (-rank(self.severity), self.path or "", self.line or 0)

    def as_dict(self) -> dict[str, object]:
        """The record's form (kind "finding" is added by the caller)."""
        out: dict[str, object] = {"severity": self.severity, "rule": self.rule}
        if self.path is not None:
            out["path"] = display(self.path)
            if not is_utf8(self.path):
                import base64
                import os

                out["path_b64"] = base64.b64encode(os.fsencode(self.path)).decode()
        if self.line is not None:
            out["line"] = self.line
        if self.excerpt is not None:
            out["excerpt"] = self.excerpt
        if self.fingerprint is not None:
            out["fingerprint"] = self.fingerprint
        out["message"] = self.message
        return out

    def shown(self) -> str:
        """One line for a terminal, escaped."""
        where = escape(self.path) if self.path is not None else "(the workspace)"
        if self.line is not None:
            where += f":{self.line}"
        tail = f": {self.excerpt}" if self.excerpt else ""
        return f"{self.severity} {self.rule} {where}: {escape(self.message)}{tail}"


def fingerprint(secret: str) -> str:
    return "sha256:" + hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _excerpt(line: str, spans: Sequence[tuple[int, int]], focus: int) -> str:
    """The line with every secret span redacted, cut to EXCERPT characters around ``focus``, escaped."""
    out, last, shift = [], 0, 0
    for start, end in sorted(spans):
        if start < last:
            continue
        out.append(line[last:start])
        out.append(REDACTED)
        if start < focus:
            shift += len(REDACTED) - (end - start)
        last = end
    out.append(line[last:])
    text = "".join(out).strip()
    focus = max(0, focus + shift - (len("".join(out)) - len("".join(out).lstrip())))
    if len(text) > EXCERPT:
        begin = max(0, min(focus - EXCERPT // 4, len(text) - EXCERPT))
        text = ("..." if begin else "") + text[begin:begin + EXCERPT] + ("..." if begin + EXCERPT < len(text) else "")
    return escape(text)


class _Secrets:
    """detect-secrets' format plugins, loaded once, on first use."""

    def __init__(self) -> None:
        self._plugins: list[tuple[str, re.Pattern[str]]] | None = None

    def patterns(self) -> list[tuple[str, re.Pattern[str]]]:
        if self._plugins is None:
            from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
            from detect_secrets.plugins.base import RegexBasedDetector

            found: list[tuple[str, re.Pattern[str]]] = []
            mapping: dict[str, Any] = dict(get_mapping_from_secret_type_to_class())
            for secret_type, cls in sorted(mapping.items()):
                if issubclass(cls, RegexBasedDetector):
                    found.extend((secret_type, pattern) for pattern in cls.denylist)
            self._plugins = found
        return self._plugins

    def find(self, line: str) -> list[tuple[str, int, int]]:
        """(type, start, end) of each secret in ``line``."""
        out = []
        for secret_type, pattern in self.patterns():
            for m in pattern.finditer(line):
                # the whole match, or its first group when that is the secret part (a URL's password)
                start, end = m.span()
                if m.lastindex and m.group(1) and len(m.group(1)) >= 8:
                    start, end = m.span(1)
                if end > start:
                    out.append((secret_type, start, end))
        return out


_SECRETS = _Secrets()


@dataclass(frozen=True)
class Added:
    """The added lines of one file: their numbers in the new file, and their bytes joined by newlines."""

    numbers: Sequence[int]
    data: bytes

    @classmethod
    def of(cls, lines: Sequence[tuple[int, str]]) -> Added:
        return cls([n for n, _ in lines], "\n".join(t for _, t in lines).encode("utf-8", "surrogateescape"))


class _File:
    """The added lines of one file: as bytes, for the pre-checks done with bytes.find at C speed (a
    run of token characters, a rule's words), and as one text, for one regex pass per rule."""

    def __init__(self, added: Added) -> None:
        self.numbers = added.numbers
        self.data = added.data
        self._text: str | None = None
        self._lines: list[str] | None = None
        self.spans: dict[int, list[tuple[int, int]]] = {}  # line index -> secret spans in it

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = self.data.decode("utf-8", "surrogateescape")
        return self._text

    @property
    def lines(self) -> list[str]:
        if self._lines is None:
            self._lines = self.text.split("\n")
        return self._lines

    def indexes(self, offsets: Iterable[int], text: str | bytes) -> list[int]:
        """The line index of each offset (sorted) in ``text``."""
        out, last, index = [], 0, 0
        newline: str | bytes = "\n" if isinstance(text, str) else b"\n"
        for offset in sorted(offsets):
            index += text.count(newline, last, offset)  # type: ignore[arg-type]
            last = offset
            out.append(index)
        return out

    def line_start(self, index: int) -> int:
        """The offset in ``text`` where line ``index`` starts."""
        return sum(len(line) + 1 for line in self.lines[:index])

    def lines_with(self, needles: Iterable[bytes], *, lower: bool = False, tokens: bool = False) -> set[int]:
        """The indexes of the lines that hold one of ``needles`` (in the text lowercased, or in its mask
        of token characters)."""
        hay = self.data.translate(_TOKENS) if tokens else self.data.lower() if lower else self.data
        hits: list[int] = []
        for needle in needles:
            pos = hay.find(needle)
            while pos >= 0:
                hits.append(pos)
                end = hay.find(b"\n", pos)
                if end < 0:
                    break
                pos = hay.find(needle, end + 1)
        return set(self.indexes(hits, self.data))


_TOKENS = bytes(ord("a") if chr(c) in
                "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=_.-" else ord(" ")
                for c in range(256))
_RUN = b"a" * 16


class _Collector:
    def __init__(self) -> None:
        self.found: list[Finding] = []
        self.counts: dict[tuple[str, str | None], int] = {}

    def add(self, finding: Finding) -> None:
        key = (finding.rule, finding.path)
        self.counts[key] = self.counts.get(key, 0) + 1
        if self.counts[key] <= PER_RULE_AND_FILE:
            self.found.append(finding)

    def finish(self, rules: Mapping[str, Rule]) -> list[Finding]:
        for (rid, path), count in self.counts.items():
            if count > PER_RULE_AND_FILE:
                rule = rules[rid]
                self.found.append(Finding(rid, rule.severity, path,
                                          f"{count - PER_RULE_AND_FILE} more findings of this rule in this file"))
        return sorted(self.found, key=Finding.key)


def _line_rules(path: str, file: _File, rules: Sequence[Rule], out: _Collector) -> None:
    pending: list[tuple[Rule, int, int, str | None]] = []  # rule, line index, column, fingerprint

    def secret_at(index: int, start: int, end: int) -> None:
        file.spans.setdefault(index, []).append((start, end))

    for rule in rules:
        if rule.lines is None or not rule.matches_path(path):
            continue
        if rule.words:  # the expression on each line that holds one of the words
            for index in sorted(file.lines_with(rule.words, lower=True)):
                line = file.lines[index]
                for m in rule.lines.finditer(line):
                    start, end = _span(rule, m)
                    if end == start or (rule.secret and rule.ignore is not None
                                        and rule.ignore.fullmatch(line[start:end].strip())):
                        continue
                    if rule.secret:
                        secret_at(index, start, end)
                    pending.append((rule, index, start, fingerprint(line[start:end]) if rule.secret else None))
            continue
        for m in rule.lines.finditer(file.text):
            start, end = _span(rule, m)
            if end == start:
                continue
            value = file.text[start:end]
            if rule.secret and rule.ignore is not None and rule.ignore.fullmatch(value.strip()):
                continue
            index, last = file.indexes([start, max(start, end - 1)], file.text)
            begin = file.line_start(index)
            if rule.secret:
                # a match may run over a line's end (a key block): redact its part in each line
                offset = begin
                for i in range(index, last + 1):
                    a, b = max(start, offset) - offset, min(end, offset + len(file.lines[i])) - offset
                    if b > a:
                        secret_at(i, a, b)
                    offset += len(file.lines[i]) + 1
            pending.append((rule, index, start - begin, fingerprint(value) if rule.secret else None))
    detect = next((r for r in rules if r.check == "detect-secrets"), None)
    if detect is not None:
        picked = file.lines_with([_RUN], tokens=True) | file.lines_with([b"private key"], lower=True) | \
            file.lines_with([b"://"])
        for index in sorted(picked):
            for secret_type, start, end in _SECRETS.find(file.lines[index]):
                secret_at(index, start, end)
                pending.append((Rule(detect.id, detect.severity, f"{detect.about.split(' (')[0]}: {secret_type}"),
                                index, start, fingerprint(file.lines[index][start:end])))
    for rule, index, column, print_ in pending:
        out.add(Finding(rule.id, rule.severity, path, rule.about or rule.id, file.numbers[index],
                        _excerpt(file.lines[index], file.spans.get(index, []), column), print_))


def _span(rule: Rule, m: re.Match[str]) -> tuple[int, int]:
    """The secret's span in a match (its group "secret" when the rule has one), else the match's."""
    if rule.secret and rule.lines is not None and "secret" in rule.lines.groupindex and m.group("secret") is not None:
        return m.span("secret")
    return m.span()


def scan(entries: Iterable[Entry], added: Mapping[str, Added] | Iterable[tuple[str, Added]], rules: Sequence[Rule], *,
         git_paths: Iterable[str] = (), workspace_files: Callable[[], int] | None = None) -> list[Finding]:
    """Every finding of ``rules`` in these changes (see the module's docstring).

    ``added`` maps a changed text file's path to its added lines (``Added``:
    their numbers in the new file, and their bytes), or yields (path, Added)
    pairs: each file is scanned as it comes.  ``git_paths`` are the paths that touch git
    metadata (``gitguard.in_changes``), for the "git" check.
    ``workspace_files()`` counts the workspace's files, for a share of
    deletions; it is called only when there are deletions.
    """
    items = sorted(entries, key=lambda e: e.path)
    by_id = {rule.id: rule for rule in rules}
    checks = {rule.check: rule for rule in rules if rule.check}
    out = _Collector()

    def found(check: str, path: str | None, message: str) -> None:
        rule = checks.get(check)
        if rule is not None:
            out.add(Finding(rule.id, rule.severity, path, message))

    path_rules = [r for r in rules if r.paths and r.lines is None and not r.check]
    total = 0
    for e in items:
        for rule in path_rules:
            if rule.matches_path(e.path):
                out.add(Finding(rule.id, rule.severity, e.path, f"{e.kind} {e.type}: {rule.about or rule.id}"))
        if _CONTROL.search(e.path) or not is_utf8(e.path):
            found("control-characters", e.path, "its name has control characters or bytes that are not UTF-8 "
                                                "(shown escaped)")
        if e.kind == "deleted":
            continue
        if e.type == "symlink" and e.escapes:
            found("symlink-out", e.path, f"a symlink to {escape(e.target or '')}, out of the workspace")
        if e.mode is not None and e.mode & 0o6000:
            found("setid", e.path, f"a {e.type} with mode {e.mode:04o} (setuid/setgid; apply strips the bits)")
        if e.caps:
            found("capability", e.path, "a file with file capabilities (security.capability; not applied)")
        if e.type not in APPLIED_TYPES:
            found("special", e.path, f"a {e.type}: apply leaves it out")
        if e.type == "file":
            total += e.size
            big = checks.get("large-file")
            if big is not None and e.size > big.bytes:
                found("large-file", e.path, f"{e.size} bytes, more than {big.bytes}")
    most = checks.get("large-total")
    if most is not None and total > most.bytes:
        found("large-total", None, f"{total} bytes added or modified in all, more than {most.bytes}")
    for path in git_paths:
        found("git", path, by_id[checks["git"].id].about if "git" in checks else "git metadata")
    mass = checks.get("deletions")
    deleted = [e for e in items if e.kind == "deleted" and e.type != "dir"]
    if mass is not None and deleted:
        many = len(deleted) > mass.count
        files = workspace_files() if (not many and len(deleted) >= SHARE_MIN and workspace_files) else 0
        if many or (files and len(deleted) / files > mass.share):
            share = f" of the workspace's {files} ({len(deleted) / files:.0%})" if files else ""
            found("deletions", None, f"{len(deleted)} files deleted{share}, more than the rule's "
                                     f"{mass.count} files or {mass.share:.0%}")
    line_rules = [r for r in rules if r.lines is not None or r.check == "detect-secrets"]
    if line_rules:
        for path, lines in sorted(added.items()) if isinstance(added, Mapping) else added:
            if lines.numbers:
                _line_rules(path, _File(lines), line_rules, out)
    return out.finish(by_id)


def blocking(findings: Iterable[Finding], fail_on: str, accept: Iterable[str]) -> tuple[list[Finding], list[Finding]]:
    """(findings at or above ``fail_on`` that nothing in ``accept`` covers, findings accepted).

    An accept value covers a finding when it is the finding's rule id, its
    path, or a directory above its path ("dir" or "dir/").
    """
    accepts = [a for a in accept]
    blocked, accepted = [], []
    for f in findings:
        if rank(f.severity) < rank(fail_on):
            continue
        if any(_covers(a, f) for a in accepts):
            accepted.append(f)
        else:
            blocked.append(f)
    return blocked, accepted


def _covers(value: str, finding: Finding) -> bool:
    if value == finding.rule:
        return True
    if finding.path is None:
        return False
    value = value.rstrip("/") if value not in ("", "/") else value
    return finding.path == value or finding.path.startswith(value + "/")
