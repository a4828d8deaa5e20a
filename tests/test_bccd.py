"""The BCCD benchmark loader: splits, and WBC instances from the hand-drawn masks."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.data.bccd import load_bccd
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
