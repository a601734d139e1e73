"""CPU per command of the consumer's decide path, in one process, without Kafka or PostgreSQL.

Drives the benchmark workload (tests/bench/workload.py: create_task_run PENDING -> RUNNING ->
COMPLETED, every fifth run RUNNING -> FAILED (AwaitingRetry) -> RUNNING -> COMPLETED) through
what the consumer does per batch (pipeline/service.py): Kafka-like records -> IncomingRecord ->
parse_record -> read_snapshot on the in-memory store -> decide_batch -> append and commit.
Each batch holds one command of each of `batch` runs in flight, as the closed-loop bench does.

    .venv/bin/python tests/bench/decide_profile.py                  # batches of 1000 and of 10
    .venv/bin/python tests/bench/decide_profile.py --batch 10 --commands 20000
    .venv/bin/python tests/bench/decide_profile.py --check          # digest of every output

Prints µs of CPU (process_time) per command, per phase. `parse` and `decide` are the consumer's
own work on every store; `snapshot` and `commit` are the in-memory store's (its reads validate
the run views from JSON, as the PostgreSQL store does from jsonb). The in-memory store's event
list is emptied after each batch so its scans stay the size of a batch.

`--decide-repeat R` decides each batch R - 1 more times (on a copy; not in the phases' times):
under `valgrind --tool=callgrind` the difference of two runs' instruction counts is the decide
phase's alone, which the machine's load does not move.

`--check` (with R = 1) fixes the clock, the ids and the commands and prints a SHA-256 over every row, hash,
result and state change: a change that keeps decisions bit for bit keeps the digest.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import random
import sys
import time
import uuid
from dataclasses import fields, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).parent))

from workload import CREATE, SET, lifecycle

from runstate.domain import OrchestrationSettings
from runstate.pipeline import ids as ids_module
from runstate.pipeline.batch import decide_batch
from runstate.pipeline.owned import OwnedRuns
from runstate.pipeline.ports import StoreSnapshot
from runstate.pipeline.records import IncomingRecord, parse_record
from runstate.pipeline.service import read_snapshot
from runstate.store.memory import InMemoryEventStore

TOPIC = "bench.commands"
PHASES = ("records", "parse", "snapshot", "decide", "commit", "learn")


class Workload:
    """Runs in flight, each yielding its next command's record value."""

    def __init__(self, in_flight: int, rng: random.Random) -> None:
        self.rng = rng
        self.started = 0
        self.runs = [self._new_run() for _ in range(in_flight)]

    def _uuid(self) -> uuid.UUID:
        return uuid.UUID(int=self.rng.getrandbits(128), version=4)

    def _new_run(self) -> list[tuple[str, bytes]]:
        n = self.started
        self.started += 1
        rid = str(self._uuid())
        commands = [CREATE.format(cid=self._uuid(), rid=rid, n=n)]
        commands += [SET.format(cid=self._uuid(), rid=rid, type=t, tid=self._uuid()) for t in lifecycle(n % 5 == 4)]
        return [(rid, c.encode()) for c in reversed(commands)]

    def batch(self) -> list[tuple[str, bytes]]:
        out = []
        for i, run in enumerate(self.runs):
            out.append(run.pop())
            if not run:
                self.runs[i] = self._new_run()
        return out


def clone(snapshot: StoreSnapshot) -> StoreSnapshot:
    """A snapshot a decision may change without changing this one (it changes the heads in place)."""
    copy = StoreSnapshot(**{f.name: dict(getattr(snapshot, f.name)) for f in fields(StoreSnapshot)})
    copy.task_runs = {k: replace(h) for k, h in snapshot.task_runs.items()}
    return copy


async def drive(batch: int, commands: int, check: bool, repeat: int = 1,
                owned_runs: int = 0) -> tuple[dict[str, float], int, str]:
    rng = random.Random(17)
    clock = None
    if check:
        # Fixed ids and clock: the outputs are then a function of the code alone.
        id_rng = random.Random(42)
        ids_module.os.urandom = id_rng.randbytes  # type: ignore[attr-defined]
        ticks = iter(range(10**9))
        start = datetime(2026, 1, 1, tzinfo=UTC)

        def clock() -> datetime:
            return start + timedelta(microseconds=7 * next(ticks))

    work = Workload(batch, rng)
    store = InMemoryEventStore()
    owned = OwnedRuns(owned_runs)
    settings = OrchestrationSettings()
    spent = dict.fromkeys(PHASES, 0.0)
    digest = hashlib.sha256()
    offset = done = 0
    now = datetime.now(UTC)
    while done < commands:
        raw = [SimpleNamespace(topic=TOPIC, partition=0, offset=offset + i, key=rid.encode(), value=value,
                               timestamp=None) for i, (rid, value) in enumerate(work.batch())]
        offset += len(raw)
        t0 = time.process_time()
        records = [IncomingRecord(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp) for r in raw]
        t1 = time.process_time()
        items = [parse_record(r, 1 << 20) for r in records]
        t2 = time.process_time()
        async with store.session() as session:
            parsed = [i for i in items if not hasattr(i, "error")]
            snapshot = owned.snapshot(items)  # None unless --owned-runs and every run is known
            read = None
            if snapshot is None:
                snapshot = await read_snapshot(session, parsed, TOPIC, now)  # type: ignore[arg-type]
                read = owned.read_seqs(snapshot)
            extra = time.process_time()
            for _ in range(repeat - 1):  # --decide-repeat: decided again, on a copy, dropped, not timed
                decide_batch(items, clone(snapshot), settings)
            t3 = time.process_time()
            extra = t3 - extra
            outcome = (decide_batch(items, snapshot, settings, clock=clock) if clock
                       else decide_batch(items, snapshot, settings))
            t4 = time.process_time()
            await session.append(outcome)
        t5 = time.process_time()
        owned.learn(items, outcome, read)
        t6 = time.process_time()
        store.tables.events.clear()  # keeps the store's scans at a batch's size
        for name, seconds in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2 - extra, t4 - t3, t5 - t4, t6 - t5), strict=True):
            spent[name] += seconds
        if check:
            for e in outcome.events:
                digest.update(f"{e.stream_id}|{e.seq}|{e.event_type}|{e.transition_id}|{e.status}|{e.state_type}|"
                              f"{e.state_name}|{e.state_id}\n".encode())
                for part in (e.payload, e.result_event, e.state_change or "-"):
                    digest.update(part.encode() + b"\n")
                digest.update(e.hash)
            for p in outcome.results + outcome.state_changes:
                digest.update((p.key or b"") + p.value.encode())
            for h in outcome.task_run_heads.values():
                digest.update((h.view_json or "").encode())
        bad = len(outcome.dead_letters)
        if bad:
            raise SystemExit(f"{bad} dead letters: {outcome.dead_letters[0].error}")
        done += len(raw)
    return spent, done, digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, action="append", help="batch size (repeatable); 1000 and 10")
    parser.add_argument("--commands", type=int, default=30_000, help="commands per batch size")
    parser.add_argument("--check", action="store_true", help="fixed inputs; print a digest of every output")
    parser.add_argument("--decide-repeat", type=int, default=1,
                        help="decide each batch this many times (the extra ones on a copy, not counted in the"
                             " phases): the difference of two runs' instruction counts is the decide phase's")
    parser.add_argument("--owned-runs", type=int, default=0,
                        help="decide from the runs this process wrote (RUNSTATE_OWNED_RUNS, as the bench's"
                             " consumer does) instead of reading the store for every batch")
    args = parser.parse_args(argv)
    # As the consumer does (pipeline/app.py): imports frozen, collections rare.
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    for size in args.batch or [1000, 10]:
        spent, done, digest = asyncio.run(drive(size, args.commands, args.check, args.decide_repeat,
                                                args.owned_runs))
        per = {k: v / done * 1e6 for k, v in spent.items()}
        consumer = per["records"] + per["parse"] + per["decide"] + per["learn"]
        if args.owned_runs:  # the snapshot is the owned runs' (memory), not the store's read
            consumer += per["snapshot"]
        print(f"batch={size} commands={done} us_per_command: consumer={consumer:.1f} "
              + " ".join(f"{k}={v:.1f}" for k, v in per.items())
              + f" store={per['snapshot'] + per['commit']:.1f}"
              + (f" digest={digest}" if args.check else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
