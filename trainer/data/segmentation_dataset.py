"""Torch dataset for the segmenter: frames decoded lazily at the model's input scale, with smear augmentation.

Nothing is held in memory between items: each ``__getitem__`` decodes one JPEG at the smallest
reduction that is still large enough (a 4032x3024 slide is decoded at 1/2 or 1/4 scale) and
rasterises its polygons directly at the input scale, so training on full-size slides stays well
under a few GB of RSS whatever the dataset size.

Two kinds of frame:

- **outlined** (the default): the cells with an outline (polygon or mask) are the targets, with masks;
  rectangle-only shapes are left out (as before).
- **box-only** (``dataset.meta["frame_box_only"][i]`` true, e.g. Bio-Net): every cell's box is a target and
  the target has *no* ``masks`` key, so such frames can only train the RPN and the box/class heads (the
  trainer runs their batches with the mask branch switched off). Boxes go through the same geometric
  augmentation as masks (they are rasterised as filled rectangles and boxed again), so they stay aligned.

Cells whose ``source`` is in ``mask_skip_sources`` (e.g. ``auto``: left in CVAT as the function drew them, so
their outline is the model's own) are still targets, but their item carries ``target["mask_weights"]`` 0 for
them (1 for the rest), which the trainer hands to :func:`trainer.mask_loss.mask_loss_weights`: they train finding
cells, not outlines. Without ``mask_skip_sources`` the target has no ``mask_weights``.

An item index is a frame index or ``(epoch, index)``: a DataLoader whose workers live across epochs cannot see
:meth:`SegmentationDataset.set_epoch`, so its sampler says the epoch with each index (the augmentation draw
depends on it).

Input scale (:class:`ScaleConfig`): ``fixed`` is the min/max-size resize of the model config; ``rbc``
resizes each frame so its red cells are about ``rbc_px`` across at the model input (the diameter from the
ground truth in ``dataset.meta`` when known, else estimated by ``wbc_core.scale.estimate_rbc_diameter``
once per frame, else the fixed resize).

Domain randomisation (:class:`AugmentConfig`, all off by default): stain jitter in haematoxylin-eosin
optical density, white balance and strong colour casts, paler cytoplasm, Gaussian/disc defocus, Gaussian/
Poisson noise, JPEG re-encoding and a wide zoom-in/zoom-out scale jitter (crop or pad to the same frame).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from wbc_core.config_io import dataclass_from_dict
from wbc_core.data.images import read_rgb, resize_to, target_scale
from wbc_core.data.types import AnnotatedDataset, DatasetError, ImageRecord
from wbc_core.labels import LabelMap

log = logging.getLogger(__name__)

# Long side at which a frame is decoded for the red-cell size estimate (4032 px slides: 1/2 scale).
ESTIMATE_LONG_SIDE = 2016


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"augment.{name} is a probability and must be within [0, 1], got {value!r}")


def _check_range(name: str, value: Sequence[float], lo: float, hi: float) -> None:
    if len(value) != 2 or not lo <= float(value[0]) <= float(value[1]) <= hi:
        raise ValueError(f"{name} must be [low, high] with {lo} <= low <= high <= {hi}, got {value!r}")


@dataclass
class AugmentConfig:
    """Augmentations suited to smear photos: orientation is arbitrary, stain and focus vary.

    The domain-randomisation keys (``stain_p`` ... ``scale_p``) are probabilities per frame, 0 (off) by
    default so existing configs train exactly as before; ``trainer/configs/starter.yaml`` turns them on.
    """

    hflip: float = 0.5
    vflip: float = 0.5
    rot90: bool = True
    hue: float = 8.0            # degrees (OpenCV hue units are 2 deg) of hue shift, +-
    saturation: float = 0.25    # relative, +-
    brightness: float = 0.2     # relative, +-
    contrast: float = 0.2       # relative, +-
    gamma: float = 0.2          # +- around 1
    blur_p: float = 0.2         # probability of a slight defocus blur
    blur_sigma: float = 1.5     # max sigma in pixels at input scale
    # --- domain randomisation (another lab, microscope, camera); each a probability, off by default ---
    stain_p: float = 0.0        # stain jitter in haematoxylin/eosin optical density (per-stain scale and bias)
    stain_scale: float = 0.3    # per-stain concentration factor, 1 +-
    stain_bias: float = 0.05    # per-stain optical-density offset, +-
    white_balance_p: float = 0.0  # per-channel camera gains
    white_balance: float = 0.2    # gain 1 +- this per channel
    cast_p: float = 0.0         # a strong yellow/green/blue/pink background cast (Bio-Net-like tints)
    cast_strength: float = 0.35  # at most this much off in the weakest channel
    pale_p: float = 0.0         # paler, less saturated cytoplasm (weak stain), in the darker regions or globally
    pale_strength: float = 0.6  # at most this fraction of the way to pale
    defocus_p: float = 0.0      # stronger defocus than blur_p: Gaussian or a disc (lens) kernel, 50/50
    defocus_sigma: float = 3.0  # Gaussian sigma up to this (pixels at input scale)
    defocus_radius: float = 5.0  # disc radius up to this (pixels at input scale)
    noise_p: float = 0.0        # sensor noise: Gaussian or Poisson (shot noise), 50/50
    noise_sigma: float = 8.0    # Gaussian noise sd up to this (0-255 units)
    noise_photons: list[float] = field(default_factory=lambda: [20.0, 200.0])  # Poisson: photons at white
    jpeg_p: float = 0.0         # re-encode as JPEG
    jpeg_quality: list[int] = field(default_factory=lambda: [40, 95])
    scale_p: float = 0.0        # wide scale jitter: zoom in (crop) or out (pad) by a log-uniform factor
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])

    def __post_init__(self) -> None:
        for name in ("hflip", "vflip", "blur_p", "stain_p", "white_balance_p", "cast_p", "pale_p", "defocus_p",
                     "noise_p", "jpeg_p", "scale_p"):
            _check_probability(name, getattr(self, name))
        _check_range("augment.jpeg_quality", self.jpeg_quality, 1, 100)
        _check_range("augment.noise_photons", self.noise_photons, 1e-3, 1e6)
        _check_range("augment.scale_range", self.scale_range, 0.05, 20.0)
        if not 0.0 <= self.cast_strength < 1.0 or not 0.0 <= self.pale_strength <= 1.0:
            raise ValueError("augment.cast_strength must be within [0, 1) and augment.pale_strength within [0, 1]")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> AugmentConfig:
        return dataclass_from_dict(cls, data, "augmentation keys")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SCALE_MODES = ("fixed", "rbc")


@dataclass
class ScaleConfig:
    """How a frame is sized for the model (the ``scale`` section of a training config).

    ``fixed``: the model config's ``min_size``/``max_size`` resize (the default). ``rbc``: resize so that red
    cells are ``rbc_px`` across at the input, times a random factor from ``jitter`` in training, with the
    long side kept within ``[min_side, max_side]``; frames whose red-cell size is unknown fall back to fixed.
    """

    mode: str = "fixed"
    rbc_px: float = 48.0
    jitter: list[float] = field(default_factory=lambda: [0.8, 1.25])
    max_side: int = 1600
    min_side: int = 256

    def __post_init__(self) -> None:
        if self.mode not in SCALE_MODES:
            raise ValueError(f"scale.mode must be one of {SCALE_MODES}, not {self.mode!r}")
        if self.rbc_px <= 0:
            raise ValueError(f"scale.rbc_px must be > 0, got {self.rbc_px}")
        _check_range("scale.jitter", self.jitter, 0.05, 20.0)
        if not 16 <= self.min_side <= self.max_side:
            raise ValueError(f"scale needs 16 <= min_side <= max_side, got {self.min_side}, {self.max_side}")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ScaleConfig:
        return dataclass_from_dict(cls, data, "scale keys")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def bundle_dict(self) -> dict[str, Any] | None:
        """What inference needs (``preprocessing.scale`` of bundle.yaml), None for the fixed resize."""
        if self.mode == "fixed":
            return None
        return {"mode": self.mode, "rbc_px": float(self.rbc_px), "max_side": int(self.max_side),
                "min_side": int(self.min_side), "fallback": "fixed"}


# --- colour and photometric augmentation ---------------------------------------------------------------------

def colour_jitter(image: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Stain/illumination jitter on an RGB uint8 image (HSV shift, brightness, contrast, gamma)."""
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    hue_shift = rng.uniform(-cfg.hue, cfg.hue) / 2.0
    sat = 1.0 + rng.uniform(-cfg.saturation, cfg.saturation)
    lut_h = ((np.arange(256) + hue_shift) % 180).astype(np.uint8)
    lut_s = np.clip(np.arange(256) * sat, 0, 255).astype(np.uint8)
    hsv[..., 0] = cv2.LUT(hsv[..., 0], lut_h)
    hsv[..., 1] = cv2.LUT(hsv[..., 1], lut_s)
    out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    bright = 1.0 + rng.uniform(-cfg.brightness, cfg.brightness)
    contrast = 1.0 + rng.uniform(-cfg.contrast, cfg.contrast)
    gamma = 1.0 + rng.uniform(-cfg.gamma, cfg.gamma)
    x = np.arange(256, dtype=np.float32) / 255.0
    x = np.clip((x - 0.5) * contrast + 0.5, 0, 1) ** gamma * bright
    lut = np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)
    out = cv2.LUT(out, lut)
    if cfg.blur_p > 0 and rng.random() < cfg.blur_p:
        sigma = rng.uniform(0.3, cfg.blur_sigma)
        out = cv2.GaussianBlur(out, (0, 0), sigma)
    return out


def _stain_matrix() -> np.ndarray:
    """Rows: RGB optical density of haematoxylin, eosin and the residual (Ruifrok & Johnston), unit length."""
    h = np.array([0.65, 0.70, 0.29])
    e = np.array([0.07, 0.99, 0.11])
    h, e = h / np.linalg.norm(h), e / np.linalg.norm(e)
    r = np.cross(h, e)
    return np.stack([h, e, r / np.linalg.norm(r)]).astype(np.float32)


_RGB_FROM_HED = _stain_matrix()
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED).astype(np.float32)


def stain_jitter(image: np.ndarray, rng: np.random.Generator, scale: float = 0.3, bias: float = 0.05,
                 factors: Sequence[float] | None = None, offsets: Sequence[float] | None = None) -> np.ndarray:
    """Stain jitter in HED optical-density space (Tellez et al. 2018): each stain's concentration becomes
    ``c * a + b`` with ``a`` in ``1 +- scale``, ``b`` in ``+- bias`` (or the given ``factors``/``offsets``).
    With no bias, white background stays white and only stained pixels change."""
    a = np.asarray(factors if factors is not None else rng.uniform(1 - scale, 1 + scale, 3), np.float32)
    b = np.asarray(offsets if offsets is not None else rng.uniform(-bias, bias, 3), np.float32)
    od = -np.log((image.astype(np.float32) + 1.0) / 256.0)
    conc = od.reshape(-1, 3) @ _HED_FROM_RGB
    conc = conc * a + b
    od2 = np.maximum(conc @ _RGB_FROM_HED, 0.0)
    out = 256.0 * np.exp(-od2) - 1.0
    return np.clip(out + 0.5, 0, 255).astype(np.uint8).reshape(image.shape)


# Multipliers of a strong cast at full strength (Bio-Net backgrounds: yellow, green, blue, pink).
CASTS = {"yellow": (1.0, 0.95, 0.55), "green": (0.7, 1.0, 0.65), "blue": (0.65, 0.8, 1.0), "pink": (1.0, 0.7, 0.85)}


def white_balance(image: np.ndarray, rng: np.random.Generator, gain: float = 0.2, cast_p: float = 0.0,
                  cast_strength: float = 0.35, cast: str | None = None) -> np.ndarray:
    """Per-channel camera gains ``1 +- gain`` and, with probability ``cast_p`` (or when ``cast`` names one of
    :data:`CASTS`), a strong colour cast. A cast is normalised so no gain exceeds 1 (the background tints
    instead of clipping to white)."""
    gains = rng.uniform(1 - gain, 1 + gain, 3)
    if cast is None and cast_p > 0 and rng.random() < cast_p:
        cast = str(rng.choice(sorted(CASTS)))
    if cast is not None:
        if cast not in CASTS:
            raise ValueError(f"unknown cast {cast!r}; choose one of {sorted(CASTS)}")
        strength = rng.uniform(0.4, 1.0) * cast_strength / (1 - min(CASTS[cast]))
        gains = gains * (1 - strength * (1 - np.asarray(CASTS[cast])))
        gains = gains / gains.max()
    x = np.arange(256, dtype=np.float32)
    out = np.empty_like(image)
    for c in range(3):
        out[..., c] = cv2.LUT(image[..., c], np.clip(x * gains[c] + 0.5, 0, 255).astype(np.uint8))
    return out


def pale_cytoplasm(image: np.ndarray, rng: np.random.Generator, strength: float = 0.6,
                   regional: bool | None = None) -> np.ndarray:
    """A weaker stain: pixels move towards the background colour and lose saturation. ``regional`` (50/50 when
    None) acts on the image's darker regions, mid-tones most (cytoplasm, red cells), the darkest (nuclei) and
    the background least; otherwise the whole image loses saturation and contrast."""
    a = float(rng.uniform(0.4, 1.0) * strength)
    if regional is None:
        regional = bool(rng.random() < 0.5)
    img = image.astype(np.float32)
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    lo, hi = np.percentile(grey, [3, 90])
    bright = grey >= hi
    bg = img[bright].mean(axis=0) if bright.any() else np.full(3, 255.0, np.float32)
    if regional:
        t = np.clip((hi - grey) / max(hi - lo, 1.0), 0, 1)
        w = cv2.GaussianBlur(4 * t * (1 - t), (0, 0), 1.5)[..., None] * a
        towards = img + 0.6 * (bg - img)                      # paler
        towards = towards + 0.5 * (towards.mean(axis=2, keepdims=True) - towards)  # and greyer
        out = img + w * (towards - img)
    else:
        mean = img.reshape(-1, 3).mean(axis=0)
        out = img + a * 0.6 * (img.mean(axis=2, keepdims=True) - img)   # saturation down
        out = mean + (out - mean) * (1 - 0.4 * a)                        # contrast down
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def defocus(image: np.ndarray, rng: np.random.Generator, sigma: float = 3.0, radius: float = 5.0,
            kind: str | None = None) -> np.ndarray:
    """Out-of-focus blur: a Gaussian (sigma up to ``sigma``) or a disc, the lens' circle of confusion (radius
    up to ``radius``); ``kind`` ``gaussian``/``disc`` or None (50/50)."""
    if kind is None:
        kind = "gaussian" if rng.random() < 0.5 else "disc"
    if kind == "gaussian":
        return cv2.GaussianBlur(image, (0, 0), float(rng.uniform(0.5, max(sigma, 0.6))))
    if kind != "disc":
        raise ValueError(f"defocus kind must be 'gaussian' or 'disc', not {kind!r}")
    r = float(rng.uniform(1.0, max(radius, 1.1)))
    n = math.ceil(r) * 2 + 1
    yy, xx = np.mgrid[:n, :n].astype(np.float32) - n // 2
    kernel = np.clip(r + 0.5 - np.sqrt(xx ** 2 + yy ** 2), 0, 1)   # anti-aliased disc
    return cv2.filter2D(image, -1, kernel / kernel.sum(), borderType=cv2.BORDER_REFLECT)


def add_noise(image: np.ndarray, rng: np.random.Generator, sigma: float = 8.0,
              photons: Sequence[float] = (20.0, 200.0), kind: str | None = None) -> np.ndarray:
    """Sensor noise: Gaussian (sd up to ``sigma``) or Poisson shot noise (``photons`` at white, log-uniform);
    ``kind`` ``gaussian``/``poisson`` or None (50/50)."""
    if kind is None:
        kind = "gaussian" if rng.random() < 0.5 else "poisson"
    img = image.astype(np.float32)
    if kind == "gaussian":
        out = img + rng.standard_normal(img.shape, dtype=np.float32) * float(rng.uniform(1.0, max(sigma, 1.1)))
    elif kind == "poisson":
        peak = float(np.exp(rng.uniform(np.log(photons[0]), np.log(photons[1]))))
        out = rng.poisson(img * (peak / 255.0)).astype(np.float32) * (255.0 / peak)
    else:
        raise ValueError(f"noise kind must be 'gaussian' or 'poisson', not {kind!r}")
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def jpeg_reencode(image: np.ndarray, rng: np.random.Generator, quality: Sequence[int] = (40, 95)) -> np.ndarray:
    """Encode and decode as JPEG at a quality drawn from ``quality`` (inclusive)."""
    q = int(rng.integers(int(quality[0]), int(quality[1]) + 1))
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, q])
    if not ok:
        return image
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def domain_colour(image: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """The stain and camera-colour part of domain randomisation (each step with its probability)."""
    if cfg.stain_p > 0 and rng.random() < cfg.stain_p:
        image = stain_jitter(image, rng, cfg.stain_scale, cfg.stain_bias)
    if cfg.pale_p > 0 and rng.random() < cfg.pale_p:
        image = pale_cytoplasm(image, rng, cfg.pale_strength)
    if cfg.white_balance_p > 0 and rng.random() < cfg.white_balance_p:
        image = white_balance(image, rng, cfg.white_balance, cfg.cast_p, cfg.cast_strength)
    elif cfg.cast_p > 0 and rng.random() < cfg.cast_p:
        image = white_balance(image, rng, 0.0, 1.0, cfg.cast_strength)
    return image


def domain_degrade(image: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """The optics/sensor/compression part of domain randomisation: defocus, then noise, then JPEG."""
    if cfg.defocus_p > 0 and rng.random() < cfg.defocus_p:
        image = defocus(image, rng, cfg.defocus_sigma, cfg.defocus_radius)
    if cfg.noise_p > 0 and rng.random() < cfg.noise_p:
        image = add_noise(image, rng, cfg.noise_sigma, cfg.noise_photons)
    if cfg.jpeg_p > 0 and rng.random() < cfg.jpeg_p:
        image = jpeg_reencode(image, rng, cfg.jpeg_quality)
    return image


# --- geometry -------------------------------------------------------------------------------------------------

def geometric(image: np.ndarray, masks: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray]:
    """Flips and 90-degree rotations of an (H, W, 3) image and (N, H, W) masks."""
    if rng.random() < cfg.hflip:
        image, masks = image[:, ::-1], masks[:, :, ::-1]
    if rng.random() < cfg.vflip:
        image, masks = image[::-1], masks[:, ::-1]
    if cfg.rot90:
        k = int(rng.integers(0, 4))
        if k:
            image, masks = np.rot90(image, k, axes=(0, 1)), np.rot90(masks, k, axes=(1, 2))
    return np.ascontiguousarray(image), np.ascontiguousarray(masks)


def background_colour(image: np.ndarray) -> np.ndarray:
    """Mean colour of the brightest ~30% of pixels: the slide background of a smear photo."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    bright = grey >= np.percentile(grey, 70)
    return image[bright].mean(axis=0) if bright.any() else image.reshape(-1, 3).mean(axis=0)


def scale_jitter(image: np.ndarray, masks: np.ndarray, factor: float, rng: np.random.Generator,
                 min_visible: float = 0.2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zoom by ``factor`` keeping the frame size: > 1 crops a random window and enlarges it, < 1 shrinks the
    frame and pads it (background colour) at a random place. Returns ``(image, masks, keep)``: ``keep``
    (N,) bool marks the masks with at least ``min_visible`` of their area still in the frame; the others
    are dropped from the returned masks."""
    h, w = image.shape[:2]
    n = len(masks)
    before = masks.reshape(n, -1).sum(axis=1).astype(np.float64) * factor * factor if n else np.zeros(0)
    if factor >= 1.0:
        cw, ch = max(1, round(w / factor)), max(1, round(h / factor))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        out = cv2.resize(image[y0:y0 + ch, x0:x0 + cw], (w, h), interpolation=cv2.INTER_LINEAR)
        out_masks = np.zeros((n, h, w), bool)
        for i in range(n):
            crop = masks[i, y0:y0 + ch, x0:x0 + cw].astype(np.uint8)
            out_masks[i] = cv2.resize(crop, (w, h), interpolation=cv2.INTER_NEAREST) > 0
    else:
        sw, sh = max(1, round(w * factor)), max(1, round(h * factor))
        x0, y0 = int(rng.integers(0, w - sw + 1)), int(rng.integers(0, h - sh + 1))
        out = np.empty_like(image)
        out[:] = np.round(background_colour(image)).astype(np.uint8)
        out[y0:y0 + sh, x0:x0 + sw] = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA)
        out_masks = np.zeros((n, h, w), bool)
        for i in range(n):
            small = cv2.resize(masks[i].astype(np.uint8), (sw, sh), interpolation=cv2.INTER_NEAREST) > 0
            out_masks[i, y0:y0 + sh, x0:x0 + sw] = small
    after = out_masks.reshape(n, -1).sum(axis=1) if n else np.zeros(0)
    keep = (after > 0) & (after >= min_visible * np.maximum(before, 1.0)) if n else np.zeros(0, bool)
    return out, out_masks[keep], keep


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight (x0, y0, x1, y1) boxes of (N, H, W) masks, x1/y1 exclusive (as torchvision expects)."""
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for i, m in enumerate(masks):
        ys = np.flatnonzero(m.any(axis=1))
        xs = np.flatnonzero(m.any(axis=0))
        boxes[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return boxes


def box_mask(box: Sequence[float], scale: float, out_h: int, out_w: int) -> np.ndarray:
    """A filled rectangle (out_h, out_w) for a native-pixel box at ``scale`` (at least one pixel)."""
    x0 = min(max(math.floor(box[0] * scale), 0), out_w - 1)
    y0 = min(max(math.floor(box[1] * scale), 0), out_h - 1)
    x1 = min(max(math.ceil(box[2] * scale), x0 + 1), out_w)
    y1 = min(max(math.ceil(box[3] * scale), y0 + 1), out_h)
    m = np.zeros((out_h, out_w), bool)
    m[y0:y1, x0:x1] = True
    return m


def frame_flags(dataset: AnnotatedDataset, key: str, default: Any) -> list[Any]:
    """Per-frame values ``dataset.meta[key]``: a list aligned with ``dataset.images`` or a dict by frame name."""
    value = dataset.meta.get(key)
    if value is None:
        return [default] * len(dataset.images)
    if isinstance(value, dict):
        return [value.get(r.name, default) for r in dataset.images]
    if len(value) != len(dataset.images):
        raise DatasetError(f"{dataset.source}: meta[{key!r}] has {len(value)} entries for {len(dataset.images)} "
                           "frames")
    return list(value)


def frame_rbc_diameters(dataset: AnnotatedDataset) -> list[float | None]:
    """Known red-cell diameters (native px) per frame: ``meta["frame_rbc_px"]`` (a list, as multi-set training
    builds it) or ``meta["rbc_diameter_px"]`` (a dict by frame name, as the Bio-Net / BCCD readers give)."""
    key = "frame_rbc_px" if "frame_rbc_px" in dataset.meta else "rbc_diameter_px"
    return [float(d) if d else None for d in frame_flags(dataset, key, None)]


def default_rbc_estimator() -> Callable[[np.ndarray], Any] | None:
    """``wbc_core.scale.estimate_rbc_diameter`` when that module exists (None otherwise)."""
    try:
        from wbc_core.scale import estimate_rbc_diameter
    except ImportError:
        return None
    return estimate_rbc_diameter


class SegmentationDataset(Dataset):
    """Items are ``(image CHW float tensor in [0, 1], target dict)`` at the model's input scale.

    An index ``i >= len(self)`` reads frame ``i % len(self)`` with its own augmentation draw (a sampler that
    repeats a frame within an epoch passes ``i + k * len(self)`` for the k-th repeat); ``(epoch, i)`` reads it
    with that epoch's draw instead of the one :meth:`set_epoch` set.
    """

    def __init__(self, dataset: AnnotatedDataset, label_map: LabelMap, max_size: int, min_size: int,
                 augment: AugmentConfig | None = None, seed: int = 0, *, scale: ScaleConfig | None = None,
                 box_only: Sequence[bool] | None = None, rbc_px: Sequence[float | None] | None = None,
                 rbc_estimator: Callable[[np.ndarray], Any] | None = None,
                 mask_skip_sources: Sequence[str] = ()) -> None:
        self.records: list[ImageRecord] = [r for r in dataset.images]
        missing = [r.name for r in self.records if r.path is None]
        if missing:
            raise DatasetError(f"{len(missing)} frames of {dataset.source or 'the dataset'} have no image file "
                               f"(e.g. {missing[:3]}); export the task 'with images' or point --images at them")
        self.source = dataset.source or "the dataset"
        self.label_map = label_map
        self.max_size, self.min_size = max_size, min_size
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.scale = scale or ScaleConfig()
        self.box_only = [bool(b) for b in (box_only if box_only is not None
                                           else frame_flags(dataset, "frame_box_only", False))]
        self.rbc_px = list(rbc_px) if rbc_px is not None else frame_rbc_diameters(dataset)
        if len(self.box_only) != len(self.records) or len(self.rbc_px) != len(self.records):
            raise ValueError("box_only and rbc_px need one entry per frame")
        self.mask_skip_sources = tuple(mask_skip_sources)
        self._estimator = rbc_estimator
        self._estimated: dict[int, float | None] = {}
        self._warned_no_estimator = False

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    # --- input scale ---------------------------------------------------------------------------------------

    def rbc_diameter(self, index: int) -> float | None:
        """Red-cell diameter of frame ``index`` in native pixels: ground truth, else the (cached) estimate."""
        known = self.rbc_px[index]
        if known:
            return float(known)
        if index in self._estimated:
            return self._estimated[index]
        estimator = self._estimator or default_rbc_estimator()
        if estimator is None:
            if not self._warned_no_estimator:
                log.warning("wbc_core.scale is not available: frames of %s without a known red-cell size use the "
                            "fixed resize", self.source)
                self._warned_no_estimator = True
            return None
        rec = self.records[index]
        image, decode_scale = read_rgb(rec.path, min_long_side=min(max(rec.width, rec.height), ESTIMATE_LONG_SIDE))
        estimate = estimator(image)
        d = getattr(estimate, "diameter_px", None)
        native = float(d) / decode_scale if d else None
        if native is None:
            log.debug("%s: no red-cell size (%s); fixed resize", rec.name, getattr(estimate, "reason", ""))
        self._estimated[index] = native
        return native

    def prepare_scale(self, progress: bool = False) -> dict[str, int]:
        """Fill the red-cell estimate cache for frames without ground truth (before DataLoader workers fork, so
        each frame is estimated once per run). Returns counts ``{"known", "estimated", "fixed"}``."""
        counts = {"known": 0, "estimated": 0, "fixed": 0}
        if self.scale.mode != "rbc":
            return counts
        todo = [i for i, d in enumerate(self.rbc_px) if not d]
        counts["known"] = len(self.records) - len(todo)
        if todo:
            from tqdm import tqdm

            for i in tqdm(todo, desc="red-cell size", unit="frame", disable=not progress, dynamic_ncols=True):
                counts["estimated" if self.rbc_diameter(i) else "fixed"] += 1
        log.info("rbc scale (%.0f px red cells): %d frames with a known red-cell size, %d estimated, %d left at "
                 "the fixed resize", self.scale.rbc_px, counts["known"], counts["estimated"], counts["fixed"])
        return counts

    def input_scale(self, index: int, jitter: float = 1.0) -> float:
        """Native-to-input scale of frame ``index`` (``jitter`` multiplies the rbc-mode scale)."""
        rec = self.records[index]
        fixed = target_scale(rec.width, rec.height, self.max_size, self.min_size)
        if self.scale.mode != "rbc":
            return fixed
        d = self.rbc_diameter(index)
        if not d or d <= 0:
            return fixed
        long_side = max(rec.width, rec.height)
        s = self.scale.rbc_px * jitter / d
        return float(np.clip(s, self.scale.min_side / long_side, self.scale.max_side / long_side))

    # --- items ---------------------------------------------------------------------------------------------

    def load(self, index: int, jitter: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """Image (H, W, 3) uint8, masks (N, H, W) bool, class ids (N,), and the scale from native.

        For a box-only frame the masks are the cells' filled boxes (only their extent is meaningful)."""
        image, masks, labels, _, scale = self.load_weighted(index, jitter)
        return image, masks, labels, scale

    def load_weighted(self, index: int, jitter: float = 1.0
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
        """:meth:`load` plus each cell's mask-loss weight (N,) float32: 0 for a source in ``mask_skip_sources``."""
        rec = self.records[index]
        scale = self.input_scale(index, jitter)
        out_w, out_h = max(1, round(rec.width * scale)), max(1, round(rec.height * scale))
        image, _ = read_rgb(rec.path, min_long_side=max(out_w, out_h))
        if abs(image.shape[1] / rec.width - image.shape[0] / rec.height) > 0.02:
            raise DatasetError(f"{rec.path}: image is {image.shape[1]}x{image.shape[0]} (after decode) but the "
                               f"annotations declare {rec.width}x{rec.height}")
        image = resize_to(image, out_w, out_h)
        masks, labels, weights = [], [], []
        box_only = self.box_only[index]
        for inst in (rec.instances if box_only else rec.outlined()):
            cid = self.label_map.class_id(inst.label)
            if cid is None:
                continue
            if box_only:
                if inst.box is None:
                    continue
                m = box_mask(inst.box, scale, out_h, out_w)
            else:
                m = inst.to_mask(rec.height, rec.width, scale=scale)
                if m.shape != (out_h, out_w):
                    m = cv2.resize(m.astype(np.uint8), (out_w, out_h), interpolation=cv2.INTER_NEAREST) > 0
            if m.any():
                masks.append(m)
                labels.append(cid)
                weights.append(0.0 if inst.source in self.mask_skip_sources else 1.0)
        mask_arr = np.stack(masks) if masks else np.zeros((0, out_h, out_w), dtype=bool)
        return image, mask_arr, np.asarray(labels, dtype=np.int64), np.asarray(weights, dtype=np.float32), scale

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        epoch = self.epoch
        if isinstance(index, tuple):
            epoch, index = index
        frame = index % len(self.records)
        rng = np.random.default_rng([self.seed, epoch, index]) if self.augment is not None else None
        jitter = 1.0
        if rng is not None and self.scale.mode == "rbc":
            lo, hi = self.scale.jitter
            jitter = float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) if hi > lo else float(lo)
        image, masks, labels, weights, _ = self.load_weighted(frame, jitter)
        if self.augment is not None and rng is not None:
            aug = self.augment
            if aug.scale_p > 0 and rng.random() < aug.scale_p:
                lo, hi = aug.scale_range
                factor = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
                image, masks, keep = scale_jitter(image, masks, factor, rng)
                labels, weights = labels[keep], weights[keep]
            image, masks = geometric(image, masks, aug, rng)
            image = domain_colour(image, aug, rng)
            image = colour_jitter(image, aug, rng)
            image = domain_degrade(image, aug, rng)
            keep = masks.reshape(len(masks), -1).any(axis=1) if len(masks) else np.zeros(0, bool)
            masks, labels, weights = masks[keep], labels[keep], weights[keep]
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
        target = {
            "boxes": torch.from_numpy(masks_to_boxes(masks)).reshape(-1, 4),
            "labels": torch.from_numpy(labels),
            "image_id": torch.tensor(frame),
        }
        if not self.box_only[frame]:
            target["masks"] = torch.from_numpy(masks.astype(np.uint8))
            if self.mask_skip_sources:
                target["mask_weights"] = torch.from_numpy(weights)
        return tensor, target


def collate(batch: list) -> tuple[list, list]:
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)
