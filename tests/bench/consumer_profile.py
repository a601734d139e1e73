"""Consumer CPU per command on a real stack, and where it goes (py-spy), for one or more code trees.

Brings up the plaintext servers-only stack (as `make bench` does), then for each code tree
starts one `runstate serve` process (RUNSTATE_MAX_BATCH=1000), drives the benchmark workload in
a closed loop and, with --spy, records the consumer with py-spy meanwhile. Prints the consumer's
CPU µs per decided command; with --spy also writes DIR/<label>.raw (py-spy's collapsed stacks).

    .venv/bin/python tests/bench/consumer_profile.py --seconds 20 --spy /tmp/spy
    .venv/bin/python tests/bench/consumer_profile.py --tree base=/tmp/main/services --tree new=
    .venv/bin/python tests/bench/consumer_profile.py --rate 1000 --rounds 3 --tree base=... --tree new=

With --rate the load is offered at that many commands/s (600 workers, as `make bench`'s
fixed loads) instead of a closed loop, and the consumer's batch phases are read from its
/metrics at the end: where a batch's time goes at low load (the latency's cycle).

A tree is label=PATH: PATH goes on the consumer's PYTHONPATH (empty: this checkout). Not for
CI: it needs the machine to itself to mean much, and reports ratios between trees run together.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_bench import Bench, Stack, log, parse_args


def metrics_port(pid: int) -> int:
    """The consumer's /metrics port (procs.Consumer gives each one a free port)."""
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v.split(b"=", 1)[1] for v in env if v.startswith(b"RUNSTATE_METRICS_PORT=")))


def metrics_text(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def phases(text: str) -> dict[str, tuple[float, float]]:
    """The consumer's batch phases so far, from its /metrics text: name -> (seconds in all, batches)."""
    out: dict[str, list[float]] = {}
    for kind, name, value in re.findall(
            r'^runstate_batch_phase_seconds_(sum|count)\{phase="(\w+)"\} (\S+)$', text, re.MULTILINE):
        out.setdefault(name, [0.0, 0.0])[kind == "count"] = float(value)
    records = re.search(r"^runstate_batch_records_sum (\S+)$", text, re.MULTILINE)
    batches = re.search(r"^runstate_batch_records_count (\S+)$", text, re.MULTILINE)
    if records and batches:
        out["records"] = [float(records.group(1)), float(batches.group(1))]
    return {k: (v[0], v[1]) for k, v in out.items()}


async def measure(bench: Bench, label: str, seconds: float, workers: int, spy: Path | None,
                  rate: float | None = None) -> dict:
    bench.reset_database()
    async with bench.consumers(label, 1, 1) as (driver, topics, pids):
        port = metrics_port(pids[0])
        before = phases(metrics_text(port)) if rate else {}
        recorder = None
        spy_bin = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
        if spy is not None and spy_bin:
            spy.mkdir(parents=True, exist_ok=True)
            recorder = subprocess.Popen(
                [spy_bin, "record", "--pid", str(pids[0]), "--format", "raw", "--rate", "200", "--nonblocking",
                 "--duration", str(int(seconds)), "--output", str(spy / f"{label}.raw")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if rate:
            res = await bench.paced(driver, topics, pids, rate, seconds, workers)
            text = metrics_text(port)
            after = phases(text)
            if os.environ.get("PROFILE_DUMP_METRICS"):  # the phases' histograms, for their tails
                Path(os.environ["PROFILE_DUMP_METRICS"], f"{label}.metrics").write_text(text)
            per = {k: (v[0] - before.get(k, (0, 0))[0], v[1] - before.get(k, (0, 0))[1]) for k, v in after.items()}
            res["phases"] = {k: (s / n if n else 0.0) for k, (s, n) in per.items()}
        else:
            res = await bench.closed_loop(driver, topics, pids, workers, seconds=seconds)
        if recorder is not None:
            recorder.wait(60)
    cores = res["cpu"]["consumers"]
    return {"label": label, "throughput": res["throughput"], "consumer_cores": cores,
            "consumer_us": cores / res["throughput"] * 1e6 if res["throughput"] else float("nan"),
            "postgres_us": res["cpu"]["postgres"] / res["throughput"] * 1e6 if res["throughput"] else float("nan"),
            "p50_ms": res["p50_ms"], "p99_ms": res["p99_ms"], "phases": res.get("phases", {}),
            "hop": f"{res.get('hop_p50_ms', float('nan')):.1f}/{res.get('hop_p99_ms', float('nan')):.1f}",
            "cores": " ".join(f"{k} {v:.2f}" for k, v in res["cpu"].items())}


async def run(trees: list[tuple[str, str]], seconds: float, workers: int, rounds: int, spy: Path | None,
              rate: float | None = None) -> None:
    stack = Stack(False)
    stack.up()
    try:
        bench = Bench(parse_args(["--warmup", "3"]), stack)
        pythonpath = os.environ.get("PYTHONPATH", "")
        for round_ in range(rounds):
            for label, path in trees:
                os.environ["PYTHONPATH"] = path or pythonpath
                r = await measure(bench, f"{label}{round_}", seconds, workers, spy, rate)
                log(f"{label}: {r['throughput']:.0f} commands/s, consumer {r['consumer_us']:.0f} µs/command"
                    f" ({r['consumer_cores']:.2f} cores), postgres {r['postgres_us']:.0f} µs/command,"
                    f" p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms; hop p50/p99 {r['hop']} ms; cores: {r['cores']}")
                if r["phases"]:
                    ph = r["phases"]
                    cpu = r["consumer_us"] * ph.get("records", 0) / 1e3
                    log("    per batch: " + ", ".join(
                        f"{k} {v:.1f} records" if k == "records" else f"{k} {v * 1e3:.2f} ms" for k, v in ph.items())
                        + f"; consumer CPU {cpu:.2f} ms")
        os.environ["PYTHONPATH"] = pythonpath
    finally:
        stack.down()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", action="append", default=[], help="label=PYTHONPATH (repeatable); default: this one")
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--workers", type=int, default=1500)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--spy", type=Path, default=None, help="write py-spy's raw profile of each run here")
    p.add_argument("--rate", type=float, default=None, help="offer this many commands/s (600 workers)")
    a = p.parse_args()
    if a.rate:
        a.workers = 600 if a.workers == 1500 else a.workers
    trees = [tuple(t.split("=", 1)) for t in a.tree] or [("this", "")]
    asyncio.run(run(trees, a.seconds, a.workers, a.rounds, a.spy, a.rate))  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
