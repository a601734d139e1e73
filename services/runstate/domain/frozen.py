"""The base of the domain's models: frozen pydantic models with a cheaper equality."""

from __future__ import annotations

from pydantic import BaseModel


class FrozenModel(BaseModel):
    """A domain value. Two of one class are equal when their fields are: pydantic's own `__eq__`
    also compares private attributes and extra members, which these models never hold (every
    one ignores or forbids extras), and costs ~2 µs a call in Python. Serialising with
    `exclude_defaults` compares each nested model with its default, several times a decision."""

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            # Only fields live in a frozen model's __dict__ (no cached properties here).
            return self.__dict__ == other.__dict__
        return super().__eq__(other)
