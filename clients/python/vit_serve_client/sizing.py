"""How much `predict` keeps in flight: images a request and requests at once, fitted to the server's speed.

Every image in flight waits in the server's queue, and the server answers 504 to a request older than its timeout
(30 s by default). A CPU serving vit_b_16 classifies a few images a second: 16 images a request with 8 requests at
once (128 images, tens of seconds of its work) time out there, while a GPU needs about that many to keep its batches
full. So the sizes aim at `IN_FLIGHT_S` seconds of the server's work in flight, from the speed it measured in its
warm-up and advertises in the model's description (`measured.images_per_s`), and at no more than half its queue
(`batching.max_queue_size`), so that requests are not refused as `queue_full`. A server that advertises no speed is
taken for a CPU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

IN_FLIGHT_S = 2.0  # enough to keep the server's batches full, far from any request timeout
UNKNOWN_SPEED = 4.0  # images/s assumed of a server that advertises no measured speed: a CPU's
MAX_IN_FLIGHT = 128
MAX_BATCH = 16
MAX_CONCURRENCY = 16


@dataclass(frozen=True, slots=True)
class Sizing:
    batch: int  # images a request
    concurrency: int  # requests in flight at once
    basis: str  # where the sizes come from, for the start-up line


def advertised_speed(info: Mapping[str, Any]) -> float | None:
    """Images per second the server measured for this model at warm-up, or None where it advertises none."""
    return _positive(_field(info, "measured", "images_per_s"))


def fit(info: Mapping[str, Any], *, batch: int | None = None, concurrency: int | None = None) -> Sizing:
    """The sizes for the model `info` describes; a size given is kept, and the other fitted around it."""
    speed = advertised_speed(info)
    queue = _positive(_field(info, "batching", "max_queue_size"))
    basis = f"fitted to the server's measured {speed:.4g} images/s" if speed else "the server advertises no speed"
    if batch is not None and concurrency is not None:
        basis = "as given"
    in_flight = round((speed or UNKNOWN_SPEED) * IN_FLIGHT_S)
    in_flight = max(2, min(in_flight, MAX_IN_FLIGHT, int(queue // 2) if queue else MAX_IN_FLIGHT))
    if batch is None:
        batch = min(MAX_BATCH, max(1, in_flight // 4))
    if concurrency is None:
        concurrency = min(MAX_CONCURRENCY, max(1, math.ceil(in_flight / batch)))
    return Sizing(batch, concurrency, basis)


def _field(info: Mapping[str, Any], table: str, name: str) -> object:
    inner = info.get(table)
    return inner.get(name) if isinstance(inner, Mapping) else None


def _positive(value: object) -> float | None:
    """A finite positive number, or None (a server of another version may send anything, or nothing)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    return None
