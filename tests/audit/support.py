"""Scratch databases for the audit tests: each is created by the owner role, migrated
with the project's Alembic migrations (so the service role gets exactly its grants),
and dropped afterwards. The audit tests never write to the shared `runstate` database:
rebuild swaps projections and the replay test rewrites a recorded event."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from runstate.database_urls import libpq_dsn as dsn
from runstate.database_urls import with_database
from runstate.store.migrate import upgrade

REPO = Path(__file__).resolve().parents[2]
EVENT_COLUMNS = (
    "stream_id, seq, stream_type, event_type, command_id, transition_id, status, state_type, state_name,"
    " state_id, payload, source_topic, source_partition, source_offset, recorded_at"
)


@contextmanager
def scratch_database(admin_url: str, app_url: str, label: str) -> Iterator[tuple[str, str]]:
    """(app_url, admin_url) of a new, migrated database."""
    name = f"runstate_{label}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn(admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    new_admin, new_app = with_database(admin_url, name), with_database(app_url, name)
    try:
        upgrade(new_admin, new_app)
        yield new_app, new_admin
    finally:
        with psycopg.connect(dsn(admin_url), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def copy_events(source_url: str, target_url: str, where: str = "TRUE", params: Any = None) -> int:
    """Copy event rows verbatim (as INSERTs: the log allows nothing else)."""
    with psycopg.connect(dsn(source_url)) as src, psycopg.connect(dsn(target_url)) as dst:
        rows = src.execute(f"SELECT {EVENT_COLUMNS} FROM events WHERE {where} ORDER BY stream_id, seq", params).fetchall()
        placeholders = ", ".join(["%s"] * len(EVENT_COLUMNS.split(",")))
        with dst.cursor() as cur:
            cur.executemany(
                f"INSERT INTO events ({EVENT_COLUMNS}) VALUES ({placeholders})",
                [tuple(psycopg.types.json.Jsonb(v) if isinstance(v, dict) else v for v in row) for row in rows],
            )
    return len(rows)


def projections(url: str) -> dict[str, list[tuple]]:
    """Every projection, in a comparable form (generated ids and update times left out)."""
    queries = {
        "task_runs": "SELECT id, last_seq, flow_run_id, state_type, state_name, view FROM task_runs ORDER BY id",
        "flow_runs": "SELECT id, last_seq, state_type, view FROM flow_runs ORDER BY id",
        "task_cache": "SELECT cache_key, cache_expiration, state_id, state, created FROM task_cache ORDER BY state_id",
        "tag_leases": "SELECT id, task_run_id, tags, slots FROM tag_leases ORDER BY id",
        "tag_limits": 'SELECT tag, "limit", active, active_slots FROM tag_concurrency_limits ORDER BY tag',
    }
    with psycopg.connect(dsn(url)) as conn:
        return {name: [tuple(r) for r in conn.execute(q).fetchall()] for name, q in queries.items()}


def cli(
    env: dict[str, str], *args: str, timeout: float = 120, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    """`runstate ...` as a user runs it: a new process reading its settings from the environment
    (and, for what the environment lacks, from the .runstate/env above `cwd`)."""
    return subprocess.run(
        [sys.executable, "-m", "runstate.cli", *args],
        env={**os.environ, **env}, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False,
    )
