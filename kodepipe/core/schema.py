"""The record schema: every kind of record a kp-* command writes, its keys and their JSON types,
and the states a record of that kind can be in.

Records stay plain dicts on the wire (orjson); a ``TypedDict`` per kind says which keys it has
and of which JSON type, so mypy can check code that builds one and ``problems`` can check a real
record at run time (tests/test_schema.py checks the records the commands write, so the schema
cannot drift from them).  kodepipe(7) renders its KINDS and STATES sections from here.

A stage passes through every key it does not know (the record contract), so a record on a pipe
may carry more keys than its kind lists: ``problems`` reports unknown keys only when ``strict``.
Pure: no I/O.
"""

# (no "from __future__ import annotations": TypedDict sees Required[...] only in evaluated annotations)
import types
import typing
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, NotRequired, Required, TypedDict, Union

from kodepipe.core.errors import Code

JsonObject = dict[str, Any]


class _Described(StrEnum):
    """A state: its wire spelling and what it means (the man page shows the meaning)."""

    _value_: str
    meaning: str

    def __new__(cls, state: str, meaning: str) -> "_Described":
        member = str.__new__(cls, state)
        member._value_ = state
        member.meaning = meaning
        return member


# -- states, per kind ------------------------------------------------------------------------------

_CREATING = "being made: its creator holds the name's lock (kp-rm waits for it); broken if the creator died"
_BROKEN = "something kodepipe cannot use (a killed creation, a missing base or file); \"problem\" says why"
_GONE = "kp-ls: what a record on its stdin named no longer exists (removed, or re-created with a new id)"


class ImageState(_Described):
    creating = "creating", _CREATING
    building = "building", "kp-image build is making it"
    ready = "ready", "it can be cloned"
    broken = "broken", _BROKEN + "; kp-rm removes it"
    gone = "gone", _GONE


class VmState(_Described):
    creating = "creating", "kp-clone is making it (" + _CREATING.split(": ", 1)[1] + ")"
    stopped = "stopped", "not running (never booted, shut down, or the host rebooted)"
    running = "running", "its QEMU runs the guest"
    suspended = "suspended", "paused in memory (kp-stop --suspend, or the guest slept); kp-stop --resume runs it"
    frozen = ("frozen", "its QEMU is alive but runs no guest code, and not by kp-stop --suspend: a kp-stop --save "
              "cut off (QEMU's status postmigrate), a full disk or an I/O error (io-error), a pause outside "
              "kodepipe, a guest panic; \"qemu_status\" is QEMU's own word, \"problem\" says why and \"hint\" "
              "what to do (kp-stop --resume where QEMU allows it)")
    saved = "saved", "its RAM is saved to disk (kp-stop --save); kp-boot resumes it"
    crashed = "crashed", "its QEMU exited without kp-stop (see the serial log)"
    broken = "broken", _BROKEN + "; kp-rm removes it"
    gone = "gone", _GONE


class DiskState(_Described):
    creating = "creating", "kp-disk is making it (" + _CREATING.split(": ", 1)[1] + ")"
    ready = "ready", "no running VM has it: kp-boot --disk attaches it"
    attached = "attached", "a running VM has it (\"attached_to\" names the VM)"
    broken = "broken", _BROKEN + "; kp-rm NAME removes it"
    gone = "gone", _GONE


class ContainerState(_Described):
    creating = "creating", "its kp-run, still alive, is setting it up"
    running = "running", "its kp-run runs it"
    exited = "exited", "kept after its run (--keep, an audit or egress log)"
    quarantined = "quarantined", "its changes wait for review (kp-run --apply, or kp-rm to discard them)"
    applied = "applied", ("kp-run --apply wrote all its changes to the workspace; its folder (the quarantine "
                          "as it was, and the review's snapshot) stays until kp-rm")
    discarded = "discarded", ("kp-run --discard threw its quarantined changes away; its folder (its logs, and "
                              "the decision in its review log) stays until kp-rm")
    orphaned = "orphaned", "its kp-run was killed, or ended while the container still ran; kp-rm removes what is left"
    broken = "broken", _BROKEN + "; kp-rm removes it"
    gone = "gone", _GONE


class TraceState(_Described):
    running = "running", "kp-trace started the command under strace (the first record)"
    exited = "exited", "the traced command ended (the last record: exit_code or signal)"


# -- records, per kind ---------------------------------------------------------------------------


class ErrorObject(TypedDict):
    code: Code
    message: str


class _Object(TypedDict, total=False):
    """Keys of every image, vm and container record (kodepipe's objects, listed by kp-ls)."""

    name: Required[str]
    id: str  # 12 hex digits, new each time something of the name is made
    created: str  # UTC, YYYY-MM-DDTHH:MM:SSZ
    path: str  # its folder in the state directory
    problem: str  # why it is broken, orphaned or frozen
    hint: str  # what to do about it
    error: ErrorObject
    removed: bool  # kp-rm (and a kp-run that kept nothing)
    kept: str  # kp-rm: why a bulk removal left it alone
    dry_run: bool  # kp-rm --dry-run
    disk_bytes: int  # kp-ls: space its disk uses


class DiskRecord(_Object, total=False):
    kind: Required[Literal["disk"]]
    state: DiskState
    size: int  # bytes
    encryption: Literal["luks"]  # QEMU's qcow2 LUKS encryption
    key: JsonObject  # where kp-boot reads the key: {"env": VAR}, {"file": PATH} or {"command": [ARGV]}; never the key
    disk: str  # the qcow2 file
    attached_to: str  # the running VM that has it


class ImageRecord(_Object, total=False):
    kind: Required[Literal["image"]]
    state: ImageState
    disk: str
    kernel: str
    initrd: str
    cmdline: str
    suite: str
    mirror: str
    user: str  # the guest's user, who has the SSH key
    packages: list[str]
    kernel_version: str
    disk_size: str
    rootfs_bytes: int
    kernel_bytes: int
    initrd_bytes: int
    timings: dict[str, float]  # seconds per build step
    build_seconds: float
    builder_pid: int  # while building
    ssh_keys: list[str]  # fingerprints of the authorised keys
    clones: list[str]  # kp-ls: the VMs made from it
    warm: JsonObject  # kp-image warm: the saved running machine clones resume from
    # kp-pool: size, max_memory, keeps, members, ready, and limited_by and problem when they apply
    # (an unreadable pool.json: only problem)
    pool: JsonObject | None


class VmRecord(_Object, total=False):
    kind: Required[Literal["vm"]]
    state: VmState
    base: str  # the image it is an overlay on
    base_id: str
    disk: str
    warm_id: str  # the warm state it was cloned from
    pool: str  # a member of this image's warm pool (kp-pool), not yet handed out
    pool_ready: str  # when the pool's member became ready to hand out
    pool_problem: str  # why a member is no longer ready (its hand-out failed): the next fill replaces it
    pool_boot: str | None  # the boot ("started") it was set up in: ready in that boot only
    pooled: str  # a handed-out VM: when it was made, for the pool ("created" is its hand-out)
    from_pool: bool  # kp-clone handed it out from its base's pool (then "adopted" and "hostname_seconds")
    adopted: str
    hostname_seconds: float
    ssh_key: JsonObject  # path, fingerprint: the clone's own SSH key (kp-clone made it; kp-rm removes it)
    saved: JsonObject  # the hardware and network its saved RAM state resumes with
    qemu_status: str  # QEMU's own word for a frozen VM
    # from kp-boot (while booted; a record keeps them until the next boot)
    pid: int | None
    started: str
    accel: Literal["kvm", "tcg"]
    accel_reason: str
    memory: str  # as given to kp-boot --memory (QEMU's -m), e.g. "1G"
    cpus: int
    net: str  # user, none or bridge:NAME
    share: str | None
    share_git: JsonObject
    share_idmap: JsonObject
    mac: str
    sockets: dict[str, str]
    serial_log: str
    qemu_log: str
    resumed: bool
    reseed_seconds: float
    qemu_user: JsonObject  # who QEMU runs as: never root
    host_loopback: bool
    loosened: list[str]
    tap: str
    passt: JsonObject
    network: Literal["open", "allowlist"]  # --net user: open, or sealed behind the VM's egress proxy (--allow)
    egress: JsonObject  # allow, resolve, proxy (the guest's proxy URL)
    egress_log: str  # the VM's proxy's decision log (egress.jsonl), as a container's
    publish: list[str]  # HOSTADDR:HOSTPORT:GUESTPORT forwarded to the guest (kp-boot --publish)
    disks: list[JsonObject]  # name, mountpoint, serial: its encrypted data disks (kp-boot --disk)
    preset: str  # kp-boot --preset
    packages: list[str]  # the preset's packages, installed by kp-ip when missing
    dns: list[str]
    paused: bool
    ssh: JsonObject | None  # host, port, user
    # from kp-ip
    addresses: list[JsonObject]
    address: str | None
    address_source: str
    host_key: str  # fingerprint
    known_hosts: str | None
    waited_seconds: float
    ready: str
    # from kp-stop
    stopped_by: str


class ContainerRecord(_Object, total=False):
    kind: Required[Literal["container"]]
    state: ContainerState
    host: str  # "local", or the VM it ran in
    vm_id: str | None
    image: str
    profile: str | None
    command: list[str]
    workspace: str | None
    workspace_mode: Literal["rw", "ro", "quarantine"] | None
    container_name: str
    container_id: str
    network: str | None
    limits: JsonObject
    loosened: list[str]
    user: JsonObject  # agent_uid, host_uid, host_gid, from
    masked: list[str]
    protected: list[str]
    secrets: list[str]
    env: list[str]  # names only
    env_missing: list[str]  # the profile's names kp-run's environment did not have (the agent ran without them)
    credentials: list[JsonObject]  # name, mode, upstream, source (described, never the value), env, endpoint, ...
    credentials_missing: list[str]  # the profile's credentials not set up on the host (the agent ran without them)
    budgets: dict[str, JsonObject]  # credential name or host -> requests, bytes (the run's limits)
    budget_used: dict[str, JsonObject]  # after the run: requests, bytes, limit, exceeded
    allow: list[str]
    resolve: list[str]  # --resolve pins, NAME=ADDRESS
    kernel_quotas: JsonObject
    engine: str
    image_transfer: JsonObject
    git_planted: list[JsonObject]
    git_changes: list[str]  # in quarantine: the changes that touch git metadata (gitguard)
    git_problem: str
    started: str
    finished: str
    exit_code: int | None
    signal: str
    timed_out: bool
    outcome: str
    oom_killed: bool
    container_removed: bool
    setuid_files: list[str]
    mounted: bool
    quarantine: JsonObject
    fingerprints: JsonObject
    applied: str
    applied_count: int
    applied_paths: list[str]  # a partial apply: every path applied so far (the rest stays quarantined)
    review: str  # the id of the reviewed snapshot an apply or export worked from
    findings: list[JsonObject]  # an apply's or export's findings (finding records without kind)
    accepted: list[JsonObject]  # those of them at or above --fail-on that --accept or --force took in
    exported: JsonObject  # kp-run --apply --to-branch: repository, branch, commit, not_exported
    egress_log: str
    egress: dict[str, int]  # decisions by kind
    audit_log: str
    audit_mode: str
    audit_cap: int | None
    audit_blind: list[str]
    audit_tracer: Literal["seccomp-bpf", "attached"]  # strace started the runtime (its filter applies), or -p
    audit_setup_lines: int  # the audit log's first lines that are the container runtime's own (readers skip them)
    audit: Literal["complete", "incomplete", "capped"]
    audit_problem: str
    audit_capped: JsonObject
    audit_unaccounted: JsonObject
    audit_copy: JsonObject  # in a VM: the host's copy of the guest's log (from, bytes, sha256, verified)
    evidence: JsonObject  # the chained logs sealed in the host's index: logs, signed, key, sealed; or problem


class FindingRecord(TypedDict, total=False):
    """kp-review --findings: one thing in a quarantine's changes that a rule asks a person to look at."""

    kind: Required[Literal["finding"]]
    name: Required[str]  # the run
    id: str  # the run's id
    review: Required[str]  # the id of the snapshot it was found in
    severity: Required[Literal["info", "low", "medium", "high", "critical"]]
    rule: Required[str]
    path: str  # absent for a finding about the whole change (mass-deletion, large-addition)
    path_b64: str  # the exact bytes, when the path is not UTF-8
    line: int  # in the new file
    excerpt: str  # the line, every secret in it redacted, escaped
    fingerprint: str  # of a secret: "sha256:" and the first 16 hex digits of its SHA-256
    message: Required[str]


EventType = Literal["exec", "file", "net", "process", "signal", "exit", "syscall", "attach", "detach", "tracer",
                    "parse_error", "unaccounted"]


class EventRecord(TypedDict, total=False):
    """kp-trace: one system call, signal, exit or tracer message (kodepipe-events(7) says each key)."""

    kind: Required[Literal["event"]]
    schema: Required[int]
    type: Required[EventType]
    line: Required[int | None]
    ts: Required[float | None]
    pid: Required[int | None]
    tid: Required[int | None]
    ppid: int | None
    exe: str | None
    exec_id: int
    denied: bool
    seccomp: bool
    syscall: str
    args: list[str]
    ret: str
    outcome: str
    errno: str | None
    duration: float | None
    op: str
    path: str | None
    path_b64: str
    target: str | int | None  # None: strace did not print it (a call resumed after its start was skipped)
    fd: int | None
    flags: str
    write: bool
    resolved: str
    bytes: int | None
    argv: list[str]
    argv_truncated: bool
    family: str | None
    socket: str | None
    address: JsonObject | None
    peer_fd: int | None
    peer_socket: str | None
    child: int | None
    thread: bool
    code: int | None
    signal: str | None
    core_dumped: bool
    superseded_by: int
    stopped: bool
    info: JsonObject
    message: str
    raw: str
    reason: str
    change: str  # unaccounted
    entry: str
    against: str
    complete: bool
    more: int
    run: str  # in a run's timeline (kp-trace RUN): the run's name and id
    run_id: str
    why: str
    container: str  # the container record the trace came from


class SummaryRecord(TypedDict, total=False):
    """kp-trace --summary: one item of what a trace did."""

    kind: Required[Literal["summary"]]
    item: Required[Literal["file_written", "file_read", "exec", "net", "denied", "egress", "review", "totals"]]
    path: str | None
    action: str  # review: the review log's action, counted
    ops: list[str]
    count: int
    argv: list[str]
    pid: int | None
    ppid: int | None
    exec_id: int
    exit_code: int | None
    signal: str | None
    line: int
    op: str
    address: JsonObject | None
    outcomes: dict[str, int]
    type: str
    syscall: str
    errno: str | None
    exe: str | None
    decision: str
    dns: bool
    host: str | None
    events: int
    by_type: dict[str, int]
    files_written: int
    files_read: int
    programs: int
    destinations: int
    denied: int
    parse_errors: int
    container: str


class EgressRecord(TypedDict, total=False):
    """One decision of kp-run's egress proxy, from the run's egress log (kp-trace passes them on)."""

    kind: Required[Literal["egress"]]
    decision: Required[Literal["allow", "deny", "error"]]
    ts: Required[float]
    container: Required[str | None]
    method: str | None  # null when the request could not be read
    host: str | None
    port: int | None
    address: str | None
    addresses: list[str]
    qtype: str
    sni: str | None
    reason: str
    bytes_up: int
    bytes_down: int
    dropped: int
    seconds: float
    credential: str  # at a credential's endpoint: its name (never its value or token)
    path: str  # at a credential's endpoint: the path upstream, without its query
    injected: bool  # the credential's real value went upstream with this request
    budget: str  # the budget (credential name or host) this request was over
    run: str  # in a run's timeline (kp-trace): the run's name and id
    run_id: str


class ReviewRecord(TypedDict, total=False):
    """One entry of a run's review log (review.jsonl, hash-chained): its quarantine's changes when it
    ended, what a kp-review showed, an apply or an export.  kp-trace puts them in the run's timeline."""

    kind: Required[Literal["review"]]
    ts: Required[float]
    action: Required[Literal["quarantine", "findings", "apply", "export", "discard"]]
    run: Required[str | None]
    run_id: Required[str | None]
    changes: list[JsonObject] | int  # quarantine: each change (path, change, type, mode); findings: how many
    count: int  # quarantine: the changes; apply: those applied
    more: int  # quarantine: changes past the first 10,000, not listed
    review: str | None  # the snapshot's id
    findings: list[JsonObject]
    accepted: list[JsonObject]
    applied: list[JsonObject]
    exported: JsonObject
    forced: bool
    resumed: bool  # an apply that finished one interrupted before
    discarded: int  # discard: the changes thrown away


class HeadRecord(TypedDict, total=False):
    """One line of the host's evidence index (STATE/evidence/index.jsonl): a log's sealed chain head."""

    kind: Required[Literal["head"]]
    ts: Required[float]
    run: Required[str]
    run_id: Required[str]
    log: Required[str]  # its file name in the run's folder
    entries: Required[int]
    bytes: Required[int]
    lines: Required[int]
    head: Required[str]  # the last entry's link (SHA-256, hex)
    prev: Required[str]  # the SHA-256 of the index's line before this one
    key: str  # the signing key's fingerprint
    sig: str  # ed25519, base64, over the head and prev


class VerifyRecord(TypedDict, total=False):
    """kp-trace --verify: a run's logs checked against their chains and the index's sealed heads."""

    kind: Required[Literal["verify"]]
    name: Required[str | None]
    id: Required[str | None]
    verified: Required[bool]
    signed: Required[bool]  # every head checked was signed and its signature verified
    logs: Required[list[JsonObject]]  # per log: log, ok, entries, lines, bytes, signed; problem, entry, first_line
    problem: str  # the first problem found, when not verified
    index_problem: str  # the index's own chain is broken
    error: ErrorObject


class EmitRecord(TypedDict, total=False):
    """kp-run --emit --json: after the Kubernetes objects, what they are and what of the policy they do not hold."""

    kind: Required[Literal["emit"]]
    name: Required[str]  # the run's name
    objects: Required[list[str]]  # KIND/NAME, in the order to apply them
    not_carried: Required[list[JsonObject]]  # control, why, instead
    loosened: Required[list[str]]
    k8s_version: Required[str]  # the Kubernetes schema the objects are checked against
    secrets_to_create: list[JsonObject]  # secret, key, from: kubectl create secret generic before applying
    seccomp: JsonObject  # localhost (the profile's path under the kubelet's seccomp root), configmap
    local: dict[str, str]  # --local: what the podman kube play variant changed, and why


class ContainerImageRecord(TypedDict, total=False):
    """kp-image base: the local container base image kp-run's profile images are built on."""

    kind: Required[Literal["container-image"]]
    name: Required[str]  # its tag: localhost/kodepipe-base:SUITE
    image_id: str | None
    size: int | None  # bytes
    created: str | None
    suite: str
    mirror: str
    profile: str
    build_seconds: float
    error: ErrorObject


class ResultRecord(TypedDict, total=False):
    """kp-ssh: what a command in a VM did."""

    kind: Required[Literal["result"]]
    name: Required[str]
    vm_id: Required[str | None]
    command: Required[list[str]]
    exit_status: Required[int]
    stdout: Required[str]
    stdout_base64: str  # the exact bytes, when they are not UTF-8
    stderr: Required[str]
    stderr_base64: str
    seconds: Required[float]
    error: ErrorObject


class TraceRecord(TypedDict, total=False):
    """kp-trace -- COMMAND: the traced command, before (running) and after (exited) its events."""

    kind: Required[Literal["trace"]]
    id: Required[str]
    mode: Required[str]
    command: Required[list[str]]
    strace: Required[list[str]]
    log: Required[str | None]
    blind: Required[list[str]]
    state: Required[TraceState]
    exit_code: NotRequired[int | None]
    signal: NotRequired[str | None]


# Keys of an object's metadata file (meta.json) that never reach a record: they identify processes of
# this boot, which mean nothing on a pipe (container.folders.PRIVATE strips them; vm's "boot" is spread).
META_ONLY: dict[str, frozenset[str]] = {
    "container": frozenset({"pid", "pid_start", "boot_id", "container_pid", "container_pid_start"}),
    "vm": frozenset({"boot", "boot_id"}),
}


@dataclass(frozen=True)
class Kind:
    name: str
    record: type  # the TypedDict
    states: type[_Described] | None
    meaning: str
    written_by: tuple[str, ...]


KINDS: dict[str, Kind] = {kind.name: kind for kind in (
    Kind("image", ImageRecord, ImageState, "a golden VM image", ("kp-image", "kp-ls", "kp-rm")),
    Kind("vm", VmRecord, VmState, "a clone of an image: a VM", ("kp-clone", "kp-boot", "kp-ip", "kp-stop",
                                                                  "kp-ls", "kp-rm")),
    Kind("container", ContainerRecord, ContainerState, "a kp-run: its container, its folder and how it ended",
         ("kp-run", "kp-ls", "kp-rm")),
    Kind("disk", DiskRecord, DiskState, "an encrypted data disk VMs keep across clones", ("kp-disk", "kp-ls",
                                                                                         "kp-rm")),
    Kind("container-image", ContainerImageRecord, None, "the local container base image of kp-run's profiles",
         ("kp-image base",)),
    Kind("result", ResultRecord, None, "a command run in a VM over SSH", ("kp-ssh",)),
    Kind("trace", TraceRecord, TraceState, "a command kp-trace ran under strace", ("kp-trace",)),
    Kind("event", EventRecord, None, "one system call, signal, exit or tracer message (kodepipe-events(7))",
         ("kp-trace",)),
    Kind("summary", SummaryRecord, None, "one item of a trace's summary (kp-trace --summary)", ("kp-trace",)),
    Kind("egress", EgressRecord, None, "one decision of a run's egress proxy", ("kp-run's egress log", "kp-trace")),
    Kind("finding", FindingRecord, None, "something in a quarantine's changes a review rule flags", ("kp-review",)),
    Kind("review", ReviewRecord, None, "one entry of a run's review log: changes, a review, an apply",
         ("kp-run", "kp-review", "kp-trace")),
    Kind("head", HeadRecord, None, "a log's sealed chain head, in the host's evidence index", ("kp-run",)),
    Kind("emit", EmitRecord, None, "what kp-run --emit wrote, and what of the policy it could not",
         ("kp-run --emit",)),
    Kind("verify", VerifyRecord, None, "a run's logs checked against their hash chains", ("kp-trace --verify",)),
)}


# what kp-ls can show: "gone" is only a refreshed record of something removed
NOT_LISTED = frozenset({"gone"})


def listed_states() -> dict[str, str]:
    """Every state kp-ls can show (kp-ls --state), in the order of the kinds, each with its meaning
    for every kind that has it ("image: ...; vm: ...")."""
    meanings: dict[str, list[str]] = {}
    for kind in ("image", "vm", "container", "disk"):
        for state in KINDS[kind].states or ():
            if state not in NOT_LISTED:
                meanings.setdefault(str(state), []).append(f"{kind}: {state.meaning}")
    return {state: "; ".join(said) for state, said in meanings.items()}


# -- checking a record against its kind ------------------------------------------------------------

_JSON_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", type(None): "null",
               list: "an array", dict: "an object"}


def _hints(record_type: type) -> dict[str, Any]:
    return typing.get_type_hints(record_type)


def _fits(value: object, hint: Any, strict: bool) -> str | None:
    """None if ``value`` is of JSON type ``hint``, else what was expected."""
    if hint is Any:
        return None
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        return None if any(_fits(value, option, strict) is None for option in options) else \
            " or ".join(_describe(option) for option in options)
    if origin is Literal:
        return None if value in typing.get_args(hint) and type(value) is not bool else _describe(hint)
    if origin is list:
        if not isinstance(value, list):
            return "an array"
        (item,) = typing.get_args(hint)
        bad = any(_fits(v, item, strict) is not None for v in value)
        return f"an array of {_describe(item, plural=True)}" if bad else None
    if origin is dict:
        if not isinstance(value, dict):
            return "an object"
        _, item = typing.get_args(hint)
        bad = any(_fits(v, item, strict) is not None for v in value.values())
        return f"an object of {_describe(item, plural=True)}" if bad else None
    if isinstance(hint, type) and issubclass(hint, StrEnum):
        return None if isinstance(value, str) and value in hint.__members__.values() else _describe(hint)
    if typing.is_typeddict(hint):
        if not isinstance(value, dict):
            return "an object"
        found = problems(value, strict=strict, record_type=hint)
        return "an object without these problems: " + "; ".join(found) if found else None
    if hint is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint is type(None) or hint is None:
        return None if value is None else "null"
    if isinstance(hint, type):
        return None if isinstance(value, hint) else _JSON_NAMES.get(hint, hint.__name__)
    raise TypeError(f"the schema uses a type it cannot check: {hint!r}")


_PLURAL = {str: "strings", int: "integers", float: "numbers", bool: "booleans"}


def _describe(hint: Any, plural: bool = False) -> str:
    """A JSON type in words: "a string", "an array of strings", "one of running, stopped"."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " or ".join(f'"{v}"' if isinstance(v, str) else repr(v) for v in typing.get_args(hint))
    if isinstance(hint, type) and issubclass(hint, StrEnum):
        members = list(hint.__members__.values())
        return "an error code (kodepipe(7))" if hint is Code else "one of " + ", ".join(members)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(option, plural) for option in typing.get_args(hint))
    if origin is list:
        return "arrays" if plural else "an array of " + _describe(typing.get_args(hint)[0], plural=True)
    if hint is None or hint is type(None):
        return "null"
    if hint is ErrorObject:
        return "error objects" if plural else "an error object"
    if origin is dict and typing.get_args(hint)[1] is not Any:
        return "objects" if plural else "an object of " + _describe(typing.get_args(hint)[1], plural=True)
    if origin is dict or typing.is_typeddict(hint) or hint is dict:
        return "objects" if plural else "an object"
    if hint is Any:
        return "values" if plural else "any value"
    return _PLURAL[hint] if plural and hint in _PLURAL else _JSON_NAMES.get(hint, str(hint))


def problems(record: JsonObject, *, strict: bool = False, record_type: type | None = None) -> list[str]:
    """What is wrong with ``record`` for its kind: a missing key, a key of the wrong JSON type, a
    state its kind does not have.  A record of a kind not listed here has no problems (a stage
    passes it through), unless ``strict``, which also reports keys its kind does not list."""
    if record_type is None:
        kind = record.get("kind")
        spec = KINDS.get(kind) if isinstance(kind, str) else None
        if spec is None:
            return [f"unknown kind {kind!r}"] if strict else []
        record_type = spec.record
    hints = _hints(record_type)
    required: frozenset[str] = getattr(record_type, "__required_keys__", frozenset())
    found = [f"no {key!r}" for key in sorted(required - record.keys())]
    for key, value in record.items():
        if key not in hints:
            if strict:
                found.append(f"{key!r} is not a key of its kind")
            continue
        if typing.is_typeddict(hints[key]) and isinstance(value, dict):
            found.extend(f"{key!r}: {problem}" for problem in problems(value, strict=strict,
                                                                         record_type=hints[key]))
            continue
        expected = _fits(value, hints[key], strict)
        if expected is not None:
            found.append(f"{key!r} must be {expected}, got {_JSON_NAMES.get(type(value), type(value).__name__)}"
                         + (f" {value!r}" if isinstance(value, (str, int, float)) and len(repr(value)) < 60 else ""))
    return found


def keys(kind: str) -> dict[str, str]:
    """The keys of a kind's records, each with its JSON type in words (for kodepipe(7))."""
    return {key: _describe(hint) for key, hint in _hints(KINDS[kind].record).items()}
