#!/usr/bin/env python
"""`make bench`: runstate's throughput, latency, overhead, scale-out, rebuild speed and memory,
next to a bare Kafka->PostgreSQL->Kafka consumer (the floor) and Prefect 3.9.1's own server
(the peer), all in one run on this machine. Writes BENCHMARKS.md and BENCHMARKS.png at the
repository root; the last line printed is the `bench: ...` summary.

    python tests/bench/run_bench.py            # what `make bench` runs (starts and stops the stack)
    python tests/bench/run_bench.py --quick    # short runs, for developing the harness
    python tests/bench/run_bench.py --use-env  # use the servers in the environment, don't start a stack

Each measurement gets its own topics (12 partitions) and consumer group; runstate's consumers
and the floor write to a database of their own (`runstate_bench`, dropped at the end), the
rebuild reads one more (`runstate_bench_rebuild`), Prefect's server one more (`prefect`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))
sys.path.append(str(REPO / "deploy"))

import psycopg  # noqa: E402
import uvloop  # noqa: E402
from aiokafka import AIOKafkaConsumer, TopicPartition  # noqa: E402
from aiokafka.admin import AIOKafkaAdminClient  # noqa: E402
from procs import TICK, Consumer, CpuMeter, cpu_ticks, pids_by_comm, rss_kib, stop_popen  # noqa: E402
from report import cpu_us_per_command  # noqa: E402
from workload import Driver, percentile  # noqa: E402

from runstate.database_urls import libpq_dsn as libpq  # noqa: E402
from runstate.database_urls import parse, reveal, with_database  # noqa: E402
from stack import LocalStack, StackError, free_port  # noqa: E402

WORK = REPO / ".runstate" / "bench"
PARTITIONS = 12


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- environment

class Stack:
    """The local stack's servers only (LocalStack.up(servers_only=True)): Kafka and PostgreSQL
    without the runstate services, since the benchmark starts its own consumers with chosen
    settings; down at the end if this run started it."""

    def __init__(self, use_env: bool, root: Path | None = None, shape: str | None = None) -> None:
        self.use_env = use_env
        # A second stack (the other shape, for replication's cost) ignores servers named by the environment.
        self.local = LocalStack(root, shape=shape, use_environment=False) if root else LocalStack(shape=shape)
        self.started = False
        self.env: dict[str, str] = {}
        self.kafka_pids: list[int] = []

    def up(self) -> None:
        if self.use_env:
            self.env = {k: os.environ[k] for k in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL",
                                                   "RUNSTATE_ADMIN_DATABASE_URL")}
            return
        # The plaintext stack: the measurement is runstate's, not TLS's on a shared 2-core machine,
        # and it stays comparable with earlier runs and with Prefect's server (plain HTTP here).
        os.environ["RUNSTATE_STACK_SECURITY"] = "plaintext"
        try:
            self.started = self.local.up(servers_only=True)
        except StackError as err:
            raise SystemExit(f"deploy/stack up failed: {err.line}" + (f" (see {err.log})" if err.log else "")) from err
        # The benchmark's consumers run as the consumer's role; the owner's URL makes its databases.
        self.env = {**self.local.env(), **self.local.service_env()}
        self.env["DATABASE_URL"] = self.env.get("RUNSTATE_CONSUMER_DATABASE_URL", self.env["DATABASE_URL"])
        if self.local.env().get("RUNSTATE_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT") != "PLAINTEXT":
            raise SystemExit("a secured local stack is running; the benchmark runs on the plaintext one: "
                             "`make down` first")
        # One node, or a cluster's three (kafka-1..3): never another stack's JVMs.
        self.kafka_pids = [c.pid for c in self.local.components() if c.pid and c.name.split("-")[0] == "kafka"]

    def down(self) -> None:
        if self.started:
            self.local.down()


def db_url(url: str, database: str) -> str:
    return with_database(url, database)


def admin_sql(admin_url: str, *statements: str) -> None:
    with psycopg.connect(libpq(db_url(admin_url, "postgres")), autocommit=True) as conn:
        for s in statements:
            conn.execute(s)


def drop_database(admin_url: str, name: str, wait_s: float = 30.0) -> None:
    """DROP DATABASE ... WITH (FORCE), after the sessions of other roles have ended: the owner may
    not end those itself, and a client that has just closed its connection (an audit's worker
    process) leaves its backend alive for a moment. FORCE was refused once all the same, after
    the main run's million events, most likely by an autovacuum worker (it has no role, so the
    owner may not end it); then this role's own sessions are ended and a plain DROP, which stops
    autovacuum itself, is retried."""
    deadline = time.monotonic() + wait_s
    with psycopg.connect(libpq(db_url(admin_url, "postgres")), autocommit=True) as conn:
        while time.monotonic() < deadline and conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND usename <> current_user",
                (name,)).fetchone()[0]:
            time.sleep(0.2)
        try:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            return
        except psycopg.errors.InsufficientPrivilege:
            pass
        while True:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s"
                         " AND usename = current_user AND pid <> pg_backend_pid()", (name,))
            try:
                conn.execute(f"DROP DATABASE IF EXISTS {name}")
                return
            except psycopg.errors.ObjectInUse:
                if time.monotonic() > deadline + wait_s:
                    raise
                time.sleep(0.5)


TOAST_COMPRESSION = os.environ.get("BENCH_TOAST_COMPRESSION", "lz4")

# p99 at 1,000/s is measured in P99_PAIRS pairs of runs, runstate's and the floor's, with both
# consumers up: a pair's two runs fall in the same minute and the order swaps every pair, so the
# machine's drift (a checkpoint, a neighbour) weighs on both alike. Measured one after the other
# (2026-12-02), runstate's runs followed the sweep's 2,000-3,000/s loads and the floor's its own
# light run, and one side's p99 moved 3x between runs minutes apart. The summary takes the medians.
P99_PAIRS = 3
P99_SETTLE_SECONDS = 3.0


def set_compression(admin_url: str, name: str) -> None:
    """TOAST compression of the benchmark's databases: lz4 when the server has it. pglz (the
    default) compressing each event's ~6 kB payload was half of the events INSERT's server CPU."""
    with psycopg.connect(libpq(db_url(admin_url, "postgres")), autocommit=True) as conn:
        ok = conn.execute("SELECT %s = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'",
                          (TOAST_COMPRESSION,)).fetchone()[0]
        if ok:
            conn.execute(f"ALTER DATABASE {name} SET default_toast_compression = '{TOAST_COMPRESSION}'")


def fresh_database(admin_url: str, app_url: str, name: str) -> tuple[str, str]:
    from runstate.store.migrate import upgrade

    owner = parse(admin_url).username
    # The last measurement's consumers may still be closing their sessions (another role's).
    drop_database(admin_url, name)
    admin_sql(admin_url, f"CREATE DATABASE {name} OWNER {owner}")
    set_compression(admin_url, name)
    a, b = db_url(admin_url, name), db_url(app_url, name)
    upgrade(a, b)
    return a, b


# --------------------------------------------------------------------------- Kafka helpers

def topic_names(label: str) -> dict[str, str]:
    token = f"bench-{label}-{uuid.uuid4().hex[:6]}"
    return {
        "RUNSTATE_COMMAND_TOPIC": f"{token}.commands",
        "RUNSTATE_RESULT_TOPIC": f"{token}.results",
        "RUNSTATE_STATE_CHANGE_TOPIC": f"{token}.state-changes",
        "RUNSTATE_DEAD_LETTER_TOPIC": f"{token}.dead-letter",
        "RUNSTATE_CONSUMER_GROUP": f"{token}-group",
        "RUNSTATE_PARTITIONS": str(PARTITIONS),
    }


async def create_topics(bootstrap: str, app_url: str, topics: dict[str, str]) -> None:
    from runstate.config import Settings
    from runstate.pipeline.kafka import ensure_topics

    s = Settings(kafka_bootstrap_servers=bootstrap, database_url=app_url,
                 command_topic=topics["RUNSTATE_COMMAND_TOPIC"], result_topic=topics["RUNSTATE_RESULT_TOPIC"],
                 state_change_topic=topics["RUNSTATE_STATE_CHANGE_TOPIC"],
                 dead_letter_topic=topics["RUNSTATE_DEAD_LETTER_TOPIC"], partitions=PARTITIONS)
    await ensure_topics(s)


async def wait_group(bootstrap: str, group: str, members: int, timeout: float = 90) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                for response in await admin.describe_consumer_groups([group]):
                    for g in response.groups:
                        if g[1] == group and g[0] == 0 and g[2] == "Stable" and len(g[5]) >= members:
                            return
            await asyncio.sleep(0.3)
        raise RuntimeError(f"consumer group {group} did not reach {members} stable members in {timeout} s")
    finally:
        await admin.close()


class Sampler:
    """Every `every` s: the group's lag on the command topic, the consumers' RSS, results seen."""

    def __init__(self, bootstrap: str, group: str, topic: str, pids: list[int], driver: Driver,
                 every: float = 1.0) -> None:
        self.bootstrap, self.group, self.topic, self.pids, self.driver = bootstrap, group, topic, pids, driver
        self.every = every
        self.samples: list[dict] = []
        self.marks: dict[int, dict] = {}  # results received -> sample, first sample at or past the mark
        self.mark_at: list[int] = []

    async def __aenter__(self) -> Sampler:
        self.admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await self.admin.start()
        self.consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        await self.consumer.start()
        self.tps = [TopicPartition(self.topic, p) for p in range(PARTITIONS)]
        self.task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.consumer.stop()
        await self.admin.close()

    async def _loop(self) -> None:
        t0 = time.monotonic()
        while True:
            sample = {"t": time.monotonic() - t0, "received": self.driver.received,
                      "rss_kib": sum(rss_kib(p) or 0 for p in self.pids)}
            with contextlib.suppress(Exception):
                committed = await self.admin.list_consumer_group_offsets(self.group)
                end = await self.consumer.end_offsets(self.tps)
                sample["lag"] = sum(end[tp] - (committed[tp].offset if tp in committed else 0) for tp in self.tps)
            self.samples.append(sample)
            for mark in self.mark_at:
                if mark not in self.marks and sample["received"] >= mark:
                    self.marks[mark] = sample
            await asyncio.sleep(self.every)

    def lag_stats(self) -> dict:
        lags = [s["lag"] for s in self.samples if "lag" in s]
        return {"lag_mean": sum(lags) / len(lags) if lags else None, "lag_max": max(lags) if lags else None}


# The consumer settings the overhead measurement compares.
OVERHEAD_VARIANTS = {
    "metrics_off": {"RUNSTATE_METRICS": "off", "RUNSTATE_TRACING": "off"},
    "metrics_on": {"RUNSTATE_METRICS": "on", "RUNSTATE_TRACING": "off"},
    # Spans made by the SDK and dropped (no exporter): what tracing costs the consumer itself.
    "tracing_on": {"RUNSTATE_METRICS": "on", "RUNSTATE_TRACING": "on", "OTEL_TRACES_EXPORTER": "none"},
}


def overhead_in_process(batch_sizes: tuple[int, ...] = (10, 100), repeat: int = 200) -> dict:
    """CPU µs per command of exactly the metrics' and the tracing's own calls on a decided batch
    (create_task_run commands, decided against an empty snapshot), timed with process_time in
    this process: what the end-to-end comparison measures, without its noise."""
    return {str(size): _in_process_batch(size, repeat) for size in batch_sizes}


def _in_process_batch(size: int, repeat: int) -> dict:
    from opentelemetry.sdk.trace import TracerProvider
    from workload import CREATE

    from runstate.domain import OrchestrationSettings
    from runstate.obs.metrics import PHASES, ConsumerMetrics
    from runstate.obs.tracing import ConsumerTracer
    from runstate.pipeline.batch import decide_batch
    from runstate.pipeline.ports import NoMetrics, StoreSnapshot
    from runstate.pipeline.records import IncomingRecord, parse_record

    class Raw:  # what the tracer reads of a Kafka record
        headers: tuple = ()

    now_ms = int(time.time() * 1000)
    records = []
    for n in range(size):
        rid = str(uuid.uuid4())
        records.append(IncomingRecord("bench.commands", 0, n, rid.encode(),
                                      CREATE.format(cid=uuid.uuid4(), rid=rid, n=n).encode(), now_ms))
    items = [parse_record(r, 1 << 20) for r in records]
    timestamps = [now_ms] * size
    raw = [Raw() for _ in range(size)]
    metrics = ConsumerMetrics()
    tracer = ConsumerTracer(TracerProvider(), "bench.commands")
    traced_metrics = tracer.metrics(NoMetrics())

    def with_metrics(outcome) -> None:
        for phase in PHASES:
            metrics.phase(phase, 0.001)
        metrics.batch(outcome, size, time.time(), timestamps)

    def with_tracing(outcome) -> None:
        trace = tracer.begin(raw, items, time.perf_counter())
        for phase in PHASES[:-1]:  # the offset commit is timed outside the batch
            traced_metrics.phase(phase, 0.001)
        trace.stored(outcome)
        trace.end(outcome)

    timings = {}
    for name, work in (("metrics", with_metrics), ("tracing", with_tracing)):
        outcomes = [decide_batch(items, StoreSnapshot(), OrchestrationSettings()) for _ in range(repeat)]
        began = time.process_time()
        for outcome in outcomes:
            work(outcome)
        timings[f"{name}_us_per_command"] = (time.process_time() - began) / (repeat * size) * 1e6
    return timings


def summarize(stats, extra: dict | None = None) -> dict:
    lat = stats.latencies
    out = {
        "throughput": stats.throughput, "commands": stats.commands, "seconds": stats.seconds,
        "p50_ms": percentile(lat, 50) * 1e3, "p95_ms": percentile(lat, 95) * 1e3,
        "p99_ms": percentile(lat, 99) * 1e3, "errors": stats.errors, "timeouts": stats.timeouts,
        "statuses": stats.statuses,
    }
    out.update(extra or {})
    return out


# --------------------------------------------------------------------------- runstate runs

def bytes_per_event(admin_url: str) -> float | None:
    """The log's size on disk per event: table, TOAST and indexes together."""
    with psycopg.connect(libpq(admin_url), autocommit=True) as conn:
        size, count = conn.execute("SELECT pg_total_relation_size('events'), count(*) FROM events").fetchone()
    return size / count if count else None


class Bench:
    def __init__(self, args, stack: Stack) -> None:
        self.args = args
        self.stack = stack
        self.bootstrap = stack.env["KAFKA_BOOTSTRAP_SERVERS"]
        self.results: dict = {"config": {}, "runs": {}}

    def consumer_env(self, topics: dict[str, str], lanes: int) -> dict[str, str]:
        a = self.args
        return {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap, "DATABASE_URL": self.app_url,
                "RUNSTATE_ADMIN_DATABASE_URL": self.admin_url, **topics,
                "RUNSTATE_LANES": str(lanes), "RUNSTATE_MAX_BATCH": str(a.max_batch),
                "RUNSTATE_BATCH_TIMEOUT_MS": str(a.batch_timeout_ms)}

    def cpu_meter(self, pids: list[int]) -> CpuMeter:
        kafka = self.stack.kafka_pids
        return CpuMeter({
            "consumers": lambda: pids,
            "postgres": lambda: pids_by_comm("postgres"),
            "kafka": (lambda: kafka) if kafka else (lambda: pids_by_comm("java")),
            "driver": lambda: [os.getpid()],
        })

    @contextlib.asynccontextmanager
    async def consumers(self, label: str, processes: int, lanes: int, floor: bool = False,
                        validate: bool = False):
        topics = topic_names(label)
        await create_topics(self.bootstrap, self.app_url, topics)
        procs: list = []
        try:
            if floor:
                env = {**os.environ, "FLOOR_BOOTSTRAP": self.bootstrap, "FLOOR_DSN": libpq(self.admin_url),
                       "FLOOR_COMMAND_TOPIC": topics["RUNSTATE_COMMAND_TOPIC"],
                       "FLOOR_RESULT_TOPIC": topics["RUNSTATE_RESULT_TOPIC"],
                       "FLOOR_CHANGE_TOPIC": topics["RUNSTATE_STATE_CHANGE_TOPIC"],
                       "FLOOR_GROUP": topics["RUNSTATE_CONSUMER_GROUP"],
                       "FLOOR_MAX_BATCH": str(self.args.max_batch),
                       "FLOOR_BATCH_TIMEOUT_MS": str(self.args.batch_timeout_ms),
                       "FLOOR_VALIDATE": "1" if validate else "0"}
                fh = open(WORK / f"{label}.log", "ab")  # noqa: SIM115 - the child process keeps writing to it
                p = subprocess.Popen([sys.executable, str(HERE / "floor.py")], env=env, stdout=fh,
                                     stderr=subprocess.STDOUT, cwd=REPO, stdin=subprocess.DEVNULL)
                procs.append(p)
                pids = [p.pid]
                members = 1
            else:
                env = self.consumer_env(topics, lanes)
                for i in range(processes):
                    procs.append(Consumer(env, WORK / f"{label}-{i}.log").start())
                pids = [c.pid for c in procs]
                members = processes * lanes
            await wait_group(self.bootstrap, topics["RUNSTATE_CONSUMER_GROUP"], members)
            async with Driver(self.bootstrap, topics["RUNSTATE_COMMAND_TOPIC"],
                              topics["RUNSTATE_RESULT_TOPIC"]) as driver:
                await driver.run(32, 200, None, warmup=0)  # every partition's first batch, JIT of caches
                yield driver, topics, pids
        finally:
            for p in procs:
                if isinstance(p, Consumer):
                    p.stop()
                else:
                    stop_popen(p)

    async def closed_loop(self, driver, topics, pids, workers: int, seconds: float | None = None,
                          runs: int | None = None, marks: tuple[int, ...] = ()) -> dict:
        meter = self.cpu_meter(pids)
        meter.start_total()
        meter.start()
        async with Sampler(self.bootstrap, topics["RUNSTATE_CONSUMER_GROUP"], topics["RUNSTATE_COMMAND_TOPIC"],
                           pids, driver) as sampler:
            received0 = driver.received
            sampler.mark_at = [received0 + m for m in marks]
            stats = await driver.run(workers, runs, seconds, warmup=self.args.warmup)
            driver.hops.clear()
            await asyncio.sleep(0)
        cpu = meter.stop()
        res = summarize(stats, {"workers": workers, "cpu": cpu, **sampler.lag_stats(),
                                "rss_kib_end": sampler.samples[-1]["rss_kib"] if sampler.samples else None,
                                "received": driver.received - received0})
        res["rss_marks"] = {str(m - received0): s["rss_kib"] for m, s in sampler.marks.items()}
        res["rss_series"] = [(round(s["t"], 1), s["received"] - received0, s["rss_kib"]) for s in sampler.samples]
        return res

    async def paced(self, driver, topics, pids, rate: float, seconds: float, workers: int) -> dict:
        meter = self.cpu_meter(pids)
        meter.start()
        async with Sampler(self.bootstrap, topics["RUNSTATE_CONSUMER_GROUP"], topics["RUNSTATE_COMMAND_TOPIC"],
                           pids, driver) as sampler:
            driver.hops.clear()
            stats = await driver.run(workers, None, seconds, rate=rate, warmup=self.args.warmup)
        hops = {"hop_p50_ms": percentile(driver.hops, 50), "hop_p99_ms": percentile(driver.hops, 99)}
        driver.hops.clear()
        return summarize(stats, {"offered": rate, "workers": workers, "cpu": meter.stop(), **hops,
                                 **sampler.lag_stats()})

    async def p99_pairs(self) -> list[dict]:
        """P99_PAIRS pairs of 12-s runs at 1,000/s offered, one on runstate's consumer (one process,
        as the sweep's) and one on the floor's, both up throughout; the order swaps every pair."""
        a = self.args
        log(f"p99 at 1000/s: runstate (1 process, RUNSTATE_LANES={a.load_lanes}) and the floor, "
            f"{P99_PAIRS} alternating pairs")
        pairs: list[dict] = []
        async with self.consumers("p99", 1, a.load_lanes) as mine, \
                self.consumers("p99floor", 1, 1, floor=True) as floor:
            sides = {"runstate": mine, "floor": floor}
            # One untimed run each first: on the freshly reset database the first 12 s at 1,000/s
            # ran with p50 120 ms (tables without statistics, cold heads), not the service's state.
            for name in ("runstate", "floor"):
                await self.paced(*sides[name], 1000, a.load_seconds / 2, a.load_workers)
            for i in range(P99_PAIRS):
                pair: dict = {}
                for name in ("runstate", "floor") if i % 2 == 0 else ("floor", "runstate"):
                    driver, topics, pids = sides[name]
                    await asyncio.sleep(P99_SETTLE_SECONDS)
                    pair[name] = await self.paced(driver, topics, pids, 1000, a.load_seconds, a.load_workers)
                log(f"  pair {i + 1}: runstate p50 {pair['runstate']['p50_ms']:.1f} / p99 "
                    f"{pair['runstate']['p99_ms']:.1f} ms, floor p50 {pair['floor']['p50_ms']:.1f} / p99 "
                    f"{pair['floor']['p99_ms']:.1f} ms")
                pairs.append(pair)
        return pairs

    # ---------------------------------------------------------------- the runs
    def reset_database(self) -> None:
        """An empty `runstate_bench` for the next measurement. The main run leaves a million
        events behind, and autovacuum working through them for minutes took CPU from the
        measurements after it (2 processes measured 5,877/s in the main run and 2,864/s in
        scale-out minutes later); dropping the database stops it."""
        env = self.stack.env
        self.admin_url, self.app_url = fresh_database(env["RUNSTATE_ADMIN_DATABASE_URL"], env["DATABASE_URL"],
                                                      "runstate_bench")
        with psycopg.connect(libpq(self.admin_url), autocommit=True) as conn:
            conn.execute("CREATE TABLE floor_events (id bigserial PRIMARY KEY, stream_key text,"
                         " source_partition integer, source_offset bigint, payload json NOT NULL,"
                         " recorded_at timestamptz NOT NULL DEFAULT clock_timestamp())")

    async def run_all(self) -> None:
        a = self.args
        env = self.stack.env
        self.reset_database()
        with psycopg.connect(libpq(self.admin_url), autocommit=True) as conn:
            pg = {k: conn.execute(f"SHOW {k}").fetchone()[0] for k in (
                "server_version", "shared_buffers", "synchronous_commit", "fsync", "wal_level", "max_wal_size",
                "checkpoint_timeout", "default_toast_compression", "wal_compression")}
        self.results["config"].update({
            "processes": a.processes, "lanes": a.lanes, "load_lanes": a.load_lanes, "scale_lanes": a.scale_lanes, "max_batch": a.max_batch, "batch_timeout_ms": a.batch_timeout_ms,
            "workers": a.workers, "partitions": PARTITIONS, "fail_share": 0.2, "postgres": pg,
            "main_seconds": a.main_seconds, "main_commands": a.main_commands,
        })
        runs = self.results["runs"]

        # 1. the main run: throughput, latency, lag, memory at 100k and at the end.
        if "main" in a.parts:
            log(f"runstate end-to-end: {a.processes} consumer process(es), RUNSTATE_LANES={a.lanes}, {a.workers} workers, "
                f"up to {a.main_commands} commands or {a.main_seconds} s")
            async with self.consumers("main", a.processes, a.lanes) as (driver, topics, pids):
                runs_needed = int(a.main_commands / 3.4) + 1
                res = await self.closed_loop(driver, topics, pids, a.workers, seconds=a.main_seconds,
                                             runs=runs_needed, marks=(100_000,))
                runs["main"] = res
                log(f"  {res['throughput']:.0f} transitions/s, p50 {res['p50_ms']:.1f} ms, p99 {res['p99_ms']:.1f} ms, "
                    f"{res['received']} results, RSS {res['rss_marks']} -> {res['rss_kib_end']} KiB")
            res["bytes_per_event"] = bytes_per_event(self.admin_url)
            log(f"  events on disk: {res['bytes_per_event']:.0f} bytes per event (table, TOAST and indexes)")
            self.template = self.rebuild_template()
            self.reset_database()

            # 2. offered load sweep: one process, warmed by the sweep's first loads
            log(f"fixed loads: 1 consumer process, RUNSTATE_LANES={a.load_lanes}")
            async with self.consumers("load", 1, a.load_lanes) as (driver, topics, pids):
                runs["load"] = []
                for rate in a.loads:
                    r = await self.paced(driver, topics, pids, rate, a.load_seconds, a.load_workers)
                    runs["load"].append(r)
                    log(f"  offered {rate}/s: achieved {r['throughput']:.0f}/s, p50 {r['p50_ms']:.1f} ms, "
                        f"p99 {r['p99_ms']:.1f} ms")
                r = await self.closed_loop(driver, topics, pids, 16, seconds=a.load_seconds)
                runs["w16"] = r
                log(f"  16 workers: {r['throughput']:.0f}/s, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms")

        # 3. the floor
        if "floor" in a.parts:
            self.reset_database()
            log(f"floor: bare consumer, {a.workers} workers, {a.side_seconds} s")
            async with self.consumers("floor", 1, 1, floor=True) as (driver, topics, pids):
                res = await self.closed_loop(driver, topics, pids, a.workers, seconds=a.side_seconds)
                runs["floor"] = res
                log(f"  {res['throughput']:.0f} /s, p50 {res['p50_ms']:.1f} ms, p99 {res['p99_ms']:.1f} ms")
                await asyncio.sleep(P99_SETTLE_SECONDS)  # the closed loop's backlog written out first
                r = await self.paced(driver, topics, pids, 1000, a.load_seconds, a.load_workers)
                runs["floor_1000"] = r
                log(f"  at 1000/s: p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms")
            # The least runstate's contract costs whatever its rules: the floor plus runstate's parse
            # and validation of every record and a second message (the state change).
            self.reset_database()
            log(f"validating floor: the floor + parse_record + a state change, {a.workers} workers, {a.side_seconds} s")
            async with self.consumers("floorv", 1, 1, floor=True, validate=True) as (driver, topics, pids):
                res = await self.closed_loop(driver, topics, pids, a.workers, seconds=a.side_seconds)
                runs["floor_validating"] = res
                log(f"  {res['throughput']:.0f} /s, consumer {cpu_us_per_command(res, 'consumers'):.1f} µs/command")

        # 3a. p99 at 1,000/s: runstate against the floor, in alternating pairs
        if "p99" in a.parts:
            self.reset_database()
            runs["p99_pairs"] = await self.p99_pairs()

        # 3b. what metrics and tracing cost the consumer, per command
        if "overhead" in a.parts:
            log(f"metrics and tracing overhead: 1 process per variant, {a.overhead_runs} lifecycles at "
                f"{a.overhead_rate:.0f}/s per variant, {a.overhead_rounds} rounds")
            self.reset_database()
            res = await self.overhead()
            runs["overhead"] = res
            log(f"  metrics add {res['metrics_overhead_pct']:+.1f} % CPU per command, tracing (no exporter) "
                f"{res['tracing_overhead_pct']:+.1f} % more")

        # 4. scale-out
        runs["scale"] = []
        for n in (a.scale if "scale" in a.parts else []):
            log(f"scale-out: {n} consumer process(es), RUNSTATE_LANES={a.scale_lanes}, {a.side_seconds} s")
            self.reset_database()
            async with self.consumers(f"scale{n}", n, a.scale_lanes) as (driver, topics, pids):
                res = await self.closed_loop(driver, topics, pids, a.workers, seconds=a.side_seconds)
                res["processes"] = n
                res["rss_kib_each"] = [rss_kib(p) for p in pids]
                runs["scale"].append(res)
                log(f"  {res['throughput']:.0f}/s, p99 {res['p99_ms']:.1f} ms")

        # 4b. the cost of replication: the same consumer and load on the single node (this stack)
        # and on the replicated stack (three Kafka nodes, RF 3, min ISR 2, a synchronous standby)
        if "replicated" in a.parts:
            runs["replicated"] = await self.replicated()

        # 5. rebuild and replay, with nothing else running. Prefect's server used to start meanwhile:
        # replay then ran at 11k events/s for its first 55 s and at 20k/s after (2026-12-02; the
        # next run, alone, still gave 13k/s throughout: tests/bench/NOTES.md).
        if "rebuild" in a.parts:
            runs["rebuild"] = self.rebuild()
        # 6. the peer
        prefect = PrefectServer(env["RUNSTATE_ADMIN_DATABASE_URL"]) if not a.skip_prefect else None
        try:
            if prefect:
                prefect.start()
                prefect.wait_ready()
                log(f"prefect 3.9.1 server: 16 concurrent REST clients, {a.prefect_seconds} s")
                runs["prefect"] = prefect.drive(a.prefect_seconds, 16)
                log(f"  {runs['prefect']['throughput']:.0f} transitions/s, p50 {runs['prefect']['p50_ms']:.1f} ms, "
                    f"p99 {runs['prefect']['p99_ms']:.1f} ms")
        finally:
            if prefect:
                prefect.stop()

    # ---------------------------------------------------------------- replication's cost
    async def _fixed_pair(self, label: str) -> dict:
        """1,000/s offered for load_seconds, then a closed loop for side_seconds, one process."""
        a = self.args
        async with self.consumers(label, 1, a.load_lanes) as (driver, topics, pids):
            at1000 = await self.paced(driver, topics, pids, 1000, a.load_seconds, a.load_workers)
            closed = await self.closed_loop(driver, topics, pids, a.workers, seconds=a.side_seconds)
        log(f"  {label}: at 1000/s p50 {at1000['p50_ms']:.1f} ms, p99 {at1000['p99_ms']:.1f} ms; "
            f"closed loop {closed['throughput']:.0f}/s, p99 {closed['p99_ms']:.1f} ms")
        return {"at_1000": at1000, "closed": closed}

    async def replicated(self) -> dict:
        """The same runs on this run's stack and on a stack of the other shape (single or
        replicated: RUNSTATE_STACK) started for them in a folder of its own, servers only,
        plaintext like this one, one after the other."""
        mine = self.stack.local.shape
        other_shape = "single" if mine == "replicated" else "replicated"
        log(f"replication's cost: 1 consumer process at 1000/s and closed loop, {mine} then {other_shape} stack")
        out: dict = {"shape": "3 combined KRaft nodes, RF 3, min.insync.replicas 2, acks=all; PostgreSQL primary "
                              "+ synchronous standby (synchronous_commit=on)"}
        out[mine] = await self._on(self.stack, mine)
        if self.args.use_env:
            return out
        other = Stack(False, root=REPO / ".runstate" / f"bench-{other_shape}", shape=other_shape)
        log(f"  bringing up the {other_shape} stack")
        other.up()
        try:
            out[other_shape] = await self._on(other, other_shape)
        finally:
            with contextlib.suppress(Exception):
                drop_database(other.env["RUNSTATE_ADMIN_DATABASE_URL"], "runstate_bench")
            other.down()
        return out

    async def _on(self, stack: Stack, label: str) -> dict:
        """_fixed_pair on `stack`'s servers, with its topics' replication settings."""
        durability = {k: stack.env[k] for k in ("RUNSTATE_TOPIC_REPLICATION_FACTOR",
                                                 "RUNSTATE_TOPIC_MIN_INSYNC_REPLICAS") if k in stack.env}
        before = {k: os.environ.get(k) for k in durability}
        saved = (self.stack, self.bootstrap)
        try:
            os.environ.update(durability)  # create_topics' settings and the consumer's environment
            self.stack, self.bootstrap = stack, stack.env["KAFKA_BOOTSTRAP_SERVERS"]
            self.reset_database()
            res = await self._fixed_pair(label)
            with psycopg.connect(libpq(self.admin_url), autocommit=True) as conn:
                res["standbys"] = [list(r) for r in conn.execute(
                    "SELECT application_name, sync_state FROM pg_stat_replication").fetchall()]
            return res
        finally:
            for k, v in before.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            self.stack, self.bootstrap = saved
            self.reset_database()  # this run's own database again, on its own stack

    # ---------------------------------------------------------------- metrics and tracing overhead
    @contextlib.asynccontextmanager
    async def overhead_consumer(self, label: str, extra_env: dict[str, str]):
        """One `runstate serve` process (1 lane) with `extra_env`, its topics and a warmed driver."""
        topics = topic_names(label)
        await create_topics(self.bootstrap, self.app_url, topics)
        env = {k: v for k, v in self.consumer_env(topics, 1).items() if not k.startswith("OTEL_")}
        consumer = Consumer({**env, **extra_env}, WORK / f"{label}.log").start()
        try:
            await wait_group(self.bootstrap, topics["RUNSTATE_CONSUMER_GROUP"], 1)
            async with Driver(self.bootstrap, topics["RUNSTATE_COMMAND_TOPIC"],
                              topics["RUNSTATE_RESULT_TOPIC"]) as driver:
                await driver.run(32, 200, None, warmup=0)
                yield driver, consumer.pid
        finally:
            consumer.stop()

    async def overhead(self) -> dict:
        """Consumer CPU per command with metrics off, on, and on with tracing: one consumer
        process per variant, all running; each round drives the same fixed workload (the same
        lifecycles, seed and offered rate) through each variant in turn, so the machine's drift
        falls on all of them. The median over the rounds is reported."""
        a = self.args
        samples: dict[str, list[dict]] = {name: [] for name in OVERHEAD_VARIANTS}
        async with contextlib.AsyncExitStack() as stack:
            consumers = {name: await stack.enter_async_context(self.overhead_consumer(f"overhead-{name}", env))
                         for name, env in OVERHEAD_VARIANTS.items()}
            for round_ in range(a.overhead_rounds):
                order = list(consumers)
                order = order[round_ % len(order):] + order[:round_ % len(order)]
                for name in order:
                    driver, pid = consumers[name]
                    received0, ticks0 = driver.received, cpu_ticks(pid)
                    stats = await driver.run(a.load_workers, a.overhead_runs, None, rate=a.overhead_rate, warmup=0)
                    await asyncio.sleep(0.5)  # the last batch's offset commit
                    cpu_s = (cpu_ticks(pid) - ticks0) / TICK
                    commands = driver.received - received0
                    samples[name].append({"commands": commands, "cpu_s": cpu_s,
                                          "cpu_us_per_command": cpu_s / commands * 1e6 if commands else None,
                                          "throughput": stats.throughput, "p50_ms": percentile(stats.latencies, 50) * 1e3,
                                          "p99_ms": percentile(stats.latencies, 99) * 1e3})
                    log(f"  round {round_ + 1} {name}: {commands} commands, "
                        f"{samples[name][-1]['cpu_us_per_command']:.0f} µs CPU each, p99 {samples[name][-1]['p99_ms']:.1f} ms")

        def median(values: list[float]) -> float:
            ordered = sorted(values)
            mid = len(ordered) // 2
            return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2

        variants = {name: {"cpu_us_per_command": median([x["cpu_us_per_command"] for x in xs if x["cpu_us_per_command"]]),
                           "p99_ms": median([x["p99_ms"] for x in xs]), "samples": xs}
                    for name, xs in samples.items()}
        off, on, traced = (variants[n]["cpu_us_per_command"] for n in ("metrics_off", "metrics_on", "tracing_on"))
        return {"rate": a.overhead_rate, "runs": a.overhead_runs, "rounds": a.overhead_rounds,
                "workers": a.load_workers, "variants": variants,
                "metrics_overhead_pct": (on - off) / off * 100, "tracing_overhead_pct": (traced - on) / on * 100,
                "in_process": overhead_in_process()}

    def rebuild_template(self) -> list[tuple]:
        """Whole histories of real runs decided by runstate in this run (every lifecycle shape)."""
        source = self.admin_url
        if self.args.audit_template_db:  # measuring the audits alone: runs decided earlier
            source = db_url(self.stack.env["RUNSTATE_ADMIN_DATABASE_URL"], self.args.audit_template_db)
        with psycopg.connect(libpq(source)) as src:
            return src.execute(
                "SELECT stream_id, seq, stream_type, event_type, transition_id, status, state_type, state_name,"
                " payload::text FROM events WHERE stream_id IN ((SELECT stream_id FROM events GROUP BY stream_id"
                " ORDER BY max(seq) DESC, stream_id LIMIT 40) UNION ALL (SELECT stream_id FROM events"
                " GROUP BY stream_id HAVING max(seq) = 3 ORDER BY stream_id LIMIT 160))"
                " ORDER BY stream_id, seq").fetchall()

    def rebuild(self) -> dict:
        a = self.args
        env = self.stack.env
        log(f"rebuild: generating {a.rebuild_events} events in runstate_bench_rebuild")
        r_admin, r_app = fresh_database(env["RUNSTATE_ADMIN_DATABASE_URL"], env["DATABASE_URL"],
                                        "runstate_bench_rebuild")
        t0 = time.monotonic()
        rows = getattr(self, "template", None) or self.rebuild_template()
        total, streams, size = generate_log(r_admin, rows, a.rebuild_events)
        gen_s = time.monotonic() - t0
        log(f"  {total} events ({size}) from {len(rows)} template events of {streams} runs in {gen_s:.0f} s")
        res = self.measure_rebuild(r_app)
        res.update({"generated": total, "table_size": size, "generation_seconds": gen_s,
                    "template_events": len(rows)})
        self.results["runs"]["replay"] = self.measure_replay(r_app)
        drop_database(env["RUNSTATE_ADMIN_DATABASE_URL"], "runstate_bench_rebuild")
        return res


    def measure_rebuild(self, app_url: str) -> dict:
        """`runstate rebuild` of the generated log, by --audit-workers processes."""
        from runstate.audit.rebuild import rebuild

        a = self.args
        report = rebuild(app_url, batch_size=a.rebuild_batch, workers=a.audit_workers)
        res = {"events": report.events, "seconds": report.seconds, "events_per_second": report.events / report.seconds,
               "task_runs": report.task_runs, "batch_size": a.rebuild_batch, "workers": a.audit_workers}
        log(f"  rebuild, {a.audit_workers} worker(s): {report.events} events in {report.seconds:.1f} s"
            f" = {res['events_per_second']:.0f} events/s")
        return res

    def measure_replay(self, app_url: str) -> dict:
        """`runstate replay --verify` of the generated log, by --audit-workers processes, with the
        workers' resident memory (theirs only, _pool_workers) sampled as the verified share of the log grows."""
        import threading

        from runstate.audit.db import open_engine
        from runstate.audit.replay import verify_log

        a = self.args
        engine = open_engine(app_url)
        done = [0]
        series: list[tuple[float, int, int]] = []  # seconds, events verified, workers' RSS KiB
        stop = threading.Event()
        t0 = time.monotonic()

        def sample() -> None:
            while not stop.wait(0.5):
                workers = _pool_workers(os.getpid())
                if workers:
                    series.append((time.monotonic() - t0, done[0], sum(rss_kib(p) or 0 for p in workers)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            report = verify_log(engine, batch_size=a.replay_batch, workers=a.audit_workers,
                                on_batch=lambda n: done.__setitem__(0, done[0] + n))
        finally:
            stop.set()
            sampler.join()
            engine.dispose()
        seconds = time.monotonic() - t0
        res = {"events": report.chained, "decisions": report.events, "seconds": seconds,
               "events_per_second": report.chained / seconds, "mismatches": len(report.mismatches),
               "workers": a.audit_workers, "batch_size": a.replay_batch, "rss_series": series}
        # Memory against the share of the log verified: flat if the workers hold no more than a batch.
        early = next((s for s in series if s[1] >= report.chained // 10), None)
        late = [s[2] for s in series if s[1] >= report.chained // 2]
        res["rss_kib_at_10pct"] = early[2] if early else None
        res["rss_kib_max_after_50pct"] = max(late) if late else None
        log(f"  replay --verify, {a.audit_workers} worker(s): {report.chained} events ({report.events} decisions) in"
            f" {seconds:.1f} s = {res['events_per_second']:.0f} events/s, {len(report.mismatches)} mismatches;"
            f" workers' RSS {res['rss_kib_at_10pct']} KiB at 10 % -> max {res['rss_kib_max_after_50pct']} KiB"
            " after 50 %")
        return res


# runstate.events.event_hash in SQL, so that the generated log carries hash chains that
# replay --verify checks as it would a real one: each column length-prefixed, no digest.
CHAIN_PARTS = " || ".join(
    [f"bench_part({c})" for c in ("stream_id::text", "seq::text", "stream_type", "event_type", "command_id::text",
                                  "transition_id::text", "status", "state_type", "state_name", "state_id::text",
                                  "source_topic", "source_partition::text", "source_offset::text")]
    + ["int8send(0::bigint)", "bench_part(payload::text)"])


def chain_functions(conn) -> None:
    conn.execute("CREATE FUNCTION bench_part(text) RETURNS bytea IMMUTABLE LANGUAGE sql AS $$ SELECT"
                 " int8send(octet_length(convert_to(coalesce($1, ''), 'UTF8'))::bigint)"
                 " || convert_to(coalesce($1, ''), 'UTF8') $$")
    conn.execute("CREATE FUNCTION bench_link(bytea, bytea) RETURNS bytea IMMUTABLE LANGUAGE sql AS"
                 " $$ SELECT sha256($1 || $2) $$")
    conn.execute("CREATE AGGREGATE bench_chain(bytea) (SFUNC = bench_link, STYPE = bytea,"
                 " INITCOND = '\\x" + "00" * 32 + "')")


class PrefectServer:
    """Prefect 3.9.1's own server (`prefect server start`, defaults: one worker, its services on)
    on the stack's PostgreSQL, database `prefect`, from the separate Prefect virtualenv."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.proc = None

    def start(self) -> None:
        sys.path.insert(0, str(REPO / "tests" / "gateway"))
        from prefect_env import prefect_python  # builds .cache/prefect-venv on first use

        self.python = prefect_python()
        owner = parse(self.admin_url).username
        drop_database(self.admin_url, "prefect")
        admin_sql(self.admin_url, f"CREATE DATABASE prefect OWNER {owner}")
        set_compression(self.admin_url, "prefect")
        url = reveal(parse(self.admin_url).set(drivername="postgresql+asyncpg", database="prefect"))
        self.port = free_port()
        home = WORK / "prefect-home"
        home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_DATABASE_CONNECTION_URL": url,
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false",
               "PREFECT_SERVER_LOGGING_LEVEL": "WARNING"}
        self.fh = open(WORK / "prefect-server.log", "ab")  # noqa: SIM115 - the child process writes to it after this returns
        # `python -m prefect`, not the venv's `prefect` script: a script's shebang names the path
        # the venv was built under, which is gone when .cache was reached through another checkout.
        self.proc = subprocess.Popen([str(self.python), "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                                      str(self.port), "--no-ui"], env=env, stdout=self.fh, stderr=subprocess.STDOUT,
                                     cwd=WORK, stdin=subprocess.DEVNULL, start_new_session=True)
        self.api = f"http://127.0.0.1:{self.port}/api"

    def wait_ready(self, timeout: float = 180) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefect server exited ({self.proc.returncode}); see {WORK}/prefect-server.log")
            with contextlib.suppress(OSError), urllib.request.urlopen(self.api + "/health", timeout=2) as r:
                if r.status == 200:
                    return
            time.sleep(0.5)
        raise RuntimeError("prefect server did not become ready")

    def drive(self, seconds: float, concurrency: int) -> dict:
        meter = CpuMeter({"prefect": lambda: [self.proc.pid, *_children(self.proc.pid)],
                          "postgres": lambda: pids_by_comm("postgres")})
        meter.start_total()
        meter.start()
        out = subprocess.run([str(self.python), str(HERE / "prefect_driver.py"), self.api, str(seconds),
                              str(concurrency)], capture_output=True, text=True, cwd=REPO)
        cpu = meter.stop()
        if out.returncode != 0:
            raise RuntimeError(f"prefect driver failed: {out.stderr[-2000:]}")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        res["cpu"] = cpu
        return res

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 15)  # its own session: the server and its workers
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(10)
        with contextlib.suppress(Exception):
            drop_database(self.admin_url, "prefect")


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                raw = (entry / "stat").read_text()
                f = raw[raw.rindex(")") + 2:].split()
                if int(f[1]) == pid:
                    out.append(int(entry.name))
                    out.extend(_children(int(entry.name)))
    return out


def _pool_workers(pid: int) -> list[int]:
    """The audit's worker processes: children spawned by multiprocessing. Not every child: when
    this run started the stack, PostgreSQL (each backend counting the shared buffers it touched)
    and Kafka's JVM are children too, and summing them reported 2.3 GB of "replay workers"."""
    out = []
    for child in _children(pid):
        with contextlib.suppress(OSError):
            if b"multiprocessing.spawn" in Path(f"/proc/{child}/cmdline").read_bytes():
                out.append(child)
    return out


# --------------------------------------------------------------------------- main

def machine() -> dict:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(int(mem) / 1024 / 1024, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "loadavg_start": os.getloadavg()}



def generate_log(admin_url: str, rows: list[tuple], events: int) -> tuple[int, int, str]:
    """At least `events` events in the (fresh) database of `admin_url`: copies of the template
    runs `rows` under new stream ids, hash-chained; (events, template runs, size on disk)."""
    with psycopg.connect(libpq(admin_url)) as dst:
        dst.execute("CREATE TABLE bench_template (n integer, stream_id uuid, seq bigint, stream_type text,"
                    " event_type text, transition_id uuid, status text, state_type text, state_name text,"
                    " payload json)")
        streams: dict[object, int] = {}
        with dst.cursor().copy("COPY bench_template FROM STDIN") as cp:
            for r in rows:
                cp.write_row((streams.setdefault(r[0], len(streams)), *r))
        dst.execute("ANALYZE bench_template")
        copies = -(-events // len(rows))
        # Generation only: the log is made unlogged so that writing it costs no WAL; the
        # rebuild reads it (and writes its projections) exactly as it would a logged one.
        dst.execute("ALTER TABLE events SET UNLOGGED")
        dst.commit()
        chain_functions(dst)
        step = max(1, 100_000 // len(rows))
        for lo in range(0, copies, step):
            hi = min(copies, lo + step)
            dst.execute(
                "INSERT INTO events (stream_id, seq, stream_type, event_type, command_id, transition_id,"
                " status, state_type, state_name, state_id, payload, source_topic, source_partition,"
                " source_offset, hash)"
                " SELECT stream_id, seq, stream_type, event_type, command_id, transition_id, status, state_type,"
                " state_name, state_id, payload, source_topic, source_partition, source_offset,"
                f" bench_chain({CHAIN_PARTS}) OVER (PARTITION BY g, n ORDER BY seq)"
                " FROM (SELECT g, t.n, md5(t.n::text || '/' || g::text)::uuid AS stream_id,"
                " t.seq, t.stream_type, t.event_type, gen_random_uuid() AS command_id, t.transition_id, t.status,"
                " t.state_type, t.state_name,"
                " CASE WHEN t.state_type IS NOT NULL THEN gen_random_uuid() END AS state_id,"
                # A copy of a run under another id names that id in its payload too: a lean
                # event's run takes its id from the stream, so a stale one would differ on replay.
                " replace(t.payload::text, t.stream_id::text, md5(t.n::text || '/' || g::text)::uuid::text)::json"
                " AS payload, 'bench.rebuild' AS source_topic, (g %% 12)::integer AS source_partition,"
                " g::bigint * 1000000 + row_number() OVER () AS source_offset"
                " FROM generate_series(%s::integer, %s::integer) g CROSS JOIN bench_template t) x"
                " ORDER BY g, n, seq",
                (lo, hi - 1))
            dst.commit()
        dst.execute("DROP TABLE bench_template")
        dst.commit()
        total = dst.execute("SELECT count(*) FROM events").fetchone()[0]
        size = dst.execute("SELECT pg_size_pretty(pg_total_relation_size('events'))").fetchone()[0]
    with psycopg.connect(libpq(admin_url), autocommit=True) as dst:
        dst.execute("VACUUM ANALYZE events")
    return int(total), len(streams), size


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short runs, for developing the harness")
    p.add_argument("--use-env", action="store_true", help="use the servers named in the environment")
    p.add_argument("--skip-prefect", action="store_true")
    p.add_argument("--processes", type=int, default=int(os.environ.get("BENCH_PROCESSES", "2")),
                   help="consumer processes of the main (throughput) run")
    p.add_argument("--lanes", type=int, default=int(os.environ.get("BENCH_LANES", "1")))
    p.add_argument("--load-lanes", type=int, default=int(os.environ.get("BENCH_LOAD_LANES", "1")),
                   help="lanes of the one consumer process of the fixed-load sweep")
    p.add_argument("--scale-lanes", type=int, default=int(os.environ.get("BENCH_SCALE_LANES", "1")))
    p.add_argument("--max-batch", type=int, default=1000)
    p.add_argument("--batch-timeout-ms", type=int, default=2)
    p.add_argument("--workers", type=int, default=int(os.environ.get("BENCH_WORKERS", "1500")))
    p.add_argument("--main-commands", type=int, default=1_000_000)
    p.add_argument("--main-seconds", type=float, default=300)
    p.add_argument("--loads", type=str, default="250,500,1000,2000,3000")
    p.add_argument("--load-seconds", type=float, default=12)
    p.add_argument("--load-workers", type=int, default=600)
    p.add_argument("--side-seconds", type=float, default=20)
    p.add_argument("--scale", type=str, default="1,2,3")
    p.add_argument("--prefect-seconds", type=float, default=30)
    p.add_argument("--rebuild-events", type=int, default=1_000_000)
    p.add_argument("--rebuild-batch", type=int, default=50_000)
    p.add_argument("--replay-batch", type=int, default=1000)
    p.add_argument("--audit-workers", type=int, default=os.cpu_count() or 1,
                   help="worker processes of rebuild and replay --verify")
    p.add_argument("--audit-template-db", default=None,
                   help="take the generated log's template runs from this database (to measure the audits alone)")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--out", type=Path, default=REPO)
    p.add_argument("--report-only", action="store_true",
                   help="rewrite BENCHMARKS.md/.png from the last run's .runstate/bench/results.json")
    p.add_argument("--parts", type=str, default="main,floor,p99,overhead,scale,replicated,rebuild,prefect")
    p.add_argument("--overhead-rate", type=float, default=1000, help="offered commands/s of the overhead runs")
    p.add_argument("--overhead-runs", type=int, default=3000, help="lifecycles per variant and round")
    p.add_argument("--overhead-rounds", type=int, default=3)
    a = p.parse_args(argv)
    if a.quick:
        a.main_commands, a.main_seconds, a.load_seconds, a.side_seconds = 120_000, 40, 5, 8
        a.prefect_seconds, a.rebuild_events = 8, 50_000
        a.overhead_runs, a.overhead_rounds = 600, 2
    a.loads = [float(x) for x in a.loads.split(",") if x]
    a.scale = [int(x) for x in a.scale.split(",") if x]
    a.parts = set(a.parts.split(","))
    if "prefect" not in a.parts:
        a.skip_prefect = True
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        from report import write_report

        print(write_report(json.loads((WORK / "results.json").read_text()), args.out), flush=True)
        return 0
    t0 = time.monotonic()
    info = machine()
    stack = Stack(args.use_env)
    log("bringing up the stack (deploy/stack up --servers-only)" if not args.use_env else "using the servers in the environment")
    stack.up()
    bench = Bench(args, stack)
    bench.results["machine"] = info
    try:
        uvloop.run(bench.run_all())  # the driver is the instrument: keep its own latency small
    finally:
        with contextlib.suppress(Exception):
            drop_database(stack.env["RUNSTATE_ADMIN_DATABASE_URL"], "runstate_bench")
        bench.results["machine"]["loadavg_end"] = os.getloadavg()
        bench.results["wall_seconds"] = time.monotonic() - t0
        (WORK / "results.json").write_text(json.dumps(bench.results, indent=1, default=str))
        stack.down()
    from report import write_report

    line = write_report(bench.results, args.out)
    log(f"wrote {args.out / 'BENCHMARKS.md'} and {args.out / 'BENCHMARKS.png'} in {time.monotonic() - t0:.0f} s")
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
