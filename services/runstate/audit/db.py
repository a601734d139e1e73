"""Connections shared by the audit commands (their queries are in store/queries.py).

The audit commands are one-shot batch jobs, so they use a synchronous engine
(psycopg 3 serves both flavours from the same URL); only backfill, which talks
to Kafka through aiokafka, runs an event loop.
"""

from __future__ import annotations

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from runstate.database_urls import DatabaseURL, parse, reveal

CONNECT_TIMEOUT_S = 5


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
