"""Bad-input fuzzer: hypothesis generates malformed commands of every kind;
they are sent interleaved with the valid commands of a workload (some into the
very partitions, even right between the commands, of valid runs), plus bursts
larger than a whole consumer batch. Every bad one must land in the dead-letter
topic with its original bytes and its error headers, be answered with an error
result, and write no event; every valid one must still be decided exactly as
the fault-free reference decides it."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, replace

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from pipeline.harness import InProcessService, isolated_settings
from runstate.client import state
from runstate.messages import (
    OrchestrationResultEvent,
    SetStateCommand,
    StateChangeEvent,
)
from runstate.pipeline.kafka import ensure_topics
from runstate.pipeline.records import BadRecord, IncomingRecord, parse_record

from .checker import check, read_log
from .driver import ResultReader, Sent, make_producer, read_all
from .workload import generate, reference

pytestmark = [pytest.mark.faults, pytest.mark.kafka, pytest.mark.postgres]

MAX_BYTES = 2048
STATE_TYPES = ["SCHEDULED", "PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "CRASHED", "PAUSED",
               "CANCELLING"]


@dataclass
class Bad:
    category: str
    key: bytes | None
    value: bytes
    expected_code: str
    command_id: uuid.UUID | None = None  # set when the record parses (unknown_run)


def _valid_doc(run_id: uuid.UUID, rng_type: str) -> dict:
    return json.loads(SetStateCommand(command_id=uuid.uuid4(), task_run_id=run_id,
                                      state=state(rng_type, transition_id=uuid.uuid4())).model_dump_json())


uuids = st.uuids(version=4)
junk_values = st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.none(),
                        st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
bad_ids = st.one_of(st.text(max_size=40).filter(lambda s: not _is_uuid(s)), st.integers(), st.just(""),
                    st.just("00000000-0000-0000-0000-00000000000g"))


def _is_uuid(s: str) -> bool:
    try:
        uuid.UUID(s)
        return True
    except (ValueError, AttributeError, TypeError):
        return False


@st.composite
def bad_inputs(draw, run_keys: list[bytes]) -> Bad:
    kind = draw(st.sampled_from(["garbage", "truncated", "wrong_type", "unknown_enum", "unknown_kind",
                                 "missing_id", "malformed_id", "oversized", "unknown_run", "other_message",
                                 "extra_field", "not_an_object", "empty"]))
    key = draw(st.one_of(st.sampled_from(run_keys), st.none(), st.binary(max_size=20),
                         uuids.map(lambda u: str(u).encode())))
    some_run = uuid.UUID(draw(st.sampled_from(run_keys)).decode())
    doc = _valid_doc(some_run, draw(st.sampled_from(STATE_TYPES)))
    code = "invalid_command"
    command_id = None
    if kind == "garbage":
        value = draw(st.binary(min_size=1, max_size=400))
    elif kind == "truncated":
        raw = json.dumps(doc)
        value = raw[: draw(st.integers(0, len(raw) - 1))].encode()
    elif kind == "wrong_type":
        path = draw(st.sampled_from([("task_run_id",), ("state",), ("force",), ("command_id",),
                                     ("state", "type"), ("state", "state_details"), ("state", "name"),
                                     ("state", "state_details", "transition_id"),
                                     ("state", "state_details", "scheduled_time"), ("kind",)]))
        target = doc
        for p in path[:-1]:
            target = target[p]
        target[path[-1]] = draw(junk_values)
        value = json.dumps(doc).encode()
    elif kind == "unknown_enum":
        doc["state"]["type"] = draw(st.text(min_size=1, max_size=20).filter(lambda s: s not in STATE_TYPES))
        value = json.dumps(doc).encode()
    elif kind == "unknown_kind":
        doc["kind"] = draw(st.text(max_size=30).filter(lambda s: s not in (
            "create_task_run", "set_task_run_state", "create_flow_run", "set_flow_run_state")))
        value = json.dumps(doc).encode()
    elif kind == "missing_id":
        doc.pop("task_run_id")
        value = json.dumps(doc).encode()
    elif kind == "malformed_id":
        doc[draw(st.sampled_from(["task_run_id", "command_id"]))] = draw(bad_ids)
        value = json.dumps(doc).encode()
    elif kind == "oversized":
        doc["state"]["message"] = "x" * draw(st.integers(MAX_BYTES, MAX_BYTES * 40))
        value = json.dumps(doc).encode()
        code = "too_large"
    elif kind == "unknown_run":
        unknown = draw(uuids)
        doc["task_run_id"] = str(unknown)
        if draw(st.booleans()):
            doc.pop("command_id")
        value = json.dumps(doc).encode()
        code = "unknown_run"
    elif kind == "other_message":
        if draw(st.booleans()):
            value = OrchestrationResultEvent(command_id=draw(uuids), command_kind="set_task_run_state",
                                             stream_id=some_run, seq=draw(st.integers(1, 9))).model_dump_json().encode()
        else:
            value = StateChangeEvent(task_run_id=some_run, flow_run_id=None, seq=1, from_state=None,
                                     to_state=json.loads(json.dumps({
                                         "id": str(draw(uuids)), "type": "RUNNING", "name": "Running",
                                         "timestamp": "2024-01-01T00:00:00Z"})),
                                     status="ACCEPT", transition_id=None,
                                     timestamp="2024-01-01T00:00:00Z").model_dump_json().encode()
    elif kind == "extra_field":
        doc[draw(st.text(min_size=1, max_size=10).filter(lambda s: s not in doc))] = draw(junk_values)
        value = json.dumps(doc).encode()
    elif kind == "not_an_object":
        value = json.dumps(draw(st.one_of(junk_values, st.text(max_size=30), st.lists(st.text(max_size=5))))).encode()
    else:
        value = b""
    record = IncomingRecord("fuzz", 0, 0, key, value)
    parsed = parse_record(record, MAX_BYTES)
    if code == "unknown_run":
        assert not isinstance(parsed, BadRecord), parsed
        command_id = parsed.command_id if doc.get("command_id") else None
    else:
        # The generator must only make bad inputs; a mutation that happens to
        # stay valid (say, an extra field spelt like a real one) is dropped.
        from hypothesis import assume

        assume(isinstance(parsed, BadRecord))
        if code != "too_large" and len(value) > MAX_BYTES:
            code = "too_large"
    return Bad(kind, key, value, code, command_id)


def draw_bad_inputs(n: int, run_keys: list[bytes], base_seed: int) -> list[Bad]:
    out: list[Bad] = []
    round_ = 0
    while len(out) < n:
        @seed(base_seed + round_)
        @settings(max_examples=max(10, (n - len(out)) // 8 + 10), database=None, deadline=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(st.lists(bad_inputs(run_keys), min_size=1, max_size=16))
        def collect(batch: list[Bad]) -> None:
            out.extend(batch)

        collect()
        round_ += 1
    return out[:n]


async def test_bad_inputs_are_dead_lettered_and_valid_ones_still_decided(base_settings, scale, publish_report):
    t0 = time.monotonic()
    for name in ("faststream", "faststream.access", "faststream.access.kafka", "aiokafka"):
        logging.getLogger(name).setLevel(logging.WARNING)
    cfg = isolated_settings(base_settings, partitions=4, max_command_bytes=MAX_BYTES)
    workload = generate(scale.seed + 1, scale.pick(1500, 6000), duplicate_rate=0.02)
    ref = reference(workload)
    run_keys = [r.stream_id.hex and str(r.stream_id).encode() for r in workload.runs if r.kind != "flow"]
    n_bad = scale.fuzzed
    burst = scale.pick(1200, 2500)  # one key: more bad records in a row than a consumer batch holds
    bad = draw_bad_inputs(n_bad - burst, run_keys, scale.seed)
    burst_key = str(uuid.uuid4()).encode()
    bad += [replace(b, key=burst_key) for b in draw_bad_inputs(burst, run_keys, scale.seed + 1000)]
    generated = Counter(b.category for b in bad)

    await ensure_topics(cfg)
    from .test_scenarios import seed_tags

    seed_tags(cfg, workload)
    rng = random.Random(scale.seed)
    valid_lanes = [[c for r in workload.phase(p) for c in r.commands] for p in (1, 2)]
    sent = Sent()
    located: list[tuple[Bad, int, int]] = []
    producer = await make_producer(cfg)
    reader = await ResultReader(cfg).start()
    try:
        async with InProcessService(cfg) as service:
            plain, bursty = bad[: len(bad) - burst], bad[len(bad) - burst:]
            for phase, valid in enumerate(valid_lanes, start=1):
                share = plain[: len(plain) // 2] if phase == 1 else plain[len(plain) // 2:]
                mixed: list = list(valid)
                for b in share:  # bad ones at random places, valid ones in their order
                    mixed.insert(rng.randrange(len(mixed) + 1), b)
                if phase == 1:
                    mixed[len(mixed) // 2: len(mixed) // 2] = bursty
                futures = []
                for item in mixed:
                    if isinstance(item, Bad):
                        futures.append((item, await producer.send(cfg.command_topic, item.value, key=item.key)))
                    else:
                        sent.commands.append(item)
                        futures.append((None, await producer.send(cfg.command_topic, item.value(), key=item.key)))
                for item, fut in futures:
                    meta = await fut
                    if item is not None:
                        located.append((item, meta.partition, meta.offset))
                await reader.wait_all(sent.commands, scale.pick(240, 900))
            # every bad record dead-lettered
            deadline = time.monotonic() + scale.pick(120, 600)
            while service.stats.dead_lettered < len(bad) and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
    finally:
        await producer.stop()
        await reader.stop()

    report = await check("fuzz", cfg, sent.commands, ref, tags=list(workload.tag_limits))
    dead = await read_all(cfg, cfg.dead_letter_topic)
    results = await read_all(cfg, cfg.result_topic)
    log = read_log(cfg)
    by_source = {}
    for d in dead:
        h = {k: v.decode() for k, v in d.headers}
        by_source[(int(h["x-source-partition"]), int(h["x-source-offset"]))] = (d, h)
    logged_sources = {(r["source_partition"], r["source_offset"]) for r in log}
    error_results = {}
    for r in results:
        doc = json.loads(r.value)
        if doc.get("error"):
            error_results[doc["command_id"]] = doc["error"]["code"]
    problems: list[str] = []
    codes = Counter()
    for b, part, off in located:
        got = by_source.get((part, off))
        where = f"{b.category} at {part}/{off} ({b.value[:60]!r})"
        if got is None:
            problems.append(f"not dead-lettered: {where}")
            continue
        d, h = got
        codes[h.get("x-error-code")] += 1
        if (d.value or b"") != b.value or d.key != b.key:
            problems.append(f"dead letter differs from the original: {where}")
        if h.get("x-error-code") != b.expected_code or not h.get("x-error") or h.get("x-source-topic") != cfg.command_topic:
            problems.append(f"headers {h.get('x-error-code')}/{h.get('x-error', '')[:80]} (expected {b.expected_code}): {where}")
        if (part, off) in logged_sources:
            problems.append(f"an event was written for {where}")
        answered_as = str(b.command_id or IncomingRecord(cfg.command_topic, part, off, None, None).derived_id())
        if error_results.get(answered_as) != b.expected_code:
            problems.append(f"no error result {b.expected_code} for {where}")
    extra_dead = len(dead) - len(located)
    if extra_dead:
        problems.append(f"{extra_dead} dead letters for records that were not bad")
    report.seconds = time.monotonic() - t0
    report.fault_detail = "bad inputs: " + ", ".join(f"{k}={v}" for k, v in sorted(generated.items()))
    report.problems = problems[:20] + report.problems
    publish_report(report)
    extra = {"fuzzed": len(located), "fuzz_problems": len(problems), "codes": dict(codes)}
    print(f"[fuzz] fuzzed={len(located)} dead_lettered={len(dead)} codes={dict(codes)} problems={len(problems)}")
    import os
    from pathlib import Path

    if os.environ.get("RUNSTATE_FAULTS_REPORT"):
        with Path(os.environ["RUNSTATE_FAULTS_REPORT"]).open("a") as out:  # noqa: ASYNC230 - one line, once
            out.write(json.dumps({"scenario": "fuzz-inputs", **extra}) + "\n")
    assert not problems, "\n".join(problems[:30])
    assert report.ok, "\n".join([report.line(), *report.problems])
    assert len(located) >= n_bad
