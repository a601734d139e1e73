"""BENCHMARKS.md, BENCHMARKS.png and the `bench:` line from one run's results."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

NOTES = Path(__file__).with_name("NOTES.md")


def _f(x, digits=0) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and x != x:
        return "–"
    return f"{x:,.{digits}f}"


def _cpu(cpu: dict | None) -> str:
    if not cpu:
        return "–"
    keys = [k for k in ("consumers", "postgres", "kafka", "driver", "prefect", "machine") if k in cpu]
    return ", ".join(f"{k} {cpu[k]:.2f}" for k in keys)


def _validating_floor(runs: dict, consumer_us: float) -> list[str]:
    """What the validating floor's CPU per command says about runstate's consumer target."""
    run = runs.get("floor_validating")
    if not run:
        return []
    floor_us = cpu_us_per_command(runs.get("floor", {}), "consumers")
    least = cpu_us_per_command(run, "consumers")
    return [
        "",
        f"‡ The validating floor is the floor's consumer doing, for every record, what any service with "
        f"runstate's contract must do whatever its rules: runstate's own parse (`parse_record`: the strict "
        f"I-JSON parse, the pydantic model, the key check) and a second message (the state change). Its "
        f"consumer used **{_f(least, 1)} µs of CPU a command** in this run, against the bare floor's "
        f"{_f(floor_us, 1)} and runstate's {_f(consumer_us, 1)}: the least a consumer on these libraries "
        f"(aiokafka, pydantic, psycopg) pays per command on this machine, before any rule is applied, any "
        f"event hashed or any projection written.",
    ]


def cpu_us_per_command(run: dict, group: str) -> float:
    """CPU microseconds a group of processes spent per decided command in a closed-loop run
    (its cores in use divided by the run's throughput)."""
    cores = (run.get("cpu") or {}).get(group)
    throughput = run.get("throughput")
    return cores / throughput * 1e6 if cores is not None and throughput else float("nan")


def write_report(results: dict, out: Path) -> str:
    runs = results["runs"]
    cfg = results["config"]
    m = results["machine"]
    main = runs.get("main", {})
    floor = runs.get("floor", {})
    prefect = runs.get("prefect", {})
    rebuild = runs.get("rebuild", {})
    rs = main.get("throughput", 0.0)
    fl = floor.get("throughput", 0.0)
    pf = prefect.get("throughput", 0.0)
    vs_prefect = rs / pf if pf else float("nan")
    vs_floor = rs / fl if fl else float("nan")
    mine_1000, floor_1000 = p99_runs(runs)
    p99_1000 = median_p99(mine_1000)
    rb = rebuild.get("events_per_second", float("nan"))
    replay = runs.get("replay", {})
    rp = replay.get("events_per_second", float("nan"))
    bpe = main.get("bytes_per_event") or float("nan")
    p99_floor_1000 = median_p99(floor_1000)
    consumer_us = cpu_us_per_command(main, "consumers")
    postgres_us = cpu_us_per_command(main, "postgres")
    line = (f"bench: runstate={rs:.0f} floor={fl:.0f} prefect={pf:.0f} vs_prefect={vs_prefect:.1f} "
            f"vs_floor={vs_floor:.2f} p99_at_1000={p99_1000:.1f} p99_floor_at_1000={p99_floor_1000:.1f} "
            f"consumer_us={consumer_us:.0f} postgres_us={postgres_us:.0f} bytes_per_event={bpe:.0f} "
            f"rebuild={rb:.0f} replay={rp:.0f}")
    replicated = (runs.get("replicated") or {}).get("replicated")
    if replicated:
        line += (f" replicated={replicated['closed']['throughput']:.0f} "
                 f"replicated_p99_at_1000={replicated['at_1000']['p99_ms']:.1f}")

    marks = main.get("rss_marks", {})
    rss_100k = marks.get("100000")
    rss_end = main.get("rss_kib_end")
    growth = (rss_end - rss_100k) / rss_100k * 100 if rss_100k and rss_end else float("nan")

    def target(ok: bool) -> str:
        return "met" if ok else "**not met**"

    pg = cfg.get("postgres", {})
    lines = [
        "# Benchmarks",
        "",
        f"Written by `make bench` (`tests/bench/run_bench.py`) on {time.strftime('%Y-%m-%d %H:%M %Z')}; "
        f"the whole run took {results.get('wall_seconds', 0) / 60:.1f} min. Every number below comes from that "
        "one run, on one machine that also hosts Kafka, PostgreSQL, the load driver and (for the peer) Prefect's "
        "server. Re-run with `make bench`; the raw numbers are in `.runstate/bench/results.json`.",
        "",
        "## Summary",
        "",
        "| | measured | target | |",
        "|---|---:|---:|---|",
        f"| runstate end-to-end, decided transitions/s | {_f(rs)} | ≥ 5,000 | {target(rs >= 5000)} |",
        f"| vs Prefect 3.9.1's server (same run) | {_f(vs_prefect, 1)}× | ≥ 20× | {target(vs_prefect >= 20)} |",
        f"| vs the floor (same run) | {_f(vs_floor * 100, 0)} % | ≥ 50 % | {target(vs_floor >= 0.5)} |",
        f"| p99 end-to-end at 1,000 transitions/s | {_f(p99_1000, 1)} ms | < 25 ms | {target(p99_1000 < 25)} |",
        f"| consumer RSS, 100k → {_f(main.get('received'))} commands | {_f((rss_100k or 0) / 1024, 1)} → "
        f"{_f((rss_end or 0) / 1024, 1)} MiB ({growth:+.1f} %) | flat within 10 % | {target(abs(growth) <= 10)} |",
        f"| p99 at 1,000/s against the floor's {_f(p99_floor_1000, 1)} ms (same run) | "
        f"{_f(p99_1000 / p99_floor_1000, 2)}× | ≤ 1.25× | {target(p99_1000 <= 1.25 * p99_floor_1000)} |",
        f"| consumer CPU per decided command (main run) | {_f(consumer_us)} µs | ≤ 70 µs | "
        f"{target(consumer_us <= 70)} |",
        f"| PostgreSQL CPU per decided command (main run) | {_f(postgres_us)} µs | ≤ 40 µs | "
        f"{target(postgres_us <= 40)} |",
        f"| bytes per event on disk (table, TOAST, indexes) | {_f(bpe)} | ≤ 900 (half of 1.8 kB) | "
        f"{target(bpe <= 900)} |",
        f"| rebuild of {_f(rebuild.get('events'))} events | {_f(rb)} events/s | ≥ 100,000 | {target(rb >= 100_000)} |",
        f"| replay --verify of {_f(replay.get('events'))} events | {_f(rp)} events/s | ≥ 25,000 | "
        f"{target(rp >= 25_000)} |",
        *_overhead_summary(runs.get("overhead"), target),
        "",
        "```",
        line,
        "```",
        "",
        "`consumer_us` and `postgres_us` are the CPU seconds the consumer processes and PostgreSQL's processes "
        "used during the main closed-loop run, divided by the commands decided in it (from /proc, so they "
        "include Kafka client and event-loop work, and PostgreSQL's WAL writer, checkpointer and autovacuum). "
        "`bytes_per_event` is `pg_total_relation_size` of the events table (heap, TOAST, indexes) over its rows "
        "after the main run. " + _p99_method(runs),
        "",
        "## Machine and settings",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {m.get('cpu')}, {m.get('cores')} cores |",
        f"| memory | {m.get('memory_gib')} GiB |",
        f"| kernel / Python | {m.get('kernel')} / {m.get('python')} |",
        f"| load average (1/5/15 min) at start | {' / '.join(f'{x:.2f}' for x in m.get('loadavg_start', ()))} |",
        f"| load average at end | {' / '.join(f'{x:.2f}' for x in m.get('loadavg_end', ()))} |",
        f"| PostgreSQL | {pg.get('server_version')}, shared_buffers {pg.get('shared_buffers')}, "
        f"synchronous_commit **{pg.get('synchronous_commit')}**, fsync {pg.get('fsync')}, "
        f"max_wal_size {pg.get('max_wal_size')}, checkpoint_timeout {pg.get('checkpoint_timeout')}, "
        f"default_toast_compression {pg.get('default_toast_compression')} |",
        "| Kafka | 4.1.1, single KRaft node (deploy/stack), heap -Xmx512m, replication factor 1, "
        "group.coordinator.append.linger.ms=0; clients aiokafka 0.14.0, producers acks=all + idempotence |",
        f"| topics | {cfg.get('partitions')} partitions each; a fresh set of topics, a fresh consumer group "
        "and a fresh, empty database (`runstate_bench`) per measurement (main run, fixed loads, floor, each "
        "scale-out step) |",
        f"| runstate consumer | `runstate serve`, RUNSTATE_MAX_BATCH={cfg.get('max_batch')}, "
        f"RUNSTATE_BATCH_TIMEOUT_MS={cfg.get('batch_timeout_ms')}; main run {cfg.get('processes', 1)} "
        f"process(es) with RUNSTATE_LANES={cfg.get('lanes')} (group members per process), fixed loads 1 process "
        f"with RUNSTATE_LANES={cfg.get('load_lanes', cfg.get('lanes'))} |",
        f"| workload | create_task_run (PENDING) → RUNNING → COMPLETED; {cfg.get('fail_share', 0) * 100:.0f} % of "
        "runs fail once and retry (RUNNING → FAILED, answered REJECT with AwaitingRetry → RUNNING → COMPLETED); "
        "each command is one decided transition; a run's next command is produced when its previous result is "
        "consumed |",
        f"| workers | {cfg.get('workers')} concurrent simulated workers (asyncio tasks, one run in flight each) "
        "for the throughput runs |",
        "",
        "Durability is not traded for speed: `synchronous_commit` stays **on** (every batch's events are on "
        "disk before its results are published and its offsets committed) and Kafka producers use acks=all "
        "with idempotence.",
        "",
        "## End-to-end throughput (closed loop)",
        "",
        "| system | workers | transitions/s | p50 ms | p95 ms | p99 ms | lag mean / max | errors | CPU (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    def row(name, r, workers=None):
        return (f"| {name} | {_f(workers or r.get('workers') or r.get('concurrency'))} | {_f(r.get('throughput'))} | "
                f"{_f(r.get('p50_ms'), 1)} | {_f(r.get('p95_ms'), 1)} | {_f(r.get('p99_ms'), 1)} | "
                f"{_f(r.get('lag_mean'))} / {_f(r.get('lag_max'))} | {_f(r.get('errors'))} | {_cpu(r.get('cpu'))} |")

    lines.append(row(f"runstate, {cfg.get('processes', 1)} consumer process(es) × {cfg.get('lanes')} lane(s) (main run, "
                     f"{_f(main.get('commands'))} transitions in {_f(main.get('seconds'))} s)", main))
    if "floor" in runs:
        lines.append(row("floor (bare consumer → PostgreSQL → result topic)", floor))
    if "floor_validating" in runs:
        lines.append(row("validating floor (the floor + runstate's parse and validation + a state change) ‡",
                         runs["floor_validating"]))
    if "w16" in runs:
        lines.append(row("runstate, 1 process, 16 workers", runs["w16"]))
    if prefect:
        lines.append(row("Prefect 3.9.1 server, REST, 16 clients †", prefect))
    lines += [
        "",
        f"Ratios (same run): runstate / floor = **{_f(vs_floor * 100)} %**; runstate / Prefect = "
        f"**{_f(vs_prefect, 1)}×**"
        + (f" (with 16 workers each, like for like: {_f(runs['w16']['throughput'] / pf, 1)}×)"
           if "w16" in runs and pf else "") + ".",
        "",
        "† Prefect's server: `prefect server start --no-ui` (one worker, its background services on) from "
        "PyPI's prefect==3.9.1 in .cache/prefect-venv, on the same PostgreSQL (database `prefect`); the "
        "clients are httpx, one keep-alive connection each, same lifecycles (POST /task_runs/ with state "
        "PENDING, then POST /task_runs/{id}/set_state). Its PostgreSQL CPU is under-counted: backends that "
        "exit during the run are missed; `machine` is the whole machine's busy cores.",
        "",
        "The floor's number is bounded by the load driver (see its CPU: one Python process producing and "
        "matching every command), so the floor itself is at least this fast and runstate's fraction of it at "
        "most this large.",
        *_validating_floor(runs, consumer_us),
        "",
        "Latency is from just before the command is produced to the moment its result record is consumed. In a "
        "closed loop it is set by the number of runs in flight (Little's law: workers ÷ throughput); the "
        "fixed-load table below is the latency a worker sees when the service is not saturated. Lag is the "
        "consumer group's committed-offset lag on the command topic, sampled every second with the admin client.",
        "",
        f"## Latency under a fixed offered load (1 process, RUNSTATE_LANES={cfg.get('load_lanes', cfg.get('lanes'))})",
        "",
        "| offered /s | achieved /s | p50 ms | p95 ms | p99 ms | result hop p50 / p99 ms | lag mean / max | "
        "CPU (cores) |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in runs.get("load", []):
        lines.append(f"| {_f(r['offered'])} | {_f(r['throughput'])} | {_f(r['p50_ms'], 1)} | {_f(r['p95_ms'], 1)} | "
                     f"{_f(r['p99_ms'], 1)} | {_f(r.get('hop_p50_ms'), 1)} / {_f(r.get('hop_p99_ms'), 1)} | "
                     f"{_f(r.get('lag_mean'))} / {_f(r.get('lag_max'))} | {_cpu(r.get('cpu'))} |")
    if "floor_1000" in runs:
        r = runs["floor_1000"]
        lines += ["", f"The floor at 1,000/s in the same run: p50 {_f(r['p50_ms'], 1)} ms, p99 {_f(r['p99_ms'], 1)} ms "
                  f"(result hop p50 {_f(r.get('hop_p50_ms'), 1)} ms)."]
    lines += _p99_repeats(runs)
    lines += ["", "The result hop is the time from a result record's CreateTime (stamped by the consumer's producer) "
              "to its arrival at the driver: one Kafka hop of the round trip."]
    lines += _overhead_section(runs.get("overhead"))
    lines += _replicated_section(runs.get("replicated"))
    lines += [
        "",
        f"## Scale-out ({cfg.get('partitions')} partitions, RUNSTATE_LANES={results['config'].get('scale_lanes')}"
        " per process)",
        "",
        "| processes | group members | transitions/s | p50 ms | p99 ms | RSS per process MiB | CPU (cores) |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in runs.get("scale", []):
        rss = ", ".join(_f((x or 0) / 1024, 0) for x in r.get("rss_kib_each", []))
        lines.append(f"| {r['processes']} | {r['processes'] * results['config'].get('scale_lanes', 1)} | "
                     f"{_f(r['throughput'])} | {_f(r['p50_ms'], 1)} | {_f(r['p99_ms'], 1)} | {rss} | {_cpu(r.get('cpu'))} |")
    lines += [
        "",
        "One consumer process is bound by its one core: while it waits on PostgreSQL or the broker nothing "
        "else decides. A second process fills the machine's second core (see `machine`); past that, on 2 cores "
        "shared with Kafka, PostgreSQL and the driver, more processes only split the load into smaller "
        "batches. Scale-out keeps paying when the processes get cores of their own.",
        "",
        "## Rebuild",
        "",
        "| events | seconds | events/s | batch size | log size |",
        "|---:|---:|---:|---:|---:|",
        f"| {_f(rebuild.get('events'))} | {_f(rebuild.get('seconds'), 1)} | {_f(rb)} | {_f(rebuild.get('batch_size'))} | "
        f"{rebuild.get('table_size', '–')} |",
        "",
        f"`runstate.audit.rebuild.rebuild()` over a log of {_f(rebuild.get('generated'))} events in a database of "
        f"its own, generated in {_f(rebuild.get('generation_seconds'))} s by SQL from "
        f"{_f(rebuild.get('template_events'))} real events (whole histories of runs decided in the main run, "
        "payloads unchanged, fresh stream, state, command ids and source offsets). The generated log is an "
        "UNLOGGED table, which only makes generating it cheaper; the rebuild reads it and writes the "
        "projections as it would on a logged table.",
        "",
        *audit_section(rebuild, replay),
        "## Memory",
        "",
        f"Resident memory (VmRSS) of the consumer process(es) in the main run, summed over "
        f"{cfg.get('processes', 1)}: **{_f((rss_100k or 0) / 1024, 1)} MiB** "
        f"after 100,000 commands, **{_f((rss_end or 0) / 1024, 1)} MiB** after {_f(main.get('received'))} "
        f"({growth:+.1f} %).",
        "",
    ]
    if main.get("received", 0) < 1_000_000:
        lines += [
            f"1,000,000 commands do not fit the 15-minute budget next to everything else at this throughput; "
            f"the run stops at {cfg.get('main_seconds'):.0f} s, so the largest count measured is "
            f"{_f(main.get('received'))}.",
            "",
        ]
    series = main.get("rss_series", [])
    if series:
        picks = [*series[::max(1, len(series) // 8)], series[-1]]
        lines += ["| seconds | commands | RSS MiB |", "|---:|---:|---:|"]
        lines += [f"| {t:.0f} | {_f(n)} | {_f(k / 1024, 1)} |" for t, n, k in picks]
        lines.append("")
    lines += ["![throughput and p99 latency against offered load and against consumer count](BENCHMARKS.png)", ""]
    if NOTES.exists():
        lines += [NOTES.read_text().rstrip(), ""]
    (out / "BENCHMARKS.md").write_text("\n".join(lines))
    plot(results, out / "BENCHMARKS.png")
    return line


def _replicated_section(rep: dict | None) -> list[str]:
    """Single node next to the replicated stack: the same consumer, the same loads, one run."""
    if not rep or "replicated" not in rep:
        return []
    lines = ["", "## Replication's cost", "",
             f"One consumer process on the single node (RF 1, one PostgreSQL) and on the replicated stack "
             f"(`RUNSTATE_STACK=replicated`: {rep.get('shape', '')}), one after the other in the same run.", "",
             "| stack | at 1,000/s: achieved | p50 ms | p99 ms | closed loop transitions/s | p99 ms | CPU (cores) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for name in ("single", "replicated"):
        r = rep.get(name)
        if not r:
            continue
        f, c = r["at_1000"], r["closed"]
        lines.append(f"| {name} | {_f(f['throughput'])} | {_f(f['p50_ms'], 1)} | {_f(f['p99_ms'], 1)} | "
                     f"{_f(c['throughput'])} | {_f(c['p99_ms'], 1)} | {_cpu(c.get('cpu'))} |")
    lines += ["", "Each batch's COMMIT waits for the standby, and each result for two of three replicas; on one "
              "2-core machine the six server processes also share the cores with the consumer."]
    return lines


def _overhead_summary(overhead: dict | None, target) -> list[str]:
    if not overhead:
        return []
    pct = overhead["metrics_overhead_pct"]
    return [f"| metrics' consumer CPU per command | {pct:+.1f} % | < 5 % | {target(pct < 5)} |"]


def median_p99(runs: list[dict]) -> float:
    """The median p99 of the runs that have one (NaN when none has)."""
    found = sorted(r["p99_ms"] for r in runs if r.get("p99_ms") is not None)
    return statistics.median(found) if found else float("nan")


def p99_runs(runs: dict) -> tuple[list[dict], list[dict]]:
    """The runs at 1,000/s whose p99 the summary compares: runstate's and the floor's. From the
    alternating pairs (p99_pairs); a results.json written before them has the sweep's run and
    repeats measured one side after the other."""
    pairs = runs.get("p99_pairs")
    if pairs:
        return [p["runstate"] for p in pairs], [p["floor"] for p in pairs]
    at1000 = next((r for r in runs.get("load", []) if r["offered"] == 1000), None)
    mine = [r for r in (at1000, *runs.get("load_1000_repeats", [])) if r]
    return mine, [r for r in (runs.get("floor_1000"), *runs.get("floor_1000_repeats", [])) if r]


def _count(n: int) -> str:
    return {2: "two", 3: "three", 4: "four", 5: "five"}.get(n, str(n))


def _p99_method(runs: dict) -> str:
    mine, _ = p99_runs(runs)
    if runs.get("p99_pairs"):
        return (f"`p99_at_1000` and `p99_floor_at_1000` are the medians of {_count(len(mine))} 12-s runs each at 1,000/s "
                "offered, runstate's on one consumer process and the floor's on its bare consumer, measured in "
                "alternating pairs with both consumers up (a pair's two runs in the same minute, the order "
                "swapped every pair; each run's p99 is listed under the fixed-load table).")
    return ("`p99_at_1000` and `p99_floor_at_1000` are the medians of three 12-s runs each at 1,000/s offered "
            "(runstate's first is the sweep's; each run's p99 is listed under the fixed-load table), runstate's "
            "on one consumer process and the floor's on its bare consumer.")


def _p99_repeats(runs: dict) -> list[str]:
    mine, floor = p99_runs(runs)
    if len(mine) < 2 and len(floor) < 2:
        return []
    if runs.get("p99_pairs"):
        pairs = runs["p99_pairs"]
        return ["", "p99 at 1,000/s in alternating pairs, both consumers up (the summary takes the medians): "
                + "; ".join(f"pair {i + 1} runstate {_f(p['runstate']['p99_ms'], 1)} ms (p50 "
                            f"{_f(p['runstate']['p50_ms'], 1)}), the floor {_f(p['floor']['p99_ms'], 1)} ms (p50 "
                            f"{_f(p['floor']['p50_ms'], 1)})" for i, p in enumerate(pairs)) + "."]
    return ["", "p99 at 1,000/s, each run in turn (the summary takes the medians): runstate "
            + ", ".join(f"{_f(r['p99_ms'], 1)}" for r in mine) + " ms; the floor "
            + ", ".join(f"{_f(r['p99_ms'], 1)}" for r in floor) + " ms."]


def _overhead_section(overhead: dict | None) -> list[str]:
    if not overhead:
        return []
    names = {"metrics_off": "metrics off (`RUNSTATE_METRICS=off`)", "metrics_on": "metrics on (the default)",
             "tracing_on": "metrics and tracing on (`RUNSTATE_TRACING=on`, `OTEL_TRACES_EXPORTER=none`)"}
    lines = [
        "",
        "## What metrics and tracing cost",
        "",
        f"One consumer process (1 lane) per setting, all three running; in each of {overhead['rounds']} rounds "
        f"the same workload ({_f(overhead['runs'])} lifecycles, the same seed, offered at "
        f"{_f(overhead['rate'])} commands/s by {_f(overhead['workers'])} workers) goes through each in turn. "
        "CPU is the consumer process's (user + system, from /proc) over the round, divided by the results it "
        "published; the median of the rounds is shown.",
        "",
        "| setting | consumer CPU µs per command | p99 ms | per round (µs) |",
        "|---|---:|---:|---|",
    ]
    for name, v in overhead["variants"].items():
        rounds = ", ".join(_f(x["cpu_us_per_command"]) for x in v["samples"])
        lines.append(f"| {names.get(name, name)} | {_f(v['cpu_us_per_command'])} | {_f(v['p99_ms'], 1)} | {rounds} |")
    lines += [
        "",
        f"Metrics add **{overhead['metrics_overhead_pct']:+.1f} %** CPU per command (target: less than 5 %); "
        f"tracing, with every span made and none exported, adds {overhead['tracing_overhead_pct']:+.1f} % on top "
        "(an OTLP exporter would add its batching and sending, in a thread of the same process)."
        + _unresolved(overhead["variants"]),
    ]
    in_process = overhead.get("in_process")
    if in_process:
        lines += [
            "",
            "The same calls timed alone (process CPU in the benchmark's own process, on batches of "
            "create_task_run commands decided against an empty snapshot): what ConsumerMetrics (every phase, "
            "then the batch) and the tracer (batch, command and phase spans, result headers) cost per command.",
            "",
            "| records per batch | metrics µs per command | tracing µs per command |",
            "|---:|---:|---:|",
            *(f"| {size} | {t['metrics_us_per_command']:.1f} | {t['tracing_us_per_command']:.1f} |"
              for size, t in in_process.items()),
        ]
    return lines


def _unresolved(variants: dict) -> str:
    """A sentence naming the differences smaller than the rounds' own spread: this run cannot
    tell them from noise (three consumers share two cores with the servers and the driver)."""
    pairs = (("metrics_on", "metrics_off", "metrics'"), ("tracing_on", "metrics_on", "tracing's"))
    found = []
    for on, off, label in pairs:
        a, b = variants.get(on), variants.get(off)
        if not a or not b:
            continue
        spread = max(max(x["cpu_us_per_command"] for x in v["samples"]) - min(x["cpu_us_per_command"] for x in v["samples"])
                     for v in (a, b))
        if abs(a["cpu_us_per_command"] - b["cpu_us_per_command"]) < spread:
            found.append(f"{label} difference ({_f(a['cpu_us_per_command'] - b['cpu_us_per_command'])} µs) is "
                         f"smaller than a setting's spread across rounds (up to {_f(spread)} µs)")
    if not found:
        return ""
    text = "; ".join(found)
    return (f" The {text}: this run does not tell {'them' if len(found) > 1 else 'it'} from noise, and the "
            "timing alone below is the better measure.")


def audit_section(rebuild: dict, replay: dict) -> list[str]:
    """The workers of rebuild and replay --verify, and the replay's memory against log size."""
    if not replay:
        return []
    early, late = replay.get("rss_kib_at_10pct"), replay.get("rss_kib_max_after_50pct")
    return [
        "## Replay --verify",
        "",
        "| events | decisions re-made | seconds | events/s | workers | batch size | mismatches |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {_f(replay.get('events'))} | {_f(replay.get('decisions'))} | {_f(replay.get('seconds'), 1)} | "
        f"{_f(replay.get('events_per_second'))} | {_f(replay.get('workers'))} | {_f(replay.get('batch_size'))} | "
        f"{_f(replay.get('mismatches'))} |",
        "",
        f"`runstate.audit.replay.verify_log()` over the same generated log, right after the rebuild, with "
        f"{_f(replay.get('workers'))} worker processes (the rebuild above used {_f(rebuild.get('workers'))} workers: its "
        "own session and the rest as processes); "
        "each worker takes ranges of whole streams and reads them in keyset batches. The generated events carry "
        "no hash, so the hash-chain check (about a tenth of replay's CPU in a profile) is skipped here. The "
        f"workers' resident memory, summed: {_f((early or 0) / 1024, 1)} MiB when a tenth of the log was "
        f"verified, at most {_f((late or 0) / 1024, 1)} MiB over its second half.",
        "",
    ]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    load = runs.get("load", [])
    main = runs.get("main")
    xs = [r["offered"] for r in load]
    tp = [r["throughput"] for r in load]
    p99 = [r["p99_ms"] for r in load]
    ax1.plot(xs, tp, "o-", color="tab:blue", label="achieved transitions/s")
    ax1.plot(xs, xs, ":", color="grey", label="offered")
    if main:
        ax1.axhline(main["throughput"], color="tab:blue", ls="--", lw=0.8, label="closed-loop maximum")
    ax1.set_xlabel("offered load (transitions/s)")
    ax1.set_ylabel("transitions/s", color="tab:blue")
    ax1b = ax1.twinx()
    ax1b.plot(xs, p99, "s-", color="tab:red", label="p99 latency")
    ax1b.axhline(25, color="tab:red", ls=":", lw=0.8, label="p99 target 25 ms")
    ax1b.set_ylabel("p99 latency (ms, log)", color="tab:red")
    ax1b.set_yscale("log")
    ax1.set_title("runstate, 1 consumer process: fixed loads")
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax1b.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)

    scale = runs.get("scale", [])
    n = [r["processes"] for r in scale]
    bars = ax2.bar(n, [r["throughput"] for r in scale], color="tab:blue", alpha=0.7,
                   label="transitions/s (closed loop)")
    ax2.bar_label(bars, fmt="%.0f", fontsize=8)
    if runs.get("prefect"):
        ax2.axhline(runs["prefect"]["throughput"], color="tab:orange", ls="--", label="Prefect 3.9.1 server")
    if runs.get("floor"):
        ax2.text(0.02, 0.97, f"floor (bare consumer): {runs['floor']['throughput']:,.0f}/s", transform=ax2.transAxes,
                 va="top", fontsize=8, color="tab:green")
    ax2.set_ylim(0, max([r["throughput"] for r in scale] + [1]) * 1.35)
    ax2.set_xlabel(f"consumer processes (12 partitions, RUNSTATE_LANES={results['config'].get('scale_lanes')})")
    ax2.set_ylabel("transitions/s", color="tab:blue")
    ax2.set_xticks(n)
    ax2b = ax2.twinx()
    ax2b.plot(n, [r["p99_ms"] for r in scale], "s-", color="tab:red", label="p99 latency")
    ax2b.set_ylabel("p99 latency (ms)", color="tab:red")
    ax2b.set_ylim(bottom=0)
    ax2.set_title("scale-out")
    h1, l1 = ax2.get_legend_handles_labels()
    h2, l2 = ax2b.get_legend_handles_labels()
    ax2.legend(h1 + h2, l1 + l2, loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
