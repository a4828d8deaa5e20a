"""The training dataset: lazy decoding at input scale, augmentation keeps masks and boxes aligned."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from trainer.data.segmentation_dataset import AugmentConfig, SegmentationDataset, colour_jitter, geometric
from wbc_core.data.images import ImageReadError, decode_rgb, read_rgb
from wbc_core.data.masks import mask_iou
from wbc_core.data.types import AnnotatedDataset, DatasetError, ImageRecord, Instance
from wbc_core.labels import LabelMap


def write_slide(path: Path, width: int, height: int) -> np.ndarray:
    """A slide with one dark disc at a known place; returns its native mask."""
    img = np.full((height, width, 3), (230, 190, 200), np.uint8)
    mask = np.zeros((height, width), np.uint8)
    cv2.circle(mask, (width // 3, height // 2), height // 5, 1, -1)
    img[mask > 0] = (90, 40, 120)
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    return mask.astype(bool)


def one_frame(tmp_path: Path, width: int = 4032, height: int = 3024, declared: tuple[int, int] | None = None):
    path = tmp_path / "slide.jpg"
    mask = write_slide(path, width, height)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    poly = contours[0].reshape(-1, 2).astype(float)
    w, h = declared or (width, height)
    rec = ImageRecord(name="slide.jpg", width=w, height=h, path=path,
                      instances=[Instance(label="neutrophil", polygon=poly), Instance(label="neutrophil",
                                                                                      box=(1, 1, 50, 50))])
    return AnnotatedDataset(images=[rec], labels=["neutrophil"]), mask


def test_full_size_slide_is_decoded_reduced_and_masks_line_up(tmp_path: Path) -> None:
    data, native_mask = one_frame(tmp_path)
    ds = SegmentationDataset(data, LabelMap(), max_size=1024, min_size=768)
    image, masks, labels, scale = ds.load(0)
    assert image.shape == (768, 1024, 3) and scale == pytest.approx(1024 / 4032)
    assert masks.shape == (1, 768, 1024)  # the rectangle-only shape has no outline: not a mask target
    assert labels.tolist() == [LabelMap().class_id("neutrophil")]
    dark = image.mean(axis=2) < 120
    assert mask_iou(dark, masks[0]) > 0.95
    ref = cv2.resize(native_mask.astype(np.uint8), (1024, 768), interpolation=cv2.INTER_AREA) > 0
    assert mask_iou(ref, masks[0]) > 0.97


def test_item_has_torchvision_targets(tmp_path: Path) -> None:
    data, _ = one_frame(tmp_path, 1008, 756)
    ds = SegmentationDataset(data, LabelMap(), max_size=512, min_size=384, augment=AugmentConfig(), seed=3)
    tensor, target = ds[0]
    assert tensor.shape[0] == 3 and float(tensor.max()) <= 1.0
    box = target["boxes"][0].numpy()
    m = target["masks"][0].numpy().astype(bool)
    ys, xs = np.nonzero(m)
    assert np.allclose(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])


def test_declared_size_mismatch_names_the_file(tmp_path: Path) -> None:
    data, _ = one_frame(tmp_path, 800, 600, declared=(600, 800))
    ds = SegmentationDataset(data, LabelMap(), max_size=512, min_size=384)
    with pytest.raises(DatasetError, match=r"slide\.jpg.*declare 600x800"):
        ds.load(0)


def test_frames_without_images_are_refused(tmp_path: Path) -> None:
    rec = ImageRecord(name="a.jpg", width=10, height=10, path=None)
    with pytest.raises(DatasetError, match="no image file"):
        SegmentationDataset(AnnotatedDataset(images=[rec], labels=[]), LabelMap(), 64, 48)


@pytest.mark.parametrize("seed", range(6))
def test_geometric_augmentation_moves_masks_with_pixels(seed: int) -> None:
    rng = np.random.default_rng(seed)
    image = np.zeros((60, 80, 3), np.uint8)
    masks = np.zeros((1, 60, 80), bool)
    masks[0, 5:20, 10:30] = True
    image[masks[0]] = 255
    out_img, out_masks = geometric(image, masks, AugmentConfig(), rng)
    assert np.array_equal(out_img[..., 0] == 255, out_masks[0])


def test_colour_jitter_changes_colour_not_shape() -> None:
    rng = np.random.default_rng(0)
    image = np.random.default_rng(1).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    out = colour_jitter(image, AugmentConfig(blur_p=0.0), rng)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert not np.array_equal(out, image)


def test_reduced_decode_and_bad_bytes(tmp_path: Path) -> None:
    path = tmp_path / "s.jpg"
    write_slide(path, 4032, 3024)
    img, scale = read_rgb(path, min_long_side=1000)
    assert img.shape == (756, 1008, 3) and scale == pytest.approx(0.25)
    full, s1 = read_rgb(path)
    assert full.shape == (3024, 4032, 3) and s1 == 1.0
    with pytest.raises(ImageReadError):
        decode_rgb(b"not an image")
    with pytest.raises(ImageReadError):
        read_rgb(tmp_path / "missing.jpg")
