"""Consumer CPU per command on a real stack, and where it goes (py-spy), for one or more code trees.

Brings up the plaintext servers-only stack (as `make bench` does), then for each code tree
starts one `runstate serve` process (RUNSTATE_MAX_BATCH=1000), drives the benchmark workload in
a closed loop and, with --spy, records the consumer with py-spy meanwhile. Prints the consumer's
CPU µs per decided command; with --spy also writes DIR/<label>.raw (py-spy's collapsed stacks).

    .venv/bin/python tests/bench/consumer_profile.py --seconds 20 --spy /tmp/spy
    .venv/bin/python tests/bench/consumer_profile.py --tree base=/tmp/main/services --tree new=

A tree is label=PATH: PATH goes on the consumer's PYTHONPATH (empty: this checkout). Not for
CI: it needs the machine to itself to mean much, and reports ratios between trees run together.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_bench import Bench, Stack, log, parse_args


async def measure(bench: Bench, label: str, seconds: float, workers: int, spy: Path | None) -> dict:
    bench.reset_database()
    async with bench.consumers(label, 1, 1) as (driver, topics, pids):
        recorder = None
        spy_bin = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
        if spy is not None and spy_bin:
            spy.mkdir(parents=True, exist_ok=True)
            recorder = subprocess.Popen(
                [spy_bin, "record", "--pid", str(pids[0]), "--format", "raw", "--rate", "200", "--nonblocking",
                 "--duration", str(int(seconds)), "--output", str(spy / f"{label}.raw")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        res = await bench.closed_loop(driver, topics, pids, workers, seconds=seconds)
        if recorder is not None:
            recorder.wait(60)
    cores = res["cpu"]["consumers"]
    return {"label": label, "throughput": res["throughput"], "consumer_cores": cores,
            "consumer_us": cores / res["throughput"] * 1e6 if res["throughput"] else float("nan"),
            "postgres_us": res["cpu"]["postgres"] / res["throughput"] * 1e6 if res["throughput"] else float("nan"),
            "p99_ms": res["p99_ms"]}


async def run(trees: list[tuple[str, str]], seconds: float, workers: int, rounds: int, spy: Path | None) -> None:
    stack = Stack(False)
    stack.up()
    try:
        bench = Bench(parse_args(["--warmup", "3"]), stack)
        pythonpath = os.environ.get("PYTHONPATH", "")
        for round_ in range(rounds):
            for label, path in trees:
                os.environ["PYTHONPATH"] = path or pythonpath
                r = await measure(bench, f"{label}{round_}", seconds, workers, spy)
                log(f"{label}: {r['throughput']:.0f} commands/s, consumer {r['consumer_us']:.0f} µs/command"
                    f" ({r['consumer_cores']:.2f} cores), postgres {r['postgres_us']:.0f} µs/command,"
                    f" p99 {r['p99_ms']:.1f} ms")
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
    a = p.parse_args()
    trees = [tuple(t.split("=", 1)) for t in a.tree] or [("this", "")]
    asyncio.run(run(trees, a.seconds, a.workers, a.rounds, a.spy))  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
