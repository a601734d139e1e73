"""The stored event: its types and the shape of its payload, in one place.

The decider writes these payloads (assembled from pre-serialised parts, in the
field order of the models below, see pipeline/message_json.py); history,
replay, rebuild, backfill and the gateway read them. A test checks that every
JSON path the readers' SQL uses names a field of these models.

Each event also stores a hash chained to the previous event of its stream
(`event_hash`), so that a rewrite of the log by its owner, who can disable the
append-only triggers, is visible to `runstate replay --verify`.
"""

from __future__ import annotations

import hashlib
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


# The chain's start: the link before every stream's first event (and after an
# event stored before hashes were, which has none).
GENESIS = bytes(32)


def event_hash(
    previous: bytes,
    *,
    stream_id: object,
    seq: int,
    stream_type: str,
    event_type: str,
    command_id: object,
    transition_id: object | None,
    status: str | None,
    state_type: str | None,
    state_name: str | None,
    state_id: object | None,
    source_topic: str | None,
    source_partition: int | None,
    source_offset: int | None,
    source_digest: bytes | None,
    payload: str,
) -> bytes:
    """SHA-256 over the previous event's hash and every column of this one, each
    length-prefixed, the payload as the very text stored (json keeps it)."""
    h = hashlib.sha256(previous)
    for part in (stream_id, seq, stream_type, event_type, command_id, transition_id, status, state_type,
                 state_name, state_id, source_topic, source_partition, source_offset):
        data = b"" if part is None else str(part).encode()
        h.update(len(data).to_bytes(8, "big") + data)
    digest = source_digest or b""
    h.update(len(digest).to_bytes(8, "big") + digest)
    text = payload.encode()
    h.update(len(text).to_bytes(8, "big") + text)
    return h.digest()
