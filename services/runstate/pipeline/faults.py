"""Crash points for the fault suite: with RUNSTATE_FAULT_POINT set, the service
kills itself with SIGKILL the Nth time (RUNSTATE_FAULT_AFTER, default 1) it
reaches that point, so tests can crash it exactly between the database commit,
the publish and the offset commit. Off unless the variable is set."""

from __future__ import annotations

import os
import signal

POINTS = ("before_db_commit", "after_db_commit", "after_publish")


class CrashPoint:
    def __init__(self, point: str | None = None, after: int | None = None) -> None:
        self.point = point if point is not None else os.environ.get("RUNSTATE_FAULT_POINT") or None
        if self.point is not None and self.point not in POINTS:
            raise ValueError(f"RUNSTATE_FAULT_POINT must be one of {POINTS}, not {self.point!r}")
        self.remaining = after if after is not None else int(os.environ.get("RUNSTATE_FAULT_AFTER", "1"))

    def reached(self, point: str) -> None:
        if point != self.point:
            return
        self.remaining -= 1
        if self.remaining <= 0:
            os.kill(os.getpid(), signal.SIGKILL)
