"""Reading slide images fast and the same way everywhere (training, evaluation, the function).

A 4032x3024 JPEG takes ~150 ms to decode fully on one core; libjpeg can decode it at 1/2, 1/4
or 1/8 scale directly (``cv2.IMREAD_REDUCED_COLOR_*``) in a fraction of that. Callers ask for
the size they need and get the cheapest decode that is still at least that large.
"""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

_REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}


class ImageReadError(OSError):
    """An image file is missing, truncated or not an image."""


def target_scale(width: int, height: int, max_size: int, min_size: int | None = None) -> float:
    """Scale that makes the long side ``max_size`` (and the short side at most ``min_size``)."""
    scale = max_size / max(width, height)
    if min_size is not None:
        scale = min(scale, min_size / min(width, height))
    return scale


def read_rgb(path: str | Path, min_long_side: int | None = None) -> tuple[np.ndarray, float]:
    """Read an image as RGB uint8, decoded at the smallest JPEG reduction whose long side is still
    ``>= min_long_side``. Returns ``(image, decode_scale)`` (decode_scale = decoded / native)."""
    path = Path(path)
    data = np.fromfile(path, dtype=np.uint8) if path.is_file() else None
    if data is None or data.size == 0:
        raise ImageReadError(f"image {path} does not exist or is empty")
    return decode_rgb(data.tobytes(), min_long_side, name=str(path))


def decode_rgb(data: bytes, min_long_side: int | None = None, name: str = "image") -> tuple[np.ndarray, float]:
    """Decode image bytes (JPEG/PNG/BMP/TIFF) to RGB uint8; see :func:`read_rgb`."""
    buf = np.frombuffer(data, dtype=np.uint8)
    factor = 1
    native_long = None
    if data[:2] == b"\xff\xd8":  # JPEG: libjpeg's reduced decode is exact and much faster
        try:
            with Image.open(io.BytesIO(data)) as header:
                native_long = max(header.size)
        except (OSError, ValueError) as exc:
            raise ImageReadError(f"{name} is not a readable JPEG: {exc}") from exc
        if min_long_side is not None:
            for f in (8, 4, 2):
                if native_long // f >= min_long_side:
                    factor = f
                    break
    img = cv2.imdecode(buf, _REDUCED[factor])
    if img is None:
        raise ImageReadError(f"{name} is not a readable image (truncated or not JPEG/PNG/BMP/TIFF)")
    rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    scale = max(rgb.shape[:2]) / native_long if native_long else 1.0
    return rgb, scale


def resize_to(image: np.ndarray, width: int, height: int) -> np.ndarray:
    if image.shape[1] == width and image.shape[0] == height:
        return image
    shrink = width < image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
