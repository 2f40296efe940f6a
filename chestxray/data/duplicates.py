"""Near-duplicate images (perceptual hashes), and the train/test leakage they cause.

Near-duplicates are found with a 256-bit perceptual hash (imagehash.phash, hash_size=16) of the grey image.
On the real dataset, re-encoded (JPEG q30), resized (1/3) and contrast-stretched copies stay within 30 bits
of their source, while the closest pair of different images is 60 bits apart: the default threshold of 40 bits
sits in that gap.

The search compares packed hashes (32 bytes each) with XOR and popcount, a block of rows at a time, so memory
stays at a few tens of MB whatever the number of files. It is exhaustive on purpose: a radius of 40 of 256 bits
is too wide for a sub-linear index (multi-index hashing would need ~40 sub-tables; faiss's IndexBinaryFlat is the
same brute force), and at 100,000 files it takes seconds next to the minutes of decoding.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import imagehash
import numpy as np
from PIL import Image

from chestxray.data.images import DEFAULT_LIMITS, BadImageError, ImageLimits, read_image
from chestxray.data.store import DecodedImages
from chestxray.runtime.files import atomic_write, atomic_writer
from chestxray.runtime.parallel import available_cpus, bounded_map

HASH_SIZE = 16
HASH_BYTES = HASH_SIZE * HASH_SIZE // 8
DEFAULT_THRESHOLD = 40
HASH_DECODE_SIDE = 128  # files are decoded at least this large for hashing, whatever data.image_size is
_BLOCK_BYTES = 16 << 20  # working memory of one block of the search (XOR of 32-byte hashes)


@dataclass(frozen=True)
class NearPair:
    """Two files whose perceptual hashes differ in at most the threshold's number of bits."""

    train: Path  # the first file (the train side of a cross-split pair)
    test: Path
    distance: int


def perceptual_hash(image: np.ndarray) -> np.ndarray:
    """pHash of the grey image, packed into 32 bytes; robust to re-encoding, resizing and linear contrast changes."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    grey = cv2.resize(grey, (HASH_DECODE_SIDE, HASH_DECODE_SIDE), interpolation=cv2.INTER_AREA)
    bits = imagehash.phash(Image.fromarray(grey), hash_size=HASH_SIZE).hash
    return np.packbits(bits.flatten())


def hash_files(paths: Sequence[Path], limits: ImageLimits = DEFAULT_LIMITS) -> tuple[np.ndarray, np.ndarray]:
    """Packed hashes (N x 32 uint8) of the files, in threads, and which files could be hashed."""
    hashes = np.zeros((len(paths), HASH_BYTES), np.uint8)
    ok = np.zeros(len(paths), bool)

    def one(i: int) -> None:
        try:
            hashes[i] = perceptual_hash(read_image(paths[i], HASH_DECODE_SIDE, limits))
            ok[i] = True
        except BadImageError:
            pass

    for _ in bounded_map(one, range(len(paths)), available_cpus()):
        pass
    return hashes, ok


def hash_decoded(decoded: DecodedImages, limits: ImageLimits = DEFAULT_LIMITS) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of a decoded set's readable files and which could be hashed; kept in its on-disk store, if it has
    one, for the next run (only when every file could be: a file that failed now may be readable next time), with
    their CRC-32 beside them, so that hashes that are not those written are computed again."""
    cache = decoded.store / "phash.u8" if decoded.store is not None else None
    if cache is not None and cache.exists():
        try:
            data = cache.read_bytes()
            proof = int(cache.with_suffix(".crc32").read_text())
            if zlib.crc32(data) == proof and len(data) == len(decoded.paths) * HASH_BYTES:
                hashes = np.frombuffer(data, np.uint8).reshape(-1, HASH_BYTES).copy()
                return hashes, np.ones(len(hashes), bool)
        except (OSError, ValueError):
            pass
    hashes, ok = hash_files(decoded.paths, limits)
    if cache is not None and ok.all():
        try:
            atomic_write(cache, hashes.tobytes())
            atomic_write(cache.with_suffix(".crc32"), str(zlib.crc32(hashes.tobytes())))
        except OSError:
            pass  # a read-only cache: hashed again next time
    return hashes, ok


def hamming_pairs(a: np.ndarray, b: np.ndarray | None, threshold: int) -> list[tuple[int, int, int]]:
    """(i, j, distance) of packed hashes within threshold bits: across a and b, or pairs i < j within a."""
    a64 = np.ascontiguousarray(a).view(np.uint64)
    b64 = a64 if b is None else np.ascontiguousarray(b).view(np.uint64)
    if not len(a64) or not len(b64):
        return []
    block = max(1, _BLOCK_BYTES // (len(b64) * HASH_BYTES))
    found = []
    for start in range(0, len(a64), block):
        rows = a64[start : start + block]
        first = start + 1 if b is None else 0  # within one set: only the columns right of the diagonal
        columns = b64[first:]
        distance = np.bitwise_count(rows[:, None, :] ^ columns[None, :, :]).sum(-1, dtype=np.uint16)
        hits = distance <= threshold
        if b is None:  # row r is file start + r; column c is file first + c: keep c >= r, the pairs i < j
            hits &= np.arange(len(columns))[None, :] >= np.arange(len(rows))[:, None]
        i, j = np.nonzero(hits)
        found += [(start + int(r), first + int(c), int(distance[r, c])) for r, c in zip(i, j, strict=True)]
    return found


def near_pairs(
    a_paths: Sequence[Path], a: np.ndarray, b_paths: Sequence[Path] | None, b: np.ndarray | None, threshold: int
) -> list[NearPair]:
    """Pairs of files within threshold bits, sorted by distance then names."""
    b_paths = a_paths if b_paths is None else b_paths
    pairs = [NearPair(a_paths[i], b_paths[j], d) for i, j, d in hamming_pairs(a, b, threshold)]
    return sorted(pairs, key=lambda p: (p.distance, str(p.train), str(p.test)))


@dataclass
class Leaks:
    """Train images that other sets (the test folder, evaluation sets) contain again, set by set."""

    pairs: dict[str, list[NearPair]]
    train: set[Path]  # the train side of every pair
    shared_with_test: dict[str, int]  # per evaluation set: how many of its images the test folder has too
    within_train: list[tuple[int, int]]  # positions in train of near-duplicate pairs inside it (kept together)

    def mask(self, name: str, paths: Sequence[Path]) -> np.ndarray:
        """Which of a set's images duplicate a train image."""
        leaking = {p.test for p in self.pairs.get(name, [])}
        return np.array([p in leaking for p in paths], dtype=bool)

    def warning(self, report: Path | None) -> str:
        counts = ", ".join(f"{len({q.test for q in p})} {name} image(s)" for name, p in self.pairs.items() if p)
        where = f" (report: {report})" if report else ""
        return (
            f"{sum(map(len, self.pairs.values()))} near-duplicate pair(s) of {len(self.train)} train image(s) and "
            f"{counts} found: the test accuracy may be inflated by leakage{where}. The reports give every metric "
            "also without those test images; data.drop_leaking=true drops the train copies instead."
        )


def find_leaks(
    train: DecodedImages, others: dict[str, DecodedImages], threshold: int, limits: ImageLimits = DEFAULT_LIMITS
) -> Leaks:
    """Near-duplicates (and copies) of train images in each other set, from cached perceptual hashes.

    A file that could not be hashed (changed or gone since it was decoded) is left out of the search.
    """

    def hashed(decoded: DecodedImages) -> tuple[list[Path], np.ndarray]:
        hashes, ok = hash_decoded(decoded, limits)
        return [p for p, good in zip(decoded.paths, ok, strict=True) if good], hashes[ok]

    train_paths, train_hashes = hashed(train)
    position = {p: i for i, p in enumerate(train.paths)}
    within = [
        (position[train_paths[i]], position[train_paths[j]]) for i, j, _ in hamming_pairs(train_hashes, None, threshold)
    ]
    sets = {name: hashed(decoded) for name, decoded in others.items()}
    pairs = {name: near_pairs(train_paths, train_hashes, *found, threshold) for name, found in sets.items()}
    shared = {  # an evaluation set that is the test folder, or a copy of it, is not another set
        name: len({p.train for p in near_pairs(*found, *sets["test"], threshold)})
        for name, found in sets.items()
        if name != "test" and "test" in sets
    }
    return Leaks(pairs, {p.train for set_pairs in pairs.values() for p in set_pairs}, shared, within)


def write_leakage_report(
    pairs: dict[str, Sequence[NearPair]], out_dir: str | os.PathLike | None, threshold: int = DEFAULT_THRESHOLD
) -> Path | None:
    """leakage.json in the run folder, per evaluated set, so the warning at training start points at the evidence."""
    if out_dir is None:
        return None
    path = Path(out_dir) / "leakage.json"
    rows = {
        name: [{**asdict(p), "train": str(p.train), "test": str(p.test)} for p in set_pairs]
        for name, set_pairs in pairs.items()
    }
    with atomic_writer(path) as fh:
        json.dump({"threshold_bits": threshold, "pairs": rows}, fh, indent=2)
    return path
