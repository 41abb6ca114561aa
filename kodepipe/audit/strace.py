"""A pure, streaming parser of strace's text output into JSON-ready events.

strace has no structured output, so this reads what ``strace -f -ttt -T -yy``
prints (``CAPTURE_FLAGS``; ``-tt``, no timestamps, no ``-T`` and strace's
stderr format with ``[pid N]`` prefixes are read as well) and turns each
system call, signal, exit and tracer message into one event dict (see
kodepipe-events(7) for the schema).  No I/O here: ``Parser.feed`` takes a
line and returns the events it completes; the kp-trace command does the
reading and writing.

The common shapes go through one regular expression each (the fast path);
argument lists with nested structures, parentheses or odd decorations go
through a small tokenizer.  A line that fits no shape becomes a
``parse_error`` event carrying the raw text: never dropped, never a crash.

Process context: strace prints thread ids.  The parser follows clone/fork
returns, CLONE_THREAD and execve to give every event the process (thread
group) id, its parent, its executable and an ``exec_id``: a number, unique
within one trace, that changes when a process is created or execs, so two
processes that happened to reuse a pid never share one.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Iterator
from typing import Any

SCHEMA = 1

# What the capture side runs: follow forks, absolute microsecond timestamps,
# time spent in each call, fds decorated with paths and socket endpoints,
# strings up to 256 bytes.  Written with -o to a file, so strace's own
# messages ("Process N attached") never cut a line in two, as they do on a
# terminal.  Not -qq: the exit and kill lines are needed.  Not -X verbose:
# the symbolic flags (O_WRONLY|O_CREAT) are what the decoding reads, and raw
# numbers would only make lines longer.  Not -v: environments stay
# "/* 35 vars */", so secrets in them do not land in the audit log.
CAPTURE_FLAGS = ("-f", "-ttt", "-T", "-yy", "-s", "256")

# Capture modes of kp-trace (and a later kp-run --audit): strace arguments,
# and what the mode cannot see (said in the first record of the output).
FILE_EXTRA = "fchmod,fchown,ftruncate,fchdir,mount,umount2,ptrace,kill,tkill,tgkill"
# The default mode's system calls: every one that creates, changes, moves, links or removes a file
# or opens one (a file written is seen at its open, by its flags), runs a program, makes or ends a
# process, sends a signal or touches a socket.  Not the calls that only look (stat, access,
# readlink, getcwd) nor the waits: they change nothing, and under a tracer each costs a stop (a git
# status makes one lstat per tracked file; a shell one wait per command).
DEFAULT_CALLS = (
    "open,openat,openat2,creat,open_by_handle_at,name_to_handle_at,memfd_create,"
    "truncate,ftruncate,fallocate,unlink,unlinkat,rmdir,rename,renameat,renameat2,link,linkat,"
    "symlink,symlinkat,mkdir,mkdirat,mknod,mknodat,chmod,fchmod,fchmodat,chown,lchown,fchown,fchownat,"
    "utime,utimes,utimensat,futimesat,setxattr,lsetxattr,fsetxattr,removexattr,lremovexattr,fremovexattr,"
    "chdir,fchdir,chroot,mount,umount2,pivot_root,swapon,swapoff,acct,quotactl,"
    "open_tree,move_mount,fsopen,fsconfig,fsmount,fspick,mount_setattr,"
    "execve,execveat,fork,vfork,clone,clone3,exit,exit_group,unshare,setns,"
    "kill,tkill,tgkill,rt_sigqueueinfo,rt_tgsigqueueinfo,pidfd_send_signal,pidfd_open,pidfd_getfd,ptrace,"
    "process_vm_writev,"
    # newer than some strace builds (6.1 lacks them): '?' lets an strace that does not know a name go on
    "?fchmodat2,?setxattrat,?removexattrat,"
    "%network")
MODES: dict[str, tuple[str, ...]] = {
    "minimal": ("--seccomp-bpf", "-e", "trace=%process,kill,tkill,tgkill"),
    "default": ("--seccomp-bpf", "-e", f"trace={DEFAULT_CALLS}"),
    "full": (),
}
BLIND: dict[str, list[str]] = {
    "minimal": [
        "files: no opens, reads, writes, renames, deletions or permission changes",
        "network: no sockets, connects or sends",
        "system calls other than fork/clone/exec/exit/wait/kill",
        "system calls that another seccomp filter denied with an errno",
    ],
    "default": [
        "data: reads and writes on descriptors already open (files written are seen at open, by their flags)",
        "calls that only look at a file (stat, access, readlink) and waits for a child (its end is seen)",
        "memory mapping, ioctl, polling and other system calls outside the file, process and network sets",
        "system calls that another seccomp filter denied with an errno (strace's own filter never sees them)",
    ],
    "full": [
        "nothing is filtered, but a denial by a seccomp filter that returns EPERM looks like any other EPERM "
        "(only SECCOMP_RET_TRAP/KILL show, as SIGSYS); the traced program runs many times slower",
    ],
}
ATTACHED_NOTE = ("--seccomp-bpf does not apply to processes attached with -p: every mode then stops "
                 "the tracee at each system call, and the filtering is done by -e only (kp-run --audit attaches "
                 "so in a VM, and on a Podman service kodepipe did not start: the record's audit_tracer is "
                 "\"attached\"; on its own service strace starts the container's runtime, and the filter applies)")


def attach_argv(mode: str, log: str, pid: int) -> list[str]:
    """strace's arguments (the program's name not included) for kp-run --audit on every backend: the
    capture flags and ``mode``'s system calls, the log written to ``log`` (strace's own file: it goes
    on recording if kp-run dies), attached to ``pid`` and all it starts.  --seccomp-bpf is left out: it
    applies only to processes strace starts (ATTACHED_NOTE)."""
    return [*CAPTURE_FLAGS, *[a for a in MODES[mode] if a != "--seccomp-bpf"], "-o", log, "-p", str(pid)]


# how a wrapper begins: kp-run knows one by it (engine.Engine.plan_create)
WRAPPER_HEAD = ("#!/bin/sh\n"
                "# kodepipe's Podman service runs its containers with this OCI runtime (kodepipe.audit.strace)\n")


def runtime_wrapper(runtime: str, plans: str) -> str:
    """The OCI runtime of kodepipe's own Podman service (a shell script named as ``runtime``, whose
    name Podman reads as the runtime's kind): every command goes to ``runtime``, except the
    ``create`` of a container that kp-run --audit left a plan for (``plans``/ID), which the plan
    runs (``runtime_plan``), given the runtime first."""
    import shlex

    return (WRAPPER_HEAD +
            f"runtime={shlex.quote(runtime)} plans={shlex.quote(plans)}\n"
            'for id; do :; done\n'
            'case " $* " in *" create "*)\n'
            '    case $id in *[!0-9a-f]*|"") ;;\n'
            '    *) [ -f "$plans/$id" ] && exec /bin/sh "$plans/$id" "$runtime" "$@" ;; esac ;;\n'
            "esac\n"
            'exec "$runtime" "$@"\n')


def runtime_plan(strace: str, mode: str, log: str, errors: str) -> str:
    """kp-run --audit's plan for its container's ``create`` (run once by ``runtime_wrapper``, which
    removes it first, so that a later create of the same container can never run it again): the
    runtime under strace.

    strace starts the runtime itself, so --seccomp-bpf applies: its filter is installed in the
    runtime before the container exists, and every process of the container inherits it, so the
    agent stops only at the mode's system calls (attached with -p, it would stop at every one).
    ``-DDD``: the tracer is the runtime's grandchild, in a session of its own, so that ``create``
    returns while the container's first process, blocked until the start, is still traced.  It
    runs on the host, outside every namespace of the container.  strace's own messages go to
    ``errors``, never into the container's output: the runtime gets its stderr back through a
    trampoline.  What the runtime does before the agent's command starts is in the log too; the
    record says how many lines to skip (``setup_end``)."""
    import shlex

    argv = [strace, "-DDD", *CAPTURE_FLAGS, *MODES[mode], "-o", log, "--",
            "/bin/sh", "-c", 'exec 2>&3 3>&-; exec "$0" "$@"']
    return ('# kp-run --audit: this container is created under strace, once\n'
            'rm -f -- "$0"\n'
            'runtime=$1\n'
            'shift\n'
            f'exec 3>&2 2>>{shlex.quote(errors)}\n'
            f'exec {shlex.join(argv)} "$runtime" "$@"\n')


def setup_end(lines: Iterable[bytes], pid: int, limit: int = 1 << 20) -> int | None:
    """How many lines, in a log whose tracer started the OCI runtime, come before process ``pid``
    (the container's first) starts the agent's command (its first execve): the runtime's setup.
    None if no such line is among the first ``limit``."""
    start = f"{pid} ".encode()
    for number, line in enumerate(lines):
        if number >= limit:
            return None
        if line.startswith(start) and re.match(rb"\d+ +[\d.:]+ +execve(at)?\(", line):
            return number
    return None


EVENT_TYPES = ("exec", "file", "net", "process", "signal", "exit", "syscall", "attach", "detach", "tracer",
               "parse_error")

# -- regular expressions ----------------------------------------------------------------------------

_STR = r'"(?:[^"\\]|\\.)*"(?:\.\.\.)?'
_DECO = r"<(?:->(?=[\w\[])|<[^<>]*>|[^<>])*>"  # 3</path>, AT_FDCWD</dir>, 1</dev/null<char 1:3>>, <TCP:[a->b]>
_RET = (r"(-?\d+|0x[0-9a-f]+|\?)(<(?:->(?=[\w\[])|<[^<>]*>|[^<>])*>)?"
        r"(?: ([A-Z][A-Z0-9_]*) \(([^()]*)\))?(?: \((.*)\))?(?: <(\d+\.\d+|unavailable)>)?")

_PREFIX = re.compile(r"(?:\[pid +(\d+)\] |(\d+) +)?(?:(\d+\.\d+|\d\d:\d\d:\d\d(?:\.\d+)?) +)?")
# each match is everything opaque up to the next comma or bracket: plain text,
# strings, decorations and comments (possessive, so no backtracking), then
# that one character: a line costs one step per comma or bracket
_SPLIT = re.compile(r'(?:[^()\[\]{},"</]++|"[^"\\]*+(?:\\.[^"\\]*+)*+"'
                    r"|<[^<>-]*+(?:(?:->(?=[\w\[])|-|<[^<>]*+>)[^<>-]*+)*+>"
                    r"|/\*.*?\*/|[</])*+([()\[\]{},])")
_RET_RE = re.compile(rf"\s*=\s{_RET}")

# The fast path matches a whole call, arguments and return value, with one
# regular expression and takes the arguments from its groups: no Python loop
# per comma.  Its tokens are _SPLIT's (same strings, decorations, comments,
# lone < and /), each atomic so the match is the one split_args would make;
# brackets nest up to _FAST_DEPTH deep; more than _FAST_ARGS arguments or an
# empty one ("a, , b" or "a, )") do not match: such lines go to split_args,
# whose answer this must always equal (an argument is everything between two
# top-level commas, stripped: here it starts and ends with a token, never with
# a space).  tests/test_strace.py checks the two agree on mangled lines.
_FAST_DEPTH = 6
_OPAQUE = (r'"[^"\\]*+(?:\\.[^"\\]*+)*+"'
           r"|<[^<>-]*+(?:(?:->(?=[\w\[])|-|<[^<>]*+>)[^<>-]*+)*+>"
           r"|/\*.*?\*/|[</]")
_NESTED = r"[(\[{](?>[^()\[\]{}\"</]++|" + _OPAQUE + r")*+[)\]}]"
for _ in range(_FAST_DEPTH - 1):
    _NESTED = r"[(\[{](?>[^()\[\]{}\"</]++|" + _OPAQUE + "|" + _NESTED + r")*+[)\]}]"
_UNIT = r"(?>[^\s()\[\]{},\"</]++|" + _OPAQUE + "|" + _NESTED + ")"
_ARG = _UNIT + r"(?:\s*+" + _UNIT + ")*+"
_FAST_ARGS = 6  # system calls take at most six: groups 1-6 of _FAST_TAIL (4-9 of _FAST_LINE), None when absent
_FAST_LIST = ""
for _ in range(_FAST_ARGS - 1):
    _FAST_LIST = rf"(?:\s*+,\s*+({_ARG}){_FAST_LIST})?"
_FAST_TAIL = re.compile(rf"\s*+(?:({_ARG}){_FAST_LIST})?\s*+\)\s*=\s{_RET}")
# a whole line: tid, time, name, then _FAST_TAIL's groups
_FAST_LINE = re.compile(r"(\d+) +(\d+\.\d+) ([a-z_][a-z0-9_]*)\(" + _FAST_TAIL.pattern)
_UNFINISHED_LEN = len(" <unfinished ...>")
_RESUMED_LINE = re.compile(r"(\d+) +(\d+\.\d+) <\.\.\. ([a-z_][a-z0-9_]*) resumed> ?")
_COMMON = re.compile(r"(\d+) +(\d+\.\d+) ([a-z_][a-z0-9_]*)\(")
_NAME = re.compile(r"([a-z_][a-z0-9_]*)\(")
_RESUMED = re.compile(r"<\.\.\. ([a-z_][a-z0-9_]*) resumed> ?")
_EXIT = re.compile(r"\+\+\+ (?:exited with (-?\d+)|killed by (SIG\w+|\d+)( \(core dumped\))?"
                   r"|superseded by execve in pid (\d+)) \+\+\+")
_SIGNAL = re.compile(r"--- (?:(SIG\w+|\d+) (\{.*\})|stopped by (SIG\w+)) ---")
_TRACER = re.compile(r"strace: Process (\d+) (attached|detached|suspended)")
_FD_ARG = re.compile(rf"(-?\d+|AT_FDCWD)({_DECO})?")
_INET = re.compile(r'sin6?_port=htons\((\d+)\)')
_INET4 = re.compile(r'inet_addr\("([^"]*)"\)')
_INET6 = re.compile(r'inet_pton\(AF_INET6, "([^"]*)"')
_FAMILY = re.compile(r"sa_family=(\w+)")
_SUN = re.compile(rf"sun_path=(@?)({_STR})")
_SOCKADDR = re.compile(r"\{sa_family=")
_KV = re.compile(rf"(\w+)=({_STR}|\[[^\]]*\]|[^,{{}}]*)")

_UNFINISHED = " <unfinished ...>"
_DETACHED = "<detached ...>"

# -- decoding helpers -----------------------------------------------------------------------------------


def unquote(text: str) -> str:
    """A C string as strace prints it ("a\\tb\\303\\251"...) -> its text.

    Every C escape is read (\\n \\t \\" \\\\ \\xHH and octal); bytes that are
    not UTF-8 come out as \\xHH.  A trailing ... (strace's truncation mark)
    and the quotes are dropped; anything not quoted is returned as it is.
    """
    if text.endswith("..."):
        text = text[:-3]
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    body = text[1:-1]
    if "\\" not in body:
        return body
    raw = _ESCAPE.sub(_unescape, body.encode("utf-8", "backslashreplace"))
    return raw.decode("utf-8", "backslashreplace")


_ESCAPE = re.compile(rb"\\(x[0-9a-fA-F]{1,2}|[0-7]{1,3}|.?)", re.S)
_SIMPLE = {b"n": b"\n", b"t": b"\t", b"r": b"\r", b"v": b"\v", b"f": b"\f", b"a": b"\a", b"b": b"\b",
           b"e": b"\x1b"}


def _unescape(m: re.Match[bytes]) -> bytes:
    code = m.group(1)
    if code[:1] == b"x":
        return bytes((int(code[1:], 16),))
    if code[:1].isdigit():
        return bytes((int(code, 8) & 0xFF,))
    return _SIMPLE.get(code, code)  # \\ \" \' \? and anything unknown stand for themselves


def undecorate(text: str) -> tuple[str, str | None]:
    """'3</etc/passwd>' -> ('3', '/etc/passwd'); 'AT_FDCWD</tmp>' -> ('AT_FDCWD', '/tmp')."""
    i = text.find("<")
    if i < 0 or not text.endswith(">"):
        return text, None
    inner = text[i + 1:-1]
    if inner.endswith(">") and "<" in inner and inner.startswith("/"):
        inner = inner[:inner.rfind("<")]  # /dev/null<char 1:3>
    if "\\" in inner:
        inner = unquote('"' + inner + '"')
    return text[:i], inner


def split_args(text: str, start: int = 0) -> tuple[list[str], int]:
    """Split a raw argument list at top-level commas, up to its closing ')'.

    Returns the arguments (stripped) and the index just after the ')', or -1
    when the text ends first (an unfinished call).  Strings, fd decorations,
    comments, {structures}, [arrays] and (parentheses) are kept whole.  Only
    the tokens that matter are visited: the regex skips plain text.
    """
    args: list[str] = []
    depth = 0
    begin = start
    for m in _SPLIT.finditer(text, start):
        c = m.group(1)
        if c == ",":
            if depth == 0:
                args.append(text[begin:m.start(1)].strip())
                begin = m.end()
        elif c in "([{":
            depth += 1
        elif depth == 0:
            piece = text[begin:m.start(1)].strip()
            if piece or args:
                args.append(piece)
            return args, m.end()
        else:
            depth -= 1
    piece = text[begin:].strip()
    if piece:  # an unfinished call ends with "arg, ": no empty last argument
        args.append(piece)
    return args, -1


def sockaddr(text: str) -> dict[str, Any] | None:
    """Decode strace's rendering of a struct sockaddr into {family, address, port} or {family, path}."""
    i = text.find("{sa_family=")
    if i < 0:
        return None
    text = text[i:]
    fam = _FAMILY.match(text, 1)
    if fam is None:
        return None
    family = fam.group(1)
    out: dict[str, Any] = {"family": family}
    if family == "AF_INET" or family == "AF_INET6":
        addr = (_INET4 if family == "AF_INET" else _INET6).search(text)
        port = _INET.search(text)
        out["address"] = addr.group(1) if addr else None
        out["port"] = int(port.group(1)) if port else None
    elif family == "AF_UNIX":
        sun = _SUN.search(text)
        if sun:
            out["path"] = sun.group(1) + unquote(sun.group(2))
    else:
        out["raw"] = text[:text.find("}") + 1] if "}" in text else text
    return out


def _flat_struct(text: str) -> dict[str, Any]:
    """{a=1, b=X} -> {'a': 1, 'b': 'X'} (one level; nested values kept raw)."""
    out: dict[str, Any] = {}
    for key, value in _KV.findall(text.strip()[1:-1]):
        if value.startswith('"'):
            out[key] = unquote(value)
        else:
            try:
                out[key] = int(value)
            except ValueError:
                out[key] = value
    return out


def _int(text: str) -> int | None:
    try:
        return int(text, 0)
    except ValueError:
        return None


# syscall -> (event type, op)
_FILE_OPS: dict[str, str] = {}
for _op, _names in {
    "open": "open openat openat2 creat open_by_handle_at",
    "read": "read pread64 readv preadv preadv2",
    "write": "write pwrite64 writev pwritev pwritev2",
    "stat": "stat lstat fstat newfstatat statx statfs fstatfs",
    "access": "access faccessat faccessat2",
    "readlink": "readlink readlinkat",
    "unlink": "unlink unlinkat",
    "rmdir": "rmdir",
    "rename": "rename renameat renameat2",
    "link": "link linkat",
    "symlink": "symlink symlinkat",
    "mkdir": "mkdir mkdirat",
    "mknod": "mknod mknodat",
    "chmod": "chmod fchmod fchmodat fchmodat2",
    "chown": "chown lchown fchown fchownat",
    "truncate": "truncate ftruncate",
    "chdir": "chdir fchdir",
    "chroot": "chroot",
    "utime": "utime utimes utimensat futimesat",
    "xattr": "setxattr lsetxattr fsetxattr removexattr lremovexattr fremovexattr setxattrat removexattrat",
    "mount": "mount umount2 pivot_root",
}.items():
    for _n in _names.split():
        _FILE_OPS[_n] = _op

_NET_OPS = {n: n.rstrip("4").replace("sendmmsg", "sendmsg").replace("recvmmsg", "recvmsg") for n in (
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4", "sendto", "sendmsg", "sendmmsg",
    "recvfrom", "recvmsg", "recvmmsg", "shutdown")}
_NET_ADDR_ARG = {"connect": 1, "bind": 1, "sendto": 4, "accept": 1, "accept4": 1, "recvfrom": 4}
_PROC_OPS = {"fork": "fork", "vfork": "fork", "clone": "clone", "clone3": "clone", "kill": "kill",
             "tkill": "kill", "tgkill": "kill", "exit": "exit", "exit_group": "exit", "wait4": "wait",
             "waitid": "wait", "ptrace": "ptrace", "setuid": "setuid", "setgid": "setgid",
             "setresuid": "setuid", "setresgid": "setgid", "prctl": "prctl", "seccomp": "seccomp",
             "unshare": "unshare", "setns": "setns"}
# syscall -> event type, for those that are not plain "syscall" events
_KINDS: dict[str, str] = {**dict.fromkeys(_PROC_OPS, "process"), **dict.fromkeys(("execve", "execveat"), "exec"),
                          **dict.fromkeys(_NET_OPS, "net"), **dict.fromkeys(_FILE_OPS, "file")}
_CLONES = frozenset(("fork", "vfork", "clone", "clone3"))
_EXECS = frozenset(("execve", "execveat"))
_DENIED = frozenset(("EACCES", "EPERM"))
_WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND")
# (path argument, dirfd argument) of the path-taking file calls
_PATH_ARGS: dict[str, tuple[int, int | None]] = {
    "open": (0, None), "creat": (0, None), "openat": (1, 0), "openat2": (1, 0), "stat": (0, None),
    "lstat": (0, None), "newfstatat": (1, 0), "statx": (1, 0), "statfs": (0, None), "access": (0, None),
    "faccessat": (1, 0), "faccessat2": (1, 0), "readlink": (0, None), "readlinkat": (1, 0),
    "unlink": (0, None), "unlinkat": (1, 0), "rmdir": (0, None), "rename": (0, None), "renameat": (1, 0),
    "renameat2": (1, 0), "link": (0, None), "linkat": (1, 0), "symlink": (1, None), "symlinkat": (2, 1),
    "mkdir": (0, None), "mkdirat": (1, 0), "mknod": (0, None), "mknodat": (1, 0), "chmod": (0, None),
    "fchmodat": (1, 0), "fchmodat2": (1, 0), "chown": (0, None), "lchown": (0, None), "fchownat": (1, 0),
    "truncate": (0, None), "setxattrat": (1, 0), "removexattrat": (1, 0),
    "chdir": (0, None), "chroot": (0, None), "utime": (0, None), "utimes": (0, None), "utimensat": (1, 0),
    "futimesat": (1, 0), "setxattr": (0, None), "lsetxattr": (0, None), "removexattr": (0, None),
    "lremovexattr": (0, None), "mount": (1, None), "umount2": (0, None), "execve": (0, None),
    "execveat": (1, 0),
}
# second path of rename/link (target), and the target string of symlink
_TARGET_ARGS: dict[str, tuple[int, int | None]] = {
    "rename": (1, None), "renameat": (3, 2), "renameat2": (3, 2), "link": (1, None), "linkat": (3, 2),
    "symlink": (0, None), "symlinkat": (0, None),
}


class Proc:
    """One traced process (a thread group): what events are attributed to."""

    __slots__ = ("cwd", "exe", "exec_id", "pid", "ppid")

    def __init__(self, pid: int | None, ppid: int | None, exe: str | None, exec_id: int,
                 cwd: str | None = None) -> None:
        self.pid = pid
        self.ppid = ppid
        self.exe = exe
        self.exec_id = exec_id
        self.cwd = cwd


class _Pending:
    __slots__ = ("args", "line", "name", "ts")

    def __init__(self, name: str, args: str, ts: float | None, line: int) -> None:
        self.name = name
        self.args = args
        self.ts = ts
        self.line = line


Event = dict[str, Any]


class Parser:
    """Feed it lines of strace output; it returns events as calls complete.

    Unfinished calls are held until their "<... resumed>" line (and emitted
    with the start's line number and time); whatever is still pending when
    a thread exits or the input ends is emitted with outcome "unfinished".
    """

    def __init__(self) -> None:
        self.lineno = 0
        self.raw = ""
        self.procs: dict[int | None, Proc] = {}  # thread id -> its process
        self.pending: dict[int | None, _Pending] = {}
        self.exec_seq = 0
        self.cut: tuple[int | None, float | None, str, int] | None = None  # a line cut by a tracer message

    # -- process context ---------------------------------------------------------------------

    def _new_exec(self) -> int:
        self.exec_seq += 1
        return self.exec_seq

    def _proc(self, tid: int | None) -> Proc:
        proc = self.procs.get(tid)
        if proc is not None:
            return proc
        if tid is not None and None in self.procs and not self._parent_pending():
            # strace on stderr prints no pid while it traces one process; the
            # first prefixed line of an unexplained pid names that process
            proc = self.procs.pop(None)
            proc.pid = tid
            self.procs[tid] = proc
            if None in self.pending:
                self.pending[tid] = self.pending.pop(None)
            return proc
        parent = self._parent_pending()
        if parent is not None:
            ptid, pending = parent
            pproc = self.procs[ptid]
            proc = self._child(pproc, tid, thread="CLONE_THREAD" in pending.args)
        else:
            proc = Proc(tid, None, None, self._new_exec())
        self.procs[tid] = proc
        return proc

    def _parent_pending(self) -> tuple[int | None, _Pending] | None:
        # a child often shows up before its parent's clone() returns: the most
        # recent unfinished clone/fork is taken to be its origin
        found = None
        if self.cut is not None and _NAME.match(self.cut[2]) and _split_head(self.cut[2])[0] in _CLONES:
            ctid, cts, head, cline = self.cut
            found = (ctid, _Pending(*_split_head(head), cts, cline))
        for tid, pending in self.pending.items():
            if pending.name in _CLONES and (found is None or pending.line > found[1].line):
                found = (tid, pending)
        return found

    def _child(self, parent: Proc, tid: int | None, *, thread: bool) -> Proc:
        if thread:
            return parent
        return Proc(tid, parent.pid, parent.exe, self._new_exec(), parent.cwd)

    def _bare_tid(self) -> int | None:
        alive = [t for t in self.procs if t is not None]
        if len(alive) == 1 and None not in self.procs:
            return alive[0]
        if None in self.procs or not alive:
            return None
        return alive[-1]

    def _context(self, kind: str, tid: int | None, ts: float | None, line: int) -> Event:
        proc = self._proc(tid)
        return {"kind": "event", "schema": SCHEMA, "type": kind, "line": line, "ts": ts, "pid": proc.pid,
                "tid": tid, "ppid": proc.ppid, "exe": proc.exe, "exec_id": proc.exec_id, "denied": False}

    # -- lines ----------------------------------------------------------------------------------

    def feed(self, line: str) -> list[Event]:
        """Parse one line (with or without its newline); return the events it completes."""
        self.lineno += 1
        self.raw = line = line.rstrip("\r\n")
        try:
            if self.cut is None:
                # fast paths: "PID TIME name(args) = ret <dur>", what kp-trace
                # captures, and the two halves of such a call cut by another thread
                if line.endswith(_UNFINISHED):
                    m = _COMMON.match(line)
                    if m is not None:
                        tid = int(m.group(1))
                        self._proc(tid)  # a child's first line may be unfinished
                        self.pending[tid] = _Pending(m.group(3), line[m.end():-_UNFINISHED_LEN],
                                                     float(m.group(2)), self.lineno)
                        return []
                else:
                    c = _FAST_LINE.fullmatch(line)
                    if c is not None:
                        g = c.groups()
                        return [self._event(g[2], list(filter(None, g[3:9])), g[9], g[10], g[11], g[14],
                                            int(g[0]), float(g[1]), self.lineno)]
                    r = _RESUMED_LINE.match(line)
                    if r is not None:
                        return self._resumed(r.group(3), line[r.end():], int(r.group(1)), float(r.group(2)))
                    m = _COMMON.match(line)
                    if m is not None:
                        args, end = split_args(line, m.end())
                        r = _RET_RE.fullmatch(line, end) if end > 0 else None
                        if r is not None:
                            value, deco, errno, _errmsg, _comment, dur = r.groups()
                            return [self._event(m.group(3), args, value, deco, errno, dur, int(m.group(1)),
                                                float(m.group(2)), self.lineno)]
            if not line.strip():
                return []
            return self._line(line)
        except Exception as exc:  # a bug or a shape never seen: keep the line, say why
            return [self._error(line, f"{type(exc).__name__}: {exc}", None, None)]

    def _line(self, line: str) -> list[Event]:
        m = _PREFIX.match(line)
        if m is None:  # cannot happen: everything in the prefix is optional
            return [self._error(line, "no prefix", None, None)]
        pid_text = m.group(1) or m.group(2)
        body = line[m.end():]
        ts = _timestamp(m.group(3)) if m.group(3) else None
        if pid_text is not None:
            tid: int | None = int(pid_text)
        elif body.startswith("strace: "):
            tid = None
        else:
            tid = self._bare_tid()
        if self.cut is not None and not body.startswith("strace: "):
            ctid, cts, head, cline = self.cut
            self.cut = None
            rest = line.lstrip() if line.lstrip() == _DETACHED else line
            return self._body(head + rest, ctid, cts, cline, line)
        return self._body(body, tid, ts, self.lineno, line)

    def _body(self, body: str, tid: int | None, ts: float | None, lineno: int, line: str) -> list[Event]:
        c = body[:1]
        if c == "<":
            r = _RESUMED.match(body)
            if r is not None:
                return self._resumed(r.group(1), body[r.end():], tid, ts)
        elif c == "+":
            return self._exit(body, tid, ts, line)
        elif c == "-":
            return self._signal(body, tid, ts, line)
        elif body.startswith("strace: "):
            return self._tracer(body, ts, line)
        elif c.isalpha() or c == "_":
            return self._syscall(body, tid, ts, lineno)
        return [self._error(line, "not a line strace prints", tid, ts)]

    def _error(self, line: str, reason: str, tid: int | None, ts: float | None) -> Event:
        return {"kind": "event", "schema": SCHEMA, "type": "parse_error", "line": self.lineno, "ts": ts,
                "pid": tid, "tid": tid, "raw": self.raw, "reason": reason, "denied": False}

    def _syscall(self, body: str, tid: int | None, ts: float | None, line: int) -> list[Event]:
        if body.endswith(_UNFINISHED):
            n = _NAME.match(body)
            if n is None:
                return [self._error(body, "unfinished call without a name", tid, ts)]
            self._proc(tid)  # a child's first line may be unfinished
            self.pending[tid] = _Pending(n.group(1), body[n.end():-len(_UNFINISHED)], ts, line)
            return []
        i = body.find("(")
        name = body[:i]
        if i <= 0 or not name.isidentifier():
            return [self._error(body, "not a system call", tid, ts)]
        args, end = split_args(body, i + 1)
        if end > 0:
            r = _RET_RE.fullmatch(body, end)
            if r is not None:
                value, deco, errno, _errmsg, _comment, dur = r.groups()
                return [self._event(name, args, value, deco, errno, dur, tid, ts, line)]
            return [self._error(body, "unreadable return value", tid, ts)]
        cut = body.find("strace: Process ")
        if cut > 0:  # strace on a terminal: its message cut this line; the rest follows
            self.cut = (tid, ts, body[:cut], line)
            return self._tracer(body[cut:], ts, body[cut:])
        if body.endswith(_DETACHED):
            args, _ = split_args(body[:-len(_DETACHED)], i + 1)
            return [self._event(name, args, "", None, None, None, tid, ts, line, "detached")]
        return [self._error(body, "no closing parenthesis", tid, ts)]

    def _resumed(self, name: str, rest: str, tid: int | None, ts: float | None) -> list[Event]:
        pending = self.pending.pop(tid, None)
        if pending is not None and pending.name != name:
            self.pending[tid] = pending  # not ours; keep it (should not happen)
            pending = None
        if pending is None:
            # the resumed call was started by another thread (a thread's
            # execve resumes in the leader) or before the trace began
            text, start_ts, start_line = rest, ts, self.lineno
        else:
            text, start_ts, start_line = pending.args + rest, pending.ts, pending.line
        if not text.endswith(_UNFINISHED):
            c = _FAST_TAIL.fullmatch(text)
            if c is not None:
                g = c.groups()
                return [self._event(name, list(filter(None, g[:6])), g[6], g[7], g[8], g[11], tid, start_ts,
                                    start_line)]
        return self._syscall(f"{name}({text}", tid, start_ts, start_line)

    def _event(self, name: str, args: list[str], value: str, deco: str | None, errno: str | None,
               dur: str | None, tid: int | None, ts: float | None, line: int, outcome: str | None = None) -> Event:
        """One call: value, deco, errno and dur are _RET's groups; outcome is given for one that never returned."""
        if outcome is None:
            if value == "?":
                outcome = "interrupted" if errno else "unknown"
            elif errno:
                outcome = "error"
            else:
                outcome = "ok"
        ret = value + deco if deco else value
        duration = float(dur) if dur and dur != "unavailable" else None
        proc = self.procs.get(tid)
        if proc is None:
            proc = self._proc(tid)
        kind = _KINDS.get(name, "syscall")
        ev: Event = {"kind": "event", "schema": SCHEMA, "type": kind, "line": line, "ts": ts, "pid": proc.pid,
                     "tid": tid, "ppid": proc.ppid, "exe": proc.exe, "exec_id": proc.exec_id,
                     "syscall": name, "args": args, "ret": ret, "outcome": outcome, "errno": errno,
                     "denied": errno in _DENIED, "duration": duration}
        if kind == "syscall":
            return ev
        if kind == "file":
            self._file(ev, name, args, ret, proc)
        elif kind == "net":
            self._net(ev, name, args, ret)
        elif kind == "exec":
            self._exec(ev, name, args, outcome, proc, tid)
        else:
            self._process(ev, name, args, ret, outcome, proc, tid)
        return ev

    # -- decoding by kind --------------------------------------------------------------------------

    def _path(self, name: str, args: list[str], table: dict[str, tuple[int, int | None]], proc: Proc) -> str | None:
        spec = table.get(name)
        if spec is None or spec[0] >= len(args):
            return None
        arg = args[spec[0]]
        if not arg.startswith('"'):
            return None
        path = unquote(arg)
        base = None
        if spec[1] is not None and spec[1] < len(args):
            dirfd, base = undecorate(args[spec[1]])
            if dirfd == "AT_FDCWD" and base is not None:
                proc.cwd = base
        elif proc.cwd is not None:
            base = proc.cwd
        if base is not None and not path.startswith("/") and base.startswith("/"):
            while path.startswith("./"):
                path = path[2:]
            path = posixpath.join(base, path) if path else base
        return path

    def _file(self, ev: Event, name: str, args: list[str], ret: str, proc: Proc) -> None:
        op = _FILE_OPS[name]
        ev["op"] = op
        path = self._path(name, args, _PATH_ARGS, proc)
        if path is None and args:
            fd, deco = undecorate(args[0])
            if deco is not None:
                path = deco
                ev["fd"] = _int(fd)
        ev["path"] = path
        if name in _TARGET_ARGS:
            ev["target"] = self._path(name, args, _TARGET_ARGS, proc)
        if op == "open":
            flags = args[2] if name in ("openat", "openat2") and len(args) > 2 else (
                args[1] if len(args) > 1 else "")
            ev["flags"] = flags
            ev["write"] = name == "creat" or any(f in flags for f in _WRITE_FLAGS)
            fd, deco = undecorate(ret)
            ev["fd"] = _int(fd) if ev["outcome"] == "ok" else None
            if deco is not None:
                ev["resolved"] = deco  # the kernel's name for what was opened (symlinks followed)
        elif op == "read" or op == "write":
            ev["bytes"] = _int(ret) if ev["outcome"] == "ok" else None
            if path is None or not path.startswith("/"):
                ev["type"] = "syscall"  # a pipe, socket or anonymous inode: not a file
        elif name == "unlinkat" and len(args) > 2 and "AT_REMOVEDIR" in args[2]:
            ev["op"] = "rmdir"
        elif op == "chdir" and ev["outcome"] == "ok" and path is not None and path.startswith("/"):
            proc.cwd = path

    def _net(self, ev: Event, name: str, args: list[str], ret: str) -> None:
        ev["op"] = _NET_OPS[name]
        if name == "socket" or name == "socketpair":
            ev["family"] = args[0] if args else None
            fd, deco = undecorate(ret)
            ev["fd"] = _int(fd) if ev["outcome"] == "ok" else None
            ev["socket"] = deco
            return
        fd, deco = undecorate(args[0]) if args else ("", None)
        ev["fd"] = _int(fd)
        ev["socket"] = deco
        index = _NET_ADDR_ARG.get(name)
        if index is not None:
            ev["address"] = sockaddr(args[index]) if index < len(args) else None
        elif name in ("sendmsg", "sendmmsg", "recvmsg", "recvmmsg") and len(args) > 1:
            ev["address"] = sockaddr(args[1])
        if name.startswith("accept") and ev["outcome"] == "ok":
            peer_fd, ev["peer_socket"] = undecorate(ret)
            ev["peer_fd"] = _int(peer_fd)

    def _exec(self, ev: Event, name: str, args: list[str], outcome: str, proc: Proc, tid: int | None) -> None:
        ev["path"] = self._path(name, args, _PATH_ARGS, proc)
        index = 1 if name == "execve" else 2
        argv_text = args[index] if index < len(args) else ""
        argv: list[str] = []
        if argv_text.startswith("["):
            argv_args, _ = split_args(argv_text, 1)
            argv = [unquote(a) for a in argv_args if a.startswith('"')]
            ev["argv_truncated"] = argv_text.endswith("...]") or any(a.endswith('"...') for a in argv_args)
        ev["argv"] = argv
        if outcome == "ok":
            proc.exe = ev["path"]
            proc.exec_id = self._new_exec()
            ev["exe"] = proc.exe
            ev["exec_id"] = proc.exec_id
            ev["pid"] = proc.pid

    def _process(self, ev: Event, name: str, args: list[str], ret: str, outcome: str, proc: Proc,
                 tid: int | None) -> None:
        op = _PROC_OPS[name]
        ev["op"] = op
        if name in _CLONES:
            thread = "CLONE_THREAD" in (args[0] if name == "clone3" and args else " ".join(args))
            ev["thread"] = thread
            child = _int(ret) if outcome == "ok" else None
            ev["child"] = child
            known = self.procs.get(child) if child is not None else None
            if child is not None and known is None:
                self.procs[child] = self._child(proc, child, thread=thread)
            elif known is not None and known.ppid is None and known.exe is None and not thread:
                # seen before its parent's fork returned
                known.ppid, known.exe, known.cwd = proc.pid, proc.exe, proc.cwd
        elif op == "kill":
            target = args[1] if name == "tgkill" and len(args) > 1 else (args[0] if args else None)
            ev["target"] = _int(target) if target is not None else None
            ev["signal"] = args[-1] if args else None
        elif op == "exit":
            ev["code"] = _int(args[0]) if args else None

    # -- non-call lines ------------------------------------------------------------------------------

    def _exit(self, body: str, tid: int | None, ts: float | None, line: str) -> list[Event]:
        m = _EXIT.fullmatch(body)
        if m is None:
            return [self._error(line, "unknown +++ line", tid, ts)]
        out = self._flush(tid)
        ev = self._context("exit", tid, ts, self.lineno)
        code, signal, core, superseded = m.groups()
        if superseded is not None:
            # a thread execve'd: it takes over the leader's pid (this one), and
            # its unfinished execve resumes here
            old = int(superseded)
            ev["superseded_by"] = old
            ev["code"] = None
            ev["signal"] = None
            pending = self.pending.pop(old, None)
            if pending is not None:
                self.pending[tid] = pending
            self.procs.pop(old, None)
            return [*out, ev]
        ev["code"] = int(code) if code is not None else None
        ev["signal"] = signal
        ev["core_dumped"] = bool(core)
        ev["thread"] = tid != ev["pid"]
        self.procs.pop(tid, None)
        return [*out, ev]

    def _signal(self, body: str, tid: int | None, ts: float | None, line: str) -> list[Event]:
        m = _SIGNAL.fullmatch(body)
        if m is None:
            return [self._error(line, "unknown --- line", tid, ts)]
        ev = self._context("signal", tid, ts, self.lineno)
        if m.group(3):
            ev["signal"] = m.group(3)
            ev["stopped"] = True
            ev["info"] = None
            ev["denied"] = False
            return [ev]
        info = _flat_struct(m.group(2))
        ev["signal"] = m.group(1)
        ev["stopped"] = False
        ev["info"] = info
        ev["denied"] = m.group(1) == "SIGSYS" and info.get("si_code") == "SYS_SECCOMP"
        if ev["denied"]:
            ev["seccomp"] = True
            ev["syscall"] = str(info.get("si_syscall", "")).removeprefix("__NR_") or None
        return [ev]

    def _tracer(self, body: str, ts: float | None, line: str) -> list[Event]:
        m = _TRACER.match(body)
        if m is None:
            return [{"kind": "event", "schema": SCHEMA, "type": "tracer", "line": self.lineno, "ts": ts,
                     "pid": None, "tid": None, "denied": False, "message": body.removeprefix("strace: ")}]
        tid = int(m.group(1))
        kind = "attach" if m.group(2) == "attached" else "detach"
        out: list[Event] = []
        if kind == "detach" and tid in self.pending:
            pending = self.pending.pop(tid)
            args, _ = split_args(pending.args)
            out.append(self._event(pending.name, args, "", None, None, None, tid, pending.ts, pending.line, "detached"))
        if kind == "attach" and tid not in self.procs and None in self.procs and not self._parent_pending():
            self.procs[tid] = self._child(self.procs[None], tid, thread=False)  # stderr mode: a bare clone
        ev = self._context(kind, tid, ts, self.lineno)
        ev["message"] = body.removeprefix("strace: ")
        return [*out, ev]

    def _flush(self, tid: int | None) -> list[Event]:
        pending = self.pending.pop(tid, None)
        if pending is None:
            return []
        args, _ = split_args(pending.args)
        return [self._event(pending.name, args, "", None, None, None, tid, pending.ts, pending.line, "unfinished")]

    def unreadable(self, shown: str, reason: str) -> list[Event]:
        """A line that is not text strace could have written (a NUL byte, bytes that are not UTF-8, or
        longer than the reader's cap): counted as a line and reported as a parse_error event, with
        ``shown`` (an escaped, shortened form) as its raw text, so nothing is dropped silently."""
        self.lineno += 1
        self.raw = shown
        return [self._error(shown, reason, None, None)]

    def finish(self) -> list[Event]:
        """The end of the input: emit every call still unfinished."""
        out = []
        if self.cut is not None:
            ctid, cts, head, cline = self.cut
            self.cut = None
            self.pending[ctid] = _Pending(*_split_head(head), cts, cline)
        for tid in sorted(self.pending, key=lambda t: self.pending[t].line):
            out.extend(self._flush(tid))
        return out


def _split_head(head: str) -> tuple[str, str]:
    n = _NAME.match(head)
    return (n.group(1), head[n.end():]) if n else ("?", head)


def _timestamp(text: str) -> float:
    if ":" in text:  # -tt: seconds since midnight
        h, m, s = text.split(":")
        return int(h) * 3600 + int(m) * 60 + float(s)
    return float(text)


def parse(lines: Iterable[str]) -> Iterator[Event]:
    """Every event of a whole trace, in order."""
    parser = Parser()
    for line in lines:
        yield from parser.feed(line)
    yield from parser.finish()


# -- summaries ------------------------------------------------------------------------------------------

_CHANGES = frozenset(("write", "truncate", "rename", "unlink", "rmdir", "mkdir", "chmod", "chown", "symlink",
                      "link", "mknod", "utime", "xattr"))


class Summary:
    """Folds events into one item per file written, file read, program run,
    network destination and denied operation, and totals (kp-trace --summary)."""

    def __init__(self) -> None:
        self.written: dict[str, list[str]] = {}
        self.read: dict[str, int] = {}
        self.execs: dict[int, Event] = {}
        self.net: dict[tuple[Any, ...], Event] = {}
        self.denied: list[Event] = []
        self.types: dict[str, int] = {}
        self.events = 0

    def add(self, ev: Event) -> None:
        self.events += 1
        kind = ev["type"]
        self.types[kind] = self.types.get(kind, 0) + 1
        if ev.get("denied"):
            self.denied.append({"kind": "summary", "item": "denied", "type": kind, "syscall": ev.get("syscall"),
                                "path": ev.get("path"), "address": ev.get("address"), "errno": ev.get("errno"),
                                "signal": ev.get("signal"), "pid": ev["pid"], "exe": ev.get("exe"),
                                "line": ev["line"]})
        if kind == "file" and ev["outcome"] == "ok" and ev.get("path"):
            op = ev["op"]
            if (op == "open" and ev["write"]) or op in _CHANGES:
                for path in (ev["path"], ev.get("target")):
                    if path:
                        ops = self.written.setdefault(path, [])
                        if op not in ops:
                            ops.append(op)
            elif op == "open" or op == "read":
                self.read[ev["path"]] = self.read.get(ev["path"], 0) + 1
        elif kind == "exec" and ev["outcome"] == "ok":
            self.execs[ev["exec_id"]] = {"kind": "summary", "item": "exec", "path": ev["path"], "argv": ev["argv"],
                                         "pid": ev["pid"], "ppid": ev["ppid"], "exec_id": ev["exec_id"],
                                         "exit_code": None, "signal": None, "line": ev["line"]}
        elif kind == "exit" and ev["tid"] == ev["pid"] and ev["exec_id"] in self.execs and not ev.get("superseded_by"):
            item = self.execs[ev["exec_id"]]
            item["exit_code"], item["signal"] = ev["code"], ev["signal"]
        elif kind == "net" and ev.get("address") and ev["op"] in ("connect", "sendto", "sendmsg", "bind"):
            addr = ev["address"]
            key = (ev["op"], addr.get("family"), addr.get("address"), addr.get("port"), addr.get("path"))
            seen = self.net.get(key)
            if seen is None:
                self.net[key] = {"kind": "summary", "item": "net", "op": ev["op"], "address": addr, "count": 1,
                                 "outcomes": {ev["errno"] or ev["outcome"]: 1}}
            else:
                seen["count"] += 1
                out = ev["errno"] or ev["outcome"]
                seen["outcomes"][out] = seen["outcomes"].get(out, 0) + 1

    def items(self) -> Iterator[Event]:
        for path, ops in self.written.items():
            yield {"kind": "summary", "item": "file_written", "path": path, "ops": ops}
        for path, count in self.read.items():
            if path not in self.written:
                yield {"kind": "summary", "item": "file_read", "path": path, "count": count}
        yield from self.execs.values()
        yield from self.net.values()
        yield from self.denied
        yield {"kind": "summary", "item": "totals", "events": self.events, "by_type": self.types,
               "files_written": len(self.written), "files_read": len(set(self.read) - set(self.written)),
               "programs": len(self.execs), "destinations": len(self.net), "denied": len(self.denied),
               "parse_errors": self.types.get("parse_error", 0)}
