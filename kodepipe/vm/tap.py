"""Tap devices for bridged VMs: made by kodepipe, one per VM, removed with it.

QEMU's own bridge helper is a setuid program that QEMU would have to
spawn, which its seccomp sandbox forbids; so kodepipe makes the tap (this
needs CAP_NET_ADMIN, i.e. root) and hands QEMU its name.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from kodepipe.core import proc
from kodepipe.core.errors import KpError, NoPermission


def tap_name(vm_id: str) -> str:
    # interface names are at most 15 bytes; "kp" marks the ones kodepipe owns
    return "kp" + hashlib.sha256(vm_id.encode()).hexdigest()[:10]


def create(bridge: str, vm_id: str) -> str:
    """A tap on ``bridge`` for the VM, up; returns its name."""
    if not (Path("/sys/class/net") / bridge / "bridge").is_dir():
        raise KpError(f"there is no bridge {bridge} on this host", code="no_bridge",
                      hint=f"create one (ip link add {bridge} type bridge) with DHCP on it (dnsmasq), "
                           "or use --net user")
    name = tap_name(vm_id)
    remove(name)  # a tap left by a crashed boot of the same VM
    try:
        proc.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"])
    except KpError as exc:
        if "Operation not permitted" in exc.message:
            raise NoPermission(f"creating a tap device on {bridge} needs root",
                               hint="run kp-boot with sudo, or use --net user") from None
        raise
    try:
        proc.run(["ip", "link", "set", "dev", name, "master", bridge])
        proc.run(["ip", "link", "set", "dev", name, "up"])
    except BaseException:
        remove(name)
        raise
    return name


def remove(name: str | None) -> None:
    if name and (Path("/sys/class/net") / name).exists():
        proc.run(["ip", "link", "del", "dev", name])
