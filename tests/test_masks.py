"""Pure mask conversions: CVAT RLE, CVAT function masks, COCO RLE, polygons."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as coco_mask
from torchvision.models.detection.roi_heads import paste_masks_in_image

from wbc_core.data import masks as M
from wbc_core.detect import paste_mask


def random_blob(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    r = rng.uniform(0.15, 0.3) * min(h, w)
    angle = np.arctan2(yy - cy, xx - cx)
    radius = r * (1 + 0.2 * np.sin(3 * angle + rng.uniform(0, 6)))
    return (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2


def test_cvat_rle_contract_example() -> None:
    # cvat-contract.md: a 4x5 crop with one background pixel -> [1, 19, 3, 2, 7, 5] (RLE + xtl, ytl, xbr, ybr)
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:6, 3:8] = True  # rows 2..5 (h=4), cols 3..7 (w=5)
    mask[2, 3] = False
    mask[3, 3] = True
    crop = np.ones((4, 5), dtype=bool)
    crop[0, 0] = False
    assert M.cvat_rle_encode(crop) == [1, 19]
    full = np.zeros((10, 10), dtype=bool)
    full[2:6, 3:8] = crop
    assert M.cvat_mask_points(full) == [1, 19, 3, 2, 7, 5]


@pytest.mark.parametrize("seed", range(5))
def test_cvat_rle_round_trip(seed: int) -> None:
    crop = random_blob(37, 53, seed)
    crop[0, 0] = bool(seed % 2)  # both leading-foreground and leading-background cases
    runs = M.cvat_rle_encode(crop)
    assert sum(runs) == crop.size
    assert (runs[0] == 0) == bool(crop[0, 0])
    assert np.array_equal(M.cvat_rle_decode(runs, 53, 37), crop)


def test_cvat_rle_decode_rejects_wrong_total() -> None:
    with pytest.raises(ValueError, match="covers 10 pixels"):
        M.cvat_rle_decode([4, 6], 5, 3)


def test_function_mask_round_trip() -> None:
    full = np.zeros((60, 80), dtype=bool)
    full[10:30, 20:50] = random_blob(20, 30, 1)
    values = M.cvat_function_mask(full)
    assert set(values[:-4]) <= {0, 255}
    crop, (xtl, ytl, xbr, ybr) = M.decode_cvat_function_mask(values)
    rebuilt = np.zeros_like(full)
    rebuilt[ytl:ybr + 1, xtl:xbr + 1] = crop
    assert np.array_equal(rebuilt, full)
    assert M.cvat_function_mask(np.zeros((4, 4), bool)) is None


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_function_mask_json_parses_to_the_list(seed: int) -> None:
    import json

    full = np.zeros((70, 90), dtype=bool)
    full[5:45, 12:70] = random_blob(40, 58, seed)
    full[0, 0] = seed == 3  # a crop that starts with foreground
    expected = M.cvat_function_mask(full)
    expected[-4:] = [expected[-4] + 100, expected[-3] + 7, expected[-2] + 100, expected[-1] + 7]
    text = M.cvat_function_mask_json(full, offset=(100, 7))
    assert json.loads(text) == expected
    assert M.cvat_function_mask_json(np.zeros((3, 3), bool)) is None


@pytest.mark.parametrize("compressed", [True, False])
def test_coco_rle_round_trip(compressed: bool) -> None:
    mask = random_blob(90, 120, 3)
    rle = M.coco_rle_encode(mask, compressed=compressed)
    assert np.array_equal(M.coco_rle_decode(rle, 90, 120), mask)
    # pycocotools agrees on area
    obj = coco_mask.frPyObjects(rle, 90, 120) if not compressed else {**rle, "counts": rle["counts"].encode()}
    assert coco_mask.area(obj) == mask.sum()


def test_coco_rle_size_mismatch() -> None:
    rle = M.coco_rle_encode(np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="does not match"):
        M.coco_rle_decode(rle, 5, 4)


def test_polygon_mask_and_back() -> None:
    mask = random_blob(200, 240, 7)
    poly = M.mask_to_polygon(mask, tolerance=0.5)
    assert poly is not None and len(poly) >= 3
    again = M.polygon_to_mask(poly, 200, 240)
    assert M.mask_iou(mask, again) > 0.95
    with pytest.raises(ValueError, match="at least 3 points"):
        M.polygon_to_mask(np.array([[0, 0], [1, 1]]), 10, 10)


def test_place_crop_scaled_matches_downscaled_full() -> None:
    crop = random_blob(120, 100, 9)
    full = M.place_crop(crop, (50, 40), 400, 300)
    assert full.sum() == crop.sum()
    small = M.place_crop(crop, (50, 40), 400, 300, scale=0.5)
    assert small.shape == (200, 150)
    ref = torch.nn.functional.interpolate(torch.from_numpy(full[None, None].astype(np.float32)), size=(200, 150),
                                          mode="area")[0, 0].numpy() >= 0.5
    assert M.mask_iou(small, ref) > 0.9


def test_paste_mask_matches_torchvision() -> None:
    rng = np.random.default_rng(0)
    prob = rng.random((28, 28)).astype(np.float32)
    prob = (prob + np.pad(np.ones((14, 14)), 7)) / 2  # a blob plus noise
    box = np.array([33.3, 41.7, 140.2, 120.9])
    ours = paste_mask(prob, box, 200, 160)
    assert ours is not None
    crop, origin = ours
    mine = np.zeros((160, 200), dtype=bool)
    mine[origin[1]:origin[1] + crop.shape[0], origin[0]:origin[0] + crop.shape[1]] = crop
    ref = paste_masks_in_image(torch.from_numpy(prob)[None, None], torch.from_numpy(box)[None].float(),
                               (160, 200))[0, 0].numpy() >= 0.5
    assert M.mask_iou(mine, ref) > 0.97


def test_mask_iou_of_crops_at_their_origins() -> None:
    a = np.ones((10, 10), bool)
    assert M.crop_mask_iou(a, (0, 0), a, (0, 0)) == 1.0
    assert M.crop_mask_iou(a, (0, 0), a, (5, 0)) == pytest.approx(50 / 150)   # half overlaps
    assert M.crop_mask_iou(a, (0, 0), a, (10, 10)) == 0.0                      # touching corners only
    ring = np.ones((4, 4), bool)
    ring[1:3, 1:3] = False
    assert M.crop_mask_iou(ring, (3, 3), np.ones((2, 2), bool), (4, 4)) == 0.0  # the hole
    assert M.crop_mask_iou(np.zeros((3, 3), bool), (0, 0), np.zeros((2, 2), bool), (0, 0)) == 0.0
