"""The simulated workers: full task-run lifecycles through Kafka, one command at a time per run.

Each worker drives runs one after another; a run's next command is produced when the result of
its previous one has been consumed. A run is

    create_task_run (initial state PENDING) -> RUNNING -> COMPLETED                    3 commands
    create_task_run (PENDING) -> RUNNING -> FAILED (rejected: AwaitingRetry, retries=1)
                              -> RUNNING (the retry) -> COMPLETED                      5 commands

so every command is one decided transition. Commands are rendered from string templates (the
driver shares the 2-core machine with everything else; pydantic would cost it a core), and a
result is matched by the command id that starts every result record.

Latency is measured from just before `producer.send` of a command to the moment its result
record is handed to this process by the consumer. With `rate` set, every send first takes a
token from a pacer that releases `rate` tokens a second (an offered load); latency starts when
the token is granted, so it never includes time spent waiting for a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
import uuid
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

CREATE = (
    '{{"kind":"create_task_run","command_id":"{cid}","id":"{rid}","name":"bench-{n}",'
    '"task_key":"bench.task","dynamic_key":"{n}","tags":[],'
    '"empirical_policy":{{"retries":1,"retry_delay":0}},"state":{{"type":"PENDING"}}}}'
)
SET = (
    '{{"kind":"set_task_run_state","command_id":"{cid}","task_run_id":"{rid}",'
    '"state":{{"type":"{type}","state_details":{{"transition_id":"{tid}"}}}},"force":false}}'
)


def lifecycle(failing: bool) -> list[str]:
    return ["RUNNING", "FAILED", "RUNNING", "COMPLETED"] if failing else ["RUNNING", "COMPLETED"]


@dataclass
class RunStats:
    commands: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, of commands sent in the window
    statuses: dict[str, int] = field(default_factory=dict)
    runs_completed: int = 0
    seconds: float = 0.0
    timeouts: int = 0

    @property
    def throughput(self) -> float:
        return self.commands / self.seconds if self.seconds else 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


class Pacer:
    """Releases `rate` tokens a second, evenly."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self.next = time.perf_counter()
        self.lock = asyncio.Lock()

    async def take(self) -> None:
        async with self.lock:
            now = time.perf_counter()
            if self.next > now:
                await asyncio.sleep(self.next - now)
            # never bank more than 50 ms of unused tokens
            self.next = max(self.next, time.perf_counter() - 0.05) + self.interval


class Driver:
    """One producer, one result reader (all partitions, no group), W worker tasks."""

    def __init__(self, bootstrap: str, command_topic: str, result_topic: str) -> None:
        self.bootstrap = bootstrap
        self.command_topic = command_topic
        self.result_topic = result_topic
        self.pending: dict[bytes, tuple[asyncio.Future, float]] = {}
        self.producer: AIOKafkaProducer | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self.reader: asyncio.Task | None = None
        self.received = 0
        self.hops: list[float] = []  # ms from the result's CreateTime to its arrival here

    async def __aenter__(self) -> Driver:
        self.producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=1,
                                         max_batch_size=256 * 1024, client_id="bench-driver")
        await self.producer.start()
        # A fetch returns as soon as a result arrives (fetch_min_bytes 1), so its wait only sets how
        # often an idle driver asks: at 5 ms the idle side of the p99 pairs took 0.07 cores of the
        # bench process and more of Kafka's (tests/bench/NOTES.md).
        self.consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                         fetch_max_wait_ms=int(os.environ.get("BENCH_DRIVER_FETCH_WAIT_MS", "500")),
                                         client_id="bench-driver")
        await self.consumer.start()
        parts = None
        for _ in range(200):
            parts = self.consumer.partitions_for_topic(self.result_topic)
            if parts:
                break
            await self.consumer._client.force_metadata_update()  # noqa: SLF001
            await asyncio.sleep(0.1)
        if not parts:
            raise RuntimeError(f"topic {self.result_topic} does not exist")
        tps = [TopicPartition(self.result_topic, p) for p in sorted(parts)]
        self.consumer.assign(tps)
        await self.consumer.seek_to_end(*tps)
        for tp in tps:
            await self.consumer.position(tp)
        self.reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.reader:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader
        if self.consumer:
            await self.consumer.stop()
        if self.producer:
            await self.producer.stop()

    async def _read(self) -> None:
        assert self.consumer is not None
        pending = self.pending
        clock = time.perf_counter
        while True:
            batches = await self.consumer.getmany(timeout_ms=100, max_records=10000)
            now = clock()
            wall_ms = time.time() * 1000
            hops = self.hops
            for records in batches.values():
                for record in records:
                    hops.append(wall_ms - record.timestamp)
                    value = record.value
                    entry = pending.pop(value[15:51], None)
                    if entry is not None:
                        fut, sent = entry
                        if not fut.done():
                            fut.set_result((now - sent, value))
                    self.received += 1

    async def call(self, key: bytes, cid: str, body: str) -> tuple[float, bytes]:
        assert self.producer is not None
        fut = asyncio.get_running_loop().create_future()
        self.pending[cid.encode()] = (fut, time.perf_counter())
        await self.producer.send(self.command_topic, body.encode(), key=key)
        return await asyncio.wait_for(fut, 60)

    async def run(self, workers: int, runs: int | None, seconds: float | None, *, fail_share: float = 0.2,
                  rate: float | None = None, warmup: float = 2.0, seed: int = 7,
                  on_progress=None) -> RunStats:
        """Drive `runs` lifecycles (or as many as fit in `seconds`); throughput and latencies are
        taken over the window after `warmup` seconds (to the last result when `runs` is given)."""
        stats = RunStats()
        rng = random.Random(seed)
        pacer = Pacer(rate) if rate else None
        t_start = time.perf_counter()
        window_start = t_start + warmup
        deadline = t_start + seconds if seconds else None
        counter = iter(range(10**12))
        remaining = [runs if runs is not None else 10**12]
        last_done = [t_start]

        async def one(status_counts: dict[str, int]) -> None:
            kinds = []
            while True:
                if remaining[0] <= 0:
                    return
                if deadline and time.perf_counter() >= deadline:
                    return
                remaining[0] -= 1
                n = next(counter)
                rid = str(uuid.uuid4())
                key = rid.encode()
                kinds = lifecycle(rng.random() < fail_share)
                steps = [None, *kinds]
                for step in steps:
                    if pacer:
                        await pacer.take()
                    cid = str(uuid.uuid4())
                    if step is None:
                        body = CREATE.format(cid=cid, rid=rid, n=n)
                    else:
                        body = SET.format(cid=cid, rid=rid, type=step, tid=uuid.uuid4())
                    t0 = time.perf_counter()
                    try:
                        latency, value = await self.call(key, cid, body)
                    except TimeoutError:
                        stats.timeouts += 1
                        self.pending.pop(cid.encode(), None)
                        break
                    done = t0 + latency
                    i = value.find(b'"status":"')
                    status = value[i + 10 : value.index(b'"', i + 10)].decode() if i >= 0 else "ERROR"
                    status_counts[status] = status_counts.get(status, 0) + 1
                    if status == "ERROR" or b'"error":{' in value:
                        stats.errors += 1
                    if t0 >= window_start and (deadline is None or done <= deadline):
                        stats.commands += 1
                        stats.latencies.append(latency)
                        last_done[0] = max(last_done[0], done)
                    if on_progress:
                        on_progress()
                else:
                    stats.runs_completed += 1

        await asyncio.gather(*(one(stats.statuses) for _ in range(workers)))
        end = deadline if deadline and runs is None else last_done[0]
        stats.seconds = max(1e-9, end - window_start)
        return stats
