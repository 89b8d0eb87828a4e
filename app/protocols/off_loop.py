"""Work that grows with the request body runs off the event loop: on a thread, a few at a time, so that the probes
and every other request go on while a large body is parsed (an HTTP body, or a gRPC message's tensor data).

The parsers are bounded by the limits before they walk any data (see `app.protocols.oip.tensors`); this bounds what
is left, the part that is proportional to the body (JSON, base64, tensor data), and keeps it off the loop. Small bodies
parse in microseconds and stay on the loop: a thread round trip would cost more than the parse.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import anyio.to_thread
from anyio import CapacityLimiter
from anyio.lowlevel import RunVar

P = ParamSpec("P")
T = TypeVar("T")

ON_LOOP_BYTES = 64 * 1024  # up to here a parse takes well under a millisecond
PARSE_THREADS = 4  # parses are mostly C holding the GIL or Python: more threads would not parse faster

_limiter: RunVar[CapacityLimiter] = RunVar("parse_limiter")  # one per event loop


async def parse_off_loop(size: int, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`function(*args, **kwargs)`, on a parse thread when `size` (the body's bytes) makes it worth one."""
    if size <= ON_LOOP_BYTES:
        return function(*args, **kwargs)
    return await anyio.to_thread.run_sync(functools.partial(function, *args, **kwargs), limiter=_parse_limiter())


def _parse_limiter() -> CapacityLimiter:
    try:
        return _limiter.get()
    except LookupError:
        limiter = CapacityLimiter(PARSE_THREADS)
        _limiter.set(limiter)
        return limiter
