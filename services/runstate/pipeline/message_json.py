"""The JSON of a task decision's messages, assembled from parts.

A decision's state and result recur in the result event, the state change and
the stored payload, and serialising every repetition cost more than running
the rules. So each part is serialised once and the messages are assembled from
the parts, each member written exactly as `model_dump_json` writes it (a test
compares them).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime
from functools import cache, lru_cache
from operator import itemgetter
from typing import Any
from uuid import UUID

from pydantic import BaseModel, TypeAdapter
from pydantic_core import to_json

from runstate.domain import (
    Decision,
    Effect,
    OrchestrationContext,
    OrchestrationResult,
    SlotsTaken,
    State,
    StateType,
    TaskRunView,
)
from runstate.domain.transition import ACCEPTED
from runstate.events import (
    CREATION_MEMBERS,
    RUN_ID_MEMBER,
    LeanDecision,
    member_defaults,
    state_json,
    whole_state_json,
)
from runstate.messages import (
    SCHEMA_VERSION,
    CreateTaskRunCommand,
    OrchestrationResultEvent,
    SetStateCommand,
    StateChangeEvent,
    StateRef,
)

_DATETIME_SERIALIZER = TypeAdapter(datetime).serializer
_STRING_SERIALIZER = TypeAdapter(str).serializer
_UUID_SERIALIZER = TypeAdapter(UUID).serializer


@cache
def _template(model: type[BaseModel]) -> tuple[str, itemgetter[Any], int]:
    # The object with each field's name written and a %s for its value (a name holds no %),
    # and what picks the values out of the members in field order.
    names = tuple(model.model_fields)
    text = "{" + ",".join(f'"{name}":%s' for name in names) + "}"
    return text, itemgetter(*names), len(names)


def render(model: type[BaseModel], **members: str) -> str:
    """What `model_dump_json` writes for a `model` whose members serialise to these values."""
    text, pick, count = _template(model)
    if len(members) == count:
        try:
            values = pick(members)
        except KeyError:
            pass
        else:
            return text % (values if count > 1 else (values,))
    names = set(model.model_fields)
    wrong = sorted(set(members) ^ names)
    raise TypeError(f"{model.__name__} has no field {wrong[0]!r}" if wrong[0] in members
                    else f"{model.__name__}'s field {wrong[0]!r} is missing")


def model_json(model: BaseModel | None) -> str:
    # The serializer itself: `model_dump_json` writes the same, after a Python call that costs as much.
    return "null" if model is None else model.__pydantic_serializer__.to_json(model).decode()


_ACCEPTED_JSON = model_json(ACCEPTED)
SCHEMA_VERSION_JSON = str(SCHEMA_VERSION)


def uuid_json(value: UUID | None) -> str:
    # A UUID's JSON is its canonical text; pydantic's serializer writes it faster than str() does.
    return "null" if value is None else _UUID_SERIALIZER.to_json(value).decode()


def datetime_json(value: datetime) -> str:
    return _DATETIME_SERIALIZER.to_json(value).decode()


@lru_cache(maxsize=1024)
def string_json(value: str) -> str:
    # Kinds, statuses and policy names: a handful of values, each escaped once.
    return _STRING_SERIALIZER.to_json(value).decode()


# -- the stored decision (events.LeanDecision)

_LEAVE_OUT_CREATED = frozenset({"id"})
_DEFAULT_POLICY = LeanDecision.model_fields["policy"].default
_LEAVE_OUT_TRANSITION = frozenset({"id", *CREATION_MEMBERS})


def lean_decision_json(
    *,
    details: str,
    appended: State | None,
    run: TaskRunView,
    previous: TaskRunView | None,
    effects: list[Effect],
    policy: str,
    transition_id: UUID | None,
) -> str:
    """A decision as a LeanDecision's JSON: members equal to their defaults left out, the
    appended state without what the event's columns hold (events.StoredState; `transition_id`
    is the event's), the run without its id, without its state when that is the appended one,
    and after a `previous` run without the members fixed at creation (decide() never changes
    them; one that did change would be written)."""
    # An accepted decision's details are LeanDecision's default: left out like any other.
    parts = [] if details == _ACCEPTED_JSON else ['"details":' + details]
    if appended is not None:
        parts.append('"appended_state":' + stored_state_json(appended, run.id, transition_id))
    leave_out = set(_LEAVE_OUT_CREATED if previous is None else _LEAVE_OUT_TRANSITION)
    if previous is not None:
        leave_out -= {name for name in CREATION_MEMBERS
                      if getattr(run, name) is not getattr(previous, name) and getattr(run, name) != getattr(previous, name)}
    if run.state is appended or run.state == appended:
        leave_out.add("state")
    parts.append('"run":' + run.model_dump_json(exclude_defaults=True, exclude=leave_out))
    if effects:
        parts.append('"effects":[' + ",".join(effect.model_dump_json() for effect in effects) + "]")
    if policy != _DEFAULT_POLICY:
        parts.append('"policy":' + string_json(policy))
    return "{" + ",".join(parts) + "}"


# What a compact StoredState leaves out: its id and the details the columns hold.
_COMPACT_STATE: dict[str, Any] = {"id": True, "state_details": {"task_run_id": True, "transition_id": True}}


_NO_DETAILS_LEFT = ',"state_details":{}}'


def stored_state_json(state: State, stream_id: UUID, transition_id: UUID | None) -> str:
    """An appended state as a lean event stores it: compact when the event's columns hold its
    id, task_run_id and transition_id (the state_id column is its id by construction), whole
    otherwise; members equal to their defaults left out either way."""
    details = state.state_details
    if details.task_run_id == stream_id and details.transition_id == transition_id:
        text = state.model_dump_json(exclude_defaults=True, exclude=_COMPACT_STATE)
        # Details that held only those are left out whole (state_details is State's last member).
        return text[: -len(_NO_DETAILS_LEFT)] + "}" if text.endswith(_NO_DETAILS_LEFT) else text
    return state.model_dump_json(exclude_defaults=True)


def details_json(details: BaseModel) -> str:
    # Most decisions accept: their details are written once, not serialised each time.
    return _ACCEPTED_JSON if details is ACCEPTED else model_json(details)


# A payload's schema version when it is not TaskRunEventPayload's default (1), which is left out.
_SCHEMA_VERSION_MEMBER = "" if SCHEMA_VERSION == 1 else ',"schema_version":' + SCHEMA_VERSION_JSON


def lean_payload_json(*, command: str, context: str, decision: str) -> str:
    """A task-run event's payload (events.TaskRunEventPayload) from its members' JSON."""
    return '{"command":' + command + ',"context":' + context + ',"decision":' + decision + _SCHEMA_VERSION_MEMBER + "}"


def lean_task_run_tail(decision: Decision, previous: TaskRunView | None, transition_id: UUID | None) -> str:
    """How a task-run event's payload written now ends: its `decision` (lean, after `previous`,
    None for a creation; `transition_id` is the event's) and schema version. `replay --verify`
    holds a stored payload's end to it: the same text means the same decision, without parsing
    it again (besides what the columns hold)."""
    return ',"decision":' + lean_decision_json(
        details=details_json(decision.result.details), appended=decision.appended_state, run=decision.run,
        previous=previous, effects=decision.effects, policy=decision.policy, transition_id=transition_id,
    ) + _SCHEMA_VERSION_MEMBER + "}"


_NO_DEFAULT = object()


@cache
def _command_members(model: type[SetStateCommand | CreateTaskRunCommand]) -> tuple[dict[str, Any], frozenset[str]]:
    """A task-run command's members that have defaults, as JSON values, but `kind` (which names
    the model) and `schema_version` (whose default moves with the code: a command stored now must
    not read as a later version); and the members its event's columns always hold (its
    command_id, its run's id)."""
    defaults, _ = member_defaults(model)
    kind = model.model_fields["kind"].default
    kept = {k: v for k, v in defaults.items() if k not in ("kind", "schema_version")}
    return kept, frozenset({"command_id", RUN_ID_MEMBER[kind]})


def stored_command_json(document: Mapping[str, Any], sent: SetStateCommand | CreateTaskRunCommand,
                        transition_id: UUID | None) -> str:
    """A task-run command as a lean event stores it: the record's members as received (`sent` is
    what they were parsed into), without what the event's columns hold (events.recorded_command
    fills them back): its command_id (the command_id column, or one derived from the record when
    it has none), its run's id (the stream) and its proposal's transition_id when that is the
    column's; and without a top-level member whose value is the JSON of its default (validation
    fills it back: `"force": false` means what no `force` means)."""
    defaults, left_out = _command_members(type(sent))
    out = {}
    for name, value in document.items():
        if name in left_out:
            continue
        default = defaults.get(name, _NO_DEFAULT)
        if default is _NO_DEFAULT or type(value) is not type(default) or value != default:
            out[name] = value
    state = out.get("state")
    details = state.get("state_details") if isinstance(state, dict) else None
    if (sent.state is not None and sent.state.state_details.transition_id is not None
            and sent.state.state_details.transition_id == transition_id
            and isinstance(details, dict) and "transition_id" in details):
        details = dict(details)
        del details["transition_id"]
        state = dict(state)  # type: ignore[arg-type]  # a dict: its details were read above
        if details:
            state["state_details"] = details
        else:
            del state["state_details"]
        out["state"] = state
    # Compact JSON (pydantic-core's writer, a tenth of json's cost here): an I-JSON document
    # (strict_json) is written back as the same values, floats by their shortest round trip.
    return to_json(out).decode()


def lean_context_json(ctx: OrchestrationContext, appended: State | None, effects: list[Effect]) -> str:
    """A context as a lean event stores it (events.recorded_context reads it back): members equal
    to their defaults, the clock reading and new state id the appended state carries, and a
    lease id no slot was taken with, left out."""
    leave_out = set()
    if appended is not None:
        if appended.timestamp == ctx.now:
            leave_out.add("now")
        if appended.id == ctx.new_state_id:
            leave_out.add("new_state_id")
    if not any(isinstance(effect, SlotsTaken) for effect in effects):
        leave_out.add("new_lease_id")
    return ctx.model_dump_json(exclude_defaults=True, exclude=leave_out)


# -- the messages of a decision, rendered when it is made and again from its event

def result_event_json(
    *,
    command_id: str,
    command_kind: str,
    stream_id: str,
    transition_id: str,
    seq: int,
    status: str,
    result: str,
    state_appended: bool,
    decided_at: str,
    schema_version: str,
) -> str:
    """A decided task-run command's OrchestrationResultEvent, from its members' JSON."""
    return render(
        OrchestrationResultEvent,
        command_id=command_id,
        command_kind=command_kind,
        stream_id=stream_id,
        transition_id=transition_id,
        seq=str(seq),
        status=status,
        result=result,
        state_appended="true" if state_appended else "false",
        error="null",
        decided_at=decided_at,
        schema_version=schema_version,
    )


@lru_cache(maxsize=64)
def _state_type_json(state_type: str) -> str:
    # A column's text or a member (equal to its text): StateType() checks it, once per value.
    return string_json(StateType(state_type).value)


def state_ref_json(state_type: str, name: str | None, state_id: UUID | str | None) -> str:
    """A StateChangeEvent's `from_state`, from the columns of the event that appended it."""
    if name is None or state_id is None:  # not a state reference: let the model say why
        return StateRef.model_validate({"type": state_type, "name": name, "id": state_id}).model_dump_json()
    return render(StateRef, type=_state_type_json(state_type), name=string_json(name),
                  id=uuid_json(state_id if isinstance(state_id, UUID) else UUID(state_id)))


_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def members(text: str) -> dict[str, str]:
    """The members of a JSON object, each as its very text."""
    found: dict[str, str] = {}
    i = _WHITESPACE.match(text, 0).end()  # type: ignore[union-attr]  # matches the empty string at worst
    if text[i : i + 1] != "{":
        raise ValueError("not a JSON object")
    i = _WHITESPACE.match(text, i + 1).end()  # type: ignore[union-attr]
    if text[i : i + 1] == "}":
        return found
    while True:
        name, i = _DECODER.raw_decode(text, i)
        i = _WHITESPACE.match(text, i).end()  # type: ignore[union-attr]
        if text[i : i + 1] != ":":
            raise ValueError("a JSON member without a value")
        i = _WHITESPACE.match(text, i + 1).end()  # type: ignore[union-attr]
        _, end = _DECODER.raw_decode(text, i)
        found[name] = text[i:end]
        i = _WHITESPACE.match(text, end).end()  # type: ignore[union-attr]
        if text[i : i + 1] == ",":
            i = _WHITESPACE.match(text, i + 1).end()  # type: ignore[union-attr]
        elif text[i : i + 1] == "}":
            return found
        else:
            raise ValueError("a JSON object not closed")


def _decided_at(parts: dict[str, str]) -> str:
    now = members(parts["context"]).get("now")
    if now is None:  # a lean context: the clock reading is the appended state's time
        now = members(members(parts["decision"])["appended_state"])["timestamp"]
    return now


def stored_messages(
    payload: str,
    *,
    stream_id: UUID,
    seq: int,
    command_id: UUID,
    transition_id: UUID | None,
    status: str | None,
    state_id: UUID | None,
    from_state: str,
) -> tuple[str, str | None]:
    """The result event and state change an event's decision published, byte for
    byte, from its stored payload and columns. `from_state` is the StateRef JSON
    of the stream's previous appended state ("null" when there is none)."""
    parts = members(payload)
    if "result_event" in parts:  # a flow-run event, or a task-run event in the legacy shape
        change = parts.get("state_change", "null")
        return parts["result_event"], None if change == "null" else change
    decision = members(parts["decision"])
    run = members(decision["run"])
    if "id" in run:  # the full shape, written before the lean one: every member
        appended = decision["appended_state"]
        run_state = run["state"]
    else:  # lean: the states as the messages carried them, every member written
        appended = whole_state_json(decision.get("appended_state", "null"), stream_id, transition_id, state_id)
        run_state = state_json(run["state"]) if "state" in run else appended
    state_appended = appended != "null"
    status_json = string_json(status or "")
    transition_id_json = uuid_json(transition_id)
    schema_version = parts.get("schema_version", "1")
    result = render(
        OrchestrationResult,
        state=appended if state_appended else run_state,
        status=status_json,
        details=decision.get("details", _ACCEPTED_JSON),  # a lean accept leaves its details out
    )
    result_event = result_event_json(
        command_id=uuid_json(command_id),
        command_kind=string_json(json.loads(parts["command"])["kind"]),
        stream_id=uuid_json(stream_id),
        transition_id=transition_id_json,
        seq=seq,
        status=status_json,
        result=result,
        state_appended=state_appended,
        decided_at=_decided_at(parts),
        schema_version=schema_version,
    )
    if not state_appended:
        return result_event, None
    change = render(
        StateChangeEvent,
        task_run_id=uuid_json(stream_id),
        flow_run_id=run.get("flow_run_id", "null"),
        seq=str(seq),
        from_state=from_state,
        to_state=appended,
        status=status_json,
        transition_id=transition_id_json,
        timestamp=members(appended)["timestamp"],
        schema_version=schema_version,
    )
    return result_event, change
