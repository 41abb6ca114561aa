"""Debian on the host: which archive apt uses, and debootstrap into a directory.  Both the golden VM
image (kodepipe.vm.imagebuild) and the container base image (kodepipe.container.images) start here."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from kodepipe.core import proc
from kodepipe.core.errors import CommandFailed, KpError

DEBOOTSTRAP_TIMEOUT = 3600.0
MOUNT_WAIT = 5.0  # how long removing a tree waits for a mount in it to go away


# --------------------------------------------------------------------------- mirror detection

def _is_debian_archive(uri: str, suite: str) -> bool:
    # The main archive only: security/updates/backports need the main one anyway,
    # and other vendors' repositories cannot be debootstrapped as Debian.
    if "/" in suite or re.search(r"-(security|updates|backports|proposed-updates)$", suite) \
            or suite.endswith("proposed-updates"):
        return False
    parts = uri.rstrip("/").split("/")
    if any(p in ("debian-security", "debian-ports", "debian-debug") for p in parts):
        return False
    # deb.debian.org/debian, ftp.XX.debian.org/debian, any local mirror at .../debian,
    # snapshot.debian.org/archive/debian/<date>
    return "debian" in parts[3:] or (len(parts) > 2 and parts[2].endswith(".debian.org")
                                     and "debian" in parts)


def _one_line_sources(text: str) -> Iterator[tuple[str, str]]:
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        line = re.sub(r"\[[^]]*\]", " ", line)  # [arch=amd64 signed-by=...] options
        words = line.split()
        if len(words) >= 3 and words[0] == "deb":
            yield words[1], words[2]


def _deb822_sources(text: str) -> Iterator[tuple[str, str]]:
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and key is not None:  # continuation line
                fields[key] += " " + line.strip()
                continue
            if ":" in line:
                key, value = line.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        for uri in fields.get("uris", "").split():
            for suite in fields.get("suites", "").split():
                yield uri, suite


def detect_mirror(sources_dir: Path = Path("/etc/apt")) -> tuple[str, str]:
    """(mirror_url, suite) of the first Debian main archive apt is configured with
    (both one-line sources.list/*.list and deb822 *.sources files); skip -security and -updates
    suites and non-Debian repos; raise KpError with a hint (--mirror/--suite) if none."""
    files = [sources_dir / "sources.list"]
    listdir = sources_dir / "sources.list.d"
    if listdir.is_dir():
        # apt reads sources.list first, then sources.list.d in name order
        files += sorted(p for p in listdir.iterdir() if p.suffix in (".list", ".sources"))
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        entries = _deb822_sources(text) if path.suffix == ".sources" else _one_line_sources(text)
        for uri, suite in entries:
            if _is_debian_archive(uri, suite):
                return uri.rstrip("/"), suite
    raise KpError(f"no Debian archive found in the apt sources under {sources_dir}",
                  code="no_mirror", hint="name one with --mirror URL --suite SUITE "
                  "(e.g. --mirror http://deb.debian.org/debian --suite bookworm)")


# --------------------------------------------------------------------------- debootstrap

def debootstrap(suite: str, mirror: str, rootfs: Path, *, log: Path, cache_dir: Path | None,
                include: Sequence[str] = ()) -> None:
    """debootstrap --variant=minbase of ``suite`` from ``mirror`` into ``rootfs``.

    It runs in a private mount and pid namespace, so its mounts and any stray
    process vanish with it even if kodepipe is SIGKILLed.  The .debs are kept
    in ``cache_dir``/debootstrap for the next build.  Output goes to ``log``;
    a failure becomes a KpError whose code and hint say what to do
    (bad_suite, mirror_unreachable, debootstrap_failed).
    """
    argv = ["debootstrap", "--variant=minbase"]
    if include:
        argv.append(f"--include={','.join(include)}")
    if cache_dir is not None:
        (cache_dir / "debootstrap").mkdir(parents=True, exist_ok=True)
        argv.append(f"--cache-dir={cache_dir / 'debootstrap'}")
    argv += [suite, str(rootfs), mirror]
    try:
        proc.run(["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child",
                  "--", *argv], log=log, timeout=DEBOOTSTRAP_TIMEOUT)
    except CommandFailed as exc:
        text = str(exc)
        if "No such script" in text:
            raise KpError(f"debootstrap does not know the suite {suite!r}", code="bad_suite",
                          hint="pass a suite this debootstrap supports with --suite, "
                          "or upgrade debootstrap") from exc
        if re.search(r"Failed getting release file|Couldn't download|Could not resolve|"
                     r"Connection refused|Release signed by unknown key|Invalid Release", text):
            raise KpError(f"could not download suite {suite} from the mirror {mirror}:\n{text}",
                          code="mirror_unreachable",
                          hint="check the network, or pass a reachable Debian mirror with --mirror "
                          "and an existing suite with --suite") from exc
        raise KpError(f"debootstrap of {suite} from {mirror} failed: {text}",
                      code="debootstrap_failed", hint=f"see the full log in {log}") from exc
