"""What an OIP server says about itself (REST's `GET /v2`, gRPC's ServerMetadata): its name, version, extensions."""

from __future__ import annotations

from typing import Any

from app import __version__

SERVER_NAME = "vit-serve"
# Exactly what is implemented; `statistics` and shared memory are not; `model_repository` with model_control only.
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration"]


def server_metadata(*, model_control: bool) -> dict[str, Any]:
    extensions = [*EXTENSIONS, "model_repository"] if model_control else EXTENSIONS
    return {"name": SERVER_NAME, "version": __version__, "extensions": extensions}
