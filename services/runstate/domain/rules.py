"""The orchestration rules of Prefect 3.9.1's task policies, one class per rule.

Class names are Prefect's; R1-R11 number the Core policy's rules in its order (docs/rules.md,
'The Core policy' and 'The Background policy'). Which rules run, and in what order, is decided
by policies.py; the engine there calls the hooks.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import timedelta
from typing import Any

from .context import Lease, TagLimit
from .delays import R4_CLAMPING_FACTOR, clamped_exponential, whole_seconds_until
from .effects import CacheInserted, SlotsReleased, SlotsTaken, TaskScheduled
from .errors import FlowRunNotFound
from .run import EmpiricalPolicy, FlowRunView
from .states import (
    AWAITING_RETRY,
    CACHED,
    NOT_READY,
    RERUNNING,
    RETRYING,
    TERMINAL_TYPES,
    State,
    StateDetails,
    StateType,
    holds_persisted_result,
)
from .transition import Rule, Transition, UniversalTransform
from .unchecked import replace

S = StateType


def enclosing_flow_run(t: Transition) -> FlowRunView | None:
    # Prefect looks the flow run up by the task's flow_run_id, so a view handed in for a
    # task without one is never consulted.
    return t.ctx.flow_run if t.run.flow_run_id is not None else None


# --- R1 --------------------------------------------------------------------------------
class CacheRetrieval(Rule):
    TO = frozenset({S.RUNNING})

    def before(self, t: Transition) -> None:
        assert t.proposal is not None  # TO is set: the rule runs only on a proposal
        details = t.proposal.state_details
        if not details.cache_key or details.refresh_cache:
            return
        cached = self._newest_live_state(t, details.cache_key)
        if cached is None:
            return
        fresh_copy = cached.model_copy(
            update={"id": t.ctx.new_state_id, "timestamp": t.ctx.now, "name": CACHED}, deep=True
        )
        self.reject(t, fresh_copy, "Retrieved state from cache")

    @staticmethod
    def _newest_live_state(t: Transition, cache_key: str) -> State | None:
        live = [
            entry
            for entry in t.ctx.cache_entries
            if entry.cache_key == cache_key
            and (entry.cache_expiration is None or entry.cache_expiration > t.ctx.now)
        ]
        if not live:
            return None
        # Ties on `created` are broken on the state itself so that the input order never matters.
        newest = max(live, key=lambda e: (e.created, e.state.timestamp, str(e.state.id)))
        return newest.state


# --- R2 --------------------------------------------------------------------------------
class HandleTaskTerminalStateTransitions(Rule):
    FROM = TERMINAL_TYPES
    NEVER_AFTER_TERMINAL = frozenset({S.CANCELLING, S.PAUSED, S.CRASHED})

    def before(self, t: Transition) -> None:
        self.original_run_count = t.draft.run_count
        proposed = t.proposal
        # FROM is set: the rule runs only on a run with a state and on a proposal.
        assert proposed is not None and t.initial_type is not None
        if proposed.type in self.NEVER_AFTER_TERMINAL:
            self.abort(t, f"Run is already {t.initial_type.value}.")
            return
        if holds_persisted_result(t.initial):
            self.reject(t, None, "This run is already completed.")
            return
        if proposed.type not in TERMINAL_TYPES:
            t.draft.run_count = 0  # a fresh retry budget for the new attempt
        if proposed.type is S.RUNNING:
            flow_run = enclosing_flow_run(t)
            if flow_run is not None and t.draft.flow_run_run_count < flow_run.run_count:
                self.rename(t, RETRYING)

    def cleanup(self, t: Transition) -> None:
        t.draft.run_count = self.original_run_count


# --- R3 --------------------------------------------------------------------------------
class PreventRunningTasksFromStoppedFlows(Rule):
    TO = frozenset({S.RUNNING})

    def before(self, t: Transition) -> None:
        flow_run = enclosing_flow_run(t)
        if flow_run is None:
            return
        if flow_run.state_type is S.PAUSED:
            not_ready = State(
                id=t.ctx.new_state_id,
                type=S.PAUSED,
                name=NOT_READY,
                timestamp=t.ctx.now,
                state_details=StateDetails(
                    pause_timeout=flow_run.pause_timeout,
                    pause_reschedule=flow_run.pause_reschedule,
                ),
            )
            self.reject(
                t,
                not_ready,
                f"The flow is paused, new tasks can execute after resuming flow run: {flow_run.id}.",
            )
        elif flow_run.state_type is not S.RUNNING:
            self.abort(t, "The enclosing flow must be running to begin task execution.")


# --- R4 --------------------------------------------------------------------------------
class SecureTaskConcurrencySlots(Rule):
    TO = frozenset({S.RUNNING})

    def before(self, t: Transition) -> None:
        limits = self._active_limits(t)
        zero_limits = [limit for limit in limits if limit.limit == 0]
        positive = [limit for limit in limits if limit.limit > 0]
        for limit in zero_limits:
            self.abort(
                t,
                f'The concurrency limit on tag "{limit.tag}" is 0 and will deadlock '
                "if the task tries to run again.",
            )
        if not positive:
            return
        if all(limit.active_slots + 1 <= limit.limit for limit in positive):
            # Deviation 4: Prefect takes these slots even after aborting for a zero limit and
            # never gives them back; runstate only takes them when the run may start.
            if not zero_limits:
                t.slots_taken = SlotsTaken(
                    lease_id=t.ctx.new_lease_id, tags=[limit.tag for limit in positive]
                )
            return
        tags = ", ".join(limit.tag for limit in positive)
        self.wait(
            t,
            round(self._wait_seconds(t, positive)),
            f"Concurrency limit reached for tags: {tags}",
        )

    def cleanup(self, t: Transition) -> None:
        t.slots_taken = None  # a later rule stopped the start: the lease is never created

    @staticmethod
    def _active_limits(t: Transition) -> list[TagLimit]:
        seen: dict[str, TagLimit] = {}
        for tag in t.run.tags:
            limit = t.ctx.tag_limits.get(tag)
            if limit is not None and limit.active and tag not in seen:
                seen[tag] = limit.model_copy(update={"tag": tag})
        return list(seen.values())

    @staticmethod
    def _wait_seconds(t: Transition, limits: list[TagLimit]) -> float:
        ceiling = t.ctx.settings.tag_concurrency_slot_wait_seconds
        busiest = max(limits, key=lambda limit: limit.active_slots / limit.limit)
        occupancy = busiest.avg_slot_occupancy_seconds or ceiling
        return clamped_exponential(min(occupancy, ceiling), R4_CLAMPING_FACTOR, t.ctx.random)


# --- R5 --------------------------------------------------------------------------------
class CopyScheduledTime(Rule):
    FROM = frozenset({S.SCHEDULED})
    TO = frozenset({S.PENDING})

    def before(self, t: Transition) -> None:
        assert t.proposal is not None and t.initial is not None  # FROM and TO are set
        if t.proposal.state_details.scheduled_time is None:
            inherited = t.initial.state_details.scheduled_time
            t.proposal = _with_details(t.proposal, scheduled_time=inherited)


# --- R6 --------------------------------------------------------------------------------
class WaitForScheduledTime(Rule):
    FROM = frozenset({S.SCHEDULED, S.PENDING})
    TO = frozenset({S.RUNNING})

    def before(self, t: Transition) -> None:
        assert t.initial is not None  # FROM is set
        scheduled_time = t.initial.state_details.scheduled_time
        if scheduled_time is None:
            return
        delay_seconds = whole_seconds_until(scheduled_time - t.ctx.now)
        if delay_seconds > 0:
            self.wait(t, delay_seconds, "Scheduled time is in the future")


# --- R7 --------------------------------------------------------------------------------
def retry_delay_seconds(policy: EmpiricalPolicy, attempt: int, uniform: float) -> float:
    """The delay before retry number `attempt` (1-based: the attempt that just failed)."""
    configured = policy.retry_delay
    if isinstance(configured, list):
        # Deviation 2: Prefect indexes an empty list and fails with HTTP 500; runstate
        # reads it as "no delay". Otherwise the last entry repeats.
        base = configured[min(attempt - 1, len(configured) - 1)] if configured else 0.0
    else:
        base = configured or 0.0
    if policy.retry_jitter_factor and base > 0:
        return clamped_exponential(base, policy.retry_jitter_factor, uniform)
    return base


class RetryFailedTasks(Rule):
    FROM = frozenset({S.RUNNING})
    TO = frozenset({S.FAILED})

    def before(self, t: Transition) -> None:
        policy = t.run.empirical_policy
        attempt = t.draft.run_count
        delay = retry_delay_seconds(policy, attempt, t.ctx.random)
        assert t.proposal is not None  # TO is set
        if t.proposal.state_details.retriable is False:
            return
        if policy.retries is not None and attempt <= policy.retries:
            awaiting_retry = State(
                id=t.ctx.new_state_id,
                type=S.SCHEDULED,
                name=AWAITING_RETRY,
                timestamp=t.ctx.now,
                message=t.proposal.message,
                data=t.proposal.data,
                state_details=StateDetails(scheduled_time=t.ctx.now + timedelta(seconds=delay)),
            )
            self.reject(t, awaiting_retry, "Retrying")


# --- R8 --------------------------------------------------------------------------------
class RenameReruns(Rule):
    TO = frozenset({S.RUNNING})

    def before(self, t: Transition) -> None:
        if t.initial is None or t.draft.run_count <= 0:
            return
        self.rename(t, RETRYING if t.initial.name == AWAITING_RETRY else RERUNNING)


# --- R9 --------------------------------------------------------------------------------
class UpdateFlowRunTrackerOnTasks(Rule):
    TO = frozenset({S.RUNNING})

    def after(self, t: Transition) -> None:
        if t.run.flow_run_id is None:
            return
        if t.ctx.flow_run is None:
            raise FlowRunNotFound(t.run.flow_run_id)
        t.draft.flow_run_run_count = t.ctx.flow_run.run_count


# --- R10 -------------------------------------------------------------------------------
class CacheInsertion(Rule):
    TO = frozenset({S.COMPLETED})

    # Deviation 3: no pre-check. Prefect REJECTs an over-long key yet persists and caches
    # the state; runstate ACCEPTs it and leaves the unusable key out of the cache.

    def after(self, t: Transition) -> None:
        written = t.appended
        if written is None:
            return
        cache_key = written.state_details.cache_key
        if cache_key and len(cache_key) <= t.ctx.settings.max_cache_key_length:
            t.post_effects.append(
                CacheInserted(
                    cache_key=cache_key,
                    cache_expiration=written.state_details.cache_expiration,
                    state_id=written.id,
                )
            )


# --- R11 -------------------------------------------------------------------------------
class ReleaseTaskConcurrencySlots(UniversalTransform):
    HOLDING_TYPES = frozenset({S.RUNNING, S.CANCELLING})

    def after(self, t: Transition) -> None:
        written = t.appended
        if written is None or not t.run.tags or written.type in self.HOLDING_TYPES:
            return  # (a run without tags holds no lease through them)
        # Leases are found through the limit rows of the run's tags, as Prefect does.
        limited_tags = {tag for tag in t.run.tags if tag in t.ctx.tag_limits}
        held: list[Lease] = [
            lease
            for lease in t.ctx.leases
            if lease.holder_run_id == t.run.id and limited_tags.intersection(lease.tags)
        ]
        if not held:
            return
        decrements: dict[str, int] = defaultdict(int)
        for lease in held:
            for tag in dict.fromkeys(lease.tags):
                decrements[tag] += lease.slots
        t.post_effects.append(
            SlotsReleased(lease_ids=[lease.id for lease in held], decrements=dict(decrements))
        )


# --- background policy only ------------------------------------------------------------
class PreventPendingTransitions(Rule):
    FROM = frozenset({S.PENDING, S.RUNNING, S.CANCELLING, S.CANCELLED})
    TO = frozenset({S.PENDING})

    def before(self, t: Transition) -> None:
        initial, proposed = t.initial, t.proposal
        assert initial is not None and proposed is not None  # FROM and TO are set
        renamed_pending = (
            initial.type is S.PENDING
            and proposed.name != initial.name
            and proposed.name != S.PENDING.default_name
        )
        if renamed_pending:
            # A named sub-state of PENDING keeps what earlier rules recorded on the first
            # PENDING state; Prefect overwrites whatever the client sent for these two.
            t.proposal = _with_details(
                proposed,
                scheduled_time=initial.state_details.scheduled_time,
                deployment_concurrency_lease_id=initial.state_details.deployment_concurrency_lease_id,
            )
            return
        self.abort(
            t,
            f"This run is in a {initial.type.value} state and cannot transition to a PENDING state.",
        )


class CopyTaskParametersID(Rule):
    FROM = frozenset({S.SCHEDULED, S.PENDING})
    TO = frozenset({S.PENDING, S.RUNNING})

    def before(self, t: Transition) -> None:
        assert t.proposal is not None and t.initial is not None  # FROM and TO are set
        if t.proposal.state_details.task_parameters_id is None:
            inherited = t.initial.state_details.task_parameters_id
            t.proposal = _with_details(t.proposal, task_parameters_id=inherited)


class EnqueueScheduledTasks(Rule):
    TO = frozenset({S.SCHEDULED})

    def after(self, t: Transition) -> None:
        if t.appended is None or not t.appended.state_details.deferred:
            return
        t.post_effects.append(
            TaskScheduled(task_key=t.run.task_key, retry=t.appended.name == AWAITING_RETRY)
        )


def _with_details(state: State, **changes: Any) -> State:
    return replace(state, state_details=replace(state.state_details, **changes))
