"""Per-frame uncertainty signals for active learning (issue 14), from the ``detect`` contract's own output."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tests.hostile_images import small_slide
from tests.tiny_models import blob_segmenter
from wbc_core.bundle import write_bundle
from wbc_core.detect import Cell, Detection, Predictor, mask_fuzziness
from wbc_core.labels import RVPBS_LABELS
from wbc_core.uncertainty import (
    FrameUncertainty,
    frame_uncertainty,
    from_detection,
    mirrored_back,
    outline_instability,
    rank,
    scores,
    unmatched,
)


def _cell(score: float, box: tuple[float, float, float, float] = (0, 0, 10, 10), **attributes: str) -> Cell:
    return Cell(label="wbc", score=score, box=box, mask_crop=np.ones((10, 10), bool), origin=(0, 0),
                attributes=dict(attributes))


def test_signals_of_one_detection() -> None:
    detection = Detection(cells=[_cell(0.95), _cell(0.55, decided_by="classifier", classifier_score="0.41"),
                                 _cell(0.52, decided_by="agree", classifier_score="0.90")],
                          width=100, height=100, threshold=0.5, max_cells=100, below_threshold=2, best_below=0.45)
    s = from_detection(detection, margin=0.1)
    assert (s.cells, s.near_threshold, s.disagreement, s.low_classifier_confidence) == (3, 3, 1, 1)
    assert s.low_score == round(0.05 + 0.45 + 0.48 + 0.45, 4)
    counts = {"low_score": 0, "mask_fuzziness": 0}
    assert s.flip_unmatched is None and s.score(counts) == 5.0 and s.score({**counts, "near_threshold": 0}) == 2.0
    # at a high threshold "near" is at most half the way to 1: 0.93 is near 0.9, 0.97 is not
    high = from_detection(Detection(cells=[_cell(0.93), _cell(0.97)], width=100, height=100, threshold=0.9,
                                    max_cells=100))
    assert high.near_threshold == 1
    calm = from_detection(Detection(cells=[_cell(0.99)], width=100, height=100, threshold=0.5, max_cells=100,
                                    below_threshold=1, best_below=0.1))
    assert calm.score({"low_score": 0}) == 0.0 and calm.low_score == round(0.01 + 0.1, 4)


def test_unmatched_boxes_are_counted_on_both_sides() -> None:
    a = np.array([[0, 0, 10, 10], [50, 50, 60, 60]], float)
    b = np.array([[1, 1, 10, 10], [80, 80, 90, 90], [0, 50, 5, 55]], float)
    assert unmatched(a, b) == 3       # one pair; one of a and two of b alone
    assert unmatched(a, a) == 0 and unmatched(a, np.zeros((0, 4))) == 2


def test_rank_orders_the_most_uncertain_first() -> None:
    frames = [("a", FrameUncertainty(near_threshold=1)), ("b", FrameUncertainty(disagreement=2, flip_unmatched=1)),
              ("c", FrameUncertainty())]
    assert [name for name, _ in rank(frames)] == ["b", "a", "c"]
    assert [name for name, _ in rank(frames, {"disagreement": 0, "flip_unmatched": 0})] == ["a", "b", "c"]


def test_scores_put_signals_on_one_scale() -> None:
    # low_score is in hundreds here, near_threshold in ones: divided by their means, each counts the same
    frames = [FrameUncertainty(low_score=300.0), FrameUncertainty(near_threshold=3), FrameUncertainty(low_score=100.0)]
    assert scores(frames) == [1.0, 1.0, pytest.approx(1 / 3)]  # each divided by its largest value
    assert scores(frames, {"low_score": 0}) == [0.0, 1.0, 0.0]
    assert scores(frames, {"near_threshold": 0.5}) == [1.0, 0.5, pytest.approx(1 / 3)]
    assert scores([]) == [] and scores([FrameUncertainty()]) == [0.0]


def test_mask_fuzziness_of_crisp_and_blurred_outlines() -> None:
    crisp = np.zeros((28, 28))
    crisp[7:21, 7:21] = 1.0
    assert mask_fuzziness(crisp) == 0.0
    yy, xx = np.mgrid[:28, :28]
    blurred = 1 / (1 + np.exp((np.hypot(yy - 13.5, xx - 13.5) - 7) / 2.0))  # a soft disc
    assert 0.3 < mask_fuzziness(blurred) < 2.0
    assert mask_fuzziness(np.zeros((28, 28))) == 0.0


class BlobFinder:
    """A mirror-equivariant stand-in for a segmenter (dark connected blobs), to test the mirror pass itself; with
    ``odd`` it also "finds" a cell in the top-left corner of whatever frame it sees (not equivariant)."""

    def __init__(self, odd: bool = False) -> None:
        self.odd = odd

    def detect(self, image: np.ndarray, threshold: float | None = None) -> Detection:
        dark = (image.mean(axis=2) < 150).astype(np.uint8)
        _, components, stats, _ = cv2.connectedComponentsWithStats(dark)
        cells = [Cell(label="wbc", score=0.9, box=(float(x), float(y), float(x + w), float(y + h)),
                      mask_crop=components[y:y + h, x:x + w] == k, origin=(int(x), int(y)))
                 for k, (x, y, w, h, _) in enumerate(stats[1:], start=1)]
        if self.odd:
            cells.append(_cell(0.9, (0.0, 0.0, 10.0, 10.0)))
        return Detection(cells=cells, width=image.shape[1], height=image.shape[0], threshold=threshold or 0.5,
                         max_cells=100)


def test_the_mirror_pass_maps_cells_back_and_counts_the_unstable_ones() -> None:
    image = small_slide()
    detection, signals = frame_uncertainty(BlobFinder(), image)  # type: ignore[arg-type]
    assert len(detection.cells) >= 3 and signals.flip_unmatched == 0
    assert signals.flip_outline == 0.0  # every blob's outline is found again, pixel for pixel
    _, odd = frame_uncertainty(BlobFinder(odd=True), image)  # type: ignore[arg-type]
    assert odd.flip_unmatched == 2  # its corner cell lands in the other corner once mirrored back
    assert odd.flip_outline == 1.0  # ...and has no outline to compare with there
    _, without = frame_uncertainty(BlobFinder(), image, mirror=False)  # type: ignore[arg-type]
    assert without.flip_unmatched is None and without.flip_outline is None


def test_outline_instability_compares_each_outline_with_its_mirror_partner() -> None:
    width = 100
    # an L-shaped cell at x 20..40: its mirror image, found exactly, lands back on it
    mask = np.zeros((20, 20), bool)
    mask[:, :6] = True
    mask[14:, :] = True
    cell = Cell(label="wbc", score=0.9, box=(20.0, 30.0, 40.0, 50.0), mask_crop=mask, origin=(20, 30))
    exact = Cell(label="wbc", score=0.9, box=(60.0, 30.0, 80.0, 50.0), mask_crop=mask[:, ::-1].copy(),
                 origin=(60, 30))
    assert mirrored_back(exact, width)[1] == (20, 30)
    assert outline_instability([cell], [exact], width) == 0.0
    # found on the mirror as the unmirrored L: the two shapes share 6x20 + 6x14 - 36 of their 120 + 84 - 36 pixels
    wrong = Cell(label="wbc", score=0.9, box=(60.0, 30.0, 80.0, 50.0), mask_crop=mask.copy(), origin=(60, 30))
    shared = int((mask & mask[:, ::-1]).sum())
    union = int((mask | mask[:, ::-1]).sum())
    assert outline_instability([cell], [wrong], width) == pytest.approx(1 - shared / union)
    assert 0 < 1 - shared / union < 1
    # no partner at all: 1 per cell; no cells: 0
    far = Cell(label="wbc", score=0.9, box=(0.0, 0.0, 10.0, 10.0), mask_crop=np.ones((10, 10), bool), origin=(0, 0))
    assert outline_instability([cell], [far], width) == 1.0
    assert outline_instability([cell, cell], [], width) == 2.0 and outline_instability([], [exact], width) == 0.0


def test_signals_of_the_real_pipeline(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg, model = blob_segmenter(len(RVPBS_LABELS))
    predictor = Predictor(write_bundle(tmp_path / "bundle", model, list(RVPBS_LABELS), cfg, 0.5), device="cpu")
    detection, signals = frame_uncertainty(predictor, small_slide(), threshold=0.02)
    assert signals.cells == len(detection.cells) > 0 and signals.flip_unmatched is not None
    assert signals.flip_outline is not None and 0 <= signals.flip_outline <= signals.cells
    assert signals.near_threshold == sum(c.score < 0.12 for c in detection.cells) + int(
        detection.best_below is not None and detection.best_below >= 0.02 - 0.1)
