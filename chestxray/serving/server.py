"""serve.py's work: check the settings, build the LitServer with the page and the intake, run until stopped.

LitServe gives /predict (batching, worker processes, accelerator), /health and /info. Its limits, and what is
done about them here:
- Its authorize() runs after the middlewares and the body's parsing: the token is checked instead by
  chestxray.serving.gate, a pure ASGI middleware added last so that it runs outermost, before any body is read.
- /info answers {"model": model_metadata, "server": {...}}: replaced by a route that adds the out-of-distribution
  monitor ("monitor") and whether a token is required.
- It registers its own GET / ("litserve running"); that route is replaced by the web page (plain FastAPI route on
  LitServer.app, which LitServe copies into each HTTP server process).
- Its request parsing takes JSON or forms only: raw bodies and the upload size limit are handled by
  chestxray.serving.intake, a middleware in front of it.
- FastAPI's /docs, /redoc and /openapi.json are removed unless docs=true (and then want the token like the rest).
- FastAPI answers its own errors (404, 405, 422) as {"detail": ...}: handlers here make every error {"error": ...}.
- Its GZip middleware is removed: answers are small, and the gate reads /predict's answers for the monitor.
- LitServer.run accepts only host 0.0.0.0, 127.0.0.1 or :: (it refuses other addresses).

The token never touches disk or argv: it is read from $CHESTXRAY_SERVE_TOKEN or from the file token_file= names,
and held in memory; token= on the command line is refused by serve.py before Hydra records it.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from starlette.responses import HTMLResponse, JSONResponse, Response

from chestxray import settings
from chestxray.data.images import ImageLimits
from chestxray.errors import ConfigError, PredictError, require
from chestxray.serving import connections, signals
from chestxray.serving.token import TOKEN_ON_COMMAND_LINE, TOKEN_VARIABLE, read_token

log = logging.getLogger(__name__)
HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # what LitServer.run accepts
PAGE = Path(__file__).with_name("page.html")
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
SERVE_RULES = [
    *settings.IMAGE_RULES,
    settings._int("port", 1024, 65535),
    settings._int("max_batch_size", 1),
    settings._number("batch_timeout", 0),
    settings._int("workers", 1),
    settings._number("max_upload_mb", 0, low_open=True),
    settings._choice("accelerator", ("auto", "cpu", "cuda", "mps")),
    settings._int("max_pixels", 1),
    settings._int("min_image_side", 1),
    settings._int("max_waiting", 1),
    settings._int("decode_threads", 1),
    settings._number("request_timeout", 0, low_open=True),
    settings._number("body_timeout", 0, low_open=True),
    settings._number("header_timeout", 0, low_open=True),
    settings._int("max_connections", 1),
    settings._int("ood_window", 1),
    settings._bool("docs"),
]


def _listed(value) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list | tuple | ListConfig) else [str(value)]


def check(cfg: DictConfig) -> None:
    """Every serve setting in range before a model loads; one line naming the setting when not."""
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise PredictError(
            "ckpt= is required: the checkpoint to serve, e.g. ckpt=outputs/train/runs/<time>/checkpoints/best.ckpt"
        )
    if "token" in cfg:
        raise ConfigError(TOKEN_ON_COMMAND_LINE)
    settings.check(cfg, SERVE_RULES)
    if str(cfg.host) not in HOSTS:
        raise ConfigError(f"host={cfg.host}: LitServe binds only {', '.join(HOSTS)} (127.0.0.1: this machine only)")


def loopback_warning(host: str, token: bool = False) -> str | None:
    if host in ("127.0.0.1", "::1", "localhost"):
        return None
    return (
        f"serve.py: warning: host={host} serves every network this machine is on; anyone who reaches it can send "
        "images" + ("" if token else f" (set ${TOKEN_VARIABLE} or token_file= to require a Bearer token)")
    )


def build_server(cfg: DictConfig, token: str | None = None):
    """The LitServer for cfg (not started): the gate, the API, its intake middleware, /info, /metrics, the page."""
    ls = require("litserve", "serve", "serve.py")
    require("prometheus_client", "serve", "serve.py")
    from chestxray.serving.api import ClassifierAPI, model_info
    from chestxray.serving.gate import Gate, GateSettings
    from chestxray.serving.intake import ImageIntake, IntakeSettings
    from chestxray.serving.monitor import Monitor

    ckpts = _listed(cfg.ckpt)
    info = model_info(ckpts)
    limits = ImageLimits(
        int(cfg.max_pixels),  # serving's own budget, below training's data.max_pixels
        int(cfg.min_image_side),
        preprocess=info["preprocess"],  # the checkpoint's, as predict.py applies it
        lateral=str(cfg.data.get("lateral", "flag")),
        prefix="",
    )
    api = ClassifierAPI(ckpts, limits, max_batch_size=int(cfg.max_batch_size), batch_timeout=float(cfg.batch_timeout))
    intake = IntakeSettings(
        info["image_size"],
        limits,
        int(float(cfg.max_upload_mb) * 1e6),
        body_timeout=float(cfg.body_timeout),
        decode_threads=int(cfg.decode_threads),
    )
    monitor = Monitor(int(cfg.ood_window), 1 - info["pass_rate"])
    metadata = {
        **info,
        "max_upload_mb": float(cfg.max_upload_mb),
        "max_pixels": int(cfg.max_pixels),
        "token_required": token is not None,
    }
    server = ls.LitServer(
        api,
        accelerator=str(cfg.accelerator),
        workers_per_device=int(cfg.workers),
        model_metadata=metadata,
        middlewares=[(ImageIntake, {"settings": intake, "monitor": monitor})],
        timeout=float(cfg.request_timeout),
        disable_openapi_url=not bool(cfg.docs),
    )
    app = server.app
    app.user_middleware[:] = [m for m in app.user_middleware if m.cls.__name__ != "GZipMiddleware"]
    if not cfg.docs:
        app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in DOCS_PATHS]
    add_error_handlers(app)
    add_page(app)
    add_info_and_metrics(app, server, monitor)
    # added last, so outermost: the token is checked before any other middleware or the body is read
    gate = GateSettings(token, int(cfg.max_waiting), float(cfg.request_timeout), float(cfg.body_timeout))
    app.add_middleware(Gate, settings=gate, monitor=monitor)
    return server


def connection_limits(cfg: DictConfig) -> dict:
    """uvicorn.Config's settings for the connections (chestxray.serving.connections): headers bounded in size and
    time, connections in number."""
    return {
        "http": connections.protocol(float(cfg.header_timeout)),
        "h11_max_incomplete_event_size": connections.MAX_HEADER_BYTES,
        "limit_concurrency": int(cfg.max_connections),
        "server_header": False,  # no "server: uvicorn" in every answer
    }


def add_error_handlers(app) -> None:
    """Every error the framework answers (404, 405, 413, 422, LitServe's 504) as {"error": reason}."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    async def http_error(request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    async def invalid(request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": "malformed request: not what the endpoint reads"}, status_code=422)

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)


def content_policy(html: str) -> str:
    """The page's Content-Security-Policy: its own inline script and style (by their SHA-256) and nothing else runs or
    styles it; it talks to this server only, shows images from its answers (data:) and the chosen file (blob:), and
    no other site may frame it (the token field)."""

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    return (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; connect-src 'self'; "
        "img-src 'self' data: blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def add_page(app) -> None:
    """GET /: the page (no token needed: it holds no data; its requests carry the token the user types)."""
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != "/"]
    html = PAGE.read_text()
    policy = {"Content-Security-Policy": content_policy(html)}

    async def page() -> HTMLResponse:
        return HTMLResponse(html, headers=policy)

    app.add_api_route("/", page, methods=["GET"], include_in_schema=False)


def add_info_and_metrics(app, server, monitor) -> None:
    """GET /info (LitServe's, plus the monitor) and GET /metrics (Prometheus text); both behind the gate's token."""
    from prometheus_client import CONTENT_TYPE_LATEST

    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != server.info_path]

    async def info() -> JSONResponse:
        facts = {"devices": server.devices, "workers_per_device": server.workers_per_device, "timeout": server.timeout}
        return JSONResponse({"model": server.model_metadata, "server": facts, "monitor": monitor.summary()})

    async def metrics() -> Response:
        return Response(monitor.exposition(), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route(server.info_path, info, methods=["GET"], include_in_schema=False)
    app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)


_FORK_HOOKED = []


def serve(cfg: DictConfig) -> dict:
    """Run serve.py until SIGTERM or Ctrl-C (LitServe shuts its processes down); returns what was served."""
    check(cfg)
    token = read_token(cfg.get("token_file"))
    warning = loopback_warning(str(cfg.host), token is not None)
    if warning:
        log.warning(warning)  # Hydra's logging: on the console and in serve.log
    server = build_server(cfg, token)
    if not _FORK_HOOKED:
        os.register_at_fork(after_in_child=signals.quiet_child)
        _FORK_HOOKED.append(True)
    print(
        f"serve.py: page and API on http://{cfg.host}:{cfg.port}/ (POST /predict, GET /health, /info, /metrics)"
        + (" (token required)" if token else ""),
        flush=True,
    )
    server.run(
        host=str(cfg.host),
        port=int(cfg.port),
        generate_client_file=False,
        log_level=str(cfg.log_level),
        **connection_limits(cfg),
    )
    return {"host": str(cfg.host), "port": int(cfg.port)}
