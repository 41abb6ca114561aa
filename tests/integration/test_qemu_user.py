"""A VM escape does not land as host root: kp-boot run by root starts QEMU (and the serial log's
keeper, and passt) as an unprivileged uid, hands it only fds, and what the guest writes in a share
belongs to the share's owner.  Real QEMU, real guests (TCG), as root (issue 10, item 9).

- plain root, a root-owned share: QEMU runs as the ``kodepipe`` account and the share is an
  idmapped mount in QEMU's own mount namespace, so what the guest's root writes is root's (the
  share's owner's), though QEMU is not root;
- plain root, a share someone else owns: QEMU runs as that owner (the guest sees the owners as
  they are), so what the guest writes is theirs, not root's;
- sudo-like (SUDO_UID/SUDO_GID of a test user): QEMU runs as that user (a root-owned share is
  idmapped to root for it);
- a read-only entry of the share (``share_readonly``): the guest's root can neither write nor
  rename it; the mechanism is also driven directly with a plain directory, through the exec
  helper, as QEMU's uid.
"""

from __future__ import annotations

import os
import pwd
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kodepipe.vm import qemuuser
from tests.conftest import ROOT, lines
from tests.integration.conftest import run
from tests.integration.test_guest_input import keepers

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="QEMU's uid is chosen when root starts it")]

TEST_USER = "kp-h2-owner"  # a share's owner, and the sudo user of the sudo-like boot


def status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def uids(pid: int) -> set[int]:
    """Every uid of ``pid``: real, effective, saved and filesystem."""
    return {int(u) for u in status(pid)["Uid"].split()}


def one(proc: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    (record,) = lines(proc.stdout)
    return record


def in_guest(record: dict[str, Any], script: str, timeout: float = 120) -> tuple[int, str, str]:
    """``script`` run by root in the guest, through the guest agent (no network needed)."""
    from kodepipe.vm.guest_agent import wait_for_agent

    with wait_for_agent(Path(record["sockets"]["qga"]), 900.0) as agent:
        status_, out, err = agent.exec(["/bin/sh", "-c", script], timeout=timeout)
    return status_, out.decode(errors="replace"), err.decode(errors="replace")


MOUNT = ("mountpoint -q /workspace || { mkdir -p /workspace && "
         "mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 workspace /workspace; }")


@pytest.fixture(scope="module")
def owner() -> Iterator[pwd.struct_passwd]:
    """A user of the host's (not root), who owns the shared checkouts."""
    made = False
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", TEST_USER], check=True)
        made = True
    yield pwd.getpwnam(TEST_USER)
    if made:
        subprocess.run(["userdel", TEST_USER], check=False)


def checkout(root: Path, name: str, user: pwd.struct_passwd | None) -> Path:
    """A shared folder with a git repository (its .git is handed in read-only) and a plain file."""
    share = root / name
    (share / ".git" / "hooks").mkdir(parents=True)
    (share / ".git" / "config").write_text("[core]\n\tbare = false\n")
    (share / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (share / ".git" / "objects").mkdir()
    (share / ".git" / "refs").mkdir()
    (share / "README").write_text("the owner's\n")
    if user is not None:
        for path in [share, *share.rglob("*")]:
            os.lchown(path, user.pw_uid, user.pw_gid)
    return share


@pytest.fixture(scope="module")
def vms(golden: dict[str, Any], owner: pwd.struct_passwd,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, dict[str, Any]]]:
    """Three VMs booted at once (each boot is a minute or more under TCG): by plain root with a
    root-owned share, by a sudo-like root (SUDO_UID of the test user) with a root-owned share, and by
    plain root with a share the test user owns."""
    env = golden["env"]
    root = tmp_path_factory.mktemp("shares")
    os.chmod(root, 0o700)  # root's, like /root: QEMU's uid cannot even look in; it gets the share as an fd
    plain_env = {k: v for k, v in env.items() if not k.startswith("SUDO_")}
    sudo_env = {**plain_env, "SUDO_UID": str(owner.pw_uid), "SUDO_GID": str(owner.pw_gid), "SUDO_USER": TEST_USER}
    boots = {"h2-root": (plain_env, checkout(root, "plain", None)),
             "h2-sudo": (sudo_env, checkout(root, "sudo", None)),
             "h2-owner": (plain_env, checkout(root, "owned", owner))}
    records: dict[str, dict[str, Any]] = {}
    try:
        for name, (boot_env, share) in boots.items():
            one(run(boot_env, "kp-clone", "--cold", "base", name))
            record = one(run(boot_env, "kp-boot", "--accel", "tcg", "--share", str(share), name, timeout=300))
            st = share.stat()
            records[name] = {**record, "share_dir": str(share), "share_owner": (st.st_uid, st.st_gid)}
        for record in records.values():
            code, out, err = in_guest(record, MOUNT)
            assert code == 0, (out, err)
        yield records
    finally:
        for name in boots:
            run(env, "kp-rm", name, timeout=300)
    for record in records.values():
        assert keepers(Path(record["serial_log"])) == []


def test_qemu_its_keeper_and_passt_never_run_as_root(vms: dict[str, dict[str, Any]]) -> None:
    record = vms["h2-root"]
    account = pwd.getpwnam(qemuuser.ACCOUNT)
    assert record["qemu_user"] == {"uid": account.pw_uid, "gid": account.pw_gid, "name": "kodepipe", "why": "account"}
    qemu = status(record["pid"])
    assert uids(record["pid"]) == {account.pw_uid}, qemu["Uid"]
    assert {int(g) for g in qemu["Gid"].split()} == {account.pw_gid} and qemu["Groups"] == ""
    assert int(qemu["CapEff"], 16) == 0 and int(qemu["CapPrm"], 16) == 0 and qemu["NoNewPrivs"] == "1"
    # in a mount namespace of its own (its share's mounts are nowhere else)
    assert os.readlink(f"/proc/{record['pid']}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    # it holds no path into the state directory: its disk, kernel and sockets are fds kp-boot opened
    argv = Path(f"/proc/{record['pid']}/cmdline").read_bytes().split(b"\0")
    assert not any(a == b"-pidfile" for a in argv) and b"/dev/fdset/10" in b" ".join(argv)
    (keeper,) = keepers(Path(record["serial_log"]))
    assert uids(keeper) == {account.pw_uid}
    if record.get("passt"):
        assert 0 not in uids(int(record["passt"]["pid"]))
    for vm in vms.values():
        assert 0 not in uids(vm["pid"]), vm["name"]


def test_under_sudo_qemu_runs_as_the_invoking_user(vms: dict[str, dict[str, Any]], owner: pwd.struct_passwd) -> None:
    record = vms["h2-sudo"]
    assert record["qemu_user"]["uid"] == owner.pw_uid and record["qemu_user"]["why"] == "sudo"
    assert uids(record["pid"]) == {owner.pw_uid}
    (keeper,) = keepers(Path(record["serial_log"]))
    assert uids(keeper) == {owner.pw_uid}
    # the share is root's: idmapped so that the user's QEMU writes it as root, its owner
    assert record["share_idmap"] == {"owner": [0, 0], "qemu": [owner.pw_uid, owner.pw_gid]}


def test_a_share_someone_owns_is_served_as_them(vms: dict[str, dict[str, Any]], owner: pwd.struct_passwd) -> None:
    record = vms["h2-owner"]
    assert record["qemu_user"] == {"uid": owner.pw_uid, "gid": owner.pw_gid, "name": TEST_USER, "why": "share-owner"}
    assert uids(record["pid"]) == {owner.pw_uid} and "share_idmap" not in record
    assert vms["h2-root"]["share_idmap"] == {"owner": [0, 0], "qemu": [vms["h2-root"]["qemu_user"]["uid"],
                                                                         vms["h2-root"]["qemu_user"]["gid"]]}


@pytest.mark.parametrize("name", ["h2-root", "h2-sudo", "h2-owner"])
def test_what_the_guests_root_writes_in_a_share_belongs_to_its_owner(vms: dict[str, dict[str, Any]],
                                                                      name: str) -> None:
    record = vms[name]
    want = tuple(record["share_owner"])
    share = Path(record["share_dir"])
    code, out, err = in_guest(record, "set -e; echo from the guest > /workspace/made.txt; mkdir -p /workspace/dir; "
                                      "echo deeper > /workspace/dir/file; echo more >> /workspace/README; id -u")
    assert code == 0 and out.strip() == "0", (out, err)  # the guest's root wrote them
    for path in (share / "made.txt", share / "dir", share / "dir" / "file", share / "README"):
        st = path.stat()
        assert (st.st_uid, st.st_gid) == want, (path, st.st_uid, st.st_gid)
        assert st.st_mode & 0o400  # readable by the owner
    assert (share / "made.txt").read_text() == "from the guest\n"
    assert (share / "README").read_text() == "the owner's\nmore\n"


@pytest.mark.parametrize("name", ["h2-root", "h2-sudo", "h2-owner"])
def test_a_read_only_entry_cannot_be_written_or_renamed_by_the_guests_root(vms: dict[str, dict[str, Any]],
                                                                          name: str) -> None:
    record = vms[name]
    share = Path(record["share_dir"])
    assert record["share_git"]["read_only"] == [".git"]
    before = {p.name: p.read_bytes() for p in (share / ".git").iterdir() if p.is_file()}
    tries = {
        "write": "echo '[core] fsmonitor = touch /tmp/owned' >> /workspace/.git/config",
        "create": "echo x > /workspace/.git/hooks/post-checkout",
        "rename": "mv /workspace/.git /workspace/.git-moved",
        "replace": "mkdir -p /workspace/fake && mv -T /workspace/fake /workspace/.git",
        "remove": "rm -rf /workspace/.git",
    }
    for what, script in tries.items():
        code, out, err = in_guest(record, script)
        assert code != 0, (what, out, err)
        assert "Read-only file system" in err or "busy" in err, (what, err)
    assert {p.name: p.read_bytes() for p in (share / ".git").iterdir() if p.is_file()} == before
    assert not (share / ".git-moved").exists() and not (share / ".git" / "hooks" / "post-checkout").exists()


def test_the_guest_still_works_through_the_handed_fds(vms: dict[str, dict[str, Any]]) -> None:
    """The disk (an fd set with its backing layers as explicit nodes) takes writes, and the monitor
    and guest agent answer on the listening sockets kp-boot bound."""
    record = vms["h2-root"]
    code, out, _ = in_guest(record, "dd if=/dev/urandom of=/root/blob bs=1M count=8 2>/dev/null && sync && "
                                    "sha256sum /root/blob | cut -c1-16")
    assert code == 0 and len(out.strip()) == 16


# -- the mechanism, without a guest: the exec helper with a plain directory ---------------------


def test_share_readonly_fds_hold_for_qemus_uid_in_its_own_namespace(tmp_path: Path, owner: pwd.struct_passwd) -> None:
    """share_readonly, as the lead's gitguard hands it: O_PATH fds of entries (a plain directory and a
    file) inside the share, bound read-only over themselves in the helper's new mount namespace, then
    the share cloned with them and idmapped to its owner; a program exec'd as the kodepipe account
    in place of QEMU tries to write, rename and replace them through /proc/self/fd/SHARE."""
    share = tmp_path / "share"
    (share / "protected").mkdir(parents=True)
    (share / "protected" / "inner").write_text("kept\n")
    (share / "pinned.txt").write_text("pinned\n")
    for path in [share, *share.rglob("*")]:
        os.lchown(path, owner.pw_uid, owner.pw_gid)
    user = qemuuser.resolve({})
    share_fd = os.open(share, os.O_PATH | os.O_DIRECTORY)
    entries = [os.open(share / "protected", os.O_PATH), os.open(share / "pinned.txt", os.O_PATH)]
    try:
        read_only = qemuuser.read_only_of(share, share_fd, entries)
        assert [e[0] for e in read_only.entries] == ["protected", "pinned.txt"]
        plan = qemuuser.Plan(user, str(tmp_path / "x.pid"), share_fd, read_only,
                             qemuuser.share_idmap(share_fd, user))
        assert plan.idmap == (owner.pw_uid, owner.pw_gid)
        s = f"/proc/self/fd/{share_fd}"
        script = (f"id -u; echo x >> {s}/protected/inner; echo rc=$?; echo x > {s}/protected/new; echo rc=$?; "
                  f"mv {s}/protected {s}/moved; echo rc=$?; echo y > {s}/pinned.txt; echo rc=$?; "
                  f"mv {s}/pinned.txt {s}/p2; echo rc=$?; rm -f {s}/pinned.txt; echo rc=$?; "
                  f"echo made > {s}/made.txt; echo rc=$?")
        done = subprocess.run(qemuuser.helper_argv(plan, ["/bin/sh", "-c", script]), pass_fds=(share_fd,),
                              env=qemuuser.helper_env(), capture_output=True, timeout=60)
    finally:
        for fd in (share_fd, *entries):
            os.close(fd)
    out = done.stdout.decode().split()
    assert out[0] == str(user.uid), done.stderr.decode()
    assert len(out) == 8 and "rc=0" not in out[1:7] and out[7] == "rc=0", (out, done.stderr.decode())
    err = done.stderr.decode()
    assert err.count("Read-only file system") >= 3 and "busy" in err, err
    assert (share / "protected" / "inner").read_text() == "kept\n" and (share / "pinned.txt").read_text() == "pinned\n"
    made = (share / "made.txt").stat()
    assert (made.st_uid, made.st_gid) == (owner.pw_uid, owner.pw_gid)  # the idmapped share: the owner's
    assert (tmp_path / "x.pid").read_text().strip().isdigit()
    # nothing of it is mounted on the host
    assert str(share) not in Path("/proc/self/mountinfo").read_text()


def test_the_helper_refuses_to_run_anything_as_root() -> None:
    root = qemuuser.QemuUser(0, 0, "root", "self")
    plan = qemuuser.Plan(root, "/dev/null")
    done = subprocess.run(qemuuser.helper_argv(plan, ["/bin/true"]), env=qemuuser.helper_env(),
                          capture_output=True, timeout=60)
    assert done.returncode == 1 and b"refusing to run QEMU as root" in done.stderr


NORMAL_USER_SCRIPT = r"""
import os, subprocess, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from kodepipe.vm import qemuuser
share = Path(sys.argv[2])
user = qemuuser.resolve()
fd = os.open(share, os.O_PATH | os.O_DIRECTORY)
entry = os.open(share / ".git", os.O_PATH)
plan = qemuuser.Plan(user, sys.argv[3], fd, qemuuser.read_only_of(share, fd, [entry]), qemuuser.share_idmap(fd, user))
s = f"/proc/self/fd/{fd}"
script = (f"id -u; grep CapEff /proc/self/status; echo x >> {s}/.git/config; echo rc=$?; mv {s}/.git {s}/g; "
          f"echo rc=$?; echo made > {s}/made; echo rc=$?")
done = subprocess.run(qemuuser.helper_argv(plan, ["/bin/sh", "-c", script]), pass_fds=(fd,),
                      env=qemuuser.helper_env(), capture_output=True)
sys.stdout.write(f"{user.why} {plan.idmap}\n" + done.stdout.decode() + done.stderr.decode())
"""


def test_a_normal_users_qemu_gets_the_read_only_entries_in_a_user_namespace_of_its_own() -> None:
    """Run by a user (no root anywhere), the helper binds the read-only entries in a user and mount
    namespace of its own that maps the user to itself: QEMU keeps the user's uid and no capability
    (so it cannot unmount them), and the entries hold."""
    import shutil
    import tempfile

    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3 a user can run")
    work = Path(tempfile.mkdtemp(prefix="kp-h2-user-", dir="/tmp"))
    try:
        os.chmod(work, 0o755)  # noqa: S103 - the user must reach the share and the script
        share = work / "share"
        (share / ".git").mkdir(parents=True)
        (share / ".git" / "config").write_text("cfg\n")
        (work / "t.py").write_text(NORMAL_USER_SCRIPT)
        for path in [share, *share.rglob("*")]:
            os.lchown(path, 65534, 65534)
        done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-S",
                               str(work / "t.py"), str(ROOT), str(share),
                               str(share / "pid")], capture_output=True, timeout=60, cwd="/")
        out = done.stdout.decode()
        assert done.returncode == 0, (out, done.stderr.decode())
        lines_ = out.splitlines()
        assert lines_[0] == "self None" and lines_[1] == "65534", out
        assert lines_[2].split() == ["CapEff:", "0000000000000000"], out
        assert "Read-only file system" in out and "busy" in out and out.count("rc=0") == 1, out
        assert (share / ".git" / "config").read_text() == "cfg\n" and (share / ".git").is_dir()
        assert (share / "made").stat().st_uid == 65534
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm on this host")
def test_qemus_uid_gets_dev_kvm_in_its_own_namespace_only(tmp_path: Path) -> None:
    """KVM is opened by path (/dev/kvm, root's 0600 on some hosts): under -accel kvm the helper gives
    QEMU's uid a node of its own in QEMU's mount namespace; the host's /dev/kvm is unchanged, and
    under -accel tcg QEMU gets none."""
    user = qemuuser.resolve({})
    before = os.stat("/dev/kvm")
    plan = qemuuser.Plan(user, str(tmp_path / "k.pid"))
    script = "id -u; exec 3<>/dev/kvm && echo opened"
    done = subprocess.run(qemuuser.helper_argv(plan, ["/bin/sh", "-c", script, "-accel", "kvm"]),
                          env=qemuuser.helper_env(), capture_output=True, timeout=60)
    assert done.stdout.decode().split() == [str(user.uid), "opened"], done.stderr.decode()
    after = os.stat("/dev/kvm")
    assert (after.st_uid, after.st_gid, after.st_mode) == (before.st_uid, before.st_gid, before.st_mode)
    assert "/dev/kvm" not in Path("/proc/self/mountinfo").read_text()
    assert (tmp_path / "k.pid").read_text().strip().isdigit()  # written where it belongs, after the tmpfs went
    if before.st_mode & 0o066 == 0:  # root's alone here: without the node, QEMU's uid could not open it
        done = subprocess.run(qemuuser.helper_argv(plan, ["/bin/sh", "-c", script, "-accel", "tcg"]),
                              env=qemuuser.helper_env(), capture_output=True, timeout=60)
        assert "opened" not in done.stdout.decode() and "Permission denied" in done.stderr.decode()
