"""Prefect's own API authentication: with PREFECT_API_AUTH_STRING set, Prefect's client sends
`Authorization: Basic base64(auth_string)`; the gateway requires the matching string
(RUNSTATE_GATEWAY_AUTH_STRING) and answers Prefect's 401 body otherwise. Health, readiness and
version stay open so probes need no secret."""

from __future__ import annotations

import base64
import binascii
import hmac

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

OPEN_PATHS = frozenset({"/api/health", "/api/ready", "/api/version"})
UNAUTHORIZED = {"exception_message": "Unauthorized"}
_NOT_LOADED = object()


def credentials_match(authorization: str | None, expected: str) -> bool:
    """Whether an Authorization header carries `expected` as Prefect's client sends it."""
    if not authorization:
        return False
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        given = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    return hmac.compare_digest(given, expected.encode("utf-8"))


class BasicAuthGuard:
    """ASGI middleware reading the expected string from `app.state.auth_string` (None: auth
    is off), which the lifespan sets from the settings; before that, every route is refused."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        expected = getattr(scope["app"].state, "auth_string", _NOT_LOADED)
        # scope["path"], not the URL, because the Host header cannot change it.
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        open_probe = path.rstrip("/") in OPEN_PATHS and scope["method"] in ("GET", "HEAD")
        authorized = expected is None or (
            isinstance(expected, str) and credentials_match(Headers(scope=scope).get("authorization"), expected)
        )
        if open_probe or authorized:
            await self.app(scope, receive, send)
            return
        response = JSONResponse(
            status_code=401, content=UNAUTHORIZED, headers={"WWW-Authenticate": 'Basic realm="runstate"'}
        )
        await response(scope, receive, send)
