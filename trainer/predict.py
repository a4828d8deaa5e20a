"""The one inference pipeline: slide in, cells (native-resolution masks, labels, scores) out.

The Nuclio handler, the local CLI, evaluation and the benchmarks all call :meth:`Predictor.predict`,
so what is measured is what CVAT gets.

Steps: decode at the cheapest JPEG reduction still >= the model's input size -> resize to the input
size -> Mask R-CNN -> each cell's 2Mx2M mask probabilities are resampled straight into its box at
*native* resolution and thresholded there (clean boundaries, no blocky upsampled bitmap).
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

from trainer.bundle import Bundle, load_bundle
from trainer.data.images import ImageReadError, decode_jpeg_torch, decode_rgb, read_rgb, resize_to, target_scale
from trainer.data.masks import mask_to_polygon
from trainer.model import optimize_for_inference

log = logging.getLogger(__name__)


@dataclass
class Cell:
    """One detected cell in native pixel coordinates."""

    label: str
    score: float
    box: tuple[float, float, float, float]     # x0, y0, x1, y1 (float, x1/y1 exclusive)
    mask_crop: np.ndarray                       # bool (h, w) at native resolution
    origin: tuple[int, int]                     # (left, top) of mask_crop in the frame
    attributes: dict[str, str] = field(default_factory=dict)

    def full_mask(self, height: int, width: int) -> np.ndarray:
        out = np.zeros((height, width), dtype=bool)
        left, top = self.origin
        h, w = self.mask_crop.shape
        out[top:top + h, left:left + w] = self.mask_crop[: height - top, : width - left]
        return out

    def polygon(self, tolerance: float = 2.0) -> np.ndarray | None:
        return mask_to_polygon(self.mask_crop, tolerance=tolerance, offset=self.origin)


@dataclass
class Prediction:
    cells: list[Cell]
    width: int
    height: int
    timings: dict[str, float] = field(default_factory=dict)


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
    """Loads a bundle once; :meth:`predict` is thread-compatible but not re-entrant (one model)."""

    def __init__(self, bundle: Bundle | str | Path, device: str | None = None, cross_class_nms: float | None = 0.5
                 ) -> None:
        """``cross_class_nms``: Mask R-CNN suppresses overlaps only within a class, so one cell can come back
        once per plausible class; boxes overlapping a better-scoring one by more than this IoU are dropped,
        so each cell reaches CVAT once, with its best label. None keeps torchvision's behaviour."""
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = optimize_for_inference(self.bundle.build_segmenter().to(self.device))
        self.classes = self.bundle.classes
        cfg = self.bundle.model_config
        self.max_size, self.min_size = cfg.max_size, cfg.min_size
        self.cross_class_nms = cross_class_nms
        self._gpu_decode = True  # JPEGs decoded by nvJPEG when the model runs on a GPU
        self.classifier = None  # the bundle's optional crop classifier refines each cell's label
        if self.bundle.classifier is not None:
            from trainer.classifier.infer import CellClassifier

            self.classifier = CellClassifier.from_bundle(self.bundle)

    @property
    def default_threshold(self) -> float:
        return self.bundle.score_threshold

    def predict_file(self, path: str | Path, threshold: float | None = None) -> Prediction:
        t0 = time.perf_counter()
        image, scale = read_rgb(path, min_long_side=self.max_size)
        decode = time.perf_counter() - t0
        prediction = self._predict_decoded(image, scale, threshold)
        prediction.timings = {"decode": decode, **prediction.timings}
        return prediction

    def predict_bytes(self, data: bytes, threshold: float | None = None) -> Prediction:
        t0 = time.perf_counter()
        image, scale = self._decode(data)
        decode = time.perf_counter() - t0
        prediction = self._predict_decoded(image, scale, threshold)
        prediction.timings = {"decode": decode, **prediction.timings}
        return prediction

    def _decode(self, data: bytes) -> tuple[np.ndarray, float]:
        """On a GPU, JPEGs are decoded there (nvJPEG); anything that path does not take (PNG, a cut-off or
        CMYK JPEG, a decoder error) goes through the CPU decoder, which also words the error."""
        if self.device.type == "cuda" and self._gpu_decode:
            try:
                return decode_jpeg_torch(data, self.max_size, self.device)
            except ImageReadError as exc:
                log.debug("GPU decode not used: %s", exc)
        return decode_rgb(data, min_long_side=self.max_size)

    def predict(self, image: np.ndarray, threshold: float | None = None) -> Prediction:
        """``image``: native-resolution RGB uint8 (H, W, 3)."""
        return self._predict_decoded(image, 1.0, threshold)

    def _predict_decoded(self, image: np.ndarray, decode_scale: float, threshold: float | None) -> Prediction:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        native_h = round(image.shape[0] / decode_scale)
        native_w = round(image.shape[1] / decode_scale)
        scale = target_scale(native_w, native_h, self.max_size, self.min_size)
        in_w, in_h = max(1, round(native_w * scale)), max(1, round(native_h * scale))
        small = resize_to(image, in_w, in_h)
        timings["resize"] = time.perf_counter() - t0
        thr = self.default_threshold if threshold is None else float(threshold)
        t1 = time.perf_counter()
        boxes, scores, labels, probs = self._run_model(small, thr)
        timings["model"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        cells: list[Cell] = []
        sx, sy = native_w / in_w, native_h / in_h
        for box, score, label, prob in zip(boxes, scores, labels, probs, strict=True):
            nbox = np.array([box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy])
            pasted = paste_mask(prob, nbox, native_w, native_h)
            if pasted is None:
                continue
            crop, origin = pasted
            cells.append(Cell(label=self.classes[int(label) - 1], score=float(score),
                              box=(float(nbox[0]), float(nbox[1]), float(nbox[2]), float(nbox[3])),
                              mask_crop=crop, origin=origin))
        timings["masks"] = time.perf_counter() - t2
        t3 = time.perf_counter()
        if self.classifier is not None and cells:
            # crops of the cells from the image already decoded; merge rule: trainer/classifier/infer.py
            self.classifier.refine(image, decode_scale, cells, segmenter_has_types=len(self.classes) > 1)
        timings["classify"] = time.perf_counter() - t3
        return Prediction(cells=cells, width=native_w, height=native_h, timings=timings)

    @torch.inference_mode()
    def _run_model(self, image: np.ndarray, threshold: float
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Boxes in ``image`` coordinates, scores, labels and raw (M x M) mask probabilities.

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
        boxes_t, scores_t, labels_t = boxes_t[keep], scores_t[keep], labels_t[keep]
        m = 2 * rh.mask_roi_pool.output_size[0]
        probs = np.zeros((0, m, m), np.float32)
        if len(boxes_t):
            mask_features = rh.mask_head(rh.mask_roi_pool(features, [boxes_t], images.image_sizes))
            probs = maskrcnn_inference(rh.mask_predictor(mask_features), [labels_t])[0][:, 0].cpu().numpy()
        return boxes_t.cpu().numpy(), scores_t.cpu().numpy(), labels_t.cpu().numpy(), probs
