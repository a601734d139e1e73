"""The audit commands of the `runstate` CLI: history, replay, rebuild, backfill and
concurrency-limit. `register(app)` adds them to the main Typer app (runstate.cli).

Every command reads Settings.load() and turns an unreachable server into one line
on stderr and exit code 1 (a missing setting is exit code 2, as elsewhere in the CLI).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Self
from uuid import UUID

import typer
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from runstate.audit.db import ServerUnreachable, first_line, open_engine

limit_app = typer.Typer(no_args_is_help=True, help="Tag concurrency limits.")


def _settings():
    from runstate.cli import load_settings  # the CLI's own: one line and exit 2 on a missing setting

    return load_settings()


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@contextmanager
def _database(url: str) -> Iterator[Engine]:
    """An engine for the command; unreachable or lost servers end it with one line."""
    try:
        engine = open_engine(url)
    except ServerUnreachable as exc:
        raise _fail(str(exc)) from exc
    try:
        yield engine
    except ServerUnreachable as exc:
        raise _fail(str(exc)) from exc
    except OperationalError as exc:
        raise _fail(f"PostgreSQL failed: {first_line(exc)}") from exc
    finally:
        engine.dispose()


class _NoProgress:
    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int) -> None:
        return None


def _progress(total: int, label: str):
    # On stderr, so stdout carries only the report (and stays parseable); and only for a
    # person watching, not in logs of scripts and CI.
    if not sys.stderr.isatty():
        return _NoProgress()
    return typer.progressbar(length=max(total, 1), label=label, file=sys.stderr, show_pos=True)


def history(
    run_id: Annotated[UUID, typer.Argument(help="Task-run or flow-run id.")],
    as_json: bool = typer.Option(False, "--json", help="One JSON array instead of a table."),
) -> None:
    """A run's recorded events in order: seq, time, from -> to, status, reason, transition, source."""
    from runstate.audit.history import format_table, load_history

    settings = _settings()
    with _database(settings.database_url) as engine:
        entries = load_history(engine, run_id)
    if not entries:
        raise _fail(f"no events recorded for run {run_id}")
    typer.echo(json.dumps([e.as_json() for e in entries], indent=2) if as_json else format_table(entries))


def replay(
    verify: bool = typer.Option(False, "--verify", help="Re-decide every recorded command and compare."),
    run: Annotated[UUID | None, typer.Option("--run", help="Only this task run.")] = None,
    all_runs: bool = typer.Option(False, "--all", help="Every task run (the default)."),
    batch_size: int = typer.Option(1000, min=1, help="Events read per query."),
) -> None:
    """Decide every recorded command again through the current rules; exit 1 if any decision differs."""
    from runstate.audit.replay import count_to_verify, verify_log

    if not verify:
        raise _fail("replay only verifies for now: pass --verify", 2)
    if run is not None and all_runs:
        raise _fail("pass either --run RUN_ID or --all, not both", 2)
    settings = _settings()
    with _database(settings.database_url) as engine:
        total = count_to_verify(engine, run)
        if run is not None and total == 0:
            raise _fail(f"no task-run events recorded for run {run}")
        with _progress(total, "replaying") as bar:
            report = verify_log(
                engine, run, batch_size=batch_size, on_batch=bar.update,
                on_mismatch=lambda m: typer.echo(f"DIFFERS {m}"),
            )
    if report.ok:
        typer.echo(f"verified {report.events} decisions: every one is reproduced by the current rules")
        return
    typer.echo(f"{len(report.mismatches)} of {report.events} decisions differ")
    raise typer.Exit(1)


def rebuild(batch_size: int = typer.Option(50_000, min=1, help="Events folded per statement.")) -> None:
    """Rebuild task_runs, flow_runs, task_cache, tag_leases and active slots from the log.

    Builds into temporary tables and swaps them in with one transaction at the end:
    interrupting it leaves the projections as they were; run it again to start over."""
    from runstate.audit.db import count_events
    from runstate.audit.rebuild import rebuild as rebuild_projections

    settings = _settings()
    with _database(settings.database_url) as engine:
        total = count_events(engine)
        with _progress(total, "rebuilding") as bar:
            report = rebuild_projections(engine, batch_size=batch_size, on_batch=bar.update)
    typer.echo(
        f"rebuilt from {report.events} events in {report.seconds:.2f} s ({report.events_per_second:,.0f} events/s):"
        f" {report.task_runs} task runs, {report.flow_runs} flow runs"
        + (f"; {report.caught_up} appended during the rebuild were included" if report.caught_up else "")
    )
    if report.unreadable:
        typer.echo(
            f"warning: {report.unreadable} events record no run to project and were skipped"
            " (`runstate replay --verify` names them)",
            err=True,
        )


def backfill(
    since: str = typer.Option(..., "--since", help="ISO 8601 time; events recorded at or after it (UTC if no offset)."),
    run: Annotated[UUID | None, typer.Option("--run", help="Only this task run.")] = None,
    topic: str | None = typer.Option(None, "--topic", help="Publish here instead of the state-change topic."),
    batch_size: int = typer.Option(1000, min=1, help="Events read per query."),
) -> None:
    """Republish recorded state changes (original seq numbers) in (run, seq) order."""
    from runstate.audit.backfill import backfill as publish
    from runstate.audit.backfill import count_to_backfill, parse_since, start_producer

    # Kafka failures are reported here in one line; aiokafka's own error records would
    # otherwise reach stderr through logging's last-resort handler.
    logging.getLogger("aiokafka").addHandler(logging.NullHandler())

    try:
        since_at = parse_since(since)
    except ValueError as exc:
        raise _fail(str(exc), 2) from exc
    settings = _settings()
    target = topic or settings.state_change_topic

    async def run_backfill(engine: Engine) -> int:
        # Both servers are proved reachable before anything is counted or drawn.
        producer = await start_producer(settings.kafka_bootstrap_servers)
        try:
            total = count_to_backfill(engine, since_at, run)
            with _progress(total, "publishing") as bar:
                return await publish(engine, producer, target, since_at, run, batch_size=batch_size,
                                     on_batch=bar.update)
        finally:
            await producer.stop()

    with _database(settings.database_url) as engine:
        published = asyncio.run(run_backfill(engine))
    typer.echo(f"published {published} state changes to {target}")


@limit_app.command("set")
def limit_set(
    tag: str,
    limit: int = typer.Argument(..., min=0),
    inactive: bool = typer.Option(False, "--inactive", help="Keep the limit but do not enforce it."),
) -> None:
    """Create or change the limit of TAG: active unless --inactive; its active slots are kept."""
    from runstate.audit.limits import set_limit

    with _database(_settings().database_url) as engine:
        row = set_limit(engine, tag, limit, active=not inactive)
    typer.echo(row.line())


@limit_app.command("get")
def limit_get(tag: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Show the limit of TAG (exit 1 when there is none)."""
    from runstate.audit.limits import get_limit

    with _database(_settings().database_url) as engine:
        row = get_limit(engine, tag)
    if row is None:
        raise _fail(f"no concurrency limit for tag {tag!r}")
    typer.echo(json.dumps(row.as_json()) if as_json else row.line())


@limit_app.command("delete")
def limit_delete(tag: str) -> None:
    """Remove the limit of TAG (exit 1 when there is none)."""
    from runstate.audit.limits import delete_limit

    with _database(_settings().database_url) as engine:
        deleted = delete_limit(engine, tag)
    if not deleted:
        raise _fail(f"no concurrency limit for tag {tag!r}")
    typer.echo(f"deleted the concurrency limit for tag {tag!r}")


@limit_app.command("list")
def limit_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """Every tag limit, by tag."""
    from runstate.audit.limits import list_limits

    with _database(_settings().database_url) as engine:
        rows = list_limits(engine)
    if as_json:
        typer.echo(json.dumps([r.as_json() for r in rows], indent=2))
    else:
        for row in rows:
            typer.echo(row.line())


def register(app: typer.Typer) -> None:
    app.command("history")(history)
    app.command("replay")(replay)
    app.command("rebuild")(rebuild)
    app.command("backfill")(backfill)
    app.add_typer(limit_app, name="concurrency-limit")
