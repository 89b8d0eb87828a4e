"""When to try a request again, and how long to wait first: 503 and 429 (honouring `Retry-After`) and connection
errors, with exponential backoff and jitter, a bounded number of times."""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass

import httpx

RETRY_STATUSES = frozenset({429, 503})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 5  # in all, the first included
    base_delay_s: float = 0.2
    max_delay_s: float = 10.0

    def delay(self, attempt: int, response: httpx.Response | None = None) -> float:
        """Seconds to wait before attempt `attempt + 1` (attempt counts from 1): the server's `Retry-After` if it
        gave one, else full-jitter exponential backoff; never more than `max_delay_s`."""
        retry_after = _retry_after(response) if response is not None else None
        if retry_after is not None:
            return min(retry_after, self.max_delay_s)
        return random.uniform(0, min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1)))

    def should_retry(self, attempt: int, response: httpx.Response | None, error: Exception | None) -> bool:
        if attempt >= self.attempts:
            return False
        if error is not None:
            return isinstance(error, httpx.TransportError)
        return response is not None and response.status_code in RETRY_STATUSES

    def wait_before_retry(self, attempt: int, response: httpx.Response | None, error: Exception | None) -> float | None:
        """After attempt `attempt` ended in `response` or `error`: seconds to wait before sending again, or None to
        stop here."""
        return self.delay(attempt, response) if self.should_retry(attempt, response, error) else None


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
