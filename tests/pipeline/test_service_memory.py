"""The batch service on the in-memory store and a recording publisher: the
pipeline's logic (redelivery, outages, publish retries, refusals) without Kafka
or PostgreSQL. tests/store/test_contract.py holds the in-memory store to the
PostgreSQL store's behaviour."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from types import SimpleNamespace

from runstate.client import state
from runstate.config import Settings
from runstate.events import TaskRunEventPayload
from runstate.messages import CreateTaskRunCommand, SetStateCommand
from runstate.pipeline import service as service_module
from runstate.pipeline.ports import BatchOutcome, StoreUnavailable
from runstate.pipeline.service import OrchestrationService
from runstate.store.memory import InMemoryEventStore

TOPIC = "memory.commands"


@dataclass
class RecordingPublisher:
    failures: int = 0  # the next publishes that fail, as a broker that does not answer
    published: list[BatchOutcome] = field(default_factory=list)

    async def publish(self, outcome: BatchOutcome) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("broker not available")
        self.published.append(outcome)


def service(monkeypatch) -> tuple[OrchestrationService, InMemoryEventStore, RecordingPublisher]:
    monkeypatch.setattr(service_module, "OUTAGE_FIRST_DELAY_S", 0.001)  # keep the waits short
    settings = Settings(kafka_bootstrap_servers="unused:9092", database_url="postgresql+psycopg://unused@unused/unused",
                        command_topic=TOPIC)
    store, publisher = InMemoryEventStore(), RecordingPublisher()
    return OrchestrationService(settings, store, publisher), store, publisher


def records(*commands, start: int = 0) -> list[SimpleNamespace]:
    out = []
    for offset, command in enumerate(commands, start):
        run_id = getattr(command, "task_run_id", None) or command.id
        out.append(SimpleNamespace(topic=TOPIC, partition=0, offset=offset, key=str(run_id).encode(),
                                   value=command.model_dump_json().encode()))
    return out


def statuses(outcome: BatchOutcome) -> list[str | None]:
    return [json.loads(p.value)["status"] for p in outcome.results]


async def test_a_lifecycle_is_decided_and_a_redelivered_batch_republished_byte_for_byte(monkeypatch):
    svc, store, publisher = service(monkeypatch)
    run_id = uuid.uuid4()
    batch = records(CreateTaskRunCommand(id=run_id), SetStateCommand(task_run_id=run_id, state=state("RUNNING")),
                    SetStateCommand(task_run_id=run_id, state=state("COMPLETED")))
    first = await svc.handle_records(batch)
    assert statuses(first) == ["ACCEPT", "ACCEPT", "ACCEPT"]
    again = await svc.handle_records(batch)
    assert again.events == [] and again.duplicates == 3
    assert [p.value for p in again.results] == [p.value for p in first.results]
    assert [p.value for p in again.state_changes] == [p.value for p in first.state_changes]
    assert [e.seq for e in store.tables.events] == [1, 2, 3]
    assert len(publisher.published) == 2
    # The stored payload has the one shape the readers expect (runstate/events.py).
    payloads = [TaskRunEventPayload.model_validate_json(e.payload) for e in store.tables.events]
    # A compact appended state: its id is the event's state_id column, not written again.
    assert [p.decision.appended_state.id for p in payloads] == [None] * 3  # type: ignore[union-attr]
    assert [str(e.state_id) for e in store.tables.events] == [
        json.loads(p.value)["result"]["state"]["id"] for p in first.results]


async def test_an_unavailable_store_is_waited_out_and_nothing_is_dead_lettered(monkeypatch):
    svc, store, _publisher = service(monkeypatch)
    store.refusals = [StoreUnavailable("permission denied for table events")] * 4
    run_id = uuid.uuid4()
    outcome = await svc.handle_records(records(CreateTaskRunCommand(id=run_id)))
    assert statuses(outcome) == ["ACCEPT"] and outcome.dead_letters == []
    assert svc.outage is None and svc.outage_retries == 4


async def test_a_publish_the_broker_refuses_is_retried_not_skipped(monkeypatch):
    svc, _store, publisher = service(monkeypatch)
    publisher.failures = 3
    await svc.handle_records(records(CreateTaskRunCommand(id=uuid.uuid4())))
    assert len(publisher.published) == 1 and svc.outage is None and svc.outage_retries == 3


async def test_bad_records_are_answered_and_dead_lettered_and_write_nothing(monkeypatch):
    svc, store, _publisher = service(monkeypatch)
    run_id = uuid.uuid4()
    good = records(CreateTaskRunCommand(id=run_id))
    bad = [SimpleNamespace(topic=TOPIC, partition=0, offset=1, key=str(run_id).encode(), value=b"[" * 10_000),
           SimpleNamespace(topic=TOPIC, partition=0, offset=2, key=b"other", value=good[0].value)]
    outcome = await svc.handle_records(good + bad)
    assert [d.error.code for d in outcome.dead_letters] == ["invalid_command", "key_mismatch"]
    assert len(store.tables.events) == 1


async def test_a_bug_while_deciding_one_record_dead_letters_that_record_only(monkeypatch):
    """A decision that raises is a bug; it must not stall the partition or take
    the rest of the batch with it."""
    svc, store, _publisher = service(monkeypatch)
    poisoned, fine = uuid.uuid4(), uuid.uuid4()
    real_decide = service_module.decide_batch

    def decide_batch(items, *args, **kwargs):
        if any(getattr(i, "stream_id", None) == poisoned and not hasattr(i, "error") for i in items):
            raise RuntimeError("a bug")
        return real_decide(items, *args, **kwargs)

    monkeypatch.setattr(service_module, "decide_batch", decide_batch)
    outcome = await svc.handle_records(records(CreateTaskRunCommand(id=poisoned), CreateTaskRunCommand(id=fine)))
    codes = [json.loads(p.value)["error"] and json.loads(p.value)["error"]["code"] for p in outcome.results]
    assert codes == ["orchestration_failed", None]
    assert [e.stream_id for e in store.tables.events] == [fine]
