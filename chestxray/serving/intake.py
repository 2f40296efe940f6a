"""Reading an upload where it arrives (the HTTP server process): size limit, multipart or raw body, decode.

Why here and not in LitAPI.decode_request: LitServe's batched loop runs decode_request for a whole batch inside one
try block, so one bad file raising HTTPException there fails every request batched with it; and LitServe's own
request parsing accepts only JSON or form bodies, not a raw image body. So this ASGI middleware turns every
POST /predict into the model's view of the image (decoded by chestxray.data.images.model_view, the one decode path
predict.py uses) or a 4xx JSON refusal, before the request reaches LitServe's queue. Decoding in the HTTP
process(es) also runs in parallel with the inference worker, as predict.py's DataLoader workers do.

Nothing from the request's content (file names, headers of the image, DICOM tags) is logged: only the reason.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from urllib.parse import parse_qs

import numpy as np
from starlette.datastructures import Headers, UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chestxray.data.images import BadImageError, ImageLimits, model_view, read_header

FIELD = "image"  # the multipart field that carries the image
UPLOAD_NAME = "upload"  # what a refusal calls the file: never the client's file name


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


def truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole body, refusing (413) as soon as it passes the limit: an endless upload is never held whole."""
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
    content_type = headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        return body, {}

    async def replay() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(scope, replay).form()
    except Exception as err:  # noqa: BLE001 - any malformed form is the client's
        raise Refused(400, f"malformed multipart form ({type(err).__name__})") from None
    try:
        item = form.get(FIELD)
        if not isinstance(item, UploadFile):
            names = ", ".join(sorted(form.keys())) or "none"
            raise Refused(422, f"no file in the multipart field {FIELD!r} (fields sent: {names})")
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        return await item.read(), fields
    finally:
        await form.close()


def decode(data: bytes, settings: IntakeSettings) -> tuple[np.ndarray, int, int]:
    """(3 x S x S uint8 view, width, height as read), or Refused(422, reason) for a file that is not a usable image."""
    try:
        header = read_header(data, UPLOAD_NAME)
        return model_view(data, UPLOAD_NAME, settings.image_size, settings.limits), header.width, header.height
    except BadImageError as err:
        raise Refused(422, err.reason) from None


def payload(view: np.ndarray, width: int, height: int, gradcam: bool, data: bytes) -> dict:
    """What LitServe queues for the inference worker (JSON: its request parsing takes JSON or forms)."""
    return {
        "view": base64.b64encode(view.tobytes()).decode(),
        "width": width,
        "height": height,
        "gradcam": gradcam,
        "image": base64.b64encode(data).decode() if gradcam else None,  # the overlay is drawn over the source
    }


class ImageIntake:
    """ASGI middleware for POST /predict: see the module's docstring. Other routes pass through untouched."""

    def __init__(self, app: ASGIApp, settings: IntakeSettings):
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.settings.path:
            await self.app(scope, receive, send)
            return
        try:
            declared = Headers(scope=scope).get("content-length")
            if declared and declared.isdigit() and int(declared) > self.settings.max_upload_bytes:
                raise Refused(413, f"upload larger than max_upload_mb={self.settings.max_upload_bytes / 1e6:g} MB")
            body = await read_body(receive, self.settings.max_upload_bytes)
            data, fields = await image_bytes(scope, body)
            query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
            gradcam = truthy(query.get("gradcam")) or truthy(fields.get("gradcam"))
            view, width, height = decode(data, self.settings)
        except Refused as refused:
            await JSONResponse({"error": refused.reason}, status_code=refused.status)(scope, receive, send)
            return
        encoded = json.dumps(payload(view, width, height, gradcam, data)).encode()
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
