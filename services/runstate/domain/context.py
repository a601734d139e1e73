"""Everything a decision may read besides the run and the request.

The pipeline fills this in (clock, ids, one random draw, lookups); nothing in the domain
reads a clock, a database or a random generator, so a serialised context replays exactly.
"""

from __future__ import annotations

from uuid import UUID

from pydantic import ConfigDict, Field

from .frozen import FrozenModel
from .run import FlowRunView
from .states import State
from .timestamps import UtcDateTime


class TagLimit(FrozenModel):
    """A V2 concurrency-limit row named `tag:<tag>`."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    tag: str
    limit: int
    active: bool = True
    active_slots: int = 0
    avg_slot_occupancy_seconds: float | None = 2.0


class Lease(FrozenModel):
    """Slots a run holds on a set of tag limits (one per successful R4 acquisition)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: UUID
    tags: list[str]
    slots: int = 1
    holder_run_id: UUID


class CacheEntry(FrozenModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    cache_key: str
    cache_expiration: UtcDateTime | None = None
    created: UtcDateTime
    state: State


class OrchestrationSettings(FrozenModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    max_cache_key_length: int = 2000
    tag_concurrency_slot_wait_seconds: float = Field(default=10.0, ge=0)


_DEFAULT_SETTINGS = OrchestrationSettings()  # shared (frozen): see states._NO_DETAILS


class OrchestrationContext(FrozenModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    now: UtcDateTime
    """The clock reading for this request; the proposed state's timestamp."""
    new_state_id: UUID
    """Id of the state appended, whichever one it turns out to be (proposal or replacement)."""
    new_lease_id: UUID
    """Id of the lease R4 creates if it takes slots."""
    random: float = Field(ge=0.0, lt=1.0)
    """One uniform draw in [0, 1); R4's wait and R7's jitter map it through an inverse CDF."""
    flow_run: FlowRunView | None = None
    """The run's flow run; None when the run has none or it does not exist."""
    cache_entries: list[CacheEntry] = Field(default_factory=list)
    """Cache rows for the proposal's cache_key, in any order, expired ones included or not."""
    tag_limits: dict[str, TagLimit] = Field(default_factory=dict)
    """V2 limit rows for the run's tags, keyed by tag; a missing tag has no limit."""
    leases: list[Lease] = Field(default_factory=list)
    """Leases currently held by this run."""
    settings: OrchestrationSettings = _DEFAULT_SETTINGS
