"""kodepipe's seccomp profile: Podman's default, minus new namespaces.

Podman's default profile lets an unprivileged process create a user
namespace, and inside it mount filesystems (measured: ``unshare -Urm sh -c
'mount -t tmpfs none /mnt'`` succeeds in a container with every capability
dropped).  That is kernel attack surface an agent never needs.  This profile
is the system's own containers seccomp.json with:

- ``unshare`` and ``setns`` refused (EPERM);
- ``clone`` allowed only without any CLONE_NEW* flag;
- ``clone3`` answered with ENOSYS, so the C library falls back to ``clone``
  (whose flags seccomp can see; clone3 passes them in memory, out of reach).

Forks, threads, job control and subprocesses still work.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import orjson

from kodepipe.errors import MissingProgram

SYSTEM_PROFILE = Path("/usr/share/containers/seccomp.json")
# CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET|NEWTIME... as one mask
CLONE_NEW_MASK = 0x7E020080
ENOSYS = 38
EPERM = 1
REMOVED = {"unshare", "setns", "clone", "clone3"}


def derive(base: dict[str, Any]) -> dict[str, Any]:
    """The kodepipe profile from a containers seccomp profile (not changed)."""
    profile = dict(base)
    rules = []
    for rule in base.get("syscalls", []):
        names = [n for n in rule.get("names", []) if n not in REMOVED]
        if rule.get("action") == "SCMP_ACT_ALLOW" and not rule.get("args") and names != rule.get("names", []):
            if names:
                rules.append({**rule, "names": names})
            continue
        if set(rule.get("names", [])) & REMOVED and rule.get("action") == "SCMP_ACT_ALLOW":
            continue  # conditional clone rules of the base: replaced below
        rules.append(rule)
    rules += [
        {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 0, "value": CLONE_NEW_MASK, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]},
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS},
        {"names": ["unshare", "setns"], "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM},
    ]
    profile["syscalls"] = rules
    return profile


def render(base_text: bytes) -> bytes:
    return orjson.dumps(derive(orjson.loads(base_text)), option=orjson.OPT_INDENT_2)


def ensure(folder: Path, system_profile: Path = SYSTEM_PROFILE) -> Path:
    """Write the derived profile into ``folder`` (once per base version) and return its path."""
    try:
        base = system_profile.read_bytes()
    except FileNotFoundError:
        raise MissingProgram(f"{system_profile} is missing: kp-run derives its seccomp profile from it",
                             hint="apt-get install golang-github-containers-common (it comes with podman)") from None
    text = render(base)
    path = folder / f"seccomp-{hashlib.sha256(text).hexdigest()[:12]}.json"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(text)
        tmp.rename(path)
    return path
