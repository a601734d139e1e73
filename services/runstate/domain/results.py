"""Request body and response of `POST /api/task_runs/{id}/set_state` (docs/rules.md, 'The request
and its answer')."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Literal

from pydantic import ConfigDict, Field

from .frozen import FrozenModel
from .states import State, StateCreate


class SetStateStatus(str, Enum):
    ACCEPT = "ACCEPT"
    REJECT = "REJECT"
    ABORT = "ABORT"
    WAIT = "WAIT"


class _Details(FrozenModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class AcceptDetails(_Details):
    type: Literal["accept_details"] = "accept_details"


class RejectDetails(_Details):
    type: Literal["reject_details"] = "reject_details"
    reason: str | None = None


class AbortDetails(_Details):
    type: Literal["abort_details"] = "abort_details"
    reason: str | None = None


class WaitDetails(_Details):
    type: Literal["wait_details"] = "wait_details"
    delay_seconds: int
    reason: str | None = None


ResultDetails = Annotated[
    AcceptDetails | RejectDetails | AbortDetails | WaitDetails,
    Field(discriminator="type"),
]


class OrchestrationResult(FrozenModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    state: State | None
    status: SetStateStatus
    details: ResultDetails


class SetStateRequest(FrozenModel):
    """The body. Unknown top-level keys are ignored (Prefect does the same); the state
    itself is strict (see StateCreate)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    state: StateCreate
    force: bool = False
