"""The synthetic smear generator: reproducible, a valid CVAT export, polygons that match the drawn cells."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer import synthetic
from wbc_core.data.cvat_xml import read_cvat_xml
from wbc_core.data.masks import mask_iou
from wbc_core.labels import RVPBS_LABELS

# CVAT stamps export times into <meta>; everything else must be byte-identical.
_TIMESTAMPS = re.compile(rb"<(created|updated|dumped)>[^<]*</\1>")


def _xml_without_times(path: Path) -> bytes:
    return _TIMESTAMPS.sub(rb"<\1/>", path.read_bytes())


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("synth") / "task"
    data = synthetic.generate_task(out, n_images=20, width=512, height=384, seed=3)
    return out, data


def test_layout_and_counts(task: tuple[Path, object]) -> None:
    out, data = task
    assert (out / "annotations.xml").is_file()
    assert len(data.images) == 20
    assert data.labels == list(RVPBS_LABELS)
    for i, record in enumerate(data.images):
        assert record.name == f"synth_{i:04d}.jpg"
        assert record.path == out / "images" / record.name
        with Image.open(record.path) as img:
            assert img.format == "JPEG"
            assert img.size == (512, 384)
        assert 1 <= len(record.instances) <= 2
        for inst in record.instances:
            assert inst.kind == "polygon"
            assert 30 <= len(inst.polygon) <= 60
            assert np.allclose(inst.polygon, np.round(inst.polygon, 2))


def test_all_labels_covered(task: tuple[Path, object]) -> None:
    _, data = task
    assert set(data.label_counts()) == set(RVPBS_LABELS)


def test_xml_reads_back(task: tuple[Path, object]) -> None:
    out, data = task
    back = read_cvat_xml(out / "annotations.xml")
    assert len(back.images) == len(data.images)
    assert set(RVPBS_LABELS) <= set(back.labels)
    assert back.label_counts() == data.label_counts()
    for got, want in zip(back.images, data.images, strict=True):
        assert (got.name, got.width, got.height) == (want.name, want.width, want.height)
        assert got.path is not None and got.path.resolve() == want.path.resolve()
        assert [i.label for i in got.instances] == [i.label for i in want.instances]
        for a, b in zip(got.instances, want.instances, strict=True):
            assert a.kind == "polygon"
            np.testing.assert_allclose(a.polygon, b.polygon, atol=0.006)


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = synthetic.generate_task(tmp_path / "a", n_images=2, width=320, height=240, seed=7)
    b = synthetic.generate_task(tmp_path / "b", n_images=2, width=320, height=240, seed=7)
    c = synthetic.generate_task(tmp_path / "c", n_images=2, width=320, height=240, seed=8)
    assert a.images[0].path.read_bytes() == b.images[0].path.read_bytes()
    assert a.images[1].path.read_bytes() == b.images[1].path.read_bytes()
    assert _xml_without_times(tmp_path / "a" / "annotations.xml") == \
        _xml_without_times(tmp_path / "b" / "annotations.xml")
    assert a.images[0].path.read_bytes() != c.images[0].path.read_bytes()


@pytest.mark.parametrize("label", RVPBS_LABELS)
def test_polygon_matches_drawn_cell(label: str) -> None:
    width, height = 1008, 756
    slide = synthetic.render_slide_with_masks(np.random.default_rng(sum(map(ord, label))), width, height,
                                              cell_labels=[label])
    assert slide.image.shape == (height, width, 3) and slide.image.dtype == np.uint8
    assert slide.masks is not None and len(slide.masks) == len(slide.instances) == 1
    inst, drawn = slide.instances[0], slide.masks[0]
    assert inst.label == label
    assert mask_iou(inst.to_mask(height, width), drawn) >= 0.95
    # sized like RV-PBS cells: equivalent diameter 12-35% of the frame width
    diameter = 2 * np.sqrt(drawn.sum() / np.pi)
    assert 0.12 * width < diameter < 0.35 * width
    # the white cell is drawn there: it does not look like the red-cell field around it
    img = slide.image.astype(np.float64)
    assert np.linalg.norm(img[drawn].mean(axis=0) - img[~drawn].mean(axis=0)) > 20


@pytest.mark.parametrize("seed", range(6))
def test_cells_inside_frame_and_apart(seed: int) -> None:
    width, height = 640, 480
    slide = synthetic.render_slide_with_masks(np.random.default_rng(seed), width, height, n_cells=2)
    assert len(slide.instances) == 2
    for inst, mask in zip(slide.instances, slide.masks, strict=True):
        x0, y0, x1, y1 = inst.box
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
    assert not np.logical_and(*slide.masks).any()


def test_render_slide_api() -> None:
    image, instances = synthetic.render_slide(np.random.default_rng(0), 400, 300, RVPBS_LABELS, 1)
    assert image.shape == (300, 400, 3) and image.dtype == np.uint8
    assert len(instances) == 1 and instances[0].label in RVPBS_LABELS
    again, _ = synthetic.render_slide(np.random.default_rng(0), 400, 300, RVPBS_LABELS, 1)
    assert np.array_equal(image, again)


def test_full_size_slide(tmp_path: Path) -> None:
    path = tmp_path / "slide.jpg"
    instances = synthetic.generate_slide_jpeg(path, 4032, 3024, seed=99)
    with Image.open(path) as img:
        assert img.size == (4032, 3024)
    assert 1 <= len(instances) <= 2
    for inst in instances:
        x0, y0, x1, y1 = inst.box
        assert 0 <= x0 < x1 <= 4032 and 0 <= y0 < y1 <= 3024
        assert 0.12 * 4032 < x1 - x0 < 0.4 * 4032


def test_custom_labels(tmp_path: Path) -> None:
    data = synthetic.generate_task(tmp_path / "t", n_images=2, width=320, height=240, seed=0, labels=("WBC",),
                                   cells_per_image=(2, 2))
    assert data.labels == ["WBC"]
    assert data.label_counts() == {"WBC": 4}
    assert synthetic.style_for("Neutrophils") is synthetic.STYLES["neutrophil"]
    assert synthetic.style_for("BLAST") is synthetic.STYLES["blast cell"]


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        synthetic.generate_task(tmp_path / "x", n_images=1, cells_per_image=(2, 1))
    with pytest.raises(ValueError):
        synthetic.generate_task(tmp_path / "x", n_images=1, labels=())
