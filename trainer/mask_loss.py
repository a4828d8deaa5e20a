"""Mask R-CNN's mask loss with a weight per ground-truth cell (training only).

A lab's retrain learns from what CVAT holds. A cell the expert left as the function drew it (source ``auto``,
:data:`wbc_core.data.types.UNEDITED_SOURCE`) carries the serving model's own outline: it passed a glance, but
learning it teaches the model its own style back, not the expert's. Such cells still train finding cells (the
RPN and the box/class heads: they are cells, where the model put them) but can be left out of the mask loss
(weight 0), so the mask head learns outlines only from the cells the expert drew or redrew.

torchvision's ``RoIHeads.forward`` calls the module-level ``roi_heads.maskrcnn_loss`` without the targets, so
:func:`mask_loss_weights` swaps in a weighted version for one forward pass and puts the original back. With every
weight 1 it gives exactly torchvision's loss (the mean over RoIs of the per-pixel binary cross-entropy).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torchvision.models.detection import roi_heads


def weighted_maskrcnn_loss(mask_logits: torch.Tensor, proposals: Sequence[torch.Tensor],
                           gt_masks: Sequence[torch.Tensor], gt_labels: Sequence[torch.Tensor],
                           mask_matched_idxs: Sequence[torch.Tensor],
                           weights: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """torchvision's ``maskrcnn_loss`` where each positive RoI's loss is weighted by its ground-truth cell's
    weight (``weights[i]``: one per cell of image ``i``, None for all 1) and normalised by the weights' sum.
    No weight above 0: a zero that keeps the graph (the mask head gets no gradient)."""
    size = mask_logits.shape[-1]
    labels = torch.cat([gt[idx] for gt, idx in zip(gt_labels, mask_matched_idxs, strict=True)], dim=0)
    targets = torch.cat([roi_heads.project_masks_on_boxes(m, p, idx, size)
                         for m, p, idx in zip(gt_masks, proposals, mask_matched_idxs, strict=True)], dim=0)
    per_roi_weight = torch.cat([(torch.ones(len(m)) if w is None else w).to(mask_logits)[idx]
                                for w, m, idx in zip(weights, gt_masks, mask_matched_idxs, strict=True)], dim=0)
    total = per_roi_weight.sum()
    if targets.numel() == 0 or not total > 0:
        return mask_logits.sum() * 0
    picked = mask_logits[torch.arange(labels.shape[0], device=labels.device), labels]
    per_roi = F.binary_cross_entropy_with_logits(picked, targets, reduction="none").mean(dim=(1, 2))
    return (per_roi * per_roi_weight).sum() / total


@contextmanager
def mask_loss_weights(weights: Sequence[torch.Tensor | None]) -> Iterator[None]:
    """Within the block, Mask R-CNN forward passes weight each ground-truth cell's mask loss by ``weights``
    (per image of the batch, in the order of its targets; see :func:`weighted_maskrcnn_loss`). Not thread-safe:
    one training loop per process, as DDP runs it."""
    original = roi_heads.maskrcnn_loss

    def weighted(mask_logits, proposals, gt_masks, gt_labels, mask_matched_idxs):  # torchvision's signature
        if len(gt_masks) != len(weights):
            raise RuntimeError(f"mask weights for {len(weights)} images, but the batch has {len(gt_masks)}")
        for w, m in zip(weights, gt_masks, strict=True):
            if w is not None and len(w) != len(m):
                raise RuntimeError(f"{len(w)} mask weights for an image with {len(m)} cells")
        return weighted_maskrcnn_loss(mask_logits, proposals, gt_masks, gt_labels, mask_matched_idxs, weights)

    roi_heads.maskrcnn_loss = weighted
    try:
        yield
    finally:
        roi_heads.maskrcnn_loss = original
