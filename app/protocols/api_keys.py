"""API keys, whatever the wire: `Authorization: Bearer <key>` (an HTTP header, or gRPC metadata).

Several keys may be valid at once, so that a key can be rotated without downtime. The presented key is compared
with every configured key in constant time (`hmac.compare_digest`), so neither timing nor order tells which key,
or how much of one, matched. Keys are never logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence


class ApiKeys:
    def __init__(self, keys: Sequence[str]) -> None:
        if not keys:
            raise ValueError("ApiKeys needs at least one key")
        self._keys = [key.encode() for key in keys]

    def valid(self, token: bytes) -> bool:
        matches = [hmac.compare_digest(token, key) for key in self._keys]  # every key, always
        return any(matches)


def bearer_token(authorization: bytes | None) -> bytes | None:
    """The key of an `Authorization: Bearer <key>` value; None without one (absent, another scheme, empty)."""
    if authorization is None:
        return None
    scheme, _, token = authorization.partition(b" ")
    if scheme.lower() == b"bearer" and token.strip():
        return token.strip()
    return None
