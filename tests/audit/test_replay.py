"""`runstate replay --verify`: passes on what the pipeline wrote, and names the run and
seq of a decision altered afterwards in a copy of the database."""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest
from psycopg.rows import namedtuple_row

from pipeline.harness import settings_env
from runstate.audit.db import open_engine
from runstate.audit.replay import (
    RecordedEvent,
    StreamVerifier,
    compare,
    recorded_event,
    redecide,
    verify_log,
)
from runstate.domain import TaskRunView
from runstate.events import inherit_run

from .support import cli, copy_events, dsn, scratch_database

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


def task_run_event_count(url: str) -> int:
    with psycopg.connect(dsn(url)) as conn:
        return conn.execute("SELECT count(*) FROM events WHERE stream_type = 'task_run'").fetchone()[0]


def test_replay_verifies_every_decision_of_the_pipeline_log(driven_log):
    engine = open_engine(driven_log.settings.database_url)
    try:
        # A batch size of 4 makes streams straddle batches, so the carried-over run is used.
        report = verify_log(engine, batch_size=4)
    finally:
        engine.dispose()
    assert report.mismatches == []
    assert report.events == task_run_event_count(driven_log.settings.database_url) >= 16

    done = cli(settings_env(driven_log.settings), "replay", "--verify", "--all")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().startswith(f"verified {report.events} decisions")


def test_replay_names_the_run_and_seq_of_an_altered_decision(driven_log, admin_database_url, database_url):
    run = driven_log.runs["flaky"]
    with scratch_database(admin_database_url, database_url, "audit_copy") as (copy_app, copy_admin):
        assert copy_events(driven_log.settings.admin_database_url, copy_app, "stream_id = %s", (run,)) == 5

        # The service's role can neither rewrite the log nor switch its guard off.
        with psycopg.connect(dsn(copy_app), autocommit=True) as app:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                app.execute("UPDATE events SET status = 'ACCEPT' WHERE stream_id = %s AND seq = 3", (run,))
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                app.execute("ALTER TABLE events DISABLE TRIGGER USER")

        # The superuser makes this copy writable for a moment: seq 3 was the retry's REJECT.
        with psycopg.connect(dsn(copy_admin), autocommit=True) as owner:
            owner.execute("ALTER TABLE events DISABLE TRIGGER USER")
            # A task-run event records its decision's status once, in its status column.
            altered = owner.execute(
                "UPDATE events SET status = 'ACCEPT' WHERE stream_id = %s AND seq = 3", (run,),
            ).rowcount
            owner.execute("ALTER TABLE events ENABLE TRIGGER USER")
            assert altered == 1
            with pytest.raises(psycopg.errors.InsufficientPrivilege):  # the guard is back
                owner.execute("UPDATE events SET status = 'ACCEPT' WHERE stream_id = %s", (run,))

        env = settings_env(driven_log.settings.replace(database_url=copy_app))
        for scope in (["--run", str(run)], ["--all"]):
            done = cli(env, "replay", "--verify", *scope)
            assert done.returncode == 1, done.stdout + done.stderr
            differing = [line for line in done.stdout.splitlines() if line.startswith("DIFFERS")]
            assert differing == [f'DIFFERS run {run} seq 3: result.status: "ACCEPT" != "REJECT"'], done.stdout
            assert "1 of 5 decisions differ" in done.stdout

    # The original is untouched and still verifies.
    assert cli(settings_env(driven_log.settings), "replay", "--verify", "--run", str(run)).returncode == 0


def test_verifier_reports_gaps_and_unreadable_events_without_stopping(driven_log):
    """The pure fold: a missing seq and an event without a decision are findings, and the
    events after them are still checked."""
    run = driven_log.runs["lifecycle"]
    with psycopg.connect(dsn(driven_log.settings.database_url), row_factory=namedtuple_row) as conn:
        rows = conn.execute(
            "SELECT stream_id, seq, event_type, command_id, transition_id, status, state_id, payload::text AS payload"
            " FROM events WHERE stream_id = %s ORDER BY seq",
            (run,),
        ).fetchall()
    events = [recorded_event(row) for row in rows]
    assert len(events) == 4

    verifier = StreamVerifier()
    assert [verifier.check(e) for e in events] == [None] * 4

    verifier = StreamVerifier()
    findings = [verifier.check(e) for e in (events[0], events[2], events[3])]
    assert findings[0] is None
    assert findings[1].seq == 3 and "gap" in findings[1].differences[0]
    assert findings[2] is None  # seq 4 is still re-decided against seq 3's recorded run

    broken = RecordedEvent(run, 2, "transition_decided", events[1].command, events[1].context, None)
    verifier = StreamVerifier()
    assert verifier.check(events[0]) is None
    assert "no command, context or decision" in verifier.check(broken).differences[0]

    changed = json.loads(json.dumps(events[1].decision))
    changed["run"]["run_count"] += 7
    verifier = StreamVerifier()
    verifier.check(events[0])
    mismatch = verifier.check(RecordedEvent(run, 2, events[1].event_type, events[1].command, events[1].context, changed))
    assert mismatch.differences == (f"run.run_count: {changed['run']['run_count']} != {changed['run']['run_count'] - 7}",)
    # A decision that differs is not carried on: the next event is re-decided against the run
    # as recorded (altered), not as recomputed, so it differs too.
    after = verifier.check(events[2])
    assert after is not None and any(d.startswith("run.run_count") for d in after.differences), after


def test_every_pipeline_decision_is_reproduced_and_its_recomputed_run_stands_in_for_the_recorded_one(driven_log):
    """What the verifier's shortcut rests on: once a decision is reproduced, the recomputed run
    equals the recorded run validated, so the next event may be re-decided against the model
    it already has instead of validating the recorded JSON again."""
    with psycopg.connect(dsn(driven_log.settings.database_url), row_factory=namedtuple_row) as conn:
        rows = conn.execute(
            "SELECT stream_id, seq, event_type, command_id, transition_id, status, state_id, payload::text AS payload"
            " FROM events WHERE stream_type = 'task_run' ORDER BY stream_id, seq").fetchall()
    assert len(rows) >= 16
    previous: dict = {}
    for row in rows:
        event = recorded_event(row)
        # A lean transition's run takes the members fixed at creation from the run before it.
        decision = inherit_run(event.decision, previous.get(row.stream_id))
        recomputed = redecide(event, previous.get(row.stream_id))
        assert compare(decision, recomputed) == [], (row.stream_id, row.seq)
        assert TaskRunView.model_validate(decision["run"]) == recomputed.run, (row.stream_id, row.seq)
        previous[row.stream_id] = decision["run"]


CHAINED_COLUMNS = (
    "stream_id, seq, stream_type, event_type, command_id, transition_id, status, state_type, state_name, state_id,"
    " source_topic, source_partition, source_offset, source_digest, hash, recorded_at"
)


def test_a_rewrite_by_the_owner_that_keeps_the_decisions_is_caught_by_the_hash_chain(
        driven_log, admin_database_url, database_url):
    """The owner can switch the append-only triggers off; re-deciding cannot see a
    change to what a decision does not read (here: which record it came from and a
    state's message), but the hash chain names the first rewritten event."""
    run = driven_log.runs["flaky"]
    with scratch_database(admin_database_url, database_url, "audit_chain") as (copy_app, copy_admin):
        with psycopg.connect(dsn(driven_log.settings.admin_database_url)) as src, \
                psycopg.connect(dsn(copy_admin), autocommit=True) as dst:
            rows = src.execute(f"SELECT {CHAINED_COLUMNS}, payload::text FROM events WHERE stream_id = %s"
                               " ORDER BY seq", (run,)).fetchall()
            assert len(rows) == 5 and all(r[14] is not None for r in rows)
            marks = ", ".join(["%s"] * 16)
            dst.cursor().executemany(
                f"INSERT INTO events ({CHAINED_COLUMNS}, payload) VALUES ({marks}, CAST(%s AS json))", rows)
        env = settings_env(driven_log.settings.replace(database_url=copy_app))
        assert cli(env, "replay", "--verify", "--run", str(run)).returncode == 0  # the verbatim copy verifies

        with psycopg.connect(dsn(copy_admin), autocommit=True) as owner:
            owner.execute("ALTER TABLE events DISABLE TRIGGER USER")
            owner.execute("UPDATE events SET source_offset = source_offset + 1000 WHERE stream_id = %s AND seq = 2",
                          (run,))
            owner.execute("UPDATE events SET payload = replace(payload::text, '\"message\":null',"
                          " '\"message\":\"edited\"')::json WHERE stream_id = %s AND seq = 4", (run,))
            owner.execute("ALTER TABLE events ENABLE TRIGGER USER")
        done = cli(env, "replay", "--verify", "--run", str(run))
        assert done.returncode == 1, done.stdout + done.stderr
        findings = [line for line in done.stdout.splitlines() if line.startswith("DIFFERS")]
        assert [f.split(":")[0] for f in findings if "hash chain broken" in f] == [
            f"DIFFERS run {run} seq 2", f"DIFFERS run {run} seq 4"]


def copy_chained(source_admin_url: str, target_admin_url: str) -> int:
    """Every event verbatim, hash included (copy_events leaves the hash out)."""
    with psycopg.connect(dsn(source_admin_url)) as src, psycopg.connect(dsn(target_admin_url), autocommit=True) as dst:
        rows = src.execute(f"SELECT {CHAINED_COLUMNS}, payload::text FROM events ORDER BY stream_id, seq").fetchall()
        marks = ", ".join(["%s"] * 16)
        dst.cursor().executemany(
            f"INSERT INTO events ({CHAINED_COLUMNS}, payload) VALUES ({marks}, CAST(%s AS json))", rows)
    return len(rows)


def test_the_report_is_the_same_whatever_the_number_of_workers(driven_log, admin_database_url, database_url):
    """Findings in several streams (altered decisions and a broken hash link) come out in
    (run, seq) order, identical with one process and with workers taking ranges of streams."""
    from runstate.audit.parallel import plan_ranges

    runs = driven_log.runs
    with scratch_database(admin_database_url, database_url, "audit_workers") as (copy_app, copy_admin):
        copied = copy_chained(driven_log.settings.admin_database_url, copy_admin)
        with psycopg.connect(dsn(copy_admin), autocommit=True) as owner:
            owner.execute("ALTER TABLE events DISABLE TRIGGER USER")
            for run, seq in ((runs["flaky"], 3), (runs["lifecycle"], 2), (runs["cached"], 2)):
                owner.execute(
                    "UPDATE events SET payload = jsonb_set(payload::jsonb, '{decision,run,run_count}', '42')::json"
                    " WHERE stream_id = %s AND seq = %s", (run, seq))
            owner.execute("UPDATE events SET source_offset = source_offset + 1000 WHERE stream_id = %s AND seq = 1",
                          (runs["slot_held"],))
            owner.execute("ALTER TABLE events ENABLE TRIGGER USER")

        engine = open_engine(copy_app)
        try:
            with engine.connect() as conn:
                assert len(plan_ranges(conn, 3, min_events=1)) > 3  # the log really is split
            reports, announced = [], []
            for workers in (1, 2, 3):
                seen: list = []
                reports.append(verify_log(engine, batch_size=3, workers=workers, min_range_events=1,
                                          on_mismatch=seen.append))
                announced.append(seen)
            capped_reports, capped_announced = [], []
            for workers in (1, 2):
                seen = []
                capped_reports.append(verify_log(engine, batch_size=3, workers=workers, min_range_events=1,
                                                 on_mismatch=seen.append, keep=2))
                capped_announced.append(seen)
        finally:
            engine.dispose()
    first = reports[0]
    assert (first.events, first.chained) == (task_run_event_count(driven_log.settings.database_url), copied)
    # Each altered run_count differs where it was altered (and the next decision, re-made
    # from the altered run, differs too); the rewritten source breaks one link.
    assert len(first.mismatches) >= 4
    assert [(m.stream_id, m.seq) for m in first.mismatches] == sorted((m.stream_id, m.seq) for m in first.mismatches)
    assert {(runs["slot_held"], 1), (runs["flaky"], 3), (runs["lifecycle"], 2), (runs["cached"], 2)} <= {
        (m.stream_id, m.seq) for m in first.mismatches}
    # Each of the four rewritten events breaks its link too (three payloads, one source).
    assert (first.found, first.broken) == (len(first.mismatches), 4)
    for report, seen in zip(reports, announced, strict=True):
        assert (report.events, report.chained, report.mismatches) == (first.events, first.chained, first.mismatches)
        assert seen == first.mismatches
    # Memory stays flat however many decisions differ: the first findings are kept, all are counted.
    for capped, seen in zip(capped_reports, capped_announced, strict=True):
        assert capped.mismatches == seen == first.mismatches[:2]
        assert (capped.found, capped.broken, capped.ok) == (first.found, first.broken, False)


def test_a_stored_decision_is_reproduced_by_its_text_and_any_change_to_it_is_still_found(driven_log):
    """check_stored's shortcut: the pipeline writes each decision as lean_task_run_tail renders
    the recomputed one, so every event of its log is reproduced by text alone; an event whose
    text or status column says otherwise goes the long way and is reported with its paths."""
    with psycopg.connect(dsn(driven_log.settings.database_url), row_factory=namedtuple_row) as conn:
        rows = conn.execute(
            "SELECT stream_id, seq, event_type, command_id, transition_id, status, state_id, payload::text AS payload"
            " FROM events WHERE stream_type = 'task_run' ORDER BY stream_id, seq").fetchall()
    verifier = StreamVerifier()
    assert [verifier.check_stored(r.stream_id, r.seq, r.event_type, r.transition_id, r.status, r.state_id,
                                  r.payload) for r in rows] == [None] * len(rows)
    assert verifier.by_text == len(rows) >= 16

    run = driven_log.runs["lifecycle"]
    first, second, *_ = [r for r in rows if r.stream_id == run]
    head, decision = second.payload.rsplit(',"decision":', 1)
    assert '"name":"Pending"' in decision

    def check_second(status: str | None, decision_text: str, state_id: object = second.state_id
                     ) -> tuple[object, int]:
        verifier = StreamVerifier()
        assert verifier.check_stored(first.stream_id, 1, first.event_type, first.transition_id, first.status,
                                     first.state_id, first.payload) is None
        found = verifier.check_stored(second.stream_id, 2, second.event_type, second.transition_id, status,
                                      state_id, head + ',"decision":' + decision_text)
        return found, verifier.by_text

    altered, by_text = check_second(second.status, decision.replace('"name":"Pending"', '"name":"Waiting"'))
    assert by_text == 1 and 'appended_state.name: "Waiting" != "Pending"' in altered.differences, altered
    altered, by_text = check_second("REJECT", decision)
    assert by_text == 1 and altered.differences[0] == 'result.status: "REJECT" != "ACCEPT"', altered
    # A compact appended state's id is its event's state_id column, and so is the context's new
    # state id (an input, which the hash chain guards): the text alone reproduces the decision.
    assert '"appended_state":{"type"' in decision
    altered, by_text = check_second(second.status, decision, state_id=uuid.uuid4())
    assert altered is None and by_text == 2
    # The same decision written otherwise (spacing) is not the writer's text, and still reproduced.
    respaced, by_text = check_second(second.status, decision.replace('"name":"Pending"', '"name": "Pending"'))
    assert respaced is None and by_text == 1


def test_an_event_that_cannot_be_re_decided_is_a_finding_named_by_its_error(driven_log):
    """check_stored's shortcut tries to re-decide and falls back to check() on any failure:
    what is reported is the error the current models and rules raise (an invalid context or
    command, an unknown event type), and the next event is still re-decided, against the run
    its predecessor recorded."""
    run = driven_log.runs["lifecycle"]
    with psycopg.connect(dsn(driven_log.settings.database_url), row_factory=namedtuple_row) as conn:
        rows = conn.execute(
            "SELECT stream_id, seq, event_type, transition_id::text AS transition_id, status,"
            " state_id::text AS state_id, payload::text AS payload FROM events WHERE stream_id = %s ORDER BY seq",
            (run,)).fetchall()
    assert [r.event_type for r in rows] == ["task_run_created"] + ["transition_decided"] * 3

    def findings(seq: int, *, event_type: str | None = None, edit=None) -> list[object]:
        verifier = StreamVerifier()
        out = []
        for r in rows:
            payload = json.loads(r.payload)
            if r.seq == seq and edit is not None:
                edit(payload)
            out.append(verifier.check_stored(r.stream_id, r.seq, event_type if r.seq == seq and event_type else
                                             r.event_type, r.transition_id, r.status, r.state_id,
                                             r.payload if r.seq != seq or edit is None else json.dumps(payload)))
        return out

    assert findings(0) == [None] * 4  # the ids as text, as verify_range passes them

    def bad_random(payload: dict) -> None:
        payload["context"]["random"] = 1.5

    found = findings(2, edit=bad_random)
    assert found[0] is None and found[2:] == [None, None]
    text = found[1].differences[0]
    assert text.startswith("re-deciding failed: ValidationError: 1 validation error for OrchestrationContext\nrandom"), text

    def bad_state(payload: dict) -> None:
        payload["command"]["state"]["type"] = "BOGUS"

    text = findings(3, edit=bad_state)[2].differences[0]
    assert text.startswith("re-deciding failed: ValidationError: 1 validation error for SetStateCommand\nstate.type"), text

    def bad_policy(payload: dict) -> None:
        payload["command"]["empirical_policy"] = {"retry_jitter_factor": 1e9}

    text = findings(1, edit=bad_policy)[0].differences[0]
    assert text.startswith("re-deciding failed: ValidationError: 1 validation error for CreateTaskRunCommand\n"
                           "empirical_policy"), text

    found = findings(2, event_type="task_run_renamed")
    assert found[1].differences == ("re-deciding failed: ValueError: unknown task-run event type 'task_run_renamed'",)
    assert found[2:] == [None, None]
