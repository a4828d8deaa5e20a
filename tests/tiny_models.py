"""Small untrained models for pipeline tests that need cells to come back, fast."""

from __future__ import annotations

import torch

from wbc_core.model import SegmenterConfig, build_model


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


def blob_segmenter(num_classes: int, seed: int = 0, detections: int = 20) -> tuple[SegmenterConfig, torch.nn.Module]:
    """A tiny untrained Mask R-CNN (96-128 px input) made deterministic and useful: mask and box heads amplified,
    so masks are irregular blobs (not box-filling rectangles) and scores differ between detections."""
    cfg = SegmenterConfig(min_size=96, max_size=128, fpn_channels=32, mask_resolution=7, box_score_thresh=0.01,
                          box_detections_per_img=detections)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_model(cfg, num_classes)
    with torch.no_grad():
        for m in model.roi_heads.mask_head.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.mul_(8)
        model.roi_heads.mask_predictor.conv5_mask.weight.mul_(8)
        for m in model.roi_heads.box_head.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(60)
        model.roi_heads.box_predictor.cls_score.weight.mul_(60)
    return cfg, model
