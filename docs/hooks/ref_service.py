"""The service, built for the reference and never started: a tiny random-weight ViT on the CPU, its engine and
its app. The metrics registry and the OpenAPI document are read from it, as a running server would expose them."""

from __future__ import annotations

import functools
import logging
import tempfile
from pathlib import Path
from typing import Any

TINY_MODEL = """\
arch = "vit"
weights = "random"
labels = "labels.txt"

[arch_params]
image_size = 32
patch_size = 16
num_layers = 1
num_heads = 2
hidden_dim = 8
mlp_dim = 16
"""


@functools.cache
def app() -> Any:
    """`create_app(settings, engine)` around a tiny model, as the server makes it (not started: nothing warms up)."""
    from app.config.settings import Settings
    from app.engine.facade import Engine
    from app.http.app import create_app

    logging.getLogger("app").setLevel(logging.ERROR)  # not "serves RANDOM weights": the reference knows
    with tempfile.TemporaryDirectory(prefix="vit-serve-docs-") as repository:
        folder = Path(repository) / "tiny"
        folder.mkdir()
        (folder / "model.toml").write_text(TINY_MODEL)
        (folder / "labels.txt").write_text("cat\ndog\nbird\n")
        settings = Settings(model_repository=Path(repository), model=["tiny"], device="cpu", decode_workers=1)  # type: ignore[call-arg]
        engine = Engine.load(settings)
    return create_app(settings, engine)
