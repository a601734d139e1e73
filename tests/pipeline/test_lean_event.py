"""The stored task-run event holds each fact once, and what it published is
rendered again from it byte for byte; events written in the legacy shape (every
message in full, tests/pipeline/legacy_events.json, written by the decider
before the change) and in the lean shape before appended states were compact
(tests/pipeline/lean_v1_events.json) and before the command was compact
(tests/pipeline/lean_v2_events.json) are read as before."""

from __future__ import annotations

import json
import random
import uuid
from collections import Counter, defaultdict
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from uuid import UUID

import pytest

from faults.workload import generate
from runstate.audit.history import describe
from runstate.audit.replay import StreamVerifier, recorded_event
from runstate.domain import OrchestrationContext, OrchestrationSettings, State, TagLimit
from runstate.events import (
    GENESIS,
    RUN_ID_MEMBER,
    LegacyTaskRunEventPayload,
    TaskRunEventPayload,
    event_hash,
    is_lean,
    recorded_command,
    recorded_decision,
)
from runstate.messages import COMMAND_ADAPTER
from runstate.pipeline.batch import decide_batch
from runstate.pipeline.message_json import members, state_ref_json, stored_messages
from runstate.pipeline.ports import EventRow, StoreSnapshot
from runstate.pipeline.records import IncomingRecord, parse_record

LEGACY = Path(__file__).with_name("legacy_events.json")
# The records decided_rows sent, by offset (every one on partition 0 of the topic "lean").
SENT: dict[int, bytes] = {}


def sent(offset: int, key: bytes | None, value: bytes) -> IncomingRecord:
    SENT[offset] = value
    return IncomingRecord("lean", 0, offset, key, value)


def decided_rows(seed: int, commands: int) -> list[EventRow]:
    """The events of a varied workload (retries, rejections, tags, caches, flow
    runs), plus proposals sent without a transition_id, decided in-process."""
    workload = generate(seed, commands)
    snapshot = StoreSnapshot(tag_limits={t: TagLimit(tag=t, limit=n) for t, n in workload.tag_limits.items()})
    rows: list[EventRow] = []
    offset = 0
    for phase in (1, 2):
        items = []
        for cmd in (c for r in workload.phase(phase) for c in r.commands):
            offset += 1
            items.append(parse_record(sent(offset, cmd.key, cmd.value()), 10**9))
        rows += decide_batch(items, snapshot, OrchestrationSettings()).events
    bare = uuid.uuid4()
    items = []
    for body in (
        {"kind": "create_task_run", "id": str(bare), "state": {"type": "SCHEDULED"}},
        {"kind": "set_task_run_state", "task_run_id": str(bare), "state": {"type": "PENDING"}},
        {"kind": "set_task_run_state", "task_run_id": str(bare), "state": {"type": "RUNNING", "name": "Go"}},
        {"kind": "set_task_run_state", "task_run_id": str(bare), "state": {"type": "PENDING"}},
    ):
        offset += 1
        items.append(parse_record(sent(offset, str(bare).encode(), json.dumps(body).encode()), 10**9))
    rows += decide_batch(items, snapshot, OrchestrationSettings()).events
    # Decisions that append nothing: a tag whose limit is 0 (ABORT), one taken (WAIT).
    snapshot.tag_limits |= {"lean-zero": TagLimit(tag="lean-zero", limit=0), "lean-one": TagLimit(tag="lean-one", limit=1)}
    for tag in ("lean-zero", "lean-one", "lean-one"):
        run = uuid.uuid4()
        items = []
        for body in (
            {"kind": "create_task_run", "id": str(run), "tags": [tag]},
            {"kind": "set_task_run_state", "task_run_id": str(run), "state": {"type": "RUNNING"}},
        ):
            offset += 1
            items.append(parse_record(sent(offset, str(run).encode(), json.dumps(body).encode()), 10**9))
        rows += decide_batch(items, snapshot, OrchestrationSettings()).events
    return rows


def rendered_again(row: Any, rows_before: list[Any]) -> tuple[str, str | None]:
    previous = [r for r in rows_before if r.stream_id == row.stream_id and r.seq < row.seq and r.state_type]
    last = max(previous, key=lambda r: r.seq) if previous else None
    return stored_messages(
        row.payload, stream_id=row.stream_id, seq=row.seq, command_id=row.command_id,
        transition_id=row.transition_id, status=row.status, state_id=row.state_id,
        from_state=state_ref_json(last.state_type, last.state_name, last.state_id) if last else "null",
    )


@pytest.fixture(scope="module")
def rows() -> list[EventRow]:
    return decided_rows(seed=17, commands=400)


def test_every_published_message_is_rendered_again_from_the_event(rows):
    task_rows = [r for r in rows if r.stream_type == "task_run"]
    assert {r.status for r in task_rows} >= {"ACCEPT", "REJECT", "ABORT", "WAIT"}
    assert any(r.state_type is None for r in task_rows), "no decision without an appended state"
    assert any(r.state_change is not None for r in task_rows)
    for row in rows:
        assert rendered_again(row, rows) == (row.result_event, row.state_change), (row.stream_id, row.seq)


def test_the_task_event_stores_the_command_as_received_but_what_its_columns_hold_and_no_message(rows):
    left_out = Counter()
    for row in (r for r in rows if r.stream_type == "task_run"):
        TaskRunEventPayload.model_validate_json(row.payload)
        parts = members(row.payload)
        assert set(parts) == {"command", "context", "decision"}  # schema_version 1 is the default
        received = json.loads(SENT[row.source_offset])
        stored = json.loads(parts["command"])
        run_member = RUN_ID_MEMBER[received["kind"]]
        # Stored: the record's members with their values, but the command id, the run's id, a
        # proposal's transition_id that is the event's column, and members that mean their default.
        details = (received.get("state") or {}).get("state_details") or {}
        for name, value in received.items():
            if name == "state" and details.get("transition_id") == str(row.transition_id):
                assert "transition_id" not in (stored["state"].get("state_details") or {})
                assert stored["state"] | {"state_details": details} == value | {"state_details": details}
                left_out["transition_id"] += 1
            elif name in stored:
                assert stored[name] == value, name
            elif name in ("command_id", run_member):
                left_out[name] += 1
            else:
                without = {k: v for k, v in received.items() if k != name}
                assert COMMAND_ADAPTER.validate_python(without) == COMMAND_ADAPTER.validate_python(received), name
                left_out["a default"] += 1
        assert set(stored) <= set(received)
        # Read back: the command as decided, the columns' values filled in.
        decided = COMMAND_ADAPTER.validate_python(received)
        decided = decided.model_copy(update={"command_id": row.command_id})
        if row.transition_id is not None and decided.state is not None:
            decided = decided.model_copy(update={"state": decided.state.model_copy(update={
                "state_details": decided.state.state_details.model_copy(update={"transition_id": row.transition_id})})})
        assert COMMAND_ADAPTER.validate_python(recorded_command(
            json.loads(row.payload), row.transition_id, stream_id=row.stream_id, command_id=row.command_id)) == decided
    assert left_out.keys() == {"command_id", "id", "task_run_id", "transition_id", "a default"}, left_out


# -- events in the legacy shape ----------------------------------------------------

def fixture_rows(path: Path) -> list[SimpleNamespace]:
    """The events of a fixture written by an earlier decider, as rows with their column types."""
    rows = []
    for raw in json.loads(path.read_text())["events"]:
        row = SimpleNamespace(**raw)
        for name in ("stream_id", "command_id", "transition_id", "state_id"):
            value = getattr(row, name)
            setattr(row, name, UUID(value) if value else None)
        row.source_digest, row.hash = bytes.fromhex(row.source_digest), bytes.fromhex(row.hash)
        row.recorded_at = None
        rows.append(row)
    return rows


def legacy_rows() -> list[SimpleNamespace]:
    return fixture_rows(LEGACY)


def chain_holds(rows: list[Any]) -> bool:
    """Whether each row's stored hash is its columns' hash chained to its stream's row before."""
    previous: dict[UUID, bytes] = defaultdict(lambda: GENESIS)
    for row in rows:
        expected = event_hash(
            previous[row.stream_id], stream_id=row.stream_id, seq=row.seq, stream_type=row.stream_type,
            event_type=row.event_type, command_id=row.command_id, transition_id=row.transition_id,
            status=row.status, state_type=row.state_type, state_name=row.state_name, state_id=row.state_id,
            source_topic=row.source_topic, source_partition=row.source_partition,
            source_offset=row.source_offset, source_digest=row.source_digest, payload=row.payload,
        )
        if expected != row.hash:
            return False
        previous[row.stream_id] = row.hash
    return True


def as_read(row: Any) -> SimpleNamespace:
    """A row as history reads it: the payload parsed, as the json column gives it."""
    fields = {name: getattr(row, name) for name in ("seq", "stream_id", "stream_type", "event_type", "command_id",
                                                    "transition_id", "status", "state_type", "state_id",
                                                    "source_topic", "source_partition", "source_offset")}
    fields["event_type"] = str(fields["event_type"])
    return SimpleNamespace(**fields, payload=json.loads(row.payload), recorded_at=None)


def test_legacy_events_are_in_the_legacy_shape_and_their_chain_holds():
    rows = legacy_rows()
    for row in rows:
        LegacyTaskRunEventPayload.model_validate_json(row.payload)
        assert not is_lean(json.loads(row.payload)["decision"])  # how the readers tell the shapes apart
    assert chain_holds(rows)


def test_legacy_events_republish_their_stored_messages():
    rows = legacy_rows()
    assert any(r.state_change is None for r in rows) or any(r.status == "REJECT" for r in rows)
    for row in rows:
        assert rendered_again(row, rows) == (row.result_event, row.state_change)


def test_legacy_events_replay_and_read_as_their_decision():
    rows = legacy_rows()
    verifier = StreamVerifier()
    for row in sorted(rows, key=lambda r: (r.stream_id, r.seq)):
        assert verifier.check(recorded_event(row)) is None, (row.stream_id, row.seq)
        payload = json.loads(row.payload)
        assert recorded_decision(payload, row.status, row.stream_id, transition_id=row.transition_id,
                                 state_id=row.state_id) == payload["decision"]
    flaky = [as_read(r) for r in rows if r.stream_id == UUID(int=0xA1)]
    entries = describe(sorted(flaky, key=lambda r: r.seq))
    assert [(str(e.proposed), str(e.from_state), str(e.to_state), e.status) for e in entries] == [
        ("PENDING", "None", "PENDING", "ACCEPT"),
        ("RUNNING", "PENDING", "RUNNING", "ACCEPT"),
        ("FAILED", "RUNNING", "SCHEDULED/AwaitingRetry", "REJECT"),
        ("RUNNING/Retrying", "SCHEDULED/AwaitingRetry", "RUNNING/Retrying", "ACCEPT"),
        ("COMPLETED", "RUNNING/Retrying", "COMPLETED", "ACCEPT"),
    ]


def test_the_lean_event_reads_as_the_legacy_one_in_history(rows):
    """history gives the same entries for both shapes: the lean event's decision is
    read through recorded_decision, its proposal from the command as received."""
    by_stream: dict[UUID, list[Any]] = defaultdict(list)
    for row in rows:
        by_stream[row.stream_id].append(as_read(row))
    rejected = [s for s, rs in by_stream.items() if any(r.status == "REJECT" and r.state_type for r in rs)]
    assert rejected
    entries = describe(sorted(by_stream[rejected[0]], key=lambda r: r.seq))
    reasons = [e.reason for e in entries if e.status == "REJECT"]
    assert reasons and all(reasons)
    assert all(e.to_state is not None for e in entries if e.status == "ACCEPT")


def test_the_same_commands_publish_the_same_bytes_and_history_as_before(monkeypatch):
    """The fixture's commands decided again with its clock and ids: every message
    published is the legacy one byte for byte, and history reads the same."""
    fixture = json.loads(LEGACY.read_text())
    rng = random.Random(fixture["random_seed"])
    monkeypatch.setattr("runstate.pipeline.ids.os.urandom", rng.randbytes)
    now = [datetime.fromisoformat(fixture["clock_start"])]

    def clock() -> datetime:
        now[0] += timedelta(seconds=1, microseconds=1234)
        return now[0]

    snapshot = StoreSnapshot(tag_limits={t: TagLimit(tag=t, limit=n) for t, n in fixture["tag_limits"].items()})
    rows: list[EventRow] = []
    for offset, (run, body) in enumerate(fixture["commands"]):
        record = IncomingRecord("runstate.commands", 0, offset, run.encode(), json.dumps(body).encode())
        rows += decide_batch([parse_record(record, 10**6)], snapshot, OrchestrationSettings(), clock=clock).events
    legacy = legacy_rows()
    assert len(rows) == len(legacy)
    for new, old in zip(rows, legacy, strict=True):
        assert (new.stream_id, new.seq, new.status, new.state_id) == (old.stream_id, old.seq, old.status, old.state_id)
        assert (new.result_event, new.state_change) == (old.result_event, old.state_change)
        assert rendered_again(new, rows) == (old.result_event, old.state_change)
        assert len(new.payload) < len(old.payload) / 2
    for run in {r.stream_id for r in rows}:
        mine = describe(sorted((as_read(r) for r in rows if r.stream_id == run), key=lambda r: r.seq))
        theirs = describe(sorted((as_read(r) for r in legacy if r.stream_id == run), key=lambda r: r.seq))
        assert mine == theirs


# -- events in the full shape (the whole run, every member), written before the lean one ----

def test_full_shape_events_replay_republish_and_read_as_the_lean_ones(rows):
    """The same decisions stored in the full shape: replayed, their messages rendered again byte
    for byte, and read by history as the lean events are."""
    from runstate.events import FullTaskRunEventPayload, inherit_run, recorded_context

    previous: dict[UUID, Any] = {}
    full_rows = []
    for row in sorted(rows, key=lambda r: (r.stream_id, r.seq)):
        if row.stream_type != "task_run":
            full_rows.append(row)
            continue
        payload = json.loads(row.payload)
        decision = inherit_run(recorded_decision(payload, row.status, row.stream_id, transition_id=row.transition_id,
                                                 state_id=row.state_id), previous.get(row.stream_id))
        previous[row.stream_id] = decision["run"]
        full = {
            "command": payload["command"],
            "context": OrchestrationContext.model_validate(recorded_context(payload, state_id=row.state_id)
                                                           ).model_dump(mode="json"),
            "decision": {"details": decision["result"]["details"]}
            | {name: decision[name] for name in ("appended_state", "run", "effects", "policy")},
            "schema_version": 1,
        }
        text = FullTaskRunEventPayload.model_validate(full).model_dump_json()
        full_rows.append(SimpleNamespace(**{**vars(row), "payload": text}) if hasattr(row, "__dict__")
                         else SimpleNamespace(**{f: getattr(row, f) for f in row.__dataclass_fields__} | {"payload": text}))
    verifier = StreamVerifier()
    for row in full_rows:
        if row.stream_type == "task_run":
            assert verifier.check(recorded_event(row)) is None, (row.stream_id, row.seq)
        assert rendered_again(row, full_rows) == (row.result_event, row.state_change), (row.stream_id, row.seq)
    lean_history = {s: describe([as_read(r) for r in rows if r.stream_id == s]) for s in previous}
    full_history = {s: describe([as_read(r) for r in full_rows if r.stream_id == s]) for s in previous}
    assert full_history == lean_history


# -- the appended state compact: what the event's columns hold is not written again -------

def test_an_appended_state_leaves_out_what_the_columns_hold_and_is_whole_again_on_reading(rows):
    compact = whole = 0
    for row in (r for r in rows if r.stream_type == "task_run" and r.state_id is not None):
        payload = json.loads(row.payload)
        stored = payload["decision"]["appended_state"]
        decision = recorded_decision(payload, row.status, row.stream_id, transition_id=row.transition_id,
                                     state_id=row.state_id)
        published = json.loads(row.result_event)["result"]["state"]
        # Read back, the state is the one published, member for member.
        assert State.model_validate(decision["appended_state"]) == State.model_validate(published)
        if "id" in stored:  # written whole: its details say what the columns do not
            whole += 1
            details = stored.get("state_details", {})
            assert (details.get("task_run_id"), details.get("transition_id")) != (
                str(row.stream_id), None if row.transition_id is None else str(row.transition_id))
        else:
            compact += 1
            assert "task_run_id" not in stored.get("state_details", {})
            assert "transition_id" not in stored.get("state_details", {})
            assert str(row.stream_id) not in json.dumps(stored)
    assert compact > whole > 0  # AwaitingRetry's state carries no transition_id: written whole


V1 = Path(__file__).with_name("lean_v1_events.json")


def republished_chained_and_replayed(rows: list[Any]) -> StreamVerifier:
    """A fixture's events: every decision status among them, each one's messages rendered again
    byte for byte, the hash chain holding, every task-run decision reproduced by replay."""
    task_rows = [r for r in rows if r.stream_type == "task_run"]
    assert {r.status for r in task_rows} >= {"ACCEPT", "REJECT", "ABORT", "WAIT"}
    for row in rows:
        assert rendered_again(row, rows) == (row.result_event, row.state_change), (row.stream_id, row.seq)
    assert chain_holds(rows)
    verifier = StreamVerifier()
    for row in sorted(task_rows, key=lambda r: (r.stream_id, r.seq)):
        assert verifier.check_stored(row.stream_id, row.seq, row.event_type, row.transition_id, row.status,
                                     row.state_id, row.payload, command_id=row.command_id) is None, (row.stream_id,
                                                                                                    row.seq)
    return verifier


def test_lean_events_written_before_the_compact_state_republish_replay_and_read_as_before():
    """tests/pipeline/lean_v1_events.json: the lean shape as written before appended states were
    compact (each one whole), by that version of the decider. Its messages are rendered again byte
    for byte, replay reproduces every decision (by the long way: the writer's text is now
    another), and its chain holds."""
    rows = fixture_rows(V1)
    task_rows = [r for r in rows if r.stream_type == "task_run"]
    assert all("id" in json.loads(r.payload)["decision"]["appended_state"] for r in task_rows if r.state_id)
    verifier = republished_chained_and_replayed(rows)
    assert verifier.by_text < len(task_rows)  # the whole states are not the writer's text now


V2 = Path(__file__).with_name("lean_v2_events.json")


def test_lean_events_written_before_the_compact_command_republish_replay_and_read_as_before():
    """tests/pipeline/lean_v2_events.json: the lean shape as written before the command was compact
    (the record's bytes as received) and before an accept's details, the core policy and schema
    version 1 were left out as defaults, by that version of the decider."""
    rows = fixture_rows(V2)
    task_rows = [r for r in rows if r.stream_type == "task_run"]
    assert all(json.loads(r.payload)["command"]["command_id"] == str(r.command_id) for r in task_rows
               if "command_id" in json.loads(r.payload)["command"])
    verifier = republished_chained_and_replayed(rows)
    for row in task_rows:
        assert recorded_command(json.loads(row.payload), row.transition_id, stream_id=row.stream_id,
                                command_id=row.command_id)["command_id"] == str(row.command_id)
    assert verifier.by_text == 0  # every stored text is another than the writer's now
