"""The container base image and profile images in the real Podman store: kp-image base,
the shell profile (built once per run by the shell_image fixture), a user's profile, and
the no-op when nothing changed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest

from kodepipe.commands.cli import Output
from kodepipe.container import profile
from kodepipe.core.errors import KpError
from tests.conftest import BIN, lines

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the container images are built as root"),
]

# runc, not crun (cgroups in hybrid mode); runc needs the rlimits set (no CAP_SYS_RESOURCE here)
RUN = ["podman", "run", "--rm", "--runtime", "runc", "--ulimit", "nofile=4096:4096",
       "--ulimit", "nproc=4096:4096"]
LOCKED_DOWN = ["--network", "none", "--user", "1000:1000", "--cap-drop", "all", "--read-only",
               "--tmpfs", "/tmp:size=64m", "-e", "HOME=/tmp/home"]


def podman_run(image: str, script: str, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RUN, *options, image, "bash", "-c", script], capture_output=True, text=True,
                          timeout=120)


def inspect(tag: str) -> dict[str, Any]:
    proc = subprocess.run(["podman", "image", "inspect", "--format", "json", tag], capture_output=True,
                          check=True)
    info: dict[str, Any] = orjson.loads(proc.stdout)[0]
    return info


def test_the_shell_image_runs_git_and_python(shell_image: str) -> None:
    assert shell_image.startswith("localhost/kodepipe-shell:")
    assert subprocess.run(["podman", "image", "exists", shell_image]).returncode == 0
    proc = podman_run(shell_image, "git --version && python3 -c 1", "--network", "none")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("git version")


def test_the_shell_image_works_as_kp_run_runs_it(shell_image: str) -> None:
    script = ("mkdir -p $HOME && cd $HOME && id -un && id -u && echo $HOME && git init -q r && "
              "curl --version >/dev/null && ps -o comm= -p $$ && ip -br addr && "
              "(touch /etc/x 2>/dev/null && echo writable || echo read-only)")
    proc = podman_run(shell_image, script, *LOCKED_DOWN)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[:3] == ["agent", "1000", "/tmp/home"]  # getpwuid(1000) finds the base's agent entry
    assert out[3] == "bash" and out[4].startswith("lo ") and out[-1] == "read-only"


def test_the_image_carries_kodepipes_labels_and_no_apt_lists(shell_image: str) -> None:
    labels = inspect(shell_image)["Labels"]
    assert labels["io.kodepipe.kind"] == "profile" and labels["io.kodepipe.profile"] == "shell"
    assert labels["io.kodepipe.base"].startswith("localhost/kodepipe-base:")
    proc = podman_run(shell_image, "ls /var/lib/apt/lists /var/cache/apt/archives | grep -c . ; "
                      "ls /var/cache/apt/archives/*.deb 2>/dev/null | wc -l")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] == "0"  # no .debs left
    # the image's own files: Podman's "Size" also counts the copies it makes per uid map (kp-run's runs)
    size = podman_run(shell_image, "du -sxm / 2>/dev/null | cut -f1")
    assert int(size.stdout.split()[-1]) < 400, size.stdout


def test_kp_image_base_passes_an_existing_base_through(shell_image: str, kp_env: dict[str, Path]) -> None:
    proc = subprocess.run([str(BIN / "kp-image"), "base"], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    (record,) = lines(proc.stdout)
    assert record["kind"] == "container-image" and record["name"] == f"localhost/kodepipe-base:{record['suite']}"
    assert record["name"] == inspect(shell_image)["Labels"]["io.kodepipe.base"]
    assert isinstance(record["image_id"], str) and len(record["image_id"]) == 64
    assert isinstance(record["size"], int) and 50_000_000 < record["size"] < 200_000_000  # trimmed
    assert isinstance(record["created"], str) and record["created"].endswith("Z")
    assert "build_seconds" not in record and proc.stderr == b""


def test_the_base_image_has_the_agent_user_and_nothing_of_the_build(shell_image: str) -> None:
    base = inspect(shell_image)["Labels"]["io.kodepipe.base"]
    proc = podman_run(base, "getent passwd agent; getent group agent; ls -A /tmp /var/lib/apt/lists; "
                      "ls /var/cache/apt/archives/*.deb 2>/dev/null | wc -l")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0] == "agent:x:1000:1000:kodepipe agent:/tmp/home:/bin/bash" and out[1] == "agent:x:1000:"
    assert out[2:] == ["/tmp:", "", "/var/lib/apt/lists:", "0"]  # empty, empty, no .debs
    info = inspect(base)
    assert info["Config"]["Cmd"] == ["/bin/bash"] and info["Labels"]["io.kodepipe.kind"] == "base"


def test_a_second_ensure_image_is_a_no_op(shell_image: str) -> None:
    created = inspect(shell_image)["Created"]
    tag = profile.ensure_image(profile.load("shell"), Output("kp-test", verbose=False))
    assert tag == shell_image and inspect(shell_image)["Created"] == created


def test_a_user_profile_builds_and_an_edit_replaces_its_image(shell_image: str, kp_env: dict[str, Path]) -> None:
    name = f"kptest-{os.getpid()}"
    folder = kp_env["config"] / "profiles" / name
    (folder / "files").mkdir(parents=True)
    (folder / "files" / "greeting").write_text("hello\n")
    (folder / "Containerfile").write_text("ARG BASE\nFROM ${BASE}\nCOPY files/greeting /etc/greeting\n")
    (folder / "profile.json").write_text('{"command": ["cat", "/etc/greeting"]}')
    repo = f"localhost/kodepipe-{name}"
    try:
        first = profile.ensure_image(profile.load(name), Output("kp-test", verbose=False))
        assert podman_run(first, "cat /etc/greeting").stdout == "hello\n"
        assert (kp_env["cache"] / "logs" / f"profile-{name}.log").read_text().count("COPY") >= 1

        (folder / "files" / "greeting").write_text("changed\n")
        second = profile.ensure_image(profile.load(name), Output("kp-test", verbose=False))
        assert second != first and podman_run(second, "cat /etc/greeting").stdout == "changed\n"
        assert subprocess.run(["podman", "image", "exists", first]).returncode == 1  # the outdated one is gone
    finally:
        for tag in subprocess.run(["podman", "images", "--format", "{{.Repository}}:{{.Tag}}", repo],
                                  capture_output=True, text=True).stdout.split():
            subprocess.run(["podman", "rmi", tag], capture_output=True)


def test_a_failing_build_says_why_and_leaves_no_image(shell_image: str, kp_env: dict[str, Path]) -> None:
    name = f"kptest-bad-{os.getpid()}"
    folder = kp_env["config"] / "profiles" / name
    folder.mkdir(parents=True)
    (folder / "Containerfile").write_text("ARG BASE\nFROM ${BASE}\nRUN echo about to fail && exit 3\n")
    p = profile.load(name)
    with pytest.raises(KpError) as info:
        profile.ensure_image(p, Output("kp-test", verbose=False))
    assert info.value.code == "image_build_failed" and "about to fail" in info.value.message
    assert str(kp_env["cache"] / "logs" / f"profile-{name}.log") in info.value.message
    listed = subprocess.run(["podman", "images", "--format", "{{.Repository}}", f"localhost/kodepipe-{name}"],
                            capture_output=True, text=True).stdout
    assert listed.strip() == ""
