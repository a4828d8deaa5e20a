"""The first retrain of a new lab fine-tunes the shipped starter: its weights, architecture, input scale and
crop classifier; the other choices (scratch, a bundle folder) and their errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.tiny_models import blob_segmenter
from trainer.retrain import Cycle, load_retrain_config
from wbc_core.bundle import write_bundle

RBC_SCALE = {"mode": "rbc", "rbc_px": 20.0, "max_side": 400, "min_side": 64}


def _starter(folder: Path) -> Path:
    cfg, model = blob_segmenter(1, seed=5)
    cfg.mask_resolution = 7
    return write_bundle(folder, model, ["wbc"], cfg, 0.85, scale=RBC_SCALE)


def _config(root: Path, **segmenter: Any) -> Path:
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "seg.yaml").write_text(yaml.safe_dump({"model": {"max_size": 320, "min_size": 240, "fpn_channels": 64,
                                                             "box_batch_size_per_image": 16}}))
    path = root / "retrain.yaml"
    path.write_text(yaml.safe_dump({"data": ["data"], "segmenter": {"config": "seg.yaml", **segmenter}}))
    return path


def _captured_training(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def fake_train(cfg: Any, data: Any, out: Path, progress: bool = True) -> Path:
        seen["cfg"] = cfg
        return out

    monkeypatch.setattr("trainer.train_segmenter.train_segmenter", fake_train)
    return seen


class _Pool:
    train = None


def test_first_version_fine_tunes_the_starter_with_its_architecture_and_scale(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    starter = _starter(tmp_path / "models" / "starter")
    monkeypatch.setattr("wbc_core.bundle.STARTER_DIR", starter)
    cycle = Cycle(load_retrain_config(_config(tmp_path / "site")), progress=False)
    assert cycle.base_bundle(None) == starter
    seen = _captured_training(monkeypatch)
    cycle.train(_Pool(), None)  # type: ignore[arg-type]
    cfg = seen["cfg"]
    assert cfg.model.weights == str(starter / "model.pt")
    assert cfg.model.fpn_channels == 32 and cfg.model.mask_resolution == 7, "the starter's architecture"
    assert cfg.model.box_batch_size_per_image == 16, "training-only keys stay the retrain config's"
    assert cfg.scale.mode == "rbc" and cfg.scale.rbc_px == 20.0 and cfg.scale.max_side == 400
    assert cfg.score_threshold == 0.85, "the served threshold (chosen on validation frames) is kept"
    # the weights load into the model the config builds (class heads re-initialised for the lab's classes)
    from wbc_core.model import build_model

    model = build_model(cfg.model, 10)
    assert torch.equal(model.backbone.fpn.layer_blocks[0][0].weight,
                       torch.load(starter / "model.pt")["backbone.fpn.layer_blocks.0.0.weight"])


def test_first_version_without_a_starter_or_from_scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("wbc_core.bundle.STARTER_DIR", tmp_path / "nowhere")
    cycle = Cycle(load_retrain_config(_config(tmp_path / "a")), progress=False)
    assert cycle.base_bundle(None) is None  # logged: trains from the config's weights
    _starter(tmp_path / "models" / "starter")
    monkeypatch.setattr("wbc_core.bundle.STARTER_DIR", tmp_path / "models" / "starter")
    scratch = Cycle(load_retrain_config(_config(tmp_path / "b", first="scratch")), progress=False)
    assert scratch.base_bundle(None) is None
    seen = _captured_training(monkeypatch)
    scratch.train(_Pool(), None)  # type: ignore[arg-type]
    assert seen["cfg"].model.weights is None and seen["cfg"].scale.mode == "fixed"


def test_first_version_from_a_named_bundle_and_its_errors(tmp_path: Path) -> None:
    other = _starter(tmp_path / "site" / "lab-b")
    cycle = Cycle(load_retrain_config(_config(tmp_path / "site", first="lab-b")), progress=False)
    assert cycle.base_bundle(None) == other
    with pytest.raises(ValueError, match=r"segmenter.first must be 'starter', 'scratch' or a bundle folder"):
        load_retrain_config(_config(tmp_path / "c", first="no-such-folder"))
