"""Message evolution through the real pipeline: a newer producer's added field is
ignored, a newer major version is refused, and every result says its version."""

from __future__ import annotations

import json
import uuid

import pytest

from runstate.messages import SCHEMA_VERSION, SCHEMA_VERSION_HEADER, CreateTaskRunCommand, OrchestrationResultEvent

from .harness import InProcessService, isolated_settings, produce, read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


async def test_a_field_added_by_a_newer_producer_is_ignored_and_a_newer_major_version_refused(base_settings):
    settings = isolated_settings(base_settings, partitions=1)
    run_id = uuid.uuid4()
    key = str(run_id).encode()
    create = json.loads(CreateTaskRunCommand(id=run_id).model_dump_json())
    newer_minor = {"kind": "set_task_run_state", "task_run_id": str(run_id), "command_id": str(uuid.uuid4()),
                   "state": {"type": "RUNNING"}, "priority": "high", "routing": {"zone": "eu-1"}}
    newer_major = {**newer_minor, "command_id": str(uuid.uuid4()), "schema_version": SCHEMA_VERSION + 1}
    async with InProcessService(settings):
        await produce(settings, [(key, json.dumps(doc).encode()) for doc in (create, newer_minor, newer_major)])
        results = await read_topic(settings, settings.result_topic, 3)
    answers = {str(a.command_id): a for a in (OrchestrationResultEvent.model_validate_json(r.value) for r in results)}
    assert answers[newer_minor["command_id"]].status.value == "ACCEPT"
    # Refused before it could be read, it is answered under the id derived from its record.
    (refused,) = [a for a in answers.values() if a.error is not None]
    assert refused.error.code == "invalid_command" and "newer than this consumer understands" in refused.error.message
    assert all(dict(r.headers)[SCHEMA_VERSION_HEADER] == str(SCHEMA_VERSION).encode() for r in results)
    assert all(json.loads(r.value)["schema_version"] == SCHEMA_VERSION for r in results)
