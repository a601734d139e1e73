"""The JSON runstate accepts from producers: I-JSON (RFC 7493), with a depth limit.

Commands are stored and replayed for years and read by other languages, so a
value must mean the same thing to every reader and on every replay. Plain JSON
parsers disagree on exactly the inputs refused here: duplicate member names
(first or last wins), numbers beyond a double or a 64-bit integer (rounded,
`inf`, or an error), `NaN` and `Infinity` (not JSON at all; pydantic writes them
back as `null`, so a decision would depend on whether its input came from this
record or from the log), lone surrogates (not storable as UTF-8), invalid UTF-8,
and nesting deep enough to exhaust a reader's stack.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import Any

# Deep enough for any real state data; shallow enough for every reader we have
# (pydantic's parser stops at 200 levels, Python's json near 1,000).
MAX_DEPTH = 64
# Integers that fit a signed 64-bit column and every common JSON library.
MAX_INT = 2**63 - 1

# A \uD800-\uDFFF escape: the only way a lone surrogate can enter a Python str here.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class StrictJSONError(ValueError):
    """The bytes are not I-JSON within runstate's limits; the message says why."""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise StrictJSONError(f"duplicate member name {name[:64]!r}")
            seen.add(name)
    return obj


def _constant(name: str) -> Any:
    raise StrictJSONError(f"{name} is not a JSON number")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise StrictJSONError(f"number {text[:32]} is out of range for a double")
    return value


def _int(text: str) -> int:
    # The length test first: int() of thousands of digits is itself slow, and
    # Python refuses more than 4,300 digits with an unrelated message.
    if len(text) > 20 or abs(value := int(text)) > MAX_INT:
        raise StrictJSONError(f"integer {text[:32]}{'...' if len(text) > 32 else ''} is out of the 64-bit range")
    return value


_DECODER = json.JSONDecoder(object_pairs_hook=_object, parse_constant=_constant, parse_float=_float,
                            parse_int=_int)


def depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        node, level = stack.pop()
        children: Iterable[Any]
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def loads(data: bytes | str, max_depth: int = MAX_DEPTH) -> Any:
    """Parse `data` (UTF-8 bytes or text) or raise StrictJSONError, never anything else."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
    except UnicodeDecodeError as exc:
        raise StrictJSONError(f"not UTF-8: {exc.reason} at byte {exc.start}") from None
    raw = data if isinstance(data, bytes | bytearray) else text.encode("utf-8", "surrogatepass")
    try:
        value = _DECODER.decode(text)
    except StrictJSONError:
        raise
    except RecursionError:
        raise StrictJSONError(f"nested deeper than {max_depth} levels") from None
    except ValueError as exc:  # json.JSONDecodeError, int() beyond its digit limit
        raise StrictJSONError(f"not JSON: {str(exc).splitlines()[0][:200]}") from None
    # Counting brackets (bytes.count runs at memory speed) rules out deep nesting
    # for almost every command; only a bracket-heavy one is walked.
    if raw.count(b"[") + raw.count(b"{") > max_depth and depth(value) > max_depth:
        raise StrictJSONError(f"nested deeper than {max_depth} levels")
    if _SURROGATE_ESCAPE.search(raw):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise StrictJSONError("a string holds a lone surrogate (\\uD800-\\uDFFF), which is not Unicode text") from None
    return value
