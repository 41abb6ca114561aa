"""A synchronous client for the QEMU guest agent (qemu-ga) on its host-side unix socket.

The wire protocol: one JSON command ``{"execute": ..., "arguments": ...}``,
one newline-terminated JSON reply, no greeting.  The socket belongs to QEMU,
so it accepts connections before the agent runs in the guest, and bytes a
previous client left unread (its late replies) may still be waiting.  So
every session starts with a resynchronisation: a 0xFF byte (the agent resets
its parser, and answers the stray byte with a parse error we ignore), then
``guest-sync-delimited`` with a random id, whose reply comes after a 0xFF of
its own.  Everything before that marker, and any reply with another id, is
somebody else's.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from kodepipe.errors import KpError, Timeout

SENTINEL = b"\xff"
# qemu-ga caps a single guest-file-read at 48 MiB; smaller chunks keep each reply line modest
_CHUNK = 1 << 18
_SYNC_TIMEOUT = 5.0


class AgentError(KpError):
    """The agent answered a command with an error."""

    code = "guest_agent"

    def __init__(self, message: str, *, error_class: str = "GenericError", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.error_class = error_class


class AgentUnreachable(KpError):
    """No connection to the agent's socket, or it closed under us (QEMU gone, guest shutting down)."""

    code = "guest_agent_unreachable"


class GuestAgent:
    """One client session with a guest's agent."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._synced = False

    # -- connection and framing ---------------------------------------------

    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(2.0)
        try:
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            raise AgentUnreachable(f"cannot connect to the guest agent socket {self.path}: {exc.strerror or exc}",
                                   hint="is the VM running?") from None
        self._sock = sock
        self._buf.clear()
        self._synced = False
        return sock

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        self._synced = False

    def _send(self, data: bytes) -> None:
        sock = self._connect()
        try:
            sock.settimeout(5.0)
            sock.sendall(data)
        except OSError as exc:
            self._drop()
            raise AgentUnreachable(f"lost the connection to the guest agent {self.path}: {exc}") from None

    def _fill(self, deadline: float, what: str) -> None:
        """Read more bytes into the buffer, or raise Timeout at ``deadline``."""
        sock = self._sock
        if sock is None:
            raise AgentUnreachable(f"not connected to the guest agent {self.path}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Timeout(f"the guest agent on {self.path} did not answer {what}")
        try:
            sock.settimeout(remaining)
            data = sock.recv(1 << 16)
        except TimeoutError:
            raise Timeout(f"the guest agent on {self.path} did not answer {what}") from None
        except OSError as exc:
            self._drop()
            raise AgentUnreachable(f"lost the connection to the guest agent {self.path}: {exc}") from None
        if not data:
            self._drop()
            raise AgentUnreachable(f"the guest agent's socket {self.path} closed the connection")
        self._buf += data

    def _line(self, deadline: float, what: str) -> bytes:
        while (end := self._buf.find(b"\n")) < 0:
            self._fill(deadline, what)
        line = bytes(self._buf[:end])
        del self._buf[:end + 1]
        return line

    # -- the protocol -------------------------------------------------------

    def sync(self, timeout: float = _SYNC_TIMEOUT) -> None:
        """Connect if needed and resynchronise; Timeout means the agent is not (yet) answering."""
        deadline = time.monotonic() + timeout
        self._connect()
        sync_id = random.randrange(1, 1 << 62)  # noqa: S311 - a nonce against stale replies, not a secret
        self._send(SENTINEL + json.dumps({"execute": "guest-sync-delimited",
                                          "arguments": {"id": sync_id}}).encode() + b"\n")
        what = f"guest-sync-delimited within {timeout:g} s"
        while True:
            # discard everything up to a marker: stale replies, the parse error the 0xFF caused
            while (start := self._buf.find(SENTINEL)) < 0:
                self._buf.clear()
                self._fill(deadline, what)
            del self._buf[:start + 1]
            # the reply runs to the newline; another marker first means this one was garbage
            while (end := self._buf.find(b"\n")) < 0 and SENTINEL not in self._buf:
                self._fill(deadline, what)
            marker = self._buf.find(SENTINEL)
            if marker >= 0 and (end < 0 or marker < end):
                continue
            reply = _parse(bytes(self._buf[:end]))
            del self._buf[:end + 1]
            # only the newest id will do: the agent answers in order, so its reply comes after
            # those to anything sent before it (earlier syncs, each with a parse error for its 0xFF)
            if reply is not None and reply.get("return") == sync_id:
                self._synced = True
                return

    def call(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        """Run one command and return its "return" value; AgentError if the agent refused it."""
        deadline = time.monotonic() + timeout
        if not self._synced:
            self.sync(min(timeout, _SYNC_TIMEOUT))
        request: dict[str, Any] = {"execute": command}
        if arguments is not None:
            request["arguments"] = arguments
        self._send(json.dumps(request).encode() + b"\n")
        try:
            reply = self._reply(deadline, f"{command} within {timeout:g} s")
        except Timeout:
            # its reply may still come: the next call must not take it for its own
            self._synced = False
            raise
        if "error" in reply:
            error = reply["error"] if isinstance(reply["error"], dict) else {}
            raise AgentError(f"guest agent: {command} failed: {error.get('desc', reply['error'])}",
                             error_class=str(error.get("class", "GenericError")))
        return reply.get("return")

    def _reply(self, deadline: float, what: str) -> dict[str, Any]:
        while True:
            line = self._line(deadline, what)
            # a late answer to one of our own earlier syncs is delimited, and not the reply
            if line.startswith(SENTINEL) or not line.strip():
                continue
            reply = _parse(line)
            if reply is not None and ("return" in reply or "error" in reply):
                return reply

    # -- commands -----------------------------------------------------------

    def ping(self) -> None:
        self.call("guest-ping")

    def interfaces(self) -> list[dict[str, Any]]:
        result = self.call("guest-network-get-interfaces")
        return list(result) if isinstance(result, list) else []

    def hostname(self) -> str:
        return str(self.call("guest-get-host-name")["host-name"])

    def exec(self, argv: list[str], input: bytes | None = None, timeout: float = 60.0) -> tuple[int, bytes, bytes]:
        """Run ``argv`` in the guest (as root, PATH searched); return (status, stdout, stderr).

        A process killed by signal N gives -N, as subprocess does.  The agent
        reports "exited" only once the program's output pipes are closed, so a
        background child that keeps stdout open holds this call until the
        timeout.  On timeout the guest process is left running (qemu-ga has no
        command to kill it).
        """
        deadline = time.monotonic() + timeout
        arguments: dict[str, Any] = {"path": argv[0], "arg": argv[1:], "capture-output": True}
        if input is not None:
            arguments["input-data"] = base64.b64encode(input).decode()
        pid = self.call("guest-exec", arguments, timeout=max(0.1, min(timeout, 10.0)))["pid"]
        delay = 0.01
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Timeout(f"{argv[0]} in the guest did not finish within {timeout:g} s")
            status = self.call("guest-exec-status", {"pid": pid}, timeout=max(0.1, min(remaining, 10.0)))
            if status.get("exited"):
                break
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.25)  # quick commands answer fast; long ones are not polled hard
        code = -int(status["signal"]) if "signal" in status else int(status.get("exitcode", 0))
        return code, _b64(status.get("out-data")), _b64(status.get("err-data"))

    def read_file(self, path: str, limit: int = 1 << 20) -> bytes:
        """The content of a guest file; KpError if it is larger than ``limit`` bytes."""
        handle = self.call("guest-file-open", {"path": path, "mode": "r"})
        data = bytearray()
        try:
            while True:
                chunk = self.call("guest-file-read", {"handle": handle, "count": min(_CHUNK, limit + 1 - len(data))})
                data += _b64(chunk.get("buf-b64"))
                if len(data) > limit:
                    raise KpError(f"{path} in the guest is larger than {limit} bytes", code="too_large")
                if chunk.get("eof") or not chunk.get("count"):
                    break
        finally:
            self._close_quietly(handle)
        return bytes(data)

    def write_file(self, path: str, data: bytes, mode: str = "w") -> None:
        """Write ``data`` to a guest file (mode "w" truncates, "a" appends), as root."""
        handle = self.call("guest-file-open", {"path": path, "mode": mode})
        try:
            view = memoryview(data)
            while view:
                piece = view[:_CHUNK]
                written = self.call("guest-file-write", {"handle": handle,
                                                         "buf-b64": base64.b64encode(piece).decode()})
                count = int(written.get("count", 0))
                if count <= 0:
                    raise AgentError(f"guest agent: writing {path} made no progress")
                view = view[count:]
        except BaseException:
            self._close_quietly(handle)
            raise
        # the agent writes through stdio: closing flushes, so its failure is a failed write
        self.call("guest-file-close", {"handle": handle})

    def _close_quietly(self, handle: Any) -> None:
        # a failure in the body matters more; a leaked handle dies with the agent
        with contextlib.suppress(KpError):
            self.call("guest-file-close", {"handle": handle})

    def set_time(self, ns: int | None = None) -> None:
        """Set the guest's clock (to the host's now when ``ns`` is None) and its RTC.

        An explicit time is always passed: without one the agent copies the
        guest's RTC, which is stale after resuming a saved machine.
        """
        self.call("guest-set-time", {"time": time.time_ns() if ns is None else ns})

    def shutdown(self, mode: str = "powerdown", wait: float = 1.0) -> None:
        """Ask the guest to shut down ("powerdown", "halt" or "reboot").

        On success the agent sends no reply (the guest is going away), so
        silence or a closed connection within ``wait`` seconds is success;
        only an error reply (a bad mode, shutdown(8) failing) raises.
        """
        if not self._synced:  # an agent that is not up must not pass for one that obeyed
            self.sync(wait)
        try:
            self.call("guest-shutdown", {"mode": mode}, timeout=wait)
        except (Timeout, AgentUnreachable):
            pass
        finally:
            self._synced = False  # nothing more will answer on this session

    def close(self) -> None:
        self._drop()

    def __enter__(self) -> GuestAgent:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:  # garbage, or half a reply from an earlier session
        return None
    return value if isinstance(value, dict) else None


def _b64(text: object) -> bytes:
    if not isinstance(text, str) or not text:
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        raise AgentError("guest agent: a reply carried invalid base64 data") from None


def wait_for_agent(path: Path, timeout: float, alive: Callable[[], bool] | None = None,
                   poll: float = 1.0) -> GuestAgent:
    """Retry connect + sync until the agent answers; return the synced session.

    ``alive`` says whether QEMU still runs: when it returns False the wait
    ends at once with code "vm_died" instead of running out the clock.
    """
    deadline = time.monotonic() + timeout
    agent = GuestAgent(path)
    last = "no attempt"
    try:
        while True:
            if alive is not None and not alive():
                raise KpError(f"the VM exited while waiting for its guest agent ({last})", code="vm_died")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Timeout(f"the guest agent on {path} did not answer within {timeout:g} s ({last})")
            started = time.monotonic()
            try:
                # an agent that is up answers in milliseconds; the connection is kept, so the
                # sync that is waiting in the socket when the agent starts is answered at once
                agent.sync(min(max(poll, 0.05), remaining))
                return agent
            except Timeout:
                last = "connected, but the agent did not answer"
            except AgentUnreachable as exc:
                last = exc.message
            time.sleep(max(0.0, min(poll - (time.monotonic() - started), deadline - time.monotonic())))
    except BaseException:
        agent.close()
        raise
