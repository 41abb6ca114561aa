"""Per-namespace kernel limits of a container's user namespace, set from the host.

The ucount limits under /proc/sys/user (max_inotify_instances,
max_inotify_watches, max_user_namespaces, ...) exist once per user namespace,
and a process sees and writes those of the namespace it is in, and only with
CAP_SYS_RESOURCE there (user_namespaces(7)).  The agent has no capability, so
it can only read them; host root, the namespace's owner, enters it with
nsenter (which becomes root of the namespace, with every capability in it)
and lowers them after Podman made the container and before the agent's
first instruction runs.  sandbox.Quotas says which values.
"""

from __future__ import annotations

import re

from kodepipe.core import proc
from kodepipe.core.errors import KpError

_NAME = re.compile(r"[a-z_]+")


def script(values: dict[str, int]) -> str:
    """The shell commands that write ``values`` (names under /proc/sys/user) and read them back."""
    parts = []
    for name, value in values.items():
        if not _NAME.fullmatch(name) or not isinstance(value, int) or value < 0:
            raise ValueError(f"not a user-namespace limit: {name}={value!r}")
        path = f"/proc/sys/user/{name}"
        parts.append(f"echo {value} > {path} && test \"$(cat {path})\" = {value}")
    return " && ".join(parts) or "true"


def limit(pid: int, values: dict[str, int]) -> None:
    """Set ``values`` in the user namespace of process ``pid`` (a container's first process,
    waiting to start); KpError if the kernel refused one: the run must not start without them."""
    try:
        proc.run(["nsenter", "--user", "--target", str(pid), "--", "/bin/sh", "-c", script(values)],
                 timeout=30)
    except KpError as exc:
        raise KpError(f"could not set the kernel quotas of the container's user namespace: {exc.message}",
                      code="command_failed") from None
