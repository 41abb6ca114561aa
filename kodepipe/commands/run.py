"""kp-run: run a command in an ephemeral, locked-down Podman container."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from kodepipe.commands import cli as kpcli
from kodepipe.commands import options
from kodepipe.container.capabilities import CAPABILITIES as CAPS


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    return options.size(ctx, param, value)  # 0, inf and nan are refused, never the defaults


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is not None and value.strip() in ("0", "none"):
        return 0.0
    return options.duration(ctx, param, value)


@click.command(context_settings={**options.CONTEXT, "allow_interspersed_args": False}, epilog=options.EPILOG)
@click.argument("command", nargs=-1, metavar="[-- COMMAND [ARG]...]")
@click.option("-w", "--workspace", type=click.Path(file_okay=False, path_type=Path),
              help="The one host directory the agent sees, at /workspace (read-write). Refused: /, your home "
                   "directory, or a directory that contains it. With vm records on stdin, a directory in the "
                   "VM (default: /workspace, the folder shared with kp-boot --share).")
@click.option("--read-only-workspace", is_flag=True, help="Mount the workspace read-only (for audits).")
@click.option("--quarantine", is_flag=True,
              help="Mount the workspace as an overlay: the agent's writes land in kodepipe's folder for this "
                   "run and the checkout is untouched until kp-run --apply NAME (kp-rm NAME discards them).")
@click.option("-p", "--profile", metavar="NAME",
              help="Agent profile: image and defaults (shell, claude, aider, codex, gemini, copilot, opencode, or "
                   "your own in ~/.config/kodepipe/profiles). Default: shell.")
@click.option("--image", metavar="IMAGE", help="Run this local image instead of the profile's.")
@click.option("--name", metavar="NAME", help="Name of the run (default: run-XXXXXXXX).")
@click.option("-m", "--memory", callback=_size, metavar="SIZE", help="Memory limit (default: the profile's, 2g).")
@click.option("--cpus", type=options.FiniteRange(0.01, 1024), help="CPU limit in cores (default: the profile's, 2).")
@click.option("--pids", type=click.IntRange(8, 1 << 22), help="Process and thread limit (default: the profile's, 512).")
@click.option("--time", "time_limit", callback=_duration, metavar="DURATION",
              help="Wall-time limit, e.g. 30m, 2h; 0 for none (default: the profile's, 2h).")
@click.option("--tmp-size", callback=_size, metavar="SIZE",
              help="Size of the /tmp tmpfs, which counts against --memory (default: a quarter of it).")
@click.option("--net", "network", type=click.Choice(["none", "open"]), default="none", show_default=True,
              help="none: no network at all (only lo). open: Podman's bridge, full outbound access (loosens "
                   "the sandbox; recorded).")
@click.option("--allow", "allow", multiple=True, metavar="DOMAIN[:PORTS]",
              help="Let the container reach DOMAIN (or *.DOMAIN) on ports 80 and 443 (or PORTS) through kodepipe's "
                   "egress proxy, its only way out (repeatable; added to the profile's; recorded). Every "
                   "decision is logged to the record's egress_log.")
@click.option("--allow-file", "allow_files", multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path), callback=options.regular_file(1 << 20),
              help="Read --allow rules from a file, one per line (# comments).")
@click.option("--resolve", "pins", multiple=True, metavar="NAME=ADDRESS",
              help="Pin an allowed name to an address for the proxy, like curl --resolve (also lets a name reach "
                   "a loopback address, which is otherwise refused).")
@click.option("--no-profile-allow", is_flag=True, help="Ignore the domains the profile allows.")
@click.option("--credential", "credentials", multiple=True, metavar="NAME",
              help="Let the agent use the credential NAME without holding it (repeatable): its real value is read "
                   "on the host and added by the egress proxy to requests for its upstream only; the agent gets a "
                   "per-run token and the proxy's endpoint in its variables (e.g. ANTHROPIC_API_KEY, "
                   "ANTHROPIC_BASE_URL). Built in: anthropic, claude-oauth, openai, gemini; your own in "
                   "~/.config/kodepipe/credentials/NAME.json. The run does not start if the value cannot be read.")
@click.option("--no-profile-credentials", is_flag=True, help="Do not use the credentials the profile declares.")
@click.option("--budget", "budgets", multiple=True, metavar="NAME=REQUESTS[,BYTES]",
              help="At most REQUESTS requests and BYTES bytes (up and down) in this run for a credential NAME or an "
                   "allowed host (repeatable; '-' for no limit of one kind); over it the proxy answers 429 and "
                   "logs it. Credentials bring a default (the record's budgets).")
@click.option("--cap-add", "cap_add", multiple=True, type=click.Choice(CAPS, case_sensitive=False),
              help="Give back one capability (repeatable; loosens the sandbox; recorded).")
@click.option("--writable-root", is_flag=True, help="A writable root filesystem (loosens the sandbox; recorded).")
@click.option("-e", "--env", "env", multiple=True, metavar="NAME",
              help="Pass one environment variable by name (repeatable; recorded by name, never by value). "
                   "NAME=VALUE sets it.")
@click.option("--secret", "secret_specs", multiple=True, metavar="FILE[:DEST]",
              help="Mount one file read-only (default at /run/secrets/NAME; repeatable; recorded).")
@click.option("--mask", "masks", multiple=True, metavar="GLOB",
              help="Also hide workspace files matching GLOB (a name at any depth, or a path with /) behind an "
                   "empty read-only file; the host files are not touched. Always hidden: .env, .env.*")
@click.option("--no-default-masks", is_flag=True, help="Do not hide .env and .env.* (recorded).")
@click.option("--writable-git", "--writable-git-config", "writable_git_config", is_flag=True,
              help="Let the agent write the workspace's git repositories (commit, branch), which are read-only by "
                   "default; after the run, what it added or changed that git reads as configuration, hooks or "
                   "a repository is still moved away (recorded; --writable-git-config is the old name).")
@click.option("-i", "--interactive", is_flag=True,
              help="Keep standard input open to the command (its output goes to stderr: stdout carries records).")
@click.option("-t", "--tty", is_flag=True,
              help="Give the command a terminal (window size, Ctrl-C): the caller's, /dev/tty when stdin or stdout "
                   "is a pipe.")
@click.option("--vm", "vm_name", metavar="NAME",
              help="Run inside the VM NAME (running, from kp-boot) instead of reading vm records from stdin: "
                   "for -i, whose stdin is the agent's.")
@click.option("--keep", is_flag=True, help="Keep the stopped container for inspection (kp-rm removes it).")
@click.option("--audit", is_flag=True,
              help="Record every system call of the container from the host with strace, where the agent "
                   "cannot reach it; the log's path is the record's audit_log (kp-trace reads it).")
@click.option("--audit-mode", type=click.Choice(["minimal", "default", "full"]), default="default",
              show_default=True, help="Which system calls --audit records (see kp-trace --mode).")
@click.option("--audit-cap", callback=_size, metavar="SIZE",
              help="Stop the run when its audit log reaches SIZE (default 256m, at least 64k): the agent is "
                   "halted and the container killed, so the log holds everything it did (outcome audit-capped).")
@click.option("--sign", is_flag=True,
              help="Sign the heads of the run's hash-chained logs with this host's ed25519 key (made on first "
                   "use in the config dir: audit_ed25519, and .pub, which is all kp-trace --verify --key needs).")
@click.option("--emit", type=click.Choice(["kube", "agent-sandbox", "agent-sandbox-claim"]),
              help="Render the run's policy as Kubernetes objects on stdout instead of running it: a Pod (kube), "
                   "or agent-sandbox's SandboxTemplate and a Sandbox, or a SandboxWarmPool and a SandboxClaim.")
@click.option("--runtime-class", metavar="NAME", help="With --emit: the pod's RuntimeClass (gvisor, kata-qemu).")
@click.option("--namespace", metavar="NS", help="With --emit: the objects' namespace.")
@click.option("--workspace-claim", metavar="PVC", help="With --emit: use this existing claim for the workspace.")
@click.option("--workspace-size", default="10Gi", show_default=True, metavar="QUANTITY",
              help="With --emit: the size of the workspace claim kp-run emits.")
@click.option("--workspace-image", metavar="REF", help="With --emit: the workspace as an image volume (read-only).")
@click.option("--seccomp", "seccomp_mode", type=click.Choice(["kodepipe", "runtime-default"]), default="kodepipe",
              show_default=True, help="With --emit: kodepipe's seccomp profile (Localhost; to install on the "
                                      "nodes), or the runtime's (loosens; recorded).")
@click.option("--seccomp-file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="With --emit: also write kodepipe's seccomp profile to FILE, to install on the nodes (or in "
                   "podman kube play's --seccomp-profile-root) under the name the pod gives it.")
@click.option("--proxy-image", default="localhost/kodepipe-egress:latest", show_default=True, metavar="IMAGE",
              help="With --emit and --allow: the egress proxy's image (kp-image egress builds it).")
@click.option("--local", "emit_local", is_flag=True,
              help="With --emit kube: the variant podman kube play (4.3) runs, its differences in the record.")
@click.option("--json", "emit_json", is_flag=True, help="With --emit: JSON lines of objects, then the emit record.")
@click.option("--apply", "apply_names", multiple=True, metavar="NAME",
              help="Apply a quarantined run's changes to its workspace (repeatable; or quarantined records on "
                   "stdin with --apply -), from a snapshot checked against the last kp-review; with -- PATH... "
                   "only those. Refused if the checkout changed since, or on findings at or above --fail-on. "
                   "Applies to one workspace take turns; one stopped half-way (killed, a full disk) is finished "
                   "by the next --apply NAME. The quarantine stays until kp-rm.")
@click.option("--discard", "discard_names", multiple=True, metavar="NAME",
              help="Throw a quarantined run's changes away, and keep the run (its audit, egress and review logs, "
                   "and this decision in its review log) until kp-rm (repeatable; - reads records on stdin).")
@click.option("--accept", multiple=True, metavar="RULE|PATH",
              help="With --apply: take in the findings of this rule, or of this path (or directory); repeatable.")
@click.option("--fail-on", type=click.Choice(["info", "low", "medium", "high", "critical"]), default="high",
              show_default=True, help="With --apply: the severity of findings that refuses it.")
@click.option("--to-branch", metavar="BRANCH",
              help="With --apply: commit the changes on a new BRANCH of the workspace's git repository, on top of "
                   "HEAD and authored as the agent, instead of writing the workspace (HEAD, index and files stay).")
@click.option("--reviewed", metavar="ID",
              help="With --apply: apply only if the quarantine is the snapshot kp-review showed as ID.")
@click.option("--force", is_flag=True, help="With --apply: apply even over files changed on the host since, "
                                            "and whatever the findings.")
@click.option("-v", "--verbose", is_flag=True, default=None,
              help="Show progress (image builds, the API service) even when stderr is not a terminal.")
@options.quiet
def cli(command: tuple[str, ...], workspace: Path | None, read_only_workspace: bool, quarantine: bool,
        profile: str | None, image: str | None, name: str | None, memory: int | None, cpus: float | None,
        pids: int | None, time_limit: float | None, tmp_size: int | None, network: str,
        allow: tuple[str, ...], allow_files: tuple[Path, ...], pins: tuple[str, ...], no_profile_allow: bool,
        credentials: tuple[str, ...], no_profile_credentials: bool, budgets: tuple[str, ...],
        cap_add: tuple[str, ...], writable_root: bool, env: tuple[str, ...], secret_specs: tuple[str, ...],
        masks: tuple[str, ...], no_default_masks: bool, writable_git_config: bool, interactive: bool, tty: bool,
        vm_name: str | None, keep: bool, audit: bool,
        audit_mode: str, audit_cap: int | None, sign: bool, emit: str | None, runtime_class: str | None,
        namespace: str | None, workspace_claim: str | None, workspace_size: str, workspace_image: str | None,
        seccomp_mode: str, seccomp_file: Path | None, proxy_image: str, emit_local: bool, emit_json: bool,
        apply_names: tuple[str, ...], discard_names: tuple[str, ...], accept: tuple[str, ...], fail_on: str,
        to_branch: str | None, reviewed: str | None, force: bool, verbose: bool | None, quiet: bool) -> int:
    """Run COMMAND in a fresh, locked-down Podman container that sees one
    project directory and nothing else of the host, and is gone when it exits.

    \b
    Defaults, each loosened only by a flag that the record then lists
    under "loosened":
      - no network (--net open; or --allow DOMAIN: a proxy on the host is
        the only way out, by name, and logs every decision);
      - all capabilities dropped (--cap-add), no-new-privileges, a seccomp
        profile that also forbids new namespaces, the kernel keyring, and
        children hidden from a tracer (clone with CLONE_UNTRACED);
      - read-only root filesystem (--writable-root), a tmpfs at /tmp;
      - a user namespace: root inside is not root outside; the agent is
        uid 1000 inside, and what it writes in the workspace is owned by
        you on the host (by SUDO_UID under sudo);
      - memory, CPU, pids and wall-time limits;
      - an eighth of the host's per-user kernel quotas (record:
        kernel_quotas): inotify instances and watches (limits of the
        container's own user namespace), queued signals and POSIX message
        queues (rlimits); a container's counts are charged to root, who
        owns its user namespace, and one run can no longer use them up
        (several hostile runs at once still could); keys are refused, SysV
        IPC is the container's own;
      - only --workspace mounted; no host environment (--env), home,
        SSH agent or Podman socket; files only with --secret; a
        profile's variables that kp-run's environment does not have
        (sudo resets it) are left out, said on stderr and named in the
        record's "env_missing";
      - .env and .env.* in the workspace hidden (--mask adds more);
      - the workspace's git repositories (.git, nested ones, bare ones)
        read-only: git log, diff and status work, commits fail; a hook
        or core.fsmonitor the agent could write would run its code at
        your next git command on the host (--writable-git).  After the
        run, a .git or a bare repository it made anywhere in the
        workspace is moved into the run's folder (record: git_planted);
        in quarantine, --apply refuses changes to git metadata
        (record: git_changes) unless --force.

    Credentials stay on the host.  With --credential NAME (or a
    profile's credential whose source is set up here), the real key is
    read on the host before the run starts, from an environment
    variable, a file or a command (under sudo: run as you), and held by
    the egress proxy alone.  The agent gets a random per-run token where
    the key would be and a plain-HTTP endpoint of the proxy in its own
    namespace (ANTHROPIC_BASE_URL=http://127.0.0.1:3128/kodepipe/anthropic);
    the proxy checks the token, replaces it with the key, and sends the
    request over verified TLS to the credential's host and nowhere else.
    A request without the token, or to another credential, is refused
    (403) and logged; the log says which credential was used, for which
    host, method and path, never the value.  If the value cannot be
    read, the run does not start (error code credential_unavailable,
    naming the source), and nothing passes the key in instead; a
    profile's credential that is simply not set up (its variable unset,
    no file) is left out and named in "credentials_missing".  Each
    credential brings a budget of requests and bytes (--budget changes
    it, or sets one for an allowed host): over it, the proxy answers
    429, logs it, and the record's "budget_used" says so.

    The command's output goes to standard error, so standard output
    carries only the container record (kind "container": name, image,
    profile, workspace, loosened defaults, limits, exit_code, times, and
    the quarantine's changes or the audit log's path).  kp-run exits 1 if
    the command failed; the record's exit_code is the command's own.

    The record's "outcome" is exited, timed-out, interrupted, failed,
    audit-lost, audit-capped or engine-lost.  With --audit, "audit" is "complete", or
    "incomplete" with "audit_problem" saying why
    (jq 'select(.audit=="incomplete")').  If strace dies while the
    command runs, kp-run stops the container rather than let it go on
    unrecorded: outcome audit-lost, error code audit_incomplete, exit 1
    (kp-trace < its audit_log reads what was recorded).  The audit log has
    a cap (--audit-cap, 256m): when it is reached, kp-run halts the agent
    at its next traced system call and kills the container, so the run is
    stopped, not left unrecorded: "audit" is "capped", "audit_capped"
    says where, outcome audit-capped, exit 1.  After an audited run,
    every real change (the quarantine's, or what differs between
    snapshots of the workspace taken before and after a direct run) must
    be named by a traced call that made it; those none explains (a path
    another thread rewrote between strace's read and the kernel's, a file
    the kernel wrote such as a core dump) are "audit_unaccounted" (count,
    the first 20 paths) and a warning; "complete" false says why the
    check could not be made (a cut trace, --audit-mode minimal, more than
    200,000 entries).  Inside a VM, the guest's root runs strace (outside
    the container, with the same flags) and a watcher there stops the
    container if strace ends abnormally, even with kp-run gone; the log
    is copied as it grows into the run's folder here (audit_log; the cap
    watches this copy), and its size and sha256 are checked against the
    guest's at the end (audit_copy).  Such an audit is only as
    trustworthy as the guest's kernel and root, and is not cross-checked
    (audit_unaccounted says so).  An image without strace refuses
    --audit: rebuild it (kp-image build) and clone again.  On the host,
    kodepipe's own Podman service creates the container under strace, so
    strace's seccomp-bpf filter is in every process of it and the agent
    stops only at the mode's system calls (audit_tracer "seccomp-bpf");
    the runtime's own start-up lines are skipped by readers
    (audit_setup_lines).  With a Podman service you named, and in a VM,
    strace attaches to the container's first process instead and every
    system call stops the agent (audit_tracer "attached"): the same
    record, slower.  If the Podman
    service dies during a run (error code engine_lost, exit 1), kp-run
    starts its own service again (for one you named, it stops the
    container's processes itself) and removes the container;
    "container_removed" says whether it did, and kp-rm removes what is
    left, whatever the run's state.

    When vm records arrive on stdin (kp-clone | kp-boot --share DIR |
    kp-ip), the container runs inside each VM instead, through the guest's
    Podman over SSH; the workspace is then a path in the guest (default
    /workspace, the share).  The image is copied in the first time.  What
    holds there as on the host: the user namespace, capabilities, the
    read-only root, the limits, the masks, no network, the same seccomp
    profile, and the workspace's git repositories read-only (found in the
    guest; --writable-git loosens), with what the agent planted moved away
    after the run (in the guest: into /var/lib/kodepipe/runs/NAME-ID, or
    renamed beside it on the share; record: git_planted).  The kernel
    quotas are a share of the guest's own (its user namespace's limits
    set by an OCI hook before the agent runs).  --allow, --allow-file
    and --resolve hold as on the host: the proxy runs here, reached from
    the container's network namespace through a relay on an SSH channel
    (the relay exits when the channel ends); its log is in the run's
    folder here, which kp-ls lists and kp-rm removes.  --quarantine
    holds for the folder shared with kp-boot --share (/workspace or
    beneath it): the overlay is in the guest, and its upper dir comes to
    the run's folder here, where the review and kp-run --apply happen
    with no VM; any other workspace is refused (its lower layer is only
    in the guest).  --keep is host-only for now: refused before anything
    is done in the VM.

    -t in a VM gives the agent a terminal there (a pty over SSH relayed
    to yours, its window size followed), and vm records on stdin are
    still read: the agent's input is your terminal (/dev/tty).  With -i
    (and no -t) stdin is the agent's and is never read for vm records:
    --vm NAME names the VM (kp-run -i --vm NAME -- sort < data.txt), and
    -i with stdin piped and no --vm is a run on the host.

    Options that contradict each other (--quarantine with
    --read-only-workspace or without -w, --allow with --net open,
    --resolve or --audit-mode without what they refine, an --allow-file
    with no rule, -t without a terminal, --apply with a COMMAND or run
    options, ...) are a usage error (exit 2), all named at once, before
    the root check and before anything is built or started.

    --emit kube (or agent-sandbox, agent-sandbox-claim) runs nothing: it
    resolves the same options and profile, and writes the policy as
    Kubernetes objects on stdout (multi-document YAML; --json: JSON lines,
    then an emit record), for a cluster's RuntimeClass (--runtime-class
    gvisor).  What the objects cannot hold (the pids limit, --audit,
    --quarantine, ...) is listed in the YAML's header, the pod's
    kodepipe.io/not-carried annotation, on stderr and in the record, never
    dropped: kodepipe-fleet(7).  It needs no root, unless the profile's image
    has to be built first (give --image REGISTRY/IMAGE to use a pushed one).

    kp-run needs root (sudo): rootful Podman with an explicit user
    namespace is what enforces the limits on every host.  It starts its
    own Podman API service on demand (set KODEPIPE_PODMAN_URL to use
    another one).

    \b
    Examples:
      sudo kp-run -w ~/code/proj -- make test
      sudo kp-run -it -w ~/code/proj --profile claude
      sudo kp-run --quarantine -w . -- sh -c 'agent-does-things'
      sudo kp-run --apply run-1a2b3c4d
      sudo kp-run --audit -w . -- pytest | kp-trace | jq 'select(.type=="net")'
      kp-clone base vm | kp-boot --share ~/code/proj | kp-ip | sudo kp-run -- make test
      kp-run --emit kube -p claude -w . --allow pypi.org --runtime-class gvisor > run.yaml
    """
    from kodepipe.container import gather
    from kodepipe.container import policy as pol
    from kodepipe.core.errors import BadInput, KpError
    from kodepipe.core.state import Store

    ctx = click.get_current_context()
    opts = gather.options(ctx.params, gather.given_on_command_line(ctx))
    out = kpcli.Output("kp-run", verbose=verbose, quiet=quiet)
    store = Store()
    if apply_names:
        conflicts = pol.apply_conflicts(opts) + (["--apply makes no run: drop --vm"] if vm_name else [])  # C2
        if conflicts:
            raise click.UsageError("; ".join(conflicts))
        options.check_names([n for n in apply_names if n != "-"], "--apply")
        return _apply(out, store, apply_names, force, paths=command, accept=accept, fail_on=fail_on,
                      to_branch=to_branch, reviewed=reviewed)
    if discard_names:
        conflicts = pol.discard_conflicts(opts) + (["--discard makes no run: drop --vm"] if vm_name else [])
        if conflicts:
            raise click.UsageError("; ".join(conflicts))
        options.check_names([n for n in discard_names if n != "-"], "--discard")
        return _discard(out, store, discard_names)
    # Every conflict first, as a usage error (2), for root and non-root alike, before the root check
    # and before any image is built (gather reads, resolve decides; neither changes anything)
    try:
        prof = gather.profile(opts)
        policy = pol.resolve(opts, prof, gather.config(opts, prof))
    except pol.PolicyError as exc:
        raise click.UsageError(exc.message) from None
    except BadInput as exc:  # an unknown or broken profile
        raise click.BadParameter(exc.message, param_hint="'-p' / '--profile'") from None

    given = gather.given_on_command_line(ctx)
    emit_only = {"runtime_class", "namespace", "workspace_claim", "workspace_size", "workspace_image", "seccomp_mode",
                 "seccomp_file", "proxy_image", "emit_local", "emit_json"} & given
    if emit is None and emit_only:
        flags = ", ".join("--" + n.replace("_", "-").replace("emit-", "") for n in sorted(emit_only))
        raise click.UsageError(f"{flags} only matter with --emit")
    if emit is not None:
        return _emit(out, policy, prof, emit, vm_name=vm_name, runtime_class=runtime_class, namespace=namespace,
                     workspace_claim=workspace_claim, workspace_size=workspace_size, workspace_image=workspace_image,
                     seccomp=seccomp_mode, proxy_image=proxy_image, local=emit_local, as_json=emit_json,
                     seccomp_file=seccomp_file)

    def say(level: str, message: str) -> None:
        getattr(out, {"warn": "warn", "progress": "progress"}.get(level, "info"))(message)

    if policy.sign:  # the key first: a run that asked for signed evidence does not start without it
        from kodepipe.container import evidence

        key, made = evidence.signer()
        if made:
            out.info(f"made this host's signing key {evidence.key_path()} ({key.fingerprint}); kp-trace --verify "
                     f"--key {evidence.key_path()}.pub checks signed runs")
    if policy.env_missing:  # D6: never dropped without a word (and the record has them: env_missing)
        names = " ".join(policy.env_missing)
        out.warn(f"the profile passes {', '.join(policy.env_missing)}, which kp-run's environment does not have "
                 f"(sudo resets it): the agent runs without them (sudo --preserve-env={names.replace(' ', ',')} "
                 "kp-run ..., or -e NAME=VALUE)")
    if policy.credentials_missing:  # never dropped without a word either (the record: credentials_missing)
        out.warn(f"the profile's credential{'s' if len(policy.credentials_missing) > 1 else ''} "
                 f"{', '.join(policy.credentials_missing)} {'are' if len(policy.credentials_missing) > 1 else 'is'} "
                 "not set up on this host (its source is not there): the agent runs without "
                 f"({', '.join('--credential ' + n for n in policy.credentials_missing)} says why)")
    if vm_name is not None:  # stdin is not read for records: with -i it is the agent's
        _in_named_vm(out, policy, prof, say, vm_name)
        return out.status()
    # D1: vm records on stdin are read unless stdin is the agent's (-i without -t: then --vm names the
    # VM); with -t the agent's input is the terminal (/dev/tty), never the pipe
    if kpcli.stdin_is_piped() and (policy.tty or not policy.interactive) and _in_vms(out, policy, prof, say):
        return out.status()
    from kodepipe.container.backend import HostBackend

    if workspace is not None and not workspace.is_dir():
        raise click.BadParameter(f"Directory '{workspace}' does not exist.", param_hint="'-w' / '--workspace'")
    host = HostBackend(store)
    try:
        host.refuse(policy)  # root (77): after the conflicts, before the image is built
        facts = host.learned(policy)  # reads only, and checked: a workspace refused before an image is built
    except KpError as exc:
        out.fail({"kind": "container", "name": name}, exc)
        return out.status()
    try:
        policy = _built(out, policy, prof)
    except BaseException:
        facts.close()
        raise
    try:
        record, status = host.run(policy, say, facts)
    except KpError as exc:
        record = getattr(exc, "record", {"kind": "container", "name": name})
        out.fail(record, exc)
        return out.status()
    except BaseException as exc:
        _emit_interrupted(out, exc)
        raise
    _report(out, record, status)
    return out.status()


def _emit(out: kpcli.Output, policy: Any, prof: Any, mode: str, *, vm_name: str | None, **given: Any) -> int:
    """kp-run --emit: the policy as Kubernetes objects on stdout; nothing runs, nothing is written."""
    from kodepipe.container import kube, kubeemit
    from kodepipe.container.hostrun import new_name

    local, as_json, seccomp_file = given.pop("local"), given.pop("as_json"), given.pop("seccomp_file")
    problems = []
    if vm_name is not None:
        problems.append("--emit renders the policy for a cluster: drop --vm")
    if local and mode != "kube":
        problems.append("--local is a variant of --emit kube")
    if local and policy.workspace is not None and not Path(policy.workspace).is_dir():
        problems.append("--local binds the workspace from this host: -w must be a directory here")
    if given["workspace_image"] and given["workspace_claim"]:
        problems.append("--workspace-image and --workspace-claim are two workspaces: give one")
    if seccomp_file is not None and given["seccomp"] != "kodepipe":
        problems.append("--seccomp-file writes kodepipe's profile: drop --seccomp runtime-default")
    if (given["workspace_image"] or given["workspace_claim"]) and policy.workspace is None:
        problems.append("--workspace-image and --workspace-claim need -w (the workspace's place in the pod)")
    if problems:
        raise click.UsageError("; ".join(problems))
    name = policy.name or new_name()
    policy = _built(out, policy, prof)
    empty = kubeemit.empty_file() if local else None
    emitted = kube.render(policy, name, kubeemit.options(policy, mode=mode, local=local, empty_file=empty, **given))
    if seccomp_file is not None:
        seccomp_file.write_bytes(kubeemit.profile_bytes())
        out.info(f"wrote kodepipe's seccomp profile to {seccomp_file}: install it as "
                 f"{emitted.seccomp['localhost'] if emitted.seccomp else '?'}")
    for item in emitted.not_carried:
        out.warn(f"not carried over to the cluster: {item['control']}: {item['why']}")
    if as_json:
        kubeemit.write_json(sys.stdout.buffer, emitted, name)
    else:
        kubeemit.write_yaml(sys.stdout, emitted, name)
    sys.stdout.flush()
    return out.status()


def _built(out: kpcli.Output, policy: Any, prof: Any) -> Any:
    """The policy with its image: the profile's, built now if missing, once a backend accepted the policy."""
    if policy.image is not None:
        return policy
    from kodepipe.container import profile as profiles

    return policy.with_image(profiles.ensure_image(prof, out))


def _emit_interrupted(out: kpcli.Output, exc: BaseException) -> None:
    """The record of a run cut short, when it got far enough to have one."""
    partial = getattr(exc, "record", None)
    if partial is not None:
        out.emit({**partial, "error": {"code": "interrupted", "message": "kp-run was interrupted"}})


def _report(out: kpcli.Output, record: dict[str, Any], status: int | None) -> None:
    """Say how a run ended and write its record (on the host or in a VM alike)."""
    from kodepipe.core import errors

    if status:
        out.statuses.add(errors.FAILED)
        if record.get("timed_out"):
            out.warn(f"{record['name']}: stopped at the time limit")
        elif record.get("audit") == "capped":
            out.warn(f"{record['name']}: stopped when its audit log reached its cap (--audit-cap)")
        elif record.get("oom_killed"):
            out.warn(f"{record['name']}: killed for exceeding the memory limit")
    if record.get("state") == "quarantined":
        q = record.get("quarantine", {})
        out.info(f"{record['name']}: quarantined: {len(q.get('added', []))} added, {len(q.get('modified', []))} "
                 f"modified, {len(q.get('deleted', []))} deleted; kp-review {record['name']} shows them, "
                 f"kp-run --apply {record['name']} applies them, kp-rm {record['name']} discards them")
    if record.get("audit") == "incomplete":  # the agent's own exit_code stays in the record
        out.fail(record, errors.KpError(str(record.get("audit_problem")), code="audit_incomplete"))
        return
    out.emit(record)


def _in_vms(out: kpcli.Output, policy: Any, prof: Any, say: Any) -> bool:
    """Run the container inside each VM whose record arrives on stdin (from kp-ip), writing the vm
    record through and then the container's; other records pass through.  False if no vm record
    came: the run is then the host's."""
    from kodepipe.core import errors
    from kodepipe.core.errors import KpError

    # All of stdin is read and checked before anything runs: a malformed line, or a vm record with a
    # wrong-typed field, stops the whole run (65), rather than running on the host or in some VMs only.
    lines = list(out.records())
    invalid: dict[int, KpError] = {}
    for line in lines:
        if line.kind != "vm" or line.failed:
            continue
        try:
            line.identity("vm name")
            line.text("share")  # the fields of a vm record that a run in it reads
            line.mapping("ssh")
            line.path("known_hosts")
        except KpError as exc:
            invalid[line.number] = exc
    if invalid or errors.BAD_INPUT in out.statuses:
        for line in lines:
            if line.number in invalid:
                out.fail(line.record, invalid[line.number])
            else:
                out.emit(line.record)
        out.error("nothing was run: stdin had bad input (see above)")
        return True
    seen = False
    for line in lines:
        record = line.record
        if record.get("kind") != "vm":
            out.emit(record)
            continue
        seen = True  # never fall back to the host for a VM that an earlier stage failed on
        out.emit(record)
        if "error" in record:
            out.error(f"{record.get('name')}: not run there: an earlier stage failed on it")
            out.statuses.add(errors.FAILED)
            continue
        policy = _in_vm(out, policy, prof, say, record)
    return seen


def _in_vm(out: kpcli.Output, policy: Any, prof: Any, say: Any, record: dict[str, Any]) -> Any:
    """One run in the VM of ``record``; the policy with its image (built once for every VM)."""
    from kodepipe.container.backend import VmBackend
    from kodepipe.core.errors import KpError

    backend = VmBackend(record)
    try:  # what the VM cannot honour is refused before any image is built or anything done in it
        backend.refuse(policy)
    except KpError as exc:
        out.fail({"kind": "container", "name": policy.name, "host": record.get("name")}, exc)
        return policy
    try:
        policy = _built(out, policy, prof)
        result, status = backend.run(policy, say)
    except KpError as exc:
        out.fail(getattr(exc, "record", {"kind": "container", "name": policy.name, "host": record.get("name")}),
                 exc)
        return policy
    except BaseException as exc:
        _emit_interrupted(out, exc)
        raise
    _report(out, result, status)
    return policy


def _in_named_vm(out: kpcli.Output, policy: Any, prof: Any, say: Any, name: str) -> None:
    """--vm NAME: the run in that VM, its record read from kodepipe's state (it must be running)."""
    from kodepipe import inventory
    from kodepipe.core.errors import KpError, NotFound
    from kodepipe.core.records import check_name
    from kodepipe.core.state import Store
    from kodepipe.vm import vms

    try:
        check_name(name, "vm name")
    except KpError as exc:
        raise click.BadParameter(exc.message, param_hint="'--vm'") from None
    failed = {"kind": "container", "name": policy.name, "host": name}
    record = inventory.view(Store(), "vm", name)
    if record.get("state") == "gone":
        out.fail(failed, NotFound(f"no VM named {name}", hint="kp-ls lists them; kp-clone makes one"))
        return
    problem = vms.unusable(record)
    if problem is not None:
        out.fail(failed, problem)
        return
    _in_vm(out, policy, prof, say, record)


def _apply(out: kpcli.Output, store: Any, names: tuple[str, ...], force: bool, *, paths: tuple[str, ...],
           accept: tuple[str, ...], fail_on: str, to_branch: str | None, reviewed: str | None) -> int:
    from kodepipe.container import apply as applying
    from kodepipe.core.errors import KpError
    from kodepipe.core.records import check_name
    from kodepipe.core.terminal import escape

    targets: list[tuple[str, str | None, dict[str, Any]]] = []
    for name in names:
        if name == "-":
            # a name that is not hostname-safe or an id that is not a string: bad input (65), not applied
            for line, run_name, rid in out.objects(("container",)):
                targets.append((run_name, rid, line.record))
        else:
            targets.append((name, None, {"kind": "container", "name": name}))
    for name, expect_id, record in targets:
        try:
            check_name(name, "container name")
            result = applying.apply(store, name, expect_id=expect_id, force=force, say=out.warn, paths=paths,
                                    accept=accept, fail_on=fail_on, to_branch=to_branch, reviewed=reviewed)
        except KpError as exc:
            out.fail(record, exc)
            continue
        for finding in result.get("accepted") or []:
            out.warn(f"{name}: accepted: {finding.get('severity')} {finding.get('rule')} "
                     f"{escape(str(finding.get('path', '')))}")
        exported = result.get("exported")
        if isinstance(exported, dict):
            out.info(f"{name}: committed {exported.get('count')} change(s) on the branch {exported.get('branch')} "
                     f"({str(exported.get('commit'))[:12]}) of {exported.get('repository')}")
        else:
            out.info(f"{name}: applied {result.get('applied_count', 0)} change(s) to {result.get('workspace')}")
        out.emit(result)
    return out.status()


def _discard(out: kpcli.Output, store: Any, names: tuple[str, ...]) -> int:
    from kodepipe.container import apply as applying
    from kodepipe.core.errors import KpError
    from kodepipe.core.records import check_name

    targets: list[tuple[str, str | None, dict[str, Any]]] = []
    for name in names:
        if name == "-":
            targets.extend((run_name, rid, line.record) for line, run_name, rid in out.objects(("container",)))
        else:
            targets.append((name, None, {"kind": "container", "name": name}))
    for name, expect_id, record in targets:
        try:
            check_name(name, "container name")
            result = applying.discard(store, name, expect_id=expect_id, say=out.warn)
        except KpError as exc:
            out.fail(record, exc)
            continue
        out.info(f"{name}: discarded its quarantined changes; its logs stay (kp-trace {name}; kp-rm {name} "
                 "removes them)")
        out.emit(result)
    return out.status()


def main() -> None:
    kpcli.run(cli, "kp-run")
