"""kp-image, kp-clone, kp-ls and kp-rm against a real debootstrapped image."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from kodepipe.vm.sshkeys import fingerprint
from tests.conftest import BIN, lines
from tests.integration.conftest import Golden, kp_env, run

pytestmark = pytest.mark.integration


def guest_file(disk: Path, path: str, scratch: Path) -> str | None:
    """Read one file out of the image's ext4 file system, with no mount (debugfs on a raw copy)."""
    raw = scratch / "disk.raw"
    if not raw.exists():
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(raw)], check=True)
    proc = subprocess.run(["debugfs", "-R", f"cat {path}", str(raw)], capture_output=True, text=True,
                          errors="replace")
    if "File not found" in proc.stderr:
        return None
    return proc.stdout


def guest_ls(disk: Path, path: str, scratch: Path) -> list[str]:
    guest_file(disk, "/etc/hostname", scratch)  # makes the raw copy
    proc = subprocess.run(["debugfs", "-R", f"ls -l {path}", str(scratch / "disk.raw")],
                          capture_output=True, text=True, check=True)
    return [line.split()[-1] for line in proc.stdout.splitlines() if line.strip()]


def test_the_image_record_describes_a_ready_image(golden: Golden) -> None:
    record = golden["record"]
    assert isinstance(record, dict)
    assert record["kind"] == "image" and record["name"] == "base" and record["state"] == "ready"
    for key in ("disk", "kernel", "initrd"):
        assert Path(record[key]).is_file()
    assert os.stat(record["disk"]).st_mode & 0o777 == 0o444  # only ever read; clones write overlays
    assert record["user"] == "kp" and record["suite"] and record["mirror"].startswith("http")
    assert "less" in record["packages"] and "qemu-guest-agent" in record["packages"]
    assert "console=ttyS0" in record["cmdline"] and "root=/dev/vda" in record["cmdline"]
    assert record["initrd_bytes"] < 16 * 1024 * 1024  # a small initrd: direct boot is faster
    home = golden["home"]
    assert isinstance(home, Path)
    user_key = (home / ".ssh" / "id_ed25519.pub").read_text()
    assert fingerprint(user_key) in record["ssh_keys"] and len(record["ssh_keys"]) == 2


def test_the_image_holds_what_a_clone_needs_and_no_identity(golden: Golden, tmp_path: Path) -> None:
    record = golden["record"]
    assert isinstance(record, dict)
    disk = Path(record["disk"])
    home = golden["home"]
    assert isinstance(home, Path)
    keys = guest_file(disk, "/home/kp/.ssh/authorized_keys", tmp_path) or ""
    assert (home / ".ssh" / "id_ed25519.pub").read_text().split()[1] in keys
    state = golden["state"]
    assert isinstance(state, Path)
    own = (state / "ssh" / "id_ed25519.pub").read_text().split()[1]
    assert own in keys
    assert guest_file(disk, "/etc/machine-id", tmp_path) == ""
    assert not [n for n in guest_ls(disk, "/etc/ssh", tmp_path) if n.startswith("ssh_host_")]
    sshd = guest_file(disk, "/etc/ssh/sshd_config.d/kodepipe.conf", tmp_path) or ""
    assert "PasswordAuthentication no" in sshd and "PermitRootLogin no" in sshd
    assert "ran as kp in /home/kp" in (guest_file(disk, "/home/kp/.dotfiles-ran", tmp_path) or "")
    assert guest_file(disk, "/usr/bin/less", tmp_path) is not None
    wants = guest_ls(disk, "/etc/systemd/system/multi-user.target.wants", tmp_path)
    assert "systemd-networkd.service" in wants and "ssh.service" in wants
    assert "kodepipe" in (guest_file(disk, "/etc/sudoers.d/kodepipe", tmp_path) or "") or \
        "NOPASSWD" in (guest_file(disk, "/etc/sudoers.d/kodepipe", tmp_path) or "")


def test_clone_ls_rm_round_trip_on_the_real_image(golden: Golden) -> None:
    env = golden["env"]
    assert isinstance(env, dict)
    pipeline = f"{BIN}/kp-clone base it-a it-b | {BIN}/kp-ls"
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", pipeline], env=env, capture_output=True, check=True)
    clones = lines(proc.stdout)
    assert [(c["name"], c["state"]) for c in clones] == [("it-a", "stopped"), ("it-b", "stopped")]
    for clone in clones:
        assert os.stat(clone["disk"]).st_blocks * 512 < 1024 * 1024
        check = subprocess.run(["qemu-img", "check", clone["disk"]], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        chain = subprocess.run(["qemu-img", "info", "--backing-chain", "--output=json", clone["disk"]],
                               capture_output=True, check=True, text=True).stdout
        assert golden["record"]["disk"] in chain.replace("vms/it-a/../../", "").replace("vms/it-b/../../", "")
    refused = run(env, "kp-rm", "base")
    assert refused.returncode == 1 and lines(refused.stdout)[0]["error"]["code"] == "in_use"
    removed = run(env, "kp-rm", input=proc.stdout)
    assert removed.returncode == 0 and [r["removed"] for r in lines(removed.stdout)] == [True, True]
    # other tests' VMs of the session (the VM backend's) may be there too: these two are gone, the base stays
    names = {r["name"] for r in lines(run(env, "kp-ls").stdout)}
    assert "base" in names and not names & {"it-a", "it-b"}


def test_a_failed_build_leaves_no_image_and_says_why(tmp_path: Path) -> None:
    env = kp_env(tmp_path / "state", tmp_path, tmp_path / "cache")
    proc = run(env, "kp-image", "build", "broken", "--mirror", "http://127.0.0.1:9/debian", "--suite", "bookworm")
    assert proc.returncode == 1
    (record,) = lines(proc.stdout)
    assert record["name"] == "broken" and "id" not in record
    message = record["error"]["message"]
    assert "http://127.0.0.1:9/debian" in message and "--mirror" in message
    assert not (tmp_path / "state" / "images" / "broken").exists()
    assert list((tmp_path / "cache" / "logs").glob("build-broken-*.log"))
    assert lines(run(env, "kp-ls").stdout) == []


def _start_build(env: dict[str, str], name: str, state: Path) -> subprocess.Popen[bytes]:
    builder = subprocess.Popen([str(BIN / "kp-image"), "build", name, "--size", "2G"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 60
    # wait until debootstrap is really at work inside the image folder
    while not list((state / "images" / name).glob(".rootfs-*/debootstrap")):
        assert builder.poll() is None, builder.stderr.read().decode() if builder.stderr else ""
        assert time.monotonic() < deadline, "debootstrap did not start"
        time.sleep(0.2)
    return builder


def _processes_under(path: Path) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(path) in cmdline:
            found.append(cmdline)
    return found


def test_an_interrupted_build_rolls_back(tmp_path: Path, golden: Golden) -> None:
    state = tmp_path / "state"
    env = kp_env(state, tmp_path, Path(golden["env"]["KODEPIPE_CACHE_DIR"]))
    builder = _start_build(env, "intr", state)
    builder.send_signal(signal.SIGTERM)
    _, err = builder.communicate(timeout=60)
    assert builder.returncode == 143, err.decode()
    assert not (state / "images" / "intr").exists()
    assert _processes_under(state) == []
    assert lines(run(env, "kp-ls").stdout) == []


def test_a_killed_build_is_reported_broken_and_removable(tmp_path: Path, golden: Golden) -> None:
    state = tmp_path / "state"
    env = kp_env(state, tmp_path, Path(golden["env"]["KODEPIPE_CACHE_DIR"]))
    builder = _start_build(env, "killed", state)
    builder.kill()  # SIGKILL: no cleanup code runs in kp-image
    builder.wait(timeout=30)
    deadline = time.monotonic() + 30
    while _processes_under(state) and time.monotonic() < deadline:  # its helpers die with it
        time.sleep(0.2)
    assert _processes_under(state) == []
    (record,) = lines(run(env, "kp-ls").stdout)
    assert record["state"] == "broken" and "interrupted" in record["problem"]
    removed = run(env, "kp-rm", "killed")
    assert removed.returncode == 0, removed.stderr.decode()
    assert not (state / "images" / "killed").exists()
    assert not list((state / "trash").iterdir())
