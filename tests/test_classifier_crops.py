"""The crop function: square, centred, reflect-padded, scale-consistent, masks in place; crops of datasets."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.test_classifier_synthetic import smear, target_dataset
from trainer.classifier.sources import crops_from_dataset
from wbc_core.classifier.crops import MASK_FILL, CropConfig, apply_mask, crop_cell, crop_window
from wbc_core.data.types import AnnotatedDataset, ImageRecord, Instance


def _gradient_image(h: int = 90, w: int = 120) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 2 % 256, yy * 2 % 256, (xx + yy) % 256], axis=2).astype(np.uint8)


def test_window_is_a_square_around_the_box_with_the_margin() -> None:
    cx, cy, side = crop_window((10, 20, 50, 40), margin=0.25)
    assert (cx, cy) == (30, 30) and side == pytest.approx(40 * 1.5)


def test_crop_is_the_window_resized_and_cell_fills_the_expected_fraction() -> None:
    img, mask = smear("lymphocyte", "source", (200, 200), 30, seed=0, centre=(100, 100))
    ys, xs = np.nonzero(mask)
    box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    cfg = CropConfig(size=40, margin=0.25)
    crop = crop_cell(img, box, cfg, mask=mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1],
                     mask_origin=(int(xs.min()), int(ys.min())))
    assert crop.image.shape == (40, 40, 3) and crop.image.dtype == np.uint8
    assert crop.mask is not None and crop.mask.shape == (40, 40)
    mys, mxs = np.nonzero(crop.mask)
    # the cell spans 1 / (1 + 2 * margin) of the crop, centred
    assert (mxs.max() - mxs.min() + 1) / 40 == pytest.approx(1 / 1.5, abs=0.05)
    assert abs(mxs.mean() - 19.5) < 1.5 and abs(mys.mean() - 19.5) < 1.5
    # the mask lines up with the pixels: inside is the cell (darker than the background)
    assert crop.image[crop.mask].mean() < crop.image[~crop.mask].mean() - 20


def test_edge_cells_are_reflect_padded_not_stretched_or_black() -> None:
    img = _gradient_image()
    box = (0, 0, 20, 20)   # at the corner: the window (margin 0.5 -> 40 px) leaves the frame by 10 px
    cfg = CropConfig(size=40, margin=0.5)
    crop = crop_cell(img, box, cfg).image
    expected = np.pad(img[0:30, 0:30], ((10, 0), (10, 0), (0, 0)), mode="reflect")
    np.testing.assert_array_equal(crop, expected)
    # a window larger than the whole image still works (repeated reflection)
    big = crop_cell(img, (0, 0, 100, 80), CropConfig(size=32, margin=2)).image  # 500 px window, 120 px image
    assert big.shape == (32, 32, 3)


def test_reduced_decode_gives_the_same_crop_as_full_resolution() -> None:
    """The pipeline crops from a reduced JPEG decode (scale < 1) with native-pixel boxes and masks."""
    img, mask = smear("neutrophil", "source", (400, 480), 60, seed=2, centre=(240, 200))
    ys, xs = np.nonzero(mask)
    box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    mcrop, origin = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1], (int(xs.min()), int(ys.min()))
    cfg = CropConfig(size=48)
    full = crop_cell(img, box, cfg, mask=mcrop, mask_origin=origin)
    quarter = cv2.resize(img, (120, 100), interpolation=cv2.INTER_AREA)
    small = crop_cell(quarter, box, cfg, mask=mcrop, mask_origin=origin, scale=0.25)
    assert np.abs(full.image.astype(int) - small.image.astype(int)).mean() < 6
    assert (full.mask == small.mask).mean() > 0.97


def test_masked_variant_blanks_the_outside_only() -> None:
    img, mask = smear("lymphocyte", "source", (100, 100), 20, seed=1, centre=(50, 50))
    ys, xs = np.nonzero(mask)
    crop = crop_cell(img, (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), CropConfig(size=32),
                     mask=mask[ys.min():, xs.min():], mask_origin=(int(xs.min()), int(ys.min())))
    images, masks = crop.image[None], crop.mask[None]
    out = apply_mask(images, masks, np.array([True]), grow=0.0)
    assert (out[0][~masks[0]] == MASK_FILL).all()
    np.testing.assert_array_equal(out[0][masks[0]], images[0][masks[0]])
    unchanged = apply_mask(images, masks, np.array([False]), grow=0.0)
    np.testing.assert_array_equal(unchanged, images)


def test_crops_from_a_dataset_one_per_instance_polygon_mask_and_box(tmp_path: Path) -> None:
    img, mask = smear("neutrophil", "target", (160, 200), 22, seed=4, centre=(100, 80))
    cv2.imwrite(str(tmp_path / "f.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    ys, xs = np.nonzero(mask)
    poly = np.array([[100 + 22 * np.cos(a), 80 + 22 * np.sin(a)] for a in np.linspace(0, 2 * np.pi, 24,
                                                                                      endpoint=False)])
    insts = [Instance("neutrophil", mask_crop=mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1],
                      mask_origin=(int(xs.min()), int(ys.min()))),
             Instance("neutrophil", polygon=poly),
             Instance("neutrophil", box=(78.0, 58.0, 122.0, 102.0))]
    ds = AnnotatedDataset(images=[ImageRecord("f.png", 200, 160, tmp_path / "f.png", insts)], labels=["neutrophil"])
    crops = crops_from_dataset(ds, CropConfig(size=32), progress=False)
    assert len(crops) == 3 and crops.groups == ["f.png"] * 3
    assert crops.has_mask.tolist() == [True, True, False]
    # the same cell through a mask, a polygon and a box: nearly the same picture
    assert np.abs(crops.images[0].astype(int) - crops.images[1].astype(int)).mean() < 12
    assert (crops.masks[0] == crops.masks[1]).mean() > 0.9
    assert crops.stats["lab_mean"].shape == (3, 3)


def test_target_dataset_helper_crops(tmp_path: Path) -> None:
    crops = crops_from_dataset(target_dataset(tmp_path, per_class=2), CropConfig(size=24), progress=False)
    assert crops.class_counts() == {"lymphocyte": 2, "neutrophil": 2}
    assert len(set(crops.groups)) == 4
