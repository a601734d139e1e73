"""`runstate top`: a live terminal view of one or more consumers, read from their /metrics.

Rates are the difference of two scrapes over the time between them; latency quantiles come
from the histogram buckets that moved in that interval (all of them on the first scrape)."""

from __future__ import annotations

import math
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, timeout: float = 2.0) -> Samples:
    with urllib.request.urlopen(f"{url.rstrip('/')}/metrics", timeout=timeout) as response:
        return parse(response.read().decode())


def parse(text: str) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def merge(scrapes: list[Samples]) -> Samples:
    """Several consumers' samples summed (lag partitions are disjoint across a group)."""
    total: Samples = defaultdict(float)
    for samples in scrapes:
        for key, value in samples.items():
            total[key] += value
    return dict(total)


def quantile(buckets: dict[float, float], q: float) -> float | None:
    """Prometheus' histogram_quantile over cumulative bucket counts (upper bound -> count)."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    previous_bound, previous_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return previous_bound
            if count == previous_count:
                return bound
            return previous_bound + (bound - previous_bound) * (rank - previous_count) / (count - previous_count)
        previous_bound, previous_count = bound, count
    return previous_bound


@dataclass
class View:
    decisions_per_s: dict[str, float] = field(default_factory=dict)
    decisions_total: float = 0.0
    p50_s: float | None = None
    p99_s: float | None = None
    lag: dict[int, float] = field(default_factory=dict)
    dead_letters_total: float = 0.0
    dead_letters_per_s: float = 0.0
    outage: bool = False
    outage_seconds_total: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {**self.__dict__, "lag": {str(p): v for p, v in sorted(self.lag.items())}}


def view(now: Samples, before: Samples | None, seconds: float) -> View:
    def total(name: str, by: str | None = None) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for (metric, labels), value in now.items():
            if metric == name:
                key = dict(labels).get(by, "") if by else ""
                out[key] += value
        return out

    def delta(name: str, by: str | None = None) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for (metric, labels), value in now.items():
            if metric == name:
                key = dict(labels).get(by, "") if by else ""
                out[key] += value - (before.get((metric, labels), 0.0) if before else value)
        return out

    v = View()
    per = max(seconds, 1e-9)
    v.decisions_per_s = {status: n / per for status, n in sorted(delta("runstate_decisions_total", "status").items())}
    v.decisions_total = sum(total("runstate_decisions_total").values())
    moved: dict[float, float] = defaultdict(float)
    for (metric, labels), value in now.items():
        if metric == "runstate_decision_latency_seconds_bucket":
            moved[float(dict(labels)["le"])] += value - (before.get((metric, labels), 0.0) if before else 0.0)
    v.p50_s, v.p99_s = quantile(moved, 0.5), quantile(moved, 0.99)
    v.lag = {int(p): n for p, n in total("runstate_consumer_lag", "partition").items() if p != ""}
    v.dead_letters_total = float(sum(total("runstate_dead_letters_total").values()))
    v.dead_letters_per_s = sum(delta("runstate_dead_letters_total").values()) / per
    v.outage = sum(total("runstate_outage").values()) > 0
    v.outage_seconds_total = sum(total("runstate_outage_seconds_total").values())
    return v


def render(v: View, urls: list[str]) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.1f} ms"

    head = Text(f"runstate top — {', '.join(urls)}", style="bold")
    state = Text("OUTAGE: waiting it out" if v.outage else "no outage", style="bold red" if v.outage else "green")
    summary = Table.grid(padding=(0, 2))
    summary.add_row("decided", f"{v.decisions_total:.0f}", "p50", ms(v.p50_s), "p99", ms(v.p99_s))
    summary.add_row("dead letters", f"{v.dead_letters_total:.0f}", "per s", f"{v.dead_letters_per_s:.2f}",
                    "outage s", f"{v.outage_seconds_total:.1f}")
    rates = Table("status", "decisions/s", title="decisions per second")
    for status, rate in v.decisions_per_s.items():
        rates.add_row(status, f"{rate:.1f}")
    lag = Table("partition", "lag", title="consumer lag")
    for partition, n in sorted(v.lag.items()):
        lag.add_row(str(partition), f"{n:.0f}")
    return Group(head, state, summary, rates, lag)
