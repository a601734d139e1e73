"""Helpers for tests that run the real pipeline: isolated topic names per test,
the service in-process or as a separate OS process, and topic readers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from pydantic import SecretStr

from runstate.config import Settings
from runstate.kafka_security import kafka_options
from runstate.pipeline.app import build_app
from runstate.pipeline.kafka import ensure_topics

REPO = Path(__file__).resolve().parents[2]


def isolated_settings(base: Settings, partitions: int = 4, **overrides: Any) -> Settings:
    """Fresh topics and consumer group, so tests never see each other's records."""
    token = uuid.uuid4().hex[:10]
    return base.replace(
        command_topic=f"t{token}.commands",
        result_topic=f"t{token}.results",
        state_change_topic=f"t{token}.state-changes",
        dead_letter_topic=f"t{token}.dead-letter",
        consumer_group=f"g{token}",
        partitions=partitions,
        **overrides,
    )


def settings_env(settings: Settings) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "DATABASE_URL": settings.database_url.get_secret_value(),
        "RUNSTATE_ADMIN_DATABASE_URL": settings.admin_database_url.get_secret_value(),
        "RUNSTATE_COMMAND_TOPIC": settings.command_topic,
        "RUNSTATE_RESULT_TOPIC": settings.result_topic,
        "RUNSTATE_STATE_CHANGE_TOPIC": settings.state_change_topic,
        "RUNSTATE_DEAD_LETTER_TOPIC": settings.dead_letter_topic,
        "RUNSTATE_PARTITIONS": str(settings.partitions),
        "RUNSTATE_CONSUMER_GROUP": settings.consumer_group,
        "RUNSTATE_MAX_BATCH": str(settings.max_batch),
        # The topics' durability: a replicated cluster's, not whatever the caller's environment says.
        "RUNSTATE_TOPIC_REPLICATION_FACTOR": str(settings.topic_replication_factor),
        "RUNSTATE_TOPIC_MIN_INSYNC_REPLICAS": str(settings.topic_min_insync_replicas),
        **kafka_security_env(settings),
    }


def kafka_security_env(settings: Settings) -> dict[str, str]:
    """The RUNSTATE_KAFKA_* settings that are set, as a child process reads them."""
    env = {}
    for name, var in Settings.variables().items():
        value = getattr(settings, name)
        if var.startswith("RUNSTATE_KAFKA_") and value is not None:
            env[var] = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
    return env


class InProcessService:
    """The FastStream app started in this event loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = build_app(settings)

    @property
    def stats(self):
        return self.app.state_service  # type: ignore[attr-defined]

    async def __aenter__(self) -> InProcessService:
        await ensure_topics(self.settings)
        await self.app.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.app.stop()


class ServiceProcess:
    """`runstate serve` as a child process, so it can be SIGKILLed or paused."""

    def __init__(self, settings: Settings, log_path: Path, **extra_env: str) -> None:
        self.settings = settings
        self.log_path = log_path
        self.env = {**os.environ, **settings_env(settings), **extra_env}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - the child process writes to it after this returns
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runstate.cli", "serve", "--log-level", "WARNING"],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                # A clean stop (spans and offsets flushed) can take long on a loaded machine.
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


async def produce(settings: Settings, records: list[tuple[bytes | None, bytes]]) -> None:
    # The broker makes no topic by itself (auto.create.topics.enable=false), and a test may
    # produce before the service it starts has made them.
    await ensure_topics(settings)
    producer = AIOKafkaProducer(**kafka_options(settings), enable_idempotence=True)
    await producer.start()
    try:
        futures = [await producer.send(settings.command_topic, value, key=key) for key, value in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def read_topic(settings: Settings, topic: str, count: int, timeout: float = 120.0) -> list[Any]:
    """Read at least `count` records of a topic from its beginning (all partitions); `timeout`
    only bounds a failing test (the reading stops at `count`), so it is generous for slow machines."""
    consumer = AIOKafkaConsumer(**kafka_options(settings), enable_auto_commit=False)
    await consumer.start()
    try:
        for _ in range(100):
            parts = consumer.partitions_for_topic(topic)
            if parts:
                break
            await consumer._client.force_metadata_update()  # noqa: SLF001
            await asyncio.sleep(0.1)
        tps = [TopicPartition(topic, p) for p in sorted(parts or [])]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[Any] = []
        deadline = asyncio.get_running_loop().time() + timeout
        while len(records) < count and asyncio.get_running_loop().time() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for recs in batch.values():
                records.extend(recs)
        return records
    finally:
        await consumer.stop()


async def read_all(settings: Settings, topic: str) -> list[Any]:
    """Every record the topic holds now (up to its end offsets), from all partitions."""
    consumer = AIOKafkaConsumer(**kafka_options(settings), enable_auto_commit=False)
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic)
        for _ in range(100):
            if parts:
                break
            await consumer._client.force_metadata_update()  # noqa: SLF001
            await asyncio.sleep(0.1)
            parts = consumer.partitions_for_topic(topic)
        tps = [TopicPartition(topic, p) for p in sorted(parts or [])]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        records: list[Any] = []
        while True:
            positions = [await consumer.position(tp) for tp in tps]
            if all(pos >= ends[tp] for pos, tp in zip(positions, tps, strict=False)):
                return records
            for recs in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(recs)
    finally:
        await consumer.stop()
