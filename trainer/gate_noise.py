"""How much of a candidate's change on the validation frames the frames themselves can make (the retrain gate).

A lab's first retrains judge a candidate on a handful of validation frames (3-9 in the correction-effort
benchmark), where one frame moves mask AP by several points. A fixed allowance then refuses improvements on
luck alone: there, 6 of 18 candidates were refused, and the ranked order's first candidate in every seed. The
standard error of the difference ``current - candidate``, from a paired delete-group jackknife over the frames
(each group of frames left out in turn, both models scored on the rest with the same COCO evaluation), says how
large a drop the choice of frames alone makes. Paired: both models are scored on the same frames, so what the
frames share cancels; a candidate that is worse on every frame has a small standard error and is still refused.
"""

from __future__ import annotations

import numpy as np

from trainer.evaluate import evaluate_predictions
from wbc_core.data.types import AnnotatedDataset, DatasetError
from wbc_core.detect import Detection
from wbc_core.labels import LabelMap

JACKKNIFE_GROUPS = 20
"""At most this many groups of frames are left out in turn (each costs two COCO evaluations per model)."""
METRICS = ("mask_ap", "box_ap", "mask_ap_any", "box_ap_any")


def gated_values(data: AnnotatedDataset, predictions: list[Detection], label_map: LabelMap) -> dict[str, float]:
    """The retrain gate's detection metrics of ``predictions`` on ``data`` (``*_any``: class-agnostic)."""
    m = evaluate_predictions(data, predictions, label_map)
    out = {"mask_ap": m["segm"]["AP"], "box_ap": m["bbox"]["AP"]}
    if len(label_map.classes) > 1:
        a = evaluate_predictions(data, predictions, label_map, class_agnostic=True)
        out.update(mask_ap_any=a["segm"]["AP"], box_ap_any=a["bbox"]["AP"])
    else:
        out.update(mask_ap_any=out["mask_ap"], box_ap_any=out["box_ap"])
    return out


def paired_jackknife_se(data: AnnotatedDataset, candidate: list[Detection], current: list[Detection],
                        label_map: LabelMap, groups: int = JACKKNIFE_GROUPS) -> dict[str, float]:
    """Standard error of ``current - candidate`` for each of :data:`METRICS` over the frames of ``data``
    (``candidate`` and ``current``: each model's detections, one per frame, in the same order). Empty when there
    are fewer than two groups of frames with cells to score."""
    n = len(data.images)
    if len(candidate) != n or len(current) != n:
        raise ValueError(f"need one detection per frame: {n} frames, {len(candidate)} and {len(current)} detections")
    if n < 2:
        return {}
    frames = np.arange(n)
    diffs: list[dict[str, float]] = []
    for fold in np.array_split(frames, min(groups, n)):
        keep = [int(i) for i in np.setdiff1d(frames, fold)]
        rest = AnnotatedDataset(images=[data.images[i] for i in keep], labels=list(data.labels),
                                source=data.source)
        try:
            cur = gated_values(rest, [current[i] for i in keep], label_map)
            cand = gated_values(rest, [candidate[i] for i in keep], label_map)
        except DatasetError:  # the frames left have no cell to score
            continue
        diffs.append({k: cur[k] - cand[k] for k in METRICS})
    g = len(diffs)
    if g < 2:
        return {}
    out = {}
    for k in METRICS:
        v = np.array([d[k] for d in diffs], np.float64)
        out[k] = float(np.sqrt((g - 1) / g * np.sum((v - v.mean()) ** 2)))
    return out
