"""The consumer's HTTP port: /metrics (Prometheus), /health (alive) and /ready
(in its group, the database answers, no outage, the producer started), as
routes of FastStream's ASGI app (pipeline/app.py mounts them)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer
from faststream.asgi import AsgiResponse, get
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from runstate.database_urls import libpq_dsn
from runstate.obs.metrics import ConsumerMetrics
from runstate.pipeline.service import OrchestrationService

log = logging.getLogger("runstate.obs")

# A probe answers within a kubelet's default timeout (1 s) even when a check hangs.
CHECK_TIMEOUT_S = 0.8


class ConsumerProbes:
    """What /ready and /metrics read: the service, its Kafka consumers, and a
    connection of the probe's own (the batch pool's are busy with batches)."""

    def __init__(self, service: OrchestrationService, metrics: ConsumerMetrics,
                 consumers: Callable[[], Sequence[AIOKafkaConsumer | None]]) -> None:
        self.service = service
        self.metrics = metrics
        self.consumers = consumers
        self.dsn = libpq_dsn(service.settings.database_url)
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()

    async def database_answers(self) -> bool:
        async with self._lock:
            try:
                async with asyncio.timeout(CHECK_TIMEOUT_S):
                    if self._conn is None or self._conn.closed:
                        self._conn = await psycopg.AsyncConnection.connect(
                            self.dsn, autocommit=True, connect_timeout=2, application_name="runstate-probe")
                    await self._conn.execute("SELECT 1")
                return True
            except (TimeoutError, psycopg.Error, OSError):
                await self._drop()
                return False

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # a broken connection is dropped either way
                await conn.close()

    def in_group(self) -> bool:
        """Every lane's consumer is started: it holds partitions or waits for them."""
        consumers = list(self.consumers())
        return bool(consumers) and all(c is not None and not c._closed for c in consumers)  # noqa: SLF001

    def producer_started(self) -> bool:
        producer = getattr(self.service.publisher, "producer", None)
        return producer is not None and producer._closed is False  # noqa: SLF001

    async def checks(self) -> dict[str, bool]:
        return {
            "consumer_group": self.in_group(),
            "database": await self.database_answers(),
            "no_outage": self.service.outage is None,
            "producer": self.producer_started(),
        }

    async def lags(self) -> list[tuple[int, int]]:
        found: list[tuple[int, int]] = []
        for consumer in self.consumers():
            if consumer is None:
                continue
            tps = sorted(consumer.assignment())
            if not tps:
                continue
            ends = await consumer.end_offsets(tps)
            for tp in tps:
                found.append((tp.partition, max(ends[tp] - await consumer.position(tp), 0)))
        return found

    async def exposition(self) -> bytes:
        self.metrics.before_scrape()
        pool = getattr(self.service.store, "pool", None)
        if pool is not None:
            self.metrics.sample_pool(pool.get_stats())
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                self.metrics.sample_lag(await self.lags())
        except Exception as exc:  # noqa: BLE001 - the broker not answering: the last sample stays
            log.debug("consumer lag not sampled: %s", exc)
        return generate_latest(self.metrics.registry)

    async def close(self) -> None:
        await self._drop()

    def routes(self, *, metrics: bool = True) -> list[tuple[str, Any]]:
        """/health and /ready, and /metrics unless metrics are off."""
        @get(include_in_schema=False)
        async def health(scope: Any) -> AsgiResponse:
            return AsgiResponse(b'{"status":"alive"}', 200, headers={"content-type": "application/json"})

        @get(include_in_schema=False)
        async def ready(scope: Any) -> AsgiResponse:
            checks = await self.checks()
            ok = all(checks.values())
            body = json.dumps({"ready": ok, "checks": checks}).encode()
            return AsgiResponse(body, 200 if ok else 503, headers={"content-type": "application/json"})

        @get(include_in_schema=False)
        async def exposition(scope: Any) -> AsgiResponse:
            return AsgiResponse(await self.exposition(), 200, headers={"content-type": CONTENT_TYPE_LATEST})

        return [("/health", health), ("/ready", ready), *([("/metrics", exposition)] if metrics else [])]
