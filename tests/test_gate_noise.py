"""The retrain gate's noise term (trainer.gate_noise, issue 14): a paired jackknife over the validation frames
lets a candidate through whose drop one frame can explain, and still refuses one that is worse on every frame."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trainer.evaluate import evaluate_predictions
from trainer.gate_noise import UNEDITED_SOURCE, gated_values, ignored_sources, paired_jackknife_se
from trainer.retrain import Cycle, GateConfig, RetrainConfig
from wbc_core.data.types import AnnotatedDataset, ImageRecord, Instance
from wbc_core.detect import Cell, Detection
from wbc_core.labels import LabelMap

LABELS = LabelMap(classes=["wbc"], aliases={}, ignore=[])
W, H = 120, 100


def _disc(cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def _frames(n: int) -> tuple[AnnotatedDataset, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    images, truth = [], []
    for i in range(n):
        mask = _disc(rng.uniform(40, 80), rng.uniform(35, 65), rng.uniform(18, 24))
        truth.append(mask)
        images.append(ImageRecord(name=f"f{i}.png", width=W, height=H,
                                  instances=[Instance(label="wbc", mask_crop=mask, mask_origin=(0, 0))]))
    return AnnotatedDataset(images=images, labels=["wbc"]), truth


def _detection(mask: np.ndarray, score: float = 0.95) -> Detection:
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    cell = Cell(label="wbc", score=score, box=(x0, y0, x1, y1), mask_crop=mask[y0:y1, x0:x1].copy(), origin=(x0, y0))
    return Detection(cells=[cell], width=W, height=H)


def _shifted(mask: np.ndarray, dx: int) -> np.ndarray:
    return np.roll(mask, dx, axis=1)


def _gate(noise_z: float) -> Cycle:
    retrainer = Cycle.__new__(Cycle)
    retrainer.cfg = RetrainConfig(gate=GateConfig(noise_z=noise_z))
    return retrainer


def _values(data: AnnotatedDataset, dets: list[Detection]) -> dict[str, float]:
    return gated_values(data, dets, LABELS)


def test_identical_models_have_no_noise() -> None:
    data, truth = _frames(6)
    dets = [_detection(_shifted(m, 2)) for m in truth]
    se = paired_jackknife_se(data, dets, dets, LABELS)
    assert set(se) == {"mask_ap", "box_ap", "mask_ap_any", "box_ap_any", "found_any"}
    assert all(v == 0.0 for v in se.values())


def test_one_bad_frame_among_few_is_noise_but_worse_everywhere_is_not() -> None:
    data, truth = _frames(5)
    current = [_detection(_shifted(m, 1)) for m in truth]
    one_bad = [_detection(_shifted(m, 8 if i == 0 else 1)) for i, m in enumerate(truth)]
    all_bad = [_detection(_shifted(m, 4)) for m in truth]
    metrics = {"current": _values(data, current), "one_bad": _values(data, one_bad), "all_bad": _values(data, all_bad)}
    drop_one = metrics["current"]["mask_ap"] - metrics["one_bad"]["mask_ap"]
    drop_all = metrics["current"]["mask_ap"] - metrics["all_bad"]["mask_ap"]
    assert drop_one > 0.02 and drop_all > 0.02          # both refused by a fixed 0.02 allowance
    se_one = paired_jackknife_se(data, one_bad, current, LABELS)
    se_all = paired_jackknife_se(data, all_bad, current, LABELS)
    assert se_one["mask_ap"] > drop_one - 0.02          # one frame explains the first drop...
    assert se_all["mask_ap"] < (drop_all - 0.02) / 2     # ...but not the second
    current_split = {"validation": metrics["current"]}
    for z, name, se, expected in [(0.0, "one_bad", se_one, False), (1.0, "one_bad", se_one, True),
                                  (1.0, "all_bad", se_all, False)]:
        ok, reasons = _gate(z).gate({"validation": metrics[name]}, current_split, {"validation": se})
        assert ok is expected, reasons
        assert any("mask_ap:" in r and ("noise" in r) == bool(z) for r in reasons), reasons


def test_too_few_frames_or_mismatched_detections() -> None:
    data, truth = _frames(1)
    dets = [_detection(truth[0])]
    assert paired_jackknife_se(data, dets, dets, LABELS) == {}
    data, truth = _frames(3)
    with pytest.raises(ValueError, match="one detection per frame"):
        paired_jackknife_se(data, [_detection(truth[0])], [_detection(m) for m in truth], LABELS)


def test_noise_z_is_in_the_packaged_retrain_config() -> None:
    from trainer.retrain import load_retrain_config

    cfg = load_retrain_config(Path(__file__).resolve().parents[1] / "trainer" / "configs" / "retrain.yaml")
    assert cfg.gate.noise_z == 1.0
    with pytest.raises(ValueError, match="noise_z"):
        GateConfig(noise_z=-1.0)


def _two_cell_frames(n: int, accepted_shift: int) -> tuple[AnnotatedDataset, list[np.ndarray], list[np.ndarray]]:
    """Frames as CVAT holds them after a correction: a left cell the expert accepted untouched (its "truth" is the
    incumbent's outline, ``accepted_shift`` px off the real cell) and a right cell the expert redrew."""
    rng = np.random.default_rng(1)
    images, real_left, right = [], [], []
    for i in range(n):
        left = _disc(rng.uniform(28, 34), rng.uniform(40, 60), 16)
        redrawn = _disc(rng.uniform(84, 90), rng.uniform(40, 60), 16)
        real_left.append(left)
        right.append(redrawn)
        images.append(ImageRecord(name=f"f{i}.png", width=W, height=H, instances=[
            Instance(label="wbc", mask_crop=_shifted(left, accepted_shift), source=UNEDITED_SOURCE),
            Instance(label="wbc", mask_crop=redrawn, source="manual")]))
    return AnnotatedDataset(images=images, labels=["wbc"]), real_left, right


def _two_cells(a: np.ndarray, b: np.ndarray) -> Detection:
    return Detection(cells=[*_detection(a, 0.9).cells, *_detection(b, 0.95).cells], width=W, height=H)


def test_unedited_cells_do_not_favour_the_model_that_drew_them() -> None:
    """The incumbent drew the accepted cells, so their stored outline is its own: scored on them it wins at the
    strict IoU thresholds whatever the candidate does. Left out of the outline scores, the two models are judged
    on the redrawn cells, where the candidate is better; finding cells (found_any) still counts every cell."""
    data, real_left, right = _two_cell_frames(6, accepted_shift=3)
    incumbent = [_two_cells(_shifted(m, 3), _shifted(r, 4)) for m, r in zip(real_left, right, strict=True)]
    candidate = [_two_cells(m, _shifted(r, 1)) for m, r in zip(real_left, right, strict=True)]
    ignore = ignored_sources(data)
    assert ignore == (UNEDITED_SOURCE,)
    biased = {n: gated_values(data, d, LABELS) for n, d in (("incumbent", incumbent), ("candidate", candidate))}
    fair = {n: gated_values(data, d, LABELS, ignore) for n, d in (("incumbent", incumbent), ("candidate", candidate))}
    assert fair["candidate"]["mask_ap"] > fair["incumbent"]["mask_ap"] + 0.2
    assert biased["candidate"]["mask_ap"] - biased["incumbent"]["mask_ap"] < \
        fair["candidate"]["mask_ap"] - fair["incumbent"]["mask_ap"] - 0.1
    assert fair["candidate"]["found_any"] == fair["incumbent"]["found_any"] == 1.0
    assert (fair["candidate"]["scored_cells"], fair["candidate"]["ignored_cells"]) == (6, 6)
    assert (biased["candidate"]["scored_cells"], biased["candidate"]["ignored_cells"]) == (12, 0)
    missing = [Detection(cells=_detection(_shifted(r, 1)).cells, width=W, height=H) for r in right]
    assert gated_values(data, missing, LABELS, ignore)["found_any"] < 0.6   # missing the accepted cells shows
    se = paired_jackknife_se(data, candidate, incumbent, LABELS, ignore_sources=ignore)
    assert set(se) >= {"mask_ap", "found_any"}


def test_ignored_cells_are_neither_found_nor_false() -> None:
    data, real_left, right = _two_cell_frames(3, accepted_shift=0)
    only_right = [Detection(cells=_detection(r).cells, width=W, height=H) for r in right]
    junk_left = [_two_cells(_shifted(m, 12), r) for m, r in zip(real_left, right, strict=True)]
    for dets in (only_right, junk_left):
        m = evaluate_predictions(data, dets, LABELS, ignore_sources=(UNEDITED_SOURCE,))
        assert m["segm"]["AP"] == pytest.approx(1.0) and (m["gt_cells"], m["ignored_cells"]) == (3, 3)
    assert evaluate_predictions(data, only_right, LABELS)["segm"]["AP"] < 0.6


def test_which_sources_the_gate_leaves_out() -> None:
    data, _, _ = _two_cell_frames(2, accepted_shift=0)
    assert ignored_sources(data) == (UNEDITED_SOURCE,)
    assert ignored_sources(data, ignore_unedited=False) == ()
    untouched = AnnotatedDataset(images=[ImageRecord(name=r.name, width=W, height=H, instances=r.instances[:1])
                                         for r in data.images], labels=["wbc"])
    assert ignored_sources(untouched) == (UNEDITED_SOURCE,)
    touched = AnnotatedDataset(images=[ImageRecord(name=r.name, width=W, height=H, instances=r.instances[1:])
                                       for r in data.images], labels=["wbc"])
    assert ignored_sources(touched) == ()          # nothing unedited: nothing to leave out
    from wbc_core.data.types import DatasetError

    with pytest.raises(DatasetError, match="ignored"):
        evaluate_predictions(untouched, [Detection(cells=[], width=W, height=H)] * 2, LABELS,
                             ignore_sources=(UNEDITED_SOURCE,))
    assert GateConfig().ignore_unedited and "found_any" in GateConfig().max_drop


def test_with_nothing_touched_only_finding_cells_is_judged() -> None:
    """Validation frames whose every cell the expert left as the incumbent drew it hold no outline to judge a
    candidate on (scored anyway, the incumbent wins every cell): the gate gets found_any alone, and says why."""
    data, real_left, _ = _two_cell_frames(4, accepted_shift=3)
    untouched = AnnotatedDataset(images=[ImageRecord(name=r.name, width=W, height=H, instances=r.instances[:1])
                                         for r in data.images], labels=["wbc"])
    ignore = ignored_sources(untouched)
    incumbent = [_detection(_shifted(m, 3)) for m in real_left]       # drew the stored outlines
    candidate = [_detection(m) for m in real_left]                    # the real cells
    lost = [Detection(cells=[], width=W, height=H) for _ in real_left]
    values = {n: gated_values(untouched, d, LABELS, ignore)
              for n, d in (("incumbent", incumbent), ("candidate", candidate), ("lost", lost))}
    assert set(values["candidate"]) == {"found_any", "scored_cells", "ignored_cells", "not_judged"}
    assert values["candidate"]["found_any"] == values["incumbent"]["found_any"] == 1.0
    assert values["lost"]["found_any"] == 0.0                         # a candidate that stops finding is refused
    assert (values["candidate"]["scored_cells"], values["candidate"]["ignored_cells"]) == (0, 4)
    assert gated_values(untouched, candidate, LABELS)["mask_ap"] < gated_values(untouched, incumbent, LABELS)["mask_ap"]
    se = paired_jackknife_se(untouched, candidate, incumbent, LABELS, ignore_sources=ignore)
    assert set(se) == {"found_any"}


def test_the_gate_says_when_outlines_were_not_judged() -> None:
    from trainer.gate_noise import OUTLINES_NOT_JUDGED

    retrainer = _gate(noise_z=1.0)
    current = {"validation": {"mask_ap_any": 0.9, "mask_ap": 0.9, "found_any": 1.0}}
    kept = {"validation": {"found_any": 1.0, "scored_cells": 0, "ignored_cells": 4, "not_judged": OUTLINES_NOT_JUDGED}}
    ok, reasons = retrainer.gate(kept, current)
    assert ok and any(OUTLINES_NOT_JUDGED in r for r in reasons)
    lost = {"validation": {**kept["validation"], "found_any": 0.5}}
    ok, reasons = retrainer.gate(lost, current)
    assert not ok and any("found_any" in r and "REFUSED" in r for r in reasons)
