"""The Python client: `Client` and `AsyncClient` for a vit-serve server, and what they return.

from app.client import Client
with Client("http://localhost:8000", api_key=None) as client:
    predictions = client.classify(["cat.jpg", "dog.png"], top_k=3)
"""

from app.client.http import AsyncClient, Client
from app.client.images import ImageLike
from app.client.results import APIError, ClassScore, Prediction
from app.client.retry import RetryPolicy

__all__ = ["APIError", "AsyncClient", "ClassScore", "Client", "ImageLike", "Prediction", "RetryPolicy"]
