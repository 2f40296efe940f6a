import csv
import json
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

from chestxray.checkpoints import CheckpointError, load_checkpoint
from chestxray.inference import csv_row, find_inputs
from chestxray.store import DecodeSettings, decode_in_memory
from tests.conftest import ROOT, compose_config, signal_when
from tests.test_images import exif_rotated_jpeg, png_bytes


def best(run: dict) -> Path:
    return run["dir"] / "checkpoints" / "best.ckpt"


def run_predict(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "predict.py", "trainer.accelerator=cpu", "report.bootstrap_resamples=100", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def read_rows(folder: Path) -> list[dict]:
    with open(folder / "predictions.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def test_folder_prediction(trained_run, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("pred")
    result = run_predict(f"ckpt={best(trained_run)}", f"inputs={trained_run['data'] / 'test'}", f"hydra.run.dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    return {"dir": out, "result": result}


def test_predict_test_folder_matches_the_training_report(test_folder_prediction, trained_run):
    out, result = test_folder_prediction["dir"], test_folder_prediction["result"]
    rows = read_rows(out)
    n = sum(1 for _ in (trained_run["data"] / "test").rglob("*.*"))
    assert len(rows) == n and all(r["label"] and r["pred"] and not r["error"] for r in rows)
    for r in rows:
        assert sum(float(r[f"prob_{c}"]) for c in ("Normal", "Covid", "Viral Pneumonia")) == pytest.approx(1, abs=1e-4)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(sum(r["label"] == r["pred"] for r in rows) / n)
    lo, hi = metrics["accuracy_ci95"]
    assert lo < metrics["accuracy"] < hi and metrics["accuracy"] > 0.6
    for name in ("confusion_matrix", "per_class", "reliability", "gallery"):
        assert (out / f"{name}.png").stat().st_size > 1000
    assert "accuracy" in result.stdout and f"predicted {n} image(s)" in result.stdout
    assert f"{n} image(s)" in result.stdout and ": Covid  (Normal" not in result.stdout  # too many to list each
    # the same per-image probabilities as trainer.test on the same checkpoint
    train_rows = {r["path"]: r for r in csv.DictReader(open(trained_run["dir"] / "predictions.csv"))}
    for r in rows:
        mine = [float(r[f"prob_{c}"]) for c in ("Normal", "Covid", "Viral Pneumonia")]
        theirs = [float(train_rows[r["path"]][f"prob_{c}"]) for c in ("Normal", "Covid", "Viral Pneumonia")]
        assert np.allclose(mine, theirs, atol=2e-6), r["path"]


def test_streamed_csv_equals_the_all_at_once_csv_row_for_row(test_folder_prediction, trained_run):
    """Decoding everything first, then predicting (the old way), gives the same file."""
    model = load_checkpoint(best(trained_run))
    inputs = find_inputs(str(trained_run["data"] / "test"), model.classes)
    decoded = decode_in_memory([i.path for i in inputs], DecodeSettings(32))
    assert decoded.paths == [i.path for i in inputs]
    with torch.inference_mode():  # the same batches of 8 (predict.py's batch_size): the same arithmetic
        images = torch.from_numpy(np.stack([decoded.images[i] for i in range(len(inputs))]))
        probs = np.concatenate([model(images[k : k + 8]).float().softmax(1).numpy() for k in range(0, len(images), 8)])
    fields = ["path", "label", "pred", *[f"prob_{c}" for c in model.classes], "error"]
    reference = [
        {k: str(v) for k, v in csv_row(i, model.classes, p, "").items()} for i, p in zip(inputs, probs, strict=True)
    ]
    streamed = read_rows(test_folder_prediction["dir"])
    assert [list(r) for r in streamed][0] == fields
    assert [{k: v for k, v in r.items() if v} for r in streamed] == reference


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
    result = run_predict(f"ckpt={best(trained_run)}", f"inputs={folder}", f"hydra.run.dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {Path(r["path"]).name: r for r in read_rows(out)}
    assert set(rows) == {p.name for p in folder.iterdir()}
    assert "empty file" in rows["empty.png"]["error"] and not rows["empty.png"]["pred"]
    assert "not a JPEG or PNG" in rows["notes.jpg"]["error"]
    assert "is above max_pixels=100,000,000" in rows["bomb.png"]["error"]  # predict.py's own setting
    assert "smaller than min_image_side=32" in rows["dot.png"]["error"]
    assert all(
        rows[n]["pred"] and not rows[n]["error"]
        for n in ("a photo ñ.jpeg", f"b{good[1].suffix.upper()}", "rotated.jpg")
    )
    assert not (out / "metrics.json").exists()  # no labels: no metrics
    # few images: each answer is printed
    assert f"{folder / 'rotated.jpg'}: {rows['rotated.jpg']['pred']}  (Normal " in result.stdout

    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "empty.png").write_bytes(b"")
    result = run_predict(f"ckpt={best(trained_run)}", f"inputs={only_bad}", f"hydra.run.dir={tmp_path / 'o2'}")
    assert result.returncode == 2 and "could be read" in result.stderr


def test_missing_settings_and_files_fail_with_status_2_and_a_reason(trained_run, tmp_path):
    result = run_predict(f"inputs={tmp_path}", f"hydra.run.dir={tmp_path / 'r0'}")
    assert result.returncode == 2 and "predict.py: error: ckpt= is required" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_predict(f"ckpt={best(trained_run)}", f"hydra.run.dir={tmp_path / 'r1'}")
    assert result.returncode == 2 and "predict.py: error: inputs= is required" in result.stderr
    result = run_predict(f"ckpt={tmp_path / 'none.ckpt'}", f"inputs={tmp_path}", f"hydra.run.dir={tmp_path / 'r2'}")
    assert result.returncode == 2 and f"ckpt={tmp_path / 'none.ckpt'}: file not found" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_predict(f"ckpt={best(trained_run)}", f"inputs={empty}", f"hydra.run.dir={tmp_path / 'r3'}")
    assert result.returncode == 2 and "no .jpeg/.jpg/.png image found" in result.stderr


def test_malicious_checkpoint_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as fh:
        pickle.dump({"state_dict": {}, "hyper_parameters": {"classes": ["a"]}, "x": Exploit()}, fh)
    with pytest.raises(CheckpointError, match="arbitrary unpickling"):
        load_checkpoint(evil)
    assert not marker.exists()
    zipped = tmp_path / "evil_zip.ckpt"
    torch.save({"state_dict": {}, "x": Exploit()}, zipped)
    marker.unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="arbitrary unpickling"):
        load_checkpoint(zipped)
    assert not marker.exists()
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_checkpoint(garbage)
    not_ours = tmp_path / "other.ckpt"
    torch.save({"weights": torch.zeros(2)}, not_ours)
    with pytest.raises(CheckpointError, match="not a chestxray checkpoint"):
        load_checkpoint(not_ours)


def test_gradcam_overlays_are_readable_and_keep_the_aspect_ratio(trained_run, tmp_path):
    out = tmp_path / "cam"
    sources = [sorted((trained_run["data"] / "test" / c).iterdir())[0] for c in ("Normal", "Covid")]
    result = run_predict(
        f"ckpt={best(trained_run)}", f"inputs=[{sources[0]},{sources[1]}]", "gradcam=true", f"hydra.run.dir={out}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    overlays = sorted((out / "gradcam").glob("*.png"))
    assert [p.name for p in overlays] == sorted(f"{s.parent.name}_{s.stem}.png" for s in sources)
    for src in sources:
        overlay = cv2.imread(str(out / "gradcam" / f"{src.parent.name}_{src.stem}.png"))
        original = cv2.imread(str(src))
        assert min(overlay.shape[:2]) == 256  # not the 32 px model input
        assert overlay.shape[1] / overlay.shape[0] == pytest.approx(original.shape[1] / original.shape[0], abs=0.01)


def test_ensemble_of_two_copies_is_that_checkpoint_and_mismatches_are_refused(trained_run, tmp_path):
    from chestxray.inference import predict

    copy = tmp_path / "copy.ckpt"
    shutil.copy(best(trained_run), copy)
    inputs = str(trained_run["data"] / "test" / "Covid")
    cfg = compose_config(
        "predict", [f"ckpt=[{best(trained_run)},{copy}]", f"inputs={inputs}", f"paths.output_dir={tmp_path / 'e'}"]
    )
    predict(cfg)
    single = compose_config(
        "predict", [f"ckpt={best(trained_run)}", f"inputs={inputs}", f"paths.output_dir={tmp_path / 's'}"]
    )
    predict(single)
    assert read_rows(tmp_path / "e") == read_rows(tmp_path / "s")
    other = torch.load(best(trained_run), weights_only=True)
    other["hyper_parameters"]["image_size"] = 64
    torch.save(other, tmp_path / "other.ckpt")
    pair = f"ckpt=[{best(trained_run)},{tmp_path / 'other.ckpt'}]"
    bad = compose_config("predict", [pair, f"inputs={inputs}", f"paths.output_dir={tmp_path / 'b'}"])
    from chestxray.inference import PredictError

    with pytest.raises(PredictError, match=r"cannot be averaged with .*: they differ in image_size: 32 vs 64"):
        predict(bad)


def test_onnx_runtime_matches_torch_and_exports_once(trained_run, test_folder_prediction, tmp_path):
    out = tmp_path / "onnx"
    ckpt = tmp_path / "model.ckpt"
    shutil.copy(best(trained_run), ckpt)
    result = run_predict(
        f"ckpt={ckpt}", f"inputs={trained_run['data'] / 'test'}", "runtime=onnx", f"hydra.run.dir={out}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    exported = list(tmp_path.glob("model.*.onnx.onnx"))
    assert len(exported) == 1  # cached beside the checkpoint, keyed by its content
    torch_rows, onnx_rows = read_rows(test_folder_prediction["dir"]), read_rows(out)
    assert [r["path"] for r in onnx_rows] == [r["path"] for r in torch_rows]
    for a, b in zip(torch_rows, onnx_rows, strict=True):
        assert a["pred"] == b["pred"], a["path"]
        for c in ("Normal", "Covid", "Viral Pneumonia"):
            assert abs(float(a[f"prob_{c}"]) - float(b[f"prob_{c}"])) <= 1e-4
    stamp = exported[0].stat().st_mtime_ns
    from chestxray.export import exported as export_of

    assert export_of([ckpt], [load_checkpoint(ckpt)]) == exported[0] and exported[0].stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_sigterm_stops_predict_with_143_leaving_the_finished_rows(trained_run, tmp_path):
    from chestxray.synthetic import make_dataset

    many = tmp_path / "many"
    make_dataset(many, {"scans": 150}, size=64, mixed=False)
    out = tmp_path / "out"
    cmd = [sys.executable, "predict.py", "trainer.accelerator=cpu", f"ckpt={best(trained_run)}", f"inputs={many}"]
    cmd += ["batch_size=2", f"hydra.run.dir={out}"]  # with the default decoding worker process
    csv_file = out / "predictions.csv"
    proc, stderr, seconds = signal_when(
        cmd, lambda: csv_file.exists() and len(csv_file.read_text().splitlines()) > 5, signal.SIGTERM, settle=0
    )
    assert seconds < 10
    assert proc.returncode == 143, stderr[-3000:]
    assert "predict.py: stopped by SIGTERM" in stderr
    rows = read_rows(out)
    inputs = [str(i.path) for i in find_inputs(str(many), ["Normal", "Covid", "Viral Pneumonia"])]
    assert 4 <= len(rows) < 450 and [r["path"] for r in rows] == inputs[: len(rows)]  # a prefix, whole rows
    assert all(r["pred"] and float(r["prob_Covid"]) >= 0 for r in rows)


def test_overlay_title_is_white_on_a_dark_band_that_fits_the_image():
    from chestxray.saliency import put_title

    image = np.zeros((256, 256, 3), np.uint8)
    image[..., 1] = 200  # green, so any pixel of the image left inside the title's box shows
    out = put_title(image, "Viral Pneumonia 1.00")  # the longest title at the smallest overlay size
    rows, cols = np.nonzero((out != image).any(-1))
    box = out[: rows.max() + 1, : cols.max() + 1].astype(int)
    assert cols.max() < 255  # not cut off at the right edge
    assert (box[..., 0] == box[..., 1]).all() and (box[..., 1] == box[..., 2]).all()  # only grey: text on its band
    assert (box.max(-1) > 200).sum() > 100  # the white text is there
