"""The consumer's HTTP port on a real `runstate serve` process: /metrics counts
what was published, /ready follows the database."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.harness import ServiceProcess, isolated_settings, produce, read_all, read_topic
from pipeline.test_pipeline import pg_dsn
from runstate.client import state
from runstate.database_urls import parse
from runstate.messages import (
    CreateTaskRunCommand,
    DeleteConcurrencyLimitCommand,
    OrchestrationResultEvent,
    SetConcurrencyLimitCommand,
    SetStateCommand,
    limit_id,
)
from stack.ports import free_port

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


async def wait_for(http: httpx.AsyncClient, path: str, status: int, timeout: float = 120.0,
                   body: Callable[[Any], bool] | None = None) -> httpx.Response:
    """Poll `path` until it answers `status` (and a JSON body `body` accepts); the failure otherwise.
    A slow machine can make /ready 503 for a reason of its own (a probe past its 0.8 s), so a
    test that means one reason names it in `body`."""
    deadline = asyncio.get_running_loop().time() + timeout
    last: httpx.Response | None = None
    while asyncio.get_running_loop().time() < deadline:
        try:
            last = await http.get(path)
            if last.status_code == status and (body is None or body(last.json())):
                return last
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.25)
    raise AssertionError(f"{path} did not answer {status}; last: {last and (last.status_code, last.text)}")


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


@pytest.fixture
def serving(base_settings, tmp_path: Path):
    settings = isolated_settings(base_settings, partitions=2)
    port = free_port()
    proc = ServiceProcess(settings, tmp_path / "serve.log", RUNSTATE_METRICS_PORT=str(port)).start()
    try:
        yield settings, f"http://127.0.0.1:{port}", proc
    finally:
        proc.stop()


async def test_metrics_count_every_result_published(serving):
    settings, url, _ = serving
    runs = [uuid.uuid4() for _ in range(5)]
    records = []
    for run_id in runs:
        key = str(run_id).encode()
        records += [
            (key, CreateTaskRunCommand(id=run_id).model_dump_json().encode()),
            (key, SetStateCommand(task_run_id=run_id, state=state("RUNNING")).model_dump_json().encode()),
        ]
    records.append((b"not-a-run", b"{not json"))
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        await wait_for(http, "/ready", 200)
        await produce(settings, records)
        results = await read_topic(settings, settings.result_topic, len(records))
        assert len(results) == len(records)
        # The counters move after the acks the results were read from, the commit after them, and
        # the lag is sampled within 0.8 s of a scrape (a slower broker leaves the last sample): poll.
        deadline = asyncio.get_running_loop().time() + 120
        while True:
            text = (await http.get("/metrics")).text
            decisions = samples(text, "runstate_decisions_total")
            committed = samples(text, "runstate_batch_phase_seconds_count").get((("phase", "commit"),), 0)
            lags = samples(text, "runstate_consumer_lag")
            sampled = {dict(k)["partition"] for k in lags} == {"0", "1"} and set(lags.values()) == {0.0}
            done = sum(decisions.values()) >= len(records) and committed and sampled
            if done or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.2)
    published = await read_all(settings, settings.result_topic)
    assert sum(decisions.values()) == len(published) == len(records)
    answers = [OrchestrationResultEvent.model_validate_json(r.value) for r in published]
    by_status = {}
    for a in answers:
        label = "error" if a.error else a.status.value
        by_status[label] = by_status.get(label, 0) + 1
    counted = {}
    for labels, value in decisions.items():
        counted[dict(labels)["status"]] = counted.get(dict(labels)["status"], 0) + value
    assert counted == by_status
    assert decisions[(("kind", "create_task_run"), ("status", "ACCEPT"))] == len(runs)
    assert samples(text, "runstate_dead_letters_total") == {(("code", "invalid_command"),): 1.0}
    assert samples(text, "runstate_batch_records_sum")[()] == len(records)
    assert samples(text, "runstate_decision_latency_seconds_count")[()] == len(records)
    phases = {dict(k)["phase"] for k, v in samples(text, "runstate_batch_phase_seconds_count").items() if v}
    assert phases >= {"parse", "decide", "write", "publish", "commit"}
    # Runs created by this consumer are decided from memory (pipeline/owned.py): a batch
    # reads the store, and times its snapshot phase, only when it needs to.
    batches = samples(text, "runstate_batches_total")
    assert sum(batches.values()) == samples(text, "runstate_batch_records_count")[()]
    assert batches[(("snapshot", "memory"),)] >= 1
    assert ("snapshot" in phases) == bool(batches.get((("snapshot", "store"),)))
    assert {dict(k)["partition"] for k in lags} == {"0", "1"} and set(lags.values()) == {0.0}
    assert samples(text, "runstate_outage")[()] == 0
    assert samples(text, "runstate_db_pool_connections")[()] >= 1
    assert sum(samples(text, "faststream_received_messages_total").values()) >= 1


async def test_limit_commands_are_counted_by_their_kind(serving):
    """A limit change is labelled with its own kind and `applied`, a refused one `error`."""
    settings, url, _ = serving
    tag = f"metrics-{uuid.uuid4().hex[:8]}"
    records = [
        (str(limit_id(tag)).encode(), SetConcurrencyLimitCommand(tag=tag, concurrency_limit=2).model_dump_json().encode()),
        (str(limit_id("never-set")).encode(), DeleteConcurrencyLimitCommand(tag="never-set").model_dump_json().encode()),
    ]
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        await wait_for(http, "/ready", 200)
        await produce(settings, records)
        assert len(await read_topic(settings, settings.result_topic, len(records))) == len(records)
        deadline = asyncio.get_running_loop().time() + 120
        while True:
            decisions = samples((await http.get("/metrics")).text, "runstate_decisions_total")
            if sum(decisions.values()) >= len(records) or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.2)
    assert decisions == {
        (("kind", "set_concurrency_limit"), ("status", "applied")): 1.0,
        (("kind", "delete_concurrency_limit"), ("status", "error")): 1.0,
    }


async def test_ready_follows_the_database(serving):
    """An outage (the app role may not insert) makes the consumer unready; the
    grant back makes it ready again. Then the probe's own connection is cut and
    connecting refused: unready until connecting is allowed again."""
    settings, url, _ = serving
    app_role = parse(settings.database_url).username
    database = parse(settings.database_url).database
    admin_dsn = pg_dsn(settings.admin_database_url)
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        await wait_for(http, "/ready", 200)
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'REVOKE INSERT ON events FROM "{app_role}"')
        try:
            run_id = uuid.uuid4()
            await produce(settings, [(str(run_id).encode(), CreateTaskRunCommand(id=run_id).model_dump_json().encode())])
            unready = await wait_for(http, "/ready", 503, body=lambda ready: not ready["checks"]["no_outage"])
            assert unready.json()["checks"]["no_outage"] is False
            metrics = (await http.get("/metrics")).text
            assert samples(metrics, "runstate_outage")[()] == 1
        finally:
            with psycopg.connect(admin_dsn, autocommit=True) as conn:
                conn.execute(f'GRANT INSERT ON events TO "{app_role}"')
        assert (await wait_for(http, "/ready", 200)).json()["ready"] is True
        assert await read_topic(settings, settings.result_topic, 1)
        assert samples((await http.get("/metrics")).text, "runstate_outage_seconds_total")[()] > 0

        # The owner is no superuser: the app role ends its own probe connection (a role may
        # signal its own backends), over a session opened before connecting is refused.
        with psycopg.connect(pg_dsn(settings.database_url), autocommit=True) as own, \
                psycopg.connect(admin_dsn, autocommit=True) as conn:
            public = conn.execute("SELECT has_database_privilege('public', %s, 'CONNECT')", (database,)).fetchone()[0]
            conn.execute(f'REVOKE CONNECT ON DATABASE "{database}" FROM PUBLIC, "{app_role}"')
            own.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE application_name = 'runstate-probe' AND usename = current_user")
        try:
            unready = await wait_for(http, "/ready", 503, body=lambda ready: not ready["checks"]["database"])
            assert unready.json()["checks"]["database"] is False
        finally:
            with psycopg.connect(admin_dsn, autocommit=True) as conn:
                grantee = "PUBLIC" if public else f'"{app_role}"'
                conn.execute(f'GRANT CONNECT ON DATABASE "{database}" TO {grantee}')
        assert (await wait_for(http, "/ready", 200)).json()["checks"]["database"] is True
