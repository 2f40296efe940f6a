"""serve.py: the real server on a free loopback port answers every endpoint, gives predict.py's probabilities,
refuses every bad upload with a 4xx JSON reason and goes on serving, wants the token when one is set, stops on
SIGTERM; its page works in headless Chromium."""

from __future__ import annotations

import base64
import csv
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests

from chestxray.data.images import ImageLimits
from chestxray.errors import ConfigError
from chestxray.inference import predict as predict_module
from chestxray.serving.api import build_answer, warnings_for
from chestxray.serving.intake import IntakeSettings, Refused, decode, image_bytes
from chestxray.serving.server import check, loopback_warning
from chestxray.serving.token import TOKEN_VARIABLE
from tests.conftest import CLASSES, ROOT, compose_config, predict_config
from tests.test_images import png_bytes


def serve_config(*overrides: str):
    return compose_config("serve", ["ckpt=x.ckpt", *overrides])


# --- fast: settings and the answer's builder ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("port=80", "port=80"),
        ("host=10.1.2.3", "host=10.1.2.3: LitServe binds only"),
        ("max_batch_size=0", "max_batch_size=0"),
        ("max_upload_mb=0", "max_upload_mb=0"),
        ("accelerator=tpu", "accelerator=tpu"),
        ("max_pixels=0", "max_pixels=0"),
        ("max_waiting=0", "max_waiting=0"),
        ("+token=s3cret", "token= on the command line is refused"),
    ],
)
def test_bad_settings_are_refused_in_one_line_naming_the_setting(override, message):
    with pytest.raises(ConfigError, match=message):
        check(serve_config(override))


def test_only_non_loopback_hosts_are_warned_about():
    assert loopback_warning("127.0.0.1") is None
    assert "host=0.0.0.0 serves every network" in loopback_warning("0.0.0.0")


def test_the_answer_is_predict_py_row_nan_is_not_scored_and_new_columns_pass_through(monkeypatch):
    from chestxray.data.images import ImageTags
    from chestxray.serving import api

    probs = np.array([0.2, 0.7, 0.1], np.float32)
    plain = build_answer(CLASSES, probs, 100, 80, float("nan"))
    assert plain["class"] == "Covid" and plain["width"] == 100 and plain["height"] == 80
    assert plain["ood_score"] is None and plain["in_distribution"] is None and plain["ood"] == "not scored"
    assert "prediction_set" not in plain and plain["modality"] == "" and plain["view"] == ""
    assert not any("out of distribution" in n for n in warnings_for(plain, calibrated=True, image_size=64))
    lateral = ImageTags("DX", "LL")
    rich = build_answer(CLASSES, probs, 100, 80, 3.5, np.array([False, True, True]), lateral)
    assert rich["ood_score"] == 3.5 and rich["in_distribution"] is False and rich["ood"] == "out of distribution"
    assert rich["prediction_set"] == ["Covid", "Viral Pneumonia"] and (rich["modality"], rich["view"]) == ("DX", "LL")
    notes = warnings_for(rich, calibrated=True, image_size=224)
    assert any("out of distribution" in n for n in notes) and any("enlarged" in n for n in notes)
    assert any("lateral view (ViewPosition LL)" in n for n in notes)
    assert warnings_for(build_answer(CLASSES, probs, 100, 80, -1.0), calibrated=True, image_size=64) == []
    shared = api.prediction_row  # another column from the shared per-image code reaches the answer as it is
    monkeypatch.setattr(api, "prediction_row", lambda *a, **k: shared(*a, **k) | {"confidence": "0.7", "accepted": "0"})
    extended = build_answer(CLASSES, probs, 100, 80, -1.0)
    assert extended["confidence"] == 0.7 and extended["accepted"] == 0
    assert any("not accepted" in n for n in warnings_for(extended, calibrated=True, image_size=64))


def test_an_adapted_checkpoint_is_served_with_predict_py_confidence_gate_included(tmp_path, monkeypatch):
    """serve's inference step gives the confidence and acceptance predict.py gives (chestxray.models.selection),
    with the gate of an adapted checkpoint: a site image the recalibrated flag passes but the trained detector
    does not is served in distribution and still ranked below the others (confidence below 0)."""
    import torch

    from chestxray.models.classifier import Probabilities
    from chestxray.models.selection import select
    from chestxray.serving import api, signals
    from tests.test_ood import fitted_checkpoint, images, recalibrated, save_as_checkpoint

    _, path = fitted_checkpoint(tmp_path)
    bright = (200 + images(12, seed=10) // 8).to(torch.uint8)  # unlike the random 'training' images
    adapted = save_as_checkpoint(recalibrated(path, bright), path, tmp_path / "adapted.ckpt")
    monkeypatch.setattr(signals, "quiet_child", lambda: None)  # not a child process here
    served = api.ClassifierAPI([str(adapted)], ImageLimits(10**8, 1))
    served.setup("cpu")
    x = torch.cat([bright[:4], images(4, seed=3)])
    answers = served.predict([{"view": view, "width": 32, "height": 32} for view in x])
    with torch.no_grad():
        probs, margin, _, gate = Probabilities(served.models).answers(x)
    chosen = select(served.models, probs.numpy(), margin.double().numpy(), gate.double().numpy())
    assert [a["confidence"] for a in answers] == pytest.approx(chosen.confidence.tolist(), abs=1e-6)
    assert [a["accepted"] for a in answers] == [int(k) for k in chosen.accepted]
    assert any(a["in_distribution"] and a["confidence"] < 0 for a in answers[:4])


def test_the_token_comes_from_the_environment_or_a_file_never_the_command_line(tmp_path):
    from chestxray.serving.token import TOKEN_VARIABLE, read_token, token_argument

    assert token_argument(["ckpt=a", "token=x"]) and token_argument(["+token=x"]) and token_argument(["++token=x"])
    assert not token_argument(["ckpt=a", "token_file=/t", "port=8000"])
    long = "s3cret-0123456789abcdef"
    assert read_token(None, {}) is None and read_token(None, {TOKEN_VARIABLE: f" {long}\n"}) == long
    secret = tmp_path / "token"
    secret.write_text("f1le-secret-0123456789\n")
    assert read_token(str(secret), {TOKEN_VARIABLE: "other"}) == "f1le-secret-0123456789"
    assert read_token(None, {TOKEN_VARIABLE: "Tr0ub4dor&3-horse!battery#staple"}).endswith("#staple")  # a manager's
    for bad, why in (("s3cret", "shorter than 16"), ("pässwört-секрет-2024", "only printable ASCII")):
        with pytest.raises(ConfigError, match=rf"^\${TOKEN_VARIABLE}: the token .*{why}.*token_urlsafe") as err:
            read_token(None, {TOKEN_VARIABLE: bad})  # a client could guess it, or never send it as it is
        assert bad not in str(err.value)
    secret.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        read_token(str(secret), {})
    with pytest.raises(ConfigError, match="cannot be read") as err:
        read_token(str(tmp_path / "absent"), {})
    assert "f1le" not in str(err.value)
    with pytest.raises(ConfigError, match="set but empty"):
        read_token(None, {TOKEN_VARIABLE: " "})
    refused = subprocess.run(
        [sys.executable, "serve.py", "ckpt=x.ckpt", "token=s3cret"], cwd=ROOT, capture_output=True, text=True
    )
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and TOKEN_VARIABLE in refused.stderr and "s3cret" not in refused.stderr


def test_the_token_check_is_exact_and_the_drift_alarm_is_a_one_sided_binomial_test():
    from starlette.datastructures import Headers

    from chestxray.serving.gate import authorised
    from chestxray.serving.monitor import Monitor, drift_alarm

    assert authorised(Headers({}), None)
    for sent in ("Bearer s3cret", "bearer s3cret", "BEARER s3cret", "Bearer  s3cret"):  # RFC 9110: scheme in any case
        assert authorised(Headers({"authorization": sent}), "s3cret"), sent
    for sent in ("Bearer s3cre", "Bearer s3cret ", "Basic s3cret", "Bearers3cret", "s3cret", "", "Bearer \u00e9"):
        assert not authorised(Headers({"authorization": sent}), "s3cret"), sent
    assert not drift_alarm(8, 100, 0.05).raised  # 8% flagged where 5% are expected: chance
    assert drift_alarm(20, 100, 0.05).raised and drift_alarm(20, 100, 0.05).p_value < 1e-5
    assert not drift_alarm(0, 0, 0.05).raised
    monitor = Monitor(window=50, expected_flagged=0.05)
    for k in range(60):
        monitor.answered(k % 3 != 0)  # a third flagged
    monitor.answered(None)  # not scored: not counted
    summary = monitor.summary()
    assert summary["scored"] == 50 and summary["alarm"] is True and monitor.logged
    assert b"chestxray_ood_flagged_share" in monitor.exposition()


def test_the_access_line_of_a_forged_path_stays_one_line_and_a_lowercase_bearer_passes_the_gate(caplog):
    """The gate, driven as ASGI: a path with a decoded %0A cannot end its access line and write a forged one; the
    token is wanted, in any case of 'Bearer'."""
    import asyncio

    from chestxray.serving.gate import Gate, GateSettings
    from chestxray.serving.monitor import Monitor

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def status_of(path: str, authorization: str) -> int:
        sent = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": path, "headers": [(b"authorization", authorization.encode())]}
        await gate(scope, None, send)
        return sent[0]["status"]

    gate = Gate(app, GateSettings("s3cret", max_waiting=1, request_timeout=5), Monitor(10, None))
    forged = "/x\n[2026-12-07 00:00:00,000][chestxray.serving.access][INFO] - POST /predict 200 5 ms\r\\n"
    with caplog.at_level(logging.INFO, logger="chestxray.serving.access"):
        assert asyncio.run(status_of(forged, "Bearer wrong")) == 401
        assert asyncio.run(status_of("/health", "bearer s3cret")) == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "chestxray.serving.access"]
    assert len(lines) == 2 and all("\n" not in line and "\r" not in line for line in lines), lines
    escaped = re.escape(forged.encode("unicode_escape").decode("ascii"))  # the newline as \n, the backslash as \\
    assert re.fullmatch(rf"GET {escaped} 401 \d+ ms", lines[0]), lines[0]
    assert re.fullmatch(r"GET /health 200 \d+ ms", lines[1]), lines[1]


def test_refusals_close_the_connection_every_answer_has_security_headers_and_websockets_are_refused(caplog):
    """A refused client's connection is not kept for its body; no answer may be sniffed, framed, cached or sent a
    referrer; a WebSocket handshake never reaches a route; a 504 names the settings it waited for; headers above
    16 KiB get 431; a path's access line is cut at LOGGED_PATH characters."""
    import asyncio

    from chestxray.serving.gate import LOGGED_PATH, Gate, GateSettings
    from chestxray.serving.monitor import Monitor

    async def app(scope, receive, send):
        if scope["path"] == "/slow":
            await asyncio.sleep(5)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def exchange(scope) -> list[dict]:
        sent = []

        async def send(message):
            sent.append(message)

        await gate(scope, None, send)
        return sent

    def http(path: str, token: str, extra: int = 0) -> dict:
        headers = [(b"authorization", f"Bearer {token}".encode()), (b"x-a", b"a" * extra)]
        start = asyncio.run(exchange({"type": "http", "method": "GET", "path": path, "headers": headers}))[0]
        return {"status": start["status"], **{k.decode(): v.decode() for k, v in start["headers"]}}

    gate = Gate(app, GateSettings("s3cret", 1, request_timeout=0.2, body_timeout=0.1), Monitor(10, None))
    long_path = "/" + "a" * 5000
    with caplog.at_level(logging.INFO, logger="chestxray.serving.access"):
        refused, served, late = http(long_path, "wrong"), http("/health", "s3cret"), http("/slow", "s3cret")
        closed = asyncio.run(exchange({"type": "websocket", "path": "/predict", "headers": []}))
    assert refused["status"] == 401 and refused["connection"] == "close"
    assert served["status"] == 200 and "connection" not in served
    assert late["status"] == 504 and late["connection"] == "close"
    large = http("/health", "s3cret", extra=17 * 1024)  # whole headers above 16 KiB, arrived in one read
    assert large["status"] == 431 and large["connection"] == "close"
    for answer in (refused, served, late):
        assert answer["x-content-type-options"] == "nosniff" and answer["x-frame-options"] == "DENY"
        assert answer["cache-control"] == "no-store" and answer["referrer-policy"] == "no-referrer"
    assert closed == [{"type": "websocket.close", "code": 1008}]
    lines = [r.getMessage() for r in caplog.records if r.name == "chestxray.serving.access"]
    assert lines[0] == f"GET /{'a' * (LOGGED_PATH - 1)}... (5001 characters) 401" + lines[0].split("401", 1)[1]
    assert len(lines[0]) < LOGGED_PATH + 40 and lines[-1] == "WEBSOCKET /predict refused"
    body = json.loads(asyncio.run(exchange({"type": "http", "method": "GET", "path": "/slow", "headers": [
        (b"authorization", b"Bearer s3cret")]}))[1]["body"])  # fmt: skip
    assert body == {"error": "no answer within request_timeout=0.2 s (after body_timeout=0.1 s for the upload)"}


def test_slow_or_endless_request_headers_are_cut_off_and_a_slow_answer_is_not():
    """No token is needed to send headers: a client that sends them a byte at a time, or without end, loses its
    connection (header_timeout, MAX_HEADER_BYTES); a request whose headers arrived waits for its answer however
    long the answer takes, and a kept-alive connection serves a second request."""
    import threading

    import uvicorn

    from chestxray.serving import connections

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        if scope["path"] == "/slow":
            await __import__("asyncio").sleep(1.5)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="error", lifespan="off", http=connections.protocol(1.0),
        h11_max_incomplete_event_size=connections.MAX_HEADER_BYTES,
    )  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as slow:
            start = time.monotonic()
            slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            with pytest.raises((ConnectionError, OSError)):  # a header byte every 0.3 s: cut off after 1 s
                for _ in range(20):
                    time.sleep(0.3)
                    slow.sendall(b"X")
            assert 0.9 < time.monotonic() - start < 3
        with socket.create_connection(("127.0.0.1", port), timeout=5) as endless:
            endless.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-a: " + b"a" * (connections.MAX_HEADER_BYTES + 10))
            assert endless.recv(100).startswith(b"HTTP/1.1 400")
        with requests.Session() as session:  # one kept-alive connection: a slow answer, then another request
            assert session.get(f"http://127.0.0.1:{port}/slow", timeout=10).text == "ok"
            time.sleep(0.5)
            assert session.get(f"http://127.0.0.1:{port}/", timeout=10).text == "ok"
    finally:
        server.should_exit = True
        thread.join(10)


def test_an_upload_refused_unread_closes_its_connection_and_a_form_of_too_many_files_says_so(caplog):
    """413 (declared too large: the body is never read) closes the connection; a 422 after a whole body does not;
    Starlette's own multipart limit is named, not just its exception's class; python-multipart's complaints, which
    quote the body's bytes, reach no log."""
    import asyncio

    from chestxray.serving.intake import ImageIntake

    async def answer(headers: list, body: bytes) -> dict:
        sent = []

        async def send(message):
            sent.append(message)

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        scope = {"type": "http", "method": "POST", "path": "/predict", "headers": headers, "query_string": b""}
        await ImageIntake(None, IntakeSettings(32, ImageLimits(), 1000))(scope, receive, send)
        return {"status": sent[0]["status"], **{k.decode(): v.decode() for k, v in sent[0]["headers"]}, "body": sent[1]}

    large = asyncio.run(answer([(b"content-length", b"10000000000")], b""))
    assert large["status"] == 413 and large["connection"] == "close"
    junk = asyncio.run(answer([(b"content-length", b"5")], b"hello"))
    assert junk["status"] == 422 and "connection" not in junk
    part = b'--b\r\nContent-Disposition: form-data; name="f%d"; filename="x"\r\n\r\nx\r\n'
    form = b"".join(part % i for i in range(1001)) + b"--b--\r\n"
    multipart = {"type": "http", "headers": [(b"content-type", b"multipart/form-data; boundary=b")]}
    with pytest.raises(Refused, match=r"malformed multipart form \(Too many files. Maximum number of files is 1000.\)"):
        asyncio.run(image_bytes(multipart, form))
    with caplog.at_level(logging.DEBUG), pytest.raises(Refused, match=r"^malformed multipart form \(Invalid"):
        asyncio.run(image_bytes(multipart, b"--bx\r\nsecret"))
    assert not [r for r in caplog.records if r.name.startswith("python_multipart")]


def test_a_deflated_dicom_bomb_is_refused_while_inflating_and_grey_dicom_decodes_without_float64_copies():
    import tracemalloc

    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from chestxray.data import dicom
    from chestxray.data.images import BadImageError, read_header
    from tests.test_dicom import dataset

    ds = dataset(np.zeros((2000, 2000), np.uint16))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = __import__("io").BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    bomb = buffer.getvalue()
    assert len(bomb) < 100_000
    with pytest.raises(BadImageError, match=r"declares 4,000,000 pixels, above data.max_pixels=1,000 \(refused before"):
        read_header(bomb, "upload", ImageLimits(max_pixels=1000))
    assert read_header(bomb, "upload", ImageLimits(max_pixels=4_000_000)).width == 2000
    ramp = (np.arange(3000 * 3000, dtype=np.uint32) % 4096).astype(np.uint16).reshape(3000, 3000)
    ds = dataset(ramp, 12, RescaleSlope=2, RescaleIntercept=-1)
    ds = dicom.read_dataset(save_bytes(ds))
    info = dicom.info_of(ds)
    stored_bytes = ramp.nbytes
    ds.pixel_array  # noqa: B018 - decoded once, outside the measurement
    tracemalloc.start()
    grey = dicom.decode_pixels(ds, info)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert grey.dtype == np.uint8 and grey.shape == ramp.shape
    assert peak < 2 * stored_bytes, peak  # the pixels decoded once and the uint8 result; float64 copies: 8x
    expected = np.clip(np.rint((ramp.astype(np.float64) * 2 - 1 + 1) * 255 / 8190), 0, 255).astype(np.uint8)
    assert np.abs(grey.astype(int) - expected.astype(int)).max() <= 1


def save_bytes(ds) -> bytes:
    buffer = __import__("io").BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_intake_refuses_bad_files_with_the_reason_and_decodes_good_ones():
    settings = IntakeSettings(32, ImageLimits(max_pixels=1_000_000, min_side=32), 10**6)
    for data, reason in [
        (b"hello", "not a JPEG, PNG, TIFF or DICOM image"),
        (png_bytes(64, 64)[:-20], "truncated PNG"),
        (png_bytes(2000, 1000), "above data.max_pixels"),
        (png_bytes(20, 20), "smaller than data.min_image_side=32"),
    ]:
        with pytest.raises(Refused, match=reason) as refused:
            decode(data, settings)
        assert refused.value.status == 422
    upload = decode(png_bytes(80, 40), settings)
    assert (
        upload.view.shape == (3, 32, 32) and upload.view.dtype == np.uint8 and (upload.width, upload.height) == (80, 40)
    )
    assert (upload.modality, upload.view_position) == ("", "")
    from pydicom.data import get_testdata_file

    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()  # a TIFF header in its preamble: DICOM all the same
    assert ct.startswith(b"II*\0") and ct[128:132] == b"DICM"
    with pytest.raises(Refused, match="Modality CT is not a radiograph"):
        decode(ct, settings)


# --- slow: the real server ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """serve.py in a subprocess on a free loopback port, ready when /health says ok (at most 3 minutes)."""

    def __init__(self, ckpt: Path, out: Path, *overrides: str, token: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}
        cmd = [sys.executable, "serve.py", f"ckpt={ckpt}", f"port={self.port}", f"hydra.run.dir={out}"]
        cmd += ["accelerator=cpu", *overrides]
        env = {k: v for k, v in os.environ.items() if k != TOKEN_VARIABLE} | ({TOKEN_VARIABLE: token} if token else {})
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if requests.get(self.url + "/health", headers=self.auth, timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        self.stop()
        raise AssertionError(f"serve.py did not get ready: {self.stderr[-3000:]}")

    def post(self, data: bytes | None = None, files: dict | None = None, query: str = "", **kw):
        headers = {**self.auth, **kw.pop("headers", {})}
        return requests.post(self.url + "/predict" + query, data=data, files=files, headers=headers, timeout=60, **kw)

    def stop(self, sig: int = signal.SIGTERM, group: bool = False) -> float:
        """The signal to serve.py's main process, or to its whole process group (a terminal's Ctrl-C, a service
        manager's stop): the seconds it took to end."""
        start = time.monotonic()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig) if group else self.proc.send_signal(sig)
        try:
            self.stdout, self.stderr = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # the whole group: a child left behind holds the pipes open
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.stdout, self.stderr = self.proc.communicate(timeout=30)
        return time.monotonic() - start


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    srv = Server(tiny_run["ckpt"], tmp_path_factory.mktemp("serve") / "run")
    yield srv
    srv.stop()


def an_image(tiny_run) -> Path:
    return sorted((tiny_run["data"] / "test" / "Covid").iterdir())[0]


def predict_probs(ckpt, image: Path, out: Path, monkeypatch) -> np.ndarray:
    """predict.py's probabilities for one file, in process, as it holds them before rounding them into the CSV."""
    seen = []
    results = predict_module.PredictionWriter.results
    monkeypatch.setattr(predict_module.PredictionWriter, "results", lambda self: seen.append(results(self)) or seen[0])
    predict_module.predict(predict_config(out, ckpt, image))
    return seen[0][1][0]


def assert_served(response, probs: np.ndarray) -> dict:
    assert response.status_code == 200, response.text
    answer = response.json()
    served = np.array([answer["probabilities"][c] for c in CLASSES])
    assert np.abs(served - probs).max() <= 1e-6, (served, probs)
    assert answer["class"] == CLASSES[int(probs.argmax())]
    return answer


@pytest.mark.slow
def test_every_endpoint_answers_and_probabilities_equal_predict_py(server, tiny_run, tmp_path, monkeypatch):
    image = an_image(tiny_run)
    probs = predict_probs(tiny_run["ckpt"], image, tmp_path / "pred", monkeypatch)
    assert requests.get(server.url + "/health", timeout=10).text == "ok"
    info = requests.get(server.url + "/info", timeout=10).json()["model"]
    assert info["classes"] == CLASSES and info["image_size"] == 32 and info["members"][0]["backbone"] == "vgg19"
    assert len(info["members"][0]["sha256"]) == 64 and info["members"][0]["temperature"] > 0
    page = requests.get(server.url + "/", timeout=10)
    assert page.status_code == 200 and "<title>chestxray" in page.text and "http" not in page.text.split("<script>")[1]
    policy = page.headers["content-security-policy"]  # its own inline script runs (Chromium's test), nothing else
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy and "unsafe-inline" not in policy
    script = page.text.split("<script>")[1].split("</script>")[0]  # the served script's own hash: it may run
    pinned = base64.b64encode(__import__("hashlib").sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{pinned}';" in policy and page.headers["x-frame-options"] == "DENY"
    multipart = assert_served(server.post(files={"image": (image.name, image.read_bytes())}), probs)
    height, width = cv2.imread(str(image)).shape[:2]
    assert (multipart["width"], multipart["height"]) == (width, height) and "gradcam_png" not in multipart
    row = next(iter(csv.DictReader(open(tmp_path / "pred" / "predictions.csv"))))  # predict.py's flag and set
    assert multipart["ood_score"] == pytest.approx(float(row["ood_score"]), abs=1e-5)
    assert multipart["in_distribution"] == (row["in_distribution"] == "1")
    assert "|".join(multipart["prediction_set"]) == row["prediction_set"]
    raw = assert_served(server.post(data=image.read_bytes(), query="?gradcam=true"), probs)
    overlay = cv2.imdecode(np.frombuffer(base64.b64decode(raw["gradcam_png"]), np.uint8), cv2.IMREAD_COLOR)
    assert overlay is not None and min(overlay.shape[:2]) == 256  # over the source at the display size


@pytest.mark.slow
def test_an_ensemble_serves_the_average_of_its_members_and_ctrl_c_stops_it(tiny_run, tmp_path, monkeypatch):
    ckpt = tiny_run["ckpt"]
    other = tiny_run["dir"] / "checkpoints" / "last.ckpt"
    image = an_image(tiny_run)
    probs = predict_probs([ckpt, other], image, tmp_path / "pred", monkeypatch)
    srv = Server(f"[{ckpt},{other}]", tmp_path / "run")
    try:
        assert_served(srv.post(data=image.read_bytes()), probs)
        assert len(requests.get(srv.url + "/info", timeout=10).json()["model"]["members"]) == 2
    finally:
        seconds = srv.stop(signal.SIGINT)  # Ctrl-C
    assert srv.proc.returncode == 0 and seconds < 30, srv.stderr[-2000:]
    assert "Traceback" not in srv.stderr and len(srv.stderr.strip().splitlines()) <= 1, srv.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "group"), [(signal.SIGTERM, False), (signal.SIGINT, True)], ids=["sigterm", "ctrl-c"])
def test_a_request_in_flight_at_a_stop_is_answered_or_refused_with_503(tiny_run, tmp_path, sig, group):
    """SIGTERM to the main process (docker stop), or Ctrl-C to the whole group (a terminal), while an upload is
    still arriving: that request gets its answer (or 503), never a dropped connection, and every process ends
    quietly: serve.py's one line, no traceback."""
    import threading

    srv = Server(tiny_run["ckpt"], tmp_path / "run")
    image = an_image(tiny_run).read_bytes()
    started, signalled, answers = threading.Event(), threading.Event(), []

    def slowly():  # the first piece, then the rest only once the signal is sent: in flight, whatever the load
        step = max(1, len(image) // 6)
        for k, i in enumerate(range(0, len(image), step)):
            if k == 1:
                started.set()
                signalled.wait(60)
            if k:
                time.sleep(0.1)
            yield image[i : i + step]

    def ask():
        try:
            answers.append(srv.post(data=slowly()))
        except requests.RequestException as err:
            answers.append(err)

    def uploads_in_progress() -> float:
        text = requests.get(srv.url + "/metrics", headers=srv.auth, timeout=30).text
        return float(re.search(r"^chestxray_uploads_in_progress (\S+)$", text, re.M).group(1))

    client = threading.Thread(target=ask)
    try:
        client.start()
        assert started.wait(30)
        deadline = time.monotonic() + 30  # the server is reading it (a connection not yet accepted is not in flight)
        while uploads_in_progress() < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert uploads_in_progress() >= 1
    finally:
        threading.Timer(0.3, signalled.set).start()  # the rest of the body arrives after the signal
        seconds = srv.stop(sig, group=group)
        client.join(90)
    assert len(answers) == 1 and isinstance(answers[0], requests.Response), answers
    assert answers[0].status_code in (200, 503), answers[0].text
    if answers[0].status_code == 200:
        assert set(answers[0].json()["probabilities"]) == set(CLASSES)
    assert srv.proc.returncode == 0 and seconds < 30, srv.stderr[-2000:]
    assert "Traceback" not in srv.stderr and "Error" not in srv.stderr, srv.stderr[-3000:]
    assert "serve.py: stopped serving" in srv.stdout


@pytest.mark.slow
def test_every_bad_upload_gets_a_4xx_reason_and_the_next_request_is_served(server, tiny_run):
    image = an_image(tiny_run)
    good = image.read_bytes()
    big = b"\x89PNG\r\n\x1a\n" + b"\0" * (50 * 10**6 + 1)
    cases = [
        ({"data": b"not an image at all"}, 422, "not a JPEG, PNG, TIFF or DICOM image"),
        ({"data": good[: len(good) // 2]}, 422, "truncated"),
        ({"data": png_bytes(6_000, 5_000)}, 422, "above max_pixels=25,000,000"),
        ({"data": big}, 413, "max_upload_mb=50"),
        ({"data": png_bytes(20, 20)}, 422, "smaller than min_image_side=32"),
        ({"files": {"file": ("x.png", good)}}, 422, "no file in the multipart field 'image' (fields sent: file)"),
        # a media type in capitals is still multipart (read as a form, not as a raw image body)
        ({"data": b"--x\r\n", "headers": {"Content-Type": "Multipart/Form-Data; boundary=x"}}, 422, "sent: none"),
        ({"data": b""}, 422, "empty file"),
    ]
    for kwargs, status, reason in cases:
        response = server.post(**kwargs)
        assert response.status_code == status and reason in response.json()["error"], (reason, response.text)
        assert server.post(data=good).status_code == 200, f"not served after: {reason}"
    assert server.proc.poll() is None


@pytest.mark.slow
def test_a_hospital_dicom_is_served_as_predict_py_reads_it_and_its_header_never_leaves(
    server, tiny_run, tmp_path, monkeypatch
):
    """A 12-bit MONOCHROME1 radiograph with patient identifiers in its header, made from a test image: the server's
    answer is predict.py's for the same file; a CT slice is refused naming the modality; no identifier from either
    header appears in an answer or in the server's output."""
    from pydicom.data import get_testdata_file

    from tests.test_dicom import IDENTIFIERS, dataset, save, stored

    grey = cv2.imread(str(an_image(tiny_run)), cv2.IMREAD_GRAYSCALE)
    path = save(dataset(4095 - stored(grey, 12), 12, "MONOCHROME1", **IDENTIFIERS), tmp_path / "IM0001")
    probs = predict_probs(tiny_run["ckpt"], path, tmp_path / "pred", monkeypatch)
    answers = [assert_served(server.post(data=path.read_bytes()), probs)]
    answers.append(assert_served(server.post(files={"image": ("IM0001.dcm", path.read_bytes())}), probs))
    assert (answers[0]["modality"], answers[0]["view"]) == ("DX", "PA")
    assert not any("lateral" in w for w in answers[0]["warnings"])
    side = save(dataset(4095 - stored(grey, 12), 12, "MONOCHROME1", ViewPosition="LL"), tmp_path / "IM0002")
    lateral = server.post(data=side.read_bytes()).json()
    assert lateral["view"] == "LL" and any("lateral view (ViewPosition LL)" in w for w in lateral["warnings"])
    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    refused = server.post(data=ct)
    assert refused.status_code == 422 and "Modality CT is not a radiograph" in refused.json()["error"]
    assert (answers[0]["width"], answers[0]["height"]) == grey.shape[::-1]
    import pydicom

    header = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ct_identifiers = [str(header.PatientName), str(header.PatientID)]
    srv = Server(tiny_run["ckpt"], tmp_path / "run")  # a server of its own, so its whole output can be read
    try:
        assert_served(srv.post(data=path.read_bytes()), probs)
        assert srv.post(data=ct).status_code == 422
    finally:
        srv.stop()
    said = json.dumps(answers) + refused.text + srv.stdout + srv.stderr
    for value in [*IDENTIFIERS.values(), *ct_identifiers]:
        assert value not in said, value


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and its descendants (serve.py, its HTTP server, its inference worker)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    tree, grew = {pid}, True
    while grew:
        more = {child for child, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    total = 0
    for member in tree:
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def deflated_dicom_bomb(side: int = 10_000) -> bytes:
    """A DX radiograph of side x side zeros, Deflated Explicit VR Little Endian: 200 MB inflated, ~200 kB sent."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from tests.test_dicom import dataset

    ds = dataset(np.zeros((side, side), np.uint16))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return save_bytes(ds)


def metrics_of(srv) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    response = requests.get(srv.url + "/metrics", headers=srv.auth, timeout=30)
    assert response.status_code == 200, response.text
    values = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            key = sample.name + "".join(f",{k}={v}" for k, v in sorted(sample.labels.items()))
            values[key] = sample.value
    return values


@pytest.mark.slow
def test_a_token_is_checked_before_any_body_is_read_and_never_written_anywhere(tiny_run, tmp_path):
    """With a token, bombs and garbage sent without it get 401 in milliseconds and never reach the decoder (the
    server's own decode counter); the docs are closed; every error is {"error": ...}; authorised bombs get 422
    with the server's memory flat; /metrics parses; SIGTERM stops it quietly; the token is nowhere on disk, in the
    output or in `ps`."""
    token = "s3cret-" + os.urandom(6).hex()
    run = tmp_path / "run"
    srv = Server(tiny_run["ckpt"], run, token=token)
    try:
        image = an_image(tiny_run).read_bytes()
        png_bomb, dicom_bomb = png_bytes(10_000, 10_000), deflated_dicom_bomb()
        assert len(png_bomb) < 200_000 and len(dicom_bomb) < 400_000
        bodies = [png_bomb, dicom_bomb, b"garbage" * 1000, image, os.urandom(2_000_000)]
        for body in bodies:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {token}"}):
                for kwargs in ({"data": body}, {"files": {"image": ("x.png", body)}}):
                    start = time.monotonic()
                    response = requests.post(srv.url + "/predict", headers=headers, timeout=30, **kwargs)
                    took = time.monotonic() - start
                    assert response.status_code == 401 and "token" in response.json()["error"], response.text
                    assert took < 0.5, took
        assert metrics_of(srv)["chestxray_decodes_total"] == 0  # none of them was decoded
        for path in ("/info", "/health", "/metrics", "/docs", "/redoc", "/openapi.json", "/nowhere"):
            response = requests.get(srv.url + path, timeout=30)
            assert response.status_code == 401 and set(response.json()) == {"error"}, (path, response.text)
        for path in ("/docs", "/redoc", "/openapi.json", "/nowhere"):
            response = requests.get(srv.url + path, headers=srv.auth, timeout=30)
            assert response.status_code == 404 and set(response.json()) == {"error"}, (path, response.text)
        response = requests.get(srv.url + "/predict", headers=srv.auth, timeout=30)
        assert response.status_code == 405 and set(response.json()) == {"error"}, response.text
        assert requests.get(srv.url + "/", timeout=30).status_code == 200  # the page holds no data
        assert srv.post(data=image).status_code == 200
        info = requests.get(srv.url + "/info", headers=srv.auth, timeout=30).json()
        assert info["model"]["token_required"] is True and info["monitor"]["window"] == 200
        before = tree_rss(srv.proc.pid)
        for bomb, reason in ((png_bomb, "above max_pixels=25,000,000"), (dicom_bomb, "max_pixels")):
            start = time.monotonic()
            response = srv.post(data=bomb)
            assert response.status_code == 422 and reason in response.json()["error"], response.text
            assert time.monotonic() - start < 2
        grown = tree_rss(srv.proc.pid) - before
        assert grown < 100e6, f"the server grew {grown / 1e6:.0f} MB over two bombs"
        assert srv.post(data=image).status_code == 200
        metrics = metrics_of(srv)
        assert metrics["chestxray_decodes_total"] == 4
        assert metrics["chestxray_requests_total,endpoint=/predict,status=401"] == len(bodies) * 6
        assert metrics["chestxray_requests_total,endpoint=/predict,status=422"] == 2
        assert metrics["chestxray_request_seconds_count,endpoint=/predict"] >= 4
        assert "chestxray_uploads_in_progress" in metrics and "chestxray_ood_flagged_share" in metrics
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    finally:
        seconds = srv.stop(signal.SIGTERM)
    assert srv.proc.returncode == 0 and seconds < 30, srv.stderr[-2000:]
    assert "Traceback" not in srv.stderr and len(srv.stderr.strip().splitlines()) <= 1, srv.stderr[-3000:]
    written = b"".join(f.read_bytes() for f in run.rglob("*") if f.is_file())
    assert token not in ps and token not in srv.stdout + srv.stderr and token.encode() not in written
    assert any(" POST /predict 401 " in line for line in (srv.stdout + srv.stderr).splitlines())  # the access log


@pytest.mark.slow
def test_malformed_requests_fuzzed_get_4xx_and_the_server_goes_on(server, tiny_run):
    """Hypothesis sends malformed multipart bodies, headers and images for a bounded time: every answer is a 2xx
    or 4xx {"error"}, and the server still answers a good image after."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    good = an_image(tiny_run).read_bytes()
    heads = [good[:n] for n in (0, 8, 33, 100, 1000)] + [png_bytes(40, 40)[:-12], b"\x89PNG\r\n\x1a\n", b"II*\x00"]
    dicm = [b"\0" * 128 + b"DICM" + tail for tail in (b"", b"\x02\x00\x10\x00UI\x04\x001.2\0", b"\xff" * 64)]
    bodies = st.one_of(st.binary(max_size=4096), st.sampled_from(heads + dicm), st.builds(bytes.__add__,
                       st.sampled_from(heads + dicm), st.binary(max_size=512)))  # fmt: skip
    boundary = st.text(st.characters(codec="ascii", exclude_categories=["Cc"]), min_size=0, max_size=20)
    content_type = st.one_of(
        st.just(None),
        st.sampled_from(["image/png", "application/json", "MULTIPART/FORM-DATA", "text/plain; charset=x"]),
        boundary.map(lambda b: f"multipart/form-data; boundary={b}"),
    )

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=bodies, kind=content_type, boundary=boundary, wrap=st.booleans(), query=st.sampled_from(
        ["", "?gradcam=true", "?gradcam=%ff", "?a=b&&=="]))  # fmt: skip
    def answers_in_4xx(body, kind, boundary, wrap, query):
        if wrap:  # a multipart body around it, well formed or not
            body = b"--" + boundary.encode() + b"\r\nContent-Disposition: form-data; name=image; filename=x\r\n\r\n"
            body += b"\r\n--" + boundary.encode() + b"--\r\n"
        headers = {"Content-Type": kind} if kind else {}
        response = server.post(data=body, headers=headers, query=query)
        assert response.status_code < 500, (response.status_code, response.text[:200])
        if response.status_code >= 400:
            assert set(response.json()) == {"error"}, response.text[:200]

    start = time.monotonic()
    answers_in_4xx()
    assert time.monotonic() - start < 120
    assert server.post(data=good).status_code == 200
    assert server.proc.poll() is None


CHROMEDRIVER = "/usr/bin/chromedriver"
REAL_TEST_IMAGE = ROOT.parent / "shared" / "data" / "covid19-image-dataset" / "test" / "Normal" / "0101.jpeg"


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver")
def test_the_page_in_headless_chromium_shows_predict_py_answer(server, tiny_run, tmp_path, monkeypatch):
    """On a real test radiograph where the dataset is here (else a generated one): the image and its Grad-CAM side
    by side with captions, predict.py's class and bars, the OOD flag, prediction set and acceptance in words, no
    token field (this server wants none); a flagged or not accepted answer is shown muted and labelled "do not
    trust"."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = REAL_TEST_IMAGE if REAL_TEST_IMAGE.exists() else an_image(tiny_run)
    probs = predict_probs(tiny_run["ckpt"], image, tmp_path / "pred", monkeypatch)
    answer = server.post(data=image.read_bytes()).json()
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=900,1100"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    text = lambda element_id: driver.find_element(By.ID, element_id).text  # noqa: E731
    try:
        driver.get(server.url + "/")
        WebDriverWait(driver, 30).until(lambda d: "vgg19" in d.find_element(By.ID, "model").text)
        assert not driver.find_element(By.ID, "token-field").is_displayed()
        driver.find_element(By.ID, "file").send_keys(str(image))
        WebDriverWait(driver, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#bars .bar")) == 3)
        for picture in ("source", "overlay"):
            loaded = lambda d, i=picture: d.find_element(By.ID, i).get_attribute("naturalWidth") != "0"  # noqa: E731
            WebDriverWait(driver, 60).until(loaded)
        source, overlay = driver.find_element(By.ID, "source"), driver.find_element(By.ID, "overlay")
        assert source.location["y"] == overlay.location["y"] and source.location["x"] < overlay.location["x"]
        assert text("source-caption") == "the uploaded image" and text("overlay-caption").startswith("Grad-CAM of ")
        assert text("answer") == CLASSES[int(probs.argmax())]
        shown = {
            e.get_attribute("data-cls"): float(e.get_attribute("data-prob"))
            for e in driver.find_elements(By.CSS_SELECTOR, "#bars .bar")
        }
        assert np.abs(np.array([shown[c] for c in CLASSES]) - probs).max() <= 1e-6
        assert text("error") == ""
        flagged = answer["in_distribution"] is False
        words = {False: "flagged: unlike the training images", True: "no: like the training images"}
        assert text("ood") == words.get(answer["in_distribution"], "not scored (the checkpoint has no detector fit)")
        if "prediction_set" in answer:
            expected = "{" + ", ".join(answer["prediction_set"]) + "}"
            assert text("set") == f"90% prediction set: {expected}: the true class is among these 9 times in 10"
        accepted = answer.get("accepted")  # the checkpoint's acceptance rule: None where it has none
        refused = accepted in (False, 0)
        expected = "not assessed by this checkpoint" if accepted is None else "no: do not trust this answer"
        assert text("accepted") == (expected if accepted is None or refused else "yes")
        untrusted = flagged or refused  # flagged, or not accepted: shown muted, never as a confident result
        assert ("untrusted" in driver.find_element(By.ID, "result").get_attribute("class")) == untrusted
        assert driver.find_element(By.ID, "distrust").is_displayed() == untrusted
        shot = tmp_path / "serve-page.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 1000
        if os.environ.get("CHESTXRAY_SAVE_SCREENSHOT"):  # the README's picture: docs/serve-page.png
            shutil.copy(shot, ROOT / "docs" / "serve-page.png")
        driver.execute_script("show(arguments[0])", {**answer, "in_distribution": False, "accepted": 0})
        assert "untrusted" in driver.find_element(By.ID, "result").get_attribute("class")
        assert driver.find_element(By.ID, "distrust").is_displayed() and text("distrust") == "do not trust"
        assert int(driver.find_element(By.ID, "answer").value_of_css_property("font-weight")) < 600
        assert text("accepted") == "no: do not trust this answer"
    finally:
        driver.quit()
