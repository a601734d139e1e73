"""`runstate replay --verify`: decide every recorded command again through the
current rules and report each decision that would come out differently.

Each decision is re-made from exactly what was recorded with it: the command
(with the transition_id the pipeline filled in, the event's column), the OrchestrationContext
(clock, ids, random draw, lookups) and, as the run before, the `decision.run`
the stream's previous event recorded. Using the *recorded* previous run rather
than the recomputed one confines a difference to the event where the rules
diverge instead of cascading through the rest of the stream.

`StreamVerifier` is pure (no I/O); `verify_log` drives it over the database.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from pydantic_core import from_json
from sqlalchemy import Engine, create_engine

from runstate.audit.db import sync_url
from runstate.audit.parallel import (
    MIN_RANGE_EVENTS,
    WHOLE_LOG,
    StreamRange,
    plan_ranges,
    report_progress,
    run_ranges,
)
from runstate.domain import (
    Decision,
    OrchestrationContext,
    TaskRunView,
    apply_initial_state,
    decide,
)
from runstate.events import (
    GENESIS,
    event_hash,
    inherit_run,
    recorded_command,
    recorded_context,
    recorded_decision,
)
from runstate.messages import CreateTaskRunCommand, SetStateCommand
from runstate.store.queries import count_events, scan_events

COMPARED_FIELDS = ("result", "appended_state", "run", "effects")
MAX_DIFFS_SHOWN = 6


@dataclass(frozen=True)
class RecordedEvent:
    stream_id: UUID
    seq: int
    event_type: str
    command: Mapping[str, Any] | None
    context: Mapping[str, Any] | None
    decision: Mapping[str, Any] | None


@dataclass(frozen=True)
class Mismatch:
    stream_id: UUID
    seq: int
    differences: tuple[str, ...]

    def __str__(self) -> str:
        return f"run {self.stream_id} seq {self.seq}: " + "; ".join(self.differences)


def redecide(event: RecordedEvent, previous_run: Mapping[str, Any] | None) -> Decision:
    ctx = OrchestrationContext.model_validate(event.context)
    if event.event_type == "task_run_created":
        create = CreateTaskRunCommand.model_validate(event.command)
        return apply_initial_state(create.new_run(), create.initial_state(), ctx)
    if event.event_type == "transition_decided":
        if previous_run is None:
            raise ValueError("no recorded run before this transition")
        command = SetStateCommand.model_validate(event.command)
        return decide(TaskRunView.model_validate(previous_run), command.request(), ctx)
    raise ValueError(f"unknown task-run event type {event.event_type!r}")


def normalised(value: Any) -> Any:
    """JSON round trip, so both sides compare as plain dicts/lists/str/numbers."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def json_diff(recorded: Any, recomputed: Any, path: str = "") -> Iterator[str]:
    """Paths where two JSON values differ, depth first, each as 'path: recorded != recomputed'."""
    if isinstance(recorded, dict) and isinstance(recomputed, dict):
        for key in sorted(set(recorded) | set(recomputed)):
            sub = f"{path}.{key}" if path else key
            if key not in recorded:
                yield f"{sub}: missing != {_short(recomputed[key])}"
            elif key not in recomputed:
                yield f"{sub}: {_short(recorded[key])} != missing"
            else:
                yield from json_diff(recorded[key], recomputed[key], sub)
    elif isinstance(recorded, list) and isinstance(recomputed, list) and len(recorded) == len(recomputed):
        for i, (a, b) in enumerate(zip(recorded, recomputed, strict=False)):
            yield from json_diff(a, b, f"{path}[{i}]")
    elif recorded != recomputed:
        yield f"{path}: {_short(recorded)} != {_short(recomputed)}"


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def compare(recorded: Mapping[str, Any], recomputed: Decision) -> list[str]:
    mine = recomputed.model_dump(mode="json")
    diffs: list[str] = []
    for name in COMPARED_FIELDS:
        # Both sides are plain JSON values, so equality is the common, cheap answer; only
        # a difference is walked to name its paths.
        if recorded.get(name) != mine.get(name):
            diffs.extend(json_diff(normalised(recorded.get(name)), normalised(mine.get(name)), name))
    return diffs


class StreamVerifier:
    """Feed task-run events in (stream_id, seq) order; get a Mismatch for each
    decision the current rules would not reproduce. Holds only the previous
    event's recorded run, so it can span any number of batches."""

    def __init__(self) -> None:
        self._stream: UUID | None = None
        self._previous_seq = 0
        self._previous_run: Mapping[str, Any] | None = None

    def check(self, event: RecordedEvent) -> Mismatch | None:
        if event.stream_id != self._stream:
            self._stream, self._previous_seq, self._previous_run = event.stream_id, 0, None
        expected_seq = self._previous_seq + 1
        previous_run = self._previous_run
        self._previous_seq = event.seq
        # A lean event's run takes the members fixed at creation from the run before it.
        decision = inherit_run(event.decision, previous_run)
        self._previous_run = decision.get("run") if isinstance(decision, Mapping) else None

        if event.seq != expected_seq:
            return Mismatch(event.stream_id, event.seq, (f"seq: expected {expected_seq} (gap in the log)",))
        if not isinstance(decision, Mapping) or event.command is None or event.context is None:
            return Mismatch(event.stream_id, event.seq, ("the event records no command, context or decision",))
        try:
            recomputed = redecide(event, previous_run)
        except Exception as exc:  # noqa: BLE001 - any failure to re-decide is a finding, not a crash
            return Mismatch(event.stream_id, event.seq, (f"re-deciding failed: {type(exc).__name__}: {exc}",))
        diffs = compare(decision, recomputed)
        if not diffs:
            return None
        shown = diffs[:MAX_DIFFS_SHOWN]
        if len(diffs) > len(shown):
            shown.append(f"and {len(diffs) - len(shown)} more")
        return Mismatch(event.stream_id, event.seq, tuple(shown))


@dataclass
class VerifyReport:
    events: int  # task-run decisions re-decided
    mismatches: list[Mismatch]
    chained: int = 0  # events of every stream whose hash link was checked

    @property
    def ok(self) -> bool:
        return not self.mismatches


class ChainVerifier:
    """Feed events of every stream in (stream_id, seq) order; get a Mismatch at
    the first event whose stored hash is not the hash of its columns chained to
    the previous event's (runstate/events.py, event_hash)."""

    def __init__(self) -> None:
        self._stream: UUID | None = None
        self._previous = GENESIS

    def check(self, row: Any) -> Mismatch | None:
        if row.stream_id != self._stream:
            self._stream, self._previous = row.stream_id, GENESIS
        if row.hash is None:  # stored before events were chained
            self._previous = GENESIS
            return None
        expected = event_hash(
            self._previous,
            stream_id=row.stream_id, seq=row.seq, stream_type=row.stream_type, event_type=row.event_type,
            command_id=row.command_id, transition_id=row.transition_id, status=row.status,
            state_type=row.state_type, state_name=row.state_name, state_id=row.state_id,
            source_topic=row.source_topic, source_partition=row.source_partition, source_offset=row.source_offset,
            source_digest=None if row.source_digest is None else bytes(row.source_digest), payload=row.payload,
        )
        self._previous = bytes(row.hash)
        if expected == self._previous:
            return None
        return Mismatch(row.stream_id, row.seq, (
            "hash chain broken: this event is not what was written after the one before it "
            "(a rewritten or inserted event)",))


# The columns verify_log reads: every hashed column, and the payload as the very text stored.
VERIFY_COLUMNS = (
    "stream_type, event_type, command_id, transition_id, status, state_type, state_name, state_id,"
    " source_topic, source_partition, source_offset, source_digest, hash, payload::text AS payload"
)


def recorded_event(row: Any) -> RecordedEvent:
    """What a stored task-run event recorded: the one place replay decodes a payload."""
    payload = from_json(row.payload)
    if not isinstance(payload, dict):  # a damaged event is a finding (StreamVerifier), not a crash
        payload = {}
    # Either payload shape: the lean one (rendered from the row's columns) or the legacy one.
    return RecordedEvent(row.stream_id, row.seq, row.event_type, recorded_command(payload, row.transition_id),
                         recorded_context(payload), recorded_decision(payload, row.status, row.stream_id))


def _condition(run_id: UUID | None) -> tuple[str, dict[str, Any]]:
    if run_id is None:
        return "TRUE", {}
    return "stream_id = :run", {"run": run_id}


def count_to_verify(engine: Engine, run_id: UUID | None = None) -> int:
    condition, params = _condition(run_id)
    return count_events(engine, condition, params)


@dataclass
class RangeReport:
    events: int
    chained: int
    mismatches: list[Mismatch]


def verify_range(
    engine: Engine,
    condition: str,
    params: Mapping[str, Any],
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
    on_mismatch: Callable[[Mismatch], None] | None = None,
) -> RangeReport:
    """Check the hash chains and re-decide the task-run events of whole streams (those
    matching `condition`), in (stream_id, seq) order."""
    verifier = StreamVerifier()
    chain = ChainVerifier()
    report = RangeReport(0, 0, [])
    for rows in scan_events(engine, VERIFY_COLUMNS, condition=condition, params=params, batch_size=batch_size):
        for row in rows:
            found = [chain.check(row)]
            if row.stream_type == "task_run":
                report.events += 1
                found.append(verifier.check(recorded_event(row)))
            for mismatch in found:
                if mismatch is not None:
                    report.mismatches.append(mismatch)
                    if on_mismatch:
                        on_mismatch(mismatch)
        report.chained += len(rows)
        if on_batch:
            on_batch(len(rows))
    return report


_worker_engine: Engine | None = None


def _verify_in_worker(streams: StreamRange, url: str, batch_size: int) -> RangeReport:
    """One range, in a worker process (its engine lives as long as the process)."""
    global _worker_engine
    if _worker_engine is None:
        _worker_engine = create_engine(url, pool_size=1, max_overflow=0)
    condition, params = streams.condition()
    return verify_range(_worker_engine, condition, params, batch_size, on_batch=report_progress)


def verify_log(
    engine: Engine,
    run_id: UUID | None = None,
    *,
    batch_size: int = 1000,
    workers: int = 1,
    min_range_events: int = MIN_RANGE_EVENTS,
    on_batch: Callable[[int], None] | None = None,
    on_mismatch: Callable[[Mismatch], None] | None = None,
) -> VerifyReport:
    """Check every stream's hash chain and replay every task-run decision (or one
    run's). Mismatches are kept in the report and, if given, passed to on_mismatch
    as they are found (so a long run shows them early); both in (stream_id, seq)
    order, whatever the number of worker processes."""
    if workers < 1:
        raise ValueError("workers must be positive")
    report = VerifyReport(events=0, mismatches=[])
    ranges = [WHOLE_LOG]
    if run_id is None and workers > 1:
        with engine.connect() as conn:
            ranges = plan_ranges(conn, workers, min_range_events)
    if len(ranges) == 1:
        condition, params = _condition(run_id)
        whole = verify_range(engine, condition, params, batch_size, on_batch, on_mismatch)
        report.events, report.chained, report.mismatches = whole.events, whole.chained, whole.mismatches
        return report
    url = sync_url(engine)
    for part in run_ranges(_verify_in_worker, ranges, (url, batch_size), workers, on_batch):
        report.events += part.events
        report.chained += part.chained
        report.mismatches.extend(part.mismatches)
        if on_mismatch:
            for mismatch in part.mismatches:
                on_mismatch(mismatch)
    return report
