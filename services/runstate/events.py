"""The stored event: its types and the shape of its payload, in one place.

The decider writes these payloads (assembled from pre-serialised parts, in the
field order of the models below, see pipeline/message_json.py); history,
replay, rebuild, backfill and the gateway read them. A test checks that every
JSON path the readers' SQL uses names a field of these models.

A task-run event stores each fact once: the command (as received, without what
the event's columns hold: `recorded_command`), the context (what the decision
read besides the run), and the decision without its repetitions, every member
equal to its default left out, and the run after it only as far as it is not
found elsewhere (TaskRunEventPayload, the lean shape). Its appended state leaves
out what the event's columns hold when they hold it (`StoredState`). The result and state-change messages it published are rendered again
from these and the event's columns (pipeline/message_json.py,
`stored_messages`). Events written in the shapes before
(LegacyTaskRunEventPayload: every message in full; FullTaskRunEventPayload: the
whole run, every member) stay as they are; every reader accepts all three
(`recorded_decision` and `inherit_run` here).

Each event also stores a hash chained to the previous event of its stream
(`event_hash`), so that a rewrite of the log by its owner, who can disable the
append-only triggers, is visible to `runstate replay --verify`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from enum import StrEnum
from functools import cache
from typing import Any, get_args
from uuid import UUID

from pydantic import BaseModel, Field
from pydantic.fields import FieldInfo
from pydantic_core import from_json, to_jsonable_python

from runstate.domain import Decision, Effect, FlowRunView, OrchestrationContext, State, TagLimit, TaskRunView
from runstate.domain.policies import CORE_TASK_POLICY
from runstate.domain.results import ResultDetails
from runstate.domain.timestamps import UtcDateTime
from runstate.domain.transition import ACCEPTED
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


class StoredRunView(TaskRunView):
    """The run after a lean event, without what a reader takes from elsewhere: `id` (the
    event's stream), every member equal to its default, `state` when it is the decision's
    appended state, and on a transition the CREATION_MEMBERS (the previous run's)."""

    id: UUID | None = None  # type: ignore[assignment]  # the stream's id, not stored


# TaskRunView members fixed when the run is created: decide() changes only the others
# (the draft's members and the state), so a lean transition leaves these out.
CREATION_MEMBERS = ("name", "task_key", "dynamic_key", "tags", "cache_key", "empirical_policy")


class StoredState(State):
    """A lean event's appended state. Written, since it was made compact, without what the event's
    columns hold: its `id` (the state_id column) and, in its state_details, its `task_run_id` (the stream)
    and `transition_id` (the transition_id column), whenever those equal the columns; otherwise,
    and in every event written before, the state is whole. A state without an `id` is therefore
    in the first form (every state has one): `appended_with_columns` puts the three back, and so
    the readers of a lean event take its columns (`recorded_decision`, `recorded_context`)."""

    id: UUID | None = None  # type: ignore[assignment]  # the state_id column, not stored


class LeanDecision(BaseModel):
    """A Decision stored once and lean (the lean shape, written since issue #17): its result's state is
    `appended_state`, or `run.state` when nothing was appended; its status is the event's
    column; members equal to their defaults are left out (the models fill them back), the
    details of an accepted proposal among them, and the policy of a proposal neither forced nor
    deferred."""

    details: ResultDetails = ACCEPTED
    appended_state: StoredState | None = None
    run: StoredRunView
    effects: list[Effect] = Field(default_factory=list)
    policy: str = CORE_TASK_POLICY.name


class StoredContext(OrchestrationContext):
    """A context as a lean event stores it: the clock reading and the new state's id left out
    when the appended state carries them, the lease id when no slot was taken with it
    (`recorded_context` fills them back)."""

    now: UtcDateTime | None = None  # type: ignore[assignment]
    new_state_id: UUID | None = None  # type: ignore[assignment]
    new_lease_id: UUID | None = None  # type: ignore[assignment]


class TaskRunEventPayload(BaseModel):
    """A task-run decision with everything it was decided from: replay re-decides
    `command` against the previous event's run with `context` (members equal to their
    defaults left out)."""

    # The record's value as received (the same JSON values), without what the event's columns hold:
    # its command_id, its run's id, its proposal's transition_id (`recorded_command` fills them back).
    command: dict[str, Any]
    context: StoredContext
    decision: LeanDecision
    schema_version: int = 1  # of the messages published, which are rendered again from this event


class StoredDecision(BaseModel):
    """A Decision without what repeats, as written before the lean shape: its result's state
    is `appended_state`, or `run.state` when nothing was appended; its status is the
    event's column."""

    details: ResultDetails
    appended_state: State | None
    run: TaskRunView
    effects: list[Effect]
    policy: str


class FullTaskRunEventPayload(BaseModel):
    """A task-run event as written before the lean shape: every member, the whole run."""

    command: dict[str, Any]
    context: OrchestrationContext
    decision: StoredDecision
    schema_version: int


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


def _default_json(field: FieldInfo) -> Any:
    return to_jsonable_python(field.get_default(call_default_factory=True))


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    models = [m for arg in get_args(annotation) if (m := _nested_model(arg)) is not None]
    return models[0] if len(models) == 1 else None  # a union of models carries its own tag: kept whole


@cache
def member_defaults(model: type[BaseModel]) -> tuple[dict[str, Any], dict[str, type[BaseModel]]]:
    """A model's members that have defaults, as JSON values; and its members that are models."""
    defaults = {name: _default_json(f) for name, f in model.model_fields.items() if not f.is_required()}
    nested = {name: m for name, f in model.model_fields.items() if (m := _nested_model(f.annotation)) is not None}
    return defaults, nested


def filled(model: type[BaseModel], value: Any, leave_out: tuple[str, ...] = ()) -> Any:
    """`value`, written with members equal to their defaults left out, as
    `model.model_dump(mode="json")` gives it: the defaults filled back, nested models too."""
    if not isinstance(value, Mapping):
        return value
    defaults, nested = member_defaults(model)
    out = {name: default for name, default in defaults.items() if name not in leave_out} | dict(value)
    for name, inner in nested.items():
        if isinstance(out.get(name), Mapping):
            out[name] = filled(inner, out[name])
    return out


def state_json(value: str) -> str:
    """A lean event's state as the messages carried it: every member written."""
    return value if value == "null" else State.model_validate_json(value).model_dump_json()


def whole_state_json(value: str, stream_id: object, transition_id: object | None, state_id: object | None) -> str:
    """A lean event's appended state as the messages carried it: every member written, what a
    compact StoredState leaves out taken from the event's columns."""
    if value == "null":
        return value
    parsed = from_json(value)
    if isinstance(parsed, dict):
        parsed = appended_with_columns(parsed, stream_id, transition_id, state_id)
    return State.model_validate(parsed).model_dump_json()


def appended_with_columns(appended: Mapping[str, Any], stream_id: object, transition_id: object | None,
                          state_id: object | None) -> dict[str, Any]:
    """A lean appended state whole: the members a StoredState leaves out taken from the columns
    (as JSON values; a transition_id that is null is left out, as the lean writer does)."""
    if "id" in appended:
        return dict(appended)
    details = appended.get("state_details")
    details = dict(details) if isinstance(details, Mapping) else {}
    details.setdefault("task_run_id", None if stream_id is None else str(stream_id))
    if transition_id is not None:
        details.setdefault("transition_id", str(transition_id))
    return {"id": None if state_id is None else str(state_id), **appended, "state_details": details}


def is_lean(decision: Mapping[str, Any]) -> bool:
    """Whether a stored decision is a LeanDecision (its run names no id)."""
    run = decision.get("run")
    return "result" not in decision and isinstance(run, Mapping) and "id" not in run


def recorded_decision(payload: Mapping[str, Any], status: str | None, stream_id: object | None, *,
                      transition_id: object | None, state_id: object | None) -> dict[str, Any] | None:
    """A task-run event's decision as Decision's JSON, from any payload shape and the event's
    columns (`stream_id` None: the command's run); None when the payload records none. A lean
    transition's run lacks the CREATION_MEMBERS: `inherit_run` adds them."""
    decision = payload.get("decision")
    if not isinstance(decision, Mapping):
        return None
    if "result" in decision:  # LegacyTaskRunEventPayload
        return dict(decision)
    run = decision.get("run")
    appended = decision.get("appended_state")
    if is_lean(decision):
        assert isinstance(run, Mapping)  # is_lean says so
        command = payload.get("command")
        created = isinstance(command, Mapping) and command.get("kind") == "create_task_run"
        if stream_id is None and isinstance(command, Mapping):
            stream_id = command.get("id" if created else "task_run_id")
        if isinstance(appended, Mapping):
            appended = appended_with_columns(appended, stream_id, transition_id, state_id)
        appended = filled(State, appended)
        run = filled(StoredRunView, run, leave_out=() if created else CREATION_MEMBERS)
        run["id"] = None if stream_id is None else str(UUID(str(stream_id)))
        if "state" not in decision["run"]:
            run["state"] = appended
        effects: Any = list(decision.get("effects", ()))
        defaults, _ = member_defaults(LeanDecision)
        details, policy = decision.get("details", defaults["details"]), decision.get("policy", defaults["policy"])
    else:
        effects, details, policy = decision.get("effects"), decision.get("details"), decision.get("policy")
    state = appended if appended is not None else (run.get("state") if isinstance(run, Mapping) else None)
    return {
        "result": {"state": state, "status": status, "details": details},
        "appended_state": appended,
        "run": run,
        "effects": effects,
        "policy": policy,
    }


# A lean context's lease id when no slot was taken with it (the rules never read it then).
UNUSED_LEASE_ID = "00000000-0000-0000-0000-000000000000"


def recorded_context(payload: Mapping[str, Any], *, state_id: object | None) -> Any:
    """A task-run event's context as OrchestrationContext reads it, from any payload shape and
    the event's state_id column: a lean one leaves out the clock reading and state id its
    appended state carries, and a lease id no slot was taken with."""
    context = payload.get("context")
    decision = payload.get("decision")
    if not isinstance(context, Mapping) or not isinstance(decision, Mapping) or not is_lean(decision):
        return context
    out = dict(context)
    appended = decision.get("appended_state")
    if isinstance(appended, Mapping):
        out.setdefault("now", appended.get("timestamp"))
        # A compact appended state's id is the state_id column (StoredState).
        out.setdefault("new_state_id", appended["id"] if "id" in appended
                       else None if state_id is None else str(state_id))
    out.setdefault("new_lease_id", UNUSED_LEASE_ID)
    return out


def inherit_run(decision: Mapping[str, Any] | None, previous_run: Mapping[str, Any] | None
                ) -> Mapping[str, Any] | None:
    """A recorded decision whose run has every member: a lean transition's run takes
    the CREATION_MEMBERS from the run before it (other shapes have them already)."""
    if not isinstance(decision, Mapping):
        return decision
    run = decision.get("run")
    if not isinstance(run, Mapping) or all(name in run for name in CREATION_MEMBERS):
        return decision
    before = previous_run if isinstance(previous_run, Mapping) else {}
    defaults, _ = member_defaults(TaskRunView)
    inherited = {name: before.get(name, defaults[name]) for name in CREATION_MEMBERS if name not in run}
    return {**decision, "run": {**run, **inherited}}


# The member of a task-run command that names its run (the event's stream), by kind.
RUN_ID_MEMBER = {"create_task_run": "id", "set_task_run_state": "task_run_id"}


def recorded_command(payload: Mapping[str, Any], transition_id: object | None, *, stream_id: object | None,
                     command_id: object | None) -> dict[str, Any] | None:
    """A task-run event's command as it was decided, from any payload shape and the event's columns.
    A lean event written since its command was made compact leaves out what the columns hold (its
    command_id, its run's id, its proposal's transition_id: `stored_command_json`); and a proposal
    sent without a transition_id was decided with the column's. Both are filled back here."""
    command = payload.get("command")
    if not isinstance(command, Mapping):
        return None
    command = dict(command)
    kind = command.get("kind")
    run_member = RUN_ID_MEMBER.get(kind) if isinstance(kind, str) else None
    if run_member is None:
        return command
    if command.get("command_id") is None and command_id is not None:
        command["command_id"] = str(command_id)
    if run_member not in command and stream_id is not None:
        command[run_member] = str(stream_id)
    state = command.get("state")
    if isinstance(state, Mapping) and transition_id is not None:
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
    texts = [b"" if part is None else str(part).encode()
             for part in (stream_id, seq, stream_type, event_type, command_id, transition_id, status, state_type,
                          state_name, state_id, source_topic, source_partition, source_offset)]
    # Each column `framed` (its length, then its text), without a call a column.
    return chain_link(previous, [x for text in texts for x in (_length(len(text)), text)], source_digest, payload)


# A length prefix (8 bytes, big-endian), made once for the usual lengths.
_LENGTHS = tuple(n.to_bytes(8, "big") for n in range(1024))


def _length(size: int) -> bytes:
    return _LENGTHS[size] if size < 1024 else size.to_bytes(8, "big")


def framed(part: object) -> bytes:
    """One column as the chain hashes it: its text's length, then its text (None: empty)."""
    data = b"" if part is None else str(part).encode()
    return _length(len(data)) + data


def chain_link(previous: bytes, columns: Iterable[bytes], source_digest: bytes | None, payload: str) -> bytes:
    """An event's hash from the previous one's, the bytes of its columns `framed` in event_hash's
    order, its source digest and its payload text (`replay --verify` frames a stream's repeated
    columns once)."""
    digest = source_digest or b""
    text = payload.encode()
    # One update over the joined bytes: the same digest as an update per chunk, for less call overhead.
    return hashlib.sha256(b"".join((previous, *columns, _length(len(digest)), digest, _length(len(text)),
                                    text))).digest()
