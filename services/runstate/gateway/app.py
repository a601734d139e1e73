"""The FastAPI application: lifespan (Kafka request-reply + PostgreSQL reads) and
Prefect's error bodies."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import Scope

from runstate import __version__
from runstate.client import CommandTooLarge, RunstateClient, RunstateTimeout, RunstateUnavailable
from runstate.config import Settings
from runstate.obs.http import HttpMetrics, HttpMetricsMiddleware, metrics_endpoint
from runstate.store.queries import make_engine

from .auth import BasicAuthGuard
from .limits import DEFAULT_MAX_BODY_BYTES, BodyGuard
from .reads import GatewayReads
from .routes import router
from .state import DEFAULT_RESULT_TIMEOUT, Gateway, PendingDecision

log = logging.getLogger("runstate.gateway")

def create_app(settings: Settings | None = None, *, result_timeout: float = DEFAULT_RESULT_TIMEOUT) -> FastAPI:
    """Build the app. Settings are loaded at startup when not given, so the app can
    be built without a stack (the OpenAPI document is generated that way)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        s = settings or Settings.load()
        secret = s.gateway_auth_string
        app.state.auth_string = secret.get_secret_value() if secret is not None else None
        provider = None
        if s.traces_exporter is not None:
            from runstate.obs.tracing import tracer_provider

            provider = tracer_provider(s, "runstate-gateway")
        bus = RunstateClient(s, client_id="runstate-gateway", tracer_provider=provider)
        await bus.start()
        engine = make_engine(s.database_url, pool_size=8)
        app.state.gateway = Gateway(bus, GatewayReads(engine), result_timeout, s.gateway_max_body_bytes)
        metrics.sample_waiting = lambda: bus.pending
        try:
            yield
        finally:
            await bus.stop()
            await engine.dispose()
            if provider is not None:
                await asyncio.to_thread(provider.shutdown)  # exports the spans still buffered

    metrics = HttpMetrics()
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
    # Added last, so it runs first: an unauthenticated body is never read.
    app.add_middleware(BasicAuthGuard)
    # Outermost: a request the guards refuse is counted too.
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)
    app.add_route("/metrics", metrics_endpoint(metrics), include_in_schema=False)
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
