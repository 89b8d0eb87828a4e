"""JSON bodies bounded before they are parsed.

A JSON parser builds every array and object of a body before anyone can look at them, holding the GIL: 1M empty
arrays in a 4 MB body take seconds, most of them in the garbage collector, which each new container wakes. Counting
the brackets and commas of the raw bytes first (a C scan, a few ms for the largest body) bounds the parse by what a
request may hold, instead of by its size. A bracket or comma inside a string counts too: an overestimate, never an
under-count; the requests here carry few (base64 has none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from app.errors import BadRequest


@dataclass(frozen=True, slots=True)
class JsonCounts:
    containers: int  # arrays and objects, at most
    values: int  # values in arrays and objects, at most (the separators, plus one for each container)


def json_counts(body: bytes) -> JsonCounts:
    containers = body.count(b"[") + body.count(b"{")
    return JsonCounts(containers, body.count(b",") + containers)


def check_json_bounds(body: bytes, *, max_containers: int, max_values: int) -> JsonCounts:
    """400 `json_too_complex` if `body` can hold more than `max_containers` arrays and objects or more than
    `max_values` values; else the counts."""
    counts = json_counts(body)
    if counts.containers > max_containers:
        raise BadRequest(
            f"the JSON holds {counts.containers} arrays and objects; a request here holds at most {max_containers}",
            code="json_too_complex",
        )
    if counts.values > max_values:
        raise BadRequest(
            f"the JSON holds over {max_values} values; a request here holds at most that many", code="json_too_complex"
        )
    return counts


def parse_json(body: bytes, *, what: str = "JSON") -> Any:
    """`body` parsed (bound it with `check_json_bounds` first, where it may be large); 400 `invalid_json` if it is not
    JSON, with where the parser stopped."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed {what}: {exc}", code="invalid_json") from None
