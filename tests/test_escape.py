"""Control characters from agents and guests never reach the terminal: every message (error,
warning, info, progress) and every cell of kp-ls's table is escaped on its way out, in one place
each (Output._say, ls.table).  Records keep the raw data: JSON escapes it already."""

from __future__ import annotations

import os
import re
from pathlib import Path

import orjson
import pytest

from kodepipe.commands import cli as kpcli
from kodepipe.commands import ls
from kodepipe.core import terminal
from kodepipe.core.errors import KpError
from tests.cli import invoke
from tests.fakevm import make_vm

# what a hostile name, address, console line or error text may carry, and how it must look
HOSTILE = [
    ("\x1b[2J", "\\x1b[2J"),  # clear the screen
    ("\x1b]0;owned\x07", "\\x1b]0;owned\\x07"),  # set the window title (OSC), ring the bell
    ("\x1b]52;c;Y3VybCBldmlsfHNo\x07", "\\x1b]52;c;Y3VybCBldmlsfHNo\\x07"),  # write the clipboard (OSC 52)
    ("ok\rkp-run: all fine", "ok\\rkp-run: all fine"),  # a carriage return overwriting the line
    ("abc\x08\x08\x08xyz", "abc\\x08\\x08\\x08xyz"),  # backspaces
    ("\x9b31m", "\\x9b31m"),  # C1 CSI: an escape sequence in one character
    ("\x00\x7f", "\\x00\\x7f"),
    ("name\u202etxt.exe", "name\\u202etxt.exe"),  # a right-to-left override reordering what follows
    (os.fsdecode(b"bad\xffbyte"), "bad\\xffbyte"),  # a file name byte that is not UTF-8
]
# nothing but printable text, newlines and tabs may reach the terminal
RAW_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


@pytest.mark.parametrize(("hostile", "shown"), HOSTILE)
@pytest.mark.parametrize("method", ["error", "warn", "info", "progress"])
def test_every_kind_of_message_is_escaped(capsys: pytest.CaptureFixture[str], method: str, hostile: str,
                                          shown: str) -> None:
    out = kpcli.Output("kp-test", verbose=True)
    getattr(out, method)(f"file {hostile} changed")
    err = capsys.readouterr().err
    assert shown in err and not RAW_CONTROL.search(err), repr(err)


def test_lines_of_a_message_stay_lines(capsys: pytest.CaptureFixture[str]) -> None:
    """A message that quotes a console's lines keeps them as lines (and tabs); only controls are escaped."""
    kpcli.Output("kp-ip").error("timed out; the serial console's last lines:\n[ 1.0]\tok\n\x1b[31mlogin: \x1b[0m")
    err = capsys.readouterr().err
    assert err == ("kp-ip: error: timed out; the serial console's last lines:\n[ 1.0]\tok\n"
                   "\\x1b[31mlogin: \\x1b[0m\n")


def test_a_failed_record_keeps_the_raw_text_and_the_message_is_escaped(capsysbinary: pytest.CaptureFixture[bytes]
                                                                       ) -> None:
    out = kpcli.Output("kp-test")
    out.fail({"kind": "vm", "name": "a"}, KpError("the guest said \x1b[2J\x07"))
    captured = capsysbinary.readouterr()
    record = orjson.loads(captured.out)
    assert record["error"]["message"] == "the guest said \x1b[2J\x07"  # data, escaped by JSON itself
    assert b"\\u001b" in captured.out and b"\x1b" not in captured.out
    assert captured.err == b"kp-test: error: a: the guest said \\x1b[2J\\x07\n"


def test_escaping_is_idempotent_and_leaves_text_alone() -> None:
    for hostile, shown in HOSTILE:
        assert terminal.escape_lines(terminal.escape_lines(hostile)) == shown
    text = "kp-ip: vm-a — 10.0.2.15/24, naïve café ✓\n\tnext"
    assert terminal.escape_lines(text) == text
    assert terminal.escape("a\nb\tc") == "a\\nb\\tc"  # a single value (a table cell, a name) has no lines


@pytest.mark.parametrize(("hostile", "shown"), HOSTILE)
def test_kp_ls_table_cells_are_escaped(hostile: str, shown: str) -> None:
    items: list[dict[str, object]] = [
        {"kind": "container", "name": "run-1", "state": "quarantined", "profile": "shell",
         "workspace": f"/home/u/{hostile}\nkp-ls: forged line"},
        {"kind": "vm", "name": "a", "state": "running", "base": "base",
         "ssh": {"user": f"kp{hostile}", "host": "127.0.0.1", "port": 22}},
        {"kind": "vm", "name": "b", "state": "frozen", "problem": f"the guest said {hostile}", "hint": "kp-rm b"},
    ]
    text = ls.table(items, colour=False)
    assert not RAW_CONTROL.search(text), repr(text)
    assert text.count("\n") == 4  # a header and one line per row: no cell can begin a line of its own
    assert f"/home/u/{shown}\\nkp-ls: forged line" in text and f"kp{shown}@" in text
    assert f"the guest said {shown}" in text


def test_kp_ips_timeout_shows_the_console_escaped_and_records_it_raw(tmp_path: Path) -> None:
    vm = make_vm("s1")
    try:
        # no agent answers (no socket): kp-ip times out with the serial console's last lines
        Path(vm.boot["serial_log"]).write_bytes(b"[    0.5] Linux version 6.1\r\n\x1b]0;owned\x07\x1b[2J"
                                                b"login: \xff\xfe\r\n")
        result = invoke("kp-ip", "s1", "--timeout", "1")
    finally:
        vm.stop()
    assert result.status == 75, result.stderr
    assert not RAW_CONTROL.search(result.stderr), repr(result.stderr)
    assert "\\x1b]0;owned\\x07\\x1b[2Jlogin: \ufffd\ufffd" in result.stderr
    assert "[    0.5] Linux version 6.1\n" in result.stderr  # the console's lines are still lines
    message = result.records[0]["error"]["message"]
    assert isinstance(message, str) and "\x1b]0;owned\x07" in message  # the record keeps the data


def test_kp_attach_log_escapes_on_a_terminal_and_not_in_a_pipe() -> None:
    import pty
    import subprocess

    from tests.conftest import BIN

    vm = make_vm("s1")
    log = b"[    0.5] Linux\r\n\x1b]52;c;cm0gLXJmIH4=\x07\x1b[2Jlogin: caf\xc3\xa9 \xff\r\n"
    try:
        Path(vm.boot["serial_log"]).write_bytes(log)
        leader, follower = pty.openpty()
        proc = subprocess.run([str(BIN / "kp-attach"), "--log", "s1"], stdout=follower, stderr=subprocess.PIPE,
                              timeout=120)
        os.close(follower)
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other side is closed and all was read
                break
            if not chunk:
                break
            shown += chunk
        os.close(leader)
        piped = invoke("kp-attach", "--log", "s1")
    finally:
        vm.stop()
    assert proc.returncode == 0, proc.stderr
    text = shown.decode().replace("\r\n", "\n")  # the terminal itself turns a newline into CR LF
    assert text == "[    0.5] Linux\n\\x1b]52;c;cm0gLXJmIH4=\\x07\\x1b[2Jlogin: café \\xff\n"
    assert piped.stdout == log  # to a pipe, the log as it is
