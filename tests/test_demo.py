"""The README's main job (``python -m trainer demo``), shortened: every promised output is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.demo import run_demo

pytestmark = pytest.mark.slow


def test_demo_writes_everything_it_promises(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = run_demo(tmp_path / "demo", minutes=0.4, train_images=6, test_images=2)
    out = capsys.readouterr().out
    assert "Demo finished" in out and "new slide" in out
    for key in ("bundle", "metrics", "new_slide_overlay", "loss_curve"):
        assert Path(summary[key]).exists(), key
    metrics = json.loads(Path(summary["metrics"]).read_text())
    assert metrics["images"] == 2 and metrics["gt_cells"] >= 2
    assert list(Path(summary["overlays"]).glob("overlay_*.png"))
    cells = json.loads((tmp_path / "demo" / "new-slide_cells.json").read_text())
    assert isinstance(cells, list)
    # the new slide is full size: its predictions are in 4032x3024 coordinates
    assert all(0 <= c["box"][0] <= 4032 and 0 <= c["box"][3] <= 3024 for c in cells)
