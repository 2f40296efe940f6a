"""ONNX export and ONNX Runtime inference (the command line: python -m chestxray.export).

The exported graph is the whole predictor: uint8 images (N x 3 x S x S) in, class probabilities out, with the
normalisation inside, and for several checkpoints their average; three more outputs give the out-of-distribution score
(the detector's score minus its threshold), the prediction sets and the confidence's gate (ood.margins), computed in
the graph from the checkpoint's fitted buffers, so runtime=onnx writes the same columns as runtime=torch
(chestxray.models.ood). It is cached in the cache folder (`$CHESTXRAY_CACHE/onnx`, like the decoded-image stores),
never beside the checkpoint: predict.py writes only into its own run folder, and the checkpoint's run folder stays as
its run left it. The file is `<name>-<where>.<key>.onnx` (int8: `.int8.onnx`), where <where> hashes the checkpoints'
paths and <key> their bytes and the export version, so `predict.py runtime=onnx` exports once and later runs load the
file; one export per checkpoint and runtime is kept (that of a checkpoint's older content is removed), and a record
beside it (`.json`) holds the file's SHA-256, checked before the file is used: bytes that are not those written are
exported again.
format=onnx-int8 quantises weights and activations to int8 (ONNX Runtime's static QDQ quantisation), calibrated once
at export on the checkpoint's own train images or on the images of `calibration=FOLDER`: several times faster on CPUs
with VNNI/AMX, at some cost in accuracy that the benchmark reports; it is never the default. Only the network's
operators are quantised (NETWORK_OPS), the detectors' arithmetic stays float, but their features come from int8
activations: its ood_score is near the fp32 graph's, not equal to it, and predict.py says so in one line.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from chestxray.errors import CacheError, UserError, require
from chestxray.models.checkpoints import preprocess_of, training_data
from chestxray.models.classifier import Answered, Answers, ChestXrayClassifier, Predictor
from chestxray.runtime.files import atomic_copy, atomic_write, default_cache_dir, probe_writable

log = logging.getLogger(__name__)

OPSET = 18
EXPORT_VERSION = 4  # bump when the exported graph changes (4: the confidence's gate)
CALIBRATION_IMAGES = 64


def _digest(paths: Sequence[str | Path], extra: str) -> str:
    digest = hashlib.sha256(f"v{EXPORT_VERSION}-opset{OPSET}-{extra}".encode())
    for path in paths:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def onnx_path(ckpt_paths: Sequence[str | Path], fmt: str, key: str | None = None) -> Path:
    """Where the export of these checkpoints lives in the cache folder. `key` hashes the checkpoints' bytes (hashed
    once per export: pass it on)."""
    name = f"{_prefix(ckpt_paths)}.{key or _digest(ckpt_paths, '')}{_kind(fmt)}.onnx"
    return default_cache_dir() / "onnx" / name


def _prefix(ckpt_paths: Sequence[str | Path]) -> str:
    """<name of the first checkpoint>[-ensemble]-<hash of the checkpoints' real paths>: what names one checkpoint
    (or ensemble) whatever its content, so an export of its older content can be found and removed."""
    where = hashlib.sha256("\n".join(os.path.realpath(p) for p in ckpt_paths).encode()).hexdigest()[:8]
    return f"{Path(ckpt_paths[0]).stem}{'-ensemble' if len(ckpt_paths) > 1 else ''}-{where}"


def _kind(fmt: str) -> str:
    return "" if fmt == "onnx" else f".{fmt.removeprefix('onnx-')}"  # <name>.<key>.onnx, <name>.<key>.int8.onnx


def _remove_stale(target: Path, ckpt_paths: Sequence[str | Path], fmt: str) -> None:
    """Other exports of these checkpoints in this runtime (of their older content): one is kept."""
    for old in target.parent.glob(f"{_prefix(ckpt_paths)}.*{_kind(fmt)}.onnx"):
        if old != target and (fmt != "onnx" or not old.name.endswith(".int8.onnx")):
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _record(target: Path) -> dict | None:
    """The record of an export whose bytes are those written (their SHA-256 as recorded), else None."""
    try:
        record = json.loads(target.with_suffix(".json").read_text())
        return record if target.is_file() and record.get("sha256") == _sha256(target) else None
    except (OSError, ValueError, AttributeError):
        return None


def _write_record(target: Path, sha256: str, **fields) -> None:
    """The record of the bytes this process wrote (their SHA-256 taken before they were put in place, not of whatever
    is at `target` now: another process exporting the same checkpoint may have replaced them, and then the record
    does not match and the export is made again rather than trusted)."""
    atomic_write(target.with_suffix(".json"), json.dumps({"sha256": sha256, **fields}, indent=2))


def training_images(model: ChestXrayClassifier, checkpoint_path: str | Path) -> list[Path]:
    """The checkpoint's own train images (checkpoints.training_data: the data settings saved in it), up to
    CALIBRATION_IMAGES spread over the classes with a fixed seed: int8's activation ranges come from images like those
    the model learnt on, chosen once at export, not from whatever is being predicted."""
    run = training_data(checkpoint_path)
    if run.train is None:
        raise UserError(f"int8 calibration: {run.note}: give calibration=FOLDER")
    train = run.train
    rng = np.random.default_rng(0)
    labels = np.asarray(train.labels)
    per_class = max(1, CALIBRATION_IMAGES // len(model.classes))
    chosen = [
        int(i) for c in range(len(model.classes)) for i in rng.permutation(np.flatnonzero(labels == c))[:per_class]
    ]
    return [train.paths[i] for i in sorted(chosen)]


# The exporter's passes log each step at INFO (constant folding, initializer deduplication: 83 lines for VGG19),
# which buried predict.py's report under what looked like trouble; their warnings still show.
EXPORTER_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx")


@contextlib.contextmanager
def _quiet(names: Sequence[str]):
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export_onnx(models: Sequence[ChestXrayClassifier], out: Path) -> Path:
    """torch.onnx.export (the dynamo exporter) with a dynamic batch size; written whole or not at all."""
    return atomic_write(out, onnx_bytes(models))


def onnx_bytes(models: Sequence[ChestXrayClassifier]) -> bytes:
    """The ONNX graph of these checkpoints (export_onnx's bytes)."""
    require("onnx", "onnx", "runtime=onnx")
    require("onnxscript", "onnx", "runtime=onnx (torch.onnx.export with dynamo=True)")
    size = models[0].hparams.image_size
    module = Answers([m.cpu().eval() for m in models]).eval()
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    with warnings.catch_warnings(), _quiet(EXPORTER_LOGGERS):
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        program = torch.onnx.export(
            module,
            (example,),
            input_names=["images"],
            output_names=["probs", "ood_score", "prediction_set", "confidence_gate"],
            dynamo=True,
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
            opset_version=OPSET,
            verbose=False,
        )
    return program.model_proto.SerializeToString()


# The operators int8 quantises: the network's. Not ONNX Runtime's default, which also quantises Split, Slice, Gather,
# Reshape and the like: they carry the detectors' features (pooled, then each stage's mean) to the KNN banks, and one
# uint8 scale across stages of very different ranges moved the knn_layers score of the quickstart model's test images
# by 6.8 (median; the flag then caught none of them); with the network's operators only: by 0.41, the same flag for 64
# of 66 images, the same class for 65 (as before), at the same speed (docs/benchmarks.md). Measured on VGG19 only:
# the other families' residual Add, Mul, Concat, Sigmoid and GlobalAveragePool now stay float, which keeps more
# of their graph out of int8; their int8 speed with this list has not been measured.
NETWORK_OPS = [
    "Conv",
    "ConvTranspose",
    "Gemm",
    "MatMul",
    "MaxPool",
    "AveragePool",
    "Relu",
    "Clip",
    "BatchNormalization",
    "InstanceNormalization",
    "LayerNormalization",
    "Flatten",
    "Resize",
    "Pad",
]


def quantize_int8(fp32: Path, out: Path, calibration: np.ndarray) -> str:
    """Static QDQ int8 (per-channel weights, uint8 activations) calibrated on uint8 images N x 3 x S x S, written to
    `out` whole or not at all; the SHA-256 of the bytes written."""
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
        # the symbolic shape pass fails on the out-of-distribution outputs (one_hot, float64); ONNX shape inference
        # still runs
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        partial = Path(tmp) / "int8.onnx"
        quantize_static(
            str(prepared),
            str(partial),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=NETWORK_OPS,
        )
        sha256 = _sha256(partial)
        atomic_copy(partial, out)
    return sha256


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


TRAIN_CALIBRATION = "train"  # calibration=train: the checkpoint's train images, whatever calibrated the export there
TRAIN_SOURCE = "the checkpoint's train images"


def exported(
    ckpt_paths: Sequence[str | Path],
    models: Sequence[ChestXrayClassifier],
    fmt: str = "onnx",
    calibration: Sequence[Path] | str | None = None,
) -> Path:
    """The cached ONNX file of these checkpoints, exporting (and quantising) it first if needed.

    int8 is calibrated once, when it is exported: on `calibration` (images the user named) or else on the first
    checkpoint's train images; the images used are recorded, and a later call with other named images quantises
    again, replacing it. A call without named images uses the export as it is; calibration=TRAIN_CALIBRATION
    ("train") quantises again on the train images where named ones calibrated it.
    """
    if fmt not in ("onnx", "onnx-int8"):
        raise ValueError(f"format={fmt}: must be onnx or onnx-int8")
    key = _digest(ckpt_paths, "")
    target = onnx_path(ckpt_paths, fmt, key)
    record = _record(target)
    if calibration == TRAIN_CALIBRATION:
        calibration = None
        if record and record.get("source") != TRAIN_SOURCE:
            record = None  # calibrated on named images before: quantised again on the train images
    if fmt == "onnx-int8" and calibration:
        calibration = list(itertools.islice((p for p in calibration if os.access(p, os.R_OK)), CALIBRATION_IMAGES))
        if record and record.get("images") != _digest(calibration, "calibration"):
            record = None  # other named images: quantised again
    if record:
        return target
    fp32 = target if fmt == "onnx" else onnx_path(ckpt_paths, "onnx", key)
    try:
        probe_writable(target.parent)  # before minutes of export, not after them
    except OSError as err:
        raise CacheError(
            f"cannot write the ONNX export cache folder {target.parent} ($CHESTXRAY_CACHE, else ~/.cache/chestxray): "
            f"{err.strerror or err}; set CHESTXRAY_CACHE to a writable folder"
        ) from None
    if fmt == "onnx" or not _record(fp32):
        log.info("exporting %s to ONNX: %s", ", ".join(map(str, ckpt_paths)), fp32)
        graph = onnx_bytes(models)
        atomic_write(fp32, graph)
        _write_record(fp32, hashlib.sha256(graph).hexdigest())
        _remove_stale(fp32, ckpt_paths, "onnx")
    if fmt == "onnx":
        return fp32
    images = calibration or training_images(models[0], ckpt_paths[0])
    source = f"the named images in {os.path.commonpath(calibration)}" if calibration else TRAIN_SOURCE
    log.info("quantising %s to int8 (calibrated on %d of %s): %s", fp32, len(images), source, target)
    pixels = load_calibration(images, models[0].hparams.image_size, preprocess_of(models[0]))
    sha256 = quantize_int8(fp32, target, pixels)
    _write_record(target, sha256, images=_digest(images, "calibration"), count=len(images), source=source)
    _remove_stale(target, ckpt_paths, fmt)
    return target


def calibration_of(path: Path) -> str | None:
    """What an int8 export was calibrated on, from its record ('63 of the checkpoint's train images'); None for fp32.
    The cache keeps one int8 export per checkpoint, calibrated when it was exported: a run that names no images uses
    the one there, whichever images quantised it, so the run says which."""
    try:  # exported() has just checked the file against this record
        record = json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    return f"{record['count']} of {record['source']}" if "count" in record else None


class OnnxPredictor(Predictor):
    """Trainer.predict's module for runtime=onnx: an ONNX Runtime session (CUDA provider if there, else CPU)."""

    def __init__(self, path: Path):
        super().__init__()
        ort = require("onnxruntime", "onnx", "runtime=onnx")

        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = ort.InferenceSession(str(path), providers=providers)
        self.calibration = calibration_of(path)

    @classmethod
    def from_checkpoints(
        cls, paths, models, fmt: str = "onnx", calibration: Sequence[Path] | None = None
    ) -> OnnxPredictor:
        return cls(exported(paths, models, fmt, calibration))

    def probabilities(self, images: torch.Tensor) -> Answered:
        array = np.ascontiguousarray(images.cpu().numpy())
        return tuple(torch.from_numpy(a) for a in self.session.run(None, {"images": array}))
