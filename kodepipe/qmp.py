"""The QEMU monitor (QMP), through the QEMU project's own qemu.qmp package.

qemu.qmp is asyncio-based and costs ~100 ms to import, so it is loaded
here only, when a command really talks to a monitor.  Its errors become
KpErrors at this one boundary.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from kodepipe.errors import KpError, Timeout


class Monitor:
    """A synchronous QMP session with one VM."""

    def __init__(self, path: Path, *, timeout: float = 5.0) -> None:
        from qemu.qmp import QMPClient

        self.path = path
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(f"kodepipe:{path.name}")
        try:
            self._run(self._client.connect(str(path)), timeout)
        except BaseException:
            self._loop.close()
            raise

    def _run(self, coro: Any, timeout: float | None) -> Any:
        from qemu.qmp import ConnectError, ExecuteError, QMPError

        try:
            return self._loop.run_until_complete(asyncio.wait_for(coro, timeout))
        except TimeoutError:
            raise Timeout(f"the VM's monitor {self.path} did not answer within {timeout:g} s",
                          hint="another command may be holding it; try again") from None
        except ExecuteError as exc:
            raise KpError(f"QMP command failed: {exc.error.error.desc}", code="qmp") from None
        except ConnectError as exc:
            raise KpError(f"cannot reach the VM's monitor {self.path}: {exc.exc}", code="qmp_unreachable") from None
        except QMPError as exc:
            raise KpError(f"QMP error on {self.path}: {exc}", code="qmp") from None

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

    def close(self) -> None:
        try:
            self._loop.run_until_complete(asyncio.wait_for(self._client.disconnect(), 2.0))
        except Exception:  # noqa: S110 - closing a session that already broke is not worth an error
            pass
        finally:
            self._loop.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
