"""A warm image's shared RAM (kodepipe.vm.warmram) without QEMU: the sparse copy, the sealed memfd
that nobody can write, what kp-boot refuses to take from a keeper, and the keeper itself as a real
process (one per warm state, gone once its warm.ram is replaced).  Clones sharing it for real are in
tests/integration/test_vm_density.py."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from kodepipe.core.errors import KpError
from kodepipe.vm import qemu, warmram
from tests.conftest import processes_with

MIB = 1 << 20


@pytest.fixture(autouse=True)
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "rt"
    folder.mkdir(mode=0o700)
    monkeypatch.setenv("KODEPIPE_RUNTIME_DIR", str(folder))
    return folder


def memfd_with(pieces: dict[int, bytes], size: int) -> int:
    fd = os.memfd_create("test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    for offset, data in pieces.items():
        os.pwrite(fd, data, offset)
    return fd


def image_with(folder: Path, ram: bytes | None = None, *, warm_id: str = "cccccccccccc",
               memory: str = "4M") -> dict[str, Any]:
    if ram is not None:
        (folder / warmram.RAM_FILE).write_bytes(ram)
    return {"path": str(folder), "warm": {"id": warm_id, "ram": warmram.RAM_FILE, "memory": memory}}


def keepers(where: str) -> list[int]:
    return processes_with(b"kodepipe.vm.warmram", where.encode())


def wait_until(condition: Any, bound: float = 30.0) -> None:
    deadline = time.monotonic() + bound
    while not condition():
        assert time.monotonic() < deadline, "not within the bound"
        time.sleep(0.05)


def test_the_ram_file_keeps_what_the_guest_wrote_and_leaves_zeroes_as_holes(tmp_path: Path) -> None:
    size = 64 * MIB
    # written pages, a page written with zeroes (a freed guest page), and pages never touched
    source = memfd_with({0: b"boot", 10 * MIB: b"\xff" * 3 * MIB, 30 * MIB: bytes(2 * MIB), size - 5: b"tail!"}, size)
    try:
        written = warmram.write_sparse(source, tmp_path / "warm.ram")
        data = (tmp_path / "warm.ram").read_bytes()
        assert len(data) == size
        assert data == os.pread(source, size, 0)
    finally:
        os.close(source)
    # the 3 MiB at 10 MiB, and the one page each of "boot" and "tail!" (a memfd's extents are pages)
    assert written == 3 * MIB + 2 * 4096
    assert os.stat(tmp_path / "warm.ram").st_blocks * 512 <= written + MIB  # the rest are holes
    with pytest.raises(FileExistsError):  # never over a file that is there (a planted link, an old copy)
        warmram.write_sparse(memfd_with({}, MIB), tmp_path / "warm.ram")


def test_the_loaded_memfd_is_the_file_and_nobody_can_write_it_even_root(tmp_path: Path) -> None:
    ram = tmp_path / "warm.ram"
    with open(ram, "wb") as out:
        out.truncate(8 * MIB)
        out.seek(3 * MIB)
        out.write(b"kernel text")
    fd, loaded = warmram.load(ram)
    try:
        assert loaded.st_ino == os.stat(ram).st_ino
        assert os.pread(fd, 8 * MIB, 0) == ram.read_bytes()
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & warmram.SEALS == warmram.SEALS
        # what a QEMU that its guest took over could try, through the fd or by opening it again
        again = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
        try:
            for attempt in (lambda: os.pwrite(again, b"evil", 3 * MIB), lambda: os.ftruncate(again, MIB),
                            lambda: os.ftruncate(again, 16 * MIB),
                            lambda: fcntl.fcntl(again, fcntl.F_ADD_SEALS, 0)):
                with pytest.raises(PermissionError):
                    attempt()
            with pytest.raises(PermissionError):
                mmap.mmap(again, 8 * MIB, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            # a private mapping may be written: the copy is the writer's alone
            private = mmap.mmap(again, 8 * MIB, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            private[3 * MIB:3 * MIB + 4] = b"mine"
            private.close()
        finally:
            os.close(again)
        assert os.pread(fd, 11, 3 * MIB) == b"kernel text"
    finally:
        os.close(fd)


def test_kp_boot_takes_only_a_sealed_memfd_of_the_guests_size(tmp_path: Path) -> None:
    unsealed = memfd_with({}, 4 * MIB)
    sealed = memfd_with({}, 4 * MIB)
    fcntl.fcntl(sealed, fcntl.F_ADD_SEALS, warmram.SEALS)
    partly = memfd_with({}, 4 * MIB)
    fcntl.fcntl(partly, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)  # still writable
    plain = os.open(tmp_path / "plain", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(plain, 4 * MIB)
    try:
        warmram._check(sealed, 4 * MIB)
        for fd, size in ((unsealed, 4 * MIB), (partly, 4 * MIB), (plain, 4 * MIB), (sealed, 8 * MIB)):
            with pytest.raises(KpError) as caught:
                warmram._check(fd, size)
            assert caught.value.code == "resume_failed"
    finally:
        for fd in (unsealed, sealed, partly, plain):
            os.close(fd)


def test_one_keeper_per_warm_state_hands_out_one_memfd_and_ends_when_the_ram_is_replaced(tmp_path: Path,
                                                                                            runtime: Path) -> None:
    image = image_with(tmp_path, b"\x01" * MIB + bytes(3 * MIB))
    first = warmram.obtain(image)
    where = str(runtime / "ram-cccccccccccc.sock")
    try:
        second = warmram.obtain(image)
        try:
            # the same memory, not a copy: that is what makes clones share it
            assert os.fstat(first).st_ino == os.fstat(second).st_ino
            assert os.pread(second, 4, 0) == b"\x01" * 4
        finally:
            os.close(second)
        running = keepers(where)
        assert len(running) == 1, running
        assert os.stat(where).st_mode & 0o777 == 0o600
        # kp-image warm --force (or kp-rm of the image) replaces warm.ram: the keeper ends, its socket goes
        os.replace(tmp_path / warmram.RAM_FILE, tmp_path / "old.ram")
        (tmp_path / warmram.RAM_FILE).write_bytes(b"\x02" * 4 * MIB)
        wait_until(lambda: not keepers(where), warmram.CHECK * 4)
        assert not os.path.exists(where)
        fresh = warmram.obtain(image)
        try:
            assert os.pread(fresh, 4, 0) == b"\x02" * 4 and os.fstat(fresh).st_ino != os.fstat(first).st_ino
        finally:
            os.close(fresh)
        assert os.pread(first, 4, 0) == b"\x01" * 4  # a clone already running keeps what it mapped
    finally:
        os.close(first)
        (tmp_path / warmram.RAM_FILE).unlink()
        wait_until(lambda: not keepers(where), warmram.CHECK * 4)


def test_concurrent_boots_start_one_keeper(tmp_path: Path, runtime: Path) -> None:
    import threading

    image = image_with(tmp_path, b"\x07" * 4 * MIB)
    got: list[int] = []
    threads = [threading.Thread(target=lambda: got.append(warmram.obtain(image))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert len(got) == 4 and len({os.fstat(fd).st_ino for fd in got}) == 1
        assert len(keepers(str(runtime / "ram-cccccccccccc.sock"))) == 1
    finally:
        for fd in got:
            os.close(fd)
        (tmp_path / warmram.RAM_FILE).unlink()
        wait_until(lambda: not keepers(str(runtime / "ram-cccccccccccc.sock")), warmram.CHECK * 4)


def test_a_keeper_that_cannot_start_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(KpError) as caught:
        warmram.obtain(image_with(tmp_path))  # no warm.ram
    assert caught.value.code == "resume_failed"
    assert "did not start" in caught.value.message and "No such file" in caught.value.message


def test_a_listener_that_hands_over_something_else_is_refused(tmp_path: Path, runtime: Path) -> None:
    """Whatever answers on the keeper's socket (a stale or planted listener) must hand over the sealed RAM."""
    import threading

    image = image_with(tmp_path, bytes(4 * MIB))
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(runtime / "ram-cccccccccccc.sock"))
    server.listen(1)
    writable = memfd_with({}, 4 * MIB)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            socket.send_fds(conn, [b"ram"], [writable])

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with pytest.raises(KpError) as caught:
            warmram.obtain(image)
        assert "sealed" in caught.value.message
    finally:
        thread.join()
        server.close()
        os.close(writable)


def test_the_command_line_maps_the_ram_privately_for_a_clone_and_shared_for_the_warming() -> None:
    clone = warmram.qemu_args(7, "1G", share=False)
    assert clone == ["-object", "memory-backend-file,id=pc.ram,size=1G,mem-path=/proc/self/fd/7,share=off",
                     "-machine", "memory-backend=pc.ram"]
    assert "share=on" in warmram.qemu_args(7, "1G", share=True)[1]
    image = {"kernel": "/k", "initrd": "/i"}
    argv = qemu.command_line({"name": "c", "id": "c", "disk": "/d"}, image, qemu.BootOptions(net="none"),
                             qemu.Sockets.for_vm("c"), accel="tcg", ssh_port=None, serial_fd=5, incoming="defer",
                             ram=(7, False))
    assert argv[argv.index("-m") + 1] == "1G" and clone[1] in argv and argv[-2:] == ["-incoming", "defer"]
    assert not warmram.shared({"warm": {"id": "x", "state": "warm.state"}})  # a warm state of before
    assert warmram.shared({"warm": {"id": "x", "state": "warm.state", "ram": "warm.ram"}})


def test_the_mapped_check_sees_a_mapping_in_another_process(tmp_path: Path) -> None:
    from kodepipe.core import proc

    ram = tmp_path / "warm.ram"
    ram.write_bytes(b"\x05" * MIB)
    fd, _ = warmram.load(ram)
    try:
        info = os.fstat(fd)
        assert warmram.mapped(info.st_ino, info.st_dev) is None
        code = (f"import mmap,os,sys,time; m=mmap.mmap({fd}, 1<<20, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ);"
                "sys.stdout.write('ok\\n'); sys.stdout.flush(); time.sleep(30)")
        child = proc.daemon(["python3", "-c", code], pass_fds=(fd,), stdout=-1)
        try:
            assert child.stdout is not None and child.stdout.readline() == b"ok\n"
            found = warmram.mapped(info.st_ino, info.st_dev)
            assert found == str(child.pid)
            assert warmram.mapped(info.st_ino, info.st_dev, found) == found
        finally:
            child.kill()
            child.wait()
        assert warmram.mapped(info.st_ino, info.st_dev, found) is None
    finally:
        os.close(fd)


def test_errno_of_a_sealed_write_is_eperm() -> None:
    fd = memfd_with({}, MIB)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, warmram.SEALS)
    try:
        with pytest.raises(OSError) as caught:
            os.pwrite(fd, b"x", 0)
        assert caught.value.errno == errno.EPERM
    finally:
        os.close(fd)


def test_a_keeper_that_does_not_answer_is_waited_for_never_replaced(tmp_path: Path, runtime: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A live keeper that is slow (its queue full) is not a dead one: kp-boot must not take its socket's
    name and start a second copy of the RAM, which the first would then unlink when it ends."""
    import threading

    monkeypatch.setattr(warmram, "START_BOUND", 1.5)
    image = image_with(tmp_path, bytes(4 * MIB))
    where = runtime / "ram-cccccccccccc.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(where))
    server.listen(8)
    stop = threading.Event()

    def mute() -> None:  # accepts, says nothing, hangs up
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.close()

    thread = threading.Thread(target=mute)
    thread.start()
    try:
        with pytest.raises(KpError) as caught:
            warmram.obtain(image)
        assert caught.value.code == "resume_failed" and "did not hand it over" in caught.value.message
        assert not keepers(str(where)) and where.exists()  # no second keeper; the socket left alone
    finally:
        stop.set()
        thread.join()
        server.close()


def test_a_keeper_ending_removes_only_its_own_socket(tmp_path: Path, runtime: Path) -> None:
    image = image_with(tmp_path, bytes(4 * MIB))
    where = runtime / "ram-cccccccccccc.sock"
    fd = warmram.obtain(image)
    os.close(fd)
    # someone else's socket now has the name (a keeper started after this one was thought gone)
    os.replace(where, runtime / "old.sock")
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(where))
    try:
        (tmp_path / warmram.RAM_FILE).unlink()  # outdated: the keeper ends at its next look
        wait_until(lambda: not keepers(str(where)), warmram.CHECK * 4)
        assert where.exists(), "the ending keeper removed a socket it had not bound"
        assert not where.with_suffix(".log").exists()  # its own log, with nothing in it, goes
    finally:
        other.close()


def test_the_received_memfd_is_close_on_exec(tmp_path: Path) -> None:
    image = image_with(tmp_path, bytes(4 * MIB))
    fd = warmram.obtain(image)
    try:
        assert not os.get_inheritable(fd)
    finally:
        os.close(fd)
        (tmp_path / warmram.RAM_FILE).unlink()


def test_a_warm_state_missing_a_file_is_said_and_its_clones_do_not_resume(tmp_path: Path) -> None:
    from kodepipe.core.state import Store
    from kodepipe.vm import images, lifecycle
    from tests.test_pool import make_image, make_member

    store = Store(tmp_path / "state")
    folder = make_image(store)
    meta = store.read_meta(folder) or {}
    meta["warm"] = {**meta["warm"], "ram": warmram.RAM_FILE}
    store.write_meta(folder, meta)
    (folder / "warm.state").write_bytes(b"s")
    (folder / warmram.RAM_FILE).write_bytes(b"r")
    record = images.view(store, "base")
    assert record["state"] == "ready" and "problem" not in record["warm"]
    (folder / warmram.RAM_FILE).unlink()  # a user's clean-up, a failed copy
    record = images.view(store, "base")
    assert record["state"] == "ready"  # cold clones still boot from it
    assert record["warm"]["problem"] == "missing warm.ram"
    make_member(store, "w-1", pooled=False, saved={"warm": True, "memory": "1G", "cpus": 2, "net": "user",
                                                   "share": None})
    with pytest.raises(KpError) as caught:
        lifecycle.boot(store, "w-1", qemu.BootOptions(), ("tcg", "test"))
    assert caught.value.code == "broken" and "missing warm.ram" in caught.value.message
    assert "kp-image warm --force base" in (caught.value.hint or "")
