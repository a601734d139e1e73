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
import enum
import gc
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache, partial
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner, murmur2
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAlreadyExistsError
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
KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1_048_588
# Room a result or state change needs beside its value: key, headers, batch framing.
RECORD_OVERHEAD_BYTES = 4096
# Waiting out an outage: the first retry soon, then no more than every few seconds.
OUTAGE_FIRST_DELAY_S = 0.2
OUTAGE_MAX_DELAY_S = 5.0
OUTAGE_LOG_EVERY_S = 30.0


class Refusal(enum.Enum):
    """How a database error is treated, by whose fault it is."""

    CONFLICT = "conflict"  # another member wrote first: decide again on fresh state
    RECORD = "record"  # this batch's data: find the record and dead-letter it
    OUTAGE = "outage"  # the database, its grants or its schema: wait and retry


# SQLSTATE classes that a record's content can cause: data exceptions (22), a
# row or index entry beyond PostgreSQL's limits (54), constraint violations
# other than a unique key (23, checked before this).
RECORD_SQLSTATE_CLASSES = ("22", "23", "54")


def classify(exc: BaseException) -> Refusal:
    """Whose fault a database error is. Anything not known to be the record's
    is an outage: waiting costs time, dead-lettering a valid command loses it."""
    if isinstance(exc, psycopg.errors.UniqueViolation | psycopg.errors.SerializationFailure
                  | psycopg.errors.DeadlockDetected):
        return Refusal.CONFLICT
    if isinstance(exc, psycopg.Error):
        sqlstate = exc.sqlstate
        if sqlstate is not None and sqlstate[:2] in RECORD_SQLSTATE_CLASSES:
            return Refusal.RECORD
        # Raised by psycopg itself, before the server saw it (a NUL in a text value, say).
        if sqlstate is None and isinstance(exc, psycopg.DataError):
            return Refusal.RECORD
    return Refusal.OUTAGE


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
    """The batch cannot be stored as it is, through the fault of its records
    (or of a bug): it is decided again record by record to find the one."""

    def __init__(self, reason: str, code: str) -> None:
        super().__init__(reason)
        self.code = code


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
        # What the output topics take (ensure_topics reads it at start-up).
        default = KAFKA_DEFAULT_MAX_MESSAGE_BYTES
        self.limits = TopicLimits(results=default, state_changes=default, dead_letters=DEAD_LETTER_MAX_BYTES)
        # The outage being waited out, if any: what refused, since when.
        self.outage: str | None = None
        self.outage_since = 0.0
        self.outage_retries = 0
        self._outage_logged = 0.0

    async def start(self, limits: TopicLimits | None = None) -> None:
        if limits is not None:
            self.limits = limits
        # Results go out through a plain aiokafka producer: FastStream's
        # per-message publish path cost ~200 us a record, most of a batch's time.
        self.producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.kafka_bootstrap_servers,
            enable_idempotence=True,
            # A batch's records are all appended before the sender runs, so
            # lingering would only delay the acks the batch waits for.
            linger_ms=0,
            max_batch_size=256 * 1024,
            max_request_size=max(self.limits.results, self.limits.state_changes, self.limits.dead_letters),
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
        outcome = await self._store(items)
        self.crash.reached("after_db_commit")
        await self._publish(outcome)
        self.crash.reached("after_publish")
        self.decided += len(outcome.events)
        self.duplicates += outcome.duplicates
        self.dead_lettered += len(outcome.dead_letters)
        return outcome

    async def _store(self, items: list[ParsedCommand | BadRecord]) -> BatchOutcome:
        """Decide and store the batch; only an outage keeps this waiting, and no
        record can make it raise."""
        try:
            return await self._decide_and_store(items)
        except RefusedBatch as exc:
            if len(items) > 1:
                log.error("a batch of %d records was refused (%s); deciding them one by one", len(items), exc)
                merged = BatchOutcome()
                for item in items:
                    merged.absorb(await self._store([item]))
                return merged
            (item,) = items
            log.error("record %s[%d]@%d refused: %s", item.record.topic, item.record.partition,
                      item.record.offset, exc)
            if isinstance(item, BadRecord):
                refused = BadRecord(item.record, ErrorInfo(code="orchestration_failed", message=str(exc)[:1000]),
                                    item.stream_id, item.command_kind, item.command_id)
            else:
                message = f"the database refused this command: {exc}" if exc.code == "unstorable" else str(exc)
                refused = BadRecord(item.record, ErrorInfo(code=exc.code, message=message[:1000]),
                                    item.stream_id, item.command.kind, item.command_id)
            return decide_batch([refused], StoreSnapshot(), self.rules_settings)

    async def _decide_and_store(self, items: list[ParsedCommand | BadRecord]) -> BatchOutcome:
        parsed = [i for i in items if isinstance(i, ParsedCommand)]
        conflicts = 0
        while True:
            try:
                async with self.connections.connection() as conn, conn.transaction():
                    now = datetime.now(UTC)
                    snapshot = await self.store.load_snapshot(conn, parsed, self.settings.command_topic, now)
                    outcome = decide_batch(items, snapshot, self.rules_settings,
                                           max_message_bytes=self.limits.outcome_bytes)
                    await self.store.write(conn, outcome)
                    self.crash.reached("before_db_commit")
                self._outage_over()
                return outcome
            except (psycopg.Error, PoolTimeout) as exc:
                refusal = classify(exc)
                if refusal is Refusal.CONFLICT:
                    # Another member (a zombie, or the new owner after a rebalance)
                    # wrote this history first: decide again against what it wrote.
                    conflicts += 1
                    if conflicts > MAX_CONFLICT_RETRIES:
                        # Only a key of the batch's own can collide this often.
                        raise RefusedBatch(_reason(exc), "unstorable") from exc
                    log.warning("append conflict, retrying against fresh state: %s", _reason(exc))
                    await asyncio.sleep(min(0.05 * conflicts, 1.0))
                elif refusal is Refusal.RECORD:
                    raise RefusedBatch(_reason(exc), "unstorable") from exc
                else:
                    await self._wait_out_outage("database", exc)
            except Exception as exc:  # noqa: BLE001 - a bug: isolate the record it trips on
                log.exception("deciding or storing a batch failed")
                raise RefusedBatch(f"{type(exc).__name__}: {exc}", "orchestration_failed") from exc

    async def _wait_out_outage(self, what: str, exc: BaseException) -> None:
        """One line when an outage begins, one every OUTAGE_LOG_EVERY_S while it
        lasts; the lane waits, with a growing pause, and tries again."""
        now = time.monotonic()
        reason = f"{what}: {_reason(exc)}"
        if self.outage is None:
            self.outage, self.outage_since, self._outage_logged = reason, now, now
            self.outage_retries = 0
            log.error("outage (%s); this lane waits and retries until it is over", reason)
        elif now - self._outage_logged >= OUTAGE_LOG_EVERY_S:
            self.outage, self._outage_logged = reason, now
            log.error("outage for %.0f s (%s); still retrying", now - self.outage_since, reason)
        self.outage_retries += 1
        await asyncio.sleep(min(OUTAGE_FIRST_DELAY_S * 2 ** min(self.outage_retries, 10), OUTAGE_MAX_DELAY_S))

    def _outage_over(self) -> None:
        if self.outage is not None:
            log.warning("outage over after %.1f s (%s)", time.monotonic() - self.outage_since, self.outage)
            self.outage = None

    async def _publish(self, outcome: BatchOutcome) -> None:
        """Publish everything the batch produced and wait for the acks, retrying
        until the broker takes it all: the batch's offsets are committed only then."""
        while True:
            try:
                await self._send_all(outcome)
                self._outage_over()
                return
            except Exception as exc:  # noqa: BLE001 - any send failure: retried, never skipped
                await self._wait_out_outage("broker", exc)

    async def _send_all(self, outcome: BatchOutcome) -> None:
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
            key, value = rec.key, rec.value
            size = len(key or b"") + len(value or b"")
            if size + RECORD_OVERHEAD_BYTES > self.limits.dead_letters:
                # The record stays in the command topic, where the headers point;
                # a dead letter that cannot be published would stall the partition.
                key, value = None, None
                headers.append(("x-dropped-bytes", str(size).encode()))
            sends.append(await send(s.dead_letter_topic, value, key=key, headers=headers))
        if sends:
            await asyncio.gather(*sends)


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass(frozen=True)
class TopicLimits:
    """The largest record (max.message.bytes) each output topic takes."""

    results: int
    state_changes: int
    dead_letters: int

    @property
    def outcome_bytes(self) -> int:
        """What a result or state change may weigh, less its key and framing."""
        return min(self.results, self.state_changes) - RECORD_OVERHEAD_BYTES


def wanted_message_bytes(settings: Settings) -> dict[str, int]:
    """max.message.bytes for each topic runstate creates: room for the largest
    command allowed, and for the result and state change that repeat its state;
    the dead-letter topic takes anything the command topic takes."""
    outcome = settings.max_command_bytes + 256 * 1024
    return {
        settings.command_topic: settings.max_command_bytes + 64 * 1024,
        settings.result_topic: outcome,
        settings.state_change_topic: outcome,
        settings.dead_letter_topic: max(DEAD_LETTER_MAX_BYTES, 2 * settings.max_command_bytes),
    }


async def ensure_topics(settings: Settings) -> TopicLimits:
    """Create runstate's topics when missing, each with an explicit size limit,
    and read the limits of those that exist (they are left as they are)."""
    wanted = wanted_message_bytes(settings)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(t, settings.partitions, 1, topic_configs={"max.message.bytes": str(size)})
            for t, size in wanted.items()
            if t not in existing
        ]
        if missing:
            try:
                await admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass  # another member created them first
        actual = await _max_message_bytes(admin, list(wanted))
    finally:
        await admin.close()
    for topic, size in actual.items():
        if size < wanted[topic]:
            log.warning("topic %s takes records of up to %d bytes (max.message.bytes); runstate wants %d:"
                        " commands whose messages do not fit are refused as too_large", topic, size, wanted[topic])
    return TopicLimits(
        results=actual[settings.result_topic],
        state_changes=actual[settings.state_change_topic],
        dead_letters=actual[settings.dead_letter_topic],
    )


async def _max_message_bytes(admin: AIOKafkaAdminClient, topics: list[str]) -> dict[str, int]:
    responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t) for t in topics])
    found: dict[str, int] = {}
    for response in responses:
        for error_code, _message, _type, name, entries in (r[:5] for r in response.resources):
            if error_code:
                raise RuntimeError(f"describing topic {name} failed with Kafka error {error_code}")
            for entry in entries:
                if entry[0] == "max.message.bytes":
                    found[name] = int(entry[1])
    return {t: found.get(t, KAFKA_DEFAULT_MAX_MESSAGE_BYTES) for t in topics}


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
        await service.start(await ensure_topics(settings))
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
