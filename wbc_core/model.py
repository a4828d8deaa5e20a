"""Mask R-CNN (torchvision) with a configurable backbone, and how weights get into it.

Backbones:
- ``mobilenet_v3_large_fpn``: the default CPU model (light, fast at ~1000 px);
- ``resnet18_fpn``: a middle ground with a stride-4 pyramid (sharper masks);
- ``resnet50_fpn``: the paper-equivalent model (torchvision's ``maskrcnn_resnet50_fpn``).

Weights (``SegmenterConfig.weights`` / ``backbone_weights``): ``None`` (from scratch, BatchNorm
trainable), a local file (a state dict, a training checkpoint or a model bundle's ``model.pt``), or
a torchvision weights name such as ``MaskRCNN_ResNet50_FPN_Weights.DEFAULT`` /
``MobileNet_V3_Large_Weights.IMAGENET1K_V1`` for users whose machines can download.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import get_weight
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

from wbc_core.config_io import dataclass_from_dict

log = logging.getLogger(__name__)

BACKBONES = ("mobilenet_v3_large_fpn", "resnet18_fpn", "resnet50_fpn")


class WeightsError(ValueError):
    """Weights cannot be loaded into this model; the message says why and what to do."""


@dataclass
class SegmenterConfig:
    """Everything needed to rebuild the segmenter. Stored in checkpoints and bundles."""

    backbone: str = "mobilenet_v3_large_fpn"
    # Input size: the image is resized so that its long side is ``max_size`` (and short side at most
    # ``min_size``). Cells are 600-1300 px in 4032x3024 photos, so 1008 keeps them 150-325 px, and
    # 1008x756 is exactly libjpeg's 1/4-scale decode of a 4032x3024 JPEG: no resize at inference.
    min_size: int = 756
    max_size: int = 1008
    weights: str | None = None            # whole-model weights: file path or torchvision weights name
    backbone_weights: str | None = None   # backbone-only torchvision weights name (ImageNet)
    trainable_backbone_layers: int | None = None  # None: all when from scratch, 3 when pretrained
    fpn_channels: int = 128               # mobilenet only (torchvision's resnet FPNs use 256)
    mobilenet_levels: int = 3             # how many MobileNet stages feed the FPN (2 = torchvision's default)
    mask_resolution: int = 28             # RoIAlign size for the mask head; the mask is 2x this (56x56)
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    rpn_pre_nms_top_n_train: int = 1000
    rpn_post_nms_top_n_train: int = 500
    rpn_pre_nms_top_n_test: int = 500
    rpn_post_nms_top_n_test: int = 100
    box_batch_size_per_image: int = 32    # RoIs per image for the box/mask heads (torchvision: 512)
    box_representation_size: int = 1024   # width of the box head's two FC layers (its first holds most weights)
    box_detections_per_img: int = 50
    box_score_thresh: float = 0.05

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SegmenterConfig:
        cfg = dataclass_from_dict(cls, data, "model config keys")
        if cfg.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {cfg.backbone!r}; choose one of {BACKBONES}")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_torchvision_weights_name(value: str) -> bool:
    return "." in value and not Path(value).exists() and value.split(".")[0].endswith("_Weights")


def _norm_layer(pretrained_backbone: bool) -> type[nn.Module]:
    # From scratch, BatchNorm must learn its statistics; frozen BN only makes sense over ImageNet stats.
    return FrozenBatchNorm2d if pretrained_backbone else nn.BatchNorm2d


def _build_backbone(cfg: SegmenterConfig) -> tuple[nn.Module, list[str]]:
    weights = get_weight(cfg.backbone_weights) if cfg.backbone_weights else None
    pretrained = weights is not None
    norm = _norm_layer(pretrained)
    if cfg.backbone == "mobilenet_v3_large_fpn":
        from torchvision.models import mobilenet_v3_large

        # MobileNetV3 stages end at strides 2, 4, 8, 16, 32, 32; torchvision's detector uses only the two
        # stride-32 ones. More levels (stride 16, 8) give the mask head finer features.
        trainable = 6 if cfg.trainable_backbone_layers is None and not pretrained else (
            cfg.trainable_backbone_layers if cfg.trainable_backbone_layers is not None else 3)
        # Build the torchvision helper's way but with our FPN width and number of levels.
        body = mobilenet_v3_large(weights=None)  # only to count its stages
        num_stages = 2 + sum(1 for b in body.features if getattr(b, "_is_cn", False))
        returned = list(range(num_stages - cfg.mobilenet_levels, num_stages))
        backbone = mobilenet_backbone(
            backbone_name="mobilenet_v3_large", weights=weights, fpn=True, norm_layer=norm,
            trainable_layers=trainable, returned_layers=returned)
        if cfg.fpn_channels != backbone.out_channels:
            backbone = _rewidth_fpn(backbone, cfg.fpn_channels, norm)
        names = [str(i) for i in range(len(returned))]
        return backbone, names
    depth = {"resnet18_fpn": "resnet18", "resnet50_fpn": "resnet50"}[cfg.backbone]
    trainable = 5 if cfg.trainable_backbone_layers is None and not pretrained else (
        cfg.trainable_backbone_layers if cfg.trainable_backbone_layers is not None else 3)
    backbone = resnet_fpn_backbone(backbone_name=depth, weights=weights, norm_layer=norm,
                                   trainable_layers=trainable)
    return backbone, ["0", "1", "2", "3"]


def _rewidth_fpn(backbone: nn.Module, channels: int, norm: type[nn.Module]) -> nn.Module:
    """Rebuild a torchvision BackboneWithFPN's FPN with ``channels`` outputs (lighter on CPU)."""
    from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

    in_channels = [m[0].in_channels for m in backbone.fpn.inner_blocks]
    backbone.fpn = FeaturePyramidNetwork(in_channels, channels, extra_blocks=LastLevelMaxPool(), norm_layer=norm)
    backbone.out_channels = channels
    return backbone


def build_model(cfg: SegmenterConfig, num_classes: int) -> MaskRCNN:
    """Mask R-CNN for ``num_classes`` cell classes (+1 background), weights loaded per ``cfg.weights``."""
    backbone, feat_names = _build_backbone(cfg)
    n_levels = len(feat_names) + 1  # + the max-pool level
    sizes = list(cfg.anchor_sizes)
    if len(sizes) < n_levels:
        raise ValueError(f"need {n_levels} anchor sizes for {cfg.backbone}, got {sizes}")
    if cfg.backbone == "mobilenet_v3_large_fpn":
        # Every level sees every size (as torchvision's mobilenet detector does): few levels, big range.
        anchor_sizes = tuple(tuple(sizes) for _ in range(n_levels))
    else:
        anchor_sizes = tuple((s,) for s in sizes[:n_levels])
    aspect = ((0.5, 1.0, 2.0),) * n_levels
    anchors = AnchorGenerator(anchor_sizes, aspect)
    mask_pool = MultiScaleRoIAlign(featmap_names=feat_names, output_size=cfg.mask_resolution, sampling_ratio=2)
    box_pool = MultiScaleRoIAlign(featmap_names=feat_names, output_size=7, sampling_ratio=2)
    out_ch = backbone.out_channels
    mask_head = MaskRCNNHeads(out_ch, (out_ch,) * 4, 1)
    mask_predictor = MaskRCNNPredictor(out_ch, out_ch, num_classes + 1)
    box_head = TwoMLPHead(out_ch * 7 * 7, cfg.box_representation_size)
    box_predictor = FastRCNNPredictor(cfg.box_representation_size, num_classes + 1)
    model = MaskRCNN(
        backbone,
        num_classes=None,
        box_head=box_head,
        box_predictor=box_predictor,
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        rpn_anchor_generator=anchors,
        box_roi_pool=box_pool,
        mask_roi_pool=mask_pool,
        mask_head=mask_head,
        mask_predictor=mask_predictor,
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_detections_per_img=cfg.box_detections_per_img,
        box_score_thresh=cfg.box_score_thresh,
    )
    if cfg.weights:
        load_weights(model, cfg.weights, num_classes)
    return model


def _state_dict_from_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise WeightsError(f"cannot read weights file {path}: {exc}. Is it a PyTorch state dict, "
                           "checkpoint.pt or a bundle's model.pt?") from exc
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} does not hold a state dict")
    return obj


def load_weights(model: MaskRCNN, weights: str, num_classes: int) -> None:
    """Load a weights file or a torchvision weights name; class-specific heads are re-initialised
    when the class count differs (fine-tuning COCO weights onto WBC classes)."""
    if _is_torchvision_weights_name(weights):
        state = get_weight(weights).get_state_dict(progress=True)
        source = weights
    else:
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(f"weights file {path} does not exist; give a file path or a torchvision "
                               "weights name like MaskRCNN_ResNet50_FPN_Weights.DEFAULT")
        state = _state_dict_from_file(path)
        source = str(path)
    own = model.state_dict()
    shape_mismatch = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    head_keys = {k for k in shape_mismatch if k.startswith(("roi_heads.box_predictor",
                                                             "roi_heads.mask_predictor.mask_fcn_logits"))}
    other = [k for k in shape_mismatch if k not in head_keys]
    missing = [k for k in own if k not in state]
    if other or len(missing) > len(own) // 2:
        raise WeightsError(
            f"weights from {source} do not fit this model (backbone mismatch? {len(other)} tensors of another "
            f"shape, {len(missing)} missing, e.g. {(other or missing)[:3]}). Use weights trained with the same "
            "'backbone' and FPN settings, or train from scratch (weights: null).")
    filtered = {k: v for k, v in state.items() if k in own and k not in head_keys}
    model.load_state_dict(filtered, strict=False)
    if head_keys:
        log.info("weights %s: class heads re-initialised for %d classes", source, num_classes)
    log.info("loaded weights from %s (%d tensors, %d left at init)", source, len(filtered),
             len(own) - len(filtered))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())




def _fold_bn(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """A conv whose output equals ``bn(conv(x))`` in eval mode (BatchNorm2d or FrozenBatchNorm2d)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
    fused.weight = nn.Parameter(conv.weight.detach() * scale.reshape(-1, 1, 1, 1), requires_grad=False)
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias, requires_grad=False)
    return fused.to(conv.weight.device)


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every BatchNorm that directly follows a conv (in registration order) into that conv.

    This holds for torchvision's MobileNetV3 / ResNet / FPN blocks, whose forward calls each conv's
    BatchNorm right after it; the folded model is checked against the original in the tests. Only for
    inference: the model must be in eval mode. Returns how many pairs were folded.
    """
    folded = 0
    for child in module.children():
        folded += fold_batchnorm(child)
    kids = list(module.named_children())
    for (conv_name, conv), (bn_name, bn) in itertools.pairwise(kids):
        if isinstance(conv, nn.Conv2d) and isinstance(bn, (nn.BatchNorm2d, FrozenBatchNorm2d)) \
                and bn.running_var is not None:
            setattr(module, conv_name, _fold_bn(conv, bn))
            setattr(module, bn_name, nn.Identity())
            folded += 1
    return folded


def optimize_for_inference(model: MaskRCNN) -> MaskRCNN:
    """Eval-mode model made faster without changing its outputs beyond float rounding.

    BatchNorm folded into the convs before it, and the backbone (body + FPN) kept in channels-last
    memory layout, which oneDNN runs MobileNet's depthwise convs much faster in (about 2x on 2 CPU
    cores at 1008x756 with both).
    """
    model.eval()
    with torch.no_grad():
        n = fold_batchnorm(model.backbone)
    model.backbone.to(memory_format=torch.channels_last)
    log.debug("inference model: %d BatchNorms folded, backbone channels-last", n)
    return model


class FusedBody(nn.Module):
    """A backbone body (the convolutional trunk before the FPN) run as a frozen TorchScript graph with oneDNN
    Graph fusion (conv + activation + residual add fused, weights pre-packed): about 1.6x faster than eager on
    2 CPU cores for MobileNetV3 at 1008x756, outputs equal to float rounding (checked at build time).

    The fused graph is specialised per input shape: the first two calls at a new shape are slower than eager
    (profiling, then compiling), later ones fast. So it pays where shapes repeat (the fixed input size:
    every frame of one camera resizes to the same input), not where every frame has its own size. Any error
    in the fused graph falls back to the eager body for good, with a warning.
    """

    def __init__(self, body: nn.Module, example: torch.Tensor) -> None:
        super().__init__()
        import warnings

        self.eager = body
        torch.jit.enable_onednn_fusion(True)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TorchScript tracing/freezing warn that they are deprecated
            self.fused: Any = torch.jit.freeze(torch.jit.trace(body, example, strict=False).eval())
            for _ in range(3):  # profile, compile, check at the example's shape (the expected input size)
                got = self.fused(example)
            want = body(example)
        worst = max(float((got[k] - want[k]).abs().max() / want[k].abs().max().clamp_min(1e-6)) for k in want)
        if worst > 1e-3:
            raise RuntimeError(f"fused backbone differs from eager by {worst:.2g} (relative)")

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.fused is not None:
            try:
                return self.fused(x)
            except Exception as exc:  # a shape or op the fused graph cannot take: eager from now on
                log.warning("fused backbone failed (%s); running it eagerly from now on", exc)
                self.fused = None
        return self.eager(x)


def fuse_backbone_body(model: MaskRCNN, height: int, width: int) -> bool:
    """Replace the backbone body by a :class:`FusedBody` built at input ``height`` x ``width`` (padded as the
    model pads). CPU only (an eval model from :func:`optimize_for_inference`); True when fused, False (eager
    kept, reason logged) when this torch cannot."""
    if next(model.parameters()).device.type != "cpu":
        return False
    div = model.transform.size_divisible
    h, w = -(-height // div) * div, -(-width // div) * div
    example = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    example = example.contiguous(memory_format=torch.channels_last)
    try:
        model.backbone.body = FusedBody(model.backbone.body, example)
    except Exception as exc:  # TorchScript/oneDNN Graph missing or changed in this torch build
        log.warning("backbone not fused (%s); eager inference", exc)
        return False
    return True
