"""`runstate config show`: the settings in force, where each came from, passwords masked."""

from __future__ import annotations

import os

import typer
from pydantic import SecretStr

from runstate.cli_support import EXIT_USAGE, JsonFlag, emit_json, fail
from runstate.config import Settings, SettingsError, WorkerSettings
from runstate.envfile import find_env_file, read_env_file

config_app = typer.Typer(no_args_is_help=True, help="Settings (environment, then .runstate/env).")


def shown(value: object) -> str:
    """A value as `config show` prints it: a URL keeps all but its password, other secrets nothing."""
    if not isinstance(value, SecretStr):
        return str(value)
    from runstate.database_urls import masked

    try:
        return masked(value)
    except Exception:  # noqa: BLE001 - a secret that is not a URL is shown as SecretStr shows it
        return str(value)


def rows(settings: WorkerSettings) -> list[tuple[str, str, str]]:
    """(variable, value as shown, source) for every setting."""
    env_file = find_env_file()
    file_values = read_env_file(env_file)
    out = []
    for name, var in type(settings).variables().items():
        if os.environ.get(var):
            source = "environment"
        elif file_values.get(var):
            source = str(env_file)
        elif name in type(settings).defaults_from:
            source = f"default: {type(settings).variables()[type(settings).defaults_from[name]]}"
        else:
            source = "default"
        out.append((var, shown(getattr(settings, name)), source))
    return out


@config_app.command("show")
def show(
    worker: bool = typer.Option(False, "--worker", help="Only what a Kafka-only worker needs (no database)."),
    as_json: JsonFlag = False,
) -> None:
    """Print every setting: variable, value (passwords masked) and where it came from."""
    try:
        settings = (WorkerSettings if worker else Settings).load()
    except SettingsError as exc:
        raise fail(str(exc), EXIT_USAGE) from exc
    table = rows(settings)
    if as_json:
        emit_json([{"variable": var, "value": value, "source": source} for var, value, source in table])
        return
    width = max(len(var) for var, _, _ in table)
    for var, value, source in table:
        typer.echo(f"{var:<{width}}  {value}  ({source})")
