"""Running a workload through real consumer processes: the consumer fleet (a
supervisor that restarts dead members, as an orchestrator would), a reader of
the result topic that answers waiting workers, and the workers themselves
(open loop: every command sent in bulk; closed loop: each run waits for the
answer to its command and retries it, same transition id, new command id,
after a timeout)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from pipeline.harness import REPO, ServiceProcess
from runstate.config import Settings
from runstate.kafka_security import kafka_options

from .workload import Cmd, Workload

# --------------------------------------------------------------------------- topic reading


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    for _ in range(200):
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return [TopicPartition(topic, p) for p in sorted(parts)]
        await consumer._client.force_metadata_update()
        await asyncio.sleep(0.1)
    raise RuntimeError(f"topic {topic} has no partitions")


async def read_all(settings: Settings, topic: str, timeout: float = 120.0) -> list[Any]:
    """Every record of `topic` up to its current end, in partition order."""
    consumer = AIOKafkaConsumer(**kafka_options(settings), enable_auto_commit=False,
                                max_partition_fetch_bytes=16 * 1024 * 1024, fetch_max_bytes=64 * 1024 * 1024)
    await consumer.start()
    try:
        tps = await _partitions(consumer, topic)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        records: list[Any] = []
        deadline = time.monotonic() + timeout
        async def behind() -> bool:
            return any([await consumer.position(tp) < ends[tp] for tp in tps])

        while await behind():
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} did not reach its end within {timeout} s")
            batch = await consumer.getmany(timeout_ms=500, max_records=10000)
            for recs in batch.values():
                records.extend(recs)
        return records
    finally:
        await consumer.stop()


@dataclass
class Answer:
    command_id: UUID
    stream_id: UUID | None
    transition_id: UUID | None
    seq: int | None
    error: str | None


class ResultReader:
    """Follows the result topic from its beginning; wakes workers waiting on a
    command id or on a (run, transition id)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.count = 0
        self.by_command: dict[UUID, Answer] = {}
        self.by_transition: dict[tuple[UUID, UUID], Answer] = {}
        self._waiters: dict[Any, list[asyncio.Future]] = {}
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def start(self) -> ResultReader:
        self._consumer = AIOKafkaConsumer(**kafka_options(self.settings),
                                          enable_auto_commit=False, fetch_max_wait_ms=100)
        await self._consumer.start()
        tps = await _partitions(self._consumer, self.settings.result_topic)
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # stopping anyway
                await self._task
        await self._consumer.stop()

    async def _run(self) -> None:
        while True:
            try:
                batch = await self._consumer.getmany(timeout_ms=200, max_records=5000)
            except Exception:  # noqa: BLE001 - a broker restart: keep following
                await asyncio.sleep(0.5)
                continue
            for recs in batch.values():
                for r in recs:
                    self._take(json.loads(r.value))
            if batch:
                self._changed.set()

    def _take(self, doc: dict) -> None:
        self.count += 1
        a = Answer(UUID(doc["command_id"]), UUID(doc["stream_id"]) if doc.get("stream_id") else None,
                   UUID(doc["transition_id"]) if doc.get("transition_id") else None, doc.get("seq"),
                   (doc.get("error") or {}).get("code"))
        self.by_command.setdefault(a.command_id, a)
        keys: list[Any] = [a.command_id]
        if a.transition_id and a.stream_id:
            self.by_transition.setdefault((a.stream_id, a.transition_id), a)
            keys.append((a.stream_id, a.transition_id))
        for k in keys:
            for fut in self._waiters.pop(k, []):
                if not fut.done():
                    fut.set_result(a)

    def answered(self, cmd: Cmd) -> bool:
        if cmd.command_id in self.by_command:
            return True
        tid = cmd.transition_id
        return tid is not None and (cmd.stream_id, tid) in self.by_transition

    def waiter(self, cmd: Cmd) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(cmd.command_id, []).append(fut)
        if cmd.transition_id is not None:
            self._waiters.setdefault((cmd.stream_id, cmd.transition_id), []).append(fut)
        return fut

    async def wait_all(self, cmds: list[Cmd], timeout: float, tick: Callable[[], None] | None = None) -> None:
        deadline = time.monotonic() + timeout
        pending = [c for c in cmds if not self.answered(c)]
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} of {len(cmds)} commands unanswered after {timeout:.0f} s, "
                                   f"e.g. {[str(c.command_id) for c in pending[:3]]}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 0.5)
            if tick:
                tick()
            pending = [c for c in pending if not self.answered(c)]


# --------------------------------------------------------------------------- consumers


class ConsumerProcess(ServiceProcess):
    """`runstate serve`; RUNSTATE_FAULTS_SERVE_WRAPPER names a script run
    instead (a debugging aid: e.g. one that patches in timing logs)."""

    def start(self) -> ConsumerProcess:
        wrapper = os.environ.get("RUNSTATE_FAULTS_SERVE_WRAPPER")
        if not wrapper:
            return super().start()  # type: ignore[return-value]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen([sys.executable, wrapper], env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=REPO)
        return self


@dataclass
class Member:
    slot: int
    incarnation: int
    proc: ServiceProcess
    env: dict[str, str]
    started: float = field(default_factory=time.monotonic)


class Fleet:
    """Consumer processes in one group. `plan(slot, incarnation)` gives the
    extra environment of each start (e.g. a crash point); `supervise()` restarts
    members that died, as an orchestrator would, and counts the deaths."""

    def __init__(self, settings: Settings, logdir: Path, size: int,
                 plan: Callable[[int, int], dict[str, str]] | None = None, restart_delay: float = 0.3) -> None:
        self.settings = settings
        self.logdir = logdir
        self.plan = plan or (lambda slot, inc: {})
        self.restart_delay = restart_delay
        self.members: dict[int, Member | None] = {i: None for i in range(size)}
        self.incarnations = {i: 0 for i in range(size)}
        self.deaths: list[tuple[int, int, dict[str, str]]] = []  # (slot, exit code, env)
        self.started: list[ConsumerProcess] = []  # every process ever started, so none is left behind
        self.restart = True

    def start(self, slot: int) -> Member:
        inc = self.incarnations[slot]
        self.incarnations[slot] += 1
        env = self.plan(slot, inc)
        proc = ConsumerProcess(self.settings, self.logdir / f"consumer{slot}.{inc}.log", **env).start()
        self.started.append(proc)
        member = Member(slot, inc, proc, env)
        self.members[slot] = member
        return member

    def start_all(self) -> None:
        for slot in self.members:
            self.start(slot)

    def alive(self, slot: int) -> bool:
        m = self.members.get(slot)
        return m is not None and m.proc.proc is not None and m.proc.proc.poll() is None

    def pid(self, slot: int) -> int:
        m = self.members[slot]
        assert m is not None and m.proc.proc is not None
        return m.proc.proc.pid

    def check(self) -> None:
        for slot, m in list(self.members.items()):
            if m is None or m.proc.proc is None:
                continue
            code = m.proc.proc.poll()
            if code is None:
                continue
            self.deaths.append((slot, code, m.env))
            m.proc.stop()
            self.members[slot] = None
            if self.restart:
                self.start(slot)

    def kill(self, slot: int, sig: int = signal.SIGKILL) -> None:
        if self.alive(slot):
            self.members[slot].proc.signal(sig)  # type: ignore[union-attr]

    def leave(self, slot: int) -> None:
        """A member leaves the group cleanly (SIGTERM), and stays away until join()."""
        m = self.members.get(slot)
        if m is not None:
            self.members[slot] = None  # first, so the supervisor does not restart it
            m.proc.stop()

    def join(self, slot: int) -> None:
        if self.members.get(slot) is None:
            self.start(slot)

    async def supervise(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(self.restart_delay)
            self.check()

    def stop_all(self) -> None:
        self.restart = False
        for slot in self.members:
            self.members[slot] = None
        for proc in self.started:
            if proc.proc is not None and proc.proc.poll() is None:
                proc.stop()

    def kills(self) -> int:
        return sum(1 for _, code, _ in self.deaths if code == -signal.SIGKILL)


def process_state(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()[0]


# --------------------------------------------------------------------------- workers


@dataclass
class Sent:
    commands: list[Cmd] = field(default_factory=list)
    timeouts: int = 0  # closed loop: proposals retried after a timeout


async def make_producer(settings: Settings, request_timeout_ms: int = 60000) -> AIOKafkaProducer:
    """`request_timeout_ms`: how long a send may wait for the broker (longer than any broker outage)."""
    producer = AIOKafkaProducer(**kafka_options(settings), enable_idempotence=True,
                                linger_ms=5, request_timeout_ms=request_timeout_ms)
    await producer.start()
    return producer


async def send_open_loop(producer: AIOKafkaProducer, settings: Settings, lanes: Iterable[list[Cmd]],
                         sent: Sent, duration: float = 0.0) -> None:
    """Every worker sends all of its commands without waiting for answers,
    spread evenly over `duration` seconds (0: as fast as possible)."""

    async def worker(lane: list[Cmd]) -> None:
        futures = []
        start = time.monotonic()
        interval = duration / max(len(lane), 1)
        for i, cmd in enumerate(lane):
            futures.append(await producer.send(settings.command_topic, cmd.value(), key=cmd.key))
            sent.commands.append(cmd)
            if i % 20 == 19:
                ahead = start + (i + 1) * interval - time.monotonic()
                await asyncio.sleep(max(ahead, 0))
        await asyncio.gather(*futures)

    await asyncio.gather(*(worker(lane) for lane in lanes))


async def send_closed_loop(producer: AIOKafkaProducer, settings: Settings, reader: ResultReader,
                           runs: list, sent: Sent, concurrency: int, timeout: float,
                           seed: int, think: float = 0.0) -> None:
    """Each run's worker sends a command, waits for its answer, and after
    `timeout` sends it again (same transition id, new command id); between two
    commands of a run it works for about `think` seconds."""
    rng = random.Random(seed)
    gate = asyncio.Semaphore(concurrency)

    async def drive(plan) -> None:
        async with gate:
            for cmd in plan.commands:
                if cmd.retry_of is not None:
                    continue  # the workload's scripted retries: here timeouts make them
                if think:
                    await asyncio.sleep(rng.uniform(0.5, 1.5) * think)
                attempt = cmd
                while True:
                    fut = reader.waiter(cmd)
                    if attempt is not cmd:
                        reader._waiters.setdefault(attempt.command_id, []).append(fut)
                    sent.commands.append(attempt)
                    await (await producer.send(settings.command_topic, attempt.value(), key=attempt.key))
                    if reader.answered(cmd) or reader.answered(attempt):
                        break
                    try:
                        await asyncio.wait_for(fut, timeout)
                        break
                    except TimeoutError:
                        sent.timeouts += 1
                        attempt = cmd.retried(uuid.UUID(int=rng.getrandbits(128), version=4))

    await asyncio.gather(*(drive(p) for p in runs))


def lanes_of(workload: Workload, phase: int, workers: int, seed: int) -> list[list[Cmd]]:
    return workload.interleaved(phase, workers, random.Random(seed * 31 + phase))


# --------------------------------------------------------------------------- the consumer group's progress


class GroupWatch:
    """The consumer group's committed offsets against the command topic's end
    offsets: the lag a stalled partition shows, and whether a record has been
    processed (its offset committed past)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.committed: dict[int, int] = {}

    async def start(self) -> GroupWatch:
        from aiokafka.admin import AIOKafkaAdminClient

        self._admin = AIOKafkaAdminClient(**kafka_options(self.settings))
        await self._admin.start()
        self._consumer = AIOKafkaConsumer(**kafka_options(self.settings),
                                          enable_auto_commit=False)
        await self._consumer.start()
        self.tps = await _partitions(self._consumer, self.settings.command_topic)
        return self

    async def stop(self) -> None:
        await self._consumer.stop()
        await self._admin.close()

    async def refresh(self) -> dict[int, int]:
        offsets = await self._admin.list_consumer_group_offsets(self.settings.consumer_group)
        self.committed = {tp.partition: meta.offset for tp, meta in offsets.items()
                          if tp.topic == self.settings.command_topic and meta.offset >= 0}
        return self.committed

    async def lag(self) -> dict[int, int]:
        """Records per partition not yet committed by the group."""
        ends = await self._consumer.end_offsets(self.tps)
        committed = await self.refresh()
        return {tp.partition: ends[tp] - committed.get(tp.partition, 0) for tp in self.tps}

    async def drained(self, timeout: float, stalled_for: float = 60.0) -> dict[int, int]:
        """Wait until the group's lag is 0 on every partition; give up after
        `timeout`, or once no partition has moved for `stalled_for` seconds.
        Returns the partitions still behind, with their lag."""
        deadline = time.monotonic() + timeout
        last, moved = None, time.monotonic()
        while True:
            try:
                lag = await self.lag()
            except Exception as exc:  # noqa: BLE001 - a broker outage: ask again
                print(f"group lag unavailable: {exc!r}")
                await asyncio.sleep(1.0)
                continue
            behind = {p: n for p, n in lag.items() if n > 0}
            if not behind:
                return {}
            if lag != last:
                last, moved = lag, time.monotonic()
            if time.monotonic() > deadline or time.monotonic() - moved > stalled_for:
                return behind
            await asyncio.sleep(0.5)

    async def processed(self, partition: int, offset: int, timeout: float) -> bool:
        """Wait until the group has committed past `offset` of `partition`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.committed.get(partition, -1) > offset:
                return True
            await asyncio.sleep(0.05)
        return False

    async def follow(self, stop: asyncio.Event, every: float = 0.1) -> None:
        """Keep `committed` fresh until `stop` is set (for processed())."""
        while not stop.is_set():
            with contextlib.suppress(Exception):  # the next round asks again
                await self.refresh()
            await asyncio.sleep(every)


async def wait_answered(reader: ResultReader, watch: GroupWatch, cmds: list[Cmd], timeout: float,
                        tick: Callable[[], None] | None = None, stalled_for: float | None = None,
                        settle: float = 60.0) -> str | None:
    """Wait until every command is answered. Gives up early when answers can
    no longer come: the group has consumed every record (lag 0) and nothing
    new was answered for `settle` seconds, or (when `stalled_for` is given)
    the lag has not moved for that long. None when all were answered, else
    what went wrong."""
    deadline = time.monotonic() + timeout
    last_count, last_change = reader.count, time.monotonic()
    last_lag, lag_change = None, time.monotonic()
    while True:
        pending = [c for c in cmds if not reader.answered(c)]
        if not pending:
            return None
        now = time.monotonic()
        if now > deadline:
            return f"{len(pending)} of {len(cmds)} commands unanswered after {timeout:.0f} s, e.g. {pending[0].command_id}"
        if reader.count != last_count:
            last_count, last_change = reader.count, now
        try:
            lag = await watch.lag()
        except Exception:  # noqa: BLE001 - a broker outage: no verdict from the lag now
            lag = None
        if lag is not None:
            if lag != last_lag:
                last_lag, lag_change = lag, now
            if not any(lag.values()) and now - last_change > settle:
                return (f"{len(pending)} of {len(cmds)} commands unanswered though the group consumed every "
                        f"record, e.g. {pending[0].command_id}")
            if stalled_for is not None and any(lag.values()) and now - lag_change > stalled_for:
                return f"stalled: partitions {({p: n for p, n in lag.items() if n})} (partition: lag) did not move for {stalled_for:.0f} s"
        if tick:
            tick()
        await asyncio.sleep(0.5)


def replay_verify(settings: Settings, timeout: float = 1800) -> tuple[int, str]:
    """`runstate replay --verify --all` against the scenario's database: (exit status, last lines)."""
    from pipeline.harness import settings_env

    env = {**os.environ, **settings_env(settings)}
    proc = subprocess.run([sys.executable, "-m", "runstate.cli", "replay", "--verify", "--all"], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
    return proc.returncode, tail
