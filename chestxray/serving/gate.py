"""The server's front door: a pure ASGI middleware added last, so that it runs OUTERMOST, before LitServe's
middlewares, FastAPI's routing and the upload intake (chestxray.serving.intake) have read a byte of the body.

In this order, for every HTTP request:
0. the size of its request line and headers: above MAX_HEADER_BYTES, 431 (h11 already refuses headers still
   incomplete past it; complete ones that arrived in one read are refused here);
1. the token: with one configured, a request without `Authorization: Bearer <token>` (the scheme in any case) is
   answered 401 at once (compared in constant time), whatever its body; only the page (GET /) is open, as it holds
   no data;
2. the waiting limit: beyond `max_waiting` uploads in progress, POST /predict is answered 503 with Retry-After;
3. the request's deadline: no response started within `request_timeout` seconds is answered 504;
4. one access-log line (method, path with its control characters escaped and cut at LOGGED_PATH characters, status,
   milliseconds: nothing else of the request) and the metrics.

Every response gets SECURITY_HEADERS (no sniffing, no framing, no caching of answers, no referrer). Every refusal
here is `{"error": reason}`, as the framework's own errors are (chestxray.serving.server), and closes the connection
(`Connection: close`): a refused client's body is not read, and the connection is not kept for it. WebSocket
connections are closed unopened: no route takes one, and they would pass the token check by another door.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chestxray.serving.connections import MAX_HEADER_BYTES
from chestxray.serving.monitor import Monitor

log = logging.getLogger("chestxray.serving.access")
OPEN_PATHS = frozenset({"/"})  # the page: no data in it; its requests carry the token the user types
PREDICT = "/predict"
UNAUTHORISED = "missing or wrong token: send the header 'Authorization: Bearer <token>'"
LOGGED_PATH = 200  # characters of a request's path in its access-log line: a client chooses its length
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),  # answers are about a patient's image: no cache keeps them
]


@dataclass(frozen=True)
class GateSettings:
    token: str | None  # held in memory only: never logged, written or put in argv
    max_waiting: int  # POST /predict in progress (body, decode, queue, model) beyond which 503
    request_timeout: float  # seconds a request may wait for its answer once its body has arrived
    body_timeout: float = 0.0  # seconds its body may take to arrive: the deadline for a response is the sum
    retry_after: int = 1  # seconds a 503 asks the client to wait


def authorised(headers: Headers, token: str | None) -> bool:
    """True without a token; else whether the Authorization header is 'Bearer <token>'. The scheme is compared without
    case, as RFC 9110 says clients may send it ('bearer'); the token exactly, in constant time."""
    if token is None:
        return True
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    sent = credentials.lstrip(" ").encode("utf-8", "surrogateescape")  # RFC 6750: 1*SP between scheme and token
    return hmac.compare_digest(sent, token.encode()) and scheme.lower() == "bearer"


def printable(text: str, limit: int = LOGGED_PATH) -> str:
    """`text` for a log line: control characters (a %0A in a URL is a newline once decoded) and backslashes escaped,
    so a client cannot end the access line and forge another; cut at `limit` characters, so it cannot fill the log."""
    cut = text[:limit]
    shown = "".join(c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode("ascii") for c in cut)
    return shown + (f"... ({len(text)} characters)" if len(text) > limit else "")


def route_of(path: str) -> str:
    """The metrics' endpoint label: a known route, or 'other' (a label per unknown path would grow without end)."""
    return path if path in ("/", PREDICT, "/health", "/info", "/metrics") else "other"


async def refuse(send: Send, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
    """Answer {"error": reason} without reading the request's body, and close the connection after it."""
    response = JSONResponse({"error": reason}, status_code=status, headers={**(headers or {}), "Connection": "close"})
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


class Gate:
    """See the module's docstring."""

    def __init__(self, app: ASGIApp, settings: GateSettings, monitor: Monitor):
        self.app, self.settings, self.monitor = app, settings, monitor
        self.waiting = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # policy violation: no route takes one
            log.info("WEBSOCKET %s refused", printable(scope["path"]))
            return
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        method, path = scope["method"], scope["path"]
        status = [0]
        answer = bytearray()  # a /predict answer, read for the out-of-distribution window
        watch = path == PREDICT and method == "POST"

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            elif message["type"] == "http.response.body" and watch and status[0] == 200 and len(answer) < 1 << 22:
                answer.extend(message.get("body", b""))
            await send(message)

        counted = False
        try:
            size = len(scope.get("raw_path") or b"") + sum(len(k) + len(v) + 4 for k, v in scope["headers"])
            if size > MAX_HEADER_BYTES:  # h11 stops headers still arriving past it; these arrived in one read
                await refuse(sending, 431, f"request line and headers above {MAX_HEADER_BYTES // 1024} KiB")
                return
            if path not in OPEN_PATHS and not authorised(Headers(scope=scope), self.settings.token):
                await refuse(sending, 401, UNAUTHORISED, {"WWW-Authenticate": "Bearer"})
                return
            if watch:
                if self.waiting >= self.settings.max_waiting:
                    reason = f"busy: {self.waiting} uploads in progress (max_waiting={self.settings.max_waiting})"
                    await refuse(sending, 503, reason, {"Retry-After": str(self.settings.retry_after)})
                    return
                self.waiting += 1
                counted = True
                self.monitor.waiting.set(self.waiting)
            try:
                async with asyncio.timeout(self.settings.request_timeout + self.settings.body_timeout):
                    await self.app(scope, receive, sending)
            except TimeoutError:
                if status[0] == 0:
                    reason = (
                        f"no answer within request_timeout={self.settings.request_timeout:g} s "
                        f"(after body_timeout={self.settings.body_timeout:g} s for the upload)"
                    )
                    await refuse(sending, 504, reason)
        except Exception as err:  # noqa: BLE001 - one line, no request content; the client gets {"error"}
            log.error("%s %s failed: %s", printable(method), printable(path), type(err).__name__)
            if status[0] == 0:
                await refuse(sending, 500, "internal error")
        finally:
            if counted:
                self.waiting -= 1
                self.monitor.waiting.set(self.waiting)
            ms = 1000 * (time.perf_counter() - start)
            log.info("%s %s %d %.0f ms", printable(method), printable(path), status[0], ms)
            self.monitor.request(route_of(path), status[0], ms / 1000)
            if watch and status[0] == 200:
                self.monitor.answered(flag_of(bytes(answer)))


def flag_of(body: bytes) -> bool | None:
    """The answer's in_distribution (None when not scored, or not readable)."""
    try:
        value = json.loads(body).get("in_distribution")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, bool) else None
