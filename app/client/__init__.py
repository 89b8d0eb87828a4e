"""The Python client, for `from app.client import Client`: it lives in its own distribution, `vit-serve-client`
(`clients/python/vit_serve_client`, installable without torch), which `vit-serve` includes. Its names, re-exported."""

from vit_serve_client import *  # noqa: F403
from vit_serve_client import __all__ as __all__
