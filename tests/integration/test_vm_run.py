"""kp-run inside a real VM (QEMU, TCG here): vm records on stdin send the container into the
guest's Podman over SSH, with the same locked-down defaults as on the host.

The session's VM-backend guest (tests/integration/vmbackend.py: one cold clone, since a warm one
cannot take a --share, made by one pipeline whose kp-run copies the image into the guest) runs a
locked-down agent on its share, then a second run that meets the time limit."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from tests.conftest import lines
from tests.integration.conftest import run
from tests.integration.vmbackend import SESSION, GuestVm

pytestmark = pytest.mark.integration

INSIDE = r"""
echo "hostname=$(cat /proc/sys/kernel/hostname) uname=$(uname -n)"
echo "uid=$(id -u) $(grep CapEff /proc/self/status | tr -d '\t')"
echo "dotenv=[$(cat /workspace/.env)]"
echo "from the container" > /workspace/from-container.txt && echo wrote
touch /usr/x 2>/dev/null && echo "root=writable" || echo "root=read-only"
python3 - <<'EOF'
import errno, socket
try:
    socket.create_connection(("10.0.2.2", 22), timeout=5)
    print("connect=ok")
except OSError as exc:
    print("connect=" + errno.errorcode.get(exc.errno or 0, str(exc)))
EOF
"""


def test_the_pipeline_made_a_vm_and_ran_the_first_container_in_it(guest_vm: GuestVm, shell_image: str) -> None:
    vm, first = guest_vm.record, guest_vm.first
    assert vm["kind"] == "vm" and vm["name"] == "kp-backend"
    assert first["kind"] == "container" and first["name"] == "kp-backend-first"
    assert first["host"] == "kp-backend" and first["vm_id"] == vm["id"]
    assert first["exit_code"] == 0 and first["outcome"] == "exited" and first["removed"] is True
    transfer: Any = first["image_transfer"]
    print(f"\nboot + image copy + first run: {guest_vm.first_seconds:.0f} s; image {shell_image} copied and loaded "
          f"in {transfer['seconds']:.0f} s ({transfer['bytes_sent'] >> 20} MiB sent, "
          f"compressed={transfer['compressed']})")


def test_kp_run_in_a_vm_is_locked_down_and_writes_the_share(guest_vm: GuestVm, shell_image: str) -> None:
    ws = guest_vm.share / f"lockdown-{SESSION}"
    ws.mkdir()
    (ws / "main.py").write_text("print('hello')\n")
    (ws / ".env").write_text("API_KEY=hunter2\n")
    for path in (ws, ws / "main.py", ws / ".env"):
        os.chown(path, 1000, 1000)  # a developer's checkout, as the guest's user "kp" (uid 1000)
    proc = guest_vm.kprun("--image", shell_image, "--name", "in-vm", "-w", f"/workspace/{ws.name}", "--",
                          "bash", "-c", INSIDE)  # the workspace is /workspace inside the container
    err = proc.stderr
    assert proc.returncode == 0, err[-4000:]
    (container,) = [r for r in lines(proc.stdout.encode()) if r["kind"] == "container"]
    assert container["name"] == "in-vm" and container["host"] == "kp-backend"
    assert container["exit_code"] == 0 and container["outcome"] == "exited" and container["removed"] is True
    assert container["workspace"] == f"/workspace/{ws.name}" and container["masked"] == [".env"]
    assert container["network"] == "none" and container["loosened"] == []
    assert container["user"] == {"agent_uid": 1000, "host_uid": 1000, "host_gid": 1000, "from": "workspace-owner"}
    assert "image_transfer" not in container  # the pipeline's first run brought it
    # ran in the guest, in a container of its own name
    assert "hostname=in-vm uname=in-vm" in err
    # uid 1000 inside, no capabilities, a read-only root, no network at all, the .env hidden
    assert "uid=1000 CapEff:0000000000000000" in err
    assert "root=read-only" in err
    assert "connect=ENETUNREACH" in err
    assert "dotenv=[]" in err and "hunter2" not in err
    # what it wrote in the guest's workspace is in the shared folder on the host
    assert "wrote" in err and (ws / "from-container.txt").read_text() == "from the container\n"
    assert (ws / ".env").read_text() == "API_KEY=hunter2\n"


def test_the_time_limit_is_enforced_from_outside_the_guest_container(guest_vm: GuestVm, shell_image: str) -> None:
    again = time.monotonic()
    second = guest_vm.kprun("--image", shell_image, "--time", "20s", "--", "sleep", "600", timeout=600)
    seconds = time.monotonic() - again
    assert second.returncode == 1, second.stderr[-3000:]
    (limited,) = [r for r in lines(second.stdout.encode()) if r["kind"] == "container"]
    assert limited["timed_out"] is True and limited["outcome"] == "timed-out" and limited["exit_code"] == 137
    assert "image_transfer" not in limited and limited["removed"] is True
    left = [r for r in lines(run(guest_vm.env, "kp-ssh", "kp-backend", "--", "sudo", "podman", "ps", "-aq").stdout)
            if r["kind"] == "result"]
    assert left[0]["exit_status"] == 0 and left[0]["stdout"] == "", left
    print(f"second run (image present, stopped at its 20 s limit): {seconds:.0f} s")
