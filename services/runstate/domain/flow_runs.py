"""Flow-run states as runstate records them: as given, with no policy.

runstate does not orchestrate flow runs; it records their states so that the
task rules that read the enclosing flow run (R2's rename, R3's stopped flow,
R9's pause) see it. Every proposal is written as the state it names.
"""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from .run import FlowRunView
from .states import State, StateCreate, StateType


def record_flow_state(
    flow: FlowRunView, proposed: StateCreate, now: datetime, state_id: UUID
) -> tuple[State, FlowRunView]:
    """The state written for `proposed` and the flow run after it."""
    details = proposed.state_details
    if proposed.type == StateType.SCHEDULED and details.scheduled_time is None:
        details = details.model_copy(update={"scheduled_time": now})
    details = details.model_copy(update={"flow_run_id": flow.id})
    state = State(
        id=state_id,
        type=proposed.type,
        name=proposed.name,
        timestamp=now,
        message=proposed.message,
        data=proposed.data,
        state_details=details,
    )
    after = flow.model_copy(
        update={
            "state_type": state.type,
            "state_name": state.name,
            "run_count": flow.run_count + (1 if state.type == StateType.RUNNING else 0),
            "pause_timeout": details.pause_timeout,
            "pause_reschedule": bool(details.pause_reschedule),
        }
    )
    return state, after
