"""Does the starter model find and outline WBCs on other labs' slides? (issue 12)

Every number goes through the product's own ``detect`` (:class:`wbc_core.detect.Predictor`, the code the CVAT
function runs) on the real test splits in ``../shared/data``:

- **bccd** (``bccd-wbc`` test split, 640x480, outlines): class-agnostic mask AP / AP50, box AP50.
- **bionet** (``bionet-wbc`` test split, a second lab and camera, boxes only): box AP50; mask AP is null.

For each set: WBC recall at box IoU 0.5 and false cells per image at the bundle's default threshold (what a
user sees in CVAT), and AP over all cells above 0.05 (the whole precision-recall curve).

- ``loso``: a bundle trained with that set left out (``--loso SET=BUNDLE``; ``python -m trainer train-starter
  --leave-out SET``), on that set. The shipped starter is trained without Bio-Net (no licence to ship), so it
  is Bio-Net's leave-one-set-out model as it is; pass ``--loso bionet=models/starter``.
- ``in_domain``: the starter on every set's own test split, beside that set's in-domain model where a result
  file is given (``--in-domain-ref bccd=benchmarks/results/segmentation_bccd.json``): the starter may fall at
  most 0.05 mask AP under it, and BCCD's in-domain model (the default CPU config trained from scratch, issue 2's
  target) must stay >= 0.85; re-measure it at the code under test before an ``--update``.
- ``scale_sweep``: every test frame rescaled by 0.5x-2x before ``detect`` (the predictions mapped back to native
  pixels): recall must stay within 0.05 of 1x, whatever the magnification.
- ``stain_sweep``: every test frame re-stained (hue turned +-20 degrees, saturation 0.6x, pale cytoplasm, a
  yellow and a blue white-balance cast): the segmenter's recall, and the crop classifier's 4-class macro-F1 on
  the single-WBC BCCD frames with a type label (each cell cropped at its ground-truth outline from the
  re-stained frame, exactly as the pipeline crops a detected cell; a band cell counts as a neutrophil, as BCCD
  labels both "neutrophil"). The re-staining here is written independently of the training augmentation.
- ``few_shot``: result files of ``benchmarks/few_shot.py`` (``--few-shot FILE``), when given.

    python benchmarks/generalisation.py --bundle models/starter --data-root ../shared/data \\
        --loso bionet=models/starter --in-domain-ref bccd=benchmarks/results/segmentation_bccd.json \\
        --out benchmarks/results

Writes ``generalisation.json`` and ``generalisation.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402
from tqdm import tqdm  # noqa: E402

from trainer.train_segmenter import git_sha  # noqa: E402
from wbc_core.data.images import read_rgb  # noqa: E402
from wbc_core.data.masks import coco_rle_encode  # noqa: E402
from wbc_core.data.types import AnnotatedDataset  # noqa: E402
from wbc_core.detect import Predictor  # noqa: E402
from wbc_core.matching import box_iou  # noqa: E402

log = logging.getLogger("generalisation")

SCALES = (0.5, 0.75, 1.0, 1.5, 2.0)
AP_THRESHOLD = 0.05       # AP wants the whole precision-recall curve
IOU = 0.5
HEADLINE = ("eosinophil", "lymphocyte", "monocyte", "neutrophil")
TARGETS = {"loso_mask_ap": 0.6, "loso_recall50": 0.95, "fp_per_image": 0.3, "scale_recall_drop": 0.05,
           "stain_recall_drop": 0.05, "in_domain_drop": 0.05, "bccd_in_domain_mask_ap": 0.85, "bundle_mb": 25.0}


# --- data ---------------------------------------------------------------------------------------------------

def load_set(name: str, data_root: Path, split: str = "test") -> AnnotatedDataset:
    if name == "bccd":
        from trainer.data.bccd import load_bccd

        return load_bccd(data_root / "bccd-wbc", split)
    if name == "bionet":
        from trainer.data.bionet import load_bionet

        return load_bionet(data_root / "bionet-wbc", split)
    raise ValueError(f"unknown set {name!r}: bccd or bionet")


# --- re-staining (deterministic; independent of trainer's augmentation code) ---------------------------------

def _hue(image: np.ndarray, degrees: float) -> np.ndarray:
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + round(degrees / 2)) % 180).astype(np.uint8)  # OpenCV: 0-179
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def _saturation(image: np.ndarray, factor: float) -> np.ndarray:
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 1] = np.clip(hsv[..., 1] * factor, 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


def _gains(image: np.ndarray, gains: tuple[float, float, float]) -> np.ndarray:
    return np.clip(image.astype(np.float32) * np.array(gains, np.float32) + 0.5, 0, 255).astype(np.uint8)


def _pale(image: np.ndarray, strength: float = 0.5) -> np.ndarray:
    """Paler stain: every pixel moves towards the background colour by ``strength`` x how dark it is, mid-tones
    (cytoplasm, red cells) the most."""
    img = image.astype(np.float32)
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    lo, hi = np.percentile(grey, [2, 90])
    bg = img[grey >= hi].mean(axis=0)
    t = np.clip((hi - grey) / max(hi - lo, 1.0), 0, 1)
    w = (strength * 4 * t * (1 - t))[..., None]
    return np.clip(img + w * (bg - img) + 0.5, 0, 255).astype(np.uint8)


STAINS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "original": lambda im: im,
    "hue+20": lambda im: _hue(im, 20),
    "hue-20": lambda im: _hue(im, -20),
    "saturation0.6": lambda im: _saturation(im, 0.6),
    "pale": _pale,
    "yellow_cast": lambda im: _gains(im, (1.05, 1.0, 0.72)),
    "blue_cast": lambda im: _gains(im, (0.85, 0.95, 1.08)),
}


# --- scoring ------------------------------------------------------------------------------------------------

def match(gt: np.ndarray, det: np.ndarray) -> tuple[int, int]:
    """(true positives, false positives) of score-sorted detections against ground-truth boxes, one-to-one at
    box IoU >= 0.5."""
    iou = box_iou(det, gt)
    used = np.zeros(len(gt), bool)
    tp = 0
    for i in range(len(det)):
        if len(gt) == 0:
            break
        cand = np.where(~used & (iou[i] >= IOU))[0]
        if len(cand):
            used[cand[np.argmax(iou[i, cand])]] = True
            tp += 1
    return tp, len(det) - tp


def _coco(images: list[dict], gts: list[dict], dets: list[dict], iou_type: str) -> dict[str, float]:
    if not dets:
        return {"AP": 0.0, "AP50": 0.0}
    gt = COCO()
    gt.dataset = {"images": images, "annotations": gts, "categories": [{"id": 1, "name": "wbc"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"AP": round(float(ev.stats[0]), 4), "AP50": round(float(ev.stats[1]), 4)}


def score_set(predictor: Predictor, data: AnnotatedDataset, threshold: float,
              transform: Callable[[np.ndarray], np.ndarray] | None = None, factor: float = 1.0,
              progress: bool = True, desc: str = "") -> dict[str, Any]:
    """Detect on every frame (optionally re-stained by ``transform`` and rescaled by ``factor``) and score."""
    outlined = all(inst.has_outline for rec in data.images for inst in rec.instances)
    images, gts, box_dets, mask_dets = [], [], [], []
    tp = fp = n_gt = 0
    seconds = 0.0
    for img_id, rec in enumerate(tqdm(data.images, desc=desc, disable=not progress, leave=False), start=1):
        image, _ = read_rgb(rec.path)
        h, w = image.shape[:2]
        if transform is not None:
            image = transform(image)
        if factor != 1.0:
            image = cv2.resize(image, (max(1, round(w * factor)), max(1, round(h * factor))),
                               interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
        t0 = time.perf_counter()
        detection = predictor.detect(image, threshold=AP_THRESHOLD)
        seconds += time.perf_counter() - t0
        images.append({"id": img_id, "width": w, "height": h})
        gt_boxes = []
        for inst in rec.instances:
            x0, y0, x1, y1 = inst.box
            gt_boxes.append([x0, y0, x1, y1])
            ann = {"id": len(gts) + 1, "image_id": img_id, "category_id": 1, "iscrowd": 0,
                   "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float((x1 - x0) * (y1 - y0))}
            if outlined:
                mask = inst.to_mask(h, w)
                ann["segmentation"] = coco_rle_encode(mask)
                ann["area"] = float(mask.sum())
            gts.append(ann)
        kept = []
        for cell in detection.cells:
            box = np.array(cell.box, float) / factor
            box_dets.append({"image_id": img_id, "category_id": 1, "score": cell.score,
                             "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
            if outlined:
                mask = cell.full_mask(image.shape[0], image.shape[1])
                if factor != 1.0:
                    mask = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
                mask_dets.append({"image_id": img_id, "category_id": 1, "score": cell.score,
                                  "segmentation": coco_rle_encode(mask)})
            if cell.score >= threshold:
                kept.append(box)
        t, f = match(np.array(gt_boxes, float).reshape(-1, 4), np.array(kept, float).reshape(-1, 4))
        tp, fp, n_gt = tp + t, fp + f, n_gt + len(gt_boxes)
    box = _coco(images, gts, box_dets, "bbox")
    mask = _coco(images, gts, mask_dets, "segm") if outlined else None
    return {"frames": len(images), "cells": n_gt, "threshold": threshold,
            "mask_ap": mask["AP"] if mask else None, "mask_ap50": mask["AP50"] if mask else None,
            "box_ap50": box["AP50"], "recall50": round(tp / max(n_gt, 1), 4),
            "fp_per_image": round(fp / max(len(images), 1), 3),
            "seconds_per_frame": round(seconds / max(len(images), 1), 3)}


def classifier_sweep(predictor: Predictor, data_root: Path, stains: dict[str, Callable[[np.ndarray], np.ndarray]],
                     progress: bool = True) -> dict[str, Any]:
    """4-class macro-F1 of the bundle's crop classifier on the typed single-WBC BCCD frames, per re-staining."""
    from trainer.classifier.evaluate import classification_metrics
    from trainer.classifier.sources import load_bccd_labelled

    classifier = predictor.classifier
    if classifier is None:
        return {"note": "the bundle has no crop classifier"}
    data = load_bccd_labelled(data_root / "bccd-wbc")
    out: dict[str, Any] = {"crops": len(data.images), "classes": list(HEADLINE),
                           "note": "every typed single-WBC BCCD frame (the classifier never saw a BCCD label); a "
                                   "predicted band cell counts as a neutrophil (BCCD labels both 'neutrophil')"}
    frames = [(read_rgb(rec.path)[0], rec.instances[0]) for rec in data.images]
    truth = [inst.label for _, inst in frames]
    for name, fn in stains.items():
        pred = []
        for image, inst in tqdm(frames, desc=f"classifier {name}", disable=not progress, leave=False):
            item = (inst.box, inst.mask_crop, inst.mask_origin)
            probs = classifier.probabilities(fn(image), [item])
            label = classifier.classes[int(probs[0].argmax())]
            pred.append("neutrophil" if label == "band cell" else label)
        classes = sorted(set(truth) | set(pred))
        m = classification_metrics(truth, pred, classes, headline=HEADLINE)
        out[name] = {"macro_f1_4": m["macro_f1_headline"], "accuracy": m["accuracy"],
                     "predicted": {c: pred.count(c) for c in classes}}
        log.info("classifier %s: 4-class macro-F1 %.3f", name, m["macro_f1_headline"])
    return out


def judge(result: dict[str, Any]) -> dict[str, bool]:
    """Which targets the result meets."""
    met: dict[str, Any] = {}
    for name, row in result["loso"].items():
        if row.get("mask_ap") is not None:
            met[f"loso_{name}_mask_ap"] = row["mask_ap"] >= TARGETS["loso_mask_ap"]
        met[f"loso_{name}_recall50"] = row["recall50"] >= TARGETS["loso_recall50"]
        met[f"loso_{name}_fp_per_image"] = row["fp_per_image"] <= TARGETS["fp_per_image"]
    for name, rows in result["scale_sweep"].items():
        base = rows["1"]["recall50"]
        met[f"scale_{name}"] = all(base - r["recall50"] <= TARGETS["scale_recall_drop"] for r in rows.values())
    for name, rows in result["stain_sweep"].items():
        base = rows["original"]["recall50"]
        met[f"stain_{name}"] = all(base - r["recall50"] <= TARGETS["stain_recall_drop"] for r in rows.values())
    for name, row in result["in_domain"].items():
        if row.get("reference_mask_ap") is not None and row.get("mask_ap") is not None:
            met[f"in_domain_{name}"] = row["reference_mask_ap"] - row["mask_ap"] <= TARGETS["in_domain_drop"]
    if "bccd" in result["in_domain"]:
        # "BCCD in-domain must stay >= 0.85": issue 2's target for the default CPU config trained from scratch on
        # BCCD (benchmarks/segmentation_bccd.py), which the starter's recipe must not have broken; the starter
        # itself is held to it by in_domain_bccd (at most 0.05 under it). Not measured: not met.
        reference = result["in_domain"]["bccd"].get("reference_mask_ap")
        met["bccd_in_domain_mask_ap"] = reference is not None and reference >= TARGETS["bccd_in_domain_mask_ap"]
    met["bundle_mb"] = result["bundle_mb"] <= TARGETS["bundle_mb"]
    return met


def loso_row(path: str, data: AnnotatedDataset, threshold: float, scored: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """A left-out set's row: the bundle trained without it (``scored``: its row when already measured)."""
    from wbc_core.bundle import load_bundle

    row = dict(scored) if scored is not None else score_set(Predictor(path), data, threshold, desc="loso")
    row["bundle"] = path
    prov = load_bundle(path).provenance
    row["trained_on"] = [s.get("name") for s in prov.get("datasets") or []]
    row["train_seconds"] = prov.get("train_seconds")
    return row


def reference_mask_ap(path: str | Path) -> float:
    """The test mask AP in an in-domain model's result file (``benchmarks/segmentation_bccd.py``'s ``mask_ap``,
    or an evaluation's ``segm.AP``); refuses a file without one, naming it."""
    ref = json.loads(Path(path).read_text())
    for ap in (ref.get("mask_ap"), ref.get("ours_mask_ap"), (ref.get("segm") or {}).get("AP"),
               ((ref.get("metrics") or {}).get("segm") or {}).get("AP")):
        if isinstance(ap, (int, float)):
            return float(ap)
    raise SystemExit(f"--in-domain-ref {path}: no mask AP in it (looked for mask_ap, ours_mask_ap, segm.AP, "
                     "metrics.segm.AP); give the in-domain model's result file")


def add_references(result: dict[str, Any], pairs: list[str]) -> None:
    """``--in-domain-ref SET=JSON``: each set's in-domain model's mask AP beside the starter's."""
    for name, ref in _pairs(pairs, "--in-domain-ref").items():
        if name not in result["in_domain"]:
            raise SystemExit(f"--in-domain-ref {name}: not among the sets measured ({sorted(result['in_domain'])})")
        result["in_domain"][name]["reference_mask_ap"] = round(reference_mask_ap(ref), 4)
        result["in_domain"][name]["reference"] = ref
        result["in_domain"][name]["reference_git_sha"] = json.loads(Path(ref).read_text()).get("git_sha")


def update(args: argparse.Namespace, shown: list[str]) -> int:
    """``--update``: add ``--loso`` rows, ``--few-shot`` results and ``--in-domain-ref`` references to an existing
    result file (the rest as it was measured), judge the targets again, redraw the plot."""
    path = args.out / "generalisation.json"
    result = json.loads(path.read_text())
    threshold = float(result["bundle"]["score_threshold"])
    for name, bundle in _pairs(args.loso, "--loso").items():
        data = load_set(name, args.data_root)
        if args.max_frames:
            data.images = data.images[:args.max_frames]
        result["loso"][name] = loso_row(bundle, data, threshold)
        log.info("loso %s: %s", name, result["loso"][name])
    for f in args.few_shot:
        result["few_shot"].update(json.loads(f.read_text()).get("few_shot") or {})
    add_references(result, args.in_domain_ref)
    if args.classifier:
        import torch

        torch.set_num_threads(args.threads)
        result["classifier_stain_sweep"] = classifier_sweep(Predictor(args.bundle), args.data_root, STAINS)
        from wbc_core.bundle import load_bundle

        classifier = load_bundle(args.bundle).classifier or {}
        result["bundle"]["classifier_provenance"] = (classifier.get("config") or {}).get("provenance")
    result["met"] = judge(result)
    result.setdefault("updates", []).append({"command": "python benchmarks/generalisation.py " + shlex.join(shown),
                                             "git_sha": git_sha()})
    path.write_text(json.dumps(result, indent=1))
    plot(result, args.out / "generalisation.png")
    print(json.dumps({"met": result["met"], "loso": result["loso"]}, indent=1))
    return 0


# --- the plot -----------------------------------------------------------------------------------------------

def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    for name, rows in result["scale_sweep"].items():
        xs = [float(k) for k in rows]
        ax.plot(xs, [rows[k]["recall50"] for k in rows], "o-", label=f"{name} recall")
        ax.plot(xs, [rows[k]["fp_per_image"] for k in rows], "x--", label=f"{name} false cells/img")
    ax.set_xscale("log", base=2)
    ax.set_xticks(SCALES, [f"{s:g}x" for s in SCALES])
    ax.axhline(0.95, color="grey", lw=0.8, ls=":")
    ax.set_title("scale sweep (frame rescaled before detect)")
    ax.set_xlabel("magnification vs the set's own")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    ax = axes[1]
    stains = list(STAINS)
    width = 0.8 / max(1, len(result["stain_sweep"]) + 1)
    for i, (name, rows) in enumerate(result["stain_sweep"].items()):
        ax.bar(np.arange(len(stains)) + i * width, [rows[s]["recall50"] for s in stains], width, label=f"{name} recall")
    cls = result.get("classifier_stain_sweep") or {}
    if "original" in cls:
        k = len(result["stain_sweep"])
        ax.bar(np.arange(len(stains)) + k * width, [cls[s]["macro_f1_4"] for s in stains], width,
               label="classifier macro-F1 (BCCD, 4 types)")
    ax.set_xticks(np.arange(len(stains)) + width, stains, rotation=30, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title("stain sweep (frames re-stained)")
    ax.legend(fontsize=7)
    ax = axes[2]
    names, values, colours = [], [], []
    for kind, colour in (("in_domain", "tab:blue"), ("loso", "tab:orange")):
        for name, row in (result.get(kind) or {}).items():
            metric = row.get("mask_ap") if row.get("mask_ap") is not None else row.get("box_ap50")
            names.append(f"{kind}\n{name}\n{'mask AP' if row.get('mask_ap') is not None else 'box AP50'}")
            values.append(metric or 0)
            colours.append(colour)
    ax.bar(range(len(values)), values, color=colours)
    ax.set_xticks(range(len(values)), names, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.axhline(0.6, color="grey", lw=0.8, ls=":")
    ax.set_title("starter on each set; left-out sets (orange)")
    fig.suptitle(f"generalisation of {result['bundle']['dir']} ({result['bundle_mb']} MB)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main ---------------------------------------------------------------------------------------------------

def _pairs(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for v in values:
        if "=" not in v:
            raise SystemExit(f"{what} takes SET=VALUE, got {v!r}")
        k, val = v.split("=", 1)
        out[k] = val
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=REPO / "models" / "starter", help="the starter bundle")
    p.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--sets", default="bccd,bionet", help="comma-separated: bccd, bionet")
    p.add_argument("--loso", action="append", default=[], metavar="SET=BUNDLE",
                   help="a bundle trained without SET, evaluated on SET's test split (repeatable)")
    p.add_argument("--in-domain-ref", action="append", default=[], metavar="SET=JSON",
                   help="a result file with SET's in-domain model's mask AP (segm.AP or ours_mask_ap)")
    p.add_argument("--few-shot", type=Path, action="append", default=[], help="few-shot result JSON (repeatable)")
    p.add_argument("--train-seconds", type=float, help="the starter's training time (default: its bundle.yaml)")
    p.add_argument("--max-frames", type=int, help="at most this many test frames per set (quick runs)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--update", action="store_true",
                   help="add --loso rows and --few-shot results to OUT/generalisation.json (nothing else re-run)")
    p.add_argument("--classifier", action="store_true",
                   help="with --update: re-run the crop classifier's stain sweep on --bundle (after its classifier "
                        "changed), nothing else")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    shown = [a if not a.startswith(str(REPO)) else str(Path(a).relative_to(REPO)) for a in (argv or sys.argv[1:])]
    if args.update:
        return update(args, shown)
    import torch

    torch.set_num_threads(args.threads)
    from trainer.package import weights_mb
    from wbc_core.bundle import load_bundle

    t_all = time.perf_counter()
    bundle = load_bundle(args.bundle)
    predictor = Predictor(args.bundle)
    threshold = predictor.default_threshold
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    data = {}
    for name in sets:
        d = load_set(name, args.data_root)
        if args.max_frames:
            d.images = d.images[:args.max_frames]
        data[name] = d
    result: dict[str, Any] = {
        "sets": {n: {"frames": len(d.images), "cells": sum(len(r.instances) for r in d.images),
                     "outlines": all(i.has_outline for r in d.images for i in r.instances)} for n, d in data.items()},
        "bundle": {"dir": str(args.bundle), "classes": bundle.classes, "scale": bundle.scale,
                   "classifier_classes": bundle.classifier_classes, "score_threshold": threshold,
                   "provenance_sets": [x.get("set") for x in (bundle.provenance.get("licences") or [])]},
        "bundle_mb": round(weights_mb(args.bundle), 2),
        "train_seconds": args.train_seconds or (bundle.provenance.get("train_seconds")
                                                or bundle.metrics.get("train_seconds")),
    }
    result["in_domain"] = {}
    result["scale_sweep"] = {}
    result["stain_sweep"] = {}
    for name, d in data.items():
        rows = {}
        for f in SCALES:
            rows[f"{f:g}"] = score_set(predictor, d, threshold, factor=f, desc=f"{name} scale {f:g}")
            log.info("%s at %gx: %s", name, f, rows[f"{f:g}"])
        result["scale_sweep"][name] = rows
        result["in_domain"][name] = dict(rows["1"])
        stains = {"original": rows["1"]}
        for s, fn in STAINS.items():
            if s != "original":
                stains[s] = score_set(predictor, d, threshold, transform=fn, desc=f"{name} {s}")
                log.info("%s %s: %s", name, s, stains[s])
        result["stain_sweep"][name] = stains
    add_references(result, args.in_domain_ref)
    result["loso"] = {}
    for name, path in _pairs(args.loso, "--loso").items():
        if name not in data:
            raise SystemExit(f"--loso {name}: not among --sets {sets}")
        same = Path(path).resolve() == Path(args.bundle).resolve()
        result["loso"][name] = loso_row(path, data[name], threshold, result["in_domain"][name] if same else None)
    result["classifier_stain_sweep"] = classifier_sweep(predictor, args.data_root, STAINS) \
        if "bccd" in data else None
    result["few_shot"] = {}
    for f in args.few_shot:
        result["few_shot"].update(json.loads(f.read_text()).get("few_shot") or {})
    result["targets"] = TARGETS
    result["met"] = met = judge(result)
    result["seconds"] = round(time.perf_counter() - t_all, 1)
    result["threads"] = args.threads
    result["git_sha"] = git_sha()
    result["command"] = "python benchmarks/generalisation.py " + shlex.join(shown)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "generalisation.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / "generalisation.png")
    print(json.dumps({"met": met, "loso": result["loso"], "in_domain": result["in_domain"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
