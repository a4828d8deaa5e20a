"""Classification metrics (accuracy, macro-F1, per-class precision/recall) and the confusion-matrix picture."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def confusion(truth: Sequence[str], pred: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """Counts ``[true class, predicted class]`` over ``classes`` (labels outside it are an error)."""
    index = {c: i for i, c in enumerate(classes)}
    cm = np.zeros((len(classes), len(classes)), dtype=int)
    for t, p in zip(truth, pred, strict=True):
        if t not in index or p not in index:
            raise ValueError(f"label {t if t not in index else p!r} is not one of the classes {list(classes)}")
        cm[index[t], index[p]] += 1
    return cm


def classification_metrics(truth: Sequence[str], pred: Sequence[str], classes: Sequence[str],
                           headline: Sequence[str] | None = None) -> dict[str, Any]:
    """Accuracy, macro-F1 over the classes present in ``truth``, per-class precision/recall/F1/support, the
    confusion matrix, and (with ``headline``) ``macro_f1_headline``: macro-F1 over exactly those classes.

    Precision of a class never predicted is 0; a class absent from ``truth`` is left out of the macro mean
    (its precision is still reported: predicting it is an error).
    """
    classes = list(classes)
    cm = confusion(truth, pred, classes)
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=precision + recall > 0)
    present = support > 0
    per_class = {c: {"precision": round(float(precision[i]), 4), "recall": round(float(recall[i]), 4),
                     "f1": round(float(f1[i]), 4), "support": int(support[i]), "predicted": int(predicted[i])}
                 for i, c in enumerate(classes)}
    out: dict[str, Any] = {
        "n": int(cm.sum()),
        "accuracy": round(float(tp.sum() / max(cm.sum(), 1)), 4),
        "macro_f1": round(float(f1[present].mean()) if present.any() else 0.0, 4),
        "per_class": per_class,
        "classes": classes,
        "confusion": cm.tolist(),
    }
    if headline is not None:
        missing = [c for c in headline if c not in classes]
        if missing:
            raise ValueError(f"headline classes {missing} are not among the classes {classes}")
        out["macro_f1_headline"] = round(float(np.mean([f1[classes.index(c)] for c in headline])), 4)
        out["headline_classes"] = list(headline)
    return out


def plot_confusion(metrics: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Confusion matrix PNG: row-normalised colours, counts in the cells, recall on the row labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = metrics["classes"]
    cm = np.asarray(metrics["confusion"], dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.75 * n, 1.0 + 0.7 * n), dpi=110)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if norm[i, j] > 0.6 else "black")
    recall = [metrics["per_class"][c]["recall"] for c in classes]
    ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), [f"{c} ({r:.2f})" if int(rows[i, 0]) else f"{c} (-)"
                             for i, (c, r) in enumerate(zip(classes, recall, strict=True))], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (recall)")
    head = f"acc {metrics['accuracy']:.3f}  macro-F1 {metrics['macro_f1']:.3f}"
    if "macro_f1_headline" in metrics:
        head += f"  {len(metrics['headline_classes'])}-class F1 {metrics['macro_f1_headline']:.3f}"
    ax.set_title(f"{title}\n{head}" if title else head, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def summarise_draws(values: Sequence[float]) -> dict[str, float]:
    """Mean, standard deviation (population), min and max over few-shot draws."""
    arr = np.asarray(values, dtype=float)
    return {"mean": round(float(arr.mean()), 4), "std": round(float(arr.std()), 4),
            "min": round(float(arr.min()), 4), "max": round(float(arr.max()), 4)}
