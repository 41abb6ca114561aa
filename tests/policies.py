"""Policies for the backends' unit tests, from the options they used to be requests of."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kodepipe.container import policy as pol
from kodepipe.container.sandbox import DEFAULT_QUOTAS


def policy(*, command: list[str] | tuple[str, ...] = ("true",), image: str | None = "x",
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


def sandbox(*, name: str = "run-1", image: str = "localhost/x:1", command: list[str] | None = None,
            workspace: str | None = "/w", host_uid: int = 1234, host_gid: int = 1235,
            limits: pol.Limits | None = None, seccomp: str | None = "/s.json", oci_runtime: str | None = "runc",
            network: str = "none", cap_add: list[str] | None = None, writable_root: bool = False,
            env: dict[str, str] | None = None, secrets: list[Any] | None = None, masks: list[str] | None = None,
            mask_file: str | None = None, read_only_workspace: bool = False, quotas: pol.Quotas | None = None,
            tty: bool = False, term: str | None = None, interactive: bool = False,
            extra_mounts: list[Any] | None = None, env_file: str | None = None) -> Any:
    """render() of the Policy, Facts and Staged that give a container with these settings."""
    from kodepipe.container import render

    p = policy(command=command or ["true"], image=image,
               limits=limits or pol.Limits(memory=512 << 20, cpus=1.5, pids=64, seconds=60, tmpfs=64 << 20),
               workspace=workspace, read_only_workspace=read_only_workspace, env=env, cap_add=cap_add,
               secrets=[(Path(s.origin), s.dest) for s in secrets or ()], network=network,
               writable_root=writable_root, tty=tty, term=term, interactive=interactive)
    facts = render.Facts(agent_uid=host_uid, agent_gid=host_gid, uid_from="test", workspace=workspace,
                         seccomp=seccomp, oci_runtime=oci_runtime, masked=tuple(masks or ()),
                         quotas=quotas or DEFAULT_QUOTAS)
    return render.render(p, facts, render.Staged(name=name, run_id="0123456789ab", secrets=tuple(secrets or ()),
                                                 mask_file=mask_file, extra_mounts=tuple(extra_mounts or ()),
                                                 env_file=env_file))
