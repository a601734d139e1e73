"""The gateway's /metrics: requests by route template (no run ids) and status."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
import uvicorn

from pipeline.harness import InProcessService, isolated_settings
from runstate.gateway import create_app

from .test_consumer_http import free_port, samples

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


async def test_gateway_metrics_count_requests_by_route_template(base_settings):
    settings = isolated_settings(base_settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    async with InProcessService(settings):
        serving = asyncio.create_task(server.serve())
        try:
            while not server.started:
                assert not serving.done(), serving.result()
                await asyncio.sleep(0.05)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
                created = await http.post("/api/task_runs/", json={"task_key": "k", "dynamic_key": str(uuid.uuid4())})
                assert created.status_code == 201, created.text
                missing = uuid.uuid4()
                assert (await http.get(f"/api/task_runs/{missing}")).status_code == 404
                assert (await http.get(f"/api/task_runs/{missing}")).status_code == 404
                assert (await http.get("/api/nowhere")).status_code == 404
                scraped = await http.get("/metrics")
        finally:
            server.should_exit = True
            await serving
    assert scraped.status_code == 200
    text = scraped.text
    requests = {tuple(v for _, v in k): n for k, n in samples(text, "runstate_http_requests_total").items()}
    assert requests == {
        ("POST", "/api/task_runs/", "201"): 1,
        ("GET", "/api/task_runs/{id}", "404"): 2,
        ("GET", "unmatched", "404"): 1,
    }
    assert str(missing) not in text and created.json()["id"] not in text
    latency = samples(text, "runstate_http_request_duration_seconds_count")
    assert latency[(("method", "GET"), ("route", "/api/task_runs/{id}"))] == 2
    assert samples(text, "runstate_gateway_waiting_decisions")[()] == 0
    assert samples(text, "runstate_http_requests_in_flight")[()] == 0
