"""A retrain on a lab's first handful of frames trains at least ``segmenter.min_steps`` steps: the config's
epochs alone would end a fine-tune on 6 frames after 42 steps and leave most of the time budget unused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from trainer.config import OptimConfig
from trainer.retrain import Cycle, load_retrain_config
from trainer.train_segmenter import epochs_to_run, steps_to_run


@pytest.mark.parametrize(("epochs", "min_steps", "steps_per_epoch", "expected"), [
    (14, 0, 3, 14),       # off: the epochs decide
    (14, 400, 3, 134),    # 6 frames, batch 2: 134 epochs x 3 steps >= 400
    (14, 400, 11, 37),
    (14, 400, 103, 14),   # a large set already trains more than min_steps
    (2, 5, 0, 5),         # an empty epoch count cannot divide by zero
])
def test_epochs_are_raised_only_to_reach_min_steps(epochs: int, min_steps: int, steps_per_epoch: int,
                                                   expected: int) -> None:
    got = epochs_to_run(OptimConfig(epochs=epochs, min_steps=min_steps), steps_per_epoch)
    assert got == expected
    if min_steps and steps_per_epoch:
        assert got * steps_per_epoch >= min_steps
        assert (got - 1) * steps_per_epoch < min_steps or got == epochs, "no more epochs than needed"


def test_a_negative_min_steps_is_refused() -> None:
    with pytest.raises(ValueError, match="min_steps"):
        OptimConfig(min_steps=-1)


@pytest.mark.parametrize(("max_steps", "steps_per_epoch", "epochs"), [(200, 4, 50), (200, 3, 67), (5, 103, 1),
                                                                     (7, 0, 7)])
def test_max_steps_runs_exactly_that_many_steps_whatever_the_epochs(max_steps: int, steps_per_epoch: int,
                                                                     epochs: int) -> None:
    opt = OptimConfig(epochs=14, min_steps=400, max_steps=max_steps)
    assert epochs_to_run(opt, steps_per_epoch) == epochs, "just enough epochs; min_steps and epochs ignored"
    assert steps_to_run(opt, steps_per_epoch) == max_steps, "the schedule spans exactly max_steps"
    assert steps_to_run(OptimConfig(epochs=14, min_steps=400), 3) == 402, "without it: whole epochs"


@pytest.mark.parametrize(("key", "bad"), [("max_steps", -1), ("max_steps", 2.5), ("precise_bn_frames", -3),
                                          ("precise_bn_frames", True)])
def test_bad_step_counts_are_refused(key: str, bad: object) -> None:
    with pytest.raises(ValueError, match=key):
        OptimConfig(**{key: bad})  # type: ignore[arg-type]


def _config(root: Path, **segmenter: Any) -> Path:
    (root / "data").mkdir(parents=True, exist_ok=True)
    path = root / "retrain.yaml"
    path.write_text(yaml.safe_dump({"data": ["data"], "segmenter": {"first": "scratch", **segmenter}}))
    return path


class _Pool:
    train = None


@pytest.mark.parametrize(("segmenter", "expected"), [({}, 400), ({"min_steps": 0}, 0), ({"min_steps": 150}, 150)])
def test_the_retrain_hands_min_steps_to_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 segmenter: dict[str, Any], expected: int) -> None:
    seen: dict[str, Any] = {}

    def fake_train(cfg: Any, data: Any, out: Path, progress: bool = True) -> Path:
        seen["cfg"] = cfg
        return out

    monkeypatch.setattr("trainer.train_segmenter.train_segmenter", fake_train)
    Cycle(load_retrain_config(_config(tmp_path, **segmenter)), progress=False).train(_Pool(), None)  # type: ignore[arg-type]
    assert seen["cfg"].train.min_steps == expected
    assert seen["cfg"].train.max_minutes == 10.0, "the time budget still caps it"


def test_the_retrain_hands_fixed_steps_and_seed_to_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    seen: dict[str, Any] = {}

    def fake_train(cfg: Any, data: Any, out: Path, progress: bool = True) -> Path:
        seen["cfg"] = cfg
        return out

    monkeypatch.setattr("trainer.train_segmenter.train_segmenter", fake_train)
    Cycle(load_retrain_config(_config(tmp_path, steps=120, seed=7)), progress=False).train(_Pool(), None)  # type: ignore[arg-type]
    assert (seen["cfg"].train.max_steps, seen["cfg"].train.seed) == (120, 7)
    Cycle(load_retrain_config(_config(tmp_path)), progress=False).train(_Pool(), None)  # type: ignore[arg-type]
    assert (seen["cfg"].train.max_steps, seen["cfg"].train.seed) == (0, 0), "by default the clock decides"


@pytest.mark.parametrize(("key", "bad"), [("steps", 0), ("steps", "many"), ("seed", 1.5)])
def test_the_retrain_config_refuses_bad_steps_or_seed(tmp_path: Path, key: str, bad: object) -> None:
    with pytest.raises(ValueError, match=f"segmenter.{key}"):
        load_retrain_config(_config(tmp_path, **{key: bad}))


@pytest.mark.parametrize("bad", [-5, "many"])
def test_the_retrain_config_refuses_a_bad_min_steps(tmp_path: Path, bad: object) -> None:
    with pytest.raises(ValueError, match="min_steps"):
        load_retrain_config(_config(tmp_path, min_steps=bad))


def test_the_packaged_retrain_config_sets_min_steps() -> None:
    from importlib import resources

    text = resources.files("trainer").joinpath("configs/retrain.yaml").read_text()
    assert yaml.safe_load(text)["segmenter"]["min_steps"] == 400
