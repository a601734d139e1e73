"""Settings: validated with one-line errors, secrets masked, a Kafka-only worker needs no
database, and `.runstate/env` fills in what the environment lacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from runstate.client import RunstateClient
from runstate.config import Settings, SettingsError, WorkerSettings

VARIABLES = [*Settings.variables().values(), "RUNSTATE_HTTP_URL"]
PASSWORD = "s3cret pa$$word'"
URL = "postgresql+psycopg://runstate_app:s3cret%20pa%24%24word%27@db.example:5433/runstate"


@pytest.fixture
def bare(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No runstate variable in the environment, and a working folder without .runstate/env."""
    for var in VARIABLES:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def runstate(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    return subprocess.run([sys.executable, "-m", "runstate.cli", *args], env={**clean, **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_a_bad_integer_is_one_line_naming_the_variable(bare: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    monkeypatch.setenv("DATABASE_URL", URL)
    monkeypatch.setenv("RUNSTATE_MAX_BATCH", "ten")
    with pytest.raises(SettingsError) as caught:
        Settings.load()
    message = str(caught.value)
    assert message.startswith("RUNSTATE_MAX_BATCH='ten': ") and "integer" in message
    assert "\n" not in message


def test_the_command_line_prints_a_bad_value_as_one_error_line(bare: Path) -> None:
    done = runstate("config", "show", cwd=bare, env={"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092",
                                                      "DATABASE_URL": URL, "RUNSTATE_LANES": "0"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: RUNSTATE_LANES='0': input should be greater than or equal to 1"], done.stderr
    assert done.stdout == ""


def test_every_problem_is_named_at_once(bare: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.load(partitions="many", command_topic="bad topic")
    message = str(caught.value)
    assert message.startswith("KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL are not set (")
    assert "RUNSTATE_PARTITIONS='many'" in message and "RUNSTATE_COMMAND_TOPIC='bad topic'" in message
    assert "RUNSTATE_ADMIN_DATABASE_URL" not in message  # it defaults to DATABASE_URL


def test_a_worker_needs_no_database(bare: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    monkeypatch.setenv("RUNSTATE_RESULT_TOPIC", "mine.results")
    worker = WorkerSettings.load()
    assert worker.kafka_bootstrap_servers == "127.0.0.1:9092"
    assert worker.result_topic == "mine.results"
    assert RunstateClient().settings == worker  # the client library loads the worker's settings
    with pytest.raises(SettingsError, match=r"^DATABASE_URL is not set \("):
        Settings.load()


def test_a_database_url_must_be_postgresql_and_is_never_echoed(bare: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.load(kafka_bootstrap_servers="k:1", database_url=f"mysql://u:{PASSWORD}@h/d")
    assert str(caught.value) == "DATABASE_URL: not a PostgreSQL URL (it names mysql)"
    with pytest.raises(SettingsError, match=r"^DATABASE_URL: not a database URL"):
        Settings.load(kafka_bootstrap_servers="k:1", database_url=f"{PASSWORD}")


def test_secrets_stay_masked(bare: Path) -> None:
    settings = Settings.load(kafka_bootstrap_servers="k:1", database_url=URL)
    assert isinstance(settings.database_url, SecretStr)
    assert settings.admin_database_url == settings.database_url
    for text in (repr(settings), str(settings), settings.model_dump_json()):
        assert "s3cret" not in text
    done = runstate("config", "show", cwd=bare, env={"KAFKA_BOOTSTRAP_SERVERS": "k:1", "DATABASE_URL": URL})
    assert done.returncode == 0, done.stderr
    assert "s3cret" not in done.stdout
    shown = dict(line.split(None, 1) for line in done.stdout.splitlines())
    assert shown["DATABASE_URL"] == "postgresql+psycopg://runstate_app:***@db.example:5433/runstate  (environment)"
    assert shown["RUNSTATE_ADMIN_DATABASE_URL"].endswith("(default: DATABASE_URL)")
    assert shown["RUNSTATE_MAX_BATCH"] == "1000  (default)"


def test_config_show_for_a_worker_lists_no_database(bare: Path) -> None:
    done = runstate("config", "show", "--worker", cwd=bare, env={"KAFKA_BOOTSTRAP_SERVERS": "k:1"})
    assert done.returncode == 0, done.stderr
    names = [line.split()[0] for line in done.stdout.splitlines()]
    assert names == list(WorkerSettings.variables().values())


def test_the_env_file_fills_in_and_the_environment_wins(bare: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (bare / ".runstate").mkdir()
    (bare / ".runstate" / "env").write_text(
        "# written by deploy/stack up\n"
        "export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:1111\n"
        f"export DATABASE_URL='{URL}'\n"
        "export RUNSTATE_MAX_BATCH=7\n")
    below = bare / "some" / "folder"
    below.mkdir(parents=True)
    monkeypatch.chdir(below)
    monkeypatch.setenv("RUNSTATE_MAX_BATCH", "9")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "")  # empty counts as unset
    settings = Settings.load()
    assert settings.kafka_bootstrap_servers == "127.0.0.1:1111"
    assert settings.database_url.get_secret_value() == URL
    assert settings.max_batch == 9
    assert Settings.load(max_batch=3).max_batch == 3  # arguments win over both


def test_replace_validates(bare: Path) -> None:
    settings = Settings.load(kafka_bootstrap_servers="k:1", database_url=URL)
    copy = settings.replace(database_url="postgresql+psycopg://other@h/d", lanes=2)
    assert isinstance(copy.database_url, SecretStr) and copy.lanes == 2
    assert copy.admin_database_url == settings.admin_database_url
    with pytest.raises(ValueError):
        settings.replace(lanes=0)


def test_a_worker_knows_the_command_size_limit_it_must_keep_to():
    """RunstateClient refuses to send an oversized command; it reads the limit from
    the worker's settings, which have no database."""
    worker = WorkerSettings(kafka_bootstrap_servers="127.0.0.1:9092", RUNSTATE_MAX_COMMAND_BYTES="2048")
    assert worker.max_command_bytes == 2048
    assert WorkerSettings(kafka_bootstrap_servers="127.0.0.1:9092").max_command_bytes == 1_048_576


def test_the_shutdown_timeout_bounds_the_consumers_drain(bare: Path) -> None:
    from runstate.pipeline.app import build_app

    settings = Settings.load(kafka_bootstrap_servers="k:1", database_url=URL, metrics_port=0,
                             shutdown_timeout_ms=2500)
    assert settings.shutdown_timeout_s == 3  # uvicorn takes whole seconds: rounded up, never shorter
    app = build_app(settings)
    assert app.broker is not None
    assert app.broker.config.broker_config.graceful_timeout == 2.5
