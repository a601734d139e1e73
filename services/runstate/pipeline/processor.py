"""Deciding a batch of Kafka records in memory.

`decide_batch` turns records plus a snapshot of what the store knew when the
batch began into everything the batch must write and publish. It does no I/O;
the clock and id source are injected so the consumer and the tests drive it
the same way. Commands of one stream are decided in record order, each against
the state the previous one left, so a batch holding several commands of one run
needs no extra round trip.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any
from uuid import UUID

from pydantic import BaseModel, TypeAdapter, ValidationError

from runstate import strict_json

from runstate.domain import (
    CacheEntry,
    Decision,
    FlowRunView,
    Lease,
    OrchestrationContext,
    OrchestrationFailure,
    OrchestrationResult,
    OrchestrationSettings,
    SetStateStatus,
    State,
    StateCreate,
    StateType,
    TagLimit,
    TaskRunView,
    apply_initial_state,
    decide,
)
from runstate.messages import (
    COMMAND_ADAPTER,
    Command,
    CreateFlowRunCommand,
    CreateTaskRunCommand,
    ErrorInfo,
    OrchestrationResultEvent,
    SetFlowRunStateCommand,
    SetStateCommand,
    StateChangeEvent,
    StateRef,
    stream_id_of,
)

log = logging.getLogger("runstate.decider")

# What a result or state change may weigh when the topics' limits are not known:
# Kafka's default max.message.bytes, less room for the key and headers.
DEFAULT_MAX_MESSAGE_BYTES = 1_048_588 - 4096
RECORD_NAMESPACE = UUID("5d1f6a0e-8f1c-4c7e-9a57-2c4f1b7d0e11")
FINAL_STATUSES = frozenset({SetStateStatus.ACCEPT, SetStateStatus.REJECT, SetStateStatus.ABORT})


@dataclass(frozen=True, slots=True)
class IncomingRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    # What the record holds, so that a redelivery is told apart from a new
    # record at a reused position (a recreated topic, an offset reset).
    digest: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "digest", record_digest(self.key, self.value))

    def derived_id(self) -> UUID:
        """Stable id of this record: a redelivery gets the same one, a new
        record at the same position another."""
        return uuid.uuid5(RECORD_NAMESPACE, f"{self.topic}/{self.partition}/{self.offset}/{self.digest.hex()}")


def record_digest(key: bytes | None, value: bytes | None) -> bytes:
    """128 bits of SHA-256 over the key and the value, each told apart from absent."""
    h = hashlib.sha256()
    for part in (key, value):
        h.update(b"-" if part is None else b"%d:" % len(part))
        h.update(part or b"")
    return h.digest()[:16]


@dataclass(slots=True)
class StreamHead:
    view: Any  # TaskRunView or FlowRunView
    last_seq: int
    # The view as JSON when a decision already wrote it (for the payload), so
    # the projection upsert does not serialise it again.
    view_json: str | None = None


@dataclass(slots=True)
class StoredOutcome:
    """What was published for an already-decided command, to publish again."""

    result_event: str
    state_change: str | None
    key: bytes
    # For a lookup by source: what identifies the record that was decided.
    digest: bytes | None = None
    command_id: UUID | None = None

    def decided(self, item: "ParsedCommand") -> bool:
        """Whether this stored outcome is the decision of `item`'s record."""
        if self.digest is not None:
            return self.digest == item.record.digest
        # Written before digests were stored: the same command id, given by the
        # sender or derived from the position as it was derived then.
        legacy = uuid.uuid5(RECORD_NAMESPACE, f"{item.record.topic}/{item.record.partition}/{item.record.offset}")
        return self.command_id in (item.command.command_id, legacy)


@dataclass
class StoreSnapshot:
    task_runs: dict[UUID, StreamHead] = field(default_factory=dict)
    flow_runs: dict[UUID, StreamHead] = field(default_factory=dict)
    by_source: dict[tuple[int, int], StoredOutcome] = field(default_factory=dict)
    by_transition: dict[tuple[UUID, UUID], StoredOutcome] = field(default_factory=dict)
    cache: dict[str, list[CacheEntry]] = field(default_factory=dict)
    tag_limits: dict[str, TagLimit] = field(default_factory=dict)
    leases: dict[UUID, list[Lease]] = field(default_factory=dict)


@dataclass(slots=True)
class EventRow:
    stream_id: UUID
    seq: int
    stream_type: str
    event_type: str
    command_id: UUID
    transition_id: UUID | None
    status: str | None
    state_type: str | None
    state_name: str | None
    state_id: UUID | None
    payload: str
    source_topic: str
    source_partition: int
    source_offset: int
    source_digest: bytes

    @classmethod
    def of(
        cls,
        item: "ParsedCommand",
        stream_id: UUID,
        seq: int,
        stream_type: str,
        event_type: str,
        transition_id: UUID | None,
        status: str,
        appended: State | None,
        payload: str,
    ) -> "EventRow":
        """The row recording one decided command, with the record it came from."""
        return cls(
            stream_id=stream_id,
            seq=seq,
            stream_type=stream_type,
            event_type=event_type,
            command_id=item.command_id,
            transition_id=transition_id,
            status=status,
            state_type=appended.type.value if appended else None,
            state_name=appended.name if appended else None,
            state_id=appended.id if appended else None,
            payload=payload,
            source_topic=item.record.topic,
            source_partition=item.record.partition,
            source_offset=item.record.offset,
            source_digest=item.record.digest,
        )


@dataclass(slots=True)
class Publication:
    key: bytes | None
    value: str


@dataclass(slots=True)
class DeadLetter:
    record: IncomingRecord
    error: ErrorInfo


@dataclass
class BatchOutcome:
    events: list[EventRow] = field(default_factory=list)
    task_run_heads: dict[UUID, StreamHead] = field(default_factory=dict)
    flow_run_heads: dict[UUID, StreamHead] = field(default_factory=dict)
    cache_rows: list[CacheEntry] = field(default_factory=list)
    leases_added: list[Lease] = field(default_factory=list)
    leases_removed: list[UUID] = field(default_factory=list)
    slot_deltas: dict[str, int] = field(default_factory=dict)
    results: list[Publication] = field(default_factory=list)
    state_changes: list[Publication] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    duplicates: int = 0

    def absorb(self, other: "BatchOutcome") -> None:
        """Add what another (already stored) outcome publishes and counts."""
        self.events += other.events
        self.results += other.results
        self.state_changes += other.state_changes
        self.dead_letters += other.dead_letters
        self.duplicates += other.duplicates


@dataclass(slots=True)
class ParsedCommand:
    record: IncomingRecord
    command: Command
    command_id: UUID
    stream_id: UUID

    @property
    def transition_id(self) -> UUID | None:
        """The idempotency key of a set_state: the proposal's transition_id or,
        when the sender gave none, the command id (itself derived from the
        Kafka record when absent), so a redelivery is always recognised."""
        if isinstance(self.command, SetStateCommand):
            return self.command.state.state_details.transition_id or self.command_id
        return None


@dataclass(slots=True)
class BadRecord:
    record: IncomingRecord
    error: ErrorInfo
    stream_id: UUID | None
    command_kind: str
    command_id: UUID | None = None


# "\u0000" preceded by an even number of backslashes: the escape itself, not the
# text "\\u0000". The log keeps the payload as json (which would take it), but
# the projections, the audit's jsonb and Prefect's text columns cannot.
NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
# Error messages quote little of what they refuse: they travel in results and headers.
MAX_ERROR_MESSAGE = 1000
# A bad record's own key is echoed on its answer only when it is plausibly an id.
MAX_ECHOED_KEY = 256


def parse_record(record: IncomingRecord, max_bytes: int) -> ParsedCommand | BadRecord:
    """Validate one record; bad input is described, never raised."""
    try:
        return _parse(record, max_bytes)
    except Exception as exc:  # noqa: BLE001 - a parser bug must not stall the partition
        log.exception("parsing the record at %s[%d]@%d failed", record.topic, record.partition, record.offset)
        return _bad(record, "orchestration_failed", f"{type(exc).__name__}: {exc}", "unknown")


def _parse(record: IncomingRecord, max_bytes: int) -> ParsedCommand | BadRecord:
    value = record.value
    if value is None:
        return _bad(record, "invalid_command", "a tombstone (a record without a value) is not a command", "unknown")
    if len(value) > max_bytes:
        return _bad(record, "too_large", f"command is {len(value)} bytes; the limit is {max_bytes}", "unknown")
    try:
        document = strict_json.loads(value)
    except strict_json.StrictJSONError as exc:
        return _bad(record, "invalid_command", str(exc), "unknown")
    kind = _kind_of(document)
    if b"\\u0000" in value and NUL_ESCAPE.search(value):
        return _bad(record, "invalid_command", "a string holds U+0000, which PostgreSQL text cannot store", kind)
    try:
        command = COMMAND_ADAPTER.validate_python(document)
    except ValidationError as exc:
        return _bad(record, "invalid_command", _describe(exc), kind)
    stream_id = stream_id_of(command)
    # Keyed by anything but the run's id, the record sits in a partition other
    # than its run's: deciding it would race that run's own commands.
    if record.key != str(stream_id).encode():
        return BadRecord(
            record,
            ErrorInfo(code="key_mismatch", message=_key_mismatch(record.key, stream_id)),
            stream_id,
            command.kind,
            command.command_id,
        )
    return ParsedCommand(record, command, command.command_id or record.derived_id(), stream_id)


def _bad(record: IncomingRecord, code: str, message: str, command_kind: str) -> BadRecord:
    # The key is read only for a bad record: a good one names its run itself.
    return BadRecord(record, ErrorInfo(code=code, message=message[:MAX_ERROR_MESSAGE]),
                     _stream_id_from_key(record.key), command_kind)


def _key_mismatch(key: bytes | None, stream_id: UUID) -> str:
    shown = "no key" if key is None else f"the key {key[:64]!r}"
    return f"the record has {shown}; commands of run {stream_id} must be keyed by {str(stream_id)!r}"


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_input=False, include_url=False)[:5]:
        where = ".".join(str(p)[:64] for p in error["loc"]) or "<body>"
        parts.append(f"{where}: {error['msg'][:200]}")
    more = exc.error_count() - 5
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _kind_of(document: Any) -> str:
    kind = document.get("kind") if isinstance(document, dict) else None
    return kind if isinstance(kind, str) and len(kind) < 64 else "unknown"


def _stream_id_from_key(key: bytes | None) -> UUID | None:
    if not key or len(key) > 64:
        return None
    try:
        return UUID(key.decode())
    except (ValueError, UnicodeDecodeError):
        return None


UUID7_RANDOM_BYTES = 10
IDS_PER_URANDOM_CALL = 64
_UUID7_VERSION_AND_VARIANT = 0x7 << 76 | 0b10 << 62
_UUID7_RAND_A = 0xFFF << 64  # rand_a, beside the version: bits 62-73 of the draw
_UUID7_RAND_B = (1 << 62) - 1  # rand_b, after the variant: the draw's low 62 bits


class IdMinter:
    """Mints time-ordered ids (RFC 9562 v7), as Prefect mints state ids.

    One os.urandom call serves many ids, rather than a system call per id."""

    def __init__(self) -> None:
        self._random = b""
        self._used = 0

    def uuid7(self, now: datetime) -> UUID:
        if self._used == len(self._random):
            self._random = os.urandom(UUID7_RANDOM_BYTES * IDS_PER_URANDOM_CALL)
            self._used = 0
        rand = int.from_bytes(self._random[self._used : self._used + UUID7_RANDOM_BYTES], "big")
        self._used += UUID7_RANDOM_BYTES
        millis = int(now.timestamp() * 1000)
        return UUID(
            int=(millis & ((1 << 48) - 1)) << 80
            | _UUID7_VERSION_AND_VARIANT
            | (rand << 2) & _UUID7_RAND_A
            | rand & _UUID7_RAND_B
        )


def draw_for(command_id: UUID) -> float:
    """The one uniform draw a decision may use, fixed by the command so that a
    recorded decision replays identically."""
    digest = hashlib.sha256(command_id.bytes).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def system_clock() -> datetime:
    return datetime.now(UTC)


ONE_MICROSECOND = timedelta(microseconds=1)


# -- JSON of a task decision's messages ---------------------------------------
# A decision's state and result recur in the result event and the state change,
# and serialising every repetition cost more than running the rules. So each part
# is serialised once and the messages are assembled from the parts, each member
# written exactly as model_dump_json writes it.

_DATETIME_SERIALIZER = TypeAdapter(datetime).serializer
_UUID_SERIALIZER = TypeAdapter(UUID).serializer
_STRING_SERIALIZER = TypeAdapter(str).serializer


@cache
def _field_names(model: type[BaseModel]) -> tuple[str, ...]:
    return tuple(model.model_fields)


def _render(model: type[BaseModel], **members: str) -> str:
    """What `model_dump_json` writes for a `model` whose members serialise to these values."""
    rendered = "{" + ",".join([f'"{name}":{members.pop(name)}' for name in _field_names(model)]) + "}"
    if members:
        raise TypeError(f"{model.__name__} has no field {next(iter(members))!r}")
    return rendered


def _json(model: BaseModel | None) -> str:
    return "null" if model is None else model.model_dump_json()


def _uuid_json(value: UUID | None) -> str:
    return "null" if value is None else _UUID_SERIALIZER.to_json(value).decode()


def _datetime_json(value: datetime) -> str:
    return _DATETIME_SERIALIZER.to_json(value).decode()


def _json_string(value: str) -> str:
    return _STRING_SERIALIZER.to_json(value).decode()


class BatchDecider:
    """Folds one batch of commands into a BatchOutcome."""

    def __init__(
        self,
        snapshot: StoreSnapshot,
        settings: OrchestrationSettings,
        clock: Callable[[], datetime] = system_clock,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.snapshot = snapshot
        self.settings = settings
        self.clock = clock
        self.max_message_bytes = max_message_bytes
        self.ids = IdMinter()
        self.out = BatchOutcome()

    # -- entry point ------------------------------------------------------
    def run(self, items: Sequence[ParsedCommand | BadRecord]) -> BatchOutcome:
        for item in items:
            if isinstance(item, BadRecord):
                self._reject(item.record, item.error, item.stream_id, item.command_kind, dead_letter=True,
                             command_id=item.command_id)
                continue
            prior = self.snapshot.by_source.get((item.record.partition, item.record.offset))
            if prior is not None and prior.decided(item):
                self._republish(prior)
                continue
            try:
                self._decide(item)
            except OverflowError as exc:
                # Times the rules compute from this command and its run's policy
                # fall outside what a datetime holds: the input's fault, not ours.
                self._refuse(item, "invalid_command", f"the proposal cannot be decided: {exc}", dead_letter=True)
            except Exception as exc:  # noqa: BLE001 - one command's failure must not stall the partition
                log.exception("deciding command %s failed", item.command_id)
                self._refuse(item, "orchestration_failed", f"{type(exc).__name__}: {exc}", dead_letter=True)
        return self.out

    def _decide(self, item: ParsedCommand) -> None:
        command = item.command
        if isinstance(command, SetStateCommand):
            self._set_task_run_state(item, command)
        elif isinstance(command, CreateTaskRunCommand):
            self._create_task_run(item, command)
        elif isinstance(command, CreateFlowRunCommand):
            self._create_flow_run(item, command)
        else:
            self._set_flow_run_state(item, command)

    # -- task runs --------------------------------------------------------
    def _set_task_run_state(self, item: ParsedCommand, command: SetStateCommand) -> None:
        head = self.snapshot.task_runs.get(command.task_run_id)
        if head is None:
            self._refuse(item, "unknown_run", f"Task run with id {command.task_run_id} not found", dead_letter=True)
            return
        transition_id = item.transition_id
        prior = self.snapshot.by_transition.get((command.task_run_id, transition_id))
        if prior is not None:
            self._republish(prior)
            return
        if command.state.state_details.transition_id is None:
            details = command.state.state_details.model_copy(update={"transition_id": transition_id})
            command = command.model_copy(update={"state": command.state.model_copy(update={"state_details": details})})
        run: TaskRunView = head.view
        ctx = self._context(run, command.state, item.command_id)
        try:
            decision = decide(run, command.request(), ctx)
        except OrchestrationFailure as exc:
            # Prefect answers these with an HTTP error and writes nothing; here
            # the command is answered with the error and parked, not retried.
            code = "unknown_run" if exc.http_status == 404 else "orchestration_failed"
            self._refuse(item, code, str(exc), dead_letter=True)
            return
        self._record_task_decision(item, command, head, ctx, decision, transition_id, "transition_decided")

    def _create_task_run(self, item: ParsedCommand, command: CreateTaskRunCommand) -> None:
        if command.id in self.snapshot.task_runs:
            self._refuse(item, "already_exists", f"Task run with id {command.id} already exists", dead_letter=False)
            return
        run = command.new_run()
        initial = command.initial_state()
        transition_id = initial.state_details.transition_id
        ctx = self._context(run, initial, item.command_id)
        decision = apply_initial_state(run, initial, ctx)
        head = StreamHead(view=run, last_seq=0)
        if self._record_task_decision(item, command, head, ctx, decision, transition_id, "task_run_created"):
            self.snapshot.task_runs[command.id] = head

    def _context(self, run: TaskRunView, proposed: StateCreate, command_id: UUID) -> OrchestrationContext:
        now = self.clock()
        # States of one run get strictly increasing timestamps, as Prefect's
        # (task_run_id, timestamp) uniqueness demands, even within a batch.
        if run.state is not None and now <= run.state.timestamp:
            now = run.state.timestamp + ONE_MICROSECOND
        cache_key = proposed.state_details.cache_key
        flow = None
        if run.flow_run_id is not None:
            flow_head = self.snapshot.flow_runs.get(run.flow_run_id)
            flow = flow_head.view if flow_head else None
        needs_tags = bool(run.tags)
        return OrchestrationContext(
            now=now,
            new_state_id=self.ids.uuid7(now),
            new_lease_id=self.ids.uuid7(now),
            random=draw_for(command_id),
            flow_run=flow,
            cache_entries=self.snapshot.cache.get(cache_key, []) if cache_key and proposed.type == StateType.RUNNING else [],
            tag_limits={t: self.snapshot.tag_limits[t] for t in run.tags if t in self.snapshot.tag_limits} if needs_tags else {},
            leases=self.snapshot.leases.get(run.id, []) if needs_tags else [],
            settings=self.settings,
        )

    def _record_task_decision(
        self,
        item: ParsedCommand,
        command: SetStateCommand | CreateTaskRunCommand,
        head: StreamHead,
        ctx: OrchestrationContext,
        decision: Decision,
        transition_id: UUID | None,
        event_type: str,
    ) -> bool:
        """Record the decision and its messages; False when they would not fit
        the topics, in which case the command is refused and nothing changes."""
        previous: TaskRunView = head.view
        seq = head.last_seq + 1
        run_id = previous.id
        key = str(run_id).encode()
        appended = decision.appended_state
        result = decision.result
        # Serialised once, each goes into every message that repeats it.
        appended_json = _json(appended)
        run_id_json = _uuid_json(run_id)
        transition_id_json = _uuid_json(transition_id)
        status_json = _json_string(result.status.value)
        result_json = _render(
            OrchestrationResult,
            state=appended_json if result.state is appended else _json(result.state),
            status=status_json,
            details=result.details.model_dump_json(),
        )
        result_event_json = _render(
            OrchestrationResultEvent,
            command_id=_uuid_json(item.command_id),
            command_kind=_json_string(command.kind),
            stream_id=run_id_json,
            transition_id=transition_id_json,
            seq=str(seq),
            status=status_json,
            result=result_json,
            state_appended="false" if appended is None else "true",
            error="null",
            decided_at=_datetime_json(ctx.now),
        )
        change_json = None
        if appended is not None:
            from_state = previous.state if event_type != "task_run_created" else None
            change_json = _render(
                StateChangeEvent,
                task_run_id=run_id_json,
                flow_run_id=_uuid_json(previous.flow_run_id),
                seq=str(seq),
                from_state=_json(
                    StateRef(type=from_state.type, name=from_state.name, id=from_state.id) if from_state else None
                ),
                to_state=appended_json,
                status=status_json,
                transition_id=transition_id_json,
                timestamp=_datetime_json(appended.timestamp),
            )
        too_big = self._oversized(result_event_json, change_json)
        if too_big:
            self._refuse(item, "too_large", too_big, dead_letter=True)
            return False
        decision_json = _render(
            Decision,
            result=result_json,
            appended_state=appended_json,
            run=(run_json := decision.run.model_dump_json()),
            effects="[" + ",".join(effect.model_dump_json() for effect in decision.effects) + "]",
            policy=_json_string(decision.policy),
        )
        payload = (
            f'{{"command":{command.model_dump_json()},"context":{ctx.model_dump_json()},'
            f'"decision":{decision_json},"result_event":{result_event_json},"state_change":{change_json or "null"}}}'
        )
        self.out.events.append(
            EventRow.of(item, run_id, seq, "task_run", event_type, transition_id,
                        result.status.value, appended, payload)
        )
        head.view, head.view_json = decision.run, run_json
        head.last_seq = seq
        self.out.task_run_heads[run_id] = head
        self.out.results.append(Publication(key, result_event_json))
        if change_json is not None:
            self.out.state_changes.append(Publication(key, change_json))
        stored = StoredOutcome(result_event_json, change_json, key)
        if transition_id is not None and result.status in FINAL_STATUSES:
            self.snapshot.by_transition[(run_id, transition_id)] = stored
        self._apply_effects(decision, run_id)
        return True

    def _oversized(self, *messages: str | None) -> str | None:
        """Why these messages would not fit their topics, if they would not."""
        limit = self.max_message_bytes
        for message in messages:
            # len() counts characters: bytes are at most 4 times as many.
            if message is not None and len(message) * 4 > limit and (size := len(message.encode())) > limit:
                return (f"the decision's messages would be {size} bytes; the result and state-change"
                        f" topics take {limit}")
        return None

    def _apply_effects(self, decision: Decision, run_id: UUID) -> None:
        for effect in decision.effects:
            kind = effect.kind
            if kind == "cache_inserted":
                state = decision.appended_state
                entry = CacheEntry(
                    cache_key=effect.cache_key,
                    cache_expiration=effect.cache_expiration,
                    created=state.timestamp,
                    state=state,
                )
                self.snapshot.cache.setdefault(effect.cache_key, []).append(entry)
                self.out.cache_rows.append(entry)
            elif kind == "slots_taken":
                lease = Lease(id=effect.lease_id, tags=list(effect.tags), slots=effect.slots, holder_run_id=run_id)
                self.snapshot.leases.setdefault(run_id, []).append(lease)
                self.out.leases_added.append(lease)
                for tag in effect.tags:
                    self._shift_slots(tag, effect.slots)
            elif kind == "slots_released":
                held = {lease.id: lease for lease in self.snapshot.leases.get(run_id, [])}
                for lease_id in effect.lease_ids:
                    lease = held.pop(lease_id, None)
                    if lease is None:
                        continue
                    for tag in lease.tags:
                        self._shift_slots(tag, -lease.slots)
                    if lease in self.out.leases_added:
                        self.out.leases_added.remove(lease)
                    else:
                        self.out.leases_removed.append(lease_id)
                self.snapshot.leases[run_id] = list(held.values())
            # TaskScheduled is carried by the recorded decision and its state change.

    def _shift_slots(self, tag: str, delta: int) -> None:
        limit = self.snapshot.tag_limits.get(tag)
        if limit is None:
            return
        self.snapshot.tag_limits[tag] = limit.model_copy(
            update={"active_slots": max(0, limit.active_slots + delta)}
        )
        self.out.slot_deltas[tag] = self.out.slot_deltas.get(tag, 0) + delta

    # -- flow runs (recorded as given; they are context for task rules) --------
    def _create_flow_run(self, item: ParsedCommand, command: CreateFlowRunCommand) -> None:
        if command.id in self.snapshot.flow_runs:
            self._refuse(item, "already_exists", f"Flow run with id {command.id} already exists", dead_letter=False)
            return
        head = StreamHead(view=FlowRunView(id=command.id), last_seq=0)
        self.snapshot.flow_runs[command.id] = head
        self._record_flow_state(item, command, head, command.state, "flow_run_created")

    def _set_flow_run_state(self, item: ParsedCommand, command: SetFlowRunStateCommand) -> None:
        head = self.snapshot.flow_runs.get(command.flow_run_id)
        if head is None:
            self._refuse(item, "unknown_run", f"Flow run with id {command.flow_run_id} not found", dead_letter=True)
            return
        self._record_flow_state(item, command, head, command.state, "flow_run_state_set")

    def _record_flow_state(
        self,
        item: ParsedCommand,
        command: CreateFlowRunCommand | SetFlowRunStateCommand,
        head: StreamHead,
        proposed: StateCreate | None,
        event_type: str,
    ) -> None:
        flow: FlowRunView = head.view
        now = self.clock()
        state = None
        if proposed is not None:
            details = proposed.state_details
            if proposed.type == StateType.SCHEDULED and details.scheduled_time is None:
                details = details.model_copy(update={"scheduled_time": now})
            details = details.model_copy(update={"flow_run_id": flow.id})
            state = State(
                id=self.ids.uuid7(now),
                type=proposed.type,
                name=proposed.name,
                timestamp=now,
                message=proposed.message,
                data=proposed.data,
                state_details=details,
            )
            flow = flow.model_copy(
                update={
                    "state_type": state.type,
                    "state_name": state.name,
                    "run_count": flow.run_count + (1 if state.type == StateType.RUNNING else 0),
                    "pause_timeout": details.pause_timeout,
                    "pause_reschedule": bool(details.pause_reschedule),
                }
            )
        seq = head.last_seq + 1
        key = str(flow.id).encode()
        result_event = OrchestrationResultEvent(
            command_id=item.command_id,
            command_kind=command.kind,
            stream_id=flow.id,
            transition_id=state.state_details.transition_id if state else None,
            seq=seq,
            status=SetStateStatus.ACCEPT,
            state_appended=state is not None,
            decided_at=now,
        )
        result_json = result_event.model_dump_json()
        payload = (
            '{"command":' + command.model_dump_json()
            + ',"state":' + (state.model_dump_json() if state else "null")
            + ',"flow_run":' + flow.model_dump_json()
            + ',"result_event":' + result_json
            + ',"state_change":null}'
        )
        self.out.events.append(
            EventRow.of(item, flow.id, seq, "flow_run", event_type, None, "ACCEPT", state, payload)
        )
        head.view = flow
        head.last_seq = seq
        self.out.flow_run_heads[flow.id] = head
        self.out.results.append(Publication(key, result_json))

    # -- answers without a new event --------------------------------------
    def _republish(self, prior: StoredOutcome) -> None:
        self.out.duplicates += 1
        self.out.results.append(Publication(prior.key, prior.result_event))
        if prior.state_change is not None:
            self.out.state_changes.append(Publication(prior.key, prior.state_change))

    def _refuse(self, item: ParsedCommand, code: str, message: str, *, dead_letter: bool) -> None:
        """Answer a well-formed command that cannot be decided, without an event."""
        self._reject(
            item.record,
            ErrorInfo(code=code, message=message),
            item.stream_id,
            item.command.kind,
            dead_letter=dead_letter,
            command_id=item.command_id,
        )

    def _reject(
        self,
        record: IncomingRecord,
        error: ErrorInfo,
        stream_id: UUID | None,
        command_kind: str,
        *,
        dead_letter: bool,
        command_id: UUID | None = None,
    ) -> None:
        if dead_letter:
            self.out.dead_letters.append(DeadLetter(record, error))
        event = OrchestrationResultEvent(
            command_id=command_id or record.derived_id(),
            command_kind=command_kind,
            stream_id=stream_id,
            error=error,
        )
        if stream_id is not None:
            key: bytes | None = str(stream_id).encode()
        else:
            key = record.key if record.key is not None and len(record.key) <= MAX_ECHOED_KEY else None
        self.out.results.append(Publication(key, event.model_dump_json()))


def decide_batch(
    items: Sequence[ParsedCommand | BadRecord],
    snapshot: StoreSnapshot,
    settings: OrchestrationSettings,
    clock: Callable[[], datetime] = system_clock,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> BatchOutcome:
    return BatchDecider(snapshot, settings, clock, max_message_bytes).run(items)
