"""The serial log is bounded: the keeper that QEMU's serial logfile pipe feeds, the readers of a
rotated log (kp-ip's tail, kp-attach --log and --follow), and the console watch of kp-boot.

The guest's side is attacked for real in tests/integration/test_guest_input.py; here the keeper
gets what no guest under TCG can print in a test's time (200 MB), through a real pipe."""

from __future__ import annotations

import collections
import errno
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kodepipe.vm import accel, address, seriallog
from tests.cli import invoke
from tests.conftest import BIN, ROOT
from tests.fakevm import FakeVM, make_vm

CAP = seriallog.CAP


def wait_for(condition: object, what: str, bound: float = 60.0) -> None:
    """Until ``condition()`` holds; the bound is only a guard against a hang."""
    deadline = time.monotonic() + bound
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def keeper_pids(log: Path) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if b"kodepipe.vm.seriallog" in argv and os.fsencode(str(log)) in argv and state != "Z":
                found.append(int(pid))
    return found


def chunks(total: int, size: int = 1 << 16) -> Iterator[bytes]:
    """``total`` bytes of console output, each chunk different (so a tail can be checked for order)."""
    for n in range(total // size):
        yield (f"line {n:09d} of a guest that never stops printing\r\n".encode() * (size // 40 + 1))[:size]


def logged(log: Path) -> bytes:
    return b"".join(path.read_bytes() for path in seriallog.files(log))


def test_the_keeper_bounds_200_mb_and_keeps_the_last_bytes_in_order(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    log.write_bytes(b"the previous boot's lines\n")
    keeper = subprocess.Popen([sys.executable, "-S", "-m", "kodepipe.vm.seriallog", str(log)], stdin=subprocess.PIPE,
                              env={"PYTHONPATH": str(ROOT)}, cwd="/")
    assert keeper.stdin is not None
    last: collections.deque[bytes] = collections.deque(maxlen=(2 * CAP) // (1 << 16) + 1)
    total = 200 * 1000 * 1000
    for chunk in chunks(total):
        keeper.stdin.write(chunk)
        last.append(chunk)
    keeper.stdin.close()
    assert keeper.wait(timeout=120) == 0  # end of input: it ends, as it does when QEMU exits
    sizes = [path.stat().st_size for path in seriallog.files(log)]
    assert len(sizes) == 2 and all(size <= CAP for size in sizes), sizes
    assert sum(sizes) <= 2 * CAP
    kept = logged(log)
    assert len(kept) >= CAP  # at least the last CAP bytes are always there
    assert b"".join(last).endswith(kept)  # exactly the stream's last bytes, in order


def test_the_pipe_is_qemus_alone_and_the_keeper_ends_with_its_last_writer(tmp_path: Path) -> None:
    """kp-boot closes its copy of the write end once QEMU holds one: the keeper lives as long as QEMU."""
    log = tmp_path / "serial.log"
    with seriallog.pipe(log) as fd:
        qemu = subprocess.Popen([sys.executable, "-c", f"import os, sys; os.write({fd}, b'booting\\n'); "
                                 "sys.stdin.read()"], pass_fds=(fd,), stdin=subprocess.PIPE)
    with pytest.raises(OSError):
        os.fstat(fd)  # kp-boot's copy is closed: QEMU's is the only write end
    assert qemu.stdin is not None
    wait_for(lambda: log.exists() and log.read_bytes() == b"booting\n", "the keeper copied nothing")
    (keeper,) = keeper_pids(log)
    assert qemu.poll() is None
    qemu.stdin.close()  # "QEMU" exits
    assert qemu.wait(timeout=60) == 0
    wait_for(lambda: keeper_pids(log) == [], "the keeper outlived the last writer")
    assert keeper > 0


def test_a_qemu_that_never_starts_leaves_no_keeper(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    with pytest.raises(RuntimeError), seriallog.pipe(log):
        wait_for(lambda: keeper_pids(log) != [], "no keeper started")
        raise RuntimeError("QEMU failed to start")
    wait_for(lambda: keeper_pids(log) == [], "the keeper of a QEMU that never started is still there")


def test_a_full_disk_drops_output_but_never_stops_the_reading(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "serial.log"
    keeper = seriallog.Keeper(log, cap=100)
    real_write = os.write
    full = True

    def write(fd: int, data: bytes) -> int:
        if full and fd == keeper.out:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    keeper.write(b"lost\n")
    assert keeper.dropped == 5 and keeper.out is not None
    full = False
    keeper.write(b"kept\n")
    keeper.close()
    assert log.read_bytes() == b"kept\n"


def test_a_removed_folder_is_never_made_again(tmp_path: Path) -> None:
    folder = tmp_path / "vm"
    folder.mkdir()
    keeper = seriallog.Keeper(folder / "serial.log", cap=10)
    keeper.write(b"0123456789")
    for path in seriallog.files(folder / "serial.log"):
        path.unlink()
    folder.rmdir()  # kp-rm, while the keeper still drains the pipe
    keeper.write(b"abcdefghij" * 5)  # would rotate: the folder must stay gone
    keeper.close()
    assert not folder.exists()


def test_rotation_bound_in_the_keeper(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    keeper = seriallog.Keeper(log, cap=10)
    stream = b""
    for piece in (b"abc", b"defghijklmnop", b"q" * 25, b"rs"):
        keeper.write(piece)
        stream += piece
        assert all(path.stat().st_size <= 10 for path in seriallog.files(log))
        kept = logged(log)
        assert stream.endswith(kept) and len(kept) >= min(len(stream), 10)
    keeper.close()
    assert seriallog.rotated(log).read_bytes() == b"q" * 10 and log.read_bytes() == b"qrs"


# -- the readers ----------------------------------------------------------------------------------


def test_tail_reads_across_the_rotation_and_only_what_it_needs(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    seriallog.rotated(log).write_bytes(b"older\n" * 100)
    log.write_bytes(b"newer\n")
    assert seriallog.tail(log, 12) == b"older\nnewer\n"
    assert seriallog.tail(log, 3) == b"er\n"
    assert seriallog.tail(log, 10_000) == b"older\n" * 100 + b"newer\n"
    log.unlink()
    os.mkfifo(log)  # never a FIFO: reading it would block
    assert seriallog.tail(log, 12) == b"older\nolder\n"


def test_kp_ips_serial_tail_shows_the_last_lines_after_a_rotation(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    seriallog.rotated(log).write_bytes(b"".join(b"old %d\r\n" % n for n in range(50_000)))
    log.write_bytes(b"new 1\r\nnew 2\r\n")
    tail = address.serial_tail({"serial_log": str(log)}, lines=3)
    assert tail == "old 49999\nnew 1\nnew 2"
    assert address.serial_tail({"serial_log": str(tmp_path / "none")}) == "(no serial log)"


def test_the_console_watch_counts_a_rotation_as_output(tmp_path: Path) -> None:
    """kp-boot's silent-console check: a log that rotated away grew, even if the new one is shorter."""
    log = tmp_path / "serial.log"
    log.write_bytes(b"x" * 100)
    since = seriallog.mark(log)
    assert not seriallog.grew(log, since)
    os.replace(log, seriallog.rotated(log))
    log.write_bytes(b"y")  # shorter than before, but new
    assert seriallog.grew(log, since)
    assert accel.watch_console(log, since, lambda: True, 1.0) == "printed"
    assert seriallog.grew(tmp_path / "new.log", seriallog.mark(tmp_path / "none")) is False


@pytest.fixture
def vm() -> Iterator[FakeVM]:
    made = make_vm("s1")
    yield made
    made.stop()


def test_kp_attach_log_prints_the_older_part_first(vm: FakeVM) -> None:
    log = vm.folder / "serial.log"
    seriallog.rotated(log).write_bytes(b"older\n")
    log.write_bytes(b"newer\n")
    result = invoke("kp-attach", "--log", "s1")
    assert result.status == 0 and result.stdout == b"older\nnewer\n"
    log.unlink()  # between a rotation and the keeper's next byte
    result = invoke("kp-attach", "--log", "s1")
    assert result.status == 0 and result.stdout == b"older\n"


def read_exactly(stream: object, size: int, bound: float = 60.0) -> bytes:
    """``size`` bytes from a pipe, or an assertion error after ``bound`` seconds (a guard against a hang)."""
    fd = stream.fileno()  # type: ignore[attr-defined]
    data = b""
    deadline = time.monotonic() + bound
    while len(data) < size:
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        assert ready, f"only {data!r} came"
        more = os.read(fd, size - len(data))
        assert more, f"the pipe ended after {data!r}"
        data += more
    return data


def test_kp_attach_follow_goes_on_into_the_new_file_after_a_rotation(vm: FakeVM) -> None:
    log = vm.folder / "serial.log"
    log.write_bytes(b"first\n")
    proc = subprocess.Popen([str(BIN / "kp-attach"), "--log", "--follow", "s1"], stdout=subprocess.PIPE)
    try:
        assert read_exactly(proc.stdout, 6) == b"first\n"
        with log.open("ab") as more:
            more.write(b"end of the old file\n")
        os.replace(log, seriallog.rotated(log))  # as the keeper rotates: the old file gets no more bytes
        log.write_bytes(b"in the new file\n")
        assert read_exactly(proc.stdout, 20 + 16) == b"end of the old file\nin the new file\n"
        vm.stop()
        assert proc.wait(timeout=60) == 0
        assert proc.stdout is not None and proc.stdout.read() == b""
    finally:
        proc.kill()
        proc.wait()
