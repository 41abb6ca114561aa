"""Finding a booted VM's addresses and SSH endpoint through its guest agent."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kodepipe.core.errors import KpError, Timeout
from kodepipe.core.records import Record
from kodepipe.core.state import Store, now_iso
from kodepipe.vm import lifecycle, qemu, vms
from kodepipe.vm.sshkeys import fingerprint, parse_public_key

HOST_KEY = "/etc/ssh/ssh_host_ed25519_key.pub"
SERIAL_TAIL = 20


def interfaces(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """guest-network-get-interfaces, without loopback, as compact records."""
    found = []
    for iface in raw:
        name = iface.get("name", "")
        if name == "lo":
            continue
        ips = iface.get("ip-addresses") or []
        found.append({
            "interface": name,
            "mac": iface.get("hardware-address"),
            "ipv4": [f"{a['ip-address']}/{a.get('prefix')}" for a in ips if a.get("ip-address-type") == "ipv4"],
            "ipv6": [f"{a['ip-address']}/{a.get('prefix')}" for a in ips
                     if a.get("ip-address-type") == "ipv6" and not a["ip-address"].startswith("fe80")],
        })
    return found


def first_ipv4(found: list[dict[str, Any]]) -> str | None:
    for iface in found:
        for address in iface["ipv4"]:
            return str(address.split("/")[0])
    return None


def serial_tail(boot: dict[str, Any], lines: int = SERIAL_TAIL) -> str:
    from kodepipe.vm import seriallog

    log = boot.get("serial_log")
    if not isinstance(log, str) or not seriallog.files(Path(log)):
        return "(no serial log)"
    data = seriallog.tail(Path(log), 16384)  # the guest's last words, however much it printed (read bounded)
    text = data.decode("utf-8", "replace").replace("\r", "")
    return "\n".join(text.rstrip().splitlines()[-lines:]) or "(the serial log is empty: the kernel printed nothing)"


def ssh_banner(host: str, port: int, timeout: float = 3.0) -> bool:
    """True when an SSH server answers with its banner (a forwarded port alone is not enough:
    user-mode networking accepts the connection before the guest's sshd exists).

    The probe says its own version first, as every SSH client does: passt (0.0~git20230309) does
    not complete a forwarded connection's handshake with the guest until the host side sends
    something, so a client that only waits for the server's banner would wait forever."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.settimeout(timeout)
            conn.sendall(b"SSH-2.0-kodepipe_probe\r\n")
            return conn.recv(8).startswith(b"SSH-")
    except OSError:
        return False


def find(store: Store, name: str, *, timeout: float, expect_id: str | None = None) -> Record:
    """Wait for the guest agent of running VM ``name``; return its addresses and SSH endpoint."""
    from kodepipe.vm.guest_agent import wait_for_agent

    started = time.monotonic()
    deadline = started + timeout
    folder, meta = lifecycle.vm_meta(store, name, expect_id)
    boot = meta.get("boot")
    problem = vms.unusable(vms.view(store, name))
    if problem is not None or not isinstance(boot, dict):
        raise problem or KpError(f"{name} is not running", code="not_running", hint=f"kp-boot {name}")

    def stuck() -> KpError | None:
        """Frozen or suspended since: nothing in the guest can answer, and waiting longer will not help."""
        live = qemu.live(boot, name, busy=lambda: store.lock_held(name))
        if live.state in ("running", "crashed", "stopped"):
            return None
        return vms.unusable({"name": name, **live.fields()})

    def alive() -> bool:
        if not qemu.is_alive(boot):
            return False
        problem = stuck()
        if problem is not None:
            raise problem
        return True

    def timed_out(what: str) -> KpError:
        problem = stuck()
        if problem is not None:
            return problem
        hint = "the guest may still be booting: try a longer --timeout"
        if boot.get("accel") == "kvm":
            hint += "; if KVM is broken on this host (nested virtualisation), boot with --accel tcg"
        return Timeout(f"{name}: {what} within {timeout:g} s (accelerator {boot.get('accel')}); "
                       f"the serial console's last lines:\n{serial_tail(boot)}", hint=hint)

    try:
        agent = wait_for_agent(Path(boot["sockets"]["qga"]), timeout, alive=alive)
        agent.deadline = deadline  # every later call of the session ends by the --timeout too
    except Timeout:
        raise timed_out("the guest agent did not answer") from None
    try:
        with agent:
            found, host_key = _ask_agent(agent, name, boot, deadline, timed_out)
            if not boot.get("set_up"):  # once per boot: a second kp-ip asks the agent for nothing more
                _set_up(agent, name, store, folder, meta, boot, deadline)
    except KpError as exc:
        # an agent that stops answering halfway: if the VM froze under us, say that
        problem = stuck() if exc.code not in ("frozen", "suspended") else None
        if problem is not None:
            raise problem from None
        raise
    ssh = boot.get("ssh")
    if ssh is None and first_ipv4(found) and boot.get("net", "").startswith("bridge:"):
        ssh = {"host": first_ipv4(found), "port": 22, "user": vms_user(store, meta)}
    if ssh is not None:
        while not ssh_banner(ssh["host"], ssh["port"]):
            if time.monotonic() > deadline:
                raise timed_out(f"SSH on {ssh['host']}:{ssh['port']} did not answer")
            time.sleep(0.5)
        known = folder / "known_hosts"
        host = ssh["host"] if ssh["port"] == 22 else f"[{ssh['host']}]:{ssh['port']}"
        known.write_text(f"{host} {' '.join(host_key.split()[:2])}\n")
    with store.lock(name):
        meta = store.read_meta(folder) or meta
        if isinstance(meta.get("boot"), dict):
            meta["boot"].update(addresses=found, address=first_ipv4(found), address_source="guest-agent",
                                host_key=fingerprint(host_key), ssh=ssh,
                                known_hosts=str(folder / "known_hosts") if ssh else None,
                                waited_seconds=round(time.monotonic() - started, 1),
                                ready=now_iso(), set_up=True)
            store.write_meta(folder, meta)
    return vms.view(store, name)


def _ask_agent(agent: Any, name: str, boot: dict[str, Any], deadline: float,
               timed_out: Callable[[str], KpError]) -> tuple[list[dict[str, Any]], str]:
    """The guest's addresses and SSH host key, through its agent (and its shared folder mounted)."""
    found = interfaces(agent.interfaces())
    while first_ipv4(found) is None and boot.get("net") != "none":
        # the agent can start before DHCP has answered
        if time.monotonic() > deadline:
            raise timed_out("the guest got no IPv4 address")
        time.sleep(0.5)
        found = interfaces(agent.interfaces())
    host_key = None
    while host_key is None:
        try:
            host_key = parse_public_key(agent.read_file(HOST_KEY).decode("utf-8", "replace"), HOST_KEY)
        except KpError as exc:
            if exc.code == "guest_agent_bad_reply":
                raise  # a broken or hostile agent: waiting will not make its replies valid
            # made by kp-ssh-hostkey.service early in boot; the agent can be quicker
            if time.monotonic() > deadline:
                raise timed_out(f"the guest made no SSH host key ({HOST_KEY})") from None
            time.sleep(0.5)
    if boot.get("share"):
        status, _, err = agent.exec(["/bin/sh", "-c", "mkdir -p /workspace && (mountpoint -q /workspace || "
                                     "mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 "
                                     "workspace /workspace)"], timeout=30)
        if status != 0:
            raise KpError(f"{name}: mounting the shared directory failed: {err.decode(errors='replace')}",
                          code="share_failed")
    return found, host_key


# kp-boot --allow: the guest's programs find the proxy (the environment, read by PAM for SSH and su
# sessions: curl, git, pip, npm; apt's own configuration; sudo keeps the variables).  Written at each
# kp-ip, and taken away when the VM boots open again.  Each file is kodepipe's alone.
_PROXY_SCRIPT = r"""
set -eu
env=/etc/environment
touch "$env"
grep -v '^#kodepipe-proxy$' "$env" | grep -Ev '^(http_proxy|https_proxy|no_proxy|HTTP_PROXY|HTTPS_PROXY|NO_PROXY)=' \
    > "$env.kp-new" || true
rm -f /etc/apt/apt.conf.d/80kodepipe-proxy /etc/sudoers.d/kodepipe-proxy
if [ -n "$1" ]; then
    {
        echo '#kodepipe-proxy'
        for v in http_proxy https_proxy HTTP_PROXY HTTPS_PROXY; do echo "$v=$1"; done
        echo 'no_proxy=localhost,127.0.0.1,::1'; echo 'NO_PROXY=localhost,127.0.0.1,::1'
    } >> "$env.kp-new"
    printf 'Acquire::http::Proxy "%s";\nAcquire::https::Proxy "%s";\n' "$1" "$1" \
        > /etc/apt/apt.conf.d/80kodepipe-proxy
    if [ -d /etc/sudoers.d ]; then
        echo 'Defaults env_keep += "http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY"' \
            > /etc/sudoers.d/kodepipe-proxy
        chmod 0440 /etc/sudoers.d/kodepipe-proxy
    fi
fi
chmod 0644 "$env.kp-new"
mv "$env.kp-new" "$env"
"""


# The clone's own key replaces the key kodepipe's images share (kodepipe.vm.sshkeys.make_vm_key); the
# user's own keys (kp-image --ssh-key) stay.  Written at each kp-ip: a guest that lost it gets it again.
_AUTHORIZE_SCRIPT = r"""
set -eu
home=$(getent passwd "$1" | cut -d: -f6)
[ -n "$home" ] || { echo "no user $1 in the guest" >&2; exit 1; }
mkdir -p "$home/.ssh"
keys="$home/.ssh/authorized_keys"
{ [ ! -f "$keys" ] || grep -vF -e "$3" -e "$4" "$keys" || true; echo "$2"; } > "$keys.kp-new"
chown "$1:" "$home/.ssh" "$keys.kp-new"
chmod 0700 "$home/.ssh"
chmod 0600 "$keys.kp-new"
mv "$keys.kp-new" "$keys"
"""


# A data disk (kp-boot --disk): found by its virtio serial, given an ext4 file system if it has none
# (its first use), and mounted.  kp-boot checked the mount point; the guest's root could have put
# anything there since, which is the guest's own affair.
_MOUNT_SCRIPT = r"""
set -eu
dev=/dev/disk/by-id/virtio-$1
i=0
while [ ! -b "$dev" ]; do i=$((i + 1)); [ $i -lt 100 ] || { echo "no disk $dev" >&2; exit 1; }; sleep 0.1; done
if ! blkid "$dev" >/dev/null 2>&1; then mkfs.ext4 -q -L "$3" "$dev"; fi
mkdir -p "$2"
mountpoint -q "$2" || mount "$dev" "$2"
"""


# A preset's packages: those the guest lacks, installed by apt through the guest's own network (its
# egress proxy when it is sealed: apt's configuration names it).
_INSTALL_SCRIPT = r"""
set -eu
missing=""
for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing="$missing $p"
done
[ -n "$missing" ] || exit 0
export DEBIAN_FRONTEND=noninteractive
err=$(mktemp)
apt-get -q update >/dev/null 2>"$err" || { tail -5 "$err" >&2; exit 1; }
apt-get -q -y --no-install-recommends install $missing >/dev/null 2>"$err" || { tail -5 "$err" >&2; exit 1; }
"""


def _install(agent: Any, name: str, packages: list[str], deadline: float) -> None:
    """Install the preset's packages the guest does not have (apt, through its network)."""
    left = max(deadline - time.monotonic(), 30.0)
    status, _, err = agent.exec(["/bin/sh", "-c", _INSTALL_SCRIPT, "kp-packages", *packages], timeout=left)
    if status != 0:
        raise KpError(f"{name}: installing {' '.join(packages)} failed: {err.decode(errors='replace')[-600:]}",
                      code="packages_failed", hint="the preset's network must reach the Debian mirror (an "
                      "allowlist needs deb.debian.org), or build the packages into the image (kp-image --packages)")


def _mount_disk(agent: Any, name: str, disk: object) -> None:
    """Mount one data disk in the guest, formatting it on first use."""
    if not isinstance(disk, dict):
        return
    status, _, err = agent.exec(["/bin/sh", "-c", _MOUNT_SCRIPT, "kp-disk", str(disk.get("serial")),
                                 str(disk.get("mountpoint")), str(disk.get("name"))[:16]], timeout=120)
    if status != 0:
        raise KpError(f"{name}: mounting disk {disk.get('name')} failed: {err.decode(errors='replace')[-400:]}",
                      code="disk_failed")


def _authorize(agent: Any, name: str, folder: Path, meta: dict[str, Any], user: str) -> None:
    """Authorize the clone's own SSH key in the guest, in place of kodepipe's shared key."""
    from kodepipe.vm import sshkeys

    key = meta.get("ssh_key")
    if not isinstance(key, dict) or key.get("file") != sshkeys.VM_KEY:
        return  # a clone made before clones had keys of their own: kodepipe's shared key it is
    own = sshkeys.read_public_key(folder / (sshkeys.VM_KEY + ".pub"))
    shared = sshkeys.own_key()[1]
    status, _, err = agent.exec(["/bin/sh", "-c", _AUTHORIZE_SCRIPT, "kp-authorize", user, own,
                                 shared.split()[1], own.split()[1]], timeout=30)
    if status != 0:
        raise KpError(f"{name}: authorizing its SSH key in the guest failed: {err.decode(errors='replace')[-400:]}",
                      code="ssh_key_failed")


def _proxy_settings(agent: Any, name: str, egress: object) -> None:
    """Point the guest's programs at its egress proxy (kp-boot --allow), or at nothing."""
    proxy = str(egress.get("proxy") or "") if isinstance(egress, dict) else ""
    status, _, err = agent.exec(["/bin/sh", "-c", _PROXY_SCRIPT, "kp-proxy", proxy], timeout=30)
    if status != 0:
        raise KpError(f"{name}: setting up the guest's proxy failed: {err.decode(errors='replace')[-400:]}",
                      code="proxy_settings_failed")


def _set_up(agent: Any, name: str, store: Store, folder: Path, meta: dict[str, Any], boot: dict[str, Any],
            deadline: float) -> None:
    """What kp-ip does in the guest once per boot, through the agent: the clone's own SSH key, the proxy
    settings (or their removal), the data disks, the preset's packages."""
    if boot.get("ssh") is not None or boot.get("net", "").startswith("bridge:"):
        _authorize(agent, name, folder, meta, vms_user(store, meta))
    if boot.get("net") == "user" and (boot.get("egress") or meta.get("guest_proxy")):
        _proxy_settings(agent, name, boot.get("egress"))
        with store.lock(name):  # an open boot after a sealed one takes the settings away
            latest = store.read_meta(folder) or meta
            latest["guest_proxy"] = bool(boot.get("egress"))
            store.write_meta(folder, latest)
            meta.update(guest_proxy=latest["guest_proxy"])
    for disk in boot.get("disks") or ():
        _mount_disk(agent, name, disk)
    if boot.get("packages"):
        _install(agent, name, [str(p) for p in boot["packages"]], deadline)


def vms_user(store: Store, meta: dict[str, Any]) -> str:
    from kodepipe.vm import images

    return str(images.view(store, meta["base"]).get("user", "kp"))

