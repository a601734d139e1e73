"""Hostile input and refusals that are not the input's fault, through the real
pipeline: every record gets a decision or an error answer plus a dead letter,
no partition stalls, and an outage is waited out instead of dead-lettered."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from runstate.client import state
from runstate.database_urls import parse
from runstate.domain import SetStateStatus, StateCreate
from runstate.kafka_security import kafka_options
from runstate.messages import CreateTaskRunCommand, OrchestrationResultEvent, SetStateCommand
from runstate.pipeline.kafka import ensure_topics

from .harness import InProcessService, isolated_settings, produce, read_all, read_topic
from .test_pipeline import history, pg_dsn

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


def _set_state(run_id: uuid.UUID, body: str) -> bytes:
    return f'{{"kind":"set_task_run_state","task_run_id":"{run_id}","state":{body}}}'.encode()


def _create(run_id: uuid.UUID, extra: str) -> bytes:
    return f'{{"kind":"create_task_run","id":"{run_id}",{extra}}}'.encode()


def hostile_records(run_id: uuid.UUID) -> list[tuple[str, bytes | None, bytes | None, str]]:
    """(what, key, value, expected error code) for one shape of each class."""
    key = str(run_id).encode()
    new = uuid.uuid4()
    new_key = str(new).encode()
    deep = "[" * 3000 + "]" * 3000
    return [
        ("garbage brackets", key, b"[" * 5000, "invalid_command"),
        ("valid JSON, data 3000 deep", key, _set_state(run_id, f'{{"type":"RUNNING","data":{deep}}}'),
         "invalid_command"),
        ("data 65 deep", key, _set_state(run_id, f'{{"type":"RUNNING","data":{"[" * 65 + "]" * 65}}}'),
         "invalid_command"),
        ("year 9999 west of UTC", key, _set_state(
            run_id, '{"type":"SCHEDULED","state_details":{"scheduled_time":"9999-12-31T23:00:00-05:00"}}'),
         "invalid_command"),
        ("year 1 east of UTC", key, _set_state(
            run_id, '{"type":"SCHEDULED","state_details":{"scheduled_time":"0001-01-01T01:00:00+05:00"}}'),
         "invalid_command"),
        ("retry_delay 1e12", new_key, _create(new, '"empirical_policy":{"retries":3,"retry_delay":1e12}'),
         "invalid_command"),
        ("retry_delay list with 1e12", new_key,
         _create(new, '"empirical_policy":{"retries":3,"retry_delay":[1,1e12]}'), "invalid_command"),
        ("jitter 1e300", new_key,
         _create(new, '"empirical_policy":{"retries":3,"retry_delay":10,"retry_jitter_factor":1e300}'),
         "invalid_command"),
        ("retries beyond 64 bits", new_key, _create(new, '"empirical_policy":{"retries":%s}' % ("9" * 30)),
         "invalid_command"),
        ("NaN", key, _set_state(run_id, '{"type":"COMPLETED","data":NaN}'), "invalid_command"),
        ("Infinity", key, _set_state(run_id, '{"type":"COMPLETED","data":Infinity}'), "invalid_command"),
        ("-Infinity", key, _set_state(run_id, '{"type":"COMPLETED","data":[-Infinity]}'), "invalid_command"),
        ("1e400", key, _set_state(run_id, '{"type":"COMPLETED","data":1e400}'), "invalid_command"),
        ("5000-digit integer", key, _set_state(run_id, '{"type":"COMPLETED","data":%s}' % ("7" * 5000)),
         "invalid_command"),
        ("duplicate member names", key, _set_state(run_id, '{"type":"RUNNING","type":"COMPLETED"}'),
         "invalid_command"),
        ("duplicate run id", key, (f'{{"kind":"set_task_run_state","task_run_id":"{run_id}",'
                                   f'"task_run_id":"{new}","state":{{"type":"RUNNING"}}}}').encode(),
         "invalid_command"),
        ("lone surrogate", key, _set_state(run_id, '{"type":"RUNNING","message":"\\udc00x"}'), "invalid_command"),
        ("invalid UTF-8", key, _set_state(run_id, '{"type":"RUNNING","message":"') + b'\xc3\x28"}}',
         "invalid_command"),
        ("raw control character", key, _set_state(run_id, '{"type":"RUNNING","message":"a\x07b"}'),
         "invalid_command"),
        ("U+0000", key, _set_state(run_id, '{"type":"RUNNING","message":"a\\u0000b"}'), "invalid_command"),
        ("tag separator inside a tag", new_key, _create(new, '"tags":["a\\u001fb"]'), "invalid_command"),
        ("tombstone", key, None, "invalid_command"),
        ("empty value", key, b"", "invalid_command"),
        ("key of another run", str(uuid.uuid4()).encode(), _set_state(run_id, '{"type":"RUNNING"}'),
         "key_mismatch"),
        ("no key", None, _set_state(run_id, '{"type":"RUNNING"}'), "key_mismatch"),
        ("key is the id in upper case", key.upper(), _set_state(run_id, '{"type":"RUNNING"}'), "key_mismatch"),
        ("a huge garbage key", b"k" * 200_000, b"{}", "invalid_command"),
    ]


async def test_every_hostile_shape_is_answered_and_dead_lettered_and_the_partition_goes_on(base_settings):
    settings = isolated_settings(base_settings, partitions=1)
    run_id = uuid.uuid4()
    key = str(run_id).encode()
    bad = hostile_records(run_id)
    async with InProcessService(settings) as service:
        await produce(settings, [(key, CreateTaskRunCommand(id=run_id).model_dump_json().encode())])
        await read_topic(settings, settings.result_topic, 1)
        # Everything in one batch, and the valid command right behind it.
        valid = SetStateCommand(command_id=uuid.uuid4(), task_run_id=run_id, state=state("RUNNING"))
        await produce(settings, [(k, v) for _, k, v, _ in bad] + [(key, valid.model_dump_json().encode())])
        results = await read_topic(settings, settings.result_topic, 2 + len(bad))
        dead = await read_topic(settings, settings.dead_letter_topic, len(bad))
    answers = [OrchestrationResultEvent.model_validate_json(r.value) for r in results]
    assert len(answers) == 2 + len(bad)
    assert [a.error.code for a in answers[1:-1]] == [code for *_, code in bad], [
        (what, a.error.message) for (what, *_), a in zip(bad, answers[1:-1], strict=False)
    ]
    assert answers[-1].command_id == valid.command_id and answers[-1].status == SetStateStatus.ACCEPT
    # The original bytes, in order, with their codes (a huge key is kept too: the topic takes it).
    assert [d.value for d in dead] == [v for _, _, v, _ in bad]
    assert [dict(d.headers)["x-error-code"].decode() for d in dead] == [code for *_, code in bad]
    assert service.stats.dead_lettered == len(bad)
    assert [r["state_type"] for r in await history(settings, run_id)] == ["PENDING", "RUNNING"]


async def test_nan_data_gets_the_same_answers_in_one_batch_and_across_batches(base_settings):
    """A COMPLETED state holding NaN, then RUNNING: the answers must not depend on
    whether the two commands were decided in one batch (NaN in memory) or two
    (the log, which cannot hold NaN, in between)."""
    settings = isolated_settings(base_settings, partitions=1)
    together, apart = uuid.uuid4(), uuid.uuid4()

    def commands(run_id: uuid.UUID) -> list[tuple[bytes, bytes]]:
        key = str(run_id).encode()
        return [
            (key, CreateTaskRunCommand(id=run_id, state=state("RUNNING")).model_dump_json().encode()),
            (key, _set_state(run_id, '{"type":"COMPLETED","data":NaN}')),
            (key, SetStateCommand(task_run_id=run_id, state=state("RUNNING")).model_dump_json().encode()),
        ]

    await produce(settings, commands(together))  # before the service starts: one batch
    async with InProcessService(settings):
        await read_topic(settings, settings.result_topic, 3)
        for i, record in enumerate(commands(apart)):  # one batch each
            await produce(settings, [record])
            await read_topic(settings, settings.result_topic, 4 + i)
        results = await read_topic(settings, settings.result_topic, 6)
    answers = [OrchestrationResultEvent.model_validate_json(r.value) for r in results]
    outline = [(a.status, a.error.code if a.error else None) for a in answers]
    assert outline[:3] == outline[3:]
    assert outline[1] == (None, "invalid_command")


async def test_a_decision_whose_result_would_not_fit_its_topic_is_refused_as_too_large(base_settings):
    settings = isolated_settings(base_settings, partitions=1)
    # The result topic exists already with a small limit (runstate leaves it as it is).
    admin = AIOKafkaAdminClient(**kafka_options(settings))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(settings.result_topic, 1, 1,
                                            topic_configs={"max.message.bytes": "50000"})])
    finally:
        await admin.close()
    run_id = uuid.uuid4()
    key = str(run_id).encode()
    fat = SetStateCommand(command_id=uuid.uuid4(), task_run_id=run_id,
                          state=StateCreate(type="RUNNING", data="x" * 60_000))
    thin = SetStateCommand(command_id=uuid.uuid4(), task_run_id=run_id, state=StateCreate(type="RUNNING", data="y"))
    async with InProcessService(settings):
        await produce(settings, [
            (key, CreateTaskRunCommand(id=run_id).model_dump_json().encode()),
            (key, fat.model_dump_json().encode()),
            (key, thin.model_dump_json().encode()),
        ])
        results = await read_topic(settings, settings.result_topic, 3)
        dead = await read_topic(settings, settings.dead_letter_topic, 1)
    answers = {a.command_id: a for a in (OrchestrationResultEvent.model_validate_json(r.value) for r in results)}
    assert answers[fat.command_id].error.code == "too_large"
    assert "50000" in answers[fat.command_id].error.message or "topics take" in answers[fat.command_id].error.message
    assert answers[thin.command_id].status == SetStateStatus.ACCEPT
    assert [dict(d.headers)["x-error-code"] for d in dead] == [b"too_large"]
    assert [r["state_type"] for r in await history(settings, run_id)] == ["PENDING", "RUNNING"]


async def test_a_revoked_insert_is_an_outage_waited_out_not_a_reason_to_dead_letter(base_settings):
    settings = isolated_settings(base_settings, partitions=2)
    app_role = parse(settings.database_url).username
    admin_dsn = pg_dsn(settings.admin_database_url)
    runs = [uuid.uuid4() for _ in range(6)]
    async with InProcessService(settings) as service:
        warm = uuid.uuid4()
        await produce(settings, [(str(warm).encode(), CreateTaskRunCommand(id=warm).model_dump_json().encode())])
        await read_topic(settings, settings.result_topic, 1)
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'REVOKE INSERT ON events FROM "{app_role}"')
        try:
            records = []
            for run_id in runs:
                key = str(run_id).encode()
                records += [
                    (key, CreateTaskRunCommand(id=run_id).model_dump_json().encode()),
                    (key, SetStateCommand(task_run_id=run_id, state=state("RUNNING")).model_dump_json().encode()),
                ]
            await produce(settings, records)
            # Waited for, not slept on: a loaded machine can take long to fetch and try the batch.
            deadline = asyncio.get_running_loop().time() + 120
            while service.stats.outage_retries < 3:  # refused three times, dead-lettered never
                assert asyncio.get_running_loop().time() < deadline, "the refused batch was not retried"
                await asyncio.sleep(0.1)
            assert service.stats.outage is not None and "database" in service.stats.outage
            assert len(await read_all(settings, settings.result_topic)) == 1
        finally:
            with psycopg.connect(admin_dsn, autocommit=True) as conn:
                conn.execute(f'GRANT INSERT ON events TO "{app_role}"')
        results = await read_topic(settings, settings.result_topic, 1 + len(records))
        assert service.stats.outage is None
    answers = [OrchestrationResultEvent.model_validate_json(r.value) for r in results]
    assert [a.error for a in answers] == [None] * len(answers)
    assert sorted(a.status.value for a in answers[1:]) == ["ACCEPT"] * len(records)
    assert await read_all(settings, settings.dead_letter_topic) == []
    for run_id in runs:
        assert [r["state_type"] for r in await history(settings, run_id)] == ["PENDING", "RUNNING"]


async def _recreate_command_topic(settings) -> None:
    admin = AIOKafkaAdminClient(**kafka_options(settings))
    await admin.start()
    try:
        await admin.delete_topics([settings.command_topic])
        # The deletion completes in the background: slower on a loaded machine.
        deadline = asyncio.get_running_loop().time() + 120
        while asyncio.get_running_loop().time() < deadline:
            try:
                await admin.create_topics([NewTopic(settings.command_topic, settings.partitions, 1)])
                return
            except KafkaError:
                await asyncio.sleep(0.2)
        raise AssertionError("the command topic could not be recreated")
    finally:
        await admin.close()


async def test_new_records_at_reused_offsets_are_decided_and_old_ones_recognised(base_settings):
    """A recreated command topic (new records at offsets already recorded) and an
    offset reset (the same records read again) under commands without ids, so
    only the record itself can tell a redelivery from a new command."""
    first = isolated_settings(base_settings, partitions=1)
    old_run, new_run = uuid.uuid4(), uuid.uuid4()

    def lifecycle(run_id: uuid.UUID) -> list[tuple[bytes, bytes]]:
        key = str(run_id).encode()
        return [(key, CreateTaskRunCommand(id=run_id).model_dump_json().encode()),
                (key, SetStateCommand(task_run_id=run_id, state=state("RUNNING")).model_dump_json().encode())]

    await produce(first, lifecycle(old_run))
    async with InProcessService(first):
        await read_topic(first, first.result_topic, 2)
    await _recreate_command_topic(first)
    await produce(first, lifecycle(new_run))  # offsets 0 and 1 again
    # A new group reads the recreated topic from its start, as after an offset reset.
    second = first.replace(consumer_group=f"{first.consumer_group}-reset")
    async with InProcessService(second):
        results = await read_topic(second, second.result_topic, 4)
    answers = [OrchestrationResultEvent.model_validate_json(r.value) for r in results]
    assert [a.stream_id for a in answers[2:]] == [new_run, new_run]
    assert [a.status for a in answers[2:]] == [SetStateStatus.ACCEPT, SetStateStatus.ACCEPT]
    assert [r["state_type"] for r in await history(first, new_run)] == ["PENDING", "RUNNING"]
    # The same records read once more (another reset): recognised, answered as before.
    third = first.replace(consumer_group=f"{first.consumer_group}-again")
    async with InProcessService(third) as service:
        again = await read_topic(third, third.result_topic, 6)
    # Counted after the results' acks: read once the service has stopped (its batch is over).
    assert service.stats.duplicates == 2
    assert [r.value for r in again[4:]] == [r.value for r in results[2:]]
    assert [r["state_type"] for r in await history(first, new_run)] == ["PENDING", "RUNNING"]
    assert [r["state_type"] for r in await history(first, old_run)] == ["PENDING", "RUNNING"]


async def test_records_with_binary_or_null_headers_are_decided(base_settings):
    """Headers are the producer's: runstate reads none of a command's, and one it
    cannot decode as text must not fail the batch."""
    from aiokafka import AIOKafkaProducer

    from runstate.kafka_security import kafka_options

    settings = isolated_settings(base_settings, partitions=1)
    run_id = uuid.uuid4()
    key = str(run_id).encode()
    await ensure_topics(settings)  # the broker makes no topic by itself
    producer = AIOKafkaProducer(**kafka_options(settings))
    await producer.start()
    try:
        for value, headers in [
            (CreateTaskRunCommand(id=run_id).model_dump_json().encode(), [("bin", b"\xff\xfe\x00")]),
            (SetStateCommand(task_run_id=run_id, state=state("RUNNING")).model_dump_json().encode(),
             [("empty", None), ("bin", b"\xc3\x28")]),
        ]:
            await producer.send_and_wait(settings.command_topic, value, key=key, headers=headers)
    finally:
        await producer.stop()
    async with InProcessService(settings):
        results = await read_topic(settings, settings.result_topic, 2)
    answers = [OrchestrationResultEvent.model_validate_json(r.value) for r in results]
    assert [a.status for a in answers] == [SetStateStatus.ACCEPT, SetStateStatus.ACCEPT]
