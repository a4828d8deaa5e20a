"""Model builder, weights loading and the model bundle (no training)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from trainer.config import TrainConfig, load_config
from wbc_core.bundle import BUNDLE_FILE, SEGMENTER_FILE, BundleError, load_bundle, write_bundle
from wbc_core.model import SegmenterConfig, WeightsError, build_model, load_weights

SMALL = {"min_size": 128, "max_size": 160}


@pytest.mark.parametrize("backbone", ["mobilenet_v3_large_fpn", "resnet18_fpn", "resnet50_fpn"])
def test_each_backbone_trains_one_step(backbone: str) -> None:
    torch.manual_seed(0)
    model = build_model(SegmenterConfig(backbone=backbone, **SMALL), num_classes=10)
    model.train()
    image = torch.rand(3, 120, 160)
    mask = torch.zeros(1, 120, 160, dtype=torch.uint8)
    mask[0, 30:80, 40:100] = 1
    target = {"boxes": torch.tensor([[40.0, 30.0, 100.0, 80.0]]), "labels": torch.tensor([3]), "masks": mask}
    losses = model([image], [target])
    assert set(losses) >= {"loss_classifier", "loss_mask", "loss_objectness"}
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model([image])[0]
    assert out["boxes"].shape[1] == 4
    # predictor has 10 classes + background
    assert model.roi_heads.box_predictor.cls_score.out_features == 11


def test_from_scratch_uses_trainable_batchnorm() -> None:
    model = build_model(SegmenterConfig(**SMALL), num_classes=1)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())
    assert all(p.requires_grad for p in model.backbone.parameters())


def test_config_rejects_unknown_keys_and_backbones() -> None:
    with pytest.raises(ValueError, match="unknown model config keys"):
        SegmenterConfig.from_dict({"backbon": "x"})
    with pytest.raises(ValueError, match="unknown backbone"):
        SegmenterConfig.from_dict({"backbone": "vgg"})
    with pytest.raises(ValueError, match="unknown train keys"):
        TrainConfig.from_dict({"train": {"epoch": 3}})


def test_packaged_default_config_loads() -> None:
    cfg = load_config(None)
    assert cfg.model.backbone == "mobilenet_v3_large_fpn"
    assert cfg.model.max_size == 1008
    assert len(cfg.labels.classes) == 10


def test_weights_from_file_and_class_head_reinit(tmp_path: Path) -> None:
    src = build_model(SegmenterConfig(**SMALL), num_classes=10)
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    dst = build_model(SegmenterConfig(**SMALL, weights=str(path)), num_classes=10)
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k
    # a different class count keeps the backbone and re-initialises the class heads
    other = build_model(SegmenterConfig(**SMALL, weights=str(path)), num_classes=3)
    key = "backbone.fpn.layer_blocks.0.0.weight"
    assert torch.equal(other.state_dict()[key], src.state_dict()[key])


def test_weights_from_other_backbone_is_a_clear_error(tmp_path: Path) -> None:
    src = build_model(SegmenterConfig(backbone="resnet18_fpn", **SMALL), num_classes=1)
    path = tmp_path / "r18.pt"
    torch.save({"model": src.state_dict()}, path)  # checkpoint layout
    model = build_model(SegmenterConfig(**SMALL), num_classes=1)
    with pytest.raises(WeightsError, match="do not fit this model"):
        load_weights(model, str(path), 1)


def test_weights_missing_or_corrupt_file(tmp_path: Path) -> None:
    model = build_model(SegmenterConfig(**SMALL), num_classes=1)
    with pytest.raises(WeightsError, match="does not exist"):
        load_weights(model, str(tmp_path / "nope.pt"), 1)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="cannot read weights file"):
        load_weights(model, str(bad), 1)


def test_torchvision_weights_name_is_recognised_without_download() -> None:
    from torchvision.models import get_weight

    from wbc_core.model import _is_torchvision_weights_name

    assert _is_torchvision_weights_name("MaskRCNN_ResNet50_FPN_Weights.DEFAULT")
    assert get_weight("MaskRCNN_ResNet50_FPN_Weights.DEFAULT").meta["num_params"] > 0
    assert not _is_torchvision_weights_name("runs/x/model.pt")


def _bundle(tmp_path: Path) -> Path:
    cfg = SegmenterConfig(**SMALL)
    model = build_model(cfg, 2)
    return write_bundle(tmp_path / "b", model, ["wbc", "other"], cfg, 0.4, provenance={"git_sha": "x"})


def test_bundle_round_trip(tmp_path: Path) -> None:
    directory = _bundle(tmp_path)
    bundle = load_bundle(directory)
    assert bundle.classes == ["wbc", "other"]
    assert bundle.score_threshold == 0.4
    model = bundle.build_segmenter()
    assert not model.training


def test_bundle_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"bundle\.yaml is missing"):
        load_bundle(tmp_path / "none")
    directory = _bundle(tmp_path)
    weights = directory / SEGMENTER_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match=r"model\.pt is corrupt"):
        load_bundle(directory)
    weights.unlink()
    with pytest.raises(BundleError, match=r"model\.pt is missing"):
        load_bundle(directory)
    (directory / BUNDLE_FILE).write_text(yaml.safe_dump({"format": "something-else"}))
    with pytest.raises(BundleError, match="is not a wbc-bundle/1 bundle"):
        load_bundle(directory)


def test_bundle_loads_the_weights_file_its_yaml_names(tmp_path: Path) -> None:
    directory = _bundle(tmp_path)
    expected = load_bundle(directory).build_segmenter().state_dict()
    (directory / SEGMENTER_FILE).rename(directory / "segmenter-v2.pt")
    meta = yaml.safe_load((directory / BUNDLE_FILE).read_text())
    meta["segmenter"]["file"] = "segmenter-v2.pt"
    (directory / BUNDLE_FILE).write_text(yaml.safe_dump(meta, sort_keys=False))
    bundle = load_bundle(directory)
    assert bundle.segmenter_path == directory / "segmenter-v2.pt"
    loaded = bundle.build_segmenter().state_dict()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    (directory / "segmenter-v2.pt").unlink()
    with pytest.raises(BundleError, match=r"segmenter-v2\.pt is missing"):
        load_bundle(directory)


def test_predictor_returns_each_cell_once(tmp_path: Path) -> None:
    """Cross-class NMS: an untrained model scores every class at every place; CVAT must get one shape per cell."""
    import numpy as np
    from torchvision.ops import box_iou

    from wbc_core.detect import Predictor

    cfg = SegmenterConfig(**SMALL, box_detections_per_img=1000)
    torch.manual_seed(0)
    model = build_model(cfg, 10)
    with torch.no_grad():  # make class scores near-uniform so several classes survive per-class NMS
        model.roi_heads.box_predictor.cls_score.weight.mul_(0.0)
        model.roi_heads.mask_predictor.mask_fcn_logits.bias.fill_(5.0)  # non-empty masks
        model.roi_heads.box_predictor.bbox_pred.weight.mul_(0.0)  # every class refines to the same box
    write_bundle(tmp_path / "b", model, [f"c{i}" for i in range(10)], cfg, 0.0)
    image = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    plain = Predictor(tmp_path / "b", device="cpu", cross_class_nms=None).detect(image, threshold=0.0)
    once = Predictor(tmp_path / "b", device="cpu").detect(image, threshold=0.0)
    assert len(plain.cells) > len(once.cells) > 0
    boxes = torch.tensor([c.box for c in once.cells])
    iou = box_iou(boxes, boxes).fill_diagonal_(0)
    assert float(iou.max()) <= 0.5 + 1e-6
