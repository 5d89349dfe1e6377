"""JSON from outside the process: one parser with a depth limit, for every place JSON enters.

orjson parses JSON nested up to 1,024 levels but encodes at most 254, so a value that parsed
could not be sent on; pyrt wraps client data in its own envelopes (a push around a
publication, a Phoenix message around a broadcast), which takes a few levels more. Every
frame, request body, cursor token and source payload is therefore parsed by `loads` here,
which refuses anything nested deeper than `MAX_DEPTH` (docs/protocol.md, docs/http.md). Sizes
are bounded before parsing, by whoever reads the bytes (frame and body limits).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

__all__ = ["MAX_DEPTH", "JsonError", "depth_exceeds", "loads", "too_deep_message"]

MAX_DEPTH = 64
"""The deepest nesting of arrays and objects accepted anywhere JSON enters pyrt (a scalar is
depth 0, `[]` and `{}` are depth 1). Well below orjson's encoder limit of 254, so pyrt's
envelopes around any accepted value still encode."""


class JsonError(ValueError):
    """Not JSON, or JSON nested deeper than the limit (`too_deep`)."""

    def __init__(self, message: str, *, too_deep: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.too_deep = too_deep


def loads(data: bytes | bytearray | memoryview | str, *, max_depth: int = MAX_DEPTH) -> Any:
    """`orjson.loads`, and JsonError when `data` is not JSON or nests deeper than `max_depth`."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        if "depth limit" in str(e):  # deeper than orjson parses at all (1,024)
            raise JsonError(too_deep_message(max_depth), too_deep=True) from None
        raise JsonError(f"not JSON: {e}") from None
    if depth_exceeds(value, max_depth, data):
        raise JsonError(too_deep_message(max_depth), too_deep=True)
    return value


def too_deep_message(limit: int = MAX_DEPTH) -> str:
    return f"JSON nested deeper than {limit} levels"


def depth_exceeds(
    value: Any, limit: int, raw: bytes | bytearray | memoryview | str | None = None
) -> bool:
    """Whether `value` nests arrays and objects deeper than `limit`. With `raw`, the text it was
    parsed from, a value whose text has no more brackets than `limit` is not walked at all
    (the common case, at the cost of two `count` calls)."""
    if raw is not None:
        if isinstance(raw, str):
            brackets = raw.count("[") + raw.count("{")
        else:
            text = bytes(raw) if isinstance(raw, memoryview) else raw
            brackets = text.count(b"[") + text.count(b"{")
        if brackets <= limit:
            return False
    # Iterative: a recursive walk would itself fail on the values it is meant to refuse.
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        children: Iterable[Any]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth += 1
        if depth > limit:
            return True
        stack.extend((child, depth) for child in children if isinstance(child, (dict, list)))
    return False
