"""predict.py's runtimes against the notebook's one-image-at-a-time loop, same images, same process.

    python benchmarks/predict_benchmark.py [--ckpt FILE] [--inputs FOLDER] [--image-size 224] [--repeats 3]

Every path starts from the image files on disk and ends with a class per image (predictions.csv for ours):
the notebook's loop; predict.py with runtime=torch (fp32), with trainer.precision=bf16-mixed (torch autocast on
the CPU), with runtime=onnx (ONNX Runtime, fp32) and with runtime=onnx-int8 (static int8, calibrated on the
inputs). The ONNX exports are made before timing (predict.py caches them beside the checkpoint). Speed runs use a
flat copy of the images (no class folders, so no report is drawn: only decoding, the model and the CSV);
accuracy runs use the labelled folder. Times are medians of the repeats; ratios are against the torch path.

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
    import torch

    from chestxray.model import ChestXrayClassifier

    model = ChestXrayClassifier(["Normal", "Covid", "Viral Pneumonia"], image_size, pretrained=False)
    path = folder / "random.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return path


def notebook_loop(ckpt: Path, files: list[Path]) -> list[int]:
    """The notebook's check: per image, read, ToTensor, Resize, Normalize, add a batch dimension, one forward."""
    import cv2
    import torch
    from torchvision import transforms

    from chestxray.checkpoints import load_checkpoint

    model = load_checkpoint(ckpt)
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


def run_predict(ckpt: Path, inputs: Path, out: Path, extra: list[str]) -> list[dict]:
    from hydra import compose, initialize_config_dir

    from chestxray.inference import predict

    overrides = [f"ckpt={ckpt}", f"inputs={inputs}", f"paths.output_dir={out}", "trainer.accelerator=cpu"]
    overrides += ["print_limit=0", "report.bootstrap_resamples=0", *extra]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        predict(compose("predict", overrides=overrides))
    with open(out / "predictions.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path)
    parser.add_argument("--inputs", type=Path, default=DEFAULT_INPUTS)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch

    from chestxray.images import list_images

    files = list_images(args.inputs, recursive=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = tmp / "model.ckpt"  # a copy: the ONNX exports are cached beside it, not beside the original
        shutil.copy(args.ckpt or random_checkpoint(tmp, args.image_size), ckpt)
        image_size = torch.load(ckpt, weights_only=True)["hyper_parameters"]["image_size"]
        flat = tmp / "flat"
        flat.mkdir()
        for i, f in enumerate(files):
            shutil.copy(f, flat / f"{i:05d}{f.suffix}")
        for extra in PATHS.values():  # exports and warm-up, untimed
            run_predict(ckpt, flat, tmp / "warm", extra)
        seconds = {
            "notebook loop (one image per forward, NCHW)": timed(lambda: notebook_loop(ckpt, files), args.repeats)
        }
        for name, extra in PATHS.items():
            seconds[name] = timed(lambda extra=extra: run_predict(ckpt, flat, tmp / "speed", extra), args.repeats)
        n = len(files)
        print(f"\n{n} images, {image_size} px, median of {args.repeats}, from files on disk to a class per image")
        print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
        torch_s = seconds["predict.py runtime=torch"]
        print("| path | seconds | images/s | vs torch path |\n|---|---:|---:|---:|")
        for name, s in seconds.items():
            print(f"| {name} | {s:.2f} | {n / s:.2f} | {torch_s / s:.2f}x |", flush=True)
        rows = {
            name: run_predict(ckpt, args.inputs, tmp / f"labelled{i}", extra)
            for i, (name, extra) in enumerate(PATHS.items())
        }
    reference = rows["predict.py runtime=torch"]
    labelled = [r for r in reference if r["label"]]
    print("\n| path | test accuracy | same class as torch | largest probability difference |\n|---|---:|---:|---:|")
    for name, result in rows.items():
        accuracy = sum(r["pred"] == r["label"] for r in result if r["label"]) / max(len(labelled), 1)
        same = sum(a["pred"] == b["pred"] for a, b in zip(reference, result, strict=True)) / len(result)
        diff = max(
            abs(float(a[k]) - float(b[k]))
            for a, b in zip(reference, result, strict=True)
            for k in a
            if k.startswith("prob_")
        )
        print(f"| {name} | {accuracy:.3f} | {same:.1%} | {diff:.2e} |")


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
