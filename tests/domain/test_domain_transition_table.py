"""The full from x to table of the core policy in the plain context, and its overlays
(docs/rules.md, 'The Core policy at a glance')."""

from __future__ import annotations

from datetime import timedelta

import pytest

from runstate.domain import CacheEntry, SetStateStatus, TagLimit

from .builders import EARLIER, NOW, S, context, flow_run, propose, run, state

TARGETS = [S.SCHEDULED, S.PENDING, S.RUNNING, S.COMPLETED, S.FAILED, S.CANCELLED, S.CRASHED, S.PAUSED, S.CANCELLING]

# Row label -> (current state or None, cells in TARGETS order). Cells:
#   A  accept as proposed          A* accept, RUNNING named Rerunning when run_count > 0
#   A1 accept (no retries here)    A2 accept, RUNNING named Running (count reset)
#   X  abort "already <TYPE>"      R  reject(none) "already completed"
# Prefect's "500" row (COMPLETED, non-object data) is R here: deviation 1.
TABLE = {
    "none": (None, "A A A A A A A A A"),
    "SCHEDULED": (state(S.SCHEDULED, scheduled_time=EARLIER), "A A A* A A A A A A"),
    "PENDING": (state(S.PENDING), "A A A* A A A A A A"),
    "RUNNING": (state(S.RUNNING), "A A A* A A1 A A A A"),
    "COMPLETED-no-data": (state(S.COMPLETED), "A A A2 A A A X X X"),
    "COMPLETED-unpersisted": (state(S.COMPLETED, data={"type": "unpersisted"}), "A A A2 A A A X X X"),
    "COMPLETED-persisted": (state(S.COMPLETED, data={"value": 1}), "R R R R R R X X X"),
    "COMPLETED-non-object": (state(S.COMPLETED, data="<unknown>"), "R R R R R R X X X"),
    "FAILED": (state(S.FAILED), "A A A2 A A A X X X"),
    "CANCELLED": (state(S.CANCELLED), "A A A2 A A A X X X"),
    "CRASHED": (state(S.CRASHED), "A A A2 A A A X X X"),
    "PAUSED": (state(S.PAUSED), "A A A* A A A A A A"),
    "CANCELLING": (state(S.CANCELLING), "A A A* A A A A A A"),
}

CELLS = [
    pytest.param(label, target, cell, run_count, id=f"{label}->{target.value}-rc{run_count}")
    for label, (_, row) in TABLE.items()
    for target, cell in zip(TARGETS, row.split(), strict=True)
    for run_count in (0, 1)
]


@pytest.mark.parametrize("label, target, cell, run_count", CELLS)
def test_transition_table(label, target, cell, run_count):
    current = TABLE[label][0]
    decision = propose(run(current, run_count=run_count), target)
    result = decision.result

    if cell in ("X", "R"):
        status, details_type = (SetStateStatus.ABORT, "abort_details") if cell == "X" else (SetStateStatus.REJECT, "reject_details")
        assert (result.status, result.details.type) == (status, details_type)
        gist = f"already {current.type.value}" if cell == "X" else "already completed"
        assert gist in result.details.reason
        assert result.state == current and decision.appended_state is None
        assert decision.http_status == 200
        return

    expected_name = target.default_name
    if cell == "A*" and run_count > 0:
        expected_name = "Rerunning"
    assert (result.status, result.details.type) == (SetStateStatus.ACCEPT, "accept_details")
    assert (result.state.type, result.state.name) == (target, expected_name)
    assert decision.http_status == 201
    if cell == "A2":
        assert decision.run.run_count == 1  # reset to 0, then this RUNNING counts


# --- overlays -----------------------------------------------------------------------------

RUNNING_SOURCES = [None, S.SCHEDULED, S.PENDING, S.RUNNING, S.FAILED, S.PAUSED, S.CANCELLING]


def _cache_hit():
    cached = state(S.COMPLETED, data={"v": 1}, cache_key="k")
    return dict(ctx=context(cache_entries=[CacheEntry(cache_key="k", created=EARLIER, state=cached)]), details=dict(cache_key="k"))


OVERLAYS = {
    "cache-hit": (_cache_hit(), (SetStateStatus.REJECT, S.COMPLETED, "Cached")),
    "flow-paused": (dict(ctx=context(flow_run=flow_run(S.PAUSED))), (SetStateStatus.REJECT, S.PAUSED, "NotReady")),
    "flow-without-state": (dict(ctx=context(flow_run=flow_run(None))), (SetStateStatus.ABORT, None, None)),
    "flow-scheduled": (dict(ctx=context(flow_run=flow_run(S.SCHEDULED))), (SetStateStatus.ABORT, None, None)),
    "flow-cancelling": (dict(ctx=context(flow_run=flow_run(S.CANCELLING))), (SetStateStatus.ABORT, None, None)),
    "zero-tag-limit": (dict(ctx=context(tag_limits={"t": TagLimit(tag="t", limit=0)})), (SetStateStatus.ABORT, None, None)),
    "full-tag-limit": (dict(ctx=context(tag_limits={"t": TagLimit(tag="t", limit=2, active_slots=2)})), (SetStateStatus.WAIT, None, None)),
}


@pytest.mark.parametrize("source", RUNNING_SOURCES, ids=lambda s: s.value if s else "none")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_running_overlays(overlay, source):
    setup, (status, state_type, name) = OVERLAYS[overlay]
    current = state(source) if source else None
    decision = propose(run(current, tags=["t"]), S.RUNNING, setup["ctx"], **setup.get("details", {}))
    assert decision.result.status is status
    if state_type is None:  # nothing written: the current state comes back
        assert decision.appended_state is None and decision.result.state == current
        if status is SetStateStatus.WAIT:
            assert decision.result.details.delay_seconds in (2, 3)
    else:
        assert (decision.result.state.type, decision.result.state.name) == (state_type, name)
        assert decision.http_status == 201


@pytest.mark.parametrize("source", [S.SCHEDULED, S.PENDING])
@pytest.mark.parametrize("ahead, delay", [(0.51, 1), (12.7, 13), (0.5, None)])
def test_overlay_scheduled_time_ahead(source, ahead, delay):
    current = state(source, scheduled_time=NOW + timedelta(seconds=ahead))
    decision = propose(run(current), S.RUNNING)
    if delay is None:
        assert decision.result.status is SetStateStatus.ACCEPT
    else:
        assert (decision.result.status, decision.result.details.delay_seconds) == (SetStateStatus.WAIT, delay)


@pytest.mark.parametrize("run_count, retries, expected", [(1, 1, "AwaitingRetry"), (2, 1, "Failed"), (1, None, "Failed")])
def test_overlay_retries_left(run_count, retries, expected):
    decision = propose(run(state(S.RUNNING), run_count=run_count, policy=dict(retries=retries)), S.FAILED)
    assert decision.result.state.name == expected
    assert decision.result.status is (SetStateStatus.REJECT if expected == "AwaitingRetry" else SetStateStatus.ACCEPT)


@pytest.mark.parametrize("source", [S.SCHEDULED, S.PENDING, S.RUNNING, S.FAILED, None])
def test_overlay_long_cache_key_is_accepted_but_not_cached(source):
    decision = propose(run(state(source) if source else None), S.COMPLETED, cache_key="k" * 2001)
    assert decision.result.status is SetStateStatus.ACCEPT  # deviation 3 (Prefect: REJECT yet persisted)
    assert decision.appended_state.state_details.cache_key == "k" * 2001
    assert decision.effects == []


def test_overlay_awaiting_retry_becomes_retrying():
    decision = propose(run(state(S.SCHEDULED, name="AwaitingRetry", scheduled_time=EARLIER), run_count=1), S.RUNNING)
    assert (decision.result.status, decision.result.state.name) == (SetStateStatus.ACCEPT, "Retrying")


@pytest.mark.parametrize("flow_state", [S.PAUSED, S.PENDING, None])
def test_overlay_task_without_flow_run_skips_the_flow_check(flow_state):
    decision = propose(run(state(S.PENDING), flow_run_id=None), S.RUNNING, context(flow_run=flow_run(flow_state)))
    assert decision.result.status is SetStateStatus.ACCEPT


def test_overlay_fresh_task_in_a_retried_flow_is_retrying():
    # footnote 2: a fresh task whose flow run was created RUNNING (flow run_count 1 > task tracker 0)
    decision = propose(run(state(S.FAILED), run_count=0, flow_run_run_count=0), S.RUNNING)
    assert decision.result.state.name == "Retrying"
