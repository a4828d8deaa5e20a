"""Colour/stain normalisation of cell crops to a target reference: Reinhard (Lab statistics) or Macenko.

Statistics are measured on the whole *frame* a cell comes from (a PBC image, a BCCD field, a slide
photo; downsampled to at most :data:`STATS_SIDE` px), not on the crop: a frame is mostly background and
red cells, so its colour describes the stain and the camera, while a crop's colour also depends on the
cell type (an eosinophil crop is orange). Every crop is then mapped from its frame's statistics to the
reference statistics, which are fitted on target-domain frames, so target crops change little and source
crops take on the target's colours. The reference is stored with the classifier (bundle config) and the
pipeline normalises each detected cell with the statistics of the slide it came from.

- **Reinhard** (Reinhard et al. 2001): per-channel mean and standard deviation in CIE Lab.
- **Macenko** (Macenko et al. 2009): two stain vectors in optical density (OD) space from the extreme
  angles of the OD pixels in the plane of their two main directions, and the 99th-percentile stain
  concentrations; the crop is unmixed with its frame's stain vectors and remixed with the reference's.
  The background intensity ``Io`` is estimated per frame (the 99th percentile of each channel) instead of
  assuming 255: PBC backgrounds are cream, BCCD's bluish white.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

METHODS = ("none", "reinhard", "macenko")
STATS_SIDE = 256
_OD_BETA = 0.15     # Macenko: OD below this (on every channel) is background
_ALPHA = 1.0        # Macenko: percentile of the extreme angles


def _small(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    f = STATS_SIDE / max(h, w)
    if f >= 1:
        return image
    return cv2.resize(image, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)


def _lab(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)


def _rgb_from_lab(lab: np.ndarray) -> np.ndarray:
    rgb = cv2.cvtColor(lab.astype(np.float32), cv2.COLOR_LAB2RGB)
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _macenko_stats(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(he (3, 2) unit stain vectors, max concentrations (2,), Io (3,))`` of RGB pixels (N, 3) uint8."""
    px = pixels.reshape(-1, 3).astype(np.float32)
    io = np.maximum(np.percentile(px, 99, axis=0), 1.0)
    od = -np.log(np.clip((px + 1.0) / (io + 1.0), 1e-3, 1.0))
    tissue = od[(od > _OD_BETA).any(axis=1)]
    if len(tissue) < 20:  # a blank frame: a neutral stain model that changes nothing much
        return np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]], np.float32), np.ones(2, np.float32), io
    _, vecs = np.linalg.eigh(np.cov(tissue.T))
    plane = vecs[:, [2, 1]]                      # the two main directions
    plane[:, plane[0] < 0] *= -1                  # deterministic signs (OD is positive)
    proj = tissue @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, _ALPHA), np.percentile(phi, 100 - _ALPHA)
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    he = np.stack([v1, v2], axis=1) if v1[0] > v2[0] else np.stack([v2, v1], axis=1)
    he = np.abs(he) / np.linalg.norm(he, axis=0, keepdims=True).clip(1e-6)
    conc = np.linalg.lstsq(he, tissue.T, rcond=None)[0]
    max_c = np.maximum(np.percentile(conc, 99, axis=1), 1e-3)
    return he.astype(np.float32), max_c.astype(np.float32), io.astype(np.float32)


def frame_stats(image: np.ndarray, method: str | None = None) -> dict[str, np.ndarray]:
    """Colour statistics of one RGB uint8 frame (a <= 256 px copy is measured): for both methods (``method``
    None: what fitting a reference needs), or only what ``method`` reads (the pipeline, once per slide: the
    Macenko statistics cost several times the Reinhard ones)."""
    small = _small(image)
    out: dict[str, np.ndarray] = {}
    if method in (None, "reinhard"):
        mean, std = cv2.meanStdDev(_lab(small))  # numpy's mean/std (ddof 0), several times faster
        out["lab_mean"] = mean.ravel().astype(np.float32)
        out["lab_std"] = std.ravel().clip(1e-3).astype(np.float32)
    if method in (None, "macenko"):
        out["he"], out["max_c"], out["io"] = _macenko_stats(small)
    return out


_STAT_SHAPES = {"lab_mean": (3,), "lab_std": (3,), "he": (3, 2), "max_c": (2,), "io": (3,)}


def stack_stats(stats: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-sample statistics as arrays with a leading sample axis."""
    if not stats:
        return empty_stats()
    return {k: np.stack([s[k] for s in stats]).astype(np.float32) for k in _STAT_SHAPES}


def empty_stats() -> dict[str, np.ndarray]:
    return {k: np.zeros((0, *shape), np.float32) for k, shape in _STAT_SHAPES.items()}


class StainNormalizer:
    """Maps crops from their frames' colour statistics to a fitted reference. ``method='none'`` is identity."""

    def __init__(self, method: str = "none", reference: dict[str, Any] | None = None) -> None:
        if method not in METHODS:
            raise ValueError(f"stain normalisation must be one of {', '.join(METHODS)}, not {method!r}")
        if method != "none" and not reference:
            raise ValueError(f"stain normalisation {method!r} needs a reference: fit it on target frames first")
        self.method = method
        self.reference = {k: np.asarray(v, np.float32) for k, v in (reference or {}).items()}

    @classmethod
    def fit(cls, method: str, stats: dict[str, np.ndarray]) -> StainNormalizer:
        """Reference = the typical frame of ``stats`` (stacked per-frame statistics of the target domain)."""
        if method == "none":
            return cls("none")
        if len(stats["lab_mean"]) == 0:
            raise ValueError("cannot fit stain normalisation: no target frames")
        he = np.median(stats["he"], axis=0)
        he = he / np.linalg.norm(he, axis=0, keepdims=True).clip(1e-6)
        ref = {"lab_mean": np.median(stats["lab_mean"], axis=0), "lab_std": np.median(stats["lab_std"], axis=0),
               "he": he, "max_c": np.median(stats["max_c"], axis=0), "io": np.median(stats["io"], axis=0)}
        return cls(method, ref)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "reference": {k: v.astype(float).tolist()
                                                     for k, v in self.reference.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> StainNormalizer:
        data = data or {}
        return cls(str(data.get("method", "none")), data.get("reference"))

    def __call__(self, crops: np.ndarray, stats: dict[str, np.ndarray]) -> np.ndarray:
        """Normalise crops (N, S, S, 3) uint8; ``stats`` holds each crop's frame statistics (leading axis N)."""
        if self.method == "none" or len(crops) == 0:
            return crops
        out = np.empty_like(crops)
        for i in range(len(crops)):
            one = {k: v[i] for k, v in stats.items()}
            out[i] = self._reinhard(crops[i], one) if self.method == "reinhard" else self._macenko(crops[i], one)
        return out

    def _reinhard(self, crop: np.ndarray, st: dict[str, np.ndarray]) -> np.ndarray:
        ref = self.reference
        lab = (_lab(crop) - st["lab_mean"]) / st["lab_std"] * ref["lab_std"] + ref["lab_mean"]
        lab[..., 0] = np.clip(lab[..., 0], 0, 100)
        return _rgb_from_lab(lab)

    def _macenko(self, crop: np.ndarray, st: dict[str, np.ndarray]) -> np.ndarray:
        ref = self.reference
        px = crop.reshape(-1, 3).astype(np.float32)
        od = -np.log(np.clip((px + 1.0) / (st["io"] + 1.0), 1e-3, None))
        conc = od @ np.linalg.pinv(st["he"]).T                       # (P, 2)
        conc *= ref["max_c"] / st["max_c"]
        rgb = (ref["io"] + 1.0) * np.exp(-conc @ ref["he"].T) - 1.0
        return np.clip(rgb + 0.5, 0, 255).astype(np.uint8).reshape(crop.shape)
