"""Crash points for the fault suite: with RUNSTATE_FAULT_POINT set, the service
kills itself with SIGKILL the Nth time (RUNSTATE_FAULT_AFTER, default 1) it
reaches that point, so tests can crash it exactly between the database commit,
the publish and the offset commit. RUNSTATE_FAULT_SIGNAL=SIGSTOP freezes it
there instead (a zombie that a test wakes with SIGCONT, possibly after its
partitions moved; it then carries on from that very point, once). Off unless
the variable is set."""

from __future__ import annotations

import os
import signal

POINTS = ("before_db_commit", "after_db_commit", "after_publish")
SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGSTOP": signal.SIGSTOP}


class CrashPoint:
    def __init__(self, point: str | None = None, after: int | None = None, sig: str | None = None) -> None:
        self.point = point if point is not None else os.environ.get("RUNSTATE_FAULT_POINT") or None
        if self.point is not None and self.point not in POINTS:
            raise ValueError(f"RUNSTATE_FAULT_POINT must be one of {POINTS}, not {self.point!r}")
        self.remaining = max(1, after if after is not None else int(os.environ.get("RUNSTATE_FAULT_AFTER", "1")))
        name = sig if sig is not None else os.environ.get("RUNSTATE_FAULT_SIGNAL") or "SIGKILL"
        if name not in SIGNALS:
            raise ValueError(f"RUNSTATE_FAULT_SIGNAL must be one of {tuple(SIGNALS)}, not {name!r}")
        self.signal = SIGNALS[name]

    def reached(self, point: str) -> None:
        if point != self.point:
            return
        self.remaining -= 1
        if self.remaining == 0:
            os.kill(os.getpid(), self.signal)
