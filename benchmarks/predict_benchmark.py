"""predict.py's batched path against the notebook's one-image-at-a-time loop, in one process.

    python benchmarks/predict_benchmark.py [--ckpt FILE] [--inputs FOLDER] [--image-size 224] [--repeats 3]

Without --ckpt, a randomly initialised model is saved as a checkpoint first (the speed does not depend on the
weights). Both paths start from the image files on disk and end with a class per image; the printed ratio is
baseline time / our time, each the median of the repeats.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_INPUTS = ROOT.parent / "shared" / "data" / "covid19-image-dataset" / "test"


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

    from chestxray.inference import load_checkpoint

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


def predict_config(ckpt: Path, inputs: Path, out: Path):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "predict",
            overrides=[f"ckpt={ckpt}", f"inputs={inputs}", f"paths.output_dir={out}", "trainer.accelerator=cpu"],
        )


def our_inference(ckpt: Path, inputs: Path, out: Path) -> None:
    """The same work as the notebook loop: load, decode, predict (no CSV, report or figures)."""
    from chestxray.inference import find_inputs, infer, load_checkpoint

    model = load_checkpoint(ckpt)
    infer(predict_config(ckpt, inputs, out), model, find_inputs(str(inputs), model.classes))


def our_predict(ckpt: Path, inputs: Path, out: Path) -> None:
    """All of predict.py: also predictions.csv, metrics.json and the figures."""
    from chestxray.inference import predict

    predict(predict_config(ckpt, inputs, out))


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
    from chestxray.images import list_images

    files = list_images(args.inputs, recursive=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = args.ckpt or random_checkpoint(tmp, args.image_size)
        baseline = timed(lambda: notebook_loop(ckpt, files), args.repeats)
        core = timed(lambda: our_inference(ckpt, args.inputs, tmp / "out"), args.repeats)
        full = timed(lambda: our_predict(ckpt, args.inputs, tmp / "out"), args.repeats)
    n = len(files)
    print(f"\n{n} images, {args.image_size} px, median of {args.repeats}, from files on disk to predictions")
    print("| path | seconds | images/s | speed-up |\n|---|---:|---:|---:|")
    print(f"| notebook loop (one image per forward, NCHW) | {baseline:.2f} | {n / baseline:.2f} | 1.00x |")
    print(f"| ours: decode once, batched, inference mode | {core:.2f} | {n / core:.2f} | {baseline / core:.2f}x |")
    print(f"| all of predict.py (+ CSV, metrics, figures) | {full:.2f} | {n / full:.2f} | {baseline / full:.2f}x |")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
