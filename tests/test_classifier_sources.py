"""Source class folders (class map, PBC prefixes, bad input), cell finding, BCCD labels, stain normalisation."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.test_classifier_synthetic import smear, write_class_folders
from trainer.classifier.sources import (
    SourceClassMap,
    estimate_cell,
    load_bccd_labelled,
    load_folder_source,
    plan_source,
)
from wbc_core.classifier.crops import CropConfig
from wbc_core.classifier.stain import StainNormalizer, frame_stats, stack_stats
from wbc_core.data.types import DatasetError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PBC = SHARED / "pbc-sample"
BCCD = SHARED / "bccd-wbc"
needs_pbc = pytest.mark.skipif(not PBC.is_dir(), reason="../shared/data/pbc-sample is not beside the repo")
needs_bccd = pytest.mark.skipif(not BCCD.is_dir(), reason="../shared/data/bccd-wbc is not beside the repo")

TWO_CLASS_MAP = SourceClassMap(folders={"lymphocyte": "lymphocyte", "neutrophil": "by-prefix"},
                               prefixes={"SNE": "neutrophil", "BNE": "band cell"})


@needs_pbc
def test_packaged_pbc_map_covers_the_real_sample_with_subtypes() -> None:
    plan, excluded = plan_source(PBC, SourceClassMap.from_yaml(None))
    counts: dict[str, int] = {}
    for _, label in plan:
        counts[label] = counts.get(label, 0) + 1
    assert counts == {"basophil": 150, "eosinophil": 150, "lymphocyte": 150, "monocyte": 150, "band cell": 69,
                      "neutrophil": 81, "promyelocyte": 31, "myelocyte": 56, "metamyelocyte": 56}
    assert excluded == {"erythroblast/": 150, "platelet/": 150, "ig/IG": 7}
    bne = [p for p, label in plan if label == "band cell"]
    assert all(p.name.startswith("BNE_") for p in bne)


@needs_pbc
def test_cell_is_found_in_real_pbc_images() -> None:
    for folder in ("neutrophil", "lymphocyte", "eosinophil", "monocyte"):
        path = sorted((PBC / folder).glob("*.jpg"))[0]
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        found = estimate_cell(image)
        assert found is not None, path
        (x0, y0, x1, y1), mask = found
        h, w = image.shape[:2]
        side = max(x1 - x0, y1 - y0)
        assert 0.2 * w < side < 0.8 * w, (path, side)  # the cell, not the nucleus alone nor the whole frame
        assert abs((x0 + x1) / 2 - w / 2) < 0.2 * w and abs((y0 + y1) / 2 - h / 2) < 0.2 * h
        assert mask.sum() > 0.5 * np.pi * (side / 2) ** 2 * 0.5


def test_cell_box_of_a_drawn_cell_matches_its_mask() -> None:
    img, mask = smear("neutrophil", "source", (240, 240), 40, seed=5, centre=(120, 120))
    found = estimate_cell(img)
    assert found is not None
    ys, xs = np.nonzero(mask)
    (x0, y0, x1, y1), _ = found
    assert abs(x0 - xs.min()) <= 6 and abs(x1 - xs.max()) <= 6 and abs(y0 - ys.min()) <= 6 and abs(y1 - ys.max()) <= 6


def test_folder_source_maps_prefixes_and_crops_at_cell_scale(tmp_path: Path) -> None:
    root = write_class_folders(tmp_path / "src", per_class=3)
    (root / "neutrophil" / "BNE_9999.jpg").write_bytes((root / "neutrophil" / "SNE_0000.jpg").read_bytes())
    crops = load_folder_source(root, TWO_CLASS_MAP, CropConfig(size=32, margin=0.15), progress=False)
    assert crops.class_counts() == {"band cell": 1, "lymphocyte": 3, "neutrophil": 3}
    assert len(set(crops.groups)) == 7 and crops.has_mask.all()
    # the cell (a third of the 120 px image) fills about 1 / 1.3 of each crop
    widths = [np.ptp(np.nonzero(m.any(axis=0))[0]) + 1 for m in crops.masks]
    assert np.median(widths) / 32 == pytest.approx(1 / 1.3, abs=0.12)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda r: (r / "platelet").mkdir(), "not in the class map"),
    (lambda r: [p.unlink() for p in (r / "lymphocyte").iterdir()], "is empty"),
    (lambda r: (r / "neutrophil" / "MY_0001.jpg").write_bytes((r / "neutrophil" / "SNE_0000.jpg").read_bytes()),
     "prefixes not in the class map: neutrophil/MY"),
    (lambda r: (r / "lymphocyte" / "LY_0005.jpg").write_bytes(b"not a jpeg"), "unreadable"),
])
def test_bad_source_input_is_a_clear_error(tmp_path: Path, mutate, message: str) -> None:
    root = write_class_folders(tmp_path / "src", per_class=2)
    mutate(root)
    with pytest.raises(DatasetError, match=message):
        load_folder_source(root, TWO_CLASS_MAP, CropConfig(size=16), progress=False)


def test_class_map_rejects_labels_that_are_not_model_labels(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither one of the labels"):
        SourceClassMap(folders={"lymphocyte": "lymfocyte"})
    path = tmp_path / "map.yaml"
    path.write_text("prefixes: {}\n")
    with pytest.raises(ValueError, match="needs a 'folders' mapping"):
        SourceClassMap.from_yaml(path)


@needs_bccd
def test_bccd_target_is_the_341_single_wbc_single_label_frames() -> None:
    ds = load_bccd_labelled(BCCD)
    assert len(ds) == 341
    assert ds.label_counts() == {"neutrophil": 202, "eosinophil": 84, "lymphocyte": 33, "monocyte": 20,
                                 "basophil": 2}
    assert sum(v == "test" for v in ds.meta["split"].values()) == 64
    outlined = sum(inst.kind == "mask" for r in ds.images for inst in r.instances)
    assert outlined > 330  # the hand-drawn mask component, where it matches the VOC box


def _recoloured(img: np.ndarray) -> np.ndarray:
    """The same picture under another stain/camera: a per-channel gain and offset."""
    return np.clip(img.astype(float) * np.array([0.85, 1.05, 1.15]) + np.array([10, -5, 5]), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(("method", "tolerance"), [("reinhard", 6.0), ("macenko", 12.0)])
def test_stain_normalisation_undoes_a_colour_change(method: str, tolerance: float) -> None:
    ref_frames = [smear(k, "target", (120, 160), 20, seed=s)[0] for s, k in enumerate(["lymphocyte", "neutrophil"] * 3)]
    normalizer = StainNormalizer.fit(method, stack_stats([frame_stats(f) for f in ref_frames]))
    frame = ref_frames[0]
    shifted = _recoloured(frame)
    before = np.abs(shifted.astype(int) - frame.astype(int)).mean()
    out = normalizer(shifted[None, 30:90, 50:110], stack_stats([frame_stats(shifted)]))[0]
    after = np.abs(out.astype(int) - frame[30:90, 50:110].astype(int)).mean()
    assert after < tolerance and after < before / 2, (before, after)
    # round trip through the bundle config
    again = StainNormalizer.from_dict(normalizer.to_dict())
    np.testing.assert_array_equal(again(shifted[None, 30:90, 50:110], stack_stats([frame_stats(shifted)]))[0], out)


def test_no_stain_normalisation_is_identity_and_bad_names_are_refused() -> None:
    crops = np.random.default_rng(0).integers(0, 255, (2, 8, 8, 3)).astype(np.uint8)
    assert StainNormalizer("none")(crops, {}) is crops
    with pytest.raises(ValueError, match="must be one of"):
        StainNormalizer("vahadane")
