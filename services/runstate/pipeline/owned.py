"""The task runs whose whole history this process wrote, so that a batch that
needs nothing else is decided without reading the store.

A run created by this process's consumer, with every later event of it written
here too, is known entirely: its head (seq, view, hash) and the transition ids it
decided for good. A batch of `create_task_run` and `set_task_run_state` commands
on such runs, at positions past everything this process decided on their
partitions, reads nothing its snapshot would hold, as long as the runs have no
flow run, no tags and propose no cached RUNNING state (those read rows that other
partitions change: the flow run's state, the tags' slots, the cache).

This memory is never what keeps history from forking: the events' primary key
is. Anything else that wrote to one of these streams since (a zombie, the
partition's owner while this process did not hold it) put an event at the head's
seq + 1, so the batch's append fails on (stream_id, seq) and rolls back whole;
the service then forgets everything here and decides the batch again from a
snapshot read, which finds what the other writer stored (a redelivered record, a
decided transition) as it always did.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID

from runstate.domain import StateType, TaskRunView
from runstate.events import StreamType
from runstate.messages import CreateTaskRunCommand, SetStateCommand
from runstate.pipeline.ports import BatchOutcome, StoreSnapshot, StreamHead
from runstate.pipeline.records import BadRecord, ParsedCommand

FINAL_STATUSES = frozenset({"ACCEPT", "REJECT", "ABORT"})
_RUNNING = StateType.RUNNING


@dataclass(slots=True)
class OwnedRun:
    # The run's head as the last batch stored it. The next batch decides on this very
    # object (the decision moves it on in place): should that batch fail, everything
    # here is forgotten, so a head is never ahead of what the store holds.
    head: StreamHead
    # Transitions decided for good (ACCEPT, REJECT, ABORT): sent again, such a command
    # is answered with its stored outcome, which only the store holds.
    final_transitions: set[UUID]


class OwnedRuns:
    """At most `size` runs (RUNSTATE_OWNED_RUNS), the least recently written forgotten first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.runs: OrderedDict[UUID, OwnedRun] = OrderedDict()
        # (topic, partition) -> the highest offset decided here: a record at or below
        # it may have been decided already, which only the store can say.
        self.positions: dict[tuple[str, int], int] = {}

    def snapshot(self, items: Sequence[ParsedCommand | BadRecord]) -> StoreSnapshot | None:
        """What a read of the store would give these records, or None when it must be read."""
        if self.size <= 0 or not items:
            return None
        snap = StoreSnapshot()
        created: set[UUID] = set()
        for item in items:
            record = item.record
            if record.offset <= self.positions.get((record.topic, record.partition), -1):
                return None
            if isinstance(item, BadRecord):
                continue  # refused without reading anything
            command = item.command
            if isinstance(command, CreateTaskRunCommand):
                if command.flow_run_id is not None or command.tags or command.id in self.runs:
                    return None
                created.add(command.id)
            elif isinstance(command, SetStateCommand):
                run_id = command.task_run_id
                state = command.state
                if state.type is _RUNNING and state.state_details.cache_key:
                    return None
                if run_id in created:
                    continue
                owned = self.runs.get(run_id)
                if owned is None or item.transition_id in owned.final_transitions:
                    return None
                snap.task_runs[run_id] = owned.head
            else:
                return None  # flow runs and limits: other kinds of stream, always read
        return snap

    def read_seqs(self, snapshot: StoreSnapshot) -> dict[UUID, int]:
        """The task runs' seqs a store read found, taken before the batch is decided on them."""
        return {run_id: head.last_seq for run_id, head in snapshot.task_runs.items()}

    def learn(self, items: Sequence[ParsedCommand | BadRecord], outcome: BatchOutcome,
              read: dict[UUID, int] | None) -> None:
        """What a stored batch wrote. `read` holds the seqs its snapshot read found (None:
        it read nothing, every run it wrote was known here or created by it)."""
        for item in items:
            position = (item.record.topic, item.record.partition)
            if item.record.offset > self.positions.get(position, -1):
                self.positions[position] = item.record.offset
        if read:
            for run_id, seq in read.items():
                owned = self.runs.get(run_id)
                if owned is not None and owned.head.last_seq != seq:
                    del self.runs[run_id]  # written elsewhere since: no longer known whole
        finals: dict[UUID, set[UUID]] = {}
        for event in outcome.events:
            if (event.stream_type is StreamType.TASK_RUN and event.transition_id is not None
                    and event.status in FINAL_STATUSES):
                finals.setdefault(event.stream_id, set()).add(event.transition_id)
        for run_id, head in outcome.task_run_heads.items():
            view: TaskRunView = head.view
            owned = self.runs.get(run_id)
            if read and run_id in read and owned is None:
                continue  # an older run read from the store: its earlier transitions are not known here
            if view.flow_run_id is not None or view.tags:
                self.runs.pop(run_id, None)
                continue
            if owned is None:
                self.runs[run_id] = OwnedRun(head, finals.get(run_id, set()))
            else:
                owned.head = head  # the same object when the batch was decided from memory
                if run_id in finals:
                    owned.final_transitions |= finals[run_id]
                self.runs.move_to_end(run_id)
        while len(self.runs) > self.size:
            self.runs.popitem(last=False)

    def forget(self) -> None:
        """After any failure: the store may hold what this process does not know it wrote.
        The positions stay: what was decided at them is decided whatever happens next."""
        self.runs.clear()
