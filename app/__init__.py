"""vit-serve: Vision Transformer image classification over HTTP, with dynamic batching."""

__version__ = "0.1.0"
