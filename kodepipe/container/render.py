"""The one place a Policy becomes a container: ``render(policy, facts, staged) -> Sandbox``.

Pure: what the user asked for (policy.Policy), what a backend learned of the
machine that runs the container (Facts: uids, the seccomp profile's path, the
OCI runtime, the workspace as bound, the files to mask, the repositories to
bind read-only, the kernel quotas) and what its side effects produced
(Staged: the run's name and id, the secrets' copies, the empty mask file,
kodepipe's /etc/hosts and resolv.conf) in; a sandbox.Sandbox out, which says
the same thing as a libpod spec (the host) or as ``podman run`` arguments (a
VM, the benchmark).  No other module builds a Sandbox (tests/test_render.py
checks the source).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from kodepipe.container.policy import Policy, Quotas
from kodepipe.container.sandbox import DEFAULT_QUOTAS, Mount, Sandbox, Secret

# seconds after the time limit at which conmon kills the container even if kp-run (or SSH) is gone
BACKSTOP = 60


@dataclass(frozen=True)
class Facts:
    """What a backend learned of the machine that runs the container: read-only, nothing written."""

    agent_uid: int  # the uid and gid the agent's files belong to there (never root)
    agent_gid: int
    uid_from: str  # where they came from: sudo, user, workspace-owner, ssh-user, nobody
    workspace: str | None = None  # the real path bound at /workspace (in quarantine: the overlay's merged dir)
    seccomp: str | None = None  # the profile's path there
    oci_runtime: str | None = None  # None: the engine's default
    quotas: Quotas = DEFAULT_QUOTAS  # the run's share of the kernel's per-user quotas there
    masked: tuple[str, ...] = ()  # workspace-relative regular files that the policy's masks hide
    protect: tuple[str, ...] = ()  # repositories bound read-only onto themselves
    protect_sources: Mapping[str, str] = field(default_factory=dict)  # each one's bind source


@dataclass(frozen=True)
class Staged:
    """What the run's side effects produced, for the container to get."""

    name: str
    run_id: str
    secrets: tuple[Secret, ...] = ()  # the copies, in the policy's order
    mask_file: str | None = None  # an empty read-only file bound over each mask
    extra_mounts: tuple[Mount, ...] = ()  # kodepipe's own files (/etc/hosts, /etc/resolv.conf)
    extra_env: Mapping[str, str] = field(default_factory=dict)  # kodepipe's own settings (the proxy's address)
    env_file: str | None = None  # where the environment is written for podman_args' --env-file (a VM)


def render(policy: Policy, facts: Facts, staged: Staged) -> Sandbox:
    """The container for ``policy`` on the machine of ``facts``."""
    if policy.image is None:
        raise ValueError("render: the policy's image is not built yet")
    if len(staged.secrets) != len(policy.secrets):
        raise ValueError("render: a secret was not staged")
    limits = policy.limits
    return Sandbox(
        name=staged.name, image=policy.image, command=list(policy.command), workspace=facts.workspace,
        host_uid=facts.agent_uid, host_gid=facts.agent_gid, limits=limits, seccomp=facts.seccomp,
        read_only_workspace=policy.read_only_workspace, network=policy.network, cap_add=list(policy.cap_add),
        writable_root=policy.writable_root, env=policy.environment(), secrets=list(staged.secrets),
        masks=list(facts.masked), mask_file=staged.mask_file,
        protect=list(facts.protect), protect_sources=dict(facts.protect_sources),
        git_writable=policy.git_writable, tty=policy.tty, term=policy.term, interactive=policy.interactive,
        labels={"io.kodepipe.name": staged.name, "io.kodepipe.id": staged.run_id},
        oci_runtime=facts.oci_runtime,
        # a backstop: conmon kills the container even if kp-run itself is killed
        timeout=int(limits.seconds) + BACKSTOP if limits.seconds else 0,
        allow=list(policy.egress.rules) if policy.egress is not None else [],
        extra_mounts=list(staged.extra_mounts), extra_env=dict(staged.extra_env), quotas=facts.quotas,
        env_file=staged.env_file)
