"""The classifier's part of a retraining cycle (:mod:`trainer.retrain`): carry the current bundle's crop
classifier into the candidate, fine-tuned on the newly labelled crops, and score a bundle's classifier."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from trainer.classifier.evaluate import classification_metrics
from trainer.classifier.sources import crops_from_dataset
from trainer.classifier.train import ClassifierConfig, Prepared, fit, prepare
from wbc_core.classifier.infer import CellClassifier, predict_proba

if TYPE_CHECKING:
    from pathlib import Path

    from wbc_core.bundle import Bundle
    from wbc_core.data.types import AnnotatedDataset

log = logging.getLogger(__name__)


def _labelled(classifier: CellClassifier, data: AnnotatedDataset) -> tuple[Prepared, list[str], np.ndarray]:
    """The crops of ``data`` prepared for the classifier, and the labels/indices of those of known classes."""
    crops = crops_from_dataset(data, classifier.crop, progress=False)
    prepared = prepare(crops, classifier.normalizer, classifier.crop, list(classifier.classes))
    index = np.flatnonzero(prepared.y.numpy() >= 0)
    return prepared, [crops.labels[i] for i in index], index


def finetune_bundle_classifier(bundle: Bundle, candidate: Path, data: AnnotatedDataset, steps: int, lr: float
                               ) -> dict[str, Any]:
    """Attach ``bundle``'s classifier to the ``candidate`` bundle, first fine-tuned for ``steps`` class-balanced
    steps on the labelled crops of ``data`` (cells of classes it does not know are left out)."""
    from wbc_core.bundle import attach_classifier

    classifier = CellClassifier.from_bundle(bundle)
    config = dict(bundle.classifier["config"])
    prepared, labels, index = _labelled(classifier, data)
    report: dict[str, Any] = {"from": str(bundle.directory), "labelled_crops": len(index),
                              "classes": sorted(set(labels)), "steps": 0}
    if steps > 0 and len(set(labels)) >= 2:
        cfg = ClassifierConfig.from_dict({"crop": config.get("crop"), "net": config.get("net")})
        keep = torch.from_numpy(index)
        subset = Prepared(x=prepared.x[keep], y=prepared.y[keep])
        fit(classifier.model, subset, steps, lr, cfg, torch.Generator().manual_seed(0), desc="classifier fine-tune")
        report["steps"] = steps
    else:
        log.info("classifier carried over unchanged (%d labelled crops of %d known classes)", len(index),
                 len(set(labels)))
    config["provenance"] = {**(config.get("provenance") or {}), "retrain": report}
    attach_classifier(candidate, classifier.model.state_dict(), config)
    return report


def classifier_macro_f1(bundle: Bundle, data: AnnotatedDataset) -> float | None:
    """Macro-F1 of the bundle's classifier on the ground-truth cells of ``data`` (None: no known-class cell)."""
    classifier = CellClassifier.from_bundle(bundle)
    prepared, labels, index = _labelled(classifier, data)
    if not len(index):
        return None
    probs = predict_proba(classifier.model, prepared.x[torch.from_numpy(index)], tta=classifier.tta)
    pred = [classifier.classes[i] for i in probs.argmax(1)]
    return float(classification_metrics(labels, pred, list(classifier.classes))["macro_f1"])
