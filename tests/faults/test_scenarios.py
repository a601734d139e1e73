"""Fault-injection scenarios: a workload of many runs from concurrent workers
through real consumer processes, Kafka and PostgreSQL, one kind of fault per
scenario, then the checker (checker.py) against the fault-free reference.

The append-only guarantee of the log (the service's role cannot UPDATE, DELETE
or TRUNCATE events) is shown by tests/pipeline/test_pipeline.py::
test_service_role_cannot_rewrite_the_log.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from psycopg import sql

from obs.test_consumer_http import wait_for
from pipeline.harness import isolated_settings
from runstate.config import Settings
from runstate.database_urls import parse as parse_url
from runstate.kafka_security import kafka_options
from runstate.pipeline.faults import POINTS
from runstate.pipeline.kafka import ensure_topics
from stack.ports import free_port

from .checker import Report, check, pg_dsn
from .driver import (
    Fleet,
    GroupWatch,
    ResultReader,
    Sent,
    lanes_of,
    make_producer,
    process_state,
    send_closed_loop,
    send_open_loop,
    wait_answered,
)
from .infra import PrivateStack
from .workload import Reference, Workload, generate, reference

pytestmark = [pytest.mark.faults, pytest.mark.kafka, pytest.mark.postgres]

WORKERS = 8


@dataclass
class Faults:
    """What a scenario's fault task did, for the report."""

    count: int = 0
    detail: Counter = field(default_factory=Counter)

    def add(self, what: str, n: int = 1) -> None:
        self.count += n
        self.detail[what] += n


def seed_tags(settings: Settings, workload: Workload) -> None:
    with psycopg.connect(pg_dsn(settings.database_url), autocommit=True) as conn:
        for tag, limit in workload.tag_limits.items():
            conn.execute('INSERT INTO tag_concurrency_limits (tag, "limit") VALUES (%s, %s)', (tag, limit))


async def run_scenario(
    name: str,
    settings: Settings,
    scale,
    logdir: Path,
    *,
    consumers: int,
    fault_task,
    plan=None,
    closed_loop: bool = False,
    timeout: float | None = None,
    commands: int | None = None,
    duration: float = 0.0,
    producer_timeout_ms: int = 60000,
) -> Report:
    """Send the workload (phase 1, then phase 2 once phase 1 is answered),
    spread over about `duration` seconds, while
    `fault_task(fleet, reader, faults, done)` injects faults, wait until every
    command is answered, stop everything, check."""
    t0 = time.monotonic()
    workload = generate(scale.seed, commands or scale.commands, duplicate_rate=0.0 if closed_loop else 0.02)
    ref = reference(workload)
    await ensure_topics(settings)
    seed_tags(settings, workload)
    timeout = timeout or scale.pick(240.0, 1500.0)
    faults = Faults()
    fleet = Fleet(settings, logdir, consumers, plan)
    reader = await ResultReader(settings).start()
    producer = await make_producer(settings, producer_timeout_ms)
    watch = await GroupWatch(settings).start()
    done = asyncio.Event()
    sent = Sent()
    tasks: list[asyncio.Task] = []
    unanswered = None
    try:
        fleet.start_all()
        tasks.append(asyncio.create_task(fleet.supervise(done)))
        tasks.append(asyncio.create_task(fault_task(fleet, reader, faults, done)))
        for phase in (1, 2):
            share = duration * sum(len(r.commands) for r in workload.phase(phase)) / len(workload.commands)
            if closed_loop:
                concurrency = scale.pick(50, 300)
                await send_closed_loop(producer, settings, reader, workload.phase(phase), sent,
                                       concurrency=concurrency, timeout=1.5, seed=scale.seed + phase,
                                       think=concurrency * share / len(workload.commands))
            else:
                await send_open_loop(producer, settings, lanes_of(workload, phase, WORKERS, scale.seed), sent,
                                     duration=share)
            unanswered = await wait_answered(reader, watch, sent.commands, timeout - (time.monotonic() - t0))
            if unanswered:
                break
    finally:
        done.set()
        for task in tasks:
            try:
                await asyncio.wait_for(task, 60)
            except Exception as exc:  # noqa: BLE001 - report, the checker decides
                print(f"{name}: background task ended with {exc!r}")
        fleet.restart = False
        fleet.stop_all()
        await producer.stop()
        await reader.stop()
        await watch.stop()
    report = await check(name, settings, sent.commands, ref, tags=list(workload.tag_limits))
    report.faults = faults.count
    if unanswered:
        report.problems.insert(0, f"gave up waiting: {unanswered}")
    if sent.timeouts:
        faults.detail["worker timeouts (retried)"] = sent.timeouts
    deaths = Counter(code for _, code, _ in fleet.deaths)
    if deaths:
        faults.detail.update({f"consumer exits {code}": n for code, n in deaths.items()})
    report.fault_detail = ", ".join(f"{k}={v}" for k, v in faults.detail.items())
    report.seconds = time.monotonic() - t0
    return report


def assert_clean(report: Report) -> None:
    assert report.ok, "\n".join([report.line(), *report.problems])
    assert report.lost == report.duplicated == report.forked == 0


async def wait_until(predicate, done: asyncio.Event, poll: float = 0.1) -> bool:
    while not done.is_set():
        if predicate():
            return True
        await asyncio.sleep(poll)
    return False


def progress(reader: ResultReader, total: int) -> float:
    return reader.count / max(total, 1)


# --------------------------------------------------------------------------- 1. SIGKILL at crash points


async def test_sigkill_consumers_at_every_crash_point(base_settings, scale, tmp_path, publish_report):
    """Two consumers; each incarnation is told to SIGKILL itself at one of the
    crash points (inside the DB transaction before its commit, between the DB
    commit and the publish, between the publish acks and the offset commit)
    after a random number of batches; plus SIGKILLs from outside at random
    moments (mid-batch). Dead members are restarted."""
    settings = isolated_settings(base_settings, partitions=6, max_batch=100)
    rng = random.Random(scale.seed)
    per_point = scale.pick(2, 4)
    schedule = [p for p in POINTS for _ in range(per_point)]
    rng.shuffle(schedule)
    queue = list(schedule)

    def plan(slot: int, inc: int) -> dict[str, str]:
        if not queue:
            return {}
        return {"RUNSTATE_FAULT_POINT": queue.pop(), "RUNSTATE_FAULT_AFTER": str(rng.randint(1, 5))}

    async def faults_task(fleet: Fleet, reader: ResultReader, faults: Faults, done: asyncio.Event) -> None:
        outside = scale.pick(2, 5)
        while not done.is_set() and outside:
            await asyncio.sleep(rng.uniform(1.0, 4.0))
            slot = rng.randrange(len(fleet.members))
            if fleet.alive(slot) and time.monotonic() - fleet.members[slot].started > 3:  # type: ignore[union-attr]
                fleet.kill(slot)
                outside -= 1
                faults.add("SIGKILL from outside")
        await done.wait()
        fleet.check()
        # Deaths by SIGKILL not sent from outside are the crash points firing.
        faults.add("SIGKILL at a crash point", fleet.kills() - faults.detail["SIGKILL from outside"])

    report = await run_scenario("sigkill", settings, scale, tmp_path, consumers=2, fault_task=faults_task,
                                plan=plan, duration=scale.pick(20, 60))
    publish_report(report)
    assert_clean(report)
    assert report.faults >= len(POINTS), report.fault_detail


# --------------------------------------------------------------------------- 2./3. broker and database restarts


@pytest.fixture(scope="module")
def private_stack():
    stack = PrivateStack().start()
    try:
        yield stack
    finally:
        stack.stop()


async def test_kafka_broker_restart(private_stack, scale, tmp_path, publish_report):
    """The broker is restarted (SIGTERM; in the full run also SIGKILL) while two
    consumers work through the backlog."""
    base = private_stack.settings()
    settings = isolated_settings(base, partitions=6, max_batch=100)
    restarts = [(0.25, False), *scale.pick([], [(0.6, True)])]

    async def faults_task(fleet, reader, faults, done):
        for at, hard in restarts:
            if not await wait_until(lambda at=at: reader.count >= at * scale.commands, done):
                return
            took = await asyncio.to_thread(private_stack.restart_kafka, hard)
            faults.add(f"kafka restart ({'SIGKILL' if hard else 'SIGTERM'}, {took:.0f}s)")

    report = await run_scenario("kafka-restart", settings, scale, tmp_path, consumers=2, fault_task=faults_task,
                                duration=scale.pick(15, 45))
    publish_report(report)
    assert_clean(report)
    assert report.faults == len(restarts)


async def test_postgres_restart(private_stack, scale, tmp_path, publish_report):
    """PostgreSQL is restarted (fast shutdown; in the full run also a SIGKILL of
    the whole server, with crash recovery) while two consumers work."""
    base = private_stack.settings()
    settings = isolated_settings(base, partitions=6, max_batch=100)
    restarts = [(0.25, False, 0.0), *scale.pick([], [(0.5, True, 2.0), (0.75, False, 5.0)])]

    async def faults_task(fleet, reader, faults, done):
        for at, hard, down in restarts:
            if not await wait_until(lambda at=at: reader.count >= at * scale.commands, done):
                return
            took = await asyncio.to_thread(private_stack.restart_postgres, hard, down)
            faults.add(f"postgres restart ({'SIGKILL' if hard else 'SIGINT'}, {took:.0f}s)")

    report = await run_scenario("postgres-restart", settings, scale, tmp_path, consumers=2,
                                fault_task=faults_task, duration=scale.pick(15, 45))
    publish_report(report)
    assert_clean(report)
    assert report.faults == len(restarts)


# --------------------------------------------------------------------------- 4. zombie


async def test_sigstopped_consumer_wakes_after_its_partitions_moved(base_settings, scale, tmp_path,
                                                                    publish_report):
    """A consumer freezes itself (SIGSTOP) at a crash point: inside its DB
    transaction before the commit, after the commit before the publish, after
    the publish before the offset commit. It stays frozen longer than the
    session timeout (10 s), the group gives its partitions to the other member,
    then it is woken (SIGCONT) and finishes what it was doing."""
    settings = isolated_settings(base_settings, partitions=6, max_batch=100)
    points = list(scale.pick(["before_db_commit"], list(POINTS)))
    rng = random.Random(scale.seed)
    pause = 16.0

    def plan(slot: int, inc: int) -> dict[str, str]:
        if slot == 0 and inc < len(points):
            return {"RUNSTATE_FAULT_POINT": points[inc], "RUNSTATE_FAULT_SIGNAL": "SIGSTOP",
                    "RUNSTATE_FAULT_AFTER": str(rng.randint(1, 3))}
        return {}

    async def faults_task(fleet: Fleet, reader, faults, done):
        for i, point in enumerate(points):
            def stopped():
                return fleet.alive(0) and process_state(fleet.pid(0)) == "T"
            if not await wait_until(stopped, done, poll=0.05):
                return
            await asyncio.sleep(pause)
            fleet.kill(0, signal.SIGCONT)
            faults.add(f"SIGSTOP {pause:.0f}s at {point}")
            if i + 1 < len(points):
                await asyncio.sleep(3)
                fleet.leave(0)  # the next incarnation freezes at the next point
                fleet.join(0)

    report = await run_scenario("zombie", settings, scale, tmp_path, consumers=2, fault_task=faults_task,
                                plan=plan, duration=scale.pick(28, 90))
    publish_report(report)
    assert_clean(report)
    assert report.faults == len(points), report.fault_detail


# --------------------------------------------------------------------------- 5. rebalances


async def test_three_consumers_leaving_and_joining(base_settings, scale, tmp_path, publish_report):
    """Three consumers in one group; members leave (SIGTERM, a clean leave) and
    join again every few seconds, so partitions move back and forth while
    batches are in flight."""
    settings = isolated_settings(base_settings, partitions=6, max_batch=100)
    rng = random.Random(scale.seed)
    changes = scale.pick(6, 20)

    async def faults_task(fleet: Fleet, reader, faults, done):
        n = 0
        while not done.is_set() and n < changes:
            await asyncio.sleep(rng.uniform(1.5, 4.0))
            live = [s for s in fleet.members if fleet.members[s] is not None]
            away = [s for s in fleet.members if fleet.members[s] is None]
            if away and (len(live) == 1 or rng.random() < 0.5):
                fleet.join(rng.choice(away))
                faults.add("member joined")
            else:
                await asyncio.to_thread(fleet.leave, rng.choice(live))
                faults.add("member left")
            n += 1
        for slot in fleet.members:
            fleet.join(slot)

    report = await run_scenario("rebalance", settings, scale, tmp_path, consumers=3, fault_task=faults_task,
                                duration=scale.pick(22, 70))
    publish_report(report)
    assert_clean(report)
    assert report.faults >= scale.pick(2, 6), report.fault_detail


# --------------------------------------------------------------------------- 6. worker retries


async def test_workers_retry_after_timeouts(base_settings, scale, tmp_path, publish_report):
    """Closed-loop workers: each waits for the answer to its command and, after
    a 1.5 s timeout, sends it again with the same transition id and a new
    command id. Consumers are frozen for a few seconds now and then (shorter
    than the session timeout), so many answers come late and many proposals
    are sent twice or more."""
    settings = isolated_settings(base_settings, partitions=6, max_batch=100)
    rng = random.Random(scale.seed)

    async def faults_task(fleet: Fleet, reader, faults, done):
        await asyncio.sleep(3.0)  # the members have joined
        while not done.is_set():
            slot = rng.randrange(len(fleet.members))
            if not fleet.alive(slot):
                continue
            fleet.kill(slot, signal.SIGSTOP)
            await asyncio.sleep(rng.uniform(2.5, 5.0))
            fleet.kill(slot, signal.SIGCONT)
            faults.add("consumer frozen 2.5-5 s")
            await asyncio.sleep(rng.uniform(1.0, 4.0))

    report = await run_scenario("worker-retries", settings, scale, tmp_path, consumers=2,
                                fault_task=faults_task, closed_loop=True, duration=scale.pick(22, 90))
    publish_report(report)
    assert_clean(report)
    assert report.duplicates_caught > 0, report.line()


# --------------------------------------------------------------------------- 7./8. long outages


async def ready_status(http: httpx.AsyncClient, want: int, timeout: float) -> int:
    """`want` once /ready answers it within `timeout`, else 0 (the scenario goes on either way)."""
    try:
        return (await wait_for(http, "/ready", want, timeout=timeout)).status_code
    except AssertionError:
        return 0


async def test_postgres_down_under_load(private_stack, scale, tmp_path, publish_report):
    """PostgreSQL is stopped for 60 s (15 s at CI size) while commands keep
    arriving and two consumers work, then started again: the outage is waited
    out, nothing is lost or decided twice, no command is dead-lettered. One
    consumer's /ready turns unready while the server is down and ready again
    after it is back."""
    settings = isolated_settings(private_stack.settings(), partitions=6, max_batch=100)
    down = scale.pick(15.0, 60.0)
    port = free_port()
    probe: dict[str, int] = {}

    def plan(slot: int, incarnation: int) -> dict[str, str]:
        return {"RUNSTATE_METRICS_PORT": str(port)} if slot == 0 else {}

    async def faults_task(fleet, reader, faults, done):
        if not await wait_until(lambda: reader.count >= 0.2 * scale.commands, done):
            return
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30.0) as http:
            probe["before"] = await ready_status(http, 200, timeout=120)
            restart = asyncio.create_task(asyncio.to_thread(private_stack.restart_postgres, False, down))
            # Counted from before the stop, which can itself take a while on a loaded machine:
            # the server is down for `down` seconds somewhere in this window.
            probe["down"] = await ready_status(http, 503, timeout=down + 120)
            took = await restart
            probe["back"] = await ready_status(http, 200, timeout=120)
        faults.add(f"postgres down {down:.0f}s (restart took {took:.0f}s)")

    report = await run_scenario("postgres-down", settings, scale, tmp_path, consumers=2, fault_task=faults_task,
                                plan=plan, duration=scale.pick(35, 120), timeout=scale.pick(400, 1800))
    publish_report(report)
    assert_clean(report)
    assert report.faults == 1, report.fault_detail
    assert report.dead_lettered == 0, f"{report.dead_lettered} valid commands dead-lettered during the outage"
    assert probe == {"before": 200, "down": 503, "back": 200}, f"/ready of a consumer: {probe}"


async def test_kafka_down_under_load(private_stack, scale, tmp_path, publish_report):
    """The broker is stopped for 60 s (15 s at CI size) while commands keep
    being produced (the producers wait for it) and two consumers work, then
    started again: nothing lost, nothing decided twice, nothing dead-lettered."""
    settings = isolated_settings(private_stack.settings(), partitions=6, max_batch=100)
    down = scale.pick(15.0, 60.0)

    async def faults_task(fleet, reader, faults, done):
        if not await wait_until(lambda: reader.count >= 0.2 * scale.commands, done):
            return
        took = await asyncio.to_thread(private_stack.restart_kafka, False, down)
        faults.add(f"kafka down {down:.0f}s (restart took {took:.0f}s)")

    report = await run_scenario("kafka-down", settings, scale, tmp_path, consumers=2, fault_task=faults_task,
                                duration=scale.pick(35, 120), timeout=scale.pick(400, 1800),
                                producer_timeout_ms=int((down + 240) * 1000))
    publish_report(report)
    assert_clean(report)
    assert report.faults == 1, report.fault_detail
    assert report.dead_lettered == 0, f"{report.dead_lettered} valid commands dead-lettered during the outage"


# --------------------------------------------------------------------------- 9. the database refuses


async def test_database_refuses_inserts(scratch_settings, scale, tmp_path, publish_report):
    """The service role's INSERT on events is revoked for a few seconds under
    load (a botched grant, a failover to a read-only node), then granted back:
    an outage, not bad input: no command is dead-lettered, every one is decided
    once the grant is back."""
    settings = isolated_settings(scratch_settings, partitions=6, max_batch=100)
    role = parse_url(settings.database_url).username
    revoked_for = scale.pick(6.0, 20.0)

    async def faults_task(fleet, reader, faults, done):
        if not await wait_until(lambda: reader.count >= 0.2 * scale.commands, done):
            return
        with psycopg.connect(pg_dsn(settings.admin_database_url), autocommit=True) as admin:
            admin.execute(sql.SQL("REVOKE INSERT ON events FROM {}").format(sql.Identifier(role)))
            try:
                await asyncio.sleep(revoked_for)
            finally:
                admin.execute(sql.SQL("GRANT INSERT ON events TO {}").format(sql.Identifier(role)))
        faults.add(f"INSERT on events revoked for {revoked_for:.0f}s")

    report = await run_scenario("db-refuses", settings, scale, tmp_path, consumers=2, fault_task=faults_task,
                                duration=scale.pick(25, 60))
    publish_report(report)
    assert_clean(report)
    assert report.faults == 1, report.fault_detail
    assert report.dead_lettered == 0, f"{report.dead_lettered} valid commands dead-lettered while INSERT was revoked"


# --------------------------------------------------------------------------- 10. recreated topic, offset reset


async def _recreate_topic(settings: Settings) -> None:
    admin = AIOKafkaAdminClient(**kafka_options(settings))
    await admin.start()
    try:
        await admin.delete_topics([settings.command_topic])
        for _ in range(600):
            if settings.command_topic not in await admin.list_topics():
                break
            await asyncio.sleep(0.1)
    finally:
        await admin.close()
    for _ in range(100):  # the broker may still be finishing the deletion
        try:
            await ensure_topics(settings)
            return
        except Exception as exc:  # noqa: BLE001 - TopicAlreadyExists while marked for deletion
            print(f"recreating {settings.command_topic}: {exc!r}")
            await asyncio.sleep(0.5)
    raise RuntimeError(f"could not recreate {settings.command_topic}")


async def _reset_offsets(settings: Settings) -> None:
    """The group's committed offsets back to the beginning (the group has no members now)."""
    consumer = AIOKafkaConsumer(**kafka_options(settings),
                                group_id=settings.consumer_group, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()  # noqa: SLF001
        parts = consumer.partitions_for_topic(settings.command_topic) or set()
        tps = [TopicPartition(settings.command_topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.commit({tp: 0 for tp in tps})
    finally:
        await consumer.stop()


async def test_recreated_topic_and_offset_reset(scratch_settings, scale, tmp_path, publish_report):
    """Redelivery must be recognised by what a record is, not only where it
    is: (1) a workload is decided; the command topic is deleted and created
    again, and a second workload's records land at offsets the first one used:
    they must be decided, not answered with the first one's results; (2) the
    group's offsets are reset to the beginning: the second workload's records
    come again and are recognised (no decision twice), and a third workload
    after them is decided."""
    settings = isolated_settings(scratch_settings, partitions=4, max_batch=100)
    n = scale.pick(600, 6000)
    # Each later workload is smaller: its records stay below the offsets the group committed before.
    loads = [generate(scale.seed + 11, n, duplicate_rate=0.0), generate(scale.seed + 12, n // 2, duplicate_rate=0.0),
             generate(scale.seed + 13, n // 3, duplicate_rate=0.0)]
    refs = [reference(w) for w in loads]
    t0 = time.monotonic()
    await ensure_topics(settings)
    for w in loads:
        seed_tags(settings, w)
    faults = Faults()
    fleet = Fleet(settings, tmp_path, 2)
    reader = await ResultReader(settings).start()
    producer = await make_producer(settings)
    sent = Sent()
    problems: list[str] = []

    async def send(w: Workload, label: str) -> None:
        for phase in (1, 2):
            await send_open_loop(producer, settings, lanes_of(w, phase, WORKERS, scale.seed), sent)
            cmds = [c for r in w.phase(phase) for c in r.commands]
            watch = await GroupWatch(settings).start()
            try:
                unanswered = await wait_answered(reader, watch, cmds, scale.pick(120, 600), tick=fleet.check)
            finally:
                await watch.stop()
            if unanswered:
                problems.append(f"{label}, phase {phase}: {unanswered}")
                return

    try:
        fleet.start_all()
        await send(loads[0], "first workload")
        fleet.stop_all()
        await _recreate_topic(settings)
        faults.add("command topic deleted and created again")
        fleet.restart = True
        fleet.start_all()
        await send(loads[1], "second workload, on the recreated topic")
        fleet.stop_all()
        await _reset_offsets(settings)
        faults.add("group offsets reset to the beginning")
        fleet.restart = True
        fleet.start_all()
        await send(loads[2], "third workload, after the offset reset")
        watch = await GroupWatch(settings).start()
        try:
            behind = await watch.drained(scale.pick(120, 600), stalled_for=60)
        finally:
            await watch.stop()
        if behind:
            problems.append(f"the group's lag did not drain: {behind}")
    finally:
        fleet.stop_all()
        await producer.stop()
        await reader.stop()
    ref = Reference({k: v for r in refs for k, v in r.paths.items()},
                    {k: v for r in refs for k, v in r.active_slots.items()}, sum(r.events for r in refs),
                    {k: v for r in refs for k, v in r.tagged.items()},
                    {k: v for r in refs for k, v in r.tag_limits.items()})
    report = await check("offset-reset", settings, sent.commands, ref,
                         tags=[t for w in loads for t in w.tag_limits], offsets_reused=True)
    report.faults = faults.count
    report.fault_detail = ", ".join(f"{k}={v}" for k, v in faults.detail.items())
    report.problems = problems + report.problems
    report.seconds = time.monotonic() - t0
    publish_report(report)
    assert not problems, "\n".join(problems)
    assert_clean(report)
    assert report.dead_lettered == 0, f"{report.dead_lettered} valid commands dead-lettered"
