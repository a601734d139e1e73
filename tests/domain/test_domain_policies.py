"""Policy selection, the minimal and background policies, and the global transforms (docs/rules.md,
'Choosing a policy', 'The Minimal policy', 'The Background policy', 'Global transforms')."""

from __future__ import annotations

from datetime import timedelta
from uuid import UUID

import pytest

from runstate.domain import (
    FlowRunView,
    Lease,
    SetStateStatus,
    SlotsReleased,
    StateCreate,
    TagLimit,
    TaskScheduled,
    apply_initial_state,
)

from .builders import (
    EARLIER,
    FLOW_RUN_ID,
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

ACCEPT, REJECT, ABORT = SetStateStatus.ACCEPT, SetStateStatus.REJECT, SetStateStatus.ABORT
PARAMS_ID = UUID("00000000-0000-4000-8000-0000000d0001")
CLIENT_ID = UUID("00000000-0000-4000-8000-0000000d0002")
LEASE_ID = UUID("00000000-0000-4000-8000-0000000d0003")


@pytest.mark.parametrize(
    "force, deferred, policy",
    [
        (False, False, "CoreTaskPolicy"),
        (True, False, "MinimalTaskPolicy"),
        (False, True, "BackgroundTaskPolicy"),
        (True, True, "BackgroundTaskPolicy"),  # deferred wins over force
    ],
)
def test_policy_selection(force, deferred, policy):
    assert propose(run(state(S.PENDING)), S.SCHEDULED, force=force, deferred=deferred).policy == policy


# --- MinimalTaskPolicy -----------------------------------------------------------------

MINIMAL_CASES = [
    pytest.param(state(S.COMPLETED, data={"v": 1}), S.RUNNING, context(), "Running", id="leaves-persisted-result"),
    pytest.param(state(S.COMPLETED, data="<unknown>"), S.PENDING, context(), "Pending", id="leaves-non-object-data"),
    pytest.param(state(S.FAILED), S.CRASHED, context(), "Crashed", id="terminal-to-crashed"),
    pytest.param(state(S.PENDING), S.RUNNING, context(flow_run=flow_run(S.PAUSED)), "Running", id="no-flow-check"),
    pytest.param(state(S.PENDING), S.RUNNING, context(tag_limits={"a": TagLimit(tag="a", limit=0)}), "Running", id="no-zero-limit-abort"),
    pytest.param(state(S.RUNNING), S.FAILED, context(), "Failed", id="no-retries"),
    pytest.param(state(S.SCHEDULED, scheduled_time=NOW + timedelta(hours=1)), S.RUNNING, context(), "Running", id="no-schedule-wait"),
    pytest.param(state(S.RUNNING), S.RUNNING, context(cache_entries=[]), "Running", id="no-rerun-rename"),
]


@pytest.mark.parametrize("current, target, ctx, name", MINIMAL_CASES)
def test_minimal_policy_accepts_everything_as_proposed(current, target, ctx, name):
    the_run = run(current, tags=["a"], run_count=2, policy=dict(retries=3))
    decision = propose(the_run, target, ctx, force=True, cache_key="k")
    assert decision.result.status is ACCEPT
    assert (decision.appended_state.type, decision.appended_state.name) == (target, name)
    assert decision.run.run_count == (3 if target is S.RUNNING else 2)
    assert effect_kinds(decision) == []  # no cache insertion, no slot taken


# --- BackgroundTaskPolicy -------------------------------------------------------------

@pytest.mark.parametrize(
    "current, name, status",
    [
        (state(S.PENDING), None, ABORT),
        (state(S.PENDING, name="Submitting"), "Pending", ABORT),
        (state(S.PENDING), "Submitting", ACCEPT),
        (state(S.RUNNING), None, ABORT),
        (state(S.CANCELLING), None, ABORT),
        (state(S.CANCELLED), None, ABORT),
        (state(S.SCHEDULED), None, ACCEPT),
        (state(S.FAILED), None, ACCEPT),
        (None, None, ACCEPT),
    ],
)
def test_background_prevent_pending_transitions(current, name, status):
    decision = propose(run(current), S.PENDING, deferred=True, name=name)
    assert decision.result.status is status
    if status is ABORT:
        assert f"in a {current.type.value} state and cannot transition to a PENDING" in decision.result.details.reason


def test_background_forced_pending_to_pending_is_still_aborted():
    assert propose(run(state(S.PENDING)), S.PENDING, force=True, deferred=True).result.status is ABORT


@pytest.mark.parametrize("client_time", [None, NOW + timedelta(hours=1)])
def test_background_renamed_pending_carries_schedule_and_lease_forward(client_time):
    current = state(S.PENDING, scheduled_time=EARLIER, deployment_concurrency_lease_id=LEASE_ID)
    decision = propose(run(current), S.PENDING, deferred=True, name="Submitting",
                       scheduled_time=client_time, deployment_concurrency_lease_id=CLIENT_ID)
    details = decision.appended_state.state_details
    assert (details.scheduled_time, details.deployment_concurrency_lease_id) == (EARLIER, LEASE_ID)


@pytest.mark.parametrize(
    "source, target, deferred, proposed, expected",
    [
        (S.SCHEDULED, S.PENDING, True, None, PARAMS_ID),
        (S.PENDING, S.RUNNING, True, None, PARAMS_ID),
        (S.PENDING, S.RUNNING, True, CLIENT_ID, CLIENT_ID),
        (S.RUNNING, S.COMPLETED, True, None, None),
        (S.SCHEDULED, S.PENDING, False, None, None),  # core policy does not copy it
    ],
)
def test_background_copies_task_parameters_id(source, target, deferred, proposed, expected):
    the_run = run(state(source, task_parameters_id=PARAMS_ID))
    decision = propose(the_run, target, deferred=deferred, task_parameters_id=proposed)
    assert decision.appended_state.state_details.task_parameters_id == expected


@pytest.mark.parametrize(
    "name, deferred, expected",
    [
        (None, True, [TaskScheduled(task_key="my-task", retry=False)]),
        ("AwaitingRetry", True, [TaskScheduled(task_key="my-task", retry=True)]),
        (None, False, []),
    ],
)
def test_background_enqueues_deferred_scheduled_runs(name, deferred, expected):
    decision = propose(run(state(S.PENDING)), S.SCHEDULED, deferred=deferred, name=name)
    assert decision.effects == expected


def test_background_has_no_flow_check_and_no_tag_slots():
    ctx = context(flow_run=flow_run(S.PAUSED), tag_limits={"a": TagLimit(tag="a", limit=1, active_slots=1)})
    decision = propose(run(state(S.PENDING), tags=["a"]), S.RUNNING, ctx, deferred=True)
    assert (decision.result.status, decision.appended_state.name, decision.effects) == (ACCEPT, "Rerunning", [])


def test_background_keeps_core_guards():
    assert propose(run(state(S.COMPLETED, data={"v": 1})), S.SCHEDULED, deferred=True).result.status is REJECT
    decision = propose(run(state(S.RUNNING), policy=dict(retries=1)), S.FAILED, deferred=True)
    assert decision.appended_state.name == "AwaitingRetry"
    assert decision.effects == []  # the retry replacement is not a SCHEDULED proposal: not enqueued


@pytest.mark.parametrize(
    "initial, policy, effects",
    [
        (StateCreate(type=S.SCHEDULED, state_details={"deferred": True}), "BackgroundTaskPolicy",
         [TaskScheduled(task_key="my-task")]),
        (StateCreate(type=S.PENDING), "MinimalTaskPolicy", []),
    ],
)
def test_apply_initial_state_is_a_forced_set_state(initial, policy, effects):
    fresh = run(None, run_count=0, flow_run_run_count=0)
    decision = apply_initial_state(fresh, initial, context(flow_run=flow_run(S.PAUSED)))
    assert (decision.result.status, decision.policy, decision.effects) == (ACCEPT, policy, effects)
    assert decision.run.state.id == NEW_STATE_ID


# --- global transforms ----------------------------------------------------------------

START, END = EARLIER - timedelta(hours=1), EARLIER - timedelta(minutes=30)

GLOBAL_CASES = [
    # (current, run fields, target, proposal details, expected run fields)
    pytest.param(state(S.PENDING), dict(start_time=None), S.RUNNING, {}, dict(start_time=NOW, run_count=2), id="first-running-sets-start"),
    pytest.param(state(S.PENDING), dict(start_time=START), S.RUNNING, {}, dict(start_time=START), id="start-time-kept"),
    pytest.param(state(S.RUNNING), dict(start_time=START), S.COMPLETED, {}, dict(end_time=NOW, total_run_time=60.0, run_count=1), id="completing-sets-end-and-run-time"),
    pytest.param(None, dict(), S.COMPLETED, {}, dict(start_time=NOW, end_time=NOW, expected_start_time=NOW), id="straight-to-terminal-sets-start-too"),
    pytest.param(state(S.COMPLETED), dict(start_time=START, end_time=END), S.FAILED, {}, dict(end_time=END), id="terminal-to-terminal-keeps-first-end"),
    pytest.param(state(S.COMPLETED), dict(start_time=None, end_time=END), S.FAILED, {}, dict(start_time=None, end_time=END), id="existing-end-leaves-start-alone"),
    pytest.param(state(S.FAILED), dict(start_time=START, end_time=END, run_count=3), S.PENDING, {}, dict(end_time=None, run_count=0), id="leaving-terminal-clears-end"),
    pytest.param(state(S.RUNNING), dict(total_run_time=5.0), S.RUNNING, {}, dict(total_run_time=65.0, run_count=2), id="running-to-running-adds-up"),
    pytest.param(state(S.PENDING), dict(total_run_time=5.0), S.RUNNING, {}, dict(total_run_time=5.0), id="only-time-in-running-counts"),
    pytest.param(None, dict(), S.SCHEDULED, dict(scheduled_time=NOW + timedelta(hours=2)),
                 dict(expected_start_time=NOW + timedelta(hours=2), next_scheduled_start_time=NOW + timedelta(hours=2)), id="scheduled-sets-expected-and-next"),
    pytest.param(None, dict(), S.SCHEDULED, {}, dict(expected_start_time=NOW, next_scheduled_start_time=NOW), id="scheduled-without-time-is-now"),
    pytest.param(None, dict(), S.PENDING, {}, dict(expected_start_time=NOW, next_scheduled_start_time=None), id="expected-start-from-timestamp"),
    pytest.param(state(S.SCHEDULED), dict(expected_start_time=START, next_scheduled_start_time=START), S.PENDING, {},
                 dict(expected_start_time=START, next_scheduled_start_time=None), id="leaving-scheduled-clears-next"),
    pytest.param(state(S.PENDING), dict(run_count=4), S.COMPLETED, {}, dict(run_count=4), id="run-count-only-on-running"),
]


@pytest.mark.parametrize("current, fields, target, details, expected", GLOBAL_CASES)
def test_global_transforms(current, fields, target, details, expected):
    the_run = run(current, **fields)
    decision = propose(the_run, target, **details)
    assert decision.result.status is ACCEPT
    after = decision.run.model_dump()
    assert {key: after[key] for key in expected} == expected
    untouched = set(the_run.model_dump()) - set(expected) - {"state", "start_time", "end_time", "expected_start_time", "next_scheduled_start_time", "total_run_time", "run_count"}
    assert {k: after[k] for k in untouched} == {k: the_run.model_dump()[k] for k in untouched}


def test_state_pointer_moves_and_client_ids_are_overwritten():
    foreign = UUID("00000000-0000-4000-8000-0000000d00ff")
    decision = propose(run(state(S.PENDING)), S.RUNNING, flow_run_id=foreign, task_run_id=foreign)
    details = decision.appended_state.state_details
    assert (details.flow_run_id, details.task_run_id) == (FLOW_RUN_ID, RUN_ID)
    assert decision.run.state == decision.appended_state == decision.result.state
    assert (decision.run.state_type, decision.run.state_name) == (S.RUNNING, "Rerunning")


def test_run_keeps_data_as_stored_while_the_answer_echoes_it():
    decision = propose(run(state(S.RUNNING)), S.COMPLETED, data={"type": "unpersisted"})
    assert decision.result.state.data == {"type": "unpersisted"}
    assert decision.run.state.data is None
    artefact = propose(run(state(S.RUNNING)), S.COMPLETED, data={"v": 1, "artifact_key": "k"})
    assert artefact.result.state.data == artefact.run.state.data == {"v": 1}


@pytest.mark.parametrize(
    "current, target, ctx",
    [
        (state(S.COMPLETED, data={"v": 1}), S.RUNNING, context()),
        (state(S.FAILED), S.PAUSED, context()),
        (state(S.SCHEDULED, scheduled_time=NOW + timedelta(seconds=5)), S.RUNNING, context()),
        (state(S.FAILED, name="Kaput"), S.RUNNING, context(flow_run=FlowRunView(id=FLOW_RUN_ID, state_type=S.PENDING))),
    ],
)
def test_nothing_written_leaves_the_run_untouched(current, target, ctx):
    the_run = run(current, run_count=3, total_run_time=7.0)
    decision = propose(the_run, target, ctx)
    assert decision.appended_state is None and decision.effects == []
    assert decision.run == the_run and decision.result.state == current
    assert decision.http_status == 200


def test_slots_released_only_for_leases_on_limited_tags():
    leases = [Lease(id=LEASE_ID, tags=["a"], holder_run_id=RUN_ID)]
    with_row = propose(run(state(S.RUNNING), tags=["a"]), S.COMPLETED, context(tag_limits={"a": TagLimit(tag="a", limit=1, active_slots=1)}, leases=leases))
    without_row = propose(run(state(S.RUNNING), tags=["a"]), S.COMPLETED, context(leases=leases))
    assert with_row.effects == [SlotsReleased(lease_ids=[LEASE_ID], decrements={"a": 1})]
    assert without_row.effects == []
