"""`runstate` command line (Typer)."""

from __future__ import annotations

import asyncio
import logging
import sys

import typer
import uvloop

from runstate.config import MissingSetting, Settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="runstate: task-run state orchestration.")
db_app = typer.Typer(no_args_is_help=True, help="Database schema.")
app.add_typer(db_app, name="db")


def load_settings() -> Settings:
    try:
        return Settings.load()
    except MissingSetting as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply the migrations (as the owner role in RUNSTATE_ADMIN_DATABASE_URL)."""
    from sqlalchemy.exc import OperationalError

    from runstate.store.migrate import upgrade

    settings = load_settings()
    try:
        upgrade(settings.admin_database_url, settings.database_url, revision)
    except OperationalError as exc:
        typer.echo(f"error: PostgreSQL is unreachable: {exc.orig}".splitlines()[0], err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"database at revision {revision}")


@app.command()
def serve(log_level: str = typer.Option("INFO", help="Python log level.")) -> None:
    """Run the consumer service (decides commands until SIGTERM/SIGINT)."""
    from runstate.pipeline.app import build_app

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = load_settings()
    # uvloop: the consumer's per-batch cost is mostly event-loop work (socket
    # waits for PostgreSQL and Kafka), which libuv does in C.
    uvloop.run(build_app(settings).run())


@app.command("asyncapi")
def asyncapi(out: str = typer.Option("-", help="File to write, or - for stdout.")) -> None:
    """Write the AsyncAPI document of the service's topics."""
    from runstate.schemas import asyncapi_document

    text = asyncapi_document()
    if out == "-":
        sys.stdout.write(text)
    else:
        with open(out, "w") as fh:
            fh.write(text)


@app.command()
def gateway(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(4200, help="Port to listen on (Prefect's default)."),
    timeout: float = typer.Option(10.0, help="Seconds to wait for a decision before answering 503."),
    log_level: str = typer.Option("INFO", help="Python log level."),
) -> None:
    """Run the Prefect-compatible HTTP gateway (API under /api; needs `runstate serve`)."""
    import uvicorn

    from runstate.gateway import create_app

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = load_settings()
    uvicorn.run(create_app(settings, result_timeout=timeout), host=host, port=port, log_level=log_level.lower())


# Audit commands: history, replay, rebuild, backfill, concurrency-limit (runstate.audit).
from runstate.audit.commands import register as _register_audit_commands

_register_audit_commands(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
