"""Where a Policy runs: a backend renders every part of it, or refuses the run naming the part.

The order is the same for every backend: ``policy.resolve`` (conflicts, 2)
-> ``backend.refuse(policy)`` (what this backend can never do here, with no
I/O in the VM's case and only the euid on the host's) -> ``backend.learn``
(reads only) -> ``check`` against ``backend.supports(facts)`` -> the
profile's image is built -> ``backend.run``, whose side effects start only
now, and which renders the Policy (render.py).  A part a backend cannot
honour is refused before any side effect, as ``Unsupported`` (65), naming
the part, why, and what to do: it is never dropped silently.

The host learns and checks at the start of its run (``HostBackend.learned``,
then hostrun.Run's stages), after the image is built: its table refuses
nothing, its facts hold the workspace's fd, and what it learns of the
workspace (masks, repositories, setuid files) is then as fresh as can be.

The VM backend's support table is the one place that says what a guest
cannot do yet; other work flips its entries as the capabilities land.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from kodepipe.container.policy import Policy
from kodepipe.container.render import Facts as Facts  # what a backend learned, for render
from kodepipe.core.errors import BadInput
from kodepipe.core.records import Record

if TYPE_CHECKING:
    from kodepipe.container import hostrun

Say = Callable[[str, str], None]


class Part(enum.Enum):
    """A part of a Policy that a backend must honour; the value is how the user asked for it."""

    WORKSPACE = "-w/--workspace"
    READ_ONLY_WORKSPACE = "--read-only-workspace"
    QUARANTINE = "--quarantine"
    MASKS = "masks (.env, --mask)"
    GIT = "read-only git repositories (--writable-git)"
    LIMITS = "limits (--memory, --cpus, --pids, --time, --tmp-size)"
    NETWORK = "--net"
    HOSTS = "kodepipe's /etc/hosts (localhost and the run's name only)"
    PINS = "--resolve"
    EGRESS = "--allow (or a profile's allowed domains)"
    CREDENTIALS = "--credential (or a profile's credentials)"
    BUDGETS = "--budget (or a credential's budget)"
    CAPS = "--cap-add"
    WRITABLE_ROOT = "--writable-root"
    ENV = "-e/--env"
    SECRETS = "--secret"
    TERMINAL = "-i/-t"
    KEEP = "--keep"
    AUDIT = "--audit"


def parts(policy: Policy) -> frozenset[Part]:
    """Every part of ``policy`` that a backend must honour."""
    out = {Part.LIMITS, Part.NETWORK, Part.HOSTS}  # HOSTS: not the machine's names, nor its address
    if policy.workspace is not None:
        out |= {Part.WORKSPACE, Part.GIT}
        if policy.masks:
            out.add(Part.MASKS)
        if policy.read_only_workspace:
            out.add(Part.READ_ONLY_WORKSPACE)
    if policy.quarantine:  # -w is the guest's share when none is given: refused by what it asks for
        out.add(Part.QUARANTINE)
    if policy.egress is not None:
        out.add(Part.EGRESS)
        if policy.egress.pins:
            out.add(Part.PINS)
    if policy.credentials:
        out.add(Part.CREDENTIALS)
    if policy.budgets:
        out.add(Part.BUDGETS)
    if policy.cap_add:
        out.add(Part.CAPS)
    if policy.writable_root:
        out.add(Part.WRITABLE_ROOT)
    if policy.env:
        out.add(Part.ENV)
    if policy.secrets:
        out.add(Part.SECRETS)
    if policy.tty or policy.interactive:
        out.add(Part.TERMINAL)
    if policy.keep:
        out.add(Part.KEEP)
    if policy.audit is not None:
        out.add(Part.AUDIT)
    return frozenset(out)


class Unsupported(BadInput):
    """A part of the policy this backend cannot honour: the run is refused before any side effect (65)."""

    code = "unsupported"

    def __init__(self, part: Part, why: str, hint: str | None = None) -> None:
        super().__init__(f"{part.value} is {why}", hint=hint)
        self.part = part


@dataclass(frozen=True)
class Learned:
    """What a backend learned before deciding what it supports (read-only; nothing written)."""

    name: str


class Backend(Protocol):
    name: str  # "host", "vm:NAME", later "cluster:CTX"

    def refuse(self, policy: Policy) -> None:
        """What this backend can never do for ``policy``, before anything is built: no side effect."""

    def learn(self, policy: Policy) -> Learned:
        """Reads and probes only: no write, no service started."""

    def supports(self, facts: Learned | None) -> Mapping[Part, str | None]:
        """Each part: None if honoured, else why not (``facts`` None: before learning anything)."""

    def hint(self, part: Part) -> str | None:
        """What to do about a refused part."""

    def run(self, policy: Policy, say: Say) -> tuple[Record, int | None]:
        """The run, its side effects, and its record; the Policy rendered by render.render."""


def check(policy: Policy, backend: Backend, facts: Learned | None = None) -> None:
    """Unsupported for the first part of ``policy`` that ``backend`` cannot honour (in Part order)."""
    table = backend.supports(facts)
    wanted = parts(policy)
    for part in Part:
        if part in wanted:
            why = table.get(part, f"not known to the {backend.name} backend")
            if why is not None:
                raise Unsupported(part, why, backend.hint(part))


class HostBackend:
    """This host: rootful Podman through its API (hostrun.py)."""

    name = "host"

    def __init__(self, store: object) -> None:
        self.store = store

    def refuse(self, policy: Policy) -> None:
        from kodepipe.container import hostrun

        check(policy, self)
        hostrun.refuse(policy)  # root (77)

    def learn(self, policy: Policy) -> hostrun.HostFacts:
        """The workspace (checked, scanned, its repositories surveyed), the invoking user, the seccomp
        profile's text, the OCI runtime and the quotas: read only; the facts hold the workspace's fd."""
        from kodepipe.container import hostrun

        return hostrun.learn(policy)

    def supports(self, facts: Learned | None) -> Mapping[Part, str | None]:
        return dict.fromkeys(Part)

    def hint(self, part: Part) -> str | None:
        return None

    def learned(self, policy: Policy) -> hostrun.HostFacts:
        """``learn``, then ``check`` against what was learned: refused before any side effect."""
        facts = self.learn(policy)
        try:
            check(policy, self, facts)
        except BaseException:
            facts.close()
            raise
        return facts

    def run(self, policy: Policy, say: Say, facts: hostrun.HostFacts | None = None) -> tuple[Record, int | None]:
        """learned -> stage -> render -> start -> run -> finish (hostrun.Run, which owns the clean-up);
        ``facts``: learned already (kp-run learns before it builds a profile's image), closed by the run."""
        from kodepipe.container import hostrun
        from kodepipe.core.state import Store

        if not isinstance(self.store, Store):
            raise TypeError("HostBackend needs a state.Store")
        return hostrun.run(self.store, policy, say, learned=self.learned if facts is None else lambda _p: facts)


# What a guest cannot do yet (docs/policy-plan.md §3.3): flipped to None as each capability lands
VM_UNSUPPORTED: dict[Part, str] = {
    Part.KEEP: "not supported inside a VM yet (host-only for now)",
}


class VmBackend:
    """A VM of kp-boot's, its Podman reached over SSH (vmrun.py)."""

    def __init__(self, vm: Record) -> None:
        self.vm = vm
        self.name = f"vm:{vm.get('name')}"

    def refuse(self, policy: Policy) -> None:
        check(policy, self)  # the table needs no fact of the guest's: refused before connecting
        if policy.quarantine:  # only a workspace the host holds the lower layer of (vmrun.quarantine_share)
            from kodepipe.container import vmrun

            vmrun.host_lower(self.vm, vmrun.quarantine_share(self.vm, vmrun.guest_workspace(self.vm, policy)))

    def learn(self, policy: Policy) -> Learned:
        return Learned(self.name)

    def supports(self, facts: Learned | None) -> Mapping[Part, str | None]:
        return {part: VM_UNSUPPORTED.get(part) for part in Part}

    def hint(self, part: Part) -> str | None:
        return "run it on the host (without vm records on stdin)"

    def run(self, policy: Policy, say: Say) -> tuple[Record, int | None]:
        from kodepipe.container import vmrun

        return vmrun.run_in_vm(self.vm, policy, say)
