"""`runstate` command line (Typer): the service, the gateway, the database schema, and the
audit commands (runstate.audit.commands). Sub-command groups are Typer apps added in
`_register` at the end; shared helpers (settings, errors, --json, progress) are in
runstate.cli_support."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from runstate import __version__
from runstate import limits as limit_commands
from runstate.audit import commands as audit_commands
from runstate.cli_support import (
    EXIT_FAILED,
    EXIT_USAGE,
    JsonFlag,
    configure_logging,
    emit_json,
    fail,
    load_settings,
)
from runstate.config_cli import config_app

app = typer.Typer(no_args_is_help=True, add_completion=False, help="runstate: task-run state orchestration.")
db_app = typer.Typer(no_args_is_help=True, help="Database schema (Alembic migrations).")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"runstate {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """runstate: task-run state orchestration with Prefect 3 semantics over Kafka and PostgreSQL."""


# -- service and gateway --------------------------------------------------------------------

LogLevel = Annotated[str, typer.Option(help="Python log level.")]


@app.command()
def serve(
    log_level: LogLevel = "INFO",
    as_json: JsonFlag = False,
    metrics_port: int | None = typer.Option(
        None, help="Port of /metrics, /health and /ready (default: RUNSTATE_METRICS_PORT, else 9464; 0: none)."),
) -> None:
    """Run the consumer service (decides commands until SIGTERM/SIGINT). --json: logs as JSON lines on stdout."""
    import uvloop
    from faststream.asgi import AsgiFastStream

    from runstate.pipeline.app import build_app

    configure_logging(log_level, as_json)
    settings = load_settings()
    if metrics_port is not None:
        settings = settings.replace(metrics_port=metrics_port)
    service = build_app(settings)
    # uvloop: the consumer's per-batch cost is mostly event-loop work (socket
    # waits for PostgreSQL and Kafka), which libuv does in C.
    if isinstance(service, AsgiFastStream):
        # uvicorn serves the probes and runs the consumer in its lifespan; the
        # logging configured above stays (no uvicorn log config, no access log).
        options: dict[str, Any] = {"host": settings.metrics_host, "port": settings.metrics_port, "log_config": None,
                   "access_log": "false", "timeout_graceful_shutdown": settings.shutdown_timeout_s}
        uvloop.run(service.run(log_level=getattr(logging, log_level.upper()), run_extra_options=options))
    else:
        uvloop.run(service.run())


@app.command()
def gateway(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(4200, help="Port to listen on (Prefect's default)."),
    timeout: float = typer.Option(10.0, help="Seconds to wait for a decision before answering 503."),
    log_level: LogLevel = "INFO",
    as_json: JsonFlag = False,
) -> None:
    """Run the Prefect-compatible HTTP gateway (API under /api; needs `runstate serve`). --json: logs as JSON lines on stdout."""
    import uvicorn

    from runstate.gateway import create_app

    configure_logging(log_level, as_json)
    settings = load_settings()
    # With --json uvicorn's loggers keep no handlers of their own and reach the root's JSON one.
    log_config: dict[str, Any] | None = None if as_json else uvicorn.config.LOGGING_CONFIG
    uvicorn.run(
        create_app(settings, result_timeout=timeout), host=host, port=port, log_level=log_level.lower(),
        log_config=log_config, timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )


@app.command()
def top(
    url: list[str] = typer.Option(None, "--url", help="A consumer's address (repeatable; default RUNSTATE_CONSUMER_URL)."),
    interval: float = typer.Option(1.0, help="Seconds between refreshes."),
    once: bool = typer.Option(False, "--once", help="Print one view (rates over --interval) and exit."),
    as_json: JsonFlag = False,
) -> None:
    """Live view of the consumers: decisions per second by status, p50/p99 latency, lag per partition,
    dead letters and outages, read from their /metrics. --json: one view as JSON (implies --once)."""
    import os
    import time as clock

    from rich.console import Console
    from rich.live import Live

    from runstate import top as view_of
    from runstate.envfile import find_env_file, read_env_file

    urls = url or [u for u in [os.environ.get("RUNSTATE_CONSUMER_URL")
                               or read_env_file(find_env_file()).get("RUNSTATE_CONSUMER_URL")] if u]
    if not urls:
        raise fail("no consumer address: pass --url or set RUNSTATE_CONSUMER_URL (make up writes it)", EXIT_USAGE)

    def scrape_all() -> tuple[dict, float]:
        try:
            return view_of.merge([view_of.scrape(u) for u in urls]), clock.monotonic()
        except OSError as exc:
            raise fail(f"cannot read metrics: {exc}") from exc

    before, then = scrape_all()
    if once or as_json:
        clock.sleep(interval)
        now, at = scrape_all()
        current = view_of.view(now, before, at - then)
        if as_json:
            emit_json(current.as_json())
        else:
            Console().print(view_of.render(current, urls))
        return
    with Live(view_of.render(view_of.view(before, None, 1.0), urls), refresh_per_second=4, screen=False) as live:
        try:
            while True:
                clock.sleep(interval)
                now, at = scrape_all()
                live.update(view_of.render(view_of.view(now, before, at - then), urls))
                before, then = now, at
        except KeyboardInterrupt:
            return


@app.command("asyncapi")
def asyncapi(out: str = typer.Option("-", help="File to write, or - for stdout."), as_json: JsonFlag = False) -> None:
    """Write the AsyncAPI document of the service's topics (JSON). With --out and --json, report the file written."""
    from runstate.schemas import asyncapi_document

    text = asyncapi_document()
    if out == "-":
        sys.stdout.write(text)
        return
    Path(out).write_text(text)
    if as_json:
        emit_json({"path": out, "bytes": len(text.encode())})
    else:
        typer.echo(f"wrote {out}")


# -- database -------------------------------------------------------------------------------


def _admin_urls() -> tuple[str, str]:
    from runstate.config import migration_urls

    admin, app = migration_urls(load_settings())
    return admin.get_secret_value(), app.get_secret_value()


def _current_revision(admin_url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine

    engine = create_engine(admin_url, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            heads = MigrationContext.configure(conn).get_current_heads()
    finally:
        engine.dispose()
    return heads[0] if heads else None


def _head_revision() -> str | None:
    return _scripts().get_current_head()


def _scripts():
    from alembic.script import ScriptDirectory

    from runstate.store.migrate import MIGRATIONS

    return ScriptDirectory(str(MIGRATIONS))


def _migrate(action: str, revision: str) -> str | None:
    """Run an Alembic command as the owner role; returns the revision the database is at after it."""
    from alembic import command
    from alembic.util import CommandError
    from sqlalchemy.exc import OperationalError

    from runstate.store.migrate import alembic_config

    admin_url, app_url = _admin_urls()
    try:
        getattr(command, action)(alembic_config(admin_url, app_url), revision)
        return _current_revision(admin_url)
    except OperationalError as exc:
        raise fail(f"PostgreSQL is unreachable: {exc.orig}".splitlines()[0]) from exc
    except CommandError as exc:
        raise fail(str(exc), EXIT_USAGE) from exc


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head", as_json: JsonFlag = False
) -> None:
    """Apply the migrations up to REVISION (as the owner role in RUNSTATE_ADMIN_DATABASE_URL)."""
    now = _migrate("upgrade", revision)
    if as_json:
        emit_json({"revision": now, "head": _head_revision()})
    else:
        typer.echo(f"database at revision {now}")


# ignore_unknown_options: a relative revision such as -1 is an argument, not an option.
@db_app.command("downgrade", context_settings={"ignore_unknown_options": True})
def db_downgrade(
    revision: Annotated[str, typer.Argument(help="Target revision: an id, -1 for one step, or base (drops everything).")],
    yes: bool = typer.Option(False, "--yes", help="Do not ask for confirmation (required without a terminal)."),
    as_json: JsonFlag = False,
) -> None:
    """Revert the migrations down to REVISION. Reverting 0001 drops the event log: every recorded event is lost."""
    if not yes:
        if not sys.stdin.isatty():
            raise fail("db downgrade reverts migrations and may drop data: pass --yes", EXIT_USAGE)
        typer.confirm(f"Downgrade the database to {revision}? Reverted migrations may drop data", abort=True)
    now = _migrate("downgrade", revision)
    if as_json:
        emit_json({"revision": now, "head": _head_revision()})
    else:
        typer.echo(f"database at revision {now}")


@db_app.command("current")
def db_current(
    check: bool = typer.Option(False, "--check", help="Exit 1 unless the database is at the head revision."),
    as_json: JsonFlag = False,
) -> None:
    """The revision the database is at, and the newest this version of runstate has."""
    from sqlalchemy.exc import OperationalError

    admin_url, _ = _admin_urls()
    try:
        current = _current_revision(admin_url)
    except OperationalError as exc:
        raise fail(f"PostgreSQL is unreachable: {exc.orig}".splitlines()[0]) from exc
    head = _head_revision()
    if as_json:
        emit_json({"revision": current, "head": head, "up_to_date": current == head})
    else:
        typer.echo(f"database at revision {current or 'none'} (head {head})")
    if check and current != head:
        raise typer.Exit(EXIT_FAILED)


@db_app.command("history")
def db_history(as_json: JsonFlag = False) -> None:
    """The migrations this version of runstate has, oldest first (reads no database)."""
    revisions = list(reversed(list(_scripts().walk_revisions())))
    if as_json:
        emit_json([
            {"revision": r.revision, "down_revision": r.down_revision, "description": r.doc} for r in revisions
        ])
        return
    for r in revisions:
        typer.echo(f"{r.down_revision or 'base'} -> {r.revision}: {(r.doc or '').splitlines()[0]}")


# -- assembly -------------------------------------------------------------------------------


def _register(root: typer.Typer) -> None:
    root.add_typer(db_app, name="db")
    root.add_typer(config_app, name="config")
    audit_commands.register(root)
    limit_commands.register(root)


_register(app)


def main() -> None:
    app(prog_name="runstate")


if __name__ == "__main__":
    main()
