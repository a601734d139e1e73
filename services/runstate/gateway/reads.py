"""What the gateway reads, straight from PostgreSQL: the projections the consumer
keeps (task_runs, flow_runs, tag_concurrency_limits, tag_leases) and the event log,
by the queries of store/queries.py, as Prefect's models.

Kafka is never read for an answer: a result event only says that a command was
decided; the body the client sees is read back from what was committed (the
consumer publishes results after its transaction commits, so the read sees them).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, overload
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncEngine

from runstate.domain import TERMINAL_TYPES, EmpiricalPolicy, State, StateType, TaskRunView, stored_data
from runstate.events import appended_with_columns
from runstate.messages import limit_id
from runstate.store import queries as q
from runstate.store.queries import first_async, rows_async

from .models import ConcurrencyLimit, FlowRun, TaskRun


@overload
def _as_read(state: State) -> State: ...
@overload
def _as_read(state: None) -> None: ...
def _as_read(state: State | None) -> State | None:
    # Reading a state back gives its data as stored (docs/rules.md, 'Reading state data back'): the
    # "unpersisted" marker reads as null, artifact_* keys are gone.
    if state is None:
        return None
    return state.model_copy(update={"data": stored_data(state)})


def _appended(row: Any) -> State:
    """An appended state as read back, whole again when the event stored it compact."""
    state = row.state
    if isinstance(state, dict):
        state = appended_with_columns(state, row.stream_id, row.transition_id, row.state_id)
    return _as_read(State.model_validate(state))


class GatewayReads:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def ping(self) -> None:
        await first_async(self.engine, q.PING)

    # -- task runs --------------------------------------------------------------
    async def task_run(self, run_id: UUID) -> TaskRun | None:
        row = await first_async(self.engine, q.TASK_RUN_BY_ID, {"id": run_id})
        return _task_run(row) if row else None

    async def task_run_by_key(self, flow_run_id: UUID | None, task_key: str, dynamic_key: str) -> TaskRun | None:
        """Prefect answers a create with the existing run when (flow_run_id, task_key,
        dynamic_key) is taken; the gateway checks the projection before sending."""
        row = await first_async(self.engine, q.task_run_by_key(flow_run_id),
                                {"f": flow_run_id, "k": task_key, "d": dynamic_key})
        return _task_run(row) if row else None

    async def task_run_states(self, run_id: UUID) -> list[State]:
        """The run's appended states (accepted proposals and rule replacements), in log order."""
        found = await rows_async(self.engine, q.TASK_RUN_STATES, {"id": run_id})
        return [_appended(row) for row in found]

    async def task_run_state(self, state_id: UUID) -> State | None:
        row = await first_async(self.engine, q.TASK_RUN_STATE, {"sid": state_id})
        return _appended(row) if row else None

    # -- flow runs --------------------------------------------------------------
    async def flow_run(self, run_id: UUID) -> FlowRun | None:
        row = await first_async(self.engine, q.FLOW_RUN, {"id": run_id})
        if row is None:
            return None
        view, command = row.view, row.command
        state = State.model_validate(row.state) if row.state else None
        return FlowRun(
            id=run_id,
            created=row.created,
            updated=row.updated_at,
            name=command.get("name") or "",
            # Flow runs created outside the gateway (RunstateClient) carry no flow id;
            # Prefect's model requires one, so they read as the nil UUID.
            flow_id=command.get("flow_id") or uuid.UUID(int=0),
            state_id=state.id if state else None,
            state_type=view.get("state_type"),
            state_name=view.get("state_name"),
            run_count=view.get("run_count", 0),
            state=_as_read(state),
        )

    async def flow_run_state_at(self, run_id: UUID, seq: int) -> State | None:
        row = await first_async(self.engine, q.FLOW_RUN_STATE_AT, {"id": run_id, "seq": seq})
        return State.model_validate(row.state) if row and row.state else None

    async def flow_run_states(self, run_id: UUID) -> list[State]:
        found = await rows_async(self.engine, q.FLOW_RUN_STATES, {"id": run_id})
        return [_as_read(State.model_validate(row.state)) for row in found]

    # -- tag concurrency limits (changed by commands, read here) ----------------
    async def limit_by_tag(self, tag: str) -> ConcurrencyLimit | None:
        row = await first_async(self.engine, q.PREFECT_LIMIT, {"tag": tag})
        return _limit(row) if row else None

    async def tag_of_limit(self, id_: UUID) -> str | None:
        # Limits are few; deriving each id is cheaper than a column nobody else needs.
        tags = [row.tag for row in await rows_async(self.engine, q.LIMIT_TAGS)]
        return next((t for t in tags if limit_id(t) == id_), None)


def _task_run(row: Any) -> TaskRun:
    view = TaskRunView.model_validate(row.view)
    state = view.state
    now = datetime.now(UTC)
    estimated_run_time = view.total_run_time
    if state is not None and state.type is StateType.RUNNING:
        estimated_run_time += max(0.0, (now - state.timestamp).total_seconds())
    return TaskRun(
        id=view.id,
        created=row.created,
        updated=row.updated_at,
        name=view.name or f"{view.task_key or 'task'}-{view.id.hex[:8]}",
        flow_run_id=view.flow_run_id,
        task_key=view.task_key,
        dynamic_key=view.dynamic_key,
        cache_key=view.cache_key,
        cache_expiration=row.cache_expiration,
        empirical_policy=view.empirical_policy or EmpiricalPolicy(),
        tags=view.tags,
        state_id=state.id if state else None,
        state_type=state.type if state else None,
        state_name=state.name if state else None,
        run_count=view.run_count,
        flow_run_run_count=view.flow_run_run_count,
        expected_start_time=view.expected_start_time,
        next_scheduled_start_time=view.next_scheduled_start_time,
        start_time=view.start_time,
        end_time=view.end_time,
        total_run_time=view.total_run_time,
        estimated_run_time=estimated_run_time,
        estimated_start_time_delta=_lateness(view, now),
        state=state,
    )


def _lateness(view: TaskRunView, now: datetime) -> float:
    """Prefect's estimated_start_time_delta: how late the run started, or is so far."""
    expected = view.expected_start_time
    if expected is None:
        return 0.0
    if view.start_time is not None:
        return max(0.0, (view.start_time - expected).total_seconds())
    if view.state is not None and view.state.type in TERMINAL_TYPES:
        return 0.0
    return max(0.0, (now - expected).total_seconds())


def _limit(row: Any) -> ConcurrencyLimit:
    return ConcurrencyLimit(
        id=limit_id(row.tag),
        created=None,
        updated=row.updated_at,
        tag=row.tag,
        concurrency_limit=row.limit,
        active_slots=list(row.holders or []),
    )
