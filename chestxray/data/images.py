"""Finding and decoding image files: one code path for training, prediction and the audit.

Every file goes through the same checks before a pixel is decoded: the content must be a complete JPEG or PNG
(not just named like one), and its header must declare a size within the limits (a 30,000 x 30,000 PNG of 1 MB
would otherwise take 4.5 GB to decode). JPEG EXIF orientation is applied, as `cv2.imread` does.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import JpegImagePlugin, PngImagePlugin

from chestxray.data.preprocess import preprocess_image

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
# Bump when decoding or resizing changes, so on-disk stores made by older code are not reused.
DECODE_VERSION = 2
# Refuse images above this many pixels (data.max_pixels): well above any radiograph (a 43 x 43 cm detector at
# 100 um is 18 megapixels), well below what takes a machine down when several are decoded at once.
DEFAULT_MAX_PIXELS = 100_000_000
# Refuse images with a shorter side than this (data.min_image_side): a 1 x 1 PNG is not a chest X-ray.
DEFAULT_MIN_SIDE = 32

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_HEADER_READERS = {"JPEG": JpegImagePlugin.JpegImageFile, "PNG": PngImagePlugin.PngImageFile}
_EXIF_ORIENTATION = 0x0112


class BadImageError(ValueError):
    """An image file that cannot be used, with the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class ImageLimits:
    """What a file must declare in its header to be decoded at all (data.max_pixels, data.min_image_side).

    `prefix` is where the settings live in the calling config ("data." in training, "" in predict.py), so that a
    refusal names the setting the user can change.
    """

    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = DEFAULT_MIN_SIDE
    preprocess: str = "none"  # data.preprocess, applied to the model's view (chestxray.data.preprocess)
    prefix: str = field(default="data.", compare=False)


DEFAULT_LIMITS = ImageLimits()


@dataclass(frozen=True)
class Header:
    format: str  # JPEG or PNG
    width: int
    height: int
    orientation: int  # EXIF orientation, 1 (as stored) to 8


def is_image_file(path: Path) -> bool:
    """Accept jpeg/jpg/png in any letter case; skip hidden files such as .DS_Store."""
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _walk(folder: Path) -> Iterable[Path]:
    """Every file below folder, following links to folders but entering each real folder once (no link loops)."""
    seen: set[str] = set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        yield from (Path(top) / name for name in files)


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """All image files of a folder (and its sub-folders), sorted so that every run sees the same order."""
    candidates = _walk(folder) if recursive else folder.iterdir()
    return sorted(p for p in candidates if is_image_file(p) and p.is_file())


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


def read_header(data: bytes, path: str | os.PathLike) -> Header:
    """Format, size and EXIF orientation from the file's header alone, or BadImageError with the reason."""
    if not data:
        raise BadImageError(path, "empty file (0 bytes)")
    fmt = _sniff_format(data)
    if fmt is None:
        raise BadImageError(path, "not a JPEG or PNG image (unrecognised file content)")
    problem = _check_complete(data, fmt)
    if problem:
        raise BadImageError(path, problem)
    try:
        # The plugin classes parse the header without Image.open's global decompression-bomb limit.
        image = _HEADER_READERS[fmt](io.BytesIO(data))
        width, height = image.size
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1) if fmt == "JPEG" else 1
    except Exception as err:  # noqa: BLE001 - any header PIL cannot parse is a bad file
        raise BadImageError(path, f"unreadable {fmt} header ({type(err).__name__}: {err})") from None
    return Header(fmt, width, height, orientation if orientation in range(1, 9) else 1)


def check_limits(header: Header, path: str | os.PathLike, limits: ImageLimits) -> None:
    """Refuse, before decoding, images too large to decode safely or too small to be a radiograph."""
    pixels = header.width * header.height
    if pixels > limits.max_pixels:
        raise BadImageError(
            path,
            f"image of {header.width} x {header.height} = {pixels:,} pixels is above {limits.prefix}max_pixels="
            f"{limits.max_pixels:,} (not decoded: a file this size can exhaust memory)",
        )
    if min(header.width, header.height) < limits.min_side:
        raise BadImageError(
            path,
            f"image of {header.width} x {header.height} pixels is smaller than {limits.prefix}min_image_side="
            f"{limits.min_side}",
        )


def _reduction_factor(header: Header, target: int | None) -> int:
    """Largest libjpeg DCT scaling (1/2, 1/4, 1/8) that keeps the short side at least `target`."""
    if not target or header.format != "JPEG":
        return 1
    for factor in (8, 4, 2):
        if min(header.width, header.height) // factor >= target:
            return factor
    return 1


_REDUCED_FLAGS = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """Turn a decode as stored into the picture as meant, for EXIF orientations 2-8."""
    if orientation in (5, 6, 7, 8):
        image = cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE if orientation in (5, 6) else cv2.ROTATE_90_COUNTERCLOCKWISE)
    flip = {2: 1, 3: -1, 4: 0, 5: 1, 7: 1}.get(orientation)
    return image if flip is None else cv2.flip(image, flip)


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
    if image.shape[2] == 4:  # colour x alpha / 255, rounded, in uint8 (no float copy of a large image)
        alpha = image[:, :, 3]
        image = cv2.multiply(image[:, :, :3], cv2.merge([alpha, alpha, alpha]), scale=1 / 255)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class _PixelBudget:
    """At most `capacity` declared pixels being decoded at once in this process, whatever the number of decoding
    threads: a handful of 100-megapixel files decoded in parallel on a many-core machine would take tens of GB."""

    def __init__(self, capacity: int):
        self.capacity, self.used = capacity, 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        pixels = min(pixels, self.capacity)
        with self._cond:
            self._cond.wait_for(lambda: self.used + pixels <= self.capacity)
            self.used += pixels
        try:
            yield
        finally:
            with self._cond:
                self.used -= pixels
                self._cond.notify_all()


_DECODING = _PixelBudget(2 * DEFAULT_MAX_PIXELS)


def decode_raw(
    data: bytes, path: str | os.PathLike, limits: ImageLimits = DEFAULT_LIMITS, target: int | None = None
) -> tuple[np.ndarray, Header]:
    """OpenCV's decode (gray/BGR/BGRA, 8 or 16 bit), upright, and the header; or BadImageError with the reason.

    With `target`, a large JPEG is decoded by libjpeg at 1/2, 1/4 or 1/8 scale (still at least `target` on the short
    side), several times faster than a full decode followed by a resize.
    """
    header = read_header(data, path)
    check_limits(header, path, limits)
    factor = _reduction_factor(header, target)
    flags = _REDUCED_FLAGS[factor] if factor > 1 else cv2.IMREAD_UNCHANGED
    with _DECODING.hold(header.width * header.height // (factor * factor)):
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flags | cv2.IMREAD_IGNORE_ORIENTATION)
        if image is None or image.size == 0:
            raise BadImageError(path, f"OpenCV could not decode this {header.format} file")
        return apply_orientation(image, header.orientation), header


def decode_bytes(
    data: bytes, path: str | os.PathLike, target: int | None = None, limits: ImageLimits = DEFAULT_LIMITS
) -> np.ndarray:
    """Decode a JPEG/PNG to upright 8-bit RGB, or raise BadImageError naming the file and why."""
    return to_rgb8(decode_raw(data, path, limits, target)[0])


def read_bytes(path: str | os.PathLike) -> bytes:
    """A file's bytes, or BadImageError naming it (permissions, a vanished file, a folder named like an image)."""
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise BadImageError(path, f"cannot read file: {err.strerror or err}") from err


def read_image(path: str | os.PathLike, target: int | None = None, limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Read and decode one file to 8-bit RGB (see decode_raw)."""
    return decode_bytes(read_bytes(path), path, target, limits)


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize to size x size as the notebook did (no aspect ratio kept); INTER_AREA avoids aliasing."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    interpolation = cv2.INTER_AREA if min(image.shape[:2]) > size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def model_view(
    data: bytes, path: str | os.PathLike, image_size: int, limits: ImageLimits = DEFAULT_LIMITS
) -> np.ndarray:
    """The model's view of a file's bytes: 3 x S x S uint8 (CHW), decoded, upright, RGB, resized."""
    image = preprocess_image(resize_square(decode_bytes(data, path, image_size, limits), image_size), limits.preprocess)
    return np.ascontiguousarray(image.transpose(2, 0, 1))


def load_image(path: str | os.PathLike, image_size: int, limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    """The model's view of a file: 3 x S x S uint8 (CHW), decoded, upright, RGB, resized."""
    return model_view(read_bytes(path), path, image_size, limits)


DISPLAY_SIDE = 256  # short side of gallery and Grad-CAM images, whatever the model's input size


def display_image(path: str | os.PathLike, limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    """The source image, upright RGB, scaled to a short side of DISPLAY_SIDE with its aspect ratio kept."""
    image = read_image(path, DISPLAY_SIDE, limits)
    scale = DISPLAY_SIDE / min(image.shape[:2])
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
