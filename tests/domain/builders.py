"""Small factories for runs, states, requests and contexts used across the domain tests.

Defaults model the "plain context" (docs/rules.md, 'The Core policy at a glance'): the task has
a flow run that is RUNNING and whose run_count equals the task's flow_run_run_count; no tags,
no cache, no retries.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from runstate.domain import (
    Decision,
    EmpiricalPolicy,
    FlowRunView,
    OrchestrationContext,
    SetStateRequest,
    State,
    StateDetails,
    StateType,
    TaskRunView,
    decide,
)

UTC = UTC
NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
EARLIER = NOW - timedelta(seconds=60)
RUN_ID = UUID("00000000-0000-4000-8000-00000000a001")
FLOW_RUN_ID = UUID("00000000-0000-4000-8000-00000000f001")
CURRENT_STATE_ID = UUID("00000000-0000-4000-8000-00000000c001")
NEW_STATE_ID = UUID("00000000-0000-4000-8000-00000000e001")
NEW_LEASE_ID = UUID("00000000-0000-4000-8000-00000000b001")

S = StateType


def state(
    type_: StateType,
    *,
    name: str | None = None,
    at: datetime = EARLIER,
    data: Any = None,
    message: str | None = None,
    id: UUID = CURRENT_STATE_ID,
    **details: Any,
) -> State:
    return State(
        id=id,
        type=type_,
        name=name,
        timestamp=at,
        message=message,
        data=data,
        state_details=StateDetails(**details),
    )


def run(current: State | None = None, **fields: Any) -> TaskRunView:
    values: dict[str, Any] = dict(
        id=RUN_ID,
        flow_run_id=FLOW_RUN_ID,
        task_key="my-task",
        state=current,
        run_count=1,
        flow_run_run_count=1,
    )
    policy = fields.pop("policy", None)
    if policy is not None:
        values["empirical_policy"] = EmpiricalPolicy(**policy)
    values.update(fields)
    return TaskRunView(**values)


def flow_run(state_type: StateType | None = S.RUNNING, **fields: Any) -> FlowRunView:
    return FlowRunView(**{"id": FLOW_RUN_ID, "state_type": state_type, "run_count": 1, **fields})


def context(**overrides: Any) -> OrchestrationContext:
    values: dict[str, Any] = dict(
        now=NOW,
        new_state_id=NEW_STATE_ID,
        new_lease_id=NEW_LEASE_ID,
        random=0.5,
        flow_run=flow_run(),
    )
    values.update(overrides)
    return OrchestrationContext(**values)


def request(
    type_: StateType,
    *,
    force: bool = False,
    name: str | None = None,
    message: str | None = None,
    data: Any = None,
    **details: Any,
) -> SetStateRequest:
    body: dict[str, Any] = {"type": type_.value, "message": message, "data": data, "state_details": details}
    if name is not None:
        body["name"] = name
    return SetStateRequest.model_validate({"state": body, "force": force})


def propose(
    the_run: TaskRunView,
    type_: StateType,
    ctx: OrchestrationContext | None = None,
    **request_fields: Any,
) -> Decision:
    return decide(the_run, request(type_, **request_fields), ctx or context())


def effect_kinds(decision: Decision) -> list[str]:
    return [effect.kind for effect in decision.effects]
