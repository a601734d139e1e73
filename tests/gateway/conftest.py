"""A running stack for the gateway tests: the consumer service in-process on
isolated topics, and the gateway served by uvicorn on a free loopback port."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn

from pipeline.harness import InProcessService, isolated_settings
from runstate.config import Settings
from runstate.gateway import create_app
from runstate.store.queries import LogReader, make_engine
from stack import free_port

# The string Prefect's client sends as PREFECT_API_AUTH_STRING: the shared gateway runs with auth on.
AUTH_STRING = "runstate-test:" + secrets.token_urlsafe(16)
STARTUP_TIMEOUT_S = 120
# Longer than the product's 10 s: on a loaded machine a decision may take longer, and these tests
# mean decisions, not 503s (test_http.py's late-decision test makes its own 1 s gateway).
RESULT_TIMEOUT_S = 60


@dataclass
class RunningGateway:
    settings: Settings
    api_url: str  # ends in /api, as PREFECT_API_URL expects
    store: LogReader
    auth_string: str

    @property
    def auth(self) -> httpx.BasicAuth:
        """What Prefect's client sends: basic auth whose user:password is the auth string."""
        user, _, password = self.auth_string.partition(":")
        return httpx.BasicAuth(user, password)


@pytest.fixture(scope="session")
async def gateway(base_settings: Settings, gateway_database_url: str) -> AsyncIterator[RunningGateway]:
    settings = isolated_settings(base_settings).replace(gateway_auth_string=AUTH_STRING)
    # The gateway runs as the read-only role (runstate_gateway), as the stack's gateway does:
    # every write it makes goes through a command; the service keeps the consumer's role.
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings.replace(database_url=gateway_database_url), result_timeout=RESULT_TIMEOUT_S),
                       host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    async with InProcessService(settings):
        serving = asyncio.create_task(server.serve())
        try:
            # The lifespan connects to Kafka and PostgreSQL before uvicorn says it started: on a
            # loaded machine that alone can take tens of seconds.
            deadline = asyncio.get_running_loop().time() + STARTUP_TIMEOUT_S
            while not server.started and asyncio.get_running_loop().time() < deadline:
                if serving.done():
                    serving.result()  # raises why it stopped
                await asyncio.sleep(0.05)
            assert server.started, f"uvicorn did not start within {STARTUP_TIMEOUT_S} s"
            store = LogReader(make_engine(settings.database_url))
            yield RunningGateway(settings, f"http://127.0.0.1:{port}/api", store, AUTH_STRING)
            await store.engine.dispose()
        finally:
            server.should_exit = True
            await serving


@pytest.fixture
async def http(gateway: RunningGateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.api_url, auth=gateway.auth, timeout=RESULT_TIMEOUT_S + 30) as client:
        yield client
