"""Global transforms: run bookkeeping that follows every written state, in every policy
(docs/rules.md, 'Global transforms').

The run's state pointer (type, name, timestamp) is moved by `decide`, not here. Each class
looks at the FINAL proposal and does nothing when the proposal was nulled.
"""

from __future__ import annotations

from .states import TERMINAL_TYPES, StateType
from .transition import Transition, UniversalTransform
from .unchecked import replace

# Members read once: reading one off its class is a Python-level lookup (enum.property) in 3.11.
_RUNNING, _SCHEDULED = StateType.RUNNING, StateType.SCHEDULED


class SetStartTime(UniversalTransform):
    def before(self, t: Transition) -> None:
        if t.proposal is not None and t.proposal.type is _RUNNING and t.draft.start_time is None:
            t.draft.start_time = t.proposal.timestamp


class SetEndTime(UniversalTransform):
    def before(self, t: Transition) -> None:
        proposal = t.proposal
        if proposal is None:
            return
        entering_terminal = proposal.type in TERMINAL_TYPES
        if t.initial_type in TERMINAL_TYPES and not entering_terminal:
            t.draft.end_time = None  # the run is live again
        # terminal -> terminal keeps the first end time (and leaves start_time alone)
        if entering_terminal and t.draft.end_time is None:
            if t.draft.start_time is None:
                t.draft.start_time = proposal.timestamp
            t.draft.end_time = proposal.timestamp


class IncrementRunTime(UniversalTransform):
    def before(self, t: Transition) -> None:
        if t.proposal is not None and t.initial is not None and t.initial_type is _RUNNING:
            t.draft.total_run_time += (t.proposal.timestamp - t.initial.timestamp).total_seconds()


class SetExpectedStartTime(UniversalTransform):
    def before(self, t: Transition) -> None:
        proposal = t.proposal
        if proposal is None or t.draft.expected_start_time is not None:
            return
        if proposal.type is _SCHEDULED:
            t.draft.expected_start_time = proposal.state_details.scheduled_time
        else:
            t.draft.expected_start_time = proposal.timestamp


class SetNextScheduledStartTime(UniversalTransform):
    def before(self, t: Transition) -> None:
        proposal = t.proposal
        if proposal is None:
            return
        if t.initial_type is _SCHEDULED:
            t.draft.next_scheduled_start_time = None
        if proposal.type is _SCHEDULED:
            t.draft.next_scheduled_start_time = proposal.state_details.scheduled_time


class UpdateStateDetails(UniversalTransform):
    """Client-sent flow_run_id / task_run_id are never trusted (docs/rules.md, 'Global transforms')."""

    def before(self, t: Transition) -> None:
        proposal = t.proposal
        if proposal is None:
            return
        details = replace(proposal.state_details, flow_run_id=t.run.flow_run_id, task_run_id=t.run.id)
        t.proposal = replace(proposal, state_details=details)


class IncrementRunCount(UniversalTransform):
    def before(self, t: Transition) -> None:
        if t.proposal is not None and t.proposal.type is _RUNNING:
            t.draft.run_count += 1


GLOBAL_TRANSFORMS: tuple[type[UniversalTransform], ...] = (
    SetStartTime,
    SetEndTime,
    IncrementRunTime,
    SetExpectedStartTime,
    SetNextScheduledStartTime,
    UpdateStateDetails,
    IncrementRunCount,
)
