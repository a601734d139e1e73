"""Concurrency-limit commands decided by the pipeline on the in-memory store:
Prefect 3.9.1's upsert semantics, one stream per tag, a command never applied
twice, and the limit the task rules then read."""

from __future__ import annotations

import json
import uuid
from types import SimpleNamespace

from runstate.client import state
from runstate.events import EventType, LimitEventPayload, StreamType
from runstate.messages import (
    CreateTaskRunCommand,
    DeleteConcurrencyLimitCommand,
    LimitResultEvent,
    SetConcurrencyLimitCommand,
    SetStateCommand,
    limit_id,
    stream_id_of,
)
from runstate.pipeline.records import BadRecord, IncomingRecord, ParsedCommand, parse_record

from .test_service_memory import TOPIC, service


def records(*commands, start: int = 0) -> list[SimpleNamespace]:
    return [SimpleNamespace(topic=TOPIC, partition=0, offset=offset, key=str(stream_id_of(c)).encode(),
                            value=c.model_dump_json().encode()) for offset, c in enumerate(commands, start)]


def answers(outcome) -> list[LimitResultEvent]:
    return [LimitResultEvent.model_validate_json(p.value) for p in outcome.results]


def tag() -> str:
    return f"limit-{uuid.uuid4().hex[:8]}"


async def test_set_creates_then_updates_keeping_active_and_slots(monkeypatch):
    svc, store, _ = service(monkeypatch)
    t = tag()
    first = answers(await svc.handle_records(records(SetConcurrencyLimitCommand(tag=t, concurrency_limit=2))))
    assert (first[0].created, first[0].limit.limit, first[0].limit.active) == (True, 2, True)  # type: ignore[union-attr]
    # A slot taken meanwhile, and the limit switched off: a set without `active` keeps both.
    store.tables.tag_limits[t] = store.tables.tag_limits[t].model_copy(update={"active_slots": 1})
    await svc.handle_records(records(SetConcurrencyLimitCommand(tag=t, concurrency_limit=2, active=False), start=1))
    later = answers(await svc.handle_records(records(SetConcurrencyLimitCommand(tag=t, concurrency_limit=5),
                                                     start=2)))[0]
    assert later.created is False and later.limit is not None
    assert (later.limit.limit, later.limit.active, later.limit.active_slots) == (5, False, 1)
    assert store.tables.tag_limits[t].limit == 5
    events = [e for e in store.tables.events if e.stream_id == limit_id(t)]
    assert [(e.seq, e.stream_type, e.event_type) for e in events] == [
        (n, StreamType.CONCURRENCY_LIMIT, EventType.CONCURRENCY_LIMIT_SET) for n in (1, 2, 3)]
    assert LimitEventPayload.model_validate_json(events[-1].payload).limit == store.tables.tag_limits[t]


async def test_delete_removes_and_an_unknown_tag_is_refused(monkeypatch):
    svc, store, _ = service(monkeypatch)
    t = tag()
    out = await svc.handle_records(records(SetConcurrencyLimitCommand(tag=t, concurrency_limit=1),
                                           DeleteConcurrencyLimitCommand(tag=t),
                                           DeleteConcurrencyLimitCommand(tag=t)))
    _, deleted, unknown = answers(out)
    assert deleted.error is None and deleted.seq == 2 and deleted.limit is not None and deleted.limit.limit == 1
    assert unknown.error is not None and unknown.error.code == "unknown_limit" and unknown.seq is None
    assert out.dead_letters == []
    assert t not in store.tables.tag_limits
    # Created again after a delete: the stream goes on, the limit is new.
    again = answers(await svc.handle_records(records(SetConcurrencyLimitCommand(tag=t, concurrency_limit=3),
                                                     start=3)))[0]
    assert (again.created, again.seq) == (True, 3)


async def test_a_command_seen_twice_is_applied_once(monkeypatch):
    svc, store, _ = service(monkeypatch)
    t = tag()
    command_id = uuid.uuid4()
    set_once = SetConcurrencyLimitCommand(command_id=command_id, tag=t, concurrency_limit=1)
    first = await svc.handle_records(records(set_once))
    # Another set in between, then the first one again at a new offset (a client's retry).
    await svc.handle_records(records(SetConcurrencyLimitCommand(tag=t, concurrency_limit=4), start=1))
    resent = await svc.handle_records(records(set_once, start=2))
    assert resent.events == [] and resent.duplicates == 1
    assert [p.value for p in resent.results] == [p.value for p in first.results]
    assert store.tables.tag_limits[t].limit == 4
    # The very record delivered again is recognised by its source too.
    redelivered = await svc.handle_records(records(set_once))
    assert redelivered.events == [] and store.tables.tag_limits[t].limit == 4


async def test_the_rules_read_the_limit_set_in_the_same_batch(monkeypatch):
    svc, store, _ = service(monkeypatch)
    t = tag()
    run_a, run_b = uuid.uuid4(), uuid.uuid4()
    out = await svc.handle_records(records(
        SetConcurrencyLimitCommand(tag=t, concurrency_limit=1),
        CreateTaskRunCommand(id=run_a, tags=[t]), CreateTaskRunCommand(id=run_b, tags=[t]),
        SetStateCommand(task_run_id=run_a, state=state("RUNNING")),
        SetStateCommand(task_run_id=run_b, state=state("RUNNING")),
    ))
    statuses = [json.loads(p.value).get("status") for p in out.results]
    assert statuses[3:] == ["ACCEPT", "WAIT"]
    # The slot taken in the batch is in the row the set wrote, not lost beside it.
    assert store.tables.tag_limits[t].active_slots == 1 and out.slot_deltas == {}


def test_a_limit_command_must_be_keyed_by_its_limit_id():
    command = SetConcurrencyLimitCommand(tag="db", concurrency_limit=1)
    value = command.model_dump_json().encode()
    wrong = parse_record(IncomingRecord(TOPIC, 0, 0, b"db", value), 1 << 20)
    assert isinstance(wrong, BadRecord) and wrong.error.code == "key_mismatch"
    right = parse_record(IncomingRecord(TOPIC, 0, 0, str(limit_id("db")).encode(), value), 1 << 20)
    assert isinstance(right, ParsedCommand) and right.stream_id == limit_id("db")


async def test_an_invalid_limit_command_is_answered_as_a_limit_result(monkeypatch):
    svc, _, _ = service(monkeypatch)
    bad = SimpleNamespace(topic=TOPIC, partition=0, offset=0, key=str(limit_id("x")).encode(),
                          value=b'{"kind": "set_concurrency_limit", "tag": "x", "concurrency_limit": -1}')
    out = await svc.handle_records([bad])
    (answer,) = answers(out)
    assert answer.error is not None and answer.error.code == "invalid_command"
    assert json.loads(out.results[0].value).keys() == set(LimitResultEvent.model_fields)
