"""Batches decided from what the process knows it wrote (pipeline/owned.py), on the
in-memory store: when the store is read and when it is not, and that a write the
process did not make is found by the stream's key and decided again from the store.
tests/pipeline/test_zombie.py does the same against PostgreSQL."""

from __future__ import annotations

import json
import uuid

import pytest

from runstate.client import state
from runstate.domain import OrchestrationSettings, StateDetails
from runstate.messages import CreateTaskRunCommand, SetStateCommand
from runstate.pipeline.batch import decide_batch
from runstate.pipeline.owned import OwnedRuns
from runstate.pipeline.ports import BatchOutcome, StoreUnavailable
from runstate.pipeline.records import IncomingRecord, parse_record
from runstate.store import memory as memory_module

from .test_service_memory import records, service, statuses


@pytest.fixture
def reads(monkeypatch) -> list[int]:
    """How many snapshot reads the in-memory store served."""
    count = [0]
    real = memory_module.InMemorySession.read

    async def read(self, request, into):
        count[0] += 1
        return await real(self, request, into)

    monkeypatch.setattr(memory_module.InMemorySession, "read", read)
    return count


def lifecycle(run_id: uuid.UUID) -> list:
    create = CreateTaskRunCommand.model_validate({"id": str(run_id), "empirical_policy": {"retries": 1}})
    return [create, SetStateCommand(task_run_id=run_id, state=state("RUNNING")),
            SetStateCommand(task_run_id=run_id, state=state("FAILED")),
            SetStateCommand(task_run_id=run_id, state=state("RUNNING")),
            SetStateCommand(task_run_id=run_id, state=state("COMPLETED"))]


def decided(outcome: BatchOutcome) -> list[tuple]:
    """What the decisions were, without the ids and times each run draws anew."""
    out = []
    for p in outcome.results:
        result = json.loads(p.value)
        answer = result["result"]
        out.append((result["seq"], result["status"], answer["state"] and answer["state"]["type"],
                    answer["state"] and answer["state"]["name"], answer["details"].get("type")))
    return out


async def test_runs_created_here_are_decided_from_memory_as_the_store_would_decide_them(monkeypatch, reads):
    """The same commands, batch by batch, through a service that remembers its runs
    and through one that reads the store every time: the same decisions, and the
    first reads nothing."""
    run_ids = [uuid.uuid4() for _ in range(3)]
    steps = list(zip(*(lifecycle(r) for r in run_ids), strict=True))  # one command of every run a batch
    answers = []
    for owned in (8192, 0):
        svc, store, _ = service(monkeypatch)
        svc.owned = OwnedRuns(owned)
        before = reads[0]
        outcomes = [await svc.handle_records(records(*step, start=3 * i)) for i, step in enumerate(steps)]
        answers.append([decided(o) for o in outcomes])
        assert [o.read_store for o in outcomes] == [owned == 0] * len(steps)
        assert reads[0] - before == (0 if owned else len(steps))
        assert sorted((e.stream_id, e.seq) for e in store.tables.events) == sorted(
            (r, seq) for r in run_ids for seq in range(1, 6))
    assert answers[0] == answers[1]
    # FAILED with a retry left is rejected into AwaitingRetry, from memory as from the store.
    assert answers[0][2][0][1:4] == ("REJECT", "SCHEDULED", "AwaitingRetry")


async def test_a_record_at_a_position_already_decided_is_answered_from_the_store(monkeypatch, reads):
    svc, store, _ = service(monkeypatch)
    run_id = uuid.uuid4()
    batch = records(*lifecycle(run_id)[:2])
    first = await svc.handle_records(batch)
    assert reads[0] == 0
    again = await svc.handle_records(batch)  # redelivered: a WAIT would otherwise be decided twice
    assert reads[0] == 1 and again.read_store and again.duplicates == 2 and again.events == []
    assert [p.value for p in again.results] == [p.value for p in first.results]
    assert len(store.tables.events) == 2


async def test_a_transition_decided_for_good_sent_again_is_answered_from_the_store(monkeypatch, reads):
    svc, store, _ = service(monkeypatch)
    run_id = uuid.uuid4()
    with_transition = state("RUNNING").model_copy(update={"state_details": StateDetails(transition_id=uuid.uuid4())})
    running = SetStateCommand(task_run_id=run_id, state=with_transition)
    first = await svc.handle_records(records(CreateTaskRunCommand(id=run_id), running))
    resent = await svc.handle_records(records(running.model_copy(update={"command_id": uuid.uuid4()}), start=2))
    assert reads[0] == 1 and resent.duplicates == 1 and resent.events == []
    assert resent.results[0].value == first.results[1].value
    assert len(store.tables.events) == 2


async def test_transitions_decided_for_good_in_later_batches_are_remembered_too(monkeypatch, reads):
    """A run already known here gains the transitions each later batch decides for good."""
    svc, store, _ = service(monkeypatch)
    run_id = uuid.uuid4()
    await svc.handle_records(records(CreateTaskRunCommand(id=run_id)))
    head = svc.owned.runs[run_id].head
    transition = state("RUNNING").model_copy(update={"state_details": StateDetails(transition_id=uuid.uuid4())})
    running = SetStateCommand(task_run_id=run_id, state=transition)
    first = await svc.handle_records(records(running, start=1))
    assert reads[0] == 0 and svc.owned.runs[run_id].head is head and head.last_seq == 2
    resent = await svc.handle_records(records(running.model_copy(update={"command_id": uuid.uuid4()}), start=2))
    assert reads[0] == 1 and resent.duplicates == 1 and resent.events == []
    assert resent.results[0].value == first.results[0].value
    # Known as decided: the store was read for its outcome, not after an append that collided
    # (which would have made this process forget the run).
    assert run_id in svc.owned.runs
    assert [e.seq for e in store.tables.events] == [1, 2]


async def test_a_write_this_process_did_not_make_is_caught_by_the_key_and_decided_from_the_store(
        monkeypatch, reads):
    """A zombie (or the partition's owner while this process did not hold it) decided
    the next record of a run this process remembers: the remembered head is stale,
    the append collides on (stream_id, seq), and the batch is decided again from the
    store, which answers the record with what the other member stored."""
    owner, store, _ = service(monkeypatch)
    other, _, _ = service(monkeypatch)
    other.store = store
    run_id = uuid.uuid4()
    await owner.handle_records(records(*lifecycle(run_id)[:2]))
    completed = records(SetStateCommand(task_run_id=run_id, state=state("COMPLETED")), start=2)
    theirs = await other.handle_records(completed)
    assert statuses(theirs) == ["ACCEPT"] and reads[0] == 1
    ours = await owner.handle_records(completed)
    assert ours.read_store and ours.duplicates == 1 and ours.events == []
    assert [p.value for p in ours.results] == [p.value for p in theirs.results]
    assert owner.owned.runs == {}  # forgotten: the store holds what this process did not write
    assert [(e.seq, e.state_type) for e in store.tables.events] == [(1, "PENDING"), (2, "RUNNING"),
                                                                     (3, "COMPLETED")]


async def test_a_failed_attempt_forgets_and_the_retry_reads_the_store(monkeypatch, reads):
    svc, store, _ = service(monkeypatch)
    run_id = uuid.uuid4()
    await svc.handle_records(records(CreateTaskRunCommand(id=run_id)))
    assert run_id in svc.owned.runs
    store.refusals = [StoreUnavailable("connection lost")]
    outcome = await svc.handle_records(records(SetStateCommand(task_run_id=run_id, state=state("RUNNING")), start=1))
    assert statuses(outcome) == ["ACCEPT"] and outcome.read_store and reads[0] == 1
    assert run_id not in svc.owned.runs  # read from the store: its earlier history is not known here
    assert [e.seq for e in store.tables.events] == [1, 2]


def parsed(*commands, start: int = 0):
    return [parse_record(IncomingRecord(r.topic, r.partition, r.offset, r.key, r.value), 1 << 20)
            for r in records(*commands, start=start)]


def test_runs_that_read_other_partitions_rows_are_never_decided_from_memory():
    """A flow run's state, tags' slots and the cache are changed by other partitions' commands."""
    owned = OwnedRuns(8192)
    plain, tagged, in_flow = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    assert owned.snapshot(parsed(CreateTaskRunCommand(id=plain))) is not None
    assert owned.snapshot(parsed(CreateTaskRunCommand(id=tagged, tags=["db"]))) is None
    assert owned.snapshot(parsed(CreateTaskRunCommand(id=in_flow, flow_run_id=uuid.uuid4()))) is None
    # A run not created here is read, whatever the command.
    assert owned.snapshot(parsed(SetStateCommand(task_run_id=plain, state=state("RUNNING")))) is None
    cached = state("RUNNING").model_copy(update={"state_details": StateDetails(cache_key="k")})
    created_and_cached = parsed(CreateTaskRunCommand(id=plain), SetStateCommand(task_run_id=plain, state=cached))
    assert owned.snapshot(created_and_cached) is None
    created_and_run = parsed(CreateTaskRunCommand(id=plain), SetStateCommand(task_run_id=plain, state=state("RUNNING")))
    assert owned.snapshot(created_and_run) is not None


def test_at_most_size_runs_are_remembered_the_least_recently_written_first_out():
    owned = OwnedRuns(2)
    run_ids = [uuid.uuid4() for _ in range(3)]
    for i, run_id in enumerate(run_ids):
        items = parsed(CreateTaskRunCommand(id=run_id), start=i)
        snap = owned.snapshot(items)
        assert snap is not None
        owned.learn(items, decide_batch(items, snap, OrchestrationSettings()), None)
    assert list(owned.runs) == run_ids[1:]
    assert owned.positions == {(records(CreateTaskRunCommand(id=run_ids[0]))[0].topic, 0): 2}
