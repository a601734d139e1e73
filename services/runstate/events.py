"""The stored event: its types and the shape of its payload, in one place.

The decider writes these payloads (assembled from pre-serialised parts, in the
field order of the models below, see pipeline/message_json.py); history,
replay, rebuild, backfill and the gateway read them. A test checks that every
JSON path the readers' SQL uses names a field of these models.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel

from runstate.domain import Decision, FlowRunView, OrchestrationContext, State
from runstate.messages import OrchestrationResultEvent, StateChangeEvent


class StreamType(StrEnum):
    TASK_RUN = "task_run"
    FLOW_RUN = "flow_run"


class EventType(StrEnum):
    TASK_RUN_CREATED = "task_run_created"
    TRANSITION_DECIDED = "transition_decided"
    FLOW_RUN_CREATED = "flow_run_created"
    FLOW_RUN_STATE_SET = "flow_run_state_set"


TASK_RUN_EVENTS = (EventType.TASK_RUN_CREATED, EventType.TRANSITION_DECIDED)
FLOW_RUN_EVENTS = (EventType.FLOW_RUN_CREATED, EventType.FLOW_RUN_STATE_SET)


class TaskRunEventPayload(BaseModel):
    """A task-run decision with everything it was decided from: replay re-decides
    `command` against the previous event's `decision.run` with `context`."""

    command: dict[str, Any]  # the command as decided (transition_id filled in)
    context: OrchestrationContext
    decision: Decision
    result_event: OrchestrationResultEvent  # the very bytes published, republished on redelivery
    state_change: StateChangeEvent | None


class FlowRunEventPayload(BaseModel):
    """A flow-run state recorded as given."""

    command: dict[str, Any]
    state: State | None
    flow_run: FlowRunView
    result_event: OrchestrationResultEvent
    state_change: None = None
