"""The consumer service: a FastStream app over the command topic.

Delivery contract, per batch:
  1. decide every command in memory against one snapshot read in the same
     PostgreSQL transaction that appends the events;
  2. commit that transaction;
  3. publish results, state changes and dead letters, and wait for the broker's
     acknowledgement (idempotent producer, acks=all);
  4. only then commit the consumer offsets (FastStream NACK_ON_ERROR: success
     acks, any exception seeks back to the batch's first record).
A crash anywhere before 4 redelivers the batch; the store recognises every
record already decided and its stored outcome is published again.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import lru_cache, partial
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner, murmur2
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from faststream import AckPolicy, FastStream
from faststream.kafka import KafkaBroker
from faststream.specification import AsyncAPI
import psycopg
from psycopg_pool import PoolTimeout

from runstate import __version__
from runstate.config import Settings
from runstate.domain import OrchestrationSettings
from runstate.messages import OrchestrationResultEvent, StateChangeEvent
from runstate.pipeline.consumer import CoalescingConsumer
from runstate.pipeline.faults import CrashPoint
from runstate.messages import ErrorInfo
from runstate.pipeline.processor import (
    BadRecord,
    BatchOutcome,
    IncomingRecord,
    ParsedCommand,
    StoreSnapshot,
    decide_batch,
    parse_record,
)
from runstate.store.event_store import EventStore, batch_pool, make_engine

log = logging.getLogger("runstate.service")

MAX_CONFLICT_RETRIES = 20
DEAD_LETTER_MAX_BYTES = 8 * 1024 * 1024
MAX_TRANSIENT_WAIT_S = 30.0


# A batch runs on a psycopg connection from the pool: only psycopg's exception
# family (and the pool's timeout) reaches this layer.
# A conflict is another member's commit: a key it wrote first, or (under the
# batch's REPEATABLE READ snapshot) a row it changed since; decide again.
APPEND_CONFLICT = (
    psycopg.IntegrityError,
    psycopg.errors.SerializationFailure,
    psycopg.errors.DeadlockDetected,
)
# psycopg files SQLSTATE class 54 (an index row too large, say) under
# OperationalError, beside lost connections; but no retry will ever store it.
BEYOND_LIMITS = psycopg.errors.ProgramLimitExceeded
DATABASE_UNREACHABLE = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)
DATABASE_REFUSED = psycopg.DatabaseError


# A few batches' worth: a command's result and state change share a key. (65,536
# entries held ~20 MB per process once full, which make bench saw as growth.)
@lru_cache(maxsize=4096)
def _partition_index(key: bytes, partitions: int) -> int:
    return (murmur2(key) & 0x7FFFFFFF) % partitions


_UNKEYED = DefaultPartitioner()


def keyed_partitioner(key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
    """aiokafka's default partitioner (Kafka's murmur2, so that backfill and
    other producers agree on a run's partition), remembered per key: hashing
    in pure Python took 5 % of the consumer's CPU, twice per command."""
    if key is None:
        return _UNKEYED(key, all_partitions, available)
    return all_partitions[_partition_index(key, len(all_partitions))]


class RefusedBatch(Exception):
    """The database refused the batch for a reason retrying will not change."""


class OrchestrationService:
    """Decides batches of command records and publishes what they produced."""

    def __init__(self, settings: Settings, store: EventStore) -> None:
        self.settings = settings
        self.store = store
        self.connections = batch_pool(settings.database_url, settings.lanes)
        self.producer: AIOKafkaProducer | None = None
        self.rules_settings = OrchestrationSettings()
        self.decided = 0
        self.duplicates = 0
        self.dead_lettered = 0
        self.crash = CrashPoint()

    async def start(self) -> None:
        # Results go out through a plain aiokafka producer: FastStream's
        # per-message publish path cost ~200 us a record, most of a batch's time.
        self.producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.kafka_bootstrap_servers,
            enable_idempotence=True,
            # A batch's records are all appended before the sender runs, so
            # lingering would only delay the acks the batch waits for.
            linger_ms=0,
            max_batch_size=256 * 1024,
            max_request_size=DEAD_LETTER_MAX_BYTES,
            partitioner=keyed_partitioner,
            client_id="runstate-service",
        )
        await self.producer.start()
        # Not waiting: a database still starting is waited for batch by batch.
        await self.connections.open(wait=False)

    async def stop(self) -> None:
        if self.producer is not None:
            await self.producer.stop()
        await self.connections.close()
        await self.store.engine.dispose()

    async def handle_records(self, raw_records: Sequence[object]) -> BatchOutcome:
        records = [
            IncomingRecord(r.topic, r.partition, r.offset, r.key, r.value)  # type: ignore[attr-defined]
            for r in raw_records
        ]
        items = [parse_record(r, self.settings.max_command_bytes) for r in records]
        try:
            outcome = await self._decide_and_store(items)
        except RefusedBatch as exc:
            log.error("the database refused a batch (%s); deciding its records one by one", exc)
            outcome = await self._decide_one_by_one(items)
        self.crash.reached("after_db_commit")
        await self._publish(outcome)
        self.crash.reached("after_publish")
        self.decided += len(outcome.events)
        self.duplicates += outcome.duplicates
        self.dead_lettered += len(outcome.dead_letters)
        return outcome

    async def _decide_one_by_one(self, items: list[ParsedCommand | BadRecord]) -> BatchOutcome:
        """A batch the database keeps refusing (say, a string it cannot store)
        must not stall the partition: each record is decided in a transaction
        of its own, in order, and the one that is refused is dead-lettered."""
        merged = BatchOutcome()
        for item in items:
            try:
                single = await self._decide_and_store([item])
            except RefusedBatch as exc:
                assert isinstance(item, ParsedCommand)
                refused = BadRecord(
                    item.record,
                    ErrorInfo(code="orchestration_failed", message=f"the database refused this command: {exc}"),
                    item.stream_id,
                    item.command.kind,
                )
                single = decide_batch([refused], StoreSnapshot(), self.rules_settings)
            merged.absorb(single)
        return merged

    async def _decide_and_store(self, items: list[ParsedCommand | BadRecord]) -> BatchOutcome:
        parsed = [i for i in items if isinstance(i, ParsedCommand)]
        waited = 0.0
        conflicts = 0
        while True:
            try:
                async with self.connections.connection() as conn, conn.transaction():
                    now = datetime.now(UTC)
                    snapshot = await self.store.load_snapshot(conn, parsed, self.settings.command_topic, now)
                    outcome = decide_batch(items, snapshot, self.rules_settings)
                    await self.store.write(conn, outcome)
                    self.crash.reached("before_db_commit")
                return outcome
            except APPEND_CONFLICT as exc:
                # Another member (a zombie, or the new owner after a rebalance)
                # wrote this history first: decide again against what it wrote.
                conflicts += 1
                if conflicts > MAX_CONFLICT_RETRIES:
                    raise RefusedBatch(_reason(exc)) from exc
                log.warning("append conflict, retrying against fresh state: %s", _reason(exc))
                await asyncio.sleep(min(0.05 * conflicts, 1.0))
            except BEYOND_LIMITS as exc:
                raise RefusedBatch(_reason(exc)) from exc
            except DATABASE_UNREACHABLE as exc:
                # The server is unreachable: wait; past the limit the batch is
                # nacked and redelivered, never dead-lettered for an outage.
                if waited >= MAX_TRANSIENT_WAIT_S:
                    raise
                delay = min(1.0 + waited / 4, 5.0)
                log.warning("database unavailable (%s); retrying in %.1fs", _reason(exc), delay)
                await asyncio.sleep(delay)
                waited += delay
            except DATABASE_REFUSED as exc:
                raise RefusedBatch(_reason(exc)) from exc

    async def _publish(self, outcome: BatchOutcome) -> None:
        s = self.settings
        assert self.producer is not None, "start() the service first"
        send = self.producer.send
        sends = [await send(s.result_topic, p.value.encode(), key=p.key) for p in outcome.results]
        sends += [await send(s.state_change_topic, p.value.encode(), key=p.key) for p in outcome.state_changes]
        for dead in outcome.dead_letters:
            rec = dead.record
            headers = [
                ("x-error-code", dead.error.code.encode()),
                ("x-error", dead.error.message[:4000].encode()),
                ("x-source-topic", rec.topic.encode()),
                ("x-source-partition", str(rec.partition).encode()),
                ("x-source-offset", str(rec.offset).encode()),
            ]
            sends.append(await send(s.dead_letter_topic, rec.value or b"", key=rec.key, headers=headers))
        if sends:
            await asyncio.gather(*sends)


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


async def ensure_topics(settings: Settings) -> None:
    """Create runstate's topics when missing (existing ones are left as they are)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [
            settings.command_topic,
            settings.result_topic,
            settings.state_change_topic,
            settings.dead_letter_topic,
        ]
        # The dead-letter topic takes records larger than any command topic
        # accepts, so parking an oversized command can never fail.
        configs = {settings.dead_letter_topic: {"max.message.bytes": str(DEAD_LETTER_MAX_BYTES)}}
        missing = [
            NewTopic(t, settings.partitions, 1, topic_configs=configs.get(t, {}))
            for t in wanted
            if t not in existing
        ]
        if missing:
            await admin.create_topics(missing)
    finally:
        await admin.close()


async def _records_of(message: Any) -> Any:
    # The batch's records go to the handler as they came: the service parses
    # them itself, so that a malformed one becomes a dead letter instead of
    # failing the whole batch. (Reading them through Context("message") instead
    # cost a worker-thread hop per batch: fast_depends resolves it synchronously.)
    return message.raw_message


def build_app(settings: Settings | None = None) -> FastStream:
    settings = settings or Settings.load()
    # FastStream's access log ("Received", "Processed") goes to DEBUG: two
    # lines a batch were a visible part of a small batch's CPU.
    broker = KafkaBroker(settings.kafka_bootstrap_servers, client_id="runstate-service", log_level=logging.DEBUG)
    # The subscribers build their aiokafka consumers through this factory (the
    # hook FastStream's own test broker replaces); ours coalesces fetches.
    config = broker.config.broker_config
    config.builder = partial(CoalescingConsumer, linger_ms=settings.batch_timeout_ms, **config.builder.keywords)
    store = EventStore(make_engine(settings.database_url))
    service = OrchestrationService(settings, store)

    # Declared for the AsyncAPI document; the service publishes through its
    # own producer so one batch's sends are in flight together.
    broker.publisher(
        settings.result_topic,
        title="orchestration-results",
        description="One orchestration result per decided command, keyed by run id.",
        schema=OrchestrationResultEvent,
    )
    broker.publisher(
        settings.state_change_topic,
        title="state-changes",
        description="Every appended state, keyed by task-run id, in per-run sequence order.",
        schema=StateChangeEvent,
    )
    broker.publisher(
        settings.dead_letter_topic,
        title="dead-letter",
        description="Commands that could not be decided: the original bytes, with x-error headers.",
        schema=bytes,
    )

    async def on_commands(records):  # noqa: ANN001 - untyped: nothing to validate
        await service.handle_records(records)

    # Each lane is one more member of the consumer group, with partitions of
    # its own: while one lane waits on PostgreSQL or the broker, another
    # decides, so one process keeps its core busy.
    for lane in range(settings.lanes):
        broker.subscriber(
            settings.command_topic,
            group_id=settings.consumer_group,
            batch=True,
            max_records=settings.max_batch,
            batch_timeout_ms=settings.batch_timeout_ms,
            auto_offset_reset="earliest",
            ack_policy=AckPolicy.NACK_ON_ERROR,
            decoder=_records_of,
            title="commands",
            description=(
                "create_task_run / set_task_run_state / create_flow_run / set_flow_run_state, keyed by run id."
            ),
            include_in_schema=lane == 0,
        )(on_commands)

    app = FastStream(
        broker,
        specification=AsyncAPI(broker, title="runstate", version=__version__, description=__doc__),
    )

    @app.on_startup
    async def create_topics() -> None:
        await ensure_topics(settings)
        await service.start()
        # Deciding a batch allocates many short-lived objects (pydantic models, rows) and
        # almost no cycles: with the default thresholds the cyclic GC ran every few hundred
        # allocations and cost 10-15 % of a batch's CPU (make bench's profile). Everything
        # imported so far lives as long as the process, so freeze it out of the scans too.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)

    @app.after_shutdown
    async def dispose() -> None:
        await service.stop()

    app.state_service = service  # type: ignore[attr-defined]
    return app
