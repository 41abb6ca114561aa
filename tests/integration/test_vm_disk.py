"""Encrypted data disks on real guests (TCG): kp-disk makes one, kp-boot --disk attaches it to one VM
at a time, kp-ip formats and mounts it, it outlives kp-rm of the clone, and neither its raw qcow2,
nor QEMU's command line and log, nor the disk's metadata ever hold plaintext or the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import lines
from tests.integration.conftest import Golden, run
from tests.integration.test_vm_loopback import as_root

pytestmark = pytest.mark.integration

DISK = "vault"
KEY = "correct-horse-battery-staple-7361"
MARKER = "kodepipe plaintext marker 5f1d0c"


def one(proc: Any) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr.decode()
    (record,) = lines(proc.stdout)
    return dict(record)


def booted(env: dict[str, str], name: str, *flags: str) -> dict[str, Any]:
    one(run(env, "kp-clone", "--cold", "base", name))
    one(run(env, "kp-boot", "--accel", "tcg", *flags, name))
    return one(run(env, "kp-ip", name, "--timeout", "400", timeout=900))


def test_a_disk_is_one_vms_at_a_time_outlives_its_clone_and_holds_no_plaintext(golden: Golden,
                                                                              tmp_path: Path) -> None:
    env = golden["env"]
    key_file = tmp_path / "disk.key"
    key_file.write_text(KEY + "\n")
    made = one(run(env, "kp-disk", DISK, "--size", "256M", "--key-file", str(key_file), timeout=300))
    assert made["state"] == "ready" and made["encryption"] == "luks" and made["key"] == {"file": str(key_file)}
    qcow2, meta = Path(made["disk"]), Path(made["path"]) / "meta.json"
    try:
        first = booted(env, "disk-a", "--disk", f"{DISK}:/data")
        assert first["disks"] == [{"name": DISK, "mountpoint": "/data", "serial": "kpdata0"}]
        wrote = as_root(env, "disk-a", f"findmnt -n -o FSTYPE /data && printf '{MARKER}\\n' > /data/marker && sync")
        assert wrote["exit_status"] == 0 and wrote["stdout"].strip() == "ext4", wrote  # formatted on first use
        shown = lines(run(env, "kp-ls", DISK).stdout)[0]
        assert shown["state"] == "attached" and shown["attached_to"] == "disk-a"

        # the key reached QEMU as a secret object: not on its command line, not in its log
        pid = first["pid"]
        assert KEY.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert KEY not in Path(first["qemu_log"]).read_text(errors="replace")

        # a second VM cannot have it while the first runs, and is not started
        one(run(env, "kp-clone", "--cold", "base", "disk-b"))
        refused = run(env, "kp-boot", "--accel", "tcg", "--disk", DISK, "disk-b")
        assert refused.returncode == 1
        assert lines(refused.stdout)[0]["error"]["code"] == "disk_in_use"
        assert lines(run(env, "kp-ls", "disk-b").stdout)[0]["state"] == "stopped"

        # nor may kp-rm take it from under the running VM, and a bulk removal never takes a disk
        assert lines(run(env, "kp-rm", DISK).stdout)[0]["error"]["code"] == "disk_in_use"
        bulk = run(env, "kp-rm", input=orjson.dumps(shown) + b"\n")
        assert "only when it is named" in lines(bulk.stdout)[0]["kept"]

        one(run(env, "kp-stop", "disk-a", timeout=300))
        raw = qcow2.read_bytes()
        assert MARKER.encode() not in raw and KEY.encode() not in raw  # LUKS: nothing in the clear
        assert KEY not in meta.read_text()
        one(run(env, "kp-rm", "disk-a"))
        assert lines(run(env, "kp-ls", DISK).stdout)[0]["state"] == "ready"  # outlived its clone

        # a wrong key does not open it, and says so
        key_file.write_text("not-the-key\n")
        wrong = run(env, "kp-boot", "--accel", "tcg", "--disk", DISK, "disk-b", timeout=300)
        assert wrong.returncode == 1 and "password" in wrong.stderr.decode().lower(), wrong.stderr.decode()
        key_file.write_text(KEY + "\n")

        # another clone mounts it where it is told, with what the first one wrote
        one(run(env, "kp-boot", "--accel", "tcg", "--disk", f"{DISK}:/srv/kept", "disk-b"))
        one(run(env, "kp-ip", "disk-b", "--timeout", "400", timeout=900))
        read = as_root(env, "disk-b", "cat /srv/kept/marker")
        assert read["stdout"] == MARKER + "\n", read
        # a VM with a data disk is not saved: it could not resume without the disk and its key
        saved = run(env, "kp-stop", "--save", "disk-b", timeout=300)
        assert lines(saved.stdout)[0]["error"]["code"] == "disk_on_saved"
        assert lines(run(env, "kp-ls", "disk-b").stdout)[0]["state"] == "running"
    finally:
        run(env, "kp-rm", "disk-a", "disk-b", timeout=300)
        removed = run(env, "kp-rm", DISK)
    assert lines(removed.stdout)[0].get("removed") is True
    assert not qcow2.exists()
