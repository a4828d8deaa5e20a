"""Cells CVAT holds as the function drew them (source ``auto``) train finding cells but not outlines: the weighted
mask loss, the dataset's per-cell weights, the training loop and the retrain setting that turns it on."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torchvision.models.detection import roi_heads

from trainer.config import OptimConfig, TrainConfig
from trainer.data.segmentation_dataset import AugmentConfig, SegmentationDataset
from trainer.mask_loss import mask_loss_weights, weighted_maskrcnn_loss
from trainer.retrain import Cycle, load_retrain_config
from trainer.synthetic import generate_task
from trainer.train_segmenter import train_segmenter
from wbc_core.data.loader import load_dataset
from wbc_core.data.types import UNEDITED_SOURCE
from wbc_core.model import SegmenterConfig, build_model

TINY_MODEL = {"max_size": 128, "min_size": 96, "fpn_channels": 32, "mask_resolution": 7,
              "box_batch_size_per_image": 16, "rpn_post_nms_top_n_train": 100}


def _roi_inputs(seed: int = 0) -> dict[str, Any]:
    """Two images' worth of positive RoIs, as RoIHeads hands them to the mask loss."""
    g = torch.Generator().manual_seed(seed)
    gt_masks, proposals, idxs, labels = [], [], [], []
    for n_cells, n_rois in ((2, 5), (3, 4)):
        m = torch.zeros(n_cells, 40, 40)
        for c in range(n_cells):
            m[c, 5 + 8 * c: 20 + 8 * c, 4 + 9 * c: 22 + 9 * c] = 1
        gt_masks.append(m)
        xy = torch.rand(n_rois, 2, generator=g) * 15
        proposals.append(torch.cat([xy, xy + 12 + torch.rand(n_rois, 2, generator=g) * 10], dim=1))
        idxs.append(torch.arange(n_rois) % n_cells)
        labels.append(torch.ones(n_cells, dtype=torch.int64))
    logits = torch.randn(9, 2, 14, 14, generator=g, requires_grad=True)
    return {"mask_logits": logits, "proposals": proposals, "gt_masks": gt_masks, "gt_labels": labels,
            "mask_matched_idxs": idxs}


def test_with_unit_weights_it_is_torchvisions_loss() -> None:
    args = _roi_inputs()
    expected = roi_heads.maskrcnn_loss(**args)
    assert torch.allclose(weighted_maskrcnn_loss(**args, weights=[None, None]), expected, atol=1e-6)
    ones = [torch.ones(2), torch.ones(3)]
    assert torch.allclose(weighted_maskrcnn_loss(**args, weights=ones), expected, atol=1e-6)


def test_a_zero_weight_leaves_that_cells_rois_out() -> None:
    args = _roi_inputs(seed=1)
    got = weighted_maskrcnn_loss(**args, weights=[torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0, 1.0])])
    # the same loss from torchvision on only the RoIs matched to a cell of weight 1
    keep = [args["mask_matched_idxs"][0] == 0, args["mask_matched_idxs"][1] != 0]
    offsets = [0, len(keep[0])]
    rows = torch.cat([torch.nonzero(k).flatten() + o for k, o in zip(keep, offsets, strict=True)])
    subset = {"mask_logits": args["mask_logits"][rows],
              "proposals": [p[k] for p, k in zip(args["proposals"], keep, strict=True)],
              "gt_masks": args["gt_masks"], "gt_labels": args["gt_labels"],
              "mask_matched_idxs": [i[k] for i, k in zip(args["mask_matched_idxs"], keep, strict=True)]}
    assert torch.allclose(got, roi_heads.maskrcnn_loss(**subset), atol=1e-6)
    got.backward()
    grad = args["mask_logits"].grad.abs().sum(dim=(1, 2, 3))
    assert (grad[rows] > 0).all()
    left_out = torch.ones(9, dtype=torch.bool)
    left_out[rows] = False
    assert (grad[left_out] == 0).all(), "no gradient from the cells of weight 0"


def test_all_weights_zero_gives_zero_with_a_graph() -> None:
    args = _roi_inputs(seed=2)
    loss = weighted_maskrcnn_loss(**args, weights=[torch.zeros(2), torch.zeros(3)])
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert args["mask_logits"].grad.abs().sum() == 0


def _images_and_targets() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    torch.manual_seed(0)
    images = [torch.rand(3, 96, 128) for _ in range(2)]
    targets = []
    for k in range(2):
        masks = torch.zeros(2, 96, 128, dtype=torch.uint8)
        masks[0, 10 + k:40, 12:44] = 1
        masks[1, 50:85, 70 + k:110] = 1
        targets.append({"boxes": torch.tensor([[12.0, 10 + k, 44, 40], [70 + k, 50, 110, 85]]),
                        "labels": torch.tensor([1, 1]), "masks": masks})
    return images, targets


def test_the_context_weights_a_real_mask_rcnn_and_puts_torchvision_back() -> None:
    model = build_model(SegmenterConfig(**TINY_MODEL), 1).train()
    images, targets = _images_and_targets()
    original = roi_heads.maskrcnn_loss

    def losses(weights: list[torch.Tensor | None] | None) -> dict[str, torch.Tensor]:
        torch.manual_seed(5)  # the same proposals are sampled every time
        if weights is None:
            return model(images, targets)
        with mask_loss_weights(weights):
            return model(images, targets)

    plain = losses(None)
    assert roi_heads.maskrcnn_loss is original
    ones = losses([torch.ones(2), None])
    assert torch.allclose(ones["loss_mask"], plain["loss_mask"], atol=1e-6)
    zero = losses([torch.zeros(2), torch.zeros(2)])
    assert zero["loss_mask"].item() == 0.0
    assert torch.allclose(zero["loss_classifier"], plain["loss_classifier"]), "finding cells still trains"
    assert roi_heads.maskrcnn_loss is original
    with pytest.raises(RuntimeError, match="mask weights"), mask_loss_weights([torch.ones(2)]):
        model(images, targets)
    assert roi_heads.maskrcnn_loss is original, "put back after an error too"
    with pytest.raises(RuntimeError, match="3 mask weights for an image with 2 cells"), \
            mask_loss_weights([torch.ones(3), None]):
        model(images, targets)
    assert roi_heads.maskrcnn_loss is original


# --- the dataset ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("task")
    generate_task(root / "t", n_images=4, width=320, height=240, seed=21, cells_per_image=(2, 3))
    return root / "t"


def _with_sources(task: Path, sources: list[str]) -> Any:
    data = load_dataset(task, label_map=TrainConfig().labels, require_images=True)
    for rec in data.images:
        for i, cell in enumerate(rec.outlined()):
            cell.source = sources[i % len(sources)]
    return data


def test_the_dataset_weights_unedited_cells_zero(task: Path) -> None:
    data = _with_sources(task, [UNEDITED_SOURCE, "manual", "semi-auto"])
    labels = TrainConfig().labels
    plain = SegmentationDataset(data, labels, 320, 240)
    assert "mask_weights" not in plain[0][1], "no weights unless asked: training as before"
    ds = SegmentationDataset(data, labels, 320, 240, mask_skip_sources=[UNEDITED_SOURCE])
    for i in range(len(ds)):
        _, target = ds[i]
        expected = [0.0 if c.source == UNEDITED_SOURCE else 1.0 for c in data.images[i].outlined()]
        assert target["mask_weights"].tolist() == expected
        assert len(target["mask_weights"]) == len(target["masks"]) == len(target["boxes"])


def test_augmentation_keeps_weights_with_their_cells(task: Path) -> None:
    data = _with_sources(task, [UNEDITED_SOURCE, "manual"])
    aug = AugmentConfig(hflip=0.5, vflip=0.5, scale_p=1.0, scale_range=[1.5, 2.5])
    ds = SegmentationDataset(data, TrainConfig().labels, 320, 240, augment=aug, mask_skip_sources=["auto"])
    for epoch in range(4):
        for i in range(len(ds)):
            _, target = ds[(epoch, i)]
            assert len(target["mask_weights"]) == len(target["masks"]) == len(target["labels"])


def test_an_epoch_tagged_index_draws_that_epochs_augmentation(task: Path) -> None:
    data = _with_sources(task, ["manual"])
    aug = AugmentConfig(hflip=0.5, vflip=0.5, hue=20.0, brightness=0.4)
    ds = SegmentationDataset(data, TrainConfig().labels, 320, 240, augment=aug, seed=3)
    ds.set_epoch(2)
    image, target = ds[1]
    ds.set_epoch(0)
    tagged, tagged_target = ds[(2, 1)]
    assert torch.equal(image, tagged) and torch.equal(target["masks"], tagged_target["masks"])
    draws = {ds[(e, 1)][0].sum().item() for e in range(6)}
    assert len(draws) > 1, "the epoch in the index changes the draw"


# --- training and the retrain ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_training_on_unedited_cells_only_learns_no_outline(task: Path, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    cfg = TrainConfig.from_dict({"model": TINY_MODEL, "train": {
        "epochs": 2, "batch_size": 2, "warmup_steps": 1, "checkpoint_every": 0, "num_workers": 1, "threads": 1,
        "device": "cpu", "mask_skip_sources": [UNEDITED_SOURCE]}})
    data = _with_sources(task, [UNEDITED_SOURCE])
    with caplog.at_level(logging.INFO, logger="trainer.train_segmenter"):
        train_segmenter(cfg, data, tmp_path / "all-auto", progress=False)
    assert "the mask head learns no outline" in caplog.text
    rows = [r.split(",") for r in (tmp_path / "all-auto" / "losses.csv").read_text().splitlines()]
    mask = rows[0].index("loss_mask")
    assert len(rows) == 5 and all(float(r[mask]) == 0.0 for r in rows[1:])
    assert all(float(r[rows[0].index("loss_classifier")]) > 0 for r in rows[1:])

    caplog.clear()
    mixed = _with_sources(task, [UNEDITED_SOURCE, "manual"])
    with caplog.at_level(logging.INFO, logger="trainer.train_segmenter"):
        train_segmenter(cfg, mixed, tmp_path / "mixed", progress=False)
    assert "mask loss on" in caplog.text
    rows = [r.split(",") for r in (tmp_path / "mixed" / "losses.csv").read_text().splitlines()]
    assert any(float(r[mask]) > 0 for r in rows[1:])


@pytest.mark.parametrize("bad", ["auto", [""], [3]])
def test_a_bad_mask_skip_sources_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="mask_skip_sources"):
        OptimConfig(mask_skip_sources=bad)  # type: ignore[arg-type]


class _Pool:
    train = None


@pytest.mark.parametrize(("segmenter", "expected"), [({}, [UNEDITED_SOURCE]),
                                                     ({"ignore_unedited_outlines": False}, [])])
def test_the_retrain_leaves_unedited_outlines_out_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             segmenter: dict[str, Any], expected: list[str]) -> None:
    (tmp_path / "data").mkdir()
    config = tmp_path / "retrain.yaml"
    config.write_text(yaml.safe_dump({"data": ["data"], "segmenter": {"first": "scratch", **segmenter}}))
    seen: dict[str, Any] = {}

    def fake_train(cfg: Any, data: Any, out: Path, progress: bool = True) -> Path:
        seen["cfg"] = cfg
        return out

    monkeypatch.setattr("trainer.train_segmenter.train_segmenter", fake_train)
    Cycle(load_retrain_config(config), progress=False).train(_Pool(), None)  # type: ignore[arg-type]
    assert seen["cfg"].train.mask_skip_sources == expected


def test_the_retrain_refuses_a_non_boolean_setting(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    config = tmp_path / "retrain.yaml"
    config.write_text(yaml.safe_dump({"data": ["data"], "segmenter": {"ignore_unedited_outlines": "yes"}}))
    with pytest.raises(ValueError, match="ignore_unedited_outlines"):
        load_retrain_config(config)


def test_the_packaged_retrain_config_names_the_setting() -> None:
    from importlib import resources

    text = resources.files("trainer").joinpath("configs/retrain.yaml").read_text()
    assert yaml.safe_load(text)["segmenter"]["ignore_unedited_outlines"] is True
