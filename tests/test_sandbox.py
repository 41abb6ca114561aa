"""The kp-run policy as data: what the spec and the podman arguments say, what counts as loosened."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kodepipe.container import policy, sandbox, seccomp
from kodepipe.core import units
from kodepipe.core.errors import BadInput
from tests import policies

LIMITS = sandbox.Limits(memory=512 << 20, cpus=1.5, pids=64, seconds=60, tmpfs=64 << 20)


def box(**kw: Any) -> sandbox.Sandbox:
    """The container render() makes of a policy and facts with these settings."""
    box: sandbox.Sandbox = policies.sandbox(**{"limits": LIMITS, **kw})
    return box


def test_the_default_spec_is_locked_down() -> None:
    spec = box().spec()
    assert spec["cap_drop"] == ["all"] and spec["cap_add"] == []
    assert spec["no_new_privileges"] is True and spec["read_only_filesystem"] is True
    assert spec["netns"] == {"nsmode": "none"}
    assert spec["user"] == "1000:1000"
    assert spec["seccomp_profile_path"] == "/s.json"
    assert spec["resource_limits"]["memory"]["limit"] == 512 << 20
    assert spec["resource_limits"]["pids"]["limit"] == 64
    assert spec["resource_limits"]["cpu"]["quota"] == 150000
    assert spec["env"] == {"HOME": "/tmp/home", "LANG": "C.UTF-8"}
    assert [m["destination"] for m in spec["mounts"]] == ["/tmp", "/tmp/home", "/workspace"]
    # HOME is the agent's own tmpfs, owned by its uid there, never a root-owned directory Podman made
    home = spec["mounts"][1]
    assert home["type"] == "tmpfs" and "U" in home["options"] and "mode=0700" in home["options"]
    args = box().podman_args()
    assert args[args.index("--tmpfs") + 2:args.index("--tmpfs") + 4] == [
        "--mount", f"type=tmpfs,destination=/tmp/home,tmpfs-size={spec['mounts'][0]['options'][0][5:]},"
        "tmpfs-mode=0700,U=true"]
    uid = spec["idmappings"]["UIDMap"]
    assert {"container_id": 1000, "host_id": 1234, "size": 1} in uid
    assert all(m["host_id"] != 0 for m in uid) and sum(m["size"] for m in uid) == 65536
    assert {"container_id": 1000, "host_id": 1235, "size": 1} in spec["idmappings"]["GIDMap"]


def test_every_loosening_is_rendered() -> None:
    loose = box(network="open", cap_add=["NET_RAW"], writable_root=True, env={"TOKEN": "zz-token-value"},
                secrets=[sandbox.Secret(Path("/c"), "/run/secrets/c", "/home/u/c")],
                limits=sandbox.Limits(memory=1 << 30, cpus=1, pids=64, seconds=0, tmpfs=1 << 20))
    spec = loose.spec()
    assert spec["netns"] == {"nsmode": "bridge"} and spec["read_only_filesystem"] is False
    assert spec["cap_add"] == ["NET_RAW"] and spec["env"]["TOKEN"] == "zz-token-value" and "timeout" not in spec
    assert {"type": "bind", "source": "/c", "destination": "/run/secrets/c", "options": ["rbind", "ro"]} \
        in spec["mounts"]


def test_masks_and_the_read_only_workspace_become_read_only_binds() -> None:
    spec = box(masks=[".env", "a/.env.local"], mask_file="/f/empty", read_only_workspace=True).spec()
    binds = {m["destination"]: m["options"] for m in spec["mounts"] if m["type"] == "bind"}
    assert binds == {"/workspace": ["rbind", "ro"], "/workspace/.env": ["rbind", "ro"],
                     "/workspace/a/.env.local": ["rbind", "ro"]}


def test_podman_arguments_say_the_same_as_the_spec() -> None:
    args = box(cap_add=["NET_RAW"]).podman_args()
    joined = " ".join(args)
    for expected in ("--cap-drop all", "--cap-add NET_RAW", "--security-opt no-new-privileges",
                     "--security-opt seccomp=/s.json", "--read-only --read-only-tmpfs=false", "--network none",
                     "--pids-limit 64",
                     "--cpus 1.5", "--uidmap 1000:1234:1", "--gidmap 1000:1235:1", "--user 1000:1000",
                     "type=bind,source=/w,destination=/workspace"):
        assert expected in joined
    assert args[-2:] == ["localhost/x:1", "true"]


def test_the_invoker_is_never_root(tmp_path: Path) -> None:
    assert sandbox.invoker(tmp_path, {"SUDO_UID": "1001", "SUDO_GID": "1002"}, euid=0) == (1001, 1002, "sudo")
    # root's own workspace, no sudo: an id that owns nothing
    assert sandbox.invoker(tmp_path, {}, euid=0)[2] == "nobody"
    assert sandbox.invoker(tmp_path, {"SUDO_UID": "0", "SUDO_GID": "0"}, euid=0)[0] == sandbox.FALLBACK_HOST_UID


def test_dangerous_workspaces(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "code" / "proj").mkdir(parents=True)
    for bad in (Path("/"), home, tmp_path):
        with pytest.raises(BadInput):
            sandbox.check_workspace(bad, home)
    assert sandbox.check_workspace(home / "code" / "proj", home) == (home / "code" / "proj").resolve()
    with pytest.raises(BadInput, match="does not exist"):
        sandbox.check_workspace(tmp_path / "nope", home)


def test_scan_finds_masks_credentials_and_setuid(tmp_path: Path) -> None:
    for rel in (".env", "a/.env.prod", "a/b/.env", "keys/id_ed25519", "cert.pem", ".git/x/.env", "ok.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    (tmp_path / "link.env").symlink_to("/etc/passwd")
    (tmp_path / "suid").write_text("x")
    (tmp_path / "suid").chmod(0o4755)
    masked, creds, setuid = sandbox.scan(tmp_path, [".env", ".env.*", "*.pem"])
    assert sorted(masked) == [".env", ".git/x/.env", "a/.env.prod", "a/b/.env", "cert.pem"]  # nothing pruned
    assert creds == ["keys/id_ed25519"] and setuid == {"suid"}


def test_secret_and_size_parsing(tmp_path: Path) -> None:
    f = tmp_path / "tok"
    f.write_text("t")
    regular = policy.SecretFile(str(f), True)
    assert policy.secret_dest(str(f), regular) == ("/run/secrets/tok", None)
    assert policy.secret_dest(f"{f}:/etc/tok", regular) == ("/etc/tok", None)
    for bad in (f"{f}:/workspace/tok", f"{f}:/proc/x", f"{f}:rel", f"{f}:/etc/hosts"):
        assert policy.secret_dest(bad, regular)[0] is None
    assert "not a readable regular file" in str(policy.secret_dest(str(f), policy.SecretFile(str(f), False))[1])
    assert units.parse_size("2g") == 2 << 30 and units.parse_size("512M") == 512 << 20
    with pytest.raises(BadInput):
        units.parse_size("lots")
    with pytest.raises(BadInput):
        sandbox.Limits(memory=64 << 20, cpus=1, pids=64, seconds=0, tmpfs=64 << 20).check()


def test_seccomp_profile_forbids_new_namespaces() -> None:
    base: dict[str, Any] = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": ["read", "clone", "clone3", "unshare", "setns"], "action": "SCMP_ACT_ALLOW", "args": []},
        {"names": ["mount", "setns"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
    ]}
    derived = seccomp.derive(base)
    allowed = [n for r in derived["syscalls"] if r["action"] == "SCMP_ACT_ALLOW" and not r.get("args")
               for n in r["names"]]
    assert "read" in allowed and not {"clone", "clone3", "unshare", "setns"} & set(allowed)
    clone = next(r for r in derived["syscalls"] if r["names"] == ["clone"])
    assert clone["args"][0]["op"] == "SCMP_CMP_MASKED_EQ" and clone["args"][0]["value"] & 0x10000000
    assert {"names": ["unshare", "setns"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1} in derived["syscalls"]
    assert base["syscalls"][0]["names"][1] == "clone"  # the input is not changed


KEYCTL_BASE = {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38, "syscalls": [
    {"names": ["read", "clone", "clone3", "keyctl"], "action": "SCMP_ACT_ALLOW", "args": []}]}


def _clone_action(profile: dict[str, object], flags: int) -> tuple[str, int | None]:
    """What a seccomp filter built from ``profile`` does with clone(flags): the action of the one
    matching rule (the profile must never have two), else the default."""
    rules = profile["syscalls"]
    assert isinstance(rules, list)
    hits = []
    for rule in rules:
        if "clone" not in rule["names"]:
            continue
        if all(c["op"] == "SCMP_CMP_MASKED_EQ" and c["index"] == 0 and flags & c["value"] == c["valueTwo"]
               for c in rule.get("args", [])):
            hits.append((rule["action"], rule.get("errnoRet")))
    assert len(hits) <= 1, f"clone({flags:#x}) matches {len(hits)} rules"
    return hits[0] if hits else (str(profile["defaultAction"]), profile.get("defaultErrnoRet"))  # type: ignore


CLONE_NEWUSER, CLONE_UNTRACED, CLONE_VM, CLONE_VFORK, SIGCHLD = 0x10000000, 0x00800000, 0x100, 0x4000, 17
THREAD_FLAGS = 0x3D0F00  # glibc's pthread_create: VM|FS|FILES|SIGHAND|THREAD|SYSVSEM|SETTLS|PARENT/CHILD_SETTID


@pytest.mark.parametrize(("flags", "action"), [
    (SIGCHLD, ("SCMP_ACT_ALLOW", None)),  # fork
    (0x01200000 | SIGCHLD, ("SCMP_ACT_ALLOW", None)),  # glibc's fork: CHILD_SETTID|CHILD_CLEARTID
    (CLONE_VM | CLONE_VFORK | SIGCHLD, ("SCMP_ACT_ALLOW", None)),  # vfork, posix_spawn
    (THREAD_FLAGS, ("SCMP_ACT_ALLOW", None)),  # threads
    (CLONE_UNTRACED | SIGCHLD, ("SCMP_ACT_ERRNO", 1)),  # escapes strace -f: refused, EPERM
    (CLONE_UNTRACED | CLONE_VM | CLONE_VFORK | SIGCHLD, ("SCMP_ACT_ERRNO", 1)),
    (CLONE_UNTRACED | CLONE_NEWUSER | SIGCHLD, ("SCMP_ACT_ERRNO", 1)),
    (CLONE_NEWUSER | SIGCHLD, ("SCMP_ACT_ERRNO", 38)),  # a new namespace: the default action
])
def test_clone_flags(flags: int, action: tuple[str, int | None]) -> None:
    assert _clone_action(seccomp.derive(KEYCTL_BASE), flags) == action


def test_clone3_and_the_keyring_are_answered_enosys() -> None:
    derived = seccomp.derive(KEYCTL_BASE)
    allowed = {n for r in derived["syscalls"] if r["action"] == "SCMP_ACT_ALLOW" for n in r["names"]}
    assert not {"clone3", "keyctl", "add_key", "request_key"} & allowed
    assert {"names": ["keyctl", "add_key", "request_key"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38} \
        in derived["syscalls"]
    assert {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38} in derived["syscalls"]


def test_seccomp_from_the_system_profile(tmp_path: Path) -> None:
    if not seccomp.SYSTEM_PROFILE.exists():
        pytest.skip("no containers seccomp.json here")
    path = seccomp.ensure(tmp_path)
    assert path == seccomp.ensure(tmp_path)  # stable name: written once
    assert json.loads(path.read_text())["defaultAction"]


def test_a_comma_in_a_mount_path_cannot_inject_options() -> None:
    hostile = box(masks=[".env.x,source=/etc/shadow"], mask_file="/f/empty")
    assert any(m["destination"] == "/workspace/.env.x,source=/etc/shadow" for m in hostile.spec()["mounts"])
    with pytest.raises(BadInput, match="comma"):
        hostile.podman_args()


def test_anchored_masks(tmp_path: Path) -> None:
    for rel in ("top.key", "sub/top.key"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("k")
    assert sandbox.scan(tmp_path, ["/top.key"])[0] == ["top.key"]
    assert sorted(sandbox.scan(tmp_path, ["top.key"])[0]) == ["sub/top.key", "top.key"]
    assert sandbox.scan(tmp_path, ["sub/*.key"])[0] == ["sub/top.key"]


def test_a_run_gets_a_share_of_the_kernel_quotas(tmp_path: Path) -> None:
    host = sandbox.Quotas(inotify_instances=128, inotify_watches=192536, sigpending=96365, msgqueue=819200)
    share = host.share()
    assert share == sandbox.Quotas(16, 24067, 12045, 102400)
    assert sandbox.Quotas(3, 5, 7, 0).share() == sandbox.Quotas(1, 1, 1, 1)  # never nothing at all
    assert share.userns_sysctls() == {"max_inotify_instances": 16, "max_inotify_watches": 24067,
                                      "max_user_namespaces": 0}
    spec = box(quotas=share).spec()
    assert {"type": "sigpending", "soft": 12045, "hard": 12045} in spec["r_limits"]
    assert {"type": "msgqueue", "soft": 102400, "hard": 102400} in spec["r_limits"]
    assert {"type": "nofile", "soft": 4096, "hard": 4096} in spec["r_limits"]
    joined = " ".join(box(quotas=share).podman_args())
    assert "--ulimit sigpending=12045:12045" in joined and "--ulimit msgqueue=102400:102400" in joined
    # without the host's values (a VM's podman): Linux's defaults, shared
    assert box().quotas == sandbox.LINUX_QUOTAS.share() and "--ulimit sigpending=1024:1024" in \
        " ".join(box().podman_args())
    # the host's: its sysctls, and Linux's defaults for what cannot be read
    (tmp_path / "fs" / "inotify").mkdir(parents=True)
    (tmp_path / "fs" / "inotify" / "max_user_instances").write_text("8192\n")
    read = sandbox.host_quotas(tmp_path)
    assert read.inotify_instances == 8192 and read.inotify_watches == sandbox.LINUX_QUOTAS.inotify_watches
    assert read.sigpending > 0 and read.msgqueue > 0


def test_the_user_namespace_limits_script(tmp_path: Path) -> None:
    import subprocess

    from kodepipe.container import userns

    folder = tmp_path / "user"
    folder.mkdir()
    values = {"max_inotify_instances": 16, "max_user_namespaces": 0}
    assert "/proc/sys/user/max_user_namespaces" in userns.script(values)
    # run for real against a folder of files: each value written, and read back
    subprocess.run(["/bin/sh", "-c", userns.script(values, str(folder))], check=True)
    assert {p.name: p.read_text() for p in folder.iterdir()} == {"max_inotify_instances": "16\n",
                                                                  "max_user_namespaces": "0\n"}
    # a value that does not read back as written (the kernel kept another) fails the script
    (folder / "max_inotify_watches").symlink_to("/dev/null")
    failed = subprocess.run(["/bin/sh", "-c", userns.script({"max_inotify_watches": 8}, str(folder))])
    assert failed.returncode != 0
    for bad in ({"../../fs/x": 1}, {"max_x": -1}, {"max_x; reboot": 1}, {"max_x": "1; reboot"}):
        with pytest.raises(ValueError):
            userns.script(bad)  # type: ignore[arg-type]


def test_a_refused_user_namespace_limit_refuses_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from kodepipe.container import userns
    from kodepipe.core import proc
    from kodepipe.core.errors import CommandFailed, KpError

    calls = []

    def fake_run(argv: list[str], **kw: object) -> None:
        calls.append(argv)
        raise CommandFailed("nsenter ... exited with status 1:\nsh: 1: cannot create ...: Permission denied")

    monkeypatch.setattr(proc, "run", fake_run)
    with pytest.raises(KpError, match=r"could not set the kernel quotas (.|\n)* Permission denied") as info:
        userns.limit(4242, {"max_inotify_instances": 16})
    assert info.value.code == "command_failed"
    assert calls[0][:5] == ["nsenter", "--user", "--target", "4242", "--"]
