import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from chestxray.inference import PredictError, load_checkpoint
from tests.conftest import ROOT


def best_checkpoint(run: dict) -> Path:
    return next((run["dir"] / "checkpoints").glob("epoch_*.ckpt"))


def run_predict(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "predict.py", "trainer.accelerator=cpu", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def read_rows(folder: Path) -> list[dict]:
    with open(folder / "predictions.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_predict_test_folder_writes_rows_metrics_and_figures(trained_run, data_dir, tmp_path):
    out = tmp_path / "pred"
    result = run_predict(f"ckpt={best_checkpoint(trained_run)}", f"inputs={data_dir / 'test'}", f"hydra.run.dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_rows(out)
    assert len(rows) == 66 and all(r["label"] and r["pred"] and not r["error"] for r in rows)
    assert {r["label"] for r in rows} == {"Normal", "Covid", "Viral Pneumonia"}
    for r in rows:
        probs = [float(r[f"prob_{c}"]) for c in ("Normal", "Covid", "Viral Pneumonia")]
        assert sum(probs) == pytest.approx(1, abs=1e-4)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "accuracy_ci95", "macro_roc_auc_ovr", "confusion_matrix", "per_class"):
        assert key in metrics
    assert set(metrics["per_class"]["Covid"]) >= {"sensitivity", "specificity", "precision", "f1"}
    assert metrics["accuracy"] == pytest.approx(sum(r["label"] == r["pred"] for r in rows) / 66)
    lo, hi = metrics["accuracy_ci95"]
    assert lo < metrics["accuracy"] < hi
    assert sum(map(sum, metrics["confusion_matrix"])) == 66
    assert (out / "confusion_matrix.png").stat().st_size > 0 and (out / "gallery.png").stat().st_size > 0
    assert "accuracy" in result.stdout
    # the same numbers as trainer.test on the same checkpoint
    train_metrics = json.loads((trained_run["dir"] / "metrics.json").read_text())
    assert metrics["confusion_matrix"] == train_metrics["confusion_matrix"]


def test_bad_files_get_error_rows_and_the_rest_is_predicted(trained_run, data_dir, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not an image")
    shutil.copy(data_dir / "test" / "Normal" / "0101.jpeg", folder / "a.jpeg")
    shutil.copy(data_dir / "test" / "Covid" / "094.png", folder / "b.PNG")
    out = tmp_path / "out"
    result = run_predict(f"ckpt={best_checkpoint(trained_run)}", f"inputs={folder}", f"hydra.run.dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {Path(r["path"]).name: r for r in read_rows(out)}
    assert set(rows) == {"empty.png", "notes.jpg", "a.jpeg", "b.PNG"}
    assert "empty file" in rows["empty.png"]["error"] and not rows["empty.png"]["pred"]
    assert "not a JPEG or PNG" in rows["notes.jpg"]["error"]
    assert rows["a.jpeg"]["pred"] and rows["b.PNG"]["pred"] and not rows["a.jpeg"]["error"]
    assert not (out / "metrics.json").exists()  # no labels: no metrics

    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "empty.png").write_bytes(b"")
    result = run_predict(
        f"ckpt={best_checkpoint(trained_run)}", f"inputs={only_bad}", f"hydra.run.dir={tmp_path / 'o2'}"
    )
    assert result.returncode != 0 and "could be read" in result.stderr


def test_missing_checkpoint_and_no_inputs_fail_clearly(trained_run, tmp_path):
    result = run_predict(f"ckpt={tmp_path / 'none.ckpt'}", f"inputs={tmp_path}", f"hydra.run.dir={tmp_path / 'r1'}")
    assert result.returncode != 0 and "checkpoint not found" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_predict(f"ckpt={best_checkpoint(trained_run)}", f"inputs={empty}", f"hydra.run.dir={tmp_path / 'r2'}")
    assert result.returncode != 0 and "no .jpeg/.jpg/.png image found" in result.stderr


def test_malicious_checkpoint_is_refused_without_running(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as fh:
        pickle.dump({"state_dict": {}, "hyper_parameters": {"classes": ["a"]}, "x": Exploit()}, fh)
    with pytest.raises(PredictError, match="arbitrary unpickling"):
        load_checkpoint(evil)
    assert not marker.exists()
    # as a torch.save zip archive, too
    import torch

    zipped = tmp_path / "evil_zip.ckpt"
    torch.save({"state_dict": {}, "x": Exploit()}, zipped)
    marker.unlink(missing_ok=True)
    with pytest.raises(PredictError, match="arbitrary unpickling"):
        load_checkpoint(zipped)
    assert not marker.exists()
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(PredictError, match="cannot read checkpoint"):
        load_checkpoint(garbage)
    not_ours = tmp_path / "other.ckpt"
    torch.save({"weights": torch.zeros(2)}, not_ours)
    with pytest.raises(PredictError, match="not a chestxray checkpoint"):
        load_checkpoint(not_ours)


def test_gradcam_writes_one_overlay_per_image(trained_run, data_dir, tmp_path):
    out = tmp_path / "cam"
    inputs = f"inputs=[{data_dir / 'test' / 'Normal' / '0101.jpeg'},{data_dir / 'test' / 'Covid' / '094.png'}]"
    result = run_predict(f"ckpt={best_checkpoint(trained_run)}", inputs, "gradcam=true", f"hydra.run.dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    overlays = sorted((out / "gradcam").glob("*.png"))
    assert [p.name for p in overlays] == ["Covid_094.png", "Normal_0101.png"]
    for p in overlays:
        image = cv2.imread(str(p))
        assert image.shape == (32, 32, 3)  # the model's input size
