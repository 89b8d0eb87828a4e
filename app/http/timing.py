"""A request's Server-Timing header (the fields of its log line: `observability.logs.timing_fields`)."""

from __future__ import annotations

from app.engine.facade import Timings


def server_timing(timings: Timings) -> str:
    """The Server-Timing header (durations in ms), which browser dev tools and `curl -i` show."""
    parts = (("preprocess", timings.preprocess_s), ("queue", timings.queue_wait_s), ("inference", timings.inference_s))
    return ", ".join(f"{name};dur={seconds * 1000:.3f}" for name, seconds in parts)
