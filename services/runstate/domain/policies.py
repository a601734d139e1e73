"""Task-run orchestration policies of Prefect 3.9.1 and the engine that runs them
(docs/rules.md, 'Choosing a policy' and 'The transition engine').

runstate gives Prefect's answer everywhere except four deliberate deviations, each where
Prefect fails with a server error or contradicts itself (docs/rules.md, 'Where runstate differs
from Prefect 3.9.1'): 1. COMPLETED data that is truthy but not an object counts as a result;
2. an empty `retry_delay` list means no delay; 3. an over-long cache key is accepted and not
cached; 4. a zero tag limit next to tags with room takes no slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from .context import OrchestrationContext
from .results import SetStateRequest
from .rules import (
    CacheInsertion,
    CacheRetrieval,
    CopyScheduledTime,
    CopyTaskParametersID,
    EnqueueScheduledTasks,
    HandleTaskTerminalStateTransitions,
    PreventPendingTransitions,
    PreventRunningTasksFromStoppedFlows,
    ReleaseTaskConcurrencySlots,
    RenameReruns,
    RetryFailedTasks,
    SecureTaskConcurrencySlots,
    UpdateFlowRunTrackerOnTasks,
    WaitForScheduledTime,
)
from .run import TaskRunView
from .states import State, StateType, data_as_returned, with_data
from .transforms import GLOBAL_TRANSFORMS
from .transition import Rule, RunDraft, Transition, UniversalTransform

Step = type[Rule] | type[UniversalTransform]


@dataclass(frozen=True)
class Policy:
    name: str
    steps: tuple[Step, ...]


CORE_TASK_POLICY = Policy(
    "CoreTaskPolicy",
    (
        CacheRetrieval,
        HandleTaskTerminalStateTransitions,
        PreventRunningTasksFromStoppedFlows,
        SecureTaskConcurrencySlots,
        CopyScheduledTime,
        WaitForScheduledTime,
        RetryFailedTasks,
        RenameReruns,
        UpdateFlowRunTrackerOnTasks,
        CacheInsertion,
        ReleaseTaskConcurrencySlots,
    ),
)

MINIMAL_TASK_POLICY = Policy("MinimalTaskPolicy", (ReleaseTaskConcurrencySlots,))

BACKGROUND_TASK_POLICY = Policy(
    "BackgroundTaskPolicy",
    (
        PreventPendingTransitions,
        CacheRetrieval,
        HandleTaskTerminalStateTransitions,
        CopyScheduledTime,
        CopyTaskParametersID,
        WaitForScheduledTime,
        RetryFailedTasks,
        RenameReruns,
        UpdateFlowRunTrackerOnTasks,
        CacheInsertion,
        ReleaseTaskConcurrencySlots,
        EnqueueScheduledTasks,
    ),
)


def select_policy(request: SetStateRequest) -> Policy:
    # deferred wins over force, as in Prefect (docs/rules.md, 'Choosing a policy')
    if request.state.state_details.deferred:
        return BACKGROUND_TASK_POLICY
    if request.force:
        return MINIMAL_TASK_POLICY
    return CORE_TASK_POLICY


@cache
def applicable_steps(policy: Policy, from_type: StateType | None, to_type: StateType) -> tuple[Step, ...]:
    """The policy's rules that apply to a (from, to) pair, in order, then the global transforms.

    It depends on nothing but its arguments, so it is worked out once per pair, not per proposal."""
    return tuple(
        step
        for step in (*policy.steps, *GLOBAL_TRANSFORMS)
        if issubclass(step, UniversalTransform) or step.applies_to(from_type, to_type)
    )


def orchestrate(policy: Policy, run: TaskRunView, proposal: State, ctx: OrchestrationContext) -> Transition:
    """Run `policy` over one proposal (docs/rules.md, 'The transition engine')."""
    t = Transition(run=run, ctx=ctx, proposal=proposal, draft=RunDraft.of(run))
    original = (run.state_type, proposal.type)

    steps: list[Rule | UniversalTransform] = [
        step() if issubclass(step, UniversalTransform) else step(*original)
        for step in applicable_steps(policy, *original)
    ]

    entered: list[bool] = []
    for step in steps:
        if isinstance(step, UniversalTransform) or (t.initial_type, t.proposed_type) == original:
            step.before(t)
            entered.append(True)
        else:
            entered.append(False)  # an earlier rule already changed the proposal

    if t.proposal is not None:
        t.appended = with_data(t.proposal, data_as_returned(t.proposal.data))

    for step, ran in zip(reversed(steps), reversed(entered), strict=False):
        if isinstance(step, UniversalTransform):
            step.after(t)
        elif ran:
            if step.expects(t):
                step.after(t)
            else:
                step.cleanup(t)
    return t
