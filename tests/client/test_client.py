"""RunstateClient, SyncRunstateClient and state_changes() against the real broker
and the real pipeline: the result reader survives any record, a pending request's
waiter is forgotten on every path, only the needed result partitions are read,
and state-change offsets are committed in batches (at-least-once)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import murmur2

from pipeline.harness import InProcessService, isolated_settings
from runstate.client import (
    CommandTooLarge,
    RunstateClient,
    RunstateTimeout,
    RunstateUnavailable,
    SyncRunstateClient,
    state,
    state_changes,
    sync_state_changes,
)
from runstate.domain import SetStateStatus
from runstate.kafka_security import kafka_options
from runstate.messages import OrchestrationResultEvent
from runstate.pipeline.kafka import ensure_topics

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

PARTITIONS = 6


def partition_of(run_id: uuid.UUID, partitions: int = PARTITIONS) -> int:
    return (murmur2(str(run_id).encode()) & 0x7FFFFFFF) % partitions


def run_on(partition: int) -> uuid.UUID:
    while True:
        run_id = uuid.uuid4()
        if partition_of(run_id) == partition:
            return run_id


async def produce_to(settings, topic: str, records: list[tuple[bytes | None, bytes | None, int]]) -> None:
    producer = AIOKafkaProducer(**kafka_options(settings), max_request_size=2_000_000)
    await producer.start()
    try:
        sent = [await producer.send(topic, value, key=key, partition=p) for key, value, p in records]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


def hostile_values(run_id: uuid.UUID) -> list[bytes | None]:
    """Records no result reader may stop on."""
    return [
        None,  # tombstone
        b"",
        b"\xff\xfe\xfd not utf-8",
        b"not json",
        b"[" * 100_000,
        json.dumps({"a": "b"}).encode(),
        b'{"command_id": "' + str(uuid.uuid4()).encode() + b'", "command_kind": 7}',
        b'{"command_id": "' + str(uuid.uuid4()).encode() + b'", "command_kind": "x", "seq": 1e400}',
        b'"\\ud800"',
        b'{"command_id": "\\ud800"}',
        ("[" * 5_000 + "]" * 5_000).encode(),
        b"x" * 900_000,
    ]


def unrelated_result(run_id: uuid.UUID) -> bytes:
    """A well-formed result for a command nobody waits for (another client's)."""
    return json.dumps({"command_id": str(uuid.uuid4()), "command_kind": "set_task_run_state",
                       "stream_id": str(run_id), "status": "ACCEPT", "newer_field": {"d": [[[[]]]]}}).encode()


def assert_no_waiters(client: RunstateClient) -> None:
    assert client.pending == 0
    assert client._by_command == {} and client._by_transition == {}  # noqa: SLF001
    assert not client._waiting  # noqa: SLF001


# -- the reader survives any record --------------------------------------------------------
async def test_bad_records_on_the_result_partition_do_not_stop_the_reader(base_settings):
    settings = isolated_settings(base_settings, partitions=PARTITIONS)
    run_id = run_on(2)
    async with InProcessService(settings), RunstateClient(settings) as client:
        await client.create_task_run(run_id)  # partition 2 is read from here on
        bad = hostile_values(run_id)
        await produce_to(settings, settings.result_topic, [(str(run_id).encode(), v, 2) for v in bad]
                         + [(b"not-a-run", v, 2) for v in bad[:4]]
                         + [(str(run_id).encode(), unrelated_result(run_id), 2)])
        answer = await client.propose(run_id, state("RUNNING"), timeout=60)
        assert answer.status == SetStateStatus.ACCEPT
        assert client.reader_alive
        assert client.skipped_records == len(bad) + 4  # the unrelated result is no one's: not skipped
        again = await client.propose(run_id, state("COMPLETED"), timeout=60)
        assert again.status == SetStateStatus.ACCEPT
    assert_no_waiters(client)


async def test_a_forged_result_keyed_by_another_run_does_not_answer_a_request(base_settings):
    """A valid-looking result for a pending command, keyed differently from the
    command's run, is skipped; the real decision answers the request."""
    settings = isolated_settings(base_settings, partitions=PARTITIONS)
    run_id = run_on(3)
    await ensure_topics(settings)
    async with RunstateClient(settings) as client:
        _, future = await client.submit(run_id, state("RUNNING"))
        pending_id = next(iter(client._by_command))  # noqa: SLF001
        forged = OrchestrationResultEvent(command_id=pending_id, command_kind="set_task_run_state",
                                          stream_id=run_id, status=SetStateStatus.ACCEPT, seq=999)
        await produce_to(settings, settings.result_topic,
                         [(b"forged", forged.model_dump_json().encode(), 3),
                          (str(uuid.uuid4()).encode(), forged.model_dump_json().encode(), 3)])
        async with InProcessService(settings):
            await client.create_task_run(run_id, timeout=60)
            answer = await asyncio.wait_for(future, 60)
        assert answer.seq != 999
        assert answer.error is not None and answer.error.code == "unknown_run"  # decided before the create
        assert client.skipped_records == 2
    assert_no_waiters(client)


# -- waiters are forgotten on every path ------------------------------------------------------
async def test_waiters_are_forgotten_after_timeout_cancellation_and_error_answers(base_settings):
    settings = isolated_settings(base_settings, partitions=PARTITIONS)
    await ensure_topics(settings)
    async with RunstateClient(settings) as client:
        # Nothing decides yet: a timeout, then a cancellation.
        with pytest.raises(RunstateTimeout):
            await client.propose(uuid.uuid4(), state("RUNNING"), timeout=0.5)
        assert_no_waiters(client)
        waiting = asyncio.create_task(client.propose(uuid.uuid4(), state("RUNNING"), timeout=60))
        while client.pending == 0:
            await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert_no_waiters(client)
        _, submitted = await client.submit(uuid.uuid4(), state("RUNNING"))
        submitted.cancel()
        await asyncio.sleep(0)
        assert_no_waiters(client)

        async with InProcessService(settings):
            # An error answer carries no transition id: the waiter under the
            # transition must go too.
            unknown = await client.propose(uuid.uuid4(), state("RUNNING"), transition_id=uuid.uuid4(), timeout=60)
            assert unknown.error is not None and unknown.error.code == "unknown_run"
            assert_no_waiters(client)

        with pytest.raises(CommandTooLarge):
            await client.propose(uuid.uuid4(), {"type": "COMPLETED", "data": "x" * settings.max_command_bytes})
        assert_no_waiters(client)


async def test_a_dead_reader_fails_pending_requests_at_once_and_refuses_new_ones(base_settings):
    settings = isolated_settings(base_settings, partitions=PARTITIONS)
    await ensure_topics(settings)
    client = RunstateClient(settings)
    await client.start()
    try:
        waiting = asyncio.create_task(client.propose(uuid.uuid4(), state("RUNNING"), timeout=600))
        while client.pending == 0:
            await asyncio.sleep(0.01)
        await client._consumer.stop()  # noqa: SLF001 - the reader's fetch now fails for good
        with pytest.raises(RunstateUnavailable, match="result reader stopped"):
            await asyncio.wait_for(waiting, 30)
        assert not client.reader_alive
        assert_no_waiters(client)
        with pytest.raises(RunstateUnavailable, match="not running"):
            await client.propose(uuid.uuid4(), state("RUNNING"))
    finally:
        await client.stop()


# -- reading only what is needed -----------------------------------------------------------
async def test_the_client_reads_only_the_partitions_its_requests_map_to(base_settings):
    settings = isolated_settings(base_settings, partitions=PARTITIONS)
    mine = run_on(1)
    async with InProcessService(settings), RunstateClient(settings) as client:
        assert client.reading_partitions == frozenset()
        await client.create_task_run(mine)
        assert client.reading_partitions == {1}
        # Garbage on every other partition is never fetched, so never skipped.
        await produce_to(settings, settings.result_topic,
                         [(b"k", b"garbage", p) for p in range(PARTITIONS) if p != 1])
        assert (await client.propose(mine, state("RUNNING"))).status == SetStateStatus.ACCEPT
        other = run_on(4)
        await client.create_task_run(other)
        assert client.reading_partitions == {1, 4}
        assert client.skipped_records == 0
        # Many requests over all partitions at once are all answered.
        runs = [uuid.uuid4() for _ in range(40)]
        answers = await asyncio.gather(*(client.create_task_run(r, timeout=60) for r in runs))
        assert all(a.error is None for a in answers)
        assert client.reading_partitions == {partition_of(r) for r in runs} | {1, 4}
    assert_no_waiters(client)


# -- the sync client ---------------------------------------------------------------------------
async def test_sync_client_drives_a_run_from_plain_threads(base_settings):
    settings = isolated_settings(base_settings, partitions=PARTITIONS)
    run_id = uuid.uuid4()

    def worker() -> list[str]:
        with SyncRunstateClient(settings) as client:
            created = client.create_task_run(run_id, empirical_policy={"retries": 1})
            statuses = [created.status.value]
            for type_ in ("RUNNING", "FAILED", "RUNNING"):
                statuses.append(client.propose(run_id, state(type_)).status.value)
            _, future = client.submit(run_id, state("COMPLETED"))
            statuses.append(future.result(60).status.value)
            unknown = client.propose(uuid.uuid4(), state("RUNNING"))
            statuses.append(unknown.error.code)
            return statuses

    async with InProcessService(settings):
        statuses = await asyncio.to_thread(worker)
    # FAILED with a retry left is answered with AwaitingRetry (REJECT).
    assert statuses == ["ACCEPT", "ACCEPT", "REJECT", "ACCEPT", "ACCEPT", "unknown_run"]


# -- state_changes(): batched commits, at-least-once --------------------------------------------
async def committed(settings, group: str, run_id: uuid.UUID) -> int | None:
    consumer = AIOKafkaConsumer(**kafka_options(settings), group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        return await consumer.committed(TopicPartition(settings.state_change_topic, partition_of(run_id)))
    finally:
        await consumer.stop()


async def drive(settings, run_id: uuid.UUID, types: list[str]) -> None:
    async with RunstateClient(settings) as client:
        await client.create_task_run(run_id)
        for type_ in types:
            await client.propose(run_id, state(type_))


async def test_state_changes_commits_in_batches_and_redelivers_what_was_not_processed(base_settings):
    settings = isolated_settings(base_settings, partitions=PARTITIONS)
    run_id = uuid.uuid4()
    group = f"sub-{uuid.uuid4().hex[:8]}"
    async with InProcessService(settings):
        await drive(settings, run_id, ["RUNNING"])
        # Records that are not state changes, between two that are.
        await produce_to(settings, settings.state_change_topic,
                         [(str(run_id).encode(), v, partition_of(run_id)) for v in hostile_values(run_id)])
        async with RunstateClient(settings) as client:
            await client.propose(run_id, state("COMPLETED"))

    seen = []
    changes = state_changes(settings, group_id=group, from_beginning=True, commit_every=1000, commit_interval=600)
    async for change in changes:
        if change.task_run_id != run_id:
            continue
        seen.append(change.seq)
        if len(seen) == 2:
            # Two events handed out, none committed yet: commits are batched.
            assert await committed(settings, group, run_id) is None
        if len(seen) == 3:
            break  # the third is "being processed" when the loop stops
    await changes.aclose()
    assert seen == [1, 2, 3]
    # Everything before the third is committed; the third is delivered again.
    again = state_changes(settings, group_id=group, commit_every=1000, commit_interval=600)
    first = await anext(again)
    await again.aclose()
    assert (first.task_run_id, first.seq) == (run_id, 3)


async def test_state_changes_commits_every_n_events(base_settings):
    settings = isolated_settings(base_settings, partitions=PARTITIONS)
    run_id = uuid.uuid4()
    group = f"sub-{uuid.uuid4().hex[:8]}"
    async with InProcessService(settings):
        await drive(settings, run_id, ["RUNNING", "FAILED"])
    marks = []
    changes = state_changes(settings, group_id=group, from_beginning=True, commit_every=2, commit_interval=600)
    async for change in changes:
        marks.append((change.seq, await committed(settings, group, run_id)))
        if change.seq == 3:
            break
    await changes.aclose()
    first_offset = marks[0][1]
    assert first_offset is None
    # After two processed events the batch is committed, before the third is handed out.
    assert marks[2][1] is not None and marks[1][1] is None


def test_sync_state_changes_skips_bad_records_and_commits_on_close(base_settings):
    settings = isolated_settings(base_settings, partitions=PARTITIONS)
    run_id = uuid.uuid4()
    group = f"sub-{uuid.uuid4().hex[:8]}"

    async def prepare() -> None:
        async with InProcessService(settings):
            await drive(settings, run_id, ["RUNNING"])
        await produce_to(settings, settings.state_change_topic,
                         [(str(run_id).encode(), v, partition_of(run_id)) for v in (None, b"[" * 10_000, b"{}")])
        async with InProcessService(settings), RunstateClient(settings) as client:
            await client.propose(run_id, state("COMPLETED"))

    asyncio.run(prepare())
    seqs = []
    for change in sync_state_changes(settings, group_id=group, from_beginning=True, commit_interval=600):
        seqs.append(change.seq)
        if change.seq == 3:
            break
    assert seqs == [1, 2, 3]
    assert asyncio.run(committed(settings, group, run_id)) is not None


# -- what the client module pulls in -----------------------------------------------------------
def test_the_client_imports_no_server_dependencies():
    probe = (
        "import sys, runstate.client; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'faststream', 'sqlalchemy', 'psycopg', 'psycopg_pool', 'fastapi', 'starlette', 'uvicorn', "
        "'typer', 'rich', 'alembic', 'uvloop'}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
