"""Prefect 3.9.1's REST bodies, as far as runstate can fill them.

Request models forbid unknown keys, as Prefect's action models do, so a typo is a
422 naming the field. Fields Prefect accepts but runstate has no use for (task
inputs, parameters, work pools, ...) are still accepted, so unchanged clients work;
they are not stored and read back as Prefect's defaults.
"""

from __future__ import annotations

from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from runstate.domain import EmpiricalPolicy, State, StateCreate, StateType
from runstate.domain.timestamps import UtcDateTime


class _Action(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Response(BaseModel):
    model_config = ConfigDict(extra="ignore")


# -- requests -----------------------------------------------------------------
class FlowCreate(_Action):
    name: str = Field(min_length=1)
    tags: list[str] = Field(default_factory=list)
    labels: dict[str, Any] = Field(default_factory=dict)


class FlowRunCreate(_Action):
    flow_id: UUID
    state: StateCreate | None = None
    name: str | None = None
    # Accepted for compatibility; runstate records none of these.
    flow_version: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    context: dict[str, Any] = Field(default_factory=dict)
    parent_task_run_id: UUID | None = None
    infrastructure_document_id: UUID | None = None
    empirical_policy: dict[str, Any] | None = None
    tags: list[str] = Field(default_factory=list)
    labels: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str | None = None
    work_pool_name: str | None = None
    work_queue_name: str | None = None
    job_variables: dict[str, Any] | None = None
    deployment_id: UUID | None = None


class TaskRunCreate(_Action):
    id: UUID | None = None
    name: str | None = None
    flow_run_id: UUID | None = None
    task_key: str
    dynamic_key: str
    cache_key: str | None = None
    cache_expiration: UtcDateTime | None = None
    empirical_policy: EmpiricalPolicy = Field(default_factory=EmpiricalPolicy)
    tags: list[str] = Field(default_factory=list)
    state: StateCreate | None = None
    # Accepted for compatibility; not recorded.
    task_version: str | None = None
    labels: dict[str, Any] = Field(default_factory=dict)
    task_inputs: dict[str, Any] = Field(default_factory=dict)


class ConcurrencyLimitCreate(_Action):
    tag: str = Field(min_length=1)
    concurrency_limit: int = Field(ge=0)


# -- responses ----------------------------------------------------------------
class Flow(_Response):
    id: UUID
    created: UtcDateTime | None = None
    updated: UtcDateTime | None = None
    name: str
    tags: list[str] = Field(default_factory=list)
    labels: dict[str, Any] = Field(default_factory=dict)


class TaskRun(_Response):
    id: UUID
    created: UtcDateTime | None = None
    updated: UtcDateTime | None = None
    name: str
    flow_run_id: UUID | None = None
    task_key: str
    dynamic_key: str
    cache_key: str | None = None
    cache_expiration: UtcDateTime | None = None
    task_version: str | None = None
    empirical_policy: EmpiricalPolicy = Field(default_factory=EmpiricalPolicy)
    tags: list[str] = Field(default_factory=list)
    labels: dict[str, Any] = Field(default_factory=dict)
    state_id: UUID | None = None
    task_inputs: dict[str, Any] = Field(default_factory=dict)
    state_type: StateType | None = None
    state_name: str | None = None
    run_count: int = 0
    flow_run_run_count: int = 0
    expected_start_time: UtcDateTime | None = None
    next_scheduled_start_time: UtcDateTime | None = None
    start_time: UtcDateTime | None = None
    end_time: UtcDateTime | None = None
    total_run_time: float = 0.0
    estimated_run_time: float = 0.0
    estimated_start_time_delta: float = 0.0
    state: State | None = None


class FlowRunPolicy(_Response):
    max_retries: int = 0
    retry_delay_seconds: float = 0.0
    retries: int | None = None
    retry_delay: int | None = None
    pause_keys: list[str] = Field(default_factory=list)
    resuming: bool = False
    retry_type: Literal["in_process", "reschedule"] | None = None


class FlowRun(_Response):
    id: UUID
    created: UtcDateTime | None = None
    updated: UtcDateTime | None = None
    name: str
    flow_id: UUID
    state_id: UUID | None = None
    deployment_id: UUID | None = None
    deployment_version: str | None = None
    work_queue_name: str | None = None
    flow_version: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str | None = None
    context: dict[str, Any] = Field(default_factory=dict)
    empirical_policy: FlowRunPolicy = Field(default_factory=FlowRunPolicy)
    tags: list[str] = Field(default_factory=list)
    labels: dict[str, Any] = Field(default_factory=dict)
    parent_task_run_id: UUID | None = None
    state_type: StateType | None = None
    state_name: str | None = None
    run_count: int = 0
    expected_start_time: UtcDateTime | None = None
    next_scheduled_start_time: UtcDateTime | None = None
    start_time: UtcDateTime | None = None
    end_time: UtcDateTime | None = None
    total_run_time: float = 0.0
    estimated_run_time: float = 0.0
    estimated_start_time_delta: float = 0.0
    auto_scheduled: bool = False
    infrastructure_document_id: UUID | None = None
    infrastructure_pid: str | None = None
    created_by: dict[str, Any] | None = None
    work_queue_id: UUID | None = None
    work_pool_id: UUID | None = None
    work_pool_name: str | None = None
    state: State | None = None
    job_variables: dict[str, Any] | None = None


class ConcurrencyLimit(_Response):
    id: UUID
    created: UtcDateTime | None = None
    updated: UtcDateTime | None = None
    tag: str
    concurrency_limit: int
    active_slots: list[UUID] = Field(default_factory=list)


class ErrorBody(_Response):
    """Prefect's error body for 404 from orchestration, 500 and 503."""

    exception_message: str


class ValidationErrorBody(_Response):
    """Prefect's 422 body."""

    exception_message: str
    exception_detail: list[dict[str, Any]]
    request_body: Any = None


class DetailBody(_Response):
    """FastAPI's HTTPException body, which Prefect uses for plain 404s."""

    detail: str
