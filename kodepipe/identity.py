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

from kodepipe.errors import KpError

if TYPE_CHECKING:
    from kodepipe.guest_agent import GuestAgent

# $1 hostname, $2 MAC.  Runs as root in the guest.
RESEED = r"""
set -eu
name=$1 mac=$2
# the host's fresh random bytes (on stdin) are mixed into the kernel pool first,
# so nothing below draws on the RNG state every clone shares
dd of=/dev/urandom bs=64 count=1 status=none
cat /proc/sys/kernel/random/uuid | tr -d '-' > /etc/machine-id
hostname "$name"
echo "$name" > /etc/hostname
sed -i "s/^127\.0\.1\.1\s.*/127.0.1.1\t$name/" /etc/hosts
rm -f /etc/ssh/ssh_host_*
ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key
systemctl restart ssh.service
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


def reseed(agent: GuestAgent, name: str, mac: str | None) -> float:
    """Set the clock and a fresh identity; return the seconds it took."""
    started = time.monotonic()
    agent.set_time(time.time_ns())
    status, _, err = agent.exec(["/bin/sh", "-c", RESEED, "reseed", name, mac or ""], input=os.urandom(64), timeout=60)
    if status != 0:
        raise KpError(f"{name}: giving the resumed VM its own identity failed: "
                      f"{err.decode('utf-8', 'replace').strip()}", code="reseed_failed")
    return time.monotonic() - started
