"""State vocabulary and the state objects of the set_state API (docs/rules.md, 'States')."""

from __future__ import annotations

import contextlib
from enum import Enum
from typing import Any
from uuid import UUID

from pydantic import ConfigDict, model_validator

from .frozen import FrozenModel
from .timestamps import UtcDateTime
from .unchecked import replace


class StateType(str, Enum):
    SCHEDULED = "SCHEDULED"
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    CRASHED = "CRASHED"
    PAUSED = "PAUSED"
    CANCELLING = "CANCELLING"

    @property
    def default_name(self) -> str:
        return self.value.capitalize()

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_TYPES


TERMINAL_TYPES: frozenset[StateType] = frozenset(
    {StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED}
)

# Names orchestration itself gives to states (docs/rules.md, 'Names orchestration gives to states');
# clients and rules compare on them.
AWAITING_RETRY = "AwaitingRetry"
RETRYING = "Retrying"
RERUNNING = "Rerunning"
CACHED = "Cached"
NOT_READY = "NotReady"

ARTIFACT_KEYS = ("artifact_key", "artifact_type", "artifact_description")


class StateDetails(FrozenModel):
    """Every `state_details` field Prefect 3.9.1 knows; anything else a client sends is dropped."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    flow_run_id: UUID | None = None
    task_run_id: UUID | None = None
    child_flow_run_id: UUID | None = None
    scheduled_time: UtcDateTime | None = None
    cache_key: str | None = None
    cache_expiration: UtcDateTime | None = None
    deferred: bool | None = False
    untrackable_result: bool = False
    pause_timeout: UtcDateTime | None = None
    pause_reschedule: bool = False
    pause_key: str | None = None
    run_input_keyset: dict[str, Any] | None = None
    refresh_cache: bool | None = None
    retriable: bool | None = None
    transition_id: UUID | None = None
    task_parameters_id: UUID | None = None
    traceparent: str | None = None
    deployment_concurrency_lease_id: UUID | None = None


# What StateType(value).default_name gives, by every value StateType() accepts (its members
# are equal to their values): one dict lookup where the enum's own lookup is a Python call.
# The one default instance (frozen, so shared): a factory would build one per state, and
# `exclude_defaults`, which the lean event's writer uses, would build one per member compared.
_NO_DETAILS = StateDetails()

_DEFAULT_NAMES: dict[Any, str] = {t.value: t.default_name for t in StateType}


def _name_from_type(values: Any) -> Any:
    # Only a missing or null name is defaulted; Prefect keeps an empty string as sent.
    if isinstance(values, dict) and values.get("name") is None and "type" in values:
        # A bad type is left for the type field's own validation to report.
        with contextlib.suppress(TypeError):  # an unhashable type is a bad one
            name = _DEFAULT_NAMES.get(values["type"])
            if name is not None:
                values = {**values, "name": name}
    return values


class StateCreate(FrozenModel):
    """The proposal in a request body. `id` and `timestamp` are minted by the server, so
    sending them (or any other key) is a validation error, as in Prefect (HTTP 422)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: StateType
    name: str | None = None
    message: str | None = None
    data: Any = None
    state_details: StateDetails = _NO_DETAILS

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, values: Any) -> Any:
        return _name_from_type(values)


class State(FrozenModel):
    """A persisted (or about to be persisted) state, as the API returns it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: UUID
    type: StateType
    name: str | None = None
    timestamp: UtcDateTime
    message: str | None = None
    data: Any = None
    state_details: StateDetails = _NO_DETAILS

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, values: Any) -> Any:
        return _name_from_type(values)

    @property
    def is_terminal(self) -> bool:
        return self.type in TERMINAL_TYPES


def is_unpersisted_marker(data: Any) -> bool:
    return isinstance(data, dict) and data.get("type") == "unpersisted"


def data_as_returned(data: Any) -> Any:
    """The data the response shows for a state being written (docs/rules.md, 'Reading state
    data back'): artifact_* keys are lifted out of an object into the artifact's metadata; the
    unpersisted marker is echoed."""
    if isinstance(data, dict) and not is_unpersisted_marker(data) and any(key in data for key in ARTIFACT_KEYS):
        return {k: v for k, v in data.items() if k not in ARTIFACT_KEYS}
    return data


def with_data(state: State, data: Any) -> State:
    """`state` showing `data`; the state itself when that is already its data (it is frozen)."""
    return state if data is state.data else replace(state, data=data)


def stored_data(state: State | None) -> Any:
    """What reading `state` back from the store gives for its data (docs/rules.md, 'Reading
    state data back'): the unpersisted marker is never stored, and artifact_* keys live on the
    artifact, not in the data."""
    if state is None or state.data is None or is_unpersisted_marker(state.data):
        return None
    return data_as_returned(state.data)


def holds_persisted_result(state: State | None) -> bool:
    """Whether a COMPLETED state carries a result that protects it from being left (R2).

    Prefect only handles an object here and fails with HTTP 500 on any other truthy value;
    runstate counts every truthy non-marker value as a result (deviation 1)."""
    if state is None or state.type is not StateType.COMPLETED:
        return False
    return bool(state.data) and not is_unpersisted_marker(state.data)
