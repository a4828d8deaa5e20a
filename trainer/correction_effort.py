"""What the haematologist has to do to a pre-annotated frame: the edits, counted the way a CVAT user makes them.

The product exists to save the expert clicks: CVAT shows the function's shapes, the expert corrects them, the
model retrains. :func:`count_edits` compares the shapes CVAT received (the function's JSON, decoded by
:func:`instances_from_cvat_results` with CVAT's own rules) with the expert's final annotation of the frame:

- a predicted cell matched to a true cell (mask IoU >= ``match_iou``, one-to-one, best pairs first) is
  **accepted** as is when its label is right and its outline overlaps the truth by at least ``redraw_iou``;
  otherwise it costs a **relabel** (one edit) and/or a **redraw** (one edit: CVAT's redraw, plus the true
  outline's vertices, reported apart);
- a predicted cell matched to nothing is a **delete** (one edit);
- a true cell matched to nothing is a **draw** (one polygon, plus its vertices);
- **from scratch** (no pre-annotation) every true cell is drawn: one edit per cell, plus all their vertices.

Edits per frame and the ratio to from-scratch are what the correction-effort benchmark reports.

:func:`saved_cells` is what CVAT then holds for the frame, i.e. what the next retrain learns from: a cell the
expert accepted (or only relabelled) keeps the function's outline, as CVAT stored it; redrawn and drawn cells
have the expert's outline; deleted cells are gone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

from wbc_core.data.masks import decode_cvat_function_mask, mask_to_polygon
from wbc_core.data.types import UNEDITED_SOURCE, Instance
from wbc_core.matching import greedy_pairs

#: Outline simplification (px) used to count the vertices of a drawn cell, as a careful annotator clicks.
DRAW_TOLERANCE = 2.0
#: Masks are compared at most this many pixels on the long side (IoU is scale-free; cells are >= 100 px).
IOU_SIDE = 1024


@dataclass(frozen=True)
class EditRules:
    """When a pre-annotated cell is kept, fixed or redone."""

    match_iou: float = 0.5    # a prediction is "this cell" from this mask IoU on (recall at IoU 0.5)
    redraw_iou: float = 0.85  # below this the expert redraws the outline
    check_labels: bool = True  # False: class-agnostic (only outlines count)

    def __post_init__(self) -> None:
        if not 0 < self.match_iou <= self.redraw_iou <= 1:
            raise ValueError(f"need 0 < match_iou ({self.match_iou}) <= redraw_iou ({self.redraw_iou}) <= 1")


@dataclass
class FrameEdits:
    """The edits one frame needs (counts), and what drawing it from scratch would cost."""

    true_cells: int = 0
    predicted_cells: int = 0
    accepted: int = 0
    relabelled: int = 0
    redrawn: int = 0
    deleted: int = 0
    drawn: int = 0
    drawn_vertices: int = 0      # vertices of the cells drawn and redrawn
    scratch_vertices: int = 0    # vertices of every true cell

    @property
    def edits(self) -> int:
        return self.relabelled + self.redrawn + self.deleted + self.drawn

    @property
    def scratch_edits(self) -> int:
        return self.true_cells

    def __add__(self, other: FrameEdits) -> FrameEdits:
        return FrameEdits(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "edits": self.edits, "scratch_edits": self.scratch_edits}


def total(frames: Iterable[FrameEdits]) -> FrameEdits:
    out = FrameEdits()
    for frame in frames:
        out = out + frame
    return out


def instances_from_cvat_results(results: Sequence[dict[str, Any]]) -> list[Instance]:
    """The cells CVAT receives from the function (its JSON results), as annotations: ``mask`` items decoded
    with CVAT's rules (flat crop + inclusive box), ``polygon`` items from their points."""
    cells = []
    for item in results:
        kind = item.get("type")
        if kind == "mask" and item.get("mask"):
            crop, (xtl, ytl, _, _) = decode_cvat_function_mask(list(item["mask"]))
            cells.append(Instance(label=str(item["label"]), mask_crop=crop, mask_origin=(xtl, ytl),
                                  source=UNEDITED_SOURCE))
        elif kind in ("mask", "polygon") and item.get("points"):
            cells.append(Instance(label=str(item["label"]), polygon=np.asarray(item["points"], float).reshape(-1, 2),
                                  source=UNEDITED_SOURCE))
        else:
            raise ValueError(f"a CVAT result of type {kind!r} without a mask or points: {str(item)[:120]}")
    return cells


def vertices(cell: Instance) -> int:
    """How many vertices drawing ``cell`` takes (its polygon's, or its mask outline simplified by
    :data:`DRAW_TOLERANCE`)."""
    if cell.polygon is not None:
        return len(cell.polygon)
    if cell.mask_crop is not None:
        poly = mask_to_polygon(cell.mask_crop, tolerance=DRAW_TOLERANCE)
        return 0 if poly is None else len(poly)
    return 4  # a rectangle


def _masks(cells: Sequence[Instance], height: int, width: int, scale: float) -> np.ndarray:
    h, w = max(1, round(height * scale)), max(1, round(width * scale))
    if not cells:
        return np.zeros((0, h * w), bool)
    return np.stack([c.to_mask(height, width, scale).reshape(-1) for c in cells])


def iou_matrix(predicted: Sequence[Instance], truth: Sequence[Instance], height: int, width: int) -> np.ndarray:
    """Mask IoU of every (predicted, true) pair, masks rendered at most :data:`IOU_SIDE` px on the long side."""
    scale = min(1.0, IOU_SIDE / max(height, width))
    a = _masks(predicted, height, width, scale).astype(np.float32)
    b = _masks(truth, height, width, scale).astype(np.float32)
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def correct_frame(predicted: Sequence[Instance], truth: Sequence[Instance], height: int, width: int,
                  rules: EditRules | None = None) -> tuple[FrameEdits, list[Instance]]:
    """The expert's pass over one ``width`` x ``height`` frame, one match of ``predicted`` (what CVAT shows) to
    ``truth`` (the expert's final annotation): the edits it takes (see the module doc) and the cells CVAT holds
    afterwards, one per true cell in ``truth``'s order: the function's outline where the expert left it (matched
    and at least ``redraw_iou``), with the true label; the true outline where the expert redrew or drew the cell.
    Predictions matched to nothing were deleted.

    Sources as CVAT's UI sets them: ``auto`` for a cell left exactly as the function returned it, ``semi-auto``
    for one whose label was fixed (the outline is still the function's), and the truth's own source (``manual``
    when it said ``auto``) for a redrawn or drawn cell."""
    rules = rules or EditRules()
    truth = [t for t in truth if t.has_outline]
    out = FrameEdits(true_cells=len(truth), predicted_cells=len(predicted),
                     scratch_vertices=sum(vertices(t) for t in truth))
    iou = iou_matrix(predicted, truth, height, width)
    pairs = greedy_pairs(iou, rules.match_iou)
    kept: dict[int, tuple[int, bool]] = {}   # true cell -> (prediction left in place, relabelled)
    for p, t in pairs:
        wrong_label = rules.check_labels and predicted[p].label != truth[t].label
        rough = iou[p, t] < rules.redraw_iou
        out.relabelled += int(wrong_label)
        if rough:
            out.redrawn += 1
            out.drawn_vertices += vertices(truth[t])
        else:
            kept[t] = (p, wrong_label)
            out.accepted += int(not wrong_label)
    matched_t = {t for _, t in pairs}
    out.deleted = len(predicted) - len(pairs)
    saved = []
    for t, cell in enumerate(truth):
        if t not in matched_t:
            out.drawn += 1
            out.drawn_vertices += vertices(cell)
        if t in kept:
            p, relabelled = kept[t]
            shown = predicted[p]
            saved.append(Instance(label=cell.label, polygon=shown.polygon, mask_crop=shown.mask_crop,
                                  mask_origin=shown.mask_origin, source="semi-auto" if relabelled else UNEDITED_SOURCE))
        else:
            saved.append(replace(cell, source="manual") if cell.source == UNEDITED_SOURCE else cell)
    return out, saved


def count_edits(predicted: Sequence[Instance], truth: Sequence[Instance], height: int, width: int,
                rules: EditRules | None = None) -> FrameEdits:
    """The edits that turn ``predicted`` into ``truth`` (:func:`correct_frame`)."""
    return correct_frame(predicted, truth, height, width, rules)[0]


def saved_cells(predicted: Sequence[Instance], truth: Sequence[Instance], height: int, width: int,
                rules: EditRules | None = None) -> list[Instance]:
    """The frame as CVAT holds it once the expert is done (:func:`correct_frame`): this, not the truth, is what
    the next retrain learns from."""
    return correct_frame(predicted, truth, height, width, rules)[1]
