"""The consumer's batch service: decide, store, publish, over the ports.

Delivery contract, per batch:
  1. decide every command in memory against one snapshot read in the same
     store session (transaction) that appends the events;
  2. commit that session;
  3. publish results, state changes and dead letters, and wait for the broker's
     acknowledgement;
  4. only then is the batch's offset committed (by the caller, pipeline/app.py).
A crash anywhere before 4 redelivers the batch; the store recognises every
record already decided and its stored outcome is published again.

No record can make a batch fail: a refusal of the records' own making is
narrowed down to one record, which is dead-lettered. An outage (the store or
the broker refusing for reasons that are not the records') is waited out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Protocol
from uuid import UUID

from runstate.config import Settings
from runstate.domain import OrchestrationSettings
from runstate.messages import ErrorInfo
from runstate.pipeline.batch import DEFAULT_MAX_MESSAGE_BYTES, decide_batch, first_request, second_request
from runstate.pipeline.faults import CrashPoint
from runstate.pipeline.owned import OwnedRuns
from runstate.pipeline.ports import (
    BatchOutcome,
    EventStore,
    NoMetrics,
    Publisher,
    RecordRefused,
    ServiceMetrics,
    StoreConflict,
    StoreSession,
    StoreSnapshot,
    StoreUnavailable,
)
from runstate.pipeline.records import BadRecord, IncomingRecord, ParsedCommand, parse_record

log = logging.getLogger("runstate.service")

MAX_CONFLICT_RETRIES = 20
# Waiting out an outage: the first retry soon, then no more than every few seconds.
OUTAGE_FIRST_DELAY_S = 0.2
OUTAGE_MAX_DELAY_S = 5.0
OUTAGE_LOG_EVERY_S = 30.0


class RefusedBatch(Exception):
    """The batch cannot be stored as it is, through the fault of its records
    (or of a bug): it is decided again record by record to find the one."""

    def __init__(self, reason: str, code: str) -> None:
        super().__init__(reason)
        self.code = code


async def read_snapshot(
    session: StoreSession, parsed: Sequence[ParsedCommand], topic: str, now: datetime
) -> StoreSnapshot:
    """Everything the batch's decisions read: what the commands name, then what
    the runs found point to (their flow runs, their tags' limits and leases)."""
    snap = StoreSnapshot()
    if not parsed:
        return snap
    first = first_request(parsed, topic, now)
    await session.read(first, snap)
    second = second_request(parsed, first, snap)
    if second:
        await session.read(second, snap)
    return snap


class BatchTrace(Protocol):
    def stored(self, outcome: BatchOutcome) -> None:
        """The batch is decided and stored; its results are about to be published."""

    def end(self, outcome: BatchOutcome | None, error: BaseException | None = None) -> None:
        """The batch's results are acknowledged, or `error` stopped it (it is delivered again)."""


class BatchTracer(Protocol):
    """Tracing of batches (obs/tracing.py); the service holds none when tracing is off."""

    def begin(self, raw_records: Sequence[Any], items: Sequence[ParsedCommand | BadRecord],
              started: float) -> BatchTrace:
        """A batch began at `started` (time.perf_counter())."""


class OrchestrationService:
    """Decides batches of command records and publishes what they produced."""

    def __init__(self, settings: Settings, store: EventStore, publisher: Publisher | None = None,
                 metrics: ServiceMetrics | None = None) -> None:
        self.settings = settings
        self.store = store
        self.publisher = publisher
        self.metrics: ServiceMetrics = metrics or NoMetrics()
        self.tracer: BatchTracer | None = None
        self.rules_settings = OrchestrationSettings()
        # What a result or state change may weigh (the topics' limit, set at start-up).
        self.max_message_bytes = DEFAULT_MAX_MESSAGE_BYTES
        self.decided = 0
        self.duplicates = 0
        self.dead_lettered = 0
        self.crash = CrashPoint()
        self.owned = OwnedRuns(settings.owned_runs)
        # The outage being waited out, if any: what refused, since when.
        self.outage: str | None = None
        self.outage_since = 0.0
        self.outage_retries = 0
        self._outage_logged = 0.0

    async def handle_records(self, raw_records: Sequence[Any]) -> BatchOutcome:
        started = time.perf_counter()
        records = [IncomingRecord(r.topic, r.partition, r.offset, r.key, r.value, getattr(r, "timestamp", None))
                   for r in raw_records]
        items = [parse_record(r, self.settings.max_command_bytes) for r in records]
        trace = None if self.tracer is None else self.tracer.begin(raw_records, items, started)
        self.metrics.phase("parse", time.perf_counter() - started)
        try:
            outcome = await self._store(items)
            self.crash.reached("after_db_commit")
            if trace is not None:
                trace.stored(outcome)
            started = time.perf_counter()
            await self._publish(outcome)
            self.metrics.phase("publish", time.perf_counter() - started)
            self.crash.reached("after_publish")
        except BaseException as exc:
            if trace is not None:
                trace.end(None, exc)
            raise
        if trace is not None:
            trace.end(outcome)
        self.metrics.batch(outcome, len(records), time.time(),
                           [r.timestamp_ms for r in records if r.timestamp_ms is not None])
        self.decided += len(outcome.events)
        self.duplicates += outcome.duplicates
        self.dead_lettered += len(outcome.dead_letters)
        return outcome

    async def _store(self, items: list[ParsedCommand | BadRecord]) -> BatchOutcome:
        """Decide and store the batch; only an outage keeps this waiting, and no
        record can make it raise."""
        try:
            return await self._decide_and_store(items)
        except RefusedBatch as exc:
            if len(items) > 1:
                log.error("a batch of %d records was refused (%s); deciding them one by one", len(items), exc)
                merged = BatchOutcome()
                for item in items:
                    merged.absorb(await self._store([item]))
                return merged
            (item,) = items
            log.error("record %s[%d]@%d refused: %s", item.record.topic, item.record.partition,
                      item.record.offset, exc)
            if isinstance(item, BadRecord):
                refused = BadRecord(item.record, ErrorInfo(code="orchestration_failed", message=str(exc)[:1000]),
                                    item.stream_id, item.command_kind, item.command_id)
            else:
                message = f"the database refused this command: {exc}" if exc.code == "unstorable" else str(exc)
                refused = BadRecord(item.record, ErrorInfo(code=exc.code, message=message[:1000]),
                                    item.stream_id, item.command.kind, item.command_id)
            return decide_batch([refused], StoreSnapshot(), self.rules_settings)

    async def _decide_and_store(self, items: list[ParsedCommand | BadRecord]) -> BatchOutcome:
        parsed = [i for i in items if isinstance(i, ParsedCommand)]
        conflicts = 0
        from_memory = True  # until an attempt fails: the retries read the store
        while True:
            known = self.owned.snapshot(items) if from_memory else None
            try:
                try:
                    outcome, read = await self._attempt(items, parsed, known)
                except BaseException:
                    # Whatever failed, the store may hold what this process does not know it wrote.
                    self.owned.forget()
                    from_memory = False
                    raise
                self._outage_over()
                self.owned.learn(items, outcome, read)
                return outcome
            except StoreConflict as exc:
                if known is not None:
                    # Decided from memory, and something else wrote one of the runs since
                    # (pipeline/owned.py): decided again at once, from what the store holds.
                    log.info("a run known here was written elsewhere (%s); reading the store", exc)
                    continue
                # Another member (a zombie, or the new owner after a rebalance)
                # wrote this history first: decide again against what it wrote.
                conflicts += 1
                if conflicts > MAX_CONFLICT_RETRIES:
                    # Only a key of the batch's own can collide this often.
                    raise RefusedBatch(str(exc), "unstorable") from exc
                log.warning("append conflict, retrying against fresh state: %s", exc)
                await asyncio.sleep(min(0.05 * conflicts, 1.0))
            except RecordRefused as exc:
                raise RefusedBatch(str(exc), "unstorable") from exc
            except StoreUnavailable as exc:
                await self._wait_out_outage("database", exc)
            except Exception as exc:  # noqa: BLE001 - a bug: isolate the record it trips on
                log.exception("deciding or storing a batch failed")
                raise RefusedBatch(f"{type(exc).__name__}: {exc}", "orchestration_failed") from exc

    async def _attempt(self, items: list[ParsedCommand | BadRecord], parsed: list[ParsedCommand],
                       known: StoreSnapshot | None) -> tuple[BatchOutcome, dict[UUID, int] | None]:
        """Decide and store the batch once, against `known` or else a snapshot read in the
        session that appends; the seqs that read found go with the outcome."""
        clock = time.perf_counter()
        read = None
        async with self.store.session() as session:
            snapshot = known
            if snapshot is None:
                snapshot = await read_snapshot(session, parsed, self.settings.command_topic, datetime.now(UTC))
                read = self.owned.read_seqs(snapshot)
                clock = self._lap("snapshot", clock)
            outcome = decide_batch(items, snapshot, self.rules_settings, max_message_bytes=self.max_message_bytes)
            outcome.read_store = known is None
            clock = self._lap("decide", clock)
            if known is not None:
                # A session that read nothing may make its append durable at once (the port).
                self.crash.reached("before_db_commit")
            await session.append(outcome)
            if known is None:
                self.crash.reached("before_db_commit")
        self._lap("write", clock)  # the writes and the commit
        return outcome, read

    async def _publish(self, outcome: BatchOutcome) -> None:
        """Publish everything the batch produced and wait for the acks, retrying
        until the broker takes it all: the batch's offsets are committed only then."""
        assert self.publisher is not None, "the service needs a publisher"
        while True:
            try:
                await self.publisher.publish(outcome)
                self._outage_over()
                return
            except Exception as exc:  # noqa: BLE001 - any send failure: retried, never skipped
                await self._wait_out_outage("broker", exc)

    def _lap(self, phase: str, since: float) -> float:
        now = time.perf_counter()
        self.metrics.phase(phase, now - since)
        return now

    async def _wait_out_outage(self, what: str, exc: BaseException) -> None:
        """One line when an outage begins, one every OUTAGE_LOG_EVERY_S while it
        lasts; the lane waits, with a growing pause, and tries again."""
        now = time.monotonic()
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        reason = f"{what}: {text}"
        if self.outage is None:
            self.outage, self.outage_since, self._outage_logged = reason, now, now
            self.outage_retries = 0
            self.metrics.outage(reason)
            log.error("outage (%s); this lane waits and retries until it is over", reason)
        elif now - self._outage_logged >= OUTAGE_LOG_EVERY_S:
            self.outage, self._outage_logged = reason, now
            log.error("outage for %.0f s (%s); still retrying", now - self.outage_since, reason)
        self.outage_retries += 1
        await asyncio.sleep(min(OUTAGE_FIRST_DELAY_S * 2 ** min(self.outage_retries, 10), OUTAGE_MAX_DELAY_S))

    def _outage_over(self) -> None:
        if self.outage is not None:
            log.warning("outage over after %.1f s (%s)", time.monotonic() - self.outage_since, self.outage)
            self.outage = None
            self.metrics.outage(None)
