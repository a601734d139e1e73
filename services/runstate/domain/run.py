"""The task run as orchestration sees it, and the enclosing flow run (docs/rules.md, 'The task run'
and 'The enclosing flow run')."""

from __future__ import annotations

from uuid import UUID

from pydantic import ConfigDict, Field, field_validator, model_validator

from .frozen import FrozenModel
from .states import State, StateType
from .timestamps import UtcDateTime

MAX_RETRY_DELAYS = 50


class EmpiricalPolicy(FrozenModel):
    """A run's retry settings, fixed when the run is created."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    retries: int | None = None
    retry_delay: float | list[float] | None = None
    retry_jitter_factor: float | None = Field(default=None, ge=0)
    # Deprecated spellings that older clients still send; folded into the fields above.
    max_retries: int = 0
    retry_delay_seconds: float = 0

    @field_validator("retry_delay")
    @classmethod
    def _bounded_delay_list(cls, value: float | list[float] | None) -> float | list[float] | None:
        if isinstance(value, list) and len(value) > MAX_RETRY_DELAYS:
            raise ValueError(f"Can not configure more than {MAX_RETRY_DELAYS} retry delays per task.")
        return value

    @model_validator(mode="after")
    def _fold_deprecated_fields(self) -> EmpiricalPolicy:
        # Prefect copies a deprecated value whenever the new field is *falsy* (so 0 and []
        # count as empty too), not only when it is missing.
        if not self.retries and self.max_retries != 0:
            object.__setattr__(self, "retries", self.max_retries)
        if not self.retry_delay and self.retry_delay_seconds != 0:
            object.__setattr__(self, "retry_delay", self.retry_delay_seconds)
        return self


_NO_POLICY = EmpiricalPolicy()  # shared (frozen): see states._NO_DETAILS


class TaskRunView(FrozenModel):
    """Projection of one task run. Immutable: evolve it with model_copy(update=...)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: UUID
    name: str = ""
    flow_run_id: UUID | None = None
    task_key: str = ""
    dynamic_key: str = ""
    tags: list[str] = Field(default_factory=list)
    cache_key: str | None = None
    empirical_policy: EmpiricalPolicy = _NO_POLICY
    state: State | None = None
    run_count: int = 0
    flow_run_run_count: int = 0
    start_time: UtcDateTime | None = None
    end_time: UtcDateTime | None = None
    total_run_time: float = 0.0
    expected_start_time: UtcDateTime | None = None
    next_scheduled_start_time: UtcDateTime | None = None

    @property
    def state_type(self) -> StateType | None:
        return self.state.type if self.state is not None else None

    @property
    def state_name(self) -> str | None:
        return self.state.name if self.state is not None else None


class FlowRunView(FrozenModel):
    """The parts of the enclosing flow run that R2, R3 and R9 read."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: UUID
    state_type: StateType | None = None
    state_name: str | None = None
    run_count: int = 0
    pause_timeout: UtcDateTime | None = None
    pause_reschedule: bool = False
