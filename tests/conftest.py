"""Every test gets its own kodepipe directories and HOME (nothing leaks between tests
or onto the developer's machine), and helpers to make small real images."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
import pytest

if TYPE_CHECKING:
    from kodepipe.core.records import Record

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "bin"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Remove the temporary folders of earlier test sessions that have ended, except the newest,
    before pytest's own clean-up meets them: pytest removes old ones with shutil.rmtree, which
    recurses and dies (RecursionError, exit 1 after every test passed) on a tree deeper than
    Python's recursion limit, which is what the hostile-tree tests make if one of them was killed.
    kodepipe's own remover is iterative.  A folder whose session still runs (its .lock names a live
    process) is left alone."""
    import getpass
    import re
    import tempfile

    from kodepipe.core.state import remove_tree

    if session.config.option.basetemp:
        return
    root = Path(tempfile.gettempdir()) / f"pytest-of-{getpass.getuser()}"
    try:
        numbered = sorted((int(m.group(1)), p) for p in root.iterdir()
                          if (m := re.fullmatch(r"pytest-(\d+)", p.name)) and not p.is_symlink() and p.is_dir())
    except OSError:
        return
    # pytest renames a folder to garbage-UUID before it removes it: one it failed to remove stays so
    garbage = [p for p in root.iterdir() if p.name.startswith("garbage-") and not p.is_symlink() and p.is_dir()]
    for folder in [folder for _, folder in numbered[:-1]] + garbage:
        try:
            pid = int((folder / ".lock").read_text().strip() or 0)
        except (OSError, ValueError):
            pid = 0
        if pid and Path(f"/proc/{pid}").exists():
            continue
        try:
            remove_tree(folder)
        except Exception as exc:  # never stop a test run over an old temporary folder
            print(f"conftest: could not remove {folder}: {exc}", file=sys.stderr)


def pytest_report_header(config: pytest.Config) -> str:
    """Which KVM case this run is on (the tests must pass in each): works, broken (and why), or absent."""
    from kodepipe.vm import accel

    try:
        facts = accel.host()
        works, reason = accel.kvm_works(cached=False)  # nothing read from or written to the real cache
    except Exception as exc:
        return f"kvm: unknown ({exc})"
    case = "works" if works else "absent" if not facts.usable else "broken"
    return f"kvm: {case}: {reason}" + ("" if works else " (VMs run under TCG)")


@pytest.fixture(autouse=True, scope="session")
def stdin_is_devnull() -> None:
    """Commands started by tests inherit /dev/null, never the runner's stdin: kp-* commands read
    records from a piped stdin, and a CI runner's pipe that never closes would block them."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)


@pytest.fixture(autouse=True)
def kp_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    dirs = {
        "state": tmp_path / "state",
        "cache": tmp_path / "cache",
        "config": tmp_path / "config",
        "runtime": tmp_path / "run",
        "home": tmp_path / "home",
    }
    dirs["home"].mkdir()
    for key in ("state", "cache", "config", "runtime"):
        monkeypatch.setenv(f"KODEPIPE_{key.upper()}_DIR", str(dirs[key]))
    monkeypatch.setenv("HOME", str(dirs["home"]))
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("KODEPIPE_PYTHON", sys.executable)
    return dirs


def make_image(name: str = "base", *, size: str = "1G", image_id: str = "0123456789ab",
               created: str = "2026-01-01T00:00:00Z", state: str = "ready") -> Path:
    """A golden image folder with a real (blank) qcow2 disk and stand-in kernel files."""
    folder = Path(os.environ["KODEPIPE_STATE_DIR"]) / "images" / name
    folder.mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(folder / "disk.qcow2"), size], check=True)
    (folder / "vmlinuz").write_bytes(b"kernel")
    (folder / "initrd.img").write_bytes(b"initrd")
    meta = {"kind": "image", "name": name, "id": image_id, "created": created, "state": state,
            "disk": "disk.qcow2", "kernel": "vmlinuz", "initrd": "initrd.img"}
    (folder / "meta.json").write_bytes(orjson.dumps(meta))
    return folder


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root with its content, except lock files (they are never removed)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "locks" not in p.parts}


def processes_with(*words: bytes) -> list[int]:
    """Pids of the processes whose argv holds every one of ``words`` (kodepipe's detached keepers)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if all(word in argv for word in words):
            found.append(int(pid))
    return found


def lines(text: str | bytes) -> list[Record]:
    return [orjson.loads(line) for line in (text.splitlines() if text else [])]


def kp(prog: str, *args: str, input: str | bytes | None = None, check: bool = False,
       env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """Run a kp-* command from bin/ in a real process."""
    data = input.encode() if isinstance(input, str) else input
    proc = subprocess.run([str(BIN / prog), *args], input=data, capture_output=True, timeout=timeout,
                          env=env, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{prog} {args} exited {proc.returncode}: {proc.stderr.decode()}")
    return proc

