"""The stored event: its types and the shape of its payload, in one place.

The decider writes these payloads (assembled from pre-serialised parts, in the
field order of the models below, see pipeline/message_json.py); history,
replay, rebuild, backfill and the gateway read them. A test checks that every
JSON path the readers' SQL uses names a field of these models.

A task-run event stores each fact once: the command as received, the context
(what the decision read besides the run), and the decision without its
repetitions. The result and state-change messages it published are rendered
again from these and the event's columns (pipeline/message_json.py,
`stored_messages`). Events written before this shape (LegacyTaskRunEventPayload)
stay as they are; every reader accepts both (`recorded_decision` here).

Each event also stores a hash chained to the previous event of its stream
(`event_hash`), so that a rewrite of the log by its owner, who can disable the
append-only triggers, is visible to `runstate replay --verify`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from pydantic import BaseModel

from runstate.domain import Decision, Effect, FlowRunView, OrchestrationContext, State, TagLimit, TaskRunView
from runstate.domain.results import ResultDetails
from runstate.messages import LimitResultEvent, OrchestrationResultEvent, StateChangeEvent


class StreamType(StrEnum):
    TASK_RUN = "task_run"
    FLOW_RUN = "flow_run"
    CONCURRENCY_LIMIT = "concurrency_limit"  # one stream per tag, its id limit_id(tag)


class EventType(StrEnum):
    TASK_RUN_CREATED = "task_run_created"
    TRANSITION_DECIDED = "transition_decided"
    FLOW_RUN_CREATED = "flow_run_created"
    FLOW_RUN_STATE_SET = "flow_run_state_set"
    CONCURRENCY_LIMIT_SET = "concurrency_limit_set"
    CONCURRENCY_LIMIT_DELETED = "concurrency_limit_deleted"


TASK_RUN_EVENTS = (EventType.TASK_RUN_CREATED, EventType.TRANSITION_DECIDED)
FLOW_RUN_EVENTS = (EventType.FLOW_RUN_CREATED, EventType.FLOW_RUN_STATE_SET)
LIMIT_EVENTS = (EventType.CONCURRENCY_LIMIT_SET, EventType.CONCURRENCY_LIMIT_DELETED)


class StoredDecision(BaseModel):
    """A Decision without what repeats: its result's state is `appended_state`,
    or `run.state` when nothing was appended; its status is the event's column."""

    details: ResultDetails
    appended_state: State | None
    run: TaskRunView
    effects: list[Effect]
    policy: str


class TaskRunEventPayload(BaseModel):
    """A task-run decision with everything it was decided from: replay re-decides
    `command` against the previous event's `decision.run` with `context`."""

    # The record's value as received; a proposal without a transition_id was
    # decided with the event's transition_id column.
    command: dict[str, Any]
    context: OrchestrationContext
    decision: StoredDecision
    schema_version: int  # of the messages published, which are rendered again from this event


class LegacyTaskRunEventPayload(BaseModel):
    """A task-run event as written before StoredDecision: every message in full."""

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


class LimitEventPayload(BaseModel):
    """A concurrency-limit change: the command as received and the limit it left
    (`limit` is null after a delete). Its `active_slots` is the count when the change
    was made; rebuild recomputes the live count from the leases."""

    command: dict[str, Any]
    limit: TagLimit | None
    result_event: LimitResultEvent
    state_change: None = None


def recorded_decision(payload: Mapping[str, Any], status: str | None) -> dict[str, Any] | None:
    """A task-run event's decision as Decision's JSON, from either payload shape
    (`status` is the event's column); None when the payload records none."""
    decision = payload.get("decision")
    if not isinstance(decision, Mapping):
        return None
    if "result" in decision:  # LegacyTaskRunEventPayload
        return dict(decision)
    run = decision.get("run")
    appended = decision.get("appended_state")
    state = appended if appended is not None else (run.get("state") if isinstance(run, Mapping) else None)
    return {
        "result": {"state": state, "status": status, "details": decision.get("details")},
        "appended_state": appended,
        "run": run,
        "effects": decision.get("effects"),
        "policy": decision.get("policy"),
    }


def recorded_command(payload: Mapping[str, Any], transition_id: object | None) -> dict[str, Any] | None:
    """A task-run event's command as it was decided: a set_state's proposal
    carries the transition_id the pipeline filled in (the event's column)."""
    command = payload.get("command")
    if not isinstance(command, Mapping):
        return None
    command = dict(command)
    state = command.get("state")
    if command.get("kind") == "set_task_run_state" and isinstance(state, Mapping) and transition_id is not None:
        details = state.get("state_details")
        details = dict(details) if isinstance(details, Mapping) else {}
        if details.get("transition_id") is None:
            details["transition_id"] = str(transition_id)
            command["state"] = {**state, "state_details": details}
    return command


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
    chunks = [previous]
    for part in (stream_id, seq, stream_type, event_type, command_id, transition_id, status, state_type,
                 state_name, state_id, source_topic, source_partition, source_offset):
        data = b"" if part is None else str(part).encode()
        chunks += (len(data).to_bytes(8, "big"), data)
    digest = source_digest or b""
    text = payload.encode()
    chunks += (len(digest).to_bytes(8, "big"), digest, len(text).to_bytes(8, "big"), text)
    # One update over the joined bytes: the same digest as an update per chunk, for less call overhead.
    return hashlib.sha256(b"".join(chunks)).digest()
