"""The README's main job (``python -m trainer demo``), shortened: every promised output is written, the budget
is counted in steps, and an empty result is said plainly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from trainer.__main__ import build_parser
from trainer.demo import DEFAULT_STEPS, WEAK_AP, demo_config, run_demo


def test_budget_is_steps_rounded_up_to_whole_epochs_without_a_clock() -> None:
    cfg = demo_config(DEFAULT_STEPS, train_images=40)
    assert cfg.train.epochs * 20 == DEFAULT_STEPS and cfg.train.max_minutes is None
    cfg = demo_config(7, train_images=6)  # 3 steps per epoch -> 3 epochs, 9 steps
    assert cfg.train.epochs == 3 and 1 <= cfg.train.warmup_steps <= 9 // 5
    assert demo_config(7, train_images=6, max_minutes=2.5).train.max_minutes == 2.5
    args = build_parser().parse_args(["demo"])
    assert args.steps == DEFAULT_STEPS and args.minutes is None
    with pytest.raises(ValueError):
        demo_config(0)


@pytest.mark.slow
def test_demo_writes_everything_and_warns_when_training_was_too_short(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # deliberately far too short (3 steps, one epoch of 6 slides): the demo must say so, not print an empty
    # result silently
    summary = run_demo(tmp_path / "demo", steps=3, train_images=6, test_images=2)
    out = capsys.readouterr().out
    assert "Demo finished" in out and "new slide" in out and "(3 training steps" in out
    for key in ("bundle", "metrics", "new_slide_overlay", "loss_curve"):
        assert Path(summary[key]).exists(), key
    metrics = json.loads(Path(summary["metrics"]).read_text())
    assert metrics["images"] == 2 and metrics["gt_cells"] >= 2
    assert list(Path(summary["overlays"]).glob("overlay_*.png"))
    assert summary["steps"] == 3 and summary["mask_ap_any_label"] < WEAK_AP
    assert re.search(r"WARNING: the model found (almost )?no cells on the held-out slides \(mask AP 0\.0\d\d\): "
                     r"3 training steps were too few\. Raise --steps", out)
    cells = json.loads((tmp_path / "demo" / "new-slide_cells.json").read_text())
    assert len(cells) == summary["new_slide_cells"]
    if cells:  # the new slide is full size: its predictions are in 4032x3024 coordinates
        assert all(0 <= c["box"][0] <= 4032 and 0 <= c["box"][3] <= 3024 for c in cells)
    else:
        assert summary["new_slide_empty_reason"] and "NO CELLS FOUND" in out
        assert f"no cell found on the new slide: {summary['new_slide_empty_reason']}" in out
