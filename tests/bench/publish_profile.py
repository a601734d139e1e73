"""The consumer's publish alone: process CPU per command of `KafkaPublisher.publish` on the local
stack's Kafka (`make up`), for batches shaped like the benchmark's (one result and one state
change per command, ~1 kB and ~0.6 kB, keyed by run id, 12 partitions).

    .venv/bin/python tests/bench/publish_profile.py --commands 1000 --rounds 30   # in the checkout that ran `make up`

Run two versions by putting each one's `services` first on PYTHONPATH, alternately. Not for
CI: a measurement, printed as one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import uuid
from pathlib import Path

from runstate.config import Settings
from runstate.envfile import read_env_file
from runstate.pipeline.kafka import KafkaPublisher, ensure_topics
from runstate.pipeline.ports import BatchOutcome, Publication


def outcome(commands: int) -> BatchOutcome:
    out = BatchOutcome()
    for _ in range(commands):
        key = str(uuid.uuid4()).encode()
        out.results.append(Publication(key, json.dumps({"status": "ACCEPT", "pad": "x" * 950})))
        out.state_changes.append(Publication(key, json.dumps({"to_state": "RUNNING", "pad": "y" * 550})))
    return out


async def run(commands: int, rounds: int) -> dict:
    # Run from the checkout whose stack is up (.runstate is that checkout's).
    for name, value in {**read_env_file(Path.cwd() / ".runstate" / "env"),
                        **read_env_file(Path.cwd() / ".runstate" / "service.env")}.items():
        os.environ.setdefault(name, value)
    token = uuid.uuid4().hex[:8]
    settings = Settings.load().replace(
        command_topic=f"pub{token}.commands", result_topic=f"pub{token}.results",
        state_change_topic=f"pub{token}.state-changes", dead_letter_topic=f"pub{token}.dead-letter",
        partitions=12)
    limits = await ensure_topics(settings)
    publisher = KafkaPublisher(settings, limits)
    await publisher.start()
    try:
        await publisher.publish(outcome(commands))  # metadata and connections warmed
        cpu = []
        for _ in range(rounds):
            batch = outcome(commands)
            began = time.process_time()
            await publisher.publish(batch)
            cpu.append((time.process_time() - began) / commands * 1e6)
    finally:
        await publisher.stop()
    return {"commands": commands, "rounds": rounds, "cpu_us_per_command_median": round(statistics.median(cpu), 1),
            "cpu_us_per_command_min": round(min(cpu), 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--commands", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=30)
    a = p.parse_args()
    print(json.dumps(asyncio.run(run(a.commands, a.rounds))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
