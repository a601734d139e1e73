"""What a request body may be before a route sees it.

Every body is read whole, up to the size limit (413 past it, whether or not it
declared a Content-Length), and a JSON body must be what the pipeline accepts
from any producer (runstate.strict_json: I-JSON, nested at most 64 deep, no NaN
or Infinity, numbers within a double and integers within 64 bits, no duplicate
member names, valid UTF-8 without lone surrogates, no U+0000). Anything else is a 422 in
Prefect's error body saying what was wrong, never a 500 and never a command the
pipeline would have to dead-letter. A body that is not JSON at all is left to
FastAPI, which answers Prefect's own 422 for it.
"""

from __future__ import annotations

import email.message
import json
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runstate import strict_json
from runstate.pipeline.records import NUL_ESCAPE

DEFAULT_MAX_BODY_BYTES = 1_048_576


class BodyRefused(ValueError):
    """Why a body cannot be taken: the message goes to the client."""


def _syntax_error(body: bytes) -> bool:
    # Decoded as FastAPI decodes it, so a body FastAPI would take is never left to it unchecked.
    try:
        json.loads(body.decode("utf-8-sig"))
    except json.JSONDecodeError:
        return True
    except (ValueError, RecursionError):
        return False
    return False


def check_json(body: bytes) -> None:
    """Raise BodyRefused when the body is JSON the pipeline would refuse."""
    try:
        strict_json.loads(body)
    except strict_json.StrictJSONError as refused:
        if _syntax_error(body):
            return
        raise BodyRefused(str(refused)) from None
    if b"\\u0000" in body and NUL_ESCAPE.search(body):
        raise BodyRefused("a string holds U+0000, which PostgreSQL text cannot store")


def _is_json(content_type: str | None) -> bool:
    # The same rule FastAPI uses to decide whether it parses a body as JSON.
    if not content_type:
        return True
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def invalid_body(message: str) -> JSONResponse:
    """Prefect's 422 body; the offending body is not echoed back."""
    return JSONResponse(
        status_code=422,
        content={
            "exception_message": "Invalid request received.",
            "exception_detail": [{"loc": ["body"], "msg": message, "type": "value_error"}],
            "request_body": None,
        },
    )


def too_large(limit: int) -> JSONResponse:
    return JSONResponse(
        status_code=413,
        content={"exception_message": f"The request body exceeds the gateway's limit of {limit} bytes."},
    )


class BodyGuard:
    """ASGI middleware: reads each request's body (at most `max_body_bytes()` bytes),
    checks a JSON body with check_json, and hands the app the same bytes."""

    def __init__(self, app: ASGIApp, max_body_bytes: Callable[[Scope], int]) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes(scope)
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await too_large(limit)(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away; nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await too_large(limit)(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if body and _is_json(headers.get("content-type")):
            try:
                check_json(body)
            except BodyRefused as refused:
                await invalid_body(str(refused))(scope, receive, send)
                return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
