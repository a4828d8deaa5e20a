"""Estimate an image's scale from its red blood cells (RBCs), pure numpy/OpenCV.

RBCs are ~7.5 µm across and lie on nearly every peripheral blood smear, so their diameter in pixels is a
ruler for the slide's pixels-per-micron: a phone photo at 1000x has RBCs of 400-600 px, a CellaVision crop
~70 px, a BCCD frame ~105 px. Training and inference both resize each image so its RBCs have a fixed
diameter at the model's input (:func:`scale_factor`), which makes one model work across cameras and
magnifications.

The method (:func:`estimate_rbc_diameter`) runs on a copy resized to a fixed working size (long side
:data:`WORK_LONG_SIDE`, up or down, so the result is equivariant to the input's resolution); when the cells
come out smaller than :data:`MIN_WORK_DIAMETER` there (a large, low-magnification frame) it re-runs at a
higher resolution. The result is mapped back to the input's pixels.

1. **Flat field, optical density.** The glass is the brightest thing on a smear. A quadratic surface in
   (x, y), fitted robustly on a coarse grid to the log intensity (summed over R, G, B) of the glass pixels
   (first the brightest 30%, then twice what the surface itself calls glass), models the illumination: its
   tint (white, cream, bluish, yellow, green, grey, pink) and vignetting. The total optical density
   ``OD = sum_c log(bg_c / I_c)`` (Beer-Lambert) is then ~0 on glass whatever its tint, and stained cells
   absorb. Pixels that pass almost no light (the black surround of an eyepiece photo) are "outside".
2. **Foreground.** Otsu's threshold on ``log(OD + FOREGROUND_LOG_OFFSET)`` separates cells from glass (the
   log keeps the few, very dense WBC nuclei from pulling the split above the RBCs); the cells' edge is then
   put at :data:`EDGE_FRACTION` of their median density, the same point of the edge profile whatever the
   stain's strength. Under a weak stain the RBCs fade far more than the WBC nuclei, and Otsu's split can fall
   between the few nuclei and everything else: when it leaves under :data:`FAINT_SPLIT_FRACTION` of the field
   as cells, the rest is split once more, and that split is kept when its cells stand clear of the glass's
   noise. When the foreground is not clearly denser than the glass's pixel noise there are no
   cells (blank, featureless or out-of-focus frame). In a crop around one WBC, dense objects inside a pale
   halo (the nucleus in its cytoplasm) are nuclei, not RBCs. Holes of the foreground that are compact and
   ringed by a thin band of foreground -- the pale central pallor of RBCs -- are filled, so a ring-shaped
   RBC reads as a disc; the glass enclosed by touching cells is concave and surrounded by whole cells, and
   is left open, so a clump is not merged into one blob.
3. **Cells from the distance transform.** A local maximum of the Euclidean distance transform inside the
   foreground sits at the centre of each roughly round cell, and its value is the cell's inscribed radius;
   touching and overlapping cells in a clump keep their own maxima (the distance at a cell's centre still
   reaches its own edge), which is what makes this work where connected components do not. A first search
   (5 x 5 neighbourhood, thinned so that a ridge gives one maximum per radius of its length) gives the
   radii; a second one per candidate population uses a neighbourhood of about a cell, then non-maximum
   suppression leaves one maximum per cell. Maxima on WBC nuclei (far denser than RBCs), on the image
   border (a cell whose centre is outside) or outside the field are not measured.
4. **Size per cell, robust statistic.** The modes of the radii (a histogram of log-radius weighted by r²,
   so the many small maxima of ridges, platelets and nuclear lobes count little) are the candidate RBC
   populations, strongest first; a mode with fewer than :data:`MIN_COUNT` cells (one WBC, one clump read
   as a blob) is not a population and the next is taken. The cells with a radius of 0.7-1.4x the mode are
   measured. A cell's region is the connected part of the foreground nearest its centre (a Voronoi split
   of the clump) within :data:`REGION_CAP` radii of it, joined with its inscribed disc (where a neighbour
   overlaps it the split cuts it short). The cell's diameter is the mean of the width and height of that
   region -- the measure of the box an annotator draws, which also counts an oval cell's length and not
   only its width; a cell cut by one side of the image counts only its extent along that side, one cut by
   two is not measured. The estimate is the median over the measured cells. There is no calibration
   factor: on synthetic discs of known size (20-110 px) the estimate is 1-4% high. The one constant tuned
   on real frames (BCCD and Bio-Net training splits) is :data:`EDGE_FRACTION`.

Too few RBC-like cells (a single-cell crop on bare glass, a blank image, a field without contrast) give
``diameter_px=None`` with a ``reason``; the estimator never raises on a valid RGB uint8 image.

Known limits: WBC nuclei that are not much denser than the RBCs (BCCD's pale lymphocytes) can be measured
as one more cell (the median over the cells absorbs one); in crops around one WBC whose RBCs are much paler
than the nucleus the RBCs are not found (no estimate rather than a wrong one); the estimate follows the
cells' visible edge, so box annotations drawn inside or outside it disagree by that much (see
``benchmarks/scale_estimation.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import cv2
import numpy as np

log = logging.getLogger(__name__)

WORK_LONG_SIDE = 448
"""The long side (px) of the working copy; every image is resized to it (up or down) for the first pass."""
MIN_WORK_DIAMETER = 20.0
"""When the first pass finds RBCs smaller than this (px, working copy), it is re-run at a higher resolution."""
RERUN_WORK_DIAMETER = 40.0
"""The RBC diameter (px) the re-run aims for at its working resolution."""
MAX_WORK_PIXELS = 2048 * 1536
"""The re-run's working copy has at most this many pixels (and never more than the input)."""
MIN_DIAMETER_PX = 6.0
"""An estimate under this many pixels of the input is no estimate (no slide worth annotating images RBCs so
small; on tiny or noise images such "cells" are artefacts of upscaling)."""
MIN_COUNT = 3
"""Fewer measured RBC-like cells than this: no estimate."""
MIN_FOREGROUND_OD = 0.1
"""The median total optical density (natural log, summed over R, G, B) the foreground must have for the
image to count as having stained cells at all (the fainter BCCD RBCs have ~0.35)."""
MIN_CONTRAST_TO_NOISE = 12.0
"""... and this many times the pixel noise of the glass (:func:`_pixel_noise`): BCCD, Bio-Net and PBC frames
have >= 83, blank frames with camera noise (std 2-25 grey levels) <= 7; densely packed cells ~14 px across
(between which the glass is mostly their edges) ~18."""
OUTSIDE_OD = 10.0
"""A pixel whose total optical density exceeds this (~3% of the light in each channel; the densest WBC
nuclei reach ~6-7) is outside the field (the black surround of an eyepiece photo)."""
SPECK_AREA = 24
"""Holes of the foreground up to this many pixels (working copy) are filled without further tests."""
REGION_CAP = 1.5
"""A cell's region reaches at most this many inscribed radii from its centre."""
FOREGROUND_LOG_OFFSET = 0.3
"""Otsu's split of cells from glass is computed on ``log(total OD + FOREGROUND_LOG_OFFSET)``."""
EDGE_FRACTION = 0.34
"""A cell's edge is where the optical density falls to this fraction of the cells' median (the dense class of
Otsu's split): a fixed point on the edge profile whatever the stain's strength (chosen on the BCCD and Bio-Net
training frames; Otsu's own split sits at ~0.28-0.33 of the median there)."""
FAINT_SPLIT_FRACTION = 0.15
"""When Otsu's split leaves less of the field than this as cells (RBCs cover ~30-60% of a smear's field), it may
have split the few dense WBC nuclei from faint RBCs (a weak stain); the rest is split once more."""
FAINT_MIN_OD = 0.05
"""... and that second split's cells must have at least this median optical density (and
:data:`MIN_CONTRAST_TO_NOISE` times the glass's noise): a weak stain's RBCs have ~0.07-0.15."""
METHOD = "od-otsu-dt-voronoi"

_LOG_LUT = np.log(np.arange(256, dtype=np.float32) + 1.0)


@dataclass(frozen=True)
class ScaleEstimate:
    """The RBC diameter of one image, in the input image's pixels.

    ``diameter_px`` is None when there are too few RBCs to measure (``reason`` says why). ``count`` is the
    number of RBCs measured, ``confidence`` a 0-1 score (more cells and a narrower size distribution score
    higher), ``method`` names the estimator (with ``@scale`` when it re-ran at another working scale).
    """

    diameter_px: float | None
    count: int
    confidence: float
    method: str
    reason: str | None = None


@dataclass(frozen=True)
class _Pass:
    diameter: float | None  # px of the input image
    count: int
    confidence: float
    reason: str | None
    few_cells: bool = False  # no estimate for want of cells (they may be too small to see at this scale)


def estimate_rbc_diameter(image: np.ndarray) -> ScaleEstimate:
    """Estimate the median RBC diameter (px of ``image``) of an RGB uint8 (H, W, 3) smear image.

    See the module docstring for the method. Raises ``ValueError`` only for an input that is not an RGB
    uint8 image; any real image, blank or not, gives a :class:`ScaleEstimate`.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] < 3:
        raise ValueError(f"expected an RGB uint8 (H, W, 3) array, got {getattr(image, 'shape', None)} "
                         f"{getattr(image, 'dtype', type(image).__name__)}")
    height, width = image.shape[:2]
    if min(height, width) < 16:
        return ScaleEstimate(None, 0, 0.0, METHOD, f"image too small ({width}x{height})")
    rgb = np.ascontiguousarray(image[..., :3])
    scale = WORK_LONG_SIDE / max(height, width)
    result = _estimate_at(rgb, scale)
    method = METHOD
    max_scale = max(scale, min(1.0, float(np.sqrt(MAX_WORK_PIXELS / (height * width)))))
    rerun = None
    if result.diameter is not None and result.diameter * scale < MIN_WORK_DIAMETER:
        rerun = min(max_scale, RERUN_WORK_DIAMETER / result.diameter)
    elif result.diameter is None and result.few_cells and max_scale >= 2 * scale:
        rerun = min(max_scale, scale * 3)  # cells may be too small to see at the working size
    if rerun is not None and rerun > scale * 1.2:
        log.debug("first pass at scale %.3f: %s; re-running at %.3f", scale, result, rerun)
        second = _estimate_at(rgb, rerun)
        if second.diameter is not None or result.diameter is None:
            result = second
            method = f"{METHOD}@{rerun:.3g}"
    if result.diameter is None:
        return ScaleEstimate(None, result.count, 0.0, method, result.reason)
    if result.diameter < MIN_DIAMETER_PX:
        return ScaleEstimate(None, result.count, 0.0, method, f"cells too small to measure: {result.diameter:.1f} px "
                             f"across in the image (need >= {MIN_DIAMETER_PX:g}); not a smear at a usable scale")
    return ScaleEstimate(result.diameter, result.count, result.confidence, method, None)


def scale_factor(estimate: ScaleEstimate, target_rbc_px: float, default: float = 1.0,
                 limits: tuple[float, float] = (0.1, 4.0)) -> float:
    """The resize factor that brings the estimate's RBC diameter to ``target_rbc_px``, clamped to ``limits``;
    ``default`` (also clamped) when there is no estimate."""
    low, high = limits
    if estimate.diameter_px is None or not np.isfinite(estimate.diameter_px) or estimate.diameter_px <= 0:
        return float(min(max(default, low), high))
    return float(min(max(target_rbc_px / estimate.diameter_px, low), high))


# --- one pass at one working scale ----------------------------------------------------------------------


def _resize(rgb: np.ndarray, scale: float) -> tuple[np.ndarray, float]:
    """Resize by ``scale`` (about), fast: first an integer box-filter reduction (OpenCV's INTER_AREA fast path,
    exact when the size is a multiple of the factor), then a bilinear step of at most 1.5x either way.
    Returns the image and the exact scale it has."""
    height, width = rgb.shape[:2]
    factor = round(1 / scale) if scale < 1 else 1
    if factor >= 2:
        rgb = rgb[: height // factor * factor, : width // factor * factor]
        rgb = cv2.resize(rgb, (width // factor, height // factor), interpolation=cv2.INTER_AREA)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    step = (size[0] / rgb.shape[1], size[1] / rgb.shape[0])
    if size != (rgb.shape[1], rgb.shape[0]):
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_LINEAR)
    return rgb, (step[0] + step[1]) / (2 * factor)


def _estimate_at(rgb: np.ndarray, scale: float) -> _Pass:
    work, scale = _resize(rgb, scale)
    total, outside = _optical_density(work)
    sub = total[::2, ::2][~outside[::2, ::2]]
    if sub.size < 100:
        return _Pass(None, 0, 0.0, "no field: the image is dark all over")
    otsu = _foreground_threshold(sub)
    threshold, fg, fg_od, noise = _split(total, outside, sub, otsu)
    floor = MIN_FOREGROUND_OD
    if (fg is not None and fg_od >= max(MIN_FOREGROUND_OD, MIN_CONTRAST_TO_NOISE * noise)
            and float(np.mean(sub > otsu)) < FAINT_SPLIT_FRACTION):
        # a weak stain: Otsu may have split the few dense nuclei from everything else, faint RBCs included;
        # split what is left once more, and keep that split when it finds stained cells clear of the noise
        lower = _split(total, outside, sub, _foreground_threshold(sub[sub <= otsu]))
        if lower[1] is not None and lower[2] >= max(FAINT_MIN_OD, MIN_CONTRAST_TO_NOISE * lower[3]):
            threshold, fg, fg_od, noise = lower
            floor = FAINT_MIN_OD
    if fg is None:
        return _Pass(None, 0, 0.0, "no stained cells: no foreground/background split")
    if fg_od < floor or fg_od < MIN_CONTRAST_TO_NOISE * noise:
        # (cells only a few pixels across also look like noise: worth a look at a higher resolution)
        return _Pass(None, 0, 0.0, f"no stained cells: foreground optical density {fg_od:.3f} against pixel "
                     f"noise {noise:.3f} (blank, featureless or out-of-focus image)", few_cells=True)
    fg = cv2.morphologyEx(fg.astype(np.uint8), cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE,
                                                                                          (3, 3)))
    frac = float(fg.mean())
    if frac < 0.005:
        return _Pass(None, 0, 0.0, f"no stained cells: foreground covers {frac:.1%} of the image")
    if frac > 0.97:
        return _Pass(None, 0, 0.0, f"no glass: foreground covers {frac:.1%} of the image")
    haloed = _haloed_nuclei(total, sub, threshold, fg, outside)
    fg = _fill_pallor(fg)
    nucleus = total > _nucleus_threshold(total, fg)
    if haloed is not None:
        nucleus |= haloed
    result = _measure(fg, nucleus, outside)
    if result.diameter is None:
        return result
    return replace(result, diameter=float(result.diameter / scale))


def _split(total: np.ndarray, outside: np.ndarray, sub: np.ndarray, otsu: float
           ) -> tuple[float, np.ndarray | None, float, float]:
    """Cells against glass from Otsu's threshold ``otsu`` of the field's OD (``sub``, a subsample): the edge
    threshold (:data:`EDGE_FRACTION` of the cells' median), the foreground mask (None when there is no
    split), the foreground's median OD and the glass's pixel noise."""
    cells = sub[sub > otsu]
    threshold = EDGE_FRACTION * float(np.median(cells)) if cells.size else otsu
    fg = (total > threshold) & ~outside
    if not fg.any() or fg.all():
        return threshold, None, 0.0, 0.0
    sample = total[::2, ::2][fg[::2, ::2]]
    fg_od = float(np.median(sample if sample.size else total[fg]))
    return threshold, fg, fg_od, _pixel_noise(total, (total < 0.5 * threshold) & ~outside)


def _haloed_nuclei(total: np.ndarray, sub: np.ndarray, threshold: float, fg: np.ndarray,
                   outside: np.ndarray) -> np.ndarray | None:
    """The foreground that is a WBC nucleus by context, in a field with few dense objects (a crop around
    one WBC): there Otsu may split the dense nucleus (lobes) from everything else, and the lobes are
    RBC-sized discs. When a pale class (a WBC's cytoplasm, pale RBCs) stands clearly apart from the glass
    below the threshold, dense objects that lie inside a pale region at least twice their area, and at least
    4x denser on average than the rest of it, are nuclei in their cytoplasm. ``sub`` is a subsample of the
    optical density inside the field. Returns that mask, or None when the rule does not apply."""
    dense = sub > threshold
    if not dense.any() or np.count_nonzero(dense) >= 0.2 * sub.size:
        return None
    below = sub[~dense]
    pale_threshold = _foreground_threshold(below)
    pale = below[below > pale_threshold]
    if pale.size < 0.02 * sub.size or np.median(sub[dense]) < 5 * np.median(pale):
        return None
    n, regions = cv2.connectedComponents(((total > pale_threshold) & ~outside).view(np.uint8), connectivity=8)
    inner = fg > 0
    dense_area = np.bincount(regions[inner], minlength=n)
    dense_od = np.bincount(regions[inner], weights=total[inner], minlength=n)
    halo = ~inner & (regions > 0)
    halo_area = np.bincount(regions[halo], minlength=n)
    halo_od = np.bincount(regions[halo], weights=total[halo], minlength=n)
    # a nucleus in its cytoplasm: the halo is larger than the dense part and far fainter (unlike an RBC's
    # pale centre or blurred edge around its rim)
    haloed = ((dense_area > 0) & (halo_area >= dense_area)
              & (dense_od * np.maximum(halo_area, 1) >= 4 * halo_od * np.maximum(dense_area, 1)))
    haloed[0] = False
    return haloed[regions] & inner


def _pixel_noise(total: np.ndarray, glass: np.ndarray) -> float:
    """The pixel noise of the optical density: a robust standard deviation (1.4826 x the median absolute
    deviation) of its high-pass (minus a 3x3 mean) over the clear glass. That is the camera's noise on a
    smear, whatever the size of its cells, and the whole signal on a blank frame."""
    detail = (total - cv2.blur(total, (3, 3)))[::2, ::2][glass[::2, ::2]]
    if detail.size < 50:
        return 0.0
    return float(1.4826 * np.median(np.abs(detail - np.median(detail))))


def _optical_density(work: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Total optical density (summed over R, G, B) against a fitted background (illumination) surface,
    float32 (H, W), and the mask of pixels outside the field.

    ``sum_c log(bg_c / I_c) = sum_c log bg_c - log(R G B)``, so one surface fitted to the channel sum of log
    intensity is the whole flat field, whatever the glass's tint."""
    height, width = work.shape[:2]
    log_sum = cv2.transform(cv2.LUT(work, _LOG_LUT), np.ones((1, 3), np.float32))
    coarse = cv2.resize(log_sum, (max(8, width // 4), max(8, height // 4)), interpolation=cv2.INTER_AREA)
    # the glass is the brightest thing on a smear: start from the brightest 30%, then refit on what the
    # surface calls glass (under half the foreground threshold)
    surface = _fit_background(coarse, coarse >= np.percentile(coarse, 70))
    for _ in range(2):
        total = np.maximum(surface - coarse, 0.0)
        glass = total < max(0.5 * _foreground_threshold(total), 0.03)
        if glass.mean() < 0.05:
            break
        surface = _fit_background(coarse, glass)
    surface = cv2.resize(surface, (width, height), interpolation=cv2.INTER_LINEAR)
    total = cv2.max(cv2.subtract(surface, log_sum), 0.0)
    return total, total > OUTSIDE_OD


def _fit_background(coarse: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """A quadratic surface in (x, y) fitted to ``coarse`` over the background pixels (one re-fit without
    the 20% largest residuals), evaluated on the coarse grid."""
    height, width = bg.shape
    ys, xs = np.nonzero(bg)
    values = coarse[ys, xs].astype(np.float64)
    if values.size < 24:
        level = np.median(values) if values.size else np.percentile(coarse, 90)
        return np.full(coarse.shape, level, np.float32)
    u = xs / width - 0.5
    v = ys / height - 0.5
    design = np.stack([np.ones_like(u), u, v, u * u, u * v, v * v], axis=1)
    coef = _least_squares(design, values)
    resid = np.abs(values - design @ coef)
    keep = resid <= np.percentile(resid, 80)
    if keep.sum() >= 24:
        coef = _least_squares(design[keep], values[keep])
    gu = np.arange(width) / width - 0.5
    gv = (np.arange(height) / height - 0.5)[:, None]
    surface = coef[0] + coef[1] * gu + coef[2] * gv + coef[3] * gu * gu + coef[4] * gv * gu + coef[5] * gv * gv
    return surface.astype(np.float32)


def _least_squares(design: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Least squares by the normal equations (6 unknowns; much cheaper than ``lstsq``'s SVD)."""
    gram = design.T @ design + 1e-9 * np.eye(design.shape[1])
    return np.linalg.solve(gram, design.T @ values)


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold of a float array (values clipped to [min, 99.5th percentile], 256 bins)."""
    flat = values.ravel().astype(np.float64)
    low = float(flat.min())
    high = float(np.percentile(flat, 99.5))
    if high - low <= 1e-5 * max(1.0, abs(low), abs(high)):
        return low
    hist, edges = np.histogram(flat, bins=256, range=(low, high))
    hist = hist.astype(np.float64)
    hist[-1] += np.count_nonzero(flat > high)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def _foreground_threshold(total: np.ndarray) -> float:
    """Otsu's threshold of the total OD, computed on ``log(OD + FOREGROUND_LOG_OFFSET)``: the compression
    keeps the few, very dense WBC nuclei from pulling the split above the RBCs (glass ~0, RBCs ~0.3-1.5,
    nuclei ~2-6), and the offset keeps the glass's noise from spreading over the low end."""
    return float(np.exp(_otsu(np.log(total + FOREGROUND_LOG_OFFSET))) - FOREGROUND_LOG_OFFSET)


def _nucleus_threshold(total: np.ndarray, fg: np.ndarray) -> float:
    """WBC nuclei (and platelets) absorb far more than RBCs: Otsu's split of the foreground's OD, but at
    least 1.8x the foreground's median."""
    values = total[::2, ::2][fg[::2, ::2] > 0]
    if values.size < 16:
        values = total[fg > 0]
    return max(_otsu(values), 1.8 * float(np.median(values)))


def _fill_pallor(fg: np.ndarray) -> np.ndarray:
    """Fill the central pallor of RBCs: the holes of ``fg`` (glass not connected to the image border, under
    1% of the image) that are

    - compact: they fill at least 45% of their bounding box (a pale centre is round or oval; the glass
      enclosed by touching cells is bounded by their convex edges, so it is concave and fills ~20%), and
    - inside one cell: filled, the hole becomes the middle of a disc whose distance-transform value ``v`` at
      the hole is at least 1.5x the largest value of the unfilled foreground within ``v`` of the hole. Around
      a pallor that foreground is a thin ring (its distance transform peaks at half the ring's width, well
      under the cell's radius ``v``); around glass enclosed by a clump it is whole cells, whose distance
      transform within ``v`` grows to ``v``.

    Filling a gap would merge a clump of cells into one blob; leaving a pallor open would split an RBC
    into a ring of small maxima. Holes up to :data:`SPECK_AREA` pixels are filled whatever their shape: a
    small gap far from the cells' centres hardly moves their distance-transform maxima."""
    inv = (fg == 0).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(inv, connectivity=4)
    if n <= 1:
        return fg
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    area = stats[:, cv2.CC_STAT_AREA]
    hole = np.ones(n, bool)
    hole[border] = False
    hole &= area < 0.01 * fg.size
    box_w, box_h = stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT]
    fill = hole & (area <= SPECK_AREA)
    candidates = np.flatnonzero(hole & (area > SPECK_AREA) & (area >= 0.45 * box_w * box_h))
    if candidates.size:
        code = np.zeros(n, np.uint8)
        code[fill] = 1
        code[candidates] = 1
        trial = fg | code[labels]
        filled_dist = cv2.distanceTransform(trial, cv2.DIST_L2, 3)
        open_dist = cv2.distanceTransform(fg, cv2.DIST_L2, 3)
        height, width = fg.shape
        left, top = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
        for k in candidates:
            x, y, w, h = left[k], top[k], box_w[k], box_h[k]
            own = labels[y:y + h, x:x + w] == k
            v = float(filled_dist[y:y + h, x:x + w][own].max())
            pad = int(np.ceil(v)) + 1
            x0, y0, x1, y1 = max(0, x - pad), max(0, y - pad), min(width, x + w + pad), min(height, y + h + pad)
            away = (labels[y0:y1, x0:x1] != k).view(np.uint8)
            band = cv2.distanceTransform(away, cv2.DIST_L2, 3) <= v
            fill[k] = v >= 1.5 * float(open_dist[y0:y1, x0:x1][band].max())
    if not fill.any():
        return fg
    out = fg.copy()
    out[fill[labels]] = 1
    return out


def _peaks(dist: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The distance transform's local maxima over a ``size`` x ``size`` neighbourhood (value >= 2 px):
    (xs, ys, radii, on_border). A maximum on the image border is a cell whose centre lies outside (OpenCV's
    distance transform treats the outside as foreground); a cut cell whose centre is inside keeps its
    full radius."""
    peaks = (dist >= cv2.dilate(dist, np.ones((size, size), np.uint8))) & (dist >= 2.0)
    ys, xs = np.nonzero(peaks)
    height, width = dist.shape
    on_border = (xs < 2) | (ys < 2) | (xs >= width - 2) | (ys >= height - 2)
    return xs, ys, dist[ys, xs], on_border


def _measure(fg: np.ndarray, nucleus: np.ndarray, outside: np.ndarray) -> _Pass:
    """Cell sizes from the distance transform's maxima and the Voronoi split of the foreground (see the
    module docstring), in px of the working copy.

    The first search's radii may have more than one mode (the RBCs; a WBC or a clump read as one blob;
    half-cells where a pallor stayed open): each strong mode is a candidate population, tried strongest
    first. The next one is tried only when the stronger one is not a population at all (fewer than
    ``MIN_COUNT`` cells of that size, such as one WBC); when it is one but too few of its cells can be
    measured (cut by the image's corners), there is no estimate rather than one from the debris."""
    dist = cv2.distanceTransform(fg, cv2.DIST_L2, 5)
    xs, ys, radii, on_border = _peaks(dist, 5)
    keep = _suppress(xs, ys, radii)  # a ridge (an open ring, a thin bridge) gives one maximum per radius
    xs, ys, radii, on_border = xs[keep], ys[keep], radii[keep], on_border[keep]
    ok = ~on_border & ~nucleus[ys, xs] & ~outside[ys, xs]
    if np.count_nonzero(ok) < MIN_COUNT:
        return _Pass(None, int(np.count_nonzero(ok)), 0.0,
                     f"too few RBC-like cells ({np.count_nonzero(ok)} round objects, need >= {MIN_COUNT})", True)
    diameters = np.empty(0)
    for mode in _log_modes(radii[ok]):
        cx, cy, cr, central = _cells_near(dist, nucleus, outside, mode)
        if np.count_nonzero(central) < MIN_COUNT:
            continue
        diameters = _region_diameters(fg, outside, cx, cy, cr, central)
        break
    if diameters.size < MIN_COUNT:
        return _Pass(None, diameters.size, 0.0, f"too few RBC-like cells ({diameters.size} of similar size that "
                     f"can be measured, need >= {MIN_COUNT})", True)
    diameter = float(np.median(diameters))
    q1, q3 = np.percentile(diameters, [25, 75])
    spread = float((q3 - q1) / diameter)
    confidence = min(1.0, diameters.size / 15) * float(np.clip(1 - 2.5 * spread, 0.0, 1.0))
    return _Pass(diameter, int(diameters.size), round(confidence, 3), None)


def _cells_near(dist: np.ndarray, nucleus: np.ndarray, outside: np.ndarray,
                mode: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The cells of a population of radius ~``mode``: one maximum per cell (a neighbourhood of about a cell,
    then non-maximum suppression), as (xs, ys, radii, central) where ``central`` marks those to measure:
    radius 0.7-1.4x the mode (re-centred on their median), not on a nucleus, the border or outside."""
    xs, ys, radii, on_border = _peaks(dist, 2 * max(2, round(0.5 * mode)) + 1)
    keep = _suppress(xs, ys, radii)
    xs, ys, radii, on_border = xs[keep], ys[keep], radii[keep], on_border[keep]
    ok = ~on_border & ~nucleus[ys, xs] & ~outside[ys, xs]
    central = ok & (radii >= 0.7 * mode) & (radii <= 1.4 * mode)
    if central.any():
        mode = float(np.median(radii[central]))
        central = ok & (radii >= 0.7 * mode) & (radii <= 1.4 * mode)
    return xs, ys, radii, central


def _region_diameters(fg: np.ndarray, outside: np.ndarray, xs: np.ndarray, ys: np.ndarray, radii: np.ndarray,
                      selected: np.ndarray) -> np.ndarray:
    """(width + height) / 2 of each selected cell: the bounding box of its region (the foreground pixels
    nearer its centre than any other cell's, within ``REGION_CAP`` radii) and of its inscribed disc (where
    it overlaps a neighbour the split cuts it, but the distance transform at its centre still reaches its
    own edge). A cell cut by the left or right side of the image gives its height only, one cut by the top
    or bottom its width only; one cut both ways, or touching the outside of the field, is skipped."""
    seeds = np.ones(fg.shape, np.uint8)
    seeds[ys, xs] = 0
    near, labels = cv2.distanceTransformWithLabels(seeds, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_CCOMP)
    height, width = fg.shape
    count = int(labels.max()) + 1
    cap = np.zeros(count, np.float32)
    cap[labels[ys, xs]] = REGION_CAP * radii
    region = (fg > 0) & (near <= cap[labels])
    # cut the foreground along the Voronoi boundaries; each cell's region is then the connected piece
    # that holds its centre, and OpenCV's component statistics give its bounding box
    region[:, 1:] &= labels[:, 1:] == labels[:, :-1]
    region[1:, :] &= labels[1:, :] == labels[:-1, :]
    region[ys, xs] = True
    _, pieces, stats, _ = cv2.connectedComponentsWithStats(region.view(np.uint8), connectivity=4)
    chosen = np.flatnonzero(selected)
    piece = pieces[ys[chosen], xs[chosen]]
    left, top = stats[piece, cv2.CC_STAT_LEFT], stats[piece, cv2.CC_STAT_TOP]
    right = left + stats[piece, cv2.CC_STAT_WIDTH] - 1
    bottom = top + stats[piece, cv2.CC_STAT_HEIGHT] - 1
    # a cell cut by a side of the image (its centre inside) keeps its full extent along that side
    cut_x = (left == 0) | (right == width - 1)
    cut_y = (top == 0) | (bottom == height - 1)
    ok = ~(cut_x & cut_y)
    if outside.any():
        blocked = cv2.dilate(outside.view(np.uint8), np.ones((3, 3), np.uint8)) > 0
        touching = np.zeros(int(pieces.max()) + 1, bool)
        touching[pieces[blocked]] = True
        touching[0] = False
        ok &= ~touching[piece]
    x, y, r = (a[chosen].astype(np.float64) for a in (xs, ys, radii))
    r = r - 1  # the distance transform counts to the first glass pixel; the cell's last pixel is one nearer
    w = np.maximum(right, x + r) - np.minimum(left, x - r) + 1
    h = np.maximum(bottom, y + r) - np.minimum(top, y - r) + 1
    diameter = np.where(cut_x, h, np.where(cut_y, w, (w + h) / 2))
    return diameter[ok]


def _suppress(xs: np.ndarray, ys: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Greedy non-maximum suppression: the largest maxima first; a maximum closer than 0.8x the kept
    radius to a kept one belongs to the same cell. Returns the indices kept."""
    order = np.argsort(-radii, kind="stable")
    px = xs[order].astype(np.float32)
    py = ys[order].astype(np.float32)
    pr = radii[order].astype(np.float32)
    alive = np.ones(order.size, bool)
    for i in range(order.size):
        if not alive[i]:
            continue
        rest = slice(i + 1, None)
        close = (px[rest] - px[i]) ** 2 + (py[rest] - py[i]) ** 2 < (0.8 * pr[i]) ** 2
        alive[rest] &= ~close
    return order[alive]


def _log_modes(radii: np.ndarray, limit: int = 3, bandwidth: float = 0.08) -> list[float]:
    """The modes of the radii, strongest first: the local maxima of a histogram of log-radius weighted by r²
    (small ridge and debris maxima count less), smoothed by a Gaussian of ``bandwidth`` (log units), that
    reach 30% of the strongest and lie at least 1.3x apart; at most ``limit``."""
    logs = np.log(radii.astype(np.float64))
    low, high = logs.min() - 3 * bandwidth, logs.max() + 3 * bandwidth
    bins = max(16, int(np.ceil((high - low) / (bandwidth / 4))))
    hist, edges = np.histogram(logs, bins=bins, range=(low, high), weights=radii.astype(np.float64) ** 2)
    taps = np.arange(-12, 13)
    density = np.convolve(hist, np.exp(-0.5 * (taps / 4.0) ** 2), mode="same")
    centres = (edges[:-1] + edges[1:]) / 2
    padded = np.concatenate([[-1.0], density, [-1.0]])
    peaks = np.flatnonzero((density >= padded[:-2]) & (density > padded[2:]) & (density >= 0.3 * density.max()))
    modes: list[float] = []
    for k in peaks[np.argsort(-density[peaks], kind="stable")]:
        if all(abs(centres[k] - np.log(m)) >= np.log(1.3) for m in modes):
            modes.append(float(np.exp(centres[k])))
        if len(modes) == limit:
            break
    return modes
