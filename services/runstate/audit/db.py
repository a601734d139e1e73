"""Connections and log scans shared by the audit commands.

The audit commands are one-shot batch jobs, so they use a synchronous engine
(psycopg 3 serves both flavours from the same URL); only backfill, which talks
to Kafka through aiokafka, runs an event loop.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from uuid import UUID

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import Row
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from runstate.database_urls import DatabaseURL, parse, reveal

CONNECT_TIMEOUT_S = 5
# Smaller than every real key: (stream_id, seq) > START includes the whole log because seq > 0.
START: tuple[UUID, int] = (UUID(int=0), 0)


class ServerUnreachable(RuntimeError):
    """A server the command needs does not answer; the message is one line."""


def first_line(exc: BaseException) -> str:
    message = str(getattr(exc, "orig", None) or exc).strip()
    return message.splitlines()[0] if message else type(exc).__name__


def where(url: DatabaseURL) -> str:
    from runstate.database_urls import hosts

    servers = ",".join(f"{h}:{p or 5432}" for h, p in hosts(url))
    return f"{servers}/{parse(url).database or ''}"


def sync_url(url: DatabaseURL | Engine | AsyncEngine) -> str:
    """Accept a URL, a sync Engine or an AsyncEngine (whose URL works synchronously too)."""
    return reveal(url.url if isinstance(url, (Engine, AsyncEngine)) else url)


def open_engine(url: DatabaseURL) -> Engine:
    """An engine that has proved it can connect, or ServerUnreachable."""
    engine = create_engine(parse(url), connect_args={"connect_timeout": CONNECT_TIMEOUT_S}, pool_pre_ping=True)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        engine.dispose()
        raise ServerUnreachable(f"PostgreSQL at {where(url)} is unreachable: {first_line(exc)}") from exc
    return engine


def scan_events(
    engine: Engine,
    columns: str,
    *,
    condition: str = "TRUE",
    params: Mapping[str, Any] | None = None,
    batch_size: int = 1000,
) -> Iterator[Sequence[Row[Any]]]:
    """Batches of `events` rows in (stream_id, seq) order, by keyset on the primary key.

    Each batch is its own short statement, so memory stays bounded by the batch and no
    transaction is held open across the scan (which would hold back vacuum on a live log).
    """
    last = START
    while True:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    f"SELECT stream_id, seq, {columns} FROM events"
                    f" WHERE ({condition}) AND (stream_id, seq) > (:last_stream, :last_seq)"
                    " ORDER BY stream_id, seq LIMIT :batch"
                ),
                {**(params or {}), "last_stream": last[0], "last_seq": last[1], "batch": batch_size},
            ).all()
        if not rows:
            return
        yield rows
        if len(rows) < batch_size:
            return
        last = (rows[-1].stream_id, rows[-1].seq)


def count_events(engine: Engine, condition: str = "TRUE", params: Mapping[str, Any] | None = None) -> int:
    with engine.connect() as conn:
        return conn.execute(text(f"SELECT count(*) FROM events WHERE {condition}"), dict(params or {})).scalar_one()
