"""Every `runstate` command takes --json, and what it writes to stdout then parses and says
what the command did (checked against the database, the topics and the text output)."""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest
import typer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from audit.support import copy_events, dsn, scratch_database
from pipeline.harness import read_all, settings_env
from runstate.cli import app
from runstate.kafka_security import kafka_options

from .conftest import invoke, run_cli

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


def leaf_commands(command, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], object]]:
    if hasattr(command, "commands"):  # a group (Typer's own click)
        return [leaf for name, sub in command.commands.items() for leaf in leaf_commands(sub, (*path, name))]
    return [(path, command)]


def test_every_command_accepts_json():
    commands = leaf_commands(typer.main.get_command(app))
    names = {" ".join(path) for path, _ in commands}
    assert {"serve", "gateway", "history", "replay", "rebuild", "backfill", "db upgrade", "db downgrade",
            "db current", "db history", "concurrency-limit list", "asyncapi"} <= names
    without = [" ".join(path) for path, command in commands
               if not any("--json" in param.opts for param in command.params)]
    assert without == []


def test_history_json_lists_the_decided_states(cli_env, decided_run):
    done = invoke(cli_env, "history", str(decided_run.run_id), "--json")
    assert done.exit_code == 0, done.stderr
    entries = json.loads(done.stdout)
    assert [e["seq"] for e in entries] == [1, 2, 3]
    assert [e["to"]["type"] for e in entries] == ["PENDING", "RUNNING", "COMPLETED"]
    assert [e["status"] for e in entries[1:]] == ["ACCEPT", "ACCEPT"]


def test_replay_json_reports_every_decision(cli_env, cli_settings, decided_run):
    done = invoke(cli_env, "replay", "--verify", "--json")
    assert done.exit_code == 0, done.stderr
    report = json.loads(done.stdout)
    with psycopg.connect(dsn(cli_settings.database_url)) as conn:
        events = conn.execute("SELECT count(*) FROM events WHERE stream_type = 'task_run'").fetchone()[0]
        chained = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    assert report == {"events": events, "chained": chained, "ok": True, "found": 0, "mismatches": []}
    assert events >= 3


def test_replay_json_names_an_altered_decision_and_exits_1(cli_settings, decided_run, admin_database_url,
                                                           database_url):
    run = decided_run.run_id
    with scratch_database(admin_database_url, database_url, "cli_copy") as (copy_app, copy_admin):
        assert copy_events(cli_settings.admin_database_url, copy_app, "stream_id = %s", (run,)) == 3
        with psycopg.connect(dsn(copy_admin), autocommit=True) as owner:
            owner.execute("ALTER TABLE events DISABLE TRIGGER USER")
            # A task-run event records its decision's status once, in its status column.
            owner.execute("UPDATE events SET status = 'REJECT' WHERE stream_id = %s AND seq = 2", (run,))
            owner.execute("ALTER TABLE events ENABLE TRIGGER USER")
        done = invoke(settings_env(cli_settings.replace(database_url=copy_app)), "replay", "--verify", "--json")
    assert done.exit_code == 1
    report = json.loads(done.stdout)  # only the JSON document: no DIFFERS lines before it
    assert (report["events"], report["ok"], report["found"]) == (3, False, 1)
    assert report["mismatches"] == [
        {"run": str(run), "seq": 2, "differences": ['result.status: "REJECT" != "ACCEPT"']}
    ]


def test_rebuild_json_counts_what_it_folded(cli_env, cli_settings, decided_run):
    done = invoke(cli_env, "rebuild", "--json")
    assert done.exit_code == 0, done.stderr
    report = json.loads(done.stdout)
    with psycopg.connect(dsn(cli_settings.database_url)) as conn:
        events = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        task_runs = conn.execute("SELECT count(*) FROM task_runs").fetchone()[0]
    assert (report["events"], report["task_runs"], report["unreadable"]) == (events, task_runs, 0)
    assert task_runs >= 1 and report["seconds"] >= 0


async def test_backfill_json_says_what_it_published(cli_env, cli_settings, decided_run):
    topic = f"cli-backfill-{uuid.uuid4().hex[:8]}"
    # The stack's broker makes no topic by itself: backfill writes to one that exists.
    admin = AIOKafkaAdminClient(**kafka_options(cli_settings))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, cli_settings.topic_replication_factor)])
    finally:
        await admin.close()
    # A new process: backfill runs an event loop of its own, and this test already has one.
    done = run_cli(cli_env, "backfill", "--since", "2000-01-01T00:00:00Z", "--run", str(decided_run.run_id),
                   "--topic", topic, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report == {"published": decided_run.state_changes, "topic": topic,
                      "since": "2000-01-01T00:00:00+00:00", "run": str(decided_run.run_id)}
    assert len(await read_all(cli_settings, topic)) == decided_run.state_changes == 3


def test_backfill_to_a_missing_topic_is_refused_in_one_line(cli_env, decided_run):
    topic = f"cli-missing-{uuid.uuid4().hex[:8]}"
    done = run_cli(cli_env, "backfill", "--since", "2000-01-01T00:00:00Z", "--run", str(decided_run.run_id),
                   "--topic", topic)
    assert done.returncode == 2, done.stderr
    assert f"topic {topic!r} does not exist" in done.stderr
    assert "Traceback" not in done.stderr


def test_asyncapi_json(tmp_path):
    document = json.loads(invoke({}, "asyncapi", "--json").stdout)
    assert document["asyncapi"].startswith("3.")
    out = tmp_path / "asyncapi.json"
    report = json.loads(invoke({}, "asyncapi", "--out", str(out), "--json").stdout)
    assert report == {"path": str(out), "bytes": out.stat().st_size}
    assert json.loads(out.read_text()) == document
