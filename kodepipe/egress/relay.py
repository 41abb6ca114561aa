"""The host's end of the egress relay: a sandbox whose network namespace kodepipe cannot reach
directly (a container inside a VM) gets kodepipe's proxy through relay.pl, run in that namespace,
which carries every connection and DNS datagram as mux frames over one channel (an SSH exec channel,
a pipe, a socket).  Here each stream becomes a socketpair whose far end the Proxy serves exactly as
a connection accepted on its own listener, and each query goes to the Proxy's DNS answerer: the
same policy, the same refusals (raw addresses, loopback, the host's own addresses), the same
DecisionLog.  The relay decides nothing.

    with serving(channel, policy, log):   # Proxy(policy, log), Relay(proxy, channel), ready
        ... the agent runs ...             # then the relay is stopped, then the proxy

A channel is anything with ``recv(n)``, ``sendall(data)``, ``shutdown_write()`` and ``close()``:
a paramiko Channel as it is, a socket through SocketChannel, two pipe ends through PipeChannel.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import os
import shlex
import socket
import threading
from collections.abc import Iterator
from importlib import resources
from typing import Any, Protocol

from kodepipe.core.errors import KpError
from kodepipe.egress import mux
from kodepipe.egress.mux import Kind
from kodepipe.egress.policy import Policy
from kodepipe.egress.proxy import MAX_DNS_INFLIGHT, DecisionLog, Proxy
from kodepipe.egress.wire import HEAD_LIMIT

RECV_SIZE = 1 << 16
READY_TIMEOUT = 60.0
# bytes waiting for the channel: all the streams' windows, plus room for control frames and DNS answers;
# more means the relay sends (queries, data it is credited for) but does not read what it is sent
OUT_LIMIT = mux.MAX_STREAMS * mux.WINDOW + (4 << 20)


class Channel(Protocol):
    def recv(self, n: int) -> bytes: ...

    def sendall(self, data: bytes) -> None: ...

    def shutdown_write(self) -> None: ...

    def close(self) -> None: ...


class SocketChannel:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def recv(self, n: int) -> bytes:
        return self.sock.recv(n)

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def shutdown_write(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()


class PipeChannel:
    """The relay's stdout to read (``rfd``) and its stdin to write (``wfd``); both are ours to close."""

    def __init__(self, rfd: int, wfd: int) -> None:
        self.rfd, self.wfd = rfd, wfd
        self._lock = threading.Lock()

    def recv(self, n: int) -> bytes:
        return os.read(self.rfd, n)

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.wfd, view):]

    def shutdown_write(self) -> None:
        with self._lock:
            if self.wfd >= 0:
                os.close(self.wfd)
                self.wfd = -1

    def close(self) -> None:
        self.shutdown_write()
        with self._lock:
            if self.rfd >= 0:
                os.close(self.rfd)
                self.rfd = -1


def script() -> str:
    """relay.pl's text."""
    return resources.files("kodepipe.egress").joinpath("relay.pl").read_text(encoding="utf-8")


def relay_argv(pid: int) -> list[str]:
    """The relay in the network namespace of process ``pid`` (a container's init), run as root."""
    return ["nsenter", f"--net=/proc/{pid}/ns/net", "--", "perl", "-e", script()]


def relay_command(pid: int) -> str:
    """relay_argv as one command line for an SSH exec channel, by the guest's sudo user."""
    return shlex.join(["sudo", "-n", *relay_argv(pid)])


class RelayError(KpError):
    """The relay did not start, or its session broke (code "failed": a code of its own comes with the
    VM run's wiring, in core.errors' catalogue)."""


class Relay:
    """One relay session: frames from ``channel`` served by ``proxy`` on the proxy's loop, until the
    channel ends, a frame breaks the rules, or stop()."""

    def __init__(self, proxy: Proxy, channel: Channel) -> None:
        self.proxy, self.channel = proxy, channel
        self.session = mux.HostSession()
        self.listeners: tuple[str, ...] = ()
        self.reason: str | None = None  # why the session ended
        self.ready = threading.Event()
        self.done = threading.Event()
        self._decoder = mux.Decoder()
        self._streams: dict[int, _Stream] = {}
        self._dns = 0
        self._out = bytearray()
        self._out_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False

    # -- the threads that talk to the channel ---------------------------------------------------

    def start(self) -> None:
        if self.proxy.thread is None:
            raise RelayError("the proxy is not running: start it before its relay")
        threading.Thread(target=self._reader, name="kp-relay-in", daemon=True).start()
        threading.Thread(target=self._sender, name="kp-relay-out", daemon=True).start()

    def _reader(self) -> None:
        loop = self.proxy.loop
        while not self.done.is_set():
            try:
                data = self.channel.recv(RECV_SIZE)
            except (OSError, EOFError) as exc:
                data = b""
                self.reason = self.reason or f"the relay's channel failed: {exc}"
            handled: concurrent.futures.Future[None] = concurrent.futures.Future()

            def handle(data: bytes = data, handled: concurrent.futures.Future[None] = handled) -> None:
                try:
                    self._received(data)
                finally:
                    handled.set_result(None)

            try:  # one chunk at a time: the guest cannot queue more here than the loop has taken
                loop.call_soon_threadsafe(handle)
            except RuntimeError:  # the proxy's loop is closed: so is the session
                self.done.set()
                return
            handled.result()
            if not data:
                return

    def _sender(self) -> None:
        while True:
            self._wake.wait()
            with self._out_lock:
                chunk = bytes(self._out)
                self._out.clear()
                if not (self._stopping or self.done.is_set()):  # else: round again, to shut the channel
                    self._wake.clear()
            if chunk:
                try:
                    self.channel.sendall(chunk)
                except (OSError, EOFError) as exc:
                    self.proxy.loop.call_soon_threadsafe(self._end, f"the relay's channel failed: {exc}")
                    return
            elif self._stopping or self.done.is_set():
                with contextlib.suppress(OSError, EOFError):
                    self.channel.shutdown_write()  # the relay reads EOF, and exits
                return

    def send(self, data: bytes) -> None:
        """Queue a frame for the channel (on the proxy's loop)."""
        with self._out_lock:
            self._out += data
            size = len(self._out)
        self._wake.set()
        if size > OUT_LIMIT:
            self.proxy.log.write(decision="error", method="RELAY",
                                 reason=f"the relay does not read what it is sent ({size} bytes wait)")
            self._end("the relay does not read what it is sent")

    # -- the session, on the proxy's loop ---------------------------------------------------------

    def _received(self, data: bytes) -> None:
        if self.done.is_set():
            return
        if not data:
            self._end(self.reason or ("the relay ended" if self.ready.is_set() else
                                      "the relay ended before it was listening"))
            return
        try:
            for frame in self._decoder.feed(data):
                acted = self.session.receive(frame)
                if acted is not None:
                    self._dispatch(acted)
        except mux.MuxError as exc:
            self.proxy.log.write(decision="error", method="RELAY", reason=f"the relay broke the protocol: {exc}")
            self._end(f"the relay broke the protocol: {exc}")

    def _dispatch(self, frame: mux.Frame) -> None:
        if frame.kind is Kind.READY:
            self.listeners = self.session.listeners or ()
            self.ready.set()
        elif frame.kind is Kind.OPEN:
            self._streams[frame.stream] = _Stream(self, frame.stream)
        elif frame.kind is Kind.DNS:
            self._query(frame.stream, frame.payload)
        else:
            stream = self._streams[frame.stream]
            if frame.kind is Kind.DATA:
                stream.inbox.append(frame.payload)
                stream.wake_in.set()
            elif frame.kind is Kind.EOF:
                stream.guest_eof = True
                stream.wake_in.set()
            elif frame.kind is Kind.CREDIT:
                stream.wake_out.set()
            else:  # CLOSE: the guest's client is gone
                self._streams.pop(frame.stream)
                stream.abort()

    def _query(self, query: int, payload: bytes) -> None:
        if self._dns >= MAX_DNS_INFLIGHT:
            self._answer(query, b"")  # dropped, as a busy resolver would: the client retries
            return
        self._dns += 1

        async def answer() -> None:
            reply = None
            try:
                reply = await self.proxy.loop.run_in_executor(None, self.proxy.answer_dns, payload)
            finally:
                self._dns -= 1
                self._answer(query, reply if reply is not None and len(reply) <= mux.MAX_PAYLOAD else b"")

        self._keep(self.proxy.loop.create_task(answer()))

    def _answer(self, query: int, reply: bytes) -> None:
        if self.done.is_set():
            return
        self.session.answered(query)
        self.send(mux.encode(Kind.DNS, query, reply))

    def _keep(self, task: asyncio.Task[Any]) -> None:
        self.proxy.tasks.add(task)
        task.add_done_callback(self.proxy.tasks.discard)

    def _closed(self, stream_id: int) -> None:
        """The host ends a stream: CLOSE, and what the guest still sends on it is stale."""
        if self._streams.pop(stream_id, None) is not None and not self.done.is_set():
            self.session.closed(stream_id)
            self.send(mux.encode(Kind.CLOSE, stream_id))

    def _end(self, reason: str) -> None:
        if self.done.is_set():
            return
        self.reason = self.reason or reason
        for stream in list(self._streams.values()):
            stream.abort()
        self._streams.clear()
        self.done.set()
        self._wake.set()  # the sender shuts the channel's write side: the relay exits

    # -- the caller's side ------------------------------------------------------------------------

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> tuple[str, ...]:
        """The relay's listeners once it is listening; RelayError if it ended first or took too long."""
        for _ in range(int(timeout * 10) + 1):
            if self.ready.wait(0.1) or self.done.is_set():
                break
        if not self.ready.is_set() or (self.done.is_set() and not self.listeners):
            raise RelayError(f"the egress relay did not start: {self.reason or f'not listening after {timeout:g} s'}")
        return self.listeners

    def stop(self, timeout: float = 10.0) -> str | None:
        """End the session: the relay sees its stdin end and exits.  Why the session ended."""
        self._stopping = True
        self._wake.set()
        self.done.wait(timeout)
        if not self.done.is_set():
            self.proxy.loop.call_soon_threadsafe(self._end, "stopped")
            self.done.wait(timeout)
        return self.reason


@contextlib.contextmanager
def serving(channel: Channel, policy: Policy, log: DecisionLog, *,
            timeout: float = READY_TIMEOUT) -> Iterator[Relay]:
    """One run's egress through a relay: kodepipe's proxy on the host for ``policy`` and ``log``,
    the relay on ``channel`` (relay_command(pid) already running at its other end), ready when this
    yields; on exit the relay is stopped (it exits and its sockets close), then the proxy.  RelayError
    if the relay did not start."""
    proxy = Proxy(policy, log)
    proxy.start(None, None)
    session = Relay(proxy, channel)
    try:
        session.start()
        session.wait_ready(timeout)
        yield session
    finally:
        session.stop()
        proxy.stop()


class _Stream:
    """One connection: guest frames into a socketpair, the Proxy on its other end."""

    def __init__(self, relay: Relay, stream_id: int) -> None:
        self.relay, self.id = relay, stream_id
        self.inbox: collections.deque[bytes] = collections.deque()
        self.guest_eof = False
        self.wake_in = asyncio.Event()
        self.wake_out = asyncio.Event()
        ours, theirs = socket.socketpair()
        self.sock = ours
        loop = relay.proxy.loop
        self.handler = loop.create_task(relay.proxy.serve(theirs))
        relay._keep(self.handler)
        self.task = loop.create_task(self._run())
        relay._keep(self.task)
        self.writer: asyncio.StreamWriter | None = None

    def abort(self) -> None:
        self.task.cancel()
        if self.writer is not None:
            self.writer.close()
        else:
            self.sock.close()

    async def _run(self) -> None:
        self.sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=self.sock, limit=HEAD_LIMIT)
        self.writer = writer
        inbound = asyncio.ensure_future(self._to_proxy(writer))
        try:
            await self._from_proxy(reader)
            await asyncio.wait([self.handler])  # the proxy is done with the connection
            self.relay._closed(self.id)
        finally:
            inbound.cancel()
            writer.close()

    async def _from_proxy(self, reader: asyncio.StreamReader) -> None:
        """What the proxy answers, as DATA within the guest's credit, then EOF."""
        session = self.relay.session
        while True:
            state = session.streams.get(self.id)
            if state is None:
                return
            if state.credit <= 0:
                self.wake_out.clear()
                await self.wake_out.wait()
                continue
            data = b""
            with contextlib.suppress(OSError):
                data = await reader.read(min(state.credit, mux.MAX_PAYLOAD))
            if not data:
                break
            session.sent_data(self.id, len(data))
            self.relay.send(mux.encode(Kind.DATA, self.id, data))
        if self.id in session.streams:
            session.streams[self.id].host_eof = True
            self.relay.send(mux.encode(Kind.EOF, self.id))

    async def _to_proxy(self, writer: asyncio.StreamWriter) -> None:
        """The guest's DATA into the proxy's connection, CREDIT back once written, then its EOF."""
        try:
            while True:
                await self.wake_in.wait()
                self.wake_in.clear()
                size = 0
                while self.inbox:
                    data = self.inbox.popleft()
                    writer.write(data)
                    size += len(data)
                if size:
                    await writer.drain()
                    if self.relay.session.consumed(self.id, size) and not self.relay.done.is_set():
                        self.relay.send(mux.credit(self.id, size))
                if self.guest_eof and not self.inbox:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
        except OSError:
            return  # the proxy closed its end: what the guest still sends is dropped
