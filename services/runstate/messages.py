"""Wire contracts: what travels on runstate's Kafka topics.

Every command shares one topic and is keyed by the id of the stream it addresses
(task-run id or flow-run id), so all commands of one run land in one partition
and are decided in order. The ``kind`` field selects the command type.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from runstate.domain import (
    EmpiricalPolicy,
    OrchestrationResult,
    SetStateRequest,
    SetStateStatus,
    State,
    StateCreate,
    StateType,
    TagLimit,
    TaskRunView,
)
from runstate.domain.unchecked import build

# The major version of every message runstate reads and writes (README, "Message
# evolution"): a field added in a minor change is ignored by older readers; a change
# that old readers would misread takes a new version, which they refuse.
SCHEMA_VERSION = 1
SCHEMA_VERSION_HEADER = "x-schema-version"


def check_schema_version(version: int) -> int:
    if version > SCHEMA_VERSION:
        raise ValueError(f"schema_version {version} is newer than this consumer understands ({SCHEMA_VERSION})")
    return version


class _Message(BaseModel):
    # Fields a newer producer added are ignored, not refused (the state itself stays
    # strict, as Prefect's API is: see StateCreate).
    model_config = ConfigDict(extra="ignore")

    @field_validator("schema_version", check_fields=False)
    @classmethod
    def _understood(cls, version: int) -> int:
        return check_schema_version(version)


# Bounds on a new run's retry policy, so that the retry rule's arithmetic (now +
# delay x (1 + jitter)) stays within the datetimes Python and PostgreSQL hold.
# Prefect sets none and answers such a run's FAILED proposal with HTTP 500.
MAX_RETRY_DELAY_S = 10 * 365 * 86400
MAX_RETRY_JITTER_FACTOR = 100.0
# Lease rows store a run's tags joined by this character (tag_leases.tags).
TAG_SEPARATOR = chr(31)


def check_retry_policy(policy: EmpiricalPolicy) -> EmpiricalPolicy:
    delays = policy.retry_delay if isinstance(policy.retry_delay, list) else [policy.retry_delay or 0]
    if any(abs(delay) > MAX_RETRY_DELAY_S for delay in delays):
        raise ValueError(f"a retry delay may be at most {MAX_RETRY_DELAY_S} seconds (10 years)")
    if (policy.retry_jitter_factor or 0) > MAX_RETRY_JITTER_FACTOR:
        raise ValueError(f"retry_jitter_factor may be at most {MAX_RETRY_JITTER_FACTOR:g}")
    return policy


def check_tags(tags: list[str]) -> list[str]:
    for tag in tags:
        if any(ch < " " for ch in tag):
            raise ValueError(f"tag {tag[:64]!r} holds a control character")
    return tags


class CreateTaskRunCommand(_Message):
    """Register a task run; its optional initial state is applied as Prefect's
    POST /task_runs does (forced, PENDING when absent)."""

    kind: Literal["create_task_run"] = "create_task_run"
    command_id: UUID | None = None
    schema_version: int = Field(SCHEMA_VERSION, ge=1)
    id: UUID
    name: str = ""
    flow_run_id: UUID | None = None
    task_key: str = ""
    dynamic_key: str = ""
    tags: list[str] = Field(default_factory=list)
    cache_key: str | None = None
    cache_expiration: datetime | None = None
    empirical_policy: EmpiricalPolicy = Field(default_factory=EmpiricalPolicy)
    state: StateCreate | None = None

    @field_validator("empirical_policy")
    @classmethod
    def _bounded_policy(cls, policy: EmpiricalPolicy) -> EmpiricalPolicy:
        return check_retry_policy(policy)

    @field_validator("tags")
    @classmethod
    def _plain_tags(cls, tags: list[str]) -> list[str]:
        return check_tags(tags)

    def new_run(self) -> TaskRunView:
        """The run before its initial state: what the pipeline decides against
        and what replay re-decides against."""
        # The command's fields are validated already; the rest are TaskRunView's defaults.
        return build(TaskRunView, {
            "id": self.id,
            "name": self.name,
            "flow_run_id": self.flow_run_id,
            "task_key": self.task_key,
            "dynamic_key": self.dynamic_key,
            "tags": list(self.tags),
            "cache_key": self.cache_key,
            "empirical_policy": self.empirical_policy,
            "state": None,
            "run_count": 0,
            "flow_run_run_count": 0,
            "start_time": None,
            "end_time": None,
            "total_run_time": 0.0,
            "expected_start_time": None,
            "next_scheduled_start_time": None,
        })

    def initial_state(self) -> StateCreate:
        return self.state or StateCreate(type=StateType.PENDING)


class SetStateCommand(_Message):
    """Prefect's set_state request body plus the run it addresses."""

    kind: Literal["set_task_run_state"] = "set_task_run_state"
    command_id: UUID | None = None
    schema_version: int = Field(SCHEMA_VERSION, ge=1)
    task_run_id: UUID
    state: StateCreate
    force: bool = False

    def request(self) -> SetStateRequest:
        return SetStateRequest(state=self.state, force=self.force)


class CreateFlowRunCommand(_Message):
    kind: Literal["create_flow_run"] = "create_flow_run"
    command_id: UUID | None = None
    schema_version: int = Field(SCHEMA_VERSION, ge=1)
    id: UUID
    name: str = ""
    flow_id: UUID | None = None
    state: StateCreate | None = None


class SetFlowRunStateCommand(_Message):
    """A flow run's state change, recorded so the stopped-flow rule (R3) and the
    retry rename (R2) see the enclosing flow run. runstate does not orchestrate
    flow runs: every such change is recorded as given."""

    kind: Literal["set_flow_run_state"] = "set_flow_run_state"
    command_id: UUID | None = None
    schema_version: int = Field(SCHEMA_VERSION, ge=1)
    flow_run_id: UUID
    state: StateCreate


# A tag limit has no id of its own; Prefect's V1 API needs one, and its commands need a
# key that puts every change of one tag on one partition. Both are derived from the tag.
LIMIT_NAMESPACE = UUID("0b9c4f7e-3f5e-4d0c-9a0e-6a3f2c1b8d47")
MAX_CONCURRENCY_LIMIT = 2**31 - 1  # the column is a PostgreSQL integer


def limit_id(tag: str) -> UUID:
    """The stable id of the limit of `tag`: its stream in the log and its commands' key."""
    return uuid.uuid5(LIMIT_NAMESPACE, f"tag:{tag}")


class SetConcurrencyLimitCommand(_Message):
    """Create or change the limit of a tag, as Prefect's POST /concurrency_limits/ does:
    its active slots are kept, and so is `active` unless given (a new limit is active)."""

    kind: Literal["set_concurrency_limit"] = "set_concurrency_limit"
    command_id: UUID | None = None
    schema_version: int = Field(SCHEMA_VERSION, ge=1)
    tag: str = Field(min_length=1)
    concurrency_limit: int = Field(ge=0, le=MAX_CONCURRENCY_LIMIT)
    active: bool | None = None

    @field_validator("tag")
    @classmethod
    def _plain_tag(cls, tag: str) -> str:
        return check_tags([tag])[0]


class DeleteConcurrencyLimitCommand(_Message):
    """Remove the limit of a tag (`unknown_limit` when it has none); leases stay."""

    kind: Literal["delete_concurrency_limit"] = "delete_concurrency_limit"
    command_id: UUID | None = None
    schema_version: int = Field(SCHEMA_VERSION, ge=1)
    tag: str = Field(min_length=1)

    @field_validator("tag")
    @classmethod
    def _plain_tag(cls, tag: str) -> str:
        return check_tags([tag])[0]


RunCommand = CreateTaskRunCommand | SetStateCommand | CreateFlowRunCommand | SetFlowRunStateCommand
LimitCommand = SetConcurrencyLimitCommand | DeleteConcurrencyLimitCommand
LIMIT_KINDS = ("set_concurrency_limit", "delete_concurrency_limit")
Command = Annotated[RunCommand | LimitCommand, Field(discriminator="kind")]
COMMAND_ADAPTER: TypeAdapter[Command] = TypeAdapter(Command)


def stream_id_of(command: Command) -> UUID:
    """The id the command is keyed by: the run whose history it extends, or the tag's limit."""
    if isinstance(command, SetStateCommand):
        return command.task_run_id
    if isinstance(command, SetFlowRunStateCommand):
        return command.flow_run_id
    if isinstance(command, SetConcurrencyLimitCommand | DeleteConcurrencyLimitCommand):
        return limit_id(command.tag)
    return command.id


ErrorCode = Literal[
    "invalid_command", "key_mismatch", "too_large", "unknown_run", "already_exists", "unstorable",
    "orchestration_failed", "unknown_limit",
]


class ErrorInfo(BaseModel):
    """Why a command was answered without a decision (README: "What is refused")."""

    code: ErrorCode
    message: str


class OrchestrationResultEvent(BaseModel):
    """One per decided command, keyed by the stream id. Redeliveries re-publish
    the stored event unchanged, so consumers may see it more than once."""

    command_id: UUID
    command_kind: str
    stream_id: UUID | None
    transition_id: UUID | None = None
    seq: int | None = Field(None, description="sequence number of the recorded decision event")
    status: SetStateStatus | None = None
    result: OrchestrationResult | None = None
    state_appended: bool = Field(
        False, description="a state was written (Prefect answers 201 then, 200 otherwise)"
    )
    error: ErrorInfo | None = None
    decided_at: datetime | None = None
    schema_version: int = SCHEMA_VERSION


class LimitResultEvent(BaseModel):
    """The answer to a concurrency-limit command, keyed by the limit's id
    (`limit_id(tag)`); redeliveries re-publish the stored event unchanged."""

    command_id: UUID
    command_kind: str
    stream_id: UUID | None
    tag: str | None = None
    seq: int | None = Field(None, description="sequence number of the recorded event in the limit's stream")
    created: bool = Field(False, description="a set made a new limit (Prefect answers 201 then, 200 otherwise)")
    limit: TagLimit | None = Field(
        None, description="after a set, the limit as stored; after a delete, the limit that was removed"
    )
    error: ErrorInfo | None = None
    decided_at: datetime | None = None
    schema_version: int = SCHEMA_VERSION


class StateRef(BaseModel):
    type: StateType
    name: str
    id: UUID


class StateChangeEvent(BaseModel):
    """An appended state (accepted, or a rule's replacement such as AwaitingRetry).
    ``seq`` is gapless per run among all recorded decisions, so downstream
    consumers de-duplicate on (task_run_id, seq)."""

    task_run_id: UUID
    flow_run_id: UUID | None
    seq: int
    from_state: StateRef | None
    to_state: State
    status: SetStateStatus
    transition_id: UUID | None
    timestamp: datetime
    schema_version: int = SCHEMA_VERSION


def json_schemas() -> dict[str, Any]:
    """JSON Schema of every message, written to schemas/ and checked for drift."""
    return {
        "command": COMMAND_ADAPTER.json_schema(),
        "orchestration-result": OrchestrationResultEvent.model_json_schema(),
        "limit-result": LimitResultEvent.model_json_schema(),
        "state-change": StateChangeEvent.model_json_schema(),
    }
