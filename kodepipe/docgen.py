"""Generate man pages and shell completions from the click commands.

    python -m kodepipe.docgen [ROOT]     (rewrites ROOT/man and ROOT/completions)

A test regenerates them into a temporary folder and fails when the
committed files differ, so the docs never drift from the options.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import click
from click.shell_completion import get_completion_class

from kodepipe import __version__
from kodepipe.commands import COMMANDS
from kodepipe.core import errors

DATE = "2026-11"  # fixed, so regenerating does not churn the files
SHELLS = {"bash": "{prog}", "zsh": "_{prog}", "fish": "{prog}.fish"}


def esc(text: str) -> str:
    """Escape text for roff: backslashes, and a leading dot or quote."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + ln) if ln[:1] in (".", "'") else ln for ln in text.split("\n"))


def paragraphs(help_text: str) -> str:
    """click help text (with \\b blocks kept verbatim) as roff paragraphs."""
    out = []
    for block in re.split(r"\n\s*\n", help_text.strip()):
        lines = block.split("\n")
        if lines[0].strip() == "\b":
            out.append(".PP\n.nf\n" + esc(_dedent(lines[1:])) + "\n.fi")
        else:
            out.append(".PP\n" + esc(" ".join(ln.strip() for ln in lines)))
    return "\n".join(out)


def _dedent(lines: list[str]) -> str:
    indent = min((len(ln) - len(ln.lstrip()) for ln in lines if ln.strip()), default=0)
    return "\n".join(ln[indent:] for ln in lines)


def _options(command: click.Command, ctx: click.Context) -> str:
    out = []
    for param in command.get_params(ctx):
        if not isinstance(param, click.Option):
            continue
        record = param.get_help_record(ctx)
        if record is None:
            continue
        names, help_text = record
        out.append(f".TP\n.B {esc(names)}\n{esc(help_text)}")
    return "\n".join(out)


def _synopsis(command: click.Command, ctx: click.Context, prog: str) -> str:
    pieces = " ".join(command.collect_usage_pieces(ctx))
    return f".B {esc(prog)}\n{esc(pieces)}"


def man_page(prog: str, command: click.Command) -> str:
    ctx = click.Context(command, info_name=prog, **command.context_settings)
    summary = command.get_short_help_str(limit=80).rstrip(".")
    parts = [
        f'.TH {prog.upper()} 1 "{DATE}" "kodepipe {__version__}" "kodepipe manual"',
        ".SH NAME", f"{esc(prog)} \\- {esc(summary)}",
        ".SH SYNOPSIS", _synopsis(command, ctx, prog),
        ".SH DESCRIPTION", paragraphs(command.help or ""),
        ".SH OPTIONS", _options(command, ctx),
    ]
    if isinstance(command, click.Group):
        parts.append(".SH COMMANDS")
        for name, sub in sorted(command.commands.items()):
            sub_ctx = click.Context(sub, info_name=name, parent=ctx, **sub.context_settings)
            parts += [f".SS {esc(prog)} {esc(name)} {esc(' '.join(sub.collect_usage_pieces(sub_ctx)))}",
                      paragraphs(sub.help or ""), _options(sub, sub_ctx)]
    parts += [".SH EXIT STATUS", _exit_statuses(),
              ".SH ENVIRONMENT", _environment(),
              ".SH SEE ALSO", ", ".join(f"\\fB{esc(p)}\\fR(1)" for p in COMMANDS if p != prog)
              + ", \\fBkodepipe\\fR(7)"]
    return "\n".join(parts) + "\n"


def _exit_statuses() -> str:
    return "\n".join(f".TP\n.B {code}\n{esc(text)}" for code, text in errors.EXIT_STATUSES)


# What each environment variable the code reads means.  Which variables are listed comes from the
# code (environment_names walks it): one read that is not here fails the generation, one here that
# nothing reads fails it too, so the page says exactly what kodepipe reads.
ENVIRONMENT = {
    "KODEPIPE_STATE_DIR": "where images, VMs and runs live (default $XDG_DATA_HOME/kodepipe, "
                          "else ~/.local/share/kodepipe)",
    "KODEPIPE_RUNTIME_DIR": "control sockets and pid files (default $XDG_RUNTIME_DIR/kodepipe, "
                            "else /tmp/kodepipe-UID); keep it short, socket paths are limited to 107 bytes",
    "KODEPIPE_CACHE_DIR": "downloaded packages, seccomp profiles and logs of failed builds "
                          "(default $XDG_CACHE_HOME/kodepipe, else ~/.cache/kodepipe)",
    "KODEPIPE_CONFIG_DIR": "user configuration and profiles (default $XDG_CONFIG_HOME/kodepipe, "
                           "else ~/.config/kodepipe)",
    "XDG_DATA_HOME": "see KODEPIPE_STATE_DIR (used only when it is an absolute path)",
    "XDG_RUNTIME_DIR": "see KODEPIPE_RUNTIME_DIR (used only when it is an absolute path)",
    "XDG_CACHE_HOME": "see KODEPIPE_CACHE_DIR (used only when it is an absolute path)",
    "XDG_CONFIG_HOME": "see KODEPIPE_CONFIG_DIR (used only when it is an absolute path)",
    "KODEPIPE_PODMAN_URL": "kp-run: the Podman service to use (unix:///PATH); else CONTAINER_HOST, else "
                           "kp-run starts its own",
    "CONTAINER_HOST": "kp-run: the Podman service to use, when KODEPIPE_PODMAN_URL is not set",
    "SUDO_UID": "run by root through sudo: the user whose uid the agent's files get (kp-run) and QEMU "
                "runs as for a share of theirs (kp-boot)",
    "SUDO_GID": "with SUDO_UID: that user's group",
    "SUDO_USER": "kp-run by root through sudo: that user's home is refused as a workspace, like root's",
    "TERM": "the terminal type given to kp-run -t and kp-ssh's interactive shell; \"dumb\" turns colour off",
    "NO_COLOR": "when set, messages and tables are never coloured",
    "KODEPIPE_TEST_STOP_AT": "for kodepipe's own tests only: kp-run stops itself at the named step",
    "KODEPIPE_TEST_APPLY_PAUSE": "for kodepipe's own tests only: kp-run --apply pauses at the named step",
}
# names the walk finds that are not environment variables kodepipe reads (none yet)
NOT_ENVIRONMENT: frozenset[str] = frozenset()


def _last_name(node: object) -> str:
    """``environ`` of ``os.environ``, ``env`` of ``env``: what a mapping is called, or ""."""
    import ast

    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def environment_names(root: Path | None = None) -> set[str]:
    """Every environment variable the code under ``root`` (the package) reads, found in its source:
    a KODEPIPE_*, XDG_* or SUDO_* string anywhere, and any NAME read as ``environ.get("NAME")``,
    ``environ["NAME"]``, ``"NAME" in environ``, ``getenv("NAME")``, or from a tuple of names a loop
    over reads (``for var in ("A", "B"): environ.get(var)``)."""
    import ast

    root = root or Path(__file__).resolve().parent
    name = re.compile(r"[A-Z][A-Z0-9_]*")
    ours = re.compile(r"(KODEPIPE|XDG|SUDO)_[A-Z0-9_]+")
    found: set[str] = set()

    def constants(node: ast.AST) -> list[str]:
        items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
        return [i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)
                and name.fullmatch(i.value)]

    for path in sorted(root.rglob("*.py")):
        if path.resolve() == Path(__file__).resolve():
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and ours.fullmatch(node.value):
                found.add(node.value)
            elif isinstance(node, ast.Call) and node.args and (
                    (isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                     and "env" in _last_name(node.func.value).lower())
                    or (isinstance(node.func, ast.Attribute) and node.func.attr == "getenv")
                    or (isinstance(node.func, ast.Name) and node.func.id == "getenv")):
                found.update(constants(node.args[0]))
            elif isinstance(node, ast.Subscript) and "environ" in ast.unparse(node.value):
                found.update(constants(node.slice))
            elif isinstance(node, ast.Compare) and any("environ" in ast.unparse(c) for c in node.comparators):
                found.update(constants(node.left))
            elif isinstance(node, ast.For) and "environ" in ast.unparse(node):
                found.update(constants(node.iter))
    return found - NOT_ENVIRONMENT


def _environment(test_hooks: bool = False) -> str:
    """The ENVIRONMENT section; the hooks of kodepipe's own tests only in kodepipe(7)."""
    return "\n".join(f".TP\n.B {name}\n{esc(text)}" for name, text in ENVIRONMENT.items()
                     if test_hooks or not name.startswith("KODEPIPE_TEST_"))


def check_environment(root: Path | None = None) -> None:
    """Raise if the code reads a variable ENVIRONMENT does not explain, or ENVIRONMENT lists one it does not read."""
    found = environment_names(root)
    unexplained, unread = sorted(found - ENVIRONMENT.keys()), sorted(ENVIRONMENT.keys() - found)
    if unexplained or unread:
        raise ValueError(f"docgen.ENVIRONMENT: say what these mean: {unexplained}; nothing reads these: {unread}")


CONTRACT = r"""
.TH KODEPIPE 7 "{date}" "kodepipe {version}" "kodepipe manual"
.SH NAME
kodepipe \- the JSON\-lines record contract shared by the kp\-* commands
.SH DESCRIPTION
kodepipe is a set of small commands (kp\-image, kp\-clone, kp\-ls, kp\-rm, ...)
that give AI coding agents disposable, isolated sandboxes: a QEMU VM cloned
copy\-on\-write from a golden image, and a locked\-down Podman container in it.
Each command reads and writes JSON lines, so a workflow is a shell pipe:
.PP
.nf
  kp\-clone base proj | kp\-ls
  kp\-ls \-\-older\-than 1d | kp\-rm
.fi
.SH RECORDS
.IP \(bu 2
One JSON object per line, UTF\-8, compact.  Standard output carries records
only, flushed after each one so a pipeline streams; messages, progress and
errors go to standard error.
.IP \(bu 2
Every record has a \fBkind\fR (\fBimage\fR, \fBvm\fR, ...) and a stable
identity: its \fBname\fR, and an \fBid\fR that is new each time something of
that name is made.  A stage that gets a record with an \fBid\fR acts only on
that very object; if the name was since re\-created, it says so
(error code \fBstale_record\fR) and leaves the new one alone.
.IP \(bu 2
A stage enriches the records it handles and passes through, unchanged,
every key and every record it does not handle, so \fBjq\fR can select on
anything and stages can be added later.
.IP \(bu 2
Blank lines are skipped.  A line that is not a JSON object is bad input:
the stage names the line number on standard error, changes nothing for it,
goes on with the next line, and exits with status 65 at the end.
.IP \(bu 2
A record that a stage failed on is still written, with an \fBerror\fR
object: \fB{{"code": ..., "message": ...}}\fR.  Later stages pass it through
untouched, except \fBkp\-rm\fR, which still cleans up what it names when it
carries an \fBid\fR (a record without one names nothing that was made).
A stage that failed any record exits non\-zero at the end; it does not stop
at the first failure.
.IP \(bu 2
Times are UTC, as \fBYYYY\-MM\-DDTHH:MM:SSZ\fR (jq's \fBfromdateiso8601\fR
reads them).  Paths are absolute.
.SH NAMES
Names of images, VMs and containers are hostname labels: 1 to 63 characters
of lowercase \fBa\-z\fR, \fB0\-9\fR and \fB\-\fR, starting and ending with a
letter or digit.  Images and VMs share one namespace.  Anything else
(\fB../x\fR, \fB\-rf\fR, an empty name, unicode) is refused before any side
effect: on the command line with status 2, in a record with status 65.
.SH KINDS
{kinds}
.SH STATES
{states}
.SH ERROR CODES
{codes}
.SH EXIT STATUS
{exits}
.SH FILES
.TP
.B $KODEPIPE_STATE_DIR/images/NAME, .../vms/NAME
one folder each, with \fBmeta.json\fR written atomically; the single source
of truth, of which records are views
.TP
.B $KODEPIPE_STATE_DIR/vms/NAME/serial.log, serial.log.1
the VM's serial console, capped: at 1 MiB serial.log becomes serial.log.1, so
a guest that prints without end takes at most 2 MiB of the host's disk
(written by a small keeper process that lives as long as QEMU)
.TP
.B $KODEPIPE_STATE_DIR/locks/NAME.lock
per\-name locks (flock): concurrent commands on one name are safe
.TP
.B $KODEPIPE_STATE_DIR/locks/workspace.DEV.INO.lock
one per workspace directory (by device and inode): kp\-run \-\-apply
checks and writes under it, so concurrent applies to one workspace take turns
{threats}{credentials}{review}.SH ENVIRONMENT
{env}
.SH SEE ALSO
{see_also}
"""

README = Path(__file__).resolve().parent.parent / "README.md"
THREATS_HEADING = "## Threat model: what each layer promises, and what it does not"


def _inline(text: str) -> str:
    """README markdown within a line (``code``, **bold**) as roff."""
    out = esc(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"\\fB\1\\fR", out)
    return re.sub(r"`([^`]+)`", r"\\fB\1\\fR", out)


def threats_section(readme: str) -> str:
    """The README's threat model (its paragraphs and its table) as a man page section, so the two
    cannot drift: the README is where it is written, kodepipe(7) is generated from it."""
    start = readme.find(THREATS_HEADING + "\n")
    if start < 0:
        raise ValueError(f"README.md has no section {THREATS_HEADING!r}")
    body = readme[start + len(THREATS_HEADING):]
    body = body[:body.find("\n## ")] if "\n## " in body else body
    out = [".SH THREAT MODEL"]
    for block in (b.strip() for b in body.split("\n\n")):
        if not block:
            continue
        if block.startswith("|"):
            rows = [r.strip().strip("|").split(" | ") for r in block.splitlines()]
            for layer, promises, not_promised in (r for r in rows[2:] if len(r) == 3):
                out += [".TP", f".B {esc(layer.strip())}", "Promises: " + _inline(promises.strip()) + ".",
                        ".IP", "Does not promise: " + _inline(not_promised.strip()) + "."]
        else:
            out += [".PP", _inline(" ".join(block.split()))]
    return "\n".join(out) + "\n"


def _kinds() -> str:
    """KINDS: each kind of record, who writes it, its keys and their JSON types (core/schema.py)."""
    from kodepipe.core import schema
    from kodepipe.inventory import KINDS as OBJECTS

    common = set.intersection(*(set(schema.keys(kind)) for kind in OBJECTS)) - {"kind", "state"}
    out = ["Each kind's keys and their JSON types (a key may be absent unless the kind needs it; a "
           "stage adds keys of its own and passes on every key it does not know):"]
    for kind, spec in schema.KINDS.items():
        described = schema.keys(kind)
        shown = {k: v for k, v in described.items() if k != "kind" and not (kind in OBJECTS and k in common)}
        if spec.states:
            shown["state"] = "see STATES"
        out += [f".TP\n.B {esc(kind)}\n{esc(spec.meaning)}; written by {esc(', '.join(spec.written_by))}.",
                ".br\n" + ", ".join(f"\\fB{esc(key)}\\fR ({esc(text)})" for key, text in shown.items()) + "."]
    keys = ", ".join(f"\\fB{esc(key)}\\fR ({esc(schema.keys('vm')[key])})" for key in sorted(common))
    out.append(f".PP\nRecords of {esc(', '.join(OBJECTS))} (what kp\\-ls lists) also have: {keys}.  "
               "\\fBpath\\fR is its folder in the state directory; \\fBproblem\\fR says why it is broken, "
               "orphaned or frozen, and \\fBhint\\fR what to do; kp\\-ls adds \\fBdisk_bytes\\fR (space "
               "used); kp\\-rm adds \\fBremoved\\fR, and \\fBkept\\fR (why) for what a pipe does not "
               "remove: golden images, un\\-applied quarantines, audit and egress logs, unless it is named "
               "or a flag allows it.")
    return "\n".join(out)


def _states() -> str:
    """STATES: per kind, each state a record can carry and what it means (core/schema.py)."""
    from kodepipe.core import schema

    out = []
    for kind, spec in schema.KINDS.items():
        if spec.states is None:
            continue
        out.append(f".SS {esc(kind)}")
        out += [f".TP\n.B {esc(state)}\n{esc(state.meaning)}" for state in spec.states]
    return "\n".join(out)


def _codes() -> str:
    """ERROR CODES: every member of the catalogue (errors.Code), its meaning and exit status."""
    return "\n".join(f".TP\n.B {esc(code)}\n{esc(code.meaning)} (exit {code.status})" for code in errors.Code)


def credentials_section() -> str:
    """CREDENTIALS: how a credential is defined (the module's own words) and the built-in ones."""
    from kodepipe.egress import credentials

    doc = (credentials.__doc__ or "").strip().split("\n\n")
    out = [".SH CREDENTIALS"]
    for block in doc[1:]:
        if block.startswith("    "):
            out += [".PP", ".nf", *(esc(line) for line in block.splitlines()), ".fi"]
        else:
            out += [".PP", esc(" ".join(block.split()))]
    out += [".PP", "Built in:"]
    for name in credentials.names(credentials.BUILTIN_DIR / "-"):
        d = credentials.load(name, credentials.BUILTIN_DIR / "-")
        env = ", ".join(var for var, _ in d.env)
        out += [".TP", f".B {esc(name)}", esc(f"{d.description}: {d.mode} mode, to {d.upstream}, the key in "
                                              f"{d.header or d.query}; the agent gets {env}.")]
    return "\n".join(out) + "\n"


def review_section() -> str:
    """REVIEW RULES: how rules are written (the module's own words) and the built-in ones, with their severity."""
    from kodepipe.review import rules

    doc = (rules.__doc__ or "").strip().split("\n\n")
    out = [".SH REVIEW RULES", ".PP", esc("kp-review(1) and kp-run --apply check a quarantine's changes against "
                                          "these rules; --apply refuses findings at or above --fail-on (high) "
                                          "unless --accept or --force.")]
    for block in doc[1:]:
        if block.lstrip().startswith("- "):
            for item in block.split("\n- "):
                out += [".IP \\(bu 2", esc(" ".join(item.lstrip("- ").split()))]
        else:
            out += [".PP", esc(" ".join(block.split()))]
    out += [".PP", "The checks:"]
    for check, meaning in rules.CHECKS.items():
        out += [".TP", f".B {esc(check)}", esc(meaning)]
    out += [".PP", "Built in:"]
    for rule in rules.load(Path("/nonexistent")):
        what = (f"check {rule.check}" if rule.check else
                "; ".join(filter(None, [f"paths {', '.join(rule.paths)}" if rule.paths else "",
                                        "added lines that match its expression (in rules.json)"
                                        if rule.lines is not None else ""])))
        limits = ", ".join(f"{k} {getattr(rule, k)}" for k in ("count", "share", "bytes") if getattr(rule, k))
        out += [".TP", f".B {esc(rule.id)} ({esc(rule.severity)})",
                esc(f"{rule.about}. {what}" + (f" ({limits})" if limits else "") + ".")]
    return "\n".join(out) + "\n"


def contract_page() -> str:
    see_also = ", ".join(f"\\fB{esc(p)}\\fR(1)" for p in COMMANDS) + ", \\fBjq\\fR(1)"
    check_environment()
    threats = threats_section(README.read_text()) if README.exists() else ""
    return CONTRACT.lstrip("\n").format(date=DATE, version=__version__, exits=_exit_statuses(),
                                        env=_environment(test_hooks=True), see_also=see_also, kinds=_kinds(),
                                        states=_states(),
                                        codes=_codes(), threats=threats, credentials=credentials_section(),
                                        review=review_section())


EVENTS = r"""
.TH KODEPIPE\-EVENTS 7 "{date}" "kodepipe {version}" "kodepipe manual"
.SH NAME
kodepipe\-events \- the system\-call event records that kp\-trace writes (schema {schema})
.SH DESCRIPTION
\fBkp\-trace\fR(1) turns strace's text output into one JSON object per
system call, signal, exit and tracer message, in the order strace completed
them.  Every event has \fBkind\fR "event" and \fBschema\fR {schema}; the
number changes only when a key changes meaning or disappears (new keys may
be added without a new number).  The capture side runs
.PP
.nf
  strace {flags} \-o FILE
.fi
.PP
and kp\-trace also reads \fB\-tt\fR timestamps, no timestamps, and strace's
terminal format (\fB[pid N]\fR prefixes, lines cut by its own messages).
.SH KEYS OF EVERY EVENT
.TP
.B type
\fBexec\fR, \fBfile\fR, \fBnet\fR, \fBprocess\fR, \fBsignal\fR, \fBexit\fR,
\fBsyscall\fR (any other call), \fBattach\fR, \fBdetach\fR, \fBtracer\fR
(another strace message), \fBparse_error\fR, or \fBunaccounted\fR (after a
kp\-run \-\-audit record's events: a real change its trace does not explain).
.TP
.B line
the line of the trace where the event starts (an unfinished call's first line).
.TP
.B ts
seconds since the epoch (\fB\-ttt\fR) or since midnight (\fB\-tt\fR); null
without timestamps.  An unfinished call has the time it started.
.TP
.B pid, tid, ppid
the process (thread group) id, the thread id strace printed, and the parent
process; null when the trace does not show them (a process that was running
before the trace began has no known parent).
.TP
.B exe, exec_id
the program the process runs (null until it is seen to exec), and a number,
unique in the trace, that changes when a process is created or execs:
events with the same \fBexec_id\fR come from one program run, even if the
pid was reused.
.TP
.B denied
true for a call that failed with EACCES or EPERM, and for a SIGSYS sent by a
seccomp filter (then \fBseccomp\fR is true and \fBsyscall\fR names the call).
.SH KEYS OF SYSTEM CALLS
.TP
.B syscall, args, ret
the call's name, its arguments as strace printed them (a list of strings,
split at top\-level commas; strings keep their quotes and escapes), and its
raw return value with any fd decoration (\fB"3</etc/passwd>"\fR).
.TP
.B outcome, errno, duration
\fBok\fR, \fBerror\fR (with \fBerrno\fR such as \fB"ENOENT"\fR),
\fBinterrupted\fR (\fB= ? ERESTART...\fR), \fBunknown\fR (\fB= ?\fR, as for
exit_group), \fBunfinished\fR (never returned: its thread died or the trace
ended) or \fBdetached\fR; \fBduration\fR is the time in the call (\fB\-T\fR),
in seconds, or null.
.SH KEYS BY TYPE
.TP
.B exec
\fBpath\fR, \fBargv\fR (decoded strings), \fBargv_truncated\fR; on success
\fBexe\fR and \fBexec_id\fR are already the new program's.
.TP
.B file
\fBop\fR (open, read, write, stat, access, readlink, unlink, rmdir, rename,
link, symlink, mkdir, mknod, chmod, chown, truncate, chdir, chroot, utime,
xattr, mount), \fBpath\fR (absolute when strace's decorations or the
process's known working directory allow), \fBfd\fR, and \fBtarget\fR
(rename, link, symlink).  Opens add \fBflags\fR, \fBwrite\fR (true for
O_WRONLY, O_RDWR, O_CREAT, O_TRUNC, O_APPEND or creat) and \fBresolved\fR
(the kernel's name for what was opened).  Reads and writes add \fBbytes\fR;
on pipes, sockets and anonymous inodes they are type \fBsyscall\fR.
.TP
.B net
\fBop\fR (socket, socketpair, connect, bind, listen, accept, sendto, sendmsg,
recvfrom, recvmsg, shutdown), \fBfd\fR, \fBsocket\fR (strace's decoration:
\fB"TCP:[127.0.0.1:40000->127.0.0.1:5555]"\fR), \fBaddress\fR:
\fB{{"family": "AF_INET", "address": "127.0.0.1", "port": 9}}\fR, or
\fB{{"family": "AF_UNIX", "path": ...}}\fR (abstract names start with @), or
\fB{{"family": ..., "raw": ...}}\fR.  socket adds \fBfamily\fR; accept adds
\fBpeer_fd\fR and \fBpeer_socket\fR.
.TP
.B process
\fBop\fR: fork or clone (\fBchild\fR, \fBthread\fR), kill (\fBtarget\fR,
\fBsignal\fR), exit (\fBcode\fR), wait, ptrace, setuid, setgid, prctl,
seccomp, unshare, setns.
.TP
.B signal
\fBsignal\fR, \fBinfo\fR (the siginfo fields), \fBstopped\fR (a stop by
SIGSTOP/SIGTSTP).
.TP
.B exit
\fBcode\fR, or \fBsignal\fR and \fBcore_dumped\fR; \fBthread\fR is true when
a thread other than the leader ended.  \fBsuperseded_by\fR names the thread
whose execve replaced the process (strace's "superseded by execve" line).
.TP
.B attach, detach, tracer
\fBmessage\fR, strace's own words.
.TP
.B parse_error
\fBraw\fR, the whole line, and \fBreason\fR.  No line is ever dropped.
.TP
.B unaccounted
from the record's \fBaudit_unaccounted\fR (kp\-run's cross\-check of the
trace against the quarantine's changes or the workspace's snapshots):
\fBpath\fR (relative to the workspace; \fBpath_b64\fR holds the exact
bytes of a name that is not UTF\-8), \fBchange\fR (added, modified,
deleted), \fBentry\fR (file, dir, symlink, ...), \fBagainst\fR
(quarantine or workspace), \fBcomplete\fR true; or one with \fBmore\fR,
how many more the record counts but does not list; or one with
\fBcomplete\fR false and \fBwhy\fR, when the check could not be made whole.
Its \fBline\fR, \fBts\fR, \fBpid\fR and \fBtid\fR are null.
.PP
When kp\-trace reads container records, each event also has
\fBcontainer\fR, the record's name.
.SH SUMMARIES
\fBkp\-trace \-\-summary\fR writes records of kind \fBsummary\fR with
\fBitem\fR \fBfile_written\fR (\fBpath\fR, \fBops\fR), \fBfile_read\fR
(\fBpath\fR, \fBcount\fR), \fBexec\fR (\fBpath\fR, \fBargv\fR, \fBpid\fR,
\fBexit_code\fR or \fBsignal\fR; both null when the program exec'd another),
\fBnet\fR (\fBop\fR, \fBaddress\fR, \fBcount\fR, \fBoutcomes\fR),
\fBdenied\fR, and one \fBtotals\fR.
.SH WHAT A CAPTURE MODE CANNOT SEE
{blind}
.SH EXAMPLES
.nf
  kp\-trace \-\- make | jq \-c 'select(.type=="net")'
  kp\-trace < log | jq \-r 'select(.type=="file" and .write).path'
  kp\-trace < log | jq 'select(.denied)'
.fi
.SH EXIT STATUS
{exits}
.SH SEE ALSO
\fBkp\-trace\fR(1), \fBkodepipe\fR(7), \fBstrace\fR(1), \fBjq\fR(1)
"""


def events_page() -> str:
    from kodepipe.audit import strace

    blind = "\n".join(f".TP\n.B {mode}\n" + "\n".join(f".br\n{esc(line)}" if i else esc(line)
                                                        for i, line in enumerate(lines))
                      for mode, lines in strace.BLIND.items())
    blind += "\n.PP\n" + esc(strace.ATTACHED_NOTE[:1].upper() + strace.ATTACHED_NOTE[1:]) + "."
    return EVENTS.lstrip("\n").format(date=DATE, version=__version__, schema=strace.SCHEMA,
                                      flags=esc(" ".join(strace.CAPTURE_FLAGS)), blind=blind,
                                      exits=_exit_statuses())


FLEET_HEADING = "## Running a fleet on Kubernetes"
FLEET = r"""
.TH KODEPIPE\-FLEET 7 "{date}" "kodepipe {version}" "kodepipe manual"
.SH NAME
kodepipe\-fleet \- kodepipe's sandbox on Kubernetes: kp\-run \-\-emit, its objects, the runtime class,
what an operator installs
{body}.SH NOT CARRIED OVER
Every control of a kp\-run policy that the emitted objects cannot hold, as
\fBkp\-run \-\-emit\fR lists it (the list of a run is the part of this one its policy uses):
{not_carried}.SH THE LOCAL VARIANT
What \fBkp\-run \-\-emit kube \-\-local\fR changes so that Podman 4.3's \fBpodman kube play\fR runs the pod:
{local}.SH EXIT STATUS
kp\-run \-\-emit exits 0 when it wrote the objects, and as kp\-run does otherwise:
{exits}
.SH SEE ALSO
\fBkp\-run\fR(1), \fBkodepipe\fR(7), \fBkubectl\fR(1), \fBpodman\-kube\-play\fR(1)
"""


def readme_section(readme: str, heading: str) -> str:
    """A README section as man page paragraphs (code blocks kept as they are), so the two cannot drift."""
    start = readme.find(heading + "\n")
    if start < 0:
        raise ValueError(f"README.md has no section {heading!r}")
    body = readme[start + len(heading):]
    body = body[:body.find("\n## ")] if "\n## " in body else body
    out: list[str] = []
    for block in re.split(r"\n\s*\n", body):
        block = block.strip()
        if not block:
            continue
        if block.startswith("```"):
            code = [line for line in block.splitlines() if not line.startswith("```")]
            out += [".PP", ".nf", *(esc(line) for line in code), ".fi"]
        else:
            out += [".PP", _inline(" ".join(block.split()))]
    return ".SH DESCRIPTION\n" + "\n".join(out) + "\n"


def fleet_page() -> str:
    from kodepipe.container import kube

    not_carried = "".join(f".TP\n.B {esc(control)}\n{esc(why)}" + (f"; instead: {esc(instead)}" if instead else "")
                          + "\n" for control, (why, instead) in kube.NOT_CARRIED.items())
    local = "".join(f".TP\n.B {esc(key)}\n{esc(why)}\n" for key, why in kube.LOCAL.items())
    body = readme_section(README.read_text(), FLEET_HEADING) if README.exists() else ""
    return FLEET.lstrip("\n").format(date=DATE, version=__version__, body=body, not_carried=not_carried,
                                      local=local, exits=_exit_statuses())


def completion(prog: str, command: click.Command, shell: str) -> str:
    var = "_{}_COMPLETE".format(prog.replace("-", "_").upper())
    cls = get_completion_class(shell)
    if cls is None:
        raise ValueError(f"click has no completion for {shell}")
    return cls(command, {}, prog, var).source()


def generate(root: Path) -> list[Path]:
    """Write every man page and completion file under ``root``; return their paths."""
    written = []

    def put(path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)

    for prog, module in COMMANDS.items():
        command = importlib.import_module(module).cli
        put(root / "man" / "man1" / f"{prog}.1", man_page(prog, command))
        for shell, pattern in SHELLS.items():
            put(root / "completions" / shell / pattern.format(prog=prog), completion(prog, command, shell))
    put(root / "man" / "man7" / "kodepipe-fleet.7", fleet_page())
    put(root / "man" / "man7" / "kodepipe.7", contract_page())
    put(root / "man" / "man7" / "kodepipe-events.7", events_page())
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent
    for path in generate(target):
        print(path.relative_to(target))
