"""The QEMU monitor (QMP), through the QEMU project's own qemu.qmp package.

qemu.qmp is asyncio-based and costs ~100 ms to import, so it is loaded
here only, when a command really talks to a monitor.  Its errors become
KpErrors at this one boundary.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kodepipe.core.errors import KpError, Timeout

if TYPE_CHECKING:
    from kodepipe.vm.qemu import Facts


class Monitor:
    """A synchronous QMP session with one VM."""

    def __init__(self, path: Path, *, timeout: float = 5.0) -> None:
        from qemu.qmp import QMPClient

        self.path = path
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(f"kodepipe:{path.name}")
        # qemu.qmp logs a broken session with a traceback; its errors become KpErrors here instead
        quiet = logging.getLogger("qemu.qmp")
        if not quiet.handlers:
            quiet.addHandler(logging.NullHandler())
            quiet.propagate = False
        try:
            self._run(self._client.connect(str(path)), timeout)
        except BaseException:
            self._loop.close()
            raise

    def _run(self, coro: Any, timeout: float | None) -> Any:
        from qemu.qmp import ConnectError, ExecuteError, QMPError

        try:
            return self._complete(asyncio.wait_for(coro, timeout))
        except TimeoutError:
            raise Timeout(f"the VM's monitor {self.path} did not answer within {timeout:g} s",
                          hint="another command may be holding it; try again") from None
        except ExecuteError as exc:
            raise KpError(f"QMP command failed: {exc.error.error.desc}", code="qmp") from None
        except ConnectError as exc:
            raise KpError(f"cannot reach the VM's monitor {self.path}: {exc.exc}", code="qmp_unreachable") from None
        except QMPError as exc:
            raise KpError(f"QMP error on {self.path}: {exc}", code="qmp") from None

    def _complete(self, awaitable: Any) -> Any:
        """Run ``awaitable`` on the session's loop, with SIGINT and SIGTERM held back until it is done.

        A signal handler that raises inside one of asyncio's callbacks is caught
        there, logged with a traceback and lost (the connection dies with it).
        So while the loop runs, a signal only cancels the call; the signal's own
        handler then runs here, in plain code (kp-* commands: exit 130 or 143,
        and the caller's clean-up runs).
        """
        task = self._loop.create_task(awaitable)
        caught: list[int] = []

        def hold(signum: int, frame: object) -> None:
            caught.append(signum)
            self._loop.call_soon_threadsafe(task.cancel)

        held = {}
        if threading.current_thread() is threading.main_thread():
            held = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._loop.run_until_complete(task)
        except asyncio.CancelledError:
            if not caught:
                raise
            raise KpError(f"interrupted while talking to the VM's monitor {self.path}", code="interrupted") from None
        finally:
            for sig, handler in held.items():
                signal.signal(sig, handler)
            if caught:
                signal.raise_signal(caught[0])

    def execute(self, command: str, arguments: dict[str, Any] | None = None, *,
                timeout: float | None = None) -> Any:
        return self._run(self._client.execute(command, arguments), timeout or self.timeout)

    def send_fd(self, fd: int, name: str) -> None:
        """Hand QEMU an open file descriptor under ``name`` (for fd: migration)."""
        self._client.send_fd_scm(fd)
        self.execute("getfd", {"fdname": name})

    def status(self) -> str:
        """'running', 'paused', 'postmigrate', 'inmigrate', ..."""
        return str(self.execute("query-status")["status"])

    def facts(self) -> Facts:
        """The run state and, for a VM that is not running, why (a save, a disk error)."""
        from kodepipe.vm import qemu

        status = self.status()
        migration = error = None
        if status in ("paused", "postmigrate", "finish-migrate"):
            info = self.execute("query-migrate")
            migration, error = info.get("status"), info.get("error-desc")
        disks: tuple[qemu.DiskError, ...] = ()
        if status == "io-error":
            disks = tuple(dataclasses.replace(d, free=qemu.free_bytes(d.file))
                          for d in qemu.disk_errors(self.execute("query-block"), self.execute("query-fdsets")))
        return qemu.Facts(status, migration, error, disks)

    def resume(self, name: str, *, timeout: float = 30.0) -> None:
        """Run VM ``name`` again from wherever QEMU stopped it, where QEMU allows it.

        Paused (kp-stop --suspend, or anyone's QMP stop), frozen after an
        interrupted save (postmigrate), stopped on a disk error once space is
        free again: QMP cont.  A save still being written with nobody
        watching it is cancelled first (it would freeze the VM again when it
        ends).  A guest that suspended itself is woken.  Otherwise (QEMU
        needs a restart, or waits for a saved state), a KpError says what
        to do; so does a VM that stops again at once.
        """
        from kodepipe.vm import qemu

        facts = self.facts()
        if facts.status == "running":
            return
        if facts.status == "suspended":
            self.execute("system_wakeup")
            return
        if facts.migration in qemu.MIGRATING:
            self.execute("migrate_cancel")
            deadline = time.monotonic() + timeout
            while (migration := self.execute("query-migrate").get("status")) in qemu.MIGRATING:
                if time.monotonic() > deadline:
                    raise KpError(f"{name}: the save in progress did not stop within {timeout:g} s "
                                  f"(migration {migration})", code="frozen", hint="try again")
                time.sleep(0.1)
            facts = self.facts()
        why = qemu.classify(name, facts, paused_by_kodepipe=False)
        if facts.status in qemu.NEEDS_RESTART or facts.status in ("inmigrate", "save-vm", "restore-vm"):
            raise KpError(f"{name} cannot be resumed: {why.problem}", code="frozen", hint=why.hint)
        full = [d for d in facts.disk_errors if d.io_status == "nospace" and d.free is not None
                and d.free < qemu.MIN_FREE]
        if facts.status == "io-error" and full:
            raise KpError(f"{name} cannot be resumed yet: the filesystem holding its disk {full[0].file} has "
                          f"{qemu.human_bytes(full[0].free or 0)} free, and QEMU stopped the VM for want of space",
                          code="no_space", hint=f"free space there (at least {qemu.human_bytes(qemu.MIN_FREE)}), "
                                                f"then kp-stop --resume {name}")
        self.execute("cont")
        after = self.facts()
        if after.status != "running":
            again = qemu.classify(name, after, paused_by_kodepipe=False)
            raise KpError(f"{name} stopped again at once: {again.problem}", code="frozen", hint=again.hint)

    def close(self) -> None:
        try:
            self._complete(asyncio.wait_for(self._client.disconnect(), 2.0))
        except Exception:  # noqa: S110 - closing a session that already broke is not worth an error
            pass
        finally:
            # a session cut off mid-command may not have closed its socket: QEMU serves one client at a
            # time, so the next session (kp-stop's thaw after an interrupted save) would never be answered
            writer = getattr(self._client, "_writer", None)
            if writer is not None and not writer.is_closing():
                writer.transport.abort()
            self._loop.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
