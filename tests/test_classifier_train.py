"""Training methods, the target protocol (split by frame, few-shot draws), DANN health, bad input."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_classifier_synthetic import target_dataset, write_class_folders
from trainer.classifier.sources import CropSet, SourceClassMap, crops_from_dataset, load_folder_source
from trainer.classifier.train import (
    ClassifierConfig,
    EpochLog,
    Experiment,
    ProtocolConfig,
    dann_health,
    draw_few_shot,
    load_classifier_config,
    split_target,
)
from wbc_core.classifier.crops import CropConfig
from wbc_core.classifier.model import CellNet, NetConfig, grad_reverse
from wbc_core.classifier.stain import empty_stats
from wbc_core.data.types import DatasetError

TINY = {"crop": {"size": 24}, "net": {"width": 8, "domain_hidden": 16},
        "train": {"batch_size": 16, "source_steps": 60, "target_steps": 60, "finetune_steps": 30, "epoch_steps": 20,
                  "threads": 1, "tta": False},
        "protocol": {"pool_per_class": 6, "pool_fraction": 0.5, "draws": 2, "seeds": 1}}


@pytest.fixture(scope="module")
def crops(tmp_path_factory: pytest.TempPathFactory) -> tuple[CropSet, CropSet]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cls")
    crop = CropConfig(size=24)
    source = load_folder_source(write_class_folders(root / "src", per_class=10, size=96), SourceClassMap(
        folders={"lymphocyte": "lymphocyte", "neutrophil": "neutrophil"}), crop, progress=False)
    target = crops_from_dataset(target_dataset(root / "tgt", per_class=12), crop, progress=False)
    return source, target


def test_packaged_config_loads_and_rejects_typos(tmp_path: Path) -> None:
    cfg = load_classifier_config(None)
    assert cfg.crop.size == 64 and cfg.stain_norm == "none" and cfg.protocol.draws == 5
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {source_step: 3}\n")
    with pytest.raises(ValueError, match="unknown classifier config keys in 'train'"):
        load_classifier_config(bad)
    with pytest.raises(ValueError, match="stain_norm must be one of"):
        ClassifierConfig.from_dict({"stain_norm": "histogram"})


def test_gradient_reversal_flips_and_scales_the_gradient() -> None:
    x = torch.ones(3, requires_grad=True)
    (grad_reverse(x, 0.5) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [-0.5, -1.0, -1.5])


def _fake_set(labels: list[str], groups: list[str], split: dict[str, str] | None = None) -> CropSet:
    n = len(labels)
    stats = {k: np.zeros((n, *v.shape[1:]), np.float32) for k, v in empty_stats().items()}
    return CropSet(images=np.zeros((n, 8, 8, 3), np.uint8), masks=np.zeros((n, 8, 8), bool),
                   has_mask=np.zeros(n, bool), labels=labels, groups=groups, stats=stats,
                   meta={"split": split} if split else {})


def test_split_is_by_frame_capped_fixed_and_respects_the_split() -> None:
    rng = np.random.default_rng(0)
    labels = list(rng.choice(["neutrophil", "eosinophil", "monocyte"], size=120, p=[0.6, 0.3, 0.1]))
    groups = [f"frame{i // 2}" for i in range(120)]            # two cells per frame
    split = {f"frame{j}": "test" if j % 5 == 0 else "trainval" for j in range(60)}
    target = _fake_set(labels, groups, split)
    cfg = ProtocolConfig(pool_per_class=8, pool_fraction=0.5, pool_split="trainval")
    pool, evaluation = split_target(target, cfg)
    pool_groups = {groups[i] for i in pool}
    assert not pool_groups & {groups[i] for i in evaluation}        # no frame on both sides
    assert len(pool) + len(evaluation) == 120
    assert all(split[g] == "trainval" for g in pool_groups)
    counts = {c: sum(labels[i] == c for i in pool) for c in set(labels)}
    n_mono_trainval = sum(1 for i in range(120) if labels[i] == "monocyte" and split[groups[i]] == "trainval")
    assert counts["monocyte"] >= min(8, round(0.5 * n_mono_trainval))
    # a frame's other cell may overshoot a cap, but only when a class is still short
    assert counts["neutrophil"] <= 8 + counts["monocyte"] and counts["eosinophil"] <= 8 + counts["monocyte"]
    again, _ = split_target(target, cfg)
    np.testing.assert_array_equal(pool, again)


def test_few_shot_draws_k_per_class_fixed_by_seed() -> None:
    labels = ["a"] * 10 + ["b"] * 3 + ["c"] * 7
    idx = draw_few_shot(labels, 5, seed=1)
    drawn = [labels[i] for i in idx]
    assert drawn.count("a") == 5 and drawn.count("b") == 3 and drawn.count("c") == 5
    np.testing.assert_array_equal(idx, draw_few_shot(labels, 5, seed=1))
    assert not np.array_equal(idx, draw_few_shot(labels, 5, seed=2))


def test_target_only_learns_shapes_and_reports_every_draw(crops: tuple[CropSet, CropSet]) -> None:
    _, target = crops
    exp = Experiment(None, target, ClassifierConfig.from_dict(TINY))
    row = exp.run("target-only", "none", k=6)
    assert len(row["runs"]) == 2 and row["seconds"] > 0
    m = row["runs"][0]["metrics"]
    assert set(m) >= {"accuracy", "macro_f1", "per_class", "confusion"}
    assert set(m["per_class"]["neutrophil"]) >= {"precision", "recall", "f1", "support"}
    assert m["n"] == len(exp.eval) and sum(map(sum, m["confusion"])) == len(exp.eval)
    assert max(r["metrics"]["macro_f1"] for r in row["runs"]) >= 0.8  # lobes vs a round nucleus: easy


def test_finetune_and_source_only_use_the_source(crops: tuple[CropSet, CropSet]) -> None:
    source, target = crops
    exp = Experiment(source, target, ClassifierConfig.from_dict({**TINY, "stain_norm": "reinhard"}))
    ft = exp.run("finetune", "reinhard", k=3, draws=1)
    assert ft["runs"][0]["report"]["pretrain_seconds"] > 0
    so = exp.run("source-only", "reinhard", k=0)
    assert so["runs"][0]["labelled"] == 0
    with pytest.raises(ValueError, match="uses no target labels"):
        exp.run("source-only", "none", k=5)


def test_dann_logs_the_discriminator_every_epoch_and_judges_it(crops: tuple[CropSet, CropSet],
                                                               caplog: pytest.LogCaptureFixture) -> None:
    source, target = crops
    exp = Experiment(source, target, ClassifierConfig.from_dict(TINY))
    with caplog.at_level(logging.INFO, logger="trainer.classifier.train"):
        row = exp.run("dann", "none", k=0)
    report = row["runs"][0]["report"]["dann"]
    epochs = report["epochs"]
    assert len(epochs) == 3 and all(0 <= e["domain_accuracy"] <= 1 for e in epochs)
    assert epochs[-1]["reversal_weight"] > epochs[0]["reversal_weight"]
    assert report["health"]["status"] in ("ok", "separable", "stuck-at-chance")
    per_epoch = [r.message for r in caplog.records if " epoch " in r.message and "discriminator accuracy" in r.message]
    assert len(per_epoch) == 3


def _history(accs: list[float], grads: list[float], stds: list[float] | None = None) -> list[EpochLog]:
    stds = stds or [1.0] * len(accs)
    return [EpochLog(epoch=i + 1, class_loss=0.5, train_accuracy=0.8, domain_loss=0.6, domain_accuracy=a,
                     reversal_weight=min(1.0, 0.2 * (i + 1)), discriminator_grad=g, domain_logit_std=s)
            for i, (a, g, s) in enumerate(zip(accs, grads, stds, strict=True))]


def test_dann_collapse_detection() -> None:
    separable = dann_health(_history([0.9, 0.99, 1.0, 1.0, 1.0, 0.995], [1.0] * 6))
    assert separable["status"] == "separable" and "not aligned" in separable["message"]
    dead = dann_health(_history([0.6, 0.52, 0.5, 0.5, 0.5, 0.5], [1.0, 0.1, 1e-3, 1e-4, 1e-5, 1e-5]))
    assert dead["status"] == "stuck-at-chance" and "vanishing" in dead["message"]
    constant = dann_health(_history([0.5] * 6, [1.0] * 6, stds=[0.5, 1e-4, 1e-4, 1e-4, 1e-4, 1e-4]))
    assert constant["status"] == "stuck-at-chance"
    healthy = dann_health(_history([0.8, 0.7, 0.6, 0.55, 0.52, 0.51], [1.0, 0.8, 0.7, 0.6, 0.6, 0.5]))
    assert healthy["status"] == "ok"


def test_bad_class_setups_are_clear_errors(crops: tuple[CropSet, CropSet]) -> None:
    source, target = crops
    cfg = ClassifierConfig.from_dict(TINY)
    one_class = target.subset([i for i, lbl in enumerate(target.labels) if lbl == "neutrophil"])
    with pytest.raises(DatasetError, match="one class only"):
        Experiment(source, one_class, cfg)
    with pytest.raises(DatasetError, match="one class only"):
        Experiment(source.subset([i for i, lbl in enumerate(source.labels) if lbl == "lymphocyte"]), target, cfg)
    # a target class the source lacks: source-only / dann cannot learn it, finetune learns it from target labels
    renamed = target.subset(np.arange(len(target)))
    renamed.labels = ["monocyte" if lbl == "lymphocyte" else lbl for lbl in renamed.labels]
    exp = Experiment(source, renamed, cfg)
    with pytest.raises(DatasetError, match=r"target classes \['monocyte'\] have no source crops"):
        exp.run("source-only", "none", k=0)
    with pytest.raises(DatasetError, match="have no source crops"):
        exp.run("dann", "none", k=0)
    row = exp.run("finetune", "none", k=3, draws=1)
    assert "monocyte" in row["models"][0].classes and "lymphocyte" in row["models"][0].classes


def test_model_sizes() -> None:
    model = CellNet(5, NetConfig(width=32))
    assert sum(p.numel() for p in model.parameters()) < 1_500_000
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 5)


def test_pale_augmentation_fades_mid_tones_and_keeps_the_background_and_nucleus() -> None:
    from trainer.classifier.augment import _pale

    x = torch.full((2, 3, 32, 32), 0.9)            # background
    x[:, :, 8:24, 8:24] = torch.tensor([0.8, 0.5, 0.7])[:, None, None]   # cytoplasm: a mid-tone
    x[:, :, 13:19, 13:19] = 0.1                    # nucleus: the darkest (3.5% of the pixels)
    out = _pale(x, torch.tensor([0.0, 0.8]))
    assert torch.allclose(out[0], x[0])            # strength 0: unchanged
    bg, cyto, nucleus = (0, 0), (10, 10), (15, 15)
    assert torch.allclose(out[1, :, bg[0], bg[1]], x[1, :, bg[0], bg[1]])
    assert torch.allclose(out[1, :, nucleus[0], nucleus[1]], x[1, :, nucleus[0], nucleus[1]])
    moved = (out[1, :, cyto[0], cyto[1]] - x[1, :, cyto[0], cyto[1]]).abs().sum()
    towards_bg = (out[1, :, cyto[0], cyto[1]] - 0.9).abs().sum() < (x[1, :, cyto[0], cyto[1]] - 0.9).abs().sum()
    assert moved > 0.05 and towards_bg
