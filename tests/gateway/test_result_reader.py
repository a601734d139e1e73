"""The gateway's reader of the result topic: no record stops it, and /ready says
whether it runs (while /health stays open)."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2

from pipeline.harness import InProcessService, isolated_settings
from runstate.gateway import create_app
from runstate.kafka_security import kafka_options

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

HOSTILE = [
    None,
    b"",
    b"\xff\xfe",
    b"{",
    b"[" * 50_000,
    ("[" * 3_000 + "]" * 3_000).encode(),
    b'{"command_id": "not-a-uuid"}',
    b'{"command_id": "' + str(uuid.uuid4()).encode() + b'", "command_kind": "x", "stream_id": null, "seq": NaN}',
    b"y" * 800_000,
]


async def produce_everywhere(settings, partitions: int) -> None:
    producer = AIOKafkaProducer(**kafka_options(settings), max_request_size=2_000_000)
    await producer.start()
    try:
        sent = [await producer.send(settings.result_topic, value, key=b"forged", partition=p)
                for p in range(partitions) for value in HOSTILE]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


def one_run_per_partition(partitions: int) -> list[uuid.UUID]:
    runs: dict[int, uuid.UUID] = {}
    while len(runs) < partitions:
        run_id = uuid.uuid4()
        runs.setdefault((murmur2(str(run_id).encode()) & 0x7FFFFFFF) % partitions, run_id)
    return list(runs.values())


async def test_hostile_records_on_the_result_topic_do_not_stop_the_gateway(http, gateway):
    runs = one_run_per_partition(gateway.settings.partitions)
    for run_id in runs:  # every result partition is being read from here on
        created = await http.post("/task_runs/", json={"id": str(run_id), "task_key": "k", "dynamic_key": str(run_id)})
        assert created.status_code == 201, created.text
    await produce_everywhere(gateway.settings, gateway.settings.partitions)
    for run_id in runs:
        answer = await http.post(f"/task_runs/{run_id}/set_state", json={"state": {"type": "RUNNING"}})
        assert answer.status_code == 201, answer.text
    assert (await http.get("/ready")).json() == {"message": "OK"}


async def test_ready_is_503_while_the_reader_is_dead_and_requests_fail_fast(base_settings):
    settings = isolated_settings(base_settings)
    app = create_app(settings, result_timeout=120)
    async with InProcessService(settings), app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway/api", timeout=60
    ) as http:
        assert (await http.get("/ready")).status_code == 200
        run = (await http.post("/task_runs/", json={"task_key": "k", "dynamic_key": "d"})).json()

        bus = app.state.gateway.bus
        await bus._consumer.stop()  # noqa: SLF001 - the reader's next fetch fails for good
        while bus.reader_alive:
            await asyncio.sleep(0.05)

        ready = await http.get("/ready")
        assert (ready.status_code, ready.json()) == (503, {"message": "The result reader is not running"})
        assert (await http.get("/health")).json() is True
        # Answered at once, not after the 120 s result timeout.
        late = await http.post(f"/task_runs/{run['id']}/set_state", json={"state": {"type": "RUNNING"}})
        assert late.status_code == 503
        assert "result reader" in late.json()["exception_message"]
        assert bus.pending == 0
