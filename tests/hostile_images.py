"""The function's hostile-request corpus (issue 13): bodies generated here, never committed binaries.

:func:`bad_requests` maps a case name to ``(request body, a word the 400 message must contain)``. The tests
(``tests/test_serverless.py``) send every case through the Nuclio handler and check the 400, the message and
that the worker still serves; ``benchmarks/hostile.py`` sends each in a fresh worker process and records the
peak memory. Images that only *declare* a huge size (patched headers) are never decoded in full: the function
must refuse them from the header.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib
from typing import Any

import numpy as np
from PIL import Image

from serverless.model_handler import MAX_PIXELS, MIN_SIDE


def small_slide(width: int = 256, height: int = 192, seed: int = 0, discs: int = 6) -> np.ndarray:
    """A small slide-like RGB image (pink background, ``discs`` purple discs placed by ``seed``): what the hostile
    cases derive from, and the predictor tests' frame."""
    import cv2

    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), (225, 205, 215), np.uint8)
    for _ in range(discs):
        centre = (int(rng.integers(30, width - 30)), int(rng.integers(30, height - 30)))
        cv2.circle(img, centre, int(rng.integers(12, 30)), (120, 60, 150), -1)
    return img


def encode(img: np.ndarray | Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(buf, fmt, **kw)
    return buf.getvalue()


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int, bit_depth: int = 8, colour_type: int = 2) -> bytes:
    """A PNG that declares width x height (RGB 8-bit unless told) but holds almost no data (never decoded)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + chunk(b"IEND", b""))


def jpeg_declaring(jpeg: bytes, width: int, height: int) -> bytes:
    """The test JPEG with its SOF header patched to declare width x height."""
    data = bytearray(jpeg)
    i = 2
    while i < len(data):
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5:i + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        i += 2 + length
    raise AssertionError("no SOF marker")


def float_tiff_declaring(width: int, height: int) -> bytes:
    """A 32-bit float TIFF (64x64 pixels) whose header is patched to declare width x height."""
    data = bytearray(encode(Image.new("F", (64, 64), 0.5), "TIFF"))
    endian = "<" if data[:2] == b"II" else ">"
    ifd = struct.unpack(endian + "I", data[4:8])[0]
    for k in range(struct.unpack(endian + "H", data[ifd:ifd + 2])[0]):
        entry = ifd + 2 + 12 * k
        tag, kind = struct.unpack(endian + "HH", data[entry:entry + 4])
        if tag in (256, 257):  # ImageWidth, ImageLength
            value = width if tag == 256 else height
            data[entry + 8:entry + 12] = (struct.pack(endian + "HH", value, 0) if kind == 3
                                          else struct.pack(endian + "I", value))
    return bytes(data)


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def bad_requests(jpeg: bytes, slide: np.ndarray) -> dict[str, tuple[Any, str]]:
    """name -> (body, a word the error message must contain)."""
    big = int((MAX_PIXELS * 1.1) ** 0.5)
    under = int((MAX_PIXELS * 0.99) ** 0.5)
    tiny = np.full((1, 1, 3), 200, np.uint8)
    small = np.full((MIN_SIDE - 1, 64, 3), 200, np.uint8)
    return {
        "no body": (None, "empty"),
        "empty bytes": (b"", "empty"),
        "blank str": ("  ", "empty"),
        "non-JSON bytes": (b"\xff\xd8\xff\xe0 definitely not json", "JSON"),
        "broken JSON": (b'{"image": "abc"', "JSON"),
        "JSON list": (b'[{"image": "abc"}]', "object"),
        "JSON without image": (b'{"threshold": 0.5}', "image"),
        "image is a number": ({"image": 123}, "string"),
        "image is null": ({"image": None}, "string"),
        "image is a list": ({"image": ["abc"]}, "string"),
        "image not base64": ({"image": "this is not base64!"}, "base64"),
        "image empty": ({"image": ""}, "empty"),
        "base64 of text": ({"image": b64(b"hello, I am not an image")}, "image"),
        "truncated JPEG": ({"image": b64(jpeg[: len(jpeg) * 6 // 10])}, "truncated"),
        "JPEG without EOI": ({"image": b64(jpeg[:-2])}, "truncated"),
        "truncated PNG": ({"image": b64(half(encode(slide, "PNG")))}, "truncated"),
        "zero-size PNG": ({"image": b64(png_header(0, 0))}, "image"),
        "1x1 PNG": ({"image": b64(encode(tiny, "PNG"))}, str(MIN_SIDE)),
        "too small JPEG": ({"image": b64(encode(small, "JPEG"))}, str(MIN_SIDE)),
        "bomb PNG (PIL limit)": ({"image": b64(png_header(30000, 30000))}, "large"),
        "bomb PNG (our limit)": ({"image": b64(png_header(big, big))}, "megapixels"),
        "bomb JPEG": ({"image": b64(jpeg_declaring(jpeg, big, big))}, "megapixels"),
        # under the pixel cap, but 16-bit/float pixels cost more memory to decode than MAX_DECODE_BYTES allows
        "16-bit grey PNG under the pixel cap": ({"image": b64(png_header(under, under, 16, 0))}, "MB limit"),
        "float TIFF under the pixel cap": ({"image": b64(float_tiff_declaring(under, under))}, "MB limit"),
        "8-bit RGB PNG under the pixel cap": ({"image": b64(png_header(under, under))}, "MB limit"),
        "GIF": ({"image": b64(encode(slide, "GIF"))}, "unsupported"),
        "threshold abc": ({"image": b64(jpeg), "threshold": "abc"}, "threshold"),
        "threshold negative": ({"image": b64(jpeg), "threshold": -0.1}, "threshold"),
        "threshold > 1": ({"image": b64(jpeg), "threshold": 1.5}, "threshold"),
        "threshold NaN": (b'{"image": "' + b64(jpeg).encode() + b'", "threshold": NaN}', "threshold"),
        "threshold bool": ({"image": b64(jpeg), "threshold": True}, "threshold"),
        "threshold list": ({"image": b64(jpeg), "threshold": [0.5]}, "threshold"),
        "JSON nested 100,000 deep": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        "JSON object nested deep": (b'{"image": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_001, "nested too deeply"),
    }
