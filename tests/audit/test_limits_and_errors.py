"""One clear line when a server is unreachable, or a setting missing (the limit commands: tests/cli/test_limits.py)."""

from __future__ import annotations

import uuid

import pytest

from pipeline.harness import settings_env

from .support import cli

pytestmark = [pytest.mark.postgres]


@pytest.mark.parametrize(
    "args",
    [
        ["history", str(uuid.uuid4())],
        ["replay", "--verify", "--all"],
        ["rebuild"],
        ["backfill", "--since", "2024-01-01T00:00:00Z"],
        ["concurrency-limit", "list"],
        ["concurrency-limit", "get", "x"],
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
