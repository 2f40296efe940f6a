"""The HTTP server's connections: uvicorn's h11 protocol, with a deadline on every request's headers.

uvicorn's default parser (httptools) takes headers of any size, and no uvicorn protocol limits how long a client may
take to send them: a client without a token can hold connections open (a byte every few seconds) or grow the
process (one endless header) without the gate, which runs once the headers are complete, ever seeing it. Here:
- h11 stops reading headers still incomplete past MAX_HEADER_BYTES (uvicorn answers 400; whole headers that came
  in one read are refused by the gate, 431), so one endless header never grows the process;
- HeaderDeadline closes a connection whose request headers are not complete `header_timeout` seconds after it
  opened, or after the previous response on it (keep-alive), whatever arrives in between;
- uvicorn's limit_concurrency (serve.py max_connections) answers 503 beyond that many connections and requests.
Written here because uvicorn has no setting for the deadline (its keep-alive timer stops at a connection's first
byte); it leans on H11Protocol's `cycle`, `loop`, `transport` and `on_response_complete` (tested with uvicorn
0.55, the version .ci/constraints.txt pins).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_HEADER_BYTES = 16 * 1024  # h11's own default, said here: a request line and headers of at most this


class HeaderDeadline(H11Protocol):
    """H11Protocol that closes a connection whose request headers are late (see the module's docstring)."""

    header_timeout = 10.0  # serve.py header_timeout: set on a subclass by protocol()
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()  # a request's headers are complete: the gate and request_timeout take over

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._arm()  # the next request's headers, on a kept-alive connection
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.header_timeout, self._late)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _late(self) -> None:
        self._deadline = None
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()


def protocol(header_timeout: float) -> type[HeaderDeadline]:
    """The protocol class uvicorn.Config(http=...) takes, with this deadline."""
    return type("HeaderDeadline", (HeaderDeadline,), {"header_timeout": float(header_timeout)})
