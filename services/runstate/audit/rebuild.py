"""`runstate rebuild`: recompute every projection from the event log.

Design: build into session-private TEMP tables, then swap in one transaction.

* The log is read in keyset batches over its primary key (stream_id, seq), each ending at
  the end of a stream. Each batch is folded by one set-based statement: the payload of every
  event is detoasted once (MATERIALIZED CTE) and its results go to the shadow tables — the
  stream's newest `decision.run` / `flow_run` becomes its head (joined to its creation's run
  and inserted; only a stream longer than a batch is cut, and the batch continuing it upserts,
  keeping the highest seq, so a split stream converges), every CacheInserted effect becomes a
  cache row holding the appended state, every SlotsTaken / SlotsReleased effect is recorded
  as taken / released, and its slots as a change of its tags' counts (a release by the
  `decrements` the rules counted).
  Each batch commits, so no transaction (and no vacuum horizon) spans the rebuild.
* Each fold also notes every stream's newest seq it saw (`rb_seen`, from the batch's own
  snapshot). Once the log is folded, a range's task-run heads are composed into the rows
  `task_runs` holds (`rb_task_rows`, sorted by id), in the session (or worker) that folded it.
* The live projections are untouched until the final transaction, which locks them, folds
  whatever the service appended meanwhile (every event above its stream's seen seq, found
  on the primary key alone: the "final pass"; a caught-up stream's creation is read again for
  its base), then TRUNCATEs and refills them and recomputes `active_slots` of every tag limit
  as the sum of its recorded slot changes.
* Interrupting at any point before that commit leaves the live tables as they were, and
  TEMP tables vanish with the session: a rerun simply starts over. Nothing needs cleaning.
* With more than one worker, the log is cut into ranges of whole streams (audit/parallel.py).
  The rebuilding session is one of the workers: it folds ranges straight into its shadow,
  while worker processes (one fewer) fold the others in sessions of their own, into TEMP
  tables of their own, and hand them back as binary COPY data: a stream's events are in one
  range, so the ranges' shadows never overlap and are simply appended. Every range's heads
  are composed as soon as it is folded (the costliest JSON work after parsing), so the swap
  only copies finished rows. Folding in the rebuilding session itself, rather than only
  taking the shadows of two processes, took a fifth less CPU per event (23.5 against 30 µs,
  1M events, 2 workers, 2026-12-02): half the shadows need no handing over.

TEMP tables need no CREATE privilege on the schema, so the service's own role can rebuild.
A tag limit with a `concurrency_limit` stream in the log gets its `limit` and `active` from
the stream's last event (none after a delete); a limit without one (written before
revision 0010, or by hand) is kept as it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from uuid import UUID

from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool

from runstate.audit.db import sync_url
from runstate.audit.parallel import (
    MIN_RANGE_EVENTS,
    WHOLE_LOG,
    StreamRange,
    plan_ranges,
    report_progress,
    run_ranges,
)
from runstate.domain import TaskRunView
from runstate.events import CREATION_MEMBERS
from runstate.store.queries import START

# A head's view as the consumer writes it (members equal to their defaults left out): the
# members fixed at creation (from the creation event's run), then the newest event's run
# (whole in the older shapes, lean in TaskRunEventPayload's).
COMPOSED_VIEW = ("COALESCE(base - CAST(:not_creation AS text[]), '{}') || head || CASE WHEN state IS NULL"
                 " THEN jsonb_build_object('id', id) ELSE jsonb_build_object('id', id, 'state', state) END")
NOT_CREATION_MEMBERS = [name for name in TaskRunView.model_fields if name not in CREATION_MEMBERS]

SHADOW_DDL = """
CREATE TEMP TABLE rb_task_runs (id uuid PRIMARY KEY, last_seq bigint NOT NULL, base jsonb, head jsonb NOT NULL,
                                state jsonb);
CREATE TEMP TABLE rb_flow_runs (id uuid PRIMARY KEY, last_seq bigint NOT NULL, state_type text,
                                view jsonb NOT NULL);
CREATE TEMP TABLE rb_cache (stream_id uuid, seq bigint, cache_key text, cache_expiration timestamptz,
                            state_id uuid, state jsonb, created timestamptz);
CREATE TEMP TABLE rb_leases_taken (id uuid, task_run_id uuid, tags text[], slots integer);
CREATE TEMP TABLE rb_leases_released (id uuid, task_run_id uuid);
CREATE TEMP TABLE rb_unreadable (stream_id uuid, seq bigint, PRIMARY KEY (stream_id, seq));
CREATE TEMP TABLE rb_limits (stream_id uuid PRIMARY KEY, last_seq bigint NOT NULL, tag text NOT NULL, lim jsonb);
CREATE TEMP TABLE rb_slot_changes (tag text NOT NULL, slots integer NOT NULL);
CREATE TEMP TABLE rb_seen (id uuid PRIMARY KEY, last_seq bigint NOT NULL);
CREATE TEMP TABLE rb_task_rows (id uuid NOT NULL, last_seq bigint NOT NULL, flow_run_id uuid, state_type text,
                                state_name text, task_key text NOT NULL, dynamic_key text NOT NULL, view json NOT NULL);
"""
# What a worker hands back: the composed rows of its task runs, and these as they are.
SHADOW_TABLES = ("rb_flow_runs", "rb_cache", "rb_leases_taken", "rb_leases_released", "rb_unreadable",
                 "rb_limits", "rb_slot_changes", "rb_seen")

# The heads of rb_task_runs as task_runs' rows, sorted by id so that the swap fills the
# primary key in order (a worker's range is one run of ids).
TASK_ROWS = """
SELECT id, last_seq, (view->>'flow_run_id')::uuid, view->'state'->>'type', view->'state'->>'name',
       COALESCE(view->>'task_key', ''), COALESCE(view->>'dynamic_key', ''), view::json
FROM (SELECT id, last_seq, %COMPOSED_VIEW% AS view FROM rb_task_runs OFFSET 0) v ORDER BY id
""".replace("%COMPOSED_VIEW%", COMPOSED_VIEW)

# {events} selects the events to fold: a keyset range, or the final pass's leftovers.
def whole_appended(state: str) -> str:
    """SQL for a folded event's appended state `state` (jsonb) whole: a compact one (events.StoredState,
    no `id`) takes its id, task_run_id and transition_id from the event's columns, carried in `b`.
    Applied where a state is used, not where the decision is parsed: an expression that names the
    parsed decision several times would parse the payload once for each (the planner inlines it)."""
    return (f"CASE WHEN jsonb_typeof({state}) = 'object' AND NOT ({state} ? 'id')"
            f" THEN {state} || jsonb_build_object('id', b.state_id, 'state_details',"
            f" COALESCE({state}->'state_details', '{{}}')"
            " || jsonb_strip_nulls(jsonb_build_object('task_run_id', b.stream_id, 'transition_id', b.transition_id)))"
            f" ELSE {state} END")


# Only three kinds of task-run event are parsed: a stream's newest in the batch (its head),
# its creation (the members fixed then: the base of a lean head) and one that records
# effects (its text holds a non-empty effects array, written by pydantic or, before revision
# 0004 stored json, by jsonb's output with a space; a false match only costs a parse).
FOLD = """
WITH b AS MATERIALIZED (
    SELECT stream_id, seq, stream_type, event_type, newest, transition_id, state_id,
           CASE WHEN stream_type = 'task_run' AND (newest OR event_type = 'task_run_created'
                     OR strpos(payload::text, '"effects":[{') > 0 OR strpos(payload::text, '"effects": [{') > 0)
                THEN (payload->'decision')::jsonb END AS d,
           CASE WHEN stream_type = 'flow_run' AND newest THEN (payload->'flow_run')::jsonb END AS f,
           CASE WHEN stream_type = 'concurrency_limit' AND newest THEN payload->'command'->>'tag' END AS limit_tag,
           CASE WHEN stream_type = 'concurrency_limit' AND newest THEN (payload->'limit')::jsonb END AS lim
    FROM (SELECT stream_id, seq, stream_type, event_type, payload, transition_id, state_id,
                 seq = max(seq) OVER (PARTITION BY stream_id) AS newest
          FROM events e WHERE {events}) r
),{seen}
{task_heads}
flow_heads AS (
    INSERT INTO rb_flow_runs AS t (id, last_seq, state_type, view)
    SELECT stream_id, seq, f->>'state_type', f
    FROM b WHERE stream_type = 'flow_run' AND newest AND jsonb_typeof(f) = 'object'
    ON CONFLICT (id) DO UPDATE SET last_seq = EXCLUDED.last_seq, state_type = EXCLUDED.state_type,
        view = EXCLUDED.view
    WHERE t.last_seq < EXCLUDED.last_seq
),
limit_heads AS (
    INSERT INTO rb_limits AS t (stream_id, last_seq, tag, lim)
    SELECT stream_id, seq, limit_tag, lim
    FROM b WHERE stream_type = 'concurrency_limit' AND newest AND limit_tag IS NOT NULL
    ON CONFLICT (stream_id) DO UPDATE SET last_seq = EXCLUDED.last_seq, tag = EXCLUDED.tag, lim = EXCLUDED.lim
    WHERE t.last_seq < EXCLUDED.last_seq
),
effects AS MATERIALIZED (
    SELECT b.stream_id, b.seq, %WHOLE_EFFECT% AS appended, x.value AS e
    FROM b CROSS JOIN LATERAL jsonb_array_elements(b.d->'effects') AS x(value)
    WHERE b.stream_type = 'task_run' AND jsonb_typeof(b.d->'effects') = 'array'
),
cache AS (
    INSERT INTO rb_cache (stream_id, seq, cache_key, cache_expiration, state_id, state, created)
    SELECT stream_id, seq, e->>'cache_key', (e->>'cache_expiration')::timestamptz,
           (appended->>'id')::uuid, appended, (appended->>'timestamp')::timestamptz
    FROM effects WHERE e->>'kind' = 'cache_inserted'
),
taken AS (
    INSERT INTO rb_leases_taken (id, task_run_id, tags, slots)
    SELECT (e->>'lease_id')::uuid, stream_id, ARRAY(SELECT jsonb_array_elements_text(e->'tags')),
           COALESCE((e->>'slots')::integer, 1)
    FROM effects WHERE e->>'kind' = 'slots_taken'
),
slots_taken AS (
    INSERT INTO rb_slot_changes (tag, slots)
    SELECT t.value, COALESCE((e->>'slots')::integer, 1)
    FROM effects CROSS JOIN LATERAL jsonb_array_elements_text(e->'tags') AS t(value)
    WHERE e->>'kind' = 'slots_taken'
),
slots_released AS (
    INSERT INTO rb_slot_changes (tag, slots)
    SELECT d.key, -(d.value::integer)
    FROM effects CROSS JOIN LATERAL jsonb_each_text(e->'decrements') AS d(key, value)
    WHERE e->>'kind' = 'slots_released' AND jsonb_typeof(e->'decrements') = 'object'
),
released AS (
    INSERT INTO rb_leases_released (id, task_run_id)
    SELECT l.value::uuid, stream_id
    FROM effects CROSS JOIN LATERAL jsonb_array_elements_text(e->'lease_ids') AS l(value)
    WHERE e->>'kind' = 'slots_released'
),
-- Events recording no run to project (a damaged log) are skipped and noted, not fatal:
-- `runstate replay --verify` names them. Noted, so the final pass does not fold them twice.
unreadable AS (
    INSERT INTO rb_unreadable (stream_id, seq)
    SELECT stream_id, seq FROM b
    WHERE newest AND CASE WHEN stream_type = 'concurrency_limit' THEN limit_tag IS NULL
                          ELSE jsonb_typeof(COALESCE(d->'run', f)) IS DISTINCT FROM 'object' END
    ON CONFLICT DO NOTHING
)
SELECT count(*) FROM b
""".replace("%WHOLE_EFFECT%", whole_appended("b.d->'appended_state'"))

# A stream's head in a batch that may continue a stream an earlier batch folded (the final
# pass, or the batch after a stream too long for one batch was cut): upserted, the newest
# seq winning, the base kept from the batch that held the creation.
TASK_HEADS = """
task_heads AS (
    INSERT INTO rb_task_runs AS t (id, last_seq, base, head, state)
    SELECT stream_id, max(seq), (array_agg(d->'run') FILTER (WHERE event_type = 'task_run_created'))[1],
           (array_agg(d->'run') FILTER (WHERE newest))[1],
           -- A lean run leaves its state out when it is the appended one (added as the view is composed).
           (array_agg(CASE WHEN NOT (d->'run' ? 'state') AND d ? 'appended_state' THEN %WHOLE_HEAD% END)
            FILTER (WHERE newest))[1]
    FROM b WHERE stream_type = 'task_run' AND jsonb_typeof(d->'run') = 'object'
    GROUP BY stream_id HAVING bool_or(newest)
    ON CONFLICT (id) DO UPDATE SET base = COALESCE(EXCLUDED.base, t.base),
        last_seq = GREATEST(t.last_seq, EXCLUDED.last_seq),
        head = CASE WHEN t.last_seq < EXCLUDED.last_seq THEN EXCLUDED.head ELSE t.head END,
        state = CASE WHEN t.last_seq < EXCLUDED.last_seq THEN EXCLUDED.state ELSE t.state END
),""".replace("%WHOLE_HEAD%", whole_appended("d->'appended_state'"))

# A stream's head in a batch of whole streams (every batch of the scan but one after a cut
# stream): its newest event joined with its creation, and plainly inserted. Grouping the
# batch's events and upserting every head cost the fold 12-22 % more CPU (2026-12-02).
TASK_HEADS_WHOLE = """
creations AS (
    SELECT DISTINCT ON (stream_id) stream_id, d->'run' AS run FROM b
    WHERE stream_type = 'task_run' AND event_type = 'task_run_created' AND jsonb_typeof(d->'run') = 'object'
    ORDER BY stream_id, seq
),
task_heads AS (
    INSERT INTO rb_task_runs (id, last_seq, base, head, state)
    SELECT b.stream_id, b.seq, c.run, b.d->'run',
           CASE WHEN NOT (b.d->'run' ? 'state') AND b.d ? 'appended_state' THEN %WHOLE_HEAD% END
    FROM b LEFT JOIN creations c ON c.stream_id = b.stream_id
    WHERE b.stream_type = 'task_run' AND b.newest AND jsonb_typeof(b.d->'run') = 'object'
),""".replace("%WHOLE_HEAD%", whole_appended("b.d->'appended_state'"))

# A scan's fold notes the newest seq it saw of each stream (what the final pass compares with).
SEEN = """
seen AS (
    INSERT INTO rb_seen AS s (id, last_seq) SELECT stream_id, seq FROM b WHERE newest
    ON CONFLICT (id) DO UPDATE SET last_seq = GREATEST(s.last_seq, EXCLUDED.last_seq)
),"""
SEEN_WHOLE = """
seen AS (
    INSERT INTO rb_seen (id, last_seq) SELECT stream_id, seq FROM b WHERE newest
),"""

# The final pass: every event above the newest seq the scan saw of its stream (an index-only
# scan of the primary key). A stream's events are appended in seq order, one transaction at a
# time, so these are exactly the events committed after the scan's snapshot of their stream.
MISSING = """
CREATE TEMP TABLE rb_missing ON COMMIT DROP AS
SELECT e.stream_id, e.seq FROM events e LEFT JOIN rb_seen s ON s.id = e.stream_id
WHERE e.seq > COALESCE(s.last_seq, 0)
"""

# A caught-up stream whose creation was folded by the scan, not by the final pass: its base
# (the members fixed at creation) is read again from that event.
CAUGHT_UP_BASES = """
UPDATE rb_task_runs t SET base = c.base
FROM (SELECT DISTINCT ON (e.stream_id) e.stream_id, (e.payload->'decision')::jsonb->'run' AS base
      FROM events e JOIN rb_task_runs t ON t.id = e.stream_id AND t.base IS NULL
      WHERE e.event_type = 'task_run_created' ORDER BY e.stream_id, e.seq) c
WHERE t.id = c.stream_id AND jsonb_typeof(c.base) = 'object'
"""

# Above every seq: (stream, MAX_SEQ) ends a batch with the whole of that stream.
MAX_SEQ = 2**63 - 1
RANGE = "(e.stream_id, e.seq) > (:lo_stream, :lo_seq) AND (e.stream_id, e.seq) <= (:hi_stream, :hi_seq)"
TAIL = "(e.stream_id, e.seq) > (:lo_stream, :lo_seq) AND {streams}"
LEFTOVERS = "(e.stream_id, e.seq) IN (SELECT stream_id, seq FROM rb_missing)"

SWAP = """
TRUNCATE task_runs, flow_runs, task_cache, tag_leases;
DELETE FROM rb_task_rows WHERE id IN (SELECT id FROM rb_task_runs);
INSERT INTO rb_task_rows %TASK_ROWS%;
INSERT INTO task_runs (id, last_seq, flow_run_id, state_type, state_name, task_key, dynamic_key, view)
    SELECT * FROM rb_task_rows;
INSERT INTO flow_runs (id, last_seq, state_type, view)
    SELECT id, last_seq, state_type, view FROM rb_flow_runs;
INSERT INTO task_cache (cache_key, cache_expiration, state_id, state, created)
    SELECT cache_key, cache_expiration, state_id, state, created FROM rb_cache ORDER BY stream_id, seq;
INSERT INTO tag_leases (id, task_run_id, tags, slots)
    SELECT t.id, t.task_run_id, t.tags, t.slots FROM rb_leases_taken t
    WHERE NOT EXISTS (SELECT 1 FROM rb_leases_released r WHERE r.id = t.id AND r.task_run_id = t.task_run_id);
DELETE FROM tag_concurrency_limits WHERE tag IN (SELECT tag FROM rb_limits WHERE jsonb_typeof(lim) IS DISTINCT FROM 'object');
INSERT INTO tag_concurrency_limits (tag, "limit", active)
    SELECT tag, (lim->>'limit')::integer, (lim->>'active')::boolean FROM rb_limits WHERE jsonb_typeof(lim) = 'object'
    ON CONFLICT (tag) DO UPDATE SET "limit" = EXCLUDED."limit", active = EXCLUDED.active, updated_at = clock_timestamp();
UPDATE tag_concurrency_limits l SET active_slots = h.slots, updated_at = clock_timestamp()
    FROM (SELECT c.tag, GREATEST(0, COALESCE(sum(x.slots), 0))::integer AS slots
          FROM tag_concurrency_limits c LEFT JOIN rb_slot_changes x ON x.tag = c.tag
          GROUP BY c.tag) h
    WHERE l.tag = h.tag AND l.active_slots IS DISTINCT FROM h.slots;
""".replace("%TASK_ROWS%", TASK_ROWS)


@dataclass(frozen=True)
class RebuildReport:
    events: int
    seconds: float
    task_runs: int = 0
    flow_runs: int = 0
    caught_up: int = 0
    unreadable: int = 0

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("inf")


def rebuild(
    engine_or_url: Engine | AsyncEngine | str,
    batch_size: int = 50_000,
    on_batch: Callable[[int], None] | None = None,
    workers: int = 1,
    min_range_events: int = MIN_RANGE_EVENTS,
) -> RebuildReport:
    """Rebuild task_runs, flow_runs, task_cache, tag_leases, the tag limits and their active_slots from the log.

    Accepts a sync Engine, an AsyncEngine or a URL (an AsyncEngine's URL is used with a
    sync connection: this is a batch job with one session). With workers > 1 the log is
    folded by that many processes, and on_batch hears of their batches a little late."""
    if batch_size < 1:
        raise ValueError("batch_size must be positive")
    if workers < 1:
        raise ValueError("workers must be positive")
    # A private, unpooled session: its TEMP tables and temp_buffers setting must not meet
    # a pooled session that already used them, and closing it is the cleanup.
    url = sync_url(engine_or_url)
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return _rebuild(conn, url, batch_size, on_batch, workers, min_range_events)
    finally:
        engine.dispose()


def _open_shadow(conn: Connection) -> None:
    # Local buffers must be sized before the session first touches a TEMP table; the shadow
    # of a large log would otherwise thrash the 8 MB default.
    conn.execute(text("SET temp_buffers = '256MB'"))
    # A batch's events are sorted by stream to find each stream's newest: in memory, not on disk.
    conn.execute(text("SET work_mem = '128MB'"))
    # JIT compiling the fold took ~150 ms of a 50,000-event batch's ~2 s, and paid nothing back.
    conn.execute(text("SET jit = off"))
    _script(conn, SHADOW_DDL)
    conn.commit()


def _fold_range(conn: Connection, streams: StreamRange, batch_size: int,
                on_batch: Callable[[int], None] | None) -> int:
    """Fold the events of `streams` into the session's shadow, one committed batch at a time.

    A batch ends at the end of a stream, so that each stream's events are folded by one batch
    and its head is plainly inserted; only a stream longer than a batch is cut, and the batch
    that continues it upserts. Events appended to a batch's last stream after the batch was
    read are left to the final pass, like any other appended late."""
    condition, range_params = streams.condition("e.stream_id")
    events = 0
    lo = (streams.lo, 0) if streams.lo is not None else START
    continues_stream = False  # the batch starts inside a stream the one before it folded
    while True:
        # The batch_size-th event from lo, and the newest seq of its stream.
        row = conn.execute(
            text(
                "SELECT stream_id, seq, (SELECT max(seq) FROM events l WHERE l.stream_id = h.stream_id) AS last"
                " FROM (SELECT stream_id, seq FROM events e WHERE (stream_id, seq) > (:s, :q) AND "
                + condition + " ORDER BY stream_id, seq OFFSET :skip LIMIT 1) h"
            ),
            {"s": lo[0], "q": lo[1], "skip": batch_size - 1, **range_params},
        ).first()
        hi: tuple[UUID, int] | None = None if row is None else (row.stream_id, row.seq)
        cut_stream = row is not None and row.last - row.seq > batch_size
        if hi is not None and not cut_stream:  # the rest of this stream, and nothing the scan reads after it
            hi = (hi[0], MAX_SEQ)
        whole = not continues_stream
        seen, heads = (SEEN_WHOLE, TASK_HEADS_WHOLE) if whole else (SEEN, TASK_HEADS)
        bounds = {"lo_stream": lo[0], "lo_seq": lo[1]}
        # The primary key's order is the window's: reading the batch through it needs no
        # sort of the payloads (a bitmap scan reads pages in their order, then sorts).
        conn.execute(text("SET LOCAL enable_bitmapscan = off"))
        conn.execute(text("SET LOCAL enable_seqscan = off"))
        if whole:
            # The planner takes a CTE's rows for few, and would join heads to creations by
            # rescanning the batch for each head.
            conn.execute(text("SET LOCAL enable_nestloop = off"))
        if hi is None:  # the tail: fewer than batch_size events are left
            tail = TAIL.format(streams=condition)
            folded = conn.execute(text(_fold(tail, seen, heads)), bounds | range_params).scalar_one()
        else:
            bounds |= {"hi_stream": hi[0], "hi_seq": hi[1]}
            folded = conn.execute(text(_fold(RANGE, seen, heads)), bounds).scalar_one()
        conn.commit()
        events += folded
        if on_batch:
            on_batch(folded)
        if hi is None:
            return events
        lo = hi
        continues_stream = cut_stream


def _fold_here(conn: Connection, streams: StreamRange, batch_size: int,
               on_batch: Callable[[int], None] | None) -> int:
    """Fold `streams` in this session and compose their task runs' rows, as a worker does."""
    events = _fold_range(conn, streams, batch_size, on_batch)
    conn.execute(text(f"INSERT INTO rb_task_rows {TASK_ROWS}"), {"not_creation": NOT_CREATION_MEMBERS})
    conn.execute(text("TRUNCATE rb_task_runs"))
    conn.commit()
    return events


_worker_engine: Engine | None = None


def _fold_in_worker(streams: StreamRange, url: str, batch_size: int) -> tuple[int, dict[str, bytes]]:
    """One range, in a worker process: folded into a shadow of a session of its own, which
    is handed back as binary COPY data (one blob a table) and vanishes with the session."""
    global _worker_engine
    if _worker_engine is None:
        _worker_engine = create_engine(url, poolclass=NullPool)
    with _worker_engine.connect() as conn:
        _open_shadow(conn)
        events = _fold_range(conn, streams, batch_size, report_progress)
        raw = conn.connection.driver_connection
        shadow: dict[str, bytes] = {}
        with raw.cursor() as cur:  # type: ignore[union-attr]
            # The view as text: its binary COPY form is json's, which the rebuilding session
            # checks as it takes it, so casting it to json here would parse it twice.
            rows = TASK_ROWS.replace(":not_creation", "%(not_creation)s").replace("view::json", "view::text")
            with cur.copy(f"COPY ({rows}) TO STDOUT (FORMAT binary)", {"not_creation": NOT_CREATION_MEMBERS}) as copy:
                shadow["rb_task_rows"] = b"".join(bytes(block) for block in copy)
            for table in SHADOW_TABLES:
                with cur.copy(f"COPY {table} TO STDOUT (FORMAT binary)") as copy:
                    shadow[table] = b"".join(bytes(block) for block in copy)
        conn.rollback()
    return events, shadow


def _take_shadow(conn: Connection, shadow: dict[str, bytes]) -> None:
    raw = conn.connection.driver_connection
    with raw.cursor() as cur:  # type: ignore[union-attr]
        for table, data in shadow.items():
            with cur.copy(f"COPY {table} FROM STDIN (FORMAT binary)") as copy:
                copy.write(data)
    conn.commit()


def _rebuild(conn: Connection, url: str, batch_size: int, on_batch: Callable[[int], None] | None,
             workers: int, min_range_events: int) -> RebuildReport:
    began = time.perf_counter()
    _open_shadow(conn)

    ranges = plan_ranges(conn, workers, min_range_events, max_events=batch_size)
    conn.commit()
    events = 0
    if len(ranges) == 1:
        events = _fold_here(conn, WHOLE_LOG, batch_size, on_batch)
    else:
        # This session folds ranges too, straight into its shadow; the worker processes hand
        # theirs over. Any order: the shadows of ranges never overlap.
        def here(streams: StreamRange) -> tuple[int, dict[str, bytes]]:
            return _fold_here(conn, streams, batch_size, on_batch), {}

        for folded, shadow in run_ranges(_fold_in_worker, ranges, (url, batch_size), workers, on_batch,
                                         ordered=False, local=here):
            if shadow:
                _take_shadow(conn, shadow)
            events += folded

    # The swap. Taking ACCESS EXCLUSIVE up front (TRUNCATE needs it anyway) waits for the
    # service's batch in flight to commit, so its events are visible to the final pass, and
    # holds off the next one until the new projections are in. The tables are locked in the
    # order the service's batch touches them, so the two cannot deadlock.
    conn.execute(
        text(
            "LOCK TABLE task_runs, flow_runs, task_cache, tag_concurrency_limits, tag_leases"
            " IN ACCESS EXCLUSIVE MODE"
        )
    )
    conn.execute(text(MISSING))
    caught_up = conn.execute(text(_fold(LEFTOVERS))).scalar_one()
    if caught_up:
        conn.execute(text(CAUGHT_UP_BASES))
    unreadable = conn.execute(text("SELECT count(*) FROM rb_unreadable")).scalar_one()
    _script(conn, SWAP, {"not_creation": NOT_CREATION_MEMBERS})
    task_runs = conn.execute(text("SELECT count(*) FROM task_runs")).scalar_one()
    flow_runs = conn.execute(text("SELECT count(*) FROM flow_runs")).scalar_one()
    conn.commit()
    events += caught_up
    return RebuildReport(
        events=events,
        seconds=time.perf_counter() - began,
        task_runs=task_runs,
        flow_runs=flow_runs,
        caught_up=caught_up,
        unreadable=unreadable,
    )


def _fold(events: str, seen: str = "", heads: str = TASK_HEADS) -> str:
    """The fold of `events`, noting what it saw with `seen` and its task-run heads with `heads`
    (the *_WHOLE forms when no stream of theirs was folded before)."""
    return FOLD.replace("{events}", events).replace("{seen}", seen).replace("{task_heads}", heads)


def _script(conn: Connection, script: str, params: dict[str, object] | None = None) -> None:
    # One statement per execute: the extended protocol psycopg uses runs a single statement.
    for statement in script.split(";\n"):
        if statement.strip():
            used = {k: v for k, v in (params or {}).items() if f":{k}" in statement}
            conn.execute(text(statement), used)
