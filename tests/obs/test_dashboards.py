"""Every metric the Grafana dashboard and the alert rules in deploy/ query is one runstate exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from runstate.obs.http import HttpMetrics
from runstate.obs.metrics import ConsumerMetrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
METRIC = re.compile(r"\b(runstate_[a-z_]+|faststream_[a-z_]+)\b")
# Series Prometheus itself adds about a scrape target.
PROMETHEUS_OWN = {"up"}


def exported() -> set[str]:
    names = set()
    for registry in (ConsumerMetrics().registry, HttpMetrics().registry):
        for family in registry.collect():
            if family.type == "counter":
                names.add(f"{family.name}_total")
            elif family.type == "histogram":
                names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_count", "_sum"))
            else:
                names.add(family.name)
    return names


def alert_expressions() -> list[str]:
    text = (DEPLOY / "prometheus" / "runstate-alerts.yml").read_text()
    return [line.split("expr:", 1)[1].strip() for line in text.splitlines() if line.strip().startswith("expr:")]


def dashboard_expressions() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "runstate-dashboard.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_the_alerts_and_the_dashboard_query_only_exported_metrics():
    alerts, panels = alert_expressions(), dashboard_expressions()
    assert len(alerts) >= 4 and len(panels) >= 10
    used = {name for expr in alerts + panels for name in METRIC.findall(expr)}
    assert used - exported() == set()
    # The ones the issue asks for: lag growing, dead-letter rate, outage, no decisions while lagging.
    assert {"runstate_consumer_lag", "runstate_dead_letters_total", "runstate_outage",
            "runstate_decisions_total"} <= {n for e in alerts for n in METRIC.findall(e)}


def test_a_misspelt_metric_would_be_caught():
    assert {"runstate_decision_total"} - exported() == {"runstate_decision_total"}
