"""`runstate backfill`: publish the recorded state changes again, for a consumer
that joins late or lost its data.

Each message is the event's state change (stored, or rendered again from the
event, pipeline/message_json.py) re-serialised through
StateChangeEvent, which yields the bytes the service published originally
(same model, same field order), keyed by the run id as the original was, so it
lands in the same partition. Its `seq` is the original one: a consumer that
de-duplicates on (task_run_id, seq) sees nothing new twice.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError
from sqlalchemy import Engine

from runstate.audit.db import ServerUnreachable
from runstate.config import WorkerSettings
from runstate.kafka_security import kafka_options
from runstate.messages import SCHEMA_VERSION, SCHEMA_VERSION_HEADER, StateChangeEvent
from runstate.pipeline.message_json import state_ref_json, stored_messages
from runstate.store.queries import count_events, scan_events

KAFKA_START_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class BackfillMessage:
    key: bytes
    value: bytes


def parse_since(value: str) -> datetime:
    """ISO 8601; a time without an offset is taken as UTC (as the log records it)."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ValueError(f"--since {value!r} is not an ISO 8601 time (e.g. 2024-05-01T12:00:00Z)") from exc
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed


def message_of(stream_id: UUID, state_change: dict[str, Any]) -> BackfillMessage:
    event = StateChangeEvent.model_validate(state_change)
    return BackfillMessage(key=str(stream_id).encode(), value=event.model_dump_json().encode())


# An event's state change is rendered again from its payload and columns
# (pipeline/message_json.py), with the stream's appended state before it.
STATE_CHANGE_COLUMNS = (
    "command_id, transition_id, status, state_id, payload::text AS payload,"
    " (SELECT json_build_array(p.state_type, p.state_name, p.state_id) FROM events p"
    "  WHERE p.stream_id = events.stream_id AND p.seq < events.seq AND p.state_type IS NOT NULL"
    "  ORDER BY p.seq DESC LIMIT 1) AS previous"
)


def state_change_of(row: Any) -> dict[str, Any]:
    previous = row.previous
    _, change = stored_messages(
        row.payload, stream_id=row.stream_id, seq=row.seq, command_id=row.command_id,
        transition_id=row.transition_id, status=row.status, state_id=row.state_id,
        from_state=state_ref_json(previous[0], previous[1], previous[2]) if previous else "null",
    )
    if change is None:
        raise ValueError(f"event {row.stream_id} seq {row.seq} records no state change")
    parsed: dict[str, Any] = json.loads(change)
    return parsed


def _condition(since: datetime, run_id: UUID | None) -> tuple[str, dict[str, Any]]:
    condition = (
        "stream_type = 'task_run' AND recorded_at >= :since"
        " AND state_type IS NOT NULL"
    )
    params: dict[str, Any] = {"since": since}
    if run_id is not None:
        condition += " AND stream_id = :run"
        params["run"] = run_id
    return condition, params


def count_to_backfill(engine: Engine, since: datetime, run_id: UUID | None = None) -> int:
    condition, params = _condition(since, run_id)
    return count_events(engine, condition, params)


async def start_producer(settings: WorkerSettings) -> AIOKafkaProducer:
    producer = AIOKafkaProducer(**kafka_options(settings), enable_idempotence=True, acks="all", linger_ms=5)
    try:
        await asyncio.wait_for(producer.start(), KAFKA_START_TIMEOUT_S)
    except (KafkaConnectionError, KafkaError, TimeoutError, OSError) as exc:
        await producer.stop()
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ServerUnreachable(f"Kafka at {settings.kafka_bootstrap_servers} is unreachable: {detail}") from exc
    return producer


class TopicMissing(ValueError):
    """The target topic does not exist (or the principal may not see it); brokers of a
    secured cluster create no topic on a producer's first send."""


async def require_topic(producer: AIOKafkaProducer, topic: str) -> None:
    """Refuse a target topic the cluster does not have, before anything is read or sent:
    a producer would otherwise wait out its metadata timeout and fail in the middle."""
    metadata = await producer.client.fetch_all_metadata()
    if topic not in metadata.topics():
        raise TopicMissing(f"topic {topic!r} does not exist (or this principal may not describe it); "
                           "create it first, brokers here create no topic on first use")


async def backfill(
    engine: Engine,
    producer: AIOKafkaProducer,
    topic: str,
    since: datetime,
    run_id: UUID | None = None,
    *,
    batch_size: int = 1000,
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """Publish every recorded state change since `since` (optionally of one run) in
    (stream, seq) order through a started producer; returns how many were acknowledged."""
    condition, params = _condition(since, run_id)
    published = 0
    batches = scan_events(
        engine, STATE_CHANGE_COLUMNS, condition=condition, params=params,
        batch_size=batch_size,
    )
    while True:
        # The database read is synchronous; off the loop, so the producer keeps sending.
        rows = await asyncio.to_thread(next, batches, None)
        if rows is None:
            break
        # One send per record in order; the idempotent producer keeps a partition's order
        # even across retries. Waiting per batch bounds what is in flight.
        sent = []
        for row in rows:
            message = message_of(row.stream_id, state_change_of(row))
            sent.append(await producer.send(topic, message.value, key=message.key,
                                            headers=[(SCHEMA_VERSION_HEADER, str(SCHEMA_VERSION).encode())]))
        await asyncio.gather(*sent)
        published += len(rows)
        if on_batch:
            on_batch(len(rows))
    return published
