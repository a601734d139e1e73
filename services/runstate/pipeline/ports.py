"""The batch path's ports: what it needs from storage and from the broker,
and the data that crosses them.

The batch logic (pipeline/batch.py) and the service use these; the
PostgreSQL and in-memory stores (store/) and the Kafka publisher implement
them. No adapter imports the batch logic.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from runstate.domain import CacheEntry, Lease, State, TagLimit
from runstate.events import GENESIS, EventType, StreamType, event_hash
from runstate.messages import ErrorInfo
from runstate.pipeline.records import IncomingRecord, ParsedCommand


@dataclass(slots=True)
class StreamHead:
    view: Any  # TaskRunView or FlowRunView, by the stream's type; a limit stream's tag
    last_seq: int
    # The view as JSON when a decision already wrote it (for the payload), so
    # the projection upsert does not serialise it again.
    view_json: str | None = None
    # The hash of the stream's last event, the next event's link (None: none stored).
    last_hash: bytes | None = None


@dataclass(slots=True)
class StoredOutcome:
    """What was published for an already-decided command, to publish again."""

    result_event: str
    state_change: str | None
    key: bytes
    # For a lookup by source: what identifies the record that was decided.
    digest: bytes | None = None
    command_id: UUID | None = None

    def decided(self, item: ParsedCommand) -> bool:
        """Whether this stored outcome is the decision of `item`'s record."""
        if self.digest is not None:
            return self.digest == item.record.digest
        # Written before digests were stored: the same command id, given by the
        # sender or derived from the position as it was derived then.
        return self.command_id in (item.command.command_id, item.record.legacy_derived_id())


@dataclass
class StoreSnapshot:
    task_runs: dict[UUID, StreamHead] = field(default_factory=dict)
    flow_runs: dict[UUID, StreamHead] = field(default_factory=dict)
    by_source: dict[tuple[int, int], StoredOutcome] = field(default_factory=dict)
    by_transition: dict[tuple[UUID, UUID], StoredOutcome] = field(default_factory=dict)
    cache: dict[str, list[CacheEntry]] = field(default_factory=dict)
    tag_limits: dict[str, TagLimit] = field(default_factory=dict)
    leases: dict[UUID, list[Lease]] = field(default_factory=dict)
    # Concurrency-limit streams (one per tag): their last seq and hash, and the
    # limit commands already recorded, by (stream_id, command_id).
    limit_streams: dict[UUID, StreamHead] = field(default_factory=dict)
    by_command: dict[tuple[UUID, UUID], StoredOutcome] = field(default_factory=dict)


_NO_STATE = (None, None, None)


@dataclass(slots=True)
class EventRow:
    stream_id: UUID
    seq: int
    stream_type: StreamType
    event_type: EventType
    command_id: UUID
    transition_id: UUID | None
    status: str | None
    state_type: str | None
    state_name: str | None
    state_id: UUID | None
    payload: str
    source_topic: str
    source_partition: int
    source_offset: int
    source_digest: bytes
    # The messages inside `payload`, as published (a store may keep them apart).
    result_event: str
    state_change: str | None
    # Chained to the previous event of the stream (runstate/events.py, event_hash).
    hash: bytes = b""

    @classmethod
    def of(
        cls,
        item: ParsedCommand,
        stream_id: UUID,
        seq: int,
        stream_type: StreamType,
        event_type: EventType,
        transition_id: UUID | None,
        status: str | None,
        appended: State | None,
        payload: str,
        result_event: str,
        state_change: str | None,
        previous_hash: bytes | None,
        ids_text: tuple[str, str, str | None] | None = None,
    ) -> EventRow:
        """The row recording one decided command, with the record it came from,
        chained to the stream's previous event. `ids_text` is the stream id, the
        command id and the transition id as text, when the caller has them already."""
        record = item.record
        state_type, state_name, state_id = (appended.type.value, appended.name, appended.id) if appended else _NO_STATE
        # Positional: a keyword call of 17 fields costs more than the rest of the row.
        row = cls(stream_id, seq, stream_type, event_type, item.command_id, transition_id, status, state_type,
                  state_name, state_id, payload, record.topic, record.partition, record.offset, record.digest,
                  result_event, state_change)
        # The hash reads each id as its text: the same bytes from the text as from the UUID.
        stream_text, command_text, transition_text = ids_text or (stream_id, row.command_id, transition_id)
        row.hash = event_hash(
            previous_hash or GENESIS,
            stream_id=stream_text, seq=seq, stream_type=stream_type, event_type=event_type,
            command_id=command_text, transition_id=transition_text, status=status,
            state_type=state_type, state_name=state_name, state_id=state_id,
            source_topic=record.topic, source_partition=record.partition,
            source_offset=record.offset, source_digest=record.digest, payload=payload,
        )
        return row


@dataclass(slots=True)
class Publication:
    key: bytes | None
    value: str
    # W3C trace context headers (traceparent, tracestate) when tracing is on.
    trace_headers: list[tuple[str, bytes]] | None = None


@dataclass(slots=True)
class DeadLetter:
    record: IncomingRecord
    error: ErrorInfo


@dataclass
class BatchOutcome:
    events: list[EventRow] = field(default_factory=list)
    task_run_heads: dict[UUID, StreamHead] = field(default_factory=dict)
    flow_run_heads: dict[UUID, StreamHead] = field(default_factory=dict)
    cache_rows: list[CacheEntry] = field(default_factory=list)
    leases_added: list[Lease] = field(default_factory=list)
    leases_removed: list[UUID] = field(default_factory=list)
    slot_deltas: dict[str, int] = field(default_factory=dict)
    # Tags whose limit a command set (the row as it ends the batch) or deleted (None);
    # their slot changes are in the row, not in slot_deltas.
    limit_rows: dict[str, TagLimit | None] = field(default_factory=dict)
    results: list[Publication] = field(default_factory=list)
    state_changes: list[Publication] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    duplicates: int = 0
    # Decided against a snapshot read from the store (False: from what this process
    # knows it wrote, pipeline/owned.py).
    read_store: bool = True

    def absorb(self, other: BatchOutcome) -> None:
        """Add what another (already stored) outcome publishes and counts."""
        self.events += other.events
        self.results += other.results
        self.state_changes += other.state_changes
        self.dead_letters += other.dead_letters
        self.duplicates += other.duplicates


@dataclass
class SnapshotRequest:
    """What a batch's decisions will read. A store returns exactly these rows;
    working out which ones are needed is the batch logic's job."""

    now: datetime  # cache rows expired by then are not returned
    source_topic: str = ""
    sources: list[tuple[int, int]] = field(default_factory=list)  # (partition, offset)
    digests: set[bytes] = field(default_factory=set)  # of the records at those positions
    task_run_ids: set[UUID] = field(default_factory=set)
    flow_run_ids: set[UUID] = field(default_factory=set)
    transitions: list[tuple[UUID, UUID]] = field(default_factory=list)  # (stream_id, transition_id)
    cache_keys: set[str] = field(default_factory=set)
    tags: set[str] = field(default_factory=set)  # their rows are locked until the batch ends, in tag order
    lease_holders: set[UUID] = field(default_factory=set)
    limit_streams: set[UUID] = field(default_factory=set)  # their last event's seq and hash
    commands: list[tuple[UUID, UUID]] = field(default_factory=list)  # (stream_id, command_id) of limit commands

    def __bool__(self) -> bool:
        return bool(self.sources or self.task_run_ids or self.flow_run_ids or self.transitions
                    or self.cache_keys or self.tags or self.lease_holders or self.limit_streams
                    or self.commands)


class StoreSession(Protocol):
    """One batch's transaction: its reads see one snapshot, its writes are all
    or nothing, committed when the session's context ends without an error. A
    session that read nothing may commit its one append as it returns."""

    async def read(self, request: SnapshotRequest, into: StoreSnapshot) -> None:
        """Add the rows `request` names to `into`."""

    async def append(self, outcome: BatchOutcome) -> None:
        """Write the outcome's events, projections, cache rows, leases and slots."""


class EventStore(Protocol):
    def session(self) -> AbstractAsyncContextManager[StoreSession]: ...

    async def open(self) -> None: ...

    async def close(self) -> None: ...


class StoreError(Exception):
    """A store refused a session; the subclass says whose fault it was."""


class StoreConflict(StoreError):
    """Another writer got there first (a key it wrote, a row it changed): decide again on fresh state."""


class RecordRefused(StoreError):
    """The batch's own data cannot be stored (a data exception, a limit): find the record."""


class StoreUnavailable(StoreError):
    """Not the records' fault (unreachable, permissions, read-only, schema, disk): wait and retry."""


class Publisher(Protocol):
    """Publishes a batch's results, state changes and dead letters, and returns
    once the broker has acknowledged every one of them."""

    async def publish(self, outcome: BatchOutcome) -> None: ...



class ServiceMetrics(Protocol):
    """What the batch service reports as it works; pipeline/app.py wires in the
    Prometheus adapter, tests and tools may leave the default that ignores it."""

    def phase(self, name: str, seconds: float) -> None:
        """Time spent in one phase of a batch: parse, snapshot, decide, write, publish."""

    def batch(self, outcome: BatchOutcome, records: int, decided_at: float,
              record_timestamps_ms: list[int]) -> None:
        """A batch was stored and published: its decisions, refusals and redeliveries."""

    def outage(self, what: str | None) -> None:
        """An outage began (what refused) or ended (None)."""


class NoMetrics:
    def phase(self, name: str, seconds: float) -> None:
        pass

    def batch(self, outcome: BatchOutcome, records: int, decided_at: float,
              record_timestamps_ms: list[int]) -> None:
        pass

    def outage(self, what: str | None) -> None:
        pass
