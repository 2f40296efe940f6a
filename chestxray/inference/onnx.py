"""ONNX export and ONNX Runtime inference (the command line: python -m chestxray.export).

The exported graph is the whole predictor: uint8 images (N x 3 x S x S) in, class probabilities out, with the
normalisation inside, and for several checkpoints their average. It is cached beside the (first) checkpoint as
`<name>.<key>.onnx` (int8: `<name>.<key>.int8.onnx`), where the key hashes the checkpoints' bytes and the export
settings, so `predict.py runtime=onnx` exports once and later runs load the file (a checkpoint folder that cannot
be written falls back to the cache folder). format=onnx-int8 quantises weights and activations to int8 (ONNX
Runtime's static QDQ quantisation, calibrated on `calibration=` images): several times faster on CPUs with VNNI/AMX,
at some cost in accuracy that the benchmark reports; it is never the default.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from chestxray.errors import require
from chestxray.models.checkpoints import preprocess_of
from chestxray.models.classifier import ChestXrayClassifier, Predictor, Probabilities
from chestxray.runtime.files import atomic_copy, atomic_write, default_cache_dir

log = logging.getLogger(__name__)

OPSET = 18
EXPORT_VERSION = 1  # bump when the exported graph changes
CALIBRATION_IMAGES = 64


def _digest(paths: Sequence[str | Path], extra: str) -> str:
    digest = hashlib.sha256(f"v{EXPORT_VERSION}-opset{OPSET}-{extra}".encode())
    for path in paths:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def onnx_path(ckpt_paths: Sequence[str | Path], fmt: str, calibration: Sequence[Path] = ()) -> Path:
    """Where the export of these checkpoints lives: beside the first one, or in the cache folder if read-only."""
    first = Path(ckpt_paths[0])
    key = _digest([*ckpt_paths, *calibration], fmt)
    kind = "" if fmt == "onnx" else f".{fmt.removeprefix('onnx-')}"  # best.<key>.onnx, best.<key>.int8.onnx
    name = f"{first.stem}{'-ensemble' if len(ckpt_paths) > 1 else ''}.{key}{kind}.onnx"
    if os.access(first.parent, os.W_OK):
        return first.parent / name
    return default_cache_dir() / "onnx" / name


def export_onnx(models: Sequence[ChestXrayClassifier], out: Path) -> Path:
    """torch.onnx.export (the dynamo exporter) with a dynamic batch size; written whole or not at all."""
    require("onnx", "onnx", "runtime=onnx")
    require("onnxscript", "onnx", "runtime=onnx (torch.onnx.export with dynamo=True)")
    size = models[0].hparams.image_size
    module = Probabilities([m.cpu().eval() for m in models]).eval()
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        program = torch.onnx.export(
            module,
            (example,),
            input_names=["images"],
            output_names=["probs"],
            dynamo=True,
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
            opset_version=OPSET,
            verbose=False,
        )
    return atomic_write(out, program.model_proto.SerializeToString())


def quantize_int8(fp32: Path, out: Path, calibration: np.ndarray) -> Path:
    """Static QDQ int8 (per-channel weights, uint8 activations) calibrated on uint8 images N x 3 x S x S."""
    require("onnxruntime", "onnx", "runtime=onnx-int8")
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"images": calibration[i : i + 1]} for i in range(len(calibration))])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared))
        partial = Path(tmp) / "int8.onnx"
        quantize_static(
            str(prepared),
            str(partial),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
        )
        atomic_copy(partial, out)
    return out


def load_calibration(paths: Sequence[Path], image_size: int, preprocess: str = "none") -> np.ndarray:
    """The first images that decode, as the model sees them (with the checkpoint's data.preprocess)."""
    from chestxray.data.images import BadImageError, ImageLimits, load_image

    images = []
    for path in paths:
        try:
            images.append(load_image(path, image_size, ImageLimits(preprocess=preprocess)))
        except BadImageError:
            continue
        if len(images) == CALIBRATION_IMAGES:
            break
    if not images:
        raise ValueError("int8 quantisation needs calibration images, and none of those given could be read")
    return np.ascontiguousarray(np.stack(images))


def exported(
    ckpt_paths: Sequence[str | Path],
    models: Sequence[ChestXrayClassifier],
    fmt: str = "onnx",
    calibration: Sequence[Path] = (),
) -> Path:
    """The cached ONNX file of these checkpoints, exporting (and quantising) it first if needed."""
    if fmt not in ("onnx", "onnx-int8"):
        raise ValueError(f"format={fmt}: must be onnx or onnx-int8")
    readable = (p for p in calibration if os.access(p, os.R_OK))
    calibration = list(itertools.islice(readable, CALIBRATION_IMAGES)) if fmt == "onnx-int8" else []
    target = onnx_path(ckpt_paths, fmt, calibration)
    if target.is_file():
        return target
    fp32 = target if fmt == "onnx" else onnx_path(ckpt_paths, "onnx")
    if not fp32.is_file():
        log.info("exporting %s to ONNX: %s", ", ".join(map(str, ckpt_paths)), fp32)
        export_onnx(models, fp32)
    if fmt == "onnx":
        return fp32
    log.info("quantising %s to int8 (calibrated on %d images): %s", fp32, len(calibration), target)
    images = load_calibration(calibration, models[0].hparams.image_size, preprocess_of(models[0]))
    return quantize_int8(fp32, target, images)


class OnnxPredictor(Predictor):
    """Trainer.predict's module for runtime=onnx: an ONNX Runtime session (CUDA provider if there, else CPU)."""

    def __init__(self, path: Path):
        super().__init__()
        ort = require("onnxruntime", "onnx", "runtime=onnx")

        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = ort.InferenceSession(str(path), providers=providers)

    @classmethod
    def from_checkpoints(cls, paths, models, fmt: str = "onnx", calibration: Sequence[Path] = ()) -> OnnxPredictor:
        return cls(exported(paths, models, fmt, calibration))

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(images.cpu().numpy())
        return torch.from_numpy(self.session.run(None, {"images": array})[0])
