"""The Python client, for `from app.client import Client`: it lives in its own distribution, `vit-serve-client`
(`clients/python/vit_serve_client`, installable without torch), which `vit-serve` includes."""

from vit_serve_client import (
    APIError,
    AsyncClient,
    ClassScore,
    Client,
    Explanation,
    ImageLike,
    Prediction,
    RetryPolicy,
)

__all__ = [
    "APIError",
    "AsyncClient",
    "ClassScore",
    "Client",
    "Explanation",
    "ImageLike",
    "Prediction",
    "RetryPolicy",
]
