"""Generated chest-radiograph-like images: a dataset for machines without the real one, and for scaling runs.

    python -m chestxray.synthetic OUT [--train 30] [--test 10] [--size 256]

Every image is distinct (its own anatomy offsets and low-frequency texture, so no two are near-duplicates for the
perceptual hash), and the classes are easy to tell apart on purpose (dark clear fields, bright lower zones, or hazy
grey fields: a wide margin at 32 px), so that a small model trained from scratch for a few epochs learns them on any
machine, and the tests can check what it learned. The default dataset also has the kinds of files the real one has:
RGB and grey JPEG, RGBA and 16-bit PNG, mixed sizes and letter cases of extensions. It is not a medical dataset.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from chestxray.data.sources import DEFAULT_CLASSES
from chestxray.runtime.parallel import available_cpus

_BASE = 160  # anatomy is drawn at this size, then resized: fast at any output size


def _smooth_noise(rng: np.random.Generator, cells: int, size: int) -> np.ndarray:
    """A random field with structure at about size/cells pixels, zero mean, unit-ish amplitude."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def radiograph(rng: np.random.Generator, label: int, height: int, width: int) -> np.ndarray:
    """One grey uint8 image of `height` x `width`: torso, two lung fields, ribs, and the class's lung pattern."""
    n = _BASE
    y, x = np.mgrid[0 : 1 : n * 1j, 0 : 1 : n * 1j].astype(np.float32)
    cx, cy = 0.5 + rng.uniform(-0.05, 0.05), 0.52 + rng.uniform(-0.05, 0.05)
    torso = np.exp(-(((x - cx) / rng.uniform(0.38, 0.46)) ** 8) - (((y - cy) / 0.55) ** 8))
    lungs = np.zeros_like(x)
    for side in (-1, 1):
        lx = cx + side * rng.uniform(0.15, 0.2)
        rx, ry = rng.uniform(0.11, 0.15), rng.uniform(0.24, 0.3)
        lungs = np.maximum(lungs, np.exp(-(((x - lx) / rx) ** 4) - (((y - cy) / ry) ** 4)))
    ribs = 0.5 + 0.5 * np.sin(2 * np.pi * (y * rng.uniform(7, 10) + 0.15 * np.abs(x - cx) * 8 + rng.uniform(0, 1)))
    image = 0.12 + 0.55 * torso + 0.12 * _smooth_noise(rng, 5, n) * torso  # the unique part: coarse texture
    if label == 0:  # Normal: clear, dark lung fields
        image -= 0.55 * lungs
    elif label == 1:  # Covid: dark upper fields, large bright consolidations in the lower zones
        image -= 0.55 * lungs
        lower = 1 / (1 + np.exp(-(y - cy) * 12))
        patches = np.clip(_smooth_noise(rng, 6, n) + 1.0, 0, None) * lower * lungs
        image += 0.7 * patches
    else:  # Viral Pneumonia: hazy fields as bright as the mediastinum, a fine texture
        image += 0.05 * lungs
        image += 0.15 * _smooth_noise(rng, 25, n) * lungs
    image += 0.08 * ribs * lungs
    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC)
    image += rng.normal(0, 0.015, size=image.shape).astype(np.float32)  # film grain
    return np.clip(image * 255, 0, 255).astype(np.uint8)


# The real dataset's kinds of files, in turn: (extension, how the grey image is stored).
FILE_KINDS = (
    (".jpeg", "rgb"),
    (".jpg", "grey"),
    (".png", "rgba"),
    (".png", "grey16"),
    (".JPG", "rgb"),
    (".PNG", "grey"),
)


def encode(image: np.ndarray, kind: str, extension: str) -> bytes:
    """The grey image as a file of the given kind (RGB/grey JPEG, RGBA/16-bit/grey PNG)."""
    if kind == "rgb":
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif kind == "rgba":
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGRA)
    elif kind == "grey16":
        image = image.astype(np.uint16) * 257
    ok, data = cv2.imencode(".jpg" if extension.lower() in (".jpg", ".jpeg") else ".png", image)
    if not ok:
        raise RuntimeError(f"could not encode a {kind} {extension} image")
    return data.tobytes()


def _write_one(job: tuple[str, int, int, int, int, str, str]) -> None:
    path, seed, label, height, width, kind, extension = job
    image = radiograph(np.random.default_rng(seed), label, height, width)
    Path(path).write_bytes(encode(image, kind, extension))


def make_dataset(
    root: str | os.PathLike,
    per_class: dict[str, int],
    size: int = 256,
    mixed: bool = True,
    seed: int = 0,
    classes: Sequence[str] = DEFAULT_CLASSES,
    workers: int | None = None,
    leaks: int = 0,
) -> list[Path]:
    """Write root/<split>/<class>/<name> for per_class={"train": n, "test": m}; returns the files, in order.

    mixed=True varies sizes (0.75-1.5x `size`, not square) and file kinds as the real dataset does; mixed=False
    writes square grey JPEGs of `size`, the fastest to make in bulk. leaks=k adds k test images of the second
    class that are resized, re-encoded copies of train images (train/test leakage, as the real dataset has).
    More than 64 files are written by a forkserver process pool: a script that calls this needs Python's
    `if __name__ == "__main__":` guard (workers=1 writes in this process).
    """
    root = Path(root)
    jobs = []
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                if mixed:
                    extension, kind = FILE_KINDS[(i + label) % len(FILE_KINDS)]
                    height, width = (int(size * rng.uniform(0.75, 1.5)) for _ in range(2))
                else:
                    extension, kind, height, width = ".jpg", "grey", size, size
                image_seed = int(rng.integers(2**63))
                jobs.append(
                    (str(folder / f"{split}_{i:05d}{extension}"), image_seed, label, height, width, kind, extension)
                )
    workers = workers or available_cpus()
    if workers > 1 and len(jobs) > 64:
        # forkserver, not fork: the callers (pytest-xdist workers, a training process) run threads, and a fork
        # taken while another thread holds a lock can leave the child waiting on it for ever
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver")) as pool:
            list(pool.map(_write_one, jobs, chunksize=64))
    else:
        for job in jobs:
            _write_one(job)
    files = [Path(job[0]) for job in jobs]
    return files + [_leak(root, classes[1], k) for k in range(leaks)]


def _leak(root: Path, name: str, k: int) -> Path:
    """test/<name>/leak_k.jpg: train image k of that class, resized to 80% and saved as JPEG quality 70."""
    source = sorted((root / "train" / name).iterdir())[k]
    image = cv2.imdecode(np.fromfile(source, np.uint8), cv2.IMREAD_GRAYSCALE)
    image = cv2.resize(image, None, fx=0.8, fy=0.8, interpolation=cv2.INTER_AREA)
    target = root / "test" / name / f"leak_{k}.jpg"
    cv2.imwrite(str(target), image, [cv2.IMWRITE_JPEG_QUALITY, 70])
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chestxray.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to create: OUT/{train,test}/<class>/")
    parser.add_argument("--train", type=int, default=30, help="train images per class (30)")
    parser.add_argument("--test", type=int, default=10, help="test images per class (10)")
    parser.add_argument("--size", type=int, default=256, help="typical side in pixels (256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--leaks", type=int, default=0, help="test images that copy train images (0)")
    args = parser.parse_args(argv)
    files = make_dataset(
        args.out, {"train": args.train, "test": args.test}, args.size, seed=args.seed, leaks=args.leaks
    )
    print(f"wrote {len(files)} images to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
