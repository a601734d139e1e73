"""The gateway's limits on what a request may be, and the create race: hostile
bodies get a clear 4xx (never a 500), through uvicorn, the real pipeline, Kafka
and PostgreSQL; concurrent identical creates make one run."""

from __future__ import annotations

import asyncio
import secrets
import uuid

import httpx
import pytest
from sqlalchemy import text

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

MIB = 1_048_576


async def new_task_run(http: httpx.AsyncClient, **fields) -> dict:
    body = {"task_key": "k", "dynamic_key": str(uuid.uuid4()), **fields}
    response = await http.post("/task_runs/", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def post_raw(http: httpx.AsyncClient, path: str, raw: bytes | str) -> asyncio.Future[httpx.Response]:
    data = raw.encode() if isinstance(raw, str) else raw
    return http.post(path, content=data, headers={"content-type": "application/json"})


def assert_validation_error(response: httpx.Response, fragment: str) -> None:
    """Prefect's 422 body, with a message that says what was wrong."""
    assert response.status_code == 422, (response.status_code, response.text[:500])
    body = response.json()
    assert body["exception_message"] == "Invalid request received."
    messages = " ".join(str(e.get("msg")) for e in body["exception_detail"])
    assert fragment in messages, messages


# -- body size ---------------------------------------------------------------------------
async def test_a_body_over_the_limit_is_413_and_one_under_it_is_decided(http):
    run = await new_task_run(http)
    over = {"state": {"type": "RUNNING", "data": "x" * (MIB + 1)}}
    response = await http.post(f"/task_runs/{run['id']}/set_state", json=over)
    assert response.status_code == 413, response.text[:300]
    assert "1048576 bytes" in response.json()["exception_message"]
    under = {"state": {"type": "RUNNING", "data": "x" * 1000}}
    assert (await http.post(f"/task_runs/{run['id']}/set_state", json=under)).status_code == 201


async def test_a_chunked_body_without_length_is_cut_off_at_the_limit(http):
    run = await new_task_run(http)

    async def chunks():
        yield b'{"state": {"type": "RUNNING", "data": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}}'

    response = await http.post(f"/task_runs/{run['id']}/set_state", content=chunks(),
                               headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text[:300]
    assert (await http.get(f"/task_runs/{run['id']}")).json()["state_type"] == "PENDING"


async def test_a_body_under_the_limit_whose_command_is_too_large_is_413(http):
    # The command carries the body plus its envelope: a body just under the HTTP
    # limit can still exceed what the command topic accepts.
    run = await new_task_run(http)
    prefix = '{"state": {"type": "RUNNING", "data": "'
    body = prefix + "z" * (MIB - 100 - len(prefix)) + '"}}'
    assert len(body) < MIB
    response = await post_raw(http, f"/task_runs/{run['id']}/set_state", body)
    assert response.status_code == 413, response.text[:300]
    assert (await http.get(f"/task_runs/{run['id']}")).json()["state_type"] == "PENDING"


# -- JSON the gateway refuses ------------------------------------------------------------
@pytest.mark.parametrize("depth", [70, 5_000, 100_000])
async def test_deeply_nested_data_is_422_not_500(http, depth):
    run = await new_task_run(http)
    body = '{"state": {"type": "COMPLETED", "data": ' + "[" * depth + "]" * depth + "}}"
    response = await post_raw(http, f"/task_runs/{run['id']}/set_state", body)
    assert_validation_error(response, "nested deeper than 64")
    assert (await http.get(f"/task_runs/{run['id']}")).json()["state_type"] == "PENDING"


async def test_deep_garbage_is_422_not_500(http):
    response = await post_raw(http, "/task_runs/", "[{" * 3000)
    assert response.status_code == 422, response.text[:300]


async def test_data_at_the_depth_limit_is_decided(http):
    run = await new_task_run(http)
    await http.post(f"/task_runs/{run['id']}/set_state", json={"state": {"type": "RUNNING"}})
    nested: object = "leaf"
    for _ in range(31):  # 62 levels, inside {"state": {"data": ...}}: 64
        nested = {"a": [nested]}
    response = await http.post(f"/task_runs/{run['id']}/set_state",
                               json={"state": {"type": "COMPLETED", "data": nested}})
    assert response.status_code == 201, response.text[:300]


@pytest.mark.parametrize(
    ("literal", "fragment"),
    [
        ("NaN", "is not a JSON number"),
        ("Infinity", "is not a JSON number"),
        ("-Infinity", "is not a JSON number"),
        ("1e400", "out of range for a double"),
        ("-1e400", "out of range for a double"),
        ("1" + "0" * 30, "out of the 64-bit range"),
        ("9" * 5000, "out of the 64-bit range"),
    ],
)
async def test_non_finite_and_huge_numbers_are_422(http, literal, fragment):
    run = await new_task_run(http)
    for body in (
        '{"state": {"type": "COMPLETED", "data": {"x": [' + literal + "]}}}",
        '{"task_key": "k", "dynamic_key": "d", "empirical_policy": {"retries": ' + literal + "}}",
    ):
        path = f"/task_runs/{run['id']}/set_state" if body.startswith('{"state"') else "/task_runs/"
        response = await post_raw(http, path, body)
        assert_validation_error(response, fragment)


@pytest.mark.parametrize(
    "when",
    [
        "0001-01-01T00:00:00+05:00",
        "0001-01-01T04:59:59+05:00",
        "9999-12-31T23:00:00-05:00",
        "9999-12-31T23:59:59.999999-00:01",
    ],
)
async def test_datetimes_that_overflow_in_utc_are_422(http, when):
    run = await new_task_run(http)
    set_state = {"state": {"type": "SCHEDULED", "state_details": {"scheduled_time": when}}}
    response = await http.post(f"/task_runs/{run['id']}/set_state", json=set_state)
    assert_validation_error(response, "outside the years 1-9999")
    create = {"task_key": "k", "dynamic_key": str(uuid.uuid4()), "cache_expiration": when}
    assert_validation_error(await http.post("/task_runs/", json=create), "outside the years 1-9999")
    flow = (await http.post("/flows/", json={"name": "limits"})).json()
    flow_run = {"flow_id": flow["id"], "state": {"type": "SCHEDULED", "state_details": {"scheduled_time": when}}}
    assert_validation_error(await http.post("/flow_runs/", json=flow_run), "outside the years 1-9999")


async def test_invalid_utf8_surrogates_nul_and_duplicate_names_are_422(http):
    run = await new_task_run(http)
    path = f"/task_runs/{run['id']}/set_state"
    bad_utf8 = await post_raw(http, path, b'{"state": {"type": "COMPLETED", "data": "\xff\xfe"}}')
    assert_validation_error(bad_utf8, "not UTF-8")
    surrogate = await post_raw(http, path, '{"state": {"type": "COMPLETED", "data": "\\ud800"}}')
    assert_validation_error(surrogate, "surrogate")
    nul = await post_raw(http, path, '{"state": {"type": "COMPLETED", "data": {"x": "a\\u0000b"}}}')
    assert_validation_error(nul, "U+0000")
    duplicate = await post_raw(http, path, '{"state": {"type": "COMPLETED", "type": "RUNNING"}}')
    assert_validation_error(duplicate, "duplicate member name")
    assert (await http.get(f"/task_runs/{run['id']}")).json()["state_type"] == "PENDING"


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"empirical_policy": {"retries": 3, "retry_delay": 1e12}}, "at most 315360000 seconds"),
        ({"empirical_policy": {"retries": 3, "retry_delay": [1, 2, 1e12]}}, "at most 315360000 seconds"),
        ({"empirical_policy": {"retries": 3, "retry_jitter_factor": 1e9}}, "retry_jitter_factor may be at most"),
        ({"tags": ["a\u001fb"]}, "control character"),
    ],
)
async def test_run_settings_the_pipeline_refuses_are_422_at_the_gateway(http, fields, fragment):
    body = {"task_key": "bounds", "dynamic_key": str(uuid.uuid4()), **fields}
    response = await http.post("/task_runs/", json=body)
    assert_validation_error(response, fragment)
    assert response.json()["exception_detail"][0]["loc"][0] == "body"


async def test_a_key_postgresql_cannot_index_is_422_not_500(http):
    # An incompressible task key longer than a btree entry may be: only PostgreSQL finds out.
    body = {"task_key": secrets.token_urlsafe(8000), "dynamic_key": "0"}
    response = await http.post("/task_runs/", json=body)
    assert response.status_code == 422, response.text[:300]


# -- the create race ----------------------------------------------------------------------
CONCURRENT_CREATES = 12


async def _runs_with_key(gateway, flow_run_id: str | None, task_key: str, dynamic_key: str) -> list[uuid.UUID]:
    same_flow = "flow_run_id IS NULL" if flow_run_id is None else "flow_run_id = :f"
    async with gateway.store.engine.connect() as conn:
        rows = await conn.execute(
            text(f"SELECT id FROM task_runs WHERE {same_flow} AND task_key = :k AND dynamic_key = :d"),
            {"f": flow_run_id, "k": task_key, "d": dynamic_key},
        )
        return [row.id for row in rows]


@pytest.mark.parametrize("with_flow_run", [True, False])
async def test_concurrent_identical_creates_make_one_run(http, gateway, with_flow_run):
    flow_run_id = None
    if with_flow_run:
        flow = (await http.post("/flows/", json={"name": "race"})).json()
        flow_run_id = (await http.post("/flow_runs/", json={"flow_id": flow["id"]})).json()["id"]
    body = {"flow_run_id": flow_run_id, "task_key": "race", "dynamic_key": str(uuid.uuid4()),
            "state": {"type": "PENDING"}}
    answers = await asyncio.gather(*(http.post("/task_runs/", json=body) for _ in range(CONCURRENT_CREATES)))
    assert sorted(a.status_code for a in answers) == [200] * (CONCURRENT_CREATES - 1) + [201], [
        (a.status_code, a.text[:200]) for a in answers]
    ids = {a.json()["id"] for a in answers}
    assert len(ids) == 1
    assert await _runs_with_key(gateway, flow_run_id, "race", body["dynamic_key"]) == [uuid.UUID(ids.pop())]


async def test_concurrent_creates_with_different_ids_for_one_key_make_one_run(http, gateway):
    flow = (await http.post("/flows/", json={"name": "race"})).json()
    flow_run_id = (await http.post("/flow_runs/", json={"flow_id": flow["id"]})).json()["id"]
    key = str(uuid.uuid4())
    bodies = [{"id": str(uuid.uuid4()), "flow_run_id": flow_run_id, "task_key": "race", "dynamic_key": key}
              for _ in range(CONCURRENT_CREATES)]
    answers = await asyncio.gather(*(http.post("/task_runs/", json=b) for b in bodies))
    assert all(a.status_code in (200, 201) for a in answers), [(a.status_code, a.text[:200]) for a in answers]
    ids = {a.json()["id"] for a in answers}
    assert len(ids) == 1
    winner = ids.pop()
    assert winner in {b["id"] for b in bodies}
    assert await _runs_with_key(gateway, flow_run_id, "race", key) == [uuid.UUID(winner)]
