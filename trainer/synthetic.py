"""Synthetic Leishman-stained peripheral blood smear photos with WBC polygons (demo and test fixture).

Not a benchmark: the slides only *look* like RV-PBS photos (a pink field of
overlapping red cells on a pale background, one or two white cells per frame
whose nucleus shape and cytoplasm depend on the class) so that the whole loop
(CVAT export -> training -> prediction -> CVAT) can run without outside data.

Everything is drawn in optical density (Beer-Lambert: overlapping cells absorb
more) with numpy and OpenCV, at no more than ``max_render_side`` pixels on the
long side; larger frames are upscaled, so a 4032x3024 slide takes well under a
second to render. Geometry (cell outlines, polygons, masks) is always kept in the
frame's native pixels. One white cell is described by a smooth radial outline
``r(theta)``; the image, the drawn mask and the CVAT-like polygon (30-60
vertices, 2 decimals) all come from that same outline.

A given seed always gives the same bytes (images and annotations).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from wbc_core.data import masks as mask_ops
from wbc_core.data.types import AnnotatedDataset, ImageRecord, Instance
from wbc_core.labels import RVPBS_LABELS

log = logging.getLogger(__name__)

SYNTHETIC_TIMESTAMP = "2000-01-01 00:00:00+00:00"  # fixed export time, so the XML can be reproducible
MAX_RENDER_SIDE = 1344  # frames larger than this are drawn at this long side and upscaled
_SHIFT = 4  # OpenCV sub-pixel drawing: coordinates in 1/16 px
_ONE = 1 << _SHIFT


# --- per-class looks ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class CellStyle:
    """How one WBC class is drawn. Sizes of the nucleus/granules are fractions of the cell radius.

    ``diameter`` is (p5, median, p95) of the cell's equivalent diameter as a fraction of the frame
    width, measured on the RV-PBS CVAT polygons (see ``_RVPBS_DIAMETER``).
    """

    diameter: tuple[float, float, float]
    nucleus: str  # "blob" (round/oval/kidney by its parameters), "lobed" (lobes on a curve) or "band"
    cyto_rgb: tuple[int, int, int]
    nuc_rgb: tuple[int, int, int] = (100, 58, 145)
    nuc_size: tuple[float, float] = (0.5, 0.6)  # blob: mean radius; lobed/band: tube radius
    nuc_offset: tuple[float, float] = (0.0, 0.1)  # blob centre offset from the cell centre
    nuc_ellipticity: tuple[float, float] = (0.0, 0.1)
    nuc_indent: tuple[float, float] = (0.0, 0.0)  # kidney: depth of the notch (fraction of the radius)
    lobes: tuple[int, int] = (3, 4)
    chromatin: tuple[float, float] = (0.25, 0.10)  # texture amplitude, feature size
    nucleoli: tuple[int, int] = (0, 0)
    granule_rgb: tuple[int, int, int] | None = None
    granule_density: float = 0.0  # about the fraction of the cytoplasm the granules cover
    granule_size: float = 0.02
    granules_over_nucleus: bool = False
    vacuoles: tuple[int, int] = (0, 0)
    outline_wobble: float = 0.012


# Equivalent diameter (2*sqrt(area/pi)) of the hand-drawn WBC polygons divided by the frame width:
# (5th percentile, median, 95th percentile) per label, measured once on the RV-PBS CVAT exports
# (4 full class tasks + the 10-class test subset: 228 frames of 4032x3024 / 3302x2476, 239 polygons,
# 1.05 cells per frame). Hard-coded so the generator never needs the dataset.
_RVPBS_DIAMETER: dict[str, tuple[float, float, float]] = {
    "band cell": (0.195, 0.213, 0.235),  # n=6: spread widened to the common one
    "basophil": (0.172, 0.196, 0.228),
    "blast cell": (0.192, 0.207, 0.250),
    "eosinophil": (0.224, 0.249, 0.267),
    "lymphocyte": (0.146, 0.185, 0.224),
    "monocyte": (0.211, 0.251, 0.295),
    "neutrophil": (0.188, 0.204, 0.239),
    "promyelocyte": (0.205, 0.237, 0.299),  # n=3
    "myelocyte": (0.198, 0.231, 0.293),
    "metamyelocyte": (0.168, 0.204, 0.235),
}

STYLES: dict[str, CellStyle] = {
    "neutrophil": CellStyle(
        _RVPBS_DIAMETER["neutrophil"], "lobed", cyto_rgb=(226, 202, 216), nuc_size=(0.19, 0.24),
        lobes=(3, 5), granule_rgb=(216, 184, 206), granule_density=0.5, granule_size=0.01),
    "band cell": CellStyle(
        _RVPBS_DIAMETER["band cell"], "band", cyto_rgb=(226, 202, 216), nuc_size=(0.15, 0.2),
        granule_rgb=(216, 184, 206), granule_density=0.5, granule_size=0.01),
    "eosinophil": CellStyle(
        _RVPBS_DIAMETER["eosinophil"], "lobed", cyto_rgb=(236, 206, 196), nuc_rgb=(104, 62, 148),
        nuc_size=(0.24, 0.29), lobes=(2, 2), granule_rgb=(238, 150, 105), granule_density=0.85,
        granule_size=0.025),
    "basophil": CellStyle(
        _RVPBS_DIAMETER["basophil"], "lobed", cyto_rgb=(196, 168, 208), nuc_rgb=(88, 48, 128),
        nuc_size=(0.22, 0.3), lobes=(2, 3), granule_rgb=(70, 35, 105), granule_density=0.55,
        granule_size=0.03, granules_over_nucleus=True),
    "lymphocyte": CellStyle(
        _RVPBS_DIAMETER["lymphocyte"], "blob", cyto_rgb=(166, 194, 232), nuc_rgb=(76, 40, 124),
        nuc_size=(0.76, 0.86), nuc_offset=(0.03, 0.1), nuc_ellipticity=(0.0, 0.08),
        nuc_indent=(0.0, 0.08), chromatin=(0.35, 0.14)),
    "monocyte": CellStyle(
        _RVPBS_DIAMETER["monocyte"], "blob", cyto_rgb=(190, 190, 214), nuc_rgb=(122, 88, 166),
        nuc_size=(0.55, 0.65), nuc_offset=(0.05, 0.18), nuc_ellipticity=(0.05, 0.2),
        nuc_indent=(0.3, 0.5), chromatin=(0.18, 0.07), vacuoles=(0, 6), outline_wobble=0.025),
    "blast cell": CellStyle(
        _RVPBS_DIAMETER["blast cell"], "blob", cyto_rgb=(160, 176, 224), nuc_rgb=(128, 90, 172),
        nuc_size=(0.74, 0.82), nuc_offset=(0.0, 0.08), nuc_ellipticity=(0.0, 0.08),
        chromatin=(0.12, 0.04), nucleoli=(1, 3)),
    "promyelocyte": CellStyle(
        _RVPBS_DIAMETER["promyelocyte"], "blob", cyto_rgb=(194, 188, 224), nuc_rgb=(118, 80, 164),
        nuc_size=(0.6, 0.68), nuc_offset=(0.1, 0.2), nuc_ellipticity=(0.0, 0.12),
        chromatin=(0.15, 0.05), nucleoli=(0, 2), granule_rgb=(150, 70, 130), granule_density=0.35,
        granule_size=0.02),
    "myelocyte": CellStyle(
        _RVPBS_DIAMETER["myelocyte"], "blob", cyto_rgb=(216, 186, 212), nuc_rgb=(108, 66, 152),
        nuc_size=(0.5, 0.58), nuc_offset=(0.18, 0.28), nuc_ellipticity=(0.12, 0.25),
        nuc_indent=(0.0, 0.12), chromatin=(0.25, 0.08), granule_rgb=(196, 140, 182),
        granule_density=0.45, granule_size=0.014),
    "metamyelocyte": CellStyle(
        _RVPBS_DIAMETER["metamyelocyte"], "blob", cyto_rgb=(222, 194, 214), nuc_rgb=(104, 62, 150),
        nuc_size=(0.48, 0.56), nuc_offset=(0.1, 0.2), nuc_ellipticity=(0.15, 0.3),
        nuc_indent=(0.35, 0.55), chromatin=(0.28, 0.09), granule_rgb=(205, 160, 192),
        granule_density=0.35, granule_size=0.012),
}

_STYLE_BY_LOWER = {name.lower(): style for name, style in STYLES.items()}


def style_for(label: str) -> CellStyle:
    """The look of ``label`` (any case, plurals, short forms); unknown labels look like neutrophils."""
    key = label.strip().lower().replace("_", " ")
    for candidate in (key, key.rstrip("s"), key + " cell", key.rstrip("s") + " cell",
                      key.replace(" cells", " cell")):
        if candidate in _STYLE_BY_LOWER:
            return _STYLE_BY_LOWER[candidate]
    log.debug("no synthetic look for label %r; drawing it like a neutrophil", label)
    return STYLES["neutrophil"]


# --- small helpers -------------------------------------------------------------------------------------

def _od(rgb: Sequence[float]) -> np.ndarray:
    """Optical density (per channel) of a transmitted colour on a white background."""
    return -np.log(np.clip(np.asarray(rgb, dtype=np.float32), 1.0, 255.0) / 255.0)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, feature_px: float) -> np.ndarray:
    """Zero-mean, roughly unit-variance noise field with blobs of about ``feature_px`` pixels."""
    feature_px = max(feature_px, 1.0)
    gh, gw = max(2, int(h / feature_px) + 2), max(2, int(w / feature_px) + 2)
    grid = rng.standard_normal((gh, gw), dtype=np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


def _granules(rng: np.random.Generator, h: int, w: int, coverage: float, sigma: float) -> np.ndarray:
    """Field of blurred dots (each peaking at about 1) covering about ``coverage`` of the area."""
    sigma = max(sigma, 0.45)
    per_pixel = coverage / (np.pi * (1.5 * sigma) ** 2)
    seeds = (rng.random((h, w), dtype=np.float32) < per_pixel).astype(np.float32)
    ksize = 2 * math.ceil(3 * sigma) + 1
    kernel = cv2.getGaussianKernel(ksize, sigma).astype(np.float32)
    blurred = cv2.sepFilter2D(seeds, -1, kernel, kernel)
    return np.clip(blurred / float(kernel.max() ** 2), 0.0, 1.0)


def _fixed(points: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(points, dtype=np.float64) * _ONE).astype(np.int32)


def _wrap(angle: np.ndarray | float) -> np.ndarray | float:
    return (angle + np.pi) % (2 * np.pi) - np.pi


# --- WBC geometry ------------------------------------------------------------------------------------

@dataclass
class _Cell:
    label: str
    style: CellStyle
    cx: float  # native px
    cy: float
    radius: float  # mean radius, native px
    harmonics: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # rows: k, amplitude, phase

    def r_of(self, theta: np.ndarray) -> np.ndarray:
        r = np.ones_like(theta)
        for k, amp, phase in self.harmonics:
            r = r + amp * np.cos(k * theta + phase)
        return self.radius * r

    @property
    def r_max(self) -> float:
        return self.radius * (1.0 + float(np.abs(self.harmonics[:, 1]).sum()))

    def outline(self, n: int = 720) -> np.ndarray:
        theta = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
        r = self.r_of(theta)
        return np.stack([self.cx + r * np.cos(theta), self.cy + r * np.sin(theta)], axis=1)

    def polygon(self, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
        """A CVAT-like hand-drawn polygon: 30-60 vertices on the outline, small jitter, 2 decimals."""
        n = int(rng.integers(30, 61))
        theta = rng.uniform(0, 2 * np.pi) + 2 * np.pi * (np.arange(n) + rng.uniform(-0.3, 0.3, n)) / n
        theta = np.sort(theta)
        # vertices a touch outside the curve compensate the chords cutting inside it
        r = self.r_of(theta) * (1.0 + (np.pi / n) ** 2 / 3) + rng.normal(0.0, 0.004 * self.radius, n)
        pts = np.stack([self.cx + r * np.cos(theta), self.cy + r * np.sin(theta)], axis=1)
        pts[:, 0] = np.clip(pts[:, 0], 0.0, width)
        pts[:, 1] = np.clip(pts[:, 1], 0.0, height)
        return np.round(pts, 2)

    def mask(self, width: int, height: int) -> np.ndarray:
        """The drawn cell as a full-frame bool mask (rasterised like the annotation polygons)."""
        return mask_ops.polygon_to_mask(self.outline(), height, width)


def _sample_diameter(rng: np.random.Generator, style: CellStyle) -> float:
    p5, median, p95 = style.diameter
    sigma = max(math.log(p95 / p5) / 3.29, 0.04)  # log-normal through the 5th/95th percentiles
    return float(np.clip(median * math.exp(rng.normal(0.0, sigma)), p5 * 0.9, p95 * 1.1))


def _place_cells(rng: np.random.Generator, width: int, height: int, labels: Sequence[str]) -> list[_Cell]:
    cells: list[_Cell] = []
    margin = max(2.0, 0.01 * min(width, height))
    for label in labels:
        style = style_for(label)
        radius = _sample_diameter(rng, style) * width / 2
        harmonics = np.array(
            [[2, rng.uniform(0.01, 0.05), rng.uniform(0, 2 * np.pi)]]
            + [[k, rng.uniform(0.3, 1.0) * style.outline_wobble / (k - 2), rng.uniform(0, 2 * np.pi)]
               for k in range(3, 7)])
        placed = False
        for attempt in range(200):
            if attempt and attempt % 40 == 0:
                radius *= 0.9
            cell = _Cell(label, style, 0.0, 0.0, radius, harmonics)
            limit = min(cell.r_max, 0.48 * min(width, height) - margin)
            if limit <= 4:
                break
            if cell.r_max > limit:
                cell.radius *= limit / cell.r_max
                radius = cell.radius
            rm = cell.r_max + margin
            cell.cx = float(rng.uniform(rm, width - rm))
            cell.cy = float(rng.uniform(rm, height - rm))
            if all(math.hypot(cell.cx - o.cx, cell.cy - o.cy) > cell.r_max + o.r_max + 2 * margin
                   for o in cells):
                cells.append(cell)
                placed = True
                break
        if not placed:
            log.debug("no room for a %r cell in a %dx%d frame; left out", label, width, height)
    return cells


# --- nucleus shapes (drawn in a crop, local render pixels) ------------------------------------------

def _blob_points(rng: np.random.Generator, cx: float, cy: float, radius: float, ellipticity: float,
                 indent: float, wobble: float, n: int = 96) -> np.ndarray:
    theta = np.linspace(0, 2 * np.pi, n, endpoint=False)
    phi = rng.uniform(0, 2 * np.pi)
    a, b = radius * (1 + ellipticity), radius * (1 - ellipticity)
    r = a * b / np.sqrt((b * np.cos(theta - phi)) ** 2 + (a * np.sin(theta - phi)) ** 2)
    for k in range(3, 6):
        r = r * (1 + wobble / (k - 2) * rng.uniform(0.3, 1.0) * np.cos(k * theta + rng.uniform(0, 6.3)))
    if indent > 0:
        where = phi + np.pi / 2 * rng.choice([-1.0, 1.0])
        width = rng.uniform(0.45, 0.7)
        r = r * (1 - indent * np.exp(-(_wrap(theta - where) / width) ** 2))
    return np.stack([cx + r * np.cos(theta), cy + r * np.sin(theta)], axis=1)


def _curve(rng: np.random.Generator, length: float, turn: float, s_shape: bool, n: int = 64) -> np.ndarray:
    """A smooth path of ``length`` whose heading turns by ``turn`` radians (S: turns back halfway)."""
    t = np.linspace(0.0, 1.0, n)
    if s_shape:
        curvature = turn * np.cos(np.pi * t) * np.pi / 2
    else:
        curvature = np.full(n, turn) + rng.normal(0, 0.3 * abs(turn) + 0.2, 1)
    heading = rng.uniform(0, 2 * np.pi) + np.concatenate([[0.0], np.cumsum(curvature[1:] / (n - 1))])
    step = length / (n - 1)
    xy = np.concatenate([[[0.0, 0.0]], np.cumsum(
        np.stack([np.cos(heading[1:]), np.sin(heading[1:])], axis=1) * step, axis=0)])
    return xy - xy.mean(axis=0)


def _draw_tube(canvas: np.ndarray, path: np.ndarray, radii: np.ndarray) -> None:
    # dense enough that consecutive discs overlap smoothly
    seg = np.linalg.norm(np.diff(path, axis=0), axis=1)
    total = float(seg.sum())
    n = max(2, int(total / max(0.25 * float(radii.min()), 0.5)) + 1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    sn = np.linspace(0.0, total, n)
    xs, ys, rs = np.interp(sn, s, path[:, 0]), np.interp(sn, s, path[:, 1]), np.interp(sn, s, radii)
    for x, y, r in zip(_fixed(xs), _fixed(ys), _fixed(rs), strict=True):
        cv2.circle(canvas, (int(x), int(y)), max(int(r), 1), 255, -1, cv2.LINE_AA, _SHIFT)


def _nucleus(rng: np.random.Generator, style: CellStyle, shape: tuple[int, int], cx: float, cy: float,
             radius: float) -> tuple[np.ndarray, list[tuple[float, float, float]]]:
    """Nucleus coverage (float 0..1) in a crop, and nucleoli as (x, y, r); (cx, cy, radius) in crop px."""
    canvas = np.zeros(shape, dtype=np.uint8)
    nucleoli: list[tuple[float, float, float]] = []
    if style.nucleus == "blob":
        size = rng.uniform(*style.nuc_size) * radius
        ang = rng.uniform(0, 2 * np.pi)
        off = rng.uniform(*style.nuc_offset) * radius
        ncx, ncy = cx + off * math.cos(ang), cy + off * math.sin(ang)
        pts = _blob_points(rng, ncx, ncy, size, rng.uniform(*style.nuc_ellipticity),
                           rng.uniform(*style.nuc_indent), 0.03)
        cv2.fillPoly(canvas, [_fixed(pts)], 255, cv2.LINE_AA, _SHIFT)
        for _ in range(int(rng.integers(style.nucleoli[0], style.nucleoli[1] + 1))):
            a, d = rng.uniform(0, 2 * np.pi), rng.uniform(0.0, 0.5) * size
            nucleoli.append((ncx + d * math.cos(a), ncy + d * math.sin(a), rng.uniform(0.09, 0.15) * size))
    else:
        tube = rng.uniform(*style.nuc_size) * radius
        if style.nucleus == "band":
            s_shape = rng.random() < 0.35
            length = rng.uniform(1.6, 2.1) * radius
            turn = rng.uniform(2.8, 4.0) if not s_shape else rng.uniform(2.5, 3.5)
            path = _curve(rng, length, turn * rng.choice([-1.0, 1.0]), s_shape)
            t = np.linspace(0, 1, len(path))
            radii = tube * (1 + 0.12 * np.sin(2 * np.pi * (t * rng.uniform(1, 2) + rng.uniform(0, 1))))
            radii *= np.clip(1.6 * np.minimum(t, 1 - t) + 0.75, 0.75, 1.0)  # rounded, slightly tapered ends
        else:
            n_lobes = int(rng.integers(style.lobes[0], style.lobes[1] + 1))
            length = (n_lobes - 1) * tube * (rng.uniform(2.4, 2.8) if n_lobes == 2 else rng.uniform(1.9, 2.3))
            path = _curve(rng, length, rng.uniform(1.2, 3.2) * rng.choice([-1.0, 1.0]), False)
            t = np.linspace(0, 1, len(path))
            centres = np.linspace(0, 1, n_lobes)
            half = 0.5 / max(n_lobes - 1, 1)
            bump = np.clip(1 - np.abs(t[:, None] - centres[None, :]) / (0.8 * half), 0, 1).max(axis=1)
            sizes = tube * rng.uniform(0.85, 1.15, n_lobes)
            lobe_r = sizes[np.abs(t[:, None] - centres[None, :]).argmin(axis=1)]
            filament = 0.03 * radius
            radii = filament + (lobe_r - filament) * np.sin(bump * np.pi / 2) ** 0.7
        # fit inside the cell: shrink the path until the tube stays within ~88% of the radius
        reach = float(np.max(np.linalg.norm(path, axis=1) + radii))
        if reach > 0.86 * radius:
            path = path * (0.86 * radius - float(radii.max())) / max(reach - float(radii.max()), 1e-6)
        offset = rng.normal(0, 0.04 * radius, 2)
        _draw_tube(canvas, path + np.array([cx, cy]) + offset, radii)
    cover = canvas.astype(np.float32) / 255.0
    return cover, nucleoli


# --- the slide ---------------------------------------------------------------------------------------

@dataclass
class SyntheticSlide:
    """One rendered slide: RGB image (native size), its WBC annotations and their drawn masks."""

    image: np.ndarray
    instances: list[Instance]
    masks: list[np.ndarray] | None = None


@dataclass
class _Stain:
    background: np.ndarray  # RGB of the empty glass, 0..255
    strength: float
    rbc_od: np.ndarray
    blue_shift: float  # >0: more azure (bluer nuclei/cytoplasm), <0: more eosin (pinker)

    def od(self, rgb: Sequence[int]) -> np.ndarray:
        base = _od(rgb)
        tint = np.array([1 + 0.25 * self.blue_shift, 1.0, 1 - 0.25 * self.blue_shift], dtype=np.float32)
        return base * tint * self.strength


def _stain(rng: np.random.Generator) -> _Stain:
    background = np.array([236, 228, 230], dtype=np.float32) + rng.normal(0, 4, 3).astype(np.float32)
    background[0] += rng.uniform(-4, 6)  # warmer or cooler light
    rbc = np.array([232, 170, 168], dtype=np.float32) + rng.normal(0, 6, 3).astype(np.float32)
    rbc[1:] += rng.uniform(-8, 6)  # paler <-> deeper
    rbc[1] += rng.uniform(-6, 8)  # rose <-> salmon
    stain = _Stain(np.clip(background, 200, 252), float(rng.uniform(0.85, 1.2)), _od(rbc),
                   float(rng.uniform(-0.6, 0.6)))
    stain.rbc_od = stain.rbc_od * float(rng.uniform(0.75, 1.05))
    return stain


def _render_rbcs(rng: np.random.Generator, od: np.ndarray, s: float, width: int, stain: _Stain,
                 cells: list[_Cell]) -> None:
    rh, rw = od.shape[:2]
    diam = rng.uniform(0.085, 0.105) * width * s  # RBCs ~7.5 um vs 12-20 um WBCs
    coverage = rng.uniform(0.55, 1.1)
    n = int(coverage * rw * rh / (np.pi * (diam / 2) ** 2))
    pallor = rng.uniform(0.45, 0.75)
    for _ in range(n * 3):
        if n <= 0:
            break
        x, y = rng.uniform(-diam / 2, rw + diam / 2), rng.uniform(-diam / 2, rh + diam / 2)
        r = diam / 2 * rng.uniform(0.88, 1.1)
        if any(math.hypot(x - c.cx * s, y - c.cy * s) < c.r_max * s + 0.55 * r for c in cells):
            continue
        n -= 1
        e = rng.uniform(0.0, 0.1)
        a, b, ang = r * (1 + e), r * (1 - e), rng.uniform(0, np.pi)
        x0, x1 = max(int(x - a) - 2, 0), min(int(x + a) + 3, rw)
        y0, y1 = max(int(y - a) - 2, 0), min(int(y + a) + 3, rh)
        if x1 <= x0 or y1 <= y0:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dx, dy = xx + 0.5 - x, yy + 0.5 - y
        u = dx * math.cos(ang) + dy * math.sin(ang)
        v = -dx * math.sin(ang) + dy * math.cos(ang)
        rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        edge = np.clip((1 - rho) * r / max(0.9, 0.03 * r) + 0.5, 0, 1)
        body = 1 - pallor * np.exp(-(rho / 0.55) ** 2) + 0.2 * np.exp(-((rho - 0.8) / 0.15) ** 2)
        density = float(rng.uniform(0.85, 1.1))
        od[y0:y1, x0:x1] += (edge * body * density)[..., None] * stain.rbc_od


def _render_platelets(rng: np.random.Generator, od: np.ndarray, s: float, width: int, stain: _Stain) -> None:
    rh, rw = od.shape[:2]
    canvas = np.zeros((rh, rw), dtype=np.uint8)
    for _ in range(int(rng.integers(0, 4))):
        gx, gy = rng.uniform(0, rw), rng.uniform(0, rh)
        for _ in range(int(rng.integers(1, 5))):
            r = rng.uniform(0.006, 0.012) * width * s
            x, y = gx + rng.normal(0, 2.5 * r), gy + rng.normal(0, 2.5 * r)
            axes = (max(int(r * _ONE), _ONE), max(int(r * rng.uniform(0.6, 1.0) * _ONE), _ONE))
            cv2.ellipse(canvas, (int(x * _ONE), int(y * _ONE)), axes, rng.uniform(0, 180), 0, 360, 255, -1,
                        cv2.LINE_AA, _SHIFT)
    if canvas.any():
        cover = canvas.astype(np.float32) / 255.0
        cover *= 0.7 + 0.5 * _smooth_noise(rng, rh, rw, 0.004 * width * s).clip(-1, 1)
        od += cover[..., None] * stain.od((150, 100, 180))


def _render_wbc(rng: np.random.Generator, od_wbc: np.ndarray, cover: np.ndarray, cell: _Cell, s: float,
                stain: _Stain) -> None:
    rh, rw = cover.shape
    style = cell.style
    rm = cell.r_max * s
    x0, x1 = max(int(cell.cx * s - rm) - 3, 0), min(int(cell.cx * s + rm) + 4, rw)
    y0, y1 = max(int(cell.cy * s - rm) - 3, 0), min(int(cell.cy * s + rm) + 4, rh)
    h, w = y1 - y0, x1 - x0
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    # render pixel j covers native [j/s, (j+1)/s): its centre is at (j + 0.5) / s
    dx, dy = (xx + 0.5) / s - cell.cx, (yy + 0.5) / s - cell.cy
    dist = np.sqrt(dx * dx + dy * dy)
    theta = np.arctan2(dy, dx)
    r = cell.r_of(theta)
    alpha = np.clip((r - dist) * s / 1.2 + 0.5, 0, 1)
    inner = np.clip((0.95 * r - dist) * s / 1.5 + 0.5, 0, 1)

    lcx, lcy, lr = cell.cx * s - x0 - 0.5, cell.cy * s - y0 - 0.5, cell.radius * s
    nuc, nucleoli = _nucleus(rng, style, (h, w), lcx, lcy, lr)
    nuc = cv2.GaussianBlur(nuc, (0, 0), max(0.6, 0.012 * lr)) * inner

    amp, feat = style.chromatin
    chrom = 1 + amp * _smooth_noise(rng, h, w, feat * lr)
    chrom += 0.5 * amp * _smooth_noise(rng, h, w, feat * lr / 3)
    if nucleoli:
        spots = np.zeros((h, w), dtype=np.uint8)
        for nx, ny, nr in nucleoli:
            cv2.circle(spots, (int(nx * _ONE), int(ny * _ONE)), max(int(nr * _ONE), _ONE), 255, -1,
                       cv2.LINE_AA, _SHIFT)
        chrom *= 1 - 0.45 * cv2.GaussianBlur(spots.astype(np.float32) / 255, (0, 0), max(0.6, 0.02 * lr))
    chrom = np.clip(chrom, 0.3, 2.0)

    cyto = 1 + 0.08 * _smooth_noise(rng, h, w, 0.15 * lr)
    lo, hi = style.vacuoles
    if hi > 0:
        vac = np.zeros((h, w), dtype=np.uint8)
        for _ in range(int(rng.integers(lo, hi + 1))):
            a, d = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.85) * lr
            cv2.circle(vac, (int((lcx + d * math.cos(a)) * _ONE), int((lcy + d * math.sin(a)) * _ONE)),
                       max(int(rng.uniform(0.03, 0.07) * lr * _ONE), _ONE), 255, -1, cv2.LINE_AA, _SHIFT)
        cyto *= 1 - 0.45 * vac.astype(np.float32) / 255
    # a touch darker towards the membrane, like a real cytoplasm rim
    cyto *= 1 + 0.2 * np.exp(-((r - dist) * s / max(1.0, 0.05 * lr)) ** 2)

    cell_od = (alpha * (1 - nuc) * cyto)[..., None] * stain.od(style.cyto_rgb)
    cell_od += (nuc * chrom)[..., None] * stain.od(style.nuc_rgb)
    if style.granule_rgb is not None and style.granule_density > 0:
        g = _granules(rng, h, w, style.granule_density, style.granule_size * lr)
        where = alpha if style.granules_over_nucleus else alpha * (1 - nuc)
        cell_od += (g * where)[..., None] * stain.od(style.granule_rgb)
    od_wbc[y0:y1, x0:x1] += cell_od
    np.maximum(cover[y0:y1, x0:x1], alpha, out=cover[y0:y1, x0:x1])


def _render_scale(width: int, height: int, max_render_side: int) -> float:
    return min(1.0, max_render_side / max(width, height))


def render_slide_with_masks(rng: np.random.Generator, width: int, height: int,
                            labels: Sequence[str] = RVPBS_LABELS, n_cells: int = 1, *,
                            cell_labels: Sequence[str] | None = None, with_masks: bool = True,
                            max_render_side: int = MAX_RENDER_SIDE) -> SyntheticSlide:
    """Like :func:`render_slide`, but returns a :class:`SyntheticSlide` that also holds the drawn masks.

    ``cell_labels`` forces the class of each cell (then ``n_cells`` is ignored); otherwise each of the
    ``n_cells`` cells gets a label drawn uniformly from ``labels``. Cells that do not fit in the frame
    without overlapping another are left out (logged at debug level).
    """
    if width < 16 or height < 16:
        raise ValueError(f"slide size {width}x{height} is too small (at least 16x16)")
    if cell_labels is None:
        if not labels and n_cells > 0:
            raise ValueError("labels is empty: no class to draw the cells from")
        picks = rng.integers(0, len(labels), n_cells) if n_cells > 0 else []
        cell_labels = [str(labels[int(i)]) for i in picks]
    cells = _place_cells(rng, width, height, list(cell_labels))
    instances = [Instance(label=c.label, polygon=c.polygon(rng, width, height)) for c in cells]

    s = _render_scale(width, height, max_render_side)
    rw, rh = max(1, round(width * s)), max(1, round(height * s))
    stain = _stain(rng)
    od_rbc = np.zeros((rh, rw, 3), dtype=np.float32)
    _render_rbcs(rng, od_rbc, s, width, stain, cells)
    od_rbc *= (1 + 0.12 * _smooth_noise(rng, rh, rw, rw / 4))[..., None]  # uneven smear thickness
    _render_platelets(rng, od_rbc, s, width, stain)
    od_wbc = np.zeros_like(od_rbc)
    cover = np.zeros((rh, rw), dtype=np.float32)
    for cell in cells:
        _render_wbc(rng, od_wbc, cover, cell, s, stain)
    od = od_rbc * (1 - 0.9 * cover)[..., None] + od_wbc  # RBCs under the WBC edge barely show

    # illumination: slow unevenness and a vignette from the eyepiece
    yy, xx = np.mgrid[0:rh, 0:rw].astype(np.float32)
    rr = ((xx - rw / 2) / (rw / 2)) ** 2 + ((yy - rh / 2) / (rh / 2)) ** 2
    light = (1 + 0.04 * _smooth_noise(rng, rh, rw, rw / 3)) * (1 - rng.uniform(0.04, 0.16) * rr / 2)
    light *= rng.uniform(0.88, 1.06)
    img = (light[..., None] * stain.background) * np.exp(-od)

    focus = rng.uniform(0.5, 1.8) * rw / 1008
    img = cv2.GaussianBlur(img, (0, 0), max(focus, 0.3))
    img += rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(1.0, 3.0)
    img8 = np.clip(img, 0, 255).astype(np.uint8)
    hue = int(rng.integers(-2, 3))
    if hue:
        hsv = cv2.cvtColor(img8, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + hue) % 180).astype(np.uint8)
        img8 = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if (rw, rh) != (width, height):
        img8 = cv2.resize(img8, (width, height), interpolation=cv2.INTER_LINEAR)
    masks = [c.mask(width, height) for c in cells] if with_masks else None
    return SyntheticSlide(np.ascontiguousarray(img8), instances, masks)


def render_slide(rng: np.random.Generator, width: int, height: int, labels: Sequence[str] = RVPBS_LABELS,
                 n_cells: int = 1, *, cell_labels: Sequence[str] | None = None,
                 max_render_side: int = MAX_RENDER_SIDE) -> tuple[np.ndarray, list[Instance]]:
    """Draw one smear photo: ``(image RGB uint8 (height, width, 3), WBC polygons in native pixels)``.

    ``n_cells`` white cells of classes drawn from ``labels`` (or exactly ``cell_labels``) on a field of
    red cells, with a random stain, light, focus and sensor noise. Uses only ``rng`` for randomness.
    """
    slide = render_slide_with_masks(rng, width, height, labels, n_cells, cell_labels=cell_labels,
                                    with_masks=False, max_render_side=max_render_side)
    return slide.image, slide.instances


def _write_jpeg(path: Path, rgb: np.ndarray, quality: int) -> None:
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise OSError(f"could not encode {path} as JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.tobytes())


def _deal_labels(rng: np.random.Generator, labels: Sequence[str], n: int) -> list[str]:
    """``n`` labels dealt from shuffled copies of ``labels``: every class shows up once per len(labels)."""
    out: list[str] = []
    while len(out) < n:
        out.extend(labels[int(i)] for i in rng.permutation(len(labels)))
    return out[:n]


def generate_task(out_dir: Path, n_images: int, width: int = 1008, height: int = 756, seed: int = 0,
                  labels: Sequence[str] = RVPBS_LABELS, cells_per_image: tuple[int, int] = (1, 2),
                  jpeg_quality: int = 90) -> AnnotatedDataset:
    """Write a synthetic CVAT task export ("CVAT for images 1.1") and return it as a dataset.

    Output layout (what CVAT's "Export task dataset -> CVAT for images 1.1" zip holds)::

        out_dir/annotations.xml          one <image> per slide, each WBC a <polygon label="...">
        out_dir/images/synth_0000.jpg    width x height JPEG slides (quality ``jpeg_quality``)
        out_dir/images/synth_0001.jpg    ...

    Each slide has between ``cells_per_image[0]`` and ``cells_per_image[1]`` white cells (inclusive),
    non-overlapping and inside the frame, sized like RV-PBS cells relative to the frame width. Labels are
    dealt from shuffled rounds of ``labels``, so any ``len(labels)`` consecutive cells cover every class.
    Polygons have 30-60 vertices in native pixels (2 decimals) and follow the drawn cell outline.

    The returned :class:`AnnotatedDataset` has ``labels == list(labels)``, ``source == "synthetic"`` and
    ``ImageRecord.path`` pointing at each JPEG. The same arguments always draw the same slides and
    polygons (the JPEGs are byte-identical; ``annotations.xml`` too, up to the export timestamps the XML
    writer stamps in ``<meta>``, which are taken from ``dataset.meta["timestamp"]`` when it honours that).
    """
    out_dir = Path(out_dir)
    if n_images < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images}")
    lo, hi = int(cells_per_image[0]), int(cells_per_image[1])
    if lo < 0 or hi < lo:
        raise ValueError(f"cells_per_image must be (min, max) with 0 <= min <= max, got {cells_per_image}")
    if not labels:
        raise ValueError("labels is empty")
    from wbc_core.data.cvat_xml import write_cvat_xml

    master = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED]))
    counts = master.integers(lo, hi + 1, n_images)
    dealt = _deal_labels(master, list(labels), int(counts.sum()))
    children = np.random.SeedSequence(seed).spawn(n_images)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    records: list[ImageRecord] = []
    start = 0
    for i in range(n_images):
        cell_labels = dealt[start:start + int(counts[i])]
        start += int(counts[i])
        rng = np.random.default_rng(children[i])
        image, instances = render_slide(rng, width, height, labels, cell_labels=cell_labels)
        name = f"synth_{i:04d}.jpg"
        path = images_dir / name
        _write_jpeg(path, image, jpeg_quality)
        records.append(ImageRecord(name=name, width=width, height=height, path=path, instances=instances,
                                   frame_id=i))
    dataset = AnnotatedDataset(images=records, labels=[str(x) for x in labels], source="synthetic",
                               meta={"seed": seed, "generator": "trainer.synthetic",
                                     "timestamp": SYNTHETIC_TIMESTAMP})
    write_cvat_xml(dataset, out_dir / "annotations.xml", task_name=f"synthetic-{seed}")
    log.info("wrote %d synthetic slides (%d cells) to %s", n_images, sum(len(r.instances) for r in records),
             out_dir)
    return dataset


def generate_slide_jpeg(path: Path, width: int = 4032, height: int = 3024, seed: int = 0,
                        labels: Sequence[str] = RVPBS_LABELS, n_cells: int | None = None,
                        jpeg_quality: int = 90) -> list[Instance]:
    """Write one un-annotated slide JPEG (e.g. a new 4032x3024 photo to pre-annotate).

    Returns the cells it drew (the ground truth, native pixels) in case the caller wants to score a
    prediction; ``n_cells`` defaults to 1 or 2 at random.
    """
    rng = np.random.default_rng(seed)
    if n_cells is None:
        n_cells = int(rng.integers(1, 3))
    image, instances = render_slide(rng, width, height, labels, n_cells)
    _write_jpeg(Path(path), image, jpeg_quality)
    return instances
