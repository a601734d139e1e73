"""Acceptance: the real prefect==3.9.1 client against the gateway, compared with the
answers Prefect 3.9.1's own server gives to the very same calls."""

from __future__ import annotations

import asyncio
import json
import math
import os
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from runstate.events import appended_with_columns

from .prefect_env import prefect_python

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

SCRIPT = Path(__file__).with_name("prefect_scenarios.py")
SCENARIOS = ("running_after_completed", "scheduled_in_future", "retry_after_failed", "cached")


async def run_scenarios(tmp_path: Path, api_url: str | None, auth_string: str | None = None) -> dict[str, Any]:
    """Run prefect_scenarios.py in the Prefect venv; no api_url = Prefect's own server.
    With auth_string the client authenticates as Prefect's does (PREFECT_API_AUTH_STRING)."""
    python = await asyncio.to_thread(prefect_python)
    home = tmp_path / ("gateway" if api_url else "prefect-server")
    home.mkdir()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
        "PREFECT_HOME": str(home),
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    if api_url:
        env["PREFECT_API_URL"] = api_url
        if auth_string:
            env["PREFECT_API_AUTH_STRING"] = auth_string
    else:
        env["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] = "true"
        # Prefect's own 20 s is too little for its server to start on a busy 2-core machine.
        env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
    proc = await asyncio.create_subprocess_exec(
        str(python), str(SCRIPT), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode == 0, f"prefect client failed against {api_url or 'Prefect'}:\n{stderr.decode()[-4000:]}"
    return json.loads(stdout)


def comparable(step: dict[str, Any]) -> dict[str, Any]:
    """What must be equal: HTTP code, status, resulting state and details. Ids and
    reason texts differ by construction (informational: docs/rules.md, 'The request and its answer');
    a WAIT delay may differ by the second the clock ticked between the two runs."""
    details = {k: v for k, v in step["details"].items() if k not in ("reason", "delay_seconds")}
    return {**{k: v for k, v in step.items() if k not in ("state_id", "details")}, "details": details}


@pytest.fixture(scope="module")
async def answers(gateway, tmp_path_factory) -> dict[str, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("prefect")
    ours, theirs = await asyncio.gather(
        run_scenarios(tmp, gateway.api_url, gateway.auth_string), run_scenarios(tmp, None)
    )
    return {"gateway": ours, "prefect": theirs}


async def test_client_drives_a_task_run_through_its_lifecycle(answers):
    ours = answers["gateway"]
    assert ours["health"] is True and ours["server_version"] == "3.9.1"
    assert ours["flow_run"] == {
        **ours["flow_run"], "flow_id_matches": True, "created_state": "PENDING", "read_state": "RUNNING",
    }
    steps = ours["lifecycle"]["steps"]
    assert steps[0] == {"created": "SCHEDULED", "http": 201}
    assert [(s["http"], s["status"], s["state_type"]) for s in steps[1:]] == [
        (201, "ACCEPT", "PENDING"), (201, "ACCEPT", "RUNNING"), (201, "ACCEPT", "COMPLETED"),
    ]
    assert ours["lifecycle"]["read"] == answers["prefect"]["lifecycle"]["read"]


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_same_answers_as_prefects_own_server(answers, scenario):
    ours = [comparable(s) for s in answers["gateway"][scenario]]
    theirs = [comparable(s) for s in answers["prefect"][scenario]]
    assert ours == theirs


async def test_wait_delay_matches_prefect(answers):
    """Both servers wait the seconds left until the scheduled time when they decide: within
    what their client saw just before asking and just after the answer (whole seconds)."""
    for server in ("gateway", "prefect"):
        [step] = answers[server]["scheduled_in_future"]
        least, most = answers[server]["seconds_left"]
        assert step["status"] == "WAIT", server
        assert math.floor(least) <= step["details"]["delay_seconds"] <= math.ceil(most), (server, least, most)


async def test_lifecycle_and_flow_run_answers_match_prefect(answers):
    ours, theirs = answers["gateway"], answers["prefect"]
    assert [comparable(s) for s in ours["lifecycle"]["steps"][1:]] == [
        comparable(s) for s in theirs["lifecycle"]["steps"][1:]
    ]
    assert comparable(ours["flow_run"]["set_running"]) == comparable(theirs["flow_run"]["set_running"])
    assert [(s["type"], s["name"]) for s in ours["lifecycle"]["states"]] == [
        (s["type"], s["name"]) for s in theirs["lifecycle"]["states"]
    ]


async def test_gateway_serves_every_endpoint_the_client_called(answers):
    assert answers["gateway"]["calls"] == answers["prefect"]["calls"]


async def test_states_read_by_the_client_are_the_logged_appended_states(answers, gateway):
    lifecycle = answers["gateway"]["lifecycle"]
    logged = await gateway.store.history(UUID(lifecycle["task_run_id"]))
    # A compact appended state takes its id from its event's columns (runstate/events.py, StoredState).
    appended = [appended_with_columns(row["payload"]["decision"]["appended_state"], row["stream_id"],
                                      row["transition_id"], row["state_id"])
                for row in logged if row["state_type"] is not None]
    assert [(s["id"], s["type"], s["name"]) for s in appended] == [
        (s["id"], s["type"], s["name"]) for s in lifecycle["states"]
    ]
    # and every answer's state is the one the log appended, in order
    assert [s["state_id"] for s in lifecycle["steps"][1:]] == [s["id"] for s in appended[1:]]
