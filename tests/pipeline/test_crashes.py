"""Crashes and rebalances of real consumer processes."""

from __future__ import annotations

import asyncio
import signal
import uuid

import pytest

from runstate.client import state
from runstate.messages import CreateTaskRunCommand, OrchestrationResultEvent, SetStateCommand
from runstate.store.queries import LogReader, make_engine

from .harness import ServiceProcess, isolated_settings, produce, read_all, read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


def lifecycle(run_id: uuid.UUID) -> list[tuple[bytes, bytes, uuid.UUID]]:
    key = str(run_id).encode()
    commands = [CreateTaskRunCommand(command_id=uuid.uuid4(), id=run_id)] + [
        SetStateCommand(command_id=uuid.uuid4(), task_run_id=run_id, state=state(t))
        for t in ("RUNNING", "COMPLETED")
    ]
    return [(key, c.model_dump_json().encode(), c.command_id) for c in commands]


async def histories(settings, run_ids):
    store = LogReader(make_engine(settings.database_url))
    try:
        return {run_id: await store.history(run_id) for run_id in run_ids}
    finally:
        await store.engine.dispose()


async def answered_commands(settings, expected: set[uuid.UUID], timeout: float) -> set[uuid.UUID]:
    """Command ids answered on the result topic, read until every expected one is there
    (results are re-published after a rebalance, so a record count proves nothing)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        records = await read_all(settings, settings.result_topic)
        answered = {OrchestrationResultEvent.model_validate_json(r.value).command_id for r in records}
        if expected <= answered or asyncio.get_running_loop().time() > deadline:
            return answered
        await asyncio.sleep(1)


async def wait_exit(service: ServiceProcess, timeout: float = 60) -> int:
    return await asyncio.to_thread(service.wait, timeout)


async def test_sigkill_between_db_commit_and_offset_commit_loses_and_duplicates_nothing(base_settings, tmp_path):
    settings = isolated_settings(base_settings, partitions=1)
    run_id = uuid.uuid4()
    sent = lifecycle(run_id)
    await produce(settings, [(k, v) for k, v, _ in sent])

    crashing = ServiceProcess(settings, tmp_path / "crash.log", RUNSTATE_FAULT_POINT="after_db_commit").start()
    try:
        assert await wait_exit(crashing, timeout=180) == -signal.SIGKILL  # start, join, decide: slow when loaded
    finally:
        crashing.stop()
    before = (await histories(settings, [run_id]))[run_id]
    assert len(before) == 3, "the batch was committed to the database before the kill"
    # Everything the topic holds (the killed process can add nothing), not what 2 s of reading found.
    assert await read_all(settings, settings.result_topic) == []

    restarted = ServiceProcess(settings, tmp_path / "restart.log").start()
    try:
        # A process's start and its group join can take a minute on a loaded machine.
        results = await read_topic(settings, settings.result_topic, 3, timeout=180)
    finally:
        restarted.stop()
    after = (await histories(settings, [run_id]))[run_id]
    assert [row["seq"] for row in after] == [1, 2, 3]
    assert [row["command_id"] for row in after] == [row["command_id"] for row in before]
    answered = [OrchestrationResultEvent.model_validate_json(r.value) for r in results]
    assert [a.command_id for a in answered] == [c for _, _, c in sent]
    assert [a.seq for a in answered] == [1, 2, 3]


async def test_two_consumers_one_killed_mid_stream_keep_every_history_gapless(base_settings, tmp_path):
    settings = isolated_settings(base_settings, partitions=4, max_batch=20)
    run_ids = [uuid.uuid4() for _ in range(60)]
    waves = [lifecycle(r) for r in run_ids]
    first = ServiceProcess(settings, tmp_path / "a.log").start()
    second = ServiceProcess(settings, tmp_path / "b.log").start()
    try:
        # First half while both run, then one member dies, then the rest.
        await produce(settings, [(k, v) for w in waves[:30] for k, v, _ in w])
        await read_topic(settings, settings.result_topic, 45, timeout=180)  # the kill falls mid-stream
        second.signal(signal.SIGKILL)
        await produce(settings, [(k, v) for w in waves[30:] for k, v, _ in w])
        expected = [c for w in waves for _, _, c in w]
        # The survivor takes the dead member's partitions after its session times out and the
        # group rebalances: tens of seconds on a loaded machine.
        answered = await answered_commands(settings, set(expected), timeout=240)
    finally:
        first.stop()
        second.stop()
    assert [c for c in expected if c not in answered] == []
    logged = await histories(settings, run_ids)
    for run_id, rows in logged.items():
        assert [row["seq"] for row in rows] == [1, 2, 3], run_id
        assert [row["state_type"] for row in rows] == ["PENDING", "RUNNING", "COMPLETED"], run_id
