"""SSH into VMs with paramiko: commands, interactive shells, ssh_config stanzas.

Host keys are never taken on trust: kp-ip learns each guest's key through
its guest agent (a channel only the host can reach) and writes it to the
VM's known_hosts; this module accepts that key and no other.  paramiko is
imported inside functions only: it takes a quarter of a second to load.
"""

from __future__ import annotations

import base64
import logging
import os
import select
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kodepipe.core.errors import BadInput, KpError, Timeout
from kodepipe.core.records import Record

RETRY_PAUSE = 0.5
WATCH_EVERY = 5.0  # seconds of silence from a command between two calls of execute's ``watch``


@dataclass(frozen=True)
class Endpoint:
    """Where and how to reach one VM's sshd."""

    name: str
    vm_id: str | None
    host: str
    port: int
    user: str
    known_hosts: Path
    identity: Path | None = None  # the clone's own private key (kp-clone made it), else kodepipe's shared one

    def key_path(self, chosen: Path | None = None) -> Path:
        """The key to log in with: ``chosen`` (kp-ssh --identity), the clone's own, or kodepipe's."""
        from kodepipe.vm.sshkeys import own_key

        return chosen or self.identity or own_key()[0]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def known_name(self) -> str:
        """The host's name in known_hosts (as OpenSSH and paramiko write it)."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"


def endpoint(record: Record) -> Endpoint:
    """The SSH endpoint of a current vm record, or a KpError saying what to do first."""
    from kodepipe.vm import vms

    name = str(record.get("name"))
    problem = vms.unusable(record)  # suspended, frozen (with QEMU's reason and what to do), not running
    if problem is not None:
        raise problem
    ssh = record.get("ssh")
    if not isinstance(ssh, dict):
        if record.get("net") == "none":
            raise KpError(f"{name} has no network (booted with --net none)", code="no_ssh",
                          hint=f"kp-attach {name} gives its serial console")
        raise KpError(f"{name} has no SSH endpoint yet", code="no_ssh", hint=f"run kp-ip {name} first")
    host, port, user = ssh.get("host"), ssh.get("port"), ssh.get("user")
    if not isinstance(host, str) or not isinstance(port, int) or not isinstance(user, str):
        raise BadInput(f"its \"ssh\" endpoint should be {{\"host\", \"port\", \"user\"}}, not {ssh!r}")
    known = record.get("known_hosts")
    if not isinstance(known, str) or not Path(known).is_file():
        raise KpError(f"{name}'s SSH host key is not known yet", code="host_key_unknown",
                      hint=f"run kp-ip {name} first: it learns the key from the guest agent")
    vm_id = record.get("id")
    key = record.get("ssh_key")
    identity = Path(key["path"]) if isinstance(key, dict) and isinstance(key.get("path"), str) else None
    return Endpoint(name, vm_id if isinstance(vm_id, str) else None, host, port, user, Path(known),
                    identity if identity is not None and identity.is_file() else None)


# -- connecting ---------------------------------------------------------------


def load_key(path: Path) -> Any:
    """A paramiko private key from ``path`` (any type), or a KpError saying why not."""
    import paramiko

    try:
        return paramiko.PKey.from_path(path)
    except paramiko.PasswordRequiredException:
        raise BadInput(f"the SSH key {path} is protected by a passphrase",
                       hint="kp-ssh never uses an SSH agent: give an unencrypted key, or leave out --identity "
                            "to use kodepipe's own") from None
    except FileNotFoundError:
        raise BadInput(f"there is no SSH key {path}") from None
    except (OSError, ValueError, paramiko.SSHException) as exc:
        raise BadInput(f"cannot read the SSH key {path}: {exc}") from None


def fingerprint(key: Any) -> str:
    """SHA256:... of a paramiko key, as ssh-keygen -l shows it."""
    return str(key.fingerprint)


def connect(ep: Endpoint, key: Any, *, timeout: float) -> Any:
    """An authenticated paramiko SSHClient for ``ep``.

    Connections refused, reset or closed before the banner are retried until
    ``timeout``: sshd may be starting or restarting, and QEMU's user-mode
    network accepts the connection before anything listens in the guest.
    A wrong host key or a refused key fail at once.
    """
    import paramiko

    class Reject(paramiko.RejectPolicy):  # type: ignore[misc]
        # RejectPolicy, but with an error that says what to do
        def missing_host_key(self, client: Any, hostname: str, server_key: Any) -> None:
            raise KpError(f"the VM's known_hosts ({ep.known_hosts}) has no key for {hostname}; "
                          f"the server there offered {fingerprint(server_key)}", code="host_key_unknown",
                          hint=f"if the VM rebooted, run kp-ip {ep.name} again: it learns the key from the guest "
                               "agent")

    # paramiko's transport thread logs each failed attempt with a traceback; we report the outcome
    quiet = logging.getLogger("paramiko")
    if not quiet.handlers:
        quiet.addHandler(logging.NullHandler())
    deadline = time.monotonic() + timeout
    while True:
        client = paramiko.SSHClient()
        try:
            # only the key kp-ip learned: no ~/.ssh/known_hosts, no system file, nothing saved back
            client.get_host_keys().load(str(ep.known_hosts))
        except (OSError, paramiko.SSHException) as exc:
            raise KpError(f"cannot read its known_hosts {ep.known_hosts}: {exc}",
                          code="host_key_unknown", hint=f"run kp-ip {ep.name} again") from None
        client.set_missing_host_key_policy(Reject())
        left = max(deadline - time.monotonic(), 1.0)
        try:
            client.connect(ep.host, ep.port, username=ep.user, pkey=key, look_for_keys=False, allow_agent=False,
                           timeout=min(left, 10.0), banner_timeout=min(left, 15.0), auth_timeout=min(left, 15.0))
            return client
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise KpError(f"the SSH server at {ep.address} offered host key "
                          f"{fingerprint(exc.key)}, but the key kp-ip learned from the guest agent is "
                          f"{fingerprint(exc.expected_key)}; refusing to connect (something else may be "
                          "answering on that address)", code="host_key_mismatch",
                          hint=f"if the VM was re-created or rebooted, run kp-ip {ep.name} again") from None
        except paramiko.AuthenticationException as exc:
            client.close()
            raise KpError(f"the VM refused the SSH key as user {ep.user}: {exc}", code="auth_failed",
                          hint="kp-ip authorizes the VM's own key (ssh_key in its record) through the guest "
                               "agent at each boot; with --identity, give a key the image was built with") from None
        except KpError:
            client.close()
            raise
        except (OSError, EOFError, paramiko.SSHException) as exc:
            client.close()
            now = time.monotonic()
            if now >= deadline:
                raise Timeout(f"SSH on {ep.address} did not accept a connection within "
                              f"{timeout:g} s (last: {_describe(exc)})",
                              hint=f"is it still booting? kp-ip {ep.name} waits for it") from None
            time.sleep(min(RETRY_PAUSE, deadline - now))


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


# -- commands -----------------------------------------------------------------


@dataclass
class Outcome:
    exit_status: int
    stdout: bytes
    stderr: bytes
    seconds: float


def execute(client: Any, command: str, *, echo: Callable[[bytes], None] | None = None,
            watch: Callable[[], None] | None = None) -> Outcome:
    """Run ``command`` through the remote user's shell, without a pty and with empty stdin.

    ``echo`` gets stdout and stderr chunks as they arrive (--stream).
    ``watch`` is called after every WATCH_EVERY seconds of silence (kp-ssh
    checks that the VM has not frozen).  The exit status is -1 when the
    server sent none (the command was killed by a signal, or the connection
    dropped).
    """
    started = last = time.monotonic()
    channel = client.get_transport().open_session()
    try:
        channel.exec_command(command)
        channel.shutdown_write()  # stdin carries our records, not the command's input: EOF at once
        out, err = bytearray(), bytearray()
        while True:
            # the channel's fileno is a pipe paramiko sets on stdout data, stderr data and EOF
            if select.select([channel], [], [], 1.0)[0]:
                last = time.monotonic()
            elif watch is not None and time.monotonic() - last >= WATCH_EVERY:
                watch()
                last = time.monotonic()
            while channel.recv_ready():
                chunk = channel.recv(65536)
                out += chunk
                if echo:
                    echo(chunk)
            while channel.recv_stderr_ready():
                chunk = channel.recv_stderr(65536)
                err += chunk
                if echo:
                    echo(chunk)
            if (channel.eof_received or channel.closed) and not channel.recv_ready() \
                    and not channel.recv_stderr_ready():
                break
        status = channel.recv_exit_status()
    finally:
        channel.close()
    return Outcome(status, bytes(out), bytes(err), round(time.monotonic() - started, 3))


def session(ep: Endpoint, key: Any, timeout: float, command: str, *,
            echo: Callable[[bytes], None] | None = None, watch: Callable[[], None] | None = None) -> Outcome:
    """One connection, one command (``execute``), closed again; a connection that breaks while the
    command runs is a KpError (connection_lost), never a paramiko exception."""
    import paramiko

    client = connect(ep, key, timeout=timeout)
    try:
        return execute(client, command, echo=echo, watch=watch)
    except (OSError, EOFError, paramiko.SSHException) as exc:
        raise KpError(f"the SSH connection to {ep.address} broke while the command ran: {exc}",
                      code="connection_lost") from None
    finally:
        client.close()


def text_fields(key: str, data: bytes) -> Record:
    """``{key: text}``, plus ``key_base64`` with the exact bytes when they are not UTF-8."""
    try:
        return {key: data.decode("utf-8")}
    except UnicodeDecodeError:
        return {key: data.decode("utf-8", errors="replace"), f"{key}_base64": base64.b64encode(data).decode()}


def result_record(ep: Endpoint, argv: list[str], outcome: Outcome) -> Record:
    return {"kind": "result", "name": ep.name, "vm_id": ep.vm_id, "command": argv,
            "exit_status": outcome.exit_status, **text_fields("stdout", outcome.stdout),
            **text_fields("stderr", outcome.stderr), "seconds": outcome.seconds}


# -- interactive shell ----------------------------------------------------------


def shell(client: Any, tty_in: int, tty_out: int) -> int:
    """An interactive login shell on a pty, relayed to the local terminal; its exit status."""
    from kodepipe.core import terminal

    cols, rows = terminal.size(tty_in)
    channel = client.invoke_shell(term=os.environ.get("TERM") or "xterm-256color", width=cols, height=rows)
    try:
        with terminal.raw_mode(tty_in), terminal.on_resize(tty_in, lambda c, r: channel.resize_pty(c, r)):
            terminal.relay(tty_in, tty_out, channel)
        status: int = channel.recv_exit_status()
    finally:
        channel.close()
    return status


# -- ssh_config ---------------------------------------------------------------


def _config_path(path: Path | str) -> str:
    """A path as an ssh_config argument: % is a token there, and spaces need quotes."""
    text = str(path).replace("%", "%%")
    return f'"{text}"' if any(c.isspace() for c in text) else text


def config_stanza(ep: Endpoint, identity: Path | None = None) -> str:
    """One ``Host kp-NAME`` block for OpenSSH, trusting only the key kp-ip learned."""
    return "\n".join([
        f"# {ep.name}: generated by kp-ssh --config; the endpoint changes when the VM reboots, "
        "so run it again then",
        f"Host kp-{ep.name}",
        f"    HostName {ep.host}",
        f"    Port {ep.port}",
        f"    User {ep.user}",
        f"    IdentityFile {_config_path(ep.key_path(identity))}",
        "    IdentitiesOnly yes",
        f"    UserKnownHostsFile {_config_path(ep.known_hosts)}",
        "    StrictHostKeyChecking yes",
        "",
    ])


def config(endpoints: Iterable[Endpoint], identity: Path | None = None) -> str:
    return "\n".join(config_stanza(ep, identity) for ep in endpoints)
