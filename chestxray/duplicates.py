"""Near-duplicate images (perceptual hashes), and the train/test leakage they cause.

Near-duplicates are found with a 256-bit perceptual hash (imagehash.phash, hash_size=16) of the grey image.
On the real dataset, re-encoded (JPEG q30), resized (1/3) and contrast-stretched copies stay within 30 bits
of their source, while the closest pair of different images is 60 bits apart: the default threshold of 40 bits
sits in that gap.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import imagehash
import numpy as np
from PIL import Image

from chestxray.images import BadImageError, read_image

HASH_SIZE = 16
DEFAULT_THRESHOLD = 40


@dataclass(frozen=True)
class NearPair:
    """Two files whose perceptual hashes differ in at most the threshold's number of bits."""

    train: Path  # the first file (the train side of a cross-split pair)
    test: Path
    distance: int


def perceptual_hash(image: np.ndarray) -> imagehash.ImageHash:
    """pHash of the grey image; robust to re-encoding, resizing and linear contrast changes."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    grey = cv2.resize(grey, (128, 128), interpolation=cv2.INTER_AREA)
    return imagehash.phash(Image.fromarray(grey), hash_size=HASH_SIZE)


def hash_files(paths: Sequence[Path]) -> dict[Path, imagehash.ImageHash]:
    """Perceptual hashes of the files that decode (bad files are reported elsewhere)."""

    def one(path: Path):
        try:
            return path, perceptual_hash(read_image(path, min_side=128))
        except BadImageError:
            return path, None

    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        return {p: h for p, h in pool.map(one, paths) if h is not None}


def _bits(hashes: Sequence[imagehash.ImageHash]) -> np.ndarray:
    return np.array([h.hash.flatten() for h in hashes], dtype=bool).reshape(len(hashes), -1)


def near_pairs(
    a: dict[Path, imagehash.ImageHash], b: dict[Path, imagehash.ImageHash] | None, threshold: int
) -> list[NearPair]:
    """Pairs within threshold bits: across a and b, or within a when b is None."""
    a_paths = list(a)
    b_paths = a_paths if b is None else list(b)
    if not a_paths or not b_paths:
        return []
    a_bits = _bits([a[p] for p in a_paths])
    b_bits = a_bits if b is None else _bits([b[p] for p in b_paths])
    distances = (a_bits[:, None, :] != b_bits[None, :, :]).sum(-1)
    pairs = []
    for i, j in zip(*np.nonzero(distances <= threshold), strict=True):
        if b is None and j <= i:
            continue
        pairs.append(NearPair(a_paths[i], b_paths[j], int(distances[i, j])))
    return sorted(pairs, key=lambda p: (p.distance, str(p.train), str(p.test)))


def cross_split_pairs(
    train: Sequence[Path], test: Sequence[Path], threshold: int = DEFAULT_THRESHOLD
) -> list[NearPair]:
    """Train/test pairs that are the same picture: leakage that inflates test accuracy."""
    hashes = hash_files(list(train) + list(test))
    return near_pairs(
        {p: hashes[p] for p in train if p in hashes}, {p: hashes[p] for p in test if p in hashes}, threshold
    )


def write_leakage_report(
    pairs: Sequence[NearPair], out_dir: str | os.PathLike | None, threshold: int = DEFAULT_THRESHOLD
) -> Path | None:
    """leakage.json in the run folder, so the warning at training start points at the evidence."""
    if out_dir is None:
        return None
    path = Path(out_dir) / "leakage.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{**asdict(p), "train": str(p.train), "test": str(p.test)} for p in pairs]
    path.write_text(json.dumps({"threshold_bits": threshold, "pairs": rows}, indent=2))
    return path
