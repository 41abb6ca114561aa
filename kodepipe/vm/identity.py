"""Giving a VM resumed from a shared warm state an identity of its own.

Every clone of a warm image wakes up as a copy of the same machine: same
hostname, machine-id, SSH host key, MAC, kernel RNG state and a clock that
stopped when the state was saved.  This runs at once after the resume,
through the guest agent, before anything else can use the VM.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from kodepipe.core.errors import KpError

if TYPE_CHECKING:
    from kodepipe.vm.guest_agent import GuestAgent

# $1 hostname, $2 MAC (or ""), $3 the host's clock, $4 fresh host randomness (hex),
# $5 the new public host key, $6 the new machine-id (made on the host); the private key comes
# on stdin.  Runs as root in the guest, in one guest-exec: under TCG every extra process costs a
# few tenths of a second.
RESEED = r"""
set -eu
name=$1 mac=$2 now=$3 noise=$4 pub=$5 machine_id=$6
date -u -s "@$now" >/dev/null
# mixed into the kernel's input pool, then the kernel's generator reseeded from it (RNDRESEEDCRNG):
# a write alone is not drawn on until the next periodic reseed, and until then every clone's
# generator gives the same bytes as the others' (two clones once drew the same machine-id from it)
printf '%s' "$noise" > /dev/urandom
perl -e 'open(my $f, "<", "/dev/urandom") or exit; ioctl($f, 0x5207, 0)' 2>/dev/null || true
# the host's randomness, not the guest's, for what must differ between clones
printf '%s\n' "$machine_id" > /etc/machine-id
hostname "$name"
echo "$name" > /etc/hostname
sed -i "s/^127\.0\.1\.1\s.*/127.0.1.1\t$name/" /etc/hosts
umask 077
cat > /etc/ssh/ssh_host_ed25519_key.new
printf '%s\n' "$pub" > /etc/ssh/ssh_host_ed25519_key.pub.new
chmod 644 /etc/ssh/ssh_host_ed25519_key.pub.new
rm -f /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub
mv /etc/ssh/ssh_host_ed25519_key.new /etc/ssh/ssh_host_ed25519_key
mv /etc/ssh/ssh_host_ed25519_key.pub.new /etc/ssh/ssh_host_ed25519_key.pub
# SIGHUP makes sshd re-exec and load the new key; a restart costs seconds under TCG
if [ -s /run/sshd.pid ] && kill -HUP "$(cat /run/sshd.pid)" 2>/dev/null; then :; else systemctl restart ssh.service; fi
# on a shared bridge each clone needs its own MAC (and so its own lease); under
# user-mode networking the NIC is private and keeps the address hostfwd targets
if [ -n "$mac" ]; then
    for dev in /sys/class/net/*; do
        iface=${dev##*/}
        [ "$iface" = lo ] && continue
        ip link set dev "$iface" address "$mac"
        networkctl reconfigure "$iface" >/dev/null 2>&1 || true
        break
    done
fi
"""


def host_key() -> tuple[bytes, str]:
    """A new ed25519 host key made on the host (cryptography is fast; ssh-keygen under TCG is not)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public.decode() + " root@kodepipe"


def reseed(agent: GuestAgent, name: str, mac: str | None) -> float:
    """Set the clock and a fresh identity; return the seconds it took."""
    started = time.monotonic()
    private, public = host_key()
    now = f"{time.time():.6f}"
    argv = ["/bin/sh", "-c", RESEED, "reseed", name, mac or "", now, os.urandom(64).hex(), public,
            os.urandom(16).hex()]
    status, _, err = agent.exec(argv, input=private, timeout=60)
    if status != 0:
        raise KpError(f"{name}: giving the resumed VM its own identity failed: "
                      f"{err.decode('utf-8', 'replace').strip()}", code="reseed_failed")
    return time.monotonic() - started


# A pooled VM handed out under its user's name (kodepipe.vm.pool): the rest of its identity was its own
# from its resume.
HOSTS_LIMIT = 1 << 16  # /etc/hosts larger than this is not a pool member's own: refused


def renamed_hosts(text: str, name: str) -> str:
    """/etc/hosts with the host's own line (127.0.1.1, as Debian writes it) naming ``name``; every other
    line as it was, and a newline at the end."""
    lines = []
    for line in text.splitlines():
        if line.startswith("127.0.1.1") and line[9:10] in (" ", "\t"):
            line = f"127.0.1.1\t{name}"
        lines.append(line)
    return "".join(f"{line}\n" for line in lines)


def rename(agent: GuestAgent, name: str) -> float:
    """Give a running VM the hostname ``name``; return the seconds it took.

    Through the guest agent's own file calls, which start no program in the guest (under TCG a
    program started there costs tenths of a second): the kernel's hostname (/proc/sys/kernel/hostname
    is sethostname), /etc/hostname and /etc/hosts."""
    started = time.monotonic()
    try:
        agent.write_file("/proc/sys/kernel/hostname", f"{name}\n".encode(), timeout=30)
        agent.write_file("/etc/hostname", f"{name}\n".encode(), timeout=30)
        hosts = agent.read_file("/etc/hosts", limit=HOSTS_LIMIT, timeout=30)
        agent.write_file("/etc/hosts", renamed_hosts(hosts.decode("utf-8", "surrogateescape"), name)
                         .encode("utf-8", "surrogateescape"), timeout=30)
    except KpError as exc:
        raise KpError(f"{name}: setting the hostname failed: {exc.message}", code="rename_failed") from None
    return time.monotonic() - started
