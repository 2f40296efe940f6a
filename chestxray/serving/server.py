"""serve.py's work: check the settings, build the LitServer with the page and the intake, run until stopped.

LitServe gives /predict (batching, worker processes, accelerator), /health and /info. Its limits, and what is
done about them here:
- /info answers {"model": model_metadata, "server": {...}}: the checkpoint's facts go in model_metadata.
- It registers its own GET / ("litserve running"); that route is replaced by the web page (plain FastAPI route on
  LitServer.app, which LitServe copies into each HTTP server process).
- Its request parsing takes JSON or forms only: raw bodies and the upload size limit are handled by
  chestxray.serving.intake, a middleware in front of it.
- LitServer.run accepts only host 0.0.0.0, 127.0.0.1 or :: (it refuses other addresses).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from starlette.responses import HTMLResponse

from chestxray import settings
from chestxray.data.images import ImageLimits
from chestxray.errors import ConfigError, PredictError, require

log = logging.getLogger(__name__)
HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # what LitServer.run accepts
PAGE = Path(__file__).with_name("page.html")
SERVE_RULES = [
    *settings.IMAGE_RULES,
    settings._int("port", 1024, 65535),
    settings._int("max_batch_size", 1),
    settings._number("batch_timeout", 0),
    settings._int("workers", 1),
    settings._number("max_upload_mb", 0, low_open=True),
    settings._choice("accelerator", ("auto", "cpu", "cuda", "mps")),
]


def _listed(value) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list | tuple | ListConfig) else [str(value)]


def check(cfg: DictConfig) -> None:
    """Every serve setting in range before a model loads; one line naming the setting when not."""
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise PredictError(
            "ckpt= is required: the checkpoint to serve, e.g. ckpt=outputs/train/runs/<time>/checkpoints/best.ckpt"
        )
    settings.check(cfg, SERVE_RULES)
    if str(cfg.host) not in HOSTS:
        raise ConfigError(f"host={cfg.host}: LitServe binds only {', '.join(HOSTS)} (127.0.0.1: this machine only)")
    if cfg.token is not None and not str(cfg.token).strip():
        raise ConfigError("token= is empty: give a secret, or null for no token")


def loopback_warning(host: str) -> str | None:
    if host in ("127.0.0.1", "::1", "localhost"):
        return None
    return (
        f"serve.py: warning: host={host} serves every network this machine is on; anyone who reaches it can send "
        "images" + " (token= requires a Bearer token)"
    )


def build_server(cfg: DictConfig):
    """The LitServer for cfg (not started): the API, its intake middleware, /info's facts and the page."""
    ls = require("litserve", "serve", "serve.py")
    from chestxray.serving.api import ClassifierAPI, model_info
    from chestxray.serving.intake import ImageIntake, IntakeSettings

    ckpts = _listed(cfg.ckpt)
    info = model_info(ckpts)
    limits = ImageLimits(
        cfg.data.max_pixels,
        cfg.data.min_image_side,
        preprocess=info["preprocess"],  # the checkpoint's, as predict.py applies it
        lateral=str(cfg.data.get("lateral", "flag")),
        prefix="data.",
    )
    token = None if cfg.token is None else str(cfg.token)
    api = ClassifierAPI(
        ckpts, limits, token, max_batch_size=int(cfg.max_batch_size), batch_timeout=float(cfg.batch_timeout)
    )
    intake = IntakeSettings(info["image_size"], limits, int(float(cfg.max_upload_mb) * 1e6))
    server = ls.LitServer(
        api,
        accelerator=str(cfg.accelerator),
        workers_per_device=int(cfg.workers),
        model_metadata={**info, "max_upload_mb": float(cfg.max_upload_mb), "token_required": token is not None},
        middlewares=[(ImageIntake, {"settings": intake})],
        timeout=float(cfg.request_timeout),
    )
    add_page(server.app)
    return server


def add_page(app) -> None:
    """GET /: the page (no token needed: it holds no data; its requests carry the token the user types)."""
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != "/"]
    html = PAGE.read_text()

    async def page() -> HTMLResponse:
        return HTMLResponse(html)

    app.add_api_route("/", page, methods=["GET"], include_in_schema=False)


def serve(cfg: DictConfig) -> dict:
    """Run serve.py until SIGTERM or Ctrl-C (LitServe shuts its processes down); returns what was served."""
    check(cfg)
    warning = loopback_warning(str(cfg.host))
    if warning:
        print(warning, file=sys.stderr, flush=True)
        log.warning(warning)
    server = build_server(cfg)
    print(
        f"serve.py: page and API on http://{cfg.host}:{cfg.port}/ (POST /predict, GET /health, GET /info)", flush=True
    )
    server.run(host=str(cfg.host), port=int(cfg.port), generate_client_file=False, log_level=str(cfg.log_level))
    return {"host": str(cfg.host), "port": int(cfg.port)}
