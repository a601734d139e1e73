"""Typed Python clients for workers and downstream subscribers.

`RunstateClient.propose(...)` publishes a set_state command keyed by run id
and awaits its orchestration result, matched by command id or, for a retried
command, by transition id (a duplicate is answered with the stored result,
which carries the first command's id). `SyncRunstateClient` is the same for
code that is not async.

Results are keyed by run id like the commands, so a result lands on the result
topic's partition that Kafka's default partitioner (murmur2 of the key) picks
for that run: a client reads only the partitions its pending requests map to,
from the end offset it saw before sending. A record on those partitions that is
not a result for one of its requests (malformed, forged, another client's) is
skipped and logged; it never stops the reader.

This module needs only aiokafka, pydantic and runstate's pure modules (config,
domain, messages), so workers can install it next to any other framework.

Tracing: where the OpenTelemetry API is installed, each request is a
`runstate.request` span of the given tracer provider, else of the process's
global one (the application's to set up; without one nothing is recorded or
sent). Its context travels in the command's `traceparent` header and comes
back on the result's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Coroutine, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar, overload
from uuid import UUID

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner

from runstate.config import WorkerSettings
from runstate.domain import EmpiricalPolicy, StateCreate, StateDetails, StateType
from runstate.kafka_security import kafka_options, start_client
from runstate.messages import (
    LIMIT_KINDS,
    SCHEMA_VERSION,
    SCHEMA_VERSION_HEADER,
    Command,
    CreateFlowRunCommand,
    CreateTaskRunCommand,
    DeleteConcurrencyLimitCommand,
    LimitCommand,
    LimitResultEvent,
    OrchestrationResultEvent,
    RunCommand,
    SetConcurrencyLimitCommand,
    SetFlowRunStateCommand,
    SetStateCommand,
    StateChangeEvent,
    stream_id_of,
)

log = logging.getLogger("runstate.client")

T = TypeVar("T")

READ_LINGER_S = 30.0
"""A result partition stays read this long after its last pending request, so a
busy worker does not pause and re-seek it between every pair of requests."""
READ_RETRY_S = (0.1, 5.0)
"""Backoff between failed fetches of the result topic (first, most)."""
PRODUCER_HEADROOM = 65_536
"""Room above the largest command for the producer's request framing."""


class RunstateError(Exception):
    """Base of the errors this module raises."""


class RunstateTimeout(RunstateError, TimeoutError):
    """No result arrived in time. The command is still decided later; send it
    again with the same transition_id to get that decision."""


class RunstateUnavailable(RunstateError):
    """The client cannot wait for results: it is stopped, or its result reader
    died (logged with the cause). A command already sent is still decided."""


class CommandTooLarge(RunstateError, ValueError):
    """The command is larger than the command topic accepts (max_command_bytes);
    nothing was sent."""


@dataclass(eq=False)
class _Waiter:
    """One pending request: the future its caller awaits and what it is found by."""

    future: asyncio.Future[Any]  # of an OrchestrationResultEvent, or a LimitResultEvent for a limit command
    key: bytes
    partition: int
    command_id: UUID
    transition: tuple[UUID, UUID] | None
    limit: bool = False
    span: Any = None  # the request's span, when traced
    headers: list[tuple[str, bytes]] | None = None  # the command record's trace context


class RunstateClient:
    def __init__(self, settings: WorkerSettings | None = None, *, client_id: str = "runstate-client",
                 tracer_provider: Any = None) -> None:
        self.settings = settings or WorkerSettings.load()
        self._client_id = client_id
        self._tracer = _tracer(tracer_provider)
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task[None] | None = None
        self._stopping = False
        self._partitions: list[int] = []
        self._reading: set[int] = set()  # result partitions resumed (the rest are paused)
        self._seeking: dict[int, asyncio.Future[None]] = {}
        self._by_command: dict[UUID, _Waiter] = {}
        self._by_transition: dict[tuple[UUID, UUID], list[_Waiter]] = {}
        self._waiting: Counter[int] = Counter()  # pending requests per result partition
        self._last_wait: dict[int, float] = {}
        self.skipped_records = 0
        """Records on the result partitions read that were not a valid result (logged)."""

    async def __aenter__(self) -> RunstateClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def reader_alive(self) -> bool:
        """Whether results can still arrive: the reader task runs."""
        return self._reader is not None and not self._reader.done()

    @property
    def pending(self) -> int:
        """Requests waiting for their result."""
        return len(self._by_command)

    @property
    def reading_partitions(self) -> frozenset[int]:
        """The result-topic partitions this client fetches now."""
        return frozenset(self._reading)

    async def start(self) -> None:
        s = self.settings
        self._stopping = False
        self._producer = AIOKafkaProducer(
            **kafka_options(s),
            enable_idempotence=True,
            linger_ms=2,
            client_id=self._client_id,
            max_request_size=max(s.max_command_bytes + PRODUCER_HEADROOM, 1_048_576),
        )
        await start_client(self._producer, s)
        # No consumer group: each client reads the partitions its own requests'
        # results land on, so any number of clients can wait independently.
        self._consumer = AIOKafkaConsumer(
            **kafka_options(s),
            enable_auto_commit=False,
            client_id=self._client_id,
        )
        try:
            await self._consumer.start()
            self._partitions = await self._result_partitions()
            tps = [TopicPartition(s.result_topic, p) for p in self._partitions]
            self._consumer.assign(tps)
            # Every partition starts paused at an explicit offset (no pending
            # offset reset that could land after a later seek); a partition is
            # sought to its end and resumed when a request first needs it.
            for tp in tps:
                self._consumer.seek(tp, 0)
            self._consumer.pause(*tps)
        except BaseException:
            await self._consumer.stop()
            await self._producer.stop()
            raise
        self._reader = asyncio.create_task(self._read_results(), name=f"{self._client_id}-results")
        self._reader.add_done_callback(self._reader_ended)

    async def _result_partitions(self) -> list[int]:
        assert self._consumer is not None and self._producer is not None
        topic = self.settings.result_topic
        # Listing all topics first: asking for one topic's metadata could make a
        # broker that auto-creates topics create it with the wrong partition count.
        for _ in range(100):
            if topic in await self._consumer.topics():
                return sorted(await self._producer.partitions_for(topic))
            await asyncio.sleep(0.1)
        raise RuntimeError(f"topic {topic} does not exist (is the runstate service running?)")

    async def stop(self) -> None:
        self._stopping = True
        if self._reader:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
            except Exception:  # noqa: BLE001 - logged by _reader_ended
                pass
        self._fail_pending(RunstateUnavailable("the client was stopped"))
        if self._consumer:
            await self._consumer.stop()
        if self._producer:
            await self._producer.stop()

    # -- the result reader ----------------------------------------------------
    async def _read_results(self) -> None:
        assert self._consumer is not None
        delay = READ_RETRY_S[0]
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=200, max_records=5000)
            except KafkaError as exc:
                # The broker is away or the cluster is moving: keep trying, the
                # fetch positions are kept.
                log.warning("reading %s failed (%s); retrying in %.1fs", self.settings.result_topic, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, READ_RETRY_S[1])
                continue
            delay = READ_RETRY_S[0]
            for records in batches.values():
                for record in records:
                    self._deliver(record.key, record.value, record.partition, record.offset, record.headers)
            self._pause_idle_partitions()

    def _reader_ended(self, task: asyncio.Task[None]) -> None:
        if self._stopping:
            return
        exc = None if task.cancelled() else task.exception()
        log.error("the result reader of %s stopped: %r", self._client_id, exc or "cancelled", exc_info=exc)
        self._fail_pending(RunstateUnavailable(f"the result reader stopped: {exc!r}" if exc else
                                               "the result reader was cancelled"))

    def _fail_pending(self, exc: Exception) -> None:
        for waiter in list(self._by_command.values()):
            if not waiter.future.done():
                waiter.future.set_exception(exc)
                waiter.future.exception()  # a submit() future nobody awaits must not log it again

    def _deliver(self, key: bytes | None, value: bytes | None, partition: int, offset: int,
                 headers: Any = None) -> None:
        """Resolve the waiters this record answers. Never raises: a record that is not
        a result is skipped, so no record on the topic can stop the reader."""
        try:
            if value is None:
                raise ValueError("tombstone")
            event = OrchestrationResultEvent.model_validate_json(value)
        except Exception as exc:  # noqa: BLE001 - any bytes may arrive; none may stop the reader
            self.skipped_records += 1
            log.warning("skipped a record on %s[%d]@%d that is not a result: %s",
                        self.settings.result_topic, partition, offset, _first_line(exc))
            return
        waiters: list[_Waiter] = []
        by_command = self._by_command.get(event.command_id)
        if by_command is not None:
            waiters.append(by_command)
        if event.transition_id is not None and event.stream_id is not None:
            waiters += [w for w in self._by_transition.get((event.stream_id, event.transition_id), ())
                        if w is not by_command]
        answer: OrchestrationResultEvent | LimitResultEvent = event
        for waiter in waiters:
            if key != waiter.key:
                # A result is keyed by its run: one keyed otherwise did not come
                # from the service's decision of this run.
                self.skipped_records += 1
                log.warning("skipped a result on %s[%d]@%d for command %s keyed %r instead of %r",
                            self.settings.result_topic, partition, offset, event.command_id, key, waiter.key)
                continue
            if not waiter.future.done():
                if waiter.limit and not isinstance(answer, LimitResultEvent):
                    try:  # the limit commands' answers are read whole only for their waiters
                        answer = LimitResultEvent.model_validate_json(value)
                    except Exception as exc:  # noqa: BLE001 - any bytes may arrive; none may stop the reader
                        self.skipped_records += 1
                        log.warning("skipped a record on %s[%d]@%d that is not a limit result: %s",
                                    self.settings.result_topic, partition, offset, _first_line(exc))
                        return
                if waiter.span is not None:
                    _tracing().record_result(waiter.span, event, headers)
                waiter.future.set_result(answer if waiter.limit else event)

    def _pause_idle_partitions(self) -> None:
        assert self._consumer is not None
        now = time.monotonic()
        idle = [p for p in self._reading
                if not self._waiting[p] and p not in self._seeking
                and now - self._last_wait.get(p, 0.0) > READ_LINGER_S]
        if idle:
            self._consumer.pause(*(TopicPartition(self.settings.result_topic, p) for p in idle))
            self._reading.difference_update(idle)

    async def _read_partition(self, partition: int) -> None:
        """Make sure the reader fetches `partition` from at most its current end on.
        Called after the waiter is registered and before the command is sent, so the
        result, written after the command, is at or after that end."""
        while partition not in self._reading:
            seeking = self._seeking.get(partition)
            if seeking is None:
                await self._seek_to_end(partition)
                return
            await asyncio.wait([seeking])  # another request is seeking it already
            if not seeking.cancelled() and seeking.exception() is not None:
                raise seeking.exception()  # type: ignore[misc]

    async def _seek_to_end(self, partition: int) -> None:
        assert self._consumer is not None
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._seeking[partition] = done
        try:
            tp = TopicPartition(self.settings.result_topic, partition)
            end = (await self._consumer.end_offsets([tp]))[tp]
            self._consumer.seek(tp, end)
            self._consumer.resume(tp)
            self._reading.add(partition)
            done.set_result(None)
        except asyncio.CancelledError:
            done.cancel()
            raise
        except BaseException as exc:
            done.set_exception(exc)
            done.exception()  # marked as retrieved: the other waiters re-raise it
            raise
        finally:
            del self._seeking[partition]

    # -- waiters ----------------------------------------------------------------
    def _partition_of(self, key: bytes) -> int:
        return DefaultPartitioner()(key, self._partitions, self._partitions)

    def _register(self, command: Command, transition: tuple[UUID, UUID] | None) -> _Waiter:
        if self._producer is None or self._stopping:
            raise RunstateUnavailable("call start() first")
        if not self.reader_alive:
            raise RunstateUnavailable("the result reader is not running; see the log for why")
        assert command.command_id is not None
        key = str(stream_id_of(command)).encode()
        waiter = _Waiter(asyncio.get_running_loop().create_future(), key, self._partition_of(key),
                         command.command_id, transition, limit=command.kind in LIMIT_KINDS)
        if self._tracer is not None:
            waiter.span, waiter.headers = _tracing().start_request(self._tracer, command, self.settings.command_topic)
        self._by_command[waiter.command_id] = waiter
        if transition is not None:
            self._by_transition.setdefault(transition, []).append(waiter)
        self._waiting[waiter.partition] += 1
        # Whatever ends the future (result, timeout, cancellation, a dead reader),
        # the waiter is forgotten with it.
        waiter.future.add_done_callback(lambda _: self._forget(waiter))
        return waiter

    def _forget(self, waiter: _Waiter) -> None:
        if waiter.span is not None:
            future = waiter.future
            failure = RunstateTimeout("no result: timed out or cancelled") if future.cancelled() else future.exception()
            _tracing().end_request(waiter.span, failure)
        if self._by_command.get(waiter.command_id) is waiter:
            del self._by_command[waiter.command_id]
        if waiter.transition is not None:
            same = self._by_transition.get(waiter.transition, [])
            if waiter in same:
                same.remove(waiter)
            if not same:
                self._by_transition.pop(waiter.transition, None)
        self._waiting[waiter.partition] -= 1
        if self._waiting[waiter.partition] <= 0:
            del self._waiting[waiter.partition]
        self._last_wait[waiter.partition] = time.monotonic()

    async def _send(self, command: Command, transition: tuple[UUID, UUID] | None) -> _Waiter:
        value = command.model_dump_json().encode()
        if len(value) > self.settings.max_command_bytes:
            raise CommandTooLarge(
                f"the command is {len(value)} bytes; the command topic takes at most "
                f"{self.settings.max_command_bytes} (RUNSTATE_MAX_COMMAND_BYTES)"
            )
        waiter = self._register(command, transition)
        sending = asyncio.ensure_future(self._publish(waiter, value))
        try:
            # The waiter may fail first (the reader died, the client stopped):
            # then the caller hears it now, not after the broker's timeout.
            either: list[asyncio.Future[Any]] = [sending, waiter.future]
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            failed = waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception()
            if failed and not sending.done():
                sending.cancel()
                raise waiter.future.exception()  # type: ignore[misc]
            await sending
        except BaseException:
            sending.cancel()
            waiter.future.cancel()
            raise
        return waiter

    async def _publish(self, waiter: _Waiter, value: bytes) -> None:
        await self._read_partition(waiter.partition)
        assert self._producer is not None
        headers = [(SCHEMA_VERSION_HEADER, str(SCHEMA_VERSION).encode())]
        if waiter.headers:
            headers += waiter.headers
        delivered = await self._producer.send(self.settings.command_topic, value, key=waiter.key, headers=headers)
        await delivered

    @staticmethod
    def _transition_of(command: Command) -> tuple[UUID, UUID] | None:
        if isinstance(command, SetStateCommand) and command.state.state_details.transition_id is not None:
            return (command.task_run_id, command.state.state_details.transition_id)
        return None

    @overload
    async def request(self, command: LimitCommand, timeout: float = 30.0) -> LimitResultEvent: ...
    @overload
    async def request(self, command: RunCommand, timeout: float = 30.0) -> OrchestrationResultEvent: ...
    async def request(self, command: Command, timeout: float = 30.0) -> OrchestrationResultEvent | LimitResultEvent:
        """Publish a prepared command (with its command_id set) keyed by its run
        (a limit command: by its tag's `limit_id`) and wait at most `timeout`
        seconds for its result (a LimitResultEvent for a limit command).

        Raises RunstateTimeout when no result came in time (the command stays on
        the topic and is decided later all the same), RunstateUnavailable when the
        client cannot receive results, CommandTooLarge before sending a command the
        topic would not take.
        """
        return await self._request(command, timeout)

    async def _request(self, command: Command, timeout: float) -> OrchestrationResultEvent | LimitResultEvent:
        waiter = await self._send(command, self._transition_of(command))
        try:
            # wait_for cancels the future on timeout and when the caller is
            # cancelled; either way its done-callback forgets the waiter.
            answer: OrchestrationResultEvent | LimitResultEvent = await asyncio.wait_for(waiter.future, timeout)
            return answer
        except TimeoutError as exc:
            if not waiter.future.cancelled():
                raise
            raise RunstateTimeout(f"no result for command {command.command_id} within {timeout:g} s") from exc

    # -- commands -------------------------------------------------------------
    async def submit(
        self,
        task_run_id: UUID,
        state: StateCreate | dict[str, Any],
        *,
        force: bool = False,
        transition_id: UUID | None = None,
    ) -> tuple[UUID, asyncio.Future[OrchestrationResultEvent]]:
        """Publish a set_state command; returns its command id and the future of its
        result. Cancel the future to stop waiting (nothing else holds on to it)."""
        command = set_state_command(task_run_id, state, force=force, transition_id=transition_id)
        waiter = await self._send(command, self._transition_of(command))
        assert command.command_id is not None  # set_state_command always sets one
        return command.command_id, waiter.future

    async def propose(
        self,
        task_run_id: UUID,
        state: StateCreate | dict[str, Any],
        *,
        force: bool = False,
        transition_id: UUID | None = None,
        timeout: float = 30.0,
    ) -> OrchestrationResultEvent:
        command = set_state_command(task_run_id, state, force=force, transition_id=transition_id)
        return await self.request(command, timeout)

    async def create_task_run(
        self,
        task_run_id: UUID | None = None,
        *,
        name: str = "",
        flow_run_id: UUID | None = None,
        task_key: str = "",
        dynamic_key: str = "",
        tags: list[str] | None = None,
        cache_key: str | None = None,
        cache_expiration: datetime | None = None,
        empirical_policy: EmpiricalPolicy | dict[str, Any] | None = None,
        state: StateCreate | dict[str, Any] | None = None,
        timeout: float = 30.0,
    ) -> OrchestrationResultEvent:
        command = CreateTaskRunCommand(
            command_id=uuid.uuid4(),
            id=task_run_id or uuid.uuid4(),
            name=name,
            flow_run_id=flow_run_id,
            task_key=task_key,
            dynamic_key=dynamic_key,
            tags=tags or [],
            cache_key=cache_key,
            cache_expiration=cache_expiration,
            empirical_policy=EmpiricalPolicy.model_validate(empirical_policy or {}),
            state=StateCreate.model_validate(state) if isinstance(state, dict) else state,
        )
        return await self.request(command, timeout)

    async def create_flow_run(
        self, flow_run_id: UUID | None = None, *, name: str = "", state: StateCreate | dict | None = None,
        timeout: float = 30.0,
    ) -> OrchestrationResultEvent:
        command = CreateFlowRunCommand(
            command_id=uuid.uuid4(),
            id=flow_run_id or uuid.uuid4(),
            name=name,
            state=StateCreate.model_validate(state) if isinstance(state, dict) else state,
        )
        return await self.request(command, timeout)

    async def set_flow_run_state(
        self, flow_run_id: UUID, state: StateCreate | dict[str, Any], *, timeout: float = 30.0
    ) -> OrchestrationResultEvent:
        command = SetFlowRunStateCommand(
            command_id=uuid.uuid4(),
            flow_run_id=flow_run_id,
            state=state if isinstance(state, StateCreate) else StateCreate.model_validate(state),
        )
        return await self.request(command, timeout)

    async def set_concurrency_limit(
        self, tag: str, concurrency_limit: int, *, active: bool | None = None, timeout: float = 30.0
    ) -> LimitResultEvent:
        """Create or change the limit of `tag` (its active slots are kept; `active` too unless given)."""
        command = SetConcurrencyLimitCommand(command_id=uuid.uuid4(), tag=tag,
                                             concurrency_limit=concurrency_limit, active=active)
        return await self.request(command, timeout)

    async def delete_concurrency_limit(self, tag: str, *, timeout: float = 30.0) -> LimitResultEvent:
        """Remove the limit of `tag`; the answer's error is `unknown_limit` when it has none."""
        return await self.request(DeleteConcurrencyLimitCommand(command_id=uuid.uuid4(), tag=tag), timeout)


class SyncRunstateClient:
    """`RunstateClient` for code that is not async: the client runs on its own event
    loop in a daemon thread, and every method blocks until its answer is in.

        with SyncRunstateClient() as client:
            client.create_task_run(run_id)
            answer = client.propose(run_id, state("RUNNING"))

    Safe to call from several threads at once; do not call it from inside a
    callback running on its own loop.
    """

    def __init__(self, settings: WorkerSettings | None = None, *, client_id: str = "runstate-client",
                 tracer_provider: Any = None) -> None:
        self.client = RunstateClient(settings, client_id=client_id, tracer_provider=tracer_provider)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> SyncRunstateClient:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="runstate-client", daemon=True)
        self._thread.start()
        try:
            self._run(self.client.start())
        except BaseException:
            self._close_loop()
            raise

    def stop(self) -> None:
        if self._loop is None:
            return
        try:
            self._run(self.client.stop())
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        assert self._loop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        self._loop = None
        self._thread = None

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if self._loop is None:
            coroutine.close()
            raise RunstateUnavailable("call start() first")
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError("SyncRunstateClient called from its own event loop; use .client (async) there")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    @property
    def reader_alive(self) -> bool:
        return self.client.reader_alive

    @overload
    def request(self, command: LimitCommand, timeout: float = 30.0) -> LimitResultEvent: ...
    @overload
    def request(self, command: RunCommand, timeout: float = 30.0) -> OrchestrationResultEvent: ...
    def request(self, command: Command, timeout: float = 30.0) -> OrchestrationResultEvent | LimitResultEvent:
        return self._run(self.client._request(command, timeout))

    def set_concurrency_limit(self, tag: str, concurrency_limit: int, *, active: bool | None = None,
                              timeout: float = 30.0) -> LimitResultEvent:
        return self._run(self.client.set_concurrency_limit(tag, concurrency_limit, active=active, timeout=timeout))

    def delete_concurrency_limit(self, tag: str, *, timeout: float = 30.0) -> LimitResultEvent:
        return self._run(self.client.delete_concurrency_limit(tag, timeout=timeout))

    def submit(
        self, task_run_id: UUID, state: StateCreate | dict[str, Any], *, force: bool = False,
        transition_id: UUID | None = None,
    ) -> tuple[UUID, concurrent.futures.Future[OrchestrationResultEvent]]:
        """Publish a set_state command; returns its command id and a
        concurrent.futures.Future of its result (cancel it to stop waiting)."""
        command_id, future = self._run(
            self.client.submit(task_run_id, state, force=force, transition_id=transition_id))
        assert self._loop is not None
        return command_id, asyncio.run_coroutine_threadsafe(_await(future), self._loop)

    def propose(
        self, task_run_id: UUID, state: StateCreate | dict[str, Any], *, force: bool = False,
        transition_id: UUID | None = None, timeout: float = 30.0,
    ) -> OrchestrationResultEvent:
        return self._run(self.client.propose(task_run_id, state, force=force, transition_id=transition_id,
                                             timeout=timeout))

    def create_task_run(self, task_run_id: UUID | None = None, **fields: Any) -> OrchestrationResultEvent:
        """Same keyword arguments as RunstateClient.create_task_run."""
        return self._run(self.client.create_task_run(task_run_id, **fields))

    def create_flow_run(self, flow_run_id: UUID | None = None, **fields: Any) -> OrchestrationResultEvent:
        return self._run(self.client.create_flow_run(flow_run_id, **fields))

    def set_flow_run_state(
        self, flow_run_id: UUID, state: StateCreate | dict[str, Any], *, timeout: float = 30.0
    ) -> OrchestrationResultEvent:
        return self._run(self.client.set_flow_run_state(flow_run_id, state, timeout=timeout))


def _tracing() -> Any:
    from runstate.obs import tracing

    return tracing


def _tracer(provider: Any) -> Any:
    """The requests' tracer, or None where the OpenTelemetry API is not installed."""
    try:
        from runstate.obs.tracing import client_tracer
    except ImportError:
        return None
    return client_tracer(provider)


async def _await(future: Awaitable[T]) -> T:
    return await future


def set_state_command(
    task_run_id: UUID,
    state: StateCreate | dict[str, Any],
    *,
    force: bool = False,
    transition_id: UUID | None = None,
) -> SetStateCommand:
    """A set_state command with a fresh command id and a transition id (the
    given one, the proposal's, or a new one): the key that makes a resend safe."""
    proposal = state if isinstance(state, StateCreate) else StateCreate.model_validate(state)
    tid = transition_id or proposal.state_details.transition_id or uuid.uuid4()
    details = proposal.state_details.model_copy(update={"transition_id": tid})
    return SetStateCommand(
        command_id=uuid.uuid4(),
        task_run_id=task_run_id,
        state=proposal.model_copy(update={"state_details": details}),
        force=force,
    )


def state(type_: StateType | str, name: str | None = None, **details: Any) -> StateCreate:
    """Shorthand for a proposal: state("RUNNING"), state("SCHEDULED", scheduled_time=...)."""
    return StateCreate(type=StateType(type_), name=name, state_details=StateDetails(**details))


COMMIT_EVERY = 1000
"""state_changes(): events processed between offset commits, at most."""
COMMIT_INTERVAL_S = 1.0
"""state_changes(): seconds between offset commits, at most, while events arrive."""


async def state_changes(
    settings: WorkerSettings | None = None,
    *,
    group_id: str | None = None,
    from_beginning: bool = False,
    commit_every: int = COMMIT_EVERY,
    commit_interval: float = COMMIT_INTERVAL_S,
) -> AsyncGenerator[StateChangeEvent, None]:
    """Every appended state, in per-run order.

    With a group id, offsets are committed in batches: every `commit_every`
    events or `commit_interval` seconds, and when the iteration ends. An event
    counts as processed once the loop asks for the next one, so the event the
    loop was busy with when it stopped (an exception, a break) is delivered again
    to the group; after a crash, up to one batch is. At-least-once: de-duplicate
    on (task_run_id, seq). Records that are not a state change are skipped and
    logged.
    """
    s = settings or WorkerSettings.load()
    consumer = AIOKafkaConsumer(
        s.state_change_topic,
        **kafka_options(s),
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest" if from_beginning else "latest",
    )
    await consumer.start()
    processed: dict[TopicPartition, int] = {}
    since_commit = 0
    last_commit = time.monotonic()

    async def commit() -> None:
        nonlocal since_commit, last_commit
        if group_id is not None and processed:
            try:
                await consumer.commit(dict(processed))
            except KafkaError as exc:
                # A rebalance took partitions away: their events go to the new
                # owner again, which is what at-least-once allows.
                log.warning("committing state-change offsets failed (%s); they are delivered again", exc)
        processed.clear()
        since_commit = 0
        last_commit = time.monotonic()

    try:
        while True:
            batches = await consumer.getmany(timeout_ms=int(commit_interval * 1000) or 1, max_records=commit_every)
            for tp, records in batches.items():
                for record in records:
                    try:
                        if record.value is None:
                            raise ValueError("tombstone")
                        event = StateChangeEvent.model_validate_json(record.value)
                    except Exception as exc:  # noqa: BLE001 - no record may stop the subscriber
                        log.warning("skipped a record on %s[%d]@%d that is not a state change: %s",
                                    tp.topic, tp.partition, record.offset, _first_line(exc))
                    else:
                        yield event
                    processed[tp] = record.offset + 1
                    since_commit += 1
                    if since_commit >= commit_every or time.monotonic() - last_commit >= commit_interval:
                        await commit()
            if processed and time.monotonic() - last_commit >= commit_interval:
                await commit()
    finally:
        try:
            await commit()
        finally:
            await consumer.stop()


def sync_state_changes(settings: WorkerSettings | None = None, **options: Any) -> Iterator[StateChangeEvent]:
    """`state_changes()` for code that is not async (same options), on a private
    event loop; close the iterator (or leave its for loop) to commit and stop."""
    loop = asyncio.new_event_loop()
    changes = state_changes(settings, **options)
    try:
        while True:
            try:
                yield loop.run_until_complete(changes.__anext__())
            except StopAsyncIteration:
                return
    finally:
        try:
            loop.run_until_complete(changes.aclose())
        finally:
            loop.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]
