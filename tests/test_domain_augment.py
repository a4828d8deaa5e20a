"""Domain randomisation and scale normalisation in the segmentation dataset: each augmentation changes the image
the way it should, masks and boxes stay aligned, the rbc scale mode gives the expected input size, and the
default config behaves exactly as before."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from trainer.config import TrainConfig
from trainer.data.segmentation_dataset import (
    AugmentConfig,
    ScaleConfig,
    SegmentationDataset,
    add_noise,
    colour_jitter,
    defocus,
    geometric,
    jpeg_reencode,
    masks_to_boxes,
    pale_cytoplasm,
    scale_jitter,
    stain_jitter,
    white_balance,
)
from wbc_core.data.masks import mask_iou
from wbc_core.data.types import AnnotatedDataset, ImageRecord, Instance
from wbc_core.labels import LabelMap

BG = (235, 225, 230)


def smear(h: int = 120, w: int = 160) -> np.ndarray:
    """A pale background, a pink mid-tone 'cytoplasm' disc around a dark purple 'nucleus', and some texture."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = BG
    cv2.circle(img, (60, 60), 30, (200, 150, 190), -1)
    cv2.circle(img, (60, 60), 12, (90, 40, 120), -1)
    cv2.circle(img, (125, 30), 14, (215, 140, 150), -1)  # a red cell
    return img


def sat(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(img, cv2.COLOR_RGB2HSV)[..., 1].astype(np.float32)


def lap_var(img: np.ndarray) -> float:
    return float(cv2.Laplacian(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var())


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_stain_jitter_changes_stained_pixels_not_the_background() -> None:
    img = smear()
    img[0:10, 0:10] = 255
    darker = stain_jitter(img, rng(), factors=[1.3, 1.3, 1.0], offsets=[0, 0, 0])
    assert np.abs(darker[0:10, 0:10].astype(int) - 255).max() <= 1        # white has no stain: unchanged
    nucleus = (slice(55, 65), slice(55, 65))
    assert darker[nucleus].mean() < img[nucleus].mean() - 5             # more stain: darker
    lighter = stain_jitter(img, rng(), factors=[0.6, 0.6, 1.0], offsets=[0, 0, 0])
    assert lighter[nucleus].mean() > img[nucleus].mean() + 5
    random = stain_jitter(img, rng(3), scale=0.3, bias=0.05)
    assert random.shape == img.shape and random.dtype == np.uint8 and not np.array_equal(random, img)


def test_white_balance_gains_and_strong_casts() -> None:
    grey = np.full((20, 20, 3), 200, np.uint8)
    out = white_balance(grey, rng(1), gain=0.2).reshape(-1, 3).mean(axis=0)
    assert np.all(np.abs(out / 200 - 1) <= 0.21) and np.ptp(out) > 2
    for cast, strongest, weakest in (("yellow", 0, 2), ("green", 1, 2), ("blue", 2, 0), ("pink", 0, 1)):
        for seed in range(4):
            tinted = white_balance(grey, rng(seed), gain=0.0, cast=cast, cast_strength=0.35).reshape(-1, 3).mean(0)
            assert tinted.max() <= 200.5, "a cast must not push the background past its brightness"
            assert tinted.argmax() == strongest and tinted.argmin() == weakest, f"{cast}: {tinted}"
            assert tinted.min() < 0.9 * tinted.max(), f"{cast} is too weak: {tinted}"
    yellow = white_balance(grey, rng(2), gain=0.0, cast="yellow").reshape(-1, 3).mean(axis=0)
    assert yellow[2] < yellow[0] and yellow[2] < yellow[1]
    with pytest.raises(ValueError, match="unknown cast"):
        white_balance(grey, rng(), cast="purple")


def test_pale_cytoplasm_regional_and_global() -> None:
    img = smear()
    cyto = np.zeros(img.shape[:2], bool)
    cv2.circle(cyto.view(np.uint8), (60, 60), 28, 1, -1)
    cv2.circle(cyto.view(np.uint8), (60, 60), 14, 0, -1)
    bg = np.zeros(img.shape[:2], bool)
    bg[:, 100:] = True
    bg[10:50, 105:145] = False  # not the red cell
    pale = pale_cytoplasm(img, rng(), strength=0.8, regional=True)
    assert sat(pale)[cyto].mean() < 0.85 * sat(img)[cyto].mean()
    assert pale[cyto].mean() > img[cyto].mean()                          # paler, not darker
    assert np.abs(pale[bg].astype(int) - img[bg]).max() <= 2             # background untouched
    flat = pale_cytoplasm(img, rng(), strength=0.8, regional=False)
    assert sat(flat).mean() < 0.85 * sat(img).mean()
    assert flat.astype(np.float32).std() < img.astype(np.float32).std()  # lower contrast


@pytest.mark.parametrize("kind", ["gaussian", "disc"])
def test_defocus_blurs(kind: str) -> None:
    img = smear()
    out = defocus(img, rng(), sigma=3.0, radius=5.0, kind=kind)
    assert lap_var(out) < 0.5 * lap_var(img)
    assert abs(float(out.mean()) - float(img.mean())) < 2


@pytest.mark.parametrize("kind", ["gaussian", "poisson"])
def test_noise_adds_grain_without_shifting_the_image(kind: str) -> None:
    img = smear()
    out = add_noise(img, rng(), sigma=8.0, photons=(100, 150), kind=kind)
    diff = out.astype(np.float32) - img
    assert diff.std() > 1.5 and abs(diff.mean()) < 2.5  # (a little is lost to clipping at 255)


def test_jpeg_reencode_loses_more_at_low_quality() -> None:
    img = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8), (0, 0), 1)
    low = jpeg_reencode(img, rng(), (40, 40))
    high = jpeg_reencode(img, rng(), (95, 95))
    err = [float(((x.astype(np.float32) - img) ** 2).mean()) for x in (low, high)]
    assert err[0] > err[1] > 0 and low.shape == img.shape


@pytest.mark.parametrize("factor", [0.5, 0.7, 1.5, 1.9, 2.0])
def test_scale_jitter_keeps_masks_and_boxes_on_the_cell(factor: float) -> None:
    img = np.zeros((96, 128, 3), np.uint8)
    img[:] = (230, 230, 230)
    masks = np.zeros((1, 96, 128), bool)
    masks[0, 40:60, 50:74] = True
    img[masks[0]] = (20, 20, 20)
    out, out_masks, keep = scale_jitter(img, masks, factor, rng(int(factor * 10)))
    assert out.shape == img.shape and keep.tolist() == [True]
    dark = out.mean(axis=2) < 125
    assert mask_iou(dark, out_masks[0]) > 0.85
    x0, y0, x1, y1 = masks_to_boxes(out_masks)[0]
    if x0 > 0 and y0 > 0 and x1 < 128 and y1 < 96:  # not cut by the crop window
        assert (x1 - x0) == pytest.approx(24 * factor, abs=2) and (y1 - y0) == pytest.approx(20 * factor, abs=2)
    if factor < 1:  # zoomed out: padded with the background colour, not black or mirrored cells
        assert np.abs(out.reshape(-1, 3).astype(int) - 230).min(axis=1).max() < 240


def test_scale_jitter_drops_cells_mostly_cropped_away() -> None:
    img = np.full((100, 100, 3), 200, np.uint8)
    masks = np.zeros((2, 100, 100), bool)
    masks[0, 45:55, 45:55] = True   # centre: always visible at 1.25x
    masks[1, 0:4, 0:4] = True       # corner: cropped away when the window starts inside
    _, out_masks, keep = scale_jitter(img, masks, 1.25, np.random.default_rng(7))
    assert keep[0] and len(out_masks) == keep.sum()


def write_frame(path: Path, w: int = 160, h: int = 120, square: tuple[int, int, int, int] = (50, 40, 90, 70)) -> None:
    img = np.full((h, w, 3), BG, np.uint8)
    x0, y0, x1, y1 = square
    img[y0:y1, x0:x1] = (40, 20, 60)
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 98])


def test_box_only_frames_keep_boxes_on_the_cell_through_every_augmentation(tmp_path: Path) -> None:
    write_frame(tmp_path / "f.jpg")
    rec = ImageRecord(name="f.jpg", width=160, height=120, path=tmp_path / "f.jpg",
                      instances=[Instance(label="wbc", box=(50, 40, 90, 70))])
    data = AnnotatedDataset(images=[rec], labels=["wbc"], meta={"frame_box_only": {"f.jpg": True}})
    aug = AugmentConfig(scale_p=1.0, scale_range=[0.6, 1.6], stain_p=0, hue=0, saturation=0, brightness=0, contrast=0,
                        gamma=0, blur_p=0)
    ds = SegmentationDataset(data, LabelMap(classes=["wbc"]), 160, 120, augment=aug, seed=1)
    for epoch in range(6):
        ds.set_epoch(epoch)
        image, target = ds[0]
        assert "masks" not in target and target["labels"].tolist() == [1]
        dark = (image.mean(dim=0) < 0.5).numpy()
        ys, xs = np.nonzero(dark)
        box = target["boxes"][0].numpy()
        assert np.allclose(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=2), (epoch, box)


def stub_estimator(diameter: float | None, calls: list[int]):
    def estimate(image: np.ndarray) -> SimpleNamespace:
        calls.append(image.shape[1])
        return SimpleNamespace(diameter_px=diameter * image.shape[1] / 640 if diameter else None, count=10,
                               confidence=0.9, method="stub", reason="" if diameter else "no red cells")
    return estimate


def rbc_dataset(tmp_path: Path, rbc_px: list[float | None], estimator=None, augment=None,
                scale: ScaleConfig | None = None) -> SegmentationDataset:
    recs = []
    for i in range(len(rbc_px)):
        write_frame(tmp_path / f"f{i}.jpg", 640, 480, (200, 160, 360, 280))
        recs.append(ImageRecord(name=f"f{i}.jpg", width=640, height=480, path=tmp_path / f"f{i}.jpg",
                                instances=[Instance(label="wbc", polygon=np.array(
                                    [[200, 160], [360, 160], [360, 280], [200, 280]], float))]))
    data = AnnotatedDataset(images=recs, labels=["wbc"], meta={"frame_rbc_px": rbc_px})
    return SegmentationDataset(data, LabelMap(classes=["wbc"]), 400, 300, augment=augment, seed=0,
                               scale=scale or ScaleConfig(mode="rbc", rbc_px=48, max_side=1600, min_side=256),
                               rbc_estimator=estimator)


def test_rbc_scale_mode_sizes_frames_by_their_red_cells(tmp_path: Path) -> None:
    calls: list[int] = []
    ds = rbc_dataset(tmp_path, [96.0, None, 300.0, 20.0], estimator=stub_estimator(64.0, calls))
    image, masks, _, scale = ds.load(0)                   # ground truth 96 px -> x0.5
    assert image.shape == (240, 320, 3) and scale == pytest.approx(0.5)
    assert masks.shape == (1, 240, 320) and masks[0, 80:140, 100:180].all()
    image, _, _, scale = ds.load(1)                       # estimated 64 px -> x0.75
    assert image.shape == (360, 480, 3) and scale == pytest.approx(0.75)
    ds.load(1)
    assert calls == [640], "the estimate is made once per frame (and cached)"
    image, _, _, _ = ds.load(2)                           # 300 px -> 0.16 -> 102 px long side -> clamped to 256
    assert image.shape == (192, 256, 3)
    image, _, _, _ = ds.load(3)                           # 20 px -> 2.4 -> 1536 px long side (under 1600)
    assert image.shape == (1152, 1536, 3)
    assert ds.prepare_scale() == {"known": 3, "estimated": 1, "fixed": 0}
    assert calls == [640]


def test_rbc_scale_falls_back_to_the_fixed_resize(tmp_path: Path) -> None:
    calls: list[int] = []
    ds = rbc_dataset(tmp_path, [None], estimator=stub_estimator(None, calls))
    image, _, _, scale = ds.load(0)
    assert image.shape == (300, 400, 3) and scale == pytest.approx(400 / 640)  # the model's min/max size
    assert ds.prepare_scale() == {"known": 0, "estimated": 0, "fixed": 1} and len(calls) == 1


def test_rbc_jitter_in_training_stays_in_its_range(tmp_path: Path) -> None:
    scale = ScaleConfig(mode="rbc", rbc_px=48, jitter=[0.8, 1.25], max_side=1600, min_side=64)
    ds = rbc_dataset(tmp_path, [96.0], augment=AugmentConfig(hflip=0, vflip=0, rot90=False, blur_p=0), scale=scale)
    widths = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        image, target = ds[0]
        widths.add(image.shape[2])
        assert 320 * 0.8 - 1 <= image.shape[2] <= 320 * 1.25 + 1
        box = target["boxes"][0].numpy() / (image.shape[2] / 640)
        assert np.allclose(box, [200, 160, 360, 280], atol=3)
    assert len(widths) > 3


def test_default_config_behaves_as_before(tmp_path: Path) -> None:
    """New keys are off by default and draw no random numbers: the item is what the old pipeline gave."""
    write_frame(tmp_path / "f.jpg")
    poly = np.array([[50, 40], [90, 40], [90, 70], [50, 70]], float)
    rec = ImageRecord(name="f.jpg", width=160, height=120, path=tmp_path / "f.jpg",
                      instances=[Instance(label="neutrophil", polygon=poly)])
    data = AnnotatedDataset(images=[rec], labels=["neutrophil"])
    cfg = TrainConfig.from_dict({})
    assert cfg.scale.mode == "fixed" and cfg.scale.bundle_dict() is None
    ds = SegmentationDataset(data, LabelMap(), 128, 96, augment=cfg.augment, seed=4)
    ds.set_epoch(2)
    tensor, target = ds[0]
    image, masks, _, _ = ds.load(0)
    r = np.random.default_rng([4, 2, 0])
    image, masks = geometric(image, masks, cfg.augment, r)
    image = colour_jitter(image, cfg.augment, r)
    assert torch.equal(tensor, torch.from_numpy(image).permute(2, 0, 1).float() / 255.0)
    assert torch.equal(target["masks"], torch.from_numpy(masks.astype(np.uint8)))


def test_bad_augment_and_scale_values_are_refused() -> None:
    with pytest.raises(ValueError, match="stain_p"):
        AugmentConfig(stain_p=1.5)
    with pytest.raises(ValueError, match="jpeg_quality"):
        AugmentConfig(jpeg_quality=[90, 40])
    with pytest.raises(ValueError, match=r"scale\.mode"):
        ScaleConfig(mode="auto")
    with pytest.raises(ValueError, match="unknown scale keys"):
        TrainConfig.from_dict({"scale": {"mode": "rbc", "rbc_diameter": 40}})
    with pytest.raises(ValueError, match="unknown augmentation keys"):
        TrainConfig.from_dict({"augment": {"stain": 0.5}})
