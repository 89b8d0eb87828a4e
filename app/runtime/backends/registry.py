"""A backend's name (`backend = ...` in model.toml, `VIT_BACKEND`) -> the backend."""

from __future__ import annotations

from app.runtime.backends.base import Backend
from app.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from app.runtime.backends.openvino_backend import OpenVinoBackend
from app.runtime.backends.torch_backend import TorchBackend

BACKENDS: dict[str, Backend] = {
    backend.name: backend for backend in (TorchBackend(), OnnxRuntimeBackend(), OpenVinoBackend())
}


def backend_for(name: str) -> Backend:
    return BACKENDS[name]
