"""How well each out-of-distribution detector of a checkpoint tells the test folder from images it should flag.

    python benchmarks/ood_benchmark.py --ckpt RUN/checkpoints/best.ckpt [--test DATA/test] [--out FOLDER]

In-distribution: the test folder. Far out-of-distribution, built from what packages ship or generated here:
- photographs: scikit-image's sample images (those shipped with the package), each whole and as its four quarters;
- documents: pages of text rendered with OpenCV's putText (and scikit-image's page and text samples);
- noise and blank frames: uniform and Gaussian noise, black, white and grey frames;
- CT and MR: pydicom's CT, MR and RT dose test slices with pixel data, windowed to 8 bits.
Near out-of-distribution: the test images under strong acquisition shifts (low contrast, gamma, heavy noise, heavy
blur, a quarter turn, an inverted negative, 8 px down-sampling, JPEG quality 5).

Every image goes through the model's own pipeline (written to PNG, read back by chestxray.data.images.load_image).
Per detector: AUROC (OOD the positive class) and the share of OOD images passed at the checkpoint's threshold (fitted
so 95% of validation images pass), and the share of the test folder passed. The scores are those of the checkpoint
(chestxray.models.ood.score_images, what the robustness bench calls): nothing is refitted here.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import warnings
from pathlib import Path

import cv2
import numpy as np
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's package, whatever is installed

from chestxray.data.images import list_images, load_image  # noqa: E402
from chestxray.models import ood  # noqa: E402
from chestxray.models.checkpoints import load_model  # noqa: E402

DEFAULT_TEST = ROOT.parent / "shared" / "data" / "covid19-image-dataset" / "test"
RNG = np.random.default_rng(0)


def photographs() -> list[np.ndarray]:
    """scikit-image's shipped sample images (those needing a download are skipped), whole and in quarters."""
    import skimage.data

    names = ["astronaut", "camera", "cat", "chelsea", "coffee", "coins", "horse", "moon", "rocket", "clock"]
    names += ["immunohistochemistry", "hubble_deep_field", "grass", "gravel", "brick", "colorwheel", "logo", "retina"]
    out = []
    for name in names:
        try:
            image = np.asarray(getattr(skimage.data, name)())
        except Exception:  # noqa: BLE001 - not shipped (needs pooch and a download)
            continue
        if image.dtype == bool:
            image = image.astype(np.uint8) * 255
        image = image.astype(np.uint8)
        h, w = image.shape[:2]
        out += [image, image[: h // 2, : w // 2], image[: h // 2, w // 2 :], image[h // 2 :, : w // 2]]
        out.append(image[h // 2 :, w // 2 :])
    return out


def documents(count: int = 30) -> list[np.ndarray]:
    """Pages of random words in OpenCV's fonts, black on white or white on black, and scikit-image's text pages."""
    import skimage.data

    words = "patient report chest findings normal lung heart image the of and follow up clinic date signed".split()
    fonts = [cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_COMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_TRIPLEX]
    pages = []
    for k in range(count):
        page = np.full((512, 400), 255 if k % 3 else 0, np.uint8)
        ink = 0 if k % 3 else 255
        scale = RNG.uniform(0.4, 1.0)
        for y in range(30, 500, int(30 * scale) + 8):
            line = " ".join(RNG.choice(words, 6))
            cv2.putText(page, line, (10, y), fonts[k % len(fonts)], scale, ink, 1, cv2.LINE_AA)
        pages.append(page)
    return pages + [skimage.data.page(), skimage.data.text()]


def noise_and_blank() -> list[np.ndarray]:
    frames = [RNG.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(10)]
    frames += [np.clip(RNG.normal(128, 50, (256, 256)), 0, 255).astype(np.uint8) for _ in range(10)]
    frames += [np.full((256, 256), v, np.uint8) for v in (0, 32, 64, 96, 128, 160, 192, 224, 255)]
    return frames


def ct_and_mr() -> list[np.ndarray]:
    """pydicom's shipped test files with a single- or multi-frame grey image, each slice min-max windowed."""
    import pydicom
    from pydicom.data import get_testdata_files

    slices = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's test files are deliberately odd (invalid values, no meta)
        arrays = []
        for path in sorted(get_testdata_files("*.dcm")):
            try:
                ds = pydicom.dcmread(path)
                if getattr(ds, "SamplesPerPixel", 1) != 1 or ds.get("Modality") not in ("CT", "MR", "RTDOSE"):
                    continue
                arrays.append(ds.pixel_array.astype(np.float64))
            except Exception:  # noqa: BLE001 - compressed without a decoder, no pixel data, broken on purpose
                continue
    for array in arrays:
        for frame in array.reshape(-1, *array.shape[-2:])[:4]:
            if min(frame.shape) < 32 or frame.max() == frame.min():
                continue
            slices.append(((frame - frame.min()) / (frame.max() - frame.min()) * 255).astype(np.uint8))
    return slices


SHIFTS = {
    "low contrast (x0.25)": lambda im: (128 + (im.astype(np.float64) - 128) * 0.25).astype(np.uint8),
    "gamma 3": lambda im: (255 * (im / 255.0) ** 3).astype(np.uint8),
    "Gaussian noise sd 60": lambda im: np.clip(im + RNG.normal(0, 60, im.shape), 0, 255).astype(np.uint8),
    "blur sd 8 px of 256": lambda im: cv2.GaussianBlur(im, (0, 0), 8 * max(im.shape[:2]) / 256),
    "quarter turn": lambda im: np.ascontiguousarray(np.rot90(im)),
    "negative": lambda im: 255 - im,
    "down-sampled to 8 px": lambda im: cv2.resize(
        cv2.resize(im, (8, 8), interpolation=cv2.INTER_AREA), im.shape[1::-1]
    ),
    "JPEG quality 5": lambda im: cv2.imdecode(cv2.imencode(".jpg", im, [cv2.IMWRITE_JPEG_QUALITY, 5])[1], -1),
}


def model_view(images: list[np.ndarray], size: int, folder: Path) -> np.ndarray:
    """Each image as the model sees a file: written as PNG (RGB as BGR), read back by load_image."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k, image in enumerate(images):
        path = folder / f"{k:04d}.png"
        cv2.imwrite(str(path), image[..., ::-1] if image.ndim == 3 and image.shape[2] == 3 else image)
        out.append(load_image(path, size))
    return np.stack(out)


def table(results: dict, detectors: list[str]) -> str:
    header = "| set | n | " + " | ".join(f"{d} AUROC | {d} passed" for d in detectors) + " |"
    rule = "|---|---:|" + "---:|---:|" * len(detectors)
    lines = [header, rule]
    for name, r in results.items():
        cells = [
            f"{r[d]['auroc']:.3f} | {100 * r[d]['passed']:.0f}%"
            if r[d]["auroc"] is not None
            else f"- | {100 * r[d]['passed']:.1f}%"
            for d in detectors
        ]
        lines.append(f"| {name} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--test", default=str(DEFAULT_TEST))
    parser.add_argument("--out", default=None, help="folder for ood_benchmark.json and .md")
    args = parser.parse_args()
    model = load_model(args.ckpt)
    size = model.hparams.image_size
    thresholds = model.ood.thresholds.double().numpy()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        test_paths = list_images(Path(args.test), recursive=True)
        test = np.stack([load_image(p, size) for p in test_paths])
        originals = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in test_paths]
        far = {
            "photographs": photographs(),
            "documents": documents(),
            "noise and blank": noise_and_blank(),
            "CT, MR, dose slices (pydicom)": ct_and_mr(),
        }
        sets = {name: model_view(images, size, tmp / f"far{k}") for k, (name, images) in enumerate(far.items())}
        sets["far OOD, all"] = np.concatenate([sets[name] for name in far])
        for k, (name, shift) in enumerate(SHIFTS.items()):
            sets[f"near: {name}"] = model_view([shift(im) for im in originals], size, tmp / f"near{k}")
    in_scores = ood.score_images(model, test).scores
    results = {"test folder (in-distribution)": {"n": len(test)}}
    for k, d in enumerate(ood.DETECTORS):
        passed = float((in_scores[:, k] <= thresholds[k]).mean())
        results["test folder (in-distribution)"][d] = {"auroc": None, "passed": passed}
    for name, images in sets.items():
        scores = ood.score_images(model, images).scores
        row = {"n": len(images)}
        for k, d in enumerate(ood.DETECTORS):
            y = np.r_[np.zeros(len(in_scores)), np.ones(len(scores))]
            auroc = float(roc_auc_score(y, np.r_[in_scores[:, k], scores[:, k]]))
            row[d] = {"auroc": auroc, "passed": float((scores[:, k] <= thresholds[k]).mean())}
        results[name] = row
    detectors = list(ood.DETECTORS)
    text = table(results, detectors)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    meta = {
        "checkpoint": str(args.ckpt),
        "image_size": size,
        "validation_images": int(model.ood.n_fit),
        "machine": f"{cpu or platform.processor()}",
        "default_detector": model.ood_detector,
    }
    print(json.dumps(meta))
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "ood_benchmark.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        (out / "ood_benchmark.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
