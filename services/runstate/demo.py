"""`make run`'s demo: several concurrent workers drive task runs through the
running service, then it prints the decisions and one run's history."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter

from runstate.client import RunstateClient, state
from runstate.config import Settings
from runstate.messages import OrchestrationResultEvent
from runstate.store.queries import LogReader, make_engine

WORKERS = 8
RUNS_PER_WORKER = 25


async def worker(client: RunstateClient, flow_id: uuid.UUID, n: int, seed: int, tally: Counter, sample: list) -> None:
    rng = random.Random(seed)
    for _ in range(n):
        run_id = uuid.uuid4()
        await client.create_task_run(run_id, flow_run_id=flow_id, empirical_policy={"retries": 1})
        answers: list[OrchestrationResultEvent] = []
        answers.append(await client.propose(run_id, state("RUNNING")))
        if rng.random() < 0.3:
            answers.append(await client.propose(run_id, state("FAILED")))  # becomes AwaitingRetry
            answers.append(await client.propose(run_id, state("RUNNING")))  # named Retrying
        answers.append(await client.propose(run_id, {"type": "COMPLETED", "data": {"value": rng.randint(0, 99)}}))
        answers.append(await client.propose(run_id, state("RUNNING")))  # already completed: REJECT
        for a in answers:
            assert a.status is not None  # every answer of a decided command carries its status
            tally[(a.status.value, a.result.state.name if a.result and a.result.state else None)] += 1
        if len(answers) == 5 and not sample:  # a run that failed once and retried
            sample.append(run_id)


async def main() -> None:
    settings = Settings.load()
    tally: Counter = Counter()
    sample: list[uuid.UUID] = []
    async with RunstateClient(settings, client_id="runstate-demo") as client:
        flow_id = uuid.uuid4()
        await client.create_flow_run(flow_id, name="demo", state=state("RUNNING"))
        started = time.perf_counter()
        await asyncio.gather(
            *(worker(client, flow_id, RUNS_PER_WORKER, seed, tally, sample) for seed in range(WORKERS))
        )
        elapsed = time.perf_counter() - started

    decided = sum(tally.values())
    print(f"\n{WORKERS} workers drove {WORKERS * RUNS_PER_WORKER} task runs: {decided} set_state decisions"
          f" in {elapsed:.1f} s (request-reply, one at a time per worker)\n")
    print(f"{'status':8} {'returned state':16} count")
    for (status, name), count in sorted(tally.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"{status:8} {name or '-':16} {count}")

    if sample:
        store = LogReader(make_engine(settings.database_url))
        try:
            rows = await store.history(sample[0])
        finally:
            await store.engine.dispose()
        print(f"\nhistory of task run {sample[0]} (from the event log):")
        print(f"{'seq':>3}  {'event':18} {'status':7} {'state':28} source")
        for row in rows:
            shown = f"{row['state_type']}/{row['state_name']}" if row["state_type"] else "-"
            print(f"{row['seq']:>3}  {row['event_type']:18} {row['status']:7} {shown:28}"
                  f" {row['source_topic']}[{row['source_partition']}]@{row['source_offset']}")


if __name__ == "__main__":
    asyncio.run(main())
