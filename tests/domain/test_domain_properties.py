"""Property tests over generated runs, requests and contexts."""

from __future__ import annotations

import json
from datetime import timedelta
from uuid import UUID

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runstate.domain import (
    TERMINAL_TYPES,
    CacheEntry,
    EmpiricalPolicy,
    FlowRunView,
    Lease,
    OrchestrationContext,
    OrchestrationResult,
    SetStateRequest,
    SetStateStatus,
    StateType,
    TagLimit,
    TaskRunView,
    decide,
    holds_persisted_result,
)

from .builders import FLOW_RUN_ID, NOW, RUN_ID, S, context, run, state
from .test_domain_models import REFERENCE

PROPERTY_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TAGS = ["a", "b", "c"]
NAMES = [None, "AwaitingRetry", "Custom", "Pending", ""]
DATA = [None, {"type": "unpersisted"}, {"value": 1}, "<unknown>", 0, [1], {"v": 1, "artifact_key": "k"}]
OFFSETS = st.sampled_from([None, -30.0, 0.0, 0.4, 0.6, 2.5, 30.6])
ids = st.integers(min_value=1, max_value=2**32).map(lambda n: UUID(int=n))


def _offset(seconds):
    return None if seconds is None else NOW + timedelta(seconds=seconds)


@st.composite
def current_states(draw):
    if draw(st.booleans()) and draw(st.booleans()):
        return None
    return state(
        draw(st.sampled_from(list(StateType))),
        name=draw(st.sampled_from(NAMES)),
        at=NOW - timedelta(seconds=draw(st.integers(1, 3600))),
        data=draw(st.sampled_from(DATA)),
        scheduled_time=_offset(draw(OFFSETS)),
        task_parameters_id=draw(st.none() | ids),
    )


policies = st.builds(
    EmpiricalPolicy,
    retries=st.none() | st.integers(0, 4),
    retry_delay=st.none() | st.floats(0, 100) | st.lists(st.floats(0, 100), max_size=4),
    retry_jitter_factor=st.none() | st.floats(0, 3),
)


@st.composite
def runs(draw):
    has_flow = draw(st.booleans())
    return run(
        draw(current_states()),
        flow_run_id=FLOW_RUN_ID if has_flow else None,
        tags=draw(st.lists(st.sampled_from(TAGS), max_size=3)),
        empirical_policy=draw(policies),
        run_count=draw(st.integers(0, 5)),
        flow_run_run_count=draw(st.integers(0, 3)),
        total_run_time=draw(st.floats(0, 1000)),
    )


@st.composite
def requests(draw):
    details = dict(
        cache_key=draw(st.sampled_from([None, "", "k", "x" * 2001])),
        refresh_cache=draw(st.sampled_from([None, False, True])),
        retriable=draw(st.sampled_from([None, False, True])),
        deferred=draw(st.booleans()),
        scheduled_time=_offset(draw(OFFSETS)),
        task_parameters_id=draw(st.none() | ids),
    )
    body = {
        "type": draw(st.sampled_from(list(StateType))).value,
        "name": draw(st.sampled_from(NAMES)),
        "message": draw(st.none() | st.text(max_size=5)),
        "data": draw(st.sampled_from(DATA)),
        "state_details": {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in details.items()},
    }
    return SetStateRequest.model_validate({"state": body, "force": draw(st.booleans())})


@st.composite
def contexts(draw, the_run: TaskRunView):
    flow_run = None
    if the_run.flow_run_id is not None:
        flow_run = FlowRunView(
            id=FLOW_RUN_ID,
            state_type=draw(st.sampled_from([None, S.RUNNING, S.RUNNING, S.PAUSED, S.PENDING, S.COMPLETED])),
            run_count=draw(st.integers(0, 3)),
            pause_timeout=_offset(draw(OFFSETS)),
        )
    tag_limits = {
        tag: TagLimit(
            tag=tag,
            limit=(limit := draw(st.integers(0, 3))),
            active=draw(st.booleans()),
            active_slots=draw(st.integers(0, limit + 1)),
            avg_slot_occupancy_seconds=draw(st.sampled_from([None, 0.0, 2.0, 7.5])),
        )
        for tag in draw(st.lists(st.sampled_from(TAGS), unique=True))
    }
    leases = [
        Lease(id=lease_id, tags=draw(st.lists(st.sampled_from(TAGS), min_size=1, unique=True)),
              slots=draw(st.integers(1, 2)), holder_run_id=RUN_ID)
        for lease_id in draw(st.lists(ids, max_size=2, unique=True))
    ]
    cache_entries = [
        CacheEntry(
            cache_key=draw(st.sampled_from(["k", "other"])),
            cache_expiration=_offset(draw(OFFSETS)),
            created=NOW - timedelta(seconds=draw(st.integers(1, 100))),
            state=state(S.COMPLETED, id=draw(ids), data={"value": draw(st.integers())}, cache_key="k"),
        )
        for _ in range(draw(st.integers(0, 2)))
    ]
    return context(
        random=draw(st.floats(0, 1, exclude_max=True)),
        flow_run=flow_run,
        tag_limits=tag_limits,
        leases=leases,
        cache_entries=cache_entries,
    )


@st.composite
def scenarios(draw):
    the_run = draw(runs())
    return the_run, draw(requests()), draw(contexts(the_run))


@PROPERTY_SETTINGS
@given(scenarios())
def test_decide_is_deterministic_and_replays_from_serialised_inputs(scenario):
    the_run, request, ctx = scenario
    first = decide(the_run, request, ctx)
    assert decide(the_run, request, ctx) == first
    replayed = decide(
        TaskRunView.model_validate_json(the_run.model_dump_json()),
        SetStateRequest.model_validate_json(request.model_dump_json()),
        OrchestrationContext.model_validate_json(ctx.model_dump_json()),
    )
    assert replayed.model_dump_json() == first.model_dump_json()


DETAILS_KEYS = {
    "accept_details": {"type"},
    "reject_details": {"type", "reason"},
    "abort_details": {"type", "reason"},
    "wait_details": {"type", "delay_seconds", "reason"},
}
STATUS_OF_DETAILS = {"accept_details": "ACCEPT", "reject_details": "REJECT", "abort_details": "ABORT", "wait_details": "WAIT"}


@PROPERTY_SETTINGS
@given(scenarios())
def test_every_answer_has_the_seed_response_shape(scenario):
    the_run, _request, ctx = scenario
    decision = decide(*scenario)
    body = json.loads(decision.result.model_dump_json())
    OrchestrationResult.model_validate(body)

    assert set(body) == set(REFERENCE)
    details = body["details"]
    assert set(details) == DETAILS_KEYS[details["type"]]
    assert body["status"] == STATUS_OF_DETAILS[details["type"]]
    if details["type"] == "wait_details":
        assert isinstance(details["delay_seconds"], int) and details["delay_seconds"] > 0
    if body["state"] is not None:
        assert set(body["state"]) == set(REFERENCE["state"])
        assert set(body["state"]["state_details"]) == set(REFERENCE["state"]["state_details"])

    written = decision.appended_state
    if written is None:
        assert body["status"] in ("REJECT", "WAIT", "ABORT")
        assert decision.result.state == the_run.state and decision.run == the_run
    else:
        assert body["status"] in ("ACCEPT", "REJECT")
        assert decision.result.state == written and written.timestamp == ctx.now
        assert written.id == ctx.new_state_id and decision.run.state.id == written.id
        assert (written.state_details.task_run_id, written.state_details.flow_run_id) == (the_run.id, the_run.flow_run_id)


@PROPERTY_SETTINGS
@given(scenarios())
def test_a_terminal_state_is_left_only_through_allowed_paths(scenario):
    the_run, request, _ctx = scenario
    current = the_run.state
    decision = decide(*scenario)
    written = decision.appended_state
    forced = request.force and not request.state.state_details.deferred
    if current is None or current.type not in TERMINAL_TYPES or written is None or forced:
        return
    if written.name == "Cached":  # R1 beats the terminal guard
        assert request.state.type is S.RUNNING and written.type is S.COMPLETED
        return
    # otherwise R2 let it through
    assert not holds_persisted_result(current)
    assert request.state.type not in {S.CRASHED, S.PAUSED, S.CANCELLING}
    assert written.type is request.state.type or (written.type, written.name) == (S.PAUSED, "NotReady")


@settings(max_examples=150, deadline=None)
@given(
    retries=st.none() | st.integers(0, 5),
    retry_delay=st.none() | st.floats(0, 50) | st.lists(st.floats(0, 50), max_size=3),
    jitter=st.none() | st.floats(0, 2),
    retriable=st.sampled_from([None, True, False]),
    draws=st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=5),
)
def test_retries_never_exceed_the_policy(retries, retry_delay, jitter, retriable, draws):
    policy = EmpiricalPolicy(retries=retries, retry_delay=retry_delay, retry_jitter_factor=jitter)
    the_run = run(state(S.PENDING), run_count=0, flow_run_run_count=1, empirical_policy=policy)
    now, awaiting_retry, step_numbers = NOW, 0, iter(range(1, 10_000))

    def step(target, **details):
        nonlocal the_run, now
        now += timedelta(seconds=1)
        number = next(step_numbers)
        ctx = context(now=now, new_state_id=UUID(int=number), random=draws[number % len(draws)])
        decision = decide(the_run, SetStateRequest.model_validate({"state": {"type": target.value, "state_details": details}}), ctx)
        the_run = decision.run
        return decision

    for _ in range((retries or 0) + 3):
        running = step(S.RUNNING)
        while running.result.status is SetStateStatus.WAIT:  # AwaitingRetry is scheduled in the future
            now += timedelta(seconds=running.result.details.delay_seconds)
            running = step(S.RUNNING)
        assert running.result.status is SetStateStatus.ACCEPT
        failed = step(S.FAILED, retriable=retriable)
        if failed.result.state.name == "AwaitingRetry":
            awaiting_retry += 1
        else:
            assert failed.result.state.type is S.FAILED
            break

    expected = 0 if retriable is False else (retries or 0)
    assert awaiting_retry == expected
    assert the_run.state.type is S.FAILED and the_run.run_count == expected + 1
