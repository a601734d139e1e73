"""Request-reply over Kafka for the gateway: publish one command, await its result.

Built on RunstateClient, so results are matched exactly as every other client
matches them (by command id, or by (run, transition_id) for a retried proposal,
whose stored answer carries the first command's id).
"""

from __future__ import annotations

import asyncio
from uuid import UUID

from runstate.client import RunstateClient, RunstateTimeout
from runstate.messages import (
    CreateFlowRunCommand,
    CreateTaskRunCommand,
    OrchestrationResultEvent,
    SetFlowRunStateCommand,
    SetStateCommand,
    stream_id_of,
)

GatewayCommand = CreateTaskRunCommand | SetStateCommand | CreateFlowRunCommand | SetFlowRunStateCommand


class CommandBus(RunstateClient):
    """One per gateway process, shared by all requests."""

    async def request(self, command: GatewayCommand, timeout: float) -> OrchestrationResultEvent:
        """Publish `command` keyed by its run and wait at most `timeout` seconds.

        Raises RunstateTimeout when no result came in time; the command stays on
        the topic and is decided later all the same.
        """
        assert command.command_id is not None
        run_id = stream_id_of(command)
        transition = None
        if isinstance(command, SetStateCommand):
            tid = command.state.state_details.transition_id
            assert tid is not None, "the gateway always sends a transition id"
            transition = (run_id, tid)
        future = await self._send(run_id, command, transition)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError as exc:
            # Forget the waiter under both keys, or every timed-out request would
            # leave an entry behind for the life of the process.
            self._forget(command.command_id, transition)
            raise RunstateTimeout(f"no result for command {command.command_id} within {timeout:g} s") from exc

    def _forget(self, command_id: UUID, transition: tuple[UUID, UUID] | None) -> None:
        self._by_command.pop(command_id, None)
        if transition is not None:
            self._by_transition.pop(transition, None)
