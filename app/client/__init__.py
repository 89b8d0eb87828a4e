"""The Python client: `Client` and `AsyncClient` for a vit-serve server, and what they return.

from app.client import Client
with Client("http://localhost:8000", api_key=None) as client:
    predictions = client.classify(["cat.jpg", "dog.png"], top_k=3)
    vectors = client.embed(["cat.jpg", "dog.png"], normalize=True)      # (2, dim) float32
    explanations = client.explain("cat.jpg", overlay=True)              # top-k, attention map, PNG
"""

from app.client.http import AsyncClient, Client
from app.client.images import ImageLike
from app.client.results import APIError, ClassScore, Explanation, Prediction
from app.client.retry import RetryPolicy

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
