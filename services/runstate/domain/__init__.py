"""Pure task-run orchestration core: Prefect 3.9.1's set_state rules, with no I/O and no clock.

Entry point: `decide(run, request, ctx) -> Decision`. The rules, and where runstate deliberately
answers differently from Prefect, are explained in docs/rules.md.
"""

from .context import CacheEntry, Lease, OrchestrationContext, OrchestrationSettings, TagLimit
from .decision import Decision, apply_initial_state, decide, proposed_state
from .effects import CacheInserted, Effect, SlotsReleased, SlotsTaken, TaskScheduled
from .errors import FlowRunNotFound, OrchestrationFailure
from .flow_runs import record_flow_state
from .policies import (
    BACKGROUND_TASK_POLICY,
    CORE_TASK_POLICY,
    MINIMAL_TASK_POLICY,
    Policy,
    select_policy,
)
from .results import (
    AbortDetails,
    AcceptDetails,
    OrchestrationResult,
    RejectDetails,
    SetStateRequest,
    SetStateStatus,
    WaitDetails,
)
from .run import EmpiricalPolicy, FlowRunView, TaskRunView
from .states import (
    TERMINAL_TYPES,
    State,
    StateCreate,
    StateDetails,
    StateType,
    data_as_returned,
    holds_persisted_result,
    stored_data,
)

__all__ = [
    "BACKGROUND_TASK_POLICY",
    "CORE_TASK_POLICY",
    "MINIMAL_TASK_POLICY",
    "TERMINAL_TYPES",
    "AbortDetails",
    "AcceptDetails",
    "CacheEntry",
    "CacheInserted",
    "Decision",
    "Effect",
    "EmpiricalPolicy",
    "FlowRunNotFound",
    "FlowRunView",
    "Lease",
    "OrchestrationContext",
    "OrchestrationFailure",
    "OrchestrationResult",
    "OrchestrationSettings",
    "Policy",
    "RejectDetails",
    "SetStateRequest",
    "SetStateStatus",
    "SlotsReleased",
    "SlotsTaken",
    "State",
    "StateCreate",
    "StateDetails",
    "StateType",
    "TagLimit",
    "TaskRunView",
    "TaskScheduled",
    "WaitDetails",
    "apply_initial_state",
    "data_as_returned",
    "decide",
    "holds_persisted_result",
    "proposed_state",
    "record_flow_state",
    "select_policy",
    "stored_data",
]
