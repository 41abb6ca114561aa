"""kp-attach: a VM's serial console, interactive or scripted, or its log."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from kodepipe.commands import cli as kpcli
from kodepipe.commands import options


@click.command(context_settings=options.CONTEXT, epilog=options.EPILOG)
@click.argument("name", shell_complete=kpcli.name_completion(("vm",)))
@click.option("--log", "show_log", is_flag=True,
              help="Print the serial console's log instead: what the VM printed since it was made, "
                   "or its last 1 to 2 MiB (the log is capped, so a guest cannot fill the disk).")
@click.option("-f", "--follow", is_flag=True, help="With --log: keep printing new output until the VM stops.")
@click.option("--idle", default=1.0, show_default=True, type=options.FiniteRange(0, 3600),
              help="Without a terminal: after stdin ends, keep copying the console's output until it has "
                   "been quiet this many seconds.")
def cli(name: str, show_log: bool, follow: bool, idle: float) -> int:
    """Connect the terminal to VM NAME's serial console (ttyS0).

    The image logs its user in on the console, so pressing Enter gives a
    shell prompt; it works without any network (--net none) and while SSH
    is broken.  Press Ctrl-] to detach: the VM keeps running.  QEMU serves
    one console connection at a time.

    Without a terminal, stdin is sent to the console and its output is
    written to stdout, so it can be scripted (output includes the echo of
    what was typed, with CR LF line ends).

    \b
    Examples:
      kp-attach proj
      kp-attach --log -f proj
      printf 'uname -a\\n' | kp-attach --idle 2 proj
    """
    from kodepipe.core.errors import KpError

    options.check_names([name])
    record = _current(name)
    if show_log:
        return _print_log(name, record, follow)
    if follow:
        raise click.UsageError("--follow goes with --log")
    state = record.get("state")
    if state not in ("running", "suspended", "frozen"):  # a frozen VM's console still shows what it last said
        raise KpError(f"{name} is not running (it is {state})", code="not_running", hint=f"kp-boot {name}")
    if _console_busy(record):
        raise KpError(f"another client is attached to {name}'s serial console, and QEMU serves one at a time",
                      code="console_busy", hint="detach it first (Ctrl-] there)")
    console = _connect(name, record)
    with console:
        if sys.stdin.isatty() and sys.stdout.isatty():
            return _interactive(name, state, console)
        return _scripted(console, idle)


def _current(name: str) -> dict[str, Any]:
    from kodepipe.core.state import Store
    from kodepipe.vm import lifecycle, vms

    store = Store()
    lifecycle.vm_meta(store, name, None)  # there is no such VM: a clear error
    return vms.view(store, name)


def _console_busy(record: dict[str, Any]) -> bool:
    """True when QEMU says its serial socket has a client already: a second one would be queued
    unheard, and what it typed would reach the guest later.  Best effort: False when unsure."""
    from kodepipe.core.errors import KpError
    from kodepipe.vm.qmp import Monitor

    try:
        with Monitor(Path(record["sockets"]["qmp"]), timeout=1.0) as monitor:
            devices = monitor.execute("query-chardev")
    except (KpError, OSError, KeyError, TypeError):
        return False  # a busy or slow monitor must not keep anyone from the console
    for device in devices if isinstance(devices, list) else []:
        if isinstance(device, dict) and device.get("label") == "ser0":  # the id kp-boot gives it
            return not str(device.get("filename", "")).startswith("disconnected:")
    return False


def _connect(name: str, record: dict[str, Any]) -> Any:
    import socket

    from kodepipe.core.errors import KpError

    path = (record.get("sockets") or {}).get("serial")
    if not isinstance(path, str):
        raise KpError(f"{name} has no serial console socket", code="no_console")
    console = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        console.connect(path)
    except OSError as exc:
        console.close()
        raise KpError(f"cannot connect to {name}'s serial console ({path}): {exc.strerror}",
                      code="no_console") from None
    return console


def _interactive(name: str, state: object, console: Any) -> int:
    from kodepipe.core import terminal

    kpcli.Output("kp-attach").info(f"Connected to {name}'s serial console; Ctrl-] to detach")
    if state == "suspended":
        kpcli.Output("kp-attach").warn(f"{name} is suspended: nothing answers until kp-stop --resume {name}")
    elif state == "frozen":
        kpcli.Output("kp-attach").warn(f"{name} is frozen: nothing answers until it runs again "
                                       f"(kp-ls {name} says why, and what to do)")
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    with terminal.raw_mode(stdin):
        why = terminal.relay(stdin, stdout, console, escape=terminal.ESCAPE)
    # the guest's last output may have left the cursor mid-line
    click.echo("", err=True)
    if why == "remote_closed":
        kpcli.Output("kp-attach").info(f"{name}'s console closed (the VM stopped?)")
    return 0


def _scripted(console: Any, idle: float) -> int:
    from kodepipe.core import terminal
    from kodepipe.core.records import PipeClosed

    try:
        terminal.relay(sys.stdin.fileno(), sys.stdout.fileno(), console, linger=idle)
    except BrokenPipeError:
        raise PipeClosed() from None
    return 0


def _print_log(name: str, record: dict[str, Any], follow: bool) -> int:
    import os

    from kodepipe.core import terminal
    from kodepipe.core.errors import KpError, NotFound
    from kodepipe.core.records import PipeClosed, open_regular
    from kodepipe.vm import seriallog

    path = record.get("serial_log")
    if not isinstance(path, str) or not path:
        path = str(Path(str(record.get("path"))) / "serial.log")
    what = f"{name}'s serial log"
    out = sys.stdout.buffer
    # on a terminal, the guest's control characters are shown escaped (it could retitle the window or
    # write the clipboard); to a pipe or a file, the log goes as it is
    escaper = terminal.Escaper() if sys.stdout.isatty() else None

    def copy(log: Any) -> None:
        while chunk := log.read(65536):
            out.write(escaper.feed(chunk) if escaper is not None else chunk)
            out.flush()

    try:  # regular files only (never a FIFO or /dev/zero), copied in bounded chunks
        try:
            log = open_regular(path, what)
        except NotFound:
            if not seriallog.files(Path(path)):
                raise KpError(f"{name} has no serial log yet: it has never booted", code="no_log",
                              hint=f"kp-boot {name}") from None
            log = None  # only the older part is left (the keeper is about to begin a new serial.log)
        with log if log is not None else open(os.devnull, "rb") as current:
            # the log is capped: its older part is serial.log.1 (unless it has just become the file
            # we opened), printed first
            try:
                with open_regular(str(seriallog.rotated(Path(path))), what) as older:
                    if log is None or os.fstat(older.fileno()).st_ino != os.fstat(current.fileno()).st_ino:
                        copy(older)
            except NotFound:
                pass
            copy(current)
            if follow:
                _follow(name, Path(path), current, copy)
            if escaper is not None:
                out.write(escaper.feed(b"", final=True))
                out.flush()
            return 0
    except BrokenPipeError:
        raise PipeClosed() from None
    except OSError as exc:  # the log could not be read (EIO), or stdout not written (ENOSPC)
        raise KpError(f"copying {name}'s serial log {path} failed: {exc.strerror}", code="unreadable") from None


def _follow(name: str, path: Path, current: Any, copy: Any) -> None:
    """Print what the VM adds to its log until it stops; a log that rotates is followed into its new file."""
    import os

    from kodepipe.core.errors import KpError
    from kodepipe.core.records import open_regular
    from kodepipe.vm import seriallog

    stopped, last_check = False, time.monotonic()
    opened: list[Any] = []
    try:
        while True:
            copy(current)
            if stopped:
                return  # a last read after the VM stopped caught its final words
            try:
                renewed = os.stat(path).st_ino != os.fstat(current.fileno()).st_ino
            except OSError:
                renewed = False
            if renewed:  # the keeper rotated it: what we had is complete (it writes only the new file)
                copy(current)
                current = open_regular(str(path), f"{name}'s serial log")
                opened.append(current)
                continue
            at = current.tell()
            if os.fstat(current.fileno()).st_size < at:
                # the keeper (dropped to QEMU's uid) rotated by copying the log into serial.log.1 and
                # truncating it: the rest of what we were reading is there, from where we were
                try:
                    with open_regular(str(seriallog.rotated(path)), f"{name}'s serial log") as older:
                        older.seek(at)
                        copy(older)
                except KpError:
                    pass
                current.seek(0)
                continue
            if time.monotonic() - last_check > 1.0:
                last_check = time.monotonic()
                try:
                    stopped = _current(name).get("state") not in ("running", "suspended", "frozen")
                except KpError:
                    stopped = True  # removed meanwhile
                continue
            time.sleep(0.2)
    finally:
        for log in opened:
            log.close()


def main() -> None:
    kpcli.run(cli, "kp-attach")
