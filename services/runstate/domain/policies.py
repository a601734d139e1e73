"""Task-run orchestration policies of Prefect 3.9.1 and the engine that runs them (§3.1, §4, §5).

runstate gives Prefect's answer (status, details type and reason gist, delay_seconds, and the
returned state's type and name) everywhere, with these deliberate deviations where Prefect
fails with a server error or contradicts itself:

1. COMPLETED with truthy non-object data (e.g. "<unknown>", a number, a list).
   Prefect: R2 calls `.get` on the data and every non-forced proposal except
   CRASHED/PAUSED/CANCELLING fails with HTTP 500. runstate: the data counts as a persisted
   result, so the answer is REJECT(none) "already completed", like object data
   (CRASHED/PAUSED/CANCELLING still ABORT). Why: the data is a result either way, and a 500
   that no retry can fix leaves a worker stuck.
2. Empty `retry_delay` list.
   Prefect: indexing the empty list fails, so every RUNNING->FAILED answers 500, even with no
   retries configured. runstate: no delay (0 s); retries proceed as configured. Why: an empty
   list most plausibly means "no delays", and a run must be able to fail.
3. `cache_key` longer than `max_cache_key_length` on a COMPLETED proposal.
   Prefect: answers REJECT, yet persists the COMPLETED state and inserts the cache row.
   runstate: ACCEPTs the state (the answer then matches what was written) and inserts no cache
   row. Why: a REJECT whose state was nevertheless written is self-contradictory, and the
   setting exists to keep such keys out of the cache.
4. R4 with a zero tag limit next to tags that have room.
   Prefect: ABORTs but takes, and never returns, a slot on the other tags (leak until the run
   later writes a non-RUNNING, non-CANCELLING state). runstate: the ABORT takes no slot. The
   answer itself is unchanged (ABORT, or the WAIT that overrides it when another tag is full).
   Why: a slot held by a run that was told not to start starves every other run on that tag.

Also by design rather than by deviation: proposals for one run are decided one after another,
each against the run the previous decision left (Prefect on PostgreSQL lets concurrent
proposals all succeed, §7); that ordering is the pipeline's job, the core only needs to be
given the current run. Legacy V1 tag limits are not modelled (only reachable with pre-V2 data).
Kept as in Prefect on purpose: RUNNING->RUNNING takes another slot, CANCELLING keeps slots,
a cache hit beats every other RUNNING rule, deferred=true beats force=true.
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
    # deferred wins over force (§5.1, surprise 1)
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
    """Run `policy` over one proposal, following §3.1 steps 4-7."""
    t = Transition(run=run, ctx=ctx, proposal=proposal, draft=RunDraft.of(run))
    original = (run.state_type, proposal.type)

    steps: list[Rule | UniversalTransform] = [
        step() if issubclass(step, UniversalTransform) else step(*original)
        for step in applicable_steps(policy, *original)
    ]

    entered: list[bool] = []
    for step in steps:
        if isinstance(step, UniversalTransform):
            step.before(t)
            entered.append(True)
        elif (t.initial_type, t.proposed_type) == original:
            step.before(t)
            entered.append(True)
        else:
            entered.append(False)  # an earlier rule already changed the proposal

    if t.proposal is not None:
        t.appended = with_data(t.proposal, data_as_returned(t.proposal.data))

    for step, ran in zip(reversed(steps), reversed(entered)):
        if isinstance(step, UniversalTransform):
            step.after(t)
        elif ran:
            if step.expects(t):
                step.after(t)
            else:
                step.cleanup(t)
    return t
