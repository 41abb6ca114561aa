"""The audit log's size cap: the watcher halts the tracer, stops the run, and lets the tracer go on."""

from __future__ import annotations

import resource
import subprocess
import threading
from pathlib import Path

from kodepipe.audit import cap as auditcap


def test_the_cap_stops_the_run_with_the_tracer_halted(tmp_path: Path) -> None:
    log = tmp_path / "audit.strace"
    log.write_bytes(b"x\n" * 100)
    tracer = subprocess.Popen(["sleep", "600"])
    stopped = threading.Event()
    seen: list[str] = []

    def state() -> str:
        return Path(f"/proc/{tracer.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]

    def settle(want: str) -> str:  # a signal lands when its target is next scheduled
        for _ in range(1000):
            if (now := state()) == want:
                return now
            threading.Event().wait(0.01)
        return state()

    def stop() -> None:  # the container is killed while the tracer is halted
        seen.append(settle("T"))
        stopped.set()

    cap = auditcap.SizeCap(log, 1000, tracer, stop, seen.append)
    try:
        cap.start()
        assert resource.prlimit(tracer.pid, resource.RLIMIT_FSIZE) == (1000 + auditcap.SLACK,) * 2
        assert not stopped.wait(3 * auditcap.POLL) and cap.reached is None  # below the cap: nothing
        assert cap.record() == {"audit_cap": 1000}
        with log.open("ab") as f:
            f.write(b"y\n" * 500)
        assert stopped.wait(60)
        cap.close()
        assert seen[0].startswith("the audit log reached its cap (1000 bytes)") and seen[1] == "T"
        # let go again afterwards: not stopped (T) any more
        assert settle("S") == "S"
        record = cap.record()
        assert record["audit"] == "capped" and record["audit_capped"]["log_bytes"] == 1200
        assert record["audit_capped"]["cap"] == 1000 and record["audit_capped"]["run"] == "stopped"
    finally:
        tracer.kill()
        tracer.wait()


def test_a_tracer_that_ended_is_never_signalled(tmp_path: Path) -> None:
    log = tmp_path / "audit.strace"
    log.write_bytes(b"x" * 5000)
    tracer = subprocess.Popen(["true"])
    limit_set = threading.Event()
    cap = auditcap.SizeCap(log, 1000, tracer, limit_set.set)
    cap.start()
    tracer.wait()  # reaped: its pid may belong to another process now
    assert limit_set.wait(60)  # the run is still stopped; send_signal skipped the reaped tracer
    cap.close()
