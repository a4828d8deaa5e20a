"""The correction-effort benchmark resumes a run folder only when its runs were made with the same settings: a
result never mixes runs of another batch size, budget, start model or expert."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import correction_effort

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.skipif(not (SHARED / "bccd-wbc").is_dir(), reason="needs ../shared/data/bccd-wbc")
def test_a_run_folder_made_with_other_settings_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    work = tmp_path / "work"
    work.mkdir()
    args = correction_effort.parser().parse_args(["--data-root", str(SHARED), "--work", str(work), "--batch", "5"])
    settings = correction_effort.run_settings(args, 205, 72)
    old = {"runs": [{"order": "random", "seed": 0, "seconds": 1.0, "result": {}}],
           "settings": {**settings, "ideal_expert": True}}
    (work / "runs.json").write_text(json.dumps(old))
    with pytest.raises(SystemExit) as stop:
        correction_effort.main(["--data-root", str(SHARED), "--work", str(work), "--batch", "5", "--orders", "random",
                                "--seeds", "0", "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    assert "other settings" in capsys.readouterr().err
    assert json.loads((work / "runs.json").read_text()) == old        # nothing written
    assert not (tmp_path / "out").exists()


def test_the_gate_every_cycle_runs_is_the_retrain_default_unless_told() -> None:
    default = correction_effort.parser().parse_args([])
    assert correction_effort.gate_overrides(default) is None
    assert correction_effort.gate_used(None)["ignore_unedited"] is True
    old = correction_effort.parser().parse_args(["--gate-keep-unedited", "--gate-noise-z", "0"])
    overrides = correction_effort.gate_overrides(old)
    assert overrides == {"noise_z": 0.0, "ignore_unedited": False}
    used = correction_effort.gate_used(overrides)
    assert (used["ignore_unedited"], used["noise_z"]) == (False, 0.0)
    assert correction_effort.run_settings(old, 5, 5)["gate_ignore_unedited"] is False


def test_the_steps_each_retrain_trains_are_part_of_the_settings() -> None:
    default = correction_effort.run_settings(correction_effort.parser().parse_args([]), 5, 5)
    assert default["min_steps"] == 400, "the retrain default"
    old = correction_effort.run_settings(correction_effort.parser().parse_args(["--min-steps", "0"]), 5, 5)
    assert old["min_steps"] == 0
    assert old != default, "runs made before min_steps (42-step fine-tunes) are never resumed into a new result"


def test_whether_retrains_learn_unedited_outlines_is_part_of_the_settings() -> None:
    default = correction_effort.run_settings(correction_effort.parser().parse_args([]), 5, 5)
    assert default["learn_unedited_outlines"] is False, "the retrain default: outlines from touched cells only"
    old = correction_effort.run_settings(
        correction_effort.parser().parse_args(["--learn-unedited-outlines"]), 5, 5)
    assert old != default, "runs that learned the function's own outlines are never resumed into a new result"
