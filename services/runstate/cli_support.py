"""What every `runstate` command shares: settings, errors and exit codes, `--json` output,
progress bars and log formats. runstate.cli and runstate.audit.commands import it; it
imports neither, so the command modules form no circle."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import typer

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from runstate.database_urls import DatabaseURL
from runstate.config import MissingSetting, Settings

# Exit codes of every command (README: "Exit codes").
EXIT_OK = 0
EXIT_FAILED = 1  # the command ran and the answer is no: a server unreachable, nothing found, decisions differ
EXIT_USAGE = 2  # the command could not start: a bad option or argument, a missing setting

JsonFlag = Annotated[bool, typer.Option("--json", help="Write the result to stdout as JSON.")]


def load_settings() -> Settings:
    try:
        return Settings.load()
    except MissingSetting as exc:
        raise fail(str(exc), EXIT_USAGE) from exc


def fail(message: str, code: int = EXIT_FAILED) -> typer.Exit:
    """One `error: ...` line on stderr; raise what it returns."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def emit_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, default=str))


# -- progress ------------------------------------------------------------------------------


class Progress(Protocol):
    def update(self, n: int) -> None: ...


class _NoProgress:
    def update(self, n: int) -> None:
        return None


class _RichProgress:
    def __init__(self, progress: Any, task: Any, unit: str) -> None:
        self._progress, self._task, self._unit = progress, task, unit

    def update(self, n: int) -> None:
        self._progress.advance(self._task, n)
        speed = next(t.speed for t in self._progress.tasks if t.id == self._task)  # None at first
        if speed:
            self._progress.update(self._task, rate=f"{speed:,.0f} {self._unit}/s")


@contextmanager
def progress(total: int, label: str, unit: str = "events") -> Iterator[Progress]:
    """A progress bar on stderr, with the rate and the time left, while a person watches a
    terminal; nothing otherwise, so logs of scripts and CI hold no bar and stdout carries
    only the report."""
    if not sys.stderr.isatty():
        yield _NoProgress()
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
    from rich.progress import Progress as RichProgress

    rate = TextColumn("{task.fields[rate]}")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), rate, TimeRemainingColumn())
    with RichProgress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=max(total, 1), rate="")
        yield _RichProgress(bar, task, unit)


# -- logs ----------------------------------------------------------------------------------

# color_message: uvicorn's copy of the message with terminal colours.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "color_message"}


class JsonLogFormatter(logging.Formatter):
    """One JSON object a line: time (UTC), level, logger, message, exception, and any
    extra attributes a library put on the record (FastStream's topic and group_id)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and key not in entry and value not in ("", None):
                entry[key] = value
        return json.dumps(entry, default=str)


# FastStream gives these loggers handlers of its own and stops them propagating to the root.
_FASTSTREAM_LOGGERS = ("faststream", "faststream.access.kafka")


def configure_logging(level: str, as_json: bool) -> None:
    """Logs as text on stderr, or (`--json`) as JSON lines on stdout."""
    from runstate.obs.logs import ConsoleLogFormatter

    level = level.upper()
    if not as_json:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
        for handler in logging.getLogger().handlers:
            handler.setFormatter(ConsoleLogFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonLogFormatter())
    handler.setLevel(level)
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.captureWarnings(True)
    # FastStream adds its own (coloured) handler only to a logger that has no stdout handler.
    for name in _FASTSTREAM_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]


@contextmanager
def database(url: DatabaseURL) -> Iterator[Engine]:
    """An engine for a command; unreachable or lost servers end it with one line."""
    from sqlalchemy.exc import OperationalError

    from runstate.audit.db import ServerUnreachable, first_line, open_engine

    try:
        engine = open_engine(url)
    except ServerUnreachable as exc:
        raise fail(str(exc)) from exc
    try:
        yield engine
    except ServerUnreachable as exc:
        raise fail(str(exc)) from exc
    except OperationalError as exc:
        raise fail(f"PostgreSQL failed: {first_line(exc)}") from exc
    finally:
        engine.dispose()
