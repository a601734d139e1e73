"""`runstate history RUN_ID`: one run's recorded events, readable.

`describe` is pure: it folds the stored rows of one stream into HistoryEntry
values; `load_history` is the only part that reads the database.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import Engine

from runstate.domain import StateType
from runstate.events import recorded_decision
from runstate.store.queries import STREAM_EVENTS, rows


@dataclass(frozen=True)
class StateLabel:
    type: str
    name: str | None

    def __str__(self) -> str:
        # "Running" for RUNNING says nothing new; show the name only when it adds something.
        if not self.name or self.name.upper() == self.type:
            return self.type
        return f"{self.type}/{self.name}"


@dataclass(frozen=True)
class HistoryEntry:
    seq: int
    recorded_at: datetime
    event_type: str
    command_id: UUID
    proposed: StateLabel | None
    from_state: StateLabel | None
    to_state: StateLabel | None
    status: str | None
    reason: str | None
    transition_id: UUID | None
    source_topic: str | None
    source_partition: int | None
    source_offset: int | None

    @property
    def source(self) -> str:
        if self.source_topic is None:
            return "-"
        return f"{self.source_topic}[{self.source_partition}]@{self.source_offset}"

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["recorded_at"] = self.recorded_at.isoformat()
        out["command_id"] = str(self.command_id)
        out["transition_id"] = str(self.transition_id) if self.transition_id else None
        out["from"] = out.pop("from_state")
        out["to"] = out.pop("to_state")
        return out


def _label(state: Mapping[str, Any] | None) -> StateLabel | None:
    if not state:
        return None
    return StateLabel(type=state.get("type"), name=state.get("name"))  # type: ignore[arg-type]  # a recorded state always has a type


def _proposed(state: Any) -> StateLabel | None:
    # The command as received may leave the name out; it was decided with the type's default.
    if not isinstance(state, Mapping) or not state:
        return None
    name = state.get("name")
    if name is None:
        with contextlib.suppress(ValueError):
            name = StateType(state.get("type")).default_name
    return StateLabel(type=state.get("type"), name=name)  # type: ignore[arg-type]  # a recorded state always has a type


def _flow_label(view: Mapping[str, Any] | None) -> StateLabel | None:
    if not view or not view.get("state_type"):
        return None
    return StateLabel(type=view["state_type"], name=view.get("state_name"))


def describe(rows: Iterable[Any]) -> list[HistoryEntry]:
    """Rows of one stream in seq order -> entries. The state before an event is the
    state the previous event left, as recorded (not recomputed)."""
    entries: list[HistoryEntry] = []
    before: StateLabel | None = None
    for row in rows:
        # Read defensively: an auditor must be able to look at a malformed event too.
        payload = row.payload if isinstance(row.payload, dict) else {}
        command = payload.get("command") or {}
        if row.stream_type == "task_run":
            decision = recorded_decision(payload, row.status, row.stream_id, transition_id=row.transition_id,
                                         state_id=row.state_id) or {}
            proposed = _proposed(command.get("state"))
            if proposed is None and row.event_type == "task_run_created":
                proposed = StateLabel(type="PENDING", name=None)  # what the pipeline applies to a bare create
            to_state = _label(decision.get("appended_state"))
            reason = ((decision.get("result") or {}).get("details") or {}).get("reason")
            after = _label((decision.get("run") or {}).get("state"))
        elif row.stream_type == "concurrency_limit":
            # A tag's limit has no states: what each change left is its reason.
            proposed = to_state = after = None
            limit = payload.get("limit")
            reason = (f"limit {limit.get('limit')}, {'active' if limit.get('active') else 'inactive'}"
                      if isinstance(limit, Mapping) else "deleted")
        else:
            proposed = _label(command.get("state"))
            to_state = _label(payload.get("state"))
            reason = None
            after = _flow_label(payload.get("flow_run"))
        entries.append(
            HistoryEntry(
                seq=row.seq,
                recorded_at=row.recorded_at,
                event_type=row.event_type,
                command_id=row.command_id,
                proposed=proposed,
                from_state=before,
                to_state=to_state,
                status=row.status,
                reason=reason,
                transition_id=row.transition_id,
                source_topic=row.source_topic,
                source_partition=row.source_partition,
                source_offset=row.source_offset,
            )
        )
        before = after
    return entries


def load_history(engine: Engine, run_id: UUID) -> list[HistoryEntry]:
    # One run's history is small (tens to hundreds of events), so it is read at once.
    return describe(rows(engine, STREAM_EVENTS, {"id": run_id}))


COLUMNS = ("SEQ", "RECORDED", "PROPOSED", "FROM -> TO", "STATUS", "REASON", "TRANSITION", "SOURCE")


def format_table(entries: list[HistoryEntry]) -> str:
    """A plain fixed-width table (no colour, so it pipes and diffs cleanly)."""
    lines = [COLUMNS]
    for e in entries:
        lines.append(
            (
                str(e.seq),
                e.recorded_at.isoformat(timespec="milliseconds"),
                str(e.proposed) if e.proposed else "-",
                f"{e.from_state or '-'} -> {e.to_state or '(nothing appended)'}",
                e.status or "-",
                e.reason or "",
                str(e.transition_id) if e.transition_id else "-",
                e.source,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=False)).rstrip() for line in lines)
