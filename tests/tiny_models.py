"""Small untrained models for pipeline tests that need cells to come back, fast."""

from __future__ import annotations

import torch

from trainer.model import SegmenterConfig, build_model


def spread_untrained_segmenter(num_classes: int = 10, seed: int = 0) -> tuple[SegmenterConfig, torch.nn.Module]:
    """A tiny untrained Mask R-CNN whose scores are spread out, so that a threshold has something to cut."""
    cfg = SegmenterConfig(min_size=192, max_size=256, fpn_channels=32, mask_resolution=7, box_score_thresh=0.01,
                          box_detections_per_img=30)
    torch.manual_seed(seed)
    model = build_model(cfg, num_classes).eval()
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(60)
        for m in model.roi_heads.box_head.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(60)
    return cfg, model
