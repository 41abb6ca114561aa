"""imagebuild without network or root: mirror detection, guest files, cleanup on failure."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from kodepipe.core import proc, state
from kodepipe.core.errors import CommandFailed, KpError
from kodepipe.host.debian import detect_mirror
from kodepipe.vm import imagebuild
from kodepipe.vm.imagebuild import BuildSpec, build

HOST_SOURCES = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
"""


def sources(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "apt"
    (root / "sources.list.d").mkdir(parents=True)
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def spec(**changes: Any) -> BuildSpec:
    values: dict[str, Any] = {"suite": "bookworm", "mirror": "http://deb.debian.org/debian", "user": "kp",
                              "authorized_keys": ["ssh-ed25519 AAAAC3Nza test"], "packages": ["git"],
                              "dotfiles": None, "size": "8G"}
    values.update(changes)
    return BuildSpec(**values)


# ---------------------------------------------------------------- detect_mirror

def test_deb822_sources_skip_updates_and_security(tmp_path: Path) -> None:
    root = sources(tmp_path, {"sources.list.d/debian.sources": HOST_SOURCES})
    assert detect_mirror(root) == ("http://deb.debian.org/debian", "bookworm")


def test_security_stanza_first_is_skipped(tmp_path: Path) -> None:
    text = "\n\n".join(reversed(HOST_SOURCES.split("\n\n")))
    root = sources(tmp_path, {"sources.list.d/debian.sources": text})
    assert detect_mirror(root) == ("http://deb.debian.org/debian", "bookworm")


def test_one_line_sources_with_options_and_comments(tmp_path: Path) -> None:
    root = sources(tmp_path, {"sources.list": (
        "# deb http://old.example/debian buster main\n"
        "deb-src http://deb.debian.org/debian trixie main\n"
        "deb [arch=amd64 signed-by=/usr/share/keyrings/x.gpg] http://packages.example.com/repo stable main\n"
        "deb http://security.debian.org/debian-security trixie-security main\n"
        "deb [arch=amd64] http://ftp.de.debian.org/debian/ trixie main contrib\n")})
    assert detect_mirror(root) == ("http://ftp.de.debian.org/debian", "trixie")


def test_sources_list_comes_before_sources_list_d(tmp_path: Path) -> None:
    root = sources(tmp_path, {"sources.list": "deb http://mirror.local/debian bookworm main\n",
                              "sources.list.d/debian.sources": HOST_SOURCES})
    assert detect_mirror(root) == ("http://mirror.local/debian", "bookworm")


def test_disabled_stanzas_and_other_file_names_are_ignored(tmp_path: Path) -> None:
    root = sources(tmp_path, {
        "sources.list.d/a.sources": "Types: deb\nURIs: http://a.example/debian\nSuites: sid\nEnabled: no\n",
        "sources.list.d/b.list.disabled": "deb http://b.example/debian sid main\n",
        "sources.list.d/c.list": "deb http://archive.ubuntu.com/ubuntu noble main\n",
        "sources.list.d/d.sources": "Types: deb deb-src\nURIs: http://d.example/debian\nSuites: trixie\n"})
    assert detect_mirror(root) == ("http://d.example/debian", "trixie")


def test_no_debian_archive_names_the_options(tmp_path: Path) -> None:
    root = sources(tmp_path, {"sources.list": "deb http://archive.ubuntu.com/ubuntu noble main\n"})
    with pytest.raises(KpError) as info:
        detect_mirror(root)
    assert "--mirror" in info.value.message and "--suite" in info.value.message


def test_missing_apt_directory(tmp_path: Path) -> None:
    with pytest.raises(KpError):
        detect_mirror(tmp_path / "nothing")


# ---------------------------------------------------------------- guest files

def test_guest_files_are_installed_for_the_user(tmp_path: Path) -> None:
    written = imagebuild.install_guest_files(tmp_path, "alice")
    assert "/etc/sudoers.d/kodepipe" in written
    sudoers = tmp_path / "etc/sudoers.d/kodepipe"
    assert sudoers.read_text().strip() == "alice ALL=(ALL:ALL) NOPASSWD: ALL"
    assert sudoers.stat().st_mode & 0o777 == 0o440
    getty = (tmp_path / "etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf").read_text()
    assert "--autologin alice" in getty and "@USER@" not in getty
    sshd = (tmp_path / "etc/ssh/sshd_config.d/kodepipe.conf").read_text()
    for line in ("PasswordAuthentication no", "KbdInteractiveAuthentication no", "PermitRootLogin no",
                 "HostKey /etc/ssh/ssh_host_ed25519_key"):
        assert line in sshd
    blacklist = (tmp_path / "etc/modprobe.d/kodepipe-blacklist.conf").read_text()
    assert all(f"blacklist {m}\n" in blacklist for m in ("kvm", "kvm_amd", "kvm_intel"))
    modules = (tmp_path / "etc/initramfs-tools/modules").read_text().split()
    assert {"virtio_pci", "virtio_blk", "ext4"} <= set(modules)
    assert "MODULES=list" in (tmp_path / "etc/initramfs-tools/conf.d/kodepipe.conf").read_text()
    assert "/dev/vda\t/\text4" in (tmp_path / "etc/fstab").read_text()
    network = (tmp_path / "etc/systemd/network/20-kodepipe.network").read_text()
    assert "Name=en* eth*" in network and "DHCP=yes" in network
    assert (tmp_path / "etc/hostname").read_text() == "kodepipe\n"


def test_guest_files_replace_symlinks_instead_of_following_them(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_text("keep")
    (tmp_path / "root/etc").mkdir(parents=True)
    (tmp_path / "root/etc/hostname").symlink_to(outside)
    imagebuild.install_guest_files(tmp_path / "root", "kp")
    assert outside.read_text() == "keep"
    assert not (tmp_path / "root/etc/hostname").is_symlink()


def test_dotfiles_script_follows_the_codespaces_order(tmp_path: Path) -> None:
    assert imagebuild.find_dotfiles_script(tmp_path) is None
    (tmp_path / "script").mkdir()
    (tmp_path / "script/setup").write_text("")
    assert imagebuild.find_dotfiles_script(tmp_path) == "script/setup"
    (tmp_path / "bootstrap.sh").write_text("")
    assert imagebuild.find_dotfiles_script(tmp_path) == "bootstrap.sh"
    (tmp_path / "install.sh").mkdir()  # a directory is not a script
    assert imagebuild.find_dotfiles_script(tmp_path) == "bootstrap.sh"


# ---------------------------------------------------------------- validation and mounts

@pytest.mark.parametrize("changes", [
    {"user": "root"}, {"user": "Bad User"}, {"suite": "../x"}, {"mirror": "deb.debian.org"},
    {"packages": ["git; rm -rf /"]}, {"size": "8 GB"}, {"authorized_keys": ["a\nb"]},
    {"dotfiles": Path("/nonexistent/dotfiles")},
])
def test_bad_specs_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(KpError):
        imagebuild.validate(spec(**changes))


def test_remove_tree_refuses_a_tree_with_mounts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = tmp_path / "rootfs"
    (tree / "proc").mkdir(parents=True)
    monkeypatch.setattr(state, "mounts_under", lambda path: [str(tree / "proc")])
    with pytest.raises(KpError, match="refusing to delete"):
        state.remove_tree(tree, mount_wait=0.3)
    assert tree.exists()
    monkeypatch.setattr(state, "mounts_under", lambda path: [])
    state.remove_tree(tree)
    assert not tree.exists()


# ---------------------------------------------------------------- failures clean up

@pytest.fixture
def fake_programs(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    monkeypatch.setattr(proc, "require", lambda program: f"/usr/bin/{program}")
    calls: list[list[str]] = []
    return calls


def fail_debootstrap(calls: list[list[str]], error: BaseException):  # type: ignore[no-untyped-def]
    def run(argv: Sequence[str | Path], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        args = [str(a) for a in argv]
        calls.append(args)
        if "debootstrap" in args:
            # debootstrap has started filling the rootfs when it fails
            target = Path(args[-2])
            (target / "var/lib").mkdir(parents=True)
            raise error
        return subprocess.CompletedProcess(args, 0, b"", b"")
    return run


def test_unreachable_mirror_is_named_and_everything_is_removed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_programs: list[list[str]]) -> None:
    error = CommandFailed("debootstrap exited with status 1:\nE: Failed getting release file "
                          "http://nowhere.invalid/debian/dists/bookworm/Release")
    monkeypatch.setattr(proc, "run", fail_debootstrap(fake_programs, error))
    work = tmp_path / "work"
    work.mkdir()
    steps: list[str] = []
    with pytest.raises(KpError) as info:
        build(spec(mirror="http://nowhere.invalid/debian"), work, progress=steps.append,
              log=tmp_path / "log", cache_dir=tmp_path / "cache")
    assert info.value.code == "mirror_unreachable"
    assert "http://nowhere.invalid/debian" in info.value.message and "--mirror" in info.value.message
    assert steps == ["debootstrap"]
    assert list(work.iterdir()) == []
    argv = fake_programs[0]
    assert argv[:5] == ["unshare", "--mount", "--propagation", "private", "--pid"]
    assert "--variant=minbase" in argv and f"--cache-dir={tmp_path / 'cache' / 'debootstrap'}" in argv
    assert "--include=systemd,systemd-sysv,udev,dbus,openssh-server,qemu-guest-agent,sudo,iproute2" in argv


def test_interrupt_cleans_up_and_propagates(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_programs: list[list[str]]) -> None:
    monkeypatch.setattr(proc, "run", fail_debootstrap(fake_programs, KeyboardInterrupt()))
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(KeyboardInterrupt):
        build(spec(), work, progress=lambda step: None, log=tmp_path / "log", cache_dir=None)
    assert list(work.iterdir()) == []
    assert not any(a.startswith("--cache-dir") for a in fake_programs[0])


def test_existing_outputs_are_not_overwritten(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_programs: list[list[str]]) -> None:
    monkeypatch.setattr(proc, "run", fail_debootstrap(fake_programs, KeyboardInterrupt()))
    (tmp_path / "disk.qcow2").write_text("precious")
    with pytest.raises(KpError, match="already exists"):
        build(spec(), tmp_path, progress=lambda step: None, log=tmp_path / "log", cache_dir=None)
    assert (tmp_path / "disk.qcow2").read_text() == "precious"
    assert fake_programs == []
