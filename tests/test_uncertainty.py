"""Per-frame uncertainty signals for active learning (issue 14), from the ``detect`` contract's own output."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from tests.hostile_images import small_slide
from tests.tiny_models import blob_segmenter
from wbc_core.bundle import write_bundle
from wbc_core.detect import Cell, Detection, Predictor
from wbc_core.labels import RVPBS_LABELS
from wbc_core.uncertainty import FrameUncertainty, frame_uncertainty, from_detection, rank, unmatched


def _cell(score: float, box: tuple[float, float, float, float] = (0, 0, 10, 10), **attributes: str) -> Cell:
    return Cell(label="wbc", score=score, box=box, mask_crop=np.ones((10, 10), bool), origin=(0, 0),
                attributes=dict(attributes))


def test_signals_of_one_detection() -> None:
    detection = Detection(cells=[_cell(0.95), _cell(0.55, decided_by="classifier", classifier_score="0.41"),
                                 _cell(0.52, decided_by="agree", classifier_score="0.90")],
                          width=100, height=100, threshold=0.5, max_cells=100, below_threshold=2, best_below=0.45)
    s = from_detection(detection, margin=0.1)
    assert (s.cells, s.near_threshold, s.disagreement, s.low_classifier_confidence) == (3, 3, 1, 1)
    assert s.flip_unmatched is None and s.score() == 5.0 and s.score({"near_threshold": 0}) == 2.0
    calm = from_detection(Detection(cells=[_cell(0.99)], width=100, height=100, threshold=0.5, max_cells=100,
                                    below_threshold=1, best_below=0.1))
    assert calm.score() == 0.0


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


class BlobFinder:
    """A mirror-equivariant stand-in for a segmenter (dark connected blobs), to test the mirror pass itself; with
    ``odd`` it also "finds" a cell in the top-left corner of whatever frame it sees (not equivariant)."""

    def __init__(self, odd: bool = False) -> None:
        self.odd = odd

    def detect(self, image: np.ndarray, threshold: float | None = None) -> Detection:
        dark = (image.mean(axis=2) < 150).astype(np.uint8)
        _, _, stats, _ = cv2.connectedComponentsWithStats(dark)
        boxes = [(float(x), float(y), float(x + w), float(y + h)) for x, y, w, h, _ in stats[1:]]
        if self.odd:
            boxes.append((0.0, 0.0, 20.0, 20.0))
        return Detection(cells=[_cell(0.9, box) for box in boxes], width=image.shape[1], height=image.shape[0],
                         threshold=threshold or 0.5, max_cells=100)


def test_the_mirror_pass_maps_cells_back_and_counts_the_unstable_ones() -> None:
    image = small_slide()
    detection, signals = frame_uncertainty(BlobFinder(), image)  # type: ignore[arg-type]
    assert len(detection.cells) >= 3 and signals.flip_unmatched == 0
    _, odd = frame_uncertainty(BlobFinder(odd=True), image)  # type: ignore[arg-type]
    assert odd.flip_unmatched == 2  # its corner cell lands in the other corner once mirrored back
    _, without = frame_uncertainty(BlobFinder(), image, mirror=False)  # type: ignore[arg-type]
    assert without.flip_unmatched is None


def test_signals_of_the_real_pipeline(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg, model = blob_segmenter(len(RVPBS_LABELS))
    predictor = Predictor(write_bundle(tmp_path / "bundle", model, list(RVPBS_LABELS), cfg, 0.5), device="cpu")
    detection, signals = frame_uncertainty(predictor, small_slide(), threshold=0.02)
    assert signals.cells == len(detection.cells) > 0 and signals.flip_unmatched is not None
    assert signals.near_threshold == sum(c.score < 0.12 for c in detection.cells) + int(
        detection.best_below is not None and detection.best_below >= 0.02 - 0.1)
