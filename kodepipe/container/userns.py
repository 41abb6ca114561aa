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


def script(values: dict[str, int], folder: str = "/proc/sys/user") -> str:
    """The shell commands that write ``values`` (names under ``folder``) and read them all back with
    one cat (the shell's own read takes one byte, and a sysctl file ends for it after the first)."""
    writes, paths = [], []
    for name, value in values.items():
        if not _NAME.fullmatch(name) or not isinstance(value, int) or value < 0:
            raise ValueError(f"not a user-namespace limit: {name}={value!r}")
        path = f"{folder}/{name}"
        writes.append(f"echo {value} > {path}")
        paths.append(path)
    if not writes:
        return "true"
    expected = "\n".join(str(v) for v in values.values())
    return " && ".join(writes) + f' && test "$(cat {" ".join(paths)})" = "{expected}"'


def limit(pid: int, values: dict[str, int]) -> None:
    """Set ``values`` in the user namespace of process ``pid`` (a container's first process,
    waiting to start); KpError if the kernel refused one: the run must not start without them."""
    try:
        proc.run(["nsenter", "--user", "--target", str(pid), "--", "/bin/sh", "-c", script(values)],
                 timeout=30)
    except KpError as exc:
        raise KpError(f"could not set the kernel quotas of the container's user namespace: {exc.message}",
                      code="command_failed") from None
