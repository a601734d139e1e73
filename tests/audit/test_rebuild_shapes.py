"""`runstate rebuild` reads every shape of task-run event the log holds: the lean one written
now (appended states compact), the lean one with whole appended states, the full one written before it (the whole run, every member) and that full one as jsonb
printed it (events stored before revision 0004 made the payload json), and folds them into the
same projections."""

from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg
import pytest

from pipeline.test_lean_event import decided_rows
from runstate.audit.rebuild import rebuild
from runstate.domain import CacheEntry, OrchestrationContext, OrchestrationSettings, TagLimit, TaskRunView
from runstate.events import appended_with_columns, inherit_run, recorded_context, recorded_decision
from runstate.pipeline.batch import decide_batch
from runstate.pipeline.ports import StoreSnapshot
from runstate.pipeline.records import IncomingRecord, parse_record

from .support import dsn, scratch_database

pytestmark = [pytest.mark.postgres]

COLUMNS = ("stream_id", "seq", "stream_type", "event_type", "command_id", "transition_id", "status", "state_type",
           "state_name", "state_id", "payload", "source_topic", "source_partition", "source_offset",
           "source_digest", "hash")


def full_payloads(rows: list[Any]) -> dict[tuple[Any, int], dict[str, Any]]:
    """Each lean task-run event's payload as the full shape wrote it."""
    out: dict[tuple[Any, int], dict[str, Any]] = {}
    previous: dict[Any, Any] = {}
    for row in sorted((r for r in rows if r.stream_type == "task_run"), key=lambda r: (r.stream_id, r.seq)):
        payload = json.loads(row.payload)
        decision = inherit_run(recorded_decision(payload, row.status, row.stream_id, transition_id=row.transition_id,
                                                 state_id=row.state_id), previous.get(row.stream_id))
        assert decision is not None
        previous[row.stream_id] = decision["run"]
        context = OrchestrationContext.model_validate(recorded_context(payload, state_id=row.state_id)
                                                      ).model_dump(mode="json")
        out[(row.stream_id, row.seq)] = {
            "command": payload["command"], "context": context, "schema_version": 1,
            "decision": {name: decision[name] for name in ("appended_state", "run", "effects", "policy")}
            | {"details": decision["result"]["details"]},
        }
    return out


def rebuilt(admin_url: str, app_url: str, rows: list[Any], payload_of) -> dict[str, list[tuple]]:
    with scratch_database(admin_url, app_url, "shapes") as (url, admin):
        with psycopg.connect(dsn(admin)) as conn, conn.cursor().copy(
                f"COPY events ({', '.join(COLUMNS)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(tuple(payload_of(row) if c == "payload" else getattr(row, c) for c in COLUMNS))
        report = rebuild(url, batch_size=7)
        assert report.events == len(rows)
        with psycopg.connect(dsn(url)) as conn:
            runs = conn.execute("SELECT id, last_seq, flow_run_id, state_type, state_name, task_key, dynamic_key, view"
                                " FROM task_runs ORDER BY id").fetchall()
            cache = conn.execute("SELECT cache_key, cache_expiration, state_id, state, created FROM task_cache"
                                 " ORDER BY state_id").fetchall()
            leases = conn.execute("SELECT id, task_run_id, tags, slots FROM tag_leases ORDER BY id").fetchall()
    # Compared as the readers read them: the models fill in what a lean JSON leaves out.
    return {
        "task_runs": [(*r[:7], TaskRunView.model_validate(r[7])) for r in runs],
        "task_cache": [(*r[:3], CacheEntry.model_validate({"cache_key": r[0], "cache_expiration": r[1],
                                                           "state": r[3], "created": r[4]})) for r in cache],
        "tag_leases": [tuple(r) for r in leases],
    }


def held_twice() -> list[Any]:
    """A run that takes a slot and then another (RUNNING -> RUNNING): the effects of an event
    that is neither the stream's first nor its newest must still be folded."""
    run = uuid.uuid4()
    items = [parse_record(IncomingRecord("shapes", 0, offset, str(run).encode(), json.dumps(body).encode()), 10**9)
             for offset, body in enumerate((
                 {"kind": "create_task_run", "id": str(run), "tags": ["shapes"]},
                 {"kind": "set_task_run_state", "task_run_id": str(run), "state": {"type": "RUNNING"}},
                 {"kind": "set_task_run_state", "task_run_id": str(run), "state": {"type": "RUNNING"}},
             ))]
    snapshot = StoreSnapshot(tag_limits={"shapes": TagLimit(tag="shapes", limit=5)})
    return list(decide_batch(items, snapshot, OrchestrationSettings()).events)


def test_rebuild_folds_the_lean_the_full_and_the_jsonb_printed_shapes_alike(admin_database_url, database_url):
    rows = decided_rows(seed=23, commands=300) + held_twice()
    full = full_payloads(rows)
    lean = rebuilt(admin_database_url, database_url, rows, lambda r: r.payload)
    assert lean["task_runs"] and lean["task_cache"] and lean["tag_leases"], "the workload has no caches or leases"
    assert len([lease for lease in lean["tag_leases"] if lease[2] == ["shapes"]]) == 2
    # What the decider itself left as each run's head.
    heads: dict[Any, Any] = {}
    for key, payload in full.items():
        heads[key[0]] = max(heads.get(key[0], (0, None)), (key[1], payload["decision"]["run"]), key=lambda x: x[0])
    assert {r[0]: r[7] for r in lean["task_runs"]} == {
        stream: TaskRunView.model_validate(run) for stream, (_, run) in heads.items()}

    def full_text(row: Any) -> str:
        payload = full.get((row.stream_id, row.seq))
        return row.payload if payload is None else json.dumps(payload, separators=(",", ":"))

    def jsonb_text(row: Any) -> str:
        payload = full.get((row.stream_id, row.seq))
        return row.payload if payload is None else json.dumps(payload)  # ", " and ": ", as jsonb prints

    def whole_state_text(row: Any) -> str:
        """The lean shape as written before appended states were compact: each one whole."""
        payload = json.loads(row.payload)
        appended = (payload.get("decision") or {}).get("appended_state")
        if row.stream_type != "task_run" or not isinstance(appended, dict) or "id" in appended:
            return row.payload
        payload["decision"]["appended_state"] = appended_with_columns(appended, row.stream_id, row.transition_id,
                                                                      row.state_id)
        return json.dumps(payload, separators=(",", ":"))

    assert sum(whole_state_text(r) != r.payload for r in rows) > len(rows) / 2
    assert rebuilt(admin_database_url, database_url, rows, full_text) == lean
    assert rebuilt(admin_database_url, database_url, rows, jsonb_text) == lean
    assert rebuilt(admin_database_url, database_url, rows, whole_state_text) == lean
