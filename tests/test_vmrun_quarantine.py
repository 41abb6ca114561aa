"""kp-run --quarantine inside a VM (vmrun), against a scripted guest: only the folder shared with kp-boot
--share can be quarantined (the host holds its lower layer), anything else is refused before anything is
done; the overlay is mounted in the guest with the host backend's options and the container gets its
merged dir; after the run the upper dir comes back on one channel (real GNU tar of a real upper dir),
is reviewed on the host like the host backend's, and kp-run --apply writes the host's directory with no
VM; a failure at any point is never "quarantined", and what it leaves is kp-rm's."""

from __future__ import annotations

import io
import os
import shlex
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from kodepipe.container import apply, vmrun
from kodepipe.container.backend import Part, Unsupported, VmBackend
from kodepipe.core.errors import KpError
from kodepipe.core.state import Store
from tests.test_vmrun import VM, FakeGuest, job, request

OWNER = 4321  # the share's owner on the host


class TarChannel:
    """The guest's end of UPPER_TAR, scripted: ``payload`` on stdout (None: nothing, ever), then
    ``status``; ``said`` on stderr."""

    def __init__(self, payload: bytes | None, status: int = 0, said: bytes = b"") -> None:
        self.data = io.BytesIO(payload or b"")
        self.stalls = payload is None
        self.status, self.said = status, said
        self.timeout: float | None = None
        self.closed = False

    def settimeout(self, timeout: float) -> None:
        self.timeout = timeout

    def recv(self, n: int) -> bytes:
        if self.stalls:
            raise TimeoutError
        return self.data.read(min(n, 7919))  # short reads, as a channel gives them

    def recv_stderr_ready(self) -> bool:
        return bool(self.said)

    def recv_stderr(self, n: int) -> bytes:
        out, self.said = self.said[:n], self.said[n:]
        return out

    def exit_status_ready(self) -> bool:
        return True

    def recv_exit_status(self) -> int:
        return self.status

    def close(self) -> None:
        self.closed = True


class QuarantineGuest(FakeGuest):
    def __init__(self, channel: TarChannel | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.tar = channel

    def open(self, command: str) -> Any:
        if "tar --xattrs" in command:
            self.commands.append((command, b""))
            assert self.tar is not None, "the upper dir was asked for"
            return self.tar
        return super().open(command)


@pytest.fixture
def share(tmp_path: Path) -> Path:
    """The host folder of the VM's kp-boot --share (its /workspace), as a developer's checkout."""
    share = tmp_path / "share"
    (share / "sub").mkdir(parents=True)
    (share / "main.py").write_text("print('hello')\n")
    (share / "old.txt").write_text("old\n")
    (share / "sub" / "x.txt").write_text("x\n")
    for path in [share, *share.rglob("*")]:
        os.chown(path, OWNER, OWNER)
    return share


def upper_tar(tmp_path: Path) -> bytes:
    """GNU tar of a real overlay upper dir, as UPPER_TAR writes it in a guest: main.py changed, new.txt
    added, old.txt deleted (a whiteout), sub/ made opaque (sub/x.txt gone, sub/y.txt new), a symlink out
    of the workspace, a setuid file and a hook in .git/hooks."""
    upper = tmp_path / "guest-upper"
    (upper / "sub").mkdir(parents=True)
    (upper / ".git" / "hooks").mkdir(parents=True)
    (upper / "main.py").write_text("print('hello')\nchanged\n")
    (upper / "new.txt").write_text("new\n")
    os.mknod(upper / "old.txt", 0o600 | 0o020000, os.makedev(0, 0))
    os.setxattr(upper / "sub", "trusted.overlay.opaque", b"y")
    os.setxattr(upper, "trusted.overlay.impure", b"y")
    (upper / "sub" / "y.txt").write_text("y\n")
    (upper / "escape").symlink_to("/etc/shadow")
    (upper / "suid").write_text("#!/bin/sh\n")
    (upper / ".git" / "hooks" / "pre-commit").write_text("#!/bin/sh\ncurl evil\n")
    for path in [upper, *upper.rglob("*")]:
        os.chown(path, 995, 995, follow_symlinks=False)
    os.chmod(upper / "suid", 0o4755)  # noqa: S103 - the agent's setuid file, for the review to find
    return subprocess.run(["tar", "--xattrs", "--xattrs-include=trusted.overlay.*", "-C", str(upper), "-cf", "-",
                           "."], capture_output=True, check=True, env={**os.environ, "LC_ALL": "C"}).stdout


def vm_of(share: Path) -> dict[str, Any]:
    return {**VM, "share": str(share)}


# -- which workspaces: only the share --------------------------------------------------------------


@pytest.mark.parametrize(("workspace", "rel"), [("/workspace", "."), ("/workspace/sub", "sub"),
                                                ("/workspace/sub/../sub/", "sub")])
def test_the_share_and_beneath_it_can_be_quarantined(workspace: str, rel: str) -> None:
    assert vmrun.quarantine_share(VM, workspace) == rel


@pytest.mark.parametrize(("vm", "workspace"), [(VM, "/srv/proj"), (VM, "/workspace/../srv"), (VM, "/workspaces"),
                                               ({**VM, "share": None}, "/workspace"), (VM, None)])
def test_any_other_workspace_is_refused_with_the_reason(vm: dict[str, Any], workspace: str | None) -> None:
    with pytest.raises(Unsupported) as caught:
        vmrun.quarantine_share(vm, workspace)
    assert caught.value.part is Part.QUARANTINE and caught.value.status == 65
    assert "the workspace's lower layer is only in the guest; review and apply are decided on the host" \
        in caught.value.message


@pytest.mark.parametrize("workspace", ["/workspace/a:b", "/workspace/a,b", "/workspace/a\\b"])
def test_a_path_the_overlay_cannot_carry_is_refused(workspace: str) -> None:
    with pytest.raises(Unsupported, match="lowerdir"):
        vmrun.quarantine_share(VM, workspace)


def test_a_workspace_elsewhere_is_refused_before_connecting(share: Path) -> None:
    guest = QuarantineGuest()
    run, _, _ = job(guest, request(quarantine=True, workspace="/srv/proj"), vm=vm_of(share))
    with pytest.raises(Unsupported) as caught:
        vmrun._run(run)
    assert caught.value.part is Part.QUARANTINE and "decided on the host" in caught.value.message
    assert guest.commands == []
    with pytest.raises(Unsupported):  # and kp-run refuses it before the profile's image is built
        VmBackend(vm_of(share)).refuse(request(quarantine=True, workspace="/srv/proj"))
    VmBackend(vm_of(share)).refuse(request(quarantine=True, workspace="/workspace/sub"))


def test_a_host_directory_reached_through_a_symlink_is_refused(share: Path) -> None:
    (share / "link").symlink_to(share / "sub")
    with pytest.raises(Unsupported, match="symbolic link"):
        VmBackend(vm_of(share)).refuse(request(quarantine=True, workspace="/workspace/link"))


def test_a_guest_symlink_out_of_the_share_is_refused_before_any_side_effect(share: Path,
                                                                            kp_env: dict[str, Path]) -> None:
    guest = QuarantineGuest(facts={"ws_real": "/srv/elsewhere"})
    run, _, _ = job(guest, request(quarantine=True, workspace="/workspace/sub"), vm=vm_of(share))
    with pytest.raises(Unsupported, match="decided on the host"):
        vmrun._run(run)
    assert [c for c, _ in guest.commands if "overlay" in c or "create" in c] == []
    assert not (kp_env["state"] / "containers").exists() or not any((kp_env["state"] / "containers").iterdir())


# -- the run ---------------------------------------------------------------------------------------


def test_the_upper_dir_is_reviewed_and_applied_on_the_host(share: Path, tmp_path: Path,
                                                          kp_env: dict[str, Path]) -> None:
    before = {p: p.read_bytes() for p in share.rglob("*") if p.is_file()}
    guest = QuarantineGuest(TarChannel(upper_tar(tmp_path)))
    run, _, said = job(guest, request(quarantine=True, workspace="/workspace"), vm=vm_of(share))
    record, status = vmrun._run(run)
    assert status == 3 and record["state"] == "quarantined" and record["workspace_mode"] == "quarantine"
    folder = kp_env["state"] / "containers" / record["name"]
    q = record["quarantine"]
    assert record["path"] == str(folder) and q["path"] == str(folder / "upper") and q["lower"] == str(share)
    assert q["owner"] == [OWNER, OWNER] and "fingerprints" not in record
    assert set(q["added"]) == {"new.txt", "sub/y.txt", "escape", "suid", ".git", ".git/hooks",
                               ".git/hooks/pre-commit"}
    assert q["modified"] == ["main.py"] and set(q["deleted"]) == {"old.txt", "sub/x.txt"}
    assert record["git_changes"] and {p.stat(follow_symlinks=False).st_uid
                                      for p in (folder / "upper").rglob("*")} == {OWNER}
    # the findings are the host backend's: the symlink out, the setuid file, the git metadata
    warned = " ".join(m for _, m in said)
    assert "escape -> /etc/shadow" in warned and "setuid" in warned and "git metadata" in warned
    # the guest: the overlay over the workspace with the host's options, the container on its merged dir
    gq = f"{vmrun.GUEST_KEEP}/{record['name']}-{record['id']}/quarantine"
    ((mount, _),) = guest.sent("mount -t overlay")
    assert shlex.split(mount)[-3:] == [gq, "/workspace", "redirect_dir=off,metacopy=off,index=off,nosuid,nodev"]
    (create, _), = guest.sent(" create --rm ")
    assert f"type=bind,source={gq}/merged,destination=/workspace" in shlex.split(create[len("id=$("):])
    ((tar, _),) = guest.sent("tar --xattrs")
    assert shlex.split(tar)[-2:] == [f"{gq}/merged", f"{gq}/upper"] and guest.tar is not None and guest.tar.closed
    ((end, _),) = guest.sent("mountpoint -q")
    assert shlex.split(end)[-2:] == [gq, "remove"]
    # after the run: the share untouched; the review: no VM needed to apply it
    assert {p: p.read_bytes() for p in share.rglob("*") if p.is_file()} == before
    with pytest.raises(KpError, match=r"git-metadata \.git \(3\)") as refused:
        apply.apply(Store(), record["name"], expect_id=None, force=False, say=lambda m: None)
    assert refused.value.code == "findings"
    done = apply.apply(Store(), record["name"], expect_id=None, force=True, say=lambda m: None)
    assert done["state"] == "applied" and folder.is_dir()  # the quarantine stays until kp-rm
    assert (share / "main.py").read_text() == "print('hello')\nchanged\n" and not (share / "old.txt").exists()
    assert (share / "sub" / "y.txt").read_text() == "y\n" and not (share / "sub" / "x.txt").exists()
    assert (share / "new.txt").stat().st_uid == OWNER and not (share / "suid").stat().st_mode & 0o4000


def test_no_change_leaves_nothing(share: Path, tmp_path: Path, kp_env: dict[str, Path]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    payload = subprocess.run(["tar", "--xattrs", "-C", str(empty), "-cf", "-", "."], capture_output=True,
                             check=True).stdout
    guest = QuarantineGuest(TarChannel(payload))
    run, _, _ = job(guest, request(quarantine=True, workspace="/workspace"), vm=vm_of(share))
    record, _ = vmrun._run(run)
    assert record["state"] == "exited" and record["removed"] is True
    assert not (kp_env["state"] / "containers" / record["name"]).exists()


def hostile() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        top = tarfile.TarInfo(".")
        top.type, top.mode = tarfile.DIRTYPE, 0o755
        archive.addfile(top)
        escape = tarfile.TarInfo("../outside.txt")
        escape.size = 3
        archive.addfile(escape, io.BytesIO(b"bad"))
    return out.getvalue()


@pytest.mark.parametrize(("channel", "code", "words"), [
    (lambda t: TarChannel(upper_tar(t), status=2, said=b"tar: ./x: file changed as we read it\n"),
     "upper_truncated", "status 2"),
    (lambda t: TarChannel(b"", status=1, said=b"umount: target is busy\n"), "upper_truncated", "target is busy"),
    (lambda t: TarChannel(upper_tar(t)[:5000]), "upper_truncated", "ended early"),
    (lambda t: TarChannel(None), "upper_truncated", "sent nothing"),
    (lambda t: TarChannel(hostile()), "upper_refused", "'..'"),
])
def test_a_failed_review_is_never_quarantined_and_kp_rm_can_remove_what_is_left(
        channel: Any, code: str, words: str, share: Path, tmp_path: Path, kp_env: dict[str, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vmrun, "UPPER_STALL", 0.01)
    guest = QuarantineGuest(channel(tmp_path))
    run, _, _ = job(guest, request(quarantine=True, workspace="/workspace"), vm=vm_of(share))
    with pytest.raises(KpError) as caught:
        vmrun._run(run)
    assert caught.value.code == code and words in caught.value.message, caught.value.message
    record = caught.value.record
    assert record["state"] == "exited" and record["quarantine"]["error"] == code and "path" not in record["quarantine"]
    assert record["exit_code"] == 3  # the agent's, kept
    folder = kp_env["state"] / "containers" / record["name"]
    assert record["path"] == str(folder) and (Store().read_meta(folder) or {}).get("state") == "exited"
    with pytest.raises(apply.NotQuarantined):
        apply.apply(Store(), record["name"], expect_id=None, force=True, say=lambda m: None)
    # the guest's upper dir stays for a look (unmounted), and goes with the run: kp-rm
    ((end, _),) = guest.sent("mountpoint -q")
    assert shlex.split(end)[-1] == "keep"
    assert [p.name for p in share.iterdir()] and not (share.parent / "outside.txt").exists()
    Store().discard(folder)


def test_a_run_cut_short_is_not_reviewed_and_its_overlay_goes(share: Path, kp_env: dict[str, Path]) -> None:
    guest = QuarantineGuest(stream=lambda g, command, sink: (-1, b""))  # the connection dropped
    run, _, _ = job(guest, request(quarantine=True, workspace="/workspace"), vm=vm_of(share))
    with pytest.raises(KpError) as caught:
        vmrun._run(run)
    assert caught.value.code == "connection_lost" and caught.value.record["state"] == "exited"
    assert guest.sent("tar --xattrs") == []
    ((end, _),) = guest.sent("mountpoint -q")
    assert shlex.split(end)[-1] == "remove"
