"""Torch dataset for the segmenter: frames decoded lazily at the model's input scale, with smear augmentation.

Nothing is held in memory between items: each ``__getitem__`` decodes one JPEG at the smallest
reduction that is still large enough (a 4032x3024 slide is decoded at 1/2 or 1/4 scale) and
rasterises its polygons directly at the input scale, so training on full-size slides stays well
under a few GB of RSS whatever the dataset size.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from trainer.config_io import dataclass_from_dict
from trainer.data.images import read_rgb, resize_to, target_scale
from trainer.data.types import AnnotatedDataset, DatasetError, ImageRecord
from trainer.labels import LabelMap

log = logging.getLogger(__name__)


@dataclass
class AugmentConfig:
    """Augmentations suited to smear photos: orientation is arbitrary, stain and focus vary."""

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

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> AugmentConfig:
        return dataclass_from_dict(cls, data, "augmentation keys")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight (x0, y0, x1, y1) boxes of (N, H, W) masks, x1/y1 exclusive (as torchvision expects)."""
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for i, m in enumerate(masks):
        ys = np.flatnonzero(m.any(axis=1))
        xs = np.flatnonzero(m.any(axis=0))
        boxes[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return boxes


class SegmentationDataset(Dataset):
    """Items are ``(image CHW float tensor in [0, 1], target dict)`` at the model's input scale."""

    def __init__(self, dataset: AnnotatedDataset, label_map: LabelMap, max_size: int, min_size: int,
                 augment: AugmentConfig | None = None, seed: int = 0) -> None:
        self.records: list[ImageRecord] = [r for r in dataset.images]
        missing = [r.name for r in self.records if r.path is None]
        if missing:
            raise DatasetError(f"{len(missing)} frames of {dataset.source or 'the dataset'} have no image file "
                               f"(e.g. {missing[:3]}); export the task 'with images' or point --images at them")
        self.label_map = label_map
        self.max_size, self.min_size = max_size, min_size
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """Image (H, W, 3) uint8, masks (N, H, W) bool, class ids (N,), and the scale from native."""
        rec = self.records[index]
        scale = target_scale(rec.width, rec.height, self.max_size, self.min_size)
        out_w, out_h = max(1, round(rec.width * scale)), max(1, round(rec.height * scale))
        image, _ = read_rgb(rec.path, min_long_side=max(out_w, out_h))
        if abs(image.shape[1] / rec.width - image.shape[0] / rec.height) > 0.02:
            raise DatasetError(f"{rec.path}: image is {image.shape[1]}x{image.shape[0]} (after decode) but the "
                               f"annotations declare {rec.width}x{rec.height}")
        image = resize_to(image, out_w, out_h)
        masks, labels = [], []
        for inst in rec.outlined():
            cid = self.label_map.class_id(inst.label)
            if cid is None:
                continue
            m = inst.to_mask(rec.height, rec.width, scale=scale)
            if m.shape != (out_h, out_w):
                m = cv2.resize(m.astype(np.uint8), (out_w, out_h), interpolation=cv2.INTER_NEAREST) > 0
            if m.any():
                masks.append(m)
                labels.append(cid)
        mask_arr = np.stack(masks) if masks else np.zeros((0, out_h, out_w), dtype=bool)
        return image, mask_arr, np.asarray(labels, dtype=np.int64), scale

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image, masks, labels, _ = self.load(index)
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            image, masks = geometric(image, masks, self.augment, rng)
            image = colour_jitter(image, self.augment, rng)
            keep = masks.reshape(len(masks), -1).any(axis=1) if len(masks) else np.zeros(0, bool)
            masks, labels = masks[keep], labels[keep]
        tensor = torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0)
        target = {
            "boxes": torch.from_numpy(masks_to_boxes(masks)).reshape(-1, 4),
            "labels": torch.from_numpy(labels),
            "masks": torch.from_numpy(masks.astype(np.uint8)),
            "image_id": torch.tensor(index),
        }
        return tensor, target


def collate(batch: list) -> tuple[list, list]:
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)
