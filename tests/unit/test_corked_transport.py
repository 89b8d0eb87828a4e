"""A response's head and body leave in one write, so a process killed mid-response never leaves a head alone."""

from __future__ import annotations

import asyncio
from typing import cast

from app.serve.connections import _CorkedTransport


class Recording:
    def __init__(self) -> None:
        self.events: list[tuple[str, bytes]] = []

    def write(self, data: bytes) -> None:
        self.events.append(("write", data))

    def close(self) -> None:
        self.events.append(("close", b""))

    def get_extra_info(self, name: str) -> str:
        return f"info {name}"


async def test_writes_of_one_step_go_out_as_one_and_before_a_close() -> None:
    real = Recording()
    corked = _CorkedTransport(cast(asyncio.Transport, real), asyncio.get_running_loop())
    corked.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    corked.write(b"{}")
    assert real.events == []  # nothing yet: the head waits for the body written in the same step
    await asyncio.sleep(0)
    assert real.events == [("write", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")]

    corked.write(b"next")
    corked.close()  # a close in the same step sends what was written first
    assert real.events[1:] == [("write", b"next"), ("close", b"")]
    await asyncio.sleep(0)
    assert len(real.events) == 3  # the scheduled flush found nothing left
    assert corked.get_extra_info("peername") == "info peername"
