"""A running stack for the gateway tests: the consumer service in-process on
isolated topics, and the gateway served by uvicorn on a free loopback port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn

from pipeline.harness import InProcessService, isolated_settings
from runstate.config import Settings
from runstate.gateway import create_app
from runstate.store.reads import LogReader, make_engine
from stack import free_port


@dataclass
class RunningGateway:
    settings: Settings
    api_url: str  # ends in /api, as PREFECT_API_URL expects
    store: LogReader


@pytest.fixture(scope="session")
async def gateway(base_settings: Settings) -> AsyncIterator[RunningGateway]:
    settings = isolated_settings(base_settings)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    async with InProcessService(settings):
        serving = asyncio.create_task(server.serve())
        try:
            for _ in range(200):
                if server.started:
                    break
                if serving.done():
                    serving.result()  # raises why it stopped
                await asyncio.sleep(0.05)
            assert server.started, "uvicorn did not start within 10 s"
            store = LogReader(make_engine(settings.database_url))
            yield RunningGateway(settings, f"http://127.0.0.1:{port}/api", store)
            await store.engine.dispose()
        finally:
            server.should_exit = True
            await serving


@pytest.fixture
async def http(gateway: RunningGateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.api_url, timeout=30) as client:
        yield client
