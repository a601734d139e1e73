"""Typed Python clients for workers and downstream subscribers.

`RunstateClient.propose(...)` publishes a set_state command keyed by run id
and awaits its orchestration result, matched by command id or, for a retried
command, by transition id (a duplicate is answered with the stored result,
which carries the first command's id).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any
from uuid import UUID

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from runstate.config import WorkerSettings
from runstate.domain import EmpiricalPolicy, StateCreate, StateDetails, StateType
from runstate.messages import (
    Command,
    CreateFlowRunCommand,
    CreateTaskRunCommand,
    OrchestrationResultEvent,
    SetFlowRunStateCommand,
    SetStateCommand,
    StateChangeEvent,
    stream_id_of,
)


class RunstateTimeout(TimeoutError):
    """No result arrived in time. The command is still decided later; send it
    again with the same transition_id to get that decision."""


class RunstateClient:
    def __init__(self, settings: WorkerSettings | None = None, *, client_id: str = "runstate-client") -> None:
        self.settings = settings or WorkerSettings.load()
        self._client_id = client_id
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task[None] | None = None
        self._by_command: dict[UUID, asyncio.Future[OrchestrationResultEvent]] = {}
        self._by_transition: dict[tuple[UUID, UUID], asyncio.Future[OrchestrationResultEvent]] = {}

    async def __aenter__(self) -> "RunstateClient":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        s = self.settings
        self._producer = AIOKafkaProducer(
            bootstrap_servers=s.kafka_bootstrap_servers,
            enable_idempotence=True,
            linger_ms=2,
            client_id=self._client_id,
        )
        await self._producer.start()
        # No consumer group: every client reads every result from "now" on and
        # picks out its own, so any number of clients can wait independently.
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap_servers,
            enable_auto_commit=False,
            client_id=self._client_id,
        )
        await self._consumer.start()
        partitions = await self._wait_for_partitions(s.result_topic)
        self._consumer.assign(partitions)
        await self._consumer.seek_to_end(*partitions)
        for tp in partitions:  # resolve the end offsets before anything is sent
            await self._consumer.position(tp)
        self._reader = asyncio.create_task(self._read_results())

    async def _wait_for_partitions(self, topic: str) -> list[TopicPartition]:
        assert self._consumer is not None
        for _ in range(100):
            parts = self._consumer.partitions_for_topic(topic)
            if parts:
                return [TopicPartition(topic, p) for p in sorted(parts)]
            await self._consumer._client.force_metadata_update()  # noqa: SLF001
            await asyncio.sleep(0.1)
        raise RuntimeError(f"topic {topic} does not exist (is the runstate service running?)")

    async def stop(self) -> None:
        if self._reader:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
        if self._consumer:
            await self._consumer.stop()
        if self._producer:
            await self._producer.stop()

    async def _read_results(self) -> None:
        assert self._consumer is not None
        while True:
            batches = await self._consumer.getmany(timeout_ms=200, max_records=5000)
            for records in batches.values():
                for record in records:
                    self._deliver(record.value)

    def _deliver(self, value: bytes) -> None:
        event = OrchestrationResultEvent.model_validate_json(value)
        future = self._by_command.pop(event.command_id, None)
        if event.transition_id is not None and event.stream_id is not None:
            by_tid = self._by_transition.pop((event.stream_id, event.transition_id), None)
            future = future or by_tid
        if future is not None and not future.done():
            future.set_result(event)

    async def _send(
        self, command: Command, transition: tuple[UUID, UUID] | None
    ) -> asyncio.Future[OrchestrationResultEvent]:
        assert self._producer is not None, "call start() first"
        assert command.command_id is not None
        future: asyncio.Future[OrchestrationResultEvent] = asyncio.get_running_loop().create_future()
        self._by_command[command.command_id] = future
        if transition is not None:
            self._by_transition[transition] = future
        await self._producer.send(
            self.settings.command_topic, command.model_dump_json().encode(), key=str(stream_id_of(command)).encode()
        )
        return future

    @staticmethod
    def _transition_of(command: Command) -> tuple[UUID, UUID] | None:
        if isinstance(command, SetStateCommand) and command.state.state_details.transition_id is not None:
            return (command.task_run_id, command.state.state_details.transition_id)
        return None

    async def request(self, command: Command, timeout: float = 30.0) -> OrchestrationResultEvent:
        """Publish a prepared command (with its command_id set) keyed by its run
        and wait at most `timeout` seconds for its result.

        Raises RunstateTimeout when no result came in time; the command stays on
        the topic and is decided later all the same.
        """
        transition = self._transition_of(command)
        future = await self._send(command, transition)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError as exc:
            # Forget the waiter under both keys, or every timed-out request would
            # leave an entry behind for the life of the process.
            self._by_command.pop(command.command_id, None)
            if transition is not None:
                self._by_transition.pop(transition, None)
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
        """Publish a set_state command; returns its command id and the future of its result."""
        command = set_state_command(task_run_id, state, force=force, transition_id=transition_id)
        return command.command_id, await self._send(command, self._transition_of(command))

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


async def state_changes(
    settings: WorkerSettings | None = None,
    *,
    group_id: str | None = None,
    from_beginning: bool = False,
) -> AsyncIterator[StateChangeEvent]:
    """Every appended state, in per-run order. With a group id, offsets are
    committed after each event is yielded (at-least-once: de-duplicate on
    (task_run_id, seq))."""
    s = settings or WorkerSettings.load()
    consumer = AIOKafkaConsumer(
        s.state_change_topic,
        bootstrap_servers=s.kafka_bootstrap_servers,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest" if from_beginning else "latest",
    )
    await consumer.start()
    try:
        async for record in consumer:
            yield StateChangeEvent.model_validate_json(record.value)
            if group_id is not None:
                await consumer.commit({TopicPartition(record.topic, record.partition): record.offset + 1})
    finally:
        await consumer.stop()
