"""The read side: every query of the gateway, the CLI and the audit tools over the
event log and the projections, in one SQL style (SQLAlchemy `text()` with named
parameters). The gateway runs them on an async engine, the CLI and the audit tools
on a sync one; both share the SQL strings here. (The batch path reads through its
own port, pipeline/ports.py, on plain psycopg connections.)
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, text

# -- tag concurrency limits -------------------------------------------------------------
# The limits as the CLI shows them, by tag.
LIMIT_ROWS = (
    'SELECT tag, "limit", active, active_slots, avg_slot_occupancy_seconds, updated_at FROM tag_concurrency_limits'
)
# A limit as Prefect's V1 API shows it: the runs holding its slots instead of their count.
PREFECT_LIMIT = (
    'SELECT l.tag, l."limit", l.updated_at,'
    " ARRAY(SELECT DISTINCT g.task_run_id FROM tag_leases g WHERE l.tag = ANY(g.tags)) AS holders"
    " FROM tag_concurrency_limits l"
)
LIMIT_TAGS = "SELECT tag FROM tag_concurrency_limits"


def _limit_json(row: Any) -> dict[str, Any]:
    out = dict(row._mapping)
    out["updated_at"] = out["updated_at"].isoformat()
    return out


def limit_row(engine: Engine, tag: str) -> dict[str, Any] | None:
    with engine.connect() as conn:
        row = conn.execute(text(LIMIT_ROWS + " WHERE tag = :tag"), {"tag": tag}).first()
    return _limit_json(row) if row else None


def limit_rows(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [_limit_json(r) for r in conn.execute(text(LIMIT_ROWS + " ORDER BY tag"))]
