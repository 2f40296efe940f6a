"""data.preprocess=none|equalize|clahe: what it does to an image, and that training, the store key, the checkpoint,
resume, predict and the robustness bench all apply the same one."""

import csv
import shutil
import warnings

import numpy as np
import pytest
import torch

from chestxray import settings
from chestxray.data.datamodule import ChestXrayDataModule
from chestxray.data.images import ImageLimits, load_image
from chestxray.data.preprocess import preprocess_image
from chestxray.data.store import DecodeSettings
from chestxray.errors import ConfigError, ResumeError
from chestxray.evaluation.robustness import SHIFTS, shifted_views
from chestxray.inference.predict import predict
from chestxray.models.checkpoints import load_model
from chestxray.training.resume import check_fits
from tests.conftest import CLASSES, compose_config, predict_config, train_config


def flat_image() -> np.ndarray:
    """A low-contrast grey image (values 100..139) with a darker disc: what equalisation should spread out."""
    rng = np.random.default_rng(0)
    grey = (100 + rng.integers(0, 30, (96, 80))).astype(np.uint8)
    grey[30:60, 20:50] -= 10
    return np.repeat(grey[:, :, None], 3, axis=2)


def test_none_is_the_image_itself_and_both_equalisations_spread_the_histogram():
    image = flat_image()
    assert preprocess_image(image, "none") is image
    for mode in ("equalize", "clahe"):
        out = preprocess_image(image, mode)
        assert out.shape == image.shape and out.dtype == np.uint8
        assert (out[:, :, 0] == out[:, :, 1]).all() and (out[:, :, 1] == out[:, :, 2]).all()  # grey
        assert np.ptp(out) > 2 * np.ptp(image) and out.std() > 2 * image.std(), mode
        assert np.array_equal(out, preprocess_image(image, mode))  # deterministic
    assert not np.array_equal(preprocess_image(image, "equalize"), preprocess_image(image, "clahe"))
    assert preprocess_image(image, "equalize").max() == 255  # global: the full range


def test_it_is_a_checked_setting_and_part_of_the_store_key():
    cfg = compose_config("train", ["data.preprocess=gamma", "paths.output_dir=/tmp/unused"])
    with pytest.raises(ConfigError, match="data.preprocess=gamma: must be one of none, equalize, clahe"):
        settings.check(cfg, settings.TRAIN_RULES)
    keys = {m: DecodeSettings(64, ImageLimits(preprocess=m)).key() for m in ("none", "equalize", "clahe")}
    assert keys["none"] == DecodeSettings(64).key() and "clahe" in keys["clahe"] and "equalize" in keys["equalize"]
    assert len(set(keys.values())) == 3


def test_training_decodes_with_it(synthetic_dir):
    """The data module's images are the files' model views with the equalisation applied."""
    dm = ChestXrayDataModule(
        str(synthetic_dir), image_size=32, check_leakage=False, download=False, store="memory", preprocess="clahe"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm.setup()
    test = dm.test_sets["test"]
    for k in (0, 7):
        image, _, _, _ = test[k]
        expected = load_image(test.paths[k], 32, ImageLimits(preprocess="clahe"))
        plain = load_image(test.paths[k], 32)
        assert np.array_equal(image.numpy(), expected) and not np.array_equal(expected, plain)
        redo = preprocess_image(np.ascontiguousarray(plain.transpose(1, 2, 0)), "clahe").transpose(2, 0, 1)
        assert np.array_equal(expected, redo)  # after the resize, at the model's resolution


@pytest.fixture(scope="module")
def clahe_ckpt(tiny_run, tmp_path_factory):
    """The tiny checkpoint as if trained with data.preprocess=clahe (its hyper-parameter changed)."""
    saved = torch.load(tiny_run["ckpt"], map_location="cpu", weights_only=True)
    assert "preprocess" in saved["hyper_parameters"] and saved["hyper_parameters"]["preprocess"] == "none"
    saved["hyper_parameters"]["preprocess"] = "clahe"
    path = tmp_path_factory.mktemp("clahe") / "clahe.ckpt"
    torch.save(saved, path)
    return path


def test_resume_refuses_another_preprocess(tiny_run, tmp_path):
    saved = torch.load(tiny_run["dir"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    cfg = train_config(tmp_path, tiny_run["data"], "data.preprocess=clahe")  # tiny_run's settings but this one
    with pytest.raises(ResumeError, match="resume=RUN: data.preprocess=clahe but the checkpoint has none"):
        check_fits(saved, cfg, "resume=RUN")
    del saved["hyper_parameters"]["preprocess"]  # a checkpoint older than the setting: none
    with pytest.raises(ResumeError, match="data.preprocess=clahe but the checkpoint has none"):
        check_fits(saved, cfg, "resume=RUN")


def test_predict_applies_the_checkpoints_preprocess(clahe_ckpt, tiny_run, tmp_path):
    inputs = sorted((tiny_run["data"] / "test" / "Covid").glob("*"))[:3]
    predict(predict_config(tmp_path / "out", clahe_ckpt, inputs, "print_limit=0", "report.bootstrap_resamples=0"))
    with open(tmp_path / "out" / "predictions.csv", newline="") as fh:
        rows = {r["path"]: r for r in csv.DictReader(fh)}
    model = load_model(clahe_ckpt)
    views = torch.from_numpy(np.stack([load_image(p, 32, ImageLimits(preprocess="clahe")) for p in inputs]))
    with torch.no_grad():
        expected = model(views).softmax(1).numpy()
    got = np.array([[float(rows[str(p)][f"prob_{c}"]) for c in CLASSES] for p in inputs])
    assert np.allclose(got, expected, atol=1e-5)


def test_the_bench_preprocesses_every_view_after_its_shift():
    image = flat_image()
    plain = shifted_views(image, 32, [SHIFTS["noise"]], seed=1)
    views = shifted_views(image, 32, [SHIFTS["noise"]], seed=1, preprocess="clahe")
    for k in range(len(views)):
        redo = preprocess_image(np.ascontiguousarray(plain[k].transpose(1, 2, 0)), "clahe").transpose(2, 0, 1)
        assert np.array_equal(views[k], redo)


def test_the_checkpoint_keeps_it(tmp_path, tiny_run):
    copy = tmp_path / "best.ckpt"
    shutil.copy(tiny_run["ckpt"], copy)
    assert load_model(copy).hparams.preprocess == "none"
