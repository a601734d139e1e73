"""The read side over the event log and projections: what the gateway, the CLI
and the tests read, on an async SQLAlchemy engine. (The batch path reads through
its own port, pipeline/ports.py, on plain psycopg connections.)"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from runstate.database_urls import DatabaseURL, parse
from runstate.store.postgres import BATCH_ISOLATION, SESSION_OPTIONS, run_sql


def make_engine(url: DatabaseURL, pool_size: int = 4) -> AsyncEngine:
    return create_async_engine(
        parse(url),
        pool_size=pool_size,
        max_overflow=4,
        pool_pre_ping=True,
        isolation_level=BATCH_ISOLATION,
        connect_args={"options": SESSION_OPTIONS},
    )


class LogReader:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def history(self, stream_id: UUID) -> list[dict[str, Any]]:
        """Every event of one stream, in order, with its payload and source."""
        return await stream_history(self.engine, stream_id)


async def stream_history(engine: AsyncEngine, stream_id: UUID) -> list[dict[str, Any]]:
    """Every event of one stream, in order, with its payload and source."""
    async with engine.connect() as conn:
        rows = await run_sql(
            conn,
            "SELECT seq, event_type, command_id, transition_id, status, state_type, state_name,"
            " payload, source_topic, source_partition, source_offset, recorded_at"
            " FROM events WHERE stream_id = :id ORDER BY seq",
            {"id": stream_id},
        )
        return [row._asdict() for row in rows]
