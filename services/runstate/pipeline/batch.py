"""Deciding a batch of records in memory.

`decide_batch` turns parsed records plus a snapshot of what the store knew
when the batch began into everything the batch must write and publish. It does
no I/O; the clock and id source are injected so the consumer and the tests
drive it the same way. Commands of one stream are decided in record order, each
against the state the previous one left, so a batch holding several commands
of one run needs no extra round trip. `first_request` and `second_request` say
what the decisions will read, for the store to fetch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from uuid import UUID

from runstate.domain import (
    CacheEntry,
    CacheInserted,
    Decision,
    FlowRunView,
    Lease,
    OrchestrationContext,
    OrchestrationFailure,
    OrchestrationResult,
    OrchestrationSettings,
    SetStateRequest,
    SetStateStatus,
    SlotsReleased,
    SlotsTaken,
    StateCreate,
    StateType,
    TagLimit,
    TaskRunView,
    apply_initial_state,
    decide,
    record_flow_state,
)
from runstate.domain.unchecked import build, replace
from runstate.events import (
    EventType,
    FlowRunEventPayload,
    LimitEventPayload,
    StreamType,
)
from runstate.messages import (
    LIMIT_KINDS,
    CreateFlowRunCommand,
    CreateTaskRunCommand,
    DeleteConcurrencyLimitCommand,
    ErrorCode,
    ErrorInfo,
    LimitResultEvent,
    OrchestrationResultEvent,
    SetConcurrencyLimitCommand,
    SetFlowRunStateCommand,
    SetStateCommand,
    StateChangeEvent,
)
from runstate.pipeline.ids import IdMinter, draw_for, system_clock
from runstate.pipeline.message_json import (
    SCHEMA_VERSION_JSON,
    datetime_json,
    details_json,
    lean_context_json,
    lean_decision_json,
    lean_payload_json,
    model_json,
    render,
    state_ref_json,
    stored_command_json,
    string_json,
    uuid_json,
)
from runstate.pipeline.message_json import result_event_json as result_event_json_of
from runstate.pipeline.ports import (
    BatchOutcome,
    DeadLetter,
    EventRow,
    Publication,
    SnapshotRequest,
    StoredOutcome,
    StoreSnapshot,
    StreamHead,
)
from runstate.pipeline.records import MAX_ECHOED_KEY, BadRecord, IncomingRecord, ParsedCommand

log = logging.getLogger("runstate.decider")

# What a result or state change may weigh when the topics' limits are not known:
# Kafka's default max.message.bytes, less room for the key and headers.
DEFAULT_MAX_MESSAGE_BYTES = 1_048_588 - 4096
FINAL_STATUSES = frozenset({SetStateStatus.ACCEPT, SetStateStatus.REJECT, SetStateStatus.ABORT})
ONE_MICROSECOND = timedelta(microseconds=1)
TASK_KINDS = ("set_task_run_state", "create_task_run")
# Members read once: reading one off its class is a Python-level lookup (enum.property) in 3.11.
_RUNNING = StateType.RUNNING
_TASK_RUN_CREATED, _TRANSITION_DECIDED = EventType.TASK_RUN_CREATED, EventType.TRANSITION_DECIDED
_TASK_RUN_STREAM = StreamType.TASK_RUN


def first_request(parsed: Sequence[ParsedCommand], topic: str, now: datetime) -> SnapshotRequest:
    """What the commands name: their records, runs, transitions, cache keys and limit streams."""
    flow_runs = {p.stream_id for p in parsed if p.command.kind not in TASK_KINDS + LIMIT_KINDS}
    flow_runs.update(
        p.command.flow_run_id
        for p in parsed
        if isinstance(p.command, CreateTaskRunCommand) and p.command.flow_run_id
    )
    return SnapshotRequest(
        now=now,
        source_topic=topic,
        sources=[(p.record.partition, p.record.offset) for p in parsed],
        digests={p.record.digest for p in parsed},
        task_run_ids={p.stream_id for p in parsed if p.command.kind in TASK_KINDS},
        flow_run_ids=flow_runs,
        transitions=[(p.stream_id, tid) for p in parsed if (tid := p.transition_id) is not None],
        cache_keys={
            key
            for p in parsed
            if isinstance(p.command, SetStateCommand)
            and p.command.state.type is _RUNNING
            and (key := p.command.state.state_details.cache_key)
        },
        limit_streams={p.stream_id for p in parsed if p.command.kind in LIMIT_KINDS},
        commands=[(p.stream_id, p.command_id) for p in parsed if p.command.kind in LIMIT_KINDS],
    )


def second_request(parsed: Sequence[ParsedCommand], first: SnapshotRequest, snap: StoreSnapshot) -> SnapshotRequest:
    """What the runs found point to: their flow runs, their tags' limits and leases;
    and the limits the limit commands change (locked with the others, in tag order)."""
    heads = [h.view for h in snap.task_runs.values()]
    new_tags = {tag for p in parsed if isinstance(p.command, CreateTaskRunCommand) for tag in p.command.tags}
    new_tags.update(p.command.tag for p in parsed
                    if isinstance(p.command, SetConcurrencyLimitCommand | DeleteConcurrencyLimitCommand))
    return SnapshotRequest(
        now=first.now,
        flow_run_ids={run.flow_run_id for run in heads if run.flow_run_id is not None} - first.flow_run_ids,
        tags=new_tags.union(*(run.tags for run in heads)),
        lease_holders={run.id for run in heads if run.tags},
    )


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
        self.limit_tags: set[str] = set()  # tags whose limit a command of this batch changed

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
        for tag in self.limit_tags:
            # The row is written whole (it is locked), so its slot changes go with it.
            self.out.limit_rows[tag] = self.snapshot.tag_limits.get(tag)
            self.out.slot_deltas.pop(tag, None)
        return self.out

    def _decide(self, item: ParsedCommand) -> None:
        command = item.command
        if isinstance(command, SetStateCommand):
            self._set_task_run_state(item, command)
        elif isinstance(command, CreateTaskRunCommand):
            self._create_task_run(item, command)
        elif isinstance(command, CreateFlowRunCommand):
            self._create_flow_run(item, command)
        elif isinstance(command, SetFlowRunStateCommand):
            self._set_flow_run_state(item, command)
        else:
            self._change_limit(item, command)

    # -- task runs --------------------------------------------------------
    def _set_task_run_state(self, item: ParsedCommand, command: SetStateCommand) -> None:
        head = self.snapshot.task_runs.get(command.task_run_id)
        if head is None:
            self._refuse(item, "unknown_run", f"Task run with id {command.task_run_id} not found", dead_letter=True)
            return
        transition_id = item.transition_id
        assert transition_id is not None  # a set_state always has one: its own or its command id
        prior = self.snapshot.by_transition.get((command.task_run_id, transition_id))
        if prior is not None:
            self._republish(prior)
            return
        state = command.state
        if state.state_details.transition_id is None:
            state = replace(state, state_details=replace(state.state_details, transition_id=transition_id))
            command = replace(command, state=state)
        run: TaskRunView = head.view
        ctx = self._context(run, state, item.command_id)
        try:
            decision = decide(run, build(SetStateRequest, {"state": state, "force": command.force}), ctx)
        except OrchestrationFailure as exc:
            # Prefect answers these with an HTTP error and writes nothing; here
            # the command is answered with the error and parked, not retried.
            code: ErrorCode = "unknown_run" if exc.http_status == 404 else "orchestration_failed"
            self._refuse(item, code, str(exc), dead_letter=True)
            return
        self._record_task_decision(item, command, head, ctx, decision, transition_id, _TRANSITION_DECIDED)

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
        if self._record_task_decision(item, command, head, ctx, decision, transition_id, _TASK_RUN_CREATED):
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
        fields = {
            "now": now,
            "new_state_id": self.ids.uuid7(now),
            "new_lease_id": self.ids.uuid7(now),
            "random": draw_for(command_id),
            "flow_run": flow,
            # Copies, as validation would make: the snapshot's lists change as the batch goes on.
            "cache_entries": list(self.snapshot.cache.get(cache_key, ()))
            if cache_key and proposed.type is _RUNNING else [],
            "tag_limits": {t: self.snapshot.tag_limits[t] for t in run.tags if t in self.snapshot.tag_limits}
            if needs_tags else {},
            "leases": list(self.snapshot.leases.get(run.id, ())) if needs_tags else [],
            "settings": self.settings,
        }
        if now.tzinfo is not UTC:  # a clock of another zone: let validation convert it, as it always has
            return OrchestrationContext(**fields)
        # Every other value is of its field's type already: validating it again only costs.
        return build(OrchestrationContext, fields)

    def _record_task_decision(
        self,
        item: ParsedCommand,
        command: SetStateCommand | CreateTaskRunCommand,
        head: StreamHead,
        ctx: OrchestrationContext,
        decision: Decision,
        transition_id: UUID | None,
        event_type: EventType,
    ) -> bool:
        """Record the decision and its messages; False when they would not fit
        the topics, in which case the command is refused and nothing changes."""
        previous: TaskRunView = head.view
        seq = head.last_seq + 1
        run_id = previous.id
        run_id_json = uuid_json(run_id)
        key = run_id_json[1:-1].encode()
        appended = decision.appended_state
        result = decision.result
        # Serialised once, each goes into every message that repeats it.
        appended_json = model_json(appended)
        transition_id_json = uuid_json(transition_id)
        status = result.status.value
        status_json = string_json(status)
        result_json = render(
            OrchestrationResult,
            state=appended_json if result.state is appended else model_json(result.state),
            status=status_json,
            details=(details := details_json(result.details)),
        )
        command_id_json = uuid_json(item.command_id)
        result_event_json = result_event_json_of(
            command_id=command_id_json,
            command_kind=string_json(command.kind),
            stream_id=run_id_json,
            transition_id=transition_id_json,
            seq=seq,
            status=status_json,
            result=result_json,
            state_appended=appended is not None,
            decided_at=datetime_json(ctx.now),
            schema_version=SCHEMA_VERSION_JSON,
        )
        change_json = None
        if appended is not None:
            from_state = previous.state if event_type is not _TASK_RUN_CREATED else None
            change_json = render(
                StateChangeEvent,
                task_run_id=run_id_json,
                flow_run_id=uuid_json(previous.flow_run_id),
                seq=str(seq),
                from_state=state_ref_json(from_state.type, from_state.name, from_state.id) if from_state else "null",
                to_state=appended_json,
                status=status_json,
                transition_id=transition_id_json,
                timestamp=datetime_json(appended.timestamp),
                schema_version=SCHEMA_VERSION_JSON,
            )
        too_big = self._oversized(result_event_json, change_json)
        if too_big:
            self._refuse(item, "too_large", too_big, dead_letter=True)
            return False
        # The projection's view, as rebuild writes it too: members equal to their defaults left out.
        run_json = decision.run.model_dump_json(exclude_defaults=True)
        sent = item.command  # as parsed: `command` has the transition_id the pipeline filled in
        assert isinstance(sent, SetStateCommand | CreateTaskRunCommand)  # what reaches a task-run decision
        payload = lean_payload_json(
            command=stored_command_json(item.document if item.document is not None else sent.model_dump(mode="json"),
                                        sent, transition_id),
            context=lean_context_json(ctx, appended, decision.effects),
            decision=lean_decision_json(
                details=details,
                appended=appended,
                run=decision.run,
                previous=previous if event_type is not EventType.TASK_RUN_CREATED else None,
                effects=decision.effects,
                policy=decision.policy,
                transition_id=transition_id,
            ),
        )
        self.out.events.append(
            row := EventRow.of(item, run_id, seq, _TASK_RUN_STREAM, event_type, transition_id,
                               status, appended, payload, result_event_json, change_json,
                               head.last_hash, (run_id_json[1:-1], command_id_json[1:-1],
                                                None if transition_id is None else transition_id_json[1:-1]))
        )
        head.last_hash = row.hash
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
            # The isinstance checks are the `kind` discriminator, spelled so that mypy narrows.
            if isinstance(effect, CacheInserted):
                state = decision.appended_state
                assert state is not None  # a cache entry is inserted only with the state it caches
                entry = CacheEntry(
                    cache_key=effect.cache_key,
                    cache_expiration=effect.cache_expiration,
                    created=state.timestamp,
                    state=state,
                )
                self.snapshot.cache.setdefault(effect.cache_key, []).append(entry)
                self.out.cache_rows.append(entry)
            elif isinstance(effect, SlotsTaken):
                lease = Lease(id=effect.lease_id, tags=list(effect.tags), slots=effect.slots, holder_run_id=run_id)
                self.snapshot.leases.setdefault(run_id, []).append(lease)
                self.out.leases_added.append(lease)
                for tag in effect.tags:
                    self._shift_slots(tag, effect.slots)
            elif isinstance(effect, SlotsReleased):
                held = {lease.id: lease for lease in self.snapshot.leases.get(run_id, [])}
                for lease_id in effect.lease_ids:
                    released = held.pop(lease_id, None)
                    if released is None:
                        continue
                    if released in self.out.leases_added:
                        self.out.leases_added.remove(released)
                    else:
                        self.out.leases_removed.append(lease_id)
                self.snapshot.leases[run_id] = list(held.values())
                # The rules counted what each tag gets back; recounting it here could disagree.
                for tag, slots in effect.decrements.items():
                    self._shift_slots(tag, -slots)
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
        self._record_flow_state(item, command, head, command.state, EventType.FLOW_RUN_CREATED)

    def _set_flow_run_state(self, item: ParsedCommand, command: SetFlowRunStateCommand) -> None:
        head = self.snapshot.flow_runs.get(command.flow_run_id)
        if head is None:
            self._refuse(item, "unknown_run", f"Flow run with id {command.flow_run_id} not found", dead_letter=True)
            return
        self._record_flow_state(item, command, head, command.state, EventType.FLOW_RUN_STATE_SET)

    def _record_flow_state(
        self,
        item: ParsedCommand,
        command: CreateFlowRunCommand | SetFlowRunStateCommand,
        head: StreamHead,
        proposed: StateCreate | None,
        event_type: EventType,
    ) -> None:
        flow: FlowRunView = head.view
        now = self.clock()
        state = None
        if proposed is not None:
            state, flow = record_flow_state(flow, proposed, now, self.ids.uuid7(now))
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
        payload = render(
            FlowRunEventPayload,
            command=command.model_dump_json(),
            state=model_json(state),
            flow_run=flow.model_dump_json(),
            result_event=result_json,
            state_change="null",
        )
        self.out.events.append(
            row := EventRow.of(item, flow.id, seq, StreamType.FLOW_RUN, event_type, None, "ACCEPT", state,
                               payload, result_json, None, head.last_hash)
        )
        head.last_hash = row.hash
        head.view = flow
        head.last_seq = seq
        self.out.flow_run_heads[flow.id] = head
        self.out.results.append(Publication(key, result_json))

    # -- concurrency limits (configuration, recorded in a stream per tag) ----
    def _change_limit(self, item: ParsedCommand, command: SetConcurrencyLimitCommand | DeleteConcurrencyLimitCommand
                      ) -> None:
        prior = self.snapshot.by_command.get((item.stream_id, item.command_id))
        if prior is not None:
            self._republish(prior)  # the same command sent again: never applied twice
            return
        tag = command.tag
        current = self.snapshot.tag_limits.get(tag)
        if isinstance(command, DeleteConcurrencyLimitCommand):
            if current is None:
                self._refuse(item, "unknown_limit", f"no concurrency limit for tag {tag!r}", dead_letter=False)
                return
            if self._record_limit(item, command, None, current, False, EventType.CONCURRENCY_LIMIT_DELETED):
                del self.snapshot.tag_limits[tag]
            return
        if current is None:
            limit = TagLimit(tag=tag, limit=command.concurrency_limit,
                             active=True if command.active is None else command.active)
        else:
            # Prefect's upsert: the value changes, the active slots stay, and so does
            # `active` unless the command says otherwise.
            limit = current.model_copy(update={
                "limit": command.concurrency_limit,
                "active": current.active if command.active is None else command.active,
            })
        if self._record_limit(item, command, limit, limit, current is None, EventType.CONCURRENCY_LIMIT_SET):
            self.snapshot.tag_limits[tag] = limit

    def _record_limit(
        self,
        item: ParsedCommand,
        command: SetConcurrencyLimitCommand | DeleteConcurrencyLimitCommand,
        after: TagLimit | None,
        answered: TagLimit,
        created: bool,
        event_type: EventType,
    ) -> bool:
        """Record the change and its answer; False when the answer would not fit its topic."""
        stream_id = item.stream_id
        head = self.snapshot.limit_streams.get(stream_id) or StreamHead(view=command.tag, last_seq=0)
        seq = head.last_seq + 1
        result_json = LimitResultEvent(
            command_id=item.command_id,
            command_kind=command.kind,
            stream_id=stream_id,
            tag=command.tag,
            seq=seq,
            created=created,
            limit=answered,
            decided_at=self.clock(),
        ).model_dump_json()
        too_big = self._oversized(result_json)
        if too_big:
            self._refuse(item, "too_large", too_big, dead_letter=True)
            return False
        payload = render(
            LimitEventPayload,
            command=item.record.value.decode() if item.record.value is not None else command.model_dump_json(),
            limit=model_json(after),
            result_event=result_json,
            state_change="null",
        )
        self.out.events.append(
            row := EventRow.of(item, stream_id, seq, StreamType.CONCURRENCY_LIMIT, event_type, None, None, None,
                               payload, result_json, None, head.last_hash)
        )
        head.last_hash, head.last_seq = row.hash, seq
        self.snapshot.limit_streams[stream_id] = head
        self.snapshot.by_command[(stream_id, item.command_id)] = StoredOutcome(result_json, None,
                                                                               str(stream_id).encode())
        self.limit_tags.add(command.tag)
        self.out.results.append(Publication(str(stream_id).encode(), result_json))
        return True

    # -- answers without a new event --------------------------------------
    def _republish(self, prior: StoredOutcome) -> None:
        self.out.duplicates += 1
        self.out.results.append(Publication(prior.key, prior.result_event))
        if prior.state_change is not None:
            self.out.state_changes.append(Publication(prior.key, prior.state_change))

    def _refuse(self, item: ParsedCommand, code: ErrorCode, message: str, *, dead_letter: bool) -> None:
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
        # A limit command is answered in the shape its sender waits for.
        answer = LimitResultEvent if command_kind in LIMIT_KINDS else OrchestrationResultEvent
        event = answer(
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
