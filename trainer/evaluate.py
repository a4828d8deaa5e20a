"""COCO evaluation (pycocotools) of a bundle on annotated frames, at native resolution.

Predictions come from :class:`wbc_core.detect.Predictor` (the same code CVAT's function runs);
ground truth is rasterised at each frame's native size. Writes ``metrics.json`` with bbox and segm
AP, AP50, AP75, per-class AP, and overlay PNGs (ground truth green, predictions magenta).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from wbc_core.atomic import atomic_write_bytes
from wbc_core.data.masks import coco_rle_encode
from wbc_core.data.types import AnnotatedDataset, DatasetError
from wbc_core.detect import Detection, Predictor
from wbc_core.labels import LabelMap
from wbc_core.overlay import draw_overlay, save_png

log = logging.getLogger(__name__)


def _coco_stats(gt: COCO, dets: list[dict], iou_type: str, class_names: list[str]) -> dict[str, Any]:
    if not dets:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "per_class": {n: 0.0 for n in class_names}}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = ev.stats
    precision = ev.eval["precision"]  # [T, R, K, A, M]
    per_class = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        per_class[class_names[cat_id - 1]] = float(p.mean()) if p.size else None
    return {"AP": float(stats[0]), "AP50": float(stats[1]), "AP75": float(stats[2]),
            "AR100": float(stats[8]), "per_class": per_class}


def evaluate_predictions(data: AnnotatedDataset, predictions: list[Detection], label_map: LabelMap,
                         class_agnostic: bool = False, ignore_sources: Collection[str] = ()) -> dict[str, Any]:
    """COCO bbox/segm metrics of ``predictions`` (one per frame, same order) against ``data``.

    True cells whose ``source`` is in ``ignore_sources`` are COCO crowd regions: they are not scored, and a
    detection on one counts neither as found nor as false (``ignored_cells`` says how many)."""
    classes = ["cell"] if class_agnostic else list(label_map.classes)
    images, annotations, dets = [], [], []
    ann_id, ignored = 1, 0
    for img_id, (rec, pred) in enumerate(zip(data.images, predictions, strict=True), start=1):
        images.append({"id": img_id, "width": rec.width, "height": rec.height, "file_name": rec.name})
        for inst in rec.outlined():
            cid = label_map.class_id(inst.label)
            if cid is None:
                continue
            mask = inst.to_mask(rec.height, rec.width)
            area = int(mask.sum())
            if area == 0:
                continue
            ys, xs = np.nonzero(mask)
            crowd = int(inst.source in ignore_sources)
            ignored += crowd
            annotations.append({"id": ann_id, "image_id": img_id, "category_id": 1 if class_agnostic else cid,
                                "segmentation": coco_rle_encode(mask), "area": area, "iscrowd": crowd,
                                "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                                         float(ys.max() - ys.min() + 1)]})
            ann_id += 1
        for cell in pred.cells:
            if class_agnostic:
                cid = 1
            else:
                cid = label_map.class_id(cell.label)
                if cid is None:
                    continue
            mask = cell.full_mask(rec.height, rec.width)
            x0, y0, x1, y1 = cell.box
            dets.append({"image_id": img_id, "category_id": cid, "score": cell.score,
                         "segmentation": coco_rle_encode(mask), "bbox": [x0, y0, x1 - x0, y1 - y0]})
    if not annotations:
        raise DatasetError("no ground-truth cells to evaluate against (are the labels in the label map?)")
    if ignored == len(annotations):
        raise DatasetError(f"all {ignored} ground-truth cells have a source in {sorted(ignore_sources)} and are "
                           "ignored: nothing left to score")
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations,
                  "categories": [{"id": i + 1, "name": n} for i, n in enumerate(classes)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return {"bbox": _coco_stats(gt, dets, "bbox", classes), "segm": _coco_stats(gt, dets, "segm", classes),
            "images": len(images), "gt_cells": len(annotations) - ignored, "ignored_cells": ignored,
            "detections": len(dets)}


def evaluate_bundle(predictor: Predictor, data: AnnotatedDataset, label_map: LabelMap, out_dir: Path | None = None,
                    overlays: int = 4, class_agnostic: bool = False, threshold: float | None = 0.05,
                    progress: bool = True) -> dict[str, Any]:
    """Predict every frame of ``data`` and score it. ``threshold`` is low by default: AP wants the
    whole precision-recall curve, not the deployment threshold."""
    return evaluate_bundle_with_predictions(predictor, data, label_map, out_dir, overlays, class_agnostic,
                                            threshold, progress)[0]


def evaluate_bundle_with_predictions(predictor: Predictor, data: AnnotatedDataset, label_map: LabelMap,
                                     out_dir: Path | None = None, overlays: int = 4, class_agnostic: bool = False,
                                     threshold: float | None = 0.05, progress: bool = True
                                     ) -> tuple[dict[str, Any], list[Detection]]:
    """:func:`evaluate_bundle`, and the detections it scored (one per frame of ``data``)."""
    preds: list[Detection] = []
    t0 = time.perf_counter()
    for rec in tqdm(data.images, desc="evaluate", unit="frame", disable=not progress, dynamic_ncols=True):
        if rec.path is None:
            raise DatasetError(f"frame {rec.name} has no image file; evaluation needs the images")
        preds.append(predictor.detect(rec.path, threshold=threshold))
    seconds = time.perf_counter() - t0
    metrics = evaluate_predictions(data, preds, label_map, class_agnostic=class_agnostic)
    if not class_agnostic and len(label_map.classes) > 1:
        # how well cells are found and outlined, whatever label they got
        agnostic = evaluate_predictions(data, preds, label_map, class_agnostic=True)
        metrics["class_agnostic"] = {"bbox": agnostic["bbox"], "segm": agnostic["segm"]}
    metrics["seconds_per_frame"] = seconds / max(1, len(data.images))
    metrics["threshold"] = threshold
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out_dir / "metrics.json", json.dumps(metrics, indent=2).encode())
        deploy_thr = predictor.default_threshold
        for rec, pred in list(zip(data.images, preds, strict=True))[:overlays]:
            shown = [c for c in pred.cells if c.score >= deploy_thr]
            img = draw_overlay(rec.path, rec.outlined(), shown, rec.width, rec.height)
            save_png(img, out_dir / f"overlay_{Path(rec.name).stem}.png")
    return metrics, preds


def summary_line(metrics: dict[str, Any]) -> str:
    line = (f"mask AP {metrics['segm']['AP']:.3f}  AP50 {metrics['segm']['AP50']:.3f}  "
            f"AP75 {metrics['segm']['AP75']:.3f} | box AP {metrics['bbox']['AP']:.3f}  "
            f"AP50 {metrics['bbox']['AP50']:.3f}  ({metrics['images']} frames, {metrics['gt_cells']} cells)")
    if "class_agnostic" in metrics:
        ag = metrics["class_agnostic"]["segm"]
        line += f"; any label: mask AP {ag['AP']:.3f}  AP50 {ag['AP50']:.3f}"
    return line
