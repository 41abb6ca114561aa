"""Hostile trees, made by a real agent in a real quarantined kp-run (Podman): a chain of directories
5,000 deep (paths of ~10 KB, far past PATH_MAX and Python's recursion limit) with a setuid file and a
symlink out of the workspace at its bottom, names with a newline, an escape sequence and bytes that
are not UTF-8, a fifo, a socket, a hard link, and 100,000 empty files.  Then kp-ls, the record's
change list, kp-run --apply (applied, or left out with a warning, item by item), kp-rm of that run,
and kp-rm of another run afterwards all work: no traceback, no control character on the terminal."""

from __future__ import annotations

import base64
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BIN, lines
from tests.integration.test_run import one_podman_service  # noqa: F401 - the module's shared service

pytestmark = pytest.mark.integration

OWNER = 4321  # the workspace's owner: the "invoking user" when root runs kp-run without sudo
DEPTH = 5000
MANY = 100_000
NAMES = [b"new\nline", b"\x1b[31mred\x1b[0m", b"caf\xe9-\xff\xfe"]
BOUND = 900  # seconds: a generous bound on each command, never a measured duration

# the agent, in Python in the container: everything relative to directory fds, as deep as it likes
AGENT = f"""
import os, socket, sys
top = sys.argv[1]
os.chdir("/workspace")
os.mkdir(top)
os.chdir(top)
fd = os.open(".", os.O_RDONLY)
for _ in range({DEPTH}):
    os.mkdir("d", dir_fd=fd)
    child = os.open("d", os.O_RDONLY, dir_fd=fd)
    os.close(fd)
    fd = child
f = os.open("suid", os.O_WRONLY | os.O_CREAT, 0o755, dir_fd=fd)
os.write(f, b"#!/bin/sh\\n")
os.fchmod(f, 0o4755)
os.close(f)
os.symlink("/etc/shadow", "out", dir_fd=fd)
os.close(fd)
os.mkdir("odd")
for name in {NAMES!r}:
    with open(b"odd/" + name, "wb") as f:
        f.write(name)
    os.chmod(b"odd/" + name, 0o4755)
os.link(b"odd/" + {NAMES[0]!r}, b"odd/hard")
os.mkfifo("odd/fifo")
s = socket.socket(socket.AF_UNIX)
s.bind("odd/sock")
s.close()
os.mkdir("many")
fd = os.open("many", os.O_RDONLY)
for i in range({MANY}):
    os.close(os.open(f"f{{i}}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
os.close(fd)
print("agent done", flush=True)
"""


@pytest.fixture
def ws(tmp_path: Path) -> Any:
    ws = tmp_path / "proj"
    ws.mkdir()
    (ws / "main.py").write_text("print('hello')\n")
    for path in [ws, *ws.rglob("*")]:
        os.chown(path, OWNER, OWNER)
    yield ws
    # pytest's own clean-up (shutil.rmtree, recursive) fails on a tree this deep
    from kodepipe.core.state import remove_tree

    for entry in os.listdir(tmp_path):
        remove_tree(tmp_path / entry)


def kp(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, timeout=BOUND)


def clean(proc: subprocess.CompletedProcess[bytes]) -> str:
    """stderr, checked: no traceback, and every line free of control characters and of bytes that are
    not UTF-8 (a file name the agent chose must not reach the terminal raw)."""
    err = proc.stderr.decode()  # raises if a byte that is not UTF-8 was printed
    assert "Traceback" not in err, err[-3000:]
    for line in err.splitlines():
        assert line.isprintable(), repr(line)[:500]
    return err


def hostile_run(image: str, ws: Path, top: str) -> tuple[dict[str, Any], str]:
    proc = kp("kp-run", "--image", image, "-w", str(ws), "--quarantine", "--", "python3", "-c", AGENT, top)
    err = clean(proc)
    records = lines(proc.stdout)
    assert records, err[-3000:]
    record = records[-1]
    assert proc.returncode == 0 and record["exit_code"] == 0 and "agent done" in err, err[-3000:]
    assert record["state"] == "quarantined" and "problem" not in record, record.get("problem")
    return record, err


def check_review(record: dict[str, Any], err: str, top: str) -> None:
    """The record lists each change with its type, flags the symlink out and the deep setuid file,
    carries every name's bytes exactly; stderr says what deserves a look, escaped."""
    entries = record["quarantine"]["changes"]
    assert len(entries) == 1 + DEPTH + 2 + 1 + len(NAMES) + 3 + 1 + MANY
    deep = f"{top}/" + "d/" * DEPTH
    by_path = {base64.b64decode(e["path_b64"]) if "path_b64" in e else e["path"].encode(): e for e in entries}
    assert by_path[(deep + "suid").encode()] == {"path": deep + "suid", "change": "added", "type": "file",
                                                 "mode": "4755", "setid": True}
    assert by_path[(deep + "out").encode()] == {"path": deep + "out", "change": "added", "type": "symlink",
                                                "target": "/etc/shadow", "escapes": True}
    for name in NAMES:
        entry = by_path[f"{top}/odd/".encode() + name]
        assert entry["type"] == "file" and entry["setid"] is True
    assert by_path[f"{top}/odd/fifo".encode()]["type"] == "fifo"
    assert by_path[f"{top}/odd/sock".encode()]["type"] == "socket"
    assert by_path[f"{top}/odd/hard".encode()]["type"] == "file"
    assert sum(1 for path in by_path if path.startswith(f"{top}/many/f".encode())) == MANY
    assert f"{top}/odd/\\x1b[31mred\\x1b[0m: file with the setuid/setgid bit" in err
    assert f"{top}/odd/caf\\xe9-\\xff\\xfe: file with the setuid/setgid bit" in err
    assert f"{top}/odd/fifo: a fifo, which apply leaves out" in err
    assert f"{top}/odd/sock: a socket, which apply leaves out" in err
    assert "-> /etc/shadow: a symlink that may point out of the workspace" in err


def deepest(root: Path) -> tuple[int, int]:
    """How deep the chain of "d" directories under root goes, and an fd of its deepest (caller closes)."""
    depth, fd = 0, os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    while True:
        try:
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        except FileNotFoundError:
            return depth, fd
        os.close(fd)
        fd, depth = child, depth + 1


def test_a_hostile_tree_is_listed_reviewed_and_applied(shell_image: str, ws: Path, kp_env: dict[str, Path]) -> None:
    record, err = hostile_run(shell_image, ws, "h")
    check_review(record, err, "h")
    assert sorted(os.listdir(ws)) == ["main.py"]  # nothing reached the checkout yet
    listed = kp("kp-ls")
    clean(listed)
    assert listed.returncode == 0
    assert [(r["name"], r["state"]) for r in lines(listed.stdout)] == [(record["name"], "quarantined")]

    # the review's findings would refuse it (test_review.py shows that): accepted here, one review of the tree
    applied = kp("kp-run", "--apply", record["name"], "--accept", "symlink-out", "--accept", "setid",
                 "--accept", "control-characters")
    err = clean(applied)
    assert applied.returncode == 0, err[-3000:]
    (done,) = lines(applied.stdout)
    assert {f["rule"] for f in done["accepted"]} == {"symlink-out", "setid", "control-characters"}
    assert done["state"] == "applied" and done["applied_count"] == len(record["quarantine"]["changes"]) - 2
    assert sorted(e["path"] for e in done["quarantine"]["not_applied"]) == ["h/odd/fifo", "h/odd/sock"]
    assert "h/odd/\\x1b[31mred\\x1b[0m: setuid/setgid bits stripped" in err
    assert "h/odd/fifo: not applied" in err and "h/odd/sock: not applied" in err
    # the checkout: the deep file at its depth without its setuid bit, the symlink as it was, every name's
    # exact bytes (setuid stripped), the hard link as a file of its own, no fifo or socket, every file
    depth, fd = deepest(ws / "h")
    try:
        assert depth == DEPTH
        assert os.stat("suid", dir_fd=fd).st_mode & 0o7777 == 0o755
        assert os.readlink("out", dir_fd=fd) == "/etc/shadow"
        assert os.stat("suid", dir_fd=fd).st_uid == OWNER
    finally:
        os.close(fd)
    odd = os.fsencode(ws / "h" / "odd")
    assert sorted(os.listdir(odd)) == sorted([*NAMES, b"hard"])
    for name in NAMES:
        assert Path(os.fsdecode(odd + b"/" + name)).read_bytes() == name
        assert os.stat(odd + b"/" + name).st_mode & 0o7777 == 0o755
    assert len(os.listdir(ws / "h" / "many")) == MANY
    assert (kp_env["state"] / "containers" / record["name"]).is_dir()  # until kp-rm


def test_kp_rm_of_a_hostile_run_and_then_of_another(shell_image: str, ws: Path, kp_env: dict[str, Path]) -> None:
    record, err = hostile_run(shell_image, ws, "h2")
    check_review(record, err, "h2")
    proc = kp("kp-run", "--image", shell_image, "-w", str(ws), "--quarantine", "--", "bash", "-c",
              "echo other > /workspace/other.txt")
    clean(proc)
    (other,) = lines(proc.stdout)
    assert other["state"] == "quarantined"
    removed = kp("kp-rm", record["name"])
    clean(removed)
    assert removed.returncode == 0
    assert not (kp_env["state"] / "containers" / record["name"]).exists()
    assert os.listdir(kp_env["state"] / "trash") == []
    listed = kp("kp-ls")
    clean(listed)
    assert [r["name"] for r in lines(listed.stdout)] == [other["name"]]
    removed = kp("kp-rm", other["name"])
    clean(removed)
    assert removed.returncode == 0 and not (kp_env["state"] / "containers" / other["name"]).exists()
    assert sorted(os.listdir(ws)) == ["main.py"]  # discarded: the checkout never saw any of it


SETUID_DEEP = f"""
import os
os.chdir("/workspace")
os.mkdir("s")
fd = os.open("s", os.O_RDONLY)
for _ in range({DEPTH}):
    os.mkdir("d", dir_fd=fd)
    child = os.open("d", os.O_RDONLY, dir_fd=fd)
    os.close(fd)
    fd = child
for name in ("suid", "\\x1b[31mred"):
    f = os.open(name, os.O_WRONLY | os.O_CREAT, 0o755, dir_fd=fd)
    os.fchmod(f, 0o4755)
    os.close(f)
"""


def test_a_setuid_file_deep_in_the_workspace_is_reported_after_a_direct_run(shell_image: str, ws: Path) -> None:
    """Without quarantine the agent writes the checkout itself: the setuid scan after the run walks
    it through directory fds, so a setuid file 5,000 levels down is reported like one at the top."""
    proc = kp("kp-run", "--image", shell_image, "-w", str(ws), "--", "python3", "-c", SETUID_DEEP)
    err = clean(proc)
    (record,) = lines(proc.stdout)
    assert proc.returncode == 0 and record["exit_code"] == 0, err[-3000:]
    deep = "s/" + "d/" * DEPTH
    assert sorted(record["setuid_files"]) == sorted([deep + "suid", deep + "\x1b[31mred"])
    assert "the agent left setuid/setgid files in the workspace" in err and "\\x1b[31mred" in err

