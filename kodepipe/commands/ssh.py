"""kp-ssh: run a command or a shell in VMs over SSH, or print ssh_config stanzas."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from kodepipe.commands import cli as kpcli
from kodepipe.commands import options, vmargs

REMOTE = "kp.remote"


class _SplitAtDashes(click.Command):
    """Everything after the first '--' is the remote COMMAND: never NAMEs, never our options."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            cut = args.index("--")
            ctx.meta[REMOTE] = args[cut + 1:]
            args = args[:cut]
        return super().parse_args(ctx, args)

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        return [*super().collect_usage_pieces(ctx), "[-- COMMAND...]"]


@click.command(cls=_SplitAtDashes, context_settings=options.CONTEXT, epilog=options.EPILOG)
@click.argument("names", nargs=-1, metavar="[NAME]...", shell_complete=kpcli.name_completion(("vm",)))
@click.option("-t", "--timeout", default=30.0, show_default=True, type=options.FiniteRange(1, 3600),
              help="Seconds to keep retrying a refused or reset connection (sshd may be restarting). "
                   "The command itself may run as long as it needs.")
@click.option("-i", "--identity", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              callback=options.regular_file(1 << 20),
              help="Private key to log in with, instead of the VM's own (made by kp-clone, authorized by kp-ip in "
                   "place of the key kodepipe's images share). The SSH agent is never used.")
@click.option("--stream", is_flag=True,
              help="Also copy the command's stdout and stderr to stderr as they arrive, for a person watching.")
@click.option("--config", "as_config", is_flag=True,
              help="Print an ssh_config stanza (Host kp-NAME) for each VM instead; without NAMEs or records, "
                   "for every running VM.")
@options.quiet
def cli(names: tuple[str, ...], timeout: float, identity: Path | None, stream: bool, as_config: bool,
        quiet: bool) -> int:
    """Run a COMMAND in VMs over SSH, or open a shell in one.

    VMs come from NAMEs or the vm records on stdin (from kp-ip).  For each,
    the vm record is written through, refreshed, followed by a result
    record: {"kind": "result", "name", "vm_id", "command", "exit_status",
    "stdout", "stderr", "seconds"} (text is UTF-8 with bad bytes replaced;
    then "stdout_base64"/"stderr_base64" hold the exact bytes).  A command
    that exits non-zero gets an error object on its result, and kp-ssh
    exits 1.  The COMMAND's words are quoted for the remote shell, as given:
    for pipes or redirections, run sh -c '...'.  It gets no stdin.

    Without a COMMAND, and with a terminal, kp-ssh opens an interactive
    login shell in the one VM named (or piped in: the keyboard is then
    read from /dev/tty) and exits with the shell's status.

    The guest's host key must be the one kp-ip learned through the guest
    agent (written to the VM's known_hosts): any other key is refused
    (error "host_key_mismatch"); kp-ssh never adds one itself.  It logs
    in with the VM's own key (ssh_key in its record: each clone has its
    own, which kp-rm removes), never through your SSH agent.

    --config prints, for plain ssh, scp and editors:

    \b
      kp-ssh --config > ~/.ssh/kodepipe.conf
      # in ~/.ssh/config:  Include kodepipe.conf
      ssh kp-proj

    \b
    Examples:
      kp-clone base proj | kp-boot | kp-ip | kp-ssh -- uname -a
      kp-ssh proj
      kp-ssh proj -- sh -c 'cd /workspace && make test' | jq -r .stdout
      kp-ls --kind vm --state running | kp-ssh --stream -- sudo apt-get -y upgrade
    """
    remote: list[str] | None = click.get_current_context().meta.get(REMOTE)
    out = kpcli.Output("kp-ssh", quiet=quiet)
    key_path = identity.resolve() if identity else None  # else each VM's own key (kodepipe.vm.ssh.Endpoint)
    if as_config:
        if remote is not None:
            raise click.UsageError("--config prints ssh_config stanzas; it takes no COMMAND")
        return _print_config(out, names, key_path)
    if remote == []:
        raise click.UsageError("nothing after '--': give the COMMAND to run")
    if remote is None:
        return _interactive(out, names, key_path, timeout)
    return _run_commands(out, names, key_path, timeout, remote, stream)


def _current(name: str, expect_id: str | None) -> dict[str, Any]:
    """The VM's record now (a record from stdin may predate a reboot and its new endpoint)."""
    from kodepipe.core.state import Store
    from kodepipe.vm import lifecycle, vms

    store = Store()
    lifecycle.vm_meta(store, name, expect_id)  # not found, or re-created since: a clear error
    return vms.view(store, name)


def _run_commands(out: kpcli.Output, names: tuple[str, ...], key_path: Path | None, timeout: float,
                  remote: list[str], stream: bool) -> int:
    import shlex

    from kodepipe.core import errors
    from kodepipe.core.errors import KpError
    from kodepipe.vm import ssh, vms

    command = shlex.join(remote)
    keys: dict[Path, Any] = {}

    def echo(chunk: bytes) -> None:
        sys.stderr.buffer.write(chunk)
        sys.stderr.buffer.flush()

    for name, expect_id, record in vmargs.each_vm(out, names):
        try:
            current = _current(name, expect_id)
            record = vms.fresh(record, current)
            ep = ssh.endpoint(current)  # the endpoint and host key from the state, never from stdin
            path = ep.key_path(key_path)
            key = keys[path] if path in keys else keys.setdefault(path, ssh.load_key(path))
            outcome = _session(ep, key, timeout, command, echo if stream else None, _watch(out, name))
        except KpError as exc:
            out.fail(record, _why(name, exc))
            continue
        result = ssh.result_record(ep, remote, outcome)
        if outcome.exit_status != 0:
            message = f"{command} exited with status {outcome.exit_status}"
            result["error"] = {"code": "exit_status", "message": message}
            out.statuses.add(errors.FAILED)
            out.info(f"{name}: {message}")
        out.emit(record)
        out.emit(result)
    return out.status()


def _session(ep: Any, key: Any, timeout: float, command: str, echo: Any, watch: Any = None) -> Any:
    from kodepipe.vm import ssh

    return ssh.session(ep, key, timeout, command, echo=echo, watch=watch)


def _why(name: str, exc: Any) -> Any:
    """A connection that failed or broke because the VM froze (or was suspended) meanwhile: say that,
    with what to do, rather than "is it still booting?"."""
    from kodepipe.core.errors import KpError, Timeout
    from kodepipe.core.state import Store
    from kodepipe.vm import vms

    if not isinstance(exc, Timeout) and exc.code != "connection_lost":
        return exc
    try:
        record = vms.view(Store(), name)
    except KpError:
        return exc
    return vms.unusable(record) if record.get("state") in ("frozen", "suspended") else exc


def _watch(out: kpcli.Output, name: str) -> Any:
    """Called while a command is silent: says on stderr when the VM froze under it, and when it runs
    again.  The command is left to wait: kp-stop --resume (after freeing space) lets it finish."""
    from kodepipe.core.errors import KpError
    from kodepipe.core.state import Store
    from kodepipe.vm import vms

    said: list[str | None] = [None]

    def watch() -> None:
        try:
            record = vms.view(Store(), name)
        except KpError:
            return
        problem = vms.unusable(record) if record.get("state") in ("frozen", "suspended") else None
        now = problem.message if problem is not None else None
        if now != said[0]:
            if now is not None:
                out.warn(f"{name}: the command is waiting: {now}")
            else:
                out.info(f"{name}: running again")
            said[0] = now

    return watch


def _terminal() -> int | None:
    """The fd to read the keyboard from: stdin if it is a terminal, else /dev/tty (stdin is a pipe)."""
    if sys.stdin is not None and sys.stdin.isatty():
        return sys.stdin.fileno()
    try:
        return os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return None


def _interactive(out: kpcli.Output, names: tuple[str, ...], key_path: Path | None, timeout: float) -> int:
    from kodepipe.core.errors import KpError
    from kodepipe.vm import ssh

    tty_in = _terminal() if sys.stdout.isatty() else None
    if tty_in is None:
        raise click.UsageError("give a COMMAND after '--' (for example: kp-ssh NAME -- uname -a); "
                               "an interactive shell needs a terminal, and stdin carries records, not a script")
    chosen = list(vmargs.each_vm(out, names))
    if len(chosen) > 1:
        raise click.UsageError(f"an interactive shell is for one VM, not {len(chosen)}; "
                               "give a COMMAND after '--' to run it in each")
    if not chosen:
        raise KpError("no VM to open a shell in: no vm record arrived on stdin")
    name, expect_id, _ = chosen[0]
    ep = ssh.endpoint(_current(name, expect_id))
    try:
        client = ssh.connect(ep, ssh.load_key(ep.key_path(key_path)), timeout=timeout)
    except KpError as exc:
        raise _why(name, exc) from None
    try:
        return ssh.shell(client, tty_in, sys.stdout.fileno())
    finally:
        client.close()


def _print_config(out: kpcli.Output, names: tuple[str, ...], key_path: Path | None) -> int:
    from kodepipe import inventory
    from kodepipe.core.errors import KpError
    from kodepipe.core.state import Store
    from kodepipe.vm import ssh

    options.check_names(names)
    chosen: list[dict[str, Any]] = []
    explicit = bool(names)
    for name in names:
        try:
            chosen.append(_current(name, None))
        except KpError as exc:
            out.error(f"{name}: {exc.message}")
            out.statuses.add(exc.status)
    if not names and kpcli.stdin_is_piped():
        # records pass through nowhere (stdout is ssh_config text): each is checked, then only read
        for line in out.records():
            if line.kind != "vm" or line.failed:
                continue
            explicit = True
            try:
                name, vm_id = line.identity("vm name")
            except KpError as exc:
                out.error(exc.message)  # it names the line: "stdin line 3: ..."
                out.statuses.add(exc.status)
                continue
            try:
                chosen.append(_current(name, vm_id))
            except KpError as exc:
                out.error(f"{name}: {exc.message}")
                out.statuses.add(exc.status)
    if not explicit:
        chosen = [r for r in inventory.records(Store(), ("vm",)) if r.get("state") == "running"]
    endpoints = []
    for record in chosen:
        try:
            endpoints.append(ssh.endpoint(record))
        except KpError as exc:
            if explicit:
                out.error(f"{record['name']}: {exc.message}")
                out.statuses.add(exc.status)
            elif exc.code == "host_key_unknown":
                out.warn(f"{record['name']}: left out: {exc.message}")
    text = ssh.config(endpoints, key_path)
    if text:
        click.echo(text, nl=False)
    elif not explicit:
        out.info("no running VM has an SSH endpoint")
    return out.status()


def main() -> None:
    kpcli.run(cli, "kp-ssh")
