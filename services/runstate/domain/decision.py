"""The single entry point: `decide(run, request, ctx) -> Decision`."""

from __future__ import annotations

from pydantic import ConfigDict, Field

from .context import OrchestrationContext
from .effects import Effect
from .frozen import FrozenModel
from .policies import orchestrate, select_policy
from .results import OrchestrationResult, SetStateRequest
from .run import TaskRunView
from .states import State, StateCreate, StateType, stored_data, with_data
from .unchecked import build, replace

# Members read once: reading one off its class is a Python-level lookup (enum.property) in 3.11.
_SCHEDULED = StateType.SCHEDULED


class Decision(FrozenModel):
    """Everything the store must do for one request, and what to answer."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    result: OrchestrationResult
    """The response body."""
    appended_state: State | None
    """The state to append, as the response shows it; None when nothing is written."""
    run: TaskRunView
    """The run projection after the request (its `state` holds the data as stored)."""
    effects: list[Effect] = Field(default_factory=list)
    """Side effects, in the order they happen."""
    policy: str

    @property
    def http_status(self) -> int:
        # Prefect answers 201 exactly when a state was written (docs/rules.md, 'The request and its answer').
        return 201 if self.appended_state is not None else 200


def proposed_state(create: StateCreate, ctx: OrchestrationContext) -> State:
    """The proposal the rules see (docs/rules.md, 'Building the proposal'): the server mints id
    and timestamp; a SCHEDULED proposal without a scheduled_time is scheduled for now."""
    details = create.state_details
    if create.type is _SCHEDULED and details.scheduled_time is None:
        details = replace(details, scheduled_time=ctx.now)
    # Every value is already of its field's type (the context and the proposal are validated).
    return build(State, {
        "id": ctx.new_state_id,
        "type": create.type,
        "name": create.name if create.name is not None else create.type.default_name,
        "timestamp": ctx.now,
        "message": create.message,
        "data": create.data,
        "state_details": details,
    })


def decide(run: TaskRunView, request: SetStateRequest, ctx: OrchestrationContext) -> Decision:
    """Orchestrate one proposal. Pure: the same inputs always give an equal Decision.

    Raises FlowRunNotFound (Prefect: HTTP 404, nothing written) when a RUNNING state is
    accepted for a task whose flow_run_id is set but `ctx.flow_run` is None.
    """
    policy = select_policy(request)
    t = orchestrate(policy, run, proposed_state(request.state, ctx), ctx)

    effects: list[Effect] = [t.slots_taken] if t.slots_taken is not None else []
    effects += t.post_effects
    if t.appended is None:
        result_state, run_after = run.state, run
    else:
        as_stored = with_data(t.appended, stored_data(t.appended))
        result_state = t.appended
        run_after = replace(run, **t.draft.as_update(), state=as_stored)

    return build(Decision, {
        "result": build(OrchestrationResult, {"state": result_state, "status": t.status, "details": t.details}),
        "appended_state": t.appended,
        "run": run_after,
        "effects": effects,
        "policy": policy.name,
    })


def apply_initial_state(run: TaskRunView, state: StateCreate, ctx: OrchestrationContext) -> Decision:
    """What POST /task_runs does with the initial state of a new run: a forced set_state,
    so a deferred SCHEDULED state still goes through the background policy and is enqueued."""
    return decide(run, build(SetStateRequest, {"state": state, "force": True}), ctx)
