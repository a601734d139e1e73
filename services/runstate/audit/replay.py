"""`runstate replay --verify`: decide every recorded command again through the
current rules and report each decision that would come out differently.

Each decision is re-made from exactly what was recorded with it: the command
(with the transition_id the pipeline filled in, the event's column), the OrchestrationContext
(clock, ids, random draw, lookups) and, as the run before, the `decision.run`
the stream's previous event recorded. Using the *recorded* previous run rather
than the recomputed one confines a difference to the event where the rules
diverge instead of cascading through the rest of the stream.

What costs is pydantic's work, so each event gets as little of it as exactness allows:
the recomputed decision is written as the current writer would store it, and a stored
payload that ends with that very text is reproduced without its decision being parsed
(`StreamVerifier.check_stored`); any other event (an older shape, a difference) has its
recorded decision parsed, and the recomputed one dumped once and compared with it as plain
JSON values (the path-by-path diff runs only when they differ). After a decision that is
reproduced the recomputed run equals the recorded one, so it stands in for validating that
JSON again for the next event. The command and context are validated by the models' own
pydantic-core validators, and the request built from the validated command without validating
it again (as the pipeline does). The log is read on the driver's connection in binary, ids as
text (the hash reads them as text), so no uuid object is made per column but the stream's and
the transition's (by pydantic-core's uuid validator, a fifth of what UUID(text) costs).

`StreamVerifier` is pure (no I/O); `verify_log` drives it over the database.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from pydantic_core import SchemaValidator, core_schema, from_json
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
    SetStateRequest,
    TaskRunView,
    apply_initial_state,
    decide,
)
from runstate.domain.unchecked import build
from runstate.events import (
    GENESIS,
    chain_link,
    framed,
    inherit_run,
    recorded_command,
    recorded_context,
    recorded_decision,
)
from runstate.messages import CreateTaskRunCommand, SetStateCommand
from runstate.pipeline.message_json import lean_task_run_tail
from runstate.store.queries import count_events

COMPARED_FIELDS = ("result", "appended_state", "run", "effects")
_COMPARED = set(COMPARED_FIELDS)
MAX_DIFFS_SHOWN = 6
# Findings a report keeps (the first ones, in log order); past that they are only counted, so
# a log in which every decision differs is verified in the same memory as a sound one.
MAX_MISMATCHES_KEPT = 10_000


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


# pydantic-core's own validators: model_validate without its Python wrapper, the same models.
_CONTEXT = OrchestrationContext.__pydantic_validator__.validate_python
_CREATE = CreateTaskRunCommand.__pydantic_validator__.validate_python
_SET_STATE = SetStateCommand.__pydantic_validator__.validate_python


def redecide(event: RecordedEvent, previous_run: Mapping[str, Any] | None,
             previous_view: TaskRunView | None = None) -> Decision:
    """The decision the current rules make for `event`; `previous_view`, when given, is
    `previous_run` already as a model."""
    return _redecide(event.event_type, event.command, event.context, previous_view, previous_run)


def _redecide(event_type: str, command: Any, context: Any, previous_view: TaskRunView | None,
              previous_run: Mapping[str, Any] | None = None) -> Decision:
    ctx: OrchestrationContext = _CONTEXT(context)
    if event_type == "task_run_created":
        create: CreateTaskRunCommand = _CREATE(command)
        return apply_initial_state(create.new_run(), create.initial_state(), ctx)
    if event_type == "transition_decided":
        if previous_run is None and previous_view is None:
            raise ValueError("no recorded run before this transition")
        proposal: SetStateCommand = _SET_STATE(command)
        run = previous_view if previous_view is not None else TaskRunView.model_validate(previous_run)
        # The request as SetStateCommand.request() makes it, without validating its parts again.
        return decide(run, build(SetStateRequest, {"state": proposal.state, "force": proposal.force}), ctx)
    raise ValueError(f"unknown task-run event type {event_type!r}")


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
    """Every path where the recorded decision and the recomputed one differ."""
    return differences(recorded, recomputed.model_dump(mode="json", include=_COMPARED))


def differences(recorded: Mapping[str, Any], mine: Mapping[str, Any]) -> list[str]:
    diffs: list[str] = []
    for name in COMPARED_FIELDS:
        # Both sides are plain JSON values, so equality is the common, cheap answer; only
        # a difference is walked to name its paths.
        if recorded.get(name) != mine.get(name):
            diffs.extend(json_diff(normalised(recorded.get(name)), normalised(mine.get(name)), name))
    return diffs


def _reproduced(recomputed: Decision, stream_id: UUID, status: str | None, previous: TaskRunView | None,
                transition_id: UUID | None, payload_text: str) -> bool:
    # A compact appended state's id is not compared: it is the state_id column, which the
    # recorded context's new state id was read from too (an input the hash chain guards).
    result = recomputed.result
    state = recomputed.appended_state if recomputed.appended_state is not None else recomputed.run.state
    # SetStateStatus is a str enum: a member equals its value.
    return (recomputed.run.id == stream_id and result.status == status
            and (result.state is state or result.state == state)
            and payload_text.endswith(lean_task_run_tail(recomputed, previous, transition_id)))


# pydantic-core's uuid validator: a column's text to a UUID in a fifth of what UUID(text) takes.
uuid_of_text: Callable[[str], UUID] = SchemaValidator(core_schema.uuid_schema()).validate_python


def _uuid(value: object | None) -> UUID | None:
    return value if value is None or isinstance(value, UUID) else uuid_of_text(str(value))


class StreamVerifier:
    """Feed task-run events in (stream_id, seq) order; get a Mismatch for each
    decision the current rules would not reproduce. Holds only the previous
    event's recorded run, so it can span any number of batches."""

    def __init__(self) -> None:
        self._stream: UUID | None = None
        self._previous_seq = 0
        self._previous_run: Mapping[str, Any] | None = None
        # The previous recorded run as a model: the recomputed one when its event was reproduced.
        self._previous_view: TaskRunView | None = None
        self.by_text = 0  # decisions found reproduced by their stored text alone (check_stored)

    def check_stored(self, stream_id: UUID, seq: int, event_type: str, transition_id: object,
                     status: str | None, state_id: object, payload_text: str, *,
                     command_id: object | None = None) -> Mismatch | None:
        """`check` for an event as stored. A decision the current writer would store as the very
        text it ends with is reproduced: equal lean texts fill back to equal decisions, so
        only the run's id, status and result state (held by columns, not by that text) are
        compared besides. Anything else (another shape, a difference) goes through `check`."""
        payload = from_json(payload_text)
        if not isinstance(payload, dict):  # a damaged event is a finding (check), not a crash
            payload = {}
        transition_id, state_text = _uuid(transition_id), None if state_id is None else str(state_id)
        command = recorded_command(payload, transition_id, stream_id=stream_id, command_id=command_id)
        context = recorded_context(payload, state_id=state_text)
        if stream_id != self._stream:
            self._stream, self._previous_seq, self._previous_run, self._previous_view = stream_id, 0, None, None
        creation = event_type == "task_run_created"
        previous = None if creation else self._previous_model()
        if (seq == self._previous_seq + 1 and command is not None and context is not None
                and (creation or previous is not None)):
            try:
                recomputed: Decision | None = _redecide(event_type, command, context, previous)
            except Exception:  # noqa: BLE001 - check() re-decides it and reports the failure
                recomputed = None
            if recomputed is not None and _reproduced(recomputed, stream_id, status, previous, transition_id,
                                                      payload_text):
                self._previous_seq, self._previous_run, self._previous_view = seq, None, recomputed.run
                self.by_text += 1
                return None
        return self.check(RecordedEvent(stream_id, seq, event_type, command, context,
                                        recorded_decision(payload, status, stream_id, transition_id=transition_id,
                                                          state_id=state_text)))

    def _previous_model(self) -> TaskRunView | None:
        if self._previous_view is None and isinstance(self._previous_run, Mapping):
            try:
                self._previous_view = TaskRunView.model_validate(self._previous_run)
            except ValueError:
                return None  # check() reports it
        return self._previous_view

    def check(self, event: RecordedEvent) -> Mismatch | None:
        if event.stream_id != self._stream:
            self._stream, self._previous_seq, self._previous_run, self._previous_view = event.stream_id, 0, None, None
        expected_seq = self._previous_seq + 1
        previous_run, previous_view = self._previous_run, self._previous_view
        if previous_run is None and previous_view is not None:  # reproduced by its text: not kept as JSON
            previous_run = previous_view.model_dump(mode="json")
        self._previous_seq = event.seq
        # A lean event's run takes the members fixed at creation from the run before it.
        # dict first: a dict is answered before the Mapping ABC's slower check runs.
        decision = (inherit_run(event.decision, previous_run)
                    if isinstance(event.decision, (dict, Mapping)) else None)
        self._previous_run = decision.get("run") if decision is not None else None
        self._previous_view = None

        if event.seq != expected_seq:
            return Mismatch(event.stream_id, event.seq, (f"seq: expected {expected_seq} (gap in the log)",))
        if decision is None or event.command is None or event.context is None:
            return Mismatch(event.stream_id, event.seq, ("the event records no command, context or decision",))
        try:
            recomputed = redecide(event, previous_run, previous_view)
        except Exception as exc:  # noqa: BLE001 - any failure to re-decide is a finding, not a crash
            return Mismatch(event.stream_id, event.seq, (f"re-deciding failed: {type(exc).__name__}: {exc}",))
        # One dump serves both the common answer (equal) and, rarely, naming what differs.
        diffs = compare(decision, recomputed)
        if not diffs:
            # The recorded run is the recomputed one as JSON, so it validates to it.
            self._previous_view = recomputed.run
            return None
        shown = diffs[:MAX_DIFFS_SHOWN]
        if len(diffs) > len(shown):
            shown.append(f"and {len(diffs) - len(shown)} more")
        return Mismatch(event.stream_id, event.seq, tuple(shown))


@dataclass
class VerifyReport:
    events: int  # task-run decisions re-decided
    mismatches: list[Mismatch]  # the first findings (verify_log's `keep`), in (stream_id, seq) order
    chained: int = 0  # events of every stream whose hash link was checked
    found: int = 0  # findings, all of them
    broken: int = 0  # of which broken hash links

    @property
    def ok(self) -> bool:
        return self.found == 0


# The columns verify_range reads, in this order: every hashed column (the ids as text, which is
# how the hash reads them) and the payload as the very text stored.
SCAN_COLUMNS = (
    "stream_id::text AS sid, seq, stream_type, event_type, command_id::text AS cid, transition_id::text AS tid,"
    " status, state_type, state_name, state_id::text AS stid, source_topic, source_partition, source_offset,"
    " source_digest, hash, payload::text AS payload"
)
CHAIN_BROKEN = ("hash chain broken: this event is not what was written after the one before it "
                "(a rewritten or inserted event)",)


# A column of few values (seqs, types, statuses, names, topics, partitions) is framed once a value;
# past this many values (a state's name is the client's) the cache starts again.
MAX_CACHED_CHUNKS = 4096


class ChainVerifier:
    """Feed rows of SCAN_COLUMNS of every stream in (stream_id, seq) order; get a Mismatch at
    the first event whose stored hash is not the hash of its columns chained to the previous
    event's (runstate/events.py, event_hash). The hashed bytes are the same, put together for
    less: the framed stream id once a stream, a column of few values once a value."""

    def __init__(self) -> None:
        self._stream: str | None = None
        self._stream_chunk = b""
        self._previous = GENESIS
        # The database gives these columns as str, int or None, which never collide as keys.
        self._chunks: dict[object, bytes] = {}

    def _chunk(self, value: object) -> bytes:
        if len(self._chunks) >= MAX_CACHED_CHUNKS:
            self._chunks.clear()
        chunk = self._chunks[value] = framed(value)
        return chunk

    def check(self, row: tuple[Any, ...]) -> Mismatch | None:
        (sid, seq, stream_type, event_type, cid, tid, status, state_type, state_name, stid,
         topic, partition, offset, digest, stored, payload) = row
        if sid != self._stream:
            self._stream, self._stream_chunk, self._previous = sid, framed(sid), GENESIS
        if stored is None:  # stored before events were chained
            self._previous = GENESIS
            return None
        known = self._chunks.get  # a framed value is never empty, so `or` asks _chunk only for a new one
        expected = chain_link(self._previous, (
            self._stream_chunk, known(seq) or self._chunk(seq),
            known(stream_type) or self._chunk(stream_type), known(event_type) or self._chunk(event_type),
            framed(cid), framed(tid), known(status) or self._chunk(status),
            known(state_type) or self._chunk(state_type), known(state_name) or self._chunk(state_name),
            framed(stid), known(topic) or self._chunk(topic), known(partition) or self._chunk(partition),
            framed(offset),
        ), None if digest is None else bytes(digest), payload)
        self._previous = stored = bytes(stored)
        if expected == stored:
            return None
        return Mismatch(UUID(sid), seq, CHAIN_BROKEN)


def recorded_event(row: Any) -> RecordedEvent:
    """What a stored task-run event recorded, from a row with stream_id, seq, event_type,
    command_id, transition_id, status, state_id and payload (as text)."""
    return _recorded(row.stream_id, row.seq, row.event_type, row.command_id, row.transition_id, row.status,
                     row.state_id, row.payload)


def _recorded(stream_id: UUID, seq: int, event_type: str, command_id: object, transition_id: object,
              status: str | None, state_id: object, payload_text: str) -> RecordedEvent:
    """A payload decoded for `check` (check_stored decodes its own, to re-decide before reading
    the recorded decision)."""
    payload = from_json(payload_text)
    if not isinstance(payload, dict):  # a damaged event is a finding (StreamVerifier), not a crash
        payload = {}
    # Either payload shape: the lean one (rendered from the row's columns) or the legacy one.
    return RecordedEvent(stream_id, seq, event_type,
                         recorded_command(payload, transition_id, stream_id=stream_id, command_id=command_id),
                         recorded_context(payload, state_id=state_id),
                         recorded_decision(payload, status, stream_id, transition_id=transition_id, state_id=state_id))


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
    mismatches: list[Mismatch]  # the first `keep`
    found: int = 0
    broken: int = 0


def scan(engine: Engine, condition: str, params: Mapping[str, Any], batch_size: int) -> Iterator[list[tuple[Any, ...]]]:
    """Batches of SCAN_COLUMNS rows matching `condition` (psycopg's %(name)s parameters), in
    (stream_id, seq) order, by keyset on the primary key, as plain tuples on the driver's
    connection (SQLAlchemy's rows cost more than the query). Each batch is its own short
    transaction, so none is held open across the scan (which would hold back vacuum on a live log)."""
    sql = (f"SELECT {SCAN_COLUMNS} FROM events WHERE ({condition})"
           " AND (stream_id, seq) > (%(last_stream)s::uuid, %(last_seq)s)"
           " ORDER BY stream_id, seq LIMIT %(batch)s")
    last: tuple[str, int] = (str(UUID(int=0)), 0)  # before every key: seq > 0
    pooled = engine.raw_connection()
    try:
        conn = pooled.driver_connection
        assert conn is not None  # a checked-out connection has its driver's
        with conn.cursor(binary=True) as cursor:
            while True:
                cursor.execute(sql, {**params, "last_stream": last[0], "last_seq": last[1], "batch": batch_size})
                batch = cursor.fetchall()
                conn.rollback()
                if batch:
                    yield batch
                if len(batch) < batch_size:
                    return
                last = (batch[-1][0], batch[-1][1])
    finally:
        pooled.close()


def verify_range(
    engine: Engine,
    condition: str,
    params: Mapping[str, Any],
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
    on_mismatch: Callable[[Mismatch], None] | None = None,
    keep: int = MAX_MISMATCHES_KEPT,
) -> RangeReport:
    """Check the hash chains and re-decide the task-run events of whole streams (those
    matching `condition`, with psycopg's %(name)s parameters), in (stream_id, seq) order.
    Memory stays that of a batch: one stream's previous run, the first `keep` findings, counts."""
    verifier = StreamVerifier()
    chain = ChainVerifier()
    report = RangeReport(0, 0, [])
    stream_text, stream_id = "", UUID(int=0)

    def found(mismatch: Mismatch) -> None:
        report.found += 1
        if len(report.mismatches) < keep:
            report.mismatches.append(mismatch)
            if on_mismatch:
                on_mismatch(mismatch)

    for rows in scan(engine, condition, params, batch_size):
        for row in rows:
            broken = chain.check(row)
            if broken is not None:
                report.broken += 1
                found(broken)
            if row[2] == "task_run":
                report.events += 1
                if row[0] != stream_text:  # one uuid object a stream, not one an event
                    stream_text, stream_id = row[0], uuid_of_text(row[0])
                mismatch = verifier.check_stored(stream_id, row[1], row[3], row[5], row[6], row[9], row[15],
                                                 command_id=row[4])
                if mismatch is not None:
                    found(mismatch)
        report.chained += len(rows)
        if on_batch:
            on_batch(len(rows))
    return report


def _scope(run_id: UUID | None, streams: StreamRange) -> tuple[str, dict[str, Any]]:
    """The condition of verify_range: one run, or a range of streams."""
    if run_id is not None:
        return "stream_id = %(run)s", {"run": run_id}
    return streams.condition(paramstyle="pyformat")


_worker_engine: Engine | None = None


def _verify_in_worker(streams: StreamRange, url: str, batch_size: int, keep: int) -> RangeReport:
    """One range, in a worker process (its engine lives as long as the process)."""
    global _worker_engine
    if _worker_engine is None:
        _worker_engine = create_engine(url, pool_size=1, max_overflow=0)
    condition, params = _scope(None, streams)
    return verify_range(_worker_engine, condition, params, batch_size, on_batch=report_progress, keep=keep)


def verify_log(
    engine: Engine,
    run_id: UUID | None = None,
    *,
    batch_size: int = 1000,
    workers: int = 1,
    min_range_events: int = MIN_RANGE_EVENTS,
    on_batch: Callable[[int], None] | None = None,
    on_mismatch: Callable[[Mismatch], None] | None = None,
    keep: int = MAX_MISMATCHES_KEPT,
) -> VerifyReport:
    """Check every stream's hash chain and replay every task-run decision (or one
    run's). The first `keep` findings are kept in the report and, if given,
    passed to on_mismatch as they are found (so a long run shows them early), both in
    (stream_id, seq) order, whatever the number of worker processes; all are counted."""
    if workers < 1:
        raise ValueError("workers must be positive")
    report = VerifyReport(events=0, mismatches=[])
    ranges = [WHOLE_LOG]
    if run_id is None and workers > 1:
        with engine.connect() as conn:
            ranges = plan_ranges(conn, workers, min_range_events)
    if len(ranges) == 1:
        condition, params = _scope(run_id, WHOLE_LOG)
        whole = verify_range(engine, condition, params, batch_size, on_batch, on_mismatch, keep)
        report.events, report.chained, report.mismatches = whole.events, whole.chained, whole.mismatches
        report.found, report.broken = whole.found, whole.broken
        return report
    url = sync_url(engine)
    for part in run_ranges(_verify_in_worker, ranges, (url, batch_size, keep), workers, on_batch):
        report.events += part.events
        report.chained += part.chained
        report.found += part.found
        report.broken += part.broken
        kept = part.mismatches[: keep - len(report.mismatches)]
        report.mismatches.extend(kept)
        if on_mismatch:
            for mismatch in kept:
                on_mismatch(mismatch)
    return report
