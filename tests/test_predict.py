"""The inference fast path must give what torchvision's own Mask R-CNN forward gives.

``Predictor`` folds BatchNorm into convs, runs the backbone channels-last, skips the transform's
no-op resize and runs the mask head only on the cells it returns. These tests compare each of those
with the plain model on the same weights.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models.detection.roi_heads import paste_masks_in_image

from tests.hostile_images import small_slide
from tests.tiny_models import spread_untrained_segmenter
from wbc_core.bundle import write_bundle
from wbc_core.contract import MIN_WBC_RBC_RATIO
from wbc_core.data.images import ImageReadError, decode_jpeg_torch, decode_rgb
from wbc_core.detect import Predictor, equivalent_diameter, paste_mask
from wbc_core.model import (
    FusedBody,
    SegmenterConfig,
    build_model,
    fold_batchnorm,
    fuse_backbone_body,
    optimize_for_inference,
)


def _trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Give every BatchNorm non-trivial statistics, as training would, so folding is really tested."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


@pytest.mark.parametrize("backbone", ["mobilenet_v3_large_fpn", "resnet18_fpn", "resnet50_fpn"])
def test_folded_channels_last_backbone_equals_the_original(backbone: str) -> None:
    torch.manual_seed(0)
    cfg = SegmenterConfig(backbone=backbone, min_size=96, max_size=128)
    model = _trained_like(build_model(cfg, 2))
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())
    fast = optimize_for_inference(copy.deepcopy(model))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.backbone.modules()), "a BatchNorm was left"
    assert n_bn > 10
    x = torch.rand(1, 3, 96, 128)
    with torch.inference_mode():
        ref = model.backbone(x)
        out = fast.backbone(x.contiguous(memory_format=torch.channels_last))
    for key in ref:  # float rounding only: deep random ResNets amplify it, so relative to the output scale
        scale = float(ref[key].abs().max())
        assert float((out[key] - ref[key]).abs().max()) <= 1e-4 * scale + 1e-5, key


def test_fused_backbone_body_equals_eager_at_its_shape_and_others() -> None:
    torch.manual_seed(0)
    model = optimize_for_inference(_trained_like(build_model(SegmenterConfig(min_size=96, max_size=128), 2)))
    eager = copy.deepcopy(model.backbone)
    assert fuse_backbone_body(model, 96, 128)
    assert isinstance(model.backbone.body, FusedBody) and model.backbone.body.fused is not None
    with torch.inference_mode():
        for h, w in [(96, 128), (160, 96), (96, 128)]:  # built-for shape, a new one, back
            x = torch.rand(1, 3, h, w).contiguous(memory_format=torch.channels_last)
            ref, out = eager(x), model.backbone(x)
            for key in ref:
                assert float((out[key] - ref[key]).abs().max()) <= 1e-4 * float(ref[key].abs().max()) + 1e-5
    assert model.backbone.body.fused is not None, "fell back to eager on a valid input"


def test_fused_body_falls_back_to_eager_when_the_graph_fails() -> None:
    body = optimize_for_inference(build_model(SegmenterConfig(min_size=64, max_size=64), 2)).backbone.body
    fused = FusedBody(body, torch.rand(1, 3, 64, 64).contiguous(memory_format=torch.channels_last))
    with torch.inference_mode():
        with pytest.raises(RuntimeError):  # eager refuses a 2-channel image too: the error is the model's
            fused(torch.rand(1, 2, 64, 64))
        assert fused.fused is None  # ... and the fused graph is no longer used
        x = torch.rand(1, 3, 64, 64)
        assert all(torch.equal(a, b) for a, b in zip(fused(x).values(), body(x).values(), strict=True))


def test_the_predictor_fuses_only_where_input_shapes_repeat(bundle_and_model: tuple[Path, torch.nn.Module]
                                                            ) -> None:
    bundle, _ = bundle_and_model
    assert Predictor(bundle, device="cpu").fused  # fixed input size on a CPU
    assert not Predictor(bundle, device="cpu", fuse=False).fused
    assert not isinstance(Predictor(bundle, device="cpu", fuse=False).model.backbone.body, FusedBody)


def test_fold_batchnorm_leaves_a_model_without_conv_bn_pairs_alone() -> None:
    seq = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
    assert fold_batchnorm(seq) == 0


def _slide() -> np.ndarray:
    return small_slide(seed=3, discs=8)


@pytest.fixture(scope="module")
def bundle_and_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    cfg, model = spread_untrained_segmenter()
    directory = tmp_path_factory.mktemp("bundle")
    write_bundle(directory, model, [f"class{i}" for i in range(10)], cfg, 0.5)
    return directory, model


def test_fast_path_returns_torchvisions_detections_and_masks(bundle_and_model: tuple[Path, torch.nn.Module]
                                                             ) -> None:
    directory, model = bundle_and_model
    image = _slide()
    predictor = Predictor(directory, device="cpu", cross_class_nms=None)
    with torch.inference_mode():
        ref = model([torch.from_numpy(image).permute(2, 0, 1).float() / 255])[0]
    scores = ref["scores"].numpy()
    assert len(scores) >= 4 and scores.min() < scores.max()
    threshold = float(np.median(scores))
    boxes, got_scores, labels, probs, _, embeddings = predictor._run_model(image, threshold)
    keep = scores >= threshold
    np.testing.assert_allclose(got_scores, scores[keep], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(boxes, ref["boxes"].numpy()[keep], atol=0.05)
    np.testing.assert_array_equal(labels, ref["labels"].numpy()[keep])
    channels = model.roi_heads.mask_head[-1][0].out_channels  # one embedding per kept cell: the mask head's width
    assert embeddings.shape == (len(boxes), channels) and np.isfinite(embeddings).all()
    # the mask head ran on the kept cells only: pasted torchvision's way, its probabilities are the forward's
    h, w = image.shape[:2]
    theirs = ref["masks"][keep, 0]
    pasted_tv = paste_masks_in_image(torch.from_numpy(probs)[:, None], torch.from_numpy(boxes), (h, w))[:, 0]
    torch.testing.assert_close(pasted_tv, theirs, atol=1e-3, rtol=1e-3)
    # our paste resamples into the float box (torchvision rounds the box to whole pixels first)
    for box, prob, ref_mask in zip(boxes, probs, theirs.numpy(), strict=True):
        pasted = paste_mask(prob, box, w, h)
        ours = np.zeros((h, w), bool)
        if pasted is not None:
            crop, (x0, y0) = pasted
            ours[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = crop
        union = (ours | (ref_mask >= 0.5)).sum()
        assert union == 0 or (ours & (ref_mask >= 0.5)).sum() / union > 0.9


def test_threshold_only_changes_which_cells_come_back(bundle_and_model: tuple[Path, torch.nn.Module]) -> None:
    directory, _ = bundle_and_model
    predictor = Predictor(directory, device="cpu")
    low = predictor.detect(_slide(), threshold=0.02)
    high = predictor.detect(_slide(), threshold=float(np.median([c.score for c in low.cells])))
    assert 0 < len(high.cells) < len(low.cells)
    by_box = {tuple(round(v, 3) for v in c.box): c for c in low.cells}
    for cell in high.cells:
        twin = by_box[tuple(round(v, 3) for v in cell.box)]
        assert twin.label == cell.label and np.array_equal(twin.mask_crop, cell.mask_crop)


def test_cells_smaller_than_a_fraction_of_a_red_cell_are_not_returned_and_are_counted(
        bundle_and_model: tuple[Path, torch.nn.Module], monkeypatch: pytest.MonkeyPatch) -> None:
    directory, _ = bundle_and_model
    predictor = Predictor(directory, device="cpu")
    every = predictor.detect(_slide(), threshold=0.02)
    sizes = sorted(equivalent_diameter(c.mask_crop) for c in every.cells)
    assert len(sizes) >= 4 and sizes[0] < sizes[-1]
    # pretend the frame's red cells measured so that the floor falls between the smallest and the largest cells
    rbc = (sizes[0] + sizes[-1]) / 2 / MIN_WBC_RBC_RATIO
    monkeypatch.setattr(Predictor, "input_scale", lambda self, image, ds, w, h: (1.0, rbc))
    kept = predictor.detect(_slide(), threshold=0.02)
    assert kept.rbc_diameter_px == rbc
    assert all(equivalent_diameter(c.mask_crop) >= MIN_WBC_RBC_RATIO * rbc for c in kept.cells)
    assert kept.too_small == sum(d < MIN_WBC_RBC_RATIO * rbc for d in sizes) > 0
    assert len(kept.cells) + kept.too_small == len(every.cells)
    # all of them too small: an empty frame says why
    monkeypatch.setattr(Predictor, "input_scale", lambda self, image, ds, w, h: (1.0, 10 * sizes[-1]))
    none = predictor.detect(_slide(), threshold=0.02)
    assert not none.cells and none.too_small == len(every.cells)
    assert "smaller than 0.7 red-cell diameters" in (none.empty_reason or "")


def _jpeg(image: np.ndarray, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=92, **kw)
    return buf.getvalue()


def test_reduced_jpeg_decode_matches_a_full_decode_shrunk() -> None:
    image = cv2.resize(_slide(), (1024, 768), interpolation=cv2.INTER_LINEAR)
    data = _jpeg(image)
    full, s1 = decode_rgb(data)
    quarter, s4 = decode_rgb(data, min_long_side=256)
    assert s1 == 1.0 and s4 == 0.25 and quarter.shape == (192, 256, 3) and quarter.flags.writeable
    shrunk = cv2.resize(full, (256, 192), interpolation=cv2.INTER_AREA).astype(int)
    assert np.abs(quarter.astype(int) - shrunk).mean() < 3


def test_truncated_jpeg_is_refused_not_half_decoded() -> None:
    data = _jpeg(cv2.resize(_slide(), (1024, 768)))
    with pytest.raises(ImageReadError, match="truncated"):
        decode_rgb(data[: len(data) // 2], min_long_side=256)


def test_jpeg_exif_orientation_is_applied_at_reduced_size() -> None:
    image = cv2.resize(_slide(), (1024, 768))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rotated, scale = decode_rgb(_jpeg(image, exif=exif.tobytes()), min_long_side=256)
    assert rotated.shape == (256, 192, 3) and scale == 0.25


# --- the GPU decode path (nvJPEG), run here with torchvision's CPU decoder: same contract -------------

@pytest.mark.parametrize("orientation", range(1, 9))
def test_torch_decode_applies_exif_orientation_like_pil(orientation: int) -> None:
    image = cv2.resize(_slide(), (320, 200))
    image[:40, :60] = (255, 0, 0)  # a marked corner, so every flip/turn shows
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _jpeg(image, exif=exif.tobytes())
    reference, s_ref = decode_rgb(data)
    decoded, scale = decode_jpeg_torch(data, None, "cpu")
    assert decoded.shape == reference.shape and scale == s_ref == 1.0
    assert np.abs(decoded.astype(int) - reference.astype(int)).mean() < 2


def test_torch_decode_gives_the_reduced_size_of_the_cpu_path() -> None:
    data = _jpeg(cv2.resize(_slide(), (1030, 770)))  # not a multiple of 4: libjpeg picks 1/2 here
    reference, s_ref = decode_rgb(data, min_long_side=256)
    decoded, scale = decode_jpeg_torch(data, 256, "cpu")
    assert decoded.shape == reference.shape and scale == s_ref
    assert np.abs(decoded.astype(int) - reference.astype(int)).mean() < 3


def test_torch_decode_leaves_what_it_cannot_take_to_the_cpu_path() -> None:
    data = _jpeg(cv2.resize(_slide(), (400, 300)))
    with pytest.raises(ImageReadError):
        decode_jpeg_torch(data[: len(data) // 2], None, "cpu")  # cut off: no EOI at the end
    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png, "PNG")
    with pytest.raises(ImageReadError):
        decode_jpeg_torch(png.getvalue(), None, "cpu")
    cmyk = io.BytesIO()
    Image.new("CMYK", (40, 30)).save(cmyk, "JPEG")
    with pytest.raises(ImageReadError):
        decode_jpeg_torch(cmyk.getvalue(), None, "cpu")
