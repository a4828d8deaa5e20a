"""The BCCD benchmark loader: splits, and WBC instances from the hand-drawn masks."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.data.bccd import load_bccd, voc_rbc_diameter
from wbc_core.data.types import DatasetError

BCCD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bccd-wbc"
pytestmark = pytest.mark.skipif(not BCCD.is_dir(), reason="../shared/data/bccd-wbc is not beside the repo")


def test_splits_and_instances() -> None:
    test = load_bccd(BCCD, "test")
    trainval = load_bccd(BCCD, "trainval")
    assert len(test) == 72 and len(trainval) == 292
    assert not {r.name for r in test.images} & {r.name for r in trainval.images}
    rec = test.images[0]
    assert (rec.width, rec.height) == (640, 480) and rec.path.is_file()
    cells = [i for r in test.images for i in r.instances]
    assert 72 <= len(cells) <= 90  # about one WBC per frame
    areas = [int(i.to_mask(r.height, r.width).sum()) for r in test.images[:10] for i in r.instances]
    assert min(areas) > 200 and max(areas) < 640 * 480 // 2


def test_missing_split_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="bccd-wbc folder"):
        load_bccd(tmp_path, "test")


def _voc(path: Path, objects: list[tuple[str, tuple[int, int, int, int]]]) -> Path:
    items = "".join(f"<object><name>{n}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
                    f"<ymax>{b[3]}</ymax></bndbox></object>" for n, b in objects)
    path.write_text(f"<annotation><size><width>640</width><height>480</height></size>{items}</annotation>")
    return path


def test_red_cell_diameter_from_voc_boxes_leaves_out_cut_cells_and_other_objects(tmp_path: Path) -> None:
    xml = _voc(tmp_path / "a.xml", [("RBC", (100, 100, 140, 140)), ("RBC", (200, 200, 250, 250)),
                                    ("RBC", (300, 300, 346, 346)), ("RBC", (0, 10, 80, 90)),  # cut by the border
                                    ("WBC", (400, 100, 520, 220))])
    assert voc_rbc_diameter(xml) == (46.0, 3)
    assert voc_rbc_diameter(_voc(tmp_path / "none.xml", [("WBC", (10, 10, 90, 90))])) == (None, 0)
    (tmp_path / "bad.xml").write_text("<annotation>")
    with pytest.raises(DatasetError, match=r"bad\.xml"):
        voc_rbc_diameter(tmp_path / "bad.xml")
