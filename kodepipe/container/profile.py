"""kp-run profiles: an image and the defaults for one agent, defined as data files.

A profile is a folder NAME/ (NAME hostname-safe, as for VMs) holding:

``Containerfile``
    Built with ``podman build --pull=never --build-arg BASE=localhost/kodepipe-base:SUITE``
    (the image kp-image base makes), so it starts with ``ARG BASE`` and
    ``FROM ${BASE}``.  Nothing is pulled from a registry.  The image runs
    as uid/gid 1000 (the base's "agent" user) with HOME=/tmp/home on a
    read-only root: install tools system-wide, not into a home directory.
``profile.json`` (optional; every key optional)
    ``description``  str          one line for listings
    ``command``      [str, ...]   what runs when kp-run is given no command (default ["bash"])
    ``memory``       str          memory limit, e.g. "2g" (a number with b, k, m or g)
    ``cpus``         number       CPUs, e.g. 2 or 0.5
    ``pids``         int          process/thread limit
    ``time``         str          wall-clock limit: 90s, 30m, 2h, 1d, 1h30m
    ``allow``        [str, ...]   domain names the agent needs to reach (for an egress proxy)
    ``env``          [str, ...]   names of host environment variables passed in when set
    ``credentials``  [str, ...]   credentials the agent can use without holding them (kp-run --credential):
                                  each is used when its source is set up on the host, and the
                                  agent gets a per-run token and the proxy's endpoint instead
    ``tty``          bool         the command is interactive: give it a terminal when there is one
    ``notes``        str          anything a person should know
  Unknown keys are refused, so a typo does not silently lose a limit.
any other files
    that the Containerfile COPYs.  They are part of the build context and
    of the image's hash.

The built-in profiles live in kodepipe/container/profiles/ (shell, claude, aider,
codex, gemini, copilot, opencode).  The agent profiles declare their credentials (kept on the host,
see kp-run --credential) and bring the agent's own permission settings as data, in their folder:
claude's managed-settings.json and gemini's system-defaults.json (no reading .env files or ~/.ssh
where the agent supports it, no git push, no rm -rf), opencode's opencode.json, copilot's
--deny-tool options in its command.  A profile of your own changes them.
A user's profile in ``$KODEPIPE_CONFIG_DIR/profiles/NAME/``
(~/.config/kodepipe/profiles/NAME/) replaces the built-in one of that name
as a whole (no merging).

The image of a profile is ``localhost/kodepipe-NAME:HASH``, where HASH (12
hex digits) covers every file of the folder (names, modes, contents) and the
base image's id: editing a profile, or rebuilding the base, makes a new
image on next use, and an unchanged profile is never rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kodepipe.core import paths
from kodepipe.core.errors import BadInput
from kodepipe.core.records import NAME_RE, check_name


class Output(Protocol):
    """What building a profile's image tells the person watching (kodepipe.commands.cli.Output is one)."""

    verbose: bool
    quiet: bool

    def progress(self, message: str) -> None: ...

BUILTIN_DIR = Path(__file__).resolve().parent / "profiles"
CONTAINERFILE = "Containerfile"
DEFAULTS_FILE = "profile.json"
REPO_PREFIX = "localhost/kodepipe-"

DEFAULTS: dict[str, Any] = {
    "description": "",
    "command": ["bash"],
    "memory": "2g",
    "cpus": 2,
    "pids": 512,
    "time": "2h",
    "allow": [],
    "env": [],
    "credentials": [],
    "tty": False,
    "notes": "",
}

MEMORY_RE = re.compile(r"[1-9][0-9]*[bkmg]?", re.IGNORECASE)
ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
CREDENTIAL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
DOMAIN_RE = re.compile(r"(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}")
# files of a profile folder that do not go into its hash (editor and Python droppings)
IGNORED = re.compile(r"(__pycache__|.*~|\..*\.sw[a-p]|\.DS_Store)")


@dataclass(frozen=True)
class Profile:
    name: str
    folder: Path
    containerfile: Path
    builtin: bool  # False: the user's, from the config dir
    digest: str  # sha256 of the folder's files, hex
    description: str
    command: tuple[str, ...]
    memory: str
    cpus: float
    pids: int
    time: str
    allow: tuple[str, ...]
    env: tuple[str, ...]
    tty: bool
    notes: str
    credentials: tuple[str, ...] = ()

    @property
    def repo(self) -> str:
        return REPO_PREFIX + self.name

    @property
    def time_seconds(self) -> float:
        from kodepipe.core.units import parse_duration

        return parse_duration(self.time)

    def tag(self, base_id: str) -> str:
        """The image tag of this profile built on the base image ``base_id``."""
        key = hashlib.sha256(f"{self.digest} {base_id}".encode()).hexdigest()
        return f"{self.repo}:{key[:12]}"

    def defaults(self) -> dict[str, Any]:
        """The profile.json keys with their values (defaults filled in), e.g. for a record."""
        return {"description": self.description, "command": list(self.command), "memory": self.memory,
                "cpus": self.cpus, "pids": self.pids, "time": self.time, "allow": list(self.allow),
                "env": list(self.env), "credentials": list(self.credentials), "tty": self.tty, "notes": self.notes}


# --------------------------------------------------------------------------- finding profiles

def user_dir() -> Path:
    return paths.config_dir() / "profiles"


def _names_in(folder: Path) -> set[str]:
    try:
        entries = os.listdir(folder)
    except OSError:
        return set()
    return {e for e in entries if NAME_RE.fullmatch(e) and (folder / e).is_dir()}


def names() -> list[str]:
    """Every profile name, built-in and the user's, sorted."""
    return sorted(_names_in(BUILTIN_DIR) | _names_in(user_dir()))


def find(name: str) -> tuple[Path, bool]:
    """(folder, is built-in) of profile ``name``; the user's wins over a built-in one."""
    check_name(name, "profile name")
    user = user_dir() / name
    if user.is_dir():
        return user, False
    builtin = BUILTIN_DIR / name
    if builtin.is_dir():
        return builtin, True
    known = ", ".join(names()) or "none"
    raise BadInput(f"no profile named {name!r} (known: {known})", code="unknown_profile",
                   hint=f"add your own as {user_dir() / name}/Containerfile")


# --------------------------------------------------------------------------- loading

def load(name: str) -> Profile:
    """The profile ``name``, checked; BadInput says what is wrong and in which file."""
    folder, builtin = find(name)
    containerfile = folder / CONTAINERFILE
    if not containerfile.is_file():
        raise BadInput(f"profile {name}: {containerfile} is missing", code="bad_profile",
                       hint="a profile folder needs a Containerfile that starts with ARG BASE and FROM ${BASE}")
    values = dict(DEFAULTS)
    values.update(_read_defaults(folder / DEFAULTS_FILE))
    return Profile(
        name=name, folder=folder, containerfile=containerfile, builtin=builtin, digest=digest(folder),
        description=values["description"], command=tuple(values["command"]), memory=values["memory"],
        cpus=values["cpus"], pids=values["pids"], time=values["time"], allow=tuple(values["allow"]),
        env=tuple(values["env"]), tty=values["tty"], notes=values["notes"], credentials=tuple(values["credentials"]))


def _read_defaults(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read {path}: {exc}", code="bad_profile") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput(f"{path}: line {exc.lineno}, column {exc.colno}: {exc.msg}", code="bad_profile") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path}: expected a JSON object, got {type(data).__name__}", code="bad_profile")
    return check_defaults(data, str(path))


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def check_defaults(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Return ``data`` if every key is known and well-typed, else raise BadInput naming ``source``."""

    def bad(key: str, expected: str) -> BadInput:
        return BadInput(f"{source}: {key!r} must be {expected}, not {json.dumps(data[key])[:80]}",
                        code="bad_profile")

    unknown = sorted(set(data) - set(DEFAULTS))
    if unknown:
        raise BadInput(f"{source}: unknown key {unknown[0]!r}", code="bad_profile",
                       hint=f"the keys are {', '.join(DEFAULTS)}")
    for key, value in data.items():
        if key in ("description", "notes") and not isinstance(value, str):
            raise bad(key, "a string")
        if key == "command" and not (_strings(value) and value and all(value)):
            raise bad(key, 'a non-empty list of non-empty strings, e.g. ["bash"]')
        if key == "memory" and not (isinstance(value, str) and MEMORY_RE.fullmatch(value)):
            raise bad(key, 'a size such as "2g" or "512m"')
        if key == "cpus" and not (isinstance(value, int | float) and not isinstance(value, bool)
                                  and 0 < value <= 1024):
            raise bad(key, "a positive number such as 2 or 0.5")
        if key == "pids" and not (isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 4194304):
            raise bad(key, "a positive whole number such as 512")
        if key == "time":
            if not isinstance(value, str):
                raise bad(key, 'a duration such as "2h" or "1h30m"')
            from kodepipe.core.units import parse_duration

            try:
                seconds = parse_duration(value)
            except BadInput:
                raise bad(key, 'a duration such as "2h" or "1h30m"') from None
            if seconds <= 0:
                raise bad(key, "a positive duration")
        if key == "allow" and not (_strings(value) and all(DOMAIN_RE.fullmatch(v) for v in value)):
            raise bad(key, 'a list of lower-case domain names, e.g. ["api.example.com"]')
        if key == "env" and not (_strings(value) and all(ENV_RE.fullmatch(v) for v in value)):
            raise bad(key, 'a list of environment variable names, e.g. ["API_KEY"]')
        if key == "credentials" and not (_strings(value) and all(CREDENTIAL_RE.fullmatch(v) for v in value)):
            raise bad(key, 'a list of credential names, e.g. ["anthropic"]')
        if key == "tty" and not isinstance(value, bool):
            raise bad(key, "true or false")
    return data


def digest(folder: Path) -> str:
    """sha256 over every file below ``folder``: relative path, executable bit and contents
    (a symlink by its target, which is not followed)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not IGNORED.fullmatch(d))
        for filename in sorted(filenames):
            if IGNORED.fullmatch(filename):
                continue
            path = Path(dirpath, filename)
            rel = path.relative_to(folder).as_posix()
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                kind, data = b"link", os.readlink(path).encode()
            elif stat.S_ISREG(info.st_mode):
                kind = b"exec" if info.st_mode & 0o111 else b"file"
                data = path.read_bytes()
            else:
                continue
            h.update(b"%s %d %s\0" % (kind, len(data), rel.encode()))
            h.update(data)
    return h.hexdigest()


# --------------------------------------------------------------------------- the image

def ensure_image(profile: Profile, out: Output, *, suite: str | None = None) -> str:
    """The tag of the profile's image, built first if it is missing; returns at once when it exists.

    Builds the base image too when that is missing (needs root).  Build
    output goes to stderr when ``out`` is verbose, else to a log in the
    cache dir whose tail is shown if the build fails.  A per-profile lock
    keeps two commands from building the same profile at once: the second
    waits and then uses the first one's image.
    """
    from kodepipe.container import images as containerimage

    base = containerimage.ensure_base(suite, progress=out.progress)
    tag = profile.tag(str(base["image_id"]))
    if containerimage.exists(tag):
        return tag
    with containerimage.build_lock(f"profile.{profile.name}", out.progress, tag):
        if containerimage.exists(tag):  # built by another command while we waited
            return tag
        log = containerimage.log_path(f"profile-{profile.name}")
        log.write_bytes(b"")
        out.progress(f"building the {profile.name} profile's image {tag} (log: {log})")
        labels = {f"{containerimage.LABEL}.kind": "profile", f"{containerimage.LABEL}.profile": profile.name,
                  f"{containerimage.LABEL}.base": str(base["name"])}
        record = containerimage.build(profile.containerfile, profile.folder, tag,
                                      build_args={"BASE": str(base["name"])}, labels=labels, log=log,
                                      echo=out.verbose and not out.quiet)
        for old in containerimage.remove_older(profile.repo, keep=tag):
            out.progress(f"removed the outdated image {old}")
        out.progress(f"{tag} is ready ({_mb(record.get('size'))})")
    return tag


def _mb(size: object) -> str:
    return f"{size / 1e6:.0f} MB" if isinstance(size, int) else "size unknown"
