"""One contract from model bundle to CVAT: the spec comes from the bundle, the function refuses a bundle whose
labels CVAT would drop, and ``detect`` applies the threshold and the cap once, after the classifier's merge.

CVAT's side is tests/cvat_lambda.py (listing and storing as lambda_manager does); the function runs through the
real nuclio-sdk (Context, Event deserializer) exactly as in the image.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from serverless import main as function
from serverless.__main__ import build_event, request_body
from serverless.__main__ import main as serverless_cli
from serverless.model_handler import ModelHandler
from serverless.spec import SpecBlockError, render_function_yaml
from tests.cvat_lambda import TaskLabel, list_function, store_results
from tests.nuclio_context import Ctx
from tests.tiny_models import spread_untrained_segmenter
from trainer.classifier.train import ClassifierConfig, TrainedClassifier, classifier_config
from wbc_core.bundle import attach_classifier, load_bundle, write_bundle
from wbc_core.classifier.model import CellNet, NetConfig
from wbc_core.classifier.stain import StainNormalizer, frame_stats, stack_stats
from wbc_core.contract import SpecMismatch, default_contract, output_labels
from wbc_core.cvat_json import detection_to_cvat_results
from wbc_core.detect import Predictor
from wbc_core.labels import RVPBS_LABELS

REPO = Path(__file__).resolve().parents[1]
RVPBS = list(RVPBS_LABELS)
LOW = 0.02


def _slide() -> np.ndarray:
    rng = np.random.default_rng(3)
    img = np.full((192, 256, 3), (225, 205, 215), np.uint8)
    for _ in range(8):
        centre = (int(rng.integers(30, 226)), int(rng.integers(30, 162)))
        cv2.circle(img, centre, int(rng.integers(12, 30)), (120, 60, 150), -1)
    return img


def _jpeg() -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(_slide(), cv2.COLOR_RGB2BGR))
    assert ok
    return data.tobytes()


def _attach_random_classifier(directory: Path, classes: list[str]) -> None:
    ccfg = ClassifierConfig.from_dict({"crop": {"size": 24}, "net": {"width": 8}, "stain_norm": "reinhard"})
    torch.manual_seed(1)
    net = CellNet(len(classes), NetConfig(width=8)).eval()
    with torch.no_grad():
        net.head[1].weight.mul_(20)  # confident, varied opinions
    normalizer = StainNormalizer.fit("reinhard", stack_stats([frame_stats(_slide())]))
    trained = TrainedClassifier(model=net, classes=classes, normalizer=normalizer, config=ccfg, method="finetune")
    attach_classifier(directory, net.state_dict(), classifier_config(trained))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``ten``: 10 RV-PBS classes; ``wbc``: detection only (BCCD-style); ``classifier``: ``ten`` plus a crop
    classifier, its default threshold the median merged score (so the default visibly cuts)."""
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("contract")
    cfg, model = spread_untrained_segmenter(10)
    ten = write_bundle(root / "ten", model, RVPBS, cfg, 0.5)
    cfg1, model1 = spread_untrained_segmenter(1)
    with torch.no_grad():
        model1.roi_heads.box_predictor.cls_score.bias[1] += 20  # one class: make it find cells
    wbc = write_bundle(root / "wbc", model1, ["wbc"], cfg1, 0.05)
    classifier = root / "classifier"
    shutil.copytree(ten, classifier)
    _attach_random_classifier(classifier, RVPBS)
    scores = sorted(c.score for c in Predictor(classifier, device="cpu").detect(_slide(), LOW).cells)
    assert len(scores) >= 6
    meta_threshold = float(np.median(scores))
    write_bundle(classifier, model, RVPBS, cfg, meta_threshold)  # rewrites bundle.yaml: attach again
    _attach_random_classifier(classifier, RVPBS)
    wbc_classified = root / "wbc-classified"
    shutil.copytree(wbc, wbc_classified)
    _attach_random_classifier(wbc_classified, ["lymphocyte", "neutrophil"])
    return {"ten": ten, "wbc": wbc, "classifier": classifier, "wbc-classified": wbc_classified}


def _serve(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> Ctx:
    """init_context as the processor runs it: bundle from $WBC_BUNDLE_DIR, spec from the repo's function.yaml."""
    monkeypatch.setenv("WBC_BUNDLE_DIR", str(bundle))
    monkeypatch.setenv("WBC_NUM_THREADS", "2")
    ctx = Ctx()
    function.init_context(ctx.context)
    return ctx


def _invoke(ctx: Ctx, threshold: float | None = None) -> tuple[int, list[dict]]:
    event = build_event(request_body(_jpeg(), threshold))  # nuclio-sdk's own deserializer, as in the processor
    response = function.handler(ctx.context, event)
    return response.status_code, json.loads(response.body)


# --- the spec is generated from the bundle ----------------------------------------------------------

@pytest.mark.parametrize("name", ["function.yaml", "function-gpu.yaml"])
def test_committed_spec_is_what_the_default_bundle_config_generates(name: str) -> None:
    text = (REPO / name).read_text()
    assert render_function_yaml(text, default_contract().spec()) == text, (
        f"{name}'s spec differs from the default bundle config's: run "
        "'python -m serverless spec --write function.yaml function-gpu.yaml'")
    listed = list_function(REPO / name)  # CVAT lists it
    assert [label["name"] for label in listed["labels_v2"]] == RVPBS
    assert listed["kind"] == "detector" and all(label["type"] == "mask" for label in listed["labels_v2"])


def test_render_replaces_only_the_spec_block(bundles: dict[str, Path]) -> None:
    text = (REPO / "function.yaml").read_text()
    contract = load_bundle(bundles["wbc-classified"]).contract
    new = render_function_yaml(text, contract.spec())
    assert new != text and render_function_yaml(new, contract.spec()) == new
    outside = [line for line in text.splitlines() if not line.startswith("      ")]
    assert [line for line in new.splitlines() if not line.startswith("      ")] == outside, "comments and keys kept"
    listed = list_function_text(new, Path(str(bundles["wbc"])) / "f.yaml")
    assert [label["name"] for label in listed["labels_v2"]] == ["lymphocyte", "neutrophil"]
    with pytest.raises(SpecBlockError):
        render_function_yaml("metadata:\n  name: x\n", contract.spec())


def list_function_text(text: str, path: Path) -> dict:
    path.write_text(text)
    return list_function(path)


def test_spec_cli_prints_and_writes(bundles: dict[str, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert serverless_cli(["spec", "--bundle", str(bundles["wbc"])]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [label["name"] for label in printed] == ["wbc"]
    assert {a["name"] for a in printed[0]["attributes"]} == {"segmenter_label", "segmenter_score", "decided_by"}
    target = tmp_path / "function.yaml"
    shutil.copy(REPO / "function.yaml", target)
    assert serverless_cli(["spec", "--bundle", str(bundles["wbc-classified"]), "--write", str(target)]) == 0
    labels = [label["name"] for label in list_function(target)["labels_v2"]]
    assert labels == ["lymphocyte", "neutrophil"], "a classifier over a detection-only segmenter names the cells"


def test_output_labels_of_each_kind_of_bundle() -> None:
    assert output_labels(["wbc"], None) == ("wbc",)
    assert output_labels(["wbc"], ["lymphocyte", "neutrophil"]) == ("lymphocyte", "neutrophil")
    assert output_labels(["blast cell", "neutrophil"], ["neutrophil", "monocyte"]) == (
        "blast cell", "neutrophil", "monocyte")


# --- start-up refuses what CVAT would drop ---------------------------------------------------------

def test_a_wbc_only_bundle_is_refused_at_start_up_with_a_clear_error(bundles: dict[str, Path],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # without the check, CVAT would drop every shape of this bundle: show that first
    listed = list_function(REPO / "function.yaml")
    task = [TaskLabel(name, "polygon") for name in RVPBS]
    results = detection_to_cvat_results(Predictor(bundles["wbc"], device="cpu").detect(_slide(), LOW))
    stored, dropped = store_results(results, listed, task)
    assert results and stored == [] and dropped == len(results)
    with pytest.raises(SpecMismatch) as err:
        _serve(bundles["wbc"], monkeypatch)
    message = str(err.value)
    assert "['wbc']" in message and "drop" in message and "python -m serverless spec" in message


def test_the_ten_class_bundle_returns_shapes_cvat_stores(bundles: dict[str, Path],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = _serve(bundles["ten"], monkeypatch)
    status, results = _invoke(ctx, LOW)
    assert status == 200 and len(results) >= 6
    listed = list_function(REPO / "function.yaml")
    task = [TaskLabel(name, "polygon", {"decided_by": {"input_type": "select", "values": ["agree", "classifier",
                                                                                         "segmenter"]}})
            for name in RVPBS]
    stored, dropped = store_results(results, listed, task, conv_mask_to_poly=True)
    assert dropped == 0 and len(stored) == len(results)
    assert all(s["type"] == "polygon" and s["attributes"] == {"decided_by": "segmenter"} for s in stored)
    stored_masks, _ = store_results(results, listed, task)
    assert all(s["type"] == "mask" for s in stored_masks)


def test_a_reload_to_a_bundle_cvat_would_drop_is_refused(bundles: dict[str, Path], tmp_path: Path) -> None:
    served = tmp_path / "current"
    shutil.copytree(bundles["ten"], served)
    handler = ModelHandler(served, device="cpu", reload_seconds=0,
                           spec=json.loads(json.dumps(default_contract().spec())))
    shutil.rmtree(served)
    shutil.copytree(bundles["wbc"], served)
    assert handler.maybe_reload() is False
    assert "SpecMismatch" in (handler.last_reload_error or "") and handler.classes == RVPBS


# --- detect: threshold and cap once, after the merge -------------------------------------------------

def test_with_a_classifier_an_explicit_default_threshold_returns_the_same_shapes(
        bundles: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = _serve(bundles["classifier"], monkeypatch)
    default = load_bundle(bundles["classifier"]).score_threshold
    status, implicit = _invoke(ctx)
    status2, explicit = _invoke(ctx, default)
    assert status == status2 == 200
    assert implicit == explicit and len(implicit) > 0
    assert all(float(item["confidence"]) >= default - 1e-4 for item in implicit)
    _, low = _invoke(ctx, LOW)
    assert len(low) > len(implicit), "the default threshold cuts merged scores"
    attributes = {a["name"] for a in implicit[0]["attributes"]}
    assert attributes == {"segmenter_label", "segmenter_score", "classifier_label", "classifier_score", "decided_by"}


def test_detect_caps_cells_once_and_says_why_a_frame_is_empty(bundles: dict[str, Path]) -> None:
    predictor = Predictor(bundles["classifier"], device="cpu")
    everything = predictor.detect(_slide(), LOW)
    assert len(everything.cells) >= 4 and everything.capped == 0
    scores = [c.score for c in everything.cells]
    assert scores == sorted(scores, reverse=True) and min(scores) >= LOW
    capped = predictor.detect(_slide(), LOW, max_cells=3)
    assert [c.score for c in capped.cells] == scores[:3] and capped.capped == len(scores) - 3
    assert all(c.points is not None and len(c.points) >= 3 for c in everything.cells)
    none = predictor.detect(_slide(), 0.999)
    assert none.cells == [] and "under the threshold 0.999" in none.empty_reason
    with pytest.raises(ValueError, match="max_cells"):
        predictor.detect(_slide(), LOW, max_cells=0)


# --- the serving image never needs training code ----------------------------------------------------

def test_serving_a_classifier_bundle_loads_no_training_module(bundles: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "slide.jpg").write_bytes(_jpeg())
    script = (
        "import base64, json, sys\n"
        "for name in ('trainer', 'cvat_sync', 'tqdm', 'matplotlib', 'requests', 'tests'):\n"
        "    sys.modules[name] = None  # not in the serving image: importing one fails\n"
        "sys.path.insert(0, sys.argv[3])\n"
        "import main\n"
        "from serverless.__main__ import build_event, make_context, request_body\n"
        "main.self_check()\n"
        "ctx = make_context(); main.init_context(ctx)\n"
        "r = main.handler(ctx, build_event(request_body(open(sys.argv[1], 'rb').read(), 0.02)))\n"
        "items = json.loads(r.body)\n"
        "print(r.status_code, len(items), sorted(a['name'] for a in items[0]['attributes']))\n"
    )
    env = {**os.environ, "WBC_BUNDLE_DIR": str(bundles["classifier"]), "WBC_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "slide.jpg"), "", str(REPO / "serverless")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    last = run.stdout.strip().splitlines()[-1]
    assert last.startswith("200 ") and "classifier_label" in last
    assert "self-check ok" in run.stdout


def test_threads_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WBC_NUM_THREADS", "1")
    before = torch.get_num_threads()
    try:
        assert function.set_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("WBC_NUM_THREADS", "two")
        with pytest.raises(ValueError, match="WBC_NUM_THREADS"):
            function.set_threads()
    finally:
        torch.set_num_threads(before)


def test_constraints_pin_every_serving_dependency() -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    needed = [*project["dependencies"], *project["optional-dependencies"]["serve"]]
    pins = {}
    for line in (REPO / "serverless" / "constraints-serve.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    for requirement in needed:
        name = requirement.split(">")[0].split("=")[0].split("<")[0].strip().lower()
        assert name in pins, f"{name} is a serving dependency but serverless/constraints-serve.txt does not pin it"
    function_yaml = (REPO / "function.yaml").read_text()
    assert f'torch=={pins["torch"]}' in function_yaml and f'torchvision=={pins["torchvision"]}' in function_yaml
    assert 'main.self_check()' in function_yaml and "constraints-serve.txt" in function_yaml


def test_rbc_scale_mode_sizes_the_frame_from_its_red_cells(tmp_path: Path) -> None:
    """A bundle trained with scale mode rbc: detect resizes each frame so red cells are rbc_px across, whatever
    the frame's own magnification (here the same smear drawn at 1x and 2x gives the same input)."""
    cfg, model = spread_untrained_segmenter(10)
    scale = {"mode": "rbc", "rbc_px": 30.0, "min_side": 64, "max_side": 1600}
    bundle = write_bundle(tmp_path / "rbc", model, RVPBS, cfg, 0.5, scale=scale)
    assert load_bundle(bundle).scale == scale
    predictor = Predictor(bundle, device="cpu")
    rng = np.random.default_rng(0)
    smear = np.full((480, 640, 3), (236, 226, 214), np.uint8)
    for _ in range(60):  # red cells, ~40 px across, pale centre
        c = (int(rng.integers(25, 615)), int(rng.integers(25, 455)))
        cv2.circle(smear, c, 20, (205, 120, 125), -1)
        cv2.circle(smear, c, 7, (220, 160, 160), -1)
    one = predictor.detect(smear, 0.5)
    two = predictor.detect(cv2.resize(smear, (1280, 960), interpolation=cv2.INTER_LINEAR), 0.5)
    assert one.rbc_diameter_px is not None and two.rbc_diameter_px is not None
    assert two.rbc_diameter_px / one.rbc_diameter_px == pytest.approx(2.0, rel=0.15)
    assert one.input_scale * 640 == pytest.approx(two.input_scale * 1280, rel=0.15), "same input size"
    assert one.rbc_diameter_px * one.input_scale == pytest.approx(30.0, rel=0.2)
    blank = predictor.detect(np.full((480, 640, 3), 230, np.uint8), 0.5)
    fixed = Predictor(bundles_fixed := write_bundle(tmp_path / "fixed", model, RVPBS, cfg, 0.5), device="cpu")
    assert blank.rbc_diameter_px is None and blank.input_scale == pytest.approx(
        fixed.detect(np.full((480, 640, 3), 230, np.uint8), 0.5).input_scale), "no red cells: the fixed resize"
    assert load_bundle(bundles_fixed).scale is None
