"""The Python client of a vit-serve server: `Client` and `AsyncClient`, and what they return.

from vit_serve_client import Client
with Client("http://localhost:8000", api_key=None) as client:
    predictions = client.classify(["cat.jpg", "dog.png"], top_k=3)
    vectors = client.embed(["cat.jpg", "dog.png"], normalize=True)      # (2, dim) float32
    explanations = client.explain("cat.jpg", overlay=True)              # top-k, attention map, PNG
"""

from vit_serve_client.http import AsyncClient, Client
from vit_serve_client.images import ImageLike
from vit_serve_client.results import APIError, ClassScore, Explanation, Prediction
from vit_serve_client.retry import RetryPolicy

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
