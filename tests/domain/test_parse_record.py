"""parse_record refuses what the store could not keep, before any rule runs."""

from __future__ import annotations

import uuid

import pytest

from runstate.messages import SetStateCommand
from runstate.pipeline.records import BadRecord, IncomingRecord, ParsedCommand, parse_record


def record_of(message: str) -> IncomingRecord:
    run = uuid.uuid4()
    command = SetStateCommand(task_run_id=run, state={"type": "RUNNING", "message": message})
    return IncomingRecord("commands", 0, 7, str(run).encode(), command.model_dump_json().encode())


def test_a_string_holding_nul_is_an_invalid_command():
    parsed = parse_record(record_of("nul \u0000 here"), 1 << 20)
    assert isinstance(parsed, BadRecord)
    assert parsed.error.code == "invalid_command"
    assert "U+0000" in parsed.error.message
    assert parsed.command_kind == "set_task_run_state"


@pytest.mark.parametrize("message", ["a backslash then u0000: \\u0000", "\\", "u0000"])
def test_text_that_only_looks_like_the_escape_is_accepted(message):
    parsed = parse_record(record_of(message), 1 << 20)
    assert isinstance(parsed, ParsedCommand)
    assert parsed.command.state.message == message
