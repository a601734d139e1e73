"""Fault scenarios of the replicated stack (RUNSTATE_STACK=replicated): a private three-node
Kafka cluster and a PostgreSQL primary with a synchronous standby (deploy/stack cluster.py,
standby.py), failures a single node cannot survive, under load, through the same checker as
test_scenarios.py (every command answered, 0 lost, 0 duplicated, 0 forked, final states equal
the reference).

- leader-failover: SIGKILL of the broker leading the most partitions of the command and
  result topics, three times, restarted in between; then a broker frozen (SIGSTOP) past its
  session timeout and woken (SIGCONT).
- rolling-restart: each broker restarted in turn (SIGTERM), the next one once every partition
  is fully replicated again.
- postgres-failover: SIGKILL of the primary, the standby promoted, a new standby rebuilt from
  it (pg_basebackup); then the same the other way.

Skipped unless RUNSTATE_STACK=replicated: the single stack has no replica to fail over to."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter

import pytest
from aiokafka import AIOKafkaConsumer

from pipeline.harness import isolated_settings
from runstate.config import Settings
from runstate.kafka_security import kafka_options

from .infra import PrivateStack
from .test_scenarios import assert_clean, run_scenario, wait_until

pytestmark = [
    pytest.mark.faults, pytest.mark.kafka, pytest.mark.postgres,
    pytest.mark.skipif(os.environ.get("RUNSTATE_STACK", "").strip().lower() != "replicated",
                       reason="replicated-stack scenarios: run with RUNSTATE_STACK=replicated "
                              "(a single Kafka node and PostgreSQL server have nothing to fail over to)"),
]

# Longer than the brokers' session timeout (cluster.py: broker.session.timeout.ms=6000).
FREEZE_S = 12.0


@pytest.fixture(scope="module")
def replicated_stack():
    stack = PrivateStack().start()
    try:
        assert stack.replicated, "RUNSTATE_STACK=replicated but the private stack is not"
        yield stack
    finally:
        stack.stop()


async def _metadata(settings: Settings, topics: list[str]) -> dict[str, dict]:
    """topic -> partition -> PartitionMetadata (leader, replicas, isr), from a new client: one
    that last spoke to a dead broker would not fail over by itself."""
    consumer = AIOKafkaConsumer(**kafka_options(settings), enable_auto_commit=False, request_timeout_ms=10000)
    await consumer.start()
    try:
        for t in topics:
            consumer._client.add_topic(t)  # noqa: SLF001
        await consumer._client.force_metadata_update()  # noqa: SLF001
        cluster = consumer._client.cluster  # noqa: SLF001
        return {t: dict(cluster._partitions.get(t, {})) for t in topics}  # noqa: SLF001
    finally:
        await consumer.stop()


async def busiest_leader(settings: Settings) -> tuple[str, int]:
    """(node name, partitions led) of the broker leading the most partitions of the command and
    result topics."""
    for _ in range(30):
        with contextlib.suppress(Exception):
            meta = await _metadata(settings, [settings.command_topic, settings.result_topic])
            leaders = Counter(p.leader for parts in meta.values() for p in parts.values() if p.leader >= 0)
            if leaders:
                node, led = leaders.most_common(1)[0]
                return f"kafka-{node}", led
        await asyncio.sleep(1)
    raise RuntimeError("no partition leader found in the metadata")


async def wait_fully_replicated(settings: Settings, done: asyncio.Event, timeout: float = 180.0) -> bool:
    """Until every partition of the scenario's topics has all its replicas in sync again."""
    topics = [settings.command_topic, settings.result_topic, settings.state_change_topic]
    deadline = time.monotonic() + timeout
    while not done.is_set() and time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            meta = await _metadata(settings, topics)
            parts = [p for ps in meta.values() for p in ps.values()]
            if parts and all(len(p.isr) == len(p.replicas) for p in parts):
                return True
        await asyncio.sleep(1)
    return False


def _scenario_settings(stack: PrivateStack) -> Settings:
    settings = isolated_settings(stack.settings(), partitions=6, max_batch=100)
    assert settings.topic_replication_factor == 3 and settings.topic_min_insync_replicas == 2, settings
    return settings


# --------------------------------------------------------------------------- leader failover


async def test_leader_failover(replicated_stack, scale, tmp_path, publish_report):
    """The broker leading the most partitions of the command and result topics is SIGKILLed
    three times under load (and started again a few seconds later), then a broker is frozen
    past its session timeout: its partitions are led elsewhere, the producers and consumers
    follow the new leaders, acks=all with min ISR 2 means no acknowledged record was on the dead
    broker alone."""
    stack = replicated_stack
    settings = _scenario_settings(stack)
    kills = 3

    async def faults_task(fleet, reader, faults, done):
        # One after the other from 10 % on: a node's restart takes 20-30 s on a busy 2-core
        # machine, so the load is spread over a duration that outlasts them all.
        if not await wait_until(lambda: reader.count >= 0.1 * scale.commands, done):
            return
        for _ in range(kills):
            if done.is_set():
                return
            name, led = await busiest_leader(settings)
            t0 = time.monotonic()
            await asyncio.to_thread(stack.stack.kill, name)
            await asyncio.sleep(5.0)
            await asyncio.to_thread(stack.stack.start_again, name)
            faults.add(f"SIGKILL {name} leading {led} partitions (back in {time.monotonic() - t0:.0f}s)")
            await wait_fully_replicated(settings, done)
        if done.is_set():
            return
        name, led = await busiest_leader(settings)
        pid = stack.stack.pid(name)
        assert pid is not None
        os.killpg(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(FREEZE_S)
        finally:
            os.killpg(pid, signal.SIGCONT)
        faults.add(f"SIGSTOP {name} {FREEZE_S:.0f}s leading {led} partitions")

    report = await run_scenario("leader-failover", settings, scale, tmp_path, consumers=2, fault_task=faults_task,
                                duration=scale.pick(180, 300), timeout=scale.pick(900, 1800))
    publish_report(report)
    assert_clean(report)
    assert report.faults == kills + 1, report.fault_detail


# --------------------------------------------------------------------------- rolling restart


async def test_rolling_restart(replicated_stack, scale, tmp_path, publish_report):
    """Each broker is restarted in turn (SIGTERM: a controlled shutdown moves its leaderships
    first) under load, the next once every partition is fully replicated again."""
    stack = replicated_stack
    settings = _scenario_settings(stack)
    nodes = stack.kafka_nodes()

    async def faults_task(fleet, reader, faults, done):
        if not await wait_until(lambda: reader.count >= 0.1 * scale.commands, done):
            return
        for name in nodes:
            if done.is_set():
                return
            took = await asyncio.to_thread(stack.stack.restart, name)
            faults.add(f"restart {name} ({took:.0f}s)")
            await wait_fully_replicated(settings, done)

    report = await run_scenario("rolling-restart", settings, scale, tmp_path, consumers=2, fault_task=faults_task,
                                duration=scale.pick(150, 240), timeout=scale.pick(900, 1800))
    publish_report(report)
    assert_clean(report)
    assert report.faults == len(nodes), report.fault_detail


# --------------------------------------------------------------------------- PostgreSQL failover


async def test_postgres_failover(replicated_stack, scale, tmp_path, publish_report):
    """The primary is SIGKILLed under load, the synchronous standby promoted, a new standby
    rebuilt from it with pg_basebackup; later the same the other way. The consumers find the
    new primary through the multi-host URL (target_session_attrs=read-write); a batch whose
    COMMIT was cut off is retried, recognised by its source offsets if it had committed."""
    stack = replicated_stack
    settings = _scenario_settings(stack)
    points = (0.25, 0.6)

    async def faults_task(fleet, reader, faults, done):
        for at in points:
            if not await wait_until(lambda at=at: reader.count >= at * scale.commands, done):
                return
            old = stack.postgres_primary()
            new = next(n for n in stack.stack.server_names() if n.startswith("postgres-") and n != old)
            t0 = time.monotonic()
            await asyncio.to_thread(stack.stack.kill, old)
            promoted = await asyncio.to_thread(stack.stack.server(new).promote, stack.stack.apt_log)
            rebuilt = await asyncio.to_thread(stack.stack.start_again, old)
            faults.add(f"SIGKILL primary {old}, {new} promoted in {promoted:.1f}s, {old} rebuilt as its "
                       f"standby in {rebuilt:.0f}s (total {time.monotonic() - t0:.0f}s)")

    report = await run_scenario("postgres-failover", settings, scale, tmp_path, consumers=2,
                                fault_task=faults_task, duration=scale.pick(60, 150), timeout=scale.pick(600, 1800))
    publish_report(report)
    assert_clean(report)
    assert report.faults == len(points), report.fault_detail
    assert report.dead_lettered == 0, f"{report.dead_lettered} valid commands dead-lettered during the failover"
