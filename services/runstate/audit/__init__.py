"""Audit tools over the event log: history, replay-and-verify, projection rebuild,
state-change backfill, and tag concurrency limits (the `runstate` CLI's back end)."""

from runstate.audit.db import ServerUnreachable, open_engine
from runstate.audit.rebuild import RebuildReport, rebuild

__all__ = ["RebuildReport", "ServerUnreachable", "open_engine", "rebuild"]
