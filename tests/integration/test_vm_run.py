"""kp-run inside a real VM (QEMU, TCG here): vm records on stdin send the container into the
guest's Podman over SSH, with the same locked-down defaults as on the host.

One cold clone (a warm one cannot take a --share), one pipeline that also copies the image
into the guest, then a second run in the same VM that meets the time limit."""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import BIN, lines
from tests.integration.conftest import run

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


@pytest.fixture
def share(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ws = tmp_path_factory.mktemp("vm-run-ws")
    (ws / "main.py").write_text("print('hello')\n")
    (ws / ".env").write_text("API_KEY=hunter2\n")
    for path in (ws, ws / "main.py", ws / ".env"):
        os.chown(path, 1000, 1000)  # a developer's checkout, as the guest's user "kp" (uid 1000)
    return ws


def test_kp_run_in_a_vm_is_locked_down_and_writes_the_share(golden: dict[str, Any], shell_image: str,
                                                             share: Path) -> None:
    env = golden["env"]
    started = time.monotonic()
    # --cold: a warm clone resumes with the saved hardware, which has no shared folder
    pipeline = (f"{BIN}/kp-clone --cold base vr | {BIN}/kp-boot --share {share} | {BIN}/kp-ip --timeout 400 | "
                f"{BIN}/kp-run --image {shell_image} --name in-vm -- bash -c {shlex.quote(INSIDE)}")
    try:
        proc = subprocess.run(["bash", "-o", "pipefail", "-c", pipeline], env=env, capture_output=True,
                              timeout=1800)
        seconds = time.monotonic() - started
        err = proc.stderr.decode()
        assert proc.returncode == 0, err[-4000:]
        vm, container = lines(proc.stdout)
        assert vm["kind"] == "vm" and vm["name"] == "vr"
        assert container["kind"] == "container" and container["name"] == "in-vm"
        assert container["host"] == "vr" and container["vm_id"] == vm["id"]
        assert container["exit_code"] == 0 and container["outcome"] == "exited" and container["removed"] is True
        assert container["workspace"] == "/workspace" and container["masked"] == [".env"]
        assert container["network"] == "none" and container["loosened"] == []
        assert container["user"] == {"agent_uid": 1000, "host_uid": 1000, "host_gid": 1000,
                                     "from": "workspace-owner"}
        # ran in the guest, in a container of its own name
        assert "hostname=in-vm uname=in-vm" in err
        # uid 1000 inside, no capabilities, a read-only root, no network at all, the .env hidden
        assert "uid=1000 CapEff:0000000000000000" in err
        assert "root=read-only" in err
        assert "connect=ENETUNREACH" in err
        assert "dotenv=[]" in err and "hunter2" not in err
        # what it wrote in the guest's /workspace is in the shared folder on the host
        assert "wrote" in err and (share / "from-container.txt").read_text() == "from the container\n"
        assert (share / ".env").read_text() == "API_KEY=hunter2\n"
        transfer: Any = container["image_transfer"]
        print(f"\nboot + image copy + first run: {seconds:.0f} s; image {shell_image} copied and loaded in "
              f"{transfer['seconds']:.0f} s ({transfer['bytes_sent'] >> 20} MiB sent, "
              f"compressed={transfer['compressed']}); run {container['started']} -> {container['finished']}")

        # the image is there now; the time limit is enforced from outside the container
        again = time.monotonic()
        second = subprocess.run([str(BIN / "kp-run"), "--image", shell_image, "--time", "20s", "--", "sleep", "600"],
                                env=env, input=orjson.dumps(vm) + b"\n", capture_output=True, timeout=600)
        seconds = time.monotonic() - again
        assert second.returncode == 1, second.stderr.decode()[-3000:]
        _, limited = lines(second.stdout)
        assert limited["timed_out"] is True and limited["outcome"] == "timed-out" and limited["exit_code"] == 137
        assert "image_transfer" not in limited and limited["removed"] is True
        left = [r for r in lines(run(env, "kp-ssh", "vr", "--", "sudo", "podman", "ps", "-aq").stdout)
                if r["kind"] == "result"]
        assert left[0]["exit_status"] == 0 and left[0]["stdout"] == "", left
        print(f"second run (image present, stopped at its 20 s limit): {seconds:.0f} s")
    finally:
        removed = run(env, "kp-rm", "vr", timeout=120)
        assert removed.returncode == 0, removed.stderr.decode()
