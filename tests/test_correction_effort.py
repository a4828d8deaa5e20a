"""The correction-effort counter (issue 14): each kind of edit a CVAT user makes, counted once, from the JSON the
function really returns."""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np
import pytest

from trainer.correction_effort import (
    EditRules,
    FrameEdits,
    count_edits,
    instances_from_cvat_results,
    saved_cells,
    total,
    vertices,
)
from wbc_core.cvat_json import detection_to_cvat_results
from wbc_core.data.masks import mask_to_polygon
from wbc_core.data.types import Instance
from wbc_core.detect import Cell, Detection
from wbc_core.matching import greedy_pairs

W, H = 640, 480


def disc(label: str, cx: int, cy: int, r: int, as_mask: bool = False) -> Instance:
    mask = np.zeros((H, W), np.uint8)
    cv2.circle(mask, (cx, cy), r, 1, -1)
    if as_mask:
        ys, xs = np.nonzero(mask)
        crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(bool)
        return Instance(label=label, mask_crop=crop, mask_origin=(int(xs.min()), int(ys.min())))
    return Instance(label=label, polygon=mask_to_polygon(mask.astype(bool), tolerance=1.0))


TRUTH = [disc("neutrophil", 120, 120, 60), disc("lymphocyte", 400, 150, 50), disc("monocyte", 300, 360, 70)]


def test_a_perfect_pre_annotation_needs_no_edit() -> None:
    edits = count_edits(TRUTH, TRUTH, H, W)
    assert (edits.accepted, edits.edits, edits.true_cells, edits.scratch_edits) == (3, 0, 3, 3)
    assert edits.scratch_vertices == sum(vertices(t) for t in TRUTH) > 3 * 8


def test_each_kind_of_edit_is_counted_once() -> None:
    predicted = [
        disc("neutrophil", 120, 120, 60),       # right: accepted
        disc("monocyte", 400, 150, 50),         # right outline, wrong label: relabel
        disc("monocyte", 318, 360, 70),         # right label, outline shifted (IoU ~0.7): redraw
        disc("neutrophil", 560, 420, 30),       # nothing there: delete
    ]
    truth = [*TRUTH, disc("eosinophil", 560, 80, 40)]  # the last is missed: draw
    edits = count_edits(predicted, truth, H, W)
    assert (edits.accepted, edits.relabelled, edits.redrawn, edits.deleted, edits.drawn) == (1, 1, 1, 1, 1)
    assert edits.edits == 4 and edits.scratch_edits == 4
    assert edits.drawn_vertices == vertices(truth[2]) + vertices(truth[3])
    agnostic = count_edits(predicted, truth, H, W, EditRules(check_labels=False))
    assert (agnostic.accepted, agnostic.relabelled) == (2, 0)


def test_the_redraw_bar_and_the_match_bar_are_configurable() -> None:
    shifted = [disc("neutrophil", 135, 120, 60)]  # IoU ~0.78 with the truth
    truth = TRUTH[:1]
    assert count_edits(shifted, truth, H, W).redrawn == 1
    assert count_edits(shifted, truth, H, W, EditRules(redraw_iou=0.7)).accepted == 1
    far = count_edits(shifted, truth, H, W, EditRules(match_iou=0.8, redraw_iou=0.85))
    assert (far.deleted, far.drawn) == (1, 1)  # not "this cell" at 0.8: delete + draw
    with pytest.raises(ValueError):
        EditRules(match_iou=0.9, redraw_iou=0.85)


def test_one_prediction_matches_one_cell_best_pairs_first() -> None:
    iou = np.array([[0.9, 0.6], [0.8, 0.1]])
    assert greedy_pairs(iou, 0.5) == [(0, 0)]
    assert greedy_pairs(np.zeros((0, 2)), 0.5) == []


def test_masks_and_polygons_compare_alike() -> None:
    as_masks = [disc(t.label, *c, as_mask=True) for t, c in zip(TRUTH, [(120, 120, 60), (400, 150, 50),
                                                                           (300, 360, 70)], strict=True)]
    assert count_edits(as_masks, TRUTH, H, W).accepted == 3
    assert abs(vertices(as_masks[0]) - vertices(TRUTH[0])) < vertices(TRUTH[0])


def test_what_cvat_receives_is_what_is_counted() -> None:
    """Cells -> the function's CVAT JSON -> decoded with CVAT's rules -> compared: nothing lost on the way."""
    cells = []
    for i, t in enumerate(TRUTH):
        mask = t.to_mask(H, W)
        ys, xs = np.nonzero(mask)
        crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        cell = Cell(label=t.label, score=0.9 - i / 10, box=(float(xs.min()), float(ys.min()), float(xs.max() + 1),
                                                           float(ys.max() + 1)),
                    mask_crop=crop, origin=(int(xs.min()), int(ys.min())), attributes={"decided_by": "segmenter"})
        cell.points = mask_to_polygon(crop, offset=cell.origin)
        cells.append(cell)
    results = detection_to_cvat_results(Detection(cells=cells, width=W, height=H, threshold=0.5, max_cells=100))
    received = instances_from_cvat_results(results)
    assert [c.label for c in received] == [t.label for t in TRUTH]
    edits = count_edits(received, TRUTH, H, W)
    assert edits.accepted == 3 and edits.edits == 0
    with pytest.raises(ValueError, match="without a mask"):
        instances_from_cvat_results([{"type": "rectangle", "label": "x"}])


def test_frame_edits_add_up() -> None:
    a, b = FrameEdits(true_cells=2, drawn=1), FrameEdits(true_cells=3, deleted=2, accepted=1)
    both = total([a, b])
    assert (both.true_cells, both.edits, both.accepted) == (5, 3, 1)
    assert both.to_dict()["edits"] == 3 and both.to_dict()["scratch_edits"] == 5


def test_what_cvat_holds_after_the_correction() -> None:
    """Cells the expert leaves keep the function's outline (with the true label); redrawn and drawn cells get the
    expert's; deleted ones are gone: this, not the truth, is what the next retrain learns from."""
    predicted = [
        disc("neutrophil", 124, 120, 60),       # close enough (IoU > 0.85): left as shown
        disc("monocyte", 400, 150, 50),         # right outline, wrong label: relabelled, outline kept
        disc("monocyte", 318, 360, 70),         # outline off (IoU ~0.7): redrawn
        disc("neutrophil", 560, 420, 30),       # nothing there: deleted
    ]
    truth = [*TRUTH, disc("eosinophil", 560, 80, 40)]  # the last is missed: drawn
    saved = saved_cells(predicted, truth, H, W)
    assert [c.label for c in saved] == [t.label for t in truth]
    for got, expected in zip(saved, [predicted[0], predicted[1], truth[2], truth[3]], strict=False):
        assert np.array_equal(got.to_mask(H, W), expected.to_mask(H, W))
    # as CVAT's UI sets them: untouched "auto", label fixed "semi-auto", redrawn/drawn the expert's ("manual")
    assert [c.source for c in saved] == ["auto", "semi-auto", "manual", "manual"]
    assert [c.source for c in saved_cells(predicted, truth, H, W, EditRules(check_labels=False))][:2] == ["auto"] * 2
    assert not np.array_equal(saved[0].to_mask(H, W), truth[0].to_mask(H, W))
    assert [c.source for c in saved_cells([], truth, H, W)] == ["manual"] * 4
    imported = [replace(t, source="auto") for t in truth]   # truth that came in as "auto" is redrawn by hand
    assert [c.source for c in saved_cells([], imported, H, W)] == ["manual"] * 4
    strict = saved_cells(predicted, truth, H, W, EditRules(redraw_iou=0.99))
    assert all(np.array_equal(c.to_mask(H, W), t.to_mask(H, W)) for c, t in zip(strict, truth, strict=True))
