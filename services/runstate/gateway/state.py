"""The gateway's per-process state that every handler reads, and its errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from runstate.client import RunstateClient

from .limits import DEFAULT_MAX_BODY_BYTES
from .reads import GatewayReads

DEFAULT_RESULT_TIMEOUT = 10.0
"""Seconds a request waits for its decision before answering 503."""


class KeyedLocks:
    """One asyncio lock per key, kept only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


@dataclass
class Gateway:
    """What every handler needs; one per process."""

    bus: RunstateClient
    reads: GatewayReads
    result_timeout: float
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    creating: KeyedLocks = field(default_factory=KeyedLocks)
    """Task-run creates in flight, by (flow_run_id, task_key, dynamic_key)."""


class PendingDecision(Exception):
    """The command was published but its decision did not arrive in time."""

    def __init__(self, message: str, transition_id: str | None = None) -> None:
        super().__init__(message)
        self.transition_id = transition_id


