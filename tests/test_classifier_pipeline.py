"""The classifier in the bundle and the pipeline: merge rule, attributes, checksums, backward compatibility, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from tests.test_classifier_synthetic import smear, target_dataset, write_class_folders
from tests.tiny_models import spread_untrained_segmenter
from trainer.__main__ import main
from trainer.classifier.train import ClassifierConfig, TrainedClassifier, cell_classifier, classifier_config
from wbc_core.bundle import CLASSIFIER_FILE, BundleError, attach_classifier, load_bundle, write_bundle
from wbc_core.classifier.crops import CropConfig
from wbc_core.classifier.infer import ATTRIBUTES, merge_opinions, predict_proba, tta_views
from wbc_core.classifier.model import CellNet, NetConfig
from wbc_core.classifier.stain import StainNormalizer, frame_stats, stack_stats
from wbc_core.data.cvat_xml import write_cvat_xml
from wbc_core.detect import Detection, Predictor

CLASSES = ["lymphocyte", "neutrophil"]
RVPBS = ["band cell", "basophil", "blast cell", "eosinophil", "lymphocyte", "monocyte", "neutrophil", "promyelocyte",
         "myelocyte", "metamyelocyte"]


def test_merge_rule() -> None:
    # agreement: the label stays, the score mixes both opinions
    agree = merge_opinions("neutrophil", 0.9, np.array([0.2, 0.8]), CLASSES, 0.75)
    assert agree.label == "neutrophil" and agree.score == pytest.approx(0.75 * 0.8 + 0.25 * 0.9)
    assert agree.attributes == {"segmenter_label": "neutrophil", "segmenter_score": "0.900",
                                "classifier_label": "neutrophil", "classifier_score": "0.800", "decided_by": "agree"}
    # a confident classifier overrides: 0.75 * 0.9 > 0.75 * 0.1 + 0.25 * 0.9
    override = merge_opinions("neutrophil", 0.9, np.array([0.9, 0.1]), CLASSES, 0.75)
    assert override.label == "lymphocyte" and override.attributes["decided_by"] == "classifier"
    assert override.score == pytest.approx(0.675)
    # a hesitant one does not: 0.75 * 0.55 < 0.75 * 0.45 + 0.25 * 0.9
    keep = merge_opinions("neutrophil", 0.9, np.array([0.55, 0.45]), CLASSES, 0.75)
    assert keep.label == "neutrophil" and keep.attributes["decided_by"] == "segmenter"
    # a segmenter label the classifier never learned (e.g. blast cell, absent from PBC) is kept
    blast = merge_opinions("blast cell", 0.95, np.array([0.9, 0.1]), CLASSES, 0.75)
    assert (blast.label, blast.score, blast.attributes["decided_by"]) == ("blast cell", 0.95, "segmenter")
    # a detection-only (one-class) segmenter: the classifier names the type; being a cell stays the
    # segmenter's call, so an uncertain type does not drop the cell under the threshold
    wbc = merge_opinions("wbc", 0.8, np.array([0.3, 0.7]), CLASSES, 0.75, segmenter_has_types=False)
    assert wbc.label == "neutrophil" and wbc.score == pytest.approx(0.8)
    assert wbc.attributes["classifier_score"] == "0.700" and wbc.attributes["decided_by"] == "classifier"
    assert set(wbc.attributes) == set(ATTRIBUTES)


def _slide() -> np.ndarray:
    img, _ = smear("neutrophil", "target", (192, 256), 24, seed=7, centre=(128, 96))
    return img


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, TrainedClassifier, Detection]:
    """A tiny segmenter bundle, its prediction on the test slide, and a copy of the bundle with a
    (random-weight) classifier attached that mostly prefers a class the segmenter did not predict."""
    cfg, model = spread_untrained_segmenter()
    root = tmp_path_factory.mktemp("bundles")
    plain = write_bundle(root / "plain", model, RVPBS, cfg, 0.5)
    predictor = Predictor(plain, device="cpu")
    assert predictor.classifier is None
    prediction = predictor.detect(_slide(), threshold=0.02)
    favoured = next(c for c in RVPBS if c not in {cell.label for cell in prediction.cells})
    with_cls = root / "with-classifier"
    shutil.copytree(plain, with_cls)
    ccfg = ClassifierConfig.from_dict({"crop": {"size": 24}, "net": {"width": 8}, "stain_norm": "reinhard"})
    torch.manual_seed(1)
    net = CellNet(len(RVPBS), NetConfig(width=8)).eval()
    with torch.no_grad():
        net.head[1].weight.mul_(20)  # varied opinions, mostly the favoured class
        net.head[1].bias[RVPBS.index(favoured)] = 4.0
    normalizer = StainNormalizer.fit("reinhard", stack_stats([frame_stats(_slide())]))
    trained = TrainedClassifier(model=net, classes=RVPBS, normalizer=normalizer, config=ccfg, method="finetune")
    attach_classifier(with_cls, net.state_dict(), classifier_config(trained, metrics={"macro_f1": 0.5}))
    return plain, with_cls, trained, prediction


def test_tta_views_average_a_symmetry_group() -> None:
    torch.manual_seed(0)
    net = CellNet(3, NetConfig(width=4)).eval()
    crops = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8))
    rot = torch.rot90(crops, 1, dims=(1, 2)).contiguous()
    hflip = crops.flip(2).contiguous()
    by_views = {n: predict_proba(net, crops, tta=n) for n in (1, 2, 4, 8)}
    for probs in by_views.values():
        assert probs.shape == (5, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    # each view set is a group, so its average is invariant under that group's transforms
    assert np.allclose(predict_proba(net, hflip, tta=2), by_views[2], atol=1e-5)
    assert np.allclose(predict_proba(net, rot, tta=4), by_views[4], atol=1e-5)
    assert np.allclose(predict_proba(net, rot, tta=8), by_views[8], atol=1e-5)
    assert np.allclose(predict_proba(net, hflip, tta=8), by_views[8], atol=1e-5)
    assert not np.allclose(predict_proba(net, rot, tta=1), by_views[1], atol=1e-5)  # no TTA: not invariant
    # bundles written before the count existed said true/false
    assert tta_views(True) == 8 and tta_views(False) == 1 and tta_views(None) == 8
    for bad in (3, 0, 16, "8"):
        with pytest.raises(ValueError, match="tta"):
            tta_views(bad)
    with pytest.raises(ValueError, match="tta"):
        ClassifierConfig.from_dict({"train": {"tta": 5}})


def test_bundle_without_classifier_says_the_segmenter_decided(bundles) -> None:
    plain, _, _, plain_prediction = bundles
    bundle = load_bundle(plain)
    assert bundle.classifier is None and bundle.classifier_path is None
    assert plain_prediction.cells
    for cell in plain_prediction.cells:
        assert cell.attributes == {"segmenter_label": cell.label, "segmenter_score": f"{cell.score:.3f}",
                                   "decided_by": "segmenter"}
    assert "classify" in plain_prediction.timings


def test_pipeline_classifies_every_cell_with_the_crop_function_and_merges(bundles) -> None:
    _, with_cls, trained, plain_prediction = bundles
    bundle = load_bundle(with_cls)
    assert bundle.classifier["config"]["classes"] == RVPBS and bundle.classifier["sha256"]
    before = plain_prediction
    predictor = Predictor(with_cls, device="cpu")
    after = predictor.detect(_slide(), threshold=0.02)
    assert after.timings["classify"] > 0
    reference = cell_classifier(trained)
    probs = reference.probabilities(_slide(), [(c.box, c.mask_crop, c.origin) for c in before.cells])
    merged = [(b, merge_opinions(b.label, b.score, p, RVPBS, 0.75)) for b, p in zip(before.cells, probs, strict=True)]
    kept = sorted(((b, m) for b, m in merged if m.score >= 0.02), key=lambda bm: -bm[1].score)
    assert len(after.cells) == len(kept) > 0, "the threshold applies to the merged score"
    decided = set()
    for (b, expected), a in zip(kept, after.cells, strict=True):
        assert (a.label, a.attributes) == (expected.label, expected.attributes)
        assert a.score == pytest.approx(expected.score, abs=1e-6)
        assert set(a.attributes) == set(ATTRIBUTES) and all(isinstance(v, str) for v in a.attributes.values())
        assert a.box == b.box and np.array_equal(a.mask_crop, b.mask_crop)  # masks untouched
        decided.add(a.attributes["decided_by"])
    assert "classifier" in decided  # the classifier did change some labels


def test_classifier_checksum_and_missing_file_are_caught(bundles, tmp_path: Path) -> None:
    _, with_cls, _, _ = bundles
    broken = tmp_path / "broken"
    shutil.copytree(with_cls, broken)
    data = (broken / CLASSIFIER_FILE).read_bytes()
    (broken / CLASSIFIER_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="corrupt"):
        load_bundle(broken)
    (broken / CLASSIFIER_FILE).unlink()
    with pytest.raises(BundleError, match=r"classifier .* is missing"):
        load_bundle(broken)
    with pytest.raises(BundleError, match="train the segmenter first"):
        attach_classifier(tmp_path / "nowhere", {}, {})


def test_cli_trains_evaluates_and_attaches_to_a_bundle(bundles, tmp_path: Path) -> None:
    plain, _, _, _ = bundles
    source = write_class_folders(tmp_path / "pbc", per_class=8, size=96)
    tgt_dir = tmp_path / "task"
    write_cvat_xml(target_dataset(tgt_dir, per_class=10), tgt_dir / "annotations.xml")
    (tmp_path / "map.yaml").write_text("folders: {lymphocyte: lymphocyte, neutrophil: by-prefix}\n"
                                       "prefixes: {SNE: neutrophil}\n")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({
        "crop": {"size": 24}, "net": {"width": 8},
        "train": {"batch_size": 16, "source_steps": 30, "finetune_steps": 20, "epoch_steps": 10, "threads": 1},
        "protocol": {"pool_per_class": 4, "pool_fraction": 0.5, "draws": 2}}))
    bundle = tmp_path / "bundle"
    shutil.copytree(plain, bundle)
    out = tmp_path / "run"
    rc = main(["train-classifier", "--source", str(source), "--target", str(tgt_dir), "--method", "finetune",
               "--few-shot", "3", "--stain-norm", "macenko", "--config", str(tmp_path / "cfg.yaml"),
               "--source-map", str(tmp_path / "map.yaml"), "--out", str(out), "--bundle", str(bundle)])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "finetune" and metrics["k"] == 3 and len(metrics["runs"]) == 2
    assert set(metrics["summary"]["macro_f1"]) == {"mean", "std", "min", "max"}
    assert metrics["evaluation_crops"] + metrics["labelled_pool"] == 20
    assert (out / "confusion.png").stat().st_size > 1000
    loaded = load_bundle(bundle)
    assert loaded.classifier["config"]["stain"]["method"] == "macenko"
    pred = Predictor(bundle, device="cpu").detect(_slide(), threshold=0.02)
    assert all(c.label in loaded.classes + CLASSES for c in pred.cells)
    # bad input reaches the user as a message, not a traceback
    (source / "platelet").mkdir()
    assert main(["train-classifier", "--source", str(source), "--target", str(tgt_dir), "--method", "dann",
                 "--source-map", str(tmp_path / "map.yaml"), "--out", str(out)]) == 2


def test_one_image_crop_matches_between_decode_paths(tmp_path: Path) -> None:
    """JPEG slides: the pipeline's reduced decode and the training crops' decode give the same crop."""
    from wbc_core.classifier.crops import crop_cell
    from wbc_core.data.images import read_rgb

    img, mask = smear("lymphocyte", "target", (900, 1200), 110, seed=3, centre=(600, 450))
    path = tmp_path / "slide.jpg"
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    ys, xs = np.nonzero(mask)
    box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    full, s1 = read_rgb(path)
    quarter, s4 = read_rgb(path, min_long_side=300)
    assert s1 == 1.0 and s4 == 0.25
    a = crop_cell(full, box, CropConfig(size=48)).image.astype(int)
    b = crop_cell(quarter, box, CropConfig(size=48), scale=s4).image.astype(int)
    assert np.abs(a - b).mean() < 6


def test_function_returns_both_opinions_as_declared_string_attributes(bundles, monkeypatch: pytest.MonkeyPatch
                                                                      ) -> None:
    """Through the Nuclio function (real nuclio-sdk event and context): labels and attributes are all declared
    in function.yaml's spec, attribute values are strings, and a bundle without a classifier sends only the
    segmenter's (decided_by=segmenter)."""
    import io
    import json

    from PIL import Image

    from serverless import main as function
    from serverless.__main__ import build_event, make_context, request_body

    plain, with_cls, _, _ = bundles
    spec = function.read_spec()
    declared = {label["name"]: {a["name"]: a for a in label.get("attributes", [])} for label in spec}
    buf = io.BytesIO()
    Image.fromarray(_slide()).save(buf, "JPEG", quality=95)
    for bundle, has_attributes in ((with_cls, True), (plain, False)):
        monkeypatch.setenv("WBC_BUNDLE_DIR", str(bundle))
        context = make_context()
        function.init_context(context)
        response = function.handler(context, build_event(request_body(buf.getvalue(), 0.02)))
        assert response.status_code == 200
        items = json.loads(response.body)
        assert items
        for item in items:
            assert item["label"] in declared
            names = {a["name"] for a in item["attributes"]}
            if not has_attributes:  # no classifier: what the segmenter said, and that it decided
                assert names == {"segmenter_label", "segmenter_score", "decided_by"}
                assert {"name": "decided_by", "value": "segmenter"} in item["attributes"]
                continue
            assert names == set(ATTRIBUTES) and names <= set(declared[item["label"]])
            for a in item["attributes"]:
                assert isinstance(a["value"], str)
                spec_attr = declared[item["label"]][a["name"]]
                if spec_attr["input_type"] == "select":
                    assert a["value"] in spec_attr["values"]
