"""DICOM files (CR and DX radiographs) to the same 8-bit picture the PNG path gives, with pydicom's own functions.

Only the data elements in READ_TAGS are parsed (pydicom's `specific_tags`): a header's patient, study and
institution fields are never even converted to values, so no code here can print, log or write them. The one
exception, PatientID, is read by `patient_key` alone and leaves it only as a salted hash.

The picture: stored values -> Modality LUT or Rescale Slope/Intercept (`apply_modality_lut`) -> the file's VOI LUT
or first window (`apply_voi_lut`), else nothing -> the output range of those steps over every value BitsStored
allows, mapped to 0..255 -> MONOCHROME1 inverted. RGB as stored; YBR converted to RGB by pydicom.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import io
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chestxray.data import codestreams

DICOM_SUFFIXES = (".dcm", ".dicom")
PREAMBLE = 132  # 128-byte preamble + "DICM": all a file listing reads of a file without an extension
ACCEPTED_MODALITIES = ("CR", "DX")
# ViewPosition defined terms for a side view (PS3.3 C.8.11.5.1.1: LL, RL) and what vendors write instead
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLAT", "RLAT", "LEFT LATERAL", "RIGHT LATERAL"})
LATERAL_CHOICES = ("flag", "refuse")
# The only elements parsed; everything else in the header stays raw bytes that nothing reads.
READ_TAGS = [
    "Modality",
    "ViewPosition",
    "PhotometricInterpretation",
    "SamplesPerPixel",
    "PlanarConfiguration",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
    "VOILUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "PixelData",
]
# CHESTXRAY_PATIENT_SALT: a site's own secret, so that its keys cannot be matched against another site's
_DEFAULT_SALT = b"chestxray patient grouping v1"
_CODE_STRING = re.compile(r"[A-Z0-9 _]{1,16}")  # the CS value representation; anything else is not written out


@dataclass(frozen=True)
class DicomInfo:
    """What is read out of a DICOM header (the README's list): nothing that names a patient."""

    modality: str
    view: str
    photometric: str
    bits_stored: int
    width: int
    height: int
    frames: int
    samples: int
    transfer_syntax: str

    @property
    def lateral(self) -> bool:
        return self.view in LATERAL_VIEWS


class DicomError(ValueError):
    """A reason a DICOM file is not used (wrapped into images.BadImageError with the file's name)."""


def has_preamble(head: bytes) -> bool:
    """A DICOM Part 10 file: 128 bytes of preamble, then DICM."""
    return head[128:132] == b"DICM"


def _code(value) -> str:
    """A code-string element as text, or "invalid" when it holds something a CS cannot (never echoed)."""
    text = str(value or "").strip().upper()
    if not text:
        return ""
    return text if _CODE_STRING.fullmatch(text) else "invalid"


DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian: the whole dataset is zlib-compressed
_INFLATE_STEP = 1 << 20


def inflated_limit(max_pixels: int) -> int:
    """The most bytes a dataset within max_pixels can hold: 3 samples of 2 bytes per pixel, plus 1 MB of header."""
    return 6 * max_pixels + (1 << 20)


def _declared_pixels(dataset: bytes) -> int | None:
    """Rows x Columns x frames as an inflated dataset's start declares them, or None where that start does not hold
    them (they come after a long element, or the bytes are not a dataset)."""
    from pydicom.filereader import read_dataset as read_elements

    def past_columns(tag, vr, length) -> bool:
        return tag > 0x00280011

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = read_elements(
                io.BytesIO(dataset),
                False,
                True,
                stop_when=past_columns,
                specific_tags=[0x00280008, 0x00280010, 0x00280011],
            )
            rows, columns = int(ds.Rows), int(ds.Columns)
            frames = int(ds.get("NumberOfFrames", 1) or 1)
        except Exception:  # noqa: BLE001 - cut mid-element or not there: the inflating check decides
            return None
    return rows * columns * max(frames, 1)


def _check_inflated_size(data: bytes, limit: int, max_pixels: int | None = None, setting: str = "max_pixels") -> None:
    """A deflated dataset larger than `limit` once inflated is refused while inflating, 1 MB at a time: pydicom
    inflates the whole dataset to read even its header, so a 200 kB file of zeros would take gigabytes. With
    max_pixels, a dataset whose first MB declares more pixels than that is refused there, before the rest inflates
    (a 10000 x 10000 bomb is refused after inflating 1 MB, not the 151 MB that max_pixels=25M allows)."""
    import zlib

    from pydicom.filereader import _read_file_meta_info, read_preamble

    fp = io.BytesIO(data)
    try:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
    except Exception as err:  # noqa: BLE001 - whatever pydicom cannot parse is a bad file
        raise DicomError(f"unreadable DICOM header ({type(err).__name__})") from None
    if str(meta.get("TransferSyntaxUID", "")) != DEFLATED:
        return
    inflater, total, pending = zlib.decompressobj(-zlib.MAX_WBITS), 0, data[fp.tell() :]
    try:
        while not inflater.eof and total <= limit:
            out = inflater.decompress(pending, _INFLATE_STEP)
            if total == 0 and max_pixels is not None:
                pixels = _declared_pixels(out)
                if pixels is not None and pixels > max_pixels:
                    raise DicomError(
                        f"deflated dataset declares {pixels:,} pixels, above {setting}={max_pixels:,} (refused before "
                        "inflating the rest: a file this size can exhaust memory)"
                    )
            total += len(out)
            if not out and len(inflater.unconsumed_tail) >= len(pending):
                break  # no progress: a truncated stream, which pydicom then reports
            # after the end of the stream zlib leaves what follows (DICOM's even-length pad byte) in unconsumed_tail,
            # hence the eof test: waiting for that tail to empty would never end
            pending = inflater.unconsumed_tail
    except zlib.error:
        raise DicomError("corrupt deflated dataset") from None
    if total > limit:
        raise DicomError(f"deflated dataset inflates beyond {limit:,} bytes (more than max_pixels allows)")


@functools.cache
def _pydicom():
    """pydicom, set once for the process: its reading checks off and its logger silent, as both quote header values
    ('Invalid value for VR IS: ...'), which must reach no log or answer (its own import resets its logger, hence
    here, after it). Process-wide: a program that imports chestxray and reads DICOM gets these settings too."""
    import pydicom
    from pydicom import config

    config.settings.reading_validation_mode = config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)
    return pydicom


def read_dataset(data: bytes, max_pixels: int | None = None, setting: str = "max_pixels"):
    """The header's READ_TAGS and the pixel data; pydicom's warnings are dropped, as they may quote values. With
    max_pixels, a deflated file is first checked to declare at most that many pixels and to inflate to at most
    what they can hold (inflated_limit)."""
    pydicom = _pydicom()

    if max_pixels is not None:
        _check_inflated_size(data, inflated_limit(max_pixels), max_pixels, setting)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pydicom.dcmread(io.BytesIO(data), specific_tags=READ_TAGS)
        except Exception as err:  # noqa: BLE001 - whatever pydicom cannot parse is a bad file
            raise DicomError(f"unreadable DICOM header ({type(err).__name__})") from None


def info_of(ds) -> DicomInfo:
    """The header fields this project uses, checked for presence before any pixel is decoded."""
    meta = getattr(ds, "file_meta", None)
    syntax = getattr(meta, "TransferSyntaxUID", None)
    if syntax is None:
        raise DicomError("no transfer syntax in the file meta information")
    if "PixelData" not in ds:
        raise DicomError("no pixel data (not an image)")
    return DicomInfo(
        modality=_code(ds.get("Modality")),
        view=_code(ds.get("ViewPosition")),
        photometric=_code(ds.get("PhotometricInterpretation")),
        bits_stored=_whole(ds, "BitsStored", None) or _whole(ds, "BitsAllocated"),
        width=_whole(ds, "Columns"),
        height=_whole(ds, "Rows"),
        frames=_whole(ds, "NumberOfFrames", 1),
        samples=_whole(ds, "SamplesPerPixel", 1),
        transfer_syntax=str(syntax),
    )


_REQUIRED = object()


def _whole(ds, keyword: str, default=_REQUIRED) -> int | None:
    """A header element as a whole number, `default` where it is absent or empty; else one line naming the element
    and not quoting its value (a header value is never echoed: it could be anything the sender put there)."""
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            if default is _REQUIRED:
                raise DicomError(f"image pixel module incomplete: no {keyword}")
            return default
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise DicomError(f"image pixel module incomplete: {keyword} is not a whole number") from None


def check(info: DicomInfo, lateral: str = "flag") -> None:
    """Refuse what is not one chest radiograph: another modality, several frames, an unknown layout, a side view
    when data.lateral=refuse."""
    if info.modality not in ACCEPTED_MODALITIES:
        raise DicomError(f"Modality {info.modality or '(none)'} is not a radiograph (CR or DX expected)")
    if info.frames > 1:
        raise DicomError(f"multi-frame file (NumberOfFrames {info.frames}): one radiograph per file expected")
    if info.samples == 1 and not info.photometric.startswith("MONOCHROME"):
        raise DicomError(f"PhotometricInterpretation {info.photometric or '(none)'} is not read")
    if info.samples == 3 and not (info.photometric == "RGB" or info.photometric.startswith("YBR")):
        raise DicomError(f"PhotometricInterpretation {info.photometric} with 3 samples is not read")
    if info.samples not in (1, 3) or not 1 <= info.bits_stored <= 16:
        raise DicomError(f"{info.samples} samples of {info.bits_stored} bits per pixel are not read")
    if lateral == "refuse" and info.lateral:
        raise DicomError(f"lateral view (ViewPosition {info.view}) refused (data.lateral=refuse)")


def check_decoder(info: DicomInfo) -> None:
    """A compressed transfer syntax without an installed decoder: one line with the extra to install."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    uid = UID(info.transfer_syntax)
    if not uid.is_compressed:
        return
    try:
        available = get_decoder(uid).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise DicomError(
            f"transfer syntax {uid.name} ({uid}) needs a decoder that is not installed: pip install 'chestxray[dicom]'"
        )


def check_frame(ds, info: DicomInfo) -> None:
    """A compressed frame must declare the size the header does, and a JPEG one at most MAX_JPEG_SCANS scans: the
    decoder allocates what the frame says, and max_pixels was checked against Rows and Columns
    (chestxray.data.codestreams). Before any pixel is decoded."""
    from pydicom.encaps import generate_frames
    from pydicom.uid import JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes

    syntax = info.transfer_syntax
    if syntax not in (*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes, *JPEG2000TransferSyntaxes):
        return
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=max(info.frames, 1)))
    except Exception as err:  # noqa: BLE001 - an encapsulation pydicom cannot walk is a bad file
        raise DicomError(f"compressed pixel data cannot be read ({type(err).__name__})") from None
    size = codestreams.j2k_size(frame) if syntax in JPEG2000TransferSyntaxes else codestreams.jpeg_size(frame)
    if size is None:
        raise DicomError("compressed frame without a readable size in its own header")
    if size != (info.width, info.height):
        raise DicomError(
            f"compressed frame of {size[0]} x {size[1]} pixels in a header of Columns {info.width} x Rows "
            f"{info.height} (refused before decoding: the decoder would allocate the frame's size)"
        )
    scans = codestreams.jpeg_scans(frame) if syntax in JPEGTransferSyntaxes else 0
    if scans > codestreams.MAX_JPEG_SCANS:
        raise DicomError(f"JPEG frame of {scans:,} scans, above {codestreams.MAX_JPEG_SCANS} (minutes to decode)")


def _domain(ds, info: DicomInfo) -> np.ndarray:
    """Every stored value BitsStored allows, in order."""
    bits = info.bits_stored
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    low = -(2 ** (bits - 1)) if signed else 0
    return np.arange(low, low + 2**bits, dtype=np.int32 if signed else np.uint32)


def _output_range(ds, info: DicomInfo, voi: bool) -> tuple[float, float]:
    """The least and greatest value the modality and VOI steps can give, over every value BitsStored allows (and,
    for a window, pydicom's own output bounds): this range, not the image's, becomes 0..255."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(_domain(ds, info), ds)
    if voi:
        if "VOILUTSequence" not in ds:  # a window clamps to its bounds: include values beyond the stored range
            values = np.concatenate([np.asarray(values, np.float64), [-1e15, 1e15]])
        values = apply_voi_lut(values, ds, index=0, prefer_lut=True)
    return float(np.min(values)), float(np.max(values))


def _grey_table(ds, info: DicomInfo) -> np.ndarray:
    """The 8-bit grey of every stored value (modality LUT, VOI, output range, MONOCHROME1 inverted): both steps act
    on each value alone, so the picture is this table looked up, computed over 2^BitsStored values (at most 65536)
    instead of in float64 over every pixel (two float64 copies of a 25-megapixel image are 400 MB)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    voi = "VOILUTSequence" in ds or "WindowCenter" in ds
    values = apply_modality_lut(_domain(ds, info), ds)
    if voi:
        values = apply_voi_lut(values, ds, index=0, prefer_lut=True)
    table = _to_uint8(values, *_output_range(ds, info, voi))
    return 255 - table if info.photometric == "MONOCHROME1" else table


def _look_up(stored: np.ndarray, table: np.ndarray, first: int, rows: int = 256) -> np.ndarray:
    """table[stored - first], a band of rows at a time (the index array numpy makes stays a few MB)."""
    out = np.empty(stored.shape, np.uint8)
    for top in range(0, stored.shape[0], rows):
        index = stored[top : top + rows].astype(np.int64) - first
        np.clip(index, 0, len(table) - 1, out=index)  # values beyond BitsStored: the nearest end, as clipping did
        out[top : top + rows] = table[index]
    return out


def decode_pixels(ds, info: DicomInfo) -> np.ndarray:
    """uint8 grey (H x W) or RGB (H x W x 3), as the PNG path gives it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            stored = ds.pixel_array  # BitsStored applied, YBR converted to RGB
        except Exception as err:  # noqa: BLE001 - a decoder failure is a bad file, said in one line
            raise DicomError(f"cannot decode the pixel data ({type(err).__name__})") from None
        if info.samples == 3:
            return _to_uint8(stored, 0, 2**info.bits_stored - 1)
        try:
            table = _grey_table(ds, info)
        except Exception as err:  # noqa: BLE001 - pydicom refuses a window or LUT it cannot apply, in many ways
            raise DicomError(
                f"its grey levels cannot be computed ({type(err).__name__}): a WindowWidth below 1, an unknown "
                "VOILUTFunction, or an incomplete ModalityLUTSequence or VOILUTSequence"
            ) from None
    return _look_up(stored, table, int(_domain(ds, info)[0]))


def _to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    scale = 255.0 / (high - low) if high > low else 0.0
    out = (np.asarray(values, np.float32) - np.float32(low)) * np.float32(scale)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def patient_key(path: str | os.PathLike, salt: bytes | None = None) -> str | None:
    """An opaque key grouping one patient's files (for splits), or None: not DICOM, or no PatientID.

    HMAC-SHA256 of PatientID with a salt (CHESTXRAY_PATIENT_SALT, else a project constant), so the ID itself never
    leaves this function. Patient IDs are short: with a known salt a key can be matched to an ID by trying them all,
    so keys are for grouping in memory and are not written out either.
    """
    ds = header(path, ["PatientID"])
    patient = str(ds.get("PatientID") or "").strip() if ds is not None else ""
    if not patient:
        return None
    if salt is None:
        salt = os.environ.get("CHESTXRAY_PATIENT_SALT", "").encode() or _DEFAULT_SALT
    return hmac.new(salt, patient.encode("utf-8"), hashlib.sha256).hexdigest()


def may_be_dicom(path: str | os.PathLike) -> bool:
    """Whether listing a folder should read 132 bytes of a file it would otherwise skip: a DICOM extension, none, or
    a numeric one (files named by their UID, 1.2.840...). Only for listing: whether a listed file IS DICOM is decided
    by its content everywhere (has_preamble: the decoder, header, patient_key), whatever its name says."""
    suffix = Path(path).suffix
    return suffix.lower() in DICOM_SUFFIXES or suffix == "" or suffix[1:].isdigit()


def header(path: str | os.PathLike, tags: list[str]):
    """The named elements of a DICOM file's header (the pixel data is never read), or None if the file is not DICOM
    or its header cannot be read (the decoder names the file and the reason when the image itself is read).
    pydicom's warnings are dropped: they can quote header values.

    Decided by content as the decoder decides (the 'DICM' magic at offset 128), not by name: a DICOM file named .png
    is decoded as DICOM, so it gets its patient key and tags too."""
    pydicom = _pydicom()

    try:
        with open(path, "rb") as fh:
            if not has_preamble(fh.read(PREAMBLE)):
                return None
            fh.seek(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return pydicom.dcmread(fh, stop_before_pixels=True, specific_tags=tags)
    except Exception:  # noqa: BLE001 - unreadable: no tags and no key
        return None


def read_tags(path: str | os.PathLike) -> tuple[str, str] | None:
    """(Modality, ViewPosition) of a DICOM file from the header alone; None if it is not DICOM or unreadable."""
    ds = header(path, ["Modality", "ViewPosition"])
    return None if ds is None else (_code(ds.get("Modality")), _code(ds.get("ViewPosition")))


def sniff(path: Path) -> bool:
    """Whether a file is DICOM by its first 132 bytes (for files without an extension)."""
    try:
        with open(path, "rb") as fh:
            return has_preamble(fh.read(PREAMBLE))
    except OSError:
        return False
