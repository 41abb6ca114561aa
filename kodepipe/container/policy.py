"""What the user asked kp-run for, as one frozen value: the sandbox policy.

``resolve(options, profile, config)`` turns the options as parsed, the agent
profile and the few facts of kp-run's own environment that gather.py read
(the values of the variables asked for, TERM, the rules of each --allow-file,
whether each --secret is a regular file, whether there is a terminal) into a
``Policy``, or raises PolicyError naming every conflict at once.  It does no
I/O at all (tests/test_policy.py runs it with the environment cleared and
open/os.stat raising): what it decides is the same for root and non-root, on
the host and in a VM, and it is decided before anything is built, copied or
started.

Every default of the sandbox lives here (limits, masks, the agent's uid, the
share of kernel quotas, the audit cap) and nowhere else; each backend renders
the Policy (render.py) with the facts it learned, or refuses it naming what
it cannot honour (backend.py).  ``loosened`` and the policy keys of the
record come from the Policy alone, so they are the same on every backend.
"""

from __future__ import annotations

import dataclasses
import posixpath
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol

from kodepipe.container.capabilities import CAPABILITIES as CAPABILITIES
from kodepipe.core.errors import USAGE, BadInput, KpError
from kodepipe.egress.policy import DEFAULT_PORTS, Rule

if TYPE_CHECKING:  # a run without credentials never imports them (kp-run's start-up)
    from kodepipe.egress.credentials import Budget, Definition, Grant

# -- the defaults ------------------------------------------------------------------------------

AGENT_UID = 1000  # the agent's uid and gid inside the container
WORKSPACE = "/workspace"  # where the workspace is mounted
SECRETS_DIR = "/run/secrets"
DEFAULT_MASKS = (".env", ".env.*")
NOFILE = 4096
NPROC = 4096
# a run may hold at most 1/QUOTA_SHARE of a host account's per-user kernel quotas
QUOTA_SHARE = 8
# the profile-less defaults (--image without --profile); a profile states its own
DEFAULT_MEMORY = 2 << 30
DEFAULT_CPUS = 2.0
DEFAULT_PIDS = 512
DEFAULT_SECONDS = 7200.0
AUDIT_MODES = ("minimal", "default", "full")
AUDIT_CAP = 256 << 20  # bytes of audit log, after which the run is stopped (audit/cap.py)
AUDIT_CAP_MINIMUM = 64 << 10
DEFAULT_TERM = "xterm-256color"
NETWORKS = ("none", "open")
# capabilities a user may add back, one flag each (the rest are never useful to an agent)
FORBIDDEN_DESTS = ("/proc", "/sys", "/dev", WORKSPACE)
# files kodepipe itself binds into every container: a secret may not take their place
OWN_MOUNTS = ("/etc/hosts", "/etc/resolv.conf")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# the options that shape a run, by click parameter name: none goes with --apply
RUN_OPTIONS = ("workspace", "read_only_workspace", "quarantine", "profile", "image", "name", "memory", "cpus",
               "pids", "time_limit", "tmp_size", "network", "allow", "allow_files", "pins", "no_profile_allow",
               "cap_add", "writable_root", "env", "secret_specs", "masks", "no_default_masks",
               "writable_git_config", "interactive", "tty", "keep", "audit", "audit_mode", "audit_cap",
               "credentials", "budgets", "no_profile_credentials", "sign")


class PolicyError(KpError):
    """Options that contradict each other or cannot be honoured by any backend: a usage error (2)."""

    code = "usage"
    status = USAGE

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True)
class Limits:
    memory: int  # bytes
    cpus: float
    pids: int
    seconds: float  # wall time; 0 means none
    tmpfs: int  # bytes of /tmp, counted against memory

    def problems(self) -> list[str]:
        out = []
        if self.memory < 16 << 20:
            out.append("--memory must be at least 16m")
        if not 0 < self.cpus <= 1024:
            out.append("--cpus must be a positive number")
        if self.pids < 8:
            out.append("--pids must be at least 8")
        if self.seconds < 0:
            out.append("--time must not be negative")
        if not 1 << 20 <= self.tmpfs < self.memory:
            out.append("--tmp-size must be at least 1m and below --memory "
                       "(tmpfs pages count against the memory limit)")
        return out

    def check(self) -> None:
        problems = self.problems()
        if problems:
            raise BadInput(problems[0])

    def record(self) -> dict[str, Any]:
        return {"memory": self.memory, "cpus": self.cpus, "pids": self.pids,
                "seconds": self.seconds or None, "tmpfs": self.tmpfs}


@dataclass(frozen=True)
class Quotas:
    """Per-user kernel quotas: a machine's (a backend's fact), or one run's share of them."""

    inotify_instances: int  # fs.inotify.max_user_instances
    inotify_watches: int  # fs.inotify.max_user_watches
    sigpending: int  # RLIMIT_SIGPENDING: signals queued with their data
    msgqueue: int  # RLIMIT_MSGQUEUE: bytes of POSIX message queues

    def share(self, parts: int = QUOTA_SHARE) -> Quotas:
        """One run's part of these quotas (at least one of each)."""
        return Quotas(*(max(1, v // parts) for v in (self.inotify_instances, self.inotify_watches,
                                                      self.sigpending, self.msgqueue)))

    def userns_sysctls(self) -> dict[str, int]:
        """/proc/sys/user/NAME values for the container's own user namespace.  No user
        namespaces at all: seccomp already refuses them; this is the second lock."""
        return {"max_inotify_instances": self.inotify_instances, "max_inotify_watches": self.inotify_watches,
                "max_user_namespaces": 0}

    def record(self) -> dict[str, int]:
        return {"inotify_instances": self.inotify_instances, "inotify_watches": self.inotify_watches,
                "sigpending": self.sigpending, "msgqueue": self.msgqueue}


# -- what comes in ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """kp-run's options as click parsed them (sizes in bytes, durations in seconds), and which of
    them were given on the command line (``given``: click parameter names)."""

    command: tuple[str, ...] = ()
    workspace: str | None = None
    read_only_workspace: bool = False
    quarantine: bool = False
    profile: str | None = None
    image: str | None = None
    name: str | None = None
    memory: int | None = None
    cpus: float | None = None
    pids: int | None = None
    time_limit: float | None = None
    tmp_size: int | None = None
    network: str = "none"
    allow: tuple[str, ...] = ()
    allow_files: tuple[str, ...] = ()
    pins: tuple[str, ...] = ()
    no_profile_allow: bool = False
    cap_add: tuple[str, ...] = ()
    writable_root: bool = False
    env: tuple[str, ...] = ()  # NAME or NAME=VALUE
    secret_specs: tuple[str, ...] = ()  # FILE[:DEST]
    masks: tuple[str, ...] = ()
    no_default_masks: bool = False
    writable_git_config: bool = False
    interactive: bool = False
    tty: bool = False
    keep: bool = False
    audit: bool = False
    audit_mode: str = "default"
    audit_cap: int | None = None
    sign: bool = False
    credentials: tuple[str, ...] = ()  # --credential NAME
    budgets: tuple[str, ...] = ()  # --budget KEY=REQUESTS[,BYTES]
    no_profile_credentials: bool = False
    apply_names: tuple[str, ...] = ()
    discard_names: tuple[str, ...] = ()
    force: bool = False
    accept: tuple[str, ...] = ()  # with --apply: findings taken in
    fail_on: str = "high"
    to_branch: str | None = None
    reviewed: str | None = None
    given: frozenset[str] = frozenset()


class ProfileLike(Protocol):
    """What resolve reads of an agent profile (profile.Profile)."""

    @property
    def name(self) -> str: ...

    @property
    def command(self) -> tuple[str, ...]: ...

    @property
    def memory(self) -> str: ...

    @property
    def cpus(self) -> float: ...

    @property
    def pids(self) -> int: ...

    @property
    def time(self) -> str: ...

    @property
    def allow(self) -> tuple[str, ...]: ...

    @property
    def env(self) -> tuple[str, ...]: ...

    @property
    def tty(self) -> bool: ...

    @property
    def credentials(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class CredentialFact:
    """What gather.py learned of one credential: its definition and the run's grant (token and value),
    or why not: a broken definition (``problem``), or a source that cannot be read (``unavailable``;
    ``absent`` when it is simply not set up on this host)."""

    definition: Definition | None = None
    grant: Grant | None = field(default=None, repr=False)
    problem: str | None = None
    unavailable: str | None = None
    absent: bool = False


@dataclass(frozen=True)
class SecretFile:
    """What gather.py learned of one --secret FILE: the path (~ expanded) and whether it is a regular file."""

    path: str
    regular: bool


@dataclass(frozen=True)
class Config:
    """The facts of kp-run's own environment that the policy depends on, read by gather.py."""

    env: Mapping[str, str] = field(default_factory=dict, repr=False)  # only the names asked for, when set
    term: str | None = None  # TERM, captured once
    allow_files: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # path -> its rules
    unreadable: Mapping[str, str] = field(default_factory=dict)  # --allow-file path -> why it could not be read
    secrets: Mapping[str, SecretFile] = field(default_factory=dict)  # FILE as given -> what it is
    has_terminal: bool = False  # stdin is a terminal, or /dev/tty opens
    stdin_tty: bool = False
    stdout_tty: bool = False
    credentials: Mapping[str, CredentialFact] = field(default_factory=dict, repr=False)  # name -> what it is


class CredentialUnavailable(KpError):
    """A credential asked for whose real value cannot be read on the host: the run does not start."""

    code = "credential_unavailable"

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems), code="credential_unavailable",
                         hint="the run did not start; nothing passes the key into the sandbox instead")


# -- the policy -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SecretSpec:
    source: str  # the file on the machine that runs kp-run
    dest: str  # absolute path in the container
    origin: str  # FILE as the user named it


@dataclass(frozen=True)
class Egress:
    """The proxy is the only way out: these rules (normalised: DOMAIN or *.DOMAIN, :PORTS unless 80,443)
    and pins (NAME=ADDRESS)."""

    rules: tuple[str, ...]
    pins: tuple[str, ...] = ()


@dataclass(frozen=True)
class Audit:
    mode: str  # a kp-trace mode
    cap: int = AUDIT_CAP  # bytes of log, after which the run is stopped


@dataclass(frozen=True)
class Policy:
    """Everything kp-run decided about one run before learning anything of the machine it runs on."""

    command: tuple[str, ...]
    image: str | None  # None: the profile's own image, built once a backend accepted the policy
    limits: Limits
    name: str | None = None  # None: the run names itself (run-XXXXXXXX)
    profile: str | None = None
    workspace: str | None = None  # as given: a host path, or a path in the guest
    workspace_mode: str = "rw"  # "rw", "ro" or "quarantine" (the record says None without a workspace)
    quota_share: int = QUOTA_SHARE
    masks: tuple[str, ...] = DEFAULT_MASKS  # globs; the defaults included unless --no-default-masks
    default_masks: bool = True
    git_writable: bool = False
    network: str = "none"
    egress: Egress | None = None
    secrets: tuple[SecretSpec, ...] = ()
    env: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # values are never shown
    env_missing: tuple[str, ...] = ()  # the profile's names not set in kp-run's environment (D6: said, recorded)
    cap_add: tuple[str, ...] = ()
    writable_root: bool = False
    keep: bool = False
    audit: Audit | None = None
    sign: bool = False  # the heads of the run's chained logs are signed with the host's key (evidence.py)
    tty: bool = False
    interactive: bool = False
    term: str | None = None  # TERM for a -t run, captured once
    credentials: tuple[Grant, ...] = field(default=(), repr=False)  # held by the proxy; tokens in the env
    credentials_missing: tuple[str, ...] = ()  # the profile's credentials not set up on this host (said, recorded)
    budgets: tuple[tuple[str, Budget], ...] = ()  # credential name or host -> the run's budget

    @property
    def read_only_workspace(self) -> bool:
        return self.workspace_mode == "ro"

    @property
    def quarantine(self) -> bool:
        return self.workspace_mode == "quarantine"

    def env_names(self) -> tuple[str, ...]:
        return tuple(sorted(name for name, _ in self.env))

    def environment(self) -> dict[str, str]:
        """The container's environment: the variables passed, and each credential's token and endpoint."""
        out = dict(self.env)
        for grant in self.credentials:
            out.update(grant.definition.environment(grant.token))
        return out

    def with_image(self, tag: str) -> Policy:
        """The policy with the profile's image, once built (profile.ensure_image)."""
        return dataclasses.replace(self, image=tag)

    def with_workspace(self, workspace: str | None) -> Policy:
        """The policy with the workspace as a backend names it (in a VM: normalised, or the share
        when none was given)."""
        return dataclasses.replace(self, workspace=workspace)

    def loosened(self) -> list[str]:
        """Every default these options loosen, for the record: the same on every backend."""
        out = []
        if self.network != "none":
            out.append(f"network:{self.network}")
        if self.egress is not None:
            out.extend(f"allow:{rule}" for rule in self.egress.rules)
            # a pin is the only way a name reaches a loopback address
            out.extend(f"resolve:{pin}" for pin in self.egress.pins)
        out.extend(f"cap:{cap}" for cap in self.cap_add)
        if self.writable_root:
            out.append("writable-root")
        out.extend(f"env:{name}" for name in self.env_names())
        out.extend(f"secret:{s.dest}" for s in self.secrets)
        # the agent can spend the key (not read it): through its endpoint, within the budget
        out.extend(f"credential:{g.name}" for g in self.credentials)
        if self.limits.seconds == 0:
            out.append("no-time-limit")
        if self.workspace is not None and self.git_writable:
            out.append("writable-git")
        if not self.default_masks:
            out.append("no-default-masks")
        return out

    def record(self) -> dict[str, Any]:
        """The policy's keys of the container record: the same keys, from the same value, on every backend."""
        out: dict[str, Any] = {
            "workspace_mode": self.workspace_mode if self.workspace is not None else None,
            "network": "proxy" if self.egress is not None else self.network,
            "limits": self.limits.record(),
            "loosened": self.loosened(),
            "env": list(self.env_names()),
            "secrets": [s.dest for s in self.secrets],
            "allow": list(self.egress.rules) if self.egress is not None else [],
            "resolve": list(self.egress.pins) if self.egress is not None else [],
        }
        if self.env_missing:  # only when some are: the agent runs without them (D6)
            out["env_missing"] = list(self.env_missing)
        if self.credentials:
            out["credentials"] = [g.definition.record() for g in self.credentials]
        if self.credentials_missing:
            out["credentials_missing"] = list(self.credentials_missing)
        if self.budgets:
            out["budgets"] = {key: budget.record() for key, budget in self.budgets}
        if self.audit is not None:
            out.update(audit_mode=self.audit.mode, audit_cap=self.audit.cap)
        return out


# -- resolve ------------------------------------------------------------------------------------


def _rule_text(rule: Rule) -> str:
    """A parsed egress rule as the record shows it."""
    return rule.pattern + ("" if rule.ports == DEFAULT_PORTS else ":" + ",".join(map(str, rule.ports)))


def secret_dest(spec: str, secret: SecretFile) -> tuple[str | None, str | None]:
    """(destination, None) of FILE[:DEST], or (None, why not)."""
    src, sep, dest = spec.partition(":")
    if not secret.regular:
        return None, f"--secret {src}: not a readable regular file"
    if not sep:
        dest = f"{SECRETS_DIR}/{posixpath.basename(secret.path)}"
    dest = posixpath.normpath(dest) if dest else dest
    if not dest.startswith("/") or any(dest == d or dest.startswith(d + "/") for d in FORBIDDEN_DESTS):
        return None, (f"--secret {spec}: the destination must be an absolute path outside "
                      f"{', '.join(FORBIDDEN_DESTS)}")
    if dest in OWN_MOUNTS:
        return None, f"--secret {spec}: {dest} is kodepipe's own (every container gets kodepipe's {dest})"
    return dest, None


APPLY_OPTIONS = ("force", "accept", "fail_on", "to_branch", "reviewed")


def apply_conflicts(options: Options) -> list[str]:
    """C2: --apply is a command of its own; the run options have nothing to do with it.  Its
    arguments (after --) are paths of one run's changes: a partial apply."""
    others = [_flag(p) for p in RUN_OPTIONS if p in options.given]
    out = []
    if others:
        out.append("--apply takes no run option (it applies a quarantined run's changes): drop "
                   f"{', '.join(others)}")
    if options.command and (len(options.apply_names) != 1 or options.apply_names[0] == "-"):
        out.append("--apply NAME -- PATH... applies those paths of one run: name exactly one run")
    if options.to_branch is not None and options.command:
        out.append("--to-branch exports the whole quarantine: drop the PATHs")
    return out


def discard_conflicts(options: Options) -> list[str]:
    """--discard is a command of its own too: nothing else goes with it."""
    others = [_flag(p) for p in (*RUN_OPTIONS, *APPLY_OPTIONS) if p in options.given]
    out = []
    if others or options.apply_names:
        out.append(f"--discard takes no other option: drop {', '.join(others or ['--apply'])}")
    if options.command:
        out.append("--discard discards a run's whole quarantine: drop the COMMAND or PATHs")
    return out


def resolve(options: Options, profile: ProfileLike | None, config: Config) -> Policy:
    """The Policy for these options, or PolicyError naming every conflict (C1-C16 of docs/policy-plan.md)."""
    from kodepipe.core.units import parse_duration, parse_size
    from kodepipe.egress.policy import parse_pin, parse_rule

    o = options
    problems: list[str] = []
    given = o.given
    if o.apply_names:  # not a run: nothing else applies
        raise PolicyError(apply_conflicts(o) or ["--apply makes no run: it has no sandbox policy"])
    if o.discard_names:
        raise PolicyError(discard_conflicts(o) or ["--discard makes no run: it has no sandbox policy"])
    # C1: --force, --accept, --fail-on, --to-branch and --reviewed go with --apply
    for param in APPLY_OPTIONS:
        if param in given and param != "force":
            problems.append(f"{_flag(param)} goes with --apply")
    if o.force:
        problems.append("--force goes with --apply")
    # C12: the name
    if o.name is not None:
        from kodepipe.core.records import check_name

        try:
            check_name(o.name, "container name")
        except BadInput as exc:
            problems.append(exc.message)
    # C15: an image name cannot be an option
    if o.image is not None and o.image.startswith("-"):
        problems.append(f"invalid image name {o.image!r}: it must not start with '-'")
    # the profile's defaults
    if profile is not None:
        memory_default = _size(profile.memory, problems, parse_size, "the profile's memory")
        time_default = (0.0 if profile.time.strip() in ("0", "none")
                        else _duration(profile.time, problems, parse_duration))
        defaults = (memory_default, float(profile.cpus), int(profile.pids), time_default)
        profile_command, profile_allow, profile_env = tuple(profile.command), tuple(profile.allow), profile.env
    else:
        defaults = (DEFAULT_MEMORY, DEFAULT_CPUS, DEFAULT_PIDS, DEFAULT_SECONDS)
        profile_command, profile_allow, profile_env = (), (), ()
    # C10: limits
    memory = int(o.memory or defaults[0])
    limits = Limits(memory=memory, cpus=float(o.cpus or defaults[1]), pids=int(o.pids or defaults[2]),
                    seconds=float(defaults[3] if o.time_limit is None else o.time_limit),
                    tmpfs=int(o.tmp_size or memory // 4))
    problems.extend(limits.problems())
    # C14: environment variables
    env: dict[str, str] = {}
    unset: list[str] = []
    for name in profile_env:  # a profile's names that are not set are left out (sudo resets the environment),
        if name in config.env:  # and named: kp-run says so and the record has them (env_missing, D6)
            env[name] = config.env[name]
        else:
            unset.append(name)
    for value in o.env:
        name, sep, text = value.partition("=")
        if not _ENV_NAME.fullmatch(name):
            problems.append(f"--env: {name!r} is not an environment variable name")
        elif sep:
            env[name] = text
        elif name in config.env:
            env[name] = config.env[name]
        else:
            problems.append(f"--env: {name} is not set in kp-run's environment")
    # C13: secrets
    secrets: list[SecretSpec] = []
    for spec in o.secret_specs:
        src = spec.partition(":")[0]
        dest, why = secret_dest(spec, config.secrets.get(src, SecretFile(src, False)))
        if why is not None or dest is None:
            problems.append(why or f"--secret {spec}: no destination")
            continue
        if any(s.dest == dest for s in secrets):
            problems.append(f"--secret {spec}: another --secret already goes to {dest}")
            continue
        secrets.append(SecretSpec(config.secrets[src].path, dest, src))
    # C3, C4: the workspace
    if o.quarantine and o.read_only_workspace:
        problems.append("--quarantine and --read-only-workspace exclude each other")
    if o.quarantine and o.workspace is None:
        problems.append("--quarantine needs a --workspace (inside a VM: -w /workspace for the shared folder)")
    # C5, C6, C7, C14: egress
    explicit = list(o.allow)
    for path in o.allow_files:
        if path in config.unreadable:
            problems.append(config.unreadable[path])
        explicit += list(config.allow_files.get(path, ()))
    raw = ([] if o.no_profile_allow or o.network != "none" else list(profile_allow)) + explicit
    if (o.allow or o.allow_files) and o.network != "none":
        problems.append("--allow and --net open exclude each other: --allow is the only way out")
    elif o.allow_files and not raw and not any(p in config.unreadable for p in o.allow_files):
        problems.append(f"--allow-file {', '.join(o.allow_files)}: no rule in it, and no other --allow: the run "
                        "would have no network at all (leave it out for that)")
    grants, missing = _credentials(o, profile, config, problems)
    if o.pins and not raw and not (o.allow or o.allow_files) and not grants and not o.credentials:
        problems.append("--resolve only matters with --allow or --credential")
    egress = None
    if raw or o.pins or grants:
        rules: list[str] = []
        pins: list[str] = []
        for text in dict.fromkeys(raw):
            try:
                rules.append(_rule_text(parse_rule(text)))
            except BadInput as exc:
                problems.append(exc.message)
        for text in o.pins:
            try:
                pin_name, addr = parse_pin(text)
                pins.append(f"{pin_name}={addr}")
            except BadInput as exc:
                problems.append(exc.message)
        if raw or grants:
            egress = Egress(tuple(rules), tuple(pins))
    budgets = _budgets(o, grants, egress, problems)
    for grant in grants:  # a credential's variables are its own: never the host's value by -e or the profile
        for var, _ in grant.definition.env:
            if any(v.partition("=")[0] == var for v in o.env):
                problems.append(f"-e {var}: the credential {grant.name} gives the agent {var} (its token or "
                                "endpoint); passing it as well would override that")
            env.pop(var, None)
    # C8, C9: the audit
    if not o.audit and ({"audit_mode", "audit_cap"} & given):
        problems.append(f"{' and '.join(_flag(p) for p in ('audit_mode', 'audit_cap') if p in given)} "
                        "only matter with --audit")
    if o.audit_cap is not None and o.audit_cap < AUDIT_CAP_MINIMUM:
        problems.append(f"--audit-cap must be at least {AUDIT_CAP_MINIMUM >> 10}k")
    if o.audit_mode not in AUDIT_MODES:
        problems.append(f"--audit-mode {o.audit_mode!r}: one of {', '.join(AUDIT_MODES)}")
    audit = Audit(o.audit_mode, o.audit_cap or AUDIT_CAP) if o.audit else None
    # C11: a command
    command = tuple(o.command) or profile_command
    if not command:
        problems.append("give a COMMAND after --")
    # C16: a terminal
    tty = o.tty
    if not o.command and profile is not None and profile.tty and not tty and config.stdin_tty and config.stdout_tty:
        tty = True  # an agent profile's own command on a terminal: it is an interactive program
    if o.tty and not config.has_terminal:
        problems.append("-t needs a terminal, and there is none (drop -t, or run kp-run from a terminal)")
    for cap in o.cap_add:
        if cap.upper() not in CAPABILITIES:
            problems.append(f"--cap-add {cap}: not one of {', '.join(CAPABILITIES)}")
    if o.network not in NETWORKS:
        problems.append(f"--net {o.network}: one of {', '.join(NETWORKS)}")
    if problems:
        raise PolicyError(problems)
    unavailable = [f"--credential {name}: {fact.unavailable}" for name, fact in _asked(o, config)
                   if fact.unavailable is not None]
    if unavailable:
        raise CredentialUnavailable(unavailable)
    mode = "quarantine" if o.quarantine else "ro" if o.read_only_workspace else "rw"
    return Policy(
        command=command, image=o.image, limits=limits, name=o.name,
        profile=profile.name if profile is not None else None, workspace=o.workspace, workspace_mode=mode,
        masks=(() if o.no_default_masks else DEFAULT_MASKS) + tuple(o.masks), default_masks=not o.no_default_masks,
        git_writable=o.writable_git_config, network=o.network, egress=egress, secrets=tuple(secrets),
        env=tuple(env.items()), env_missing=tuple(sorted({n for n in unset if n not in env})),
        cap_add=tuple(c.upper() for c in o.cap_add), writable_root=o.writable_root,
        keep=o.keep, audit=audit, sign=o.sign, tty=tty, interactive=o.interactive or tty,
        term=(config.term if config.term is not None else DEFAULT_TERM) if tty else None,
        credentials=tuple(grants), credentials_missing=tuple(missing), budgets=tuple(budgets))


def profile_credentials(options: Options, profile: ProfileLike | None) -> tuple[str, ...]:
    """The profile's credentials this run would use when set up: none with --no-profile-credentials or
    --net open (no proxy), and none the command line names itself."""
    if profile is None or options.no_profile_credentials or options.network != "none":
        return ()
    return tuple(n for n in profile.credentials if n not in options.credentials)


def _asked(o: Options, config: Config) -> list[tuple[str, CredentialFact]]:
    return [(name, config.credentials.get(name, CredentialFact(problem=f"--credential {name}: not looked up")))
            for name in dict.fromkeys(o.credentials)]


def _credentials(o: Options, profile: ProfileLike | None, config: Config,
                 problems: list[str]) -> tuple[list[Grant], list[str]]:
    """The run's grants (the explicit ones, then the profile's that are set up) and the profile's that are
    not.  A profile's credential whose variables another one already sets is left out."""
    if o.credentials and o.network != "none":
        problems.append("--credential and --net open exclude each other: a credential is added on the way out by "
                        "kodepipe's proxy, and --net open has none")
    grants: list[Grant] = []
    missing: list[str] = []
    absent: dict[str, set[str]] = {}  # a profile's credential not set up here: the variables it would set
    taken: dict[str, str] = {}
    for name, fact in _asked(o, config):
        if fact.problem is not None:
            problems.append(fact.problem)
        elif fact.grant is not None:
            for var, _ in fact.grant.definition.env:
                if var in taken:
                    problems.append(f"--credential {name} and {taken[var]} both set {var}: choose one")
                taken.setdefault(var, name)
            grants.append(fact.grant)
    for name in profile_credentials(o, profile):
        fact = config.credentials.get(name, CredentialFact(problem=f"the profile's credential {name}: not looked up"))
        if fact.problem is not None:
            problems.append(f"the profile's credential {name}: {fact.problem}")
        elif fact.unavailable is not None and not fact.absent:
            problems.append(f"the profile's credential {name}: {fact.unavailable}")
        elif fact.grant is None:
            missing.append(name)
            absent[name] = {var for var, _ in fact.definition.env} if fact.definition is not None else set()
        elif any(var in taken for var, _ in fact.grant.definition.env):
            continue  # another credential (the user's choice, or the profile's first) serves these variables
        else:
            taken.update({var: name for var, _ in fact.grant.definition.env})
            grants.append(fact.grant)
    # one not set up whose variables another serves was an alternative (claude-oauth beside anthropic)
    return grants, [name for name in missing if not absent[name] & set(taken)]


def _budgets(o: Options, grants: list[Grant], egress: Egress | None,
             problems: list[str]) -> list[tuple[str, Budget]]:
    """Each credential's default budget, and --budget's (which win), by credential name or host."""
    out = {g.name: g.definition.budget for g in grants if g.definition.budget is not None}
    if not o.budgets:
        return sorted(out.items())
    if egress is None:
        problems.append("--budget only matters with --allow or --credential (the proxy counts requests)")
        return []
    from kodepipe.egress.credentials import parse_budget
    from kodepipe.egress.policy import parse_rule

    names = {g.name for g in grants}
    rules = [parse_rule(r) for r in egress.rules] if egress is not None else []
    upstreams = {g.definition.upstream for g in grants}
    for text in o.budgets:
        try:
            key, budget = parse_budget(text)
        except BadInput as exc:
            problems.append(exc.message)
            continue
        if key not in names and key not in upstreams and not any(r.matches(key, None) for r in rules):
            problems.append(f"--budget {text}: {key} is neither a credential of this run nor an allowed host")
            continue
        out[key] = budget
    return sorted(out.items())


_FLAGS = {"workspace": "-w", "network": "--net", "pins": "--resolve", "time_limit": "--time",
          "secret_specs": "--secret", "masks": "--mask", "writable_git_config": "--writable-git",
          "interactive": "-i", "tty": "-t", "allow_files": "--allow-file", "env": "-e", "cap_add": "--cap-add",
          "apply_names": "--apply", "credentials": "--credential", "budgets": "--budget"}


def _flag(param: str) -> str:
    return _FLAGS.get(param, "--" + param.replace("_", "-"))


def _size(text: str, problems: list[str], parse: Callable[[str], int], what: str) -> int:
    try:
        return int(parse(text))
    except BadInput as exc:
        problems.append(f"{what}: {exc.message}")
        return DEFAULT_MEMORY


def _duration(text: str, problems: list[str], parse: Callable[[str], float]) -> float:
    try:
        return float(parse(text))
    except BadInput as exc:
        problems.append(f"the profile's time: {exc.message}")
        return DEFAULT_SECONDS


# -- where a workspace may be, on every backend (D11) ------------------------------------------------


def check_workspace_place(real: PurePosixPath, homes: Iterable[PurePosixPath], *, machine: str | None = None,
                          example: str = "--workspace ~/code/proj") -> None:
    """BadInput if the workspace ``real`` (its real, absolute path on the machine that runs the
    container) would expose too much there: ``/``, a home directory or one that contains it, or a
    path inside a dot-directory of a home (~/.ssh, ~/.aws, ~/.config: credentials and configuration).
    ``homes``: the real paths of the homes the backend learned (the host: the user's and SUDO_USER's;
    a VM: the SSH user's and /root).  The same rule for every backend; ``machine`` names a VM."""
    on = f" in {machine}" if machine else ""
    itself = f"give the project directory itself, e.g. {example}"
    if real == PurePosixPath("/"):
        raise BadInput(f"the workspace cannot be / (the whole {f'of {machine}' if machine else 'host'})",
                       hint=itself)
    for home in sorted(set(homes)):
        if real == home or home.is_relative_to(real):
            raise BadInput(f"the workspace {real}{on} is or contains the home directory {home}", hint=itself)
        if real.is_relative_to(home) and real.relative_to(home).parts[0].startswith("."):
            raise BadInput(f"the workspace {real}{on} is inside {home / real.relative_to(home).parts[0]}, where "
                           "credentials and configuration live (~/.ssh, ~/.aws, ~/.config, ...)",
                           hint="give a project directory (a symbolic link may have led here)")
