"""predict.py's runtimes against the notebook's one-image-at-a-time loop, same images, same process.

    python benchmarks/predict_benchmark.py [--ckpt FILE] [--inputs FOLDER] [--image-size 224] [--repeats 3]

Every path starts from the image files on disk and ends with a class per image (predictions.csv for ours):
the notebook's loop; predict.py with runtime=torch (fp32), with trainer.precision=bf16-mixed (torch autocast on
the CPU), with runtime=onnx (ONNX Runtime, fp32) and with runtime=onnx-int8 (static int8, calibrated on the
inputs). The ONNX exports are made before timing (predict.py caches them in the cache folder). The runs use a
flat copy of the images (no class folders, so no report is drawn: only decoding, the model and the CSV); their
labels are the ones predict.py gives the originals (the nearest folder named like a class). The repeats go round
the paths in turn, so a slow spell of a shared machine hits every path alike; times are medians, ratios are
against the torch path.

Then the ceiling: each runtime's forward pass alone on one decoded batch, as images/s and as GFLOP/s (the model's
FLOPs counted by torch's FlopCounterMode), beside a 4096 x 4096 fp32 and bf16 matrix multiply timed in the same
rounds: a reference for what these cores do in fp32 at best, not a hard peak (it moves between runs, and a
convolution kernel can pass it by a little). The last line says how close the torch path's fp32 forward pass is.

Without --ckpt, a randomly initialised model is saved as a checkpoint first: the speed does not depend on the
weights, but then the accuracies mean nothing (pass a trained checkpoint for the int8 accuracy change).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_INPUTS = ROOT.parent / "shared" / "data" / "covid19-image-dataset" / "test"
PATHS = {
    "predict.py runtime=torch": [],
    "predict.py trainer.precision=bf16-mixed": ["trainer.precision=bf16-mixed"],
    "predict.py runtime=onnx": ["runtime=onnx"],
    "predict.py runtime=onnx-int8 (off by default)": ["runtime=onnx-int8"],
}


def random_checkpoint(folder: Path, image_size: int) -> Path:
    """VGG19 with random weights (seeded, so that its accuracies and agreements repeat) saved as a checkpoint."""
    import torch

    from chestxray.models.classifier import ChestXrayClassifier

    torch.manual_seed(0)
    model = ChestXrayClassifier(["Normal", "Covid", "Viral Pneumonia"], image_size, pretrained=False)
    path = folder / "random.ckpt"
    import lightning

    saved = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    torch.save({**saved, "pytorch-lightning_version": lightning.__version__}, path)
    return path


def notebook_loop(ckpt: Path, files: list[Path]) -> list[int]:
    """The notebook's check: per image, read, ToTensor, Resize, Normalize, add a batch dimension, one forward."""
    import cv2
    import torch
    from torchvision import transforms

    from chestxray.models.checkpoints import load_model

    model = load_model(ckpt)
    model.net.to(memory_format=torch.contiguous_format)  # the notebook's plain NCHW model
    size = model.hparams.image_size
    transform = transforms.Compose(
        [transforms.ToTensor(), transforms.Resize((size, size)), transforms.Normalize([0.5] * 3, [0.5] * 3)]
    )
    preds = []
    with torch.no_grad():
        for f in files:
            image = cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)
            preds.append(int(model.net(transform(image).unsqueeze(0)).argmax(1)))
    return preds


def run_predict(ckpt: Path, inputs: Path, out: Path, extra: list[str]) -> dict[str, dict]:
    """predict.py in this process; its CSV rows by file name."""
    from hydra import compose, initialize_config_dir

    from chestxray.inference.predict import predict

    overrides = [f"ckpt={ckpt}", f"inputs={inputs}", f"paths.output_dir={out}", "trainer.accelerator=cpu"]
    overrides += ["print_limit=0", "report.bootstrap_resamples=0", *extra]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        predict(compose("predict", overrides=overrides))
    with open(out / "predictions.csv", newline="") as fh:
        return {Path(row["path"]).name: row for row in csv.DictReader(fh)}


def median_seconds(paths: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Each path once per round, round after round: a slow spell of the machine lands on all paths alike."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def speed_table(seconds: dict[str, float], n: int) -> None:
    torch_s = seconds["predict.py runtime=torch"]
    print("| path | seconds | images/s | vs torch path |\n|---|---:|---:|---:|")
    for name, s in seconds.items():
        print(f"| {name} | {s:.2f} | {n / s:.2f} | {torch_s / s:.2f}x |", flush=True)


def agreement_table(rows: dict[str, dict[str, dict]], labels: dict[str, str]) -> None:
    """Accuracy against the class folders, and agreement with the torch path, image by image."""
    reference = rows["predict.py runtime=torch"]
    labelled = [name for name in reference if labels.get(name)]
    print("\n| path | test accuracy | same class as torch | largest probability difference |\n|---|---:|---:|---:|")
    for path, result in rows.items():
        if result.keys() != reference.keys():
            raise RuntimeError(f"{path} answered for other files than the torch path")
        accuracy = sum(result[name]["pred"] == labels[name] for name in labelled) / max(len(labelled), 1)
        same = sum(result[name]["pred"] == reference[name]["pred"] for name in reference) / len(reference)
        diff = max(
            abs(float(result[name][k]) - float(reference[name][k]))
            for name in reference
            for k in reference[name]
            if k.startswith("prob_")
        )
        print(f"| {path} | {accuracy:.3f} | {same:.1%} | {diff:.2e} |")


def matmul(dtype, size: int = 4096) -> tuple[Callable[[], object], float]:
    """A dense size x size matrix multiply and its GFLOP: the reference rate for dense arithmetic on these cores."""
    import torch

    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return (lambda: a @ b), 2 * size**3 / 1e9


def ceiling_table(ckpt: Path, calibration: list[Path], batch: int, repeats: int) -> None:
    """The forward pass alone, per runtime, against a large matrix multiply on the same cores."""
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from chestxray.inference.onnx import OnnxPredictor, exported
    from chestxray.models.checkpoints import load_model
    from chestxray.models.classifier import Probabilities

    model = load_model(ckpt).eval()
    size = model.hparams.image_size
    net = Probabilities([model]).eval()
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        net(images[:1])
    gflop = counter.get_total_flops() / 1e9
    sessions = {
        fmt: OnnxPredictor(exported([ckpt], [model], fmt, calibration)).session for fmt in ("onnx", "onnx-int8")
    }
    feed = {"images": np.ascontiguousarray(images.numpy())}

    def bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return net(images)

    forward = {
        "torch fp32": lambda: net(images),
        "torch bf16 autocast": bf16,
        "ONNX Runtime fp32": lambda: sessions["onnx"].run(None, feed),
        "ONNX Runtime int8": lambda: sessions["onnx-int8"].run(None, feed),
    }
    peak = {"fp32": matmul(torch.float32), "bf16": matmul(torch.bfloat16)}
    with torch.inference_mode():
        for fn in [*forward.values(), *(fn for fn, _ in peak.values())]:  # warm-up
            fn()
        seconds = median_seconds({**forward, **{k: fn for k, (fn, _) in peak.items()}}, repeats)
    rate = {k: flop / seconds[k] for k, (_, flop) in peak.items()}
    print(f"\nThe forward pass alone, one batch of {batch} decoded images, {gflop:.1f} GFLOP per image; this CPU's")
    print(f"4096 x 4096 matrix multiply in the same rounds: fp32 {rate['fp32']:.0f} GFLOP/s, bf16 {rate['bf16']:.0f}\n")
    print("| runtime | images/s | vs torch fp32 | GFLOP/s | of the fp32 matmul rate |\n|---|---:|---:|---:|---:|")
    for name in forward:
        images_s, ratio = batch / seconds[name], seconds["torch fp32"] / seconds[name]
        achieved = images_s * gflop
        print(f"| {name} | {images_s:.2f} | {ratio:.2f}x | {achieved:.0f} | {achieved / rate['fp32']:.0%} |")
    share = batch * gflop / seconds["torch fp32"] / rate["fp32"]
    print(f"\ntorch's fp32 forward pass runs at {share:.0%} of the fp32 matmul rate measured beside it.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path)
    parser.add_argument("--inputs", type=Path, default=DEFAULT_INPUTS)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch

    from chestxray.data.images import list_images
    from chestxray.data.sources import find_inputs

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = tmp / "model.ckpt"  # a copy
        shutil.copy(args.ckpt or random_checkpoint(tmp, args.image_size), ckpt)
        hparams = torch.load(ckpt, weights_only=True)["hyper_parameters"]
        inputs = find_inputs(str(args.inputs), hparams["classes"])  # the labels predict.py would give them
        files, flat, labels = [i.path for i in inputs], tmp / "flat", {}
        flat.mkdir()
        for k, item in enumerate(inputs):
            name = f"{k:05d}{item.path.suffix}"
            shutil.copy(item.path, flat / name)
            labels[name] = hparams["classes"][item.label] if item.label is not None else ""
        # the first run of each path makes its export and warms up; its answers are the ones compared
        rows = {name: run_predict(ckpt, flat, tmp / f"out{i}", extra) for i, (name, extra) in enumerate(PATHS.items())}
        paths = {"notebook loop (one image per forward, NCHW)": lambda: notebook_loop(ckpt, files)}
        for name, extra in PATHS.items():
            # a new folder each time: predict.py never writes into a folder that holds predictions already
            paths[name] = lambda extra=extra: run_predict(ckpt, flat, Path(tempfile.mkdtemp(dir=tmp)), extra)
        seconds = median_seconds(paths, args.repeats)
        n = len(files)
        print(f"\n{n} images, {hparams['image_size']} px, median of {args.repeats}, from files on disk to a class each")
        print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
        speed_table(seconds, n)
        agreement_table(rows, labels)
        ceiling_table(ckpt, list_images(flat), batch=8, repeats=args.repeats)


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
