"""Every JSON path into the stored payload that a reader's SQL uses names a field
of the payload models in runstate/events.py, the one definition of its shape,
in the current shape and in the legacy one readers still meet."""

from __future__ import annotations

import re
import typing
from pathlib import Path

from pydantic import BaseModel

from runstate.events import FlowRunEventPayload, LegacyTaskRunEventPayload, LimitEventPayload, TaskRunEventPayload

SERVICES = Path(__file__).resolve().parent.parent / "services" / "runstate"
PATH = re.compile(r"payload((?:\s*->>?\s*'\w+')+)")
SEGMENT = re.compile(r"'(\w+)'")


def models_in(annotation: object) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in models_in(arg)]


def resolves(models: list[type[BaseModel]], segments: list[str]) -> bool:
    if not segments:
        return True
    head, rest = segments[0], segments[1:]
    for model in models:
        field = model.model_fields.get(head)
        if field is None:
            continue
        inner = models_in(field.annotation)
        # A free-form member (the command as received) can be read at any path below it.
        if not inner or resolves(inner, rest):
            return True
    return False


def test_every_payload_path_in_the_code_names_a_field_of_the_payload_models():
    paths = []
    for source in SERVICES.rglob("*.py"):
        if "migrations" in source.parts:
            continue
        for match in PATH.finditer(source.read_text()):
            paths.append((source.name, SEGMENT.findall(match.group(1))))
    assert len(paths) >= 8, "the readers' payload paths were not found: has the SQL moved?"
    for task_payload in (TaskRunEventPayload, LegacyTaskRunEventPayload):
        unknown = [(name, "->".join(s)) for name, s in paths
                   if not resolves([task_payload, FlowRunEventPayload, LimitEventPayload], s)]
        assert unknown == [], task_payload.__name__


def test_a_path_that_is_not_in_the_models_is_caught():
    assert not resolves([TaskRunEventPayload, FlowRunEventPayload], ["decision", "no_such_field"])
    assert resolves([TaskRunEventPayload], ["decision", "appended_state"])
    assert not resolves([TaskRunEventPayload], ["decision", "result"])
    assert resolves([LegacyTaskRunEventPayload], ["decision", "result"])
