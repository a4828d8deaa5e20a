"""The starter bundle shipped in models/starter: what a lab gets on day one, before it has annotated a slide.

Real images (the BCCD test fields shipped in models/starter-examples, never trained on) through the real
``detect``; the shipped files' size, licences and label contract; a damaged copy refused naming the file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from serverless.__main__ import main as cli_main
from serverless.main import read_spec
from trainer.package import weights_mb
from wbc_core.bundle import STARTER_DIR, BundleError, load_bundle
from wbc_core.contract import spec_labels
from wbc_core.detect import Predictor
from wbc_core.labels import RVPBS_LABELS

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "models" / "starter-examples"


def test_starter_is_small_licensed_and_speaks_the_task_labels() -> None:
    bundle = load_bundle(STARTER_DIR)  # verifies every checksum
    assert weights_mb(STARTER_DIR) <= 25.0
    assert bundle.raw["segmenter"]["dtype"] == "float16"
    assert bundle.classes == ["wbc"] and bundle.scale and bundle.scale["mode"] == "rbc"
    licences = bundle.provenance["licences"]
    assert {x["set"] for x in licences} >= {"bccd", "synthetic"}
    assert all(x["licence"] and x["attribution"] for x in licences)
    assert not any("bionet" in x["set"] for x in licences), "no set without a shipping licence"
    assert any("CC BY 4.0" in x["licence"] for x in licences), "the PBC classifier's licence is recorded"
    labels = bundle.contract.labels
    assert set(labels) <= set(RVPBS_LABELS) and "neutrophil" in labels and "lymphocyte" in labels
    assert set(labels) <= set(spec_labels(read_spec(REPO / "function.yaml") or []))


def test_starter_finds_the_wbc_on_real_smears_it_never_saw() -> None:
    predictor = Predictor(STARTER_DIR)
    images = sorted(EXAMPLES.glob("*.jpg"))
    assert len(images) == 3
    for path in images:
        detection = predictor.detect(path)
        assert 1 <= len(detection.cells) <= 3, (path.name, detection.empty_reason,
                                                [(c.label, round(c.score, 2)) for c in detection.cells])
        assert all(c.label in RVPBS_LABELS for c in detection.cells)
        assert detection.rbc_diameter_px is not None  # sized by its red cells, whatever the magnification


def test_serverless_annotate_uses_the_starter_when_no_bundle_is_given(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WBC_BUNDLE_DIR", raising=False)
    image = sorted(EXAMPLES.glob("*.jpg"))[0]
    assert cli_main(["annotate", str(image), "--out", str(tmp_path / "out")]) == 0
    shapes = json.loads((tmp_path / "out" / f"{image.stem}.json").read_text())
    assert shapes and all(s["type"] == "mask" for s in shapes)


@pytest.mark.parametrize("damage", ["truncate", "swap"])
def test_a_damaged_starter_copy_is_refused_naming_the_file(tmp_path: Path, damage: str) -> None:
    copy = tmp_path / "starter"
    shutil.copytree(STARTER_DIR, copy)
    weights = copy / "model.pt"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: 1 << 20])
    else:
        shutil.copy(copy / "classifier.pt", weights)
    with pytest.raises(BundleError, match=r"model\.pt is corrupt"):
        load_bundle(copy)
