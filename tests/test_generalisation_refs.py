"""The generalisation benchmark reads the in-domain model's mask AP from its result file, or refuses the file
(issue 12: the starter may fall at most 0.05 mask AP below a set's in-domain model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.generalisation import add_references, judge, reference_mask_ap

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("content", "ap"), [
    ({"mask_ap": 0.858, "box_ap": 0.86}, 0.858),            # benchmarks/segmentation_bccd.py
    ({"segm": {"AP": 0.7}, "bbox": {"AP": 0.6}}, 0.7),     # python -m trainer evaluate
    ({"metrics": {"segm": {"AP": 0.65}}}, 0.65),
])
def test_reference_mask_ap_formats(tmp_path: Path, content: dict, ap: float) -> None:
    path = tmp_path / "ref.json"
    path.write_text(json.dumps(content))
    assert reference_mask_ap(path) == ap


def test_a_reference_without_mask_ap_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps({"box_ap": 0.9}))
    with pytest.raises(SystemExit, match=r"boxes\.json: no mask AP"):
        reference_mask_ap(path)


def test_the_in_domain_drop_is_judged_against_the_committed_reference() -> None:
    ref = REPO / "benchmarks" / "results" / "segmentation_bccd.json"
    result = {"loso": {}, "scale_sweep": {}, "stain_sweep": {}, "bundle_mb": 18.0,
              "in_domain": {"bccd": {"mask_ap": 0.81}}}
    add_references(result, [f"bccd={ref}"])
    expected = json.loads(ref.read_text())["mask_ap"]
    assert result["in_domain"]["bccd"]["reference_mask_ap"] == round(expected, 4)
    met = judge(result)
    assert met["in_domain_bccd"] is (expected - 0.81 <= 0.05)
    assert met["bccd_in_domain_mask_ap"] is (expected >= 0.85)          # the in-domain model, not the starter
    assert result["in_domain"]["bccd"]["reference_git_sha"] == json.loads(ref.read_text())["git_sha"]
    with pytest.raises(SystemExit, match="not among the sets measured"):
        add_references(result, [f"bionet={ref}"])


def test_the_bccd_floor_is_not_met_without_an_in_domain_measurement() -> None:
    result = {"loso": {}, "scale_sweep": {}, "stain_sweep": {}, "bundle_mb": 18.0,
              "in_domain": {"bccd": {"mask_ap": 0.9}}}
    assert judge(result)["bccd_in_domain_mask_ap"] is False
    result["in_domain"]["bccd"]["reference_mask_ap"] = 0.84
    assert judge(result)["bccd_in_domain_mask_ap"] is False
    result["in_domain"]["bccd"]["reference_mask_ap"] = 0.86
    assert judge(result)["bccd_in_domain_mask_ap"] is True
