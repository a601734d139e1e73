"""PostgreSQL adapter: the append-only event log and the projections kept
beside it.

A batch is one transaction: load what the batch's commands need (tag rows with
FOR UPDATE, because slots are shared by every partition), let the pure core
decide, then write every event with one multi-row INSERT and every projection
with one upsert. The primary key (stream_id, seq) makes a second writer of the
same history fail instead of forking it; the caller retries against fresh state.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import namedtuple_row
from psycopg_pool import AsyncConnectionPool
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from runstate.domain import CacheEntry, FlowRunView, Lease, State, StateType, TagLimit, TaskRunView
from runstate.messages import CreateTaskRunCommand, SetStateCommand
from runstate.pipeline.processor import BatchOutcome, ParsedCommand, StoredOutcome, StoreSnapshot, StreamHead

TASK_KINDS = ("set_task_run_state", "create_task_run")


Statement = tuple[str, dict[str, Any]]

_PARAM = re.compile(r"(?<![:\w]):(\w+)")


def binary_sql(query: str) -> str:
    """Turn `:name` placeholders into psycopg's binary `%(name)b`: text-format
    arrays escape every element in Python, which dominated a batch's cost."""
    return _PARAM.sub(r"%(\1)b", query)


Connection = psycopg.AsyncConnection | AsyncConnection


async def run_sql(conn: Connection, query: str, params: dict[str, Any]) -> list[Any]:
    """Execute on a psycopg connection, or on the one under a SQLAlchemy connection's transaction."""
    if not isinstance(conn, psycopg.AsyncConnection):
        conn = (await conn.get_raw_connection()).driver_connection
    async with conn.cursor(row_factory=namedtuple_row) as cur:
        await cur.execute(binary_sql(query), params, prepare=False)
        return await cur.fetchall() if cur.description else []


# A small batch spent most of its database time on round trips, and each one
# also costs the event loop a wait on the socket (psycopg's pipeline mode saved
# the round trips but not the waits). So a batch's reads are one SELECT and its
# writes one statement of data-modifying CTEs.


def _prefixed(statement: Statement, prefix: str) -> Statement:
    query, params = statement
    return _PARAM.sub(rf":{prefix}\1", query), {prefix + name: value for name, value in params.items()}


async def read_together(conn: Connection, queries: dict[str, Statement]) -> dict[str, list[dict[str, Any]]]:
    """Run several queries as one SELECT, each one's rows a JSON array of objects."""
    columns, params = [], {}
    for i, (name, statement) in enumerate(queries.items()):
        query, named = _prefixed(statement, f"q{i}_")
        columns.append(f"(SELECT coalesce(json_agg(r), '[]') FROM ({query}) r) AS {name}")
        params.update(named)
    (row,) = await run_sql(conn, "SELECT " + ", ".join(columns), params)
    return row._asdict()


def write_together(statements: Sequence[Statement]) -> Statement:
    """Several INSERT / UPDATE / DELETE statements as one: all run, against one
    snapshot, and none reads what another writes (the batch's writes are
    independent: a lease taken and released in one batch is never written)."""
    if len(statements) == 1:
        return statements[0]
    ctes, params = [], {}
    for i, statement in enumerate(statements):
        query, named = _prefixed(statement, f"w{i}_")
        ctes.append(f"w{i} AS ({query})")
        params.update(named)
    return "WITH " + ", ".join(ctes) + " SELECT 1", params


# A batch reads the projections, the already-decided records and the tag rows
# in several statements. Under READ COMMITTED each statement sees a different
# commit, so a zombie committing between two of them left the new owner
# believing a run unknown while its creation was already recorded (found by the
# fault suite). REPEATABLE READ gives the whole batch one snapshot; a write that
# then collides with a newer commit fails and the batch is retried.
BATCH_ISOLATION = "REPEATABLE READ"

# A member frozen inside its transaction (SIGSTOP, a long GC pause) holds the
# tag rows it locked; the server ends such a session so other partitions go on.
SESSION_OPTIONS = "-c idle_in_transaction_session_timeout=15s -c lock_timeout=20s"


def make_engine(url: str, pool_size: int = 4) -> AsyncEngine:
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=4,
        pool_pre_ping=True,
        isolation_level=BATCH_ISOLATION,
        connect_args={"options": SESSION_OPTIONS},
    )


def batch_pool(url: str, size: int) -> AsyncConnectionPool:
    """The consumer's connections: plain psycopg, one per lane. SQLAlchemy's
    pool pinged the server on every checkout and its async adaptation ran each
    call through a greenlet, a sixth of a small batch's CPU (py-spy). A
    connection broken by an outage is discarded when it is returned; the pool
    opens a new one."""

    async def configure(conn: psycopg.AsyncConnection) -> None:
        await conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
        await conn.set_autocommit(True)  # each batch opens its own transaction block

    return AsyncConnectionPool(
        make_url(url).set(drivername="postgresql").render_as_string(hide_password=False),
        min_size=size,
        max_size=size,
        kwargs={"options": SESSION_OPTIONS},
        configure=configure,
        timeout=5.0,
        open=False,
        name="runstate-batches",
    )


class EventStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    # -- reading what a batch needs ------------------------------------------
    async def load_snapshot(
        self, conn: Connection, parsed: Sequence[ParsedCommand], topic: str, now: datetime
    ) -> StoreSnapshot:
        """Everything the batch's decisions read, in one round trip for what the
        commands name and a second one only when the runs found point further
        (their flow runs, their tags' limits and leases)."""
        snap = StoreSnapshot()
        if not parsed:
            return snap
        task_ids = {p.stream_id for p in parsed if p.command.kind in TASK_KINDS}
        flow_ids = {p.stream_id for p in parsed if p.command.kind not in TASK_KINDS}
        flow_ids.update(
            p.command.flow_run_id
            for p in parsed
            if isinstance(p.command, CreateTaskRunCommand) and p.command.flow_run_id
        )
        new_tags = {tag for p in parsed if isinstance(p.command, CreateTaskRunCommand) for tag in p.command.tags}
        transitions = [(p.stream_id, p.transition_id) for p in parsed if p.transition_id is not None]
        cache_keys = {
            p.command.state.state_details.cache_key
            for p in parsed
            if isinstance(p.command, SetStateCommand)
            and p.command.state.type == StateType.RUNNING
            and p.command.state.state_details.cache_key
        }

        first: dict[str, Statement] = {
            "by_source": (
                "SELECT e.source_partition, e.source_offset, e.stream_id, e.source_digest, e.command_id,"
                " (e.payload->'result_event')::text AS result_event,"
                " (e.payload->'state_change')::text AS state_change"
                " FROM events e JOIN unnest(CAST(:parts AS integer[]), CAST(:offs AS bigint[]))"
                " AS s(p, o) ON e.source_partition = s.p AND e.source_offset = s.o"
                " WHERE e.source_topic = :topic",
                {
                    "topic": topic,
                    "parts": [p.record.partition for p in parsed],
                    "offs": [p.record.offset for p in parsed],
                },
            )
        }
        if task_ids:
            first["task_runs"] = (
                "SELECT id, last_seq, view FROM task_runs WHERE id = ANY(:ids)",
                {"ids": list(task_ids)},
            )
        if flow_ids:
            first["flow_runs"] = _flow_runs_query(flow_ids)
        if transitions:
            first["by_transition"] = (
                "SELECT e.stream_id, e.transition_id,"
                " (e.payload->'result_event')::text AS result_event,"
                " (e.payload->'state_change')::text AS state_change"
                " FROM events e JOIN unnest(CAST(:sids AS uuid[]), CAST(:tids AS uuid[]))"
                " AS t(s, tid) ON e.stream_id = t.s AND e.transition_id = t.tid"
                " WHERE e.status IN ('ACCEPT', 'REJECT', 'ABORT')",
                {"sids": [s for s, _ in transitions], "tids": [t for _, t in transitions]},
            )
        if cache_keys:
            first["cache"] = (
                "SELECT DISTINCT ON (cache_key) cache_key, cache_expiration, created, state"
                " FROM task_cache WHERE cache_key = ANY(:keys)"
                " AND (cache_expiration IS NULL OR cache_expiration > :now)"
                " ORDER BY cache_key, created DESC",
                {"keys": list(cache_keys), "now": now},
            )
        found = await read_together(conn, first)

        # Rows arrive as JSON objects: ids and times as strings, which the
        # models parse; the stored messages as the very text first published.
        for row in found.get("task_runs", []):
            snap.task_runs[UUID(row["id"])] = StreamHead(TaskRunView.model_validate(row["view"]), row["last_seq"])
        _add_flow_runs(snap, found.get("flow_runs", []))
        for row in found["by_source"]:
            stored = _stored(row)
            # json_agg writes bytea as its hex text, \x and two digits a byte.
            digest = row["source_digest"]
            stored.digest = bytes.fromhex(digest[2:]) if digest else None
            stored.command_id = UUID(row["command_id"])
            previous = snap.by_source.get((row["source_partition"], row["source_offset"]))
            # Several records may have sat at one position (a recreated topic):
            # keep the one whose content is looked for, or any.
            if previous is None or stored.digest in {p.record.digest for p in parsed}:
                snap.by_source[(row["source_partition"], row["source_offset"])] = stored
        for row in found.get("by_transition", []):
            snap.by_transition[(UUID(row["stream_id"]), UUID(row["transition_id"]))] = _stored(row)
        for row in found.get("cache", []):
            snap.cache.setdefault(row["cache_key"], []).append(CacheEntry.model_validate(row))

        heads = [h.view for h in snap.task_runs.values()]
        tags = new_tags.union(*(run.tags for run in heads))
        tagged_runs = [run.id for run in heads if run.tags]
        more_flows = {run.flow_run_id for run in heads if run.flow_run_id is not None} - flow_ids
        second: dict[str, Statement] = {}
        if more_flows:
            second["flow_runs"] = _flow_runs_query(more_flows)
        if tags:
            # FOR UPDATE: slots are shared by every partition's runs.
            second["tag_limits"] = (
                'SELECT tag, "limit", active, active_slots, avg_slot_occupancy_seconds'
                " FROM tag_concurrency_limits WHERE tag = ANY(:tags) ORDER BY tag FOR UPDATE",
                {"tags": sorted(tags)},
            )
        if tagged_runs:
            second["leases"] = (
                "SELECT id, task_run_id, tags, slots FROM tag_leases WHERE task_run_id = ANY(:ids)",
                {"ids": tagged_runs},
            )
        if not second:
            return snap
        found = await read_together(conn, second)
        _add_flow_runs(snap, found.get("flow_runs", []))
        for row in found.get("tag_limits", []):
            snap.tag_limits[row["tag"]] = TagLimit.model_validate(row)
        for row in found.get("leases", []):
            lease = Lease(id=row["id"], tags=row["tags"], slots=row["slots"], holder_run_id=row["task_run_id"])
            snap.leases.setdefault(lease.holder_run_id, []).append(lease)
        return snap

    # -- writing a decided batch ---------------------------------------------
    async def write(self, conn: Connection, out: BatchOutcome) -> None:
        """Every row of the batch, in one statement."""
        statements: list[Statement] = []
        if out.events:
            ev = out.events
            statements.append((
                "INSERT INTO events (stream_id, seq, stream_type, event_type, command_id,"
                " transition_id, status, state_type, state_name, state_id, payload,"
                " source_topic, source_partition, source_offset, source_digest)"
                " SELECT s, q, st, et, c, t, stt, sty, sn, si, CAST(p AS json), tp, pa, o, dg FROM unnest("
                " CAST(:s AS uuid[]), CAST(:q AS bigint[]), CAST(:st AS text[]), CAST(:et AS text[]),"
                " CAST(:c AS uuid[]), CAST(:t AS uuid[]), CAST(:stt AS text[]), CAST(:sty AS text[]),"
                " CAST(:sn AS text[]), CAST(:si AS uuid[]), CAST(:p AS text[]), CAST(:tp AS text[]),"
                " CAST(:pa AS integer[]), CAST(:o AS bigint[]), CAST(:dg AS bytea[]))"
                " AS x(s, q, st, et, c, t, stt, sty, sn, si, p, tp, pa, o, dg)",
                {
                    "s": [e.stream_id for e in ev],
                    "q": [e.seq for e in ev],
                    "st": [e.stream_type for e in ev],
                    "et": [e.event_type for e in ev],
                    "c": [e.command_id for e in ev],
                    "t": [e.transition_id for e in ev],
                    "stt": [e.status for e in ev],
                    "sty": [e.state_type for e in ev],
                    "sn": [e.state_name for e in ev],
                    "si": [e.state_id for e in ev],
                    "p": [e.payload for e in ev],
                    "tp": [e.source_topic for e in ev],
                    "pa": [e.source_partition for e in ev],
                    "o": [e.source_offset for e in ev],
                    "dg": [e.source_digest for e in ev],
                },
            ))
        if out.task_run_heads:
            heads = list(out.task_run_heads.values())
            statements.append((
                "INSERT INTO task_runs (id, last_seq, flow_run_id, state_type, state_name, task_key, dynamic_key,"
                " view) SELECT i, q, f, t, n, k, d, CAST(v AS json) FROM unnest(CAST(:i AS uuid[]),"
                " CAST(:q AS bigint[]), CAST(:f AS uuid[]), CAST(:t AS text[]), CAST(:n AS text[]),"
                " CAST(:k AS text[]), CAST(:d AS text[]), CAST(:v AS text[])) AS x(i, q, f, t, n, k, d, v)"
                " ON CONFLICT (id) DO UPDATE SET last_seq = EXCLUDED.last_seq,"
                " state_type = EXCLUDED.state_type, state_name = EXCLUDED.state_name,"
                " view = EXCLUDED.view, updated_at = clock_timestamp()",
                {
                    "i": [h.view.id for h in heads],
                    "q": [h.last_seq for h in heads],
                    "f": [h.view.flow_run_id for h in heads],
                    "t": [h.view.state.type.value if h.view.state else None for h in heads],
                    "n": [h.view.state.name if h.view.state else None for h in heads],
                    "k": [h.view.task_key for h in heads],
                    "d": [h.view.dynamic_key for h in heads],
                    "v": [h.view_json or h.view.model_dump_json() for h in heads],
                },
            ))
        if out.flow_run_heads:
            heads = list(out.flow_run_heads.values())
            statements.append((
                "INSERT INTO flow_runs (id, last_seq, state_type, view)"
                " SELECT i, q, t, CAST(v AS jsonb) FROM unnest(CAST(:i AS uuid[]), CAST(:q AS bigint[]),"
                " CAST(:t AS text[]), CAST(:v AS text[])) AS x(i, q, t, v)"
                " ON CONFLICT (id) DO UPDATE SET last_seq = EXCLUDED.last_seq,"
                " state_type = EXCLUDED.state_type, view = EXCLUDED.view, updated_at = clock_timestamp()",
                {
                    "i": [h.view.id for h in heads],
                    "q": [h.last_seq for h in heads],
                    "t": [h.view.state_type.value if h.view.state_type else None for h in heads],
                    "v": [h.view.model_dump_json() for h in heads],
                },
            ))
        statements += _side_table_writes(out.cache_rows, out.leases_added, out.leases_removed, out.slot_deltas)
        if statements:
            await run_sql(conn, *write_together(statements))

    # -- reads for the gateway, CLI and tests --------------------------------
    async def history(self, stream_id: UUID) -> list[dict[str, Any]]:
        async with self.engine.connect() as conn:
            rows = await run_sql(
                conn,
                "SELECT seq, event_type, command_id, transition_id, status, state_type, state_name,"
                " payload, source_topic, source_partition, source_offset, recorded_at"
                " FROM events WHERE stream_id = :id ORDER BY seq",
                {"id": stream_id},
            )
            return [row._asdict() for row in rows]

    async def task_run(self, run_id: UUID) -> tuple[TaskRunView, int] | None:
        async with self.engine.connect() as conn:
            rows = await run_sql(conn, "SELECT view, last_seq FROM task_runs WHERE id = :id", {"id": run_id})
            row = rows[0] if rows else None
        return (TaskRunView.model_validate(row.view), row.last_seq) if row else None


def _side_table_writes(
    cache_rows: Sequence[CacheEntry],
    leases_added: Sequence[Lease],
    leases_removed: Sequence[UUID],
    slot_deltas: dict[str, int],
) -> list[Statement]:
    statements: list[Statement] = []
    if cache_rows:
        statements.append((
            "INSERT INTO task_cache (cache_key, cache_expiration, state_id, state, created)"
            " SELECT k, e, i, CAST(s AS jsonb), c FROM unnest(CAST(:k AS text[]),"
            " CAST(:e AS timestamptz[]), CAST(:i AS uuid[]), CAST(:s AS text[]),"
            " CAST(:c AS timestamptz[])) AS x(k, e, i, s, c)",
            {
                "k": [r.cache_key for r in cache_rows],
                "e": [r.cache_expiration for r in cache_rows],
                "i": [r.state.id for r in cache_rows],
                "s": [r.state.model_dump_json() for r in cache_rows],
                "c": [r.created for r in cache_rows],
            },
        ))
    if leases_added:
        statements.append((
            "INSERT INTO tag_leases (id, task_run_id, tags, slots)"
            " SELECT i, r, string_to_array(t, chr(31)), s FROM unnest(CAST(:i AS uuid[]),"
            " CAST(:r AS uuid[]), CAST(:t AS text[]), CAST(:s AS integer[])) AS x(i, r, t, s)",
            {
                "i": [lease.id for lease in leases_added],
                "r": [lease.holder_run_id for lease in leases_added],
                "t": [chr(31).join(lease.tags) for lease in leases_added],
                "s": [lease.slots for lease in leases_added],
            },
        ))
    if leases_removed:
        statements.append(("DELETE FROM tag_leases WHERE id = ANY(:ids)", {"ids": list(leases_removed)}))
    changed = {tag: d for tag, d in slot_deltas.items() if d}
    if changed:
        statements.append((
            "UPDATE tag_concurrency_limits l SET active_slots = GREATEST(0, l.active_slots + d.delta),"
            " updated_at = clock_timestamp()"
            " FROM unnest(CAST(:tags AS text[]), CAST(:deltas AS integer[])) AS d(tag, delta)"
            " WHERE l.tag = d.tag",
            {"tags": list(changed), "deltas": list(changed.values())},
        ))
    return statements


def _flow_runs_query(ids: set[UUID]) -> Statement:
    return ("SELECT id, last_seq, view FROM flow_runs WHERE id = ANY(:ids)", {"ids": list(ids)})


def _add_flow_runs(snap: StoreSnapshot, rows: list[dict[str, Any]]) -> None:
    for row in rows:
        snap.flow_runs[UUID(row["id"])] = StreamHead(FlowRunView.model_validate(row["view"]), row["last_seq"])


def _stored(row: dict[str, Any]) -> StoredOutcome:
    state_change = row["state_change"] if row["state_change"] not in (None, "null") else None
    return StoredOutcome(row["result_event"], state_change, row["stream_id"].encode())
