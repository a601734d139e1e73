"""The log's bytes per event on disk and rebuild's speed, for the benchmark's workload, without Kafka.

    python tests/bench/lean_size.py [--runs 15000] [--copies 4] [--workers 2]

Decides `--runs` lifecycles of tests/bench/workload.py (create -> RUNNING -> COMPLETED, 20 % of them
FAILED -> AwaitingRetry -> RUNNING -> COMPLETED) in this process with the consumer's own batch decider,
in rounds that interleave the runs as the bench's workers do, and writes the events into a scratch
database (`runstate_lean_size`, dropped afterwards) in the order they were decided. It reports
`pg_total_relation_size('events')` per event (table, TOAST and indexes), then copies the log
`--copies` times more under new stream ids and times `runstate rebuild` over it. Needs the stack's
PostgreSQL (`make up`; `.runstate/env` loaded). Timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy"))

import psycopg
from run_bench import admin_sql, fresh_database
from workload import CREATE, SET, lifecycle

from runstate.database_urls import libpq_dsn as libpq
from runstate.domain import OrchestrationSettings
from runstate.envfile import read_env_file
from runstate.pipeline.batch import decide_batch
from runstate.pipeline.ports import EventRow, StoreSnapshot
from runstate.pipeline.records import IncomingRecord, parse_record

DATABASE = "runstate_lean_size"
COLUMNS = ("stream_id", "seq", "stream_type", "event_type", "command_id", "transition_id", "status", "state_type",
           "state_name", "state_id", "payload", "source_topic", "source_partition", "source_offset",
           "source_digest", "hash")


def decided_events(runs: int, concurrent: int = 500, seed: int = 7) -> list[EventRow]:
    """The events of `runs` bench lifecycles, `concurrent` of them in flight at a time."""
    rng = random.Random(seed)
    snapshot = StoreSnapshot()
    settings = OrchestrationSettings()
    offset = 0
    events: list[EventRow] = []
    started = 0
    active: list[tuple[uuid.UUID, list[str]]] = []
    while started < runs or active:
        while len(active) < concurrent and started < runs:
            rid = uuid.uuid4()
            active.append((rid, ["CREATE", *lifecycle(rng.random() < 0.2)]))
            started += 1
        items = []
        for rid, steps in active:
            step = steps.pop(0)
            body = (CREATE.format(cid=uuid.uuid4(), rid=rid, n=started) if step == "CREATE"
                    else SET.format(cid=uuid.uuid4(), rid=rid, type=step, tid=uuid.uuid4()))
            offset += 1
            items.append(parse_record(IncomingRecord("bench.commands", offset % 12, offset, str(rid).encode(),
                                                     body.encode()), 10**9))
        events += decide_batch(items, snapshot, settings).events
        active = [(rid, steps) for rid, steps in active if steps]
    return events


def write_events(url: str, events: list[EventRow], batch: int = 1000) -> None:
    with psycopg.connect(libpq(url)) as conn:
        for lo in range(0, len(events), batch):
            with conn.cursor().copy(f"COPY events ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                for e in events[lo : lo + batch]:
                    copy.write_row(tuple(getattr(e, c) for c in COLUMNS))
            conn.commit()


def size_per_event(url: str) -> tuple[float, int, dict[str, int]]:
    with psycopg.connect(libpq(url), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE events")
        total, count = conn.execute("SELECT pg_total_relation_size('events'), count(*) FROM events").fetchone()
        parts = dict(conn.execute(
            "SELECT 'table', pg_relation_size('events') UNION ALL"
            " SELECT 'toast', pg_total_relation_size('events') - pg_relation_size('events') - pg_indexes_size('events')"
            " UNION ALL SELECT c.relname, pg_relation_size(c.oid) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " WHERE i.indrelid = 'events'::regclass").fetchall())
        payload = conn.execute("SELECT avg(pg_column_size(payload)), avg(octet_length(payload::text))"
                               " FROM events").fetchone()
        parts["payload_stored_avg"], parts["payload_text_avg"] = round(payload[0]), round(payload[1])
    return total / count, count, parts


def copy_log(url: str, copies: int) -> int:
    """The log `copies` times more, each copy under new stream ids (rebuild reads no hash)."""
    with psycopg.connect(libpq(url)) as conn:
        columns = ", ".join(COLUMNS)
        for g in range(1, copies + 1):
            conn.execute(
                f"INSERT INTO events ({columns}) SELECT md5(stream_id::text || '/{g}')::uuid, seq, stream_type,"
                " event_type, gen_random_uuid(), transition_id, status, state_type, state_name,"
                " CASE WHEN state_id IS NOT NULL THEN gen_random_uuid() END, payload, source_topic,"
                f" source_partition, source_offset + {g} * 100000000, source_digest, hash"
                " FROM events WHERE source_offset < 100000000")
            conn.commit()
        count = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    with psycopg.connect(libpq(url), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE events")
    return count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=15_000)
    p.add_argument("--copies", type=int, default=4, help="extra copies of the log for the rebuild (0: no rebuild)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=50_000)
    p.add_argument("--keep", action="store_true", help="keep the scratch database")
    a = p.parse_args()
    state = Path(__file__).resolve().parents[2] / ".runstate"
    env = read_env_file(state / "env") | read_env_file(state / "service.env")
    admin, app = env["RUNSTATE_ADMIN_DATABASE_URL"], env["RUNSTATE_CONSUMER_DATABASE_URL"]
    t0 = time.perf_counter()
    events = decided_events(a.runs)
    print(f"decided {len(events)} events of {a.runs} runs in {time.perf_counter() - t0:.1f} s", flush=True)
    admin_url, app_url = fresh_database(admin, app, DATABASE)
    try:
        write_events(admin_url, events)
        per_event, count, parts = size_per_event(admin_url)
        print(f"bytes_per_event={per_event:.0f} events={count} " + " ".join(f"{k}={v}" for k, v in parts.items()))
        if a.copies:
            from runstate.audit.rebuild import rebuild

            total = copy_log(admin_url, a.copies)
            report = rebuild(app_url, batch_size=a.batch, workers=a.workers)
            print(f"rebuild: {report.events} of {total} events in {report.seconds:.2f} s ="
                  f" {report.events_per_second:.0f} events/s ({a.workers} workers), {report.task_runs} task runs")
    finally:
        if not a.keep:
            try:
                admin_sql(admin, f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
            except psycopg.Error as exc:  # the rebuild's worker sessions end with this process
                print(f"scratch database kept ({exc}); the next run drops it")


if __name__ == "__main__":
    main()
