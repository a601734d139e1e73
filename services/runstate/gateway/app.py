"""The FastAPI application: lifespan (Kafka request-reply + PostgreSQL reads) and
Prefect's error bodies."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from runstate import __version__
from runstate.client import RunstateTimeout
from runstate.config import Settings
from runstate.store.reads import make_engine

from runstate.client import RunstateClient
from .reads import GatewayReads

log = logging.getLogger("runstate.gateway")

DEFAULT_RESULT_TIMEOUT = 10.0
"""Seconds a request waits for its decision before answering 503."""


@dataclass
class Gateway:
    """What every handler needs; one per process."""

    bus: RunstateClient
    reads: GatewayReads
    result_timeout: float


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
        app.state.gateway = Gateway(bus, GatewayReads(engine), result_timeout)
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
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(PendingDecision, _pending)
    app.add_exception_handler(RunstateTimeout, _pending)
    app.add_exception_handler(Exception, _internal_error)
    return app


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


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(status_code=500, content={"exception_message": "Internal Server Error"})
