"""Kafka adapters of the batch path: the topics runstate creates and their size
limits, and the Publisher port on an idempotent aiokafka producer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import InvalidProducerEpoch, OutOfOrderSequenceNumber, ProducerFenced, UnknownProducerId
from aiokafka.partitioner import DefaultPartitioner, murmur2
from aiokafka.producer.message_accumulator import BatchBuilder

from runstate.config import Settings
from runstate.kafka_security import describe_login, kafka_options, start_client
from runstate.messages import SCHEMA_VERSION, SCHEMA_VERSION_HEADER
from runstate.pipeline.ports import BatchOutcome

log = logging.getLogger("runstate.kafka")

KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1_048_588
DEAD_LETTER_MAX_BYTES = 8 * 1024 * 1024
DESCRIBE_ATTEMPTS = 20
SCHEMA_VERSION_BYTES = str(SCHEMA_VERSION).encode()
# Room a record needs beside its value: key, headers, batch framing.
RECORD_OVERHEAD_BYTES = 4096


@dataclass(frozen=True)
class TopicLimits:
    """The largest record (max.message.bytes) each output topic takes."""

    results: int = KAFKA_DEFAULT_MAX_MESSAGE_BYTES
    state_changes: int = KAFKA_DEFAULT_MAX_MESSAGE_BYTES
    dead_letters: int = DEAD_LETTER_MAX_BYTES

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


class TopicSetupError(RuntimeError):
    """runstate's topics are missing and cannot be made (refused, or not allowed by the settings)."""


# Kafka error codes in a CreateTopics answer (aiokafka returns them without raising).
TOPIC_ALREADY_EXISTS = 36
TOPIC_AUTHORIZATION_FAILED = 29
CLUSTER_AUTHORIZATION_FAILED = 31


async def ensure_topics(settings: Settings) -> TopicLimits:
    """Create runstate's topics when missing, each with its replication factor,
    min.insync.replicas, retention and size limit from the settings, and read the
    limits of those that exist (they are left as they are)."""
    wanted = wanted_message_bytes(settings)
    configs = settings.topic_configs()
    admin = AIOKafkaAdminClient(**kafka_options(settings))
    await start_client(admin, settings)
    try:
        brokers = len(admin._client.cluster.brokers())  # noqa: SLF001 - the metadata start() fetched
        existing = set(await admin.list_topics())
        missing = [t for t in wanted if t not in existing]
        if missing:
            await _create(admin, settings, missing, wanted, configs)
        actual = await _max_message_bytes(admin, list(wanted))
        replicas = await _replication_factors(admin, list(wanted))
    finally:
        await admin.close()
    for topic, size in actual.items():
        if size < wanted[topic]:
            log.warning("topic %s takes records of up to %d bytes (max.message.bytes); runstate wants %d:"
                        " commands whose messages do not fit are refused as too_large", topic, size, wanted[topic])
    single = sorted(t for t, n in replicas.items() if n == 1)
    if single:
        # The producers wait for acks=all, which on one replica is one broker's disk.
        log.warning("topics %s have a replication factor of 1 on a cluster of %d broker(s): acks=all waits for "
                    "that one replica only, and losing its broker loses acknowledged records%s", ", ".join(single),
                    brokers, " (set RUNSTATE_TOPIC_REPLICATION_FACTOR, default 3)" if brokers > 1 else "")
    return TopicLimits(
        results=actual[settings.result_topic],
        state_changes=actual[settings.state_change_topic],
        dead_letters=actual[settings.dead_letter_topic],
    )


async def _create(admin: AIOKafkaAdminClient, settings: Settings, missing: list[str], wanted: dict[str, int],
                  configs: dict[str, dict[str, str]]) -> None:
    who = describe_login(settings)
    if not settings.create_topics:
        raise TopicSetupError(f"Kafka topics {', '.join(missing)} do not exist and RUNSTATE_CREATE_TOPICS is false:"
                              " create them (see the README, 'Running it securely')")
    new = [NewTopic(t, settings.partitions, settings.topic_replication_factor,
                    topic_configs={"max.message.bytes": str(wanted[t]), **configs[t]}) for t in missing]
    response = await admin.create_topics(new)
    refused = [(name, code, (rest[0] if rest else None)) for name, code, *rest in response.topic_errors
               if code not in (0, TOPIC_ALREADY_EXISTS)]
    if not refused:
        return
    name, code, message = refused[0]
    if code in (TOPIC_AUTHORIZATION_FAILED, CLUSTER_AUTHORIZATION_FAILED):
        raise TopicSetupError(
            f"Kafka refused to create topic {name} for {who} (not authorized, error {code}): grant that principal"
            " Create on runstate's topics, or create them beforehand and set RUNSTATE_CREATE_TOPICS=false")
    names = ", ".join(n for n, _, _ in refused)
    raise TopicSetupError(f"Kafka could not create topics {names} (error {code}: {message or 'no message'}) with"
                          f" replication factor {settings.topic_replication_factor} and min.insync.replicas"
                          f" {settings.topic_min_insync_replicas} (RUNSTATE_TOPIC_REPLICATION_FACTOR,"
                          " RUNSTATE_TOPIC_MIN_INSYNC_REPLICAS)")


async def _replication_factors(admin: AIOKafkaAdminClient, topics: list[str]) -> dict[str, int]:
    """Each topic's smallest replica count (from the metadata)."""
    found: dict[str, int] = {}
    for topic in await admin.describe_topics(topics):
        counts = [len(p["replicas"]) for p in topic.get("partitions", [])]
        if counts:
            found[topic["topic"]] = min(counts)
    return found


async def _max_message_bytes(admin: AIOKafkaAdminClient, topics: list[str]) -> dict[str, int]:
    # A topic created a moment ago may not be known to the broker answering yet.
    for attempt in range(DESCRIBE_ATTEMPTS):
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t) for t in topics])
        found: dict[str, int] = {}
        failed: list[tuple[str, int]] = []
        for response in responses:
            for error_code, _message, _type, name, entries in (r[:5] for r in response.resources):
                if error_code:
                    failed.append((name, error_code))
                for entry in entries:
                    if entry[0] == "max.message.bytes":
                        found[name] = int(entry[1])
        if not failed:
            return {t: found.get(t, KAFKA_DEFAULT_MAX_MESSAGE_BYTES) for t in topics}
        await asyncio.sleep(0.2 * (attempt + 1))
    raise RuntimeError(f"describing topics failed with Kafka errors {failed}")


# A few batches' worth: a command's result and state change share a key.
@lru_cache(maxsize=4096)
def _partition_index(key: bytes, partitions: int) -> int:
    return (murmur2(key) & 0x7FFFFFFF) % partitions


_UNKEYED = DefaultPartitioner()


def keyed_partitioner(key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
    """aiokafka's default partitioner (Kafka's murmur2, so that backfill and
    other producers agree on a run's partition), remembered per key: hashing
    in pure Python is a visible share of the consumer's CPU, twice per command."""
    if key is None:
        return _UNKEYED(key, all_partitions, available)
    return all_partitions[_partition_index(key, len(all_partitions))]


# Errors after which an idempotent producer's sequence numbers are no use: seen after a whole
# replicated cluster restarted (OutOfOrderSequenceNumber on every retry, forever). A producer
# with a new producer id is the way out; the batch is published again, which its readers
# already take (a result redelivered after a crash is the same record again).
FATAL_PRODUCER_ERRORS = (OutOfOrderSequenceNumber, UnknownProducerId, InvalidProducerEpoch, ProducerFenced)


class KafkaPublisher:
    """The Publisher port: a batch's records all in flight together, then the acks."""

    def __init__(self, settings: Settings, limits: TopicLimits) -> None:
        self.settings = settings
        self.limits = limits
        self.producer = self._new_producer()
        self.renewals = 0

    def _new_producer(self) -> AIOKafkaProducer:
        settings, limits = self.settings, self.limits
        return AIOKafkaProducer(
            **kafka_options(settings),
            enable_idempotence=True,
            acks="all",
            # A batch's records are all appended before the sender runs, so
            # lingering would only delay the acks the batch waits for.
            linger_ms=0,
            max_batch_size=256 * 1024,
            max_request_size=max(limits.results, limits.state_changes, limits.dead_letters),
            partitioner=keyed_partitioner,
            client_id="runstate-service",
        )

    async def _renew(self) -> None:
        """Replace the producer by a new one (a new producer id); the old one's sends are dropped."""
        old, self.producer = self.producer, self._new_producer()
        self.renewals += 1
        with contextlib.suppress(Exception):
            await asyncio.wait_for(old.stop(), 10)
        await start_client(self.producer, self.settings)

    async def start(self) -> None:
        await start_client(self.producer, self.settings)

    async def stop(self) -> None:
        await self.producer.stop()

    async def publish(self, outcome: BatchOutcome) -> None:
        try:
            await self._publish(outcome)
        except FATAL_PRODUCER_ERRORS as exc:
            log.error("the producer cannot go on (%s): starting a new one; the batch is published again",
                      type(exc).__name__)
            await self._renew()
            raise

    async def _publish(self, outcome: BatchOutcome) -> None:
        s = self.settings
        version = [(SCHEMA_VERSION_HEADER, SCHEMA_VERSION_BYTES)]
        # Results and state changes go as one record batch per partition (send_batch): one
        # future a partition instead of one a record, about half the publish's CPU per command.
        batches = _PartitionBatches(self.producer)
        for p in outcome.results:
            await batches.add(s.result_topic, p.key, p.value.encode(),
                              version if p.trace_headers is None else version + p.trace_headers)
        for p in outcome.state_changes:
            await batches.add(s.state_change_topic, p.key, p.value.encode(), version)
        sends = await batches.send()
        send = self.producer.send
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


class _PartitionBatches:
    """A publish's keyed records as record batches, one open batch per topic partition, in the
    order they were added (a partition's records keep their order, as with send()). The
    partition is the one send() would choose (keyed_partitioner), so readers see no difference."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer
        self.open: dict[tuple[str, int], BatchBuilder] = {}
        self.partitions: dict[str, list[int]] = {}
        self.sends: list[asyncio.Future[Any]] = []

    async def add(self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        partitions = self.partitions.get(topic)
        if partitions is None:
            partitions = self.partitions[topic] = sorted(await self.producer.partitions_for(topic))
        # An unkeyed record (the answer to a bad record whose key cannot be echoed) gets a
        # random partition, as send() gives it, and waits in that partition's batch like the
        # rest: sent on its own it would overtake the answers decided before it.
        where = (topic, keyed_partitioner(key, partitions, partitions))
        batch = self.open.get(where)
        if batch is None:
            batch = self.open[where] = self.producer.create_batch()
        if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
            # Full: it goes now, and the record starts the partition's next batch (a batch takes
            # its first record whatever its size; the topics' limits were checked at decision).
            self.sends.append(await self.producer.send_batch(batch, where[0], partition=where[1]))
            batch = self.open[where] = self.producer.create_batch()
            batch.append(key=key, value=value, timestamp=None, headers=headers)

    async def send(self) -> list[asyncio.Future[Any]]:
        """Every open batch handed to the producer; their futures, with those of the full ones."""
        for (topic, partition), batch in self.open.items():
            self.sends.append(await self.producer.send_batch(batch, topic, partition=partition))
        self.open.clear()
        return self.sends
