"""Where a request's time went, for its log line and its Server-Timing header."""

from __future__ import annotations

from app.engine.facade import Timings
from app.observability.logs import timing_fields

__all__ = ["server_timing", "timing_fields"]


def server_timing(timings: Timings) -> str:
    """The Server-Timing header (durations in ms), which browser dev tools and `curl -i` show."""
    parts = (("preprocess", timings.preprocess_s), ("queue", timings.queue_wait_s), ("inference", timings.inference_s))
    return ", ".join(f"{name};dur={seconds * 1000:.3f}" for name, seconds in parts)
