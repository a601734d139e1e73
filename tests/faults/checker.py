"""After a scenario: read the log (events), the result topic and the
state-change topic, and check them against what was sent and against the
fault-free reference.

lost        a command sent without any result, or a decision of the reference
            missing from the log (per run, fewer events than the reference)
duplicated  a Kafka record decided twice (same source offset), a transition
            decided finally twice, one command id in two events, or a run
            with more events than the reference (a retry decided afresh)
forked      a run whose seqs are not 1..n, whose decisions differ from the
            reference, whose recorded decision does not follow from the
            previous event by the rules (re-decided with the recorded context),
            or a published result / state change that differs from the log
            (or is missing from it), or state changes published out of order, or a
            tag whose active slots differ from what the reference's runs hold after
            as many events as the log has of each (a run that stopped part-way is
            lost, and the slot it still holds is not counted forked)
internal_errors  answers with the error code orchestration_failed: runstate
            failed on a command (a bug), whatever the command was
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any
from uuid import UUID

import psycopg

from runstate.config import Settings
from runstate.database_urls import libpq_dsn as pg_dsn
from runstate.domain import (
    Decision,
    OrchestrationContext,
    StateCreate,
    StateType,
    TaskRunView,
    apply_initial_state,
    decide,
)
from runstate.events import inherit_run, recorded_command, recorded_context, recorded_decision
from runstate.messages import CreateTaskRunCommand, SetStateCommand
from runstate.pipeline.message_json import state_ref_json, stored_messages

from .driver import read_all
from .workload import Cmd, Reference, Step

FINAL = ("ACCEPT", "REJECT", "ABORT")
PROBLEMS_SHOWN = 12  # per kind


@dataclass
class Report:
    scenario: str
    commands: int = 0
    runs: int = 0
    events: int = 0
    results: int = 0
    state_changes: int = 0
    dead_lettered: int = 0
    lost: int = 0
    duplicated: int = 0
    forked: int = 0
    misordered: int = 0
    duplicates_caught: int = 0
    internal_errors: int = 0
    redelivered_results: int = 0
    replayed: int = 0
    faults: int = 0
    fault_detail: str = ""
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def problem(self, kind: str, text: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        # The first few of each kind: many of one (lost, say) must not hide the first of another.
        if getattr(self, kind) <= PROBLEMS_SHOWN:
            self.problems.append(f"{kind}: {text}")

    @property
    def ok(self) -> bool:
        return (self.lost == 0 and self.duplicated == 0 and self.forked == 0 and self.misordered == 0
                and self.internal_errors == 0)

    def line(self) -> str:
        return (f"[{self.scenario}] commands={self.commands} runs={self.runs} events={self.events} "
                f"results={self.results} redelivered_results={self.redelivered_results} "
                f"duplicates_caught={self.duplicates_caught} state_changes={self.state_changes} "
                f"dead_lettered={self.dead_lettered} replayed={self.replayed} faults={self.faults} "
                f"({self.fault_detail}) lost={self.lost} duplicated={self.duplicated} forked={self.forked} "
                f"misordered={self.misordered} internal_errors={self.internal_errors} in {self.seconds:.1f} s")

    def as_json(self) -> str:
        return json.dumps(asdict(self))


def read_log(settings: Settings) -> list[dict[str, Any]]:
    with psycopg.connect(pg_dsn(settings.database_url)) as conn:
        cur = conn.execute(
            "SELECT stream_id, seq, stream_type, event_type, command_id, transition_id, status, state_type,"
            " state_name, state_id, payload::text, source_partition, source_offset FROM events"
            " WHERE source_topic = %s ORDER BY stream_id, seq", (settings.command_topic,))
        cols = [d.name for d in cur.description]
        return [dict(zip(cols, row, strict=False)) for row in cur.fetchall()]


def read_slots(settings: Settings, tags: list[str]) -> dict[str, int]:
    with psycopg.connect(pg_dsn(settings.database_url)) as conn:
        rows = conn.execute("SELECT tag, active_slots FROM tag_concurrency_limits WHERE tag = ANY(%s)",
                            (tags,)).fetchall()
    return dict(rows)


def replay(prev_run: TaskRunView | None, row: dict, payload: dict) -> tuple[bool, TaskRunView | None, str]:
    """Re-decide one recorded task-run event from the previous event's run and
    the recorded context; True when the rules give the recorded decision."""
    command_doc = recorded_command(payload, row["transition_id"], stream_id=row["stream_id"],
                                   command_id=row["command_id"])
    ctx = OrchestrationContext.model_validate(recorded_context(payload, state_id=row["state_id"]))
    previous = prev_run.model_dump(mode="json") if prev_run is not None else None
    recorded = Decision.model_validate(inherit_run(recorded_decision(
        payload, row["status"], row["stream_id"], transition_id=row["transition_id"], state_id=row["state_id"]),
        previous))
    if row["event_type"] == "task_run_created":
        if prev_run is not None:
            return False, recorded.run, "created twice"
        cmd = CreateTaskRunCommand.model_validate(command_doc)
        run = TaskRunView(id=cmd.id, name=cmd.name, flow_run_id=cmd.flow_run_id, task_key=cmd.task_key,
                          dynamic_key=cmd.dynamic_key, tags=cmd.tags, cache_key=cmd.cache_key,
                          empirical_policy=cmd.empirical_policy)
        again = apply_initial_state(run, cmd.state or StateCreate(type=StateType.PENDING), ctx)
    else:
        if prev_run is None:
            return False, recorded.run, "transition before creation"
        cmd = SetStateCommand.model_validate(command_doc)
        again = decide(prev_run, cmd.request(), ctx)
    same = again.model_dump(mode="json") == recorded.model_dump(mode="json")
    return same, recorded.run, "" if same else f"re-decided {again.result.status}/{again.appended_state and again.appended_state.name} != recorded {recorded.result.status}"


def expected_slots(got: dict[UUID, list[Step]], ref: Reference) -> dict[str, int]:
    """Per tag, the active slots of the reference's runs after as many events as the log has
    of each: a run whose log is the first part of its reference (it stopped part-way, counted
    lost) holds what the reference's run held at that point, not what it held at the end. A
    run that differs, or has more, counts as in the reference (it is forked or duplicated)."""
    slots = Counter(ref.active_slots)
    for sid in ref.tagged:
        expected, mine = ref.paths[sid], got.get(sid, [])
        if len(mine) < len(expected) and mine == expected[:len(mine)]:
            held = ref.held(sid)
            slots.subtract(held[-1])
            if mine:
                slots.update(held[len(mine) - 1])
    return dict(slots)


def compare_with_reference(rep: Report, got: dict[UUID, list[Step]], ref: Reference,
                           slots: dict[str, int] | None = None, tags: list[str] | None = None,
                           others: bool = False) -> None:
    """Each run's decisions in the log (`got`) against the reference's: fewer is lost, more is
    duplicated, a difference in their common part is forked; a run not in the workload is
    forked (unless `others`); a tag whose active slots (`slots`) differ from expected_slots is
    forked."""
    for sid, expected in ref.paths.items():
        mine = got.get(sid, [])
        if len(mine) < len(expected):
            rep.problem("lost", f"run {sid}: {len(mine)} events, the reference has {len(expected)}")
        elif len(mine) > len(expected):
            rep.problem("duplicated", f"run {sid}: {len(mine)} events, the reference has {len(expected)}")
        n = min(len(mine), len(expected))
        if mine[:n] != expected[:n]:
            rep.problem("forked", f"run {sid}: decisions {mine} != reference {expected}")
    for sid in set() if others else got.keys() - ref.paths.keys():
        rep.problem("forked", f"run {sid} is in the log but not in the workload")
    if slots is not None:
        want = expected_slots(got, ref)
        for tag in tags or []:
            if slots.get(tag, 0) != want.get(tag, 0):
                unfinished = "" if want.get(tag, 0) == ref.active_slots.get(tag, 0) else \
                    f" (the finished reference has {ref.active_slots.get(tag, 0)})"
                rep.problem("forked", f"tag {tag}: {slots.get(tag)} active slots, the reference's runs hold "
                                      f"{want.get(tag, 0)} at the log's point{unfinished}")


async def check(scenario: str, settings: Settings, sent: list[Cmd], ref: Reference,
                tags: list[str] | None = None, replay_events: bool = True, others: bool = False,
                offsets_reused: bool = False) -> Report:
    """`others`: runs outside the workload (the fuzzer's) may be in the log;
    they are held to the log's own rules (gapless seqs, every event published)
    but not to the reference, and `runstate replay --verify` re-decides them.
    `offsets_reused`: the command topic was recreated, so two records may share
    a (partition, offset); decided twice is then judged by command and transition."""
    rep = Report(scenario, commands=len(sent))
    log = read_log(settings)
    results = await read_all(settings, settings.result_topic)
    changes = await read_all(settings, settings.state_change_topic)
    dead = await read_all(settings, settings.dead_letter_topic)
    rep.events, rep.results, rep.state_changes, rep.dead_lettered = len(log), len(results), len(changes), len(dead)

    # -- the log itself ----------------------------------------------------
    by_stream: dict[UUID, list[dict]] = defaultdict(list)
    for row in log:
        by_stream[row["stream_id"]].append(row)
    rep.runs = len(by_stream)
    for off, n in Counter((r["source_partition"], r["source_offset"]) for r in log).items():
        if n > 1 and not offsets_reused:
            rep.problem("duplicated", f"source offset {off} decided {n} times")
    for cid, n in Counter(r["command_id"] for r in log).items():
        if n > 1:
            rep.problem("duplicated", f"command {cid} in {n} events")
    finals = Counter((r["stream_id"], r["transition_id"]) for r in log if r["transition_id"] and r["status"] in FINAL)
    for key, n in finals.items():
        if n > 1:
            rep.problem("duplicated", f"transition {key} decided finally {n} times")

    payloads: dict[tuple[UUID, int], dict] = {}
    for sid, rows in by_stream.items():
        seqs = [r["seq"] for r in rows]
        if seqs != list(range(1, len(rows) + 1)):
            rep.problem("forked", f"run {sid}: seqs {seqs[:10]} not gapless from 1")
        prev_run: TaskRunView | None = None
        from_state = "null"
        for r in rows:
            payload = json.loads(r["payload"])
            # The messages the event published, as a redelivery republishes them.
            result_event, state_change = stored_messages(
                r["payload"], stream_id=sid, seq=r["seq"], command_id=r["command_id"],
                transition_id=r["transition_id"], status=r["status"], state_id=r["state_id"], from_state=from_state)
            payload["result_event"] = json.loads(result_event)
            payload["state_change"] = None if state_change is None else json.loads(state_change)
            if r["state_type"]:
                from_state = state_ref_json(r["state_type"], r["state_name"], r["state_id"])
            payloads[(sid, r["seq"])] = payload
            if payload["result_event"]["seq"] != r["seq"] or payload["result_event"]["stream_id"] != str(sid):
                rep.problem("forked", f"run {sid} seq {r['seq']}: payload's result event says otherwise")
            if replay_events and r["stream_type"] == "task_run" and sid in ref.paths:
                ok, prev_run, why = replay(prev_run, r, payload)
                rep.replayed += 1
                if not ok:
                    rep.problem("forked", f"run {sid} seq {r['seq']}: {why}")

    # -- against the reference ------------------------------------------------
    got = {sid: [(r["event_type"], r["status"], r["state_type"], r["state_name"]) for r in rows]
           for sid, rows in by_stream.items()}
    compare_with_reference(rep, got, ref, read_slots(settings, tags) if tags else None, tags or [], others)

    # -- results: every command answered, every answer matches the log -----------
    answered_cmd: set[UUID] = set()
    answered_tid: set[tuple[UUID, UUID]] = set()
    seen_results: Counter = Counter()
    for rec in results:
        doc = json.loads(rec.value)
        cid = UUID(doc["command_id"])
        answered_cmd.add(cid)
        if (doc.get("error") or {}).get("code") == "orchestration_failed":
            rep.problem("internal_errors", f"command {cid}: orchestration_failed: {doc['error'].get('message', '')[:200]}")
        seen_results[rec.value] += 1
        sid = UUID(doc["stream_id"]) if doc.get("stream_id") else None
        if doc.get("transition_id") and sid:
            answered_tid.add((sid, UUID(doc["transition_id"])))
        if doc.get("seq") is not None:
            logged = payloads.get((sid, doc["seq"]))
            if logged is None:
                rep.problem("forked", f"result for {sid} seq {doc['seq']} has no event in the log")
            elif logged["result_event"] != doc:
                rep.problem("forked", f"result for {sid} seq {doc['seq']} differs from the log")
    rep.redelivered_results = sum(n - 1 for n in seen_results.values())
    logged_commands = {r["command_id"] for r in log}
    for cmd in sent:
        tid = cmd.transition_id
        if not (cmd.command_id in answered_cmd or (tid is not None and (cmd.stream_id, tid) in answered_tid)):
            rep.problem("lost", f"command {cmd.command_id} (run {cmd.stream_id}) got no result")
        elif cmd.retry_of is not None and cmd.command_id not in logged_commands:
            rep.duplicates_caught += 1  # a worker's retry, answered with the stored decision
    logged_results = {(sid, seq) for (sid, seq) in payloads}
    result_keys = set()
    for rec in results:
        doc = json.loads(rec.value)
        if doc.get("seq") is not None and doc.get("stream_id"):
            result_keys.add((UUID(doc["stream_id"]), doc["seq"]))
    for key in logged_results - result_keys:
        rep.problem("lost", f"event {key} was never published as a result")

    # -- state changes: exactly the log's, in order ---------------------------
    published: dict[tuple[UUID, int], dict] = {}
    last_first_seq: dict[UUID, int] = {}
    for rec in changes:
        doc = json.loads(rec.value)
        sid, seq = UUID(doc["task_run_id"]), doc["seq"]
        logged = payloads.get((sid, seq))
        if logged is None or logged.get("state_change") != doc:
            rep.problem("forked", f"state change {sid} seq {seq} differs from the log")
        if (sid, seq) not in published:
            if last_first_seq.get(sid, 0) >= seq:
                rep.problem("misordered", f"state change {sid} seq {seq} first published after seq "
                                          f"{last_first_seq[sid]}")
            last_first_seq[sid] = seq
            published[(sid, seq)] = doc
    for key, payload in payloads.items():
        if payload.get("state_change") is not None and key not in published:
            rep.problem("lost", f"state change {key} in the log was never published")
    return rep
