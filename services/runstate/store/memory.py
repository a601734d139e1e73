"""In-memory adapter of the batch path's EventStore port, for fast tests of the
pipeline's logic. tests/store/test_contract.py holds it to the same contract as
the PostgreSQL store: the same conflicts, lookups and locking.

Sessions run one at a time (serialisable by construction). Rows are kept as the
JSON text a real store would hold and parsed on every read, so a value that
does not survive the round trip shows up here too.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from uuid import UUID

from runstate.domain import CacheEntry, FlowRunView, Lease, TagLimit, TaskRunView
from runstate.pipeline.message_json import state_ref_json, stored_messages
from runstate.pipeline.ports import (
    BatchOutcome,
    EventRow,
    SnapshotRequest,
    StoreConflict,
    StoredOutcome,
    StoreError,
    StoreSnapshot,
    StreamHead,
)

FINAL = ("ACCEPT", "REJECT", "ABORT")


@dataclass
class _Tables:
    events: list[EventRow] = field(default_factory=list)
    task_runs: dict[UUID, tuple[int, str]] = field(default_factory=dict)  # id -> (last_seq, view json)
    flow_runs: dict[UUID, tuple[int, str]] = field(default_factory=dict)
    cache: list[CacheEntry] = field(default_factory=list)
    tag_limits: dict[str, TagLimit] = field(default_factory=dict)
    leases: dict[UUID, Lease] = field(default_factory=dict)
    hashes: dict[tuple[UUID, int], bytes] = field(default_factory=dict)  # (stream_id, seq) -> hash


class InMemoryEventStore:
    def __init__(self) -> None:
        self.tables = _Tables()
        self._lock = asyncio.Lock()
        # Test hook: each session opened while this holds errors fails with the next one.
        self.refusals: list[StoreError] = []

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def set_tag_limit(self, limit: TagLimit) -> None:
        """What the concurrency-limit admin writes."""
        self.tables.tag_limits[limit.tag] = limit

    @asynccontextmanager
    async def session(self) -> AsyncIterator[InMemorySession]:
        async with self._lock:
            if self.refusals:
                raise self.refusals.pop(0)
            session = InMemorySession(self.tables)
            yield session
            session.commit()


class InMemorySession:
    def __init__(self, tables: _Tables) -> None:
        self.tables = tables
        self.staged: list[BatchOutcome] = []
        self.read_any = False  # a session that read nothing commits its append at once, as PostgreSQL's does

    async def read(self, request: SnapshotRequest, into: StoreSnapshot) -> None:
        self.read_any = True
        t = self.tables
        for run_id in request.task_run_ids:
            if run_id in t.task_runs:
                seq, view = t.task_runs[run_id]
                into.task_runs[run_id] = StreamHead(TaskRunView.model_validate_json(view), seq,
                                                    last_hash=t.hashes.get((run_id, seq)))
        for run_id in request.flow_run_ids:
            if run_id in t.flow_runs:
                seq, view = t.flow_runs[run_id]
                into.flow_runs[run_id] = StreamHead(FlowRunView.model_validate_json(view), seq,
                                                    last_hash=t.hashes.get((run_id, seq)))
        positions = set(request.sources)
        for row in t.events:
            position = (row.source_partition, row.source_offset)
            if (
                row.source_topic == request.source_topic
                and position in positions
                and (position not in into.by_source or row.source_digest in request.digests)
            ):
                    into.by_source[position] = _stored(t, row, by_source=True)
        transitions = set(request.transitions)
        for row in t.events:
            if row.status in FINAL and (row.stream_id, row.transition_id) in transitions:
                into.by_transition[(row.stream_id, row.transition_id)] = _stored(t, row)  # type: ignore[index]
        for key in request.cache_keys:
            live = [e for e in t.cache if e.cache_key == key
                    and (e.cache_expiration is None or e.cache_expiration > request.now)]
            if live:
                into.cache[key] = [max(live, key=lambda e: e.created)]
        for tag in sorted(request.tags):
            if tag in t.tag_limits:
                into.tag_limits[tag] = t.tag_limits[tag]
        for lease in t.leases.values():
            if lease.holder_run_id in request.lease_holders:
                into.leases.setdefault(lease.holder_run_id, []).append(lease)
        commands = set(request.commands)
        for row in t.events:
            if row.stream_id in request.limit_streams:
                head = into.limit_streams.get(row.stream_id)
                if head is None or head.last_seq < row.seq:
                    into.limit_streams[row.stream_id] = StreamHead(None, row.seq, last_hash=row.hash)
            if (row.stream_id, row.command_id) in commands:
                into.by_command[(row.stream_id, row.command_id)] = _stored(t, row)

    async def append(self, outcome: BatchOutcome) -> None:
        self.staged.append(outcome)
        if not self.read_any:
            self.commit()

    def commit(self) -> None:
        """Apply every staged write, or none: the unique keys PostgreSQL has (the source
        record is looked up, not unique: migration 0011)."""
        t = self.tables
        keys = {(e.stream_id, e.seq) for e in t.events}
        finals: set[tuple[UUID, UUID | None] | None] = {
            (e.stream_id, e.transition_id) for e in t.events if e.status in FINAL and e.transition_id
        }
        states: set[UUID | None] = {e.state_id for e in t.events if e.state_id}
        for outcome in self.staged:
            for e in outcome.events:
                final = (e.stream_id, e.transition_id) if e.status in FINAL and e.transition_id else None
                if (e.stream_id, e.seq) in keys or (final and final in finals) or (
                        e.state_id and e.state_id in states):
                    raise StoreConflict(f"duplicate key: event {e.stream_id} seq {e.seq}")
                keys.add((e.stream_id, e.seq))
                if final:
                    finals.add(final)
                states.add(e.state_id)
        for outcome in self.staged:
            t.events += outcome.events
            t.hashes.update(((e.stream_id, e.seq), e.hash) for e in outcome.events)
            for head in outcome.task_run_heads.values():
                t.task_runs[head.view.id] = (head.last_seq, head.view_json or head.view.model_dump_json(exclude_defaults=True))
            for head in outcome.flow_run_heads.values():
                t.flow_runs[head.view.id] = (head.last_seq, head.view.model_dump_json())
            t.cache += outcome.cache_rows
            for lease in outcome.leases_added:
                t.leases[lease.id] = lease
            for lease_id in outcome.leases_removed:
                t.leases.pop(lease_id, None)
            for tag, limit in outcome.limit_rows.items():
                if limit is None:
                    t.tag_limits.pop(tag, None)
                else:
                    t.tag_limits[tag] = limit
            for tag, delta in outcome.slot_deltas.items():
                if tag in t.tag_limits and delta:
                    limit = t.tag_limits[tag]
                    t.tag_limits[tag] = limit.model_copy(update={"active_slots": max(0, limit.active_slots + delta)})
        self.staged = []


def _stored(t: _Tables, row: EventRow, by_source: bool = False) -> StoredOutcome:
    # Rendered again from the stored payload, as the PostgreSQL store does, not
    # taken from what the decider published: the contract tests compare the two.
    before = [e for e in t.events if e.stream_id == row.stream_id and e.seq < row.seq and e.state_type]
    previous = max(before, key=lambda e: e.seq) if before else None
    result_event, state_change = stored_messages(
        row.payload, stream_id=row.stream_id, seq=row.seq, command_id=row.command_id,
        transition_id=row.transition_id, status=row.status, state_id=row.state_id,
        from_state=state_ref_json(previous.state_type, previous.state_name, previous.state_id)
        if previous and previous.state_type else "null",
    )
    stored = StoredOutcome(result_event, state_change, str(row.stream_id).encode())
    if by_source:
        stored.digest, stored.command_id = row.source_digest, row.command_id
    return stored
