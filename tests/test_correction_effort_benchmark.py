"""The correction-effort benchmark resumes a run folder only when its runs were made with the same settings: a
result never mixes runs of another batch size, budget, start model or expert."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

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
    fixed = correction_effort.run_settings(correction_effort.parser().parse_args(["--steps", "200"]), 5, 5)
    assert (default["steps"], fixed["steps"]) == (None, 200)
    assert fixed != default, "clock-bounded runs are never resumed into a fixed-step result"


def test_the_trainer_config_of_the_retrains_is_part_of_the_settings(tmp_path: Path) -> None:
    default = correction_effort.run_settings(correction_effort.parser().parse_args([]), 5, 5)
    assert default["segmenter_config"]["train"]["precise_bn_frames"] == 64, "the packaged CPU config"
    other = tmp_path / "no-precise-bn.yaml"
    other.write_text(yaml.safe_dump({"train": {"precise_bn_frames": 0}}))
    changed = correction_effort.run_settings(
        correction_effort.parser().parse_args(["--segmenter-config", str(other)]), 5, 5)
    assert changed["segmenter_config"]["train"]["precise_bn_frames"] == 0
    assert changed != default


def test_whether_retrains_learn_unedited_outlines_is_part_of_the_settings() -> None:
    default = correction_effort.run_settings(correction_effort.parser().parse_args([]), 5, 5)
    assert default["learn_unedited_outlines"] is False, "the retrain default: outlines from touched cells only"
    old = correction_effort.run_settings(
        correction_effort.parser().parse_args(["--learn-unedited-outlines"]), 5, 5)
    assert old != default, "runs that learned the function's own outlines are never resumed into a new result"


def test_signal_weights_count_each_kind_of_edit_as_much_as_it_is_common() -> None:
    def stats(nonzero: int = 50, **by_kind: tuple[float, float]) -> dict:
        return {"frames_nonzero": nonzero, "by_kind": {k: {"rho": r, "p": p} for k, (r, p) in by_kind.items()}}

    per_signal = {
        "outline": stats(redrawn=(0.3, 0.001), drawn=(-0.1, 0.9)),         # predicts the common kind
        "count": stats(redrawn=(0.02, 0.4), drawn=(0.4, 0.001), deleted=(0.3, 0.01)),  # predicts the rare kinds
        "noise": stats(redrawn=(0.1, 0.2)),                                 # predicts nothing significantly
        "rare": stats(nonzero=3, redrawn=(0.5, 0.001)),                     # seen on too few frames
        "against": stats(redrawn=(-0.3, 0.001)),
    }
    edits = {"redrawn": 90, "drawn": 6, "deleted": 4, "relabelled": 0}
    weights = correction_effort.signal_weights(per_signal, edits, list(per_signal))
    assert weights == {"outline": pytest.approx(0.27), "count": pytest.approx(0.06 * 0.4 + 0.04 * 0.3),
                       "noise": 0.0, "rare": 0.0, "against": 0.0}
    # where missed cells are most of the edits, the detection signal leads
    flipped = correction_effort.signal_weights(per_signal, {"redrawn": 10, "drawn": 80, "deleted": 10}, ["outline",
                                                                                                       "count"])
    assert flipped["count"] > flipped["outline"] > 0
    assert correction_effort.signal_weights(per_signal, {"redrawn": 0}, ["outline"]) == {"outline": 0.0}


def test_the_ranked_orders_density_power_is_part_of_the_settings() -> None:
    from wbc_core.typicality import DENSITY_POWER

    default = correction_effort.run_settings(correction_effort.parser().parse_args([]), 5, 5)
    assert default["density_power"] == DENSITY_POWER
    only = correction_effort.run_settings(correction_effort.parser().parse_args(["--density-power", "0"]), 5, 5)
    assert only["density_power"] == 0 and only != default


def test_the_saving_says_when_a_total_is_only_a_floor() -> None:
    def run(order: str, seed: int, ratios: list[float], edits: list[int]) -> dict:
        curve = [{"corrected": 10 * (i + 1), "edits_per_frame": r, "ratio_to_scratch": r, "accepted_per_frame": 0.0}
                 for i, r in enumerate(ratios)]
        return {"order": order, "seed": seed, "result": {"curve": curve, "batch_edits": edits,
                                                         "config": {"batch": 10},
                                                         "cycles": [{"cycle_seconds": 1.0}] * len(ratios)}}

    ranked = [run("ranked", s, [0.3, 0.2, 0.2], [5, 4, 4]) for s in range(3)]
    random_short = [run("random", s, [0.4, 0.3, 0.3], [5, 5, 5]) for s in range(3)]
    result = correction_effort.aggregate(ranked + random_short, ["ranked", "random"], 1.0)
    met = correction_effort.judge(result)
    assert result["total_edits"]["ranked"]["mean"] == 9 and result["total_edits"]["random"]["mean"] == 15
    assert met["ranked_saving"] == pytest.approx(0.4) and met["ranked_saving_met"]
    assert met["ranked_saving_is"].startswith("a lower bound: random did not reach 25% in 3 seed(s)")

    random_reaching = [run("random", s, [0.4, 0.3, 0.2], [5, 5, 5]) for s in range(3)]
    met = correction_effort.judge(correction_effort.aggregate(ranked + random_reaching, ["ranked", "random"], 1.0))
    assert met["ranked_saving_is"].startswith("exact")

    ranked_short = [*ranked[:2], run("ranked", 2, [0.3, 0.3, 0.3], [5, 4, 4])]
    met = correction_effort.judge(correction_effort.aggregate(ranked_short + random_reaching, ["ranked", "random"],
                                                              1.0))
    assert met["ranked_saving_is"].startswith("an upper bound: ranked did not reach 25% in 1 seed(s)")

    met = correction_effort.judge(correction_effort.aggregate(ranked_short + random_short, ["ranked", "random"], 1.0))
    assert met["ranked_saving_is"].startswith("no bound: ranked did not reach 25% in 1 seed(s) and random in 3")
