"""aiokafka against the real broker: a 12-partition topic, keyed produce and group consume.

Keyed messages must land in the partition that the Java client's default partitioner picks
(murmur2 of the key, positive, modulo the partition count), because producers in other
languages must agree with ours on where a task run's commands go."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import DefaultPartitioner, murmur2

from runstate.config import WorkerSettings
from runstate.kafka_security import KafkaOptions, kafka_options

pytestmark = pytest.mark.kafka

PARTITIONS = 12
KEYS = [str(uuid.uuid5(uuid.NAMESPACE_URL, f"runstate-infra-task-run-{i}")).encode() for i in range(96)]

# org.apache.kafka.common.utils.UtilsTest#testMurmur2 (the Java client's own vectors).
JAVA_MURMUR2 = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


def login(bootstrap: str) -> KafkaOptions:
    """The connection the tests' settings give (the service principal's on the secured stack)."""
    return kafka_options(WorkerSettings.load(kafka_bootstrap_servers=bootstrap))


def expected_partition(key: bytes, partitions: int = PARTITIONS) -> int:
    """Java's Utils.toPositive(Utils.murmur2(key)) % numPartitions."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def test_murmur2_matches_the_java_client() -> None:
    for data, java_value in JAVA_MURMUR2.items():
        unsigned = murmur2(data)
        assert (unsigned - 2**32 if unsigned >= 2**31 else unsigned) == java_value, data
    all_partitions = list(range(PARTITIONS))
    for key in KEYS:
        assert DefaultPartitioner()(key, all_partitions, all_partitions) == expected_partition(key)


@pytest.fixture
async def topic(kafka_bootstrap: str):
    name = f"runstate.infra.{uuid.uuid4().hex[:12]}"
    admin = AIOKafkaAdminClient(**login(kafka_bootstrap))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name=name, num_partitions=PARTITIONS, replication_factor=1)])
        yield name
    finally:
        try:
            await admin.delete_topics([name])
        finally:
            await admin.close()


async def test_keyed_messages_land_in_the_partition_the_key_selects(kafka_bootstrap: str, topic: str) -> None:
    producer = AIOKafkaProducer(**login(kafka_bootstrap), enable_idempotence=True, acks="all")
    await producer.start()
    sent: dict[tuple[bytes, bytes], int] = {}
    try:
        assert len(await producer.partitions_for(topic)) == PARTITIONS
        for round_ in (b"first", b"second"):  # the same key twice -> the same partition
            for key in KEYS:
                meta = await producer.send_and_wait(topic, key=key, value=round_ + b":" + key)
                assert meta.topic == topic
                assert meta.partition == expected_partition(key), key
                sent[(key, round_)] = meta.partition
    finally:
        await producer.stop()
    for key in KEYS:
        assert sent[(key, b"first")] == sent[(key, b"second")]
    # 96 fixed keys spread over every partition: the test exercises all 12 of them
    assert set(sent.values()) == set(range(PARTITIONS))

    consumer = AIOKafkaConsumer(topic, **login(kafka_bootstrap), group_id=f"infra-{uuid.uuid4().hex[:8]}",
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    received: list = []
    try:
        deadline = time.monotonic() + 120
        while len(received) < len(sent) and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=1000)
            for records in batches.values():
                received.extend(records)
        await consumer.commit()
    finally:
        await consumer.stop()

    assert len(received) == len(sent), f"consumed {len(received)} of {len(sent)} records"
    order: dict[bytes, list[bytes]] = {}
    for record in received:
        assert record.partition == expected_partition(record.key), record
        assert record.value.endswith(b":" + record.key)
        order.setdefault(record.key, []).append(record.value.split(b":", 1)[0])
    # per key (so per partition) the log keeps the produce order
    assert all(values == [b"first", b"second"] for values in order.values())


async def test_broker_answers_metadata(kafka_bootstrap: str) -> None:
    admin = AIOKafkaAdminClient(**login(kafka_bootstrap))
    await admin.start()
    try:
        cluster = await asyncio.wait_for(admin.describe_cluster(), 60)
        assert len(cluster["brokers"]) >= 1
    finally:
        await admin.close()
