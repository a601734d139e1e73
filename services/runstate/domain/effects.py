"""Side effects a decision asks the store to apply, in the same transaction as the append."""

from __future__ import annotations

from typing import Annotated, Literal
from uuid import UUID

from pydantic import ConfigDict, Field

from .frozen import FrozenModel
from .timestamps import UtcDateTime


class _Effect(FrozenModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class CacheInserted(_Effect):
    """R10: a cache row pointing at the appended COMPLETED state."""

    kind: Literal["cache_inserted"] = "cache_inserted"
    cache_key: str
    cache_expiration: UtcDateTime | None = None
    state_id: UUID


class SlotsTaken(_Effect):
    """R4: one slot on every listed tag limit, held by the run under a new lease."""

    kind: Literal["slots_taken"] = "slots_taken"
    lease_id: UUID
    tags: list[str]
    slots: int = 1


class SlotsReleased(_Effect):
    """R11: revoke these leases and subtract `decrements[tag]` (floor 0) from each tag limit."""

    kind: Literal["slots_released"] = "slots_released"
    lease_ids: list[UUID]
    decrements: dict[str, int]


class TaskScheduled(_Effect):
    """EnqueueScheduledTasks: the run goes onto its task_key's queue (retry queue if `retry`)."""

    kind: Literal["task_scheduled"] = "task_scheduled"
    task_key: str
    retry: bool = False


Effect = Annotated[
    CacheInserted | SlotsTaken | SlotsReleased | TaskScheduled,
    Field(discriminator="kind"),
]
