"""Reading slide images fast and the same way everywhere (training, evaluation, the function).

A 4032x3024 JPEG takes ~80 ms to decode fully on one core; libjpeg can decode it at 1/2, 1/4
or 1/8 scale directly (in the DCT domain) in a fraction of that (~20 ms at 1/4). Callers ask for
the size they need and get the cheapest decode that is still at least that large.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:
    import torch


#: The image formats every entry point accepts (PIL format names), defined once: the function's checks and
#: 400 messages, ``--help`` texts and the READMEs say :data:`FORMATS_TEXT`. MPO: phone JPEGs with an
#: embedded depth/preview image.
JPEG_FORMATS = frozenset({"JPEG", "MPO"})
LOSSLESS_FORMATS = frozenset({"PNG", "BMP", "TIFF", "WEBP"})
ACCEPTED_FORMATS = JPEG_FORMATS | LOSSLESS_FORMATS
FORMATS_TEXT = "JPEG, PNG, BMP, TIFF or WebP"


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


def jpeg_draft_factor(width: int, height: int, min_long_side: int | None) -> int:
    """The DCT-domain reduction (1, 2, 4 or 8) a JPEG of ``width`` x ``height`` is decoded at: the largest whose
    long side is still ``>= min_long_side`` (1 when None)."""
    if min_long_side is None:
        return 1
    return next((f for f in (8, 4, 2) if max(width, height) // f >= min_long_side), 1)


def oriented(img: Image.Image) -> Image.Image:
    """``img`` with its EXIF orientation applied: a transposed copy when the orientation asks for one, else
    ``img`` itself (``ImageOps.exif_transpose`` copies the whole image even then)."""
    try:
        orientation = int(img.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block: nothing to apply (exif_transpose ignores it as well)
        return img
    return img if orientation in (0, 1) else ImageOps.exif_transpose(img)


#: Bytes a pixel takes in PIL's decoded image, by mode (8-bit multi-band modes are stored 4 bytes a pixel).
_PIL_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
#: Greyscale modes of more than 8 bits, scaled to 8-bit grey by :func:`pil_to_rgb8`.
HIGH_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})


def decode_memory_bytes(fmt: str, mode: str, width: int, height: int, min_long_side: int | None = None) -> int:
    """Peak bytes that decoding an image (PIL ``fmt``/``mode``, ``width`` x ``height`` as stored) to RGB uint8
    takes here: PIL's decoded image plus what :func:`pil_to_rgb8` converts it through and returns. JPEGs are
    decoded reduced (:func:`jpeg_draft_factor`), every other format in full.

    Per pixel: the decoded image (1-4 bytes by mode), then 8-bit RGB (3 bytes) through, for 16-bit and float
    greys, numpy's copy of the pixels, and for other non-RGB modes PIL's RGB (4; palette/alpha images also RGBA, 4).
    """
    pixels = width * height
    if fmt in JPEG_FORMATS:
        f = jpeg_draft_factor(width, height, min_long_side)
        pixels = -(-width // f) * -(-height // f)
    native = _PIL_PIXEL_BYTES.get(mode, 4)
    if mode == "RGB":
        extra = 3
    elif mode in HIGH_BIT_MODES:
        extra = native + 3  # numpy's copy of the pixels, then RGB
    elif mode in ("P", "PA", "LA"):
        extra = 4 + 4
    else:
        extra = 4 + 3
    return pixels * (native + extra)


def decode_rgb(data: bytes, min_long_side: int | None = None, name: str = "image") -> tuple[np.ndarray, float]:
    """Decode image bytes (:data:`FORMATS_TEXT`) to RGB uint8; see :func:`read_rgb`.

    JPEGs are decoded by libjpeg through PIL's ``draft`` (the DCT-domain 1/2, 1/4, 1/8 reductions),
    EXIF orientation applied. Unlike OpenCV, which fills a cut-off JPEG with grey and returns it,
    PIL refuses a truncated file, so a half-uploaded slide is an :class:`ImageReadError` wherever it
    is read (training, evaluation, the function).
    """
    if data[:2] == b"\xff\xd8":
        return _decode_jpeg(data, min_long_side, name)
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ImageReadError(f"{name} is not a readable image (truncated or not {FORMATS_TEXT})")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB), 1.0


def _decode_jpeg(data: bytes, min_long_side: int | None, name: str) -> tuple[np.ndarray, float]:
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            factor = jpeg_draft_factor(width, height, min_long_side)
            if factor > 1:
                img.draft("RGB", (-(-width // factor), -(-height // factor)))
            img.load()
            out = oriented(img)
            if out.mode != "RGB":
                out = out.convert("RGB")
            rgb = np.array(out)  # a writable copy (PIL's buffer is read-only)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageReadError(f"{name} is not a readable JPEG (truncated or corrupt?): {exc}") from exc
    scale = max(rgb.shape[:2]) / max(width, height)
    return rgb, scale


def resize_to(image: np.ndarray, width: int, height: int) -> np.ndarray:
    if image.shape[1] == width and image.shape[0] == height:
        return image
    shrink = width < image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


# --- GPU decode (nvJPEG) -------------------------------------------------------------------------

# EXIF orientation -> (transpose H/W first, then quarter turns counter-clockwise, then flip left-right),
# the same pixels as PIL's ImageOps.exif_transpose.
_ORIENTATION_OPS = {1: (False, 0, False), 2: (False, 0, True), 3: (False, 2, False), 4: (False, 2, True),
                    5: (True, 0, False), 6: (False, 3, False), 7: (True, 2, False), 8: (False, 1, False)}


def orient_chw(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (1-8) to a (C, H, W) tensor, as PIL's ``exif_transpose`` does."""
    import torch

    transpose, quarter_turns, flip = _ORIENTATION_OPS.get(int(orientation), (False, 0, False))
    if transpose:
        image = image.transpose(1, 2)
    if quarter_turns:
        image = torch.rot90(image, quarter_turns, dims=(1, 2))
    if flip:
        image = image.flip(2)
    return image


def jpeg_ends_cleanly(data: bytes) -> bool:
    """True when the JPEG's last bytes are its EOI marker (a cut-off upload does not end so)."""
    return data.rstrip(b"\x00")[-2:] == b"\xff\xd9"


def decode_jpeg_torch(data: bytes, min_long_side: int | None, device: str | torch.device,
                      name: str = "image") -> tuple[np.ndarray, float]:
    """:func:`decode_rgb` for JPEGs through ``torchvision.io.decode_jpeg`` on ``device`` (nvJPEG on a GPU,
    where a 12-megapixel slide decodes in a few ms instead of ~50 ms of libjpeg at 1/4 scale).

    Same output contract as the CPU path: RGB uint8 on the host, EXIF orientation applied, and the
    size libjpeg's DCT reduction would give (area-averaged from the full decode). Raises
    :class:`ImageReadError` for what this path does not take (not a JPEG, not ending in EOI, not
    3-channel YCbCr/greyscale); callers fall back to :func:`decode_rgb`, which gives the precise reason.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    if data[:2] != b"\xff\xd8" or not jpeg_ends_cleanly(data):
        raise ImageReadError(f"{name}: not a complete JPEG for the GPU decoder")
    try:
        with Image.open(io.BytesIO(data)) as img:  # the header only: size, colour mode, orientation
            width, height = img.size
            mode = img.mode
            orientation = int(img.getexif().get(0x0112, 1) or 1)
            factor = 1
            if min_long_side is not None:
                factor = next((f for f in (8, 4, 2) if max(width, height) // f >= min_long_side), 1)
            if factor > 1:  # libjpeg's own choice of reduction (sets the size, decodes nothing)
                img.draft("RGB", (-(-width // factor), -(-height // factor)))
            out_w, out_h = img.size
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageReadError(f"{name} is not a readable JPEG: {exc}") from exc
    if mode not in ("RGB", "L"):
        raise ImageReadError(f"{name}: {mode} JPEG, left to the CPU decoder")
    try:
        with warnings.catch_warnings():  # torchvision >= 0.29 points to TorchCodec; this decoder still works
            warnings.simplefilter("ignore", DeprecationWarning)
            chw = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                              device=device)
    except RuntimeError as exc:
        raise ImageReadError(f"{name}: the GPU decoder refused it: {exc}") from exc
    if tuple(chw.shape[1:]) != (height, width):
        raise ImageReadError(f"{name}: decoded {tuple(chw.shape[1:])}, header says {(height, width)}")
    if (out_h, out_w) != (height, width):
        chw = torch.nn.functional.interpolate(chw[None].float(), size=(out_h, out_w), mode="area")[0]
        chw = chw.round_().clamp_(0, 255).to(torch.uint8)
    chw = orient_chw(chw, orientation)
    rgb = np.ascontiguousarray(chw.permute(1, 2, 0).cpu().numpy())
    return rgb, max(rgb.shape[:2]) / max(width, height)


def pil_to_rgb8(img: Image.Image) -> np.ndarray:
    """Any PIL image as 8-bit RGB (H, W, 3); 16/32-bit and float greys are scaled, not clipped; palette and
    alpha images are flattened. EXIF orientation is not applied here (callers do, with ImageOps)."""
    if img.mode in HIGH_BIT_MODES:
        arr = np.asarray(img)
        if arr.dtype.kind == "f":
            top = 1.0 if float(np.nanmax(arr, initial=0.0)) <= 1.0 else 65535.0
        else:
            top = 65535.0 if img.mode.startswith("I;16") or int(arr.max(initial=0)) > 255 else 255.0
        rgb = np.empty((*arr.shape[:2], 3), np.uint8)
        step = max(1, (1 << 20) // max(arr.shape[1], 1))  # ~1 M pixels of float64 at a time, not the whole frame
        for y in range(0, arr.shape[0], step):
            rows = np.nan_to_num(arr[y:y + step].astype(np.float64))
            rgb[y:y + step] = np.clip(rows * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)[:, :, None]
        return rgb
    if img.mode != "RGB":
        img = img.convert("RGBA").convert("RGB") if img.mode in ("P", "PA", "LA") else img.convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))
