"""VM presets: what kp-boot --preset NAME starts a VM with, as data.

A preset is a JSON object (kodepipe/vm/presets/NAME.json built in; the user's own in
$KODEPIPE_CONFIG_DIR/presets/NAME.json, which wins over a built-in of the same name):

- ``description``: one line;
- ``memory`` ("2G"), ``cpus`` (2);
- ``network``: ``open`` (--net user), ``none`` (no NIC) or ``allowlist`` (sealed behind the VM's egress
  proxy, with ``allow``: ["DOMAIN[:PORTS]", ...] and ``resolve``: ["NAME=ADDRESS", ...]);
- ``share``: a host directory to share, or ``false`` (none, and a --share widens the preset);
- ``disks``: ["NAME[:MOUNTPOINT]", ...], ``publish``: ["[HOSTADDR:]HOSTPORT:GUESTPORT", ...];
- ``packages``: Debian packages kp-ip installs in the guest (through its network) when missing.

kp-boot's flags override a preset's values, and its list flags (--allow, --resolve, --disk,
--publish) add to the preset's lists.  What a flag makes wider than the preset (a network more open,
a name or a pin not on its list, a share it has not, a published port) is recorded in the vm record's
``loosened``, as ``preset:WHAT``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from kodepipe.core.errors import BadInput, NotFound

KEYS = {"description", "memory", "cpus", "network", "allow", "resolve", "share", "disks", "publish", "packages"}
NETWORKS = ("open", "none", "allowlist")
_MEMORY_RE = re.compile(r"[1-9][0-9]*[MG]")
_PACKAGE_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+")
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
MAX_FILE = 1 << 20


@dataclass(frozen=True)
class Preset:
    name: str
    origin: str  # the file it came from
    description: str = ""
    memory: str | None = None
    cpus: int | None = None
    network: str = "open"
    allow: tuple[str, ...] = ()
    resolve: tuple[str, ...] = ()
    share: str | bool | None = None  # a path, False (none allowed), or None (none given)
    disks: tuple[str, ...] = ()
    publish: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()


def _strings(data: dict[str, Any], key: str, origin: str) -> tuple[str, ...]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise BadInput(f"preset {origin}: {key!r} must be a list of strings")
    return tuple(value)


def parse(data: object, name: str, origin: str) -> Preset:
    """A Preset from a JSON value, or BadInput naming ``origin`` and what is wrong.  Pure."""
    if not isinstance(data, dict):
        raise BadInput(f"preset {origin}: expected a JSON object")
    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise BadInput(f"preset {origin}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                       f"(known: {', '.join(sorted(KEYS))})")
    memory, cpus, network = data.get("memory"), data.get("cpus"), data.get("network", "open")
    if memory is not None and (not isinstance(memory, str) or not _MEMORY_RE.fullmatch(memory)):
        raise BadInput(f"preset {origin}: 'memory' must be a size with M or G, e.g. \"2G\"")
    if cpus is not None and (not isinstance(cpus, int) or isinstance(cpus, bool) or not 1 <= cpus <= 64):
        raise BadInput(f"preset {origin}: 'cpus' must be a number from 1 to 64")
    if network not in NETWORKS:
        raise BadInput(f"preset {origin}: 'network' must be one of {', '.join(NETWORKS)}")
    share = data.get("share")
    if share is not None and share is not False and not (isinstance(share, str) and share.startswith(("/", "~"))):
        raise BadInput(f"preset {origin}: 'share' must be an absolute path (or ~/...), or false")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise BadInput(f"preset {origin}: 'description' must be a string")
    allow, resolve = _strings(data, "allow", origin), _strings(data, "resolve", origin)
    if network == "allowlist" and not allow:
        raise BadInput(f"preset {origin}: an allowlist network needs 'allow' rules")
    if network != "allowlist" and (allow or resolve):
        raise BadInput(f"preset {origin}: 'allow' and 'resolve' are for network \"allowlist\"")
    packages = _strings(data, "packages", origin)
    bad = [p for p in packages if not _PACKAGE_RE.fullmatch(p)]
    if bad:
        raise BadInput(f"preset {origin}: not Debian package names: {', '.join(bad)}")
    if packages and network == "none":
        raise BadInput(f"preset {origin}: 'packages' are installed through the network, and this one has none")
    return Preset(name, origin, description, memory, cpus, network, allow, resolve,
                  share if isinstance(share, (str, bool)) else None, _strings(data, "disks", origin),
                  _strings(data, "publish", origin), packages)


def user_dir() -> Path:
    from kodepipe.core import paths

    return paths.config_dir() / "presets"


def names() -> list[str]:
    """Every preset's name, built-in and the user's."""
    found = {p.name.removesuffix(".json") for p in resources.files("kodepipe.vm").joinpath("presets").iterdir()
             if p.name.endswith(".json")}
    folder = user_dir()
    if folder.is_dir():
        found |= {p.stem for p in folder.glob("*.json") if _NAME_RE.fullmatch(p.stem)}
    return sorted(found)


def load(name: str) -> Preset:
    """The preset NAME: the user's own if there is one, else the built-in; NotFound or BadInput."""
    import orjson

    from kodepipe.core.errors import KpError
    from kodepipe.core.records import open_regular

    if not _NAME_RE.fullmatch(name):
        raise BadInput(f"--preset {name!r}: a preset's name is lower-case letters, digits, - and _")
    own = user_dir() / f"{name}.json"
    if own.exists() or own.is_symlink():
        try:  # a regular file, and at most 1 MiB of it
            with open_regular(str(own), "the preset") as handle:
                text = handle.read(MAX_FILE + 1)
        except KpError as exc:
            raise BadInput(f"preset {own}: {exc.message}") from None
        origin = str(own)
    else:
        builtin = resources.files("kodepipe.vm").joinpath("presets", f"{name}.json")
        if not builtin.is_file():
            raise NotFound(f"there is no preset {name}", code="not_found",
                           hint=f"the presets are: {', '.join(names())} (yours go in {user_dir()})")
        text, origin = builtin.read_bytes(), f"{name} (built in)"
    if len(text) > MAX_FILE:
        raise BadInput(f"preset {origin}: larger than 1 MiB")
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise BadInput(f"preset {origin}: not JSON ({exc})") from None
    return parse(data, name, origin)


def widenings(preset: Preset, *, network: str, allow: tuple[str, ...], resolve: tuple[str, ...],
              share: bool, publish: tuple[str, ...]) -> list[str]:
    """What the VM as booted has beyond ``preset``: each a ``loosened`` entry.  Pure."""
    wider: list[str] = []
    order = {"none": 0, "allowlist": 1, "open": 2}
    if order[network] > order[preset.network]:
        wider.append(f"preset:network:{network}")
    if network == "allowlist":
        wider += [f"preset:allow:{rule}" for rule in allow if rule not in preset.allow]
        wider += [f"preset:resolve:{pin}" for pin in resolve if pin not in preset.resolve]
    if share and preset.share is False:
        wider.append("preset:share")
    wider += [f"preset:publish:{each}" for each in publish if each not in preset.publish]
    return wider
