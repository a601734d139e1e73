"""The working state of one orchestration and the outcome primitives rules use (docs/rules.md,
'The transition engine').

Everything here is mutable on purpose: it lives for the duration of one `decide` call,
so rules can be written as small imperative hooks and the result is still a pure function
of the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

from .context import OrchestrationContext
from .effects import Effect, SlotsTaken
from .results import (
    AbortDetails,
    AcceptDetails,
    RejectDetails,
    ResultDetails,
    SetStateStatus,
    WaitDetails,
)
from .run import TaskRunView
from .states import State, StateType
from .unchecked import replace

ANY_FROM: frozenset[StateType | None] = frozenset([*StateType, None])
ANY_TO: frozenset[StateType] = frozenset(StateType)

# Frozen, so one instance serves every transition no rule overrides.
ACCEPTED = AcceptDetails()


@dataclass
class RunDraft:
    """The run fields orchestration may change, copied out of the immutable view."""

    run_count: int
    flow_run_run_count: int
    start_time: datetime | None
    end_time: datetime | None
    total_run_time: float
    expected_start_time: datetime | None
    next_scheduled_start_time: datetime | None

    @classmethod
    def of(cls, run: TaskRunView) -> RunDraft:
        return cls(
            run_count=run.run_count,
            flow_run_run_count=run.flow_run_run_count,
            start_time=run.start_time,
            end_time=run.end_time,
            total_run_time=run.total_run_time,
            expected_start_time=run.expected_start_time,
            next_scheduled_start_time=run.next_scheduled_start_time,
        )

    def as_update(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class Transition:
    run: TaskRunView
    """The run as it was before this request (never mutated)."""
    ctx: OrchestrationContext
    proposal: State | None
    draft: RunDraft
    status: SetStateStatus = SetStateStatus.ACCEPT
    details: ResultDetails = ACCEPTED
    slots_taken: SlotsTaken | None = None
    appended: State | None = None
    """The state written, once the pre-phase is over (Prefect's `validated_state`)."""
    post_effects: list[Effect] = field(default_factory=list)
    # Set once rather than computed per read: the run never changes and nearly every hook reads them.
    initial: State | None = field(init=False)
    initial_type: StateType | None = field(init=False)

    def __post_init__(self) -> None:
        self.initial = self.run.state
        self.initial_type = self.run.state_type

    @property
    def proposed_type(self) -> StateType | None:
        return self.proposal.type if self.proposal is not None else None


class Rule:
    """One orchestration rule. A fresh instance serves a single transition.

    A rule applies when the ORIGINAL (from, to) pair is in FROM x TO. Its pre-check runs only
    while the pair is still the original one; afterwards it gets `after` when the pair is
    what it expects (its own outcome counts as expected) and `cleanup` otherwise.
    """

    FROM: ClassVar[frozenset[StateType | None]] = ANY_FROM
    TO: ClassVar[frozenset[StateType]] = ANY_TO

    def __init__(self, from_type: StateType | None, to_type: StateType | None) -> None:
        self.from_type = from_type
        self.expected_to = to_type

    @classmethod
    def applies_to(cls, from_type: StateType | None, to_type: StateType) -> bool:
        return from_type in cls.FROM and to_type in cls.TO

    def expects(self, t: Transition) -> bool:
        return t.initial_type == self.from_type and t.proposed_type == self.expected_to

    # hooks -------------------------------------------------------------------------
    def before(self, t: Transition) -> None:
        pass

    def after(self, t: Transition) -> None:
        pass

    def cleanup(self, t: Transition) -> None:
        pass

    # outcome primitives: the most recent one sets status and details ----------------
    def reject(self, t: Transition, replacement: State | None, reason: str) -> None:
        t.proposal = replacement
        self.expected_to = replacement.type if replacement is not None else None
        t.status, t.details = SetStateStatus.REJECT, RejectDetails(reason=reason)

    def wait(self, t: Transition, delay_seconds: int, reason: str) -> None:
        t.proposal = None
        self.expected_to = None
        t.status, t.details = SetStateStatus.WAIT, WaitDetails(delay_seconds=delay_seconds, reason=reason)

    def abort(self, t: Transition, reason: str) -> None:
        t.proposal = None
        self.expected_to = None
        t.status, t.details = SetStateStatus.ABORT, AbortDetails(reason=reason)

    def rename(self, t: Transition, name: str) -> None:
        assert t.proposal is not None
        t.proposal = replace(t.proposal, name=name)


class UniversalTransform:
    """Runs on every transition of a policy; its hooks skip themselves when nothing is written."""

    def before(self, t: Transition) -> None:
        pass

    def after(self, t: Transition) -> None:
        pass
