"""serve.py: the real server on a free loopback port answers every endpoint, gives predict.py's probabilities,
refuses every bad upload with a 4xx JSON reason and goes on serving, wants the token when one is set, stops on
SIGTERM; its page works in headless Chromium."""

from __future__ import annotations

import base64
import csv
import json
import os
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
from chestxray.serving.intake import IntakeSettings, Refused, decode
from chestxray.serving.server import check, loopback_warning
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
        ("token=' '", "token= is empty"),
    ],
)
def test_bad_settings_are_refused_in_one_line_naming_the_setting(override, message):
    with pytest.raises(ConfigError, match=message):
        check(serve_config(override))


def test_only_non_loopback_hosts_are_warned_about():
    assert loopback_warning("127.0.0.1") is None
    assert "host=0.0.0.0 serves every network" in loopback_warning("0.0.0.0")


def test_optional_model_outputs_pass_through_and_absent_ones_stay_absent():
    probs = np.array([0.2, 0.7, 0.1], np.float32)
    plain = build_answer(CLASSES, probs, 100, 80)
    assert plain["class"] == "Covid" and plain["width"] == 100 and plain["height"] == 80
    assert not {"ood_score", "in_distribution", "prediction_set"} & set(plain)
    extras = {"ood_score": np.float32(3.5).item(), "in_distribution": False, "prediction_set": ["Covid"], "x": 1}
    rich = build_answer(CLASSES, probs, 100, 80, extras)
    assert rich["ood_score"] == 3.5 and rich["in_distribution"] is False and rich["prediction_set"] == ["Covid"]
    assert "x" not in rich
    notes = warnings_for(rich, calibrated=True, image_size=224)
    assert any("out of distribution" in n for n in notes) and any("enlarged" in n for n in notes)
    assert warnings_for(plain, calibrated=True, image_size=64) == []


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
    view, width, height = decode(png_bytes(80, 40), settings)
    assert view.shape == (3, 32, 32) and view.dtype == np.uint8 and (width, height) == (80, 40)
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
        cmd = [sys.executable, "serve.py", f"ckpt={ckpt}", f"port={self.port}", f"paths.output_dir={out}"]
        cmd += ["accelerator=cpu", *overrides] + ([f"token={token}"] if token else [])
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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

    def stop(self, sig: int = signal.SIGTERM) -> float:
        start = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.stdout, self.stderr = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.stdout, self.stderr = self.proc.communicate()
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


@pytest.mark.slow
def test_every_bad_upload_gets_a_4xx_reason_and_the_next_request_is_served(server, tiny_run):
    image = an_image(tiny_run)
    good = image.read_bytes()
    big = b"\x89PNG\r\n\x1a\n" + b"\0" * (50 * 10**6 + 1)
    cases = [
        ({"data": b"not an image at all"}, 422, "not a JPEG, PNG, TIFF or DICOM image"),
        ({"data": good[: len(good) // 2]}, 422, "truncated"),
        ({"data": png_bytes(12_000, 10_000)}, 422, "above data.max_pixels=100,000,000"),
        ({"data": big}, 413, "max_upload_mb=50"),
        ({"data": png_bytes(20, 20)}, 422, "smaller than data.min_image_side=32"),
        ({"files": {"file": ("x.png", good)}}, 422, "no file in the multipart field 'image' (fields sent: file)"),
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


@pytest.mark.slow
def test_a_token_is_required_when_set_and_sigterm_stops_with_status_0(tiny_run, tmp_path):
    srv = Server(tiny_run["ckpt"], tmp_path / "run", token="s3cret")
    try:
        image = an_image(tiny_run).read_bytes()
        assert srv.post(data=image).status_code == 200
        for headers in ({"Authorization": "Bearer wrong"}, {"Authorization": ""}):
            assert requests.post(srv.url + "/predict", data=image, headers=headers, timeout=30).status_code == 401
            assert requests.get(srv.url + "/info", headers=headers, timeout=30).status_code == 401
        assert requests.get(srv.url + "/", timeout=30).status_code == 200  # the page holds no data
    finally:
        seconds = srv.stop(signal.SIGTERM)
    assert srv.proc.returncode == 0 and seconds < 30, srv.stderr[-2000:]
    assert "s3cret" not in srv.stdout + srv.stderr


CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver")
def test_the_page_in_headless_chromium_shows_predict_py_answer(server, tiny_run, tmp_path, monkeypatch):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = an_image(tiny_run)
    probs = predict_probs(tiny_run["ckpt"], image, tmp_path / "pred", monkeypatch)
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=800,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.get(server.url + "/")
        driver.find_element(By.ID, "file").send_keys(str(image))
        WebDriverWait(driver, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#bars .bar")) == 3)
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "overlay").get_attribute("naturalWidth") != "0")
        assert driver.find_element(By.ID, "answer").text == CLASSES[int(probs.argmax())]
        shown = {
            e.get_attribute("data-cls"): float(e.get_attribute("data-prob"))
            for e in driver.find_elements(By.CSS_SELECTOR, "#bars .bar")
        }
        assert np.abs(np.array([shown[c] for c in CLASSES]) - probs).max() <= 1e-6
        assert driver.find_element(By.ID, "error").text == ""
        shot = tmp_path / "serve-page.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 1000
        if os.environ.get("CHESTXRAY_SAVE_SCREENSHOT"):  # the README's picture: docs/serve-page.png
            shutil.copy(shot, ROOT / "docs" / "serve-page.png")
    finally:
        driver.quit()
