"""Logging set-up: one JSON object a line (or plain text); structured fields go in `extra={"fields": {...}}`."""

from __future__ import annotations

import logging
import re
import sys
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import orjson

if TYPE_CHECKING:  # the log set-up runs before torch is imported, and needs none of it
    from app.engine.facade import Timings

LogFormat = Literal["json", "text"]


_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


def request_id(sent: str | None) -> str:
    """A request's id for its access line and answer: the client's (`X-Request-ID`, or the gRPC metadata
    `x-request-id`) when it is a sane token, else a new one."""
    if sent is not None and _SANE_REQUEST_ID.fullmatch(sent):
        return sent
    return uuid.uuid4().hex


def timing_fields(timings: Timings) -> dict[str, float]:
    """Where a request's time went, as fields of its access line (HTTP's and gRPC's)."""
    return {
        "preprocess_ms": round(timings.preprocess_s * 1000, 3),
        "queue_wait_ms": round(timings.queue_wait_s * 1000, 3),
        "inference_ms": round(timings.inference_s * 1000, 3),
    }


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,  # which worker, with several
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")  # pid: which worker

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            text += " " + " ".join(f"{key}={value}" for key, value in fields.items())
        return text


def configure_logging(level: str, log_format: LogFormat) -> None:
    """Route the service's and uvicorn's loggers through one handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
