"""The peer: the same task-run lifecycles against Prefect's own server, over its REST API.

Runs in Prefect's virtualenv (httpx comes with prefect). C concurrent clients (asyncio tasks,
one keep-alive connection each) drive lifecycles one after another:

    POST /task_runs/ (state PENDING) -> set_state RUNNING -> set_state COMPLETED
    ... or, for the failing share: RUNNING -> FAILED (rejected: AwaitingRetry) -> RUNNING -> COMPLETED

Every request is one decided transition. Prints one JSON line with the counts and latencies.

    python prefect_driver.py API_URL SECONDS CONCURRENCY
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
import uuid

import httpx


def lifecycle(failing: bool) -> list[str]:
    return ["RUNNING", "FAILED", "RUNNING", "COMPLETED"] if failing else ["RUNNING", "COMPLETED"]


async def main(api: str, seconds: float, concurrency: int, warmup: float = 3.0, fail_share: float = 0.2) -> None:
    rng = random.Random(7)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors = 0
    commands = 0
    counter = iter(range(10**12))
    t_start = time.perf_counter()
    window = t_start + warmup
    deadline = t_start + warmup + seconds

    async def client() -> None:
        nonlocal errors, commands
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=api, limits=limits, timeout=60) as http:
            while time.perf_counter() < deadline:
                n = next(counter)
                steps = [None, *lifecycle(rng.random() < fail_share)]
                run_id = None
                for step in steps:
                    t0 = time.perf_counter()
                    if step is None:
                        resp = await http.post("/task_runs/", json={
                            "name": f"bench-{n}", "task_key": "bench.task", "dynamic_key": str(n),
                            "empirical_policy": {"retries": 1, "retry_delay": 0},
                            "state": {"type": "PENDING"},
                        })
                        status = "ACCEPT" if resp.status_code in (200, 201) else f"HTTP{resp.status_code}"
                        if resp.status_code in (200, 201):
                            run_id = resp.json()["id"]
                    else:
                        resp = await http.post(f"/task_runs/{run_id}/set_state", json={
                            "state": {"type": step, "state_details": {"transition_id": str(uuid.uuid4())}},
                            "force": False,
                        })
                        status = resp.json().get("status", f"HTTP{resp.status_code}") \
                            if resp.status_code in (200, 201) else f"HTTP{resp.status_code}"
                    t1 = time.perf_counter()
                    statuses[status] = statuses.get(status, 0) + 1
                    if status.startswith("HTTP"):
                        errors += 1
                        break
                    if t0 >= window and t1 <= deadline:
                        commands += 1
                        latencies.append(t1 - t0)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, round(q / 100 * (len(latencies) - 1)))] if latencies else float("nan")

    print(json.dumps({
        "commands": commands, "seconds": seconds, "throughput": commands / seconds,
        "p50_ms": pct(50) * 1e3, "p95_ms": pct(95) * 1e3, "p99_ms": pct(99) * 1e3,
        "errors": errors, "statuses": statuses, "concurrency": concurrency,
    }), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3])))
