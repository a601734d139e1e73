"""`build` and `replace` (runstate/domain/unchecked.py) stand in for pydantic's validated
constructor and `model_copy` on the decide path: they must make the very same instance,
equal, with its fields in the same order and the same JSON."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from runstate.domain import (
    Decision,
    OrchestrationContext,
    OrchestrationResult,
    OrchestrationSettings,
    SetStateRequest,
    SetStateStatus,
    State,
    StateCreate,
    StateDetails,
    StateType,
    TaskRunView,
    decide,
)
from runstate.domain.transition import ACCEPTED
from runstate.domain.unchecked import build, replace

NOW = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def same(built, validated) -> None:
    assert type(built) is type(validated)
    assert built == validated
    assert list(built.__dict__) == list(validated.__dict__) == list(type(validated).model_fields)
    assert built.model_dump_json() == validated.model_dump_json()


def test_build_makes_what_validation_makes():
    details = StateDetails(cache_key="k", transition_id=uuid.uuid4())
    fields = {"id": uuid.uuid4(), "type": StateType.RUNNING, "name": "Running", "timestamp": NOW,
              "message": "m", "data": {"a": [1, 2.5, None]}, "state_details": details}
    same(build(State, dict(fields)), State(**fields))
    ctx = {"now": NOW, "new_state_id": uuid.uuid4(), "new_lease_id": uuid.uuid4(), "random": 0.25,
           "flow_run": None, "cache_entries": [], "tag_limits": {}, "leases": [],
           "settings": OrchestrationSettings()}
    same(build(OrchestrationContext, dict(ctx)), OrchestrationContext(**ctx))
    request = {"state": StateCreate(type=StateType.PENDING), "force": True}
    same(build(SetStateRequest, dict(request)), SetStateRequest(**request))
    result = {"state": State(**fields), "status": SetStateStatus.ACCEPT, "details": ACCEPTED}
    same(build(OrchestrationResult, dict(result)), OrchestrationResult(**result))


def test_a_decision_is_what_validating_it_again_makes():
    run = TaskRunView(id=uuid.uuid4(), tags=["a"], empirical_policy={"retries": 1})
    ctx = OrchestrationContext(now=NOW, new_state_id=uuid.uuid4(), new_lease_id=uuid.uuid4(), random=0.5)
    decision = decide(run, SetStateRequest(state=StateCreate(type=StateType.SCHEDULED)), ctx)
    again = Decision(**{name: getattr(decision, name) for name in Decision.model_fields})
    same(decision, again)
    same(decision.result, OrchestrationResult(**decision.result.__dict__))
    same(decision.run, TaskRunView(**decision.run.__dict__))
    assert decision.appended_state is not None
    same(decision.appended_state, State(**decision.appended_state.__dict__))


def test_replace_is_model_copy():
    state = State(id=uuid.uuid4(), type=StateType.PENDING, timestamp=NOW, data=[1])
    changes = {"name": "Renamed", "state_details": StateDetails(task_run_id=uuid.uuid4())}
    copy, expected = replace(state, **changes), state.model_copy(update=changes)
    same(copy, expected)
    assert copy.model_fields_set == expected.model_fields_set
    assert state.name == "Pending"  # the original is untouched


def test_a_new_run_is_what_validation_makes():
    from runstate.messages import CreateTaskRunCommand

    command = CreateTaskRunCommand(id=uuid.uuid4(), name="n", flow_run_id=uuid.uuid4(), task_key="k", dynamic_key="1",
                                   tags=["a", "b"], cache_key="c", empirical_policy={"retries": 2})
    fields = command.model_dump(include=set(TaskRunView.model_fields) - {"empirical_policy"})
    same(command.new_run(), TaskRunView(**fields, empirical_policy=command.empirical_policy))
    assert command.new_run().tags is not command.tags
