"""A run's timeline as OCSF events, for a SIEM: ``event(item)`` turns one timeline item into one
OCSF event (a plain dict, ready for orjson), or None for an item that is not an event at all.

Pure and cheap: no I/O, no pydantic, standard library only, because it runs once per event of
traces with millions of lines.  Every item was written or influenced by the agent, so every key
may be missing or of the wrong type: a value that fits no OCSF attribute is never dropped but kept
in ``unmapped`` (nulls aside, but for ts), and an item that fits no class becomes a Base Event (class_uid 0) whose
``unmapped`` is the whole item.  Strings are passed on as they are (control characters included):
the JSON encoder escapes them, and whoever shows them to a person must escape them again.

Schema: OCSF ``VERSION``, with the profiles host (actor and device on network and remediation
classes), container (device.container, src_endpoint.container) and security_control (action and
disposition of a denial or an allow), listed in each event's metadata.profiles.  tests/test_ocsf.py
validates the output against the JSON Schema that the ocsf-json-schema package generates from the
schema files it ships for that version (required attributes, enums, types, additional attributes
refused), plus the checks JSON Schema cannot express (type_uid, the captions of ids).

What becomes what (class uid, activity):

- event exec: Process Activity (1007) Launch, launch_type Exec; process is the new program
  (cmd_line from argv), actor.process its parent
- event process: fork/clone Launch (launch_type Fork) of the child, a new thread Other "Create
  Thread", kill Other "Send Signal" (process is the target), setuid Set User ID, the rest (wait,
  exit, prctl, setgid, ptrace, seccomp, unshare, setns) Other with that name
- event exit: Process Activity Terminate with exit_code (a thread's exit: Other "Thread Exit")
- event signal: Process Activity Other "Receive Signal"; actor is the sender when a process sent
  it, else the kernel; a seccomp SIGSYS is a denial
- event file: File System Activity (1001): open Open, read Read, write and truncate Update,
  stat/access/readlink Get Attributes, unlink/rmdir Delete, rename Rename (file_result is the new
  name), link/symlink/mkdir/mknod Create, chmod/chown Set Security, utime/xattr Set Attributes,
  mount Mount, umount2 Unmount, chdir/chroot/pivot_root Other
- event net: Network Activity (4001): connect and accept Open (a refused connect Refuse, another
  failure Fail), listen Listen, shutdown Close, send/recv Traffic, bind/socket/socketpair Other;
  endpoints from the address and strace's socket decoration
- event syscall: Base Event, activity Other named after the call; parse_error: Base Event Other
  "Parse Error" with the line in raw_data
- event attach/detach/tracer: Event Log Activity (1008) Start / Stop / Other (strace began or
  stopped recording a process, or said something else)
- event unaccounted: Detection Finding (2004) Create, High (Medium when the cross-check is
  incomplete): a real change the trace does not explain is what an audit is for
- egress with injected: API Activity (6003) (the credential injection: actor.user names the
  credential, never its value; activity from the method: POST Create, GET/HEAD Read, PUT/PATCH
  Update, DELETE Delete); method DNS: DNS Activity (4003) Traffic (Query when no answer was
  given); CONNECT, RELAY and an unreadable request: Network Activity (Traffic when allowed, Refuse
  when denied, Fail on an error); any other method: HTTP Activity (4002) with that method's
  activity (http_method holds only the methods OCSF lists; another is the name of an Other)
- review quarantine / apply / discard / export: Remediation Activity (7001) Isolate / Restore /
  Evict / Other "Export"; review findings: Detection Finding Create, at the highest severity of
  its findings, one evidence per finding; a kp-review finding record likewise
- container (the run record): Process Activity of the container's command, Launch while it is
  creating or running, else Terminate with exit_code, start_time and end_time: the run is one
  program's life, and Process Activity is the class that carries an exit status
- trace (kp-trace -- COMMAND's record): likewise, Launch while running, else Terminate
- summary records: None (a count, not something that happened); anything else: Base Event

device is the sandbox: a device of type Other "Container" named after the container record (or
the run), with device.container; "unknown" for a trace that names neither.  Process uids are the
run id and the trace's exec_id, so two programs that shared a pid stay apart.

Time is epoch milliseconds from ``ts`` (or the record's times); an item without a usable epoch
time (unaccounted events, -tt traces, hostile values) gets the time it was converted, and keeps its
``ts`` in unmapped so the reader can tell.  metadata.correlation_uid is the run id; strace's line
number is metadata.sequence and original_event_uid.  Severity: Informational; Low for a denial, a
parse error and an apply that accepted findings; Medium for a forced apply and an incomplete
cross-check; High for an unaccounted change; a review's findings at the highest of their own.
"""

from __future__ import annotations

import time
from typing import Any

from kodepipe import __version__

VERSION = "1.7.0"
PRODUCT = "kodepipe"
PROFILES = ("host", "container", "security_control")

Item = dict[str, Any]

_CATEGORIES = {0: "Uncategorized", 1: "System Activity", 2: "Findings", 4: "Network Activity",
               6: "Application Activity", 7: "Remediation"}
# class uid -> (category uid, class name, {activity id: caption}): the activities used here
_CLASSES: dict[int, tuple[int, str, dict[int, str]]] = {
    0: (0, "Base Event", {99: "Other"}),
    1001: (1, "File System Activity", {1: "Create", 2: "Read", 3: "Update", 4: "Delete", 5: "Rename",
                                       6: "Set Attributes", 7: "Set Security", 8: "Get Attributes", 12: "Mount",
                                       13: "Unmount", 14: "Open", 99: "Other"}),
    1007: (1, "Process Activity", {1: "Launch", 2: "Terminate", 5: "Set User ID", 99: "Other"}),
    1008: (1, "Event Log Activity", {6: "Start", 7: "Stop", 99: "Other"}),
    2004: (2, "Detection Finding", {1: "Create"}),
    4001: (4, "Network Activity", {1: "Open", 2: "Close", 4: "Fail", 5: "Refuse", 6: "Traffic", 7: "Listen",
                                   99: "Other"}),
    4002: (4, "HTTP Activity", {1: "Connect", 2: "Delete", 3: "Get", 4: "Head", 5: "Options", 6: "Post", 7: "Put",
                                8: "Trace", 9: "Patch", 99: "Other"}),
    4003: (4, "DNS Activity", {1: "Query", 6: "Traffic"}),
    6003: (6, "API Activity", {1: "Create", 2: "Read", 3: "Update", 4: "Delete", 99: "Other"}),
    7001: (7, "Remediation Activity", {1: "Isolate", 2: "Evict", 3: "Restore", 99: "Other"}),
}
_SEVERITY = {0: "Unknown", 1: "Informational", 2: "Low", 3: "Medium", 4: "High", 5: "Critical"}
_STATUS = {0: "Unknown", 1: "Success", 2: "Failure", 4: "Partial"}  # 4: Remediation Activity's own
_FINDING_SEVERITY = {"info": 1, "low": 2, "medium": 3, "high": 4, "critical": 5}

_FILE_ACTIVITY = {"open": 14, "read": 2, "write": 3, "truncate": 3, "stat": 8, "access": 8, "readlink": 8,
                  "unlink": 4, "rmdir": 4, "rename": 5, "link": 1, "symlink": 1, "mkdir": 1, "mknod": 1,
                  "chmod": 7, "chown": 7, "utime": 6, "xattr": 6, "mount": 12}
_FILE_OTHER = {"chdir": "Change Directory", "chroot": "Change Root"}
# OCSF file type_id: 0 unknown, 1 regular file, 2 folder, 3 character device, 4 block device,
# 5 local socket, 6 named pipe, 7 symbolic link
_FILE_TYPE_BY_OP = {"mkdir": 2, "rmdir": 2, "chdir": 2, "chroot": 2, "symlink": 7}
_ENTRY_TYPES = {"file": 1, "dir": 2, "symlink": 7, "fifo": 6, "socket": 5, "chardev": 3, "blockdev": 4}
_PROCESS_OTHER = {"wait": "Wait", "exit": "Exit", "prctl": "Prctl", "setgid": "Set Group ID", "ptrace": "Ptrace",
                  "seccomp": "Seccomp", "unshare": "Unshare", "setns": "Setns"}
_NET_ACTIVITY = {"connect": 1, "accept": 1, "listen": 7, "shutdown": 2, "sendto": 6, "sendmsg": 6, "recvfrom": 6,
                 "recvmsg": 6}
_NET_OTHER = {"bind": "Bind", "socket": "Socket", "socketpair": "Socket Pair"}
_INBOUND = frozenset(("accept", "recvfrom", "recvmsg"))
_OUTBOUND = frozenset(("connect", "sendto", "sendmsg", "shutdown"))
_HTTP_ACTIVITY = {"CONNECT": 1, "DELETE": 2, "GET": 3, "HEAD": 4, "OPTIONS": 5, "POST": 6, "PUT": 7, "TRACE": 8,
                  "PATCH": 9}
_API_ACTIVITY = {"POST": 1, "GET": 2, "HEAD": 2, "PUT": 3, "PATCH": 3, "DELETE": 4}
_FAMILY_VERSION = {"AF_INET": 4, "AF_INET6": 6}
_SENT_BY_A_PROCESS = frozenset(("SI_USER", "SI_TKILL", "SI_QUEUE"))  # siginfo si_code: si_pid sent it


# -- small parts -------------------------------------------------------------------------------


def _heads() -> dict[tuple[int, int], Item]:
    heads = {}
    for class_uid, (category, class_name, activities) in _CLASSES.items():
        for activity_id, caption in activities.items():
            heads[class_uid, activity_id] = {
                "category_uid": category, "category_name": _CATEGORIES[category], "class_uid": class_uid,
                "class_name": class_name, "activity_id": activity_id, "activity_name": caption,
                "type_uid": class_uid * 100 + activity_id, "type_name": f"{class_name}: {caption}"}
    return heads


_HEADS = _heads()  # copied for each event: cheaper than building it


def _head(class_uid: int, activity_id: int, activity_name: str | None = None) -> Item:
    """The classification every event starts with; ``activity_name`` names an Other (99)."""
    head = _HEADS[class_uid, activity_id].copy()
    if activity_name:
        head["activity_name"] = activity_name
    return head


def _str(value: object) -> str | None:
    return value if type(value) is str else None


def _int(value: object) -> int | None:
    """An integer that JSON encoders and OCSF's long_t carry (64 bits); not a bool."""
    return value if type(value) is int and -(1 << 63) <= value < 1 << 63 else None


def _port(value: object) -> int | None:
    return value if type(value) is int and 0 <= value <= 65535 else None


def _ip(value: object) -> str | None:
    """An IP address as OCSF's ip_t accepts it (at most 40 characters), else None."""
    if type(value) is not str or not value or len(value) > 40:
        return None
    import ipaddress  # network events only

    try:
        ipaddress.ip_address(value)
    except ValueError:
        return None
    return value


def _epoch_ms(ts: object) -> int | None:
    """Epoch seconds -> milliseconds; None for what is not a plausible epoch time (a wrong type,
    NaN, seconds since midnight from strace -tt, before 2001 or after the year 5000)."""
    if (type(ts) is float or type(ts) is int) and 1e9 <= ts < 1e11:
        return int(ts * 1000)
    return None


def _iso_ms(text: object) -> int | None:
    """'2026-11-30T17:37:05Z' (kodepipe's record times, UTC) -> epoch milliseconds, or None."""
    if type(text) is not str or len(text) != 20 or not text.isascii() or text[4] != "-" or text[7] != "-" \
            or text[10] != "T" or text[13] != ":" or text[16] != ":" or text[19] != "Z":
        return None
    digits = (text[0:4], text[5:7], text[8:10], text[11:13], text[14:16], text[17:19])
    if not all(d.isdigit() for d in digits):
        return None
    year, month, day, hour, minute, second = (int(d) for d in digits)
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 61):
        return None
    # days since the epoch of a civil date (H. Hinnant's algorithm): no datetime or calendar import
    y = year - (month <= 2)
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    days = era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468
    return _epoch_ms(((days * 24 + hour) * 60 + minute) * 60 + second)


def _name(path: str) -> str:
    """A path's last component ('/' for the root)."""
    stripped = path.rstrip("/")
    return (stripped.rsplit("/", 1)[-1] if stripped else path) or path


def _file(path: str, type_id: int = 0) -> Item:
    return {"name": _name(path), "path": path, "type_id": type_id}


def _copy(process: Item) -> Item:
    """A process object that shares no dict with ``process`` (one event names it twice, as actor
    and target: a reader that edits one must not edit the other)."""
    return {k: dict(v) if isinstance(v, dict) else v for k, v in process.items()}


class _Event:
    """One event being built from one item: ``take`` marks the item's keys that found a place,
    and ``done`` puts the rest, unchanged, in unmapped (a null only for ts: the reader can then
    tell the time is the conversion's)."""

    __slots__ = ("item", "out", "used")

    def __init__(self, item: Item, class_uid: int, activity_id: int, activity_name: str | None = None) -> None:
        self.item = item
        self.out = _head(class_uid, activity_id, activity_name)
        self.used = {"kind"}

    def take(self, *keys: str) -> None:
        self.used.update(keys)

    def metadata(self, log_name: str, profiles: bool = True) -> Item:
        meta: Item = {"version": VERSION, "product": {"name": PRODUCT, "vendor_name": PRODUCT,
                                                      "version": __version__}, "log_name": log_name}
        if profiles:
            meta["profiles"] = list(PROFILES)
        run_id = _str(self.item.get("run_id"))
        if run_id is not None:
            meta["correlation_uid"] = run_id
            self.used.add("run_id")
        self.out["metadata"] = meta
        return meta

    def trace_metadata(self, code: str | None, profiles: bool = True) -> None:
        """A trace's event: strace's line is the sequence and the original uid, the system call the
        event_code, kodepipe's event schema the log_version."""
        meta = self.metadata("strace", profiles)
        line, schema = _int(self.item.get("line")), _int(self.item.get("schema"))
        if line is not None:
            meta["sequence"] = line
            meta["original_event_uid"] = str(line)
            self.used.add("line")
        if schema is not None:
            meta["log_version"] = f"kodepipe-events/{schema}"
            self.used.add("schema")
        if code is not None:
            meta["event_code"] = code

    def time(self, ms: int | None = None) -> None:
        """``time`` from the item's ts (or ``ms``), else the time of the conversion."""
        if ms is None:
            ts = self.item.get("ts")
            if (type(ts) is float or type(ts) is int) and 1e9 <= ts < 1e11:  # as _epoch_ms, inline: hot
                ms = int(ts * 1000)
                self.used.add("ts")
        self.out["time"] = ms if ms is not None else int(time.time() * 1000)

    def severity(self, severity_id: int) -> None:
        self.out["severity_id"] = severity_id
        self.out["severity"] = _SEVERITY[severity_id]

    def status(self, status_id: int, caption: str | None = None) -> None:
        self.out["status_id"] = status_id
        self.out["status"] = caption or _STATUS[status_id]

    def control(self, allowed: bool) -> None:
        """security_control: what a control decided."""
        if allowed:
            self.out.update(action_id=1, action="Allowed", disposition_id=1, disposition="Allowed")
        else:
            self.out.update(action_id=2, action="Denied", disposition_id=2, disposition="Blocked")

    def call_status(self, control: bool = True) -> bool:
        """status, severity (and the control's decision) from a system call's denied, outcome and
        errno; True when it was denied."""
        item = self.item
        denied, outcome, errno = item.get("denied"), item.get("outcome"), _str(item.get("errno"))
        if type(denied) is bool:
            self.used.add("denied")
        self.status(2 if denied is True or outcome == "error" else 1 if outcome == "ok" else 0)
        if type(outcome) is str:
            self.used.add("outcome")
            if outcome not in ("ok", "error"):
                self.out["status_detail"] = outcome
        if errno is not None:
            self.out["status_code"] = errno
            self.used.add("errno")
        self.severity(2 if denied is True else 1)
        if denied is True and control:
            self.control(False)
        return denied is True

    def sandbox(self) -> tuple[str | None, str | None]:
        """The sandbox's name (its container record's, or the run's) and its container's name."""
        container, run = _str(self.item.get("container")), _str(self.item.get("run"))
        if container is not None:
            self.used.add("container")
        if run is not None and (container is None or run == container):
            self.used.add("run")
        return container or run, container

    def device(self) -> Item:
        """The sandbox the event happened in, a device of type Other "Container"; "unknown" for a
        trace that names neither a container nor a run."""
        name, container = self.sandbox()
        if name is None:
            device: Item = {"type_id": 0, "type": "Unknown", "name": "unknown"}
        else:
            device = {"type_id": 99, "type": "Container", "name": name}
            if container is not None:
                device["container"] = {"name": container}
        self.out["device"] = device
        return device

    def process(self) -> Item | None:
        """The process a trace's event belongs to (pid, tid, its program, its parent); uid is the
        run id and the trace's exec_id, which tells apart two programs that shared a pid.  None
        when the item has neither a pid nor an exec_id."""
        item = self.item
        process: Item = {}
        pid, tid, exe = _int(item.get("pid")), _int(item.get("tid")), _str(item.get("exe"))
        exec_id, ppid = _int(item.get("exec_id")), _int(item.get("ppid"))
        if pid is not None:
            process["pid"] = pid
            self.used.add("pid")
        if tid is not None:
            if tid != pid:
                process["tid"] = tid
            self.used.add("tid")
        if exe is not None:
            name = _name(exe)
            process["name"] = name
            process["file"] = {"name": name, "path": exe, "type_id": 1}
            self.used.add("exe")
        if exec_id is not None:
            run_id = _str(item.get("run_id"))
            process["uid"] = f"{run_id}/{exec_id}" if run_id else str(exec_id)
            self.used.add("exec_id")
        if ppid is not None:
            process["parent_process"] = {"pid": ppid}
            self.used.add("ppid")
        return process if "pid" in process or "uid" in process else None

    def syscall(self) -> str | None:
        syscall = _str(self.item.get("syscall"))
        if syscall is not None:
            self.used.add("syscall")
        return syscall

    def text(self, key: str, field: str) -> str | None:
        """The item's string ``key`` as the event's ``field``."""
        value = _str(self.item.get(key))
        if value is not None:
            self.out[field] = value
            self.used.add(key)
        return value

    def done(self) -> Item:
        used = self.used
        rest = {k: v for k, v in self.item.items() if k not in used and (v is not None or k == "ts")}
        if rest:
            self.out["unmapped"] = rest
        return self.out


# -- a trace's events --------------------------------------------------------------------------


def _exec(item: Item) -> Item | None:
    ev = _Event(item, 1007, 1)
    ev.take("type")
    process = ev.process()
    path, argv = _str(item.get("path")), item.get("argv")
    if path is not None:  # what it ran, or tried to: a failed exec keeps the old program in exe
        process = process or {}
        process["file"] = _file(path, 1)
        process["name"] = _name(path)
        ev.take("path")
        if item.get("exe") != path:
            ev.used.discard("exe")  # the program that tried: kept in unmapped
    if process is None or ("pid" not in process and "uid" not in process):
        return None
    if type(argv) is list and argv and all(type(a) is str for a in argv):
        import shlex

        process["cmd_line"] = shlex.join(argv)
        ev.take("argv")
    out = ev.out
    out["launch_type_id"], out["launch_type"] = 3, "Exec"
    ev.trace_metadata(ev.syscall())
    ev.time()
    ev.call_status()
    # the actor is the parent, as for any launch; a process seen first at this exec acts for itself
    parent = process.get("parent_process")
    out["actor"] = {"process": dict(parent) if parent else {k: process[k] for k in ("pid", "uid") if k in process}}
    out["process"] = process
    ev.device()
    return ev.done()


def _process_event(item: Item) -> Item | None:
    op, child = item.get("op"), _int(item.get("child"))
    thread = item.get("thread") is True
    if op in ("fork", "clone"):
        ev = _Event(item, 1007, 99, "Create Thread") if thread and child is not None else _Event(item, 1007, 1)
    elif op == "kill":
        ev = _Event(item, 1007, 99, "Send Signal")
    elif op == "setuid":
        ev = _Event(item, 1007, 5)
    else:
        ev = _Event(item, 1007, 99, _PROCESS_OTHER.get(op, "Other") if type(op) is str else "Other")
    ev.take("type")
    caller = ev.process()
    if caller is None:
        return None
    target = caller
    if op in ("fork", "clone"):
        if type(item.get("thread")) is bool:
            ev.take("thread")
        if thread and child is not None:
            target = {**caller, "tid": child}
            ev.take("child")
        else:
            ev.out["launch_type_id"], ev.out["launch_type"] = 2, "Fork"
            if child is not None:  # a failed fork has no child: the event is about its caller
                target = {"pid": child, "parent_process": {k: caller[k] for k in ("pid", "uid") if k in caller}}
                if "file" in caller:  # the child runs its parent's program until it execs
                    target["name"], target["file"] = caller["name"], dict(caller["file"])
                ev.take("child")
    elif op == "kill":
        victim = _int(item.get("target"))
        if victim is not None and victim > 0:  # 0 and negative numbers name process groups
            target = {"pid": victim}
            ev.take("target")
    if type(op) is str and (op in ("fork", "clone", "kill", "setuid") or op in _PROCESS_OTHER):
        ev.take("op")
    ev.trace_metadata(ev.syscall())
    ev.time()
    ev.call_status()
    ev.out["actor"] = {"process": caller}
    ev.out["process"] = _copy(target) if target is caller else target
    ev.device()
    return ev.done()


def _exit(item: Item) -> Item | None:
    thread = item.get("thread") is True
    ev = _Event(item, 1007, 99, "Thread Exit") if thread else _Event(item, 1007, 2)
    ev.take("type")
    process = ev.process()
    if process is None:
        return None
    if type(item.get("thread")) is bool:
        ev.take("thread")
    if item.get("denied") is False:  # only a signal or a call is ever denied
        ev.take("denied")
    ev.trace_metadata(None)
    ev.time()
    ev.status(1)  # it ended; how is in exit_code or status_detail
    ev.severity(1)
    code, signal, core = _int(item.get("code")), _str(item.get("signal")), item.get("core_dumped")
    if code is not None:
        ev.out["exit_code"] = code
        ev.take("code")
    if signal is not None:
        ev.out["status_detail"] = f"killed by {signal}" + (" (core dumped)" if core is True else "")
        ev.take("signal")
    if core is False or (core is True and signal is not None):
        ev.take("core_dumped")
    ev.out["actor"] = {"process": _copy(process)}
    ev.out["process"] = process
    ev.device()
    return ev.done()


def _signal(item: Item) -> Item | None:
    ev = _Event(item, 1007, 99, "Receive Signal")
    ev.take("type")
    process = ev.process()
    if process is None:
        return None
    ev.trace_metadata(None)
    ev.time()
    ev.text("signal", "status_code")
    info = item.get("info")
    sender = _int(info.get("si_pid")) if isinstance(info, dict) else None
    code = info.get("si_code") if isinstance(info, dict) else None
    by_process = sender is not None and type(code) is str and code in _SENT_BY_A_PROCESS
    ev.out["actor"] = {"process": {"pid": sender}} if by_process else {"app_name": "kernel"}
    if type(item.get("denied")) is bool:
        ev.take("denied")
    if item.get("denied") is True:  # a seccomp filter stopped a call (SIGSYS)
        syscall = ev.syscall()
        ev.status(2)
        ev.out["status_detail"] = f"seccomp denied {syscall}" if syscall else "denied"
        ev.control(False)
        ev.severity(2)
    else:
        ev.status(1)
        ev.severity(1)
    ev.out["process"] = process
    ev.device()
    return ev.done()


def _file_event(item: Item) -> Item | None:
    op, path = _str(item.get("op")), _str(item.get("path"))
    syscall = _str(item.get("syscall"))
    if op == "mount" and syscall in ("umount2", "pivot_root"):
        ev = _Event(item, 1001, 13) if syscall == "umount2" else _Event(item, 1001, 99, "Pivot Root")
    elif op in _FILE_ACTIVITY:
        ev = _Event(item, 1001, _FILE_ACTIVITY[op])
    else:
        ev = _Event(item, 1001, 99, _FILE_OTHER.get(op, "Other") if op is not None else "Other")
    ev.take("type")
    process = ev.process()
    if path is None or process is None:
        return None
    if op is not None and (op in _FILE_ACTIVITY or op in _FILE_OTHER):
        ev.take("op")
    ev.take("path")
    ev.trace_metadata(ev.syscall())
    ev.time()
    ev.call_status()
    type_id = _FILE_TYPE_BY_OP.get(op, 0) if op is not None else 0
    flags = item.get("flags")
    if type_id == 0 and type(flags) is str and "O_DIRECTORY" in flags:
        type_id = 2
    ev.out["file"] = _file(path, type_id)
    target = _str(item.get("target"))
    if target is not None and op in ("rename", "link"):
        ev.out["file_result"] = _file(target, type_id)
        ev.take("target")
    ev.out["actor"] = {"process": process}
    ev.device()
    return ev.done()


def _host_port(text: str) -> Item | None:
    """'127.0.0.1:80' or '[::1]:80' (from strace's socket decoration) -> an endpoint."""
    host, sep, port = text.rpartition(":")
    ip = _ip(host[1:-1] if host.startswith("[") and host.endswith("]") else host) if sep else None
    if ip is None:
        return None
    endpoint: Item = {"ip": ip}
    if port.isascii() and port.isdigit() and int(port) <= 65535:
        endpoint["port"] = int(port)
    return endpoint


def _decoration(socket: object) -> tuple[str | None, Item | None, Item | None]:
    """'TCP:[10.0.0.1:5000->10.0.0.2:80]' -> ('TCP', local, remote); no endpoints for an inode."""
    if type(socket) is not str or not socket.endswith("]"):
        return None, None, None
    i = socket.find(":[")
    if i <= 0:
        return None, None, None
    local, _, remote = socket[i + 2:-1].partition("->")
    return socket[:i], _host_port(local) if local else None, _host_port(remote) if remote else None


def _address(address: object) -> Item | None:
    """kodepipe's address object -> an endpoint (an AF_UNIX socket's path is the endpoint's name)."""
    if not isinstance(address, dict):
        return None
    if address.get("family") == "AF_UNIX":
        path = _str(address.get("path"))
        return {"name": path} if path else None
    ip = _ip(address.get("address"))
    if ip is None:
        return None
    endpoint: Item = {"ip": ip}
    port = _port(address.get("port"))
    if port is not None:
        endpoint["port"] = port
    return endpoint


def _net(item: Item) -> Item | None:
    op = _str(item.get("op"))
    failed = item.get("denied") is True or item.get("outcome") == "error"
    if op == "connect" and failed and item.get("denied") is not True and item.get("errno") == "ECONNREFUSED":
        ev = _Event(item, 4001, 5)
    elif op in _NET_ACTIVITY:
        ev = _Event(item, 4001, 4 if failed else _NET_ACTIVITY[op])
    else:
        ev = _Event(item, 4001, 99, _NET_OTHER.get(op, "Other") if op is not None else "Other")
    ev.take("type")
    process = ev.process()
    if process is None:
        return None
    if op is not None and (op in _NET_ACTIVITY or op in _NET_OTHER):
        ev.take("op")
    ev.trace_metadata(ev.syscall())
    ev.time()
    ev.call_status()
    proto, local, remote = _decoration(item.get("peer_socket") if op == "accept" else item.get("socket"))
    address = _address(item.get("address"))
    if address is not None:
        ev.take("address")
        if op == "bind":
            local = address
        else:
            remote = address
    inbound = op in _INBOUND
    src, dst = (remote, local) if inbound else (local, remote if op in _OUTBOUND else None)
    if src is None and dst is None:  # a socket with no address: the sandbox's own end
        src = {"name": ev.device()["name"]}
    if src is not None:
        ev.out["src_endpoint"] = src
    if dst is not None:
        ev.out["dst_endpoint"] = dst
    connection: Item = {"direction_id": 1 if inbound else 2 if op in _OUTBOUND else 0}
    family = _str(item.get("family"))
    if proto:
        connection["protocol_name"] = proto.lower().removesuffix("v6")
        connection["protocol_ver_id"] = 6 if proto in ("TCPv6", "UDPv6") else 4 if proto in ("TCP", "UDP") else 0
    elif family in _FAMILY_VERSION:
        connection["protocol_ver_id"] = _FAMILY_VERSION[family]
        ev.take("family")
    ev.out["connection_info"] = connection
    ev.out["actor"] = {"process": process}
    ev.device()
    return ev.done()


def _syscall(item: Item) -> Item:
    """Any other system call: no OCSF class fits, so a Base Event named after the call."""
    ev = _Event(item, 0, 99, _str(item.get("syscall")) or "Other")
    ev.take("type")
    ev.trace_metadata(ev.syscall(), profiles=False)
    ev.time()
    ev.call_status(control=False)  # a Base Event has no security_control attributes
    return ev.done()


def _parse_error(item: Item) -> Item:
    ev = _Event(item, 0, 99, "Parse Error")
    ev.take("type")
    ev.trace_metadata(None, profiles=False)
    ev.time()
    ev.status(2)
    ev.severity(2)
    ev.text("raw", "raw_data")
    ev.text("reason", "message")
    return ev.done()


def _tracer(item: Item) -> Item:
    """strace began or ended recording a process (attach, detach), or said something else."""
    kind = item.get("type")
    ev = _Event(item, 1008, 6) if kind == "attach" else _Event(item, 1008, 7) if kind == "detach" else \
        _Event(item, 1008, 99, "Tracer Message")
    ev.take("type")
    ev.trace_metadata(None)
    ev.out["log_provider"] = "strace"
    ev.time()
    ev.status(1)
    ev.severity(1)
    ev.text("message", "message")
    ev.device()
    return ev.done()


def _finding(ev: _Event, uid: str, title: str, types: list[str], severity_id: int, evidences: list[Item]) -> Item:
    """The parts of a Detection Finding; the caller has made its metadata."""
    ev.time()
    ev.severity(severity_id)
    ev.status(1, "New")  # a finding's status list: 1 is New
    info: Item = {"uid": uid, "title": title}
    if types:
        info["types"] = types
    ev.out["finding_info"] = info
    if evidences:
        ev.out["evidences"] = evidences
    ev.device()
    return ev.done()


def _unaccounted(item: Item) -> Item:
    """A real change the trace does not explain (or a cross-check that could not be made whole)."""
    ev = _Event(item, 2004, 1)
    ev.take("type")
    ev.trace_metadata(None)
    if item.get("denied") is False:
        ev.take("denied")
    path, entry = _str(item.get("path")), item.get("entry")
    evidence: Item = {}
    if path is not None:
        evidence["file"] = _file(path, _ENTRY_TYPES.get(entry, 0) if type(entry) is str else 0)
        ev.take("path")
    data = {k: item[k] for k in ("change", "entry", "against", "more", "why", "complete", "path_b64") if k in item}
    if data:
        evidence["data"] = data
        ev.take(*data)
    complete = item.get("complete") is not False
    if not complete:
        title = "the cross-check of the trace against the real changes is incomplete"
    elif path is None:
        title = "more changes that no event of the trace explains"
    else:
        title = "a real change that no event of the trace explains"
    ev.text("message", "message")
    scope = _str(item.get("run_id")) or _str(item.get("container")) or _str(item.get("run")) or ""
    what = path if path is not None else "more" if complete else "incomplete"
    return _finding(ev, f"unaccounted:{scope}:{what}", title, ["unaccounted"], 4 if complete else 3,
                    [evidence] if evidence else [])


_TRACE_EVENTS = {"exec": _exec, "process": _process_event, "exit": _exit, "signal": _signal, "file": _file_event,
                 "net": _net, "syscall": _syscall, "parse_error": _parse_error, "attach": _tracer,
                 "detach": _tracer, "tracer": _tracer, "unaccounted": _unaccounted}


def _trace_event(item: Item) -> Item | None:
    kind = item.get("type")
    builder = _TRACE_EVENTS.get(kind) if type(kind) is str else None
    return builder(item) if builder is not None else None


# -- egress decisions --------------------------------------------------------------------------


def _egress(item: Item) -> Item | None:
    method, host, decision = _str(item.get("method")), _str(item.get("host")), item.get("decision")
    injected = item.get("injected")
    injection = injected is True or (type(injected) is str and injected != "")
    if injection:
        ev = _Event(item, 6003, _API_ACTIVITY[method]) if method in _API_ACTIVITY else \
            _Event(item, 6003, 99, method)
    elif method == "DNS":
        if host is None:
            return None
        ev = _Event(item, 4003, 6 if decision in ("allow", "deny") else 1)
    elif method is None or method in ("CONNECT", "RELAY"):
        ev = _Event(item, 4001, 6 if decision == "allow" else 5 if decision == "deny" else 4)
    else:  # OCSF lists the methods http_method may hold: another is the activity's name
        ev = _Event(item, 4002, _HTTP_ACTIVITY[method]) if method in _HTTP_ACTIVITY else _Event(item, 4002, 99, method)
    class_uid, out = ev.out["class_uid"], ev.out
    ev.metadata("egress")
    ev.time()
    if decision == "allow":
        ev.status(1)
        ev.control(True)
    elif decision == "deny":
        ev.status(2)
        ev.control(False)
    else:
        ev.status(2 if decision == "error" else 0)
    ev.severity(2 if decision == "deny" else 1)
    if decision in ("allow", "deny", "error"):
        ev.take("decision")
    ev.text("reason", "status_detail")
    name, container = ev.sandbox()
    source: Item = {"name": name or "sandbox"}
    if container is not None:
        source["container"] = {"name": container}
    out["src_endpoint"] = source
    seconds = item.get("seconds")
    if (type(seconds) is float or type(seconds) is int) and 0 <= seconds < 1e9:
        out["duration"] = int(seconds * 1000)
        ev.take("seconds")
    port, address, path = _port(item.get("port")), _ip(item.get("address")), _str(item.get("path"))
    if class_uid == 4003:  # the host is the query; the resolver it asked is the proxy itself
        query: Item = {"hostname": host, "class": "IN"}
        qtype = _str(item.get("qtype"))
        if qtype is not None:
            query["type"] = qtype
            ev.take("qtype")
        out["query"] = query
        ev.take("host", "method")
        addresses = item.get("addresses")
        if type(addresses) is list and addresses and all(type(a) is str for a in addresses):
            out["answers"] = [{"rdata": a, "class": "IN", **({"type": qtype} if qtype else {})} for a in addresses]
            ev.take("addresses")
        if decision in ("allow", "deny"):
            out["rcode_id"], out["rcode"] = (0, "NoError") if decision == "allow" else (5, "Refused")
        return ev.done()
    destination: Item = {}
    if host is not None:
        destination["hostname"] = host
        ev.take("host")
    if address is not None:
        destination["ip"] = address
        ev.take("address")
    if port is not None and destination:
        destination["port"] = port
        ev.take("port")
    if destination:
        out["dst_endpoint"] = destination
    if class_uid == 4001:
        if method is not None:
            ev.take("method")
        up, down = _int(item.get("bytes_up")), _int(item.get("bytes_down"))
        if up is not None and down is not None and up >= 0 and down >= 0 and _int(up + down) is not None:
            out["traffic"] = {"bytes_out": up, "bytes_in": down, "bytes": up + down}
            ev.take("bytes_up", "bytes_down")
        out["connection_info"] = {"direction_id": 2, "protocol_name": "tcp"}
        return ev.done()
    request: Item = {"http_method": method} if method in _HTTP_ACTIVITY else {}
    if path is not None:
        url: Item = {"path": path}
        if host is not None:
            url["hostname"] = host
        if port is not None:
            url["port"] = port
        request["url"] = url
        ev.take("path")
    if method in _HTTP_ACTIVITY:
        ev.take("method")
    if request or class_uid == 4002:
        out["http_request"] = request
    if class_uid == 4002:
        return ev.done()
    # a credential injection: the user is the credential, by name (its value never reaches a log)
    credential = injected if type(injected) is str else _str(item.get("credential"))
    actor: Item = {"app_name": "kodepipe egress proxy"}
    if credential:
        actor["user"] = {"name": credential, "credential_uid": credential}
        ev.take("injected" if type(injected) is str else "credential")
    ev.take("injected")
    out["actor"] = actor
    api: Item = {"operation": f"{method} {path}" if method is not None and path is not None else method or "unknown"}
    if host is not None:
        api["service"] = {"name": host}
    out["api"] = api
    return ev.done()


# -- the review log, findings and the run record -----------------------------------------------

# action -> activity id, activity name (for Other), disposition id and caption
_REVIEW: dict[str, tuple[int, str | None, int | None, str | None]] = {
    "quarantine": (1, None, 3, "Quarantined"), "apply": (3, None, 9, "Restored"),
    "discard": (2, None, 5, "Deleted"), "export": (99, "Export", None, None)}


def _review(item: Item) -> Item | None:
    action = item.get("action")
    if action == "findings":
        return _review_findings(item)
    if type(action) is not str or action not in _REVIEW:
        return None
    activity, name, disposition_id, disposition = _REVIEW[action]
    ev = _Event(item, 7001, activity, name)
    ev.take("action")
    out = ev.out
    ev.metadata("review")
    ev.time()
    review = _str(item.get("review"))
    if review is not None:
        ev.take("review")
    out["command_uid"] = review or _str(item.get("run_id")) or action
    if disposition_id is not None:
        out["disposition_id"], out["disposition"] = disposition_id, disposition
    count, forced = _int(item.get("count")), item.get("forced") is True
    status, severity = 1, 1
    if action == "apply":
        applied = item.get("applied")
        if type(applied) is list and count is not None and len(applied) < count:
            status = 4  # a partial apply: the rest stays in quarantine
        accepted = item.get("accepted")
        severity = 3 if forced else 2 if type(accepted) is list and accepted else 1
        out["message"] = f"{'the' if count is None else count} reviewed change(s) applied to the workspace" + (
            " (forced past the findings)" if forced else "")
    elif action == "quarantine":
        out["message"] = f"{'the' if count is None else count} change(s) held in quarantine for review"
    elif action == "discard":
        out["message"] = "the quarantined changes were discarded"
    else:
        branch = _str(item.get("branch"))
        out["message"] = "the reviewed changes were exported" + (f" to branch {branch}" if branch else "")
    ev.status(2 if isinstance(item.get("error"), dict) else status)
    ev.severity(severity)
    ev.device()
    return ev.done()


def _evidence(finding: Item) -> Item:
    """One finding of a review as evidence: its file, and all of it as data."""
    evidence: Item = {"data": finding}
    rule, path = _str(finding.get("rule")), _str(finding.get("path"))
    if rule is not None:
        evidence["name"] = rule
    if path is not None:
        evidence["file"] = _file(path, 0)
    return evidence


def _finding_severity(finding: Item) -> int:
    severity = finding.get("severity")
    return _FINDING_SEVERITY.get(severity, 0) if type(severity) is str else 0


def _review_findings(item: Item) -> Item:
    ev = _Event(item, 2004, 1)
    ev.take("action")
    ev.metadata("review")
    findings = item.get("findings")
    listed = [f for f in findings if isinstance(f, dict)] if type(findings) is list else []
    if type(findings) is list and len(listed) == len(findings):
        ev.take("findings")
    rules = sorted({rule for f in listed if type(rule := f.get("rule")) is str})
    severity = max((_finding_severity(f) for f in listed), default=1) or 1
    review = _str(item.get("review"))
    if review is not None:
        ev.take("review")
    uid = f"review:{review or _str(item.get('run_id')) or 'unknown'}"
    title = f"{len(listed)} finding(s) in the review of the run's changes" if listed else \
        "no findings in the review of the run's changes"
    return _finding(ev, uid, title, rules, severity, [_evidence(f) for f in listed])


def _finding_record(item: Item) -> Item:
    """A kp-review finding record: its run is "name" and "id"; all of it goes in the evidence."""
    view = {"ts": item.get("ts"), "run": item.get("name"), "run_id": item.get("id")}
    ev = _Event(view, 2004, 1)
    ev.metadata("review")
    rule, review, path = _str(item.get("rule")), _str(item.get("review")), _str(item.get("path"))
    line = _int(item.get("line"))
    uid = "finding:" + ":".join((review or "", rule or "", path or "", "" if line is None else str(line)))
    title = _str(item.get("message")) or rule or "finding"
    evidence = _evidence({k: v for k, v in item.items() if k != "kind"})
    ev.take("ts", "run", "run_id")  # in the evidence's data as they were
    return _finding(ev, uid, title, [rule] if rule else [], _finding_severity(item) or 1, [evidence])


def _container(item: Item) -> Item | None:
    """The run record: its command's life in the container."""
    name, run_id = _str(item.get("name")), _str(item.get("id"))
    identity = _str(item.get("container_id")) or run_id or name
    if identity is None:
        return None
    state = item.get("state")
    running = state in ("creating", "running")
    ev = _Event(item, 1007, 1 if running else 2)
    out = ev.out
    meta = ev.metadata("run")
    if run_id is not None:
        meta["correlation_uid"] = run_id
        ev.take("id")
    started, finished = _iso_ms(item.get("started")), _iso_ms(item.get("finished"))
    created = _iso_ms(item.get("created"))
    if running:
        finished = None
    ev.time((started if running else finished or started) or created)
    for key, value in (("started", started), ("finished", finished), ("created", created)):
        if value is not None:
            ev.take(key)
    process = _command_process(ev, item, identity)
    if started is not None:
        out["start_time"] = process["created_time"] = started
    if finished is not None:
        out["end_time"] = process["terminated_time"] = finished
        if started is not None and finished >= started:
            out["duration"] = finished - started
    out["process"] = process
    out["actor"] = {"app_name": "kp-run"}
    container: Item = {"name": _str(item.get("container_name")) or name or identity}
    for key, field in (("container_name", "name"), ("container_id", "uid"), ("engine", "runtime")):
        text = _str(item.get(key))
        if text is not None:
            container[field] = text
            ev.take(key)
    if name is not None:
        ev.take("name")
    out["device"] = {"type_id": 99, "type": "Container", "name": name or identity, "container": container}
    code, error = _int(item.get("exit_code")), item.get("error")
    if code is not None:
        out["exit_code"] = code
        ev.take("exit_code")
    failed = isinstance(error, dict) or (code is not None and code != 0) or type(item.get("signal")) is str or \
        item.get("timed_out") is True or item.get("oom_killed") is True
    ev.status(2 if failed else 1 if code == 0 else 0)
    ev.severity(1)
    if isinstance(error, dict) and type(error.get("message")) is str:  # the error stays whole in unmapped
        out["status_detail"] = error["message"]
        if type(error.get("code")) is str:
            out["status_code"] = error["code"]
    else:
        ev.text("outcome", "status_detail")
    if type(state) is str:
        out["message"] = f"kp-run {name or identity}: {state}"
    return ev.done()


def _command_process(ev: _Event, item: Item, identity: str) -> Item:
    """The process of a run's or a traced command's record: its id, and its command line when it is
    a list of strings (taken from unmapped)."""
    process: Item = {"uid": identity}
    command = item.get("command")
    if type(command) is list and command and all(type(a) is str for a in command):
        import shlex

        process["cmd_line"] = shlex.join(command)
        process["name"] = _name(command[0])
        ev.take("command")
    return process


def _traced_command(item: Item) -> Item | None:
    """kp-trace -- COMMAND's own record (kind trace): the command started (running) or ended."""
    identity = _str(item.get("id"))
    if identity is None:
        return None
    running = item.get("state") == "running"
    ev = _Event(item, 1007, 1 if running else 2)
    ev.take("id", "state")
    ev.metadata("kp-trace")
    ev.time()
    ev.out["process"] = _command_process(ev, item, identity)
    ev.out["actor"] = {"app_name": "kp-trace"}
    code, signal = _int(item.get("exit_code")), _str(item.get("signal"))
    if code is not None:
        ev.out["exit_code"] = code
        ev.take("exit_code")
    if signal is not None:
        ev.out["status_detail"] = f"killed by {signal}"
        ev.take("signal")
    ev.status(0 if running or (code is None and signal is None) else 1 if code == 0 else 2)
    ev.severity(1)
    ev.device()
    return ev.done()


# -- the entry point ---------------------------------------------------------------------------

_KINDS = {"event": _trace_event, "egress": _egress, "review": _review, "finding": _finding_record,
          "container": _container, "trace": _traced_command}
NOT_EVENTS = frozenset(("summary",))  # kp-trace --summary's counts: nothing that happened


def _base(item: Item) -> Item:
    """An item no class fits: a Base Event that carries all of it in unmapped."""
    kind = item.get("kind")
    ev = _Event(item, 0, 99, f"Unmapped {kind}" if type(kind) is str and kind.isidentifier() else "Unmapped")
    ev.metadata("kodepipe", profiles=False)
    ev.time()
    ev.severity(0)
    ev.status(0)
    ev.out["unmapped"] = dict(item)
    return ev.out


def _map(item: Item) -> Item | None:
    """``event`` without its last line of defence (the tests call this, so no bug can hide)."""
    kind = item.get("kind")
    if type(kind) is not str:
        return _base(item)
    if kind in NOT_EVENTS:
        return None
    builder = _KINDS.get(kind)
    mapped = builder(item) if builder is not None else None
    return mapped if mapped is not None else _base(item)


def event(item: dict[str, Any]) -> dict[str, Any] | None:
    """One timeline item (a kp-trace event, an egress decision, a review log entry, a finding or
    the run record) as one OCSF event; None for what is not an event (not an object, a summary).
    Never raises: an item no class fits, or one that trips a bug here, is a Base Event with the
    whole item in ``unmapped``."""
    if not isinstance(item, dict):  # a caller's bug or a stray line: not an event
        return None  # type: ignore[unreachable]
    try:
        return _map(item)
    except Exception:  # the stream goes on: this item is kept, whole, in unmapped
        return _base(item)
