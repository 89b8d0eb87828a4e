"""Optional libraries (the `hf` and `timm` extras): imported when a model needs one, else a start-up error that
says what to install."""

from __future__ import annotations

import importlib
from typing import Any

from app.config.model_config import ModelConfig
from app.errors import ModelLoadError


def require(module: str, extra: str, what: str, config: ModelConfig) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ModelLoadError(
            f"model {config.name!r} ({config.arch}) needs {what}, which is not installed: "
            f"pip install 'vit-serve[{extra}]'"
        ) from exc
