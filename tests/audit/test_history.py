"""`runstate history` against a log the pipeline wrote."""

from __future__ import annotations

import json
from itertools import pairwise

import pytest

from pipeline.harness import settings_env

from .support import cli

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


@pytest.mark.parametrize("name", ["lifecycle", "flaky", "cached"])
def test_history_matches_the_result_topic_event_for_event(driven_log, name):
    run = driven_log.runs[name]
    published = {e.seq: e for e in driven_log.results if e.stream_id == run}  # de-duplicated by seq
    done = cli(settings_env(driven_log.settings), "history", str(run), "--json")
    assert done.returncode == 0, done.stderr
    history = json.loads(done.stdout)

    assert [h["seq"] for h in history] == sorted(published) == list(range(1, len(published) + 1))
    for entry in history:
        event = published[entry["seq"]]
        assert entry["command_id"] == str(event.command_id)
        assert entry["status"] == event.status.value
        assert entry["transition_id"] == (str(event.transition_id) if event.transition_id else None)
        assert entry["reason"] == getattr(event.result.details, "reason", None)
        if event.state_appended:
            assert entry["to"] == {"type": event.result.state.type.value, "name": event.result.state.name}
        else:
            assert entry["to"] is None
    # "from" is the state the previous event left.
    for before, after in pairwise(history):
        if before["to"] is not None:
            assert after["from"] == before["to"]


def test_history_table_shows_each_transition(driven_log):
    run = driven_log.runs["flaky"]
    done = cli(settings_env(driven_log.settings), "history", str(run))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:3] == ["SEQ", "RECORDED", "PROPOSED"]
    assert len(lines) == 1 + 5
    rejected = lines[3]
    assert rejected.split()[0] == "3"
    assert "RUNNING -> SCHEDULED/AwaitingRetry" in rejected and "REJECT" in rejected
    assert f"{driven_log.settings.command_topic}[" in rejected


def test_history_of_an_unknown_run_fails(driven_log):
    done = cli(settings_env(driven_log.settings), "history", "00000000-0000-0000-0000-000000000001")
    assert done.returncode == 1
    assert done.stderr.strip().startswith("error: no events recorded")
