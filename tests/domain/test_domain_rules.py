"""Table-driven tests, one table per rule of the core policy (docs/rules.md, 'The Core policy')."""

from __future__ import annotations

from datetime import timedelta

import pytest

from runstate.domain import (
    CacheEntry,
    CacheInserted,
    FlowRunNotFound,
    Lease,
    OrchestrationSettings,
    SetStateStatus,
    SlotsReleased,
    SlotsTaken,
    TagLimit,
)

from .builders import (
    EARLIER,
    FLOW_RUN_ID,
    NEW_LEASE_ID,
    NEW_STATE_ID,
    NOW,
    RUN_ID,
    S,
    context,
    effect_kinds,
    flow_run,
    propose,
    run,
    state,
)

ACCEPT, REJECT, ABORT, WAIT = (SetStateStatus.ACCEPT, SetStateStatus.REJECT, SetStateStatus.ABORT, SetStateStatus.WAIT)
OTHER_RUN_ID = RUN_ID.__class__("00000000-0000-4000-8000-00000000a002")


def outcome(decision):
    """(status, details type, returned state type, returned state name) - the parts that must match Prefect."""
    returned = decision.result.state
    return (
        decision.result.status,
        decision.result.details.type,
        returned.type if returned else None,
        returned.name if returned else None,
    )


def cached_entry(key="k", *, created=EARLIER, expiration=None, data=None, name="Completed"):
    return CacheEntry(
        cache_key=key,
        cache_expiration=expiration,
        created=created,
        state=state(S.COMPLETED, name=name, data=data if data is not None else {"value": 42},
                    message="from cache", cache_key=key, cache_expiration=expiration,
                    task_run_id=OTHER_RUN_ID, flow_run_id=OTHER_RUN_ID),
    )


def limit(tag, limit_, active_slots=0, *, active=True, avg=2.0):
    return TagLimit(tag=tag, limit=limit_, active_slots=active_slots, active=active, avg_slot_occupancy_seconds=avg)


def limits(*rows):
    return {row.tag: row for row in rows}


# --- R1 CacheRetrieval ------------------------------------------------------------------

R1_CASES = [
    pytest.param(run(state(S.PENDING)), dict(cache_key="k"), context(cache_entries=[cached_entry()]),
                 (REJECT, "reject_details", S.COMPLETED, "Cached"), id="hit"),
    pytest.param(run(state(S.COMPLETED, data={"value": 1})), dict(cache_key="k"), context(cache_entries=[cached_entry()]),
                 (REJECT, "reject_details", S.COMPLETED, "Cached"), id="hit-beats-terminal-guard"),
    pytest.param(run(state(S.PENDING)), dict(cache_key="k"),
                 context(cache_entries=[cached_entry()], flow_run=flow_run(S.PENDING)),
                 (REJECT, "reject_details", S.COMPLETED, "Cached"), id="hit-beats-flow-check"),
    pytest.param(run(state(S.PENDING), tags=["t"]), dict(cache_key="k"),
                 context(cache_entries=[cached_entry()], tag_limits=limits(limit("t", 1, 1))),
                 (REJECT, "reject_details", S.COMPLETED, "Cached"), id="hit-beats-full-tag"),
    pytest.param(run(state(S.SCHEDULED, scheduled_time=NOW + timedelta(hours=1))), dict(cache_key="k"),
                 context(cache_entries=[cached_entry()]),
                 (REJECT, "reject_details", S.COMPLETED, "Cached"), id="hit-beats-schedule"),
    pytest.param(run(state(S.PENDING)), dict(cache_key="k", refresh_cache=True), context(cache_entries=[cached_entry()]),
                 (ACCEPT, "accept_details", S.RUNNING, "Rerunning"), id="refresh-cache-skips-lookup"),
    pytest.param(run(state(S.PENDING)), dict(cache_key="k"), context(cache_entries=[cached_entry(expiration=NOW)]),
                 (ACCEPT, "accept_details", S.RUNNING, "Rerunning"), id="expiring-now-is-expired"),
    pytest.param(run(state(S.PENDING)), dict(cache_key="k"),
                 context(cache_entries=[cached_entry(expiration=NOW + timedelta(seconds=1))]),
                 (REJECT, "reject_details", S.COMPLETED, "Cached"), id="not-yet-expired"),
    pytest.param(run(state(S.PENDING)), dict(cache_key="k"), context(cache_entries=[cached_entry("other")]),
                 (ACCEPT, "accept_details", S.RUNNING, "Rerunning"), id="other-key-ignored"),
    pytest.param(run(state(S.PENDING)), dict(), context(cache_entries=[cached_entry()]),
                 (ACCEPT, "accept_details", S.RUNNING, "Rerunning"), id="no-key-no-lookup"),
    pytest.param(run(state(S.PENDING)), dict(cache_key=""), context(cache_entries=[cached_entry("")]),
                 (ACCEPT, "accept_details", S.RUNNING, "Rerunning"), id="empty-key-no-lookup"),
]


@pytest.mark.parametrize("the_run, details, ctx, expected", R1_CASES)
def test_r1_cache_retrieval(the_run, details, ctx, expected):
    decision = propose(the_run, S.RUNNING, ctx, **details)
    assert outcome(decision) == expected
    if expected[3] == "Cached":
        assert "cache" in decision.result.details.reason.lower()
        assert decision.http_status == 201
        assert effect_kinds(decision) == []  # no slot, no cache insertion for a Cached copy


def test_r1_hit_is_a_fresh_copy_repointed_to_this_run():
    entry = cached_entry(expiration=NOW + timedelta(days=1))
    the_run = run(state(S.PENDING), start_time=None, end_time=None, run_count=2)
    decision = propose(the_run, S.RUNNING, context(cache_entries=[entry]), cache_key="k")
    copy = decision.appended_state
    assert copy.id == NEW_STATE_ID and copy.timestamp == NOW
    assert (copy.message, copy.data) == ("from cache", {"value": 42})
    assert copy.state_details.cache_key == "k"
    assert copy.state_details.cache_expiration == entry.cache_expiration
    assert (copy.state_details.task_run_id, copy.state_details.flow_run_id) == (RUN_ID, FLOW_RUN_ID)
    assert decision.run.run_count == 2  # a hit is not a run
    assert decision.run.start_time == decision.run.end_time == NOW


def test_r1_newest_live_entry_wins_whatever_the_order():
    older = cached_entry(created=EARLIER, data={"value": "old"})
    newer = cached_entry(created=EARLIER + timedelta(seconds=1), data={"value": "new"})
    expired_newest = cached_entry(created=NOW, expiration=NOW - timedelta(seconds=1), data={"value": "expired"})
    for entries in ([older, newer, expired_newest], [expired_newest, newer, older]):
        decision = propose(run(state(S.PENDING)), S.RUNNING, context(cache_entries=entries), cache_key="k")
        assert decision.appended_state.data == {"value": "new"}


# --- R2 HandleTaskTerminalStateTransitions --------------------------------------------

R2_CASES = [
    pytest.param(state(S.FAILED), S.CRASHED, (ABORT, "abort_details", S.FAILED, "Failed"), "already FAILED", id="failed-to-crashed"),
    pytest.param(state(S.FAILED), S.PAUSED, (ABORT, "abort_details", S.FAILED, "Failed"), "already FAILED", id="failed-to-paused"),
    pytest.param(state(S.CANCELLED), S.CANCELLING, (ABORT, "abort_details", S.CANCELLED, "Cancelled"), "already CANCELLED", id="cancelled-to-cancelling"),
    pytest.param(state(S.CRASHED), S.CRASHED, (ABORT, "abort_details", S.CRASHED, "Crashed"), "already CRASHED", id="crashed-to-crashed"),
    pytest.param(state(S.COMPLETED, data={"v": 1}), S.CRASHED, (ABORT, "abort_details", S.COMPLETED, "Completed"), "already COMPLETED", id="completed-to-crashed"),
    pytest.param(state(S.COMPLETED, data={"v": 1}), S.PENDING, (REJECT, "reject_details", S.COMPLETED, "Completed"), "already completed", id="persisted-result-rejects"),
    pytest.param(state(S.COMPLETED, data={"v": 1}), S.COMPLETED, (REJECT, "reject_details", S.COMPLETED, "Completed"), "already completed", id="persisted-completed-to-completed"),
    pytest.param(state(S.COMPLETED, data="<unknown>"), S.RUNNING, (REJECT, "reject_details", S.COMPLETED, "Completed"), "already completed", id="deviation-1-non-object-data"),
    pytest.param(state(S.COMPLETED, data=[1]), S.FAILED, (REJECT, "reject_details", S.COMPLETED, "Completed"), "already completed", id="deviation-1-list-data"),
    pytest.param(state(S.COMPLETED, data="<unknown>"), S.PAUSED, (ABORT, "abort_details", S.COMPLETED, "Completed"), "already COMPLETED", id="non-object-data-still-aborts"),
    pytest.param(state(S.COMPLETED, data={"type": "unpersisted"}), S.PENDING, (ACCEPT, "accept_details", S.PENDING, "Pending"), None, id="unpersisted-may-leave"),
    pytest.param(state(S.COMPLETED, data={}), S.PENDING, (ACCEPT, "accept_details", S.PENDING, "Pending"), None, id="empty-object-may-leave"),
    pytest.param(state(S.COMPLETED, data=0), S.PENDING, (ACCEPT, "accept_details", S.PENDING, "Pending"), None, id="falsy-data-may-leave"),
    pytest.param(state(S.FAILED), S.RUNNING, (ACCEPT, "accept_details", S.RUNNING, "Running"), None, id="failed-to-running-not-renamed"),
]


@pytest.mark.parametrize("current, target, expected, reason", R2_CASES)
def test_r2_terminal_state_transitions(current, target, expected, reason):
    the_run = run(current, run_count=3)
    decision = propose(the_run, target)
    assert outcome(decision) == expected
    if reason is not None:
        assert reason in decision.result.details.reason
        assert decision.appended_state is None and decision.run == the_run
        assert decision.result.state == current and decision.http_status == 200


@pytest.mark.parametrize(
    "target, run_count_after, end_time_after",
    [(S.RUNNING, 1, None), (S.PENDING, 0, None), (S.SCHEDULED, 0, None), (S.COMPLETED, 3, EARLIER), (S.CANCELLED, 3, EARLIER)],
)
def test_r2_leaving_terminal_resets_run_count_and_end_time(target, run_count_after, end_time_after):
    the_run = run(state(S.FAILED), run_count=3, start_time=EARLIER, end_time=EARLIER)
    decision = propose(the_run, target)
    assert decision.result.status is ACCEPT
    assert (decision.run.run_count, decision.run.end_time) == (run_count_after, end_time_after)


def test_r2_renames_retrying_when_the_flow_retried_since_the_task_ran():
    the_run = run(state(S.FAILED), run_count=2, flow_run_run_count=1)
    decision = propose(the_run, S.RUNNING, context(flow_run=flow_run(run_count=2)))
    assert outcome(decision) == (ACCEPT, "accept_details", S.RUNNING, "Retrying")
    assert decision.run.flow_run_run_count == 2  # R9 catches the tracker up


def test_r2_reset_is_undone_when_a_later_rule_replaces_the_proposal():
    the_run = run(state(S.FAILED), run_count=3)
    decision = propose(the_run, S.RUNNING, context(flow_run=flow_run(S.PAUSED)))
    assert outcome(decision) == (REJECT, "reject_details", S.PAUSED, "NotReady")
    assert decision.run.run_count == 3


# --- R3 PreventRunningTasksFromStoppedFlows -------------------------------------------

@pytest.mark.parametrize(
    "flow_state, expected",
    [
        (S.RUNNING, (ACCEPT, "accept_details", S.RUNNING, "Rerunning")),
        (S.PAUSED, (REJECT, "reject_details", S.PAUSED, "NotReady")),
        (None, (ABORT, "abort_details", S.PENDING, "Pending")),
        (S.SCHEDULED, (ABORT, "abort_details", S.PENDING, "Pending")),
        (S.PENDING, (ABORT, "abort_details", S.PENDING, "Pending")),
        (S.COMPLETED, (ABORT, "abort_details", S.PENDING, "Pending")),
        (S.FAILED, (ABORT, "abort_details", S.PENDING, "Pending")),
        (S.CANCELLING, (ABORT, "abort_details", S.PENDING, "Pending")),
    ],
)
def test_r3_flow_run_state_gates_running(flow_state, expected):
    decision = propose(run(state(S.PENDING)), S.RUNNING, context(flow_run=flow_run(flow_state)))
    assert outcome(decision) == expected
    if expected[0] is ABORT:
        assert "enclosing flow must be running" in decision.result.details.reason


def test_r3_not_ready_copies_the_flows_pause_settings_and_takes_no_slot():
    pause_timeout = NOW + timedelta(minutes=5)
    ctx = context(
        flow_run=flow_run(S.PAUSED, pause_timeout=pause_timeout, pause_reschedule=True),
        tag_limits=limits(limit("t", 5)),
    )
    decision = propose(run(state(S.PENDING), tags=["t"]), S.RUNNING, ctx)
    details = decision.appended_state.state_details
    assert (details.pause_timeout, details.pause_reschedule, details.pause_key) == (pause_timeout, True, None)
    assert str(FLOW_RUN_ID) in decision.result.details.reason
    assert decision.run.run_count == 1 and decision.http_status == 201
    assert effect_kinds(decision) == []


@pytest.mark.parametrize(
    "the_run, target, ctx, expected",
    [
        pytest.param(run(state(S.PENDING), flow_run_id=None), S.RUNNING, context(flow_run=flow_run(S.PAUSED)),
                     (ACCEPT, "accept_details", S.RUNNING, "Rerunning"), id="no-flow-run-skips-check"),
        pytest.param(run(state(S.PENDING)), S.COMPLETED, context(flow_run=flow_run(S.PAUSED)),
                     (ACCEPT, "accept_details", S.COMPLETED, "Completed"), id="only-running-is-gated"),
    ],
)
def test_r3_scope(the_run, target, ctx, expected):
    assert outcome(propose(the_run, target, ctx)) == expected


# --- R4 SecureTaskConcurrencySlots -----------------------------------------------------

R4_CASES = [
    pytest.param(["a"], limits(limit("a", 1)), 0.5, (ACCEPT, None), ["a"], id="free-tag-takes-a-slot"),
    pytest.param(["a", "b"], limits(limit("a", 2, 1), limit("b", 3)), 0.5, (ACCEPT, None), ["a", "b"], id="one-lease-for-all-tags"),
    pytest.param(["a", "x"], limits(limit("a", 1)), 0.5, (ACCEPT, None), ["a"], id="tag-without-limit-ignored"),
    pytest.param(["a"], limits(limit("a", 0, active=False)), 0.5, (ACCEPT, None), None, id="inactive-zero-limit-ignored"),
    pytest.param(["a"], limits(limit("a", 1, 1, active=False)), 0.5, (ACCEPT, None), None, id="inactive-full-limit-ignored"),
    pytest.param(["a"], limits(limit("a", 1, 1)), 0.0, (WAIT, 2), None, id="full-wait-low-draw"),
    pytest.param(["a"], limits(limit("a", 1, 1)), 0.999, (WAIT, 3), None, id="full-wait-high-draw"),
    pytest.param(["a"], limits(limit("a", 1, 1, avg=None)), 0.0, (WAIT, 8), None, id="no-occupancy-uses-setting-low"),
    pytest.param(["a"], limits(limit("a", 1, 1, avg=0.0)), 0.999, (WAIT, 13), None, id="zero-occupancy-uses-setting-high"),
    pytest.param(["a", "b"], limits(limit("a", 1, 1, avg=5.0), limit("b", 10, 3, avg=2.0)), 0.0, (WAIT, 4), None,
                 id="busiest-row-sets-the-mean"),
    pytest.param(["z"], limits(limit("z", 0)), 0.5, (ABORT, None), None, id="zero-limit-aborts"),
    pytest.param(["z", "a"], limits(limit("z", 0), limit("a", 5)), 0.5, (ABORT, None), None, id="deviation-4-zero-takes-no-slot"),
    pytest.param(["z", "a"], limits(limit("z", 0), limit("a", 1, 1)), 0.0, (WAIT, 2), None, id="full-tag-wait-overrides-abort"),
]


@pytest.mark.parametrize("tags, tag_limits, draw, expected, slot_tags", R4_CASES)
def test_r4_tag_concurrency_slots(tags, tag_limits, draw, expected, slot_tags):
    decision = propose(run(state(S.PENDING), tags=tags), S.RUNNING, context(tag_limits=tag_limits, random=draw))
    status, delay = expected
    assert decision.result.status is status
    if status is WAIT:
        assert decision.result.details.delay_seconds == delay
        assert decision.result.details.reason.endswith(", ".join(t for t in tags if tag_limits[t].limit > 0))
    if status is ABORT:
        assert 'on tag "z" is 0' in decision.result.details.reason
    taken = [e for e in decision.effects if isinstance(e, SlotsTaken)]
    assert taken == ([SlotsTaken(lease_id=NEW_LEASE_ID, tags=slot_tags)] if slot_tags else [])


def test_r4_wait_mean_is_capped_by_the_setting():
    ctx = context(tag_limits=limits(limit("a", 1, 1, avg=50.0)), random=0.0,
                  settings=OrchestrationSettings(tag_concurrency_slot_wait_seconds=1))
    assert propose(run(state(S.PENDING), tags=["a"]), S.RUNNING, ctx).result.details.delay_seconds == 1


@pytest.mark.parametrize("active_slots, expected", [(0, ACCEPT), (1, WAIT)])
def test_r4_running_to_running_takes_another_slot(active_slots, expected):
    ctx = context(tag_limits=limits(limit("a", 1, active_slots)),
                  leases=[Lease(id=OTHER_RUN_ID, tags=["a"], holder_run_id=RUN_ID)] if active_slots else [])
    decision = propose(run(state(S.RUNNING), tags=["a"]), S.RUNNING, ctx)
    assert decision.result.status is expected
    assert (effect_kinds(decision) == ["slots_taken"]) is (expected is ACCEPT)


def test_r4_slot_is_given_back_when_the_schedule_makes_the_run_wait():
    current = state(S.SCHEDULED, scheduled_time=NOW + timedelta(seconds=30))
    decision = propose(run(current, tags=["a"]), S.RUNNING, context(tag_limits=limits(limit("a", 1))))
    assert decision.result.status is WAIT and decision.effects == []


# --- R5 CopyScheduledTime / R6 WaitForScheduledTime ------------------------------------

@pytest.mark.parametrize(
    "proposed_time, expected",
    [(None, EARLIER), (NOW + timedelta(hours=1), NOW + timedelta(hours=1))],
)
def test_r5_pending_inherits_scheduled_time_unless_it_has_one(proposed_time, expected):
    decision = propose(run(state(S.SCHEDULED, scheduled_time=EARLIER)), S.PENDING, scheduled_time=proposed_time)
    assert decision.appended_state.state_details.scheduled_time == expected


@pytest.mark.parametrize(
    "current_type, ahead_seconds, expected",
    [
        (S.SCHEDULED, 30.6, (WAIT, 31)),
        (S.SCHEDULED, 30.4, (WAIT, 30)),
        (S.PENDING, 1.5, (WAIT, 1)),  # exact .5 rounds down
        (S.PENDING, 0.6, (WAIT, 1)),
        (S.SCHEDULED, 0.5, (ACCEPT, None)),
        (S.SCHEDULED, 0.45, (ACCEPT, None)),
        (S.SCHEDULED, -10, (ACCEPT, None)),
        (S.PENDING, None, (ACCEPT, None)),
    ],
)
def test_r6_waits_for_the_scheduled_time(current_type, ahead_seconds, expected):
    scheduled = None if ahead_seconds is None else NOW + timedelta(seconds=ahead_seconds)
    decision = propose(run(state(current_type, scheduled_time=scheduled)), S.RUNNING)
    status, delay = expected
    assert decision.result.status is status
    if status is WAIT:
        assert decision.result.details.delay_seconds == delay
        assert "scheduled time is in the future" in decision.result.details.reason.lower()


def test_r6_future_schedule_flows_through_pending_and_only_delays_running():
    future = NOW + timedelta(seconds=20)
    to_pending = propose(run(state(S.SCHEDULED, scheduled_time=future)), S.PENDING)
    assert to_pending.result.status is ACCEPT
    assert propose(to_pending.run, S.RUNNING).result.details.delay_seconds == 20
    assert propose(run(state(S.SCHEDULED, scheduled_time=future)), S.COMPLETED).result.status is ACCEPT


# --- R7 RetryFailedTasks ---------------------------------------------------------------

R7_CASES = [
    pytest.param(dict(retries=2), 1, {}, 0.0, id="first-failure-retries"),
    pytest.param(dict(retries=2), 2, {}, 0.0, id="last-retry"),
    pytest.param(dict(retries=2), 3, {}, None, id="budget-spent"),
    pytest.param(dict(), 1, {}, None, id="no-retries-configured"),
    pytest.param(dict(retries=0), 1, {}, None, id="zero-retries"),
    pytest.param(dict(max_retries=1), 1, {}, 0.0, id="deprecated-max-retries"),
    pytest.param(dict(retries=3), 1, dict(retriable=False), None, id="not-retriable"),
    pytest.param(dict(retries=3), 1, dict(retriable=True), 0.0, id="retriable-true"),
    pytest.param(dict(retries=1, retry_delay=5), 1, {}, 5.0, id="number-delay"),
    pytest.param(dict(retries=1, retry_delay=2.5), 1, {}, 2.5, id="fractional-delay"),
    pytest.param(dict(retries=4, retry_delay=[3, 7, 11]), 1, {}, 3.0, id="list-delay-1"),
    pytest.param(dict(retries=4, retry_delay=[3, 7, 11]), 2, {}, 7.0, id="list-delay-2"),
    pytest.param(dict(retries=4, retry_delay=[3, 7, 11]), 3, {}, 11.0, id="list-delay-3"),
    pytest.param(dict(retries=4, retry_delay=[3, 7, 11]), 4, {}, 11.0, id="list-delay-last-repeats"),
    pytest.param(dict(retries=4, retry_delay=[3, 7, 11]), 5, {}, None, id="list-delay-budget-spent"),
    pytest.param(dict(retries=1, retry_delay=[]), 1, {}, 0.0, id="deviation-2-empty-list-no-delay"),
    pytest.param(dict(retry_delay=[]), 1, {}, None, id="deviation-2-empty-list-no-retries"),
    pytest.param(dict(retries=1, retry_delay_seconds=4), 1, {}, 4.0, id="deprecated-delay-seconds"),
]


@pytest.mark.parametrize("policy, attempt, details, delay", R7_CASES)
def test_r7_retry_failed_tasks(policy, attempt, details, delay):
    the_run = run(state(S.RUNNING), run_count=attempt, policy=policy)
    decision = propose(the_run, S.FAILED, message="boom", data={"error": "x"}, cache_key="ck", **details)
    if delay is None:
        assert outcome(decision) == (ACCEPT, "accept_details", S.FAILED, "Failed")
        return
    assert outcome(decision) == (REJECT, "reject_details", S.SCHEDULED, "AwaitingRetry")
    retry = decision.appended_state
    assert decision.result.details.reason == "Retrying"
    assert retry.state_details.scheduled_time == NOW + timedelta(seconds=delay)
    assert (retry.message, retry.data) == ("boom", {"error": "x"})
    assert retry.state_details.cache_key is None  # everything else starts fresh
    assert decision.run.next_scheduled_start_time == retry.state_details.scheduled_time


@pytest.mark.parametrize(
    "draw, low, high",
    [(0.0, 6.293, 6.295), (0.5, 6.295, 15.0), (0.999999, 14.99, 15.0)],  # lower = 10*log2(2^1.5/(2^1.5-1)) = 6.294
)
def test_r7_jitter_stays_in_the_clamped_range(draw, low, high):
    the_run = run(state(S.RUNNING), policy=dict(retries=1, retry_delay=10, retry_jitter_factor=0.5))
    decision = propose(the_run, S.FAILED, context(random=draw))
    delay = (decision.appended_state.state_details.scheduled_time - NOW).total_seconds()
    assert low <= delay <= high


@pytest.mark.parametrize("source, target", [(S.PENDING, S.FAILED), (S.RUNNING, S.CRASHED)])
def test_r7_only_running_to_failed_is_retried(source, target):
    decision = propose(run(state(source), policy=dict(retries=5)), target)
    assert decision.result.status is ACCEPT and decision.appended_state.type is target


# --- R8 RenameReruns -------------------------------------------------------------------

@pytest.mark.parametrize(
    "current, run_count, client_name, expected_name",
    [
        (state(S.PAUSED), 1, None, "Rerunning"),
        (state(S.PENDING), 0, "Mine", "Mine"),
        (state(S.PENDING), 2, "Mine", "Rerunning"),
        (state(S.SCHEDULED, name="AwaitingRetry"), 1, None, "Retrying"),
        (state(S.SCHEDULED, name="AwaitingRetry"), 0, None, "Running"),
        (None, 3, "Mine", "Mine"),
        (state(S.CRASHED), 4, None, "Running"),  # R2 reset the count first
    ],
)
def test_r8_rename_reruns(current, run_count, client_name, expected_name):
    decision = propose(run(current, run_count=run_count), S.RUNNING, name=client_name)
    assert decision.appended_state.name == expected_name


# --- R9 UpdateFlowRunTrackerOnTasks ----------------------------------------------------

@pytest.mark.parametrize(
    "current, target, expected_tracker",
    [
        (state(S.PENDING), S.RUNNING, 5),
        (state(S.PENDING), S.COMPLETED, 1),
        (state(S.SCHEDULED, scheduled_time=NOW + timedelta(seconds=9)), S.RUNNING, 1),  # WAIT: nothing written
    ],
)
def test_r9_tracks_the_flow_run_count(current, target, expected_tracker):
    decision = propose(run(current), target, context(flow_run=flow_run(run_count=5)))
    assert decision.run.flow_run_run_count == expected_tracker


def test_r9_missing_flow_run_fails_like_prefects_404():
    with pytest.raises(FlowRunNotFound) as failure:
        propose(run(state(S.PENDING)), S.RUNNING, context(flow_run=None))
    assert failure.value.http_status == 404
    # a task without a flow run never looks one up
    assert propose(run(state(S.PENDING), flow_run_id=None), S.RUNNING, context(flow_run=None)).result.status is ACCEPT


# --- R10 CacheInsertion ----------------------------------------------------------------

@pytest.mark.parametrize(
    "key, force, inserted",
    [
        ("k", False, True),
        ("k" * 2000, False, True),
        ("k" * 2001, False, False),  # deviation 3
        ("", False, False),
        (None, False, False),
        ("k", True, False),
    ],
)
def test_r10_cache_insertion(key, force, inserted):
    expiration = NOW + timedelta(days=1)
    decision = propose(run(state(S.RUNNING)), S.COMPLETED, force=force, cache_key=key, cache_expiration=expiration)
    assert outcome(decision) == (ACCEPT, "accept_details", S.COMPLETED, "Completed")
    expected = [CacheInserted(cache_key=key, cache_expiration=expiration, state_id=NEW_STATE_ID)] if inserted else []
    assert [e for e in decision.effects if isinstance(e, CacheInserted)] == expected


def test_r10_respects_the_configured_maximum():
    ctx = context(settings=OrchestrationSettings(max_cache_key_length=3))
    assert propose(run(state(S.RUNNING)), S.COMPLETED, ctx, cache_key="abcd").effects == []
    assert effect_kinds(propose(run(state(S.RUNNING)), S.COMPLETED, ctx, cache_key="abc")) == ["cache_inserted"]


def test_r10_keys_on_running_proposals_are_not_inserted():
    assert propose(run(state(S.PENDING)), S.RUNNING, cache_key="k").effects == []


# --- R11 ReleaseTaskConcurrencySlots --------------------------------------------------

LEASE_A = Lease(id=NEW_LEASE_ID.__class__("00000000-0000-4000-8000-0000000b0a01"), tags=["a", "b"], holder_run_id=RUN_ID)
LEASE_B = Lease(id=NEW_LEASE_ID.__class__("00000000-0000-4000-8000-0000000b0a02"), tags=["a"], slots=2, holder_run_id=RUN_ID)
FOREIGN = Lease(id=NEW_LEASE_ID.__class__("00000000-0000-4000-8000-0000000b0a03"), tags=["a"], holder_run_id=OTHER_RUN_ID)
UNLIMITED = Lease(id=NEW_LEASE_ID.__class__("00000000-0000-4000-8000-0000000b0a04"), tags=["gone"], holder_run_id=RUN_ID)

R11_RELEASE_ALL = SlotsReleased(lease_ids=[LEASE_A.id, LEASE_B.id], decrements={"a": 3, "b": 1})

R11_CASES = [
    pytest.param(S.RUNNING, S.COMPLETED, False, R11_RELEASE_ALL, id="completed-releases"),
    pytest.param(S.RUNNING, S.FAILED, False, R11_RELEASE_ALL, id="failed-releases"),
    pytest.param(S.RUNNING, S.PAUSED, False, R11_RELEASE_ALL, id="paused-releases"),
    pytest.param(S.RUNNING, S.COMPLETED, True, R11_RELEASE_ALL, id="forced-completed-releases"),
    pytest.param(S.RUNNING, S.CANCELLING, False, None, id="cancelling-keeps"),
    pytest.param(S.PENDING, S.RUNNING, True, None, id="forced-running-keeps"),
    pytest.param(S.COMPLETED, S.CRASHED, False, None, id="abort-writes-nothing"),
]


@pytest.mark.parametrize("source, target, force, released", R11_CASES)
def test_r11_release_task_concurrency_slots(source, target, force, released):
    ctx = context(tag_limits=limits(limit("a", 5, 3), limit("b", 5, 1)), leases=[LEASE_A, LEASE_B, FOREIGN, UNLIMITED])
    decision = propose(run(state(source), tags=["a", "b", "gone"]), target, ctx, force=force)
    assert [e for e in decision.effects if isinstance(e, SlotsReleased)] == ([released] if released else [])
    assert not any(isinstance(e, SlotsTaken) for e in decision.effects)  # forced RUNNING never acquires


def test_r11_retry_replacement_releases_slots():
    ctx = context(tag_limits=limits(limit("a", 1, 1)), leases=[LEASE_B])
    decision = propose(run(state(S.RUNNING), tags=["a"], policy=dict(retries=1)), S.FAILED, ctx)
    assert decision.appended_state.name == "AwaitingRetry"
    assert decision.effects == [SlotsReleased(lease_ids=[LEASE_B.id], decrements={"a": 2})]
