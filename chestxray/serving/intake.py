"""Reading an upload where it arrives (the HTTP server process): size limit, multipart or raw body, decode.

Why here and not in LitAPI.decode_request: LitServe's batched loop runs decode_request for a whole batch inside one
try block, so one bad file raising HTTPException there fails every request batched with it; and LitServe's own
request parsing accepts only JSON or form bodies, not a raw image body. So this ASGI middleware turns every
POST /predict into the model's view of the image (decoded by chestxray.data.images.model_view, the one decode path
predict.py uses) or a 4xx JSON refusal, before the request reaches LitServe's queue. Decoding in the HTTP
process(es) also runs in parallel with the inference worker, as predict.py's DataLoader workers do.

It runs after chestxray.serving.gate (the token, the waiting limit): nothing here sees an unauthorised request.
Bounded work per upload: the body must arrive within `body_timeout` seconds and below `max_upload_bytes` (else 408,
413); the header is checked against `max_pixels` before any pixel is decoded; decoding runs in a pool of
`decode_threads` threads, off the event loop, so /health and the token's 401s are answered while files decode.

Nothing from the request's content (file names, headers of the image, DICOM tags) is logged: only the reason.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from dataclasses import dataclass
from urllib.parse import parse_qs

import anyio
import anyio.to_thread
import numpy as np
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chestxray.data.images import BadImageError, ImageLimits, check_limits, model_view, read_header

FIELD = "image"  # the multipart field that carries the image
UPLOAD_NAME = "upload"  # what a refusal calls the file: never the client's file name


# python-multipart logs what it could not parse, quoting the body's bytes ('Expected boundary character 121, got
# 122'): nothing of an upload reaches a log, so its loggers are silenced; the client gets the reason in its 400.
for _name in ("python_multipart", "multipart"):  # its name from 0.0.13 on, and before
    logging.getLogger(_name).setLevel(logging.CRITICAL + 1)


class Refused(Exception):
    """A request answered with a 4xx JSON error: the status and the reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass(frozen=True)
class IntakeSettings:
    image_size: int
    limits: ImageLimits
    max_upload_bytes: int
    path: str = "/predict"
    body_timeout: float = 30.0  # seconds the whole body may take to arrive (a slow or endless upload is cut off)
    decode_threads: int = 2  # files decoded at once in this HTTP process


def truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


async def read_body(receive: Receive, limit: int, seconds: float = 30.0) -> bytes:
    """The whole body within `seconds`, refusing (413) as soon as it passes the limit (an endless upload is never
    held whole) and (408) when it is still arriving after `seconds` (a slow one never holds a connection long)."""
    try:
        async with asyncio.timeout(seconds):
            return await _read_body(receive, limit)
    except TimeoutError:
        raise Refused(408, f"the upload took longer than body_timeout={seconds:g} s") from None


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks, total = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Refused(400, "the client went away before the upload ended")
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            raise Refused(413, f"upload larger than max_upload_mb={limit / 1e6:g} MB")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def image_bytes(scope: Scope, body: bytes) -> tuple[bytes, dict[str, str]]:
    """(the image's bytes, the form's other fields) from a multipart form or a raw body."""
    headers = Headers(scope=scope)
    content_type = headers.get("content-type", "").strip().lower()  # media types are case-insensitive (RFC 9110)
    if not content_type.startswith("multipart/form-data"):
        return body, {}

    async def replay() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(scope, replay).form()
    except Exception as err:  # noqa: BLE001 - any malformed form is the client's
        why = err.message if isinstance(err, MultiPartException) else type(err).__name__  # Starlette's own limits
        raise Refused(400, f"malformed multipart form ({why})") from None
    try:
        item = form.get(FIELD)
        if not isinstance(item, UploadFile):
            names = ", ".join(sorted(form.keys())) or "none"
            raise Refused(422, f"no file in the multipart field {FIELD!r} (fields sent: {names})")
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        return await item.read(), fields
    finally:
        await form.close()


@dataclass(frozen=True)
class Upload:
    """An upload decoded: the model's view and the header's facts that the answer carries."""

    view: np.ndarray  # 3 x S x S uint8
    width: int
    height: int
    modality: str = ""  # DICOM only (as predictions.csv's columns)
    view_position: str = ""


def decode(data: bytes, settings: IntakeSettings) -> Upload:
    """The upload decoded, or Refused(422, reason) for a file that is not a usable image (its header is checked
    against the limits before any pixel is decoded)."""
    try:
        header = read_header(data, UPLOAD_NAME, settings.limits)
        check_limits(header, UPLOAD_NAME, settings.limits)
        view = model_view(data, UPLOAD_NAME, settings.image_size, settings.limits)
    except BadImageError as err:
        raise Refused(422, err.reason) from None
    info = header.dicom
    return Upload(view, header.width, header.height, info.modality if info else "", info.view if info else "")


def payload(upload: Upload, gradcam: bool, data: bytes) -> dict:
    """What LitServe queues for the inference worker (JSON: its request parsing takes JSON or forms)."""
    return {
        "view": base64.b64encode(upload.view.tobytes()).decode(),
        "width": upload.width,
        "height": upload.height,
        "modality": upload.modality,
        "view_position": upload.view_position,
        "gradcam": gradcam,
        "image": base64.b64encode(data).decode() if gradcam else None,  # the overlay is drawn over the source
    }


class ImageIntake:
    """ASGI middleware for POST /predict: see the module's docstring. Other routes pass through untouched."""

    def __init__(self, app: ASGIApp, settings: IntakeSettings, monitor=None):
        self.app, self.settings, self.monitor = app, settings, monitor
        self.limiter = anyio.CapacityLimiter(settings.decode_threads)

    def decode(self, data: bytes) -> Upload:
        if self.monitor is not None:
            self.monitor.decodes.inc()  # every upload that reaches the decoder: the tests' spy
        return decode(data, self.settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.settings.path:
            await self.app(scope, receive, send)
            return
        try:
            declared = Headers(scope=scope).get("content-length")
            if declared and declared.isdigit() and int(declared) > self.settings.max_upload_bytes:
                raise Refused(413, f"upload larger than max_upload_mb={self.settings.max_upload_bytes / 1e6:g} MB")
            body = await read_body(receive, self.settings.max_upload_bytes, self.settings.body_timeout)
            data, fields = await image_bytes(scope, body)
            query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode(errors="replace")).items()}
            gradcam = truthy(query.get("gradcam")) or truthy(fields.get("gradcam"))
            upload = await anyio.to_thread.run_sync(self.decode, data, limiter=self.limiter)
        except Refused as refused:
            unread = {"Connection": "close"} if refused.status in (400, 408, 413) else None  # a body not read whole
            await JSONResponse({"error": refused.reason}, status_code=refused.status, headers=unread)(
                scope, receive, send
            )
            return
        encoded = json.dumps(payload(upload, gradcam, data)).encode()
        sent = False

        async def forward() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": encoded, "more_body": False}

        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(encoded)).encode())]
        await self.app({**scope, "headers": headers}, forward, send)
