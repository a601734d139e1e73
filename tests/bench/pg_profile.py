"""PostgreSQL's CPU and WAL per command for the consumer's own statements, without Kafka.

Drives the benchmark workload (tests/bench/decide_profile.py's Workload: every run in flight
sends its next command each batch) through what the consumer does per batch on the real
PostgreSQL store (pipeline/service.py: read the snapshot, decide, append, commit), into a
scratch database (`runstate_pg_profile`, dropped afterwards), and reads the CPU the one
backend serving it used (/proc/<pid>/stat, so without the WAL writer, the checkpointer and
autovacuum) and the WAL it wrote. Needs the stack's PostgreSQL on this machine (`make up`).

    .venv/bin/python tests/bench/pg_profile.py --batch 340 --commands 60000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy"))

import psycopg
from decide_profile import TOPIC, Workload
from run_bench import admin_sql, fresh_database

from runstate.database_urls import libpq_dsn
from runstate.domain import OrchestrationSettings
from runstate.envfile import read_env_file
from runstate.pipeline.batch import decide_batch
from runstate.pipeline.records import IncomingRecord, parse_record
from runstate.pipeline.service import read_snapshot
from runstate.store.postgres import PostgresEventStore

DATABASE = "runstate_pg_profile"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


async def drive(app_url: str, admin_url: str, batch: int, commands: int, waldump: str | None = None
                ) -> dict[str, float]:
    store = PostgresEventStore(app_url, size=1)
    await store.open()
    settings = OrchestrationSettings()
    work = Workload(batch, random.Random(17))
    async with store.pool.connection() as conn:
        pid = (await (await conn.execute("SELECT pg_backend_pid()")).fetchone())[0]
    done = offset = 0
    now = datetime.now(UTC)
    measured_from = commands // 5  # the first fifth fills the tables; then measure
    with psycopg.connect(libpq_dsn(admin_url), autocommit=True) as admin:
        lsn = cpu = wall = None
        while done < commands:
            if lsn is None and done >= measured_from:
                lsn = admin.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
                cpu, wall, first = cpu_seconds(pid), time.perf_counter(), done
            raw = [SimpleNamespace(topic=TOPIC, partition=0, offset=offset + i, key=rid.encode(), value=value)
                   for i, (rid, value) in enumerate(work.batch())]
            offset += len(raw)
            items = [parse_record(IncomingRecord(r.topic, r.partition, r.offset, r.key, r.value), 1 << 20)
                     for r in raw]
            async with store.session() as session:
                snapshot = await read_snapshot(session, items, TOPIC, now)  # type: ignore[arg-type]
                outcome = decide_batch(items, snapshot, settings)
                await session.append(outcome)
            done += len(raw)
        n = done - first
        wal, end = admin.execute("SELECT pg_current_wal_lsn() - %s::pg_lsn, pg_current_wal_lsn()", (lsn,)).fetchone()
        if waldump:  # WAL by record type, before a checkpoint recycles the segments
            subprocess.run(["/usr/lib/postgresql/15/bin/pg_waldump", "-p", waldump, "--stats=record",
                            "-s", str(lsn), "-e", str(end)], check=False)
        result = {"commands": n, "backend_us": (cpu_seconds(pid) - cpu) / n * 1e6,
                  "wal_bytes": float(wal) / n, "wall_us": (time.perf_counter() - wall) / n * 1e6}
    await store.close()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=340)
    p.add_argument("--commands", type=int, default=60_000)
    p.add_argument("--waldump", metavar="PG_WAL_DIR", help="print pg_waldump's record statistics of the run")
    p.add_argument("--fillfactor", type=int, help="set task_runs' fillfactor first (an experiment)")
    a = p.parse_args()
    state = Path(__file__).resolve().parents[2] / ".runstate"
    env = read_env_file(state / "env") | read_env_file(state / "service.env")
    admin, app = env["RUNSTATE_ADMIN_DATABASE_URL"], env["RUNSTATE_CONSUMER_DATABASE_URL"]
    admin_url, app_url = fresh_database(admin, app, DATABASE)
    if a.fillfactor:
        with psycopg.connect(libpq_dsn(admin_url), autocommit=True) as conn:
            conn.execute(f"ALTER TABLE task_runs SET (fillfactor = {int(a.fillfactor)})")
    try:
        r = asyncio.run(drive(app_url, admin_url, a.batch, a.commands, a.waldump))
        print(f"batch={a.batch} " + " ".join(f"{k}={v:.1f}" for k, v in r.items()))
    finally:
        admin_sql(admin, f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")


if __name__ == "__main__":
    main()
