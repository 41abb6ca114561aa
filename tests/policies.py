"""Policies for the backends' unit tests, from the options they used to be requests of."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kodepipe.container import policy as pol


def policy(*, command: list[str] | tuple[str, ...] = ("true",), image: str = "x",
           limits: pol.Limits | None = None, workspace: Path | str | None = None,
           read_only_workspace: bool = False, quarantine: bool = False, writable_git_config: bool = False,
           secrets: list[tuple[Path, str]] | None = None, env: dict[str, str] | None = None,
           allow: list[str] | None = None, resolve: list[str] | None = None, audit: str | None = None,
           audit_cap: int = pol.AUDIT_CAP, cap_add: list[str] | None = None, **kw: Any) -> pol.Policy:
    """A Policy with these settings (as resolve would give them, without its checks)."""
    return pol.Policy(
        command=tuple(command), image=image,
        limits=limits or pol.Limits(memory=1 << 30, cpus=1.0, pids=64, seconds=0, tmpfs=1 << 28),
        workspace=None if workspace is None else str(workspace),
        workspace_mode="quarantine" if quarantine else "ro" if read_only_workspace else "rw",
        git_writable=writable_git_config,
        secrets=tuple(pol.SecretSpec(str(src), dest, str(src)) for src, dest in secrets or ()),
        env=tuple((env or {}).items()), cap_add=tuple(cap_add or ()),
        egress=pol.Egress(tuple(allow or ()), tuple(resolve or ())) if allow or resolve else None,
        audit=pol.Audit(audit, audit_cap) if audit else None, **kw)
