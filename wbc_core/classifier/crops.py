"""One square crop per cell, the same way for training data and for the cells the pipeline detects.

The crop window is a square centred on the cell's box, ``max(box width, box height) * (1 + 2 * margin)`` on
a side, so the cell fills the same fraction of every crop whatever the magnification (a 150 px BCCD cell and
a 1,000 px RV-PBS cell give the same picture). Where the window leaves the frame the frame is
reflect-padded (an edge cell is not stretched, and no black bar tells the network where the border was).
The window is then resized to ``size x size`` (area interpolation when shrinking).

Each crop comes with the cell's mask at crop resolution when the cell has an outline; the *masked* variant
(:func:`apply_mask`) replaces everything outside the (slightly grown) mask by a constant grey, after stain
normalisation, so neither the neighbouring red cells nor the background colour reach the network.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

from wbc_core.config_io import dataclass_from_dict

#: Value that replaces the pixels outside the cell in masked crops.
MASK_FILL = 128


@dataclass
class CropConfig:
    size: int = 64            # output side (px)
    margin: float = 0.15      # context on every side, as a fraction of the cell's longer box side
    masked: bool = False      # blank out everything outside the cell's (grown) mask
    mask_grow: float = 0.04   # masked crops: grow the mask by this fraction of the crop side first

    def __post_init__(self) -> None:
        if int(self.size) < 8:
            raise ValueError(f"crop size must be at least 8 px, got {self.size}")
        if not 0 <= float(self.margin) <= 2:
            raise ValueError(f"crop margin must be between 0 and 2 (a fraction of the cell's size), got {self.margin}")
        self.size, self.margin = int(self.size), float(self.margin)
        self.masked, self.mask_grow = bool(self.masked), float(self.mask_grow)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> CropConfig:
        return dataclass_from_dict(cls, data, "crop config keys")


@dataclass
class CellCrop:
    image: np.ndarray            # uint8 (size, size, 3) RGB, not normalised, not masked
    mask: np.ndarray | None      # bool (size, size), None when the cell has no outline (a box only)


def crop_window(box: Sequence[float], margin: float) -> tuple[float, float, float]:
    """``(centre x, centre y, side)`` of the square crop window of a cell box, in the box's coordinates."""
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(x1 - x0, y1 - y0, 1.0) * (1.0 + 2.0 * margin)
    return (x0 + x1) / 2.0, (y0 + y1) / 2.0, side


def _reflect_window(image: np.ndarray, x0: int, y0: int, n: int) -> np.ndarray:
    """``image[y0:y0+n, x0:x0+n]`` with reflect padding wherever the window leaves the image."""
    h, w = image.shape[:2]
    xa, ya = min(max(x0, 0), w - 1), min(max(y0, 0), h - 1)
    xb, yb = max(min(x0 + n, w), xa + 1), max(min(y0 + n, h), ya + 1)
    sub = image[ya:yb, xa:xb]
    pads = ((ya - y0, y0 + n - yb), (xa - x0, x0 + n - xb))
    if not any(p for pair in pads for p in pair):
        return sub
    pads = tuple((max(a, 0), max(b, 0)) for a, b in pads) + ((0, 0),) * (image.ndim - 2)
    return np.pad(sub, pads, mode="reflect")


def crop_cell(image: np.ndarray, box: Sequence[float], cfg: CropConfig, mask: np.ndarray | None = None,
              mask_origin: tuple[int, int] = (0, 0), scale: float = 1.0) -> CellCrop:
    """Crop one cell.

    ``image``: RGB uint8 frame at ``scale`` x native resolution (the pipeline's reduced JPEG decode);
    ``box``: (x0, y0, x1, y1) in *native* pixels; ``mask``: the cell's bool mask crop at native resolution
    placed at ``mask_origin`` = (left, top) native px (None for a box without outline).
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {image.shape}")
    cx, cy, side = crop_window(box, cfg.margin)
    n = max(1, round(side * scale))
    x0, y0 = round(cx * scale - n / 2.0), round(cy * scale - n / 2.0)
    window = _reflect_window(image, x0, y0, n)
    interp = cv2.INTER_AREA if n > cfg.size else cv2.INTER_LINEAR
    out = cv2.resize(np.ascontiguousarray(window), (cfg.size, cfg.size), interpolation=interp)
    crop_mask = None
    if mask is not None:
        crop_mask = _mask_in_window(mask, mask_origin, x0 / scale, y0 / scale, n / scale, cfg.size)
    return CellCrop(image=out, mask=crop_mask)


def _mask_in_window(mask: np.ndarray, origin: tuple[int, int], wx: float, wy: float, wside: float,
                    size: int) -> np.ndarray:
    """The native-resolution mask crop resampled into the ``size x size`` crop of window (wx, wy, wside)."""
    out = np.zeros((size, size), np.float32)
    mask = np.asarray(mask, dtype=bool)
    if mask.size == 0 or not mask.any():
        return out > 0.5
    f = size / wside
    left, top = float(origin[0]), float(origin[1])
    mh, mw = mask.shape
    ox0, oy0 = round((left - wx) * f), round((top - wy) * f)
    ow, oh = max(1, round(mw * f)), max(1, round(mh * f))
    interp = cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR
    small = cv2.resize(mask.astype(np.float32), (ow, oh), interpolation=interp)
    cx0, cy0 = max(ox0, 0), max(oy0, 0)
    cx1, cy1 = min(ox0 + ow, size), min(oy0 + oh, size)
    if cx1 > cx0 and cy1 > cy0:
        out[cy0:cy1, cx0:cx1] = small[cy0 - oy0:cy1 - oy0, cx0 - ox0:cx1 - ox0]
    return out >= 0.5


def apply_mask(images: np.ndarray, masks: np.ndarray, has_mask: np.ndarray, grow: float) -> np.ndarray:
    """Masked variant of a batch: pixels outside each (grown) mask become :data:`MASK_FILL`.

    ``images`` (N, S, S, 3) uint8, ``masks`` (N, S, S) bool, ``has_mask`` (N,) bool: crops without an
    outline are returned unchanged.
    """
    out = images.copy()
    size = images.shape[1]
    r = round(grow * size)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)) if r > 0 else None
    for i in np.flatnonzero(has_mask):
        grown = masks[i] if kernel is None else cv2.dilate(masks[i].astype(np.uint8), kernel) > 0
        out[i][~grown] = MASK_FILL
    return out


def crop_instances(image: np.ndarray, items: Sequence[tuple[Sequence[float], np.ndarray | None, tuple[int, int]]],
                   cfg: CropConfig, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crop several cells of one frame: ``items`` = (box, mask crop or None, mask origin) in native px.

    Returns ``(images (N, S, S, 3) uint8, masks (N, S, S) bool, has_mask (N,) bool)``.
    """
    n, s = len(items), cfg.size
    images = np.zeros((n, s, s, 3), np.uint8)
    masks = np.zeros((n, s, s), bool)
    has_mask = np.zeros(n, bool)
    for i, (box, mask, origin) in enumerate(items):
        crop = crop_cell(image, box, cfg, mask=mask, mask_origin=origin, scale=scale)
        images[i] = crop.image
        if crop.mask is not None:
            masks[i], has_mask[i] = crop.mask, True
    return images, masks, has_mask
