"""The `runstate` CLI against the real stack: a scratch database with a run the real pipeline
decided, and two ways to run a command (in-process with Typer's runner, or as a new process)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import pytest
from typer.testing import CliRunner

from audit.support import scratch_database
from pipeline.harness import InProcessService, isolated_settings, read_topic, settings_env
from runstate.cli import app
from runstate.client import RunstateClient, state
from runstate.config import Settings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def cli_settings(kafka_bootstrap: str, database_url: str, admin_database_url: str) -> Iterator[Settings]:
    """Fresh topics and a fresh, migrated database: rebuild and the db commands change it."""
    with scratch_database(admin_database_url, database_url, "cli") as (app_url, admin_url):
        yield isolated_settings(
            Settings(kafka_bootstrap_servers=kafka_bootstrap, database_url=app_url, admin_database_url=admin_url)
        )


@pytest.fixture(scope="session")
def cli_env(cli_settings: Settings) -> dict[str, str]:
    return settings_env(cli_settings)


@dataclass(frozen=True)
class DecidedRun:
    run_id: UUID
    state_changes: int  # what the pipeline published on the state-change topic for it


@pytest.fixture(scope="session")
async def decided_run(cli_settings: Settings) -> DecidedRun:
    """A task run taken from creation through RUNNING to COMPLETED by the real pipeline."""
    run = uuid.uuid4()
    async with InProcessService(cli_settings), RunstateClient(cli_settings) as client:
        await client.create_task_run(run, name="cli")
        for proposal in ("RUNNING", "COMPLETED"):
            answer = await client.propose(run, state(proposal))
            assert answer.status == "ACCEPT", answer
    changes = await read_topic(cli_settings, cli_settings.state_change_topic, 3)
    return DecidedRun(run, len(changes))


def invoke(env: dict[str, str], *args: str):
    """`runstate ARGS` in this process (Typer's runner), stdout and stderr kept apart."""
    return CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)


def run_cli(env: dict[str, str], *args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess[str]:
    """`python -m runstate ARGS` as a new process."""
    return subprocess.run(
        [sys.executable, "-m", "runstate", *args], env={**os.environ, **env}, cwd=REPO,
        capture_output=True, text=True, timeout=timeout, check=False, **kwargs,
    )
