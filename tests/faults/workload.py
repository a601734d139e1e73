"""A deterministic workload of many runs, and its fault-free reference.

`generate(seed, commands, salt)` builds per-run command sequences from `seed`
alone (the structure: lifecycles, retries, failures, tags, cache keys, flow
runs); `salt` only renames the ids so that the same seed can run again against
the same database. Runs are independent of each other except through

* tags with concurrency limits (limits are set above the number of runs using a
  tag, so slots are taken and released under the FOR UPDATE lock of every
  batch, but never make a decision depend on how runs interleave), and
* cache keys and flow runs, which cross runs in two phases: phase 1 holds the
  cache writers and the flow runs, phase 2 the cache readers and the flow
  runs' children, and phase 2 is sent only once phase 1 has been answered.

So whatever the interleaving across runs, each run's decisions are fixed, and
`reference(workload)` computes them in-process with the pure core
(`decide_batch` over an in-memory snapshot that plays the store).
"""

from __future__ import annotations

import random
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from uuid import UUID

from runstate.client import state
from runstate.domain import EmpiricalPolicy, OrchestrationSettings, TagLimit
from runstate.messages import (
    CreateFlowRunCommand,
    CreateTaskRunCommand,
    SetStateCommand,
)
from runstate.pipeline.batch import decide_batch
from runstate.pipeline.ports import StoreSnapshot
from runstate.pipeline.records import IncomingRecord, parse_record

NAMESPACE = UUID("0b8e1c52-3f0a-4d7e-9e63-5f1a2b3c4d5e")

# Per-event signature compared with the reference: what was decided, in order.
Step = tuple[str, str | None, str | None, str | None]


@dataclass
class Cmd:
    stream_id: UUID
    command: object  # a runstate.messages command model
    phase: int
    retry_of: UUID | None = None  # command id of the original, for a worker's retry

    @property
    def command_id(self) -> UUID:
        return self.command.command_id  # type: ignore[attr-defined]

    @property
    def transition_id(self) -> UUID | None:
        if isinstance(self.command, SetStateCommand):
            return self.command.state.state_details.transition_id
        return None

    @property
    def key(self) -> bytes:
        return str(self.stream_id).encode()

    def value(self) -> bytes:
        return self.command.model_dump_json().encode()  # type: ignore[attr-defined]

    def retried(self, command_id: UUID) -> Cmd:
        """The same proposal sent again by a worker after a timeout: same transition id, new command id."""
        again = self.command.model_copy(update={"command_id": command_id})  # type: ignore[attr-defined]
        return Cmd(self.stream_id, again, self.phase, retry_of=self.command_id)


@dataclass
class RunPlan:
    stream_id: UUID
    kind: str
    phase: int
    commands: list[Cmd] = field(default_factory=list)


@dataclass
class Workload:
    seed: int
    salt: str
    runs: list[RunPlan]
    tag_limits: dict[str, int]

    @property
    def commands(self) -> list[Cmd]:
        return [c for r in self.runs for c in r.commands]

    def phase(self, n: int) -> list[RunPlan]:
        return [r for r in self.runs if r.phase == n]

    def interleaved(self, phase: int, workers: int, rng: random.Random) -> list[list[Cmd]]:
        """The phase's commands split among `workers` workers; each worker
        interleaves its runs at random, keeping each run's own order."""
        lanes: list[list[RunPlan]] = [[] for _ in range(workers)]
        for i, run in enumerate(self.phase(phase)):
            lanes[i % workers].append(run)
        out = []
        for lane in lanes:
            cursors = [list(r.commands) for r in lane]
            seq: list[Cmd] = []
            while cursors:
                i = rng.randrange(len(cursors))
                seq.append(cursors[i].pop(0))
                if not cursors[i]:
                    cursors.pop(i)
            out.append(seq)
        return out


def _ids(salt: str):
    space = uuid.uuid5(NAMESPACE, salt)
    counter = iter(range(10**9))

    def new(kind: str) -> UUID:
        return uuid.uuid5(space, f"{kind}:{next(counter)}")

    return new


KINDS = [  # (kind, weight)
    ("simple", 22),
    ("scheduled", 10),
    ("failed", 8),
    ("retries", 20),
    ("tagged", 15),
    ("odd", 5),
    ("cache_writer", 6),
    ("cache_reader", 6),
    ("flow_child", 8),
]


def generate(seed: int, commands: int, salt: str | None = None, duplicate_rate: float = 0.02) -> Workload:
    """At least `commands` commands. `duplicate_rate`: share of set-state
    commands a worker sends twice (a retry after a timeout, right after the
    original: same transition id, new command id)."""
    rng = random.Random(seed)
    salt = salt or uuid.uuid4().hex[:12]
    new = _ids(salt)
    tags = [f"faults-{salt}-tag{i}" for i in range(4)]
    tag_use: dict[str, int] = defaultdict(int)
    runs: list[RunPlan] = []
    flows: list[UUID] = []
    cache_keys: list[str] = []
    total = [0]

    def add_flow() -> UUID:
        fid = new("flow")
        plan = RunPlan(fid, "flow", 1)
        plan.commands.append(Cmd(fid, CreateFlowRunCommand(command_id=new("cmd"), id=fid, state=state("RUNNING")), 1))
        runs.append(plan)
        flows.append(fid)
        total[0] += 1
        return fid

    names, weights = zip(*KINDS, strict=False)
    while total[0] < commands:
        kind = rng.choices(names, weights)[0]
        if kind == "cache_reader" and not cache_keys:
            kind = "cache_writer"
        rid = new("run")
        phase = 2 if kind in ("cache_reader", "flow_child") else 1
        create: dict = {}
        steps: list[tuple[str, dict]] = []
        if kind == "simple":
            steps = [("RUNNING", {}), ("COMPLETED", {})]
        elif kind == "scheduled":
            create["state"] = state("SCHEDULED")
            steps = [("PENDING", {}), ("RUNNING", {}), ("COMPLETED", {})]
        elif kind == "failed":
            steps = [("RUNNING", {}), ("FAILED", {})]
        elif kind in ("retries", "tagged"):
            retries = rng.randint(0, 3) if kind == "tagged" else rng.randint(1, 3)
            create["empirical_policy"] = EmpiricalPolicy(retries=retries, retry_delay=0)
            if kind == "tagged":
                tag = rng.choice(tags)
                create["tags"] = [tag]
                tag_use[tag] += 1
            failures = rng.randint(0, retries + 1)
            steps = [s for _ in range(failures) for s in (("RUNNING", {}), ("FAILED", {}))]
            if failures <= retries:
                steps += [("RUNNING", {}), (rng.choice(["COMPLETED", "COMPLETED", "FAILED"]), {})]
        elif kind == "odd":  # proposals the rules refuse or rewrite
            steps = rng.choice([
                [("COMPLETED", {}), ("RUNNING", {})],
                [("RUNNING", {}), ("PENDING", {}), ("COMPLETED", {}), ("COMPLETED", {})],
                [("CANCELLING", {}), ("CANCELLED", {}), ("RUNNING", {})],
                [("RUNNING", {}), ("CRASHED", {}), ("RUNNING", {})],
            ])
        elif kind == "cache_writer":
            key = f"faults-{salt}-cache{len(cache_keys)}"
            cache_keys.append(key)
            steps = [("RUNNING", {}), ("COMPLETED", {"cache_key": key})]
        elif kind == "cache_reader":
            key = rng.choice(cache_keys)
            steps = [("RUNNING", {"cache_key": key}), ("COMPLETED", {})]
        elif kind == "flow_child":
            create["flow_run_id"] = flows[-1] if flows and rng.random() < 0.9 else add_flow()
            steps = [("RUNNING", {}), ("COMPLETED", {})]
        plan = RunPlan(rid, kind, phase)
        plan.commands.append(Cmd(rid, CreateTaskRunCommand(command_id=new("cmd"), id=rid, **create), phase))
        for type_, details in steps:
            cmd = Cmd(rid, SetStateCommand(command_id=new("cmd"), task_run_id=rid,
                                           state=state(type_, transition_id=new("tid"), **details)), phase)
            plan.commands.append(cmd)
            if rng.random() < duplicate_rate:
                plan.commands.append(cmd.retried(new("cmd")))
        runs.append(plan)
        total[0] += len(plan.commands)
    limits = {tag: tag_use.get(tag, 0) + 1 for tag in tags}
    return Workload(seed, salt, runs, limits)


@dataclass
class Reference:
    paths: dict[UUID, list[Step]]
    active_slots: dict[str, int]
    events: int
    # The runs with tags and the tags' limits, for held().
    tagged: dict[UUID, RunPlan] = field(default_factory=dict)
    tag_limits: dict[str, int] = field(default_factory=dict)

    def held(self, stream_id: UUID) -> list[dict[str, int]]:
        """After each event of a run with tags, the slots it holds by tag: its commands alone,
        one a batch, against tag limits of their own (runs meet only through tags, whose limits
        are above the number of runs using them). For the slot counts of a log whose runs
        stopped part-way (checker.expected_slots)."""
        run = self.tagged.get(stream_id)
        if run is None:
            return [{} for _ in self.paths.get(stream_id, [])]
        snapshot = StoreSnapshot(tag_limits={t: TagLimit(tag=t, limit=n) for t, n in self.tag_limits.items()})
        settings = OrchestrationSettings()
        after: list[dict[str, int]] = []
        for offset, cmd in enumerate(run.commands):
            item = parse_record(IncomingRecord("reference", 0, offset, cmd.key, cmd.value()), 10**9)
            for _ in decide_batch([item], snapshot, settings).events:
                after.append({t: lim.active_slots for t, lim in snapshot.tag_limits.items() if lim.active_slots})
        assert len(after) == len(self.paths[stream_id]), stream_id
        return after


def reference(workload: Workload) -> Reference:
    """Decide the workload in-process, fault-free: the pure core over an
    in-memory store, phase 1 then phase 2."""
    snapshot = StoreSnapshot(tag_limits={t: TagLimit(tag=t, limit=n) for t, n in workload.tag_limits.items()})
    settings = OrchestrationSettings()
    paths: dict[UUID, list[Step]] = defaultdict(list)
    offset = 0
    events = 0
    for phase in (1, 2):
        items = []
        for cmd in (c for r in workload.phase(phase) for c in r.commands):
            offset += 1
            items.append(parse_record(IncomingRecord("reference", 0, offset, cmd.key, cmd.value()), 10**9))
        out = decide_batch(items, snapshot, settings)
        assert not out.dead_letters, [d.error for d in out.dead_letters[:3]]
        for e in out.events:
            paths[e.stream_id].append((e.event_type, e.status, e.state_type, e.state_name))
        events += len(out.events)
    tagged = {r.stream_id: r for r in workload.runs if getattr(r.commands[0].command, "tags", None)}
    return Reference(dict(paths), {t: lim.active_slots for t, lim in snapshot.tag_limits.items()}, events,
                     tagged, dict(workload.tag_limits))
