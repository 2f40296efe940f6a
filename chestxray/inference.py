"""Prediction from a checkpoint alone: safe loading, input discovery, batched inference, the report."""

from __future__ import annotations

import csv
import glob
import logging
import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from chestxray import reports
from chestxray.data import CachedImages
from chestxray.distributed import gather_by_index
from chestxray.images import ImageCache, is_image_file, list_images
from chestxray.model import ChestXrayClassifier
from chestxray.saliency import gradcam_overlays

log = logging.getLogger(__name__)


class PredictError(RuntimeError):
    """A reason predict.py cannot produce any prediction (exit status 2)."""


@dataclass
class InputImage:
    path: Path
    label: int | None  # from a parent folder named like a class, else None


def load_checkpoint(path: str | Path) -> ChestXrayClassifier:
    """Rebuild the model from the checkpoint's own hyper-parameters, never running code from the file."""
    path = Path(path)
    if not path.is_file():
        raise PredictError(f"checkpoint not found: {path} (pass ckpt=PATH to a .ckpt written by train.py)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise PredictError(
            f"refusing to load {path}: it needs arbitrary unpickling (code could run), which is not allowed "
            f"for a chestxray checkpoint.\n  {str(err).splitlines()[-1][:300]}"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as err:
        raise PredictError(f"cannot read checkpoint {path}: {err}") from None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or "classes" not in hparams or "state_dict" not in checkpoint:
        raise PredictError(f"{path} is not a chestxray checkpoint (no state_dict with class names in it)")
    hparams = {**hparams, "pretrained": False, "weights_path": None, "cache_features": False}
    model = ChestXrayClassifier(**hparams)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        raise PredictError(f"{path}: weights do not fit the model described by its hyper-parameters: {err}") from None
    return model.eval()


def find_inputs(inputs: str | Sequence[str], classes: Sequence[str]) -> list[InputImage]:
    """Files, folders (recursive) and globs; ground truth from the nearest parent folder named like a class."""
    items = [inputs] if isinstance(inputs, str | Path) else list(inputs)
    found: list[Path] = []
    for item in items:
        item = str(item)
        path = Path(item)
        if path.is_dir():
            found += list_images(path, recursive=True)
        elif path.is_file():
            found.append(path)
        else:
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            found += [p for p in matches if p.is_file() and is_image_file(p)]
            found += [f for p in matches if p.is_dir() for f in list_images(p, recursive=True)]
    unique = list(dict.fromkeys(found))
    class_index = {c: i for i, c in enumerate(classes)}
    return [
        InputImage(p, next((class_index[q.name] for q in p.parents if q.name in class_index), None)) for p in unique
    ]


def write_predictions_csv(path: Path, rows: list[dict], classes: Sequence[str]) -> None:
    fields = ["path", "label", "pred", *[f"prob_{c}" for c in classes], "error"]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def infer(cfg: DictConfig, model: ChestXrayClassifier, inputs: list[InputImage]):
    """Decode each input once, predict the readable ones in batches; bad files are returned, not raised."""
    decoded = ImageCache(model.hparams.image_size, cfg.get("cache_dir")).decode_all([i.path for i in inputs])
    errors = {Path(e.path): e.reason for e in decoded.bad}
    for path, reason in errors.items():
        log.warning("cannot predict %s: %s", path, reason)
    if not decoded.paths:
        raise PredictError(f"none of the {len(inputs)} input image(s) could be read (see the warnings above)")
    label_of = {i.path: i.label for i in inputs}
    labels = [label_of[p] for p in decoded.paths]
    dataset = CachedImages(decoded.paths, torch.from_numpy(decoded.images), [-1 if y is None else y for y in labels])
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_progress_bar=False)
    batches = trainer.predict(model, dataloaders=loader)
    index, probs = (t.numpy() for t in gather_by_index([(b["index"].cpu(), b["probs"].cpu()) for b in batches]))
    return trainer, dataset, index, probs, errors


def predict(cfg: DictConfig) -> dict:
    """Run predict.py's job; returns counts. Raises PredictError when nothing can be predicted."""
    model = load_checkpoint(cfg.ckpt)
    inputs = find_inputs(cfg.inputs, model.classes)
    if not inputs:
        raise PredictError(f"no .jpeg/.jpg/.png image found in inputs={cfg.inputs}")
    trainer, dataset, index, probs, errors = infer(cfg, model, inputs)
    if not trainer.is_global_zero:
        return {}
    return write_outputs(cfg, model, dataset, index, probs, errors, inputs)


def write_outputs(cfg, model, dataset, index, probs, errors, inputs) -> dict:
    """predictions.csv always; metrics and figures when labels are known; Grad-CAM overlays on request."""
    classes = model.classes
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_path = {dataset.paths[i]: k for k, i in enumerate(index)}
    rows = []
    for item in inputs:
        row = {"path": str(item.path), "label": classes[item.label] if item.label is not None else ""}
        if item.path in by_path:
            p = probs[by_path[item.path]]
            row.update(
                {"pred": classes[int(p.argmax())], **{f"prob_{c}": f"{v:.6f}" for c, v in zip(classes, p, strict=True)}}
            )
        else:
            row["error"] = errors.get(item.path, "not predicted")
        rows.append(row)
    write_predictions_csv(out / "predictions.csv", rows, classes)
    labels = dataset.labels[index].tolist()
    images = [dataset.images[i].permute(1, 2, 0).numpy() for i in index]
    known = [k for k, y in enumerate(labels) if y >= 0]
    summary = {"predicted": len(index), "errors": len(errors), "output_dir": str(out)}
    if known:
        metrics, figures = reports.write_evaluation(
            out, [labels[k] for k in known], probs[known], classes, [images[k] for k in known]
        )
        for fig in figures.values():
            reports.plt.close(fig)
        summary["metrics"] = metrics
        print(reports.summary_text(metrics))
    if cfg.get("gradcam"):
        write_gradcam(out / "gradcam", model, dataset, index, probs)
    return summary


def write_gradcam(folder: Path, model: ChestXrayClassifier, dataset: CachedImages, index, probs) -> None:
    """One overlay PNG per image, named after its source file, titled with the class and its probability."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    preds = probs.argmax(1)
    titles = [f"{model.classes[p]} {probs[k, p]:.2f}" for k, p in enumerate(preds)]
    overlays = gradcam_overlays(model, dataset.images[torch.as_tensor(index)], preds.tolist(), titles)
    used: set[str] = set()
    for i, overlay in zip(index, overlays, strict=True):
        source = dataset.paths[i]
        name = f"{source.parent.name}_{source.stem}"
        while name in used:
            name += "_"
        used.add(name)
        cv2.imwrite(str(folder / f"{name}.png"), cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
