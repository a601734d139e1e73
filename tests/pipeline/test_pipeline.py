"""The pipeline against the real Kafka broker and PostgreSQL server."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import random
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from runstate.client import RunstateClient, state
from runstate.database_urls import libpq_dsn as pg_dsn
from runstate.domain import SetStateStatus
from runstate.messages import CreateTaskRunCommand, OrchestrationResultEvent, SetStateCommand, StateChangeEvent
from runstate.store.queries import LogReader, make_engine

from .harness import InProcessService, isolated_settings, produce, read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


async def history(settings, run_id):
    store = LogReader(make_engine(settings.database_url))
    try:
        return await store.history(run_id)
    finally:
        await store.engine.dispose()


async def test_full_lifecycle_and_retries_end_to_end(base_settings):
    settings = isolated_settings(base_settings)
    async with InProcessService(settings), RunstateClient(settings) as client:
        flow_id = uuid.uuid4()
        assert (await client.create_flow_run(flow_id, state=state("RUNNING"))).status == SetStateStatus.ACCEPT

        ok = uuid.uuid4()
        created = await client.create_task_run(ok, flow_run_id=flow_id, state=state("SCHEDULED"))
        assert created.status == SetStateStatus.ACCEPT
        assert created.result.state.type == "SCHEDULED"
        answers = [await client.propose(ok, state(t)) for t in ("PENDING", "RUNNING", "COMPLETED")]
        assert [a.status for a in answers] == [SetStateStatus.ACCEPT] * 3
        assert [a.result.state.type for a in answers] == ["PENDING", "RUNNING", "COMPLETED"]
        assert [a.seq for a in answers] == [2, 3, 4]

        flaky = uuid.uuid4()
        await client.create_task_run(flaky, flow_run_id=flow_id, empirical_policy={"retries": 1})
        await client.propose(flaky, state("RUNNING"))
        first_failure = await client.propose(flaky, state("FAILED"))
        assert first_failure.status == SetStateStatus.REJECT
        assert (first_failure.result.state.type, first_failure.result.state.name) == ("SCHEDULED", "AwaitingRetry")
        retry = await client.propose(flaky, state("RUNNING"))
        assert (retry.status, retry.result.state.name) == (SetStateStatus.ACCEPT, "Retrying")
        final = await client.propose(flaky, state("FAILED"))
        assert (final.status, final.result.state.type) == (SetStateStatus.ACCEPT, "FAILED")

    results = [OrchestrationResultEvent.model_validate_json(r.value) for r in await read_topic(settings, settings.result_topic, 11)]
    by_run = {}
    for event in results:
        by_run.setdefault(event.stream_id, []).append(event)
    assert [e.result.state.type for e in by_run[ok]] == ["SCHEDULED", "PENDING", "RUNNING", "COMPLETED"]
    assert [e.status for e in by_run[flaky]] == ["ACCEPT", "ACCEPT", "REJECT", "ACCEPT", "ACCEPT"]

    changes = [StateChangeEvent.model_validate_json(r.value) for r in await read_topic(settings, settings.state_change_topic, 9)]
    flaky_changes = [c for c in changes if c.task_run_id == flaky]
    assert [(c.seq, c.to_state.type.value, c.to_state.name) for c in flaky_changes] == [
        (1, "PENDING", "Pending"),
        (2, "RUNNING", "Running"),
        (3, "SCHEDULED", "AwaitingRetry"),
        (4, "RUNNING", "Retrying"),
        (5, "FAILED", "Failed"),
    ]
    assert flaky_changes[1].from_state.type == "PENDING"
    logged = await history(settings, flaky)
    assert [row["seq"] for row in logged] == [1, 2, 3, 4, 5]
    assert [row["state_name"] for row in logged] == ["Pending", "Running", "AwaitingRetry", "Retrying", "Failed"]


async def test_same_command_twice_gives_one_event_and_two_identical_results(base_settings):
    settings = isolated_settings(base_settings)
    run_id = uuid.uuid4()
    async with InProcessService(settings) as service, RunstateClient(settings) as client:
        await client.create_task_run(run_id)
        command = SetStateCommand(command_id=uuid.uuid4(), task_run_id=run_id, state=state("RUNNING",
                                  transition_id=uuid.uuid4()))
        raw = command.model_dump_json().encode()
        await produce(settings, [(str(run_id).encode(), raw), (str(run_id).encode(), raw)])
        records = await read_topic(settings, settings.result_topic, 3)
    answers = [json.loads(r.value) for r in records if json.loads(r.value)["command_id"] == str(command.command_id)]
    assert len(answers) == 2
    assert answers[0] == answers[1]
    assert answers[0]["status"] == "ACCEPT"
    assert service.stats.duplicates == 1
    logged = await history(settings, run_id)
    assert [row["event_type"] for row in logged] == ["task_run_created", "transition_decided"]


async def test_wait_is_decided_afresh_when_the_same_transition_is_sent_again(base_settings):
    settings = isolated_settings(base_settings)
    run_id = uuid.uuid4()
    async with InProcessService(settings), RunstateClient(settings) as client:
        await client.create_task_run(run_id)  # answered: the service is up and assigned
        # Far enough ahead that a slow machine still decides the RUNNING before it.
        soon = datetime.now(UTC) + timedelta(seconds=10)
        scheduled = await client.propose(run_id, state("SCHEDULED", scheduled_time=soon))
        assert scheduled.status == SetStateStatus.ACCEPT
        tid = uuid.uuid4()
        sent = datetime.now(UTC)
        waited = await client.propose(run_id, state("RUNNING"), transition_id=tid)
        answered = datetime.now(UTC)
        assert waited.status == SetStateStatus.WAIT
        # The seconds left when the consumer decided, which it did between the send and the answer.
        delay = waited.result.details.delay_seconds
        assert math.floor((soon - answered).total_seconds()) <= delay <= math.ceil((soon - sent).total_seconds())
        # Past the scheduled time (the consumer reads this machine's clock): the WAIT is over.
        await asyncio.sleep((soon - datetime.now(UTC)).total_seconds() + 1)
        accepted = await client.propose(run_id, state("RUNNING"), transition_id=tid)
        assert accepted.status == SetStateStatus.ACCEPT
        again = await client.propose(run_id, state("RUNNING"), transition_id=tid)
        assert again.seq == accepted.seq and again.result == accepted.result
    logged = await history(settings, run_id)
    assert [row["status"] for row in logged] == ["ACCEPT", "ACCEPT", "WAIT", "ACCEPT"]


async def test_malformed_records_are_dead_lettered_and_the_next_command_is_decided(base_settings):
    settings = isolated_settings(base_settings, partitions=1, max_command_bytes=64_000)
    run_id, other = uuid.uuid4(), uuid.uuid4()
    key = str(run_id).encode()
    async with InProcessService(settings) as service, RunstateClient(settings) as client:
        await client.create_task_run(run_id)
        bad = [
            (key, b"\xff\xfe not json"),
            (key, b'{"kind": "set_task_run_state", "task_run_id": "not-a-uuid", "state": {"type": "RUNNING"}}'),
            (key, json.dumps({"kind": "set_task_run_state", "task_run_id": str(run_id), "state": {"type": "BOGUS"}}).encode()),
            (str(other).encode(), json.dumps({"kind": "set_task_run_state", "task_run_id": str(other), "state": {"type": "RUNNING"}}).encode()),
            (key, b"x" * (settings.max_command_bytes + 1)),
            # Keyed by this run but naming another: it sits in the wrong partition.
            (key, json.dumps({"kind": "set_task_run_state", "task_run_id": str(other), "state": {"type": "RUNNING"}}).encode()),
        ]
        await produce(settings, bad)
        answer = await client.propose(run_id, state("RUNNING"))
        assert answer.status == SetStateStatus.ACCEPT
        dead = await read_topic(settings, settings.dead_letter_topic, len(bad))
    assert [d.value for d in dead] == [value for _, value in bad]
    codes = [dict(d.headers)["x-error-code"].decode() for d in dead]
    assert codes == ["invalid_command", "invalid_command", "invalid_command", "unknown_run", "too_large", "key_mismatch"]
    assert "state.type" in dict(dead[2].headers)["x-error"].decode()
    assert service.stats.dead_lettered == len(bad)
    logged = await history(settings, run_id)
    assert [row["state_type"] for row in logged] == ["PENDING", "RUNNING"]


def test_service_role_cannot_rewrite_the_log(base_settings):
    with psycopg.connect(pg_dsn(base_settings.database_url), autocommit=True) as conn:
        for statement in ("UPDATE events SET status = 'ACCEPT'", "DELETE FROM events", "TRUNCATE events"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
    # Even the owner, who holds every grant, is stopped by the triggers.
    with psycopg.connect(pg_dsn(base_settings.admin_database_url)) as conn:
        for statement in ("UPDATE events SET status = 'ACCEPT'", "DELETE FROM events", "TRUNCATE events"):
            with conn.transaction(force_rollback=True):
                conn.execute(
                    "INSERT INTO events (stream_id, seq, stream_type, event_type, command_id, payload)"
                    " VALUES (gen_random_uuid(), 1, 'task_run', 'probe', gen_random_uuid(), '{}')"
                )
                with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"), conn.transaction():
                    conn.execute(statement)


async def test_tag_slots_and_the_cache_are_shared_across_partitions(base_settings):
    settings = isolated_settings(base_settings, partitions=4)
    tag = f"db-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_dsn(base_settings.database_url), autocommit=True) as conn:
        conn.execute('INSERT INTO tag_concurrency_limits (tag, "limit") VALUES (%s, 1)', (tag,))
    first, second = uuid.uuid4(), uuid.uuid4()
    key = f"cache-{uuid.uuid4().hex}"
    async with InProcessService(settings), RunstateClient(settings) as client:
        await client.create_task_run(first, tags=[tag])
        await client.create_task_run(second, tags=[tag])
        assert (await client.propose(first, state("RUNNING"))).status == SetStateStatus.ACCEPT
        blocked = await client.propose(second, state("RUNNING"))
        assert blocked.status == SetStateStatus.WAIT
        assert blocked.result.details.delay_seconds in (2, 3)
        assert tag in blocked.result.details.reason
        done = await client.propose(first, {"type": "COMPLETED", "data": {"rows": 3},
                                            "state_details": {"cache_key": key}})
        assert done.status == SetStateStatus.ACCEPT
        # The slot the first run released is free again, and its cached result
        # serves the second run, wherever their partitions are.
        hit = await client.propose(second, {"type": "RUNNING", "state_details": {"cache_key": key}})
        assert (hit.status, hit.result.state.type, hit.result.state.name) == (SetStateStatus.REJECT, "COMPLETED", "Cached")
        assert hit.result.state.data == {"rows": 3}
    with psycopg.connect(pg_dsn(base_settings.database_url)) as conn:
        slots = conn.execute('SELECT active_slots FROM tag_concurrency_limits WHERE tag = %s', (tag,)).fetchone()[0]
        leases = conn.execute("SELECT count(*) FROM tag_leases WHERE %s = ANY(tags)", (tag,)).fetchone()[0]
    assert (slots, leases) == (0, 0)


async def test_a_resent_command_without_transition_id_is_recognised_by_its_command_id(base_settings):
    settings = isolated_settings(base_settings, partitions=1)
    run_id = uuid.uuid4()
    async with InProcessService(settings) as service, RunstateClient(settings) as client:
        await client.create_task_run(run_id)
        # A raw producer re-sends the same command (same command_id, no
        # transition_id) as a new record, e.g. after a timeout.
        command = SetStateCommand(command_id=uuid.uuid4(), task_run_id=run_id, state=state("RUNNING"))
        raw = command.model_dump_json().encode()
        await produce(settings, [(str(run_id).encode(), raw)])
        await produce(settings, [(str(run_id).encode(), raw)])
        answer = await client.propose(run_id, state("COMPLETED"))
        assert answer.status == SetStateStatus.ACCEPT
        assert answer.seq == 3, "the resent RUNNING was not decided a second time"
    # Counted after the batch's acks, which the answer can beat: read once the service has stopped.
    assert service.stats.duplicates == 1


async def test_a_command_the_database_refuses_is_dead_lettered_and_its_batch_still_decided(base_settings):
    settings = isolated_settings(base_settings, partitions=1)
    run_id, other = uuid.uuid4(), uuid.uuid4()
    key, other_key = str(run_id).encode(), str(other).encode()
    # A task key too long for the (flow_run_id, task_key, dynamic_key) index: a valid command
    # (Prefect sets no limit) whose row PostgreSQL refuses to index.
    poisoned = uuid.uuid4()
    long_key = base64.b64encode(random.Random(5).randbytes(12_000)).decode()
    poison = CreateTaskRunCommand(command_id=uuid.uuid4(), id=poisoned, task_key=long_key)
    records = [
        (key, CreateTaskRunCommand(id=run_id).model_dump_json().encode()),
        (other_key, CreateTaskRunCommand(id=other).model_dump_json().encode()),
        (str(poisoned).encode(), poison.model_dump_json().encode()),
        (key, SetStateCommand(task_run_id=run_id, state=state("RUNNING")).model_dump_json().encode()),
        (other_key, SetStateCommand(task_run_id=other, state=state("RUNNING")).model_dump_json().encode()),
    ]
    await produce(settings, records)  # before the service starts: one batch
    async with InProcessService(settings) as service:
        results = await read_topic(settings, settings.result_topic, len(records))
        dead = await read_topic(settings, settings.dead_letter_topic, 1)
    assert len(results) == len(records)
    assert [d.value for d in dead] == [records[2][1]]
    assert dict(dead[0].headers)["x-error-code"] == b"unstorable"
    assert service.stats.dead_lettered == 1
    assert [r["state_type"] for r in await history(settings, run_id)] == ["PENDING", "RUNNING"]
    assert await history(settings, poisoned) == []
    assert [r["state_type"] for r in await history(settings, other)] == ["PENDING", "RUNNING"]
