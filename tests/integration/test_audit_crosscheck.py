"""kp-run --audit cross-checks its trace against the real changes (crosscheck.py), for real.

Two ways an agent really hides a change from strace, each must end up in the record's
audit_unaccounted and as an "unaccounted" event of kp-trace:

- The path-rewrite race.  ptrace reads a system call's path before the kernel does, and the agent
  rewrites it in between.  perl (perl-base: raw system calls, no threads needed) keeps each name in a
  page shared with a forked flipper and calls mkdir on it; the flipper rewrites the name's first
  letter, "h" <-> "d", with preadv calls that copy 1024 bytes of "hdhd..." into that one byte (one
  system call flips it 1024 times: a flipper making a call per flip is held up by strace, which stops
  it at every call, and rarely wins).  A name starts as "d"; the agent counts the directories the
  kernel made as "h" and stops after 30 of them (the race was running: each is a win unless strace
  read an "h" too), or after 5000 tries.  The test checks from the trace itself that it won.
- A core dump.  The kernel writes it into the crashing process's working directory (when the host's
  kernel.core_pattern is a file name): no call of the agent names it.  Deterministic.

The control run does the ordinary things an agent does (mkdir -p, writes, directories renamed,
removals, chmod, touch, symlinks, a unix socket) and nothing is reported.

Checked once against a weakened cross-check (crosscheck.check reporting nothing): the attack tests
failed (audit_unaccounted.count 0 while the trace named other directories than the real ones).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BIN, lines
from tests.integration.test_run import one_podman_service  # noqa: F401 - the module's shared service

pytestmark = pytest.mark.integration

OWNER = 4321
WINS, MAX_TRIES = 30, 5000

RACER = r"""
use strict;
my ($WINS, $MAX) = @ARGV;
my $mem = syscall(9, 0, 4096, 3, 0x21, -1, 0);  # mmap(RW, MAP_SHARED|MAP_ANONYMOUS): shared after fork
die "mmap: $!\n" if $mem == -1;
mkdir "/workspace/race" or die "mkdir: $!\n";
open(my $out, ">", "/tmp/names") or die;
print $out pack("a32", sprintf("/workspace/race/d%05d", $_)) for 0 .. $MAX - 1;
close $out;
open($out, ">", "/tmp/flips") or die;
print $out "hd" x 512;
close $out;
open(my $names, "<", "/tmp/names") or die;
open(my $flips, "<", "/tmp/flips") or die;
my $letter = $mem + length("/workspace/race/");
my $pid = fork;
if ($pid == 0) {
    my $iov = pack("Q*", map { ($letter, 1) } 1 .. 1024);
    syscall(295, fileno($flips), $iov, 1024, 0, 0) while 1;  # preadv: 1024 flips of the letter a call
}
my ($tries, $h) = (0, 0);
while ($h < $WINS && $tries < $MAX) {
    syscall(17, fileno($names), $mem, 32, $tries * 32) == 32 or die "pread: $!\n";  # the name, with a "d"
    syscall(83, $mem, 0755);  # mkdir, its path in the shared page
    $h++ if -d sprintf("/workspace/race/h%05d", $tries);
    $tries++;
}
kill 9, $pid;
waitpid $pid, 0;
print STDERR "race: $tries tries, $h made as h\n";
"""

# the signal only once sleep runs (/proc/PID/comm): sent between bash's fork and exec, it met the
# forked shell's own handling, and the run once ended with no "Segmentation fault" line at all
# and the status of sleep itself (139: SIGSEGV), not bash's "Segmentation fault" line, which a loaded
# machine once did not get (the job was reaped before bash's notice)
CORE_DUMP = ("ulimit -c unlimited; cd /workspace; sleep 1000 & pid=$!; "
             'until [ "$(cat /proc/$pid/comm)" = sleep ]; do :; done; kill -SEGV $pid; wait $pid; echo "STATUS: $?"')

ORDINARY = r"""
set -e
mkdir -p a/b/c
echo one > a/b/c/f
mkdir .tmp && echo two > .tmp/g && mv .tmp out
mv a/b a/z
ln -s z a/link
chmod 600 keep.txt
touch untouched.txt
rm old.txt
rm -r olddir
echo three >> keep.txt
python3 -c 'import os; os.rename("out/g", "out/h"); os.mkdir("n\x1bm")'
python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind("agent.sock")'
"""


def _workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "proj"
    (ws / "olddir" / "sub").mkdir(parents=True)
    (ws / "olddir" / "sub" / "x").write_text("x\n")
    for name in ("keep.txt", "untouched.txt", "old.txt"):
        (ws / name).write_text(name + "\n")
    for path in [ws, *ws.rglob("*")]:
        os.lchown(path, OWNER, OWNER)
    return ws


def _run(ws: Path, *args: str, quarantine: bool) -> tuple[dict[str, Any], str, bytes]:
    proc = subprocess.run([str(BIN / "kp-run"), "--image", args[0], "-w", str(ws), "--audit",
                           *(["--quarantine"] if quarantine else []), "--", *args[1:]],
                          capture_output=True, timeout=600)
    (record,) = lines(proc.stdout)
    return record, proc.stderr.decode(), proc.stdout


def _events(stdout: bytes) -> list[dict[str, Any]]:
    traced = subprocess.run([str(BIN / "kp-trace")], input=stdout, capture_output=True, timeout=300)
    assert traced.returncode == 0, traced.stderr.decode()
    return [e for e in lines(traced.stdout) if e.get("kind") == "event"]


def _check_reported(record: dict[str, Any], stdout: bytes, err: str, hidden: set[str], quarantine: bool) -> None:
    found = record["audit_unaccounted"]
    assert found["against"] == ("quarantine" if quarantine else "workspace") and found["complete"] is True, found
    assert found["count"] == len(hidden), (found, hidden)
    listed = {p["path"] for p in found["paths"]}
    assert listed <= hidden and len(listed) == min(len(hidden), 20)
    assert "the audit does not explain" in err and "audit_unaccounted" in err
    # kp-trace shows them after the audit's own events, as events of their own kind
    shown = [e for e in _events(stdout) if e["type"] == "unaccounted"]
    assert {e["path"] for e in shown if e["path"]} == listed
    assert all(e["container"] == record["name"] and e["complete"] for e in shown)
    subprocess.run([str(BIN / "kp-rm"), record["name"]], check=True, capture_output=True)


@pytest.mark.parametrize("quarantine", [True, False], ids=["quarantine", "direct"])
def test_a_path_rewritten_between_the_tracer_and_the_kernel_is_reported(shell_image: str, tmp_path: Path,
                                                                         quarantine: bool) -> None:
    for attempt in range(3):  # the race runs until it won 30 times or 5000 tries; a run it never ran in is retried
        ws = _workspace(tmp_path / str(attempt))
        (ws / "racer.pl").write_text(RACER)
        record, err, stdout = _run(ws, shell_image, "perl", "/workspace/racer.pl", str(WINS), str(MAX_TRIES),
                                   quarantine=quarantine)
        assert record["exit_code"] == 0 and record["audit"] == "complete", err
        if f", {WINS} made as h" in err:
            break
        subprocess.run([str(BIN / "kp-rm"), record["name"]], check=True, capture_output=True)
    # what really exists, from the filesystem, and what the trace says was made
    if quarantine:
        real = {c["path"] for c in record["quarantine"]["changes"] if c["path"].startswith("race/")}
    else:
        real = {f"race/{name}" for name in os.listdir(ws / "race")}
    traced = {e["path"].removeprefix("/workspace/") for e in _events(stdout)
              if e["type"] == "file" and e["op"] == "mkdir" and e["outcome"] == "ok"}
    hidden = real - traced
    assert hidden, f"the race never won: the trace named every real directory ({err.strip()})"
    # each hidden one is a directory the trace named by its other letter
    assert {p[:-6] + p[-5:] for p in hidden} <= {p[:-6] + p[-5:] for p in traced - real}
    _check_reported(record, stdout, err, hidden, quarantine)


@pytest.mark.parametrize("quarantine", [True, False], ids=["quarantine", "direct"])
def test_a_core_dump_written_by_the_kernel_is_reported(shell_image: str, tmp_path: Path, quarantine: bool) -> None:
    pattern = Path("/proc/sys/kernel/core_pattern").read_text().strip()
    if pattern.startswith(("|", "/")):
        pytest.skip(f"this host's kernel.core_pattern ({pattern}) writes no core file into the workspace")
    ws = _workspace(tmp_path)
    record, err, stdout = _run(ws, shell_image, "bash", "-c", CORE_DUMP, quarantine=quarantine)
    assert "STATUS: 139" in err, err  # it crashed
    if quarantine:
        real = {c["path"] for c in record["quarantine"]["changes"]}
    else:
        real = {p for p in os.listdir(ws) if p not in ("olddir", "keep.txt", "untouched.txt", "old.txt")}
    if not real:  # not this test's failure: a container may not dump core (RLIMIT_CORE 0)
        pytest.skip("the container cannot dump core (its RLIMIT_CORE is 0): no file to hide that way")
    assert len(real) == 1 and next(iter(real)).startswith("core"), real
    traced = [e for e in _events(stdout) if e["type"] == "file" and "core" in str(e.get("path"))]
    assert traced == []  # the trace has the signal and the dump's mention, never a call that wrote it
    _check_reported(record, stdout, err, real, quarantine)


@pytest.mark.parametrize("quarantine", [True, False], ids=["quarantine", "direct"])
def test_an_ordinary_agent_is_fully_explained(shell_image: str, tmp_path: Path, quarantine: bool) -> None:
    ws = _workspace(tmp_path)
    record, err, stdout = _run(ws, shell_image, "bash", "-c", ORDINARY, quarantine=quarantine)
    assert record["exit_code"] == 0, err
    found = record["audit_unaccounted"]
    assert found["complete"] is True and found["count"] == 0 and found["paths"] == [], found
    assert found["changes"] >= 12  # the run did change things, and each was explained
    assert "does not explain" not in err
    assert not [e for e in _events(stdout) if e["type"] == "unaccounted"]
    subprocess.run([str(BIN / "kp-rm"), record["name"]], check=True, capture_output=True)


def test_a_trace_cut_by_the_audit_cap_makes_the_cross_check_incomplete(shell_image: str, tmp_path: Path) -> None:
    ws = _workspace(tmp_path)
    proc = subprocess.run([str(BIN / "kp-run"), "--image", shell_image, "-w", str(ws), "--audit",
                           "--audit-cap", "64k", "--time", "10m", "--", "bash", "-c",
                           "i=0; while :; do echo $i > /workspace/f$((i % 50)); i=$((i + 1)); done"],
                          capture_output=True, timeout=600)
    (record,) = lines(proc.stdout)
    assert record["audit"] == "capped", record
    found = record["audit_unaccounted"]
    assert found["complete"] is False and "audit cap" in found["why"] and "count" not in found
    assert found["changes"] >= 1 and "does not explain" not in proc.stderr.decode()
    subprocess.run([str(BIN / "kp-rm"), record["name"]], check=True, capture_output=True)
