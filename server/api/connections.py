"""What one TCP connection may hold of the server: header size, time to send a request, and how
many connections there are at once.

uvicorn bounds none of these on its own: a fresh socket that sends nothing, or half its headers, is
held until the client leaves (76 s and counting was observed), and its httptools parser took a
100 MiB header. `BoundedH11` is uvicorn's h11 protocol with three limits added:
- headers: at most `HEADER_BYTES`, the request line included (431 past it, and the connection is
  closed; h11's own bound only applies to headers that arrive in pieces);
- time: a request's headers must be complete within `header_seconds` of its first byte (or of the
  connection opening); the body has `body_seconds` more, enforced where it is read (the Guard);
- count: past `max_connections` open connections, a new one is closed as soon as it is accepted.
Idle keep-alive connections still close after uvicorn's keep-alive timeout.
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.api.errors import error_response

log = logging.getLogger(__name__)

HEADER_BYTES = 64 * 1024  # the request line and every header together

# Written to the socket by hand: the request never reaches the app, whose responses these are.
_TOO_LARGE = error_response(431, f"request headers over {HEADER_BYTES} bytes", code="headers_too_large").body
_TOO_LARGE_RESPONSE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: " + str(len(_TOO_LARGE)).encode() + b"\r\n\r\n" + _TOO_LARGE
)


def bounded_h11(header_seconds: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the limits above (a class per server: uvicorn instantiates it)."""

    class BoundedH11(H11Protocol):
        _timer: asyncio.TimerHandle | None = None
        _head = b""  # the current request's bytes so far, while its headers are incomplete

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE:
                self._head += data[: HEADER_BYTES + 4]
                end = self._head.find(b"\r\n\r\n")
                if (end < 0 and len(self._head) > HEADER_BYTES) or end > HEADER_BYTES:
                    self.transport.write(_TOO_LARGE_RESPONSE)
                    self.transport.close()
                    return
            super().data_received(data)

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.warning("refusing a connection: %d open (--max-connections)", len(self.connections) - 1)
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._timer = self.loop.call_later(header_seconds, self._headers_overdue)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _headers_overdue(self) -> None:
            # Still waiting for a request's headers (h11's IDLE: none, or a part): the client is
            # too slow, or not sending at all.
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:
                self._disarm()  # the headers are in; the body's time is the Guard's
                self._head = b""

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request's headers have the same time

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return BoundedH11
