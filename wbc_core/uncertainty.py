"""How unsure the pipeline is about a frame, from what ``detect`` already computes (issue 14's candidate signals).

Active learning asks the expert to correct first the frames the model would learn most from. These signals
are cheap, per frame, and come from the ``detect`` contract's output (plus, optionally, one more ``detect`` on
the mirrored frame):

- ``near_threshold``: cells kept with a score within ``margin`` above the threshold (at most half the way from the
  threshold to 1), plus one when the best rejected candidate scored within ``margin`` below it (a cell the
  expert may have to add);
- ``low_score``: the same idea as a number: the sum over kept cells of 1 - score, plus the best rejected
  candidate's score;
- ``mask_fuzziness``: the sum over kept cells of :func:`wbc_core.detect.mask_fuzziness` (the share of the mask
  head's probability map between 0.25 and 0.75: an outline the expert may have to redraw);
- ``disagreement``: cells whose label the classifier overrode (``decided_by=classifier``);
- ``low_classifier_confidence``: cells whose classifier probability is under 0.5;
- ``flip_unmatched``: cells of the frame and of its mirror image that find no partner in the other (box IoU
  < 0.5): an unstable count;
- ``flip_outline``: the sum over the frame's cells of 1 - the mask IoU with their partner in the mirror image
  (1 for a cell without one): an outline that moves when the frame is mirrored is one the expert may redraw.

Which of them predict the expert's edits is measured by ``benchmarks/correction_effort.py``; :func:`rank` orders
frames by a weighted sum of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from wbc_core.data.masks import crop_mask_iou
from wbc_core.detect import Cell, Detection, Predictor
from wbc_core.matching import box_iou, greedy_pairs

SIGNALS = ("near_threshold", "low_score", "mask_fuzziness", "disagreement", "low_classifier_confidence",
           "flip_unmatched", "flip_outline")
#: How much each signal counts in a frame's score (what ``cvat_sync rank`` uses unless told otherwise).
DEFAULT_WEIGHTS: dict[str, float] = {name: 1.0 for name in SIGNALS}


@dataclass
class FrameUncertainty:
    cells: int = 0
    near_threshold: int = 0
    low_score: float = 0.0
    mask_fuzziness: float = 0.0
    disagreement: int = 0
    low_classifier_confidence: int = 0
    flip_unmatched: int | None = None   # None when the mirror pass was not run
    flip_outline: float | None = None   # None when the mirror pass was not run

    def score(self, weights: Mapping[str, float] | None = None) -> float:
        """Weighted sum of the raw signals (default: each 1); :func:`rank` scales them first."""
        weights = weights or {}
        return float(sum(weights.get(name, 1.0) * (getattr(self, name) or 0) for name in SIGNALS))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def unmatched(boxes: np.ndarray, other: np.ndarray, min_iou: float = 0.5) -> int:
    """Boxes of either list with no partner (IoU >= ``min_iou``, one-to-one, best pairs first) in the other."""
    return len(boxes) + len(other) - 2 * len(greedy_pairs(box_iou(boxes, other), min_iou))


def boxes_of(cells: Sequence[Cell]) -> np.ndarray:
    return np.array([c.box for c in cells], float).reshape(-1, 4)


def mirrored_boxes(cells: Sequence[Cell], width: int) -> np.ndarray:
    """Boxes of cells found on the left-right mirror of a ``width``-px frame, in the frame's coordinates."""
    return np.array([(width - c.box[2], c.box[1], width - c.box[0], c.box[3]) for c in cells], float).reshape(-1, 4)


def mirrored_back(cell: Cell, width: int) -> tuple[np.ndarray, tuple[int, int]]:
    """A cell found on the left-right mirror of a ``width``-px frame, as a mask crop and origin in the frame."""
    left, top = cell.origin
    return np.ascontiguousarray(cell.mask_crop[:, ::-1]), (width - left - cell.mask_crop.shape[1], top)


def outline_instability(cells: Sequence[Cell], mirrored: Sequence[Cell], width: int, min_iou: float = 0.5) -> float:
    """Sum over ``cells`` of 1 - the mask IoU with their partner among ``mirrored`` (cells found on the mirror
    image, paired by box IoU >= ``min_iou``, one-to-one): 0 when every outline survives the mirror exactly."""
    total = float(len(cells))
    for i, j in greedy_pairs(box_iou(boxes_of(cells), mirrored_boxes(mirrored, width)), min_iou):
        crop, origin = mirrored_back(mirrored[j], width)
        total -= crop_mask_iou(cells[i].mask_crop, cells[i].origin, crop, origin)
    return total


def from_detection(detection: Detection, margin: float = 0.1) -> FrameUncertainty:
    """The signals one ``detect`` result carries (no mirror pass)."""
    thr = detection.threshold
    out = FrameUncertainty(cells=len(detection.cells))
    above = min(margin, (1.0 - thr) / 2)  # at threshold 0.9 every kept cell would be "within 0.1"
    out.near_threshold = sum(1 for c in detection.cells if c.score < thr + above)
    if detection.best_below is not None and detection.best_below >= thr - margin:
        out.near_threshold += 1
    out.low_score = round(sum(1.0 - c.score for c in detection.cells) + (detection.best_below or 0.0), 4)
    out.mask_fuzziness = round(sum(c.mask_fuzziness for c in detection.cells), 4)
    for cell in detection.cells:
        if cell.attributes.get("decided_by") == "classifier":
            out.disagreement += 1
        prob = cell.attributes.get("classifier_score")
        if prob is not None and float(prob) < 0.5:
            out.low_classifier_confidence += 1
    return out


def frame_uncertainty(predictor: Predictor, image: np.ndarray, threshold: float | None = None,
                      margin: float = 0.1, mirror: bool = True) -> tuple[Detection, FrameUncertainty]:
    """``detect`` on ``image`` (RGB uint8, native resolution) and its signals; with ``mirror``, one more ``detect``
    on the left-right mirror image, whose cells are compared with the frame's (``flip_unmatched``, ``flip_outline``)."""
    detection = predictor.detect(image, threshold)
    signals = from_detection(detection, margin)
    if mirror:
        flipped = predictor.detect(np.ascontiguousarray(image[:, ::-1]), threshold)
        w = image.shape[1]
        signals.flip_unmatched = unmatched(boxes_of(detection.cells), mirrored_boxes(flipped.cells, w))
        signals.flip_outline = round(outline_instability(detection.cells, flipped.cells, w), 4)
    return detection, signals


def scores(signals: Sequence[FrameUncertainty], weights: Mapping[str, float] | None = None) -> list[float]:
    """Each frame's score among ``signals``: the weighted sum of its signals, each divided by that signal's
    largest value over these frames (signals are counts and fractions on different scales; each counts at most
    its weight, and a signal that is 0 everywhere adds nothing)."""
    weights = weights or DEFAULT_WEIGHTS
    tops = {name: max((float(getattr(s, name) or 0) for s in signals), default=0.0) for name in SIGNALS}
    return [float(sum(weights.get(name, 1.0) * float(getattr(s, name) or 0) / tops[name]
                      for name in SIGNALS if tops[name] > 0)) for s in signals]


def rank(signals: Sequence[tuple[str, FrameUncertainty]], weights: Mapping[str, float] | None = None
         ) -> list[tuple[str, float]]:
    """Frames (name, signals) ordered most uncertain first (:func:`scores`); ties keep the given order."""
    scored = list(zip([name for name, _ in signals], scores([s for _, s in signals], weights), strict=True))
    return sorted(scored, key=lambda item: -item[1])
