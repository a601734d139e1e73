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


# A plan step: the rule's class with None, or the universal transform's shared instance (they
# keep no state of their own); and whether it has anything to do once the proposal is settled.
PlanStep = tuple[type[Rule] | None, UniversalTransform | None, bool]
_PLANS: dict[tuple[str, StateType | None, StateType], tuple[PlanStep, ...]] = {}
_TRANSFORMS: dict[type[UniversalTransform], UniversalTransform] = {}


def _plan(policy: Policy, from_type: StateType | None, to_type: StateType) -> tuple[PlanStep, ...]:
    """The applicable steps, worked out once per (policy, from, to)."""
    # Keyed by the policy's name: hashing the policy itself hashes all its steps.
    key = (policy.name, from_type, to_type)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = tuple(_plan_step(step) for step in applicable_steps(policy, from_type, to_type))
    return plan


def _plan_step(step: Step) -> PlanStep:
    if issubclass(step, UniversalTransform):
        shared = _TRANSFORMS.get(step) or _TRANSFORMS.setdefault(step, step())
        return None, shared, step.after is not UniversalTransform.after
    return step, None, step.after is not Rule.after or step.cleanup is not Rule.cleanup


def orchestrate(policy: Policy, run: TaskRunView, proposal: State, ctx: OrchestrationContext) -> Transition:
    """Run `policy` over one proposal (docs/rules.md, 'The transition engine')."""
    t = Transition(run=run, ctx=ctx, proposal=proposal, draft=RunDraft.of(run))
    from_type, to_type = run.state_type, proposal.type

    # The steps entered (their pre-check ran) that have something to do afterwards.
    entered: list[Rule | UniversalTransform] = []
    for rule_type, shared, acts_after in _plan(policy, from_type, to_type):
        step: Rule | UniversalTransform
        if shared is not None:
            step = shared
        elif t.proposed_type == to_type:  # the initial type never changes: the pair is still the original
            assert rule_type is not None
            step = rule_type(from_type, to_type)
        else:
            continue  # an earlier rule already changed the proposal
        step.before(t)
        if acts_after:
            entered.append(step)

    if t.proposal is not None:
        t.appended = with_data(t.proposal, data_as_returned(t.proposal.data))

    for step in reversed(entered):
        if isinstance(step, UniversalTransform) or step.expects(t):
            step.after(t)
        else:
            step.cleanup(t)
    return t
