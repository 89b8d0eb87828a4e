"""The batch engines' optional libraries (the `ray` and `spark` extras): imported when a job needs one, else an error
that says what to install."""

from __future__ import annotations

import importlib
from typing import Any


class MissingExtra(Exception):
    """An engine's library is not installed; the message says which extra brings it."""


EXTRAS = {"ray": "ray", "pyspark": "spark"}


def require(module: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = EXTRAS[module.split(".")[0]]
        raise MissingExtra(f"{what} needs {module}, which is not installed: pip install 'vit-serve[{extra}]'") from exc
