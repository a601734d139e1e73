"""One structured line per refused command, with the ids as fields."""

from __future__ import annotations

import json
import logging
import uuid

from runstate.cli_support import JsonLogFormatter
from runstate.client import state
from runstate.messages import ErrorInfo, SetStateCommand
from runstate.obs.logs import ConsoleLogFormatter, log_refused
from runstate.pipeline.ports import DeadLetter
from runstate.pipeline.records import IncomingRecord


def dead(key: bytes | None, value: bytes | None, offset: int = 7) -> DeadLetter:
    return DeadLetter(IncomingRecord("t.commands", 3, offset, key, value, None),
                      ErrorInfo(code="invalid_command", message="no"))


def test_a_refused_command_is_one_line_with_its_ids(caplog):
    run_id, transition_id = uuid.uuid4(), uuid.uuid4()
    command = SetStateCommand(command_id=uuid.uuid4(), task_run_id=run_id,
                              state=state("RUNNING", transition_id=transition_id))
    body = json.loads(command.model_dump_json())
    body["state"]["type"] = "NOT_A_STATE"
    garbage = dead(b"not-a-uuid", b"\xff{", offset=8)
    with caplog.at_level(logging.INFO, logger="runstate.refused"):
        log_refused([dead(str(run_id).encode(), json.dumps(body).encode()), garbage])
    first, second = caplog.records
    entry = json.loads(JsonLogFormatter().format(first))
    assert {k: entry[k] for k in ("run_id", "command_id", "transition_id", "partition", "offset", "status",
                                  "error_code")} == {
        "run_id": str(run_id), "command_id": str(command.command_id), "transition_id": str(transition_id),
        "partition": 3, "offset": 7, "status": "refused", "error_code": "invalid_command"}
    assert entry["level"] == "WARNING"
    other = json.loads(JsonLogFormatter().format(second))
    assert other["command_id"] == str(garbage.record.derived_id()) and "run_id" not in other
    line = ConsoleLogFormatter("%(message)s").format(first)
    assert f"run_id={run_id}" in line and "offset=7" in line and "\n" not in line
