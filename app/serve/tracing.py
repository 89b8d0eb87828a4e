"""Whether a server process traces its requests (`Settings.tracing` and the standard OTEL_* variables), and its
tracing, made once per process (each worker its own) by `serve`. Off, OpenTelemetry is never imported."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

from app.config.settings import Settings
from app.errors import ModelLoadError

if TYPE_CHECKING:
    from app.observability.tracing import Tracing

log = logging.getLogger(__name__)

OTEL_SET_UP_BY = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER")
INSTALL = "pip install 'vit-serve[otel]'"


def wanted(setting: Literal["auto", "on", "off"], environ: Mapping[str, str]) -> bool:
    """on, off, or (auto) on when the OTEL_* variables say where traces go and do not disable the SDK."""
    if setting != "auto":
        return setting == "on"
    disabled = environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
    return not disabled and any(environ.get(name) for name in OTEL_SET_UP_BY)


def start_tracing(settings: Settings, environ: Mapping[str, str] = os.environ) -> Tracing | None:
    """This process's tracing, or None when it does not trace. `tracing = on` without the otel extra is a start-up
    error; `auto` without it says so in the log and goes on untraced."""
    if not wanted(settings.tracing, environ):
        return None
    try:
        from app.observability.tracing import Tracing
    except ImportError as exc:
        if not (exc.name or "").startswith("opentelemetry"):
            raise
        if settings.tracing == "on":
            raise ModelLoadError(f"tracing = on needs OpenTelemetry, which is not installed: {INSTALL}") from exc
        log.warning(
            "the OTEL_* variables ask for traces, but OpenTelemetry is not installed (%s): not tracing", INSTALL
        )
        return None
    tracing = Tracing.from_environment()
    log.info("tracing: requests traced, exported as the OTEL_* variables say")
    return tracing
