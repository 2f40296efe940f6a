"""The real TensorBoard server, over HTTP, against a tiny training run's folder."""

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

SCALARS = [
    "train/loss",
    "train/acc",
    "val/loss",
    "val/acc",
    "val/acc_best",
    "test/acc",
    "test/loss",
    "test/acc_leak_free",
]
IMAGES = [
    "samples",
    "curves",
    "test/confusion_matrix",
    "test/per_class",
    "test/reliability",
    "test/gallery",
    "test/gradcam_gallery",  # one scheme for every evaluated set: eval/<name>/gradcam_gallery beside it
    "test/risk_coverage",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str, body: dict | None = None, **params):
    url = f"http://127.0.0.1:{port}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def server(trained_run):
    port = free_port()
    logdir = trained_run["dir"]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(logdir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--load_fast=false",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                tags = get(port, "/data/plugin/scalars/tags")
                if any("test/acc" in run_tags for run_tags in tags.values()):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("TensorBoard did not serve the run within 90 s")
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.mark.slow
def test_tensorboard_serves_scalars_images_and_hparams(server, trained_run):
    scalar_tags = get(server, "/data/plugin/scalars/tags")
    [run] = [r for r, tags in scalar_tags.items() if "train/loss" in tags]
    assert set(SCALARS) <= set(scalar_tags[run])
    steps = {tag: len(get(server, "/data/plugin/scalars/scalars", run=run, tag=tag)) for tag in SCALARS}
    epochs = trained_run["cfg"].trainer.max_epochs
    assert steps == {
        "train/loss": epochs,
        "train/acc": epochs,
        "val/loss": epochs,
        "val/acc": epochs,
        "val/acc_best": epochs,
        "test/acc": 1,
        "test/loss": 1,
        "test/acc_leak_free": 1,
    }
    image_tags = get(server, "/data/plugin/images/tags")[run]
    assert set(IMAGES) <= set(image_tags)
    for tag in IMAGES:
        assert len(get(server, "/data/plugin/images/images", run=run, tag=tag)) == 1
    hparams = get(server, "/data/plugin/hparams/experiment", body={"experimentName": ""})
    names = {h["name"] for h in hparams["hparamInfos"]}
    assert {"optimizer/lr", "data/image_size", "model/freeze"} <= names
    assert {m["name"]["tag"] for m in hparams["metricInfos"]} >= {"val/acc_best", "test/acc", "test/acc_leak_free"}


@pytest.mark.slow
def test_every_picture_is_in_the_run_folder(trained_run):
    out = trained_run["dir"]
    names = ("samples", "curves", "confusion_matrix", "per_class", "reliability", "gallery", "gradcam_gallery")
    for name in (*names, "risk_coverage"):
        assert (out / f"{name}.png").stat().st_size > 1000, name
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(trained_run["cfg"].trainer.max_epochs))
    assert all("val/acc" in h and "train/loss" in h for h in history)
