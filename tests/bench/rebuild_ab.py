"""`runstate rebuild` alone, on a log built once and kept, for before/after comparisons.

    python tests/bench/rebuild_ab.py build [--events 1000000] [--runs 200]
    python tests/bench/rebuild_ab.py measure [--workers 2] [--batch 50000] [--rounds 1]

`build` decides `--runs` of the bench's lifecycles in this process (tests/bench/lean_size.py),
takes them as the template and lets `run_bench.generate_log` copy them into `--events` events of a
scratch database (`runstate_rebuild_ab`, kept). `measure` rebuilds that database's projections
with the `runstate` found on the path: with another checkout's `services` first on `PYTHONPATH`,
the same log measures that version. Needs the stack's PostgreSQL (`make up`). On a shared machine,
alternate the versions within the same minutes and compare the ratios.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy"))

import psycopg
from lean_size import decided_events, write_events
from run_bench import db_url, fresh_database, generate_log

from runstate.database_urls import libpq_dsn as libpq
from runstate.envfile import read_env_file

DATABASE = "runstate_rebuild_ab"
STATE = Path(__file__).resolve().parents[2] / ".runstate"
TEMPLATE = ("SELECT stream_id, seq, stream_type, event_type, transition_id, status, state_type, state_name,"
            " payload::text FROM events ORDER BY stream_id, seq")


def urls() -> tuple[str, str]:
    env = read_env_file(STATE / "env") | read_env_file(STATE / "service.env")
    return env["RUNSTATE_ADMIN_DATABASE_URL"], env["RUNSTATE_CONSUMER_DATABASE_URL"]


def build(events: int, runs: int) -> None:
    admin, app = urls()
    template_admin, _ = fresh_database(admin, app, DATABASE)
    write_events(template_admin, decided_events(runs))
    with psycopg.connect(libpq(template_admin)) as conn:
        rows = conn.execute(TEMPLATE).fetchall()
    fresh_database(admin, app, DATABASE)
    t0 = time.perf_counter()
    total, streams, size = generate_log(template_admin, rows, events)
    print(f"{total} events ({size}) from {len(rows)} template events of {streams} runs"
          f" in {time.perf_counter() - t0:.0f} s")


def server_cpu() -> float:
    """CPU seconds of the stack's PostgreSQL so far: the postmaster, its live children and
    those it has reaped (a session's backend ends with it)."""
    ticks = os.sysconf("SC_CLK_TCK")
    postmaster = int((STATE / "postgres" / "data" / "postmaster.pid").read_text().split()[0])

    def times(pid: int, fields: slice) -> float:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return 0.0
        return sum(int(x) for x in stat.rsplit(")", 1)[1].split()[fields]) / ticks

    children = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                and (p / "stat").exists() and _ppid(p) == postmaster]
    # utime, stime, cutime, cstime are fields 14-17 (11-14 after the name).
    return times(postmaster, slice(11, 15)) + sum(times(pid, slice(11, 13)) for pid in children)


def _ppid(proc: Path) -> int:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ValueError):
        return -1


def measure(workers: int, batch: int, rounds: int) -> None:
    import runstate
    from runstate.audit.rebuild import rebuild

    url = db_url(urls()[1], DATABASE)
    for _ in range(rounds):
        server, client = server_cpu(), (resource.getrusage(resource.RUSAGE_SELF),)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        report = rebuild(url, batch_size=batch, workers=workers)
        server = server_cpu() - server
        after, after_children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        python = (after.ru_utime + after.ru_stime - client[0].ru_utime - client[0].ru_stime
                  + after_children.ru_utime + after_children.ru_stime - children.ru_utime - children.ru_stime)
        print(f"rebuild ({Path(runstate.__file__).parents[2].name}): {report.events} events in"
              f" {report.seconds:.2f} s = {report.events_per_second:.0f} events/s ({workers} workers),"
              f" {report.task_runs} task runs; CPU: PostgreSQL {server:.1f} s, Python {python:.1f} s"
              f" = {(server + python) / report.events * 1e6:.1f} us/event", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("--events", type=int, default=1_000_000)
    b.add_argument("--runs", type=int, default=200)
    m = sub.add_parser("measure")
    m.add_argument("--workers", type=int, default=2)
    m.add_argument("--batch", type=int, default=50_000)
    m.add_argument("--rounds", type=int, default=1)
    a = p.parse_args()
    if a.command == "build":
        build(a.events, a.runs)
    else:
        measure(a.workers, a.batch, a.rounds)


if __name__ == "__main__":
    main()
