"""The one inference pipeline and its ``detect`` contract: slide in, final cells out.

The Nuclio handler, the cvat-sdk function module, the local CLI, evaluation and the benchmarks all call
:meth:`Predictor.detect`, so what is measured is what CVAT gets. It returns the **final** cells: label, score,
native-resolution mask, polygon and attributes, after the classifier's merge, with the score threshold and the
``max_cells`` cap applied once, there and nowhere else. The CVAT JSON is only a serializer of that output
(:mod:`wbc_core.cvat_json`).

Steps: decode at the cheapest JPEG reduction still >= the model's input size -> resize to the input
size -> Mask R-CNN (candidates) -> each cell's 2Mx2M mask probabilities are resampled straight into its box at
*native* resolution and thresholded there (clean boundaries, no blocky upsampled bitmap) -> the crop
classifier, when the bundle has one, refines each cell's label and score -> threshold -> cap -> polygons.

Threshold: the classifier's merge never raises a score (:func:`wbc_core.classifier.infer.merge_opinions`), so
the segmenter's candidates are first cut at the threshold (the mask head then runs only on them) and the
threshold is applied again to the merged scores. A request without a threshold and one sending the bundle's
default explicitly get the same cells.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import maskrcnn_inference
from torchvision.ops import nms

from wbc_core.bundle import Bundle, load_bundle
from wbc_core.contract import MIN_WBC_RBC_RATIO
from wbc_core.data.images import ImageReadError, decode_jpeg_torch, decode_rgb, read_rgb, resize_to, target_scale
from wbc_core.data.masks import mask_to_polygon
from wbc_core.data.types import Instance
from wbc_core.model import fuse_backbone_body, optimize_for_inference

log = logging.getLogger(__name__)

#: Douglas-Peucker tolerance (px) of the returned polygons; cells are 100-1300 px across.
POLYGON_TOLERANCE = 2.0


@dataclass
class Cell:
    """One detected cell in native pixel coordinates: what ``detect`` returns. It carries both outlines (the
    native-resolution mask and its polygon) and the score; :meth:`to_instance` turns it into the annotation
    type the datasets, CVAT XML and COCO writers use."""

    label: str
    score: float
    box: tuple[float, float, float, float]     # x0, y0, x1, y1 (float, x1/y1 exclusive)
    mask_crop: np.ndarray                       # bool (h, w) at native resolution
    origin: tuple[int, int]                     # (left, top) of mask_crop in the frame
    attributes: dict[str, str] = field(default_factory=dict)
    points: np.ndarray | None = None            # (N, 2) polygon in frame px, N >= 3 (set by detect)
    mask_fuzziness: float = 0.0                 # share of the mask head's map that is unsure (see mask_fuzziness)
    embedding: np.ndarray | None = None         # what the mask head saw: its features, averaged over the cell

    def full_mask(self, height: int, width: int) -> np.ndarray:
        out = np.zeros((height, width), dtype=bool)
        left, top = self.origin
        h, w = self.mask_crop.shape
        out[top:top + h, left:left + w] = self.mask_crop[: height - top, : width - left]
        return out

    def polygon(self, tolerance: float = POLYGON_TOLERANCE) -> np.ndarray | None:
        if self.points is not None and tolerance == POLYGON_TOLERANCE:
            return self.points
        return mask_to_polygon(self.mask_crop, tolerance=tolerance, offset=self.origin)

    def to_instance(self, outline: str = "polygon") -> Instance:
        """The cell as an annotation (:class:`wbc_core.data.types.Instance`, ``source="auto"``), outlined by its
        polygon (what CVAT stores with "masks as polygons") or its mask (``outline="mask"``)."""
        if outline == "mask":
            return Instance(label=self.label, mask_crop=self.mask_crop, mask_origin=self.origin, source="auto",
                            score=self.score, attributes=dict(self.attributes))
        if outline != "polygon":
            raise ValueError(f"outline must be 'polygon' or 'mask', not {outline!r}")
        return Instance(label=self.label, polygon=self.polygon(), source="auto", score=self.score,
                        attributes=dict(self.attributes))


@dataclass
class Detection:
    """What :meth:`Predictor.detect` returns: the final cells (highest score first) of one frame.

    ``threshold`` and ``max_cells`` are what was applied; ``capped`` counts cells dropped by the cap,
    ``below_threshold`` candidates whose final score was under the threshold (``best_below`` the highest of
    those), ``degenerate`` cells whose mask had no polygon of 3 vertices. :attr:`empty_reason` says why a
    frame came back empty."""

    cells: list[Cell]
    width: int
    height: int
    threshold: float = 0.0
    max_cells: int = 0
    capped: int = 0
    below_threshold: int = 0
    best_below: float | None = None
    degenerate: int = 0
    too_small: int = 0                          # cells under MIN_WBC_RBC_RATIO red-cell diameters (not WBCs)
    input_scale: float = 1.0                   # native -> model input resize factor
    rbc_diameter_px: float | None = None       # estimated red-cell diameter (native px), scale mode rbc
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def empty_reason(self) -> str | None:
        if self.cells:
            return None
        if self.below_threshold:
            return (f"{self.below_threshold} candidate cell(s) scored under the threshold {self.threshold:g} "
                    f"(best {self.best_below:.3f})")
        if self.degenerate:
            return f"{self.degenerate} cell(s) had masks too small for a polygon"
        if self.too_small:
            return (f"{self.too_small} cell(s) were smaller than {MIN_WBC_RBC_RATIO:g} red-cell diameters "
                    f"({self.rbc_diameter_px:.0f} px here): platelets or debris, not white cells")
        return "the segmenter found no candidate cell"


def equivalent_diameter(mask: np.ndarray) -> float:
    """Diameter (px) of the disc with the mask's area."""
    return float(2.0 * np.sqrt(np.count_nonzero(mask) / np.pi))


def mask_fuzziness(prob: np.ndarray, low: float = 0.25, high: float = 0.75) -> float:
    """How unsure the mask head is of a cell's outline: pixels of its MxM probability map between ``low`` and
    ``high``, per pixel of the mask (p >= 0.5). 0 for a crisp outline; large when the edge is a wide blur."""
    inside = int((prob >= 0.5).sum())
    unsure = int(((prob > low) & (prob < high)).sum())
    return unsure / max(inside, 1)


def paste_mask(prob: np.ndarray, box: np.ndarray, width: int, height: int, threshold: float = 0.5
               ) -> tuple[np.ndarray, tuple[int, int]] | None:
    """Resample an MxM mask-probability map into ``box`` (native px) and threshold it.

    Same geometry as torchvision's ``paste_masks_in_image`` (the map is padded by one cell and the
    box widened accordingly), but only the box region is computed.
    """
    m = prob.shape[0]
    padded = np.pad(prob, 1)
    pad_scale = (m + 2) / m
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    hw, hh = (box[2] - box[0]) / 2 * pad_scale, (box[3] - box[1]) / 2 * pad_scale
    x0, y0 = int(np.floor(cx - hw)), int(np.floor(cy - hh))
    x1, y1 = int(np.ceil(cx + hw)), int(np.ceil(cy + hh))
    w, h = max(x1 - x0, 1), max(y1 - y0, 1)
    resized = cv2.resize(padded.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR) >= threshold
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if cx1 <= cx0 or cy1 <= cy0:
        return None
    crop = resized[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    ys = np.flatnonzero(crop.any(axis=1))
    xs = np.flatnonzero(crop.any(axis=0))
    if ys.size == 0:
        return None
    crop = crop[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1]
    return np.ascontiguousarray(crop), (cx0 + int(xs[0]), cy0 + int(ys[0]))


class Predictor:
    """Loads a bundle once; :meth:`detect` is thread-compatible but not re-entrant (one model)."""

    def __init__(self, bundle: Bundle | str | Path, device: str | None = None, cross_class_nms: float | None = 0.5,
                 fuse: bool | None = None) -> None:
        """``cross_class_nms``: Mask R-CNN suppresses overlaps only within a class, so one cell can come back
        once per plausible class; boxes overlapping a better-scoring one by more than this IoU are dropped,
        so each cell reaches CVAT once, with its best label. None keeps torchvision's behaviour.

        ``fuse``: run the backbone body as a oneDNN-fused graph (:class:`wbc_core.model.FusedBody`). None
        (default): on a CPU with the fixed input size, where frames of one camera share one input shape; with
        red-cell scaling every frame has its own input size, which the fused graph would recompile for."""
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = optimize_for_inference(self.bundle.build_segmenter().to(self.device))
        self.classes = self.bundle.classes
        cfg = self.bundle.model_config
        self.max_size, self.min_size = cfg.max_size, cfg.min_size
        # how a frame is sized for the model: fixed min/max size, or red cells brought to a fixed diameter
        self.scale = self.bundle.scale or {"mode": "fixed"}
        if self.scale.get("mode", "fixed") not in ("fixed", "rbc"):
            raise ValueError(f"bundle {self.bundle.directory}: preprocessing.scale.mode must be 'fixed' or 'rbc', "
                             f"not {self.scale.get('mode')!r}")
        # the decoded frame must be large enough for the largest input the scale policy can ask for
        self.decode_side = int(self.scale.get("max_side", self.max_size)) if self.scale.get("mode") == "rbc" \
            else self.max_size
        self.cross_class_nms = cross_class_nms
        if fuse is None:
            fuse = self.device.type == "cpu" and self.scale.get("mode", "fixed") == "fixed"
        self.fused = fuse and fuse_backbone_body(self.model, self.min_size, self.max_size)
        self._gpu_decode = True  # JPEGs decoded by nvJPEG when the model runs on a GPU
        self.classifier = None  # the bundle's optional crop classifier refines each cell's label
        if self.bundle.classifier is not None:
            from wbc_core.classifier.infer import CellClassifier

            self.classifier = CellClassifier.from_bundle(self.bundle)

    @property
    def default_threshold(self) -> float:
        return self.bundle.score_threshold

    @property
    def max_cells(self) -> int:
        return self.bundle.max_cells

    def detect(self, source: np.ndarray | bytes | str | Path, threshold: float | None = None,
               max_cells: int | None = None) -> Detection:
        """The final cells of one frame (the ``detect`` contract, see the module doc).

        ``source``: encoded image bytes (JPEGs decoded reduced, on the GPU when the model runs there), an
        image file's path, or a native-resolution RGB uint8 array (H, W, 3). ``threshold``: minimum final
        score (None or 0: the bundle's default). ``max_cells``: cells returned at most (None: the bundle's).
        """
        t0 = time.perf_counter()
        if isinstance(source, np.ndarray):
            image, scale = source, 1.0
        elif isinstance(source, (bytes, bytearray, memoryview)):
            image, scale = self._decode(bytes(source))
        else:
            image, scale = read_rgb(source, min_long_side=self.decode_side)
        decode = time.perf_counter() - t0
        detection = self._detect_decoded(image, scale, threshold, max_cells)
        detection.timings = {"decode": decode, **detection.timings}
        return detection

    def _decode(self, data: bytes) -> tuple[np.ndarray, float]:
        """On a GPU, JPEGs are decoded there (nvJPEG); anything that path does not take (PNG, a cut-off or
        CMYK JPEG, a decoder error) goes through the CPU decoder, which also words the error."""
        if self.device.type == "cuda" and self._gpu_decode:
            try:
                return decode_jpeg_torch(data, self.decode_side, self.device)
            except ImageReadError as exc:
                log.debug("GPU decode not used: %s", exc)
        return decode_rgb(data, min_long_side=self.decode_side)

    def input_scale(self, image: np.ndarray, decode_scale: float, native_w: int, native_h: int
                    ) -> tuple[float, float | None]:
        """(native -> model input factor, estimated red-cell diameter in native px or None).

        ``fixed``: the min/max-size resize of the model config. ``rbc``: red cells (~7.5 um, on nearly every
        smear) are measured on the decoded frame (:func:`wbc_core.scale.estimate_rbc_diameter`) and the frame is
        resized so they are ``rbc_px`` across, whatever the camera and magnification, within
        ``[min_side, max_side]`` on the long side; without an estimate (too few red cells) the fixed resize."""
        fixed = target_scale(native_w, native_h, self.max_size, self.min_size)
        if self.scale.get("mode", "fixed") != "rbc":
            return fixed, None
        from wbc_core.scale import estimate_rbc_diameter

        estimate = estimate_rbc_diameter(image)
        if estimate.diameter_px is None:
            log.info("no red-cell scale estimate (%s); fixed resize", estimate.reason)
            return fixed, None
        diameter = estimate.diameter_px / decode_scale
        factor = float(self.scale.get("rbc_px", 48.0)) / diameter
        long_side = max(native_w, native_h)
        lo, hi = float(self.scale.get("min_side", 256)), float(self.scale.get("max_side", self.max_size))
        factor = min(max(factor, lo / long_side), hi / long_side)
        return factor, diameter

    def _detect_decoded(self, image: np.ndarray, decode_scale: float, threshold: float | None,
                        max_cells: int | None) -> Detection:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        native_h = round(image.shape[0] / decode_scale)
        native_w = round(image.shape[1] / decode_scale)
        scale, estimate = self.input_scale(image, decode_scale, native_w, native_h)
        in_w, in_h = max(1, round(native_w * scale)), max(1, round(native_h * scale))
        small = resize_to(image, in_w, in_h)
        timings["resize"] = time.perf_counter() - t0
        thr = float(threshold) if threshold else self.default_threshold
        cap = self.max_cells if max_cells is None else int(max_cells)
        if cap < 1:
            raise ValueError(f"max_cells must be at least 1, got {max_cells}")
        t1 = time.perf_counter()
        boxes, scores, labels, probs, rejected, embeddings = self._run_model(small, thr)  # no merge raises scores
        timings["model"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        cells: list[Cell] = []
        sx, sy = native_w / in_w, native_h / in_h
        for box, score, label, prob, embedding in zip(boxes, scores, labels, probs, embeddings, strict=True):
            nbox = np.array([box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy])
            pasted = paste_mask(prob, nbox, native_w, native_h)
            if pasted is None:
                continue
            crop, origin = pasted
            name = self.classes[int(label) - 1]
            cells.append(Cell(label=name, score=float(score),
                              box=(float(nbox[0]), float(nbox[1]), float(nbox[2]), float(nbox[3])),
                              mask_crop=crop, origin=origin,
                              attributes={"segmenter_label": name, "segmenter_score": f"{float(score):.3f}",
                                          "decided_by": "segmenter"},
                              mask_fuzziness=mask_fuzziness(prob), embedding=embedding))
        timings["masks"] = time.perf_counter() - t2
        t3 = time.perf_counter()
        if self.classifier is not None and cells:
            # crops of the cells from the image already decoded; merge rule: wbc_core/classifier/infer.py
            self.classifier.refine(image, decode_scale, cells, segmenter_has_types=len(self.classes) > 1)
        timings["classify"] = time.perf_counter() - t3
        t4 = time.perf_counter()
        detection = Detection(cells=[], width=native_w, height=native_h, threshold=thr, max_cells=cap,
                              input_scale=scale, rbc_diameter_px=estimate)
        kept = sorted((c for c in cells if c.score >= thr), key=lambda c: -c.score)
        below = [c.score for c in cells if c.score < thr] + [float(v) for v in rejected]
        detection.below_threshold, detection.best_below = len(below), (max(below) if below else None)
        if len(kept) > cap:
            detection.capped = len(kept) - cap
            log.warning("%d cells scored >= %g on a %dx%d frame; returning the %d best (max_cells)",
                        len(kept), thr, native_w, native_h, cap)
            kept = kept[:cap]
        if estimate is not None:
            floor = MIN_WBC_RBC_RATIO * estimate
            small = [c for c in kept if equivalent_diameter(c.mask_crop) < floor]
            if small:
                detection.too_small = len(small)
                kept = [c for c in kept if equivalent_diameter(c.mask_crop) >= floor]
        for cell in kept:
            cell.points = mask_to_polygon(cell.mask_crop, tolerance=POLYGON_TOLERANCE, offset=cell.origin)
            if cell.points is None:
                detection.degenerate += 1
            else:
                detection.cells.append(cell)
        timings["polygons"] = time.perf_counter() - t4
        detection.timings = timings
        return detection

    @torch.inference_mode()
    def _run_model(self, image: np.ndarray, threshold: float
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Boxes in ``image`` coordinates, scores, labels, raw (M x M) mask probabilities, the scores of
        the candidates under ``threshold``, and each cell's mask-head features averaged over its map (N x C:
        how the cell looks to the model, for :mod:`wbc_core.typicality`).

        Torchvision's Mask R-CNN forward, unrolled so that the mask head only runs on the cells that
        will be returned: detections after the cross-class NMS scoring at least ``threshold`` (the
        forward would run it on up to ``box_detections_per_img`` candidates, most of them discarded).
        ``image`` is already at the model's input size, so the transform's resize (a no-op at scale
        1.0 that still costs an interpolation) is skipped; normalisation and padding are its own.
        """
        model = self.model
        rh = model.roi_heads
        tensor = torch.from_numpy(image).to(self.device).permute(2, 0, 1).float().div_(255.0)
        tensor = model.transform.normalize(tensor)
        batched = model.transform.batch_images([tensor], size_divisible=model.transform.size_divisible)
        images = ImageList(batched.contiguous(memory_format=torch.channels_last), [tuple(image.shape[:2])])
        features = model.backbone(images.tensors)
        proposals, _ = model.rpn(images, features)
        box_features = rh.box_head(rh.box_roi_pool(features, proposals, images.image_sizes))
        class_logits, box_regression = rh.box_predictor(box_features)
        boxes_t, scores_t, labels_t = (x[0] for x in rh.postprocess_detections(
            class_logits, box_regression, proposals, images.image_sizes))
        if self.cross_class_nms is not None and len(boxes_t) > 1:
            keep = nms(boxes_t, scores_t, self.cross_class_nms)
            boxes_t, scores_t, labels_t = boxes_t[keep], scores_t[keep], labels_t[keep]
        keep = scores_t >= threshold
        rejected = scores_t[~keep].cpu().numpy()  # candidates under the threshold, for Detection.empty_reason
        boxes_t, scores_t, labels_t = boxes_t[keep], scores_t[keep], labels_t[keep]
        m = 2 * rh.mask_roi_pool.output_size[0]
        probs = np.zeros((0, m, m), np.float32)
        embeddings = np.zeros((0, 0), np.float32)
        if len(boxes_t):
            mask_features = rh.mask_head(rh.mask_roi_pool(features, [boxes_t], images.image_sizes))
            probs = maskrcnn_inference(rh.mask_predictor(mask_features), [labels_t])[0][:, 0].cpu().numpy()
            embeddings = mask_features.mean(dim=(2, 3)).float().cpu().numpy()
        return (boxes_t.cpu().numpy(), scores_t.cpu().numpy(), labels_t.cpu().numpy(), probs, rejected,
                embeddings)
