"""Local container images, with no registry: the base image and builds on it.

The base image is a trimmed ``debootstrap --variant=minbase`` of the Debian
suite apt is configured with, imported into Podman's store::

    debootstrap (private mount + pid namespace) -> ROOTFS -> trim
    tar --numeric-owner -C ROOTFS -c . | podman import - localhost/kodepipe-base:SUITE

It has a passwd entry ``agent`` (uid and gid 1000, home /tmp/home) for the
fixed uid kp-run runs agents as, so tools that call getpwuid() work.  The
kp-run profiles (kodepipe.container.profile) are ``podman build``s FROM it.

Every image made here carries labels (``io.kodepipe.kind`` = base or
profile, ...), so whatever lists or prunes kodepipe's images can find them.
All Podman calls go through the podman CLI and kodepipe.core.proc.  Builds are
logged to the cache dir (logs/), and the log's tail is shown on failure.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from kodepipe.container.policy import AGENT_UID
from kodepipe.core import paths, proc
from kodepipe.core.errors import BadInput, Busy, CommandFailed, KpError, NoPermission, NotFound, Timeout
from kodepipe.core.records import Record
from kodepipe.core.state import Store, remove_tree

BASE_REPO = "localhost/kodepipe-base"
KIND = "container-image"
LABEL = "io.kodepipe"  # label prefix: io.kodepipe.kind, io.kodepipe.suite, ...

# The agent's uid/gid in every image (kp-run runs as --user AGENT_UID:AGENT_UID, the policy's).
AGENT_USER = "agent"
AGENT_HOME = "/tmp/home"
# CA certificates the host trusts locally (a TLS-intercepting proxy's, a company's)
LOCAL_CAS = Path("/usr/local/share/ca-certificates")

IMPORT_TIMEOUT = 900.0
BUILD_TIMEOUT = 3600.0
PODMAN_TIMEOUT = 120.0
# How long a second builder waits for the first (a cold build of a big profile takes minutes).
BUILD_LOCK_WAIT = BUILD_TIMEOUT

SUITE_RE = re.compile(r"[a-z][a-z0-9.-]*")
MIRROR_RE = re.compile(r"(https?|file|ftp)://\S+")
# what may follow "localhost/" in a tag kodepipe builds
TAG_RE = re.compile(r"localhost/[a-z0-9][a-z0-9._-]*:[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")

Progress = Callable[[str], None]


def _quiet(message: str) -> None:
    pass


# --------------------------------------------------------------------------- names and paths

def base_tag(suite: str) -> str:
    return f"{BASE_REPO}:{suite}"


def log_path(name: str) -> Path:
    """The build log for ``name`` in the cache dir (one per target, rewritten by each build)."""
    logs = paths.cache_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return logs / f"{name}.log"


def default_suite() -> str:
    """The suite apt is configured with; failing that (not a Debian host), that of the newest
    base image already in the store; failing that, the error that says to pass --suite."""
    from kodepipe.host.debian import detect_mirror

    try:
        return detect_mirror()[1]
    except KpError:
        suites = base_suites()
        if suites:
            return suites[0]
        raise


# --------------------------------------------------------------------------- podman queries

def _podman(*args: str, timeout: float = PODMAN_TIMEOUT) -> bytes:
    return proc.run(["podman", *args], timeout=timeout).stdout


def inspect(tag: str) -> dict[str, Any] | None:
    """Podman's description of the image ``tag``, or None when there is no such image."""
    try:
        data = _podman("image", "inspect", "--format", "json", tag)
    except CommandFailed as exc:
        if re.search(r"image not known|no such image|failed to find image", str(exc), re.IGNORECASE):
            return None
        raise
    found = orjson.loads(data)
    if not isinstance(found, list) or not found or not isinstance(found[0], dict):
        return None
    info: dict[str, Any] = found[0]
    return info


def exists(tag: str) -> bool:
    try:
        proc.run(["podman", "image", "exists", tag], timeout=PODMAN_TIMEOUT)
    except CommandFailed as exc:
        if "exited with status 1:" in str(exc):
            return False
        raise
    return True


def _iso(created: object) -> str | None:
    """Podman's RFC 3339 time (nanoseconds, any offset) as kodepipe's YYYY-MM-DDTHH:MM:SSZ."""
    if not isinstance(created, str):
        return None
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.\d+)?(Z|[+-]\d\d:\d\d)", created.strip())
    if match is None:
        return None
    offset = "+00:00" if match.group(2) == "Z" else match.group(2)
    when = datetime.datetime.fromisoformat(match.group(1) + offset)
    return when.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def image_record(tag: str, info: dict[str, Any]) -> Record:
    """The container-image record of ``tag`` from podman's inspect output."""
    record: Record = {"kind": KIND, "name": tag, "image_id": info.get("Id"), "size": info.get("Size"),
                      "created": _iso(info.get("Created"))}
    labels = info.get("Labels") or (info.get("Config") or {}).get("Labels") or {}
    for key in ("suite", "mirror", "profile"):
        value = labels.get(f"{LABEL}.{key}") if isinstance(labels, dict) else None
        if isinstance(value, str):
            record[key] = value
    return record


def base_suites() -> list[str]:
    """Suites of the base images in the store, newest first."""
    out = _podman("images", "--filter", f"reference={BASE_REPO}", "--format", "json")
    images = orjson.loads(out) if out.strip() else []
    found: list[tuple[int, str]] = []
    for image in images if isinstance(images, list) else []:
        for name in image.get("Names") or []:
            if isinstance(name, str) and name.startswith(BASE_REPO + ":"):
                found.append((int(image.get("Created") or 0), name.split(":", 1)[1]))
    return [suite for _, suite in sorted(found, reverse=True)]


def remove_older(repo: str, keep: str) -> list[str]:
    """Untag and remove the other images of ``repo`` (older builds of one profile), best effort:
    an image a container still uses, or that other images build on, stays."""
    out = _podman("images", "--filter", f"reference={repo}", "--format", "{{.Repository}}:{{.Tag}}")
    removed = []
    for tag in out.decode().split():
        if tag != keep and tag.startswith(repo + ":"):
            with contextlib.suppress(KpError):
                _podman("rmi", tag)
                removed.append(tag)
    return removed


# --------------------------------------------------------------------------- locking

@contextlib.contextmanager
def build_lock(name: str, progress: Progress, what: str) -> Iterator[None]:
    """Hold the build lock ``name``, saying so when another build holds it first."""
    store = Store()
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(store.lock(name, wait=0.0))
        except Busy:
            progress(f"waiting for another kodepipe command that is building {what}")
            stack.enter_context(store.lock(name, wait=BUILD_LOCK_WAIT))
        yield


# --------------------------------------------------------------------------- running podman with a log

def _run_logged(argv: Sequence[str | Path], log: Path, *, echo: bool, timeout: float,
                stdin: Any = proc.DEVNULL) -> proc.Completed[bytes]:
    """Run a program with its output appended to ``log`` (and copied to stderr when ``echo``);
    raise CommandFailed (with the log's tail) or Timeout."""
    args = [str(a) for a in argv]
    with open(log, "ab") as logf:
        logf.write(f"$ {' '.join(args)}\n".encode())
        logf.flush()
        child = proc.spawn(args, stdin=stdin, stdout=proc.PIPE, stderr=proc.STDOUT)
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            child.kill()

        timer = threading.Timer(timeout, expire)
        timer.start()
        try:
            for line in child.stdout or ():
                logf.write(line)
                logf.flush()
                if echo:
                    sys.stderr.write(line.decode("utf-8", "replace"))
                    sys.stderr.flush()
            returncode = child.wait()
        except BaseException:
            child.kill()
            child.wait()
            raise
        finally:
            timer.cancel()
    if expired.is_set():
        raise Timeout(f"{Path(args[0]).name} {args[1]} did not finish within {timeout:g} s", hint=f"see {log}")
    if returncode != 0:
        raise CommandFailed(f"{' '.join(args)} exited with status {returncode}:\n{_log_tail(log)}")
    return proc.Completed(args, returncode)


def _log_tail(log: Path, lines: int = 15) -> str:
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
            return proc.tail(f.read(), lines)
    except OSError:
        return ""


# --------------------------------------------------------------------------- the base image

def _trim(rootfs: Path) -> None:
    """Drop what only the build needed: downloaded .debs, apt lists and caches, logs, temp files,
    and the host's DNS settings that debootstrap copied in (Podman provides its own)."""
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*",
                    "tmp/*", "var/tmp/*", "var/log/apt/*", "var/log/dpkg.log", "var/log/bootstrap.log",
                    "var/log/alternatives.log", "var/cache/debconf/*-old", "var/lib/dpkg/*-old"):
        for path in rootfs.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                remove_tree(path)
            else:
                path.unlink(missing_ok=True)
    for name in ("etc/resolv.conf", "etc/hostname"):
        target = rootfs / name
        if target.is_symlink() or target.exists():
            target.unlink()
            target.write_text("")


def _add_agent_user(rootfs: Path) -> None:
    """An ``agent`` entry for uid/gid 1000 (home /tmp/home, which kp-run makes on a tmpfs);
    written directly, as useradd would, so no chroot is needed."""
    etc = rootfs / "etc"
    entries = {
        "passwd": f"{AGENT_USER}:x:{AGENT_UID}:{AGENT_UID}:kodepipe agent:{AGENT_HOME}:/bin/bash",
        "group": f"{AGENT_USER}:x:{AGENT_UID}:",
        "shadow": f"{AGENT_USER}:*:19000:0:99999:7:::",
        "gshadow": f"{AGENT_USER}:!::",
    }
    for name, line in entries.items():
        path = etc / name
        text = path.read_text() if path.exists() else ""
        fields = [ln.split(":") for ln in text.splitlines()]
        if any(f[0] == AGENT_USER for f in fields) or (name in ("passwd", "group") and any(
                len(f) > 2 and f[2] == str(AGENT_UID) for f in fields)):
            raise KpError(f"the {name} file of the base image already has {AGENT_USER} or id {AGENT_UID}")
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
        path.write_text(text + ("" if text.endswith("\n") or not text else "\n") + line + "\n")
        path.chmod(mode)


def _copy_local_cas(rootfs: Path, source: Path = LOCAL_CAS) -> list[str]:
    """Copy the CA certificates this host trusts locally (Debian's /usr/local/share/ca-certificates)
    into the rootfs, so that TLS through a proxy the host trusts works in the images too:
    update-ca-certificates adds them to the bundle when a profile installs ca-certificates."""
    try:
        found = sorted(p for p in source.iterdir() if p.suffix == ".crt" and p.is_file())
    except OSError:
        return []
    target = rootfs / "usr/local/share/ca-certificates"
    target.mkdir(parents=True, exist_ok=True)
    copied = []
    for cert in found:
        data = cert.read_bytes()
        if b"-----BEGIN CERTIFICATE-----" not in data:
            continue
        (target / cert.name).write_bytes(data)
        (target / cert.name).chmod(0o644)
        copied.append(cert.name)
    return copied


def _import(rootfs: Path, tag: str, changes: Sequence[str], log: Path, timeout: float) -> None:
    """tar --numeric-owner -C ROOTFS -c . | podman import --change ... - TAG"""
    argv = ["podman", "import", "--quiet"]
    for change in changes:
        argv += ["--change", change]
    argv += ["-", tag]
    with open(log, "ab") as logf:
        logf.write(f"$ tar --numeric-owner -C {rootfs} -c . |\n".encode())
        logf.flush()
        tar = proc.spawn(["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."], stdout=proc.PIPE,
                         stderr=logf)
    try:
        try:
            _run_logged(argv, log, echo=False, timeout=timeout, stdin=tar.stdout)
        finally:
            if tar.stdout is not None:
                tar.stdout.close()
        # podman has read all of tar's output by now
        status = tar.wait(timeout=60)
    except BaseException:
        tar.kill()
        tar.wait()
        raise
    if status != 0:
        raise CommandFailed(f"tar of {rootfs} exited with status {status}:\n{_log_tail(log)}")


def _check_suite_and_mirror(suite: str, mirror: str | None) -> None:
    if not SUITE_RE.fullmatch(suite):
        raise BadInput(f"bad suite {suite!r}", hint="pass a Debian suite such as --suite bookworm")
    if mirror is not None and not MIRROR_RE.fullmatch(mirror):
        raise BadInput(f"bad mirror URL {mirror!r}", hint="pass --mirror http://deb.debian.org/debian "
                       "or a local mirror")


def ensure_base(suite: str | None = None, mirror: str | None = None, *, rebuild: bool = False,
                progress: Progress = _quiet) -> Record:
    """The container-image record of localhost/kodepipe-base:SUITE, built first when missing
    (or when ``rebuild``).  Suite and mirror default to those apt is configured with.

    Building needs root (debootstrap) and takes about a minute with a warm
    .deb cache; the temporary rootfs lives under the cache dir and is always
    removed.  Two commands never build the same base at once: the second
    waits for the first and then uses its image.
    """
    proc.require("podman")
    if suite is None:
        suite = default_suite()
    _check_suite_and_mirror(suite, mirror)
    tag = base_tag(suite)
    if not rebuild:
        info = inspect(tag)
        if info is not None:
            return image_record(tag, info)
    for program in ("debootstrap", "unshare", "tar"):
        proc.require(program)
    if os.geteuid() != 0:
        raise NoPermission(f"building the container base image {tag} needs root (debootstrap)",
                           hint=f"run 'sudo kp-image base'; with rootless Podman, copy it into your store "
                           f"after that: sudo podman save {tag} | podman load")
    with build_lock(f"base.{suite}", progress, tag):
        if not rebuild:
            info = inspect(tag)
            if info is not None:  # another command built it while we waited
                return image_record(tag, info)
        if mirror is None:
            from kodepipe.host.debian import detect_mirror

            mirror = detect_mirror()[0]
        return _build_base(suite, mirror, tag, progress)


def _build_base(suite: str, mirror: str, tag: str, progress: Progress) -> Record:
    from kodepipe.host import debian

    started = time.monotonic()
    log = log_path(f"kodepipe-base-{suite}")
    log.write_bytes(b"")
    scratch = paths.cache_dir() / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    # what a SIGKILLed build of this suite left behind (we hold the suite's lock)
    for stale in scratch.glob(f"base-{suite}-*"):
        remove_tree(stale, mount_wait=debian.MOUNT_WAIT)
    old = inspect(tag)
    rootfs = Path(tempfile.mkdtemp(prefix=f"base-{suite}-", dir=scratch))
    try:
        rootfs.chmod(0o755)
        progress(f"debootstrap of Debian {suite} from {mirror} (log: {log})")
        debian.debootstrap(suite, mirror, rootfs, log=log, cache_dir=paths.cache_dir() / "debs")
        _trim(rootfs)
        _add_agent_user(rootfs)
        cas = _copy_local_cas(rootfs)
        if cas:
            progress(f"adding the host's local CA certificates: {', '.join(cas)}")
        progress(f"importing it into Podman as {tag}")
        changes = ['CMD ["/bin/bash"]', "ENV LANG=C.UTF-8", f"LABEL {LABEL}.kind=base",
                   f"LABEL {LABEL}.suite={suite}", f"LABEL {LABEL}.mirror={mirror}"]
        try:
            _import(rootfs, tag, changes, log, IMPORT_TIMEOUT)
        except CommandFailed as exc:
            raise KpError(f"importing the base image {tag} failed: {exc}", code="import_failed",
                          hint=f"full log: {log}") from exc
    finally:
        remove_tree(rootfs, mount_wait=debian.MOUNT_WAIT)
    info = inspect(tag)
    if info is None:
        raise KpError(f"podman import did not leave an image {tag}", hint=f"full log: {log}")
    if old is not None and old.get("Id") != info.get("Id"):
        # the replaced base, now untagged; it stays while profile images still build on it
        with contextlib.suppress(KpError):
            _podman("rmi", str(old.get("Id")))
    record = image_record(tag, info)
    record["build_seconds"] = round(time.monotonic() - started, 1)
    return record


# --------------------------------------------------------------------------- builds on the base

def build(containerfile: Path, context: Path, tag: str, *, build_args: dict[str, str],
          labels: dict[str, str], log: Path, echo: bool, timeout: float = BUILD_TIMEOUT) -> Record:
    """podman build --pull=never of ``containerfile`` in ``context`` as ``tag``; returns its record.

    Output goes to ``log`` (and to stderr as well when ``echo``); a failure
    raises KpError carrying the log's tail.  Never pulls: every FROM must
    name a local image.
    """
    if not TAG_RE.fullmatch(tag):
        raise BadInput(f"bad image tag {tag!r}")
    argv: list[str | Path] = ["podman", "build", "--pull=never", "-f", containerfile, "-t", tag]
    for key, value in build_args.items():
        argv += ["--build-arg", f"{key}={value}"]
    for key, value in labels.items():
        argv += ["--label", f"{key}={value}"]
    argv.append(context)
    try:
        _run_logged(argv, log, echo=echo, timeout=timeout)
    except CommandFailed as exc:
        text = _log_tail(log, 25)
        hint = f"full log: {log}"
        if re.search(r"Failed to fetch|Temporary failure resolving|Could not resolve|ENOTFOUND|EAI_AGAIN|"
                     r"Network is unreachable|ConnectionError", text):
            hint = f"the build could not download something: check the network; {hint}"
        elif re.search(r"pull policy is \"?never\"?|image not known", text):
            hint = f"a FROM names an image that is not in the local store (nothing is pulled); {hint}"
        raise KpError(f"building {tag} from {containerfile} failed:\n{text}", code="image_build_failed",
                      hint=hint) from exc
    info = inspect(tag)
    if info is None:
        raise NotFound(f"podman build did not leave an image {tag}", hint=f"full log: {log}")
    return image_record(tag, info)
