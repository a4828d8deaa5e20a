"""Batch augmentation on the CPU, in torch: geometry (any rotation, flips, scale, shift), colour and focus.

Cells have no orientation, so every rotation and flip is fair; colour (brightness, contrast, saturation,
hue, per-channel gain, a paler stain) and focus (Gaussian blur) jitter make the network rely less on the stain and the
camera, which differ between domains (sharp CellaVision crops vs blurry phone or webcam photos).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

from wbc_core.config_io import check_known


@dataclass
class AugmentConfig:
    rotate: bool = True                   # any angle, and flips
    scale: tuple[float, float] = (0.85, 1.15)
    shift: float = 0.06                   # fraction of the crop side
    brightness: float = 0.15              # +- multiplicative
    contrast: float = 0.2
    saturation: float = 0.3
    hue: float = 0.05                     # +- fraction of a turn
    channel_gain: float = 0.08            # +- per RGB channel
    # up to this strength, mid-tones move towards the background (a paler stain). Off by default: with pale 0.6,
    # saturation 0.5 and contrast 0.3, PBC -> BCCD source-only + Reinhard fell from 0.789 to 0.695 macro-F1
    pale: float = 0.0
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.3, 1.6)   # px at the crop size
    noise: float = 0.02                   # Gaussian noise std (0-1 intensity scale)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> AugmentConfig:
        data = dict(data or {})
        check_known(data, (f.name for f in fields(cls)), "augment config keys")
        for key in ("scale", "blur_sigma"):
            if key in data:
                data[key] = tuple(float(v) for v in data[key])
        return cls(**data)


def _rgb_to_hsv_jitter(x: torch.Tensor, sat: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Saturation scale and hue rotation in YIQ space (cheap and smooth), x in [0, 1] (N, 3, H, W)."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=x.dtype)
    from_yiq = torch.linalg.inv(to_yiq)
    theta = hue * 2 * math.pi
    cos, sin = torch.cos(theta) * sat, torch.sin(theta) * sat
    n = x.shape[0]
    rot = torch.zeros(n, 3, 3, dtype=x.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    mat = from_yiq @ rot @ to_yiq                       # (N, 3, 3)
    return torch.einsum("nij,njhw->nihw", mat, x)


def _pale(x: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """A paler stain: each pixel moves towards the crop's background colour (its brightest tenth) by ``strength``
    x 4t(1-t), t its darkness between the 2nd and 90th percentile of brightness: mid-tones (cytoplasm, red cells)
    fade the most, the darkest nucleus and the background stay."""
    n = x.shape[0]
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).reshape(n, -1)
    lo = torch.quantile(grey, 0.02, dim=1, keepdim=True)
    hi = torch.quantile(grey, 0.90, dim=1, keepdim=True)
    bright = (grey >= hi).float()                                          # (N, P)
    bg = (x.reshape(n, 3, -1) * bright[:, None]).sum(-1) / bright.sum(-1, keepdim=True).clamp_min(1)  # (N, 3)
    t = ((hi - grey) / (hi - lo).clamp_min(1e-3)).clamp(0, 1)
    w = (strength[:, None] * 4 * t * (1 - t)).reshape(n, 1, *x.shape[2:])
    return x + w * (bg[:, :, None, None] - x)


def _blur(x: torch.Tensor, sigma: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    if not apply.any():
        return x
    idx = torch.nonzero(apply).flatten()
    radius = 3
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma[idx, None] ** 2))
    k = k / k.sum(dim=1, keepdim=True)                  # (M, 2r+1)
    sub = x[idx]                                        # (M, 3, H, W)
    m, c, h, w = sub.shape
    # separable depthwise conv with a per-sample kernel: fold samples into channels
    flat = sub.reshape(1, m * c, h, w)
    kx = k.repeat_interleave(c, dim=0)[:, None, None, :]
    ky = k.repeat_interleave(c, dim=0)[:, None, :, None]
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kx, groups=m * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), ky, groups=m * c)
    out = x.clone()
    out[idx] = flat.reshape(m, c, h, w)
    return out


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """x: (N, 3, S, S) float in [0, 1]; returns the augmented batch in [0, 1]."""
    n = x.shape[0]

    def u(lo: float, hi: float, size: int = n) -> torch.Tensor:
        return torch.rand(size, generator=gen) * (hi - lo) + lo

    # geometry: one affine grid per sample (rotation, flip, scale, shift), reflection at the borders
    angle = u(0, 2 * math.pi) if cfg.rotate else torch.zeros(n)
    flip = (torch.rand(n, generator=gen) < 0.5).float() * 2 - 1 if cfg.rotate else torch.ones(n)
    scale = u(*cfg.scale)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flip, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin * flip, cos
    theta[:, :, 2] = u(-cfg.shift * 2, cfg.shift * 2, 2 * n).view(n, 2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    # colour
    x = x * u(1 - cfg.brightness, 1 + cfg.brightness).view(n, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * u(1 - cfg.contrast, 1 + cfg.contrast).view(n, 1, 1, 1) + mean
    x = _rgb_to_hsv_jitter(x, u(1 - cfg.saturation, 1 + cfg.saturation), u(-cfg.hue, cfg.hue))
    x = x * u(1 - cfg.channel_gain, 1 + cfg.channel_gain, 3 * n).view(n, 3, 1, 1)
    if cfg.pale > 0:
        x = _pale(x, u(0, cfg.pale))
    # focus and noise
    x = _blur(x, u(*cfg.blur_sigma), torch.rand(n, generator=gen) < cfg.blur_prob)
    if cfg.noise > 0:
        x = x + torch.randn(x.shape, generator=gen) * cfg.noise
    return x.clamp_(0, 1)
