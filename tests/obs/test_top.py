"""`runstate top`'s arithmetic over two scrapes of a real metrics registry."""

from __future__ import annotations

import json

import pytest
from prometheus_client import generate_latest
from rich.console import Console
from typer.testing import CliRunner

from runstate.cli import app
from runstate.obs.metrics import ConsumerMetrics
from runstate.top import parse, quantile, render, view


def test_rates_quantiles_and_lag_from_two_scrapes():
    m = ConsumerMetrics()
    m.decisions.labels("create_task_run", "ACCEPT").inc(10)
    m.latency.observe(9.0)
    before = parse(generate_latest(m.registry).decode())
    m.decisions.labels("create_task_run", "ACCEPT").inc(20)
    m.decisions.labels("set_task_run_state", "REJECT").inc(4)
    m.dead_letters.labels("invalid_command").inc(2)
    for _ in range(100):
        m.latency.observe(0.003)
    m.sample_lag([(0, 5), (3, 0)])
    m.outage("database: refused")
    now = parse(generate_latest(m.registry).decode())

    v = view(now, before, 2.0)
    assert v.decisions_per_s == {"ACCEPT": 10.0, "REJECT": 2.0}
    assert v.decisions_total == 34
    # Only this interval's observations: all in the (2.5 ms, 5 ms] bucket, interpolated.
    assert v.p50_s == pytest.approx(0.00375)
    assert v.p99_s == pytest.approx(0.0025 + 0.0025 * 0.99)
    assert v.lag == {0: 5.0, 3: 0.0}
    assert (v.dead_letters_total, v.dead_letters_per_s, v.outage) == (2.0, 1.0, True)
    console = Console(width=100, record=True)
    with console.capture() as captured:
        console.print(render(v, ["http://consumer"]))
    assert "OUTAGE" in captured.get() and "3.8 ms" in captured.get()
    assert json.loads(json.dumps(v.as_json()))["lag"] == {"0": 5.0, "3": 0.0}


def test_quantile_of_nothing_is_unknown():
    assert quantile({0.1: 0.0, float("inf"): 0.0}, 0.5) is None
    assert quantile({0.1: 0.0, float("inf"): 4.0}, 0.5) == 0.1


def test_top_without_an_address_is_a_usage_error(monkeypatch, tmp_path):
    monkeypatch.delenv("RUNSTATE_CONSUMER_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["top", "--once"])
    assert result.exit_code == 2 and "RUNSTATE_CONSUMER_URL" in result.output
