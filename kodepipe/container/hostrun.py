"""One kp-run on this host: learn, stage, start, watch, clean up, and say what happened.

The container's policy is a policy.Policy, rendered by render.py; Podman is
reached through engine.py; the quarantine's bookkeeping is quarantine.py.
This module owns the order of things (backend.py's, for the host):

  learn(policy) -> HostFacts       reads and probes only: nothing written, no service started
  check (backend.py)               what the host cannot honour is refused here
  Run.stage() -> Staged            the side effects: the run's folder, the overlay, the secrets'
                                   copies, the mask file, the repositories' read-only binds,
                                   /etc/hosts and resolv.conf, the Podman service
  render(policy, facts, staged)    the Sandbox (render.py, pure)
  Run.start(box, staged) -> Started  create, init, the container's pid, its mounts checked, its
                                   quotas, the proxy and the tracer attached
  Run.attached_run(started)        start it and copy its output until it exits
  Run.finish(...) -> the record

Each stage returns an immutable value the next one takes; what a stage made
that must not outlive the run (the folder, the mounts, the container, the
proxy, the tracer) is the Run's, a context manager whose exit guarantees,
however the run ends (exit, time limit, Ctrl-C, SIGTERM, an error half way),
that the container is removed, the overlay unmounted, the secrets' copies
deleted, and the folder either gone or a truthful description of what is
left to review.  A run that fails carries its partial record on the
exception (KpError.record).
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import secrets as pysecrets
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kodepipe.audit import cap as auditcap
from kodepipe.container import evidence, folders, sandbox
from kodepipe.container.backend import Learned
from kodepipe.container.evidence import AUDIT_LOG, EGRESS_LOG
from kodepipe.container.policy import Policy, Quotas
from kodepipe.container.render import Facts, render
from kodepipe.container.render import Staged as RenderStaged
from kodepipe.core import paths, proc
from kodepipe.core.errors import BadInput, Interrupted, KpError, NoPermission
from kodepipe.core.records import Record
from kodepipe.core.state import Store, new_id, now_iso
from kodepipe.host import hostpath

STRACE_ATTACH_WAIT = 10.0
STRACE_END_WAIT = 10.0
TRACER_ERRORS = "strace.err"  # what an audit's strace says, when the runtime's create started it
# Tests only: kp-run stops itself (SIGSTOP) at the named point, so that a test can SIGKILL it
# exactly there.  The one point: "container-created" (Podman made the container, meta.json
# does not have its id yet).
STOP_AT = "KODEPIPE_TEST_STOP_AT"


def _checkpoint(point: str) -> None:
    if os.environ.get(STOP_AT) == point:
        os.kill(os.getpid(), signal.SIGSTOP)


def refuse(policy: Policy) -> None:
    """What the host cannot do for this policy, before anything is built or started: run as non-root."""
    if os.geteuid() != 0:
        raise NoPermission(
            "kp-run needs root (run it with sudo): it uses rootful Podman with a user namespace, the one "
            "set-up that both enforces the limits and keeps workspace files owned by you",
            hint="sudo kp-run ...; files the agent writes are still owned by you (SUDO_UID)")


def new_name() -> str:
    return f"run-{pysecrets.token_hex(4)}"


@dataclass(frozen=True, kw_only=True)
class HostFacts(Learned):
    """What the host backend learned for one policy (``learn``): read and probed, nothing written,
    no service started.  It holds the workspace's fd (through its git Guard): ``close`` it, or use
    it as a context manager."""

    workspace: Path | None  # the real, checked directory (never /, a home, or a home's dot-directory)
    uid: int  # the host ids the agent's files belong to (never root), and where they came from
    gid: int
    uid_from: str
    masked: tuple[str, ...] = ()  # workspace-relative regular files the policy's masks hide
    credentials: tuple[str, ...] = ()  # files that look like credentials and are not masked
    setid_before: frozenset[str] = frozenset()  # setuid/setgid files in the workspace before the run
    git: Any = None  # gitguard.Guard: the workspace's repositories, and the workspace's fd
    seccomp: Path  # where the derived seccomp profile is (written by stage if it is not there yet)
    seccomp_text: bytes = field(repr=False)
    oci_runtime: str | None
    quotas: Quotas  # the run's share of this host's per-user kernel quotas
    egress: Any = None  # egress.Policy: the proxy's rules and pins, when the policy allows domains
    warnings: tuple[str, ...] = ()  # what to tell the user once the run goes ahead

    def close(self) -> None:
        if self.git is not None:
            self.git.close()

    def __enter__(self) -> HostFacts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def learn(policy: Policy) -> HostFacts:
    """The host's facts for ``policy``: reads and probes only (the workspace, the invoking user, the
    masks, the repositories, the seccomp profile's text, the OCI runtime, the quotas)."""
    from kodepipe.container import engine, seccomp

    refuse(policy)
    ws = sandbox.check_workspace(Path(policy.workspace)) if policy.workspace is not None else None
    uid, gid, source = sandbox.invoker(ws)
    egress_policy = None
    if policy.egress is not None:
        from kodepipe.egress import proxy as egress

        egress_policy = egress.Policy.build(policy.egress.rules, policy.egress.pins, policy.credentials,
                                            policy.budgets)
        if egress_policy.intercepted_hosts():  # interception mode: the run's own CA, in memory only
            from kodepipe.egress.ca import RunCA

            egress_policy.ca = RunCA(egress_policy.intercepted_hosts(), policy.name or "run")
    seccomp_path, seccomp_text = seccomp.planned(paths.cache_dir() / "seccomp")
    facts = HostFacts(name="host", workspace=ws, uid=uid, gid=gid, uid_from=source, seccomp=seccomp_path,
                      seccomp_text=seccomp_text, oci_runtime=engine.oci_runtime(),
                      quotas=sandbox.host_quotas().share(policy.quota_share), egress=egress_policy)
    if ws is None:
        return facts
    from kodepipe.host import gitguard

    # everything in the workspace is found and opened from this fd, never through a symlink
    ws_fd = hostpath.open_workspace(ws)
    try:
        masked, credentials, setid = sandbox.scan(ws_fd, policy.masks)
        git = gitguard.Guard.survey(ws_fd, writable=policy.git_writable,
                                    direct=not policy.quarantine and not policy.read_only_workspace)
    except BaseException:
        os.close(ws_fd)
        raise
    try:
        warnings = list(git.warnings(ws))
        if credentials:
            shown = ", ".join(credentials[:8]) + (" ..." if len(credentials) > 8 else "")
            warnings.append(f"the workspace holds files that look like credentials, and the agent can "
                            f"read them: {shown} (hide them with --mask GLOB)")
        if source == "nobody" and not policy.read_only_workspace:
            warnings.append(f"{ws} belongs to root and kp-run was not started through sudo: the agent runs "
                            f"as host uid {uid} and cannot write it (chown the workspace to its user, "
                            "or run kp-run through sudo)")
        return replace(facts, masked=tuple(masked), credentials=tuple(credentials),
                       setid_before=frozenset(setid), git=git, warnings=tuple(warnings))
    except BaseException:
        git.close()
        raise


@dataclass(frozen=True)
class Staged:
    """What the run's side effects produced (``Run.stage``), for render and start."""

    folder: Path
    facts: Facts  # what render takes of the machine: the bound workspace (the overlay's, in quarantine)
    staged: RenderStaged  # what render takes of the side effects: secrets' copies, mask file, hosts
    upper: Path | None = None  # the quarantine's upper dir
    binds: Any = None  # hostpath.Staging: the repositories' read-only binds, until the container has its own
    expect: tuple[Any, ...] = ()  # hostpath.Expect: the container's mounts, checked before it starts
    snapshot_before: Any = None  # crosscheck.Snapshot: an audited direct run's workspace, before it


@dataclass(frozen=True)
class Started:
    """The container, created and initialised with its mounts checked and its quotas set: nothing of
    the agent has run yet."""

    cid: str
    pid: int  # its first process, as the host sees it
    pid_start: int | None


def _with_record(exc: BaseException, record: Record) -> None:
    """The partial record of a failed run, on the exception (KpError.record); kp-run writes it."""
    if isinstance(exc, KpError | Interrupted):
        exc.record = record
    else:  # KeyboardInterrupt, or a bug: kp-run reads it with getattr all the same
        setattr(exc, "record", record)  # noqa: B010


class Run:
    """One run on this host: a context manager that owns what the run makes (its folder, the overlay, the
    secrets' copies, the staging binds, the container, the proxy, the tracer) and, on leaving, whatever
    happened, ends and removes what must not outlive it (``finish``, exactly once)."""

    def __init__(self, store: Store, policy: Policy, facts: HostFacts, say: Callable[[str, str], None], *,
                 name: str | None = None, connect: Callable[[Callable[[str], None]], Any] | None = None) -> None:
        if policy.image is None:
            raise RuntimeError("kp-run: the profile's image was not built")
        self.store, self.policy, self.facts, self.say = store, policy, facts, say
        self.image: str = policy.image
        self.keep = policy.keep  # also set when the container could not be removed
        self.name = name or policy.name or new_name()
        self._connect = connect
        # the record in progress (meta.json once the folder exists)
        self.meta: dict[str, Any] = {"kind": "container", "name": self.name}
        # what the run owns, as each stage makes it: finish ends each one that exists
        self.folder: Path | None = None
        self.staged: Staged | None = None
        self.engine: Any = None  # engine.Engine (another one if kp-run had to start the service again)
        self.made = False  # a container may exist: create was asked for
        self.cid: str | None = None
        self.container_pid: int | None = None  # the container's first process, as the host sees it
        self.container_pid_start: int | None = None
        self.proxy: Any = None
        self.strace: subprocess.Popen[bytes] | proc.Foreign | None = None
        self.wrapped = False  # the audit's strace starts the OCI runtime (seccomp-bpf), not attached with -p
        self.plan: Path | None = None  # its plan for the runtime's create, until the create is done
        self.strace_said: collections.deque[str] = collections.deque(maxlen=4)
        self.tracer_watch: threading.Thread | None = None
        self.audit_cap: auditcap.SizeCap | None = None
        self.chainer: Any = None  # core.chain.Follower of the audit log
        self.tracer_reader: threading.Thread | None = None
        self.audit_problem: str | None = None  # why the audit log is incomplete, when it is
        self.timed_out = False
        self.ending = False  # finish() has begun: what ends now is kp-run's doing
        self.finished: Record | None = None

    @property
    def egress(self) -> Any:
        return self.facts.egress

    def __enter__(self) -> Run:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        """However the run ends, finish it (once); a failure carries the record of the run so far."""
        from kodepipe.container import engine

        if exc is None:
            if self.finished is None:  # left without finishing (a caller's early return)
                self.finish(None, "failed")
            return
        if self.ending:  # finish itself failed (its last metadata could not be written: a full disk)
            if not isinstance(exc, KpError):
                return
            _with_record(exc, self._view(self.meta))
            return
        lost = isinstance(exc, engine.EngineLost)
        record = self.finish(None, "engine-lost" if lost else "failed" if isinstance(exc, Exception)
                             else "interrupted")
        if lost:
            # say what became of the container, which outlived the service
            done = ("kp-run started the service again, and stopped and removed the container"
                    if record.get("container_removed") else
                    f"kp-run stopped the container's processes, but could not remove it: kp-rm {self.name} "
                    "does, once Podman answers")
            told = engine.EngineLost(f"{exc.args[0] if exc.args else exc}; {done}")
            told.record = record
            raise told from None
        _with_record(exc, record)

    def run(self) -> tuple[Record, int | None]:
        """The stages in their order; the record and the command's exit status."""
        staged = self.stage()
        box = render(self.policy, staged.facts, staged.staged)
        started = self.start(box, staged)
        status = self.attached_run(started)
        return self.finish(status, "timed-out" if self.timed_out else "exited"), status

    # -- staging ----------------------------------------------------------------

    def stage(self) -> Staged:
        """The side effects, in order; a failure half way leaves only what finish ends."""
        from kodepipe.container import engine, seccomp

        policy, facts = self.policy, self.facts
        if self.staged is not None:
            raise RuntimeError("kp-run: staged twice")
        for warning in facts.warnings:
            self.say("warn", warning)
        ws = facts.workspace
        if facts.egress is not None:
            import resource

            # the proxy holds two descriptors per connection: use the whole hard limit
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            if soft < hard:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        seccomp_path = seccomp.write(facts.seccomp, facts.seccomp_text)
        progress: Callable[[str], None] = lambda m: self.say("progress", m)  # noqa: E731
        self.engine = self._connect(progress) if self._connect is not None else engine.Engine.connect(progress)

        with self.store.lock(self.name):
            self.meta = {"kind": "container", "name": self.name, "id": new_id(), "created": now_iso(),
                         "state": "creating", "host": "local", "image": self.image, "profile": policy.profile,
                         "command": list(policy.command), "workspace": str(ws) if ws else None,
                         # Podman's name for the container, on record before it is asked to make one:
                         # kp-rm finds it by this name (and the run's id label) if kp-run dies before
                         # it learns the container's id
                         "container_name": self.name,
                         "pid": os.getpid(), "pid_start": proc.start_time(os.getpid()),
                         "boot_id": proc.boot_id(),
                         **({"evidence": {"signed": True}} if policy.sign else {})}
            with self.store.creating("container", self.name, self.meta) as made:
                self.folder = folder = made
        os.chmod(folder, 0o700)

        bound = str(ws) if ws is not None else None
        upper = merged = None
        if policy.quarantine and ws is not None:
            from kodepipe.container import quarantine

            upper, work = quarantine.prepare(folder)
            info = ws.stat()
            # the overlay's root takes its owner and mode from the upper dir
            os.chown(upper, info.st_uid, info.st_gid)
            os.chmod(upper, stat.S_IMODE(info.st_mode))
            merged = folder / folders.MERGED
            merged.mkdir()
            # no redirects or metacopy (the upper dir then holds whole files kodepipe can review),
            # and nothing setuid or a device node comes to life through it
            proc.run(["mount", "-t", "overlay", "overlay", "-o",
                      f"lowerdir={ws},upperdir={upper},workdir={work},redirect_dir=off,metacopy=off,"
                      "index=off,nosuid,nodev", merged])
            bound = str(merged)

        secret_list = []
        if policy.secrets:
            private = folder / "secrets"
            private.mkdir(mode=0o700)
            os.chown(private, facts.uid, facts.gid)
            for n, spec in enumerate(policy.secrets):
                src = Path(spec.source)
                copy = private / f"{n}-{src.name}"
                hostpath.copy_secret(src, copy)  # never through a symlink anyone but root could have left
                os.chown(copy, facts.uid, facts.gid)
                os.chmod(copy, 0o400)
                secret_list.append(sandbox.Secret(copy, spec.dest, str(src)))
        mask_file = None
        if facts.masked:
            empty = folder / "empty"
            empty.touch()
            os.chmod(empty, 0o444)
            mask_file = str(empty)
        protect: list[str] = []
        protect_sources: dict[str, str] = {}
        binds = None
        expect: list[Any] = []
        git = facts.git
        if git is not None and bound is not None:
            # the repositories, bound read-only from fds (gitguard.py), and every mount the container
            # gets from the workspace, checked in it before it starts (start)
            root = git.root_fd if merged is None else \
                os.open(merged, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            binds = hostpath.Staging(folder / "binds")
            try:
                protect, protect_sources, expect = git.stage(root, binds, sandbox.WORKSPACE, same=merged is None)
                expect += hostpath.expect_tree(root, sandbox.WORKSPACE, policy.read_only_workspace, facts.masked,
                                               mask_file)
            except BaseException:
                binds.close()
                raise
            finally:
                if root != git.root_fd:
                    os.close(root)
        try:
            hosts = folder / "hosts"
            hosts.write_text(sandbox.hosts_text(self.name))  # the same file on every backend
            os.chmod(hosts, 0o444)
            extra_mounts, extra_env = [sandbox.Mount(str(hosts), "/etc/hosts", True)], {}
            if facts.egress is not None:
                from kodepipe.egress import proxy as egress

                resolv = folder / "resolv.conf"
                resolv.write_text(egress.RESOLV_CONF)
                os.chmod(resolv, 0o444)
                extra_mounts.append(sandbox.Mount(str(resolv), "/etc/resolv.conf", True))
                extra_env = egress.container_env()
                if facts.egress.ca is not None:  # the run's CA in the trust store, its key not
                    from kodepipe.egress.credentials import TRUST_ENV, TRUST_STORE

                    trust = folder / "ca-certificates.crt"
                    trust.write_bytes(facts.egress.ca.bundle())
                    os.chmod(trust, 0o444)
                    extra_mounts.append(sandbox.Mount(str(trust), TRUST_STORE, True))
                    extra_env.update(dict.fromkeys(TRUST_ENV, TRUST_STORE))
            rendered = Facts(agent_uid=facts.uid, agent_gid=facts.gid, uid_from=facts.uid_from, workspace=bound,
                             seccomp=str(seccomp_path), oci_runtime=facts.oci_runtime, quotas=facts.quotas,
                             masked=facts.masked, protect=tuple(protect), protect_sources=protect_sources)
            self.meta.update(
                policy.record(),  # the policy's keys, the same on every backend
                user={"agent_uid": sandbox.AGENT_UID, "host_uid": facts.uid, "host_gid": facts.gid,
                      "from": facts.uid_from},
                masked=list(facts.masked), protected=protect, kernel_quotas=facts.quotas.record(),
                engine=self.engine.url)
            if upper is not None:
                self.meta["quarantine"] = {"path": str(upper)}
            snapshot = None
            if policy.audit is not None and policy.audit.mode != "minimal" and git is not None and upper is None \
                    and not policy.read_only_workspace:
                from kodepipe.audit import crosscheck  # the audit's cross-check (finish): the workspace before

                snapshot = crosscheck.snapshot(git.root_fd)
        except BaseException:
            if binds is not None:
                binds.close()
            raise
        self.staged = Staged(
            folder=folder, facts=rendered, upper=upper, binds=binds, expect=tuple(expect), snapshot_before=snapshot,
            staged=RenderStaged(name=self.name, run_id=self.meta["id"], secrets=tuple(secret_list),
                                mask_file=mask_file, extra_mounts=tuple(extra_mounts), extra_env=extra_env))
        return self.staged

    # -- running ----------------------------------------------------------------

    def start(self, box: sandbox.Sandbox, staged: Staged) -> Started:
        """Create and initialise the container, check its mounts, set its quotas, and attach the proxy and
        the tracer: everything before the agent's first instruction."""
        self.made = True
        self.cid = cid = self.engine.create(box.spec())
        _checkpoint("container-created")
        if self.policy.audit is not None:
            self._plan_audit(cid, staged.folder)
        # its processes and namespaces exist, nothing runs yet: the tracer and the proxy attach
        # now, and its first process is on record, so kp-ls can tell whether it still runs
        try:
            self.engine.init(cid)
        finally:
            if self.plan is not None:  # the create is done: the plan has had its one use
                self.plan.unlink(missing_ok=True)
        pid = int(self.engine.inspect(cid)["State"].get("Pid") or 0)
        if pid <= 0:
            raise KpError("Podman did not say which process the container's is: kp-run cannot set its "
                          "kernel quotas, and does not start it without them")
        self.container_pid, self.container_pid_start = pid, proc.start_time(pid)
        started = Started(cid, pid, self.container_pid_start)
        # the workspace, its read-only repositories and its masks are, in the container, the very files
        # kp-run meant (runc resolved their places in it); then the staging binds have done their job
        wrong = hostpath.verify_mounts(pid, staged.expect)
        if staged.binds is not None:
            staged.binds.close()
        if wrong:
            raise hostpath.UnsafePath("the container's mounts are not what kp-run set up, so it was not started: "
                                      + "; ".join(wrong[:5]),
                                      hint="did something change the workspace meanwhile? try again")
        from kodepipe.container import userns

        # before the agent's first instruction: its share of the kernel's per-user quotas (sandbox.Quotas)
        userns.limit(pid, box.quotas.userns_sysctls())
        self.meta.update(container_id=cid, container_pid=pid, container_pid_start=started.pid_start,
                         state="running", started=now_iso())
        if self.policy.audit is not None:
            from kodepipe.audit import strace

            blind = strace.BLIND[self.policy.audit.mode]
            self.meta.update(audit_log=str(staged.folder / AUDIT_LOG),
                             audit_tracer="seccomp-bpf" if self.wrapped else "attached",
                             audit_blind=blind if self.wrapped else [*blind, strace.ATTACHED_NOTE])
        if self.egress is not None:
            self.meta["egress_log"] = str(staged.folder / EGRESS_LOG)
        self.store.write_meta(staged.folder, self.meta)
        if self.egress is not None:
            self._start_proxy(staged.folder, started)
        if self.policy.audit is not None:
            if self.wrapped:
                self._adopt_strace(staged.folder, started, self.policy.audit)
            else:
                self._attach_strace(staged.folder, started, self.policy.audit)
        return started

    def _plan_audit(self, cid: str, folder: Path) -> None:
        """kp-run --audit on kodepipe's own service: a plan that creates the container under strace
        (strace.runtime_plan), so that strace's seccomp-bpf filter is in every process of it.
        Elsewhere (or with no strace plan possible) strace attaches with -p after the init."""
        from kodepipe.audit import strace

        audit = self.policy.audit
        if audit is None:
            return
        plan = strace.runtime_plan(proc.require("strace"), audit.mode, str(folder / AUDIT_LOG),
                                   str(folder / TRACER_ERRORS))
        self.plan = self.engine.plan_create(cid, self.engine.inspect(cid), plan)
        self.wrapped = self.plan is not None

    def _adopt_strace(self, folder: Path, started: Started, audit: Any) -> None:
        """The tracer the runtime's create started (strace.runtime_wrapper): found as the tracer of the
        container's first process, checked to be strace, watched by its pidfd.  No tracer, no run."""
        tracer_pid = proc.tracer_of(started.pid)
        strace_path = os.path.realpath(proc.require("strace"))
        try:
            if tracer_pid is None:
                raise ProcessLookupError
            tracer = proc.Foreign(tracer_pid)  # held first, then checked: the pid cannot be another's now
            if os.readlink(f"/proc/{tracer_pid}/exe") != strace_path or proc.tracer_of(started.pid) != tracer_pid:
                tracer.close()
                raise ProcessLookupError
        except (OSError, ProcessLookupError):
            raise KpError("the audit's tracer did not take the container (no strace traces its first process): "
                          "kp-run does not start an audit that does not record", code="audit_failed") from None
        self.strace = tracer
        self.audit_cap = auditcap.SizeCap(folder / AUDIT_LOG, audit.cap, tracer,
                                          self._kill_process, lambda m: self.say("warn", f"{self.name}: {m}"))
        self.audit_cap.start()
        from kodepipe.core import chain

        self.chainer = chain.Follower(folder / AUDIT_LOG).start()  # the log's hash chain, as strace writes
        self.tracer_watch = threading.Thread(target=self._watch_tracer, args=(tracer,), daemon=True)
        self.tracer_watch.start()

    def _start_proxy(self, folder: Path, started: Started) -> None:
        from kodepipe.egress import proxy as egress

        tcp, udp = egress.sockets_in_netns(started.pid)
        self.proxy = egress.Proxy(self.egress, egress.DecisionLog(folder / EGRESS_LOG, self.name))
        self.proxy.start(tcp, udp)

    def _attach_strace(self, folder: Path, started: Started, audit: Any) -> None:
        from kodepipe.audit import strace

        args = ["strace", *strace.attach_argv(audit.mode, str(folder / AUDIT_LOG), started.pid)]  # as in a VM
        # its own session: a Ctrl-C on the terminal must not detach the tracer before kp-run
        # has stopped the container
        self.strace = tracer = subprocess.Popen([proc.require("strace"), *args[1:]], stdin=subprocess.DEVNULL,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                                start_new_session=True)
        # the log's size cap: the run is stopped when the log reaches it (auditcap.py); by SIGKILL to
        # its first process, not through Podman, whose kill waits for an end the halted tracer holds up
        self.audit_cap = auditcap.SizeCap(folder / AUDIT_LOG, audit.cap, tracer,
                                          self._kill_process, lambda m: self.say("warn", f"{self.name}: {m}"))
        self.audit_cap.start()
        from kodepipe.core import chain

        self.chainer = chain.Follower(folder / AUDIT_LOG).start()  # the log's hash chain, as strace writes
        # strace says "Process N attached" once it holds every thread; start only then
        said = b""
        stderr = tracer.stderr
        if stderr is None:
            raise KpError("strace could not attach to the container: its stderr is not a pipe")
        deadline = time.monotonic() + STRACE_ATTACH_WAIT
        while b"attached" not in said:
            line = stderr.readline()
            if not line or time.monotonic() > deadline:
                raise KpError(f"strace could not attach to the container: {said.decode(errors='replace')}")
            said += line
        self.tracer_reader = threading.Thread(target=self._read_tracer, args=(stderr,), daemon=True)
        self.tracer_reader.start()
        self.tracer_watch = threading.Thread(target=self._watch_tracer, args=(tracer,), daemon=True)
        self.tracer_watch.start()

    def _tracer_errors(self) -> None:
        """What strace said on its stderr (its plan sends it to a file in the run's folder): the last lines."""
        if self.folder is None:
            return
        with contextlib.suppress(OSError), open(self.folder / TRACER_ERRORS, "rb") as handle:
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - 4096))
            for line in handle.read().decode(errors="replace").splitlines()[-4:]:
                if line.strip():
                    self.strace_said.append(line.strip())

    def _ended_whole(self, log: Path, pid: int) -> bool:
        """Whether a tracer that is not kp-run's child recorded the end of the container's first process
        (its exit or its death by a signal) before it ended: its status is not kp-run's to see, and a
        tracer killed just as the container ended must not leave an audit called complete."""
        end = re.compile(rb"^%d +[\d.:]+ \+\+\+ (exited with|killed by) " % pid, re.M)
        try:
            with open(log, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                handle.seek(max(0, size - (4 << 20)))
                return end.search(handle.read()) is not None
        except OSError:
            return False

    def _setup_lines(self, log: Path, pid: int) -> None:
        """The record's audit_setup_lines: how many of the log's first lines are the runtime's own,
        before the container's first process starts the agent's command (readers skip them)."""
        from kodepipe.audit import strace

        try:
            with open(log, "rb") as handle:
                setup = strace.setup_end(handle, pid)
        except OSError:
            setup = None
        if setup is not None:
            self.meta["audit_setup_lines"] = setup

    def _read_tracer(self, stream: Any) -> None:
        """Keep strace's last messages: they say why it ended, if it ended early."""
        for line in stream:
            text = line.decode(errors="replace").strip()
            if text and not text.endswith(" attached"):
                self.strace_said.append(text)

    def _watch_tracer(self, tracer: subprocess.Popen[bytes] | proc.Foreign) -> None:
        """A tracer that ends while the container runs leaves the rest of the run unrecorded:
        stop the container then.  strace ends with status 0 when the last process it traces has
        ended; killed or failed, it ends otherwise.  The status of a tracer that is not kp-run's
        child is unknown: it ended early if the container's first process still runs."""
        from kodepipe.container import folders

        status = tracer.wait()
        if self.ending:
            return
        if isinstance(tracer, proc.Foreign):
            if self.container_pid is None or not folders.process_running(self.container_pid,
                                                                         self.container_pid_start):
                return
            self._tracer_errors()
        elif status == 0:
            return
        if self.tracer_reader is not None:
            self.tracer_reader.join(timeout=2.0)  # its last words, up to the end of its stderr
        how = ("ended (killed, or failed: not being its parent, kp-run cannot see its status)"
               if isinstance(tracer, proc.Foreign)
               else f"was killed by {signal.Signals(-status).name}" if status < 0 and -status in signal.valid_signals()
               else f"ended with status {status}")
        said = "; ".join(self.strace_said)
        self.audit_problem = (f"strace (pid {tracer.pid}) {how} while the container ran"
                              + (f" ({said})" if said else "")
                              + ": the audit log misses everything after that, so kp-run stopped the container "
                                "(a run whose audit was asked for does not go on unaudited)")
        self.say("warn", f"{self.name}: the audit's tracer (strace) {how}: stopping the container")
        self._stop_now()

    def _stop_now(self) -> None:
        """SIGKILL the container from another thread: through Podman, or straight to its first
        process (which takes every process of its pid namespace with it) if Podman does not answer."""
        from kodepipe.container import engine

        try:
            engine.Engine(self.engine.url).kill(self.cid or "", "KILL")
        except Exception:
            self._kill_process()

    def _kill_process(self) -> None:
        from kodepipe.container import folders

        pid = self.container_pid
        if pid is not None and folders.process_running(pid, self.container_pid_start):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def attached_run(self, started: Started) -> int:
        """Start, copy the output to stderr until the container exits, and return its status."""
        timer = None
        if self.policy.limits.seconds:
            timer = threading.Timer(self.policy.limits.seconds, self._time_up)
            timer.daemon = True
            timer.start()
        try:
            if self.policy.tty or self.policy.interactive:
                self._terminal_run(started)
            else:
                attached = self.engine.attach(started.cid)
                self.engine.start(started.cid)
                err = sys.stderr.buffer

                def write(data: bytes) -> None:
                    err.write(data)
                    err.flush()

                self.engine.stream(started.cid, {1: write, 2: write}, attached)
            return int(self.engine.wait(started.cid))
        finally:
            if timer is not None:
                timer.cancel()

    def _terminal_run(self, started: Started) -> None:
        """A real terminal for the agent (-t), or kp-run's stdin as the agent's (-i): Podman's own client
        attaches (window size, Ctrl-C).  Standard output carries records, so the agent's output goes where
        the VM backend sends it: to the terminal (-t: /dev/tty when stdout is not one), else to stderr."""
        stdin: Any = None
        stdout: Any = None if self.policy.tty else sys.stderr
        tty = None
        if self.policy.tty and not (os.isatty(0) and os.isatty(1)):
            try:
                tty = open("/dev/tty", "r+b", buffering=0)  # noqa: SIM115 - closed below
            except OSError:
                raise BadInput("-t needs a terminal, and there is none",
                               hint="drop -t, or run kp-run from a terminal") from None
            stdin = None if os.isatty(0) else tty
            stdout = None if os.isatty(1) else tty
        try:
            subprocess.run([proc.require("podman"), "--remote", "--url", self.engine.url, "start",
                            "--attach", "--interactive", started.cid], stdin=stdin, stdout=stdout, check=False)
        finally:
            if tty is not None:
                tty.close()

    def _time_up(self) -> None:
        self.timed_out = True
        self.say("warn", f"{self.name}: the time limit ({self.policy.limits.seconds:g} s) is up; stopping it")
        self._stop_now()

    # -- ending -----------------------------------------------------------------

    def finish(self, exit_code: int | None, outcome: str) -> Record:
        """Remove what should not outlive the run; return the record of what happened."""
        if self.finished is not None:
            return self.finished
        meta = self.meta
        self.ending = True
        staged, facts = self.staged, self.facts
        if self.folder is not None:  # first: nothing below may keep a secret's copy on disk
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(self.folder / "secrets")
        if staged is not None and staged.binds is not None:  # the repositories' staging binds, if still there
            staged.binds.close()
        if self.made and self.engine is not None:
            exit_code = self._end_container(exit_code, outcome)
        if self.proxy is not None:
            self.proxy.stop()
            meta["egress"] = dict(self.proxy.log.counts)
            if self.proxy.ledger.budgets:
                meta["budget_used"] = self.proxy.ledger.record()
            self.proxy.log.close()
        if self.strace is not None:
            try:
                self.strace.wait(timeout=STRACE_END_WAIT)
            except subprocess.TimeoutExpired:
                self.strace.kill()
                self.audit_problem = self.audit_problem or (
                    f"strace did not end within {STRACE_END_WAIT:g} s of the container, and was killed: "
                    "the end of the audit log may be missing")
            if self.tracer_watch is not None:
                self.tracer_watch.join(timeout=STRACE_END_WAIT)
            if self.wrapped and self.folder is not None and self.container_pid is not None:
                self._setup_lines(self.folder / AUDIT_LOG, self.container_pid)
                if not self.audit_problem and not self._ended_whole(self.folder / AUDIT_LOG, self.container_pid):
                    self._tracer_errors()
                    said = "; ".join(self.strace_said)
                    self.audit_problem = ("strace ended without recording the end of the container's first "
                                          "process" + (f" ({said})" if said else "")
                                          + ": the end of the audit log is missing")
        if self.policy.audit is not None and self.strace is not None:
            meta["audit"] = "incomplete" if self.audit_problem else "complete"
            if self.audit_problem:
                meta["audit_problem"] = self.audit_problem
                if outcome == "exited":
                    outcome = "audit-lost"
        if self.chainer is not None:  # strace has ended: the rest of its log is chained
            self.chainer.close()
            if self.chainer.problem:
                self.say("warn", f"{self.name}: {self.chainer.problem}")
        if self.audit_cap is not None:  # the log reached its cap: the run was stopped there
            self.audit_cap.close()
            capped = self.audit_cap.record()
            if self.audit_problem:
                capped.pop("audit", None)
            meta.update(capped)
            if "audit_capped" in capped and outcome == "exited":
                outcome = "audit-capped"
        if isinstance(self.strace, proc.Foreign):  # only now: the cap and the watcher no longer use it
            self.strace.close()
        meta.update(exit_code=exit_code, finished=now_iso(), timed_out=self.timed_out, outcome=outcome)
        if exit_code is not None and 128 < exit_code < 160:  # the shell's convention: killed by a signal
            import signal

            with contextlib.suppress(ValueError):
                meta["signal"] = signal.Signals(exit_code - 128).name
        upper = staged.upper if staged is not None else None
        ws = facts.workspace
        # a direct run that got as far as its container: what the agent left in the workspace
        if ws is not None and staged is not None and upper is None and not self.policy.read_only_workspace:
            from kodepipe.core import fdtree

            try:
                after = set(fdtree.setid_files(ws))  # fd-based and iterative: any depth
            except Exception:
                after = set()
            self._crosscheck_workspace(staged)  # before kp-run itself moves anything (git.check)
            if facts.git is not None:  # planted git metadata: moved away (gitguard)
                facts.git.check(staged.folder, self.name, meta, lambda m: self.say("warn", m))
            report_setid(meta, facts.setid_before, after, self.say)
        keep = self.keep or self.policy.audit is not None or self.egress is not None or "git_planted" in meta
        if self.folder is not None:
            folders.unmount(self.folder)  # the overlay, and any staging bind a failure left behind
            if upper is not None and ws is not None:
                from kodepipe.container import quarantine

                try:
                    changes = quarantine.changes(upper, ws)
                    meta["quarantine"] = {"path": str(upper), **quarantine.summary(changes)}
                    meta["fingerprints"] = quarantine.fingerprint(ws, changes)
                    from kodepipe.audit import crosscheck

                    try:
                        self._crosscheck(crosscheck.from_quarantine(changes), "quarantine")
                    except Exception as exc:  # the quarantine's own record stands whatever happens here
                        meta["audit_unaccounted"] = {"against": "quarantine", "complete": False,
                                                     "why": f"the cross-check failed: {exc!r}"}
                    for finding in quarantine.findings(changes):  # escaped: the agent chose the names
                        self.say("warn", finding)
                    from kodepipe.host import gitguard  # changes to git metadata: --apply refuses them

                    gitguard.report_changes(changes, ws, meta, lambda m: self.say("warn", m))
                    if changes:
                        keep = True
                        meta["state"] = "quarantined"
                except Exception as exc:
                    keep = True
                    meta["state"] = "quarantined"
                    meta["problem"] = ("could not list the quarantined changes: "
                                       f"{exc.message if isinstance(exc, KpError) else repr(exc)}")
            if meta.get("state") != "quarantined":
                meta["state"] = "exited"
            if keep and self.folder.is_dir():
                evidence.close_run(self.folder, meta, lambda m: self.say("warn", f"{self.name}: {m}"))
                self.store.write_meta(self.folder, meta)
            else:
                self.store.discard(self.folder)
        record = self._view(meta)
        if keep and self.folder is not None:
            record["path"] = str(self.folder)
        else:
            record["removed"] = True
        self.finished = record
        return record

    @staticmethod
    def _view(meta: dict[str, Any]) -> Record:
        """The record of ``meta``: without what identifies this boot's processes."""
        return {k: v for k, v in meta.items() if k not in (*folders.PRIVATE, "fingerprints")}

    def _crosscheck_workspace(self, staged: Staged) -> None:
        """An audited direct run: the workspace's snapshot before and after, checked against the trace.
        Never raises: what follows it in finish (moving planted git metadata away) must happen."""
        try:
            self._crosscheck_snapshots(staged)
        except Exception as exc:
            self.meta["audit_unaccounted"] = {"against": "workspace", "complete": False,
                                              "why": f"the cross-check failed: {exc!r}"}

    def _crosscheck_snapshots(self, staged: Staged) -> None:
        before, git = staged.snapshot_before, self.facts.git
        if before is None or git is None or git.root_fd < 0:
            return
        from kodepipe.audit import crosscheck

        if not before.complete:
            self._crosscheck(None, "workspace", before.why)
            return
        after = crosscheck.snapshot(git.root_fd, before.cap)
        if not after.complete:
            self._crosscheck(None, "workspace", after.why)
            return
        self._crosscheck(crosscheck.diff(before.entries, after.entries), "workspace",
                         same=crosscheck.unmoved(before.entries, after.entries))

    def _crosscheck(self, real: list[Any] | None, against: str, why: str | None = None,
                    same: Callable[[str, str], bool] | None = None) -> None:
        """kp-run --audit: the real changes (the quarantine's, or the workspace's) that no file event of the
        trace explains (crosscheck.py): a path another thread rewrote between the tracer's read and the
        kernel's, or a change made outside the traced calls.  In the record as audit_unaccounted."""
        from kodepipe.audit import crosscheck
        from kodepipe.container.quarantine import show

        if self.policy.audit is None or self.strace is None or self.folder is None:
            return
        meta = self.meta
        if why is None:
            if self.policy.audit.mode == "minimal":
                why = "the minimal audit mode records no file events"
            elif self.audit_problem:
                why = "the audit log is incomplete (audit_problem): the trace cannot explain what it missed"
            elif "audit_capped" in meta:
                why = "the audit cap stopped the trace: what the agent did after it is not in the log"
        marks = None
        if why is None:
            try:
                size = (self.folder / AUDIT_LOG).stat().st_size
                if size > 16 << 20:  # it reads about 5 MB a second
                    self.say("progress", f"{self.name}: checking the audit ({size >> 20} MiB) against the real changes")
                marks = crosscheck.read_log(self.folder / AUDIT_LOG, meta.get("audit_setup_lines", 0))
            except OSError as exc:
                why = f"the audit log could not be read: {exc.strerror}"
        if why is not None or marks is None or real is None:
            result = crosscheck.incomplete(against, len(real or ()), why or "nothing to check")
        else:
            result = crosscheck.check(real, marks, against=against, same=same)
        meta["audit_unaccounted"] = result.record()
        if result.unaccounted:
            shown = ", ".join(show(r.path) for r in result.unaccounted[:8])
            more = len(result.unaccounted) - 8
            self.say("warn", f"{self.name}: the audit does not explain {len(result.unaccounted)} change(s) in the "
                             f"{against}: {shown}{f' and {more} more' if more > 0 else ''} (a path another "
                             "thread rewrote between the tracer's read and the kernel's, or a change made "
                             "outside the traced system calls; record: audit_unaccounted)")

    def _end_container(self, exit_code: int | None, outcome: str) -> int | None:
        """Learn how the container ended, stop it if it runs, and remove it (unless --keep);
        through a Podman service started again if kp-run's own died.  The exit code is returned;
        the record gets container_removed (and the run's folder is kept when it is false, so
        that kp-rm can finish the job)."""
        from kodepipe.container import engine

        meta = self.meta

        def end(eng: engine.Engine) -> bool:
            if self.cid is None:  # asked for, but its id never came back: it is known by name
                self.cid = eng.find(self.name, str(meta.get("id")))
                if self.cid is None:
                    return True
                meta["container_id"] = self.cid
            nonlocal exit_code
            try:
                state = eng.inspect(self.cid)["State"]
            except engine.EngineLost:
                raise
            except KpError:
                state = {}
            meta["oom_killed"] = bool(state.get("OOMKilled"))
            if exit_code is None and state.get("Status") == "exited":
                exit_code = int(state.get("ExitCode", 0))
            if outcome != "exited":  # cut short: SIGKILL now, not SIGTERM and a 10 s stop timeout
                eng.kill(self.cid)
            if self.keep:
                return False
            eng.remove(self.cid)  # forced: stops it first if it still runs
            return True

        removed = False
        try:
            try:
                removed = end(self.engine)
            except engine.EngineLost as exc:
                self.engine_lost = exc
                self._kill_process()  # no Podman to ask: end its processes at once
                self.say("warn", f"{self.name}: {exc.message}; " + (
                    "starting it again to remove the container" if getattr(self.engine, "own", False)
                    else "asking it again"))
                self.engine = self.engine.revive(lambda m: self.say("progress", m))
                removed = end(self.engine)
        except KpError as exc:
            self._kill_process()
            if not self.keep:
                self.say("warn", f"{self.name}: could not remove container "
                                 f"{(self.cid or self.name)[:12]}: {exc.message}")
                meta["problem"] = f"its container was stopped but not removed ({exc.message}); kp-rm removes it"
            self.keep = True
        meta["container_removed"] = removed
        return exit_code


def report_setid(meta: dict[str, Any], before: Iterable[str], after: Iterable[str],
                 say: Callable[[str, str], None]) -> None:
    """The setuid/setgid files the agent left in the workspace (in ``after``, not in ``before``: paths
    relative to it): recorded as setuid_files, each shown escaped, and said.  The rule of every backend
    (the host's walk, a VM's find: vmrun.check_setid)."""
    from kodepipe.core import fdtree, terminal

    new = sorted(set(after) - set(before))
    if new:
        meta["setuid_files"] = [fdtree.display(path) for path in new]
        say("warn", "the agent left setuid/setgid files in the workspace: "
                    f"{', '.join(terminal.escape(path) for path in new[:8])}")


def not_run(name: str, outcome: str) -> Record:
    """The record of a run that ended before it made anything (its facts could not be learned)."""
    return {"kind": "container", "name": name, "exit_code": None, "finished": now_iso(), "timed_out": False,
            "outcome": outcome, "removed": True}


def run(store: Store, policy: Policy, say: Callable[[str, str], None], *,
        learned: Callable[[Policy], HostFacts] = learn,
        connect: Callable[[Callable[[str], None]], Any] | None = None) -> tuple[Record, int | None]:
    """Run one container; return its record and the command's exit status (None if it never ran).

    ``learned``: the facts of the host for ``policy`` (HostBackend: learn, then check); ``connect``: the
    engine (tests: a fake one).  However the run ends, the container is gone (or the record says it is
    not), and a failure or an interruption carries the record of the run so far (KpError.record).
    """
    refuse(policy)
    name = policy.name or new_name()
    try:
        facts = learned(policy)
    except BaseException as exc:
        _with_record(exc, not_run(name, "failed" if isinstance(exc, Exception) else "interrupted"))
        raise
    with facts, Run(store, policy, facts, say, name=name, connect=connect) as job:
        return job.run()
