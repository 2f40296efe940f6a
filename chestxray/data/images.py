"""Finding and decoding image files: one code path for training, prediction, the audit and the store.

Every file goes through the same checks before a pixel is decoded: the content must be a complete JPEG or PNG, a
TIFF or a DICOM file (not just named like one), and its header must declare a size within the limits (a 30,000 x
30,000 PNG of 1 MB would otherwise take 4.5 GB to decode). JPEG and TIFF orientation is applied, as `cv2.imread`
does. DICOM goes through chestxray.data.dicom (modality and VOI LUTs, MONOCHROME1, BitsStored) to the same uint8.

16-bit PNG and TIFF are scaled by their significant bits (sample_depth has the rule): full range where the samples
carry the PNG specification's scaling of a b-bit source to 16 bits (its top bits again in the low bits, or the
linear map), or where a PNG's sBIT declares b bits and the samples are so scaled (a dark source's low bits are 0)
or exceed 2^b - 1; else the PNG sBIT chunk or the TIFF MaxSampleValue tag where the file declares them and the
pixels keep to it; else the smallest detector depth (8, 10, 12, 14 or 16 bits) that holds the image's greatest
value. A 12-bit image stored unscaled in 16 bits (values up to 4095) is therefore scaled by 255/4095, not
255/65535 (nearly black).
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
from PIL import JpegImagePlugin, PngImagePlugin, TiffImagePlugin

from chestxray.data import codestreams, dicom
from chestxray.data.preprocess import preprocess_image

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".tif", ".tiff", *dicom.DICOM_SUFFIXES)
# Bump when decoding or resizing changes, so on-disk stores made by older code are not reused.
# 3: DICOM; 16-bit PNG/TIFF by their significant bits; TIFF. 4: 16-bit samples by sample_depth's four rules.
# 5: those rules read 99.9% of the pixels, and the linear scaling; an invalid or alpha sBIT is not the colour's.
DECODE_VERSION = 5
# Refuse images above this many pixels (data.max_pixels): well above any radiograph (a 43 x 43 cm detector at
# 100 um is 18 megapixels), well below what takes a machine down when several are decoded at once.
DEFAULT_MAX_PIXELS = 100_000_000
# Refuse images with a shorter side than this (data.min_image_side): a 1 x 1 PNG is not a chest X-ray.
DEFAULT_MIN_SIDE = 32

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")
_HEADER_READERS = {
    "JPEG": JpegImagePlugin.JpegImageFile,
    "PNG": PngImagePlugin.PngImageFile,
    "TIFF": TiffImagePlugin.TiffImageFile,
}
_EXIF_ORIENTATION = 0x0112
_TIFF_MAX_SAMPLE_VALUE = 281


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
    lateral: str = "flag"  # data.lateral: a DICOM side view is flagged (predictions.csv's view column) or refused
    prefix: str = field(default="data.", compare=False)


DEFAULT_LIMITS = ImageLimits()


@dataclass(frozen=True)
class Header:
    format: str  # JPEG, PNG, TIFF or DICOM
    width: int
    height: int
    orientation: int  # EXIF orientation, 1 (as stored) to 8
    top: int | None = None  # the greatest value the file declares (PNG sBIT, TIFF MaxSampleValue), if it does
    sbit: int | None = None  # a PNG's sBIT: its source's significant bits, which the specification scales to 16
    dicom: dicom.DicomInfo | None = None


@dataclass(frozen=True)
class ImageTags:
    """The header fields a prediction row carries: empty for files that are not DICOM."""

    modality: str = ""
    view: str = ""

    @property
    def lateral(self) -> bool:
        return self.view in dicom.LATERAL_VIEWS


def is_image_file(path: Path) -> bool:
    """Accept jpeg/jpg/png/tif/tiff/dcm/dicom in any letter case, and DICOM files without an extension (their
    132-byte preamble says DICM; only such files are opened); skip hidden files such as .DS_Store."""
    if path.name.startswith("."):
        return False
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return True
    return dicom.may_be_dicom(path) and dicom.sniff(path)


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
    # DICOM first: its 128-byte preamble may hold a TIFF header (a dual-personality file, PS3.10 7.5; pydicom's
    # CT_small.dcm is one), and such a file is a DICOM image to a hospital, with the Modality it says
    if dicom.has_preamble(data):
        return "DICOM"
    if data.startswith(_JPEG_MAGIC):
        return "JPEG"
    if data.startswith(_PNG_MAGIC):
        return "PNG"
    if data.startswith(_TIFF_MAGIC):
        return "TIFF"
    return None


def _png_significant_bits(data: bytes) -> int | None:
    """The PNG sBIT chunk's greatest colour channel depth (not alpha's, which is a fraction of 65535 whatever the
    colour's depth), read from the chunks before the image data (None without it, or where a depth is 0 or above 16:
    an invalid chunk, which libpng ignores too)."""
    at = len(_PNG_MAGIC)
    while at + 8 <= len(data):
        length = int.from_bytes(data[at : at + 4], "big")
        kind = data[at + 4 : at + 8]
        if kind in (b"IDAT", b"IEND"):
            return None
        if kind == b"sBIT" and length:  # grey, grey + alpha: the first byte; RGB, RGBA, palette: the first three
            depths = data[at + 8 : at + 8 + (1 if length <= 2 else 3)]
            return max(depths) if depths and all(1 <= d <= 16 for d in depths) else None
        at += 12 + length
    return None


def _check_complete(data: bytes, fmt: str) -> str | None:
    """OpenCV decodes a truncated JPEG into grey garbage without failing, so look for the end markers."""
    tail = data.rstrip(b"\x00\r\n ")
    if fmt == "JPEG" and not tail.endswith(b"\xff\xd9"):
        return "truncated JPEG (no end-of-image marker)"
    if fmt == "PNG" and b"IEND" not in data[-64:]:
        return "truncated PNG (no IEND chunk)"
    return None


def read_header(data: bytes, path: str | os.PathLike, limits: ImageLimits | None = None) -> Header:
    """Format, size and orientation from the file's header alone, or BadImageError with the reason. With limits, a
    deflated DICOM that inflates beyond what limits.max_pixels allows is
    refused while inflating (dicom.read_dataset)."""
    if not data:
        raise BadImageError(path, "empty file (0 bytes)")
    fmt = _sniff_format(data)
    if fmt is None:
        raise BadImageError(path, "not a JPEG, PNG, TIFF or DICOM image (unrecognised file content)")
    if fmt == "DICOM":
        return _dicom_header(data, path, limits)[0]
    problem = _check_complete(data, fmt)
    if problem:
        raise BadImageError(path, problem)
    scans = codestreams.jpeg_scans(data) if fmt == "JPEG" else 0
    if scans > codestreams.MAX_JPEG_SCANS:
        raise BadImageError(
            path,
            f"JPEG of {scans:,} scans, above {codestreams.MAX_JPEG_SCANS} (not decoded: each scan is a pass over the "
            "whole image, and so many take minutes)",
        )
    top = sbit = None
    try:
        # The plugin classes parse the header without Image.open's global decompression-bomb limit.
        image = _HEADER_READERS[fmt](io.BytesIO(data))
        width, height = image.size
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1) if fmt in ("JPEG", "TIFF") else 1
        if fmt == "TIFF":
            pages = getattr(image, "n_frames", 1)
            top = image.tag_v2.get(_TIFF_MAX_SAMPLE_VALUE)
            top = int(top[0] if isinstance(top, tuple) else top) if top else None
        elif fmt == "PNG":
            sbit = _png_significant_bits(data)
            top = 2**sbit - 1 if sbit else None
    except Exception as err:  # noqa: BLE001 - any header PIL cannot parse is a bad file
        raise BadImageError(path, f"unreadable {fmt} header ({type(err).__name__}: {err})") from None
    if fmt == "TIFF" and pages > 1:
        raise BadImageError(path, f"TIFF of {pages} pages: one radiograph per file expected")
    return Header(fmt, width, height, orientation if orientation in range(1, 9) else 1, top, sbit)


def _dicom_header(data: bytes, path: str | os.PathLike, limits: ImageLimits | None = None):
    """A DICOM file's Header and its (READ_TAGS only) dataset, for the pixel decode."""
    try:
        if limits is None:
            ds = dicom.read_dataset(data)
        else:
            ds = dicom.read_dataset(data, limits.max_pixels, f"{limits.prefix}max_pixels")
        info = dicom.info_of(ds)
    except dicom.DicomError as err:
        raise BadImageError(path, str(err)) from None
    return Header("DICOM", info.width, info.height, 1, dicom=info), ds


def check_limits(header: Header, path: str | os.PathLike, limits: ImageLimits) -> None:
    """Refuse, before decoding, images too large to decode safely or too small to be a radiograph."""
    frames = header.dicom.frames if header.dicom else 1  # rows x columns x frames: what decoding would hold
    pixels = header.width * header.height * max(frames, 1)
    if pixels > limits.max_pixels:
        size = f"{header.width} x {header.height}" + (f" x {frames} frames" if frames > 1 else "")
        raise BadImageError(
            path,
            f"image of {size} = {pixels:,} pixels is above {limits.prefix}max_pixels="
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


# The depths detectors store radiographs at: a 16-bit file without a declared depth whose samples are not the PNG
# specification's scaling is taken to hold the smallest of these that fits its greatest value.
STANDARD_DEPTHS = (8, 10, 12, 14, 16)


def replicate(top_bits: np.ndarray, bits: int) -> np.ndarray:
    """`bits`-bit values scaled to 16 bits as the PNG specification recommends: shifted left, with their own top bits
    repeated into the low bits (so 0 stays 0 and 2^bits - 1 becomes 65535)."""
    top_bits = top_bits.astype(np.int64)
    out = np.zeros_like(top_bits)
    for shift in range(16 - bits, -bits, -bits):
        out |= top_bits << shift if shift >= 0 else top_bits >> -shift
    return out


# A scaling to 16 bits is read from most of the pixels, not all, so that no stray pixel decides the brightness: at
# least SCALED_SHARE of them must be a b-bit value scaled to 16 bits, and (without sBIT) at least EVIDENCE_SHARE must
# show it in their low bits (not 0). Unscaled samples with noise are far from both: a b-bit scaling fixes 16 - b low
# bits, which unscaled values match about once in 2^(16 - b).
SCALED_SHARE = 0.999
EVIDENCE_SHARE = 0.001


def _counts(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct sample values, ascending; how many samples have each) of a 16-bit image: 65,536 counters."""
    counts = np.bincount(image.ravel(), minlength=65536)
    values = np.flatnonzero(counts)
    return values, counts[values]


def _scaled(values: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per value: (a `bits`-bit value scaled to 16 bits by replication or linearly, the specification's two methods;
    its low 16 - bits bits are 0, as a plain left shift leaves them)."""
    shift = 16 - bits
    replicated = replicate(values >> shift, bits) == values
    source = np.rint(values * ((2**bits - 1) / 65535))
    linear = np.rint(source * (65535 / (2**bits - 1))) == values
    return replicated | linear, (values & ((1 << shift) - 1)) == 0


def _near_greatest(values: np.ndarray, counts: np.ndarray) -> int:
    """The greatest sample once the brightest 1 - SCALED_SHARE of the pixels are set aside (a hot pixel, a burned-in
    label): a few pixels do not decide the depth."""
    cumulative = np.cumsum(counts)
    return int(values[np.searchsorted(cumulative, SCALED_SHARE * cumulative[-1])])


def replicated_bits(image: np.ndarray) -> int | None:
    """The smallest depth b (1 to 15) from which the image's samples were scaled to 16 bits as the PNG specification
    says (its top bits replicated into the low bits, or the linear map v * 65535 / (2^b - 1)), or None. Shown by the
    low bits: a scaling whose low bits are all 0 (the source's top bits are 0) is what any image whose samples are
    multiples of 2^(16 - b) shows, an unscaled one whose values are all even or 8-bit values times 16 included."""
    return _replicated_bits(*_counts(image))


def _replicated_bits(values: np.ndarray, counts: np.ndarray) -> int | None:
    total = counts.sum()
    if values.size == 0 or values[-1] == 0:
        return None
    for bits in range(1, 16):
        scaled, zero_low = _scaled(values, bits)
        if counts[scaled].sum() >= SCALED_SHARE * total and counts[scaled & ~zero_low].sum() >= EVIDENCE_SHARE * total:
            return bits
    return None


def sample_depth(image: np.ndarray, declared: int | None = None, sbit: int | None = None) -> tuple[int, int]:
    """(top, bits) of a 16-bit image: the value that becomes 255, and the significant bits of its source.

    The rule, in order (the colour channels only; alpha is always a fraction of 65535). Each reads most of the
    pixels, not all (SCALED_SHARE, EVIDENCE_SHARE), so one stray pixel does not change the answer:
    1. Samples scaled to 16 bits as the PNG specification says, shown by their low bits (replicated_bits: the top b
       bits replicated into the low bits, or the linear map) are full-range: top 65535, whatever sBIT or the
       brightest pixel say; the source had b bits.
    2. A PNG whose sBIT chunk declares b bits, where the samples are b-bit values scaled to 16 bits (by either method,
       or a left shift; a dark source's low bits are 0 by all three) or exceed 2^b - 1: the specification's reading
       of sBIT, so full-range too. A dark 12-bit image scaled so is 16x too bright when read as 12 bits.
    3. Else a declared greatest value (PNG sBIT, TIFF MaxSampleValue) that the pixels keep to: top = declared.
    4. Else the smallest detector depth (8, 10, 12, 14 or 16 bits, STANDARD_DEPTHS) that holds the greatest pixel,
       the brightest 0.1% set aside (_near_greatest): top 2^b - 1 (a TIFF whose pixels exceed its MaxSampleValue
       included). Samples stored unscaled, as many radiograph exports do, get their detector's range, whether their
       brightest pixel is 2047 or 2048, and a hot pixel or a burned-in label at 65535 over less than 0.1% of the
       pixels does not make the image 16x darker. A dark image scaled as the specification says but without sBIT
       cannot be told from an unscaled one where its low bits are all 0, and is read so.
    """
    colour = image if image.ndim == 2 or image.shape[2] < 4 else image[:, :, :3]
    values, counts = _counts(colour)
    if values.size == 0:
        return 255, 8
    greatest = _near_greatest(values, counts)
    bits = _replicated_bits(values, counts)
    if bits is not None:
        return 65535, bits
    if sbit and sbit < 16 and values[-1] > 0:
        scaled, zero_low = _scaled(values, sbit)
        if greatest > 2**sbit - 1 or counts[scaled | zero_low].sum() >= SCALED_SHARE * counts.sum():
            return 65535, sbit
    if declared and 0 < greatest <= declared:
        return declared, declared.bit_length()
    bits = next(b for b in STANDARD_DEPTHS if greatest < 2**b)
    return 2**bits - 1, bits


def to_rgb8(image: np.ndarray, top: int | None = None) -> np.ndarray:
    """Any OpenCV decode (gray, BGR, BGRA; 8 or 16 bit) as 8-bit RGB.

    16-bit values are scaled by 255 / top, the value that becomes 255 (sample_depth's rule where not given; not
    truncated to the low byte; not 255/65535, which leaves a 12-bit image nearly black); transparent pixels are
    composited over black, the background of an X-ray.
    """
    if image.dtype == np.uint16:
        alpha = image[:, :, 3] if image.ndim == 3 and image.shape[2] == 4 else None
        image = cv2.convertScaleAbs(image, alpha=255.0 / (top or sample_depth(image)[0]))
        if alpha is not None:  # alpha is a fraction of 65535 whatever the colour's bits
            image[:, :, 3] = cv2.convertScaleAbs(alpha, alpha=255.0 / 65535.0)
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


@dataclass(frozen=True)
class Decoded:
    """One decoded file: upright 8-bit RGB, its header, and what it was as stored (for the audit)."""

    image: np.ndarray
    header: Header
    mode: str  # L, RGB or RGBA
    bits: int  # significant bits per sample: BitsStored, sBIT, or the container's 8 or 16

    @property
    def tags(self) -> ImageTags:
        info = self.header.dicom
        return ImageTags(info.modality, info.view) if info else ImageTags()


def _decode_opencv(data: bytes, path: str | os.PathLike, header: Header, target: int | None) -> Decoded:
    """JPEG, PNG, TIFF: OpenCV's decode, upright, to 8-bit RGB."""
    factor = _reduction_factor(header, target)
    flags = _REDUCED_FLAGS[factor] if factor > 1 else cv2.IMREAD_UNCHANGED
    with _DECODING.hold(header.width * header.height // (factor * factor)):
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flags | cv2.IMREAD_IGNORE_ORIENTATION)
        if image is None or image.size == 0:
            raise BadImageError(path, f"OpenCV could not decode this {header.format} file")
        if image.dtype not in (np.uint8, np.uint16):
            raise BadImageError(path, f"{header.format} of {image.dtype} samples is not read (8 or 16-bit expected)")
        image = apply_orientation(image, header.orientation)
        channels = 1 if image.ndim == 2 else image.shape[2]
        mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(channels, f"{channels} channels")
        top, bits = (255, 8) if image.dtype == np.uint8 else sample_depth(image, header.top, header.sbit)
        return Decoded(to_rgb8(image, top), header, mode, bits)


def _decode_dicom(data: bytes, path: str | os.PathLike, limits: ImageLimits) -> Decoded:
    """DICOM: header checks (size, modality, frames, view, decoder) before any pixel, then chestxray.data.dicom."""
    header, ds = _dicom_header(data, path, limits)
    info = header.dicom
    check_limits(header, path, limits)
    try:
        dicom.check(info, limits.lateral)
        dicom.check_decoder(info)
        dicom.check_frame(ds, info)
        with _DECODING.hold(header.width * header.height):
            image = dicom.decode_pixels(ds, info)
    except dicom.DicomError as err:
        raise BadImageError(path, str(err)) from None
    if image.shape[:2] != (header.height, header.width):
        raise BadImageError(path, f"pixel data of {image.shape[1]} x {image.shape[0]} differs from Rows/Columns")
    rgb = image if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    return Decoded(rgb, header, "RGB" if image.ndim == 3 else "L", info.bits_stored)


def decode(
    data: bytes, path: str | os.PathLike, limits: ImageLimits = DEFAULT_LIMITS, target: int | None = None
) -> Decoded:
    """The one decode of every reader: a file's bytes to upright 8-bit RGB, or BadImageError with the reason.

    With `target`, a large JPEG is decoded by libjpeg at 1/2, 1/4 or 1/8 scale (still at least `target` on the short
    side), several times faster than a full decode followed by a resize.
    """
    if dicom.has_preamble(data[: dicom.PREAMBLE]):
        return _decode_dicom(data, path, limits)
    header = read_header(data, path)
    check_limits(header, path, limits)
    return _decode_opencv(data, path, header, target)


def decode_bytes(
    data: bytes, path: str | os.PathLike, target: int | None = None, limits: ImageLimits = DEFAULT_LIMITS
) -> np.ndarray:
    """Decode a JPEG/PNG/TIFF/DICOM to upright 8-bit RGB, or raise BadImageError naming the file and why."""
    return decode(data, path, limits, target).image


def image_tags(path: str | os.PathLike) -> ImageTags:
    """A file's modality and view (DICOM only; empty otherwise), from its header: for predictions.csv's rows."""
    tags = dicom.read_tags(path)
    return ImageTags(*tags) if tags else ImageTags()


def read_bytes(path: str | os.PathLike) -> bytes:
    """A file's bytes, or BadImageError naming it (permissions, a vanished file, a folder named like an image)."""
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise BadImageError(path, f"cannot read file: {err.strerror or err}") from err


def read_image(path: str | os.PathLike, target: int | None = None, limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Read and decode one file to 8-bit RGB (see decode)."""
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
