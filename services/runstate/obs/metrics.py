"""The consumer's Prometheus metrics: the ServiceMetrics port's adapter, plus
what is sampled at scrape time (lag per partition, the database pool, outage time)."""

from __future__ import annotations

import json
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

from runstate.events import EventType
from runstate.obs.logs import log_refused
from runstate.pipeline.ports import BatchOutcome

LIMIT_KINDS = frozenset({"set_concurrency_limit", "delete_concurrency_limit"})
COMMAND_KINDS = frozenset({"create_task_run", "set_task_run_state", "create_flow_run", "set_flow_run_state"}) | LIMIT_KINDS
STATUSES = frozenset({"ACCEPT", "REJECT", "WAIT", "ABORT"})
# A limit change is applied or refused, never orchestrated: its answers carry no status.
APPLIED = "applied"
KIND_OF_EVENT = {
    EventType.TASK_RUN_CREATED: "create_task_run",
    EventType.TRANSITION_DECIDED: "set_task_run_state",
    EventType.FLOW_RUN_CREATED: "create_flow_run",
    EventType.FLOW_RUN_STATE_SET: "set_flow_run_state",
    EventType.CONCURRENCY_LIMIT_SET: "set_concurrency_limit",
    EventType.CONCURRENCY_LIMIT_DELETED: "delete_concurrency_limit",
}
PHASES = ("parse", "snapshot", "decide", "write", "publish", "commit")
# Batch phases run from tens of microseconds (parse) to seconds (a write waiting on a lock).
PHASE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)

# The `_created` series double every exposition for a start time nobody graphs.
disable_created_metrics()


def bounded_kind(kind: object) -> str:
    """A command kind as a label value: one of the six, or `unknown` (a record names its own)."""
    return kind if isinstance(kind, str) and kind in COMMAND_KINDS else "unknown"


class ConsumerMetrics:
    """The ServiceMetrics port on a Prometheus registry of its own (one per app)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.decisions = Counter(
            "runstate_decisions", "Results published, by command kind and status (error: refused).",
            ["kind", "status"], registry=r)
        self.dead_letters = Counter(
            "runstate_dead_letters", "Commands dead-lettered, by error code.", ["code"], registry=r)
        self.redeliveries = Counter(
            "runstate_redeliveries", "Records recognised as already decided; their stored outcome is published again.",
            registry=r)
        self.batches = Counter(
            "runstate_batches", "Batches stored, by where their decisions' inputs came from: a snapshot read"
            " from the store, or memory (runs whose whole history this process wrote).", ["snapshot"], registry=r)
        self._batches = {True: self.batches.labels("store"), False: self.batches.labels("memory")}
        self.batch_records = Histogram(
            "runstate_batch_records", "Records per batch.", buckets=BATCH_BUCKETS, registry=r)
        self.phase_seconds = Histogram(
            "runstate_batch_phase_seconds", "Time per batch phase (parse, snapshot, decide, write, publish, commit).",
            ["phase"], buckets=PHASE_BUCKETS, registry=r)
        self.latency = BulkHistogram(
            "runstate_decision_latency_seconds", "From a command record's timestamp to its result acknowledged.",
            LATENCY_BUCKETS)
        r.register(self.latency)
        self.lag = Gauge(
            "runstate_consumer_lag", "Records of the command topic not yet fetched, per assigned partition.",
            ["partition"], registry=r)
        self.outage_gauge = Gauge("runstate_outage", "1 while an outage (database or broker) is waited out.",
                                  registry=r)
        self.outage_seconds = Counter("runstate_outage_seconds", "Time spent waiting out outages.", registry=r)
        self.pool_size = Gauge("runstate_db_pool_connections", "Connections the batch pool holds.", registry=r)
        self.pool_available = Gauge("runstate_db_pool_available", "Idle connections in the batch pool.", registry=r)
        self.pool_waiting = Gauge("runstate_db_pool_requests_waiting", "Lanes waiting for a pool connection.",
                                  registry=r)
        self._phases = {name: self.phase_seconds.labels(name) for name in PHASES}
        self._outage_mark: float | None = None
        # labels() costs more than inc(): the (bounded) children are kept.
        self._decision_children: dict[tuple[str, str], Any] = {}

    # -- the ServiceMetrics port ------------------------------------------------------
    def phase(self, name: str, seconds: float) -> None:
        child = self._phases.get(name)
        (child or self.phase_seconds.labels(name)).observe(seconds)

    def batch(self, outcome: BatchOutcome, records: int, decided_at: float,
              record_timestamps_ms: list[int]) -> None:
        self.batch_records.observe(records)
        self._batches[outcome.read_store].inc()
        counts: dict[tuple[str, str], int] = {}
        ours = set()
        for event in outcome.events:
            ours.add(id(event.result_event))
            kind = KIND_OF_EVENT.get(event.event_type, "unknown")
            key = (kind, event.status or (APPLIED if kind in LIMIT_KINDS else "unknown"))
            counts[key] = counts.get(key, 0) + 1
        for publication in outcome.results:
            if id(publication.value) not in ours:
                # A refusal or a redelivered answer: rare, so read from its JSON.
                key = _kind_and_status(publication.value)
                counts[key] = counts.get(key, 0) + 1
        children = self._decision_children
        for key, n in counts.items():
            child = children.get(key)
            if child is None:
                child = children[key] = self.decisions.labels(*key)
            child.inc(n)
        for dead in outcome.dead_letters:
            self.dead_letters.labels(dead.error.code).inc()
        if outcome.dead_letters:
            log_refused(outcome.dead_letters)
        if outcome.duplicates:
            self.redeliveries.inc(outcome.duplicates)
        self.latency.observe_all([decided_at - ts / 1000 for ts in record_timestamps_ms])

    def outage(self, what: str | None) -> None:
        if what is not None:
            self.outage_gauge.set(1)
            if self._outage_mark is None:
                self._outage_mark = time.monotonic()
        else:
            self._account_outage()
            self._outage_mark = None
            self.outage_gauge.set(0)

    # -- sampled at scrape time -------------------------------------------------------
    def _account_outage(self) -> None:
        if self._outage_mark is not None:
            now = time.monotonic()
            self.outage_seconds.inc(now - self._outage_mark)
            self._outage_mark = now

    def sample_pool(self, stats: dict[str, int]) -> None:
        self.pool_size.set(stats.get("pool_size", 0))
        self.pool_available.set(stats.get("pool_available", 0))
        self.pool_waiting.set(stats.get("requests_waiting", 0))

    def sample_lag(self, lags: Iterable[tuple[int, int]]) -> None:
        self.lag.clear()
        for partition, lag in lags:
            self.lag.labels(str(partition)).set(lag)

    def before_scrape(self) -> None:
        self._account_outage()


class RefusalLog:
    """The ServiceMetrics port with metrics off (RUNSTATE_METRICS=off): no Prometheus work,
    only the log line of each refused command that ConsumerMetrics.batch writes too."""

    def phase(self, name: str, seconds: float) -> None:
        pass

    def batch(self, outcome: BatchOutcome, records: int, decided_at: float,
              record_timestamps_ms: list[int]) -> None:
        if outcome.dead_letters:
            log_refused(outcome.dead_letters)

    def outage(self, what: str | None) -> None:
        pass


def _kind_and_status(value: str) -> tuple[str, str]:
    try:
        answer: Any = json.loads(value)
    except ValueError:
        return "unknown", "unknown"
    if not isinstance(answer, dict):
        return "unknown", "unknown"
    kind = bounded_kind(answer.get("command_kind"))
    if answer.get("error"):
        return kind, "error"
    if kind in LIMIT_KINDS:
        return kind, APPLIED
    status = answer.get("status")
    return kind, status if status in STATUSES else "unknown"



class BulkHistogram(Collector):
    """A histogram observed a batch at a time: one bisect per value and no lock (the
    service and its scrapes share one event loop), where prometheus_client's takes a
    lock per bucket and value."""

    def __init__(self, name: str, documentation: str, buckets: Iterable[float]) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = sorted(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.observe_all([value])

    def observe_all(self, values: list[float]) -> None:
        counts, bounds = self.counts, self.bounds
        total = 0.0
        for value in values:
            if value < 0:
                value = 0.0  # a producer's clock ahead of ours
            counts[bisect_left(bounds, value)] += 1
            total += value
        self.sum += total

    def collect(self) -> Iterator[HistogramMetricFamily]:
        cumulative, running = [], 0
        for bound, count in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            running += count
            cumulative.append((bound, running))
        family = HistogramMetricFamily(self.name, self.documentation)
        family.add_metric([], cumulative, self.sum)
        yield family
