"""Packaging a bundle for shipping (fp16 weights, size limit, all or nothing) and the default (starter) bundle."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from tests.tiny_models import spread_untrained_segmenter
from trainer.__main__ import main
from trainer.package import package_bundle, weights_mb
from wbc_core.bundle import BUNDLE_FILE, STARTER_DIR, BundleError, default_bundle_dir, load_bundle, write_bundle
from wbc_core.detect import Predictor


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    cfg, model = spread_untrained_segmenter(1)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias[1] += 20  # one class: make it find cells
    return write_bundle(tmp_path / "src", model, ["wbc"], cfg, 0.3, provenance={"steps": 7})


def _image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.full((192, 256, 3), (225, 205, 215), np.uint8)
    for _ in range(6):
        centre = (int(rng.integers(30, 226)), int(rng.integers(30, 162)))
        cv2.circle(img, centre, int(rng.integers(12, 30)), (120, 60, 150), -1)
    return img


def test_half_precision_package_halves_the_weights_and_predicts_the_same(bundle: Path, tmp_path: Path) -> None:
    dst = package_bundle(bundle, tmp_path / "models" / "starter", half=True,
                         provenance={"licences": [{"set": "synthetic", "licence": "MIT"}]})
    assert weights_mb(dst) < 0.55 * weights_mb(bundle)
    meta = yaml.safe_load((dst / BUNDLE_FILE).read_text())
    assert meta["segmenter"]["dtype"] == "float16"
    assert meta["provenance"] == {"steps": 7, "licences": [{"set": "synthetic", "licence": "MIT"}]}
    assert (dst.stat().st_mode & 0o777) == 0o755
    full, half = Predictor(bundle).detect(_image(), threshold=0.02), Predictor(dst).detect(_image(), threshold=0.02)
    assert len(full.cells) > 0
    assert len(half.cells) == len(full.cells)
    for a, b in zip(full.cells, half.cells, strict=True):
        assert abs(a.score - b.score) < 0.02 and np.allclose(a.box, b.box, atol=1.5)
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(".")], "no staging folder left behind"


def test_refused_package_leaves_the_destination_as_it_was(bundle: Path, tmp_path: Path) -> None:
    dst = package_bundle(bundle, tmp_path / "ship", half=True)
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    with pytest.raises(BundleError, match=r"over the limit of 0\.001 MB"):
        package_bundle(bundle, dst, half=False, max_mb=0.001)
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    (bundle / "model.pt").write_bytes((bundle / "model.pt").read_bytes()[:1000])  # truncated source
    with pytest.raises(BundleError, match=r"model\.pt is corrupt"):
        package_bundle(bundle, dst)
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ship", "src"]


def test_package_bundle_cli(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["package-bundle", str(bundle), str(tmp_path / "out"), "--max-mb", "25"]) == 0
    assert "packaged bundle" in capsys.readouterr().out
    load_bundle(tmp_path / "out")


def test_serving_settings_are_changed_and_recorded(bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="red-cell scale mode"):  # a fixed-size bundle has no red-cell scale
        package_bundle(bundle, tmp_path / "x", rbc_px=72)
    meta = yaml.safe_load((bundle / BUNDLE_FILE).read_text())
    meta["preprocessing"] = {**(meta.get("preprocessing") or {}), "scale": {"mode": "rbc", "rbc_px": 48.0}}
    (bundle / BUNDLE_FILE).write_text(yaml.safe_dump(meta, sort_keys=False))
    assert main(["package-bundle", str(bundle), str(tmp_path / "out"), "--rbc-px", "72", "--threshold", "0.9"]) == 0
    served = load_bundle(tmp_path / "out")
    assert served.scale["rbc_px"] == 72.0 and served.score_threshold == 0.9
    assert served.raw["provenance"]["serving"] == {"rbc_px": {"from": 48.0, "to": 72.0},
                                                   "score_threshold": {"from": 0.3, "to": 0.9}}
    for bad in (["--threshold", "1.5"], ["--rbc-px", "1000"]):  # refused: exit 2 with the reason, nothing written
        assert main(["package-bundle", str(bundle), str(tmp_path / "bad"), *bad]) == 2
    assert not (tmp_path / "bad").exists()


def test_default_bundle_is_the_environment_then_the_starter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WBC_BUNDLE_DIR", raising=False)
    assert default_bundle_dir() == STARTER_DIR
    monkeypatch.setenv("WBC_BUNDLE_DIR", "/srv/bundle")
    assert default_bundle_dir() == Path("/srv/bundle")
