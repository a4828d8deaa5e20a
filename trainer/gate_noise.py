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
from wbc_core.data.types import UNEDITED_SOURCE, AnnotatedDataset, DatasetError
from wbc_core.detect import Detection
from wbc_core.labels import LabelMap

JACKKNIFE_GROUPS = 20
"""At most this many groups of frames are left out in turn (each costs two COCO evaluations per model)."""
METRICS = ("mask_ap", "box_ap", "mask_ap_any", "box_ap_any", "found_any")


def ignored_sources(data: AnnotatedDataset, ignore_unedited: bool = True) -> tuple[str, ...]:
    """The ``source`` values the gate leaves out of its outline scores on ``data``.

    A cell the expert left as the function drew it keeps that model's outline as its "truth": scored against it,
    the model that drew it wins every such cell at IoU 1.0 and any other model loses it at the strict IoU
    thresholds, so the gate would favour the incumbent on exactly the cells nobody checked closely. Those cells
    are ignored regions in the outline scores (``*_ap*``) and still count in ``found_any`` (finding a cell at
    IoU 0.5 does not depend on whose outline it was). Empty when ``data`` has no unedited cell. When every cell
    is unedited there is no outline to judge a candidate on: :func:`gated_values` then gives ``found_any`` alone
    (scoring them anyway refused candidates for not drawing the incumbent's outlines)."""
    if not ignore_unedited:
        return ()
    unedited = any(c.source == UNEDITED_SOURCE for rec in data.images for c in rec.outlined())
    return (UNEDITED_SOURCE,) if unedited else ()


OUTLINES_NOT_JUDGED = "no cell here was redrawn or drawn by the expert: outlines not judged, only found_any"
"""Why :func:`gated_values` gives no outline score (the gate says it, rather than skipping the metric quietly)."""


def gated_values(data: AnnotatedDataset, predictions: list[Detection], label_map: LabelMap,
                 ignore_sources: tuple[str, ...] = ()) -> dict[str, float | int | str]:
    """The retrain gate's detection metrics of ``predictions`` on ``data``: ``*_any`` class-agnostic; cells
    whose source is in ``ignore_sources`` left out of every metric but ``found_any`` (class-agnostic box AP50 over
    all cells); see :func:`ignored_sources`. Also how many cells were scored and how many ignored. When every
    cell is ignored: ``found_any``, the counts and ``not_judged`` (:data:`OUTLINES_NOT_JUDGED`) only."""
    every = evaluate_predictions(data, predictions, label_map, class_agnostic=True)
    cells = [c for rec in data.images for c in rec.outlined()]
    if cells and all(c.source in ignore_sources for c in cells):
        return {"found_any": every["bbox"]["AP50"], "scored_cells": 0, "ignored_cells": len(cells),
                "not_judged": OUTLINES_NOT_JUDGED}
    m = evaluate_predictions(data, predictions, label_map, ignore_sources=ignore_sources)
    out: dict[str, float | int | str] = {"mask_ap": m["segm"]["AP"], "box_ap": m["bbox"]["AP"],
                                         "scored_cells": m["gt_cells"], "ignored_cells": m["ignored_cells"]}
    if len(label_map.classes) > 1:
        a = evaluate_predictions(data, predictions, label_map, class_agnostic=True, ignore_sources=ignore_sources)
        out.update(mask_ap_any=a["segm"]["AP"], box_ap_any=a["bbox"]["AP"])
    else:
        out.update(mask_ap_any=out["mask_ap"], box_ap_any=out["box_ap"])
    out["found_any"] = every["bbox"]["AP50"]
    return out


def paired_jackknife_se(data: AnnotatedDataset, candidate: list[Detection], current: list[Detection],
                        label_map: LabelMap, groups: int = JACKKNIFE_GROUPS,
                        ignore_sources: tuple[str, ...] = ()) -> dict[str, float]:
    """Standard error of ``current - candidate`` for each of :data:`METRICS` over the frames of ``data``
    (``candidate`` and ``current``: each model's detections, one per frame, in the same order; ``ignore_sources``
    as in :func:`gated_values`). A metric is left out when fewer than two groups of frames leave cells to score
    it on."""
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
            cur = gated_values(rest, [current[i] for i in keep], label_map, ignore_sources)
            cand = gated_values(rest, [candidate[i] for i in keep], label_map, ignore_sources)
        except DatasetError:  # the frames left have no cell to score
            continue
        diffs.append({k: float(cur[k]) - float(cand[k]) for k in METRICS if k in cur and k in cand})
    out = {}
    for k in METRICS:
        v = np.array([d[k] for d in diffs if k in d], np.float64)
        g = len(v)
        if g >= 2:      # a metric scored on fewer than two of the subsets has no standard error
            out[k] = float(np.sqrt((g - 1) / g * np.sum((v - v.mean()) ** 2)))
    return out
