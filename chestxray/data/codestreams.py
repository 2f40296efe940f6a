"""What a compressed image's own header declares, read before any pixel is decoded.

A decoder allocates what the codestream's header says and works as long as its scans ask, whatever the container
around it says: a DICOM file may declare Rows and Columns of 64 around a 20000 x 20000 JPEG frame (pydicom hands the
frame to Pillow or pylibjpeg, which decode all 400 megapixels before the size mismatch shows), and a progressive
JPEG of a few MB may repeat a tiny scan 100,000 times (each scan is a pass over every block: minutes of CPU for one
file). So: the frame's own size (JPEG and JPEG-LS SOF, JPEG 2000 SIZ) is compared with the container's before
decoding, and a JPEG's scans are counted. Written here because neither OpenCV nor pydicom checks either before
decoding (pydicom's SOF reader is private); libjpeg-turbo's TurboJPEG API has a scan limit, but OpenCV does not
expose it.
"""

from __future__ import annotations

import struct

# libjpeg-turbo's advice for its scan limit (TJPARAM_SCANLIMIT, djpeg -maxscans): a few hundred. Ordinary progressive
# files have about 10; at 500, a 25-megapixel file of tiny scans decodes in about a second.
MAX_JPEG_SCANS = 500
_SOS = b"\xff\xda"
# start-of-frame markers: SOF0-SOF15 but DHT (C4), JPG (C8) and DAC (CC); SOF55 is JPEG-LS's
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}


def jpeg_scans(src: bytes) -> int:
    """How many scans (SOS markers) a JPEG holds. Inside entropy-coded data a 0xFF byte is always followed by 0x00
    or a restart marker, so every FF DA is a marker (an embedded EXIF thumbnail's included: a count a little high
    is harmless against the limit)."""
    return src.count(_SOS)


def jpeg_size(src: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG or JPEG-LS codestream's start-of-frame segment; None if there is none before the
    first scan, or the segments cannot be walked."""
    if src[:2] != b"\xff\xd8":
        return None
    at = 2
    while at + 9 <= len(src):
        if src[at] != 0xFF:
            return None
        marker = src[at + 1]
        if marker == 0xFF:  # a fill byte before a marker
            at += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            at += 2
            continue
        if marker in _SOF:  # length (2), precision (1), height (2), width (2)
            height, width = struct.unpack(">HH", src[at + 5 : at + 9])
            return width, height
        if marker == 0xDA:
            return None
        at += 2 + struct.unpack(">H", src[at + 2 : at + 4])[0]
    return None


def j2k_size(src: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG 2000 codestream's SIZ segment (image size less its offset). A codestream wrapped
    in a JP2 file (which DICOM does not allow, but some writers add) is found in its 'jp2c' box."""
    if src[4:8] == b"jP  ":  # a JP2 file: boxes of (length, type), the codestream in 'jp2c'
        at = 0
        while at + 8 <= len(src):
            length, kind = struct.unpack(">I4s", src[at : at + 8])
            header = 8
            if length == 1:  # the length in the next 8 bytes
                length, header = struct.unpack(">Q", src[at + 8 : at + 16])[0], 16
            if kind == b"jp2c":
                return j2k_size(src[at + header : at + length if length else len(src)])
            if length < header:  # 0 (to the end) before the codestream, or a broken box
                return None
            at += length
        return None
    if src[:4] != b"\xff\x4f\xff\x51" or len(src) < 24:
        return None
    # FF4F FF51, then Lsiz (2), Rsiz (2), Xsiz, Ysiz, XOsiz, YOsiz (4 each)
    x, y, x_offset, y_offset = struct.unpack(">IIII", src[8:24])
    return max(x - x_offset, 0), max(y - y_offset, 0)
