"""The one SSH hop from the host into a VM: a connection to the VM as it is now, and commands run
over it.  The container layer reaches a VM only through here (an import-linter contract says so)."""

from __future__ import annotations

import select
import shlex
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kodepipe.core.errors import KpError
from kodepipe.core.records import Record

CONNECT_TIMEOUT = 60.0
COMMAND_TIMEOUT = 300.0  # one small remote step; Podman under TCG takes seconds per call
TAIL = 16384  # bytes of a command's stderr kept to explain its failure


@dataclass
class Outcome:
    status: int
    stdout: bytes
    stderr: bytes


class Remote:
    """Commands in one VM over one SSH connection (paramiko; channels may be opened from any thread)."""

    def __init__(self, client: Any, name: str) -> None:
        self.client, self.name = client, name

    def run(self, command: str, *, input: bytes = b"", timeout: float | None = COMMAND_TIMEOUT) -> Outcome:
        return self.send(command, [input] if input else [], timeout=timeout)

    def send(self, command: str, chunks: Iterable[bytes], *, timeout: float | None = COMMAND_TIMEOUT) -> Outcome:
        """Run ``command`` with ``chunks`` as its stdin; what it prints is kept (it should print little)."""
        out, err = bytearray(), bytearray()
        status = self._session(command, out.extend, err.extend, chunks, timeout)
        return Outcome(status, bytes(out), bytes(err))

    def stream(self, command: str, sink: Callable[[bytes], None]) -> tuple[int, bytes]:
        """Run ``command``, handing its stdout and stderr to ``sink`` as they arrive; its status
        and the tail of its stderr."""
        tail = bytearray()

        def err(chunk: bytes) -> None:
            sink(chunk)
            tail.extend(chunk)
            del tail[:-TAIL]

        status = self._session(command, sink, err, [], None)
        return status, bytes(tail)

    def open(self, command: str) -> Any:
        """``command`` on an exec channel of its own, left open for the caller to talk to (a paramiko
        Channel: recv, sendall, shutdown_write, recv_stderr, close); the caller closes it."""
        import paramiko

        channel = None
        try:
            channel = self.client.get_transport().open_session()
            channel.exec_command(command)
        except (OSError, EOFError, paramiko.SSHException, AttributeError) as exc:
            if channel is not None:
                channel.close()
            raise KpError(f"the SSH connection to {self.name} is gone: {exc or type(exc).__name__}",
                          code="connection_lost") from None
        return channel

    def terminal(self, command: str, term: str, columns: int, rows: int) -> Any:
        """``command`` on an exec channel with a pseudo-terminal of its own (``term``, ``columns`` x
        ``rows``; ``resize_pty`` changes it), left open for the caller, who closes it.  The remote
        pty merges stdout and stderr, as a terminal does."""
        import paramiko

        channel = None
        try:
            channel = self.client.get_transport().open_session()
            channel.get_pty(term=term, width=columns, height=rows)
            channel.exec_command(command)
        except (OSError, EOFError, paramiko.SSHException, AttributeError) as exc:
            if channel is not None:
                channel.close()
            raise KpError(f"the SSH connection to {self.name} is gone: {exc or type(exc).__name__}",
                          code="connection_lost") from None
        return channel

    def _session(self, command: str, out: Callable[[bytes], None], err: Callable[[bytes], None],
                 chunks: Iterable[bytes], timeout: float | None) -> int:
        """One exec channel: stdin from ``chunks``, then read until the command is done.
        The exit status is -1 if the server sent none (killed, or the connection dropped)."""
        import paramiko

        deadline = None if timeout is None else time.monotonic() + timeout
        what = shlex.split(command)[:4]
        try:
            channel = self.client.get_transport().open_session()
        except (OSError, EOFError, paramiko.SSHException, AttributeError) as exc:
            raise KpError(f"the SSH connection to {self.name} is gone: {exc or type(exc).__name__}",
                          code="connection_lost") from None
        try:
            channel.exec_command(command)

            def drain() -> None:
                while channel.recv_ready():
                    out(channel.recv(65536))
                while channel.recv_stderr_ready():
                    err(channel.recv_stderr(65536))

            try:
                for chunk in chunks:
                    channel.sendall(chunk)
                    drain()
            except OSError:
                pass  # it stopped reading (it failed, most likely): its status and message say why
            channel.shutdown_write()
            while True:
                # the channel's fileno is a pipe paramiko sets on stdout data, stderr data and EOF
                select.select([channel], [], [], 1.0)
                drain()
                if (channel.eof_received or channel.closed) and not channel.recv_ready() \
                        and not channel.recv_stderr_ready():
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise KpError(f"{self.name}: {shlex.join(what)} did not finish within {timeout:g} s",
                                  code="timeout")
            status: int = channel.recv_exit_status()
            return status
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise KpError(f"the SSH connection to {self.name} broke during {shlex.join(what)}: {exc}",
                          code="connection_lost") from None
        finally:
            channel.close()

    def close(self) -> None:
        self.client.close()


def connect(vm: Record) -> Remote:
    """An SSH connection to the VM as it is now (a record from stdin may predate a reboot)."""
    from kodepipe.core.records import check_name
    from kodepipe.core.state import Store
    from kodepipe.vm import lifecycle, ssh, vms
    name = check_name(vm.get("name"), "vm name")
    store = Store()
    expect = vm.get("id")
    lifecycle.vm_meta(store, name, expect if isinstance(expect, str) else None)
    # the key's path from the state only, never from a record on stdin
    ep = ssh.endpoint({**{k: v for k, v in vm.items() if k != "ssh_key"}, **vms.view(store, name)})
    return Remote(ssh.connect(ep, ssh.load_key(ep.key_path()), timeout=CONNECT_TIMEOUT), name)
