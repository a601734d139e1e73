"""The stored command (message_json.stored_command_json) read back (events.recorded_command) is the
command as decided, for any document a producer can write that parses: its members and values as
received, but what the event's columns hold and members that hold their default's JSON."""

from __future__ import annotations

import json
import uuid

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runstate import strict_json
from runstate.events import recorded_command
from runstate.messages import COMMAND_ADAPTER
from runstate.pipeline.message_json import stored_command_json
from runstate.pipeline.records import IncomingRecord, ParsedCommand, parse_record

# I-JSON values: finite doubles, integers within 64 bits, any text a JSON string can carry but NUL.
TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=12)
SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**63) + 1, max_value=2**63 - 1)
           | st.floats(allow_nan=False, allow_infinity=False) | TEXT)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                      max_leaves=20)
STATE_TYPES = st.sampled_from(["PENDING", "RUNNING", "COMPLETED", "FAILED", "SCHEDULED", "CANCELLED"])
IDS = st.uuids(version=4)


@st.composite
def documents(draw: st.DrawFn) -> tuple[dict, bool]:
    """A task-run command as a producer may write it: optional members present or not, defaults
    written out or not, ids in any case, arbitrary state data."""
    run = draw(IDS)
    details: dict = {}
    if draw(st.booleans()):
        details["transition_id"] = draw(st.none() | IDS.map(str))
    if draw(st.booleans()):
        details["cache_key"] = draw(st.none() | TEXT)
    state: dict = {"type": draw(STATE_TYPES)}
    for name, value in (("name", TEXT), ("data", VALUES),
                        ("message", st.none() | TEXT)):
        if draw(st.booleans()):
            state[name] = draw(value)
    if details or draw(st.booleans()):
        state["state_details"] = details
    if draw(st.booleans()):
        doc = {"kind": "set_task_run_state", "task_run_id": draw(st.sampled_from([str(run), str(run).upper()])),
               "state": state}
        if draw(st.booleans()):
            doc["force"] = draw(st.booleans())
    else:
        doc = {"kind": "create_task_run", "id": str(run), "name": draw(st.sampled_from(["", "n"])),
               "tags": draw(st.sampled_from([[], ["a"]]))}
        if draw(st.booleans()):
            doc["state"] = state
    if draw(st.booleans()):
        doc["command_id"] = draw(st.none() | IDS.map(str))
    if draw(st.booleans()):
        doc["schema_version"] = 1
    keys = draw(st.permutations(list(doc)))
    return {k: doc[k] for k in keys}, draw(st.booleans())  # non-ASCII text escaped or not


def parsed(doc: dict, ascii_only: bool) -> ParsedCommand:
    body = json.dumps(doc, ensure_ascii=ascii_only).encode()
    item = parse_record(IncomingRecord("t", 0, 1, str(uuid.UUID(doc.get("id") or doc["task_run_id"])).encode(), body),
                        10**7)
    assert isinstance(item, ParsedCommand), item
    return item


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents())
def test_a_stored_command_reads_back_as_the_command_decided(document):
    doc, ascii_only = document
    item = parsed(doc, ascii_only)
    sent = item.command
    # The pipeline's transition id: the proposal's, else (a set_state) the command id.
    transition_id = item.transition_id if sent.kind == "set_task_run_state" else (
        sent.state.state_details.transition_id if sent.state else None)
    text = stored_command_json(item.document, sent, transition_id)
    stored = strict_json.loads(text.encode())  # itself I-JSON
    assert "command_id" not in stored and "id" not in stored and "task_run_id" not in stored
    assert stored["kind"] == doc["kind"] and stored.get("schema_version") == doc.get("schema_version")
    for name, value in stored.items():  # what is kept is kept with its value
        if name != "state":
            assert value == doc[name] and type(value) is type(doc[name]), name
    if "state" in stored and "data" in doc["state"]:
        assert json.dumps(stored["state"]["data"], sort_keys=True) == json.dumps(doc["state"]["data"], sort_keys=True)
    read = recorded_command({"command": stored}, transition_id, stream_id=item.stream_id, command_id=item.command_id)
    decided = sent.model_copy(update={"command_id": item.command_id})
    if transition_id is not None and decided.state is not None:
        decided = decided.model_copy(update={"state": decided.state.model_copy(update={
            "state_details": decided.state.state_details.model_copy(update={"transition_id": transition_id})})})
    assert COMMAND_ADAPTER.validate_python(read) == decided
    assert len(text) <= len(json.dumps(doc, ensure_ascii=False, separators=(",", ":")))
