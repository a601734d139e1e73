"""Measure `replay --verify` on a generated log of the benchmark's workload, on the local
stack (`make up`), so that two versions of replay can be compared on the same log.

    python tests/audit/replay_bench.py build --events 200000   # template runs through the pipeline, then the log
    python tests/audit/replay_bench.py measure --workers 2     # one verify_log run: a JSON line on stdout
    python tests/audit/replay_bench.py measure --database runstate_rebuild_ab   # another log (rebuild_ab.py's)
    python tests/audit/replay_bench.py drop

`build` decides runs of the benchmark's workload (create PENDING -> RUNNING -> COMPLETED, one
in five FAILED, rejected to AwaitingRetry, and run again) with the real pipeline, in process,
and copies their events into a log of the wanted size as `make bench` does (tests/bench/
run_bench.py, `Bench.rebuild`: fresh stream and command ids, hash chains computed in SQL).
`measure` samples the resident memory of the worker processes only (the pool's spawned
children), not of servers this process might have started. Run the version under test by
putting its `services` folder first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "bench")]

import psycopg  # noqa: E402
from workload import CREATE, SET  # noqa: E402  (tests/bench)

from runstate.database_urls import libpq_dsn, with_database  # noqa: E402
from runstate.envfile import read_env_file  # noqa: E402

TEMPLATE_DB = "runstate_replaybench_tpl"
LOG_DB = "runstate_replaybench"


def stack_env() -> dict[str, str]:
    env = {**read_env_file(REPO / ".runstate" / "env"), **read_env_file(REPO / ".runstate" / "service.env")}
    for key, value in env.items():
        if key.startswith("RUNSTATE_KAFKA_"):
            os.environ.setdefault(key, value)
    return env


def urls(env: dict[str, str], name: str) -> tuple[str, str]:
    """(admin, consumer) URLs of database `name`."""
    return (with_database(env["RUNSTATE_ADMIN_DATABASE_URL"], name),
            with_database(env["RUNSTATE_CONSUMER_DATABASE_URL"], name))


async def decide_template(env: dict[str, str], runs: int, failing: int) -> int:
    """`runs` lifecycles (the first `failing` of them fail once and are retried) decided by the pipeline."""
    from run_bench import fresh_database

    from pipeline.harness import InProcessService, isolated_settings, produce
    from runstate.config import Settings

    admin, app = fresh_database(env["RUNSTATE_ADMIN_DATABASE_URL"], env["RUNSTATE_CONSUMER_DATABASE_URL"],
                                TEMPLATE_DB)
    settings = isolated_settings(Settings(kafka_bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"],
                                          database_url=app, admin_database_url=admin))
    records: list[tuple[bytes | None, bytes]] = []
    expected = 0
    for n in range(runs):
        rid = str(uuid.uuid4())
        steps = ["RUNNING", "FAILED", "RUNNING", "COMPLETED"] if n < failing else ["RUNNING", "COMPLETED"]
        records.append((rid.encode(), CREATE.format(cid=uuid.uuid4(), rid=rid, n=n).encode()))
        records += [(rid.encode(), SET.format(cid=uuid.uuid4(), rid=rid, type=t, tid=uuid.uuid4()).encode())
                    for t in steps]
        expected += 1 + len(steps)
    async with InProcessService(settings):
        await produce(settings, records)
        deadline = time.monotonic() + 120
        with psycopg.connect(libpq_dsn(admin), autocommit=True) as conn:
            while (count := conn.execute("SELECT count(*) FROM events").fetchone()[0]) < expected:
                if time.monotonic() > deadline:
                    raise SystemExit(f"only {count} of {expected} events decided in 120 s")
                await asyncio.sleep(0.5)
    return expected


def generate(env: dict[str, str], events: int) -> int:
    """The bench's generated log (Bench.rebuild in tests/bench/run_bench.py), from the template database."""
    from run_bench import fresh_database, generate_log

    tpl_admin, _ = urls(env, TEMPLATE_DB)
    with psycopg.connect(libpq_dsn(tpl_admin)) as src:
        rows = src.execute(
            "SELECT stream_id, seq, stream_type, event_type, transition_id, status, state_type, state_name,"
            " payload::text FROM events ORDER BY stream_id, seq").fetchall()
    admin, _ = fresh_database(env["RUNSTATE_ADMIN_DATABASE_URL"], env["RUNSTATE_CONSUMER_DATABASE_URL"], LOG_DB)
    total, _, _ = generate_log(admin, rows, events)
    return total


def workers_of(pid: int) -> list[int]:
    """The pool's worker processes: this process's children spawned by multiprocessing (its
    resource tracker left out)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == pid and b"multiprocessing.spawn" in cmdline:
            found.append(int(entry.name))
    return found


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_ticks(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def measure(env: dict[str, str], workers: int, batch_size: int, database: str = LOG_DB) -> dict[str, object]:
    from runstate.audit import replay
    from runstate.audit.db import open_engine

    _, app = urls(env, database)
    engine = open_engine(app)
    done = [0]
    series: list[tuple[float, int, int]] = []
    peak_each: dict[int, int] = {}
    ticks: dict[int, int] = {}
    stop = threading.Event()
    t0, cpu0 = time.monotonic(), time.process_time()

    def sample() -> None:
        pids: list[int] = []
        for tick in itertools.count():
            if stop.wait(0.25):
                return
            if tick % 8 == 0 or not pids:  # walking /proc is what costs: every 2 s
                pids = workers_of(os.getpid())
            sizes = {p: rss_kib(p) for p in pids}
            for p, kib in sizes.items():
                peak_each[p] = max(peak_each.get(p, 0), kib)
                ticks[p] = max(ticks.get(p, 0), cpu_ticks(p))
            if pids:
                series.append((time.monotonic() - t0, done[0], sum(sizes.values())))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        report = replay.verify_log(engine, batch_size=batch_size, workers=workers,
                                   on_batch=lambda n: done.__setitem__(0, done[0] + n))
    finally:
        stop.set()
        sampler.join()
        engine.dispose()
    seconds = time.monotonic() - t0
    # The workers' CPU (as last sampled), or this process's when it verified alone.
    cpu = sum(ticks.values()) / os.sysconf("SC_CLK_TCK") if ticks else time.process_time() - cpu0
    early = next((s[2] for s in series if s[1] >= report.chained // 10), None)
    late = [s[2] for s in series if s[1] >= report.chained // 2]
    return {"code": str(Path(replay.__file__).parents[2]), "events": report.chained, "decisions": report.events,
            "mismatches": len(report.mismatches), "seconds": round(seconds, 2),
            "events_per_second": round(report.chained / seconds),
            "cpu_us_per_event": round(cpu / report.chained * 1e6, 1), "workers": workers, "batch_size": batch_size,
            "rss_kib_sum_at_10pct": early, "rss_kib_sum_max_after_50pct": max(late) if late else None,
            "rss_kib_peak_each": sorted(peak_each.values())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    b = sub.add_parser("build")
    b.add_argument("--events", type=int, default=200_000)
    b.add_argument("--template-runs", type=int, default=200)
    m = sub.add_parser("measure")
    m.add_argument("--workers", type=int, default=2)
    m.add_argument("--batch-size", type=int, default=1000)
    m.add_argument("--database", default=LOG_DB, help="the log to verify (rebuild_ab.py's: runstate_rebuild_ab)")
    sub.add_parser("drop")
    a = p.parse_args()
    env = stack_env()
    if a.what == "build":
        decided = asyncio.run(decide_template(env, a.template_runs, a.template_runs // 5))
        print(f"template: {decided} events decided by the pipeline", flush=True)
        print(f"log: {generate(env, a.events)} events in {LOG_DB}", flush=True)
    elif a.what == "measure":
        print(json.dumps(measure(env, a.workers, a.batch_size, a.database)), flush=True)
    else:
        from run_bench import admin_sql

        admin_sql(env["RUNSTATE_ADMIN_DATABASE_URL"], *(f"DROP DATABASE IF EXISTS {n} WITH (FORCE)"
                                                        for n in (LOG_DB, TEMPLATE_DB)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
