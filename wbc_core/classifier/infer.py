"""The classifier inside the pipeline: crop every detected cell, classify, merge with the segmenter's label.

:class:`CellClassifier` is built from a model bundle's optional classifier (``classifier.pt`` + the
``classifier`` section of ``bundle.yaml``) and used by :class:`wbc_core.detect.Predictor` after the masks are
computed: the cells are cropped with :func:`wbc_core.classifier.crops.crop_instances` from the image the
pipeline already decoded (no second decode), colour-normalised with the statistics of that slide, and
classified in one batch.

**Merge rule** (:func:`merge_opinions`). The segmenter gives one label ``L`` with score ``s``; the classifier
gives probabilities ``p`` over its classes. With ``w = merge.classifier_weight`` (default 0.75) each candidate
label ``c`` gets the support ``w * p(c) + (1 - w) * s * [c == L]`` and the cell takes the label of highest
support; its score is that support, but never above ``s`` (a disagreement lowers it and marks the cell for
review; the classifier can name a cell, not vouch that it is one, so no merge raises a score and the
segmenter's candidates filtered at the threshold lose nothing). With w = 0.75 the classifier overrides the
segmenter when its top class beats its probability of ``L`` by more than ``s / 3``. Two exceptions: a
segmenter label the classifier was never trained on (e.g. ``blast cell``, which PBC lacks) is kept with its
score, since the classifier cannot judge it; and a segmenter with a single class (``wbc``: detection only) has
no opinion on the type, so the classifier's label is taken and the score stays ``s``: whether it is a cell is
the segmenter's call, and a cell whose type is uncertain must still reach the expert (fixing a label is one
click, drawing a missed cell is a polygon); the classifier's confidence is in ``classifier_score``. (Scoring
it ``s * p(label)`` cost the starter a third of BCCD's cells at the 0.5 threshold: recall 0.69.)

Both opinions are kept on the cell as string attributes (see :data:`ATTRIBUTES`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from wbc_core.classifier.crops import CropConfig, apply_mask, crop_instances
from wbc_core.classifier.model import CellNet, NetConfig, standardise, to_unit
from wbc_core.classifier.stain import StainNormalizer, frame_stats
from wbc_core.config_io import dataclass_from_dict
from wbc_core.contract import CLASSIFIER_ATTRIBUTES, SEGMENTER_ATTRIBUTES

if TYPE_CHECKING:
    from wbc_core.bundle import Bundle
    from wbc_core.detect import Cell

#: The attributes :meth:`CellClassifier.refine` sets on every cell (all values are strings).
ATTRIBUTES = {**SEGMENTER_ATTRIBUTES, **CLASSIFIER_ATTRIBUTES}
CLASSIFIER_CONFIG_VERSION = 1


@dataclass
class MergeConfig:
    """How the pipeline merges the segmenter's and the classifier's opinions (see the module doc)."""

    classifier_weight: float = 0.75

    def __post_init__(self) -> None:
        if not 0 <= self.classifier_weight <= 1:
            raise ValueError(f"merge.classifier_weight must be in [0, 1], got {self.classifier_weight}")


#: Test-time augmentation: how many of a square crop's 8 rotations/flips are averaged, and which. Every
#: subset is a group (identity; + horizontal flip; + the four rotations; all eight), so no view is favoured.
TTA_VIEWS = (1, 2, 4, 8)


def tta_views(value: bool | int | None) -> int:
    """The number of TTA views a config asks for: an int in :data:`TTA_VIEWS`, ``true`` (all 8, what bundles
    written before the count existed meant) or ``false`` (1: no TTA)."""
    if value is None or value is True:
        return 8
    if value is False:
        return 1
    if isinstance(value, int) and value in TTA_VIEWS:
        return int(value)
    raise ValueError(f"classifier tta must be one of {TTA_VIEWS} views (or true/false), got {value!r}")


def _views(xb: torch.Tensor, n: int) -> torch.Tensor:
    if n == 1:
        return xb
    if n == 2:
        return torch.cat([xb, xb.flip(3)])
    rotations = [torch.rot90(xb, k, dims=(2, 3)) for k in range(4)]
    if n == 4:
        return torch.cat(rotations)
    return torch.cat(rotations + [torch.rot90(xb.flip(3), k, dims=(2, 3)) for k in range(4)])


def predict_proba(model: CellNet, x: torch.Tensor, tta: bool | int = True, batch: int = 256) -> np.ndarray:
    """Class probabilities (N, C) of uint8 crops (N, S, S, 3), averaged over ``tta`` views (see
    :func:`tta_views`), all views of a batch in one forward."""
    n = tta_views(tta)
    model.eval()
    out = []
    dev = next(model.parameters()).device
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            xb = standardise(to_unit(x[i:i + batch]).to(dev))
            probs = F.softmax(model(_views(xb, n)), dim=1).view(n, len(xb), -1).mean(0)
            out.append(probs.cpu())
    if not out:
        return np.zeros((0, model.head[1].out_features), np.float32)
    return torch.cat(out).numpy()


@dataclass
class MergeResult:
    label: str
    score: float
    attributes: dict[str, str]


def merge_opinions(seg_label: str, seg_score: float, probs: np.ndarray, classes: Sequence[str], weight: float,
                   segmenter_has_types: bool = True) -> MergeResult:
    """Merge the segmenter's (label, score) with the classifier's probabilities (see the module doc)."""
    probs = np.asarray(probs, dtype=float)
    top = int(probs.argmax())
    cls_label, cls_score = classes[top], float(probs[top])
    if not segmenter_has_types:
        label, score = cls_label, seg_score
    elif seg_label not in classes:
        label, score = seg_label, seg_score  # a class the classifier never learned: it has no say
    else:
        support = {c: weight * float(p) for c, p in zip(classes, probs, strict=True)}
        support[seg_label] = support.get(seg_label, 0.0) + (1.0 - weight) * seg_score
        label = max(support, key=lambda c: (support[c], c == seg_label))
        score = min(support[label], seg_score)  # the classifier names a cell; it cannot vouch that it is one
    decided = "agree" if cls_label == seg_label else ("classifier" if label == cls_label else "segmenter")
    attributes = {"segmenter_label": seg_label, "segmenter_score": f"{seg_score:.3f}",
                  "classifier_label": cls_label, "classifier_score": f"{cls_score:.3f}", "decided_by": decided}
    return MergeResult(label=label, score=float(score), attributes=attributes)


class CellClassifier:
    """A trained crop classifier ready to classify a slide's detected cells."""

    def __init__(self, model: CellNet, classes: list[str], crop: CropConfig, normalizer: StainNormalizer,
                 merge: MergeConfig, tta: bool | int = True) -> None:
        self.model = model.eval()
        self.classes, self.crop, self.normalizer, self.merge = classes, crop, normalizer, merge
        self.tta = tta_views(tta)

    @classmethod
    def from_config(cls, config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> CellClassifier:
        classes = [str(c) for c in config.get("classes") or []]
        if len(classes) < 2:
            raise ValueError(f"classifier config lists {len(classes)} classes; it needs at least two")
        model = CellNet(len(classes), NetConfig.from_dict(config.get("net")))
        model.load_state_dict(state_dict)
        return cls(model, classes, CropConfig.from_dict(config.get("crop")),
                   StainNormalizer.from_dict(config.get("stain")),
                   dataclass_from_dict(MergeConfig, config.get("merge"), "classifier merge keys"),
                   tta=config.get("tta", True))

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> CellClassifier:
        from wbc_core.bundle import BundleError

        path = bundle.classifier_path
        if path is None:
            raise BundleError(f"bundle {bundle.directory} has no classifier")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            return cls.from_config(bundle.classifier["config"], state)
        except Exception as exc:
            raise BundleError(f"cannot load the classifier {path}: {exc}") from exc

    def probabilities(self, image: np.ndarray, items: Sequence[tuple[Sequence[float], np.ndarray | None,
                                                                     tuple[int, int]]],
                      scale: float = 1.0) -> np.ndarray:
        """Class probabilities (N, C) of cells ``(box, mask crop or None, origin)`` (native px) of ``image``
        (RGB uint8 decoded at ``scale`` x native)."""
        if not items:
            return np.zeros((0, len(self.classes)), np.float32)
        crops, masks, has_mask = crop_instances(image, items, self.crop, scale=scale)
        if self.normalizer.method != "none":
            stats = frame_stats(image, self.normalizer.method)
            crops = self.normalizer(crops, {k: np.repeat(v[None], len(crops), axis=0) for k, v in stats.items()})
        if self.crop.masked:
            crops = apply_mask(crops, masks, has_mask, self.crop.mask_grow)
        return predict_proba(self.model, torch.from_numpy(np.ascontiguousarray(crops)), tta=self.tta)

    def refine(self, image: np.ndarray, scale: float, cells: list[Cell], segmenter_has_types: bool = True) -> None:
        """Classify ``cells`` (detected on ``image``) and set each one's merged label, score and attributes."""
        probs = self.probabilities(image, [(c.box, c.mask_crop, c.origin) for c in cells], scale)
        for cell, p in zip(cells, probs, strict=True):
            merged = merge_opinions(cell.label, cell.score, p, self.classes, self.merge.classifier_weight,
                                    segmenter_has_types)
            cell.label, cell.score = merged.label, merged.score
            cell.attributes.update(merged.attributes)
