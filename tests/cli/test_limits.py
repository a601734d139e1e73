"""`runstate concurrency-limit`: set and delete are commands decided by the service
(here one in-process on topics and a database of these tests' own); get and list read the table."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest

from audit.support import dsn, scratch_database
from pipeline.harness import InProcessService, isolated_settings, settings_env
from runstate.config import Settings
from runstate.messages import limit_id

from .conftest import invoke, run_cli

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


@pytest.fixture(scope="session")
def limit_settings(kafka_bootstrap: str, database_url: str, admin_database_url: str) -> Iterator[Settings]:
    """Topics and a database of their own: the other CLI tests count the events of theirs."""
    with scratch_database(admin_database_url, database_url, "cli_limits") as (app_url, admin_url):
        yield isolated_settings(
            Settings(kafka_bootstrap_servers=kafka_bootstrap, database_url=app_url, admin_database_url=admin_url)
        )


@pytest.fixture(scope="session")
def limit_env(limit_settings: Settings) -> dict[str, str]:
    return settings_env(limit_settings)


@pytest.fixture(scope="session")
async def limit_service(limit_settings: Settings) -> AsyncIterator[None]:
    async with InProcessService(limit_settings):
        yield


async def cli(env: dict[str, str], *args: str):
    # In a thread: the service deciding the command runs on this event loop.
    return await asyncio.to_thread(run_cli, env, *args)


async def test_concurrency_limit_crud(limit_service, limit_settings, limit_env):
    tag = f"crud-{uuid.uuid4().hex[:6]}"
    done = await cli(limit_env, "concurrency-limit", "set", tag, "2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{tag}\tlimit=2\tactive\tactive_slots=0"

    # Changing a limit keeps the slots its leases hold, and `active` unless told.
    with psycopg.connect(dsn(limit_settings.database_url)) as conn:
        conn.execute("UPDATE tag_concurrency_limits SET active_slots = 1 WHERE tag = %s", (tag,))
    assert (await cli(limit_env, "concurrency-limit", "set", tag, "3", "--inactive")).returncode == 0
    got = json.loads((await cli(limit_env, "concurrency-limit", "get", tag, "--json")).stdout)
    assert (got["tag"], got["limit"], got["active"], got["active_slots"]) == (tag, 3, False, 1)
    kept = await cli(limit_env, "concurrency-limit", "set", tag, "4")
    assert kept.stdout.strip() == f"{tag}\tlimit=4\tinactive\tactive_slots=1"
    assert (await cli(limit_env, "concurrency-limit", "set", tag, "4", "--active")).stdout.strip() == (
        f"{tag}\tlimit=4\tactive\tactive_slots=1")

    listed = json.loads((await cli(limit_env, "concurrency-limit", "list", "--json")).stdout)
    assert [row["limit"] for row in listed if row["tag"] == tag] == [4]
    assert listed == sorted(listed, key=lambda row: row["tag"])

    assert (await cli(limit_env, "concurrency-limit", "delete", tag)).returncode == 0
    missing = await cli(limit_env, "concurrency-limit", "get", tag)
    assert (missing.returncode, missing.stderr.strip()) == (1, f"error: no concurrency limit for tag {tag!r}")
    again = await cli(limit_env, "concurrency-limit", "delete", tag)
    assert (again.returncode, again.stderr.strip()) == (1, f"error: no concurrency limit for tag {tag!r}")
    assert tag not in (await cli(limit_env, "concurrency-limit", "list")).stdout

    negative = await cli(limit_env, "concurrency-limit", "set", tag, "-1")
    assert negative.returncode == 2
    assert (await cli(limit_env, "concurrency-limit", "get", tag)).returncode == 1
    # Every change is an event of the tag's stream: four sets and a delete.
    with psycopg.connect(dsn(limit_settings.database_url)) as conn:
        kinds = conn.execute("SELECT event_type FROM events WHERE stream_id = %s ORDER BY seq",
                             (limit_id(tag),)).fetchall()
    assert [k for (k,) in kinds] == ["concurrency_limit_set"] * 4 + ["concurrency_limit_deleted"]


async def test_concurrency_limit_json(limit_service, limit_env):
    tag = f"cli-{uuid.uuid4().hex[:6]}"
    created = json.loads((await asyncio.to_thread(invoke, limit_env, "concurrency-limit", "set", tag, "3",
                                                  "--json")).stdout)
    assert (created["tag"], created["limit"], created["active"], created["active_slots"]) == (tag, 3, True, 0)
    got = json.loads((await asyncio.to_thread(invoke, limit_env, "concurrency-limit", "get", tag, "--json")).stdout)
    # `updated_at`: when the change was decided (set), when the row was written (get).
    assert {k: v for k, v in got.items() if k != "updated_at"} == {
        k: v for k, v in created.items() if k != "updated_at"}
    listed = json.loads((await asyncio.to_thread(invoke, limit_env, "concurrency-limit", "list", "--json")).stdout)
    assert [row for row in listed if row["tag"] == tag] == [got]
    deleted = await asyncio.to_thread(invoke, limit_env, "concurrency-limit", "delete", tag, "--json")
    assert json.loads(deleted.stdout) == {"tag": tag, "deleted": True}
    again = await asyncio.to_thread(invoke, limit_env, "concurrency-limit", "delete", tag, "--json")
    assert (again.exit_code, again.stdout) == (1, "")


def test_set_with_kafka_unreachable_is_one_line_and_exit_1(limit_settings):
    env = settings_env(limit_settings.replace(kafka_bootstrap_servers="127.0.0.1:1"))
    done = run_cli(env, "concurrency-limit", "set", "x", "1", timeout=90)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith("error: Kafka at 127.0.0.1:1 is unreachable")
