"""The redelivery lookup's index (migration 0011) against the real PostgreSQL: not
unique, yet two writers of one record still store it once, because the record's
event is on a stream whose primary key (stream_id, seq) refuses the second."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from alembic import command

from audit.support import scratch_database
from runstate.client import state
from runstate.database_urls import libpq_dsn
from runstate.domain import OrchestrationSettings
from runstate.messages import CreateTaskRunCommand, SetStateCommand, stream_id_of
from runstate.pipeline.batch import decide_batch
from runstate.pipeline.ports import BatchOutcome, SnapshotRequest, StoreConflict
from runstate.pipeline.records import IncomingRecord, ParsedCommand, parse_record
from runstate.pipeline.service import read_snapshot
from runstate.store.migrate import alembic_config
from runstate.store.postgres import PostgresEventStore, run_sql, source_lookup

TOPIC = "source-index.commands"
RULES = OrchestrationSettings()


@pytest.fixture
async def store(base_settings) -> AsyncIterator[PostgresEventStore]:
    adapter = PostgresEventStore(base_settings.database_url, size=3)
    await adapter.open()
    yield adapter
    await adapter.close()


def parsed(partition: int, offset: int, command: Any) -> ParsedCommand:
    record = IncomingRecord(TOPIC, partition, offset, str(stream_id_of(command)).encode(),
                            command.model_dump_json().encode())
    item = parse_record(record, 1 << 20)
    assert isinstance(item, ParsedCommand)
    return item


async def decide(store: PostgresEventStore, *items: ParsedCommand) -> BatchOutcome:
    async with store.session() as session:
        snap = await read_snapshot(session, items, TOPIC, datetime.now(UTC))
        outcome = decide_batch(list(items), snap, RULES)
        await session.append(outcome)
    return outcome


def source_indexes(admin_url: str) -> list[tuple[str, bool]]:
    with psycopg.connect(libpq_dsn(admin_url)) as conn:
        return conn.execute(
            "SELECT c.relname, i.indisunique FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " WHERE i.indrelid = 'events'::regclass AND pg_get_indexdef(i.indexrelid) LIKE '%source_%'").fetchall()


def stored_rows(admin_url: str, partition: int, run_id: uuid.UUID) -> tuple[list[int], list[tuple[int, int]]]:
    with psycopg.connect(libpq_dsn(admin_url)) as conn:
        seqs = [r[0] for r in conn.execute("SELECT seq FROM events WHERE stream_id = %s ORDER BY seq", (run_id,))]
        sources = conn.execute(
            "SELECT source_offset, count(*) FROM events WHERE source_topic = %s AND source_partition = %s"
            " GROUP BY source_offset ORDER BY source_offset", (TOPIC, partition)).fetchall()
    return seqs, sources


@pytest.mark.parametrize("events_only", [False, True], ids=["batch", "events-only"])
@pytest.mark.parametrize("owner_went_on", [False, True], ids=["same-batch", "owner-went-on"])
async def test_two_writers_of_one_record_at_once_store_it_once(store, admin_database_url, owner_went_on, events_only):
    """Both read the log before either wrote; the owner writes and holds its transaction
    open, the zombie's INSERT waits on the owner's (stream_id, seq) row and fails once the
    owner commits; retried, the zombie finds the stored event and decides nothing.
    `events-only`: the zombie writes no projection row (whose update under REPEATABLE READ
    would refuse it too), so the events' own keys must."""
    partition = uuid.uuid4().int % 1_000_000
    run_id = uuid.uuid4()
    await decide(store, parsed(partition, 0, CreateTaskRunCommand(id=run_id)))
    running = parsed(partition, 1, SetStateCommand(task_run_id=run_id, state=state("RUNNING")))
    completed = parsed(partition, 2, SetStateCommand(task_run_id=run_id, state=state("COMPLETED")))
    owner_items = [running, completed] if owner_went_on else [running]
    read = {"owner": asyncio.Event(), "zombie": asyncio.Event()}
    go = {"owner": asyncio.Event(), "zombie": asyncio.Event()}
    owner_appended, owner_commit = asyncio.Event(), asyncio.Event()
    zombie_pid: list[int] = []

    async def owner() -> None:
        async with store.session() as session:
            snap = await read_snapshot(session, owner_items, TOPIC, datetime.now(UTC))
            read["owner"].set()
            await go["owner"].wait()
            await session.append(decide_batch(owner_items, snap, RULES))
            owner_appended.set()
            await owner_commit.wait()

    async def zombie() -> None:
        async with store.session() as session:
            zombie_pid.append(session.conn.info.backend_pid)
            snap = await read_snapshot(session, [running], TOPIC, datetime.now(UTC))
            assert (partition, 1) not in snap.by_source
            read["zombie"].set()
            await go["zombie"].wait()
            outcome = decide_batch([running], snap, RULES)
            if events_only:
                outcome.task_run_heads, outcome.flow_run_heads = {}, {}
            await session.append(outcome)

    owner_task, zombie_task = asyncio.create_task(owner()), asyncio.create_task(zombie())
    await read["owner"].wait()
    await read["zombie"].wait()
    go["owner"].set()
    await owner_appended.wait()
    go["zombie"].set()
    # The zombie's INSERT waits for the owner's transaction (a lock not granted), unless
    # nothing refused it: then it is done, and the assertion below fails.
    with psycopg.connect(libpq_dsn(admin_database_url), autocommit=True) as conn:
        while not zombie_task.done() and not conn.execute(
                "SELECT 1 FROM pg_locks WHERE pid = %s AND NOT granted", zombie_pid).fetchone():
            await asyncio.sleep(0.01)
    owner_commit.set()
    await owner_task
    with pytest.raises(StoreConflict):
        await zombie_task

    again = await decide(store, running)
    assert again.events == [] and again.duplicates == 1
    seqs, sources = stored_rows(admin_database_url, partition, run_id)
    assert seqs == ([1, 2, 3] if owner_went_on else [1, 2])
    assert sources == ([(0, 1), (1, 1), (2, 1)] if owner_went_on else [(0, 1), (1, 1)])


async def test_the_same_bytes_at_one_position_of_two_topics_are_decided_in_each(store, admin_database_url):
    """A unique key without the topic would refuse the second for good (its lookup asks its own
    topic, so no retry finds a stored event) and stall the partition; the position index refuses nothing."""
    partition = uuid.uuid4().int % 1_000_000
    run_id = uuid.uuid4()
    await decide(store, parsed(partition, 0, CreateTaskRunCommand(id=run_id)))
    command = SetStateCommand(task_run_id=run_id, state=state("RUNNING"))
    first = await decide(store, parsed(partition, 1, command))
    key, value = str(run_id).encode(), command.model_dump_json().encode()
    other = parse_record(IncomingRecord("source-index.mirror", partition, 1, key, value), 1 << 20)
    assert isinstance(other, ParsedCommand) and other.record.digest == first.events[0].source_digest
    async with store.session() as session:
        snap = await read_snapshot(session, [other], "source-index.mirror", datetime.now(UTC))
        assert snap.by_source == {}
        second = decide_batch([other], snap, RULES)
        await session.append(second)
    assert len(second.events) == 1
    seqs, _ = stored_rows(admin_database_url, partition, run_id)
    assert seqs == [1, 2, 3]


async def test_the_lookup_is_served_by_the_position_index(store):
    """The plan of the consumer's own lookup names the index (sequential scans off: on the
    test database's few rows the planner would rather read the table)."""
    request = SnapshotRequest(now=datetime.now(UTC), source_topic=TOPIC, sources=[(1, 10), (1, 11), (2, 5)])
    query, params = source_lookup(request)
    async with store.session() as session, session.conn.transaction():
        await session.conn.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(row[0] for row in await run_sql(session.conn, "EXPLAIN " + query, params))
    assert "events_source_position" in plan


async def test_the_position_index_is_the_only_source_index_and_not_unique(store, admin_database_url):
    with psycopg.connect(libpq_dsn(admin_database_url)) as conn:
        rows = conn.execute(
            "SELECT c.relname, i.indisunique, pg_get_indexdef(i.indexrelid) FROM pg_index i"
            " JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = 'events'::regclass"
            " AND pg_get_indexdef(i.indexrelid) LIKE '%source_%' ORDER BY c.relname").fetchall()
    assert [(name, unique) for name, unique, _ in rows] == [("events_source_position", False)]
    assert rows[0][2].endswith("(source_partition, source_offset) WHERE (source_topic IS NOT NULL)")


async def test_the_migration_and_its_downgrade_keep_a_log_with_rows_answering_redeliveries(
        admin_database_url, database_url):
    position, unique = [("events_source_position", False)], [("events_source", True)]
    with scratch_database(admin_database_url, database_url, "source_index") as (app_url, admin_url):
        config = alembic_config(admin_url, app_url)
        command.downgrade(config, "0010")
        assert source_indexes(admin_url) == unique
        run_id = uuid.uuid4()
        items = [parsed(3, 0, CreateTaskRunCommand(id=run_id)),
                 parsed(3, 1, SetStateCommand(task_run_id=run_id, state=state("RUNNING")))]
        store = PostgresEventStore(app_url)
        await store.open()
        try:
            await decide(store, *items)  # written under 0010's unique index
        finally:
            await store.close()
        for step, revision, indexes in ((command.upgrade, "0011", position), (command.downgrade, "0010", unique),
                                        (command.upgrade, "head", position)):
            step(config, revision)
            assert source_indexes(admin_url) == indexes
            store = PostgresEventStore(app_url)
            await store.open()
            try:
                again = await decide(store, *items)
            finally:
                await store.close()
            assert again.events == [] and again.duplicates == 2
