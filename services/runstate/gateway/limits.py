"""What a request body may be before a route sees it.

Every body is read whole, up to the size limit (413 past it, whether or not it
declared a Content-Length), and a JSON body must be standard JSON that the
pipeline can decide: nested at most MAX_JSON_DEPTH deep, no NaN or Infinity,
every number finite and every integer within 64 bits, valid UTF-8 without lone
surrogates. Anything else is a 422 in Prefect's error body saying what was wrong,
never a 500 or a command the pipeline would have to refuse.

These checks belong to the gateway's edge only; the pipeline applies its own to
records that reach the command topic another way.
"""

from __future__ import annotations

import email.message
import json
import re
from collections.abc import Callable
from typing import Any

from pydantic import ValidatorFunctionWrapHandler
from pydantic_core import PydanticCustomError
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DEFAULT_MAX_BODY_BYTES = 1_048_576
MAX_JSON_DEPTH = 128
"""Deepest nesting of arrays and objects in a body. The command that carries a
body adds a few levels, and stays well inside what the pipeline parses (200)."""
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
"""Integers must fit 64 bits (PostgreSQL's bigint, Java's long)."""
_INF = float("inf")
_MAX_INT_CHARS = 20  # len("-9223372036854775808"): longer literals are refused unconverted

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class BodyRefused(ValueError):
    """Why a body cannot be taken: the message goes to the client."""


def _constant(name: str) -> Any:
    raise BodyRefused(f"{name} is not standard JSON; send finite numbers only")


def _float(literal: str) -> float:
    value = float(literal)
    if value in (_INF, -_INF):
        raise BodyRefused(f"the number {literal[:40]} is out of range (it is not a finite 64-bit float)")
    return value


def _int(literal: str) -> int:
    if len(literal) > _MAX_INT_CHARS:
        raise BodyRefused(f"the integer {literal[:24]}... ({len(literal)} digits) is out of range (64 bits)")
    value = int(literal)
    if not INT_MIN <= value <= INT_MAX:
        raise BodyRefused(f"the integer {literal} is out of range (64 bits)")
    return value


def _walk(parsed: Any, max_depth: int, strings: bool) -> None:
    """Check the parsed body level by level (iteratively: it may be as deep as the
    interpreter's recursion limit): its depth and, with `strings`, that every
    string encodes as UTF-8."""
    level = [parsed]
    depth = 0
    while level:
        below: list[Any] = []
        containers = False
        for value in level:
            kind = type(value)
            if kind is dict:
                containers = True
                below.extend(value.values())
                if strings:
                    below.extend(value)
            elif kind is list:
                containers = True
                below.extend(value)
            elif strings and kind is str:
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise BodyRefused("the JSON holds a lone surrogate (\\ud800-\\udfff) in a string") from None
        if containers:
            depth += 1
            if depth > max_depth:
                raise BodyRefused(f"the JSON is nested deeper than {max_depth} levels")
        level = below


def check_json(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Raise BodyRefused when the body is JSON the gateway will not take. A body that
    is not JSON at all passes: FastAPI answers that with its own 422."""
    try:
        text = body.decode("utf-8-sig")  # what FastAPI's parser decodes too
    except UnicodeDecodeError as exc:
        raise BodyRefused(f"the body is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        parsed = json.loads(text, parse_constant=_constant, parse_float=_float, parse_int=_int)
    except json.JSONDecodeError:
        return
    except RecursionError:
        # The C parser stops at the interpreter's recursion limit, far past ours.
        raise BodyRefused(f"the JSON is nested deeper than {max_depth} levels") from None
    # Most bodies need no walk: few brackets cannot nest deeply, and a lone
    # surrogate can only be written as an escape.
    deep = text.count("[") + text.count("{") > max_depth
    strings = _SURROGATE_ESCAPE.search(text) is not None
    if deep or strings:
        _walk(parsed, max_depth, strings)


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


def refuse_overflow(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """Wrap validator for request models: a datetime that cannot be converted to UTC
    (year 1 or 9999 with an offset) is a validation error, not an OverflowError."""
    try:
        return handler(value)
    except OverflowError as exc:
        raise PydanticCustomError(
            "value_error", "a datetime is out of range once converted to UTC ({error})", {"error": str(exc)}
        ) from None
