"""Review rules as data: what kp-review and kp-run --apply look for in a quarantine's changes.

The built-in rules are kodepipe/review/rules.json (kodepipe(7) lists them).
A user adds or adjusts rules in ``$KODEPIPE_CONFIG_DIR/review/*.json`` (read
in name order), each file an object ``{"rules": [RULE, ...]}``:

- a rule whose ``id`` is a built-in one is laid over it key by key, so
  ``{"id": "mass-deletion", "count": 20}`` only raises a threshold and
  ``{"id": "build-script", "severity": "off"}`` turns a rule off;
- a new ``id`` adds a rule.

A rule has an ``id`` (letters, digits, ``-``), a ``severity`` (``info``,
``low``, ``medium``, ``high``, ``critical`` or ``off``), an ``about`` (said
with each finding), and one of:

- ``paths``: globs that a changed path must match; a glob without a slash
  matches a name at any depth, one with a slash is anchored at the
  workspace's root; ``*`` and ``?`` stay within a name, ``**`` spans names.
  Alone, any change to such a path is a finding.
- ``lines``: a regular expression (Python's) searched in the added and
  modified lines of the changed files (of ``paths`` only, when given).
  ``words`` (optional) lists words, one of which (in any case) a line must
  hold for the expression to be tried on it: a fast pre-check, the
  expression then runs on each such line alone.
  With ``"secret": true`` a match is a secret: its named group ``secret``
  (or the whole match) is never shown; the finding carries a redacted
  excerpt and the first 16 hex digits of the secret's SHA-256.  ``ignore``
  is a regular expression of values that are not secrets (placeholders).
- ``check``: one of kodepipe's own checks (below), with its thresholds
  (``count``, ``share``, ``bytes``) as keys.

Anything else is refused with the file and the rule named: a typo in a rule
never turns the rule off silently.
"""
# Pure: it reads files and runs no program (an import-linter contract).

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from kodepipe.core.errors import BadInput

SEVERITIES = ("info", "low", "medium", "high", "critical")
OFF = "off"
CHECKS = {
    "detect-secrets": "credentials of known formats, by detect-secrets' format plugins",
    "deletions": "deleted files: more than count, or at least five that are more than share of the workspace's files",
    "git": "git metadata: a path in a .git, or one in or making a bare repository",
    "setid": "setuid and setgid files",
    "capability": "files with a security.capability attribute",
    "symlink-out": "symlinks that point, or may point, out of the workspace",
    "special": "devices, fifos and sockets",
    "control-characters": "paths with control characters or bytes that are not UTF-8",
    "large-file": "one file larger than bytes",
    "large-total": "more than bytes added or modified in all",
}
KEYS = {"id", "severity", "about", "paths", "lines", "words", "secret", "ignore", "check", "count", "share", "bytes"}
BUILTIN = Path(__file__).with_name("rules.json")
_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


@dataclass(frozen=True)
class Rule:
    id: str
    severity: str
    about: str = ""
    paths: tuple[str, ...] = ()
    lines: re.Pattern[str] | None = None
    words: tuple[bytes, ...] = ()  # lowercase: a line must hold one of them for ``lines`` to be tried on it
    secret: bool = False
    ignore: re.Pattern[str] | None = None
    check: str | None = None
    count: int = 0
    share: float = 0.0
    bytes: int = 0

    def matches_path(self, path: str) -> bool:
        return not self.paths or _globs(self.paths).fullmatch(path) is not None

    def as_doc(self) -> dict[str, object]:
        """The rule as kodepipe(7) shows it."""
        out: dict[str, object] = {"id": self.id, "severity": self.severity, "about": self.about}
        if self.paths:
            out["paths"] = list(self.paths)
        if self.lines is not None:
            out["lines"] = self.lines.pattern
        if self.check:
            out["check"] = self.check
        for key in ("count", "share", "bytes"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        return out


def rank(severity: str) -> int:
    """The order of severities; ``off`` is below all."""
    return SEVERITIES.index(severity) if severity in SEVERITIES else -1


@functools.lru_cache(maxsize=1024)
def _glob(pattern: str) -> re.Pattern[str]:
    anchored = "/" in pattern.rstrip("/")
    body = pattern.strip("/")
    out, i = [], 0
    while i < len(body):
        if body.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif body.startswith("**", i):
            out.append(".*")
            i += 2
        elif body[i] == "*":
            out.append("[^/]*")
            i += 1
        elif body[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(body[i]))
            i += 1
    prefix = "" if anchored else "(?:.*/)?"
    return re.compile(prefix + "".join(out), re.DOTALL)


@functools.lru_cache(maxsize=256)
def _globs(patterns: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{_glob(p).pattern})" for p in patterns), re.DOTALL)


def glob_match(pattern: str, path: str) -> bool:
    """Whether a workspace-relative path matches a rule's glob (see the module's docstring)."""
    return _glob(pattern).fullmatch(path) is not None


def _regex(value: object, where: str) -> re.Pattern[str]:
    if not isinstance(value, str):
        raise BadInput(f"{where}: not a regular expression: {value!r}")
    try:
        return re.compile(value)
    except re.error as exc:
        raise BadInput(f"{where}: not a regular expression ({exc})") from None


def parse(data: Mapping[str, object], where: str) -> Rule:
    """One rule from its JSON object; BadInput names ``where`` and what is wrong."""
    rid = data.get("id")
    if not isinstance(rid, str) or not _ID.fullmatch(rid):
        raise BadInput(f"{where}: a rule's id must be 1 to 63 of a-z, 0-9 and '-': {rid!r}")
    where = f"{where}: rule {rid}"
    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise BadInput(f"{where}: unknown key {', '.join(unknown)}", hint=f"a rule has only {', '.join(sorted(KEYS))}")
    severity = data.get("severity")
    if severity not in (*SEVERITIES, OFF):
        raise BadInput(f"{where}: severity must be one of {', '.join((*SEVERITIES, OFF))}: {severity!r}")
    about = data.get("about", "")
    if not isinstance(about, str):
        raise BadInput(f"{where}: about is not a string")
    paths = data.get("paths", [])
    if not isinstance(paths, list) or not all(isinstance(p, str) and p.strip("/") for p in paths):
        raise BadInput(f"{where}: paths must be a list of globs")
    lines = _regex(data["lines"], f"{where}: lines") if "lines" in data else None
    words = data.get("words", [])
    if not isinstance(words, list) or not all(isinstance(w, str) and w and w.isascii() for w in words) or \
            (words and lines is None):
        raise BadInput(f"{where}: words must be a list of ASCII words, with lines")
    ignore = _regex(data["ignore"], f"{where}: ignore") if "ignore" in data else None
    check = data.get("check")
    if check is not None and check not in CHECKS:
        raise BadInput(f"{where}: unknown check {check!r}", hint=f"the checks are {', '.join(CHECKS)}")
    if check is None and not paths and lines is None:
        raise BadInput(f"{where}: a rule needs paths, lines or a check")
    if check is not None and (paths or lines is not None):
        raise BadInput(f"{where}: a check takes no paths or lines")
    secret = data.get("secret", False)
    if not isinstance(secret, bool):
        raise BadInput(f"{where}: secret must be true or false")
    numbers: dict[str, float] = {}
    for key, kind in (("count", int), ("share", float), ("bytes", int)):
        value = data.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 or \
                (kind is int and not isinstance(value, int)) or (key == "share" and value > 1):
            raise BadInput(f"{where}: {key} must be a {'fraction' if key == 'share' else 'whole number'} "
                           f"of at least 0: {value!r}")
        numbers[key] = value
    return Rule(rid, str(severity), about, tuple(paths), lines, tuple(w.lower().encode() for w in words), secret,
                ignore, check, int(numbers["count"]),
                float(numbers["share"]), int(numbers["bytes"]))


def _read(path: Path) -> list[dict[str, object]]:
    try:
        data = orjson.loads(path.read_bytes())
    except OSError as exc:
        raise BadInput(f"{path}: cannot be read: {exc.strerror}") from None
    except orjson.JSONDecodeError as exc:
        raise BadInput(f"{path}: not JSON ({exc})") from None
    rules = data.get("rules") if isinstance(data, dict) else None
    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        raise BadInput(f'{path}: expected {{"rules": [{{"id": ..., "severity": ...}}, ...]}}')
    return rules


def user_dir() -> Path:
    from kodepipe.core.paths import config_dir

    return config_dir() / "review"


def load(folder: Path | None = None, *, builtin: Path = BUILTIN) -> list[Rule]:
    """The built-in rules with the user's laid over them (``folder``: default ``user_dir()``), in
    order: built-in ones first, then added ones.  Rules turned off are left out."""
    merged: dict[str, dict[str, object]] = {}
    for raw in _read(builtin):
        merged[str(raw.get("id"))] = raw
    files = sorted((folder or user_dir()).glob("*.json")) if (folder or user_dir()).is_dir() else []
    for path in files:
        for raw in _read(path):
            rid = str(raw.get("id"))
            base = merged.get(rid, {})
            if base and ("check" in raw or "paths" in raw or "lines" in raw):
                replaced = ("check", "paths", "lines", "words", "ignore", "secret")
                base = {k: v for k, v in base.items() if k not in replaced}
            merged[rid] = {**base, **raw}
            parse(merged[rid], str(path))  # say which file is wrong
    rules = [parse(raw, str(builtin)) for raw in merged.values()]
    return [rule for rule in rules if rule.severity != OFF]


def by_id(rules: Sequence[Rule]) -> dict[str, Rule]:
    return {rule.id: rule for rule in rules}
