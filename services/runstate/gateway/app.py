"""The FastAPI application: lifespan (Kafka request-reply + PostgreSQL reads) and
Prefect's error bodies."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import Scope

from runstate import __version__
from runstate.client import CommandTooLarge, RunstateClient, RunstateTimeout, RunstateUnavailable
from runstate.config import Settings
from runstate.store.reads import make_engine

from .limits import DEFAULT_MAX_BODY_BYTES, BodyGuard
from .reads import GatewayReads

log = logging.getLogger("runstate.gateway")

DEFAULT_RESULT_TIMEOUT = 10.0
"""Seconds a request waits for its decision before answering 503."""


class KeyedLocks:
    """One asyncio lock per key, kept only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


@dataclass
class Gateway:
    """What every handler needs; one per process."""

    bus: RunstateClient
    reads: GatewayReads
    result_timeout: float
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    creating: KeyedLocks = field(default_factory=KeyedLocks)
    """Task-run creates in flight, by (flow_run_id, task_key, dynamic_key)."""


class PendingDecision(Exception):
    """The command was published but its decision did not arrive in time."""

    def __init__(self, message: str, transition_id: str | None = None) -> None:
        super().__init__(message)
        self.transition_id = transition_id


def create_app(settings: Settings | None = None, *, result_timeout: float = DEFAULT_RESULT_TIMEOUT) -> FastAPI:
    """Build the app. Settings are loaded at startup when not given, so the app can
    be built without a stack (the OpenAPI document is generated that way)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        s = settings or Settings.load()
        bus = RunstateClient(s, client_id="runstate-gateway")
        await bus.start()
        engine = make_engine(s.database_url, pool_size=8)
        app.state.gateway = Gateway(bus, GatewayReads(engine), result_timeout, s.gateway_max_body_bytes)
        try:
            yield
        finally:
            await bus.stop()
            await engine.dispose()

    from .routes import router  # routes import Gateway from here

    app = FastAPI(
        title="runstate gateway",
        version=__version__,
        description=(
            "Prefect 3.9.1-compatible REST API for runstate. Each write becomes a command on "
            "Kafka and is answered with its decision; reads come from PostgreSQL."
        ),
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
        lifespan=lifespan,
    )
    app.include_router(router)
    app.add_middleware(BodyGuard, max_body_bytes=_max_body_bytes)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(PendingDecision, _pending)
    app.add_exception_handler(RunstateTimeout, _pending)
    app.add_exception_handler(RunstateUnavailable, _unavailable)
    app.add_exception_handler(CommandTooLarge, _command_too_large)
    app.add_exception_handler(Exception, _internal_error)
    return app


def _max_body_bytes(scope: Scope) -> int:
    gateway = getattr(scope["app"].state, "gateway", None)
    return gateway.max_body_bytes if gateway is not None else DEFAULT_MAX_BODY_BYTES


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    # Prefect's body: the pydantic errors name the offending field in `loc`.
    assert isinstance(exc, RequestValidationError)
    return JSONResponse(
        status_code=422,
        content=jsonable_encoder(
            {
                "exception_message": "Invalid request received.",
                "exception_detail": exc.errors(),
                "request_body": exc.body,
            }
        ),
    )


async def _pending(request: Request, exc: Exception) -> JSONResponse:
    headers = {}
    if isinstance(exc, PendingDecision) and exc.transition_id:
        headers["X-Runstate-Transition-Id"] = exc.transition_id
    return JSONResponse(status_code=503, content={"exception_message": str(exc)}, headers=headers)


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(status_code=503, content={"exception_message": f"runstate cannot answer now: {exc}"})


async def _command_too_large(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(status_code=413, content={"exception_message": str(exc)})


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(status_code=500, content={"exception_message": "Internal Server Error"})
