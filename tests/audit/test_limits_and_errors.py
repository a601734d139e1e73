"""`runstate concurrency-limit` CRUD, and one clear line when a server is unreachable."""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest

from pipeline.harness import settings_env

from .support import cli, dsn

pytestmark = [pytest.mark.postgres]


def test_concurrency_limit_crud(audit_settings):
    env = settings_env(audit_settings)
    tag = f"crud-{uuid.uuid4().hex[:6]}"

    done = cli(env, "concurrency-limit", "set", tag, "2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{tag}\tlimit=2\tactive\tactive_slots=0"

    # Changing a limit keeps the slots its leases hold.
    with psycopg.connect(dsn(audit_settings.database_url)) as conn:
        conn.execute("UPDATE tag_concurrency_limits SET active_slots = 1 WHERE tag = %s", (tag,))
    assert cli(env, "concurrency-limit", "set", tag, "3", "--inactive").returncode == 0
    got = json.loads(cli(env, "concurrency-limit", "get", tag, "--json").stdout)
    assert (got["tag"], got["limit"], got["active"], got["active_slots"]) == (tag, 3, False, 1)

    listed = json.loads(cli(env, "concurrency-limit", "list", "--json").stdout)
    assert [row["limit"] for row in listed if row["tag"] == tag] == [3]
    assert listed == sorted(listed, key=lambda row: row["tag"])
    assert f"{tag}\tlimit=3\tinactive\tactive_slots=1" in cli(env, "concurrency-limit", "list").stdout

    assert cli(env, "concurrency-limit", "delete", tag).returncode == 0
    missing = cli(env, "concurrency-limit", "get", tag)
    assert (missing.returncode, missing.stderr.strip()) == (1, f"error: no concurrency limit for tag {tag!r}")
    assert cli(env, "concurrency-limit", "delete", tag).returncode == 1
    assert tag not in cli(env, "concurrency-limit", "list").stdout

    negative = cli(env, "concurrency-limit", "set", tag, "-1")
    assert negative.returncode == 2
    assert cli(env, "concurrency-limit", "get", tag).returncode == 1


@pytest.mark.parametrize(
    "args",
    [
        ["history", str(uuid.uuid4())],
        ["replay", "--verify", "--all"],
        ["rebuild"],
        ["backfill", "--since", "2024-01-01T00:00:00Z"],
        ["concurrency-limit", "list"],
        ["concurrency-limit", "set", "x", "1"],
    ],
)
def test_unreachable_postgres_is_one_line_and_exit_1(bogus_database_env, args):
    done = cli(bogus_database_env, *args, timeout=30)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: PostgreSQL at 127.0.0.1:1/") and "unreachable" in lines[0]
    assert done.stdout == ""


@pytest.mark.kafka
def test_unreachable_kafka_is_one_line_and_exit_1(audit_settings):
    env = settings_env(audit_settings.replace(kafka_bootstrap_servers="127.0.0.1:1"))
    done = cli(env, "backfill", "--since", "2024-01-01T00:00:00Z", timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith("error: Kafka at 127.0.0.1:1 is unreachable")


def test_a_missing_setting_is_one_line_and_exit_2(audit_settings, tmp_path):
    # Run outside the checkout: there the .runstate/env of `make up` would supply the value.
    env = {**settings_env(audit_settings), "DATABASE_URL": ""}
    done = cli(env, "concurrency-limit", "list", timeout=30, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: DATABASE_URL is not set")
    assert len(done.stderr.strip().splitlines()) == 1
