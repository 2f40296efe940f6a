"""Each torchvision backbone trains, tests, predicts (torch and ONNX) and explains (Grad-CAM) from its checkpoint
alone, at small size; several backbones make one ensemble."""

import csv
import json

import cv2
import numpy as np
import pytest
import torch

from chestxray.inference.predict import predict
from chestxray.models.backbones import BACKBONES
from chestxray.training.fit import train
from tests.conftest import CLASSES, predict_config, train_config


def rows(folder):
    with open(folder / "predictions.csv", newline="") as fh:
        return {r["path"]: r for r in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def backbone_runs(tmp_path_factory, synthetic_dir) -> dict:
    runs = {}
    for name in BACKBONES:
        out = tmp_path_factory.mktemp(name) / "run"
        train(train_config(out, synthetic_dir, f"model.backbone={name}", "data.store=disk"))
        runs[name] = out
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BACKBONES))
def test_a_backbone_trains_tests_predicts_and_explains_from_its_checkpoint(
    name, backbone_runs, synthetic_dir, tmp_path
):
    run = backbone_runs[name]
    ckpt = run / "checkpoints" / "best.ckpt"
    saved = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert saved["hyper_parameters"]["backbone"] == name and bool(saved["state_dict"]["calibrated"])
    report = json.loads((run / "metrics.json").read_text())
    assert report["n"] == 39 and (run / "gradcam_gallery.png").stat().st_size > 1000
    inputs = [sorted((synthetic_dir / "test" / c).iterdir())[0] for c in CLASSES]
    torch_out, onnx_out = tmp_path / "torch", tmp_path / "onnx"
    predict(predict_config(torch_out, ckpt, inputs, "gradcam=true"))  # the checkpoint alone: no model.backbone=
    predict(predict_config(onnx_out, ckpt, inputs, "runtime=onnx"))
    trained, by_torch, by_onnx = rows(run), rows(torch_out), rows(onnx_out)
    for path in map(str, inputs):
        p_train, p_torch, p_onnx = (
            np.array([float(r[path][f"prob_{c}"]) for c in CLASSES]) for r in (trained, by_torch, by_onnx)
        )
        assert np.allclose(p_torch, p_train, atol=2e-6) and np.abs(p_onnx - p_torch).max() < 1e-4, path
    overlays = sorted((torch_out / "gradcam").glob("*.png"))
    assert len(overlays) == 3 and all(min(cv2.imread(str(p)).shape[:2]) == 256 for p in overlays)
    heat = cv2.imread(str(overlays[0])).astype(int)
    assert heat.std() > 5  # a map, not a blank image


@pytest.mark.slow
def test_an_ensemble_of_different_backbones_averages_their_probabilities(backbone_runs, synthetic_dir, tmp_path):
    ckpts = [backbone_runs[name] / "checkpoints" / "best.ckpt" for name in ("vgg19", "densenet121")]
    folder = synthetic_dir / "test" / "Covid"
    predict(predict_config(tmp_path / "both", ckpts, folder))
    members = [rows(backbone_runs[name]) for name in ("vgg19", "densenet121")]
    for path, row in rows(tmp_path / "both").items():
        mean = np.mean([[float(m[path][f"prob_{c}"]) for c in CLASSES] for m in members], axis=0)
        assert np.allclose([float(row[f"prob_{c}"]) for c in CLASSES], mean, atol=2e-6)


@pytest.mark.slow
def test_a_frozen_backbone_with_cached_features_trains_only_the_head(tmp_path, synthetic_dir):
    from chestxray.training.fit import build

    overrides = ["model.backbone=resnet50", "model.freeze=features", "model.cache_features=true", "test=false"]
    datamodule, model, trainer = build(train_config(tmp_path, synthetic_dir, *overrides))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.fit(model, datamodule=datamodule)
    after = model.state_dict()
    trunk = [k for k in before if k.startswith("net.") and not k.startswith("net.fc.")]
    head = [k for k in before if k.startswith("net.fc.")]
    assert all(torch.equal(before[k], after[k]) for k in trunk)  # weights and BatchNorm statistics alike
    assert any(not torch.equal(before[k], after[k]) for k in head)
    assert len(model.feature_cache) > 0  # features computed once per image, then reused
