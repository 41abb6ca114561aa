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

Everything the agent says is untrusted input: the guest may be hostile.  A
reply line is at most MAX_REPLY bytes and MAX_TOKENS structural characters
(so parsing it makes a bounded number of objects), must be UTF-8 JSON, and
each field a caller uses is read with its type checked (``Fields``); any
list is at most MAX_ITEMS long.  Anything else is ``AgentBadReply``
(code guest_agent_bad_reply).  Every read and write has a deadline, and a
session's ``deadline`` bounds all its calls, so a reply that trickles one
byte at a time, a file read that never ends or a program that never exits
cannot outlast the caller's --timeout.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import json
import random
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from kodepipe.core.errors import KpError, Timeout

SENTINEL = b"\xff"
# qemu-ga caps a single guest-file-read at 48 MiB; smaller chunks keep each reply line modest
_CHUNK = 1 << 18
_SYNC_TIMEOUT = 5.0
# the longest reply line accepted (a 256 KiB file chunk is 350 KB of base64; guest-exec's
# captured output is the only thing that can be larger, and kodepipe runs no such command)
MAX_REPLY = 16 << 20
# '{', '[' and ',' in one reply line: an upper bound on the objects parsing it makes
# (base64 data has none of them; a real interface list has a few hundred)
MAX_TOKENS = 100_000
# entries accepted in any list a reply carries (interfaces, an interface's addresses)
MAX_ITEMS = 1024
# a guest-sync-delimited reply is a few dozen bytes: more after a 0xFF marker is not one
_SYNC_REPLY_MAX = 4096
_DELIMITERS = re.compile(b"[\n\xff]")
_MAC = re.compile(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){0,31}")


class AgentError(KpError):
    """The agent answered a command with an error."""

    code = "guest_agent"

    def __init__(self, message: str, *, error_class: str = "GenericError", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.error_class = error_class


class AgentUnreachable(KpError):
    """No connection to the agent's socket, or it closed under us (QEMU gone, guest shutting down)."""

    code = "guest_agent_unreachable"


class AgentBadReply(KpError):
    """The agent answered with something the protocol does not allow: not UTF-8 JSON, too large,
    a field missing or of the wrong type.  The guest is broken or hostile; retrying will not help."""

    code = "guest_agent_bad_reply"


def _shown(value: object, limit: int = 80) -> str:
    """A short, printable rendering of a value from a reply, for a message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _json_type(value: object) -> str:
    from kodepipe.core.records import json_type

    return json_type(value)


class Fields:
    """Typed reads of one JSON object from a reply: a missing field or one of the wrong type is
    AgentBadReply, naming the command and the field; strings must be valid Unicode (no lone
    surrogates), since they end up in records written as UTF-8."""

    def __init__(self, value: object, what: str) -> None:
        if not isinstance(value, dict):
            raise AgentBadReply(f"guest agent: {what} is {_json_type(value)}, not an object")
        self.value: dict[str, Any] = value
        self.what = what

    def _get(self, key: str, required: bool) -> Any:
        if key not in self.value or self.value[key] is None:
            if required:
                raise AgentBadReply(f"guest agent: {self.what} has no {key!r}")
            return None
        return self.value[key]

    def _wrong(self, key: str, expected: str) -> AgentBadReply:
        return AgentBadReply(f"guest agent: {self.what}: {key!r} is {_json_type(self.value[key])}, "
                             f"not {expected}")

    def has(self, key: str) -> bool:
        return self.value.get(key) is not None

    def text(self, key: str) -> str:
        value = self._get(key, True)
        if not isinstance(value, str):
            raise self._wrong(key, "a string")
        return checked_text(value, f"{self.what}: {key!r}")

    def optional_text(self, key: str) -> str | None:
        return self.text(key) if self.has(key) else None

    def integer(self, key: str, low: int | None = None, high: int | None = None) -> int:
        value = self._get(key, True)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._wrong(key, "an integer")
        if (low is not None and value < low) or (high is not None and value > high):
            raise AgentBadReply(f"guest agent: {self.what}: {key!r} is {_shown(value)}, out of range")
        return value

    def optional_integer(self, key: str, low: int | None = None, high: int | None = None) -> int | None:
        return self.integer(key, low, high) if self.has(key) else None

    def flag(self, key: str, default: bool | None = None) -> bool:
        if default is not None and not self.has(key):
            return default
        value = self._get(key, True)
        if not isinstance(value, bool):
            raise self._wrong(key, "true or false")
        return value

    def objects(self, key: str) -> list[Fields]:
        """A list of objects (an absent one is empty), at most MAX_ITEMS long."""
        if not self.has(key):
            return []
        return objects(self.value[key], f"{self.what}: {key!r}")

    def data(self, key: str) -> bytes:
        """A base64 field decoded (absent: no bytes)."""
        if not self.has(key):
            return b""
        value = self._get(key, True)
        if not isinstance(value, str):
            raise self._wrong(key, "a base64 string")
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise AgentBadReply(f"guest agent: {self.what}: {key!r} is not valid base64") from None


def objects(value: object, what: str) -> list[Fields]:
    if not isinstance(value, list):
        raise AgentBadReply(f"guest agent: {what} is {_json_type(value)}, not an array")
    if len(value) > MAX_ITEMS:
        raise AgentBadReply(f"guest agent: {what} has {len(value)} entries, more than the {MAX_ITEMS} accepted")
    return [Fields(item, f"{what}[{i}]") for i, item in enumerate(value)]


def checked_text(value: str, what: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise AgentBadReply(f"guest agent: {what} is not valid Unicode (a lone surrogate)") from None
    return value


class GuestAgent:
    """One client session with a guest's agent.

    ``deadline`` (a time.monotonic() value), when set, bounds every call of the session, whatever
    timeout the call itself asks for: the caller's --timeout holds across all of them.
    """

    def __init__(self, path: Path, deadline: float | None = None) -> None:
        self.path = path
        self.deadline = deadline
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
        self._buf.clear()
        self._synced = False

    def _until(self, timeout: float) -> tuple[float, str]:
        """The deadline of something that may take ``timeout`` seconds, within the session's; and how
        to say it (for a Timeout's message)."""
        deadline = time.monotonic() + timeout
        if self.deadline is not None and self.deadline < deadline:
            return self.deadline, "before the session's deadline (the --timeout)"
        return deadline, f"within {timeout:g} s"

    def _send(self, data: bytes, deadline: float, what: str) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:  # no time left: not even a connection is made
            raise Timeout(f"the guest agent on {self.path} did not take {what}")
        sock = self._connect()
        try:
            # a guest that reads nothing fills the channel: sending waits, but not past the deadline
            sock.settimeout(remaining)
            sock.sendall(data)
        except TimeoutError:
            self._drop()  # half a command may have gone: the next session's 0xFF resets the agent's parser
            raise Timeout(f"the guest agent on {self.path} did not take {what}") from None
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
        scanned = 0  # bytes already searched: a reply trickling in byte by byte is not searched again
        while (end := self._buf.find(b"\n", scanned)) < 0:
            scanned = len(self._buf)
            if scanned > MAX_REPLY:
                self._drop()  # the rest of the line is unread: this connection is out of step for good
                raise AgentBadReply(f"guest agent: the reply to {what.split()[0]} is longer than "
                                    f"{MAX_REPLY >> 20} MiB")
            self._fill(deadline, what)
        line = bytes(self._buf[:end])
        del self._buf[:end + 1]
        return line

    # -- the protocol -------------------------------------------------------

    def sync(self, timeout: float = _SYNC_TIMEOUT) -> None:
        """Connect if needed and resynchronise; Timeout means the agent is not (yet) answering."""
        deadline, within = self._until(timeout)
        sync_id = random.randrange(1, 1 << 62)  # noqa: S311 - a nonce against stale replies, not a secret
        what = f"guest-sync-delimited {within}"
        self._send(SENTINEL + json.dumps({"execute": "guest-sync-delimited",
                                          "arguments": {"id": sync_id}}).encode() + b"\n", deadline, what)
        while True:
            # discard everything up to a marker: stale replies, the parse error the 0xFF caused
            while (start := self._buf.find(SENTINEL)) < 0:
                self._buf.clear()
                self._fill(deadline, what)
            del self._buf[:start + 1]
            # the reply runs to the newline; another marker first means this one was garbage,
            # and so is anything too long to be a sync reply (it is dropped, not held)
            scanned = 0
            while (hit := _DELIMITERS.search(self._buf, scanned)) is None and len(self._buf) <= _SYNC_REPLY_MAX:
                scanned = len(self._buf)
                self._fill(deadline, what)
            if hit is None:
                self._buf.clear()
                continue
            if self._buf[hit.start()] != 0x0A:
                continue
            line = bytes(self._buf[:hit.start()])
            del self._buf[:hit.start() + 1]
            try:
                reply = _parse(line)
            except AgentBadReply:
                continue  # garbage, or half a reply from an earlier session
            # only the newest id will do: the agent answers in order, so its reply comes after
            # those to anything sent before it (earlier syncs, each with a parse error for its 0xFF)
            if isinstance(reply, dict) and reply.get("return") == sync_id:
                self._synced = True
                return

    def call(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        """Run one command and return its "return" value; AgentError if the agent refused it,
        AgentBadReply if what came back is not a reply."""
        deadline, within = self._until(timeout)
        if not self._synced:
            self.sync(max(0.0, min(deadline - time.monotonic(), _SYNC_TIMEOUT)))
        request: dict[str, Any] = {"execute": command}
        if arguments is not None:
            request["arguments"] = arguments
        what = f"{command} {within}"
        self._send(json.dumps(request).encode() + b"\n", deadline, what)
        try:
            reply = self._reply(deadline, what)
        except (Timeout, AgentBadReply):
            # a late reply may still come: the next call must not take it for its own
            self._synced = False
            raise
        if "error" in reply:
            raise _refusal(command, reply["error"])
        return reply["return"]

    def fields(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0) -> Fields:
        """``call``, for a command whose reply is an object: its fields, read typed."""
        return Fields(self.call(command, arguments, timeout), f"the reply to {command}")

    def _reply(self, deadline: float, what: str) -> dict[str, Any]:
        while True:
            line = self._line(deadline, what)
            # a late answer to one of our own earlier syncs is delimited, and not the reply
            if line.startswith(SENTINEL) or not line.strip():
                continue
            # in step since the sync: whatever comes now is the reply, or the agent is broken
            reply = _parse(line, what.split()[0])
            if not isinstance(reply, dict) or ("return" not in reply and "error" not in reply):
                raise AgentBadReply(f"guest agent: the reply to {what.split()[0]} is {_json_type(reply)} "
                                    f"without \"return\" or \"error\": {_shown(reply)}")
            return reply

    # -- commands -----------------------------------------------------------

    def ping(self) -> None:
        self.call("guest-ping")

    def interfaces(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """guest-network-get-interfaces, every field read typed and each address checked: a list of
        {"name", "hardware-address" (or None), "ip-addresses": [{"ip-address", "ip-address-type", "prefix"}]}."""
        found = []
        for iface in objects(self.call("guest-network-get-interfaces", timeout=timeout),
                             "the reply to guest-network-get-interfaces"):
            name = iface.text("name")
            if not name or len(name) > 256:
                raise AgentBadReply(f"guest agent: {iface.what}: the interface name {_shown(name)} is not one")
            mac = iface.optional_text("hardware-address")
            if mac is not None and not _MAC.fullmatch(mac):
                raise AgentBadReply(f"guest agent: {iface.what}: {_shown(mac)} is not a hardware address")
            addresses = []
            for entry in iface.objects("ip-addresses"):
                family = entry.text("ip-address-type")
                if family not in ("ipv4", "ipv6"):
                    raise AgentBadReply(f"guest agent: {entry.what}: unknown address type {_shown(family)}")
                text = entry.text("ip-address")
                try:
                    address = ipaddress.ip_address(text)
                except ValueError:
                    raise AgentBadReply(f"guest agent: {entry.what}: {_shown(text)} is not an IP address") from None
                if address.version != (4 if family == "ipv4" else 6):
                    raise AgentBadReply(f"guest agent: {entry.what}: {_shown(text)} is not an {family} address")
                prefix = entry.integer("prefix", 0, 32 if family == "ipv4" else 128)
                addresses.append({"ip-address": str(address), "ip-address-type": family, "prefix": prefix})
            found.append({"name": name, "hardware-address": mac, "ip-addresses": addresses})
        return found

    def hostname(self) -> str:
        return self.fields("guest-get-host-name").text("host-name")

    def exec(self, argv: list[str], input: bytes | None = None, timeout: float = 60.0) -> tuple[int, bytes, bytes]:
        """Run ``argv`` in the guest (as root, PATH searched); return (status, stdout, stderr).

        A process killed by signal N gives -N, as subprocess does.  The agent
        reports "exited" only once the program's output pipes are closed, so a
        background child that keeps stdout open holds this call until the
        timeout.  On timeout the guest process is left running (qemu-ga has no
        command to kill it).
        """
        deadline, _ = self._until(timeout)
        arguments: dict[str, Any] = {"path": argv[0], "arg": argv[1:], "capture-output": True}
        if input is not None:
            arguments["input-data"] = base64.b64encode(input).decode()
        pid = self.fields("guest-exec", arguments, timeout=max(0.1, min(timeout, 10.0))).integer("pid")
        delay = 0.01
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Timeout(f"{argv[0]} in the guest did not finish within {timeout:g} s")
            status = self.fields("guest-exec-status", {"pid": pid}, timeout=max(0.1, min(remaining, 10.0)))
            if status.flag("exited"):
                break
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.25)  # quick commands answer fast; long ones are not polled hard
        signal = status.optional_integer("signal", 0, 1 << 16)
        code = -signal if signal is not None else (status.optional_integer("exitcode", -(1 << 31), 1 << 31) or 0)
        return code, status.data("out-data"), status.data("err-data")

    def read_file(self, path: str, limit: int = 1 << 20, timeout: float = 30.0) -> bytes:
        """The content of a guest file; KpError if it is larger than ``limit`` bytes, Timeout if
        reading it takes longer than ``timeout`` seconds."""
        deadline, within = self._until(timeout)
        handle = self._handle("guest-file-open", {"path": path, "mode": "r"}, deadline)
        data = bytearray()
        try:
            while True:
                if deadline - time.monotonic() <= 0:
                    raise Timeout(f"reading {path} in the guest did not end {within}")
                want = min(_CHUNK, limit + 1 - len(data))
                chunk = self.fields("guest-file-read", {"handle": handle, "count": want},
                                    timeout=self._left(deadline))
                piece = chunk.data("buf-b64")
                count = chunk.integer("count", 0, want)
                if len(piece) != count:
                    raise AgentBadReply(f"guest agent: guest-file-read of {path} said {count} bytes "
                                        f"and sent {len(piece)}")
                data += piece
                if len(data) > limit:
                    raise KpError(f"{path} in the guest is larger than {limit} bytes", code="too_large")
                if chunk.flag("eof", default=False) or not count:
                    break
        finally:
            self._close_quietly(handle, deadline)
        return bytes(data)

    def write_file(self, path: str, data: bytes, mode: str = "w", timeout: float = 60.0) -> None:
        """Write ``data`` to a guest file (mode "w" truncates, "a" appends), as root."""
        deadline, within = self._until(timeout)
        handle = self._handle("guest-file-open", {"path": path, "mode": mode}, deadline)
        try:
            view = memoryview(data)
            while view:
                if deadline - time.monotonic() <= 0:
                    raise Timeout(f"writing {path} in the guest did not end {within}")
                piece = view[:_CHUNK]
                written = self.fields("guest-file-write", {"handle": handle,
                                                           "buf-b64": base64.b64encode(piece).decode()},
                                      timeout=self._left(deadline))
                count = written.integer("count", 0, len(piece))
                if count <= 0:
                    raise AgentError(f"guest agent: writing {path} made no progress")
                view = view[count:]
        except BaseException:
            self._close_quietly(handle, deadline)
            raise
        # the agent writes through stdio: closing flushes, so its failure is a failed write
        self.call("guest-file-close", {"handle": handle}, timeout=self._left(deadline))

    def _handle(self, command: str, arguments: dict[str, Any], deadline: float) -> int:
        handle = self.call(command, arguments, timeout=self._left(deadline))
        if isinstance(handle, bool) or not isinstance(handle, int):
            raise AgentBadReply(f"guest agent: the reply to {command} is {_json_type(handle)}, not a handle")
        return handle

    @staticmethod
    def _left(deadline: float) -> float:
        """What is left until ``deadline``, for one call (at most 10 s: one call answers fast or not at all)."""
        return max(0.0, min(deadline - time.monotonic(), 10.0))

    def _close_quietly(self, handle: int, deadline: float) -> None:
        # a failure in the body matters more; a leaked handle dies with the agent
        with contextlib.suppress(KpError):
            self.call("guest-file-close", {"handle": handle}, timeout=max(0.1, self._left(deadline)))

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


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _parse(line: bytes, command: str = "guest-sync-delimited") -> object:
    """One reply line as JSON: strict UTF-8 (never another encoding json would guess), no NaN or
    Infinity, at most MAX_TOKENS objects and entries; else AgentBadReply."""
    if line.count(b"{") + line.count(b"[") + line.count(b",") > MAX_TOKENS:
        raise AgentBadReply(f"guest agent: the reply to {command} has more than {MAX_TOKENS} entries")
    try:
        return json.loads(line.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise AgentBadReply(f"guest agent: the reply to {command} is not UTF-8") from None
    except RecursionError:
        raise AgentBadReply(f"guest agent: the reply to {command} is nested too deeply") from None
    except ValueError as exc:
        raise AgentBadReply(f"guest agent: the reply to {command} is not JSON ({exc})") from None


def _refusal(command: str, error: object) -> AgentError:
    """The agent's error reply as an AgentError, whatever shape it has (its text is the guest's)."""
    fields = error if isinstance(error, dict) else {}
    desc, error_class = fields.get("desc"), fields.get("class")
    text = desc if isinstance(desc, str) else _shown(error, 200)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")[:1000]
    return AgentError(f"guest agent: {command} failed: {text}",
                      error_class=error_class if isinstance(error_class, str) and error_class.isidentifier()
                      else "GenericError")


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
