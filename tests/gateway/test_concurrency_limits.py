"""The gateway's concurrency-limit routes send commands and wait for their decision,
like set_state: the gateway runs as the read-only role, so these pass only because
it never writes PostgreSQL itself."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from runstate.database_urls import libpq_dsn
from runstate.messages import limit_id

from .test_http import new_task_run, propose

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]
NOT_FOUND = {"detail": "Concurrency limit not found"}


def new_tag() -> str:
    return f"limit-{uuid.uuid4().hex[:8]}"


async def test_an_update_keeps_the_active_slots_and_the_id_is_the_tags(http, gateway):
    tag = new_tag()
    created = await http.post("/concurrency_limits/", json={"tag": tag, "concurrency_limit": 1})
    assert created.status_code == 201, created.text
    assert created.json()["id"] == str(limit_id(tag))
    holder = await new_task_run(http, tags=[tag])
    assert (await propose(http, holder["id"], "RUNNING")).json()["status"] == "ACCEPT"
    updated = await http.post("/concurrency_limits/", json={"tag": tag, "concurrency_limit": 3})
    assert updated.status_code == 200
    assert (updated.json()["concurrency_limit"], updated.json()["active_slots"]) == (3, [holder["id"]])
    # Recorded in the tag's stream of the log, one event per change.
    events = await gateway.store.history(limit_id(tag))
    assert [(e["seq"], e["stream_type"], e["event_type"]) for e in events] == [
        (1, "concurrency_limit", "concurrency_limit_set"), (2, "concurrency_limit", "concurrency_limit_set")]


async def test_delete_by_id_and_by_tag_and_unknown_limits_are_404(http):
    tag, other = new_tag(), new_tag()
    for t in (tag, other):
        assert (await http.post("/concurrency_limits/", json={"tag": t, "concurrency_limit": 2})).status_code == 201
    assert (await http.delete(f"/concurrency_limits/{limit_id(tag)}")).status_code == 200
    assert (await http.get(f"/concurrency_limits/{limit_id(tag)}")).status_code == 404
    assert (await http.delete(f"/concurrency_limits/tag/{other}")).status_code == 200
    for path in (f"/concurrency_limits/tag/{other}", f"/concurrency_limits/{limit_id(other)}",
                 f"/concurrency_limits/tag/{new_tag()}"):
        gone = await http.delete(path)
        assert (gone.status_code, gone.json()) == (404, NOT_FOUND), path
    # Deleted, then created again: a new limit (201), whose stream goes on.
    assert (await http.post("/concurrency_limits/", json={"tag": tag, "concurrency_limit": 1})).status_code == 201


async def test_a_limit_beyond_what_is_stored_is_422(http):
    too_big = await http.post("/concurrency_limits/", json={"tag": new_tag(), "concurrency_limit": 2**31})
    assert too_big.status_code == 422
    control = await http.post("/concurrency_limits/", json={"tag": "a\tb", "concurrency_limit": 1})
    assert control.status_code == 422


def test_the_gateway_role_cannot_write_any_table(gateway_database_url):
    with psycopg.connect(libpq_dsn(gateway_database_url), autocommit=True) as conn:
        tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        assert "tag_concurrency_limits" in tables and "events" in tables
        writable = [t for t in tables if conn.execute(
            "SELECT has_table_privilege(current_user, %s, 'INSERT, UPDATE, DELETE, TRUNCATE')", (t,)).fetchone()[0]]
        assert writable == []
        for table in tables:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(f'INSERT INTO "{table}" DEFAULT VALUES')
