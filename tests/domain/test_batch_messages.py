"""The batch decider assembles its messages from parts serialised once (processor._render).
Each message must be exactly what pydantic writes for the model it stands for, so a field
added to a model, or a changed serialiser, cannot drift the wire format unnoticed."""

from __future__ import annotations

import json
import uuid

import pytest

from runstate.domain import OrchestrationContext, OrchestrationSettings
from runstate.events import StoredDecision, TaskRunEventPayload
from runstate.messages import CreateTaskRunCommand, OrchestrationResultEvent, SetStateCommand, StateChangeEvent
from runstate.pipeline.batch import decide_batch
from runstate.pipeline.message_json import members
from runstate.pipeline.ports import StoreSnapshot
from runstate.pipeline.records import IncomingRecord, parse_record

LIFECYCLES = {
    "succeeds": ["RUNNING", "COMPLETED"],
    "fails and retries": ["RUNNING", "FAILED", "RUNNING", "COMPLETED"],
    "is rejected after completing": ["RUNNING", "COMPLETED", "RUNNING"],
}


def decided(steps: list[str]) -> list:
    run = uuid.uuid4()
    commands = [CreateTaskRunCommand(id=run, empirical_policy={"retries": 1, "retry_delay": 0})]
    commands += [SetStateCommand(task_run_id=run, state={"type": t, "data": {"n": i}}) for i, t in enumerate(steps)]
    snapshot, outcomes = StoreSnapshot(), []
    for offset, command in enumerate(commands):
        record = IncomingRecord("commands", 0, offset, str(run).encode(), command.model_dump_json().encode())
        outcomes.append(decide_batch([parse_record(record, 1 << 20)], snapshot, OrchestrationSettings()))
    return outcomes


@pytest.mark.parametrize("steps", LIFECYCLES.values(), ids=LIFECYCLES.keys())
def test_assembled_messages_are_what_pydantic_writes(steps):
    for outcome in decided(steps):
        (result,) = outcome.results
        assert result.value == OrchestrationResultEvent.model_validate_json(result.value).model_dump_json()
        for change in outcome.state_changes:
            assert change.value == StateChangeEvent.model_validate_json(change.value).model_dump_json()
        (event,) = outcome.events
        payload = json.loads(event.payload)
        # The members' very text (json.dumps would write a float such as 3e-05 its own way).
        written = members(event.payload)
        assert written["decision"] == StoredDecision.model_validate_json(written["decision"]).model_dump_json()
        assert written["context"] == OrchestrationContext.model_validate_json(written["context"]).model_dump_json()
        TaskRunEventPayload.model_validate(payload)
        # The event stores no message: they are rendered again from it (tests/pipeline/test_lean_event.py).
        assert "result_event" not in payload and "state_change" not in payload


def test_a_run_view_is_written_with_its_state_spliced_in_as_pydantic_writes_it():
    from runstate.domain import State, StateType, TaskRunView
    from runstate.pipeline.message_json import model_json, run_view_json

    state = State(id=uuid.uuid4(), type=StateType.RUNNING, timestamp="2026-01-01T00:00:00Z",
                  name=',"run_count":1', data={"run_count": ',"run_count":'})
    run = TaskRunView(id=uuid.uuid4(), name=',"run_count":2,"x":"', tags=[',"run_count":'], state=state,
                      run_count=3, empirical_policy={"retries": 2})
    assert run_view_json(run, model_json(state)) == run.model_dump_json()
