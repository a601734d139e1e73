"""`runstate rebuild`: projections recomputed from the log equal those kept live."""

from __future__ import annotations

import json
import re
import uuid

import psycopg
import pytest
from psycopg.types.json import Jsonb

from pipeline.harness import settings_env
from runstate.audit.rebuild import RebuildReport, rebuild
from runstate.events import CREATION_MEMBERS

from .support import cli, copy_events, dsn, projections, scratch_database

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


class Interrupted(Exception):
    pass


def later_payload(payload: dict, run_count: int) -> dict:
    """A copy of a transition's payload whose run shows `run_count`, without effects."""
    later = json.loads(json.dumps(payload))
    later["decision"]["run"]["run_count"] = run_count
    later["decision"]["effects"] = []
    return later


def append_transition(conn: psycopg.Connection, stream: uuid.UUID, seq: int, payload: dict,
                      recorded_at: str = "clock_timestamp()") -> None:
    """What the service's append does, written beside a running rebuild (a new state id: the
    column a compact appended state takes its id from)."""
    conn.execute(
        "INSERT INTO events (stream_id, seq, stream_type, event_type, command_id, state_id, payload, recorded_at)"
        f" VALUES (%s, %s, 'task_run', 'transition_decided', %s, %s, %s, {recorded_at})",
        (stream, seq, uuid.uuid4(), uuid.uuid4(), Jsonb(payload)),
    )


def damage_projections(url: str, driven_log) -> None:
    """What a bug or an operator's mistake might leave: rows missing, stale, miscounted."""
    with psycopg.connect(dsn(url)) as conn:
        conn.execute("DELETE FROM task_runs WHERE id = %s", (driven_log.runs["flaky"],))
        conn.execute("UPDATE task_runs SET last_seq = 1, view = '{}' WHERE id = %s", (driven_log.runs["lifecycle"],))
        conn.execute("DELETE FROM flow_runs")
        conn.execute("DELETE FROM task_cache")
        conn.execute("DELETE FROM tag_leases")
        conn.execute("UPDATE tag_concurrency_limits SET active_slots = 0")
        # The limits themselves are in the log too: a changed one and a deleted one come back as they were.
        conn.execute('UPDATE tag_concurrency_limits SET "limit" = 99, active = false WHERE tag = %s', (driven_log.tag,))
        conn.execute('INSERT INTO tag_concurrency_limits (tag, "limit") VALUES (%s, 7)', (driven_log.deleted_tag,))


def test_rebuild_reproduces_the_live_projections(driven_log):
    url = driven_log.settings.database_url
    live = projections(url)
    # The scenario must have produced something of every kind, or equality proves little.
    assert all(live[name] for name in live), {name: len(rows) for name, rows in live.items()}
    assert [(tag, slots) for tag, _, _, slots in live["tag_limits"]] == [(driven_log.tag, 1)]

    damage_projections(url, driven_log)
    assert projections(url) != live

    done = cli(settings_env(driven_log.settings), "rebuild", "--batch-size", "3")
    assert done.returncode == 0, done.stderr
    assert re.search(r"rebuilt from \d+ events in [\d.]+ s \([\d,]+ events/s\): 5 task runs, 1 flow runs", done.stdout), done.stdout
    assert projections(url) == live


def test_an_interrupted_rebuild_leaves_the_projections_alone_and_a_rerun_completes(driven_log):
    url = driven_log.settings.database_url
    live = projections(url)
    damage_projections(url, driven_log)
    damaged = projections(url)

    batches = []

    def interrupt_after_two(count: int) -> None:
        batches.append(count)
        if len(batches) == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        rebuild(url, batch_size=2, on_batch=interrupt_after_two)
    assert projections(url) == damaged

    report = rebuild(url, batch_size=2)
    assert isinstance(report, RebuildReport) and report.seconds > 0
    assert report.events == event_count(url)
    assert projections(url) == live


def event_count(url: str) -> int:
    with psycopg.connect(dsn(url)) as conn:
        return conn.execute("SELECT count(*) FROM events").fetchone()[0]


def test_the_final_pass_folds_events_appended_while_rebuilding(driven_log, admin_database_url, database_url):
    """An event the service appends after the scan passed its stream still makes it in."""
    with scratch_database(admin_database_url, database_url, "audit_rebuild") as (app_url, _):
        copy_events(driven_log.settings.admin_database_url, app_url)
        with psycopg.connect(dsn(app_url)) as conn:
            first_stream, last_seq, payload = conn.execute(
                "SELECT stream_id, seq, payload FROM events WHERE stream_type = 'task_run'"
                " ORDER BY stream_id, seq DESC LIMIT 1"
            ).fetchone()
            # The scan is past the stream once it folded all events up to the stream's last
            # and at least one more (a batch ending exactly on it would still see the append).
            passed_at = conn.execute("SELECT count(*) FROM events WHERE stream_id <= %s", (first_stream,)).fetchone()[0]
        late_payload = later_payload(payload, 99)

        folded = []

        def append_once(count: int) -> None:
            folded.append(count)
            if sum(folded) <= passed_at or sum(folded) - count > passed_at:
                return  # before the scan passed the stream, or already appended
            with psycopg.connect(dsn(app_url)) as conn:
                append_transition(conn, first_stream, last_seq + 1, late_payload)

        report = rebuild(app_url, batch_size=2, on_batch=append_once)
        assert report.caught_up == 1
        assert report.events == event_count(app_url)
        with psycopg.connect(dsn(app_url)) as conn:
            seq, view = conn.execute("SELECT last_seq, view FROM task_runs WHERE id = %s", (first_stream,)).fetchone()
        assert (seq, view["run_count"]) == (last_seq + 1, 99)


def test_the_final_pass_folds_an_append_whatever_its_recorded_time(driven_log, admin_database_url, database_url):
    """The final pass compares each stream with the newest seq the scan saw, not with a clock:
    an append committed late but stamped long before the rebuild began still makes it in."""
    with scratch_database(admin_database_url, database_url, "audit_rebuild_old") as (app_url, _):
        copy_events(driven_log.settings.admin_database_url, app_url)
        with psycopg.connect(dsn(app_url)) as conn:
            stream, last_seq, payload = conn.execute(
                "SELECT stream_id, seq, payload FROM events WHERE stream_type = 'task_run'"
                " ORDER BY stream_id, seq DESC LIMIT 1"
            ).fetchone()
        late_payload = later_payload(payload, 77)
        appended = []

        def append_once(count: int) -> None:
            if appended:
                return
            appended.append(count)
            with psycopg.connect(dsn(app_url)) as conn:
                append_transition(conn, stream, last_seq + 1, late_payload, recorded_at="now() - interval '1 day'")

        # One batch holds the whole log, so the append comes after the scan passed every stream.
        report = rebuild(app_url, batch_size=100_000, on_batch=append_once)
        assert report.caught_up == 1
        with psycopg.connect(dsn(app_url)) as conn:
            seq, view = conn.execute("SELECT last_seq, view FROM task_runs WHERE id = %s", (stream,)).fetchone()
        assert (seq, view["run_count"]) == (last_seq + 1, 77)


def test_worker_processes_catch_up_appends_to_old_and_new_streams(driven_log, admin_database_url, database_url):
    """With worker processes the heads are composed in the workers; an append made after every
    range was folded (to a stream they composed, and a new stream) is folded by the final pass,
    whose heads replace theirs, each with the members fixed at its creation."""
    with scratch_database(admin_database_url, database_url, "audit_rebuild_workers") as (app_url, _):
        copy_events(driven_log.settings.admin_database_url, app_url)
        before = rebuild(app_url, batch_size=2)
        with psycopg.connect(dsn(app_url)) as conn:
            # A run whose creation fixed members the later events leave out (its tags).
            stream, last_seq, payload = conn.execute(
                "SELECT stream_id, seq, payload FROM events WHERE stream_id ="
                " (SELECT id FROM task_runs WHERE view::jsonb ? 'tags' ORDER BY id DESC LIMIT 1)"
                " ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            creation = conn.execute(
                "SELECT payload FROM events WHERE stream_id = %s AND event_type = 'task_run_created'", (stream,)
            ).fetchone()[0]
            old_view = conn.execute("SELECT view FROM task_runs WHERE id = %s", (stream,)).fetchone()[0]
            total = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        late_payload = later_payload(payload, 55)
        new_stream = uuid.uuid4()
        new_payload = json.loads(json.dumps(creation).replace(str(stream), str(new_stream)))
        new_payload["decision"]["effects"] = []
        folded = []

        def append_when_all_folded(count: int) -> None:
            folded.append(count)
            if sum(folded) != total or sum(folded) - count == total:
                return
            with psycopg.connect(dsn(app_url)) as conn:
                append_transition(conn, stream, last_seq + 1, late_payload)
                conn.execute(
                    "INSERT INTO events (stream_id, seq, stream_type, event_type, command_id, state_id, payload)"
                    " VALUES (%s, 1, 'task_run', 'task_run_created', %s, %s, %s)",
                    (new_stream, uuid.uuid4(), uuid.uuid4(), Jsonb(new_payload)),
                )

        report = rebuild(app_url, batch_size=2, workers=2, min_range_events=1, on_batch=append_when_all_folded)
        assert report.caught_up == 2
        assert report.events == total + 2 == event_count(app_url)
        assert report.task_runs == before.task_runs + 1
        with psycopg.connect(dsn(app_url)) as conn:
            seq, view = conn.execute("SELECT last_seq, view FROM task_runs WHERE id = %s", (stream,)).fetchone()
            new_seq, new_view = conn.execute("SELECT last_seq, view FROM task_runs WHERE id = %s",
                                             (new_stream,)).fetchone()
        assert (seq, view["run_count"]) == (last_seq + 1, 55)
        # The creation's members (tags, ...) survive the head the final pass wrote.
        fixed = [k for k in CREATION_MEMBERS if k in old_view]
        assert "tags" in fixed
        assert {k: view.get(k) for k in fixed} == {k: old_view[k] for k in fixed}
        assert (new_seq, new_view["id"]) == (1, str(new_stream))
        assert {k: new_view.get(k) for k in fixed} == {k: old_view[k] for k in fixed}


def test_rebuild_accepts_an_async_engine_and_a_sync_engine(driven_log):
    from sqlalchemy import create_engine
    from sqlalchemy.ext.asyncio import create_async_engine

    url = driven_log.settings.database_url.get_secret_value()
    live = projections(url)
    for engine in (create_engine(url), create_async_engine(url)):
        report = rebuild(engine, batch_size=1000)
        assert report.events == event_count(url)
        assert projections(url) == live
        engine.sync_engine.dispose() if hasattr(engine, "sync_engine") else engine.dispose()


def test_an_event_recording_no_run_is_skipped_and_counted(driven_log, admin_database_url, database_url):
    with scratch_database(admin_database_url, database_url, "audit_damaged") as (app_url, _):
        copied = copy_events(driven_log.settings.admin_database_url, app_url)
        damaged = uuid.uuid4()
        with psycopg.connect(dsn(app_url)) as conn:
            conn.execute(
                "INSERT INTO events (stream_id, seq, stream_type, event_type, command_id, payload)"
                " VALUES (%s, 1, 'task_run', 'transition_decided', %s, '{}')",
                (damaged, uuid.uuid4()),
            )
        report = rebuild(app_url, batch_size=5)
        assert (report.events, report.unreadable, report.task_runs) == (copied + 1, 1, 5)
        with psycopg.connect(dsn(app_url)) as conn:
            assert conn.execute("SELECT count(*) FROM task_runs WHERE id = %s", (damaged,)).fetchone()[0] == 0


def test_a_rebuild_by_worker_processes_reproduces_the_live_projections(driven_log):
    """More than one worker: the log is cut into ranges of whole streams, each folded in a
    session of its own and handed to the rebuilding session."""
    from runstate.audit.db import open_engine
    from runstate.audit.parallel import plan_ranges

    url = driven_log.settings.database_url
    engine = open_engine(url)
    try:
        with engine.connect() as conn:
            assert len(plan_ranges(conn, 2, min_events=1)) > 2  # the log really is split
    finally:
        engine.dispose()
    live = projections(url)
    damage_projections(url, driven_log)
    progressed = []
    report = rebuild(url, batch_size=2, workers=2, min_range_events=1, on_batch=progressed.append)
    assert report.events == event_count(url) == sum(progressed)
    assert (report.task_runs, report.flow_runs, report.unreadable) == (5, 1, 0)
    assert projections(url) == live


def test_every_batch_size_reproduces_the_live_projections(driven_log):
    """A batch ends at the end of a stream and inserts its heads plainly; a stream longer than a
    batch is cut, and the batch that continues it upserts. Every size gives the same rows."""
    url = driven_log.settings.database_url
    live = projections(url)
    with psycopg.connect(dsn(url)) as conn:
        longest = conn.execute("SELECT max(n) FROM (SELECT count(*) AS n FROM events GROUP BY stream_id) s").fetchone()[0]
    assert longest > 4  # so that the smaller sizes cut streams, and the larger ones extend batches to a stream's end
    for size in (1, 2, 3, 4, 7, 1000):
        damage_projections(url, driven_log)
        report = rebuild(url, batch_size=size)
        assert report.events == event_count(url), size
        assert projections(url) == live, size
