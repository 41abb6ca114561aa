"""The container base image and podman builds without Podman or root: podman is faked
(pytest-subprocess), the rootfs steps run on small trees."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
import pytest
from pytest_subprocess import FakeProcess

from kodepipe.container import images as containerimage
from kodepipe.core import proc
from kodepipe.core.errors import Busy, KpError, MissingProgram, NoPermission, Timeout
from tests.cli import invoke

TAG = "localhost/kodepipe-base:bookworm"
BASE_ID = "d684cd7d9028fbe4c95ef7f77e68d202401f9a59bfcd1ffed2f9414c01a33333"
INSPECT = [{"Id": BASE_ID, "Size": 120587501, "Created": "2026-11-23T23:16:04.123456789Z",
            "Labels": {"io.kodepipe.kind": "base", "io.kodepipe.suite": "bookworm",
                       "io.kodepipe.mirror": "http://deb.debian.org/debian"}}]
RECORD = {"kind": "container-image", "name": TAG, "image_id": BASE_ID, "size": 120587501,
          "created": "2026-11-23T23:16:04Z", "suite": "bookworm", "mirror": "http://deb.debian.org/debian"}


@pytest.fixture(autouse=True)
def programs_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake processes are registered by program name, wherever the real one is installed."""
    monkeypatch.setattr(proc, "require", lambda program: program)


def not_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)


def no_image(fp: FakeProcess, tag: str = TAG) -> None:
    fp.register(["podman", "image", "inspect", "--format", "json", tag], returncode=125,
                stderr=f"Error: {tag}: image not known\n")


# ---------------------------------------------------------------- pure parts

@pytest.mark.parametrize(("created", "iso"), [
    ("2026-11-23T23:16:04.123456789Z", "2026-11-23T23:16:04Z"),
    ("2026-11-23T23:16:04Z", "2026-11-23T23:16:04Z"),
    ("2026-11-24T00:16:04.5+01:00", "2026-11-23T23:16:04Z"),
    ("yesterday", None),
    (None, None),
])
def test_podman_times_become_utc_iso(created: object, iso: str | None) -> None:
    assert containerimage._iso(created) == iso


def test_the_record_comes_from_inspect_with_the_labels() -> None:
    assert containerimage.image_record(TAG, INSPECT[0]) == RECORD
    # podman 4 puts labels under Config too; a profile image names its profile
    info = {"Id": "x", "Size": 1, "Created": "2026-01-01T00:00:00Z",
            "Config": {"Labels": {"io.kodepipe.profile": "shell"}}}
    assert containerimage.image_record("localhost/kodepipe-shell:abc", info)["profile"] == "shell"


def rootfs_tree(root: Path) -> Path:
    for rel in ("var/cache/apt/archives/partial", "var/lib/apt/lists/partial", "tmp/x", "var/tmp",
                "var/log/apt", "etc", "usr/bin"):
        (root / rel).mkdir(parents=True, exist_ok=True)
    files = {
        "var/cache/apt/archives/bash_5.2_amd64.deb": "deb", "var/cache/apt/archives/lock": "",
        "var/cache/apt/pkgcache.bin": "bin", "var/lib/apt/lists/deb.debian.org_Packages": "lists",
        "tmp/x/junk": "junk", "var/log/apt/history.log": "log", "var/log/dpkg.log": "log",
        "etc/resolv.conf": "nameserver 10.255.255.53\n", "etc/hostname": "buildhost\n",
        "usr/bin/bash": "#!", "etc/passwd": "root:x:0:0:root:/root:/bin/bash\n",
        "etc/group": "root:x:0:\n", "etc/shadow": "root:*:19000:0:99999:7:::\n", "etc/gshadow": "root:*::\n",
    }
    for rel, text in files.items():
        (root / rel).write_text(text)
    (root / "etc/shadow").chmod(0o640)
    return root


def test_trim_drops_debs_lists_logs_temp_files_and_host_dns(tmp_path: Path) -> None:
    root = rootfs_tree(tmp_path)
    containerimage._trim(root)
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert left == ["etc/group", "etc/gshadow", "etc/hostname", "etc/passwd", "etc/resolv.conf", "etc/shadow",
                    "usr/bin/bash", "var/cache/apt/archives/lock"]
    assert (root / "etc/resolv.conf").read_text() == "" and (root / "etc/hostname").read_text() == ""
    assert (root / "var/lib/apt/lists").is_dir() and (root / "tmp").is_dir()
    assert (root / "var/cache/apt/archives/partial").is_dir()


def test_the_agent_user_is_added_for_uid_1000(tmp_path: Path) -> None:
    root = rootfs_tree(tmp_path)
    containerimage._add_agent_user(root)
    assert (root / "etc/passwd").read_text().splitlines()[-1] == \
        "agent:x:1000:1000:kodepipe agent:/tmp/home:/bin/bash"
    assert (root / "etc/group").read_text().endswith("\nagent:x:1000:\n")
    assert (root / "etc/shadow").read_text().endswith("\nagent:*:19000:0:99999:7:::\n")
    assert (root / "etc/shadow").stat().st_mode & 0o777 == 0o640  # mode kept
    with pytest.raises(KpError, match="already has agent"):
        containerimage._add_agent_user(root)


def test_an_existing_uid_1000_is_not_shadowed(tmp_path: Path) -> None:
    root = rootfs_tree(tmp_path)
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/bash\nsomeone:x:1000:1000::/home/s:/bin/sh\n")
    with pytest.raises(KpError, match="id 1000"):
        containerimage._add_agent_user(root)


def test_the_hosts_local_cas_are_copied(tmp_path: Path) -> None:
    source = tmp_path / "cas"
    source.mkdir()
    (source / "proxy.crt").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    (source / "notes.txt").write_text("not a certificate")
    (source / "empty.crt").write_text("")
    root = tmp_path / "rootfs"
    root.mkdir()
    assert containerimage._copy_local_cas(root, source) == ["proxy.crt"]
    assert (root / "usr/local/share/ca-certificates/proxy.crt").read_text().startswith("-----BEGIN")
    assert containerimage._copy_local_cas(root, tmp_path / "none") == []


# ---------------------------------------------------------------- podman, faked

def test_an_existing_base_is_passed_through_without_root(fp: FakeProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    not_root(monkeypatch)
    fp.register(["podman", "image", "inspect", "--format", "json", TAG], stdout=orjson.dumps(INSPECT))
    assert containerimage.ensure_base("bookworm") == RECORD
    assert fp.call_count(["debootstrap", fp.any()]) == 0


def test_building_the_base_needs_root(fp: FakeProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    not_root(monkeypatch)
    no_image(fp)
    with pytest.raises(NoPermission) as info:
        containerimage.ensure_base("bookworm")
    assert info.value.status == 77 and "sudo kp-image base" in info.value.message
    assert "podman load" in info.value.message  # the way into a rootless store


def test_a_hostile_suite_is_refused_before_podman_runs(fp: FakeProcess) -> None:
    with pytest.raises(KpError, match="bad suite"):
        containerimage.ensure_base("../../x")
    with pytest.raises(KpError, match="bad mirror"):
        containerimage.ensure_base("bookworm", "nowhere; rm -rf /")
    assert len(fp.calls) == 0


def test_base_suites_are_listed_newest_first(fp: FakeProcess) -> None:
    images = [{"Names": ["localhost/kodepipe-base:bookworm"], "Created": 100},
              {"Names": ["localhost/kodepipe-base:trixie"], "Created": 200}]
    fp.register(["podman", "images", "--filter", "reference=localhost/kodepipe-base", "--format", "json"],
                stdout=orjson.dumps(images))
    assert containerimage.base_suites() == ["trixie", "bookworm"]


def test_older_builds_of_a_profile_are_removed_when_unused(fp: FakeProcess) -> None:
    repo = "localhost/kodepipe-shell"
    fp.register(["podman", "images", "--filter", f"reference={repo}", "--format", "{{.Repository}}:{{.Tag}}"],
                stdout=f"{repo}:aaa\n{repo}:bbb\n{repo}:ccc\n")
    fp.register(["podman", "rmi", f"{repo}:aaa"])
    fp.register(["podman", "rmi", f"{repo}:ccc"], returncode=2, stderr="Error: image is in use by a container\n")
    assert containerimage.remove_older(repo, keep=f"{repo}:bbb") == [f"{repo}:aaa"]


def build_argv(tmp_path: Path, tag: str) -> list[str]:
    return ["podman", "build", "--pull=never", "-f", str(tmp_path / "Containerfile"), "-t", tag,
            "--build-arg", f"BASE={TAG}", "--label", "io.kodepipe.profile=shell", str(tmp_path)]


def test_build_runs_podman_build_with_a_log(fp: FakeProcess, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    tag = "localhost/kodepipe-shell:0123456789ab"
    fp.register(build_argv(tmp_path, tag), stdout="STEP 1/4: FROM localhost/kodepipe-base:bookworm\nCOMMIT\n")
    fp.register(["podman", "image", "inspect", "--format", "json", tag], stdout=orjson.dumps(
        [{"Id": "abc", "Size": 5, "Created": "2026-01-01T00:00:00Z"}]))
    log = tmp_path / "build.log"
    record = containerimage.build(tmp_path / "Containerfile", tmp_path, tag, build_args={"BASE": TAG},
                                  labels={"io.kodepipe.profile": "shell"}, log=log, echo=False)
    assert record["name"] == tag and record["image_id"] == "abc"
    assert "STEP 1/4" in log.read_text() and "$ podman build --pull=never" in log.read_text()
    assert capsys.readouterr().err == ""


def test_build_output_is_echoed_to_stderr_when_asked(fp: FakeProcess, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    tag = "localhost/kodepipe-shell:0123456789ab"
    fp.register(build_argv(tmp_path, tag), stdout="STEP 1/4: FROM x\n")
    fp.register(["podman", "image", "inspect", "--format", "json", tag], stdout=b'[{"Id": "abc"}]')
    containerimage.build(tmp_path / "Containerfile", tmp_path, tag, build_args={"BASE": TAG},
                         labels={"io.kodepipe.profile": "shell"}, log=tmp_path / "log", echo=True)
    captured = capsys.readouterr()
    assert "STEP 1/4: FROM x" in captured.err and captured.out == ""


@pytest.mark.parametrize(("output", "hint"), [
    ("E: Unable to locate package nosuch\n", "full log:"),
    ("W: Failed to fetch http://deb.debian.org/debian/dists/bookworm/InRelease  Temporary failure resolving\n",
     "could not download"),
    ("npm ERR! code EAI_AGAIN\n", "could not download"),
    ('Error: creating build container: pull policy is "never" but "docker.io/library/debian" not found\n',
     "not in the local store"),
])
def test_a_failed_build_shows_the_logs_tail_and_a_hint(fp: FakeProcess, tmp_path: Path, output: str,
                                                       hint: str) -> None:
    tag = "localhost/kodepipe-shell:0123456789ab"
    fp.register(build_argv(tmp_path, tag), stdout="STEP 1/4\n" * 40 + output, returncode=1)
    log = tmp_path / "build.log"
    with pytest.raises(KpError) as info:
        containerimage.build(tmp_path / "Containerfile", tmp_path, tag, build_args={"BASE": TAG},
                             labels={"io.kodepipe.profile": "shell"}, log=log, echo=False)
    assert info.value.code == "image_build_failed"
    assert output.strip() in info.value.message and hint in info.value.message
    assert str(log) in info.value.message


def test_a_hung_build_times_out(fp: FakeProcess, tmp_path: Path) -> None:
    fp.register(["podman", "build", fp.any()], wait=1)
    with pytest.raises(Timeout, match=r"did not finish within 0\.2 s"):
        containerimage._run_logged(["podman", "build", "x"], tmp_path / "log", echo=False, timeout=0.2)


# ---------------------------------------------------------------- kp-image base

def test_kp_image_base_writes_the_record_of_an_existing_image(fp: FakeProcess) -> None:
    fp.register(["podman", "image", "inspect", "--format", "json", TAG], stdout=orjson.dumps(INSPECT))
    result = invoke("kp-image", "base", "--suite", "bookworm")
    assert result.status == 0 and result.records == [RECORD] and result.stderr == ""


def test_kp_image_base_without_root_exits_77_with_a_failed_record(fp: FakeProcess,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    not_root(monkeypatch)
    no_image(fp)
    result = invoke("kp-image", "base", "--suite", "bookworm")
    assert result.status == 77
    (record,) = result.records
    error: Any = record["error"]
    assert record["name"] == TAG and error["code"] == "no_permission"
    assert "needs root" in result.stderr


def test_kp_image_base_without_podman_exits_69(monkeypatch: pytest.MonkeyPatch) -> None:
    def require(program: str) -> str:
        raise MissingProgram(f"{program} is not installed",
                             hint=f"install it with: apt-get install {proc.PACKAGES.get(program, program)}")

    monkeypatch.setattr(proc, "require", require)
    result = invoke("kp-image", "base")
    assert result.status == 69 and "apt-get install podman" in result.stderr and result.stdout == b""


def test_kp_image_base_refuses_a_hostile_suite_as_a_usage_error() -> None:
    result = invoke("kp-image", "base", "--suite", "../x")
    assert result.status == 2 and result.stdout == b""


def test_the_build_lock_lets_errors_of_the_build_through() -> None:
    said: list[str] = []
    with pytest.raises(Busy, match="from inside"), containerimage.build_lock("profile.x", said.append, "x"):
        raise Busy("from inside the build")
    assert said == []
