"""The read side: every query the gateway, the CLI and the audit tools run over the
event log and the projections, in one SQL style (SQLAlchemy `text()` with named
parameters). The gateway runs them on an async engine, the CLI and the audit tools
on a sync one; both share the SQL strings here. What the rows become (Prefect's
models, history entries) is the caller's business. (The batch path reads through
its own port, pipeline/ports.py, on plain psycopg connections; rebuild's set-based
statements write as they read and stay in audit/rebuild.py.)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from uuid import UUID

from sqlalchemy import Engine, Row, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from runstate.database_urls import DatabaseURL, parse
from runstate.store.postgres import BATCH_ISOLATION, SESSION_OPTIONS

Params = Mapping[str, Any]


def make_engine(url: DatabaseURL, pool_size: int = 4) -> AsyncEngine:
    """The gateway's (and the tests') async engine."""
    return create_async_engine(
        parse(url),
        pool_size=pool_size,
        max_overflow=4,
        pool_pre_ping=True,
        isolation_level=BATCH_ISOLATION,
        connect_args={"options": SESSION_OPTIONS},
    )


# -- running a query: async for the gateway, sync for the CLI and the audit tools ---------
async def first_async(engine: AsyncEngine, sql: str, params: Params | None = None) -> Row[Any] | None:
    async with engine.connect() as conn:
        return (await conn.execute(text(sql), dict(params or {}))).first()


async def rows_async(engine: AsyncEngine, sql: str, params: Params | None = None) -> Sequence[Row[Any]]:
    async with engine.connect() as conn:
        return (await conn.execute(text(sql), dict(params or {}))).all()


def first(engine: Engine, sql: str, params: Params | None = None) -> Row[Any] | None:
    with engine.connect() as conn:
        return conn.execute(text(sql), dict(params or {})).first()


def rows(engine: Engine, sql: str, params: Params | None = None) -> Sequence[Row[Any]]:
    with engine.connect() as conn:
        return conn.execute(text(sql), dict(params or {})).all()


PING = "SELECT 1"

# -- one stream of the log: `runstate history`, the tests' LogReader ----------------------
STREAM_EVENTS = (
    "SELECT seq, stream_id, stream_type, event_type, command_id, transition_id, status, state_type, state_name,"
    " state_id, payload, source_topic, source_partition, source_offset, recorded_at"
    " FROM events WHERE stream_id = :id ORDER BY seq"
)


class LogReader:
    """Every event of one stream, in order, with its payload and source (tests, demo)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def history(self, stream_id: UUID) -> list[dict[str, Any]]:
        return [dict(row._mapping) for row in await rows_async(self.engine, STREAM_EVENTS, {"id": stream_id})]


# -- task runs and flow runs, as the gateway answers them --------------------------------
TASK_RUN = (
    "SELECT t.view, t.updated_at, e.recorded_at AS created,"
    " e.payload->'command'->>'cache_expiration' AS cache_expiration"
    " FROM task_runs t LEFT JOIN events e ON e.stream_id = t.id AND e.seq = 1"
)
TASK_RUN_BY_ID = TASK_RUN + " WHERE t.id = :id"


def task_run_by_key(flow_run_id: UUID | None) -> str:
    """The run with (flow_run_id :f, task_key :k, dynamic_key :d)."""
    # Spelled out (not IS NOT DISTINCT FROM) so the (flow_run_id, task_key, dynamic_key) index is usable.
    same_flow = "t.flow_run_id IS NULL" if flow_run_id is None else "t.flow_run_id = :f"
    return TASK_RUN + f" WHERE {same_flow} AND t.task_key = :k AND t.dynamic_key = :d ORDER BY e.recorded_at LIMIT 1"


# An appended state and the columns a compact one leaves out (events.appended_with_columns).
TASK_RUN_STATES = (
    "SELECT payload->'decision'->'appended_state' AS state, stream_id, transition_id, state_id FROM events"
    " WHERE stream_id = :id AND stream_type = 'task_run' AND state_type IS NOT NULL"
    " ORDER BY seq"
)
TASK_RUN_STATE = (
    "SELECT payload->'decision'->'appended_state' AS state, stream_id, transition_id, state_id FROM events"
    " WHERE state_id = :sid AND stream_type = 'task_run'"
)
FLOW_RUN = (
    "SELECT f.view, f.updated_at, e.recorded_at AS created, e.payload->'command' AS command,"
    " (SELECT s.payload->'state' FROM events s WHERE s.stream_id = f.id"
    "  AND s.state_type IS NOT NULL ORDER BY s.seq DESC LIMIT 1) AS state"
    " FROM flow_runs f JOIN events e ON e.stream_id = f.id AND e.seq = 1"
    " WHERE f.id = :id"
)
FLOW_RUN_STATE_AT = "SELECT payload->'state' AS state FROM events WHERE stream_id = :id AND seq = :seq"
FLOW_RUN_STATES = (
    "SELECT payload->'state' AS state FROM events WHERE stream_id = :id"
    " AND stream_type = 'flow_run' AND state_type IS NOT NULL ORDER BY seq"
)

# -- tag concurrency limits -------------------------------------------------------------
# The limits as the CLI shows them, by tag.
LIMIT_ROWS = (
    'SELECT tag, "limit", active, active_slots, avg_slot_occupancy_seconds, updated_at FROM tag_concurrency_limits'
)
# A limit as Prefect's V1 API shows it: the runs holding its slots instead of their count.
PREFECT_LIMIT = (
    'SELECT l.tag, l."limit", l.updated_at,'
    " ARRAY(SELECT DISTINCT g.task_run_id FROM tag_leases g WHERE l.tag = ANY(g.tags)) AS holders"
    " FROM tag_concurrency_limits l WHERE l.tag = :tag"
)
LIMIT_TAGS = "SELECT tag FROM tag_concurrency_limits"


def _limit_json(row: Row[Any]) -> dict[str, Any]:
    out = dict(row._mapping)
    out["updated_at"] = out["updated_at"].isoformat()
    return out


def limit_row(engine: Engine, tag: str) -> dict[str, Any] | None:
    row = first(engine, LIMIT_ROWS + " WHERE tag = :tag", {"tag": tag})
    return _limit_json(row) if row else None


def limit_rows(engine: Engine) -> list[dict[str, Any]]:
    return [_limit_json(r) for r in rows(engine, LIMIT_ROWS + " ORDER BY tag")]


# -- the whole log, in (stream_id, seq) order: replay, backfill, counts ------------------
# Smaller than every real key: (stream_id, seq) > START includes the whole log because seq > 0.
START: tuple[UUID, int] = (UUID(int=0), 0)


def scan_events(
    engine: Engine,
    columns: str,
    *,
    condition: str = "TRUE",
    params: Params | None = None,
    batch_size: int = 1000,
) -> Iterator[Sequence[Row[Any]]]:
    """Batches of `events` rows in (stream_id, seq) order, by keyset on the primary key.

    Each batch is its own short statement, so memory stays bounded by the batch and no
    transaction is held open across the scan (which would hold back vacuum on a live log).
    """
    last = START
    while True:
        batch = rows(
            engine,
            f"SELECT stream_id, seq, {columns} FROM events"
            f" WHERE ({condition}) AND (stream_id, seq) > (:last_stream, :last_seq)"
            " ORDER BY stream_id, seq LIMIT :batch",
            {**(params or {}), "last_stream": last[0], "last_seq": last[1], "batch": batch_size},
        )
        if not batch:
            return
        yield batch
        if len(batch) < batch_size:
            return
        last = (batch[-1].stream_id, batch[-1].seq)


def count_events(engine: Engine, condition: str = "TRUE", params: Params | None = None) -> int:
    with engine.connect() as conn:
        return conn.execute(text(f"SELECT count(*) FROM events WHERE {condition}"), dict(params or {})).scalar_one()
