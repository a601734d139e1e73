"""The bench report's choice of the p99 runs it compares (tests/bench/report.py)."""

from __future__ import annotations

from report import median_p99, p99_runs


def _run(p99: float) -> dict:
    return {"p99_ms": p99, "p50_ms": p99 / 3}


def test_the_summary_compares_the_alternating_pairs_when_the_run_has_them() -> None:
    runs = {
        "p99_pairs": [{"runstate": _run(90.0), "floor": _run(40.0)},
                      {"floor": _run(400.0), "runstate": _run(30.0)},
                      {"runstate": _run(60.0), "floor": _run(35.0)}],
        # an older run's fields, present too: the pairs win
        "load": [{"offered": 1000, **_run(1.0)}], "floor_1000": _run(2.0),
    }
    mine, floor = p99_runs(runs)
    assert [r["p99_ms"] for r in mine] == [90.0, 30.0, 60.0]
    assert [r["p99_ms"] for r in floor] == [40.0, 400.0, 35.0]
    assert (median_p99(mine), median_p99(floor)) == (60.0, 40.0)


def test_an_older_results_file_is_read_from_the_sweep_and_its_repeats() -> None:
    runs = {
        "load": [{"offered": 500, **_run(5.0)}, {"offered": 1000, **_run(61.1)}],
        "load_1000_repeats": [_run(110.9), _run(84.7)],
        "floor_1000": _run(109.3), "floor_1000_repeats": [_run(36.6), _run(38.1)],
    }
    mine, floor = p99_runs(runs)
    assert median_p99(mine) == 84.7
    assert median_p99(floor) == 38.1


def test_no_runs_give_no_p99() -> None:
    mine, floor = p99_runs({})
    assert (mine, floor) == ([], [])
    assert median_p99(mine) != median_p99(mine)  # NaN


def _variant(*rounds: float) -> dict:
    return {"cpu_us_per_command": sorted(rounds)[len(rounds) // 2],
            "samples": [{"cpu_us_per_command": r} for r in rounds]}


def test_an_overhead_inside_the_rounds_spread_is_called_unresolved() -> None:
    from report import _unresolved

    noisy = {"metrics_off": _variant(564, 574, 570), "metrics_on": _variant(558, 502, 564),
             "tracing_on": _variant(393, 374, 616)}
    text = _unresolved(noisy)
    assert "metrics' difference (-12 µs)" in text and "tracing's difference (-165 µs)" in text
    clear = {"metrics_off": _variant(300, 302, 301), "metrics_on": _variant(305, 306, 304),
             "tracing_on": _variant(350, 352, 351)}
    assert _unresolved(clear) == ""


def test_the_validating_floor_is_reported_against_the_floor_and_runstate() -> None:
    from report import _validating_floor

    runs = {"floor": {"throughput": 20_000, "cpu": {"consumers": 0.5}},
            "floor_validating": {"throughput": 8_000, "cpu": {"consumers": 0.6}}}
    text = " ".join(_validating_floor(runs, 173.0))
    assert "**75.0 µs of CPU a command**" in text
    assert "the bare floor's 25.0 and runstate's 173.0" in text
    assert _validating_floor({"floor": runs["floor"]}, 173.0) == []
