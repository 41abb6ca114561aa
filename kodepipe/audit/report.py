"""One run as a single HTML page for a person (kp-trace --report RUN > report.html).

What the page is for: someone who did not watch the run reads what the sandbox allowed (the
policy, what was loosened), what the agent ran, wrote, deleted and reached, what the review found,
and whether the evidence is whole (audit completeness, the hash chains).  It is one file that
needs nothing else: no scripts, no fonts, no images, no links out, and a Content-Security-Policy
that forbids loading anything, so opening it cannot contact anyone.

Everything in a run was written or influenced by the agent, so every value from it is text:
HTML-escaped (``html.escape`` with quotes), and every control character (C0, C1, DEL), lone
surrogate (a byte that was not UTF-8), line or paragraph separator and bidirectional override is
shown as an escape in a marked span (``\\x1b``, ``\\n``, ``\\u202e``), so a file name cannot
forge a row, hide text or reorder it.  Values never reach an attribute: attributes hold only
constants of this module.  No value is trusted to have its documented type either: a wrong type
is shown as what it is, never a crash.

Big runs: ``items`` are read once, in order, and every table keeps at most its cap of rows
(TIMELINE_ROWS, TABLE_ROWS) and says how many it left out; counts are always of everything.
What is kept whole is one entry per process and per distinct path or destination (the tree and
the tables need them); a cell holds at most CELL_CHARS characters.  The process tree is built
and walked without recursion, so a hostile ten-thousand-deep tree or a parent cycle renders; it
nests at most TREE_DEPTH levels and lists deeper processes flat, each with its depth.

Pure: no I/O; standard library only.
"""

from __future__ import annotations

import html
import re
import shlex
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

TIMELINE_ROWS = 2000
TABLE_ROWS = 500
TREE_DEPTH = 64
CELL_CHARS = 2000

# C0 and C1 controls, DEL, lone surrogates (bytes that were not UTF-8, as os.fsdecode leaves
# them; they could not even be encoded), line/paragraph separators and bidirectional controls
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
SEVERITIES = ("critical", "high", "medium", "low", "info")
# file ops that make or change the path they name (and, for link and rename, their target)
_WRITES = frozenset(("write", "truncate", "mkdir", "mknod", "chmod", "chown", "utime", "xattr", "symlink"))
_DELETES = frozenset(("unlink", "rmdir"))
_NET_ADDRESSED = frozenset(("connect", "bind", "sendto", "sendmsg", "accept", "recvfrom", "recvmsg"))

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#111;background:#fff}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.15em;border-bottom:1px solid #ccc;margin-top:1.6em}
h3{font-size:1em;margin:1.2em 0 .3em}
table{border-collapse:collapse;margin:.3em 0;max-width:100%}
th,td{border:1px solid #ddd;padding:2px 6px;text-align:left;vertical-align:top}
th{background:#f3f3f3}td{font-family:ui-monospace,monospace;font-size:12.5px;word-break:break-all}
table.facts th{width:14em;font-weight:600}
.warn{background:#fff1c2}.bad{background:#fbd5d5}.ok{background:#d9f2dc}
tr.denied td{background:#fde8e8}
.ctl{color:#b00;background:#fee;border:1px solid #f99;border-radius:2px;font-family:ui-monospace,monospace}
.more,.note{color:#555;font-style:italic}
ul.tree,ul.tree ul{list-style:none;margin:0;padding-left:1.2em;border-left:1px dotted #aaa}
ul.tree li{font-family:ui-monospace,monospace;font-size:12.5px;margin:1px 0}
.pid{font-weight:600}.flat{color:#555}
nav a{margin-right:1em}
#timeline td:nth-child(-n+3),#network td:first-child,#findings td:first-child{white-space:nowrap;word-break:normal}
"""


# -- values as text ---------------------------------------------------------------------------------


def _control_plain(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"  # a byte that was not UTF-8
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def _control(match: re.Match[str]) -> str:
    return f'<span class="ctl">{_control_plain(match)}</span>'


def text(value: object, limit: int = CELL_CHARS, *, marked: bool = True) -> str:
    """Any value from a run as HTML text: escaped, controls made visible (in a marked span, or
    plain where no markup may go, as in the title), at most ``limit`` characters (then how many
    more)."""
    raw = value if isinstance(value, str) else _plain(value)
    more = ""
    if len(raw) > limit:
        more = f" … ({len(raw) - limit:,} more characters)"
        more = f'<span class="more">{more}</span>' if marked else more
        raw = raw[:limit]
    return _UNSAFE.sub(_control if marked else _control_plain, html.escape(raw, quote=True)) + more


def _plain(value: object, depth: int = 0, budget: int = CELL_CHARS + 1) -> str:
    """A JSON value as plain text (not yet escaped).  A string is itself (``text`` cuts it and says
    by how much); what is inside a list or an object is shown three levels deep, at most 50 items
    a level and about ``budget`` characters in all, so no value makes a cell big or deep."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if depth == 0 else value[:budget]
    if isinstance(value, (int, float)):
        try:
            return str(value)
        except ValueError:  # an integer of more digits than Python will convert
            return "(a number too long to show)"
    if not isinstance(value, (list, dict)):
        return type(value).__name__
    if depth >= 3:
        return "…"
    pairs = value.items() if isinstance(value, dict) else ((None, v) for v in value)
    parts: list[str] = []
    used = 0
    for n, (key, item) in enumerate(pairs):
        if used >= budget or n >= 50:
            parts.append(f"… {len(value) - n} more")
            break
        part = _plain(item, depth + 1, budget - used)
        if isinstance(value, dict):
            part = _plain(key, depth + 1, budget - used) + "=" + part
        parts.append(part)
        used += len(part) + 2
    return ("{%s}" if isinstance(value, dict) else "[%s]") % ", ".join(parts)


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def utc(ts: object) -> str:
    """Epoch seconds as UTC ISO 8601 with milliseconds; a string as it is; anything else empty."""
    if isinstance(ts, (int, float)) and not isinstance(ts, bool):
        try:
            return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        except (OverflowError, OSError, ValueError):
            return _plain(ts)
    return ts if isinstance(ts, str) else ""


def argv_text(argv: object) -> str:
    """An argv as one shell-quoted line (plain text, not yet escaped)."""
    return shlex.join(a if isinstance(a, str) else _plain(a) for a in _list(argv))


def address_text(address: object) -> str:
    """A net event's address ({"family", "address", "port"} or {"path"} or {"raw"}) as one string."""
    if not isinstance(address, dict):
        return _plain(address)
    host, port, path = address.get("address"), address.get("port"), address.get("path")
    if path is not None:
        return "unix:" + _plain(path)
    if host is not None:
        shown = _plain(host)
        if ":" in shown and port is not None:
            shown = f"[{shown}]"
        return shown + ("" if port is None else ":" + _plain(port))
    return _plain(address.get("raw", address))


def _count(n: int) -> str:
    try:
        return f"{n:,}"
    except ValueError:
        return "(a number too long to show)"


def _many(n: int, one: str, more: str) -> str:
    return f"{_count(n)} {one if n == 1 else more}"


def _size(value: object) -> int:
    """How many: a list's length, or a count given as a number."""
    return len(value) if isinstance(value, list) else max(0, _int(value) or 0)


# -- tables with a cap --------------------------------------------------------------------------------


@dataclass
class _Table:
    """Rows of one table: at most ``cap`` kept (rendered), every one counted."""

    head: tuple[str, ...]
    cap: int = TABLE_ROWS
    rows: list[str] = field(default_factory=list)
    total: int = 0

    def add(self, cells: Callable[[], list[str]], css: str = "") -> None:
        """``cells`` (HTML, already escaped) is called only for a row that is kept."""
        if self.wants():
            self.put(cells(), css)

    def wants(self) -> bool:
        """Count one more row; whether it is kept (then ``put`` it)."""
        self.total += 1
        return len(self.rows) < self.cap

    def put(self, cells: list[str], css: str = "") -> None:
        row = "".join(f"<td>{c}</td>" for c in cells)
        self.rows.append(f'<tr class="{css}">{row}</tr>' if css else f"<tr>{row}</tr>")

    def html(self, empty: str = "none") -> str:
        if not self.total:
            return f'<p class="note">{empty}</p>'
        head = "".join(f"<th>{h}</th>" for h in self.head)
        out = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(self.rows)}</tbody></table>"
        return out + _more(self.total, len(self.rows), "rows")


def _more(total: int, shown: int, what: str) -> str:
    if total <= shown:
        return ""
    return (f'<p class="more">{_count(total - shown)} more {what} not shown '
            f"({_count(shown)} of {_count(total)} shown).</p>")


# -- the process tree ------------------------------------------------------------------------------------


@dataclass
class _Proc:
    pid: int
    first_ts: object = None
    parent: int | None = None  # index into _Tree.nodes
    ppid: int | None = None  # a parent pid this trace never showed (or not yet)
    execs: list[str] = field(default_factory=list)
    exit: str = ""


class _Tree:
    """Processes from exec, fork/clone and exit events.  A pid names a new process once the one it
    named has exited (pids are reused); threads are not processes."""

    def __init__(self) -> None:
        self.nodes: list[_Proc] = []
        self.live: dict[int, int] = {}  # pid -> index of the process that has it now

    def _get(self, pid: int, ts: object) -> int:
        index = self.live.get(pid)
        if index is None:
            index = len(self.nodes)
            self.nodes.append(_Proc(pid, ts))
            self.live[pid] = index
        return index

    def add(self, ev: dict[str, Any]) -> None:
        kind, pid, ts = ev.get("type"), _int(ev.get("pid")), ev.get("ts")
        if pid is None or (ev.get("outcome") not in ("ok", None) and kind != "exit"):
            return
        if kind == "process" and ev.get("op") in ("fork", "clone") and ev.get("thread") is not True:
            child = _int(ev.get("child"))
            if child is None or child == pid:
                return
            parent = self._get(pid, ts)
            known = self.live.get(child)
            if known is None:
                self.nodes.append(_Proc(child, ts, parent=parent))
                self.live[child] = len(self.nodes) - 1
            elif self.nodes[known].parent is None:
                self.nodes[known].parent, self.nodes[known].ppid = parent, None  # seen before its fork returned
        elif kind == "exec":
            node = self.nodes[self._get(pid, ts)]
            argv = _list(ev.get("argv"))
            shown = argv_text(argv) if argv else _plain(ev.get("path")) or "?"
            node.execs.append(shown + (" …(cut by strace)" if ev.get("argv_truncated") is True else ""))
            ppid = _int(ev.get("ppid"))
            if node.parent is None and ppid is not None and ppid != pid:
                if ppid in self.live and self.live[ppid] != self.live[pid]:
                    node.parent = self.live[ppid]
                else:
                    node.ppid = ppid
        elif kind == "exit" and ev.get("thread") is not True and ev.get("superseded_by") is None:
            node = self.nodes[self._get(pid, ts)]
            code, signal = _int(ev.get("code")), ev.get("signal")
            if code is not None:
                node.exit = "exit " + _plain(code)
            elif signal:
                node.exit = "killed by " + _plain(signal) + (" (core dumped)" if ev.get("core_dumped") is True
                                                             else "")
            else:
                node.exit = "exited"
            del self.live[pid]

    def html(self) -> str:
        """The tree as nested lists, built without recursion: roots first (processes whose parent the
        trace never showed), then any process left unvisited, which can only be in a parent cycle."""
        nodes = self.nodes
        # a parent first seen only by its pid, later in the trace
        last: dict[int, int] = {n.pid: i for i, n in enumerate(nodes)}
        for i, node in enumerate(nodes):
            if node.parent is None and node.ppid is not None and last.get(node.ppid, i) != i:
                node.parent, node.ppid = last[node.ppid], None
        children: dict[int, list[int]] = {}
        for i, node in enumerate(nodes):
            if node.parent is not None:
                children.setdefault(node.parent, []).append(i)
        visited = [False] * len(nodes)
        out: list[str] = ['<ul class="tree">']
        shown = flat = cycles = 0
        starts = [i for i, n in enumerate(nodes) if n.parent is None]
        # a stack of ("node", index, depth, note) and ("close", ...) markers
        for start in [*starts, *range(len(nodes))]:
            if visited[start]:
                continue
            note = "" if nodes[start].parent is None else " (its parents form a cycle)"
            cycles += bool(note)
            stack: list[tuple[str, int, int, str]] = [("node", start, 0, note)]
            while stack:
                what, i, depth, note = stack.pop()
                if what == "close":
                    out.append("</ul></li>")
                    continue
                if visited[i]:
                    continue
                visited[i] = True
                kids = children.get(i, [])
                if shown >= TABLE_ROWS:  # left out, but walked: what is below it is no cycle
                    stack.extend(("node", k, depth + 1, "") for k in kids)
                    continue
                shown += 1
                out.append("<li>" + self._label(nodes[i], depth, note))
                if depth >= TREE_DEPTH:
                    flat += 1
                if kids and depth < TREE_DEPTH:
                    out.append("<ul>")
                    stack.append(("close", i, depth, ""))
                else:
                    out.append("</li>")
                stack.extend(("node", k, depth + 1, "") for k in reversed(kids))
        out.append("</ul>")
        notes = _more(len(nodes), shown, "processes")
        if flat:
            notes += (f'<p class="note">{_count(flat)} processes deeper than {TREE_DEPTH} levels are listed flat '
                      "under their ancestor at that level, each with its depth.</p>")
        if cycles:
            notes += (f'<p class="note">{_many(cycles, "cycle", "cycles")} of parents: one process of each is '
                      "listed at the top level, marked.</p>")
        return "".join(out) + notes

    def _label(self, node: _Proc, depth: int, note: str) -> str:
        parts = [f'<span class="pid">pid {text(node.pid)}</span>']
        if depth >= TREE_DEPTH:
            parent = self.nodes[node.parent].pid if node.parent is not None else None
            parts.append(f'<span class="flat">[depth {depth}, child of pid {text(parent)}]</span>')
        if node.execs:
            parts.append(" → ".join(text(e) for e in node.execs[:5]))
            if len(node.execs) > 5:
                parts.append(f'<span class="more">(and {len(node.execs) - 5} more execs)</span>')
        else:
            parts.append('<span class="note">(no exec seen)</span>')
        parts.append(f"<b>{text(node.exit)}</b>" if node.exit else '<span class="note">no exit seen</span>')
        if node.ppid is not None:
            parts.append(f'<span class="note">(parent pid {text(node.ppid)} not in the trace)</span>')
        if note:
            parts.append(f'<span class="note">{note}</span>')
        return " ".join(parts)


# -- reading the timeline ----------------------------------------------------------------------------------


@dataclass
class _Path:
    ops: list[str] = field(default_factory=list)
    count: int = 0
    first_ts: object = None
    by: str = ""
    note: str = ""


def _by(ev: dict[str, Any]) -> str:
    pid, exe = ev.get("pid"), ev.get("exe")
    return (_plain(exe) + " " if exe else "") + (f"[{_plain(pid)}]" if pid is not None else "")


def _finding_key(f: dict[str, Any]) -> tuple[str, ...]:
    return tuple(_plain(f.get(k)) for k in ("severity", "rule", "path", "line", "message"))


class _Collector:
    """Everything the page shows, folded from the items in one pass."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.denied = 0
        self.timeline = _Table(("time", "pid", "type", "what"), cap=TIMELINE_ROWS)
        self.tree = _Tree()
        self.written: dict[str, _Path] = {}
        self.deleted: dict[str, _Path] = {}
        self.file_denied = _Table(("time", "by", "op", "path", "error"))
        self.other_denied = _Table(("time", "by", "type", "what", "error"))
        self.unaccounted = _Table(("change", "path", "entry", "against"))
        self.egress = _Table(("time", "decision", "method", "host", "port", "address", "reason", "up", "down",
                              "credential"))
        self.egress_counts: dict[str, int] = {}
        self.egress_bytes = [0, 0]
        self.injected: dict[str, int] = {}
        self.destinations: dict[tuple[str, str], list[Any]] = {}  # (op, address) -> [count, outcomes, ts, by]
        self.net_events = 0
        self.findings: dict[tuple[str, ...], dict[str, Any]] = {}
        self.accepted: set[tuple[str, ...]] = set()
        self.changes: list[Any] | None = None
        self.decisions = _Table(("time", "action", "details"))

    def add(self, item: object) -> None:
        if not isinstance(item, dict):
            self._count("not an object")
            self.timeline.add(lambda: ["", "", "?", "not a record: " + text(_plain(item))])
            return
        kind = item.get("kind")
        if kind == "event":
            self._event(item)
        elif kind == "egress":
            self._egress(item)
        elif kind == "review":
            self._review(item)
        else:
            self._count(_plain(kind) or "no kind")
        denied = item.get("denied") is True
        self.denied += denied
        self.timeline.add(lambda: _timeline_row(item), "denied" if denied else "")

    def _count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def _event(self, ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        self._count("event " + (_plain(kind) or "?"))
        self.tree.add(ev)
        denied = ev.get("denied") is True
        if kind == "file":
            self._file(ev, denied)
        elif kind == "net":
            self._net(ev)
        elif kind == "unaccounted":
            self.unaccounted.add(lambda: [text(ev.get("change")) if ev.get("more") is None else "",
                                          text(ev.get("path")) if ev.get("more") is None else
                                          text(f"and {_plain(ev.get('more'))} more"),
                                          text(ev.get("entry")), text(ev.get("against") or ev.get("why"))])
        if denied and kind not in ("file", "net"):
            self.other_denied.add(lambda: [utc(ev.get("ts")), text(_by(ev)), text(kind),
                                           text(ev.get("syscall") or ev.get("op") or ev.get("signal")),
                                           text(ev.get("errno") or ev.get("signal"))], "denied")

    def _file(self, ev: dict[str, Any], denied: bool) -> None:
        op, path, target = _plain(ev.get("op")), _plain(ev.get("path")), _plain(ev.get("target"))
        if denied:
            self.file_denied.add(lambda: [utc(ev.get("ts")), text(_by(ev)), text(op),
                                          text(path) + (" → " + text(target) if target else ""),
                                          text(ev.get("errno"))], "denied")
        if ev.get("outcome") not in ("ok", None):
            return
        if (op == "open" and ev.get("write") is True) or op in _WRITES:
            self._path(self.written, path, op, ev)
        elif op in ("link", "rename") and target:
            self._path(self.written, target, op, ev, f"from {path}" if op == "rename" else f"link to {path}")
        if op in _DELETES or op == "rename":
            self._path(self.deleted, path, op, ev, f"renamed to {target}" if op == "rename" else "")

    @staticmethod
    def _path(table: dict[str, _Path], path: str, op: str, ev: dict[str, Any], note: str = "") -> None:
        if not path:
            return
        entry = table.get(path)
        if entry is None:
            entry = table[path] = _Path(first_ts=ev.get("ts"), by=_by(ev), note=note)
        entry.count += 1
        if op not in entry.ops and len(entry.ops) < 20:
            entry.ops.append(op)

    def _net(self, ev: dict[str, Any]) -> None:
        self.net_events += 1
        op = _plain(ev.get("op"))
        if op not in _NET_ADDRESSED or ev.get("address") is None:
            return
        key = (op, address_text(ev.get("address")))
        seen = self.destinations.get(key)
        if seen is None:
            seen = self.destinations[key] = [0, {}, ev.get("ts"), _by(ev)]
        seen[0] += 1
        outcome = _plain(ev.get("errno") or ev.get("outcome")) or "ok"
        seen[1][outcome] = seen[1].get(outcome, 0) + 1

    def _egress(self, rec: dict[str, Any]) -> None:
        self._count("egress")
        decision = _plain(rec.get("decision")) or "?"
        self.egress_counts[decision] = self.egress_counts.get(decision, 0) + 1
        for i, key in enumerate(("bytes_up", "bytes_down")):
            self.egress_bytes[i] += max(0, _int(rec.get(key)) or 0)
        credential = credential_of(rec)
        if credential:
            self.injected[credential] = self.injected.get(credential, 0) + 1
        css = "" if decision == "allow" else "denied"
        self.egress.add(lambda: [utc(rec.get("ts")), text(decision), text(rec.get("method")), text(rec.get("host")),
                                 text(rec.get("port")), text(rec.get("address")), text(rec.get("reason")),
                                 text(rec.get("bytes_up")), text(rec.get("bytes_down")),
                                 text(credential) + (" (injected)" if credential else "")], css)

    def _review(self, rec: dict[str, Any]) -> None:
        action = _plain(rec.get("action")) or "?"
        self._count("review " + action)
        if action == "quarantine" and isinstance(rec.get("changes"), list):
            self.changes = rec["changes"]  # the newest review of the quarantine wins
        for finding in _list(rec.get("findings")):
            self.add_finding(finding)
        for finding in _list(rec.get("accepted")):
            if isinstance(finding, dict):
                self.accepted.add(_finding_key(finding))
        if action != "quarantine" and action != "findings":
            details = {k: v for k, v in rec.items() if k not in ("kind", "action", "ts", "findings", "changes")}
            for key in ("findings", "accepted"):
                if isinstance(rec.get(key), list):
                    details[key] = len(rec[key])
            self.decisions.add(lambda: [utc(rec.get("ts")), text(action), text(_plain(details))])

    def add_finding(self, finding: object) -> None:
        if isinstance(finding, dict):
            self.findings.setdefault(_finding_key(finding), finding)


def _timeline_row(item: dict[str, Any]) -> list[str]:
    label, what = describe(item)
    return [utc(item.get("ts")), text(item.get("pid")), text(label), what]


def credential_of(rec: dict[str, Any]) -> str:
    """The name of the credential the proxy added to an egress request: ``injected`` when it is a
    name, ``credential`` when ``injected`` is true; never anything else of the record."""
    injected = rec.get("injected")
    if isinstance(injected, str) and injected:
        return injected
    if injected is True:
        return _str(rec.get("credential")) or "a credential"
    return ""


def describe(item: dict[str, Any]) -> tuple[str, str]:
    """(type, one line of HTML) for any timeline item."""
    kind = item.get("kind")
    if kind == "egress":
        credential = credential_of(item)
        line = " ".join(filter(None, (_plain(item.get("decision")), _plain(item.get("method")),
                                      _plain(item.get("host")) + (":" + _plain(item.get("port"))
                                                                  if item.get("port") is not None else ""),
                                      _plain(item.get("reason")))))
        if credential:
            line += f" (credential {credential} injected)"
        return "egress", text(line)
    if kind == "review":
        action = _plain(item.get("action"))
        rest = {k: (len(v) if isinstance(v, list) else v) for k, v in item.items()
                if k not in ("kind", "action", "ts")}
        return "review", text(f"{action} {_plain(rest)}")
    if kind != "event":
        return _plain(kind) or "?", text(_plain(item))
    return _plain(item.get("type")) or "event", text(_event_line(item))


def _event_line(ev: dict[str, Any]) -> str:
    kind, op = ev.get("type"), _plain(ev.get("op"))
    if kind == "exec":
        argv = _list(ev.get("argv"))
        line = "exec " + (argv_text(argv) if argv else _plain(ev.get("path")))
        if ev.get("argv_truncated") is True:
            line += " …(cut by strace)"
    elif kind == "file":
        line = f"{op} {_plain(ev.get('path'))}"
        if ev.get("target") is not None:
            line += " → " + _plain(ev.get("target"))
        if ev.get("write") is True:
            line += " (write)"
    elif kind == "net":
        line = f"{op} " + (address_text(ev.get("address")) if ev.get("address") is not None
                           else _plain(ev.get("family") or ev.get("socket")))
    elif kind == "process":
        if op in ("fork", "clone"):
            line = f"{op} → {'thread' if ev.get('thread') is True else 'child'} {_plain(ev.get('child'))}"
        elif op == "kill":
            line = f"kill {_plain(ev.get('target'))} {_plain(ev.get('signal'))}"
        elif op == "exit":
            line = f"exit call {_plain(ev.get('code'))}"
        else:
            line = op or _plain(ev.get("syscall"))
    elif kind == "exit":
        if ev.get("superseded_by") is not None:
            line = f"replaced by the execve of thread {_plain(ev.get('superseded_by'))}"
        elif _int(ev.get("code")) is not None:
            line = f"exited {_plain(ev.get('code'))}"
        else:
            line = f"killed by {_plain(ev.get('signal'))}" + (" (core dumped)" if ev.get("core_dumped") is True
                                                              else "")
        if ev.get("thread") is True:
            line = "thread " + line
    elif kind == "signal":
        line = _plain(ev.get("signal")) + (" (stop)" if ev.get("stopped") is True else "")
        if ev.get("seccomp") is True:
            line += f" seccomp denied {_plain(ev.get('syscall'))}"
    elif kind == "parse_error":
        line = f"{_plain(ev.get('reason'))}: {_plain(ev.get('raw'))}"
    elif kind == "unaccounted":
        line = (f"{_plain(ev.get('change'))} {_plain(ev.get('path'))} not explained by the trace"
                if ev.get("more") is None else f"and {_plain(ev.get('more'))} more unaccounted changes")
        if ev.get("complete") is False:
            line = f"cross-check incomplete: {_plain(ev.get('why'))}"
    elif kind in ("attach", "detach", "tracer"):
        line = _plain(ev.get("message"))
    else:
        line = _plain(ev.get("syscall")) or _plain(kind)
    if ev.get("outcome") not in (None, "ok"):
        line += f" = {_plain(ev.get('errno') or ev.get('outcome'))}"
    if ev.get("denied") is True:
        line += " DENIED"
    return line


# -- the sections -------------------------------------------------------------------------------------------


def _row(label: str, value: str, css: str = "") -> str:
    return f'<tr><th>{label}</th><td class="{css}">{value}</td></tr>' if css else \
        f"<tr><th>{label}</th><td>{value}</td></tr>"


def _joined(values: object) -> str:
    items = _list(values) if isinstance(values, list) else ([values] if values not in (None, "") else [])
    return ", ".join(text(v) for v in items[:TABLE_ROWS]) + (
        f" … and {_count(len(items) - TABLE_ROWS)} more" if len(items) > TABLE_ROWS else "")


def _facts(run: dict[str, Any], c: _Collector) -> str:
    def fact(label: str, key: str, value: str | None = None) -> str:
        """A row for a key the record has (an empty value said as "none"); nothing for one it lacks."""
        if key not in run:
            return ""
        shown = text(run.get(key)) if value is None else value
        return _row(label, shown or "none")

    command = run.get("command")
    rows = [fact("name", "name"), fact("id", "id"), fact("state", "state"), fact("host", "host"),
            fact("image", "image"), fact("profile", "profile"),
            fact("command", "command", text(argv_text(command) if isinstance(command, list) else command)),
            fact("workspace", "workspace", text(run.get("workspace")) + (
                f" ({text(run.get('workspace_mode'))})" if run.get("workspace_mode") else ""))]
    rows.append("<tr><th colspan=\"2\">policy</th></tr>")
    rows += [_row("network", text(run.get("network")) or "not recorded"),
             _row("allowed hosts", _joined(run.get("allow")) or "none"),
             fact("pinned names", "resolve", _joined(run.get("resolve"))),
             fact("read-only root", "read_only"),
             fact("masked", "masked", _joined(run.get("masked"))), fact("masked", "masks", _joined(run.get("masks"))),
             fact("protected", "protected", _joined(run.get("protected"))),
             fact("environment", "env", _joined(run.get("env"))),
             fact("secrets", "secrets", _joined(run.get("secrets"))),
             fact("credentials", "credentials",
                  _joined([_dict(x).get("name", x) for x in _list(run.get("credentials"))])),
             fact("budgets", "budgets", text(_plain(run.get("budgets")))),
             _row("limits", text(_plain(run.get("limits"))) or "not recorded")]
    loosened = run.get("loosened")
    rows.append(_row("loosened defaults", _joined(loosened) or "none (all defaults kept)",
                     "warn" if loosened else "ok"))
    rows.append("<tr><th colspan=\"2\">how it ended</th></tr>")
    rows += [fact("started", "started", text(utc(run.get("started")))),
             fact("finished", "finished", text(utc(run.get("finished"))))]
    ended = []
    if run.get("exit_code") is not None:
        ended.append(f"exit code {text(run.get('exit_code'))}")
    if run.get("signal"):
        ended.append(f"signal {text(run.get('signal'))}")
    if run.get("timed_out") is True:
        ended.append("timed out")
    if run.get("oom_killed") is True:
        ended.append("killed for lack of memory (OOM)")
    bad = bool(run.get("timed_out") is True or run.get("oom_killed") is True or run.get("signal")
               or (_int(run.get("exit_code")) or 0) != 0)
    rows.append(_row("exit", "; ".join(ended) or "not recorded", "warn" if bad else ""))
    rows.append(fact("outcome", "outcome"))
    if "error" in run:
        rows.append(_row("error", text(_plain(run.get("error"))), "bad"))
    rows.append("<tr><th colspan=\"2\">audit</th></tr>")
    audit = run.get("audit")
    rows.append(_row("audit", text(audit) + (f" (mode {text(run.get('audit_mode'))})" if run.get("audit_mode")
                                             else ""),
                     "ok" if audit == "complete" else "warn" if audit is not None else ""))
    for key in ("audit_problem", "audit_blind", "audit_capped", "audit_unaccounted"):
        if run.get(key) not in (None, "", [], {}):
            rows.append(_row(key.replace("_", " "), text(_plain(run.get(key))), "warn"))
    quarantine = _dict(run.get("quarantine"))
    if quarantine:
        rows.append(_row("quarantine", ", ".join(
            f"{_count(_size(quarantine.get(k)))} {k}" for k in ("added", "modified", "deleted"))))
    if run.get("egress") is not None:
        rows.append(_row("egress decisions", text(_plain(run.get("egress")))))
    counted = ", ".join(f"{text(k)}: {_count(v)}" for k, v in sorted(c.counts.items()))
    rows.append("<tr><th colspan=\"2\">this timeline</th></tr>")
    rows.append(_row("items", f"{_count(c.timeline.total)} ({counted})" if counted else "none"))
    rows.append(_row("denied operations", _count(c.denied), "warn" if c.denied else ""))
    return f'<table class="facts">{"".join(rows)}</table>'


def _processes(c: _Collector) -> str:
    nodes = c.tree.nodes
    out = f"<p>{_many(len(nodes), 'process', 'processes')}.</p>"
    out += c.tree.html() if nodes else '<p class="note">none</p>'
    return out + "<h3>Denied process and other operations</h3>" + c.other_denied.html()


def _path_table(paths: dict[str, _Path], head: str) -> str:
    table = _Table(("path", head, "times", "first", "by", "note"))
    for path, entry in paths.items():
        if table.wants():
            table.put([text(path), text(", ".join(entry.ops)), _count(entry.count), utc(entry.first_ts),
                       text(entry.by), text(entry.note)])
    return f"<p>{_many(len(paths), 'path', 'paths')}.</p>" + table.html()


def _quarantine(run: dict[str, Any], c: _Collector) -> str:
    changes = c.changes
    if changes is None:
        quarantine = _dict(run.get("quarantine"))
        changes = _list(quarantine.get("changes")) or [{"path": p, "change": kind} for kind in (
            "added", "modified", "deleted") for p in _list(quarantine.get(kind))]
    table = _Table(("change", "path", "type", "mode"))
    by: dict[str, int] = {}
    for change in changes:
        entry = _dict(change)
        kind = _plain(entry.get("change")) or "?"
        by[kind] = by.get(kind, 0) + 1
        if table.wants():
            table.put([text(kind), text(entry.get("path")), text(entry.get("type")), text(entry.get("mode"))],
                      "warn" if kind == "deleted" else "")
    said = ", ".join(f"{_count(n)} {text(k)}" for k, n in sorted(by.items()))
    return (f"<p>{said}.</p>" if said else "") + table.html("no quarantined changes recorded")


def _files(run: dict[str, Any], c: _Collector) -> str:
    return ("<h3>Written or created</h3>" + _path_table(c.written, "ops")
            + "<h3>Deleted or renamed away</h3>" + _path_table(c.deleted, "op")
            + "<h3>Quarantined changes</h3>" + _quarantine(run, c)
            + "<h3>Changes the trace does not explain</h3>" + c.unaccounted.html()
            + "<h3>Denied file operations</h3>" + c.file_denied.html())


def _network(c: _Collector) -> str:
    counts = ", ".join(f"{_count(n)} {text(k)}" for k, n in sorted(c.egress_counts.items())) or "none"
    creds = ", ".join(f"{text(k)} ({_count(n)})" for k, n in sorted(c.injected.items())) or "none"
    dest = _Table(("op", "address", "times", "outcomes", "first", "by"))
    for (op, addr), (count, outcomes, ts, by) in c.destinations.items():
        if dest.wants():
            dest.put([text(op), text(addr), _count(count), text(", ".join(f"{k} {v}" for k, v in outcomes.items())),
                      utc(ts), text(by)], "" if set(outcomes) <= {"ok"} else "warn")
    return (f"<p>Egress decisions: {counts}; {_count(c.egress_bytes[0])} bytes up, "
            f"{_count(c.egress_bytes[1])} bytes down. Credentials injected (names only): {creds}.</p>"
            + c.egress.html("no egress decisions") + "<h3>Addresses the processes used (net events)</h3>"
            + f"<p>{_many(c.net_events, 'net event', 'net events')}, "
            f"{_many(len(c.destinations), 'distinct address', 'distinct addresses')}.</p>"
            + dest.html())


def _findings(run: dict[str, Any], c: _Collector) -> str:
    for finding in _list(run.get("findings")):
        c.add_finding(finding)
    for finding in _list(run.get("accepted")):
        if isinstance(finding, dict):
            c.accepted.add(_finding_key(finding))

    def rank(f: dict[str, Any]) -> int:
        severity = f.get("severity")
        return SEVERITIES.index(severity) if severity in SEVERITIES else len(SEVERITIES)

    ordered = sorted(c.findings.items(), key=lambda kv: rank(kv[1]))
    by: dict[str, int] = {}
    table = _Table(("severity", "rule", "path", "line", "message", "excerpt", "accepted"))
    for key, f in ordered:
        severity = _plain(f.get("severity")) or "?"
        by[severity] = by.get(severity, 0) + 1
        if table.wants():
            table.put([text(severity), text(f.get("rule")), text(f.get("path")), text(f.get("line")),
                       text(f.get("message")), text(f.get("excerpt")), "yes" if key in c.accepted else ""],
                      "bad" if severity in ("critical", "high") else "warn" if severity == "medium" else "")
    said = ", ".join(f"{_count(by[s])} {s}" for s in (*SEVERITIES, *sorted(set(by) - set(SEVERITIES))) if s in by)
    return ((f"<p>{text(said)}.</p>" if said else "") + table.html("no findings")
            + "<h3>Review decisions</h3>" + c.decisions.html("none recorded"))


def _integrity(verify: object) -> str:
    if not isinstance(verify, dict):
        return '<p class="bad">The verification result cannot be read.</p>'
    verified, signed = verify.get("verified"), verify.get("signed")
    out = (f'<p class="{"ok" if verified is True else "bad"}">'
           + ("Every hash chain verified." if verified is True else "The hash chains did NOT verify.")
           + f" Signed: {'yes' if signed is True else 'no'}.</p>")
    table = _Table(("log", "ok", "entries", "problem"))
    for log in _list(verify.get("logs")):
        entry = _dict(log)
        if table.wants():
            table.put([text(entry.get("log")), "yes" if entry.get("ok") is True else "NO", text(entry.get("entries")),
                       text(entry.get("problem"))], "" if entry.get("ok") is True else "denied")
    return out + table.html("no logs checked")


_SECTIONS = (("facts", "Facts"), ("integrity", "Integrity"), ("processes", "Processes"), ("files", "Files"),
             ("network", "Network"), ("findings", "Findings"), ("timeline", "Timeline"))


def render(run: dict[str, Any], items: Iterable[dict[str, Any]], *, verify: dict[str, Any] | None = None,
           generated: str = "") -> str:
    """The report of one run: ``run`` is its container record, ``items`` its timeline in time order
    (event, egress and review records, read once), ``verify`` the check of its hash chains (its
    section is left out when None), ``generated`` a note for the header (when, by what)."""
    run = run if isinstance(run, dict) else {}
    c = _Collector()
    for item in items:
        c.add(item)
    body = {
        "facts": _facts(run, c),
        "processes": _processes(c),
        "files": _files(run, c),
        "network": _network(c),
        "findings": _findings(run, c),
        "timeline": c.timeline.html("no items"),
    }
    if verify is not None:
        body["integrity"] = _integrity(verify)
    name = text(run.get("name") or "?", 200, marked=False)
    nav = "".join(f'<a href="#{sid}">{title}</a>' for sid, title in _SECTIONS if sid in body)
    sections = "".join(f'<section id="{sid}"><h2>{title}</h2>{body[sid]}</section>'
                       for sid, title in _SECTIONS if sid in body)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
            "<meta name=\"referrer\" content=\"no-referrer\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>kodepipe run {name}</title><style>{_CSS}</style></head>\n<body>"
            f"<header><h1>kodepipe run {text(run.get('name') or '?', 200)}</h1>"
            + (f'<p class="note">{text(generated)}</p>' if generated else "")
            + f"<nav>{nav}</nav></header>\n{sections}\n</body></html>\n")
