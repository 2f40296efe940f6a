"""DICOM against PNG decoding of the same images, side by side in one run, through the one decode path.

    python benchmarks/decode_benchmark.py [--data DIR] [--images 40] [--side 1024] [--repeats 3] [--size 224]

Each of the first --images pictures of the dataset is resized to --side px (grey) and written as an 8-bit PNG, a
16-bit PNG (12-bit values), and as DICOM: uncompressed 12-bit, MONOCHROME1 with a window, and RLE and JPEG 2000
compressed (when their decoder is installed). Every file is then decoded to the model's view (`load_image`: read,
decode, resize to --size) --repeats times; the best run's images per second is reported, on one thread, with the
machine's CPU named from /proc/cpuinfo. Files live in a temporary folder (page cache warm after the first run).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's chestxray, not another installed one
DEFAULT_DATA = os.environ.get("CHESTXRAY_DATA", str(ROOT.parent / "shared" / "data" / "covid19-image-dataset"))


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's name elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def dicom_file(values: np.ndarray, bits: int, photometric: str = "MONOCHROME2", **elements):
    """An uncompressed DX dataset of 16-bit-allocated grey values."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality, ds.ViewPosition = "DX", "PA"
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.PixelData = values.astype(np.uint16).tobytes()
    for key, value in elements.items():
        setattr(ds, key, value)
    return ds


def write_sets(data: Path, folder: Path, count: int, side: int) -> dict[str, list[Path]]:
    """The same pictures in each kind of file."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEG2000Lossless, RLELossless

    sources = sorted(p for p in (data / "train").rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:count]
    kinds: dict[str, list[Path]] = {
        k: [] for k in ("PNG 8-bit", "PNG 16-bit", "DICOM 12-bit", "DICOM MONO1+window", "DICOM RLE", "DICOM J2K")
    }
    for i, src in enumerate(sources):
        grey = cv2.resize(cv2.imread(str(src), cv2.IMREAD_GRAYSCALE), (side, side), interpolation=cv2.INTER_AREA)
        twelve = np.rint(grey.astype(np.float64) * 4095 / 255).astype(np.uint16)
        cv2.imwrite(str(p := folder / f"{i}.png"), grey)
        kinds["PNG 8-bit"].append(p)
        cv2.imwrite(str(p := folder / f"{i}-16.png"), twelve)
        kinds["PNG 16-bit"].append(p)
        p = folder / f"{i}.dcm"
        dicom_file(twelve, 12).save_as(p, enforce_file_format=True)
        kinds["DICOM 12-bit"].append(p)
        mono1 = dicom_file(4095 - twelve, 12, "MONOCHROME1", WindowCenter=2048, WindowWidth=4096)
        mono1.save_as(p := folder / f"{i}-mono1.dcm", enforce_file_format=True)
        kinds["DICOM MONO1+window"].append(p)
        for name, uid in (("DICOM RLE", RLELossless), ("DICOM J2K", JPEG2000Lossless)):
            if get_decoder(uid).is_available:
                ds = dicom_file(twelve, 12)
                ds.compress(uid, twelve)
                ds.save_as(p := folder / f"{i}-{name[6:]}.dcm", enforce_file_format=True)
                kinds[name].append(p)
    return {k: v for k, v in kinds.items() if v}


def rate(paths: list[Path], size: int, repeats: int, decode: Callable) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for p in paths:
            decode(p, size)
        best = min(best, time.perf_counter() - start)
    return len(paths) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path(DEFAULT_DATA))
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--side", type=int, default=1024)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    from chestxray.data.images import load_image

    with tempfile.TemporaryDirectory() as tmp:
        kinds = write_sets(args.data, Path(tmp), args.images, args.side)
        reference = {p.stem.split("-")[0]: load_image(p, args.size) for p in kinds["PNG 8-bit"]}
        print(f"CPU: {cpu_model()}; {args.images} images of {args.side} x {args.side} grey -> {args.size} px, 1 thread")
        print("| file | images/s | MB on disk | max difference from the 8-bit PNG (levels) |")
        print("|---|---:|---:|---:|")
        for name, paths in kinds.items():
            images_per_s = rate(paths, args.size, args.repeats, load_image)
            mb = sum(p.stat().st_size for p in paths) / 1e6
            worst = max(
                int(np.abs(load_image(p, args.size).astype(int) - reference[p.stem.split("-")[0]]).max()) for p in paths
            )
            print(f"| {name} | {images_per_s:,.0f} | {mb:.1f} | {worst} |")


if __name__ == "__main__":
    main()
