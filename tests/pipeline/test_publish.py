"""The service's publisher on the real broker: a batch's results and state changes go as record
batches per partition, and land where send() (the default murmur2 partitioner) would put them,
in the order they were decided, with their headers, however many batches a partition needs."""

from __future__ import annotations

import uuid
from collections import defaultdict

from aiokafka.partitioner import DefaultPartitioner
from tests.pipeline.harness import isolated_settings, read_all

from runstate.messages import SCHEMA_VERSION_HEADER
from runstate.pipeline.kafka import KafkaPublisher, ensure_topics
from runstate.pipeline.ports import BatchOutcome, Publication


async def _published(settings, outcome: BatchOutcome, *, max_batch_size: int | None = None) -> None:
    publisher = KafkaPublisher(settings, await ensure_topics(settings))
    if max_batch_size is not None:  # a small batch size: a partition's records take several batches
        publisher.producer._message_accumulator._batch_size = max_batch_size  # noqa: SLF001
    await publisher.start()
    try:
        await publisher.publish(outcome)
    finally:
        await publisher.stop()


def _outcome(runs: int, per_run: int) -> tuple[BatchOutcome, list[bytes]]:
    out, keys = BatchOutcome(), [str(uuid.uuid4()).encode() for _ in range(runs)]
    for i in range(per_run):
        for k, key in enumerate(keys):
            out.results.append(Publication(key, f'{{"run":{k},"n":{i},"pad":"{"x" * 300}"}}',
                                           [("traceparent", b"00-%d" % i)] if i % 2 else None))
            out.state_changes.append(Publication(key, f'{{"run":{k},"n":{i}}}'))
    out.results.append(Publication(None, '{"unkeyed":true}'))  # a bad record without a key gets an answer too
    return out, keys


async def _check(settings, outcome: BatchOutcome, keys: list[bytes]) -> None:
    default = DefaultPartitioner()
    for topic, sent in ((settings.result_topic, outcome.results), (settings.state_change_topic, outcome.state_changes)):
        records = await read_all(settings, topic)
        assert len(records) == len(sent)
        by_key: dict[bytes | None, list] = defaultdict(list)
        for r in sorted(records, key=lambda r: (r.partition, r.offset)):
            by_key[r.key].append(r)
        partitions = list(range(settings.partitions))
        for key in keys:
            got = by_key[key]
            assert {r.partition for r in got} == {default(key, partitions, partitions)}
            expected = [p for p in sent if p.key == key]
            assert [r.value.decode() for r in got] == [p.value for p in expected], "a run's records keep their order"
            for r, p in zip(got, expected, strict=True):
                headers = dict(r.headers)
                assert headers[SCHEMA_VERSION_HEADER] == b"1"
                assert headers.get("traceparent") == (None if p.trace_headers is None else p.trace_headers[0][1])


async def test_a_batch_lands_on_each_runs_partition_in_order_with_its_headers(base_settings):
    settings = isolated_settings(base_settings, partitions=5)
    outcome, keys = _outcome(runs=40, per_run=3)
    await _published(settings, outcome)
    await _check(settings, outcome, keys)


async def test_a_partition_whose_records_fill_several_batches_keeps_their_order(base_settings):
    settings = isolated_settings(base_settings, partitions=2)
    outcome, keys = _outcome(runs=6, per_run=40)
    await _published(settings, outcome, max_batch_size=2048)
    await _check(settings, outcome, keys)


async def test_an_unkeyed_answer_keeps_its_place_among_its_partitions_records(base_settings):
    # A bad record whose key cannot be echoed is answered without a key; on a one-partition
    # topic its answer must come after the answers decided before it, not jump the queue.
    settings = isolated_settings(base_settings, partitions=1)
    key = str(uuid.uuid4()).encode()
    outcome = BatchOutcome()
    for i in range(3):
        outcome.results.append(Publication(key, f'{{"n":{i}}}'))
    outcome.results.append(Publication(None, '{"n":3}'))
    outcome.results.append(Publication(key, '{"n":4}'))
    await _published(settings, outcome)
    records = await read_all(settings, settings.result_topic)
    assert [r.value.decode() for r in sorted(records, key=lambda r: r.offset)] == [p.value for p in outcome.results]
