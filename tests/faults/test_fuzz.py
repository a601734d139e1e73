"""The structure-aware fuzzer (fuzzgen.py) through the real pipeline.

Generated records (valid commands of the schema, mutated in depth, size,
numbers, datetimes, unicode, duplicate keys, field types, record keys, headers;
tombstones, garbage) are sent interleaved with the valid commands of a
workload, into the same partitions, to two real consumer processes. Invariants:

* every valid command of the workload is answered and decided as the
  fault-free reference decides it (checker.py);
* no answer is `orchestration_failed` (internal_errors), no consumer dies;
* every generated record is decided (an event) or answered with an error
  (a dead letter with its original bytes, except `already_exists`), never
  both: no event for a refused record;
* the consumer group's lag drains to 0 on every partition (no record stalls
  a partition);
* `runstate replay --verify --all` passes afterwards;
* a sample of scripts is sent again for other runs (twins), one record per
  batch: each twin record is decided exactly as its original was, in a batch
  with its neighbours (batch boundaries do not change decisions).

RUNSTATE_FUZZ_EXCLUDE (comma-separated mutation names, e.g. `headers,depth_data`)
leaves out the records of those mutations: a debugging aid, to see past a
known failure.

The exact error code of a generated record is not asserted: where the pipeline
may refuse or accept (a NaN, say), either is right, as long as it is the same
whatever the batch boundaries.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline.harness import isolated_settings
from runstate.domain import OrchestrationSettings
from runstate.pipeline.batch import decide_batch
from runstate.pipeline.kafka import ensure_topics
from runstate.pipeline.ports import StoreSnapshot
from runstate.pipeline.records import IncomingRecord, parse_record

from .checker import check, read_log
from .driver import Fleet, GroupWatch, ResultReader, Sent, make_producer, read_all, replay_verify, wait_answered
from .fuzzgen import FuzzPlan, FuzzRecord, Raw, to_json
from .workload import generate, reference

pytestmark = [pytest.mark.faults, pytest.mark.kafka, pytest.mark.postgres]

MAX_BYTES = 16384
CONSUMERS = 2


def _quiet() -> None:
    for name in ("faststream", "faststream.access", "faststream.access.kafka", "aiokafka"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _repro(rec: FuzzRecord | None, limit: int = 240) -> str:
    if rec is None:
        return "<not a generated record>"
    value = rec.value if rec.value is None else rec.value[:limit]
    return f"{rec.category} key={rec.key[:60] if rec.key else rec.key!r} value={value!r}"


@dataclass
class Seen:
    """What the pipeline did with the records of the command topic."""

    events: dict[tuple[int, int], dict]
    dead: dict[tuple[int, int], tuple[Any, dict[str, str]]]
    answers: dict[str, dict]  # command id -> first answer
    results: list[dict]

    def outcome(self, part: int, off: int, command_id: uuid.UUID | None) -> tuple:
        """A record's outcome, without ids and clocks: comparable between twins."""
        event = self.events.get((part, off))
        dead = self.dead.get((part, off))
        if event is not None and dead is not None:
            return ("event+dead", event["event_type"], dead[1].get("x-error-code"))
        if event is not None:
            return ("event", event["event_type"], event["status"], event["state_type"], event["state_name"])
        if dead is not None:
            return ("dead", dead[1].get("x-error-code"))
        answer = self.answers.get(str(command_id)) if command_id else None
        if answer is not None:
            if answer.get("error"):
                return ("error", answer["error"]["code"])
            return ("answer", answer.get("status"), answer.get("state_appended"))
        return ("none",)


async def _seen(cfg) -> Seen:
    log = read_log(cfg)
    dead = await read_all(cfg, cfg.dead_letter_topic)
    results = [json.loads(r.value) for r in await read_all(cfg, cfg.result_topic)]
    by_dead = {}
    for d in dead:
        h = {k: v.decode(errors="replace") for k, v in d.headers}
        by_dead[(int(h.get("x-source-partition", -1)), int(h.get("x-source-offset", -1)))] = (d, h)
    answers: dict[str, dict] = {}
    for doc in results:
        answers.setdefault(doc["command_id"], doc)
    return Seen({(r["source_partition"], r["source_offset"]): r for r in log}, by_dead, answers, results)


async def _send_all(producer, topic: str, items: list) -> list[tuple[Any, int, int]]:
    """Send (item, key, value, headers) in order; (item, partition, offset) of each."""
    futures = []
    for item, key, value, headers in items:
        futures.append((item, await producer.send(topic, value, key=key, headers=headers or None)))
    located = []
    for item, fut in futures:
        meta = await fut
        located.append((item, meta.partition, meta.offset))
    return located


def _merge(rng: random.Random, units: list[tuple[list, bool]]) -> list:
    """One sequence of many: each unit keeps its own order; a contiguous unit
    stays together (its records then likely share a batch)."""
    keyed = []
    for n, (unit, contiguous) in enumerate(units):
        if contiguous:
            at = rng.random()
            keyed += [((at, n, i), x) for i, x in enumerate(unit)]
        else:
            for i, (at, x) in enumerate(zip(sorted(rng.random() for _ in unit), unit, strict=False)):
                keyed.append(((at, n, i), x))
    keyed.sort(key=lambda kx: kx[0])
    return [x for _, x in keyed]


def _stall_hint(cfg, part: int, at: int, fuzz_at: dict, logdir: Path) -> str:
    """The first generated record from the stalled offset on that the pure
    core cannot take (the likely culprit), and the consumers' last error."""
    hint = "no generated record there raises in-process"
    for off in sorted(o for p, o in fuzz_at if p == part and o >= at):
        rec = fuzz_at[(part, off)]
        try:
            decide_batch([parse_record(IncomingRecord(cfg.command_topic, part, off, rec.key, rec.value),
                                       cfg.max_command_bytes)], StoreSnapshot(), OrchestrationSettings())
        except Exception as exc:  # noqa: BLE001 - the hint itself
            hint = f"likely culprit at {off}: {type(exc).__name__}: {str(exc)[:80]}: {_repro(rec)}"
            break
    errors = [line for log in sorted(logdir.glob("consumer*.log"))
              for line in log.read_text(errors="replace").splitlines() if "Error: " in line and not line.startswith(" ")]
    return hint + (f"; consumers' last error: {errors[-1][:200]}" if errors else "")


# --------------------------------------------------------------------------- the fuzzer


async def test_structure_aware_fuzzer(scratch_settings, scale, tmp_path, publish_report):
    t0 = time.monotonic()
    _quiet()
    cfg = isolated_settings(scratch_settings, partitions=4, max_command_bytes=MAX_BYTES, max_batch=500)
    workload = generate(scale.seed + 1, scale.pick(1500, 6000), duplicate_rate=0.02)
    ref = reference(workload)
    workload_keys = [str(r.stream_id).encode() for r in workload.runs]
    n_generated = scale.fuzzed
    plan = FuzzPlan(scale.seed, n_generated, max_bytes=MAX_BYTES, workload_keys=workload_keys,
                    twins=scale.pick(40, 300))
    excluded = {x.strip() for x in os.environ.get("RUNSTATE_FUZZ_EXCLUDE", "").split(",") if x.strip()}
    if excluded:
        plan.exclude(excluded)
    generated = Counter(c for r in plan.records for c in r.category.split("+"))
    twin_originals = {t.twin_of for t in plan.twins}
    print(f"[fuzz] generated {len(plan.records)} records ({len(plan.scripts)} scripts, {len(plan.loose)} loose, "
          f"{len(plan.twins)} twins) in {time.monotonic() - t0:.1f} s")

    await ensure_topics(cfg)
    from .test_scenarios import seed_tags

    seed_tags(cfg, workload)
    rng = random.Random(scale.seed)
    # Scripts and loose records split between the two phases of the workload.
    units: list[tuple[list, bool]] = [([r for r in s.records], s.index in twin_originals) for s in plan.scripts]
    units += [([r], False) for r in plan.loose]
    rng.shuffle(units)
    halves = [units[: len(units) // 2], units[len(units) // 2:]]

    sent = Sent()
    located: list[tuple[Any, int, int]] = []
    problems: list[str] = []
    stalled: dict[int, int] = {}
    env = {"RUNSTATE_MAX_COMMAND_BYTES": str(MAX_BYTES)}
    fleet = Fleet(cfg, tmp_path, CONSUMERS, plan=lambda slot, inc: env)
    producer = await make_producer(cfg)
    reader = await ResultReader(cfg).start()
    watch = await GroupWatch(cfg).start()
    stop_follow = asyncio.Event()
    twin_located: list[tuple[FuzzRecord, int, int]] = []
    try:
        fleet.start_all()
        for phase in (1, 2):
            valid = [c for c in workload.interleaved(phase, 1, random.Random(scale.seed + phase))[0]]
            seq = _merge(rng, [(valid, False)] + halves[phase - 1])
            items = [(x, x.key, x.value, x.headers) if isinstance(x, FuzzRecord) else (x, x.key, x.value(), None)
                     for x in seq]
            sent.commands += valid
            located += await _send_all(producer, cfg.command_topic, items)
            stall = await wait_answered(reader, watch, valid, scale.pick(300, 1500), tick=fleet.check, stalled_for=60)
            if stall:
                problems.append(f"phase {phase}: {stall}")
                break
        stalled = await watch.drained(scale.pick(300, 1800), stalled_for=scale.pick(60, 120))
        if not stalled and not problems:
            # The twins: one record per batch, each sent once the group has committed the previous one.
            follow = asyncio.create_task(watch.follow(stop_follow))

            async def one_by_one(script) -> None:
                for rec in script.records:
                    (loc,) = await _send_all(producer, cfg.command_topic, [(rec, rec.key, rec.value, rec.headers)])
                    twin_located.append(loc)
                    if not await watch.processed(loc[1], loc[2], 120):
                        problems.append(f"twin record never processed: {_repro(rec)}")
                        return

            await asyncio.gather(*(one_by_one(t) for t in plan.twins))
            stop_follow.set()
            await follow
            stalled = await watch.drained(180, stalled_for=60)  # a loaded machine can pause a commit for long
        fleet.check()
    finally:
        stop_follow.set()
        fleet.stop_all()
        await producer.stop()
        await reader.stop()
        try:
            lag_after = await watch.lag()
        finally:
            await watch.stop()

    # -- what became of each record ------------------------------------------------
    seen = await _seen(cfg)
    fuzz_at = {(p, o): x for x, p, o in located if isinstance(x, FuzzRecord)}
    valid_at = {(p, o): x for x, p, o in located if not isinstance(x, FuzzRecord)}
    for part, behind in sorted(stalled.items()):
        at = watch.committed.get(part, 0)
        problems.append(f"partition {part} stalled with lag {behind} at offset {at}; "
                        f"{_stall_hint(cfg, part, at, fuzz_at, tmp_path)}")
    outcomes: Counter = Counter()
    unverified = 0
    for (part, off), rec in fuzz_at.items():
        got = seen.outcome(part, off, rec.command_id)
        outcomes[got[0] if got[0] != "dead" else f"dead:{got[1]}"] += 1
        where = f"{part}/{off} {_repro(rec)}"
        if got[0] == "event+dead":
            h = seen.dead[(part, off)][1]
            ev = seen.events[(part, off)]
            problems.append(f"an event ({ev['event_type']} {ev['status']} seq {ev['seq']}) was written for a record "
                            f"also dead-lettered ({h.get('x-error-code')}: {h.get('x-error', '')[:160]}): {where}")
        elif got[0] == "none":
            if rec.command_id is not None:
                problems.append(f"no event, no dead letter and no answer: {where}")
            else:
                unverified += 1  # answered under an id the record does not carry, e.g. already_exists
        elif got[0] == "dead":
            d, h = seen.dead[(part, off)]
            if (d.value or b"") != (rec.value or b"") or d.key != rec.key:
                problems.append(f"dead letter differs from the original: {where}")
            if not h.get("x-error") or h.get("x-source-topic") != cfg.command_topic:
                problems.append(f"dead letter headers {h}: {where}")
            answer = seen.answers.get(str(rec.command_id)) if rec.command_id else None
            if answer is not None and not answer.get("error") and rec.command_id:
                problems.append(f"dead-lettered, yet answered without an error: {where}")
    for (part, off), cmd in valid_at.items():
        if (part, off) in seen.dead:
            problems.append(f"valid command {cmd.command_id} dead-lettered: {seen.dead[(part, off)][1]}")
    internal = [doc for doc in seen.results if (doc.get("error") or {}).get("code") == "orchestration_failed"]
    for doc in internal[:10]:
        problems.append(f"internal error: {doc['error']['message'][:200]}")
    deaths = len(fleet.deaths)
    if deaths:
        problems.append(f"{deaths} consumer process exits: {[(s, c) for s, c, _ in fleet.deaths][:5]}")

    # -- twins: one record per batch, the same decisions -----------------------------
    originals = {s.index: s for s in plan.scripts}
    where_orig = {id(x): (p, o) for x, p, o in located}
    twin_pos = {id(r): (p, o) for r, p, o in twin_located}
    twin_diffs = 0
    for twin in plan.twins:
        orig = originals[twin.twin_of]
        for a, b in zip(orig.records, twin.records, strict=False):
            if id(b) not in twin_pos:
                break
            got_a = seen.outcome(*where_orig[id(a)], a.command_id)
            got_b = seen.outcome(*twin_pos[id(b)], b.command_id)
            if got_a != got_b:
                twin_diffs += 1
                problems.append(f"decided differently by batch boundaries: in a batch {got_a}, alone {got_b}: "
                                f"{_repro(a)}")
                break

    # -- the workload, the log, replay --------------------------------------------------
    report = await check("fuzz", cfg, sent.commands, ref, tags=list(workload.tag_limits), others=True)
    report.internal_errors = max(report.internal_errors, len(internal))
    status, tail = await asyncio.to_thread(replay_verify, cfg)
    if status != 0:
        problems.append(f"runstate replay --verify --all exited {status}: {tail}")
    report.seconds = time.monotonic() - t0
    report.fault_detail = (f"generated={len(fuzz_at)} twins={len(twin_located)} outcomes={dict(outcomes)} "
                           f"unverified={unverified} stalled_partitions={len(stalled)} lag_after={lag_after}")
    report.problems = problems[:25] + report.problems
    publish_report(report)
    print(f"[fuzz] generated={len(fuzz_at)} mutations={dict(generated.most_common())}")
    extra = {"fuzzed": len(fuzz_at) + len(twin_located), "fuzz_problems": len(problems),
             "internal_errors": report.internal_errors, "stalled_partitions": len(stalled),
             "twin_differences": twin_diffs, "codes": dict(outcomes), "seconds": round(report.seconds, 1)}
    print(f"[fuzz] {extra}")
    if os.environ.get("RUNSTATE_FAULTS_REPORT"):
        with Path(os.environ["RUNSTATE_FAULTS_REPORT"]).open("a") as out:  # noqa: ASYNC230 - one line, once
            out.write(json.dumps({"scenario": "fuzz-inputs", **extra}) + "\n")
    assert not problems, "\n".join(problems[:30])
    assert report.ok, "\n".join([report.line(), *report.problems])
    assert len(fuzz_at) >= n_generated or excluded
    assert sum(outcomes.values()) == len(fuzz_at)


# --------------------------------------------------------------------------- batch boundaries, explicitly


def _boundary_cases(salt: str) -> dict[str, list[tuple[bytes, bytes]]]:
    """Per case, a run's records: a create and proposals whose decision once
    depended on whether they shared a batch (a NaN COMPLETED then RUNNING)."""
    cases: dict[str, list[tuple[bytes, bytes]]] = {}

    def add(name: str, policy: Any, steps: list[tuple[str, Any]]) -> None:
        run = uuid.uuid5(uuid.NAMESPACE_URL, f"{salt}/{name}")
        key = str(run).encode()
        create = {"kind": "create_task_run", "command_id": str(uuid.uuid4()), "id": str(run)}
        if policy is not None:
            create["empirical_policy"] = policy
        records = [(key, to_json(create).encode())]
        for type_, data in steps:
            state: dict[str, Any] = {"type": type_, "state_details": {"transition_id": str(uuid.uuid4())}}
            if data is not None:
                state["data"] = data
            records.append((key, to_json({"kind": "set_task_run_state", "command_id": str(uuid.uuid4()),
                                          "task_run_id": str(run), "state": state}).encode()))
        cases[name] = records

    for token in ("NaN", "Infinity", "-Infinity", "1e400", "-1e400"):
        add(f"{token} COMPLETED then RUNNING", None, [("RUNNING", None), ("COMPLETED", Raw(token)), ("RUNNING", None)])
        add(f"{token} in a list, FAILED then RUNNING", None,
            [("RUNNING", None), ("FAILED", [Raw(token)]), ("RUNNING", None)])
        add(f"{token} retry_delay", {"retries": 2, "retry_delay": Raw(token)},
            [("RUNNING", None), ("FAILED", None), ("PENDING", None), ("RUNNING", None)])
        add(f"{token} jitter", {"retries": 2, "retry_delay": 3600, "retry_jitter_factor": Raw(token)},
            [("RUNNING", None), ("FAILED", None), ("RUNNING", None)])
    add("retry_delay 1e12", {"retries": 2, "retry_delay": 1e12},
        [("RUNNING", None), ("FAILED", None), ("PENDING", None), ("RUNNING", None)])
    add("retries 2**63", {"retries": 2**63, "retry_delay": 0}, [("RUNNING", None), ("FAILED", None), ("RUNNING", None)])
    add("jitter 1e300", {"retries": 1, "retry_delay": 3600, "retry_jitter_factor": 1e300},
        [("RUNNING", None), ("FAILED", None), ("RUNNING", None)])
    return cases


async def test_decisions_do_not_depend_on_batch_boundaries(scratch_settings, tmp_path):
    """Each case's records once all in one batch (sent before the consumer
    starts), and once for another run one record per batch: the same answers."""
    _quiet()
    cfg = isolated_settings(scratch_settings, partitions=1)
    together, alone = _boundary_cases("together-" + cfg.consumer_group), _boundary_cases("alone-" + cfg.consumer_group)
    await ensure_topics(cfg)
    producer = await make_producer(cfg)
    watch = await GroupWatch(cfg).start()
    fleet = Fleet(cfg, tmp_path, 1)
    stop = asyncio.Event()
    problems: list[str] = []
    try:
        flat = [((name, i), k, v, None) for name, recs in together.items() for i, (k, v) in enumerate(recs)]
        loc_together = {at: (p, o) for at, p, o in await _send_all(producer, cfg.command_topic, flat)}
        fleet.start_all()
        if await watch.drained(180, stalled_for=60):
            problems.append("the batch of all cases was never committed (a stalled partition)")
        follow = asyncio.create_task(watch.follow(stop))
        loc_alone = {}
        for name, recs in alone.items():
            for i, (k, v) in enumerate(recs):
                ((_, p, o),) = await _send_all(producer, cfg.command_topic, [(None, k, v, None)])
                loc_alone[(name, i)] = (p, o)
                if not await watch.processed(p, o, 120):
                    problems.append(f"{name}: record {i} alone never processed")
                    break
        stop.set()
        await follow
        fleet.check()
    finally:
        stop.set()
        fleet.stop_all()
        await producer.stop()
        await watch.stop()
    seen = await _seen(cfg)
    for name, recs in together.items():
        for i, (_, v) in enumerate(recs):
            if (name, i) not in loc_alone:
                break
            cid = json.loads(v)["command_id"]
            a = seen.outcome(*loc_together[(name, i)], uuid.UUID(cid))
            b = seen.outcome(*loc_alone[(name, i)], uuid.UUID(json.loads(alone[name][i][1])["command_id"]))
            if a != b or a[0] == "none":
                problems.append(f"{name}, record {i} ({v[:160]!r}): in one batch {a}, one per batch {b}")
                break
    internal = [d for d in seen.results if (d.get("error") or {}).get("code") == "orchestration_failed"]
    problems += [f"internal error: {d['error']['message'][:160]}" for d in internal[:5]]
    if fleet.deaths:
        problems.append(f"consumer exits: {[(s, c) for s, c, _ in fleet.deaths]}")
    status, tail = await asyncio.to_thread(replay_verify, cfg)
    if status != 0:
        problems.append(f"runstate replay --verify --all exited {status}: {tail}")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- total parsing, in-process


def test_parsing_and_deciding_never_raise_for_generated_records(scale):
    """The pure core over every generated record (one record per batch, one
    snapshot carried along): each becomes a ParsedCommand or a BadRecord, and
    deciding it a decision or an error answer; nothing raises, nothing answers
    orchestration_failed. (The pipeline tests above go through Kafka and
    PostgreSQL; this pins the same totality where a failure is cheap to read.)"""
    plan = FuzzPlan(scale.seed + 7, scale.pick(4000, 40000), max_bytes=MAX_BYTES,
                    workload_keys=[str(uuid.uuid4()).encode()])
    snapshot = StoreSnapshot()
    rules = OrchestrationSettings()
    raised: dict[str, list[str]] = defaultdict(list)
    failed: list[str] = []
    for i, rec in enumerate(plan.records):
        record = IncomingRecord("fuzz", 0, i, rec.key, rec.value)
        try:
            item = parse_record(record, MAX_BYTES)
            out = decide_batch([item], snapshot, rules)
        except Exception as exc:  # noqa: BLE001 - the finding itself
            raised[type(exc).__name__].append(_repro(rec, 160))
            continue
        failed += [f"{d.error.message[:120]}: {_repro(rec, 160)}" for d in out.dead_letters
                   if d.error.code == "orchestration_failed"]
    lines = [f"{name} x{len(recs)}, e.g. {recs[0]}" for name, recs in raised.items()]
    lines += [f"orchestration_failed x{len(failed)}, e.g. {failed[0]}"] if failed else []
    assert not lines, "\n".join(lines)
