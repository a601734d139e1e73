"""Structured log lines: one per refused (dead-lettered) command, with the ids an
operator searches by as fields (the JSON formatter in cli_support writes them as
keys; the console formatter here appends them as key=value)."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable
from typing import Any

from runstate.pipeline.ports import DeadLetter

# Every field runstate's own log lines may carry (README, "Operating runstate").
LOG_FIELDS = ("run_id", "command_id", "transition_id", "topic", "partition", "offset", "status", "error_code")

# Where each command kind names its run.
RUN_ID_FIELD = {"create_task_run": "id", "create_flow_run": "id", "set_task_run_state": "task_run_id",
                "set_flow_run_state": "flow_run_id"}

refusals = logging.getLogger("runstate.refused")


def _uuid(value: object) -> str | None:
    try:
        return str(uuid.UUID(str(value))) if value is not None else None
    except ValueError:
        return None


def refusal_fields(dead: DeadLetter) -> dict[str, Any]:
    """What is known of a refused record: its position, and the ids it names when it is JSON."""
    record = dead.record
    fields: dict[str, Any] = {
        "topic": record.topic, "partition": record.partition, "offset": record.offset,
        "status": "refused", "error_code": dead.error.code,
    }
    key = record.key.decode("utf-8", "replace") if record.key and len(record.key) <= 64 else None
    run_id = _uuid(key)
    command_id = transition_id = None
    try:
        body = json.loads(record.value) if record.value else None
    except (ValueError, UnicodeDecodeError, RecursionError):
        body = None
    if isinstance(body, dict):
        command_id = _uuid(body.get("command_id"))
        run_id = run_id or _uuid(body.get(RUN_ID_FIELD.get(str(body.get("kind")), "id")))
        state = body.get("state")
        details = state.get("state_details") if isinstance(state, dict) else None
        if isinstance(details, dict):
            transition_id = _uuid(details.get("transition_id"))
    fields["command_id"] = command_id or str(record.derived_id())
    if run_id:
        fields["run_id"] = run_id
    if transition_id:
        fields["transition_id"] = transition_id
    return fields


def log_refused(dead_letters: Iterable[DeadLetter]) -> None:
    for dead in dead_letters:
        fields = refusal_fields(dead)
        refusals.warning("command refused (%s) at %s[%d]@%d: %s", dead.error.code, dead.record.topic,
                         dead.record.partition, dead.record.offset, dead.error.message[:200], extra=fields)


class ConsoleLogFormatter(logging.Formatter):
    """The text format, with runstate's fields appended as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = [f"{name}={getattr(record, name)}" for name in LOG_FIELDS
                 if getattr(record, name, None) not in (None, "")]
        return f"{text} {' '.join(extra)}" if extra else text
