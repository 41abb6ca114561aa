"""Encrypted data disks, without a VM: kp-disk's options and key sources, kp-boot --disk's checks, the
QEMU command line (the key never on it), and what kp-ls and a bulk kp-rm do with a disk.  The real
thing, on real guests, is tests/integration/test_vm_disk.py."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from pytest_subprocess import FakeProcess

from kodepipe.core.errors import BadInput, CommandFailed
from kodepipe.vm import disks, qemu
from tests.cli import invoke
from tests.test_qemu import argv, value


@pytest.mark.parametrize(("text", "expected"), [
    ("data", ("data", "/mnt/data")),
    ("data:/data", ("data", "/data")),
    ("cache:/srv/cache-1", ("cache", "/srv/cache-1")),
])
def test_disk_attachments(text: str, expected: tuple[str, str]) -> None:
    assert disks.parse_attach(text) == expected


@pytest.mark.parametrize("text", ["", "Bad Name", "data:relative", "data:/", "data:/etc", "data:/proc/x",
                                  "data:/a/../etc", "data:/a b", "data:/a;reboot", "data:/usr/local"])
def test_bad_disk_attachments(text: str) -> None:
    with pytest.raises(BadInput):
        disks.parse_attach(text)


def test_the_key_reaches_qemu_as_a_secret_object_read_from_an_fd() -> None:
    data = (qemu.DataDisk("/state/disks/d/disk.qcow2", 20, 21, "kpdata0"),
            qemu.DataDisk("/state/disks/e/disk.qcow2", 22, 23, "kpdata1"))
    args = argv(data_disks=data)
    assert value(args, "-object")[-2:] == ["secret,id=kpdata0-key,file=/proc/self/fd/21",
                                          "secret,id=kpdata1-key,file=/proc/self/fd/23"]
    blockdevs = [b for b in value(args, "-blockdev") if b.startswith("driver=qcow2,node-name=kpdata")]
    assert all("encrypt.format=luks" in b for b in blockdevs) and len(blockdevs) == 2
    assert "virtio-blk-pci,drive=kpdata1,serial=kpdata1" in value(args, "-device")
    # after the VM's own disk: the PCI slots a saved machine was saved with stay its own
    devices = value(args, "-device")
    assert devices.index("virtio-blk-pci,drive=kpdata0,serial=kpdata0") == len(devices) - 2


@pytest.mark.parametrize(("args", "said"), [
    (["d", "--size", "1G"], "exactly one of --key-env"),
    (["d", "--size", "1G", "--key-env", "A", "--key-file", "/k"], "exactly one of --key-env"),
    (["d", "--size", "huge", "--key-env", "A"], "invalid size"),
    (["d", "--size", "1G", "--key-env", "not a name"], "'source' must be"),
])
def test_kp_disk_usage_errors(args: list[str], said: str) -> None:
    result = invoke("kp-disk", *args)
    assert result.status == 2 and said in result.stderr, result.stderr


def test_kp_disk_says_which_key_source_it_cannot_read_and_makes_nothing(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    monkeypatch.delenv("KP_NO_SUCH_KEY", raising=False)
    result = invoke("kp-disk", "d", "--size", "1G", "--key-env", "KP_NO_SUCH_KEY")
    assert result.status == 1 and "KP_NO_SUCH_KEY is not set" in result.stderr
    result = invoke("kp-disk", "d", "--size", "1G", "--key-file", str(tmp_path / "missing"))
    assert result.status == 1 and "does not exist" in result.stderr
    assert invoke("kp-ls", "--kind", "disk").records == []


@pytest.mark.parametrize(("args", "said"), [
    (["--disk", "a", "--disk", "a:/x"], "each disk once"),
    (["--disk", "a:/data", "--disk", "b:/data"], "each disk once"),
    (["--disk", "a:/etc"], "system directory"),
])
def test_kp_boot_refuses_a_bad_disk(args: list[str], said: str) -> None:
    result = invoke("kp-boot", *args, "nosuchvm")
    assert result.status == 2 and said in result.stderr, result.stderr


def test_a_bulk_removal_never_takes_a_disk_and_kp_ls_shows_it() -> None:
    from kodepipe.core.state import Store

    store = Store()
    folder = store.folder("disk", "kept")
    folder.mkdir(parents=True)
    (folder / disks.DISK).write_bytes(b"")
    store.write_meta(folder, {"kind": "disk", "name": "kept", "id": "0123456789ab", "created": "2026-01-01T00:00:00Z",
                              "state": "ready", "size": 1 << 30, "encryption": "luks", "key": {"env": "K"},
                              "disk": disks.DISK, "attached": {"vm": "gone-vm", "started": "x"}})
    (listed,) = invoke("kp-ls", "--kind", "disk").records
    assert listed["state"] == "ready" and "attached_to" not in listed and "attached" not in listed
    bulk = invoke("kp-rm", input=orjson.dumps(listed) + b"\n")
    assert "only when it is named" in bulk.records[0]["kept"] and folder.is_dir()
    table = invoke("kp-ls", "--table", "kept").stdout.decode()
    assert "1.0G luks" in table
    assert invoke("kp-rm", "kept").records[0]["removed"] is True and not folder.exists()


def _create_argv(path: Path) -> list[str]:
    return ["/usr/bin/qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=kpkey,file=/dev/stdin",
            "-o", "encrypt.format=luks,encrypt.key-secret=kpkey,encrypt.hash-alg=sha512", str(path), str(1 << 30)]


def test_an_untimed_pbkdf_benchmark_is_tried_again(fp: FakeProcess, tmp_path: Path) -> None:
    # qemu-img gives up when its benchmark round fits in one scheduler tick (half the time on a
    # 4 ms-tick kernel with SHA-256): kp-disk tries again, and the disk is made
    disk = tmp_path / "disk.qcow2"
    untimed = f"qemu-img: {disk}: Unable to get accurate CPU usage"
    fp.register(_create_argv(disk), stderr=untimed, returncode=1)
    fp.register(_create_argv(disk), stderr=untimed, returncode=1)
    fp.register(_create_argv(disk), returncode=0)
    disks._make_qcow2(disk, 1 << 30, "k")
    assert fp.call_count(_create_argv(disk)) == 3


def test_other_failures_and_a_benchmark_that_never_times_are_not_hidden(fp: FakeProcess, tmp_path: Path) -> None:
    disk = tmp_path / "disk.qcow2"
    fp.register(_create_argv(disk), stderr="qemu-img: No space left on device", returncode=1)
    with pytest.raises(CommandFailed, match="No space left"):
        disks._make_qcow2(disk, 1 << 30, "k")
    assert fp.call_count(_create_argv(disk)) == 1
    for _ in range(disks.CREATE_TRIES):
        fp.register(_create_argv(disk), stderr="Unable to get accurate CPU usage", returncode=1)
    with pytest.raises(CommandFailed, match="accurate CPU usage"):
        disks._make_qcow2(disk, 1 << 30, "k")
    assert fp.call_count(_create_argv(disk)) == 1 + disks.CREATE_TRIES
