"""`runstate concurrency-limit`: the tag concurrency limits (table tag_concurrency_limits).

Setting a limit never touches `active_slots`: that count belongs to the leases the
service takes and releases (and `runstate rebuild` recomputes it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, text

SELECT = 'SELECT tag, "limit", active, active_slots, avg_slot_occupancy_seconds, updated_at FROM tag_concurrency_limits'


@dataclass(frozen=True)
class TagLimitRow:
    tag: str
    limit: int
    active: bool
    active_slots: int
    avg_slot_occupancy_seconds: float | None
    updated_at: datetime

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["updated_at"] = self.updated_at.isoformat()
        return out

    def line(self) -> str:
        state = "active" if self.active else "inactive"
        return f"{self.tag}\tlimit={self.limit}\t{state}\tactive_slots={self.active_slots}"


def _row(row: Any) -> TagLimitRow:
    return TagLimitRow(**row._mapping)


def set_limit(engine: Engine, tag: str, limit: int, active: bool = True) -> TagLimitRow:
    if limit < 0:
        raise ValueError("a limit cannot be negative")
    with engine.begin() as conn:
        row = conn.execute(
            text(
                'INSERT INTO tag_concurrency_limits AS l (tag, "limit", active) VALUES (:tag, :limit, :active)'
                ' ON CONFLICT (tag) DO UPDATE SET "limit" = EXCLUDED."limit", active = EXCLUDED.active,'
                " updated_at = clock_timestamp()"
                ' RETURNING tag, "limit", active, active_slots, avg_slot_occupancy_seconds, updated_at'
            ),
            {"tag": tag, "limit": limit, "active": active},
        ).one()
    return _row(row)


def get_limit(engine: Engine, tag: str) -> TagLimitRow | None:
    with engine.connect() as conn:
        row = conn.execute(text(SELECT + " WHERE tag = :tag"), {"tag": tag}).first()
    return _row(row) if row else None


def delete_limit(engine: Engine, tag: str) -> bool:
    with engine.begin() as conn:
        return conn.execute(text("DELETE FROM tag_concurrency_limits WHERE tag = :tag"), {"tag": tag}).rowcount > 0


def list_limits(engine: Engine) -> list[TagLimitRow]:
    with engine.connect() as conn:
        return [_row(r) for r in conn.execute(text(SELECT + " ORDER BY tag"))]
