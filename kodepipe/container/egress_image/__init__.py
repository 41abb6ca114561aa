"""The egress proxy's container image, localhost/kodepipe-egress, built locally with no registry.

``kp-run --emit kube --allow ...`` hands the agent's traffic to a Deployment of this image, which
runs ``python3 -m kodepipe.egress.serve``.  It is built FROM the local base image (kp-image base)
with the Containerfile beside this file, in a build context made here::

    Containerfile
    app/kodepipe/__init__.py, core/, egress/    what the proxy imports of kodepipe
    app/orjson/, app/dns/, their .dist-info/    the files of the Python distributions it imports,
                                                copied from the installation running this code

The Python packages are the ones already installed beside kodepipe (its virtualenv), so the build
needs no Python index and no network beyond the Debian mirror that gives python3, and the image gets
the versions kodepipe was tested with.  Compiled modules (orjson) fit one Python version only: the
build imports everything and fails with a message naming both versions when the base image's python3
is not the one kodepipe runs on.

The tag is ``localhost/kodepipe-egress:HASH`` (12 hex digits of a sha256 over every file of the context
and the base image's id), then also ``:latest``, the default of kp-run --proxy-image: an unchanged
kodepipe is never rebuilt, and any change to the proxy's code or packages makes a new image.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from kodepipe.container import images
from kodepipe.core import paths, proc
from kodepipe.core.errors import NotFound
from kodepipe.core.records import Record
from kodepipe.core.state import remove_tree

REPO = "localhost/kodepipe-egress"
LATEST = f"{REPO}:latest"
CONTAINERFILE = Path(__file__).resolve().parent / "Containerfile"
# what the proxy's entrypoint imports at run time, by distribution name (their requirements come too)
DISTRIBUTIONS = ("orjson", "dnspython")
# the parts of the kodepipe package the proxy imports (kodepipe.egress.serve, proxy, policy, credentials, ...)
KODEPIPE_PARTS = ("__init__.py", "core", "egress")
# files that never go into the context (editor and Python droppings)
IGNORED = re.compile(r"(__pycache__|.*\.py[co]|.*~|\..*\.sw[a-p]|\.DS_Store)")
LOCK = "egress-image"

Source = tuple[str, Path]  # (path in the context, file on this host)


# --------------------------------------------------------------------------- what goes in

def _tree(root: Path, prefix: str) -> list[Source]:
    """Every regular file below ``root`` (or ``root`` itself), as context paths under ``prefix``."""
    if root.is_file():
        return [(prefix, root)]
    found: list[Source] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not IGNORED.fullmatch(d))
        for filename in sorted(filenames):
            path = Path(dirpath, filename)
            if not IGNORED.fullmatch(filename) and stat.S_ISREG(path.lstat().st_mode):
                found.append((f"{prefix}/{path.relative_to(root).as_posix()}", path))
    return found


def kodepipe_sources() -> list[Source]:
    """The files of the installed kodepipe package that the proxy needs, under app/kodepipe/."""
    import kodepipe

    package = Path(kodepipe.__file__).resolve().parent
    return [source for part in KODEPIPE_PARTS for source in _tree(package / part, f"app/kodepipe/{part}")]


def _requirements(dist: importlib.metadata.Distribution) -> list[str]:
    """The names of the distributions ``dist`` needs unconditionally (not those of its extras)."""
    names = []
    for requirement in dist.requires or []:
        marker = requirement.partition(";")[2]
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
        if match and "extra" not in marker:
            names.append(match.group(1))
    return names


def distribution_sources(names: Iterable[str] = DISTRIBUTIONS) -> list[Source]:
    """The installed files of the distributions ``names`` and of what they require, under app/.

    Files outside the distribution's site-packages (console scripts in bin/) and byte code are
    left out: the build compiles the sources again for the image's python3.
    """
    pending, seen, found = list(names), set(), []
    while pending:
        name = pending.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise NotFound(f"the Python package {name}, which the egress proxy imports, is not installed "
                           f"for {sys.executable}",
                           hint="install kodepipe with its dependencies (./setup) and run kp-image egress from it") \
                from None
        if dist.files is None:
            raise NotFound(f"the installed Python package {name} lists none of its files (no RECORD)",
                           hint=f"reinstall it: {sys.executable} -m pip install --force-reinstall {name}")
        for file in dist.files:
            parts = file.parts
            if ".." in parts or file.is_absolute() or any(IGNORED.fullmatch(p) for p in parts):
                continue
            path = Path(str(dist.locate_file(file)))
            if path.is_file() and not path.is_symlink():
                found.append((f"app/{file.as_posix()}", path))
        pending.extend(_requirements(dist))
    return sorted(found)


def context_sources() -> list[Source]:
    return [("Containerfile", CONTAINERFILE), *kodepipe_sources(), *distribution_sources()]


def digest(sources: Iterable[Source], base_id: str) -> str:
    """sha256 over each file (context path, executable bit, contents) and the base image's id."""
    h = hashlib.sha256(f"base {base_id}\0".encode())
    for rel, path in sorted(sources):
        data = path.read_bytes()
        kind = b"exec" if path.stat().st_mode & 0o111 else b"file"
        h.update(b"%s %d %s\0" % (kind, len(data), rel.encode()))
        h.update(data)
    return h.hexdigest()


def tag_of(sources: Iterable[Source], base_id: str) -> str:
    return f"{REPO}:{digest(sources, base_id)[:12]}"


def write_context(sources: Iterable[Source], context: Path) -> None:
    """Copy the files into ``context``, readable by all (the image runs as 65534, and the build
    keeps the context's modes): folders 0755, files 0644 or 0755."""
    context.chmod(0o755)
    for rel, path in sources:
        target = context / rel
        for parent in reversed(target.relative_to(context).parents[:-1]):
            folder = context / parent
            if not folder.is_dir():
                folder.mkdir()
                folder.chmod(0o755)
        shutil.copyfile(path, target)
        target.chmod(0o755 if path.stat().st_mode & 0o111 else 0o644)


# --------------------------------------------------------------------------- the image

def ensure(suite: str | None = None, *, progress: images.Progress = images._quiet, echo: bool = False) -> Record:
    """The container-image record of localhost/kodepipe-egress:HASH, built first when missing, and
    tagged :latest.  The base image is built first when it is missing (root).  A new base image
    (kp-image base --rebuild: Debian's newer python3) or another kodepipe makes another HASH.

    Two commands never build it at once: the second waits for the first and then uses its image.
    """
    proc.require("podman")
    base = images.ensure_base(suite, progress=progress)
    sources = context_sources()
    tag = tag_of(sources, str(base["image_id"]))
    if images.exists(tag):
        return _tagged_latest(tag)
    with images.build_lock(LOCK, progress, tag):
        if images.exists(tag):  # another command built it while we waited
            return _tagged_latest(tag)
        return _build(sources, tag, base, progress, echo)


def _build(sources: list[Source], tag: str, base: Record, progress: images.Progress, echo: bool) -> Record:
    started = time.monotonic()
    log = images.log_path("kodepipe-egress")
    log.write_bytes(b"")
    scratch = paths.cache_dir() / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    for stale in scratch.glob("egress-*"):  # what a SIGKILLed build left behind (we hold the lock)
        remove_tree(stale)
    context = Path(tempfile.mkdtemp(prefix="egress-", dir=scratch))
    try:
        write_context(sources, context)
        progress(f"building the egress proxy's image {tag} on {base['name']} (log: {log})")
        labels = {f"{images.LABEL}.kind": "egress", f"{images.LABEL}.base": str(base["name"])}
        if isinstance(base.get("suite"), str):
            labels[f"{images.LABEL}.suite"] = str(base["suite"])
        python = f"{sys.version_info.major}.{sys.version_info.minor}"
        images.build(context / "Containerfile", context, tag,
                     build_args={"BASE": str(base["name"]), "HOST_PYTHON": python}, labels=labels, log=log,
                     echo=echo)
    finally:
        remove_tree(context)
    for outdated in images.remove_older(REPO, keep=tag):  # older builds, and :latest, which moves to this one
        if outdated != LATEST:
            progress(f"removed the outdated image {outdated}")
    record = _tagged_latest(tag)
    record["build_seconds"] = round(time.monotonic() - started, 1)
    return record


def _tagged_latest(tag: str) -> Record:
    """Point :latest at ``tag`` (kp-run --proxy-image's default) and return ``tag``'s record."""
    proc.run(["podman", "tag", tag, LATEST], timeout=images.PODMAN_TIMEOUT)
    info = images.inspect(tag)
    if info is None:
        raise NotFound(f"the image {tag} is gone", hint="run kp-image egress again")
    return images.image_record(tag, info)
