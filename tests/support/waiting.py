"""Waiting for an event another task or thread causes: bounded, and never a timing assumption."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def wait_until(condition: Callable[[], bool], *, timeout_s: float = 10.0) -> None:
    """Wait, bounded, for a condition another task or thread makes true (not a timing assumption)."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - the condition is set by threads and plain attributes
            await asyncio.sleep(0.005)
