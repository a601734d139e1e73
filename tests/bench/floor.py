"""The floor: the least a Kafka -> PostgreSQL -> Kafka service can do per command.

A bare aiokafka consumer (same group protocol, same batch size and wait as runstate's) that
appends each batch of command records to a PostgreSQL table with one multi-row INSERT, commits,
publishes one result per record (acks=all, idempotent) and waits for the acks, then commits the
offsets: runstate's delivery contract, without parsing, validation, rules, snapshots or
projections. The result record carries the command id (found by a byte search) and the
command itself, so the driver matches it exactly as it matches runstate's results.

    python tests/bench/floor.py      # settings from the environment (FLOOR_*)

With FLOOR_VALIDATE=1 it also does what any service with runstate's contract must do for each
command whatever its rules: parse and validate the record as runstate does (`parse_record`: the
strict I-JSON parse, the pydantic model, the key check) and publish a second message (the state
change, to FLOOR_CHANGE_TOPIC). Its CPU per command is a lower bound for runstate's consumer on the
design card's libraries (issue #17).
"""

from __future__ import annotations

import asyncio
import os
import signal

import psycopg
import uvloop
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

MARK = b'"command_id":"'

INSERT = (
    "INSERT INTO {table} (stream_key, source_partition, source_offset, payload)"
    " SELECT k, p, o, CAST(v AS json) FROM unnest(CAST(%(k)b AS text[]), CAST(%(p)b AS integer[]),"
    " CAST(%(o)b AS bigint[]), CAST(%(v)b AS text[])) AS x(k, p, o, v)"
)


async def main() -> None:
    bootstrap = os.environ["FLOOR_BOOTSTRAP"]
    table = os.environ.get("FLOOR_TABLE", "floor_events")
    max_batch = int(os.environ.get("FLOOR_MAX_BATCH", "1000"))
    timeout_ms = int(os.environ.get("FLOOR_BATCH_TIMEOUT_MS", "5"))
    result_topic = os.environ["FLOOR_RESULT_TOPIC"]
    consumer = AIOKafkaConsumer(
        os.environ["FLOOR_COMMAND_TOPIC"],
        bootstrap_servers=bootstrap,
        group_id=os.environ["FLOOR_GROUP"],
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=int(os.environ.get("FLOOR_FETCH_MAX_WAIT_MS", "500")),  # aiokafka's default
        client_id="bench-floor",
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, linger_ms=2,
                                max_batch_size=256 * 1024, client_id="bench-floor")
    db = await psycopg.AsyncConnection.connect(os.environ["FLOOR_DSN"])
    await consumer.start()
    await producer.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sql = INSERT.format(table=table)
    no_db = os.environ.get("FLOOR_NO_DB") == "1"  # Kafka alone: for locating latency
    validate = os.environ.get("FLOOR_VALIDATE") == "1"
    if validate:
        from runstate.pipeline.records import IncomingRecord, ParsedCommand, parse_record
    change_topic = os.environ.get("FLOOR_CHANGE_TOPIC")
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=timeout_ms, max_records=max_batch)
            records = [r for recs in batches.values() for r in recs]
            if not records:
                continue
            if validate:
                parsed = [parse_record(IncomingRecord(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp),
                                       1 << 20) for r in records]
                bad = sum(not isinstance(p, ParsedCommand) for p in parsed)
                if bad:
                    raise SystemExit(f"{bad} records of the workload did not parse")
            if not no_db:
                async with db.cursor() as cur:
                    await cur.execute(sql, {
                        "k": [r.key.decode() if r.key else None for r in records],
                        "p": [r.partition for r in records],
                        "o": [r.offset for r in records],
                        "v": [r.value.decode() for r in records],
                    }, prepare=False)
                await db.commit()
            send = producer.send
            futures = []
            for r in records:
                v = r.value
                i = v.find(MARK) + len(MARK)
                out = b'{"command_id":"' + v[i:i + 36] + b'","status":"ACCEPT","command":' + v + b"}"
                futures.append(await send(result_topic, out, key=r.key))
                if validate and change_topic:
                    futures.append(await send(change_topic, out, key=r.key))
            await asyncio.gather(*futures)
            await consumer.commit()
    finally:
        await consumer.stop()
        await producer.stop()
        await db.close()


if __name__ == "__main__":
    uvloop.run(main())  # the same event loop as `runstate serve`
