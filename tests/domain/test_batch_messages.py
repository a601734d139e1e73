"""The batch decider assembles its messages from parts serialised once (processor._render).
Each message must be exactly what pydantic writes for the model it stands for, so a field
added to a model, or a changed serialiser, cannot drift the wire format unnoticed."""

from __future__ import annotations

import json
import uuid

import pytest

from runstate.domain import OrchestrationContext, OrchestrationSettings
from runstate.domain.results import AcceptDetails
from runstate.events import LeanDecision, TaskRunEventPayload, recorded_context
from runstate.messages import CreateTaskRunCommand, OrchestrationResultEvent, SetStateCommand, StateChangeEvent
from runstate.pipeline.batch import decide_batch
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
        # Stored lean: every member pydantic would leave out as a default is left out, and only those.
        decision = json.dumps(payload["decision"], separators=(",", ":"), ensure_ascii=False)
        lean = LeanDecision.model_validate(payload["decision"])
        # Details are written whole (their type tags them), unless they are the default, an accept's.
        expected = json.loads(lean.model_dump_json(exclude_defaults=True, exclude={"details"}))
        if lean.details != AcceptDetails():
            expected["details"] = json.loads(lean.details.model_dump_json())
        assert json.loads(decision) == expected
        context = OrchestrationContext.model_validate(recorded_context(payload, state_id=event.state_id))
        assert json.loads(event.payload)["context"].items() <= json.loads(context.model_dump_json()).items()
        TaskRunEventPayload.model_validate(payload)
        # The event stores no message: they are rendered again from it (tests/pipeline/test_lean_event.py).
        assert "result_event" not in payload and "state_change" not in payload
