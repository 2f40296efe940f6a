"""predict.py: rows streamed per batch, each image once, bad files without a forward pass, the same numbers as the
training report, ONNX, ensembles, Grad-CAM, refusals and stops."""

import csv
import hashlib
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from chestxray.data.sources import find_inputs
from chestxray.data.store import DecodeSettings, decode_in_memory
from chestxray.errors import CheckpointError, PredictError
from chestxray.evaluation.report import SELECTIVE_FIELDS, UNCERTAINTY_FIELDS
from chestxray.inference.predict import PredictionWriter, csv_row, predict
from chestxray.models import classifier as model_module
from chestxray.models.checkpoints import load_model
from chestxray.models.classifier import Probabilities
from chestxray.models.selection import select
from chestxray.runtime.files import default_cache_dir as cache_dir
from tests.conftest import CLASSES, predict_config, run_script, signal_when
from tests.test_images import exif_rotated_jpeg, png_bytes


def read_rows(folder: Path) -> list[dict]:
    with open(folder / "predictions.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def run_predict(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return run_script("predict.py", "trainer.accelerator=cpu", "report.bootstrap_resamples=100", *args, ok=False)


# --- fast: in-process on the two-epoch checkpoint ---------------------------------------------------------------


def test_predict_writes_every_row_and_the_same_probabilities_as_the_training_report(tiny_run, tmp_path):
    out = tmp_path / "pred"
    summary = predict(predict_config(out, tiny_run["ckpt"], tiny_run["data"] / "test"))
    rows = read_rows(out)
    n = sum(1 for _ in (tiny_run["data"] / "test").rglob("*.*"))
    assert summary["predicted"] == len(rows) == n and all(r["label"] and r["pred"] and not r["error"] for r in rows)
    train_rows = {r["path"]: r for r in read_rows(tiny_run["dir"])}
    for r in rows:
        mine = np.array([float(r[f"prob_{c}"]) for c in CLASSES])
        theirs = np.array([float(train_rows[r["path"]][f"prob_{c}"]) for c in CLASSES])
        assert mine.sum() == pytest.approx(1, abs=1e-4) and np.allclose(mine, theirs, atol=2e-6), r["path"]
    report, trained = (
        json.loads((out / "metrics.json").read_text()),
        json.loads((tiny_run["dir"] / "metrics.json").read_text()),
    )
    for key in ("n", "correct", "confusion_matrix", "accuracy_ci95"):
        assert report[key] == trained[key], key
    assert report["loss"] == pytest.approx(trained["loss"], abs=1e-4)


def test_one_image_given_many_ways_is_predicted_once(tiny_run, tmp_path, monkeypatch):
    folder = tmp_path / "few" / "Covid"
    folder.mkdir(parents=True)
    sources = sorted((tiny_run["data"] / "test" / "Covid").iterdir())[:5]
    for src in sources:
        shutil.copy(src, folder / src.name)
    one = folder / sources[0].name
    monkeypatch.chdir(tmp_path)
    spellings = [
        str(one),  # absolute
        str(one.relative_to(tmp_path)),  # relative
        str(folder / ".." / "Covid" / one.name),  # a .. detour
        str(folder),  # and its folder, holding it again
    ]
    out = tmp_path / "out"
    summary = predict(predict_config(out, tiny_run["ckpt"], spellings))
    rows = read_rows(out)
    assert summary["predicted"] == len(rows) == 5 and len({Path(r["path"]).resolve() for r in rows}) == 5
    assert json.loads((out / "metrics.json").read_text())["n"] == 5  # 5 images, not 8


def test_unreadable_files_get_error_rows_and_never_reach_the_network(tiny_run, tmp_path, monkeypatch):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(20):
        (folder / f"empty_{i:02d}.jpg").write_bytes(b"")
    good = sorted((tiny_run["data"] / "test" / "Normal").iterdir())[:3]
    for src in good:
        shutil.copy(src, folder / src.name)
    seen = []
    original = model_module.Probabilities.answers
    monkeypatch.setattr(model_module.Probabilities, "answers", lambda self, x: seen.append(len(x)) or original(self, x))
    out = tmp_path / "out"
    summary = predict(predict_config(out, tiny_run["ckpt"], folder))
    assert sum(seen) == 3  # only the readable images went through the model
    rows = {Path(r["path"]).name: r for r in read_rows(out)}
    assert len(rows) == 23 and summary["errors"] == 20
    assert all("empty file" in rows[f"empty_{i:02d}.jpg"]["error"] for i in range(20))
    assert all(rows[src.name]["pred"] and not rows[src.name]["error"] for src in good)


def test_rows_are_on_disk_after_each_batch(tiny_run, tmp_path):
    """After every batch the file holds the header and every finished row, whole: a kill -9 or an out-of-memory
    kill loses none (the file object is not closed in between)."""
    inputs = find_inputs(str(tiny_run["data"] / "test" / "Normal"), CLASSES)[:6]
    writer = PredictionWriter(tmp_path, inputs, CLASSES, limits=None)

    class Trainer:
        world_size, global_rank = 1, 0

    writer.on_predict_start(Trainer(), None)
    for start in (0, 3):
        positions = torch.arange(start, start + 3)
        nan = torch.full((3,), float("nan"))
        answers = (torch.full((3, 3), 1 / 3), nan, torch.ones(3, 3, dtype=torch.bool), nan)
        prediction = (positions, answers, ["", "", ""])
        writer.write_on_batch_end(None, None, prediction, None, (None, positions, ["", "", ""]), 0)
        on_disk = (tmp_path / "predictions.csv").read_text()
        assert on_disk.endswith("\n") and len(on_disk.splitlines()) == 1 + start + 3
    writer.on_predict_end(None, None)


def test_streamed_csv_equals_the_all_at_once_csv_row_for_row(tiny_run, tmp_path):
    """Decoding everything first, then predicting, gives the same file."""
    out = tmp_path / "pred"
    predict(predict_config(out, tiny_run["ckpt"], tiny_run["data"] / "test"))
    model = load_model(tiny_run["ckpt"])
    inputs = find_inputs(str(tiny_run["data"] / "test"), model.classes)
    decoded = decode_in_memory([i.path for i in inputs], DecodeSettings(32))
    assert decoded.paths == [i.path for i in inputs]
    with torch.inference_mode():  # the same batches of 8 (the evaluation batch on a CPU): the same arithmetic
        images = torch.from_numpy(np.stack([decoded.images[i] for i in range(len(inputs))]))
        batches = [Probabilities([model]).answers(images[k : k + 8]) for k in range(0, len(images), 8)]
        probs, scores, sets, gates = (torch.cat(part).numpy() for part in zip(*batches, strict=True))
    fields = ["path", "label", "modality", "view", "pred", *[f"prob_{c}" for c in model.classes]]
    fields += [*UNCERTAINTY_FIELDS, *SELECTIVE_FIELDS, "error"]
    chosen = select([model], probs, scores, gates)
    reference = [  # the non-empty fields (modality and view are empty for PNG and JPEG files)
        {k: str(v) for k, v in csv_row(i, model.classes, p, "", score, in_set, None, c, a).items() if str(v)}
        for i, p, score, in_set, c, a in zip(
            inputs, probs, scores, sets, chosen.confidence, chosen.accepted, strict=True
        )
    ]
    streamed = read_rows(out)
    assert list(streamed[0]) == fields
    assert [{k: v for k, v in r.items() if v} for r in streamed] == reference


def test_output_folders_that_cannot_be_used_are_refused_before_anything_loads(tiny_run, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(PredictError, match=rf"output_dir={blocker}: is a file, not a folder"):
        predict(predict_config(tmp_path, tiny_run["ckpt"], tiny_run["data"], f"output_dir={blocker}"))
    with pytest.raises(PredictError, match=rf"output_dir={blocker / 'sub'}: cannot write there"):
        predict(predict_config(tmp_path, tiny_run["ckpt"], tiny_run["data"], f"output_dir={blocker / 'sub'}"))
    used = tmp_path / "used"
    used.mkdir()
    (used / "predictions.csv").write_text("path,label\n")
    with pytest.raises(PredictError, match=rf"output_dir={used}: holds the predictions of another run"):
        predict(predict_config(tmp_path, tiny_run["ckpt"], tiny_run["data"], f"output_dir={used}"))


def test_malicious_checkpoint_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as fh:
        pickle.dump({"state_dict": {}, "hyper_parameters": {"classes": ["a"]}, "x": Exploit()}, fh)
    with pytest.raises(CheckpointError, match="arbitrary unpickling"):
        load_model(evil)
    assert not marker.exists()
    zipped = tmp_path / "evil_zip.ckpt"
    torch.save({"state_dict": {}, "x": Exploit()}, zipped)
    marker.unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="arbitrary unpickling"):
        load_model(zipped)
    assert not marker.exists()
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_model(garbage)
    not_ours = tmp_path / "other.ckpt"
    torch.save({"weights": torch.zeros(2)}, not_ours)
    with pytest.raises(CheckpointError, match="not a chestxray checkpoint"):
        load_model(not_ours)


def test_overlay_title_is_white_on_a_dark_band_that_fits_the_image():
    from chestxray.evaluation.saliency import put_title

    image = np.zeros((256, 256, 3), np.uint8)
    image[..., 1] = 200  # green, so any pixel of the image left inside the title's box shows
    out = put_title(image, "Viral Pneumonia 1.00")  # the longest title at the smallest overlay size
    rows, cols = np.nonzero((out != image).any(-1))
    box = out[: rows.max() + 1, : cols.max() + 1].astype(int)
    assert cols.max() < 255  # not cut off at the right edge
    assert (box[..., 0] == box[..., 1]).all() and (box[..., 1] == box[..., 2]).all()  # only grey: text on its band
    assert (box.max(-1) > 200).sum() > 100  # the white text is there


# --- slow: predict.py as a user runs it -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def test_folder_prediction(trained_run, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("pred")
    result = run_predict(
        f"ckpt={trained_run['ckpt']}", f"inputs={trained_run['data'] / 'test'}", f"hydra.run.dir={out}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {"dir": out, "result": result}


@pytest.mark.slow
def test_predict_py_on_the_test_folder_matches_the_training_report(test_folder_prediction, trained_run):
    out, result = test_folder_prediction["dir"], test_folder_prediction["result"]
    rows = read_rows(out)
    n = sum(1 for _ in (trained_run["data"] / "test").rglob("*.*"))
    report = json.loads((out / "metrics.json").read_text())
    assert (
        report["accuracy"] == pytest.approx(sum(r["label"] == r["pred"] for r in rows) / n) and report["accuracy"] > 0.6
    )
    for name in ("confusion_matrix", "per_class", "reliability", "gallery", "gradcam_gallery"):
        assert (out / f"{name}.png").stat().st_size > 1000
    assert f"predicted {n} image(s)" in result.stdout
    answers = [line for line in result.stdout.splitlines() if "  (Normal " in line]  # the first print_limit answers
    assert len(answers) == 20 and f"... and {n - 20} more answer(s) in predictions.csv" in result.stdout
    log = (out / "predict.log").read_text()
    assert "accuracy" in log and f"predicted {n} image(s)" in log  # the report is in the run's log too
    train_rows = {r["path"]: r for r in read_rows(trained_run["dir"])}
    for r in rows:
        mine = [float(r[f"prob_{c}"]) for c in CLASSES]
        theirs = [float(train_rows[r["path"]][f"prob_{c}"]) for c in CLASSES]
        assert np.allclose(mine, theirs, atol=2e-6), r["path"]


@pytest.mark.slow
def test_bad_and_hostile_files_get_error_rows_and_the_rest_is_predicted(trained_run, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not an image")
    (folder / "bomb.png").write_bytes(png_bytes(12_000, 10_000))
    (folder / "dot.png").write_bytes(png_bytes(1, 1))
    good = sorted((trained_run["data"] / "test" / "Normal").iterdir())[:2]
    shutil.copy(good[0], folder / "a photo ñ.jpeg")
    shutil.copy(good[1], folder / f"b{good[1].suffix.upper()}")
    exif_rotated_jpeg(folder / "rotated.jpg", 6)
    out = tmp_path / "out"
    result = run_predict(f"ckpt={trained_run['ckpt']}", f"inputs={folder}", f"hydra.run.dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {Path(r["path"]).name: r for r in read_rows(out)}
    assert set(rows) == {p.name for p in folder.iterdir()}
    assert "empty file" in rows["empty.png"]["error"] and not rows["empty.png"]["pred"]
    assert "not a JPEG, PNG, TIFF or DICOM image" in rows["notes.jpg"]["error"]
    assert "is above data.max_pixels=100,000,000" in rows["bomb.png"]["error"]  # the data group's setting
    assert "smaller than data.min_image_side=32" in rows["dot.png"]["error"]
    assert all(
        rows[n]["pred"] and not rows[n]["error"]
        for n in ("a photo ñ.jpeg", f"b{good[1].suffix.upper()}", "rotated.jpg")
    )
    unlabelled = json.loads((out / "metrics.json").read_text())  # no labels: only what needs none
    assert unlabelled["n"] == 0 and "accuracy" not in unlabelled and "shift_alarm" in unlabelled["uncertainty"]
    answer = f"{folder / 'rotated.jpg'}: {rows['rotated.jpg']['pred']}  (Normal "
    assert answer in result.stdout and answer in (out / "predict.log").read_text()  # printed, and in the log

    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "empty.png").write_bytes(b"")
    result = run_predict(f"ckpt={trained_run['ckpt']}", f"inputs={only_bad}", f"hydra.run.dir={tmp_path / 'o2'}")
    assert result.returncode == 2 and "could be read" in result.stderr


@pytest.mark.slow
def test_one_labelled_image_prints_its_answer_and_accuracy_not_a_report(trained_run, tmp_path):
    image = sorted((trained_run["data"] / "test" / "Covid").iterdir())[0]
    result = run_predict(f"ckpt={trained_run['ckpt']}", f"inputs={image}", f"hydra.run.dir={tmp_path / 'one'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{image}: " in result.stdout and "of 1 labelled image(s) right" in result.stdout
    assert "%" not in result.stdout.split("labelled image(s) right")[1].split("\n", 1)[0]  # counts, not rates
    assert "the 90% prediction set" in result.stdout  # what set {...} means, once
    assert "sens" not in result.stdout and "confusion matrix" not in result.stdout


@pytest.mark.slow
def test_missing_settings_and_files_fail_with_status_2_leaving_only_the_log(trained_run, tmp_path):
    cases = [
        ([f"inputs={tmp_path}"], "predict.py: error: PredictError: ckpt= is required"),
        ([f"ckpt={trained_run['ckpt']}"], "predict.py: error: PredictError: inputs= is required"),
        ([f"ckpt={tmp_path / 'none.ckpt'}", f"inputs={tmp_path}"], f"ckpt={tmp_path / 'none.ckpt'}: file not found"),
        ([f"ckpt={trained_run['ckpt']}", f"inputs={tmp_path / 'empty'}"], "no JPEG, PNG, TIFF or DICOM image found"),
        ([f"ckpt={trained_run['ckpt']}", f"inputs={tmp_path}", "data.max_pixels=0"], "ConfigError: data.max_pixels=0"),
        ([f"ckpt={trained_run['ckpt']}", f"inputs={tmp_path}", "data.image_size=64"], "predict.py does not use data."),
    ]
    (tmp_path / "empty").mkdir()
    for k, (args, message) in enumerate(cases):
        run = tmp_path / f"r{k}"
        result = run_predict(*args, f"hydra.run.dir={run}")
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, message
        assert [p.name for p in run.iterdir()] == ["predict.log"] and message in (run / "predict.log").read_text()


@pytest.mark.slow
def test_gradcam_overlays_are_readable_and_keep_the_aspect_ratio(trained_run, tmp_path):
    out = tmp_path / "cam"
    sources = [sorted((trained_run["data"] / "test" / c).iterdir())[0] for c in ("Normal", "Covid")]
    result = run_predict(
        f"ckpt={trained_run['ckpt']}", f"inputs=[{sources[0]},{sources[1]}]", "gradcam=true", f"hydra.run.dir={out}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    overlays = sorted((out / "gradcam").glob("*.png"))
    assert [p.name for p in overlays] == sorted(f"{s.parent.name}_{s.stem}.png" for s in sources)
    for src in sources:
        overlay = cv2.imread(str(out / "gradcam" / f"{src.parent.name}_{src.stem}.png"))
        original = cv2.imread(str(src))
        assert min(overlay.shape[:2]) == 256  # not the 32 px model input
        assert overlay.shape[1] / overlay.shape[0] == pytest.approx(original.shape[1] / original.shape[0], abs=0.01)


@pytest.mark.slow
def test_onnx_runtime_matches_torch_and_exports_once(trained_run, test_folder_prediction, tmp_path):
    out = tmp_path / "onnx"
    ckpt = tmp_path / "model.ckpt"
    shutil.copy(trained_run["ckpt"], ckpt)
    result = run_predict(
        f"ckpt={ckpt}", f"inputs={trained_run['data'] / 'test'}", "runtime=onnx", f"hydra.run.dir={out}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    exported = list((cache_dir() / "onnx").glob("model-*.onnx"))
    assert len(exported) == 1 and exported[0].name.count(".") == 2  # in the cache: model-<where>.<key>.onnx
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt", "onnx"]  # nothing beside the checkpoint
    torch_rows, onnx_rows = read_rows(test_folder_prediction["dir"]), read_rows(out)
    assert [r["path"] for r in onnx_rows] == [r["path"] for r in torch_rows]
    for a, b in zip(torch_rows, onnx_rows, strict=True):  # the temperature is inside the graph
        assert a["pred"] == b["pred"], a["path"]
        for c in CLASSES:
            assert abs(float(a[f"prob_{c}"]) - float(b[f"prob_{c}"])) <= 1e-4
    stamp = exported[0].stat().st_mtime_ns
    from chestxray.inference.onnx import exported as export_of

    assert export_of([ckpt], [load_model(ckpt)]) == exported[0] and exported[0].stat().st_mtime_ns == stamp
    with open(exported[0], "r+b") as fh:  # bytes that are not those written are never used: exported again
        fh.seek(1000)
        fh.write(b"\x00\x01\x02")
    assert export_of([ckpt], [load_model(ckpt)]) == exported[0] and exported[0].stat().st_mtime_ns != stamp
    assert (
        json.loads(exported[0].with_suffix(".json").read_text())["sha256"]
        == hashlib.sha256(exported[0].read_bytes()).hexdigest()
    )


@pytest.mark.slow
def test_sigterm_stops_predict_with_143_leaving_the_finished_rows(trained_run, tmp_path):
    from chestxray.synthetic import make_dataset

    many = tmp_path / "many"
    make_dataset(many, {"scans": 150}, size=64, mixed=False)
    out = tmp_path / "out"
    cmd = [sys.executable, "predict.py", "trainer.accelerator=cpu", f"ckpt={trained_run['ckpt']}", f"inputs={many}"]
    cmd += ["data.eval_batch_size=2", f"hydra.run.dir={out}"]  # with the default decoding worker processes
    csv_file = out / "predictions.csv"
    proc, stderr, seconds = signal_when(
        cmd, lambda: csv_file.exists() and len(csv_file.read_text().splitlines()) > 5, signal.SIGTERM, settle=0
    )
    assert seconds < 10
    assert proc.returncode == 143, stderr[-3000:]
    assert "predict.py: stopped by SIGTERM" in stderr
    rows = read_rows(out)
    inputs = [str(i.path) for i in find_inputs(str(many), CLASSES)]
    assert 4 <= len(rows) < 450 and [r["path"] for r in rows] == inputs[: len(rows)]  # a prefix, whole rows
    assert all(r["pred"] and float(r["prob_Covid"]) >= 0 for r in rows)


def test_printed_paths_are_relative_inside_the_working_folder_and_absolute_outside(tmp_path, monkeypatch):
    from chestxray.runtime.console import shown

    (tmp_path / "work" / "outputs").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    assert shown(tmp_path / "work" / "outputs" / "run") == os.path.join("outputs", "run")
    assert shown("outputs/run") == os.path.join("outputs", "run")
    assert shown(tmp_path / "elsewhere") == str(tmp_path / "elsewhere")


def test_the_onnx_graph_is_the_calibrated_predictor(tmp_path):
    """The fast tier's check of export.py: uint8 images in, softmax(logits / T) out, as the torch predictor gives."""
    from chestxray.inference.onnx import OnnxPredictor, export_onnx
    from chestxray.models.classifier import ChestXrayClassifier, Probabilities

    torch.manual_seed(0)
    model = ChestXrayClassifier(["a", "b", "c"], 32, pretrained=False).eval()
    with torch.no_grad():
        model.net.classifier[-1].bias.copy_(torch.tensor([3.0, 0.0, -3.0]))  # probabilities far from uniform
    model.temperature.fill_(2.0)
    graph = export_onnx([model], tmp_path / "model.onnx")
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    by_onnx = OnnxPredictor(graph).probabilities(images)[0]
    with torch.no_grad():
        by_torch = Probabilities([model])(images)
        uncalibrated = model.logits(images).softmax(1)
    assert by_onnx.shape == (5, 3) and torch.allclose(by_onnx, by_torch, atol=1e-5)
    assert (by_onnx - uncalibrated).abs().max() > 0.05  # the temperature is inside the graph


def test_predict_is_fp32_whatever_the_trainer_group_and_bf16_only_when_asked(tiny_run, tmp_path, capsys):
    """trainer=cpu resolves to bf16-mixed on AMX CPUs: predict.py still gives the test report's fp32 probabilities;
    precision=bf16-mixed gives bf16 ones and says so; trainer.precision= is refused, naming precision=."""
    from omegaconf import OmegaConf

    from chestxray.errors import ConfigError
    from chestxray.settings import check_predict_overrides

    inputs = tiny_run["data"] / "test" / "Covid"
    amx = predict_config(tmp_path / "amx", tiny_run["ckpt"], inputs, "trainer=cpu", "report.bootstrap_resamples=0")
    OmegaConf.update(amx, "trainer.precision", "bf16-mixed")  # what trainer=cpu resolves to on an AMX CPU
    predict(amx)
    assert "autocast" not in capsys.readouterr().out
    fp32 = {r["path"]: r for r in read_rows(tiny_run["dir"])}
    for r in read_rows(tmp_path / "amx"):
        assert all(abs(float(r[f"prob_{c}"]) - float(fp32[r["path"]][f"prob_{c}"])) < 2e-6 for c in CLASSES)
    bf16 = tmp_path / "bf16"
    predict(predict_config(bf16, tiny_run["ckpt"], inputs, "precision=bf16-mixed", "report.bootstrap_resamples=0"))
    assert "precision=bf16-mixed: these probabilities come from bf16-mixed autocast" in capsys.readouterr().out
    gaps = [abs(float(r[f"prob_{c}"]) - float(fp32[r["path"]][f"prob_{c}"])) for r in read_rows(bf16) for c in CLASSES]
    assert max(gaps) > 1e-5  # bf16 really ran
    with pytest.raises(ConfigError, match=r"trainer.precision=bf16-mixed: predict.py predicts in fp32.*precision="):
        check_predict_overrides(["trainer.precision=bf16-mixed"])


def test_a_class_without_images_has_undefined_rates_not_zero(tiny_run, tmp_path, capsys):
    """Predicting two of the three classes' folders: the missing class's sensitivity and F1 are null in metrics.json
    and n/a in the printout (not 0.000); its precision is defined only if the model answered it."""
    inputs = [tiny_run["data"] / "test" / "Covid", tiny_run["data"] / "test" / "Normal"]
    out = tmp_path / "two"
    predict(predict_config(out, tiny_run["ckpt"], inputs, "report.bootstrap_resamples=0", "print_limit=0"))
    report = json.loads((out / "metrics.json").read_text())
    missing = report["per_class"]["Viral Pneumonia"]
    assert missing["support"] == 0 and missing["sensitivity"] is None and missing["f1"] is None
    answered = sum(row[2] for row in report["confusion_matrix"])
    assert (missing["precision"] is None) == (answered == 0)
    assert missing["specificity"] is not None  # it has negatives: every image is one
    for name in ("Covid", "Normal"):
        assert all(report["per_class"][name][m] is not None for m in ("sensitivity", "specificity", "f1"))
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Viral Pneumonia "))
    assert row.split()[2] == "n/a" and "0.000" not in row.split()[2]
    assert (out / "per_class.png").stat().st_size > 0


@pytest.mark.slow
def test_int8_is_calibrated_once_at_export_on_the_checkpoints_train_images(tiny_run, tmp_path):
    """Two predictions of different inputs share one int8 export, calibrated on the checkpoint's train images: an
    image gets the same answer alone or among others; a named calibration folder replaces it (one file still); nothing
    is written beside the checkpoint."""
    ckpt = tmp_path / "ckpts" / "best.ckpt"
    ckpt.parent.mkdir()
    shutil.copy(tiny_run["ckpt"], ckpt)
    test = tiny_run["data"] / "test"
    one = sorted((test / "Covid").iterdir())[0]
    predict(predict_config(tmp_path / "all", ckpt, test, "runtime=onnx-int8", "report.bootstrap_resamples=0"))
    predict(predict_config(tmp_path / "one", ckpt, one, "runtime=onnx-int8", "report.bootstrap_resamples=0"))
    cache = cache_dir() / "onnx"
    mine = f"best-{hashlib.sha256(os.path.realpath(ckpt).encode()).hexdigest()[:8]}."
    exports = [p for p in cache.glob("*.int8.onnx") if p.name.startswith(mine)]
    assert len(exports) == 1 and os.listdir(ckpt.parent) == ["best.ckpt"]
    record = json.loads(exports[0].with_suffix(".json").read_text())
    assert record["source"] == "the checkpoint's train images" and record["count"] == 63  # 21 of each class
    alone = read_rows(tmp_path / "one")[0]
    among = next(r for r in read_rows(tmp_path / "all") if Path(r["path"]).resolve() == one.resolve())
    assert all(alone[f"prob_{c}"] == among[f"prob_{c}"] for c in CLASSES)
    # the detector's arithmetic stays float (onnx.NETWORK_OPS): int8 moves the score a little, not across the range
    predict(predict_config(tmp_path / "fp32", ckpt, test, "report.bootstrap_resamples=0"))
    int8, fp32 = ({r["path"]: float(r["ood_score"]) for r in read_rows(tmp_path / k)} for k in ("all", "fp32"))
    moved = np.array([int8[p] - fp32[p] for p in fp32])
    spread = np.std(list(fp32.values()))
    assert np.median(np.abs(moved)) < 0.2 * spread, (np.median(np.abs(moved)), spread)
    named = run_script("-m", "chestxray.export", f"ckpt={ckpt}", "format=onnx-int8", f"calibration={test / 'Normal'}")
    assert "onnx-int8:" in named.stdout
    exports = [p for p in cache.glob("*.int8.onnx") if p.name.startswith(mine)]
    assert len(exports) == 1 and len([p for p in cache.glob("*.onnx") if p.name.startswith(mine)]) == 2
    assert json.loads(exports[0].with_suffix(".json").read_text())["source"] == f"the named images in {test / 'Normal'}"
    again = run_script(  # a run naming no images uses that export, and says what it was calibrated on
        "predict.py", f"ckpt={ckpt}", f"inputs={one}", "runtime=onnx-int8", f"hydra.run.dir={tmp_path / 'again'}"
    )
    assert (
        f"runtime=onnx-int8: quantised when exported, calibrated on 12 of the named images in {test / 'Normal'}"
        in again.stdout
    )
    back = run_script(  # calibration=train: quantised again on the train images
        "predict.py", f"ckpt={ckpt}", f"inputs={one}", "runtime=onnx-int8", "calibration=train",
        f"hydra.run.dir={tmp_path / 'back'}",
    )  # fmt: skip
    assert "calibrated on 63 of the checkpoint's train images" in back.stdout, back.stdout
    assert json.loads(exports[0].with_suffix(".json").read_text())["source"] == "the checkpoint's train images"


def test_labels_come_from_class_folders_inside_what_was_given_whatever_the_form_or_order(tmp_path, monkeypatch):
    """A folder, a glob (from its fixed leading folder) and a named file label alike, in any order; a folder above
    what was given never labels (unsorted images kept under a folder named Covid are not Covid)."""
    for name in ("test/Covid/b.png", "test/Covid/sub/a.png", "Covid/site/unsorted/c.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(png_bytes(40, 40))
    monkeypatch.chdir(tmp_path)
    covid = CLASSES.index("Covid")

    def labels(inputs) -> dict[str, int | None]:
        return {p.path.name: p.label for p in find_inputs(inputs, CLASSES)}

    for inputs in ("test", "test/Covid", "test/Covid/**/*.png", "test/**/*.png", "*/Covid/**/*.png"):
        assert labels(inputs) == {"b.png": covid, "a.png": covid}, inputs
    assert labels(["test/Covid/sub/a.png", "test"])["a.png"] == covid  # the order of inputs is no matter
    assert labels(["test", "test/Covid/sub/a.png"])["a.png"] == covid
    assert labels("test/Covid/sub/a.png") == {"a.png": None}  # a named file: its own folder only
    assert labels("Covid/site/unsorted") == {"c.png": None} and labels("Covid/site") == {"c.png": None}
    assert labels("Covid") == {"c.png": covid}
    (tmp_path / "test" / "Normal").mkdir()
    (tmp_path / "test" / "Normal" / "link.png").symlink_to(tmp_path / "test" / "Covid" / "b.png")
    for inputs in (["test/Covid", "test/Normal"], ["test/Normal", "test/Covid"], "test"):
        linked = [label for name, label in labels(inputs).items() if name in ("b.png", "link.png")]
        assert linked == [None], inputs  # one file in two class folders: no label, whichever comes first


def test_an_export_that_cannot_be_written_is_refused_before_the_export(tiny_run, tmp_path, monkeypatch, capsys):
    """An unwritable cache folder ($CHESTXRAY_CACHE below a file) or out= is one line (exit 2) before the export's
    minutes, not a traceback after them."""
    from chestxray import export
    from chestxray.errors import CacheError
    from chestxray.inference import onnx
    from chestxray.models.checkpoints import load_models

    def no_export(*args):
        raise AssertionError("exported although the result could not be kept")

    monkeypatch.setattr(onnx, "onnx_bytes", no_export)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("CHESTXRAY_CACHE", str(blocker / "cache"))
    ckpt = str(tiny_run["ckpt"])
    with pytest.raises(CacheError, match=rf"^cannot write the ONNX export cache folder {blocker}/cache/onnx "):
        onnx.exported([ckpt], load_models([ckpt]), "onnx")
    assert export.main([f"ckpt={ckpt}"]) == 2
    assert capsys.readouterr().err.startswith("export: error: cannot write the ONNX export cache folder")
    monkeypatch.setenv("CHESTXRAY_CACHE", str(tmp_path / "cache"))
    for out, said in (
        (blocker / "x.onnx", f"out={blocker / 'x.onnx'}: cannot write in {blocker}: "),
        (tmp_path, "is a folder"),
    ):
        assert export.main([f"ckpt={ckpt}", f"out={out}"]) == 2
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1, err


def test_a_checkpoint_without_its_end_of_training_fit_is_said_to_be_uncalibrated(tiny_run, caplog):
    """last.ckpt (written each epoch, before train.py's end-of-run fit) answers at T = 1 with empty flags and sets:
    loading it for predict.py, serve.py, adapt.py or the bench says so and where the fitted checkpoint is."""
    from chestxray.models.checkpoints import load_model

    with caplog.at_level(logging.WARNING, logger="chestxray.models.checkpoints"):
        load_model(tiny_run["ckpt"])
        assert not caplog.records  # best.ckpt: fitted
        last = tiny_run["dir"] / "checkpoints" / "last.ckpt"
        load_model(last)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and said[0].startswith(f"ckpt={last}: nothing was fitted into this checkpoint after training")
    assert "its probabilities are uncalibrated" in said[0] and "checkpoints/best.ckpt" in said[0]


def test_two_predictions_into_one_output_dir_at_once_are_refused(tiny_run, tmp_path):
    """output_dir= given by hand: a run that finds another working there (its lock held) is refused in one line,
    as one that finds its predictions.csv is."""
    import fcntl

    from chestxray.errors import OutputDirError, PredictError
    from chestxray.runtime.folders import LOCK

    shared = tmp_path / "shared"
    shared.mkdir()
    image = sorted((tiny_run["data"] / "test" / "Covid").iterdir())[0]
    with open(shared / LOCK, "w") as held:  # another predict.py, working in it right now
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(OutputDirError, match="another run is working in this folder right now"):
            predict(predict_config(tmp_path / "run1", tiny_run["ckpt"], image, f"output_dir={shared}"))
    assert not (shared / "predictions.csv").exists()
    predict(predict_config(tmp_path / "run2", tiny_run["ckpt"], image, f"output_dir={shared}"))
    assert (shared / "predictions.csv").is_file() and not (shared / LOCK).exists()
    with pytest.raises(PredictError, match="holds the predictions of another run"):
        predict(predict_config(tmp_path / "run3", tiny_run["ckpt"], image, f"output_dir={shared}"))


def test_an_export_record_vouches_for_the_bytes_this_process_wrote(tiny_run, tmp_path, monkeypatch):
    """Two processes exporting one checkpoint at once: if the other's file lands between this one's write and its
    record, the record (of this process's bytes) does not match it, and the cache makes the export again instead
    of trusting bytes nobody recorded."""
    from chestxray.inference import onnx
    from chestxray.models.checkpoints import load_models

    monkeypatch.setenv("CHESTXRAY_CACHE", str(tmp_path / "cache"))
    ckpt = str(tiny_run["ckpt"])
    real = onnx.atomic_write

    def racing(path, content):
        written = real(path, content)
        if Path(path).suffix == ".onnx":
            Path(path).write_bytes(b"another process's export")  # lands before this one's record
        return written

    monkeypatch.setattr(onnx, "onnx_bytes", lambda models: b"this process's export")
    monkeypatch.setattr(onnx, "atomic_write", racing)
    target = onnx.exported([ckpt], load_models([ckpt]), "onnx")
    assert onnx._record(target) is None  # not trusted: made again on the next call
    monkeypatch.setattr(onnx, "atomic_write", real)
    assert onnx.exported([ckpt], load_models([ckpt]), "onnx") == target and onnx._record(target)
    assert target.read_bytes() == b"this process's export"
