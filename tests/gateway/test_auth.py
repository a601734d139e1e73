"""Gateway authentication, Prefect's own scheme: the shared gateway runs with
RUNSTATE_GATEWAY_AUTH_STRING set, so every request needs the matching basic auth."""

from __future__ import annotations

import base64
import uuid

import httpx
import pytest

from runstate.gateway.auth import credentials_match

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

UNAUTHORIZED = {"exception_message": "Unauthorized"}


def basic(value: str) -> str:
    return "Basic " + base64.b64encode(value.encode()).decode()


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (basic("user:secret"), True),
        ("basic " + base64.b64encode(b"user:secret").decode(), True),
        (None, False),
        ("", False),
        (basic("user:wrong"), False),
        (basic("user:secret "), False),
        ("Bearer user:secret", False),
        ("Bearer " + base64.b64encode(b"user:secret").decode(), False),
        ("Basic not-base64!", False),
        ("Basic", False),
    ],
)
def test_credentials_match(header, expected):
    assert credentials_match(header, "user:secret") is expected


async def test_no_credentials_is_401_with_prefects_body(gateway):
    async with httpx.AsyncClient(base_url=gateway.api_url, timeout=30) as anonymous:
        for method, path, body in [
            ("POST", "/task_runs/", {"task_key": "k", "dynamic_key": str(uuid.uuid4())}),
            ("GET", f"/task_runs/{uuid.uuid4()}", None),
            ("GET", "/admin/version", None),
            ("GET", "/openapi.json", None),
            ("DELETE", "/concurrency_limits/tag/t", None),
        ]:
            response = await anonymous.request(method, path, json=body)
            assert (response.status_code, response.json()) == (401, UNAUTHORIZED), (method, path)


async def test_wrong_credentials_are_401(gateway):
    wrong = httpx.BasicAuth("runstate-test", "not-the-password")
    async with httpx.AsyncClient(base_url=gateway.api_url, auth=wrong, timeout=30) as client:
        response = await client.post("/task_runs/", json={"task_key": "k", "dynamic_key": str(uuid.uuid4())})
    assert (response.status_code, response.json()) == (401, UNAUTHORIZED)


async def test_right_credentials_are_served(gateway, http):
    created = await http.post("/task_runs/", json={"task_key": "k", "dynamic_key": str(uuid.uuid4())})
    assert created.status_code == 201, created.text
    read = await http.get(f"/task_runs/{created.json()['id']}")
    assert read.status_code == 200 and read.json()["id"] == created.json()["id"]


async def test_health_ready_and_version_stay_open(gateway):
    async with httpx.AsyncClient(base_url=gateway.api_url, timeout=30) as anonymous:
        assert (await anonymous.get("/health")).json() is True
        assert (await anonymous.get("/ready")).status_code == 200
        assert (await anonymous.get("/version")).status_code == 200
        # Only those exact paths: a longer one is not a probe.
        assert (await anonymous.get("/health/../task_runs/")).status_code == 401
