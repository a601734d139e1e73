from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import pytest

from pipeline.harness import InProcessService, isolated_settings, read_topic, settings_env
from runstate.client import RunstateClient, state
from runstate.config import Settings
from runstate.database_urls import parse, reveal
from runstate.messages import LIMIT_KINDS, OrchestrationResultEvent

from .support import scratch_database


@pytest.fixture(scope="session")
def audit_settings(kafka_bootstrap: str, database_url: str, admin_database_url: str) -> Iterator[Settings]:
    """Settings whose database is a fresh, migrated one owned by the audit tests."""
    with scratch_database(admin_database_url, database_url, "audit") as (app_url, admin_url):
        yield Settings(kafka_bootstrap_servers=kafka_bootstrap, database_url=app_url, admin_database_url=admin_url)


@pytest.fixture
def bogus_database_env(audit_settings: Settings) -> dict[str, str]:
    """The audit settings, but PostgreSQL on a port nothing listens on."""
    url = reveal(parse(audit_settings.database_url).set(port=1))
    return settings_env(audit_settings.replace(database_url=url))


@dataclass
class DrivenLog:
    """A log written by the real pipeline, and what its topics said."""

    settings: Settings
    flow_run: UUID
    runs: dict[str, UUID]
    results: list[OrchestrationResultEvent]
    state_changes: list[Any]  # Kafka records of the state-change topic (key, value, ...)
    tag: str
    deleted_tag: str  # a limit set and deleted again: its stream ends with a delete


@pytest.fixture(scope="session")
async def driven_log(audit_settings: Settings) -> DrivenLog:
    """Drive a representative set of runs through the pipeline into the audit database:
    retries (REJECT + AwaitingRetry), a cache write and a cache hit, tag slots taken,
    released and still held, a flow run, and concurrency-limit streams (one deleted)."""
    settings = isolated_settings(audit_settings)
    tag = f"audit-{uuid.uuid4().hex[:6]}"
    cache_key = f"audit-key-{uuid.uuid4().hex[:6]}"
    deleted_tag = f"{tag}-gone"
    runs = {name: uuid.uuid4() for name in ("lifecycle", "flaky", "slot_released", "slot_held", "cached")}
    flow = uuid.uuid4()
    async with InProcessService(settings), RunstateClient(settings) as client:
        assert (await client.set_concurrency_limit(tag, 2)).error is None
        assert (await client.set_concurrency_limit(deleted_tag, 1)).error is None
        assert (await client.delete_concurrency_limit(deleted_tag)).error is None
        await client.create_flow_run(flow, state=state("RUNNING"))
        run = runs["lifecycle"]
        await client.create_task_run(run, flow_run_id=flow, state=state("SCHEDULED"))
        for proposal in (state("PENDING"), state("RUNNING"), state("COMPLETED", cache_key=cache_key)):
            await client.propose(run, proposal)
        run = runs["flaky"]
        await client.create_task_run(run, flow_run_id=flow, empirical_policy={"retries": 1})
        for t in ("RUNNING", "FAILED", "RUNNING", "FAILED"):
            await client.propose(run, state(t))
        for name in ("slot_released", "slot_held"):
            await client.create_task_run(runs[name], flow_run_id=flow, tags=[tag])
            await client.propose(runs[name], state("RUNNING"))
        await client.propose(runs["slot_released"], state("COMPLETED"))
        run = runs["cached"]
        await client.create_task_run(run, flow_run_id=flow)
        hit = await client.propose(run, state("RUNNING", cache_key=cache_key))
        assert hit.result.state.name == "Cached", hit  # the scenario must exercise the cache lookup
    commands = 3 + 1 + 4 + 5 + 2 * 2 + 1 + 2
    results = [
        OrchestrationResultEvent.model_validate_json(r.value)
        for r in await read_topic(settings, settings.result_topic, commands)
        if json.loads(r.value)["command_kind"] not in LIMIT_KINDS
    ]
    assert len(results) >= commands - 3
    appended = sum(1 for r in results if r.state_appended and r.stream_id != flow)
    changes = await read_topic(settings, settings.state_change_topic, appended)
    return DrivenLog(settings, flow, runs, results, changes, tag, deleted_tag)
