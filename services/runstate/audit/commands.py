"""The audit commands of the `runstate` CLI: history, replay, rebuild and backfill.
`register(app)` adds them to the main Typer app (runstate.cli).

Every command reads its settings through runstate.cli_support and turns an unreachable
server into one line on stderr and exit code 1 (a missing setting or a bad argument is
exit code 2); with --json its result is one JSON document on stdout.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated
from uuid import UUID

import typer
from sqlalchemy import Engine

from runstate.cli_support import EXIT_FAILED, EXIT_USAGE, JsonFlag, database, emit_json, fail, load_settings, progress


def _workers(value: int | None) -> int:
    from runstate.audit.parallel import default_workers

    return value or default_workers()


WorkersOption = Annotated[
    int | None,
    typer.Option("--workers", min=1, help="Worker processes, each taking ranges of whole streams"
                 " (default: one per core; a small log is done in one)."),
]




def history(
    run_id: Annotated[UUID, typer.Argument(help="Task-run or flow-run id.")],
    as_json: JsonFlag = False,
) -> None:
    """A run's recorded events in order: seq, time, from -> to, status, reason, transition, source."""
    from runstate.audit.history import format_table, load_history

    settings = load_settings()
    with database(settings.database_url) as engine:
        entries = load_history(engine, run_id)
    if not entries:
        raise fail(f"no events recorded for run {run_id}")
    if as_json:
        emit_json([e.as_json() for e in entries])
    else:
        typer.echo(format_table(entries))


def replay(
    verify: bool = typer.Option(False, "--verify", help="Re-decide every recorded command and compare."),
    run: Annotated[UUID | None, typer.Option("--run", help="Only this task run.")] = None,
    all_runs: bool = typer.Option(False, "--all", help="Every task run (the default)."),
    batch_size: int = typer.Option(1000, min=1, help="Events read per query."),
    workers: WorkersOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Decide every recorded command again through the current rules; exit 1 if any decision differs."""
    from runstate.audit.replay import count_to_verify, verify_log

    if not verify:
        raise fail("replay only verifies for now: pass --verify", EXIT_USAGE)
    if run is not None and all_runs:
        raise fail("pass either --run RUN_ID or --all, not both", EXIT_USAGE)
    settings = load_settings()
    # Without --json each difference is printed as it is found, so a long run shows them early.
    on_mismatch = None if as_json else (lambda m: typer.echo(f"DIFFERS {m}"))
    with database(settings.database_url) as engine:
        total = count_to_verify(engine, run)
        if run is not None and total == 0:
            raise fail(f"no events recorded for run {run}")
        with progress(total, "replaying") as bar:
            report = verify_log(engine, run, batch_size=batch_size, workers=_workers(workers), on_batch=bar.update,
                                on_mismatch=on_mismatch)
    if as_json:
        emit_json({
            "events": report.events,
            "chained": report.chained,
            "ok": report.ok,
            "found": report.found,
            "mismatches": [
                {"run": str(m.stream_id), "seq": m.seq, "differences": list(m.differences)} for m in report.mismatches
            ],
        })
    elif report.ok:
        typer.echo(f"verified {report.events} decisions: every one is reproduced by the current rules;"
                   f" the hash chains of {report.chained} events are unbroken")
    else:
        if report.found > len(report.mismatches):
            typer.echo(f"... and {report.found - len(report.mismatches)} more findings (only the first"
                       f" {len(report.mismatches)} are shown)")
        typer.echo(f"{report.found - report.broken} of {report.events} decisions differ;"
                   f" {report.broken} broken links in the hash chains of {report.chained} events")
    if not report.ok:
        raise typer.Exit(EXIT_FAILED)


def rebuild(
    batch_size: int = typer.Option(50_000, min=1, help="Events folded per statement."),
    workers: WorkersOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Rebuild task_runs, flow_runs, task_cache, tag_leases and active slots from the log.

    Builds into temporary tables and swaps them in with one transaction at the end:
    interrupting it leaves the projections as they were; run it again to start over."""
    from runstate.audit.rebuild import rebuild as rebuild_projections
    from runstate.store.queries import count_events

    settings = load_settings()
    with database(settings.database_url) as engine:
        total = count_events(engine)
        with progress(total, "rebuilding") as bar:
            report = rebuild_projections(engine, batch_size=batch_size, on_batch=bar.update, workers=_workers(workers))
    if as_json:
        emit_json({
            "events": report.events,
            "seconds": round(report.seconds, 3),
            "events_per_second": round(report.events_per_second, 1) if report.seconds > 0 else None,
            "task_runs": report.task_runs,
            "flow_runs": report.flow_runs,
            "caught_up": report.caught_up,
            "unreadable": report.unreadable,
        })
    else:
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
    as_json: JsonFlag = False,
) -> None:
    """Republish recorded state changes (original seq numbers) in (run, seq) order."""
    from runstate.audit.backfill import TopicMissing, count_to_backfill, parse_since, require_topic, start_producer
    from runstate.audit.backfill import backfill as publish

    # Kafka failures are reported here in one line; aiokafka's own error records would
    # otherwise reach stderr through logging's last-resort handler.
    logging.getLogger("aiokafka").addHandler(logging.NullHandler())

    try:
        since_at = parse_since(since)
    except ValueError as exc:
        raise fail(str(exc), EXIT_USAGE) from exc
    settings = load_settings()
    target = topic or settings.state_change_topic

    async def run_backfill(engine: Engine) -> int:
        # Both servers are proved reachable before anything is counted or drawn.
        producer = await start_producer(settings)
        try:
            await require_topic(producer, target)
            total = count_to_backfill(engine, since_at, run)
            with progress(total, "publishing") as bar:
                return await publish(engine, producer, target, since_at, run, batch_size=batch_size,
                                     on_batch=bar.update)
        finally:
            await producer.stop()

    with database(settings.database_url) as engine:
        try:
            published = asyncio.run(run_backfill(engine))
        except TopicMissing as exc:
            raise fail(str(exc), EXIT_USAGE) from exc
    if as_json:
        emit_json({
            "published": published, "topic": target, "since": since_at.isoformat(),
            "run": str(run) if run else None,
        })
    else:
        typer.echo(f"published {published} state changes to {target}")


def register(app: typer.Typer) -> None:
    app.command("history")(history)
    app.command("replay")(replay)
    app.command("rebuild")(rebuild)
    app.command("backfill")(backfill)
