"""The service's producer remembers each key's partition; it must be the partition every
other producer of runstate's topics (backfill, clients: the default murmur2 partitioner)
picks, or a run's messages would be split across partitions and lose their order."""

from __future__ import annotations

import uuid

from aiokafka.partitioner import DefaultPartitioner

from runstate.pipeline.kafka import keyed_partitioner


def test_keyed_partitioner_agrees_with_the_default_partitioner():
    default = DefaultPartitioner()
    for count in (1, 3, 12, 50):
        partitions = list(range(count))
        for _ in range(2000):
            key = str(uuid.uuid4()).encode()
            assert keyed_partitioner(key, partitions, partitions) == default(key, partitions, partitions)
            assert keyed_partitioner(key, partitions, partitions[:1]) == default(key, partitions, partitions[:1])
