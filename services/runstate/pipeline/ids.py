"""Ids and the clock: the only inputs of a decision that are not in its
command or the store, injected so that tests and replay control them."""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime
from uuid import UUID, SafeUUID

UUID7_RANDOM_BYTES = 10
IDS_PER_URANDOM_CALL = 64
_UUID7_VERSION_AND_VARIANT = 0x7 << 76 | 0b10 << 62
_UUID7_RAND_A = 0xFFF << 64  # rand_a, beside the version: bits 62-73 of the draw
_UUID7_RAND_B = (1 << 62) - 1  # rand_b, after the variant: the draw's low 62 bits
_new_uuid = object.__new__
_set = object.__setattr__
_UNKNOWN = SafeUUID.unknown  # read once: an enum member's lookup is a Python call


class IdMinter:
    """Mints time-ordered ids (RFC 9562 v7), as Prefect mints state ids.

    One os.urandom call serves many ids, rather than a system call per id."""

    def __init__(self) -> None:
        self._random = b""
        self._used = 0

    def uuid7(self, now: datetime) -> UUID:
        if self._used == len(self._random):
            self._random = os.urandom(UUID7_RANDOM_BYTES * IDS_PER_URANDOM_CALL)
            self._used = 0
        rand = int.from_bytes(self._random[self._used : self._used + UUID7_RANDOM_BYTES], "big")
        self._used += UUID7_RANDOM_BYTES
        millis = int(now.timestamp() * 1000)
        # What UUID(int=...) makes, without its argument checks (the value is 128 bits by construction).
        uid = _new_uuid(UUID)
        _set(uid, "int", (millis & ((1 << 48) - 1)) << 80 | _UUID7_VERSION_AND_VARIANT
             | (rand << 2) & _UUID7_RAND_A | rand & _UUID7_RAND_B)
        _set(uid, "is_safe", _UNKNOWN)
        return uid


def draw_for(command_id: UUID) -> float:
    """The one uniform draw a decision may use, fixed by the command so that a
    recorded decision replays identically."""
    digest = hashlib.sha256(command_id.bytes).digest()
    # 53 bits, exactly what a double holds: 64 bits would round up to 1.0 about
    # once in 2**54 draws, outside the [0, 1) the context accepts.
    return (int.from_bytes(digest[:8], "big") >> 11) / 2**53


def system_clock() -> datetime:
    return datetime.now(UTC)
