"""`runstate backfill`: the recorded state changes, published again, equal the originals."""

from __future__ import annotations

from collections import defaultdict
from datetime import timedelta

import psycopg
import pytest

from pipeline.harness import isolated_settings, read_all, settings_env
from runstate.messages import StateChangeEvent
from runstate.pipeline.kafka import ensure_topics

from .support import cli, dsn

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


def by_run(records) -> dict[bytes, list[tuple[int, bytes]]]:
    """Per key, in topic order, (seq, value) with redelivered duplicates dropped."""
    out: dict[bytes, list[tuple[int, bytes]]] = defaultdict(list)
    for record in records:
        seq = StateChangeEvent.model_validate_json(record.value).seq
        if all(s != seq for s, _ in out[record.key]):
            out[record.key].append((seq, record.value))
    return dict(out)


async def backfilled(driven_log, *args: str, expect: int):
    target = isolated_settings(driven_log.settings)
    await ensure_topics(target)
    done = cli(settings_env(driven_log.settings), "backfill", "--topic", target.state_change_topic, *args)
    assert done.returncode == 0, done.stderr
    assert f"published {expect} state changes" in done.stdout
    # The CLI has returned: every record it published is on the topic, so all of it is read.
    records = await read_all(target, target.state_change_topic)
    assert len(records) == expect
    return records


def recorded_at(driven_log) -> dict[tuple[bytes, int], object]:
    with psycopg.connect(dsn(driven_log.settings.database_url)) as conn:
        rows = conn.execute("SELECT stream_id, seq, recorded_at FROM events WHERE stream_type = 'task_run'").fetchall()
    return {(str(s).encode(), q): t for s, q, t in rows}


async def test_backfill_republishes_the_original_state_changes(driven_log):
    original = by_run(driven_log.state_changes)
    total = sum(len(v) for v in original.values())
    since = min(recorded_at(driven_log).values()) - timedelta(seconds=1)
    records = await backfilled(driven_log, "--since", since.isoformat(), expect=total)
    # Byte for byte, with the original keys and seqs, each run's changes in seq order.
    assert by_run(records) == original
    for changes in by_run(records).values():
        assert [seq for seq, _ in changes] == sorted(seq for seq, _ in changes)


async def test_backfill_of_one_run_from_a_time_on(driven_log):
    run = driven_log.runs["flaky"]
    key = str(run).encode()
    times = recorded_at(driven_log)
    since = times[(key, 3)]  # inclusive: seq 3 onwards
    expected = [(seq, value) for seq, value in by_run(driven_log.state_changes)[key] if times[(key, seq)] >= since]
    assert [seq for seq, _ in expected] == [3, 4, 5]
    records = await backfilled(driven_log, "--since", since.isoformat(), "--run", str(run), expect=3)
    assert by_run(records) == {key: expected}


async def test_backfill_after_the_last_event_publishes_nothing(driven_log):
    since = max(recorded_at(driven_log).values()) + timedelta(seconds=1)
    await backfilled(driven_log, "--since", since.isoformat(), expect=0)


def test_backfill_rejects_a_malformed_time(driven_log):
    done = cli(settings_env(driven_log.settings), "backfill", "--since", "yesterday-ish")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: --since 'yesterday-ish' is not an ISO 8601 time (e.g. 2024-05-01T12:00:00Z)"]
