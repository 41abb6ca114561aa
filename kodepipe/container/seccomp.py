"""kodepipe's seccomp profile: Podman's default, minus new namespaces, untraced
children and the kernel keyring.

Podman's default profile lets an unprivileged process create a user
namespace, and inside it mount filesystems (measured: ``unshare -Urm sh -c
'mount -t tmpfs none /mnt'`` succeeds in a container with every capability
dropped).  That is kernel attack surface an agent never needs.  This profile
is the system's own containers seccomp.json with:

- ``unshare`` and ``setns`` refused (EPERM);
- ``clone`` allowed only without any CLONE_NEW* flag, and refused (EPERM) with
  CLONE_UNTRACED: a child made with it is not followed by ``strace -f``, so it
  would run outside ``kp-run --audit``'s record (measured: its execs were
  missing from the log);
- ``clone3`` answered with ENOSYS, so the C library falls back to ``clone``
  (whose flags seccomp can see; clone3 passes them in memory, out of reach);
- ``keyctl``, ``add_key`` and ``request_key`` answered with ENOSYS, as by a
  kernel without keys: the kernel keyring is not namespaced, and its quota
  (kernel.keys.maxkeys, 200 keys) belongs to the host uid the agent runs as,
  the invoking user (measured: a container holding 198 keyrings left that
  user unable to create one).

Forks, vfork, posix_spawn (CLONE_VM|CLONE_VFORK), threads, job control and
subprocesses still work.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import orjson

from kodepipe.core.errors import MissingProgram

SYSTEM_PROFILE = Path("/usr/share/containers/seccomp.json")
# CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET|NEWTIME... as one mask
CLONE_NEW_MASK = 0x7E020080
CLONE_UNTRACED = 0x00800000
ENOSYS = 38
EPERM = 1
KEYRING = ("keyctl", "add_key", "request_key")
REMOVED = {"unshare", "setns", "clone", "clone3", *KEYRING}


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
    # the two clone rules never both match (libseccomp does not promise which of two
    # matching rules wins): flags with CLONE_UNTRACED get EPERM; flags with neither it nor a
    # CLONE_NEW* bit are allowed; the rest (CLONE_NEW*) get the base's default action
    rules += [
        {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 0, "value": CLONE_NEW_MASK | CLONE_UNTRACED, "valueTwo": 0,
                   "op": "SCMP_CMP_MASKED_EQ"}]},
        {"names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM,
         "args": [{"index": 0, "value": CLONE_UNTRACED, "valueTwo": CLONE_UNTRACED, "op": "SCMP_CMP_MASKED_EQ"}]},
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS},
        {"names": ["unshare", "setns"], "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM},
        {"names": list(KEYRING), "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS},
    ]
    profile["syscalls"] = rules
    return profile


def render(base_text: bytes) -> bytes:
    return orjson.dumps(derive(orjson.loads(base_text)), option=orjson.OPT_INDENT_2)


def planned(folder: Path, system_profile: Path = SYSTEM_PROFILE) -> tuple[Path, bytes]:
    """The derived profile's path in ``folder`` (one per base version) and its text; reads only."""
    try:
        base = system_profile.read_bytes()
    except FileNotFoundError:
        raise MissingProgram(f"{system_profile} is missing: kp-run derives its seccomp profile from it",
                             hint="apt-get install golang-github-containers-common (it comes with podman)") from None
    text = render(base)
    return folder / f"seccomp-{hashlib.sha256(text).hexdigest()[:12]}.json", text


def ensure(folder: Path, system_profile: Path = SYSTEM_PROFILE) -> Path:
    """Write the derived profile into ``folder`` (once per base version) and return its path."""
    path, text = planned(folder, system_profile)
    return write(path, text)


def write(path: Path, text: bytes) -> Path:
    """The profile ``planned`` said, written at its path unless it is there already."""
    folder = path.parent
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(text)
        tmp.rename(path)
    return path
