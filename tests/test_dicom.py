"""Hospital files: DICOM (made with pydicom from the dataset's images), 16-bit PNG and TIFF, through the one decode
path that training, label files, the store, the audit and predict.py share; and no patient data in any output."""

import csv
import json
import logging
import shutil
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

from chestxray import audit
from chestxray.data import dicom, images
from chestxray.data.images import BadImageError, ImageLimits, list_images, load_image, read_image
from chestxray.data.sources import load_labelled
from chestxray.data.store import DecodeSettings, decode_in_memory
from chestxray.inference.predict import predict
from tests.conftest import CLASSES, predict_config

SIDE = 48
DX_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
IDENTIFIERS = {
    "PatientName": "Doe^Jane",
    "PatientID": "PID837261",
    "PatientBirthDate": "19700101",
    "StudyDate": "20200315",
    "AccessionNumber": "ACC99123",
    "InstitutionName": "St Example Hospital",
}


@pytest.fixture(scope="module")
def grey(data_dir) -> np.ndarray:
    """A radiograph of the dataset (the real one where present), as 8-bit grey at SIDE x SIDE."""
    src = sorted((data_dir / "train" / "Covid").glob("*.*"))[0]
    image = cv2.imread(str(src), cv2.IMREAD_GRAYSCALE)
    return cv2.resize(image, (SIDE, SIDE), interpolation=cv2.INTER_AREA)


def stored(grey8: np.ndarray, bits: int) -> np.ndarray:
    """The 8-bit picture at `bits` bits (what a detector would store for it)."""
    return np.rint(grey8.astype(np.float64) * (2**bits - 1) / 255).astype(np.uint16)


def dataset(pixels: np.ndarray, bits: int = 12, photometric: str = "MONOCHROME2", **elements) -> Dataset:
    """A DX image of uncompressed pixels (uint16 or uint8, grey or RGB) with the given header elements."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DX_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = DX_CLASS, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ViewPosition = "DX", "PA"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    ds.PixelData = pixels.tobytes()
    for key, value in elements.items():
        setattr(ds, key, value)
    return ds


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def close(a: np.ndarray, b: np.ndarray, levels: int = 1) -> bool:
    return int(np.abs(a.astype(int) - b.astype(int)).max()) <= levels


def as_grey(path: Path, limits: ImageLimits = images.DEFAULT_LIMITS) -> np.ndarray:
    image = read_image(path, limits=limits)
    assert image.shape == (SIDE, SIDE, 3) and (image[..., 0] == image[..., 2]).all()
    return image[..., 0]


# --- pixels: a DICOM made from a picture gives that picture ----------------------------------------------------


@pytest.mark.parametrize("bits", [12, 16])
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_monochrome_at_12_and_16_bits_gives_the_source_pixels(grey, tmp_path, bits, photometric):
    values = stored(grey, bits)
    if photometric == "MONOCHROME1":  # high values dark
        values = (2**bits - 1) - values
    path = save(dataset(values, bits, photometric), tmp_path / "x.dcm")
    assert close(as_grey(path), grey)


def test_rescale_with_a_window_in_rescaled_units(grey, tmp_path):
    """Slope 2, intercept -1024, and a window over the whole rescaled range: only right if the rescale is applied
    before the window (ignoring it would put every stored value at the window's top)."""
    values = stored(grey, 12)
    low, high = -1024, 4095 * 2 - 1024
    window = {"WindowCenter": (low + high) / 2 + 0.5, "WindowWidth": high - low + 1}
    path = save(dataset(values, RescaleSlope=2, RescaleIntercept=-1024, RescaleType="US", **window), tmp_path / "r.dcm")
    assert close(as_grey(path), grey)


def test_a_narrow_window_is_applied(grey, tmp_path):
    values = stored(grey, 12)
    low, high = 1000, 3000  # DICOM linear window whose ends are exactly low and high
    path = save(dataset(values, WindowCenter=(low + high) / 2 + 0.5, WindowWidth=high - low + 1), tmp_path / "w.dcm")
    expected = np.clip(np.rint((values.astype(float) - low) / (high - low) * 255), 0, 255)
    image = as_grey(path)
    assert close(image, expected) and not close(image, grey, 10)


def test_a_voi_lut_sequence_is_applied(grey, tmp_path):
    values = stored(grey, 12)
    lut = np.rint(65535 * (np.arange(4096) / 4095) ** 0.5).astype(np.uint16)  # a square-root curve, 16-bit out
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new("LUTData", "OW", lut.tobytes())
    path = save(dataset(values, VOILUTSequence=[item]), tmp_path / "lut.dcm")
    expected = np.rint(lut[values].astype(float) * 255 / 65535)
    image = as_grey(path)
    assert close(image, expected) and not close(image, grey, 10)


def test_without_a_window_the_full_stored_range_is_used(grey, tmp_path):
    """A dark 12-bit image (values up to a quarter of 4095) stays dark: 4095 is white, not the image's maximum."""
    values = stored(grey, 12) // 4
    image = as_grey(save(dataset(values), tmp_path / "dark.dcm"))
    assert close(image, np.rint(values.astype(float) * 255 / 4095)) and image.max() < 80


def test_rgb_is_read_as_it_is(grey, tmp_path):
    rgb = np.stack([grey, 255 - grey, grey // 2], axis=2)
    image = read_image(save(dataset(rgb, 8, "RGB"), tmp_path / "rgb.dcm"))
    assert np.array_equal(image, rgb)


def rle(ds: Dataset) -> Dataset:
    ds.compress(RLELossless, ds.pixel_array)
    return ds


def jpeg_baseline(grey8: np.ndarray) -> Dataset:
    ok, jpeg = cv2.imencode(".jpg", grey8, [cv2.IMWRITE_JPEG_QUALITY, 98])
    ds = dataset(grey8, 8)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([jpeg.tobytes()])
    ds["PixelData"].VR = "OB"
    return ds


def j2k(ds: Dataset) -> Dataset:
    ds.compress(JPEG2000Lossless, ds.pixel_array)
    return ds


def test_rle_jpeg_and_jpeg2000_files_decode(grey, tmp_path):
    assert close(as_grey(save(rle(dataset(stored(grey, 12))), tmp_path / "rle.dcm")), grey)
    assert close(as_grey(save(jpeg_baseline(grey), tmp_path / "jpeg.dcm")), grey, 3)  # lossy at quality 98
    if not get_decoder(JPEG2000Lossless).is_available:
        pytest.skip("no JPEG 2000 decoder (pip install 'chestxray[dicom]')")
    assert close(as_grey(save(j2k(dataset(stored(grey, 12))), tmp_path / "j2k.dcm")), grey)


def test_a_missing_decoder_is_one_line_naming_the_file_syntax_and_extra(grey, tmp_path, monkeypatch):
    path = save(j2k(dataset(stored(grey, 12))), tmp_path / "j2k.dcm")
    monkeypatch.setattr(get_decoder(JPEG2000Lossless), "_available", {})
    with pytest.raises(BadImageError) as caught:
        read_image(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and "\n" not in message
    assert "JPEG 2000 Image Compression (Lossless Only)" in message and "pip install 'chestxray[dicom]'" in message


# --- refused, flagged --------------------------------------------------------------------------------------------


def test_a_ct_slice_is_refused_naming_the_modality(tmp_path):
    from pydicom.data import get_testdata_file

    path = tmp_path / "ct.dcm"
    shutil.copy(get_testdata_file("CT_small.dcm"), path)
    with pytest.raises(BadImageError, match=r"ct\.dcm: Modality CT is not a radiograph \(CR or DX expected\)"):
        read_image(path)


def test_a_multi_frame_file_is_refused(grey, tmp_path):
    frames = np.stack([stored(grey, 12)] * 2)
    ds = dataset(frames[0], NumberOfFrames=2)
    ds.PixelData = frames.tobytes()
    with pytest.raises(BadImageError, match=r"multi\.dcm: multi-frame file \(NumberOfFrames 2\)"):
        read_image(save(ds, tmp_path / "multi.dcm"))


def test_lateral_views_are_flagged_or_refused(grey, tmp_path):
    path = save(dataset(stored(grey, 12), ViewPosition="LL"), tmp_path / "lat.dcm")
    assert close(as_grey(path), grey) and images.image_tags(path) == images.ImageTags("DX", "LL")
    assert images.image_tags(path).lateral
    with pytest.raises(BadImageError, match=r"lat\.dcm: lateral view \(ViewPosition LL\) refused"):
        read_image(path, limits=ImageLimits(lateral="refuse"))


def test_size_limits_apply_from_rows_and_columns_before_decoding(grey, tmp_path, monkeypatch):
    path = save(dataset(stored(grey, 12)), tmp_path / "x.dcm")
    monkeypatch.setattr(dicom, "decode_pixels", lambda *a: pytest.fail("decoded before the size check"))
    with pytest.raises(BadImageError, match=r"48 x 48 = 2,304 pixels is above data.max_pixels=1,000"):
        read_image(path, limits=ImageLimits(max_pixels=1_000))
    with pytest.raises(BadImageError, match=r"smaller than data.min_image_side=64"):
        read_image(path, limits=ImageLimits(min_side=64))


def test_header_values_that_cannot_be_applied_are_one_line_that_quotes_no_value(grey, tmp_path, caplog):
    """Windows, LUTs and counts pydicom cannot apply (WindowWidth 0 is found in real files) are one line each, not
    a crash (a 500 in serve.py); the line names the element, never its value, and pydicom logs nothing."""
    pixels = stored(grey, 12)
    lut_without_data, lut_without_descriptor = Dataset(), Dataset()
    lut_without_data.ModalityLUTType = lut_without_descriptor.ModalityLUTType = "US"
    lut_without_descriptor.add_new(0x00283006, "US", [0] * 4096)  # LUTData: its VR named, as no descriptor tells
    lut_without_data.LUTDescriptor = [4096, 0, 16]
    cases = {
        "width0": dict(WindowCenter=100, WindowWidth=0),
        "negative": dict(WindowCenter=100, WindowWidth=-5),
        "sigmoid0": dict(WindowCenter=100, WindowWidth=0, VOILUTFunction="SIGMOID"),
        "function": dict(WindowCenter=100, WindowWidth=50, VOILUTFunction="Doe^Jane"),
        "lut1": dict(ModalityLUTSequence=[lut_without_data]),
        "lut2": dict(ModalityLUTSequence=[lut_without_descriptor]),
    }
    with caplog.at_level(logging.DEBUG):
        for name, elements in cases.items():
            with pytest.raises(BadImageError, match=rf"{name}\.dcm: its grey levels cannot be computed") as caught:
                read_image(save(dataset(pixels, **elements), tmp_path / f"{name}.dcm"))
            assert "Doe" not in str(caught.value) and "\n" not in str(caught.value)
        data = save(dataset(pixels, NumberOfFrames="1"), tmp_path / "frames.dcm").read_bytes()
        (tmp_path / "frames.dcm").write_bytes(data.replace(b"IS\x02\x001 ", b"IS\x06\x00Doe^J "))
        with pytest.raises(BadImageError, match=r"frames\.dcm: image pixel module incomplete: NumberOfFrames is not"):
            read_image(tmp_path / "frames.dcm")
    assert not [r for r in caplog.records if "Doe" in r.getMessage() or r.name.startswith("pydicom")]


def test_a_compressed_frame_larger_than_rows_and_columns_is_refused_before_decoding(grey, tmp_path, monkeypatch):
    """max_pixels is checked against Rows x Columns, but the decoder allocates what the frame's own header says: a
    48 x 48 header around a 2000 x 2000 JPEG (a 20000 x 20000 one took 1.9 GB in serve.py) is refused unread, and
    the frame's own size is read for JPEG, JPEG-LS and JPEG 2000 alike."""
    from chestxray.data import codestreams

    ok, jpeg = cv2.imencode(".jpg", np.full((2000, 2000), 100, np.uint8))
    ds = dataset(grey.astype(np.uint8), 8)  # SIDE x SIDE (48)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([jpeg.tobytes()])
    ds["PixelData"].VR = "OB"
    path = save(ds, tmp_path / "lying.dcm")
    monkeypatch.setattr(dicom, "decode_pixels", lambda *a: pytest.fail("decoded a frame larger than declared"))
    with pytest.raises(BadImageError, match=r"lying\.dcm: compressed frame of 2000 x 2000 pixels in a header of "
                       r"Columns 48 x Rows 48 \(refused before decoding"):  # fmt: skip
        read_image(path)
    assert codestreams.jpeg_size(jpeg.tobytes()) == (2000, 2000)
    for wrapped in (False, True):  # a bare codestream (as DICOM holds it), and one in a JP2 file's boxes
        buffer = __import__("io").BytesIO()
        Image.fromarray(np.zeros((30, 50), np.uint8)).save(buffer, "JPEG2000", no_jp2=not wrapped)
        assert codestreams.j2k_size(buffer.getvalue()) == (50, 30)
    jp2 = buffer.getvalue()  # a 5 kB box before the codestream: found by walking the boxes, not by a search
    after_ftyp = 12 + struct.unpack(">I", jp2[12:16])[0]
    xml = b"<x>" + b"a" * 5000 + b"</x>"
    padded = jp2[:after_ftyp] + struct.pack(">I4s", 8 + len(xml), b"xml ") + xml + jp2[after_ftyp:]
    assert codestreams.j2k_size(padded) == (50, 30) == Image.open(__import__("io").BytesIO(padded)).size


def test_truncated_pixel_data_is_one_error(grey, tmp_path):
    data = save(dataset(stored(grey, 12)), tmp_path / "x.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 1000])
    with pytest.raises(BadImageError, match=r"cut\.dcm: "):
        read_image(tmp_path / "cut.dcm")


# --- listing: extension-less DICOM, cheaply ----------------------------------------------------------------------


def test_listing_finds_extensionless_dicom_and_opens_only_candidates(grey, tmp_path, monkeypatch):
    save(dataset(stored(grey, 12)), tmp_path / "IM0001")
    save(dataset(stored(grey, 12)), tmp_path / "1.2.840.1234")  # named by its UID
    (tmp_path / "README").write_text("not an image")
    for k in range(5):
        cv2.imwrite(str(tmp_path / f"{k}.png"), grey)
    (tmp_path / "notes.txt").write_text("x")
    opened = []
    real = dicom.sniff
    monkeypatch.setattr(dicom, "sniff", lambda p: opened.append(p.name) or real(p))
    names = {p.name for p in list_images(tmp_path)}
    assert names == {"IM0001", "1.2.840.1234", *(f"{k}.png" for k in range(5))}
    assert sorted(opened) == ["1.2.840.1234", "IM0001", "README"]  # never the .png or .txt files
    assert close(as_grey(tmp_path / "IM0001"), grey)


# --- 16-bit PNG and TIFF ---------------------------------------------------------------------------------------


def with_sbit(png: bytes, bits: int | tuple[int, ...]) -> bytes:
    """A PNG with an sBIT chunk (significant bits, one per channel) inserted after IHDR."""
    body = bytes([bits] if isinstance(bits, int) else bits)
    chunk = b"sBIT" + body
    end_of_ihdr = 8 + 8 + 13 + 4
    head = struct.pack(">I", len(body))
    return png[:end_of_ihdr] + head + chunk + struct.pack(">I", zlib.crc32(chunk)) + png[end_of_ihdr:]


def png16(values: np.ndarray, sbit: int | tuple[int, ...] | None = None) -> bytes:
    png = cv2.imencode(".png", values)[1].tobytes()
    return with_sbit(png, sbit) if sbit else png


def test_a_12_bit_png_in_16_bits_looks_like_its_8_bit_version(grey, tmp_path):
    values = stored(grey, 12)
    for name, data in {"plain.png": png16(values), "sbit.png": png16(values, 12)}.items():
        (tmp_path / name).write_bytes(data)
        assert close(as_grey(tmp_path / name), grey), name  # not nearly black (255/65535 would give <= 16)


def test_sbit_is_used_where_declared(grey, tmp_path):
    """A dark 12-bit image: with sBIT 12 it is scaled by 4095 (stays dark); without, by the 12 bits of the smallest
    detector depth that holds it (not the 11 its greatest value needs); a PNG scaled to 16 bits as the PNG
    specification says (values above its sBIT) by 65535."""
    dark = stored(grey, 12) // 3
    (tmp_path / "sbit.png").write_bytes(png16(dark, 12))
    (tmp_path / "plain.png").write_bytes(png16(dark))
    (tmp_path / "spec.png").write_bytes(png16(grey.astype(np.uint16) * 257, 8))
    assert close(as_grey(tmp_path / "sbit.png"), np.rint(dark.astype(float) * 255 / 4095))
    assert int(dark.max()).bit_length() == 11 and close(as_grey(tmp_path / "plain.png"), as_grey(tmp_path / "sbit.png"))
    assert close(as_grey(tmp_path / "spec.png"), grey)


def test_brightness_does_not_hang_on_the_brightest_pixel(grey, tmp_path):
    """Without sBIT, an unscaled image whose brightest pixel is 2047 and the same with one pixel at 2048 decode
    alike (both 12 bits, the detector depth that holds them), not at twice the brightness of the other."""
    dark = np.rint(grey.astype(float) * 2047 / 255).astype(np.uint16)
    one_more = dark.copy()
    one_more[0, 0] = 2048
    (tmp_path / "2047.png").write_bytes(png16(dark))
    (tmp_path / "2048.png").write_bytes(png16(one_more))
    a, b = as_grey(tmp_path / "2047.png"), as_grey(tmp_path / "2048.png")
    assert close(a[1:, 1:], b[1:, 1:]) and close(a, np.rint(dark.astype(float) * 255 / 4095))


def test_a_dark_png_scaled_as_the_spec_says_stays_dark(grey, tmp_path):
    """A dark 12-bit image scaled to 16 bits as the PNG specification says (left shift, the top bits replicated into
    the low ones, here all 0) with its sBIT 12 is full-range: decoded by 65535, not 16x too bright by 4095. The
    source's 12 bits are the audit's bit depth."""
    source = stored(grey, 12) // 16  # values below 256 of 4095
    scaled = images.replicate(source, 12).astype(np.uint16)
    assert int(scaled.max()) <= 4095 and not (scaled % 16).any()  # within sBIT 12, and low bits all 0
    (tmp_path / "spec.png").write_bytes(png16(scaled, 12))
    got = as_grey(tmp_path / "spec.png")
    assert close(got, np.rint(source.astype(float) * 255 / 4095)) and got.mean() < 20
    assert images.decode((tmp_path / "spec.png").read_bytes(), "spec.png").bits == 12


def test_the_replication_is_read_from_the_low_bits_without_sbit(grey, tmp_path):
    """Without sBIT, a 12-bit image scaled as the specification says is recognised by the top bits repeated in its
    low bits (full-range, 12 bits); unscaled samples show no replication."""
    source = stored(grey, 12)
    linear = np.rint(source * (65535 / 4095)).astype(np.uint16)  # the specification's other method
    for name, values in {"spec.png": images.replicate(source, 12).astype(np.uint16), "linear.png": linear}.items():
        (tmp_path / name).write_bytes(png16(values))
        decoded = images.decode((tmp_path / name).read_bytes(), name)
        assert decoded.bits == 12 and close(as_grey(tmp_path / name), np.rint(source.astype(float) * 255 / 4095))
    assert images.replicated_bits(grey.astype(np.uint16) * 257) == 8
    assert images.replicated_bits(source) is None  # unscaled samples: no replication


@pytest.mark.parametrize("greatest", [255, 299])
def test_a_dark_png_scaled_linearly_with_sbit_stays_dark(grey, tmp_path, greatest):
    """The specification's linear map, v * 65535 / 4095 rounded, of a dark 12-bit source, with sBIT 12: full-range,
    whether its greatest sample stays below 4096 or not (above it, the pixels exceed the declared 12 bits)."""
    source = np.rint(grey.astype(float) * greatest / 255).astype(np.uint16)
    (tmp_path / "linear.png").write_bytes(png16(np.rint(source * (65535 / 4095)).astype(np.uint16), 12))
    got = as_grey(tmp_path / "linear.png")
    assert close(got, np.rint(source.astype(float) * 255 / 4095)) and got.mean() < 25


def test_one_stray_pixel_does_not_change_the_brightness(grey, tmp_path):
    """Every rule reads most of the pixels: a dark image scaled as the specification says keeps its reading with one
    pixel that shows a replication (without sBIT: read as unscaled both ways) or one that fits no scaling (with
    sBIT 12: full-range both ways), and an unscaled 12-bit image keeps its 12 bits with a hot pixel at 65535."""
    dark = images.replicate(stored(grey, 12) // 16, 12).astype(np.uint16)  # low bits all 0
    shows = dark.copy()
    shows[0, 0] = 4097  # the replication of 256
    stray = dark.copy()
    stray[0, 0] = 4095  # no 12-bit value scales to it
    hot = stored(grey, 12)
    hot[0, 0] = 65535
    files = {"plain": png16(dark), "shows": png16(shows), "sbit": png16(dark, 12), "stray": png16(stray, 12)}
    files["hot"] = png16(hot)
    got = {}
    for name, data in files.items():
        (tmp_path / f"{name}.png").write_bytes(data)
        got[name] = as_grey(tmp_path / f"{name}.png")[1:, 1:]
    assert close(got["plain"], got["shows"]) and close(got["sbit"], got["stray"])
    assert got["sbit"].mean() < 20 and got["plain"].mean() > 16 * got["sbit"].mean() * 0.9
    assert close(got["hot"], grey[1:, 1:])


@pytest.mark.parametrize("sbit", [17, 32, 255])
def test_an_invalid_sbit_is_ignored(grey, tmp_path, sbit):
    """A depth above 16 in sBIT is no depth (libpng ignores such a chunk): an unscaled 12-bit image is read as it would
    be without the chunk, not nearly black."""
    (tmp_path / "bad.png").write_bytes(png16(stored(grey, 12), sbit))
    assert close(as_grey(tmp_path / "bad.png"), grey)


def test_an_alpha_channels_sbit_is_not_the_colours_depth(grey, tmp_path):
    """sBIT (12, 12, 12, 16) of an RGBA PNG with unscaled 12-bit colour: the colour is 12-bit (alpha's 16 is
    alpha's own), so it is as bright as its 8-bit picture, not 16x darker."""
    colour = stored(grey, 12)
    rgba = np.dstack([colour, colour, colour, np.full_like(colour, 65535)])
    (tmp_path / "rgba.png").write_bytes(png16(rgba, (12, 12, 12, 16)))
    assert close(as_grey(tmp_path / "rgba.png"), grey)


def test_a_replication_of_zeros_is_no_evidence(grey, tmp_path):
    """Samples whose low bits are all 0 look replicated at any depth whose replicated bits are 0: an unscaled 12-bit
    image whose values are all even (15 bits, replicating a 0 top bit), or 8-bit values times 16. Without sBIT such
    an image is read by its detector depth, so one odd pixel does not make it 16x brighter, and 8-bit values times
    16 are as bright as the same picture at 12 bits (by 4095), not 16x darker (by 65535)."""
    even = stored(grey, 12) // 2 * 2
    odd = even.copy()
    odd[0, 0] += 1
    times16 = grey.astype(np.uint16) * 16
    for name, values in {"even.png": even, "odd.png": odd, "times16.png": times16}.items():
        (tmp_path / name).write_bytes(png16(values))
        assert images.replicated_bits(values) is None, name
    a, b = as_grey(tmp_path / "even.png"), as_grey(tmp_path / "odd.png")
    assert close(a[1:, 1:], b[1:, 1:]) and close(a, grey)
    assert close(as_grey(tmp_path / "times16.png"), grey)


def test_tiff_8_and_16_bit_grey(grey, tmp_path):
    Image.fromarray(grey).save(tmp_path / "g8.tif")
    Image.fromarray(stored(grey, 12)).save(tmp_path / "g12.tif")
    Image.fromarray(stored(grey, 12) // 3).save(tmp_path / "max.tiff", tiffinfo={281: 4095})  # MaxSampleValue
    assert np.array_equal(as_grey(tmp_path / "g8.tif"), grey)
    assert close(as_grey(tmp_path / "g12.tif"), grey)
    assert close(as_grey(tmp_path / "max.tiff"), np.rint((stored(grey, 12) // 3).astype(float) * 255 / 4095))


# --- every reader: label files, the store, the audit ---------------------------------------------------------------


@pytest.fixture
def dicom_set(grey, tmp_path) -> Path:
    """Class folders of DICOM files (one extension-less) made from the dataset's picture, and its PNG."""
    root = tmp_path / "set"
    for k, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True)
        picture = np.roll(grey, 5 * k, axis=1)
        cv2.imwrite(str(folder / "a.png"), picture)
        mono1 = k > 0  # high values dark: stored inverted
        values = 4095 - stored(picture, 12) if mono1 else stored(picture, 12)
        save(dataset(values, 12, "MONOCHROME1" if mono1 else "MONOCHROME2"), folder / "b.dcm")
        save(dataset(stored(picture, 16), 16), folder / "c")
    return root


def test_label_files_and_the_store_decode_dicom_as_the_png(dicom_set, tmp_path):
    rows = ["path,label"] + [f"{name}/{f},{name}" for name in CLASSES for f in ("a.png", "b.dcm", "c")]
    (dicom_set / "labels.csv").write_text("\n".join(rows) + "\n")
    files = load_labelled(dicom_set / "labels.csv", CLASSES, "eval_sets.x")
    assert len(files) == 9 and files.paths == load_labelled(dicom_set, CLASSES, "eval_sets.x").paths
    decoded = decode_in_memory(files.paths, DecodeSettings(32), workers=1)
    views = {p.name: [] for p in files.paths}
    for i, path in enumerate(decoded.paths):
        views[path.name].append(decoded.images[i])
    assert len(decoded.paths) == 9
    for a, b, c in zip(views["a.png"], views["b.dcm"], views["c"], strict=True):
        assert close(a, b) and close(a, c)


def test_the_audit_reads_dicom(dicom_set, tmp_path, capsys):
    assert audit.main([str(dicom_set), "--out", str(tmp_path / "audit")]) == 0
    report = json.loads((tmp_path / "audit" / "audit.json").read_text())
    normal = report["per_split_class"]["all"]["Normal"]
    assert normal["unreadable"] == 0 and normal["formats"] == {"PNG": 1, "DICOM DX": 2}
    assert normal["bit_depths"] == {"8": 1, "12": 1, "16": 1}


# --- patients: an opaque key, and no identifier in any output ---------------------------------------------------


def test_patient_key_is_a_salted_hash_never_the_id(grey, tmp_path):
    one = save(dataset(stored(grey, 12), PatientID="PID837261"), tmp_path / "one.dcm")
    two = save(dataset(stored(grey, 12), PatientID="PID837261"), tmp_path / "two")
    other = save(dataset(stored(grey, 12), PatientID="PID000001"), tmp_path / "other.dcm")
    nobody = save(dataset(stored(grey, 12)), tmp_path / "nobody.dcm")
    cv2.imwrite(str(tmp_path / "x.png"), grey)
    key = dicom.patient_key(one)
    assert key == dicom.patient_key(two) != dicom.patient_key(other)
    assert len(key) == 64 and "837261" not in key and key != __import__("hashlib").sha256(b"PID837261").hexdigest()
    assert dicom.patient_key(one, salt=b"site secret") != key
    assert dicom.patient_key(nobody) is None and dicom.patient_key(tmp_path / "x.png") is None


def test_a_dicom_file_is_dicom_by_its_content_whatever_its_name(grey, tmp_path):
    """A DICOM file named .png is decoded as DICOM (by the 'DICM' magic): it gets its patient key and its header's
    tags by the same rule, so its patient is grouped like any other DICOM file's."""
    named_png = save(dataset(stored(grey, 12), PatientID="PID837261"), tmp_path / "scan.png")
    same = save(dataset(stored(grey, 12), PatientID="PID837261"), tmp_path / "scan.dcm")
    assert images.decode(named_png.read_bytes(), named_png).header.dicom is not None
    assert dicom.patient_key(named_png) == dicom.patient_key(same) is not None
    assert dicom.read_tags(named_png) == dicom.read_tags(same) == ("DX", "PA")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The 0.3.0 checkpoint of tests/compat.py (32 px VGG19, seeded weights): predictions without a training run."""
    from tests.compat import fill_checkpoint

    skeleton = json.loads((Path(__file__).parent / "fixtures" / "checkpoint-0.3.0.json").read_text())
    path = tmp_path_factory.mktemp("ckpt") / "best.ckpt"
    torch.save(fill_checkpoint(skeleton), path)
    return path


def test_predict_on_a_mixed_folder_one_row_each_same_answers_no_identifiers(grey, checkpoint, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    cv2.imwrite(str(folder / "source.png"), grey)
    cv2.imwrite(str(folder / "source.jpg"), grey, [cv2.IMWRITE_JPEG_QUALITY, 100])
    Image.fromarray(stored(grey, 12)).save(folder / "source.tif")
    save(dataset(stored(grey, 12), 12, **IDENTIFIERS), folder / "mono2.dcm")
    save(dataset(4095 - stored(grey, 12), 12, "MONOCHROME1", **IDENTIFIERS), folder / "IM0001")
    save(rle(dataset(stored(grey, 16), 16, **IDENTIFIERS)), folder / "rle.dicom")
    save(dataset(stored(grey, 12), ViewPosition="LL", **IDENTIFIERS), folder / "lateral.dcm")
    ct = dataset(stored(grey, 12), Modality="CT", **IDENTIFIERS)
    save(ct, folder / "ct.dcm")
    out = tmp_path / "out"
    summary = predict(predict_config(out, checkpoint, folder, "gradcam=true"))
    printed = capsys.readouterr().out
    with open(out / "predictions.csv", newline="") as fh:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(fh)}
    assert set(rows) == {p.name for p in folder.iterdir()} and summary["predicted"] == 7
    assert rows["ct.dcm"]["error"].startswith("Modality CT is not a radiograph") and rows["ct.dcm"]["modality"] == "CT"
    assert (rows["mono2.dcm"]["modality"], rows["mono2.dcm"]["view"]) == ("DX", "PA")
    assert (rows["source.png"]["modality"], rows["source.png"]["view"]) == ("", "")
    assert rows["lateral.dcm"]["view"] == "LL"
    lines = {line.split(":")[0]: line for line in printed.splitlines() if line.startswith(str(folder))}
    assert "lateral view" in lines[str(folder / "lateral.dcm")] and "lateral" not in lines[str(folder / "mono2.dcm")]
    reference = np.array([float(rows["source.png"][f"prob_{c}"]) for c in CLASSES])
    for name in ("source.tif", "mono2.dcm", "IM0001", "rle.dicom", "lateral.dcm"):
        probs = np.array([float(rows[name][f"prob_{c}"]) for c in CLASSES])
        assert np.abs(probs - reference).max() < 0.01, name
    pixels = load_image(folder / "source.png", 32)
    for name in ("mono2.dcm", "IM0001", "rle.dicom"):
        assert close(load_image(folder / name, 32), pixels), name
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".png" for p in written) and (out / "predictions.csv") in written
    for value in IDENTIFIERS.values():
        for needle in {value, value.split("^")[0], value[3:]}:
            for path in written:
                assert needle.encode() not in path.read_bytes() and needle not in str(path), (needle, path)
            assert needle not in printed


def test_nothing_but_the_listed_header_fields_is_parsed(grey, tmp_path):
    path = save(dataset(stored(grey, 12), **IDENTIFIERS), tmp_path / "x.dcm")
    ds = dicom.read_dataset(path.read_bytes())
    names = {element.keyword for element in ds}
    assert names <= set(dicom.READ_TAGS) and "PatientName" not in names and "PatientID" not in names


def test_the_lateral_setting_is_checked_and_keys_the_store(checkpoint, tmp_path):
    from chestxray import settings
    from chestxray.errors import ConfigError

    cfg = predict_config(tmp_path / "out", checkpoint, tmp_path, "data.lateral=maybe")
    with pytest.raises(ConfigError, match=r"data.lateral=maybe: must be one of flag, refuse"):
        settings.check(cfg, settings.PREDICT_RULES)
    refusing = predict_config(tmp_path / "out", checkpoint, tmp_path, "data.lateral=refuse")
    settings.check(refusing, settings.PREDICT_RULES)
    flag, refuse = DecodeSettings(32).key(), DecodeSettings(32, ImageLimits(lateral="refuse")).key()
    assert flag != refuse and flag.startswith(f"v{images.DECODE_VERSION}-") and images.DECODE_VERSION >= 3


def test_a_dicom_patients_images_stay_on_one_side_and_their_id_is_never_kept(grey, tmp_path):
    """Train DICOM files of 12 patients, 3 images each, in class folders: every patient's images fall on one side of
    the hold-out and of each fold; the split keeps only opaque keys (the IDs are nowhere in the data module)."""
    from chestxray.data.datamodule import ChestXrayDataModule

    root = tmp_path / "data"
    for split, patients in (("train", 12), ("test", 2)):
        for k, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for p in range(patients):
                for shot in range(3):
                    picture = np.roll(grey, 7 * shot + 3 * p + 40 * k, axis=0)
                    pid = f"PID-{split}-{name[:3]}-{p:02d}"
                    save(dataset(stored(picture, 12), 12, PatientID=pid), folder / f"{p:02d}_{shot}.dcm")
    for kwargs in ({"val_fraction": 0.25}, {"fold": 0}, {"fold": 2}):
        dm = ChestXrayDataModule(str(root), image_size=32, download=False, check_leakage=False, **kwargs)
        dm.setup()
        fit = {p.name[:2] + p.parent.name for p in dm.datasets["train"].paths}
        val = {p.name[:2] + p.parent.name for p in dm.datasets["val"].paths}
        assert fit and val and not fit & val, kwargs
        assert dm.split_groups["val"]["images"] == 3 * dm.split_groups["val"]["groups"]
    assert "PID-" not in repr(vars(dm))


def test_a_patient_in_train_and_test_is_leakage_for_the_audit_and_the_leak_free_numbers(grey, tmp_path, capsys):
    """A patient with a train image and a test image (different pictures, so no duplicate finds them) is reported by
    the audit and left out of the leak-free numbers (the test set's leaking mask), the patient never named."""
    from chestxray.data.datamodule import ChestXrayDataModule

    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 1)):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for k in range(n):
                cv2.imwrite(str(root / split / name / f"{k}.png"), rng.integers(0, 256, (SIDE, SIDE), np.uint8))
    save(dataset(stored(grey, 12), **IDENTIFIERS), root / "train" / "Covid" / "seen.dcm")
    save(dataset(stored(np.flipud(grey.T), 12), **IDENTIFIERS), root / "test" / "Covid" / "again.png")  # DICOM
    save(dataset(stored(255 - grey, 12), PatientID="PID000001"), root / "test" / "Normal" / "new.dcm")
    assert audit.main([str(root), "--out", str(tmp_path / "audit")]) == 0
    report = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert report["summary"]["patients_train_test"] == 1
    assert report["patients_train_test"] == [{"files": ["test/Covid/again.png", "train/Covid/seen.dcm"]}]
    assert "leak (same patient): test/Covid/again.png, train/Covid/seen.dcm" in capsys.readouterr().out
    written = (tmp_path / "audit" / "audit.json").read_text() + (tmp_path / "audit" / "audit.md").read_text()
    assert IDENTIFIERS["PatientID"] not in written and dicom.patient_key(root / "train/Covid/seen.dcm") not in written
    dm = ChestXrayDataModule(str(root), image_size=32, val_fraction=0.5, check_leakage=False, download=False)
    with pytest.warns(UserWarning, match=r"test: 1 of its 5 images are of 1 patient\(s\) who also have train images"):
        dm.setup()
    test = dm.test_sets["test"]
    assert {p.name for p, k in zip(test.paths, test.leaking.tolist(), strict=True) if k} == {"again.png"}


def _deflated_parts() -> tuple[bytes, bytes]:
    """A deflated DICOM split into its preamble and meta header, and its deflated dataset stream."""
    import io

    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = dataset(np.zeros((300, 300), np.uint16))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    fp = io.BytesIO(data)
    read_preamble(fp, False)
    _read_file_meta_info(fp)
    return data[: fp.tell()], data[fp.tell() :]


@pytest.mark.timeout(20)
def test_the_inflate_check_ends_on_a_padded_or_truncated_stream():
    """Bytes after the end of the deflated stream (the even-length pad byte) stay in zlib's unconsumed tail: the
    check once waited for that tail to empty, for ever, which stalled CI. A truncated stream ends too."""
    head, stream = _deflated_parts()
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    raw = compressor.compress(bytes(3_000_000)) + compressor.flush()  # more than one 1 MB step
    for tail in (raw + b"\0", raw + b"\0\0\0", stream, stream + b"\0", raw[: len(raw) // 2]):
        dicom._check_inflated_size(head + tail, limit=10_000_000)  # returns: within the limit
    with pytest.raises(dicom.DicomError, match="inflates beyond"):
        dicom._check_inflated_size(head + raw + b"\0", limit=1000)


def test_a_deflated_dataset_that_declares_few_pixels_but_inflates_to_more_is_refused_while_inflating():
    """The declared Rows x Columns refuse a bomb at once; a file that declares 300 x 300 but carries 8 MB of pixel
    data is caught by the inflate limit instead, and one within both limits reads."""
    head, _ = _deflated_parts()
    small = dataset(np.zeros((300, 300), np.uint16))
    small.PixelData = bytes(8_000_000)  # the header lies about the pixel data's size
    buffer = __import__("io").BytesIO()
    small.save_as(buffer, implicit_vr=False, little_endian=True)  # the dataset only, explicit VR little endian
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = compressor.compress(buffer.getvalue()) + compressor.flush()
    assert dicom._declared_pixels(zlib.decompress(stream, -zlib.MAX_WBITS)[: 1 << 20]) == 90_000
    with pytest.raises(dicom.DicomError, match="inflates beyond"):
        dicom.read_dataset(head + stream, max_pixels=1_000_000)  # 6 MB + 1 MB may inflate: 8 MB is beyond
    with pytest.raises(dicom.DicomError, match="declares 90,000 pixels, above serve.max_pixels=50,000"):
        dicom.read_dataset(head + stream, max_pixels=50_000, setting="serve.max_pixels")
    assert dicom.read_dataset(head + stream, max_pixels=2_000_000).Rows == 300
