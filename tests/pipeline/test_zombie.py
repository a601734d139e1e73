"""A zombie — a member that lost its partitions but still runs — deciding the
same records as the new owner, at the same time, against the real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import uuid
from types import SimpleNamespace

import pytest

from runstate.client import state
from runstate.messages import CreateTaskRunCommand, SetStateCommand
from runstate.pipeline.app import connect, disconnect, new_service
from runstate.store.queries import LogReader, make_engine

from .harness import isolated_settings

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


def records(topic: str, run_ids: list[uuid.UUID]) -> list[SimpleNamespace]:
    out = []
    for run_id in run_ids:
        for command in (
            CreateTaskRunCommand(id=run_id),
            SetStateCommand(task_run_id=run_id, state=state("RUNNING")),
            SetStateCommand(task_run_id=run_id, state=state("COMPLETED")),
        ):
            out.append(SimpleNamespace(topic=topic, partition=0, offset=len(out), key=str(run_id).encode(),
                                       value=command.model_dump_json().encode()))
    return out


async def test_two_members_deciding_the_same_records_at_once_write_one_history(base_settings):
    settings = isolated_settings(base_settings, partitions=1)
    owner, zombie = new_service(settings), new_service(settings)
    await connect(owner)
    await connect(zombie)
    run_ids = [uuid.uuid4() for _ in range(50)]
    batch = records(settings.command_topic, run_ids)
    try:
        first, second = await asyncio.gather(owner.handle_records(batch), zombie.handle_records(batch))
    finally:
        await disconnect(owner)
        await disconnect(zombie)

    # One of them wrote every event; the other lost the race, re-read the log and
    # answered every record with the stored result instead of deciding it again.
    assert sorted([len(first.events), len(second.events)]) == [0, len(batch)]
    assert owner.duplicates + zombie.duplicates == len(batch)
    as_json = lambda outcome: [json.loads(p.value) for p in outcome.results]  # noqa: E731
    assert as_json(first) == as_json(second)

    store = LogReader(make_engine(settings.database_url))
    try:
        for run_id in run_ids:
            rows = await store.history(run_id)
            assert [(r["seq"], r["state_type"]) for r in rows] == [(1, "PENDING"), (2, "RUNNING"), (3, "COMPLETED")]
    finally:
        await store.engine.dispose()


async def test_a_run_known_here_written_by_another_member_is_decided_again_from_the_store(base_settings):
    """The owner decides its runs' next commands from memory (pipeline/owned.py); a
    zombie stores the same next records first. The owner's append collides on
    (stream_id, seq), and the batch, decided again from the store, is answered with
    what the zombie stored: one history, no second decision."""
    settings = isolated_settings(base_settings, partitions=1)
    owner, zombie = new_service(settings), new_service(settings)
    await connect(owner)
    await connect(zombie)
    run_ids = [uuid.uuid4() for _ in range(20)]
    batch = records(settings.command_topic, run_ids)
    started = [r for i, r in enumerate(batch) if i % 3 < 2]  # created and RUNNING
    completed = [r for i, r in enumerate(batch) if i % 3 == 2]
    try:
        first = await owner.handle_records(started)
        theirs = await zombie.handle_records(completed)
        ours = await owner.handle_records(completed)
    finally:
        await disconnect(owner)
        await disconnect(zombie)
    assert not first.read_store and theirs.read_store and len(theirs.events) == len(run_ids)
    assert ours.read_store and ours.events == [] and ours.duplicates == len(run_ids)
    assert [p.value for p in ours.results] == [p.value for p in theirs.results]

    store = LogReader(make_engine(settings.database_url))
    try:
        for run_id in run_ids:
            rows = await store.history(run_id)
            assert [(r["seq"], r["state_type"]) for r in rows] == [(1, "PENDING"), (2, "RUNNING"), (3, "COMPLETED")]
    finally:
        await store.engine.dispose()
