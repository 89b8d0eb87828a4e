"""Connection hygiene, as nginx's defaults give it: every connection makes progress or is closed.

uvicorn's httptools protocol, with what it lacks (uvicorn has only a keep-alive timeout and `limit_concurrency`, whose
refusal is a plain-text 503 that also answers the probes):
- a header timeout: a request's line and headers arrive within `header_timeout_s` (from the connection's start, or
  from a kept-alive request's first byte), else 408 and close; a connection that never sends a byte is closed too;
- a body timeout: `body_timeout_s` at most between two reads of a body, else 408 and close (time the server itself
  is not reading, under flow control, does not count);
- a header limit: `max_header_bytes` for the request line and headers together and `max_header_count` headers, past
  either 431 and close, counted as the bytes arrive (httptools buffers a header in full before it reports it, with
  a copy per chunk: a 16 MB header cost seconds of the loop);
- a connection cap: past `max_connections` open connections, a request is answered 503 `too_many_connections` with
  Retry-After and `Connection: close`, except the probes and /metrics, which are always served;
- a drain that answers what clients sent: uvicorn closes an idle kept-alive connection the moment the drain begins,
  resetting it under a request its client sent just then (the bytes are in the socket, unread); here such a
  connection stays open `DRAIN_IDLE_GRACE_S` more, and a request on it is answered (503 `not_ready`, as every new
  request in the drain) with `Connection: close`.

A subclass of uvicorn's internals, not ASGI middleware: none of this is visible to an ASGI app, which only sees a
request once its headers are complete. It relies on `HttpToolsProtocol`'s parser callbacks, pinned by the tests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.config.settings import Settings
from app.http.telemetry import QUIET_PATHS

log = logging.getLogger(__name__)

ALWAYS_SERVED = QUIET_PATHS  # the probes and /metrics: a full server must still say how it is
# After a refusal (408, 431), what the client still sends is read and dropped this long before the close (nginx's
# lingering close): closed at once with unread bytes, the socket would send a reset, which can destroy the answer.
LINGER_S = 5.0
DRAIN_IDLE_GRACE_S = 1.0  # far longer than a client takes to send its next request on a kept-alive connection


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """The settings of the same names."""

    header_timeout_s: float = 60.0
    body_timeout_s: float = 60.0
    keep_alive_timeout_s: float = 5.0
    max_header_bytes: int = 32 * 1024
    max_header_count: int = 100
    max_connections: int = 1024

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            keep_alive_timeout_s=settings.keep_alive_timeout_s,
            max_header_bytes=settings.max_header_bytes,
            max_header_count=settings.max_header_count,
            max_connections=settings.max_connections,
        )


def protocol_class(limits: ConnectionLimits) -> type[asyncio.Protocol]:
    """uvicorn's `http` protocol class with these limits."""
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), {"limits": limits})


class _HeaderTooLarge(Exception):
    """Raised in a parser callback to stop the parse; the connection is answered 431."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    limits: ClassVar[ConnectionLimits] = ConnectionLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.limits.keep_alive_timeout_s  # type: ignore[assignment]
        self.app = self._capped(self.app)
        self._timer: asyncio.TimerHandle | None = None
        self._reading_head = True  # no request yet, or its line and headers are still arriving
        self._request_started = False  # some byte of the current request has arrived
        self._head_bytes = 0  # raw bytes received while reading the head
        self._parsed_bytes = 0  # the request line and headers as parsed
        self._header_count = 0
        self._requests_read = 0
        self._refusal: tuple[int, str, str] | None = None
        self._draining = False
        self._lingering = False

    # -- the connection's clock --------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.limits.header_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, delay_s: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay_s, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_timed_out(self) -> None:
        self._timer = None
        if not self._request_started:  # silent since it opened: nothing to answer
            self.transport.close()
            return
        self._refuse(
            408, "request_timeout", f"the request's headers did not arrive within {self.limits.header_timeout_s:g} s"
        )

    def _body_timed_out(self) -> None:
        self._timer = None
        if self.flow.read_paused:  # the server is not reading (the app has not taken the last chunk): not the client
            self._arm(self.limits.body_timeout_s, self._body_timed_out)
            return
        cycle = self.cycle
        if cycle.response_started:
            self.transport.close()
            return
        cycle.disconnected = True  # the app's next receive() is http.disconnect, and whatever it sends is dropped
        cycle.message_event.set()
        self._refuse(408, "request_timeout", f"no byte of the request body for {self.limits.body_timeout_s:g} s")

    # -- the parser's callbacks, counted -------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        in_head, requests_read = self._reading_head, self._requests_read
        super().data_received(data)
        if not (in_head and self._reading_head and self._requests_read == requests_read):
            return  # some of these bytes were a body: the parsed count covers the head
        self._head_bytes += len(data)  # all of them are the head, which has not ended yet
        if self._head_bytes > self.limits.max_header_bytes and not self.transport.is_closing():
            self._refuse(431, "headers_too_large", self._header_bytes_message())

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._request_started = True
        if self._timer is None or self._draining:  # a kept-alive connection's next request: `header_timeout_s` too
            self._arm(self.limits.header_timeout_s, self._head_timed_out)

    def on_url(self, url: bytes) -> None:
        self._count_header(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_header_count:
            self._refusal = (431, "too_many_headers", f"more than {self.limits.max_header_count} request headers")
            raise _HeaderTooLarge
        self._count_header(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._reading_head = False
        super().on_headers_complete()
        self.cycle.transport = _CorkedTransport(self.transport, self.loop)  # type: ignore[assignment]
        if self._draining:
            self.cycle.keep_alive = False
        self._arm(self.limits.body_timeout_s, self._body_timed_out)  # disarmed at once if there is no body

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self._arm(self.limits.body_timeout_s, self._body_timed_out)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()
        self._reading_head = True  # what comes next is the next request's head
        self._request_started = False
        self._head_bytes = self._parsed_bytes = self._header_count = 0
        self._requests_read += 1

    def shutdown(self) -> None:
        """The drain began: a connection busy with a request closes after its answer (uvicorn's way); an idle one in
        `DRAIN_IDLE_GRACE_S`, unless a request starts on it meanwhile (then after its answer)."""
        self._draining = True
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
            return
        if self._request_started:  # its head is arriving (under its own timeout): answered, then closed
            return
        self._unset_keepalive_if_required()
        self._arm(DRAIN_IDLE_GRACE_S, self._close_if_idle)

    def _close_if_idle(self) -> None:
        self._timer = None
        if not self._request_started and (self.cycle is None or self.cycle.response_complete):
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a parse error; a callback's refusal stopped the parse here."""
        if self._refusal is not None:
            self._refuse(*self._refusal)
            return
        super().send_400_response(msg)

    def _count_header(self, size: int) -> None:
        self._parsed_bytes += size
        if self._parsed_bytes > self.limits.max_header_bytes:
            self._refusal = (431, "headers_too_large", self._header_bytes_message())
            raise _HeaderTooLarge

    def _header_bytes_message(self) -> str:
        return f"the request line and headers are over {self.limits.max_header_bytes} bytes"

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer `status` with the service's JSON error, and close: the connection cannot go on."""
        self._disarm()
        self._reading_head = False
        if not self.transport.is_closing():
            self.transport.write(_raw_response(status, code, message))
            self._close_lingering()
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
            log.info(
                "%d %s from %s: %s", status, code, client, message, extra={"fields": {"status": status, "code": code}}
            )

    def _close_lingering(self) -> None:
        """Half-close (the answer, then end of stream), read and drop for `LINGER_S`, then close."""
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self._lingering = True
        self.flow.resume_reading()
        self.transport.write_eof()
        self._timer = self.loop.call_later(LINGER_S, self.transport.close)

    # -- the connection cap ---------------------------------------------------------------------------------------

    def _capped(self, app: Any) -> Any:
        cap = self.limits.max_connections

        async def capped(scope: Any, receive: Any, send: Any) -> None:
            if len(self.connections) <= cap or scope.get("path") in ALWAYS_SERVED:
                await app(scope, receive, send)
                return
            body = _error_body(f"the server has over {cap} connections open; retry later", "too_many_connections")
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"1"),
                (b"connection", b"close"),
            ]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        return capped


_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class _CorkedTransport:
    """A request's view of its connection: what the response writes in one event-loop step goes out in one write.

    uvicorn writes a response's head when the app starts it and the body when the app sends it, two system calls.
    A process killed between them (SIGKILL, the OOM killer) would leave its peer with a head and no body, which a
    load balancer has already passed on and can no longer retry elsewhere; as one write, the peer gets all of the
    response or none of it. The write goes out before anything scheduled after it (a close included)."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(bytes(data))

    def flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _error_body(message: str, code: str) -> bytes:
    return orjson.dumps({"error": message, "code": code})


def _raw_response(status: int, code: str, message: str) -> bytes:
    body = _error_body(message, code)
    head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % (
        status,
        _REASONS[status],
        len(body),
    )
    return head + body
