"""One contract for every EventStore adapter (pipeline/ports.py): the in-memory
store and the PostgreSQL store must behave alike, so that tests of the pipeline's
logic on the fast one say something about the real one."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from runstate.client import state
from runstate.database_urls import libpq_dsn
from runstate.domain import OrchestrationSettings, TagLimit
from runstate.messages import (
    CreateTaskRunCommand,
    DeleteConcurrencyLimitCommand,
    SetConcurrencyLimitCommand,
    SetStateCommand,
    limit_id,
    stream_id_of,
)
from runstate.pipeline.batch import decide_batch
from runstate.pipeline.ports import BatchOutcome, EventStore, StoreConflict, StoreSnapshot
from runstate.pipeline.records import IncomingRecord, ParsedCommand, parse_record
from runstate.pipeline.service import read_snapshot
from runstate.store.memory import InMemoryEventStore
from runstate.store.postgres import PostgresEventStore

TOPIC = "contract.commands"
RULES = OrchestrationSettings()


@pytest.fixture(params=["memory", "postgres"])
async def store(request, base_settings) -> AsyncIterator[EventStore]:
    if request.param == "memory":
        adapter: EventStore = InMemoryEventStore()
    else:
        adapter = PostgresEventStore(base_settings.database_url, size=2)
    await adapter.open()
    yield adapter
    await adapter.close()


async def set_tag_limit(store: EventStore, base_settings, tag: str, limit: int) -> None:
    if isinstance(store, InMemoryEventStore):
        store.set_tag_limit(TagLimit(tag=tag, limit=limit, active=True, active_slots=0))
        return
    with psycopg.connect(libpq_dsn(base_settings.admin_database_url), autocommit=True) as conn:
        conn.execute('INSERT INTO tag_concurrency_limits (tag, "limit", active, active_slots) VALUES (%s, %s, true, 0)',
                     (tag, limit))


class Log:
    """Records at increasing offsets of one partition, decided and appended through a store."""

    def __init__(self, store: EventStore, partition: int | None = None) -> None:
        self.store = store
        self.partition = partition if partition is not None else uuid.uuid4().int % 1_000_000
        self.offset = 0

    def record(self, command, offset: int | None = None) -> IncomingRecord:
        if offset is None:
            offset, self.offset = self.offset, self.offset + 1
        key = str(stream_id_of(command)).encode()
        return IncomingRecord(TOPIC, self.partition, offset, key, command.model_dump_json().encode())

    async def decide(self, *records: IncomingRecord, now: datetime | None = None) -> BatchOutcome:
        items = [parse_record(r, 1 << 20) for r in records]
        parsed = [i for i in items if isinstance(i, ParsedCommand)]
        async with self.store.session() as session:
            snap = await read_snapshot(session, parsed, TOPIC, now or datetime.now(UTC))
            outcome = decide_batch(items, snap, RULES, clock=lambda: now or datetime.now(UTC))
            await session.append(outcome)
        return outcome

    async def snapshot(self, *records: IncomingRecord, now: datetime | None = None) -> StoreSnapshot:
        parsed = [p for p in (parse_record(r, 1 << 20) for r in records) if isinstance(p, ParsedCommand)]
        async with self.store.session() as session:
            return await read_snapshot(session, parsed, TOPIC, now or datetime.now(UTC))


async def test_an_appended_run_is_read_back_with_its_head(store):
    log = Log(store)
    run_id = uuid.uuid4()
    await log.decide(log.record(CreateTaskRunCommand(id=run_id, task_key="k")))
    snap = await log.snapshot(log.record(SetStateCommand(task_run_id=run_id, state=state("RUNNING"))))
    head = snap.task_runs[run_id]
    assert head.last_seq == 1 and head.view.task_key == "k" and head.view.state.type.value == "PENDING"


async def test_a_duplicate_stream_and_seq_is_a_conflict_and_nothing_of_the_session_is_kept(store):
    log = Log(store)
    run_id, other = uuid.uuid4(), uuid.uuid4()
    first = log.record(CreateTaskRunCommand(id=run_id))
    await log.decide(first)
    # A second writer that did not see the first: the same (stream_id, seq) again.
    items = [parse_record(r, 1 << 20) for r in (log.record(CreateTaskRunCommand(id=run_id)),
                                                log.record(CreateTaskRunCommand(id=other)))]
    outcome = decide_batch(items, StoreSnapshot(), RULES)
    with pytest.raises(StoreConflict):
        async with store.session() as session:
            await session.append(outcome)
    snap = await log.snapshot(log.record(SetStateCommand(task_run_id=other, state=state("RUNNING"))))
    assert other not in snap.task_runs


class AfterTheAppend(Exception):
    pass


async def test_a_session_that_read_nothing_keeps_its_append_and_one_that_read_does_not(store):
    """The port's commit rule: an append in a session that read nothing is durable as it
    returns (PostgreSQL writes it in autocommit, one round trip); a session that read is one
    transaction, rolled back whole by a failure after its append."""
    log = Log(store)
    kept, lost = uuid.uuid4(), uuid.uuid4()
    for run_id, read_first in ((kept, False), (lost, True)):
        items = [parse_record(log.record(CreateTaskRunCommand(id=run_id)), 1 << 20)]
        with pytest.raises(AfterTheAppend):
            async with store.session() as session:
                snap = StoreSnapshot()
                if read_first:
                    snap = await read_snapshot(session, items, TOPIC, datetime.now(UTC))  # type: ignore[arg-type]
                await session.append(decide_batch(items, snap, RULES))
                raise AfterTheAppend
    snap = await log.snapshot(log.record(SetStateCommand(task_run_id=kept, state=state("RUNNING"))),
                              log.record(SetStateCommand(task_run_id=lost, state=state("RUNNING"))))
    assert kept in snap.task_runs and snap.task_runs[kept].last_seq == 1
    assert lost not in snap.task_runs


async def test_lookup_by_source_returns_the_first_published_bytes(store):
    log = Log(store)
    run_id = uuid.uuid4()
    record = log.record(CreateTaskRunCommand(id=run_id))
    outcome = await log.decide(record)
    snap = await log.snapshot(record)
    stored = snap.by_source[(record.partition, record.offset)]
    assert stored.result_event == outcome.results[0].value
    assert stored.state_change == outcome.state_changes[0].value
    assert stored.decided(parse_record(record, 1 << 20))


async def test_a_new_record_at_a_reused_position_is_not_taken_for_the_old_one(store):
    log = Log(store)
    old = log.record(CreateTaskRunCommand(id=uuid.uuid4()), offset=0)
    await log.decide(old)
    new = log.record(CreateTaskRunCommand(id=uuid.uuid4()), offset=0)
    outcome = await log.decide(new)  # same position, other content: decided, stored beside it
    assert len(outcome.events) == 1 and outcome.duplicates == 0
    again = await log.decide(new)
    assert again.events == [] and again.duplicates == 1 and again.results[0].value == outcome.results[0].value


async def test_lookup_by_transition_returns_only_final_decisions(store):
    log = Log(store)
    run_id = uuid.uuid4()
    soon = datetime.now(UTC) + timedelta(hours=1)
    await log.decide(log.record(CreateTaskRunCommand(id=run_id, state=state("SCHEDULED", scheduled_time=soon))))
    waiting, final = uuid.uuid4(), uuid.uuid4()
    wait = await log.decide(log.record(SetStateCommand(task_run_id=run_id, state=state("RUNNING", transition_id=waiting))))
    assert '"WAIT"' in wait.results[0].value
    forced = SetStateCommand(task_run_id=run_id, state=state("RUNNING", transition_id=final), force=True)
    await log.decide(log.record(forced))
    snap = await log.snapshot(
        log.record(SetStateCommand(task_run_id=run_id, state=state("RUNNING", transition_id=waiting))),
        log.record(SetStateCommand(task_run_id=run_id, state=state("RUNNING", transition_id=final))),
    )
    assert (run_id, final) in snap.by_transition
    assert (run_id, waiting) not in snap.by_transition


async def test_expired_cache_rows_are_ignored(store):
    log = Log(store)
    key = f"cache-{uuid.uuid4()}"
    run_id = uuid.uuid4()
    expires = datetime.now(UTC) + timedelta(minutes=5)
    await log.decide(log.record(CreateTaskRunCommand(id=run_id, state=state("RUNNING"))))
    await log.decide(log.record(SetStateCommand(
        task_run_id=run_id, state=state("COMPLETED", cache_key=key, cache_expiration=expires))))
    probe = log.record(SetStateCommand(task_run_id=uuid.uuid4(), state=state("RUNNING", cache_key=key)))
    assert key in (await log.snapshot(probe)).cache
    assert key not in (await log.snapshot(probe, now=expires + timedelta(seconds=1))).cache


async def test_tag_rows_are_locked_until_the_session_ends(store, base_settings):
    """A second session reading a tag the first holds waits for the first to
    commit and then sees its slots."""
    tag = f"tag-{uuid.uuid4().hex[:8]}"
    await set_tag_limit(store, base_settings, tag, 5)
    log = Log(store)
    run_id = uuid.uuid4()
    await log.decide(log.record(CreateTaskRunCommand(id=run_id, tags=[tag])))
    running = log.record(SetStateCommand(task_run_id=run_id, state=state("RUNNING")))
    order: list[str] = []
    holding = asyncio.Event()

    async def first() -> None:
        parsed = [parse_record(running, 1 << 20)]
        async with store.session() as session:
            snap = await read_snapshot(session, parsed, TOPIC, datetime.now(UTC))  # type: ignore[arg-type]
            holding.set()
            await asyncio.sleep(0.5)
            await session.append(decide_batch(parsed, snap, RULES))
            order.append("first committed")

    async def second() -> int:
        await holding.wait()
        probe = parse_record(Log(store).record(CreateTaskRunCommand(id=uuid.uuid4(), tags=[tag])), 1 << 20)
        while True:
            try:
                async with store.session() as session:
                    snap = await read_snapshot(session, [probe], TOPIC, datetime.now(UTC))  # type: ignore[list-item]
                    order.append("second read")
                    return snap.tag_limits[tag].active_slots
            except StoreConflict:
                # PostgreSQL: the row changed after this session's snapshot; a retry sees it.
                order.append("conflict")

    _, slots = await asyncio.gather(first(), second())
    assert [step for step in order if step != "conflict"] == ["first committed", "second read"]
    assert slots == 1


async def test_limit_changes_are_read_back_with_their_stream_head_and_command(store):
    log = Log(store)
    tag = f"limit-{uuid.uuid4().hex[:8]}"
    first = SetConcurrencyLimitCommand(command_id=uuid.uuid4(), tag=tag, concurrency_limit=2, active=False)
    outcome = await log.decide(log.record(first))
    await log.decide(log.record(SetConcurrencyLimitCommand(tag=tag, concurrency_limit=3)))
    snap = await log.snapshot(log.record(first))
    head = snap.limit_streams[limit_id(tag)]
    assert head.last_seq == 2 and head.last_hash is not None
    # The limit row: the second value, `active` kept from the first.
    assert (snap.tag_limits[tag].limit, snap.tag_limits[tag].active, snap.tag_limits[tag].active_slots) == (3, False, 0)
    assert first.command_id is not None
    stored = snap.by_command[(limit_id(tag), first.command_id)]
    assert stored.result_event == outcome.results[0].value and stored.state_change is None


async def test_a_limit_set_with_slots_taken_in_its_batch_writes_one_row_and_a_delete_removes_it(store):
    log = Log(store)
    tag = f"limit-{uuid.uuid4().hex[:8]}"
    run_id = uuid.uuid4()
    await log.decide(log.record(SetConcurrencyLimitCommand(tag=tag, concurrency_limit=1)),
                     log.record(CreateTaskRunCommand(id=run_id, tags=[tag])),
                     log.record(SetStateCommand(task_run_id=run_id, state=state("RUNNING"))),
                     log.record(SetConcurrencyLimitCommand(tag=tag, concurrency_limit=4)))
    probe = log.record(CreateTaskRunCommand(id=uuid.uuid4(), tags=[tag]))
    limit = (await log.snapshot(probe)).tag_limits[tag]
    assert (limit.limit, limit.active_slots) == (4, 1)
    await log.decide(log.record(DeleteConcurrencyLimitCommand(tag=tag)))
    assert tag not in (await log.snapshot(probe)).tag_limits


@pytest.mark.parametrize("read_first", [True, False], ids=["commit", "autocommit-append"])
async def test_a_connection_lost_before_commit_is_an_outage_and_the_store_reconnects(base_settings, read_first):
    """A failover cuts the session's connection: the COMMIT (of a session that read), or the
    append that commits by itself (of one that read nothing), fails with its outcome unknown to
    the consumer, which must wait and retry (StoreUnavailable), not narrow the batch down to a
    record and dead-letter it; the pool then opens a new connection by itself."""
    from runstate.pipeline.ports import StoreUnavailable

    adapter = PostgresEventStore(base_settings.database_url, size=1)
    await adapter.open()
    try:
        log = Log(adapter)
        run_id = uuid.uuid4()
        items = [parse_record(log.record(CreateTaskRunCommand(id=run_id)), 1 << 20)]

        def terminate(pid: int) -> None:
            # The same role may end its own sessions: as a primary's death would.
            with psycopg.connect(libpq_dsn(base_settings.database_url), autocommit=True) as other:
                other.execute("SELECT pg_terminate_backend(%s)", (pid,))

        with pytest.raises(StoreUnavailable):
            async with adapter.session() as session:
                if read_first:
                    snap = await read_snapshot(session, items, TOPIC, datetime.now(UTC))  # type: ignore[arg-type]
                    await session.append(decide_batch(items, snap, RULES))
                    terminate(session.conn.info.backend_pid)
                else:
                    terminate(session.conn.info.backend_pid)
                    await session.append(decide_batch(items, StoreSnapshot(), RULES))
        # The retry, on a new connection, decides the run once.
        await log.decide(log.record(CreateTaskRunCommand(id=run_id)))
        snap = await log.snapshot(log.record(SetStateCommand(task_run_id=run_id, state=state("RUNNING"))))
        assert snap.task_runs[run_id].last_seq == 1
    finally:
        await adapter.close()


async def test_a_run_moved_by_another_writer_is_read_from_the_table_not_remembered(base_settings):
    """The PostgreSQL store remembers the heads it committed (CommittedRuns). A head still at
    its remembered seq is taken from memory; one another process moved on (a zombie's commit),
    and one of a batch that was rolled back, are read from the table."""
    mine = PostgresEventStore(base_settings.database_url, size=1)
    other = PostgresEventStore(base_settings.database_url, size=1)
    await mine.open()
    await other.open()
    try:
        log, theirs = Log(mine), Log(other)
        run_id = uuid.uuid4()
        created = await log.decide(log.record(CreateTaskRunCommand(id=run_id, task_key="k")))
        committed_view = created.task_run_heads[run_id].view
        probe = log.record(SetStateCommand(task_run_id=run_id, state=state("COMPLETED")))
        head = (await log.snapshot(probe)).task_runs[run_id]
        assert head.view is committed_view and head.last_seq == 1  # remembered, not read again
        assert head.last_hash == created.events[0].hash

        # A rolled-back batch: its head is not remembered.
        items = [parse_record(log.record(SetStateCommand(task_run_id=run_id, state=state("RUNNING"))), 1 << 20)]
        parsed = [i for i in items if isinstance(i, ParsedCommand)]
        with pytest.raises(RuntimeError):
            async with mine.session() as session:
                snap = await read_snapshot(session, parsed, TOPIC, datetime.now(UTC))
                await session.append(decide_batch(items, snap, RULES))
                raise RuntimeError("rolled back")
        head = (await log.snapshot(probe)).task_runs[run_id]
        assert head.last_seq == 1 and head.view.state.type.value == "PENDING"

        # Another writer moves the run on: its head is read from the table.
        await theirs.decide(theirs.record(SetStateCommand(task_run_id=run_id, state=state("RUNNING"))))
        head = (await log.snapshot(probe)).task_runs[run_id]
        assert head.last_seq == 2 and head.view.state.type.value == "RUNNING"
        assert head.view is not committed_view and head.last_hash is not None
    finally:
        await mine.close()
        await other.close()
