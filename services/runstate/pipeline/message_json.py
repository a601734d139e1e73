"""The JSON of a task decision's messages, assembled from parts.

A decision's state and result recur in the result event, the state change and
the stored payload, and serialising every repetition cost more than running
the rules. So each part is serialised once and the messages are assembled from
the parts, each member written exactly as `model_dump_json` writes it (a test
compares them).
"""

from __future__ import annotations

from datetime import datetime
from functools import cache
from uuid import UUID

from pydantic import BaseModel, TypeAdapter

_DATETIME_SERIALIZER = TypeAdapter(datetime).serializer
_UUID_SERIALIZER = TypeAdapter(UUID).serializer
_STRING_SERIALIZER = TypeAdapter(str).serializer


@cache
def _field_names(model: type[BaseModel]) -> tuple[str, ...]:
    return tuple(model.model_fields)


def render(model: type[BaseModel], **members: str) -> str:
    """What `model_dump_json` writes for a `model` whose members serialise to these values."""
    rendered = "{" + ",".join([f'"{name}":{members.pop(name)}' for name in _field_names(model)]) + "}"
    if members:
        raise TypeError(f"{model.__name__} has no field {next(iter(members))!r}")
    return rendered


def model_json(model: BaseModel | None) -> str:
    return "null" if model is None else model.model_dump_json()


def uuid_json(value: UUID | None) -> str:
    return "null" if value is None else _UUID_SERIALIZER.to_json(value).decode()


def datetime_json(value: datetime) -> str:
    return _DATETIME_SERIALIZER.to_json(value).decode()


def string_json(value: str) -> str:
    return _STRING_SERIALIZER.to_json(value).decode()
