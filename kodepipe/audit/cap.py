"""The size cap of a kp-run audit log: when strace's log reaches it, the run is stopped.

strace writes the log itself (``-o FILE``), so that it goes on recording even
if kp-run dies.  A watcher thread in kp-run looks at the log's size every
POLL seconds; when it has reached the cap, the watcher

1. stops strace (SIGSTOP): every traced process then halts at its next
   traced system call (each one, when strace is attached; the mode's, when
   its seccomp filter decides), since none goes on before its tracer lets it;
2. has the container killed (SIGKILL, the callback), which a process halted
   at a system call cannot ignore;
3. lets strace go on (SIGCONT), so that it writes the ends of the processes
   and exits.

So nothing the agent did goes unrecorded, and the log ends no more than one
poll interval's output past the cap.  The run is stopped rather than left to
go on unaudited: an audit is asked for as evidence, and a log that stops
while the agent still runs is none.  A backstop for when kp-run itself is gone
(SIGKILL): strace's RLIMIT_FSIZE is the cap plus SLACK, so the log can never
fill the disk; the kernel then kills strace with SIGXFSZ.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kodepipe.core import proc

# the cap itself, its default (256m) and its minimum (64k), are the policy's: container/policy.py
SLACK = 64 << 20
POLL = 0.05


class SizeCap:
    """Watches one audit log; ``reached`` is the log's size when the cap was hit, else None.

    ``tracer`` None: strace runs elsewhere (in a VM's guest, the log watched here being the host's
    copy of its log), so its RLIMIT_FSIZE is set where it runs, and ``stop`` halts it, kills the
    container and lets it go on, all three."""

    def __init__(self, path: Path, cap: int, tracer: proc.Process[bytes] | proc.Foreign | None,
                 stop: Callable[[], None], say: Callable[[str], None] = lambda _m: None) -> None:
        self.path, self.cap, self.tracer = path, cap, tracer
        self.stop, self.say = stop, say
        self.reached: int | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        limit = self.cap + SLACK
        if self.tracer is not None:
            resource.prlimit(self.tracer.pid, resource.RLIMIT_FSIZE, (limit, limit))
        self._thread = threading.Thread(target=self._watch, name="kp-audit-cap", daemon=True)
        self._thread.start()

    def _size(self) -> int:
        try:
            return os.stat(self.path).st_size
        except OSError:
            return 0

    def _watch(self) -> None:
        while not self._done.wait(POLL):
            size = self._size()
            if size < self.cap:
                continue
            self.reached = size
            self.say(f"the audit log reached its cap ({self.cap} bytes): stopping the container")
            # Popen.send_signal does nothing once the tracer was reaped, a Foreign's goes by its pidfd:
            # never to a reused pid
            try:
                with contextlib.suppress(ProcessLookupError):
                    if self.tracer is not None:
                        self.tracer.send_signal(signal.SIGSTOP)
                self.stop()
            finally:
                with contextlib.suppress(ProcessLookupError):
                    if self.tracer is not None:
                        self.tracer.send_signal(signal.SIGCONT)
            return

    def close(self) -> None:
        """Stop watching (the tracer has ended)."""
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def record(self) -> dict[str, Any]:
        """The record's fields: the cap always; when it was reached, what became of the run."""
        out: dict[str, Any] = {"audit_cap": self.cap}
        if self.reached is not None:
            out["audit"] = "capped"
            out["audit_capped"] = {
                "log_bytes": self._size(), "cap": self.cap, "run": "stopped",
                "message": f"the audit log reached its cap ({self.cap} bytes): kp-run halted the tracer, so "
                           "the agent's processes stopped at their next traced system call, and killed the "
                           "container; the log records everything up to there"}
        return out
