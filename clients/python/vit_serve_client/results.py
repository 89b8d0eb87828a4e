"""What the server answers, as plain data, and its errors as exceptions."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class ClassScore:
    index: int
    label: str
    score: float


@dataclass(frozen=True, slots=True)
class Prediction:
    """One image's classes, best first, and its logits when asked for."""

    top_k: list[ClassScore]
    logits: list[float] | None = None

    @classmethod
    def parse(cls, body: dict[str, Any]) -> Prediction:
        return cls([ClassScore(**score) for score in body["top_k"]], body.get("logits"))


@dataclass(frozen=True, slots=True)
class Explanation:
    """One image's classes, best first, its attention-rollout map (rows x cols, summing to 1), and the map over the
    image as PNG bytes when asked for."""

    top_k: list[ClassScore]
    attention: np.ndarray
    overlay_png: bytes | None = None

    @classmethod
    def parse(cls, body: dict[str, Any]) -> Explanation:
        overlay = body.get("overlay")
        png = base64.b64decode(overlay.partition(",")[2]) if overlay else None
        attention = np.array(body["attention"], dtype=np.float32).reshape(body["grid"])
        return cls([ClassScore(**score) for score in body["top_k"]], attention, png)


class APIError(Exception):
    """The server said no (its status, code and message, and the offending image's index where it named one), or
    gave no answer (status 0; code `unreachable`, `timeout` or `connection_error`)."""

    def __init__(self, status: int, code: str, message: str, index: int | None = None) -> None:
        super().__init__(f"{status} {code}: {message}" if status else message)
        self.status = status
        self.code = code
        self.message = message
        self.index = index

    @classmethod
    def from_body(cls, status: int, body: Any) -> APIError:
        if isinstance(body, dict) and "error" in body:
            return cls(status, str(body.get("code", "error")), str(body["error"]), body.get("index"))
        return cls(status, "http_error", f"HTTP {status}")

    @property
    def image_at_fault(self) -> bool:
        """A client error about one image, not about the request or the service."""
        return 400 <= self.status < 500 and self.status not in (401, 403, 404, 429)
