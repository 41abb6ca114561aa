"""Guest input is untrusted input, attacked by root in a real guest (TCG): a console flood
(serial.log stays bounded; kp-ip's tail, kp-attach --log and kp-attach itself still work),
terminal escape sequences on the console (escaped in kp-ip's message, raw in its record), a
guest agent replaced by a hostile one (malformed, oversized, endless and trickling replies:
a clean guest_agent_bad_reply or timeout, by --timeout), an endless host key file, and an
interface name with control characters (raw in the record, which JSON escapes).

Measured here: a guest's root writes to its serial port at 0.3-0.7 MB/s under TCG (QEMU
emulates the UART a byte at a time), so 200 MB would take 5-10 minutes.  The flood is FLOOD
bytes, several times the log's bound; tests/test_seriallog.py puts 200 MB through the same
keeper process directly."""

from __future__ import annotations

import base64
import os
import re
import select
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kodepipe.vm import seriallog
from tests.conftest import BIN, lines, processes_with
from tests.integration.conftest import run

pytestmark = pytest.mark.integration

NAME = "hostile"
FLOOD = 8 << 20  # bytes of base64 the guest prints: 4 times what the log may hold (2 x CAP)
END = "FLOOD-END"
# what may reach a terminal: printable text, newlines and tabs
RAW_CONTROL = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")

# A guest agent of root's own, in place of qemu-ga: it answers guest-sync-delimited properly (so
# the client trusts the session) and then guest-network-get-interfaces as $MODE says.
EVIL_AGENT = r"""
ADDRESS='"ip-address-type": "ipv4", "ip-address": "10.0.2.15\u001b]0;owned\u0007", "prefix": 24'
VETH='{"name": "veth", "ip-addresses": []},'
GOOD='"ip-address-type": "ipv4", "ip-address": "10.0.2.15", "prefix": 24'
NAMED='{"name": "ens4\u001b]0;owned\u0007\u001b[2J", "ip-addresses": [{'"$GOOD"'}]}'
KEY=$(base64 -w0 /etc/ssh/ssh_host_ed25519_key.pub) KEYLEN=$(wc -c < /etc/ssh/ssh_host_ed25519_key.pub)
exec 3<>/dev/virtio-ports/org.qemu.guest_agent.0
while true; do
  while IFS= read -r line <&3; do
    case "$line" in
      *guest-sync-delimited*)
        id=$(printf '%s' "$line" | LC_ALL=C sed 's/.*"id": *\([0-9]*\).*/\1/')
        printf '\377{"return": %s}\n' "$id" >&3 ;;
      *guest-network-get-interfaces*)
        case "$MODE" in
          escape) printf '{"return": [{"name": "ens4", "ip-addresses": [{%s}]}]}\n' "$ADDRESS" >&3 ;;
          latin1) printf '{"return": [{"name": "caf\351"}]}\n' >&3 ;;
          types) printf '{"return": [{"name": ["ens4"], "ip-addresses": "10.0.2.15"}]}\n' >&3 ;;
          many) printf '{"return": [' >&3; yes "$VETH" | head -n 2000 | tr -d '\n' >&3
                printf '{"name": "x"}]}\n' >&3 ;;
          endless) printf '{"return": "' >&3; yes xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx | tr -d '\n' >&3 ;;
          trickle) printf '{"return": [{"name": "' >&3; while printf x >&3; do sleep 0.2; done ;;
          named) printf '{"return": [%s]}\n' "$NAMED" >&3 ;;
        esac ;;
      *guest-file-open*) printf '{"return": 7}\n' >&3 ;;
      *guest-file-read*) printf '{"return": {"count": %s, "buf-b64": "%s", "eof": true}}\n' "$KEYLEN" "$KEY" >&3 ;;
      *) printf '{"return": {}}\n' >&3 ;;
    esac
  done
  sleep 0.1  # the host is not connected: reads end at once until it is
done
"""


def one(proc: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr.decode()
    records = lines(proc.stdout)
    assert len(records) == 1, records
    return records[0]


def as_root(env: dict[str, str], script: str, timeout: float = 300) -> dict[str, Any]:
    """``script`` run by root in the guest, over SSH; its result record."""
    proc = run(env, "kp-ssh", NAME, "--", "sudo", "sh", "-c", script, timeout=timeout)
    results = [r for r in lines(proc.stdout) if r.get("kind") == "result"]
    assert len(results) == 1, proc.stderr.decode()
    assert results[0]["exit_status"] == 0, results[0]
    return results[0]


def keepers(log: Path) -> list[int]:
    return processes_with(b"kodepipe.vm.seriallog", os.fsencode(str(log)))


@pytest.fixture(scope="module")
def vm(golden: dict[str, Any]) -> Iterator[tuple[dict[str, str], dict[str, Any]]]:
    env = golden["env"]
    one(run(env, "kp-clone", "base", NAME))
    try:
        one(run(env, "kp-boot", "--accel", "tcg", NAME))
        record = one(run(env, "kp-ip", NAME, "--timeout", "400", timeout=900))
        yield env, record
    finally:
        run(env, "kp-rm", NAME, timeout=300)
    assert keepers(Path(record["serial_log"])) == []  # the log's keeper ended with QEMU


def test_a_console_flood_cannot_fill_the_hosts_disk(vm: tuple[dict[str, str], dict[str, Any]]) -> None:
    env, record = vm
    log = Path(record["serial_log"])
    # QEMU does not write the log itself: no fd of QEMU's is a file; its logfile is the keeper's pipe
    qemu_files = [os.readlink(f"/proc/{record['pid']}/fd/{fd}") for fd in os.listdir(f"/proc/{record['pid']}/fd")]
    assert not [f for f in qemu_files if "serial.log" in f], qemu_files
    assert len(keepers(log)) == 1
    # root floods the console, then says a last word with escape sequences in it
    as_root(env, f"head -c {FLOOD * 3 // 4} /dev/urandom | base64 -w 100 > /dev/ttyS0; "
                 f"printf '\\033]0;owned\\007\\033[2J{END}\\n' > /dev/ttyS0", timeout=1200)  # the tty adds the CR
    deadline = time.monotonic() + 120  # a bound against a hang: the keeper copies within moments
    while END.encode() not in log.read_bytes():
        assert time.monotonic() < deadline, "the console's last line never reached serial.log"
        time.sleep(0.2)
    sizes = {path.name: path.stat().st_size for path in seriallog.files(log)}
    assert set(sizes) == {"serial.log", "serial.log.1"}, sizes
    assert all(size <= seriallog.CAP for size in sizes.values()), sizes
    assert sum(sizes.values()) <= 2 * seriallog.CAP < FLOOD / 3
    # kp-attach --log prints what is kept, older part first, the guest's bytes as they are (a pipe)
    printed = run(env, "kp-attach", "--log", NAME)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == seriallog.rotated(log).read_bytes() + log.read_bytes()
    assert printed.stdout.endswith(f"\x1b]0;owned\x07\x1b[2J{END}\r\n".encode())
    assert as_root(env, "echo still here")["stdout"] == "still here\n"


def test_kp_ips_console_tail_after_the_flood_is_escaped(vm: tuple[dict[str, str], dict[str, Any]]) -> None:
    env, record = vm
    # the agent is kept from answering by a client holding its socket (QEMU serves one at a time)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as holder:
        holder.connect(record["sockets"]["qga"])
        proc = run(env, "kp-ip", NAME, "--timeout", "3")
    assert proc.returncode == 75, proc.stderr.decode()
    message = lines(proc.stdout)[0]["error"]["message"]
    assert f"\n\x1b]0;owned\x07\x1b[2J{END}" in message  # the console's last line, raw in the record
    assert f"\\x1b]0;owned\\x07\\x1b[2J{END}".encode() in proc.stderr  # escaped on the terminal
    assert not RAW_CONTROL.search(proc.stderr), proc.stderr[-500:]


def on_console(env: dict[str, str], line: str, answer: bytes) -> bytes:
    """Type ``line`` on the VM's serial console with kp-attach (scripted: no terminal) and return
    what the console printed, up to ``answer``.  It needs neither SSH nor the guest agent."""
    attach = subprocess.Popen([str(BIN / "kp-attach"), "--idle", "1", NAME], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert attach.stdin is not None and attach.stdout is not None
    try:
        attach.stdin.write(f"\r{line}\r".encode())
        attach.stdin.flush()
        seen = b""
        deadline = time.monotonic() + 120  # a bound against a hang: the guest's shell answers in moments
        while answer not in seen:
            ready, _, _ = select.select([attach.stdout], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"the console never answered: {seen[-500:]!r}"
            chunk = os.read(attach.stdout.fileno(), 65536)
            assert chunk, f"kp-attach ended: {seen[-500:]!r}"
            seen += chunk
        attach.stdin.close()
        assert attach.wait(timeout=120) == 0
        return seen
    finally:
        attach.kill()
        attach.wait()


def test_kp_attach_still_reaches_the_console(vm: tuple[dict[str, str], dict[str, Any]]) -> None:
    env, _ = vm
    assert b"attached-42" in on_console(env, "echo attached-$((6*7))", b"attached-42")


@pytest.fixture
def evil_agent(vm: tuple[dict[str, str], dict[str, Any]]) -> Iterator[Any]:
    env, _ = vm

    def start(mode: str) -> None:
        as_root(env, "systemctl stop qemu-guest-agent evil-agent 2>/dev/null; systemctl reset-failed evil-agent "
                     f"2>/dev/null; echo {base64.b64encode(EVIL_AGENT.encode()).decode()} | base64 -d > /run/evil; "
                     f"systemd-run --unit evil-agent --setenv MODE={mode} sh /run/evil")

    yield start
    as_root(env, "systemctl stop evil-agent 2>/dev/null; systemctl start qemu-guest-agent")


@pytest.mark.parametrize(("mode", "status", "code", "says"), [
    ("escape", 1, "guest_agent_bad_reply", "is not an IP address"),
    ("latin1", 1, "guest_agent_bad_reply", "is not UTF-8"),
    ("types", 1, "guest_agent_bad_reply", "'name' is an array, not a string"),
    ("many", 1, "guest_agent_bad_reply", "2001 entries, more than the 1024 accepted"),
    ("endless", 1, "guest_agent_bad_reply", "longer than 16 MiB"),
    ("trickle", 75, "timeout", "before the session's deadline (the --timeout)"),
])
def test_a_hostile_guest_agent_gets_a_clean_error_by_the_timeout(
        vm: tuple[dict[str, str], dict[str, Any]], evil_agent: Any, mode: str, status: int, code: str,
        says: str) -> None:
    env, _ = vm
    evil_agent(mode)
    started = time.monotonic()
    proc = run(env, "kp-ip", NAME, "--timeout", "8", timeout=300)
    took = time.monotonic() - started
    assert proc.returncode == status, proc.stderr.decode()
    error = lines(proc.stdout)[0]["error"]
    assert error["code"] == code and says in error["message"], error
    assert b"Traceback" not in proc.stderr and not RAW_CONTROL.search(proc.stderr), proc.stderr
    assert took < 8 * 10, took  # only a guard against a hang: "trickle" shows the deadline by its message


def test_an_endless_host_key_file_ends_by_the_timeout(vm: tuple[dict[str, str], dict[str, Any]]) -> None:
    """The host key kp-ip reads through the agent made endless (/dev/zero): the read stops at its size
    limit, and kp-ip at its --timeout.  (sshd reads that file too and hangs on it: the key is put back
    through the serial console.)"""
    env, _ = vm
    key = "/etc/ssh/ssh_host_ed25519_key.pub"
    as_root(env, f"cp {key} /root/key.pub && ln -sf /dev/zero {key}")
    try:
        proc = run(env, "kp-ip", NAME, "--timeout", "8", timeout=300)
    finally:
        on_console(env, f"sudo sh -c 'rm -f {key} && cp /root/key.pub {key}' && echo restored-$((6*7))",
                   b"restored-42")
    assert proc.returncode == 75, proc.stderr.decode()
    assert "made no SSH host key" in lines(proc.stdout)[0]["error"]["message"]
    assert as_root(env, "echo sshd is back")["stdout"] == "sshd is back\n"


def test_an_interface_name_with_controls_is_data(vm: tuple[dict[str, str], dict[str, Any]], evil_agent: Any) -> None:
    """An agent may name an interface with escape sequences (qemu-ga itself replaces them; a hostile
    one does not): kp-ip records the name as it is, the JSON on stdout escapes it, and nothing of it
    reaches the terminal raw."""
    env, _ = vm
    evil_agent("named")
    proc = run(env, "kp-ip", NAME, "--timeout", "120", timeout=300)
    record = one(proc)
    names = [iface["interface"] for iface in record["addresses"]]
    assert names == ["ens4\x1b]0;owned\x07\x1b[2J"], names
    assert not RAW_CONTROL.search(proc.stdout.replace(b"\n", b"")) and b"\\u001b]0;owned\\u0007" in proc.stdout
    assert not RAW_CONTROL.search(proc.stderr), proc.stderr
