"""Kernel quotas: an agent that uses up every per-user kernel quota it can reach leaves the host's
accounts, root and the invoking user, able to get each of those objects.

Without kodepipe's limits (measured once, with kp-run's defaults before they existed): a container
holding 128 inotify instances, 192536 watches, 96362 queued signals or 9 message queues left host
root without any (the user namespace's counts are charged to its owner, root, who made it), and
one holding 198 keyrings left the invoking user without a key (keys are counted per host uid).
The attack program is perl (perl-base is in every Debian image; python3-minimal has no ctypes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BIN, lines
from tests.integration.test_run import OWNER, one_podman_service  # noqa: F401 - the module's shared service

pytestmark = pytest.mark.integration

# Each part uses up one quota, as far as the kernel lets it, and keeps what it got; the counts and
# the errors that stopped them go to /workspace/held, and everything is held until
# /workspace/release appears.  Raw system calls (x86_64 numbers).
AGENT = r"""
use strict;
my %got;
sub upto { my ($name, $try) = @_; my $n = 0; while ($try->($n)) { $n++ } $got{$name} = "$n " . ($! + 0); }
# inotify instances (inotify_init1); the first one, kept for the watches, counts too
my $ino = syscall(294, 0);
upto("inotify", sub { syscall(294, 0) >= 0 });
$got{inotify} =~ s/^(\d+)/$1 + ($ino >= 0)/e;
# inotify watches, on that first instance
mkdir "/tmp/w";
upto("watches", sub { my $d = "/tmp/w/$_[0]"; mkdir $d; syscall(254, $ino, $d, 0x100) >= 0 });
# queued signals: SIGRTMIN+8 blocked, then rt_sigqueueinfo to itself
my $sig = 40;
syscall(14, 0, pack("Q", 1 << ($sig - 1)), 0, 8) == 0 or die "rt_sigprocmask: $!";
my $info = pack("iii", $sig, 0, -1) . ("\0" x 116);
upto("sigpending", sub { syscall(129, $$ + 0, $sig, $info) >= 0 });
# POSIX message queues (mq_open O_CREAT|O_RDWR, default size)
upto("mqueue", sub { syscall(240, "kpq$_[0]", 0100 | 02, 0600, 0) >= 0 });
# keys: a new session keyring each time, linked into the user keyring so that it stays
upto("keys", sub { my $k = syscall(250, 1, "kpk$_[0]"); $k >= 0 && syscall(250, 8, $k, -4) >= 0 });
# SysV message queues (msgget IPC_PRIVATE)
upto("msgget", sub { syscall(68, 0, 01000 | 0600) >= 0 });
open(my $h, ">", "/workspace/held.tmp") or die "held: $!";
print $h join("\n", map { "$_ $got{$_}" } sort keys %got), "\n";
close $h;
rename "/workspace/held.tmp", "/workspace/held" or die "rename: $!";
sleep 1 until -e "/workspace/release";
"""

# What a host account can still get: one of each object.  Run as root, or as UID (argv[1]).
HOST_CHECK = r"""
import ctypes, json, os, struct, sys
uid = int(sys.argv[1])
if uid:
    os.setgroups([]); os.setgid(uid); os.setuid(uid)
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def result(r):
    return "ok" if r >= 0 else os.strerror(ctypes.get_errno())
out = {}
fd = libc.inotify_init1(0)
out["inotify"] = result(fd)
out["watches"] = result(libc.inotify_add_watch(fd, b"/", 0x100)) if fd >= 0 else "no instance"
sig = 41
libc.syscall(14, 0, ctypes.byref(ctypes.c_uint64(1 << (sig - 1))), None, 8)
info = ctypes.create_string_buffer(struct.pack("iii", sig, 0, -1) + b"\0" * 116)
out["sigpending"] = result(libc.syscall(129, os.getpid(), sig, info))
name = f"kpcheck{os.getpid()}".encode()
q = libc.syscall(240, name, 0o100 | 2, 0o600, None)
out["mqueue"] = result(q)
if q >= 0:
    libc.syscall(241, name)
out["keys"] = result(libc.syscall(250, 1, name))
m = libc.syscall(68, 0, 0o1000 | 0o600)
out["msgget"] = result(m)
if m >= 0:
    libc.syscall(71, m, 0, None)
print(json.dumps(out))
"""
KINDS = ("inotify", "watches", "sigpending", "mqueue", "keys", "msgget")


def host_can(uid: int) -> dict[str, str]:
    proc = subprocess.run([sys.executable, "-c", HOST_CHECK, str(uid)], capture_output=True, text=True,
                          timeout=60, check=True)
    return dict(json.loads(proc.stdout))


def wait_for(path: Path, process: subprocess.Popen[bytes], bound: float = 240) -> None:
    done = threading.Event()
    deadline = threading.Timer(bound, done.set)
    deadline.start()
    try:
        while not path.exists():
            assert process.poll() is None, "kp-run ended before the agent held its quotas"
            assert not done.is_set(), f"{path} did not appear within {bound:g} s"
            done.wait(0.2)
    finally:
        deadline.cancel()


def test_an_agent_cannot_use_up_the_kernel_quotas_of_host_accounts(shell_image: str, tmp_path: Path) -> None:
    ws = tmp_path / "proj"
    ws.mkdir()
    (ws / "agent.pl").write_text(AGENT)
    for path in (ws, ws / "agent.pl"):
        os.chown(path, OWNER, OWNER)
    before = {uid: host_can(uid) for uid in (0, OWNER)}
    assert all(v == "ok" for checks in before.values() for v in checks.values()), before
    run = subprocess.Popen([str(BIN / "kp-run"), "--image", shell_image, "-w", str(ws), "--",
                            "perl", "/workspace/agent.pl"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        wait_for(ws / "held", run)
        during = {uid: host_can(uid) for uid in (0, OWNER)}
    finally:
        (ws / "release").touch()
        out, err = run.communicate(timeout=120)
    (record,) = lines(out)
    assert record["exit_code"] == 0, err.decode()
    got: dict[str, Any] = {}
    for line in (ws / "held").read_text().splitlines():
        kind, count, errno = line.split()
        got[kind] = (int(count), int(errno))
    # while the agent held all it could get, root and the invoking user could still get each one ...
    assert during == {uid: dict.fromkeys(KINDS, "ok") for uid in (0, OWNER)}, f"the agent got {got}"
    share = record["kernel_quotas"]
    # ... because the container ran into its own share, not into the host's limits
    assert got["inotify"] == (share["inotify_instances"], 24)  # EMFILE
    assert got["watches"] == (share["inotify_watches"], 28)  # ENOSPC
    assert 0 < got["sigpending"][0] <= share["sigpending"] and got["sigpending"][1] == 11  # EAGAIN
    assert got["mqueue"][0] * 8192 * 10 <= share["msgqueue"] and got["mqueue"][1] == 24  # EMFILE
    assert got["keys"] == (0, 38)  # ENOSYS: no keys at all
    assert got["msgget"][0] > 0  # SysV IPC: the container's own IPC namespace's limit
