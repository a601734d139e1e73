"""PostgreSQL adapter of the batch path's EventStore port: the append-only
event log and the projections kept beside it.

A batch is one session, one transaction: read what the batch's decisions need
(tag rows with FOR UPDATE, because slots are shared by every partition), then
write every event with one multi-row INSERT and every projection with one
upsert, all in one statement (in autocommit when the batch read nothing). The
primary key (stream_id, seq) makes a second writer of the same history fail
instead of forking it. psycopg's errors are translated into the
port's: whose fault a refusal is decides whether the batch is retried, split
or waited out.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, cast
from uuid import UUID

import psycopg
from psycopg.rows import namedtuple_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection

from runstate.database_urls import DatabaseURL, libpq_dsn
from runstate.domain import CacheEntry, FlowRunView, Lease, TagLimit, TaskRunView
from runstate.pipeline.message_json import state_ref_json, stored_messages
from runstate.pipeline.ports import (
    BatchOutcome,
    RecordRefused,
    SnapshotRequest,
    StoreConflict,
    StoredOutcome,
    StoreError,
    StoreSnapshot,
    StoreUnavailable,
    StreamHead,
)

Statement = tuple[str, dict[str, Any]]

_PARAM = re.compile(r"(?<![:\w]):(\w+)")

# Task-run heads remembered per process (CommittedRuns): about 5 kB of objects each, so
# ~20 MB; a few times the runs a busy process's partitions have in flight.
COMMITTED_RUNS = 4096


def binary_sql(query: str) -> str:
    """Turn `:name` placeholders into psycopg's binary `%(name)b`: text-format
    arrays escape every element in Python, which dominated a batch's cost."""
    return _PARAM.sub(r"%(\1)b", query)


Connection = psycopg.AsyncConnection | AsyncConnection


async def run_sql(conn: Connection, query: str, params: dict[str, Any]) -> list[Any]:
    """Execute on a psycopg connection, or on the one under a SQLAlchemy connection's transaction."""
    if isinstance(conn, psycopg.AsyncConnection):
        pg = conn
    else:
        pg = cast(psycopg.AsyncConnection[Any], (await conn.get_raw_connection()).driver_connection)
    async with pg.cursor(row_factory=namedtuple_row) as cur:
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


def batch_pool(url: DatabaseURL, size: int) -> AsyncConnectionPool:
    """The consumer's connections: plain psycopg, one per lane. SQLAlchemy's
    pool pinged the server on every checkout and its async adaptation ran each
    call through a greenlet, a sixth of a small batch's CPU (py-spy). A
    connection broken by an outage is discarded when it is returned; the pool
    opens a new one."""

    async def configure(conn: psycopg.AsyncConnection) -> None:
        await conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
        await conn.set_autocommit(True)  # each batch opens its own transaction block

    return AsyncConnectionPool(
        libpq_dsn(url),
        min_size=size,
        max_size=size,
        kwargs={"options": SESSION_OPTIONS},
        configure=configure,
        timeout=5.0,
        open=False,
        name="runstate-batches",
    )


# SQLSTATE classes that a record's content can cause: data exceptions (22), a
# row or index entry beyond PostgreSQL's limits (54), constraint violations
# other than a unique key (23; a unique key is another writer's commit).
RECORD_SQLSTATE_CLASSES = ("22", "23", "54")


def translate(exc: psycopg.Error | PoolTimeout) -> StoreError:
    """Whose fault a database error is. Anything not known to be the record's
    is an outage: waiting costs time, dead-lettering a valid command loses it."""
    reason = _reason(exc)
    if isinstance(exc, psycopg.errors.UniqueViolation | psycopg.errors.SerializationFailure
                  | psycopg.errors.DeadlockDetected):
        return StoreConflict(reason)
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate is not None and sqlstate[:2] in RECORD_SQLSTATE_CLASSES:
        return RecordRefused(reason)
    # Raised by psycopg itself, before the server saw it (a NUL in a text value, say).
    if sqlstate is None and isinstance(exc, psycopg.DataError):
        return RecordRefused(reason)
    return StoreUnavailable(reason)


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


class PostgresEventStore:
    """The EventStore port on a pool of plain psycopg connections, one per lane."""

    def __init__(self, url: DatabaseURL, size: int = 1) -> None:
        self.pool = batch_pool(url, size)
        self.committed_runs = CommittedRuns()

    async def open(self) -> None:
        # Not waiting: a database still starting is waited for batch by batch.
        await self.pool.open(wait=False)

    async def close(self) -> None:
        await self.pool.close()

    @asynccontextmanager
    async def session(self) -> AsyncIterator[PostgresSession]:
        try:
            async with self.pool.connection() as conn:
                async with AsyncExitStack() as transaction:
                    session = PostgresSession(conn, self.committed_runs, transaction)
                    yield session
                # Only what is committed is remembered: a batch rolled back leaves no trace.
                self.committed_runs.remember(session.appended_runs)
        except (psycopg.Error, PoolTimeout) as exc:
            raise translate(exc) from exc


class CommittedRuns:
    """The task-run heads this process committed last, by run id: a batch reading a run
    whose projection is still at the remembered seq takes the view from here instead of
    reading and validating its JSON again. The seq is checked in the same read, so a head
    another writer moved (a zombie, a rebuild) is read from the table as before."""

    def __init__(self, size: int = COMMITTED_RUNS) -> None:
        self.size = size
        self.heads: OrderedDict[UUID, tuple[int, TaskRunView, bytes | None]] = OrderedDict()

    def get(self, run_id: UUID) -> tuple[int, TaskRunView, bytes | None] | None:
        return self.heads.get(run_id)

    def remember(self, heads: dict[UUID, StreamHead]) -> None:
        for run_id, head in heads.items():
            # A tuple, not the head: the decide path updates heads in place.
            self.heads[run_id] = (head.last_seq, head.view, head.last_hash)
            self.heads.move_to_end(run_id)
        while len(self.heads) > self.size:
            self.heads.popitem(last=False)


def source_lookup(request: SnapshotRequest) -> Statement:
    """The events stored for the request's records, by position (events_source_position,
    migration 0011); the topic is checked and the digest chosen on the rows."""
    return (
        "SELECT e.source_partition, e.source_offset, e.source_digest, " + _STORED_COLUMNS
        + " FROM events e JOIN unnest(CAST(:parts AS integer[]), CAST(:offs AS bigint[]))"
        " AS s(p, o) ON e.source_partition = s.p AND e.source_offset = s.o"
        " WHERE e.source_topic = :topic",
        {
            "topic": request.source_topic,
            "parts": [p for p, _ in request.sources],
            "offs": [o for _, o in request.sources],
        },
    )


class PostgresSession:
    """One batch on one connection. The transaction (REPEATABLE READ) begins with the first
    read and ends with the session; a batch that read nothing (decided from memory) writes
    with one statement in autocommit, which is atomic on its own: BEGIN and COMMIT were two
    of a small batch's three round trips."""

    def __init__(self, conn: psycopg.AsyncConnection, committed_runs: CommittedRuns,
                 transaction: AsyncExitStack) -> None:
        self.conn = conn
        self.committed_runs = committed_runs
        self.appended_runs: dict[UUID, StreamHead] = {}
        self._transaction = transaction  # the session's: ends the transaction with it
        self._began = False

    async def _begin(self) -> None:
        if not self._began:
            await self._transaction.enter_async_context(self.conn.transaction())
            self._began = True

    async def read(self, request: SnapshotRequest, into: StoreSnapshot) -> None:
        """Every row the request names, in one round trip."""
        await self._begin()
        queries: dict[str, Statement] = {}
        if request.sources:
            queries["by_source"] = source_lookup(request)
        remembered = {}
        if request.task_run_ids:
            for run_id in request.task_run_ids:
                head = self.committed_runs.get(run_id)
                if head is not None:
                    remembered[run_id] = head
            # A run still at the remembered seq comes back without its view and hash.
            queries["task_runs"] = (
                "SELECT r.id, r.last_seq, CASE WHEN r.last_seq = k.seq THEN NULL ELSE r.view END AS view,"
                " CASE WHEN r.last_seq = k.seq THEN NULL ELSE"
                " (SELECT e.hash FROM events e WHERE e.stream_id = r.id AND e.seq = r.last_seq) END AS hash"
                " FROM task_runs r LEFT JOIN unnest(CAST(:kids AS uuid[]), CAST(:kseqs AS bigint[])) AS k(id, seq)"
                " ON k.id = r.id WHERE r.id = ANY(:ids)",
                {"ids": list(request.task_run_ids), "kids": list(remembered),
                 "kseqs": [head[0] for head in remembered.values()]},
            )
        if request.flow_run_ids:
            queries["flow_runs"] = (
                "SELECT r.id, r.last_seq, r.view, e.hash FROM flow_runs r"
                " LEFT JOIN events e ON e.stream_id = r.id AND e.seq = r.last_seq WHERE r.id = ANY(:ids)",
                {"ids": list(request.flow_run_ids)},
            )
        if request.transitions:
            queries["by_transition"] = (
                "SELECT " + _STORED_COLUMNS
                + " FROM events e JOIN unnest(CAST(:sids AS uuid[]), CAST(:tids AS uuid[]))"
                " AS t(s, tid) ON e.stream_id = t.s AND e.transition_id = t.tid"
                " WHERE e.status IN ('ACCEPT', 'REJECT', 'ABORT')",
                {"sids": [s for s, _ in request.transitions], "tids": [t for _, t in request.transitions]},
            )
        if request.cache_keys:
            queries["cache"] = (
                "SELECT DISTINCT ON (cache_key) cache_key, cache_expiration, created, state"
                " FROM task_cache WHERE cache_key = ANY(:keys)"
                " AND (cache_expiration IS NULL OR cache_expiration > :now)"
                " ORDER BY cache_key, created DESC",
                {"keys": list(request.cache_keys), "now": request.now},
            )
        if request.tags:
            # FOR UPDATE, in tag order: slots are shared by every partition's runs.
            queries["tag_limits"] = (
                'SELECT tag, "limit", active, active_slots, avg_slot_occupancy_seconds'
                " FROM tag_concurrency_limits WHERE tag = ANY(:tags) ORDER BY tag FOR UPDATE",
                {"tags": sorted(request.tags)},
            )
        if request.lease_holders:
            queries["leases"] = (
                "SELECT id, task_run_id, tags, slots FROM tag_leases WHERE task_run_id = ANY(:ids)",
                {"ids": list(request.lease_holders)},
            )
        if request.limit_streams:
            queries["limit_streams"] = (
                "SELECT DISTINCT ON (e.stream_id) e.stream_id, e.seq, e.hash FROM events e"
                " WHERE e.stream_id = ANY(:ids) ORDER BY e.stream_id, e.seq DESC",
                {"ids": list(request.limit_streams)},
            )
        if request.commands:
            queries["by_command"] = (
                "SELECT " + _STORED_COLUMNS
                + " FROM events e JOIN unnest(CAST(:sids AS uuid[]), CAST(:cids AS uuid[]))"
                " AS c(s, cid) ON e.stream_id = c.s AND e.command_id = c.cid",
                {"sids": [s for s, _ in request.commands], "cids": [c for _, c in request.commands]},
            )
        if not queries:
            return
        found = await read_together(self.conn, queries)
        # Rows arrive as JSON objects: ids and times as strings, which the
        # models parse; the stored messages as the very text first published.
        snap = into
        for row in found.get("task_runs", []):
            run_id = UUID(row["id"])
            known = remembered.get(run_id)
            if row["view"] is None and known is not None and known[0] == row["last_seq"]:
                snap.task_runs[run_id] = StreamHead(known[1], known[0], last_hash=known[2])
            else:
                snap.task_runs[run_id] = StreamHead(TaskRunView.model_validate(row["view"]), row["last_seq"],
                                                    last_hash=_bytea(row["hash"]))
        for row in found.get("flow_runs", []):
            snap.flow_runs[UUID(row["id"])] = StreamHead(FlowRunView.model_validate(row["view"]), row["last_seq"],
                                                         last_hash=_bytea(row["hash"]))
        wanted_digests = set(request.digests)
        for row in found.get("by_source", []):
            stored = _stored(row)
            stored.digest = _bytea(row["source_digest"])
            stored.command_id = UUID(row["command_id"])
            position = (row["source_partition"], row["source_offset"])
            # Several records may have sat at one position (a recreated topic):
            # keep the one whose content is looked for.
            if position not in snap.by_source or stored.digest in wanted_digests:
                snap.by_source[position] = stored
        for row in found.get("by_transition", []):
            snap.by_transition[(UUID(row["stream_id"]), UUID(row["transition_id"]))] = _stored(row)
        for row in found.get("cache", []):
            snap.cache.setdefault(row["cache_key"], []).append(CacheEntry.model_validate(row))
        for row in found.get("tag_limits", []):
            snap.tag_limits[row["tag"]] = TagLimit.model_validate(row)
        for row in found.get("leases", []):
            lease = Lease(id=row["id"], tags=row["tags"], slots=row["slots"], holder_run_id=row["task_run_id"])
            snap.leases.setdefault(lease.holder_run_id, []).append(lease)
        for row in found.get("limit_streams", []):
            snap.limit_streams[UUID(row["stream_id"])] = StreamHead(None, row["seq"], last_hash=_bytea(row["hash"]))
        for row in found.get("by_command", []):
            snap.by_command[(UUID(row["stream_id"]), UUID(row["command_id"]))] = _stored(row)

    # -- writing a decided batch ---------------------------------------------
    async def append(self, out: BatchOutcome) -> None:
        """Every row of the batch, in one statement."""
        statements: list[Statement] = []
        if out.events:
            ev = out.events
            statements.append((
                "INSERT INTO events (stream_id, seq, stream_type, event_type, command_id,"
                " transition_id, status, state_type, state_name, state_id, payload,"
                " source_topic, source_partition, source_offset, source_digest, hash)"
                " SELECT s, q, st, et, c, t, stt, sty, sn, si, CAST(p AS json), tp, pa, o, dg, h FROM unnest("
                " CAST(:s AS uuid[]), CAST(:q AS bigint[]), CAST(:st AS text[]), CAST(:et AS text[]),"
                " CAST(:c AS uuid[]), CAST(:t AS uuid[]), CAST(:stt AS text[]), CAST(:sty AS text[]),"
                " CAST(:sn AS text[]), CAST(:si AS uuid[]), CAST(:p AS text[]), CAST(:tp AS text[]),"
                " CAST(:pa AS integer[]), CAST(:o AS bigint[]), CAST(:dg AS bytea[]), CAST(:h AS bytea[]))"
                " AS x(s, q, st, et, c, t, stt, sty, sn, si, p, tp, pa, o, dg, h)",
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
                    "h": [e.hash for e in ev],
                },
            ))
        if out.task_run_heads:
            self.appended_runs.update(out.task_run_heads)
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
                    "v": [h.view_json or h.view.model_dump_json(exclude_defaults=True) for h in heads],
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
        statements += _limit_writes(out.limit_rows)
        if statements:
            await run_sql(self.conn, *write_together(statements))


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
                "s": [r.state.model_dump_json(exclude_defaults=True) for r in cache_rows],
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


def _limit_writes(rows: dict[str, TagLimit | None]) -> list[Statement]:
    """The limits the batch's limit commands set (whole rows: they are locked) or deleted."""
    statements: list[Statement] = []
    kept = [limit for limit in rows.values() if limit is not None]
    if kept:
        statements.append((
            'INSERT INTO tag_concurrency_limits AS l (tag, "limit", active, active_slots)'
            " SELECT t, n, a, s FROM unnest(CAST(:t AS text[]), CAST(:n AS integer[]), CAST(:a AS boolean[]),"
            " CAST(:s AS integer[])) AS x(t, n, a, s)"
            ' ON CONFLICT (tag) DO UPDATE SET "limit" = EXCLUDED."limit", active = EXCLUDED.active,'
            " active_slots = EXCLUDED.active_slots, updated_at = clock_timestamp()",
            {
                "t": [limit.tag for limit in kept],
                "n": [limit.limit for limit in kept],
                "a": [limit.active for limit in kept],
                "s": [limit.active_slots for limit in kept],
            },
        ))
    deleted = [tag for tag, limit in rows.items() if limit is None]
    if deleted:
        statements.append(("DELETE FROM tag_concurrency_limits WHERE tag = ANY(:tags)", {"tags": deleted}))
    return statements


def _bytea(value: str | None) -> bytes | None:
    # json_agg writes bytea as its hex text: \x and two digits a byte.
    return bytes.fromhex(value[2:]) if value else None


# What renders an event's published messages again (message_json.stored_messages),
# with the stream's appended state before it, which its state change names.
_STORED_COLUMNS = (
    "e.stream_id, e.seq, e.command_id, e.transition_id, e.status, e.state_id, e.payload::text AS payload,"
    " (SELECT json_build_array(p.state_type, p.state_name, p.state_id) FROM events p"
    "  WHERE p.stream_id = e.stream_id AND p.seq < e.seq AND p.state_type IS NOT NULL"
    "  ORDER BY p.seq DESC LIMIT 1) AS previous"
)


def _stored(row: dict[str, Any]) -> StoredOutcome:
    previous = row["previous"]
    result_event, state_change = stored_messages(
        row["payload"], stream_id=UUID(row["stream_id"]), seq=row["seq"], command_id=UUID(row["command_id"]),
        transition_id=UUID(row["transition_id"]) if row["transition_id"] else None, status=row["status"],
        state_id=UUID(row["state_id"]) if row["state_id"] else None,
        from_state=state_ref_json(previous[0], previous[1], previous[2]) if previous else "null",
    )
    return StoredOutcome(result_event, state_change, row["stream_id"].encode())
