"""Making and evolving the domain's frozen models without validating them again.

The decide path builds a handful of models per command from values that are
already validated models, UUIDs and UTC datetimes; pydantic's validation and
`model_copy` cost more there than the rules themselves. These two helpers make
the very instance pydantic would (same `__dict__` in field order, same fields
set), without re-checking what is known to be valid. Use them only on values
of the fields' own types; tests/domain/test_unchecked.py holds them to
pydantic's results.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)

_set = object.__setattr__


def build(cls: type[M], fields: dict[str, Any]) -> M:
    """`cls(**fields)` without validation: `fields` must name every field of
    `cls`, in declaration order, each holding a value of its type."""
    model = cls.__new__(cls)
    _set(model, "__dict__", fields)
    _set(model, "__pydantic_fields_set__", set(fields))
    _set(model, "__pydantic_extra__", None)
    _set(model, "__pydantic_private__", None)
    return model


def replace(model: M, **changes: Any) -> M:
    """`model.model_copy(update=changes)`, for less: a shallow copy with these fields changed."""
    copy = model.__class__.__new__(model.__class__)
    fields = model.__dict__.copy()
    fields.update(changes)
    _set(copy, "__dict__", fields)
    _set(copy, "__pydantic_fields_set__", model.__pydantic_fields_set__.union(changes))
    _set(copy, "__pydantic_extra__", model.__pydantic_extra__)
    _set(copy, "__pydantic_private__", None)
    return copy
