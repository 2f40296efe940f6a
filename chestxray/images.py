"""Finding and decoding image files: one code path for training, prediction and the audit."""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
# Bump when decoding or resizing changes, so on-disk caches made by older code are not reused.
DECODE_VERSION = 1

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class BadImageError(ValueError):
    """An image file that cannot be used, with the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def is_image_file(path: Path) -> bool:
    """Accept jpeg/jpg/png in any letter case; skip hidden files such as .DS_Store."""
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """All image files of a folder, sorted so that every run sees the same order."""
    candidates: Iterable[Path] = folder.rglob("*") if recursive else folder.iterdir()
    visible = (p for p in candidates if not any(part.startswith(".") for part in p.relative_to(folder).parts))
    return sorted(p for p in visible if p.is_file() and is_image_file(p))


def _sniff_format(data: bytes) -> str | None:
    if data.startswith(_JPEG_MAGIC):
        return "JPEG"
    if data.startswith(_PNG_MAGIC):
        return "PNG"
    return None


def _check_complete(data: bytes, fmt: str) -> str | None:
    """OpenCV decodes a truncated JPEG into grey garbage without failing, so look for the end markers."""
    tail = data.rstrip(b"\x00\r\n ")
    if fmt == "JPEG" and not tail.endswith(b"\xff\xd9"):
        return "truncated JPEG (no end-of-image marker)"
    if fmt == "PNG" and b"IEND" not in data[-64:]:
        return "truncated PNG (no IEND chunk)"
    return None


def _reduction_factor(data: bytes, min_side: int) -> int:
    """Largest libjpeg DCT scaling (1/2, 1/4, 1/8) that keeps the short side at least min_side."""
    try:
        width, height = Image.open(io.BytesIO(data)).size  # header only
    except Exception:  # noqa: BLE001 - a header PIL cannot read is decoded at full size
        return 1
    for factor in (8, 4, 2):
        if min(width, height) // factor >= min_side:
            return factor
    return 1


_REDUCED_FLAGS = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def to_rgb8(image: np.ndarray) -> np.ndarray:
    """Any OpenCV decode (gray, BGR, BGRA; 8 or 16 bit) as 8-bit RGB.

    16-bit values are scaled by 255/65535 (not truncated to the low byte); transparent pixels are composited
    over black, the background of an X-ray.
    """
    if image.dtype == np.uint16:
        image = cv2.convertScaleAbs(image, alpha=255.0 / 65535.0)
    elif image.dtype != np.uint8:
        raise TypeError(f"unsupported pixel type {image.dtype}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        alpha = image[:, :, 3:4].astype(np.float32) / 255.0
        image = (image[:, :, :3].astype(np.float32) * alpha + 0.5).astype(np.uint8)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def decode_raw(data: bytes, path: str | os.PathLike, flags: int = cv2.IMREAD_UNCHANGED) -> tuple[np.ndarray, str]:
    """OpenCV's decode as stored (gray/BGR/BGRA, 8 or 16 bit) and the format, or BadImageError with the reason."""
    if not data:
        raise BadImageError(path, "empty file (0 bytes)")
    fmt = _sniff_format(data)
    if fmt is None:
        raise BadImageError(path, "not a JPEG or PNG image (unrecognised file content)")
    problem = _check_complete(data, fmt)
    if problem:
        raise BadImageError(path, problem)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if image is None or image.size == 0:
        raise BadImageError(path, f"OpenCV could not decode this {fmt} file")
    return image, fmt


def decode_bytes(data: bytes, path: str | os.PathLike, min_side: int | None = None) -> np.ndarray:
    """Decode a JPEG/PNG to 8-bit RGB, or raise BadImageError naming the file and why.

    With min_side, large JPEGs are decoded at a reduced resolution (still at least min_side on the short side),
    which is several times faster than a full decode followed by a resize.
    """
    flags = cv2.IMREAD_UNCHANGED
    if min_side and data.startswith(_JPEG_MAGIC):
        factor = _reduction_factor(data, min_side)
        if factor > 1:
            flags = _REDUCED_FLAGS[factor]
    return to_rgb8(decode_raw(data, path, flags)[0])


def read_bytes(path: str | os.PathLike) -> bytes:
    """A file's bytes, or BadImageError naming it (permissions, a vanished file)."""
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise BadImageError(path, f"cannot read file: {err.strerror or err}") from err


def read_image(path: str | os.PathLike, min_side: int | None = None) -> np.ndarray:
    """Read and decode one file to 8-bit RGB (see decode_bytes)."""
    return decode_bytes(read_bytes(path), path, min_side)


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize to size x size as the notebook did (no aspect ratio kept); INTER_AREA avoids aliasing."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    interpolation = cv2.INTER_AREA if min(image.shape[:2]) > size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def load_image(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """The model's view of a file: decoded, 8-bit RGB, image_size x image_size, HWC uint8."""
    return resize_square(read_image(path, min_side=image_size), image_size)


@dataclass
class DecodedImages:
    """Images decoded once to the model's size, as an N x 3 x S x S uint8 array, plus the files that failed."""

    paths: list[Path]
    images: np.ndarray
    bad: list[BadImageError]


class ImageCache:
    """Decode each file once; optionally keep the result on disk keyed by file content and settings."""

    def __init__(self, image_size: int, cache_dir: str | os.PathLike | None = None, workers: int | None = None):
        self.image_size = int(image_size)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.workers = workers or min(8, os.cpu_count() or 1)

    def _cache_file(self, data: bytes) -> Path | None:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(data).hexdigest()
        return self.cache_dir / f"v{DECODE_VERSION}-s{self.image_size}" / key[:2] / f"{key}.npy"

    def load(self, path: Path) -> np.ndarray:
        """One file as a 3 x S x S uint8 array, from the disk cache when it is there."""
        data = read_bytes(path)
        cache_file = self._cache_file(data)
        if cache_file is not None and cache_file.exists():
            try:
                return np.load(cache_file)
            except (OSError, ValueError):
                log.warning("ignoring unreadable cache entry %s", cache_file)
        image = resize_square(decode_bytes(data, path, min_side=self.image_size), self.image_size)
        chw = np.ascontiguousarray(image.transpose(2, 0, 1))
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            with open(tmp, "wb") as fh:
                np.save(fh, chw)
            os.replace(tmp, cache_file)  # atomic: a killed run never leaves half an entry
        return chw

    def decode_all(self, paths: Sequence[Path]) -> DecodedImages:
        """Decode many files in threads (OpenCV releases the GIL); bad files are collected, not raised."""

        def one(path: Path) -> np.ndarray | BadImageError:
            try:
                return self.load(path)
            except BadImageError as err:
                return err

        with ThreadPoolExecutor(self.workers) as pool:
            results = list(pool.map(one, paths))
        good = [(p, r) for p, r in zip(paths, results, strict=True) if not isinstance(r, BadImageError)]
        images = (
            np.stack([r for _, r in good]) if good else np.empty((0, 3, self.image_size, self.image_size), np.uint8)
        )
        bad = [r for r in results if isinstance(r, BadImageError)]
        return DecodedImages([p for p, _ in good], images, bad)
