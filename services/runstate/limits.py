"""`runstate concurrency-limit`: the tag concurrency limits.

`set` and `delete` are commands like every other write: sent to the command topic
with the worker's settings (Kafka only) and decided by the service, which records
them in the tag's stream of the log; the answer is its LimitResultEvent. `get` and
`list` read the table the service keeps (store/queries.py). Setting a limit never
touches `active_slots`: that count belongs to the leases the service takes and
releases, and `active` stays as it is unless --active or --inactive says otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from aiokafka.errors import KafkaError
from pydantic import ValidationError
from sqlalchemy import Engine

from runstate.cli_support import EXIT_USAGE, JsonFlag, database, emit_json, fail, load_settings
from runstate.config import SettingsError, WorkerSettings
from runstate.messages import DeleteConcurrencyLimitCommand, LimitCommand, LimitResultEvent, SetConcurrencyLimitCommand

T = TypeVar("T")
limit_app = typer.Typer(no_args_is_help=True, help="Tag concurrency limits.")

DECISION_TIMEOUT_S = 30.0


def _line(row: dict[str, Any]) -> str:
    state = "active" if row["active"] else "inactive"
    return f"{row['tag']}\tlimit={row['limit']}\t{state}\tactive_slots={row['active_slots']}"


def _decided(command: LimitCommand) -> LimitResultEvent:
    """Send the command and wait for its answer; servers away end the command with one line."""
    from runstate.client import RunstateClient, RunstateError

    # Kafka failures are reported in one line; aiokafka's own records would reach stderr too.
    logging.getLogger("aiokafka").addHandler(logging.NullHandler())
    try:
        settings = WorkerSettings.load()
    except SettingsError as exc:
        raise fail(str(exc), EXIT_USAGE) from exc

    async def send() -> LimitResultEvent:
        async with RunstateClient(settings, client_id="runstate-cli") as client:
            return await client.request(command, DECISION_TIMEOUT_S)

    try:
        return asyncio.run(send())
    except (KafkaError, OSError) as exc:
        raise fail(f"Kafka at {settings.kafka_bootstrap_servers} is unreachable: {exc}") from exc
    except RunstateError as exc:
        raise fail(f"{exc} (the command is queued and will still be decided)") from exc


def _invalid(exc: ValidationError) -> str:
    error = exc.errors(include_url=False)[0]
    return f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}"


def _as_json(result: LimitResultEvent) -> dict[str, Any]:
    assert result.limit is not None  # a decided set or delete names its limit
    updated = result.decided_at.isoformat() if result.decided_at else None
    return {**result.limit.model_dump(mode="json"), "updated_at": updated}


@limit_app.command("set")
def limit_set(
    tag: str,
    limit: int = typer.Argument(..., min=0),
    active: bool | None = typer.Option(None, "--active/--inactive",
                                       help="Enforce the limit, or keep it without enforcing it"
                                       " (default: a new limit is active, a changed one stays as it was)."),
    as_json: JsonFlag = False,
) -> None:
    """Create or change the limit of TAG; its active slots are kept."""
    try:
        command = SetConcurrencyLimitCommand(command_id=uuid.uuid4(), tag=tag, concurrency_limit=limit,
                                             active=active)
    except ValidationError as exc:
        raise fail(_invalid(exc), EXIT_USAGE) from exc
    result = _decided(command)
    if result.error is not None:
        raise fail(result.error.message)
    row = _as_json(result)
    if as_json:
        emit_json(row)
    else:
        typer.echo(_line(row))


@limit_app.command("get")
def limit_get(tag: str, as_json: JsonFlag = False) -> None:
    """Show the limit of TAG (exit 1 when there is none)."""
    from runstate.store.queries import limit_row

    row = _read(lambda engine: limit_row(engine, tag))
    if row is None:
        raise fail(f"no concurrency limit for tag {tag!r}")
    if as_json:
        emit_json(row)
    else:
        typer.echo(_line(row))


@limit_app.command("delete")
def limit_delete(tag: str, as_json: JsonFlag = False) -> None:
    """Remove the limit of TAG (exit 1 when there is none)."""
    try:
        command = DeleteConcurrencyLimitCommand(tag=tag, command_id=uuid.uuid4())
    except ValidationError as exc:
        raise fail(_invalid(exc), EXIT_USAGE) from exc
    result = _decided(command)
    if result.error is not None:
        raise fail(f"no concurrency limit for tag {tag!r}" if result.error.code == "unknown_limit"
                   else result.error.message)
    if as_json:
        emit_json({"tag": tag, "deleted": True})
    else:
        typer.echo(f"deleted the concurrency limit for tag {tag!r}")


@limit_app.command("list")
def limit_list(as_json: JsonFlag = False) -> None:
    """Every tag limit, by tag."""
    from runstate.store.queries import limit_rows

    rows = _read(limit_rows)
    if as_json:
        emit_json(rows)
    else:
        for row in rows:
            typer.echo(_line(row))


def _read(query: Callable[[Engine], T]) -> T:
    """Run a read on the database of the settings; unreachable servers end the command with one line."""
    with database(load_settings().database_url) as engine:
        return query(engine)


def register(app: typer.Typer) -> None:
    app.add_typer(limit_app, name="concurrency-limit")
