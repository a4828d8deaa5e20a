"""Hot reload in the Nuclio function: a newly promoted registry version is served without re-init,
a corrupt or half-copied bundle is logged and the old model keeps serving.

Two tiny untrained bundles are told apart by their answers: v1 has the 10 RV-PBS classes (default
threshold 0.3), v2 other weights and the same classes renamed "v2 <class>" (default threshold 0.6). Requests go through
``serverless.main.handler`` with the real nuclio-sdk ``Event`` and ``Context``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from pathlib import Path

import cv2
import nuclio_sdk
import nuclio_sdk.logger
import numpy as np
import pytest
import torch
from PIL import Image

from serverless import main as function
from serverless.model_handler import ModelHandler, reload_interval
from tests.nuclio_context import Ctx
from trainer.registry import Registry
from wbc_core.bundle import write_bundle
from wbc_core.labels import RVPBS_LABELS
from wbc_core.model import SegmenterConfig, build_model

LOW = 0.02  # request threshold: above the models' box_score_thresh, so both bundles return cells
V2_CLASSES = {f"v2 {name}" for name in RVPBS_LABELS}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.set_num_threads(1)
    cfg = SegmenterConfig(min_size=96, max_size=128, fpn_channels=32, mask_resolution=7, box_score_thresh=0.01,
                          box_detections_per_img=10)
    root = tmp_path_factory.mktemp("hot-reload-bundles")
    out = {}
    for name, classes, threshold, seed in (("v1", list(RVPBS_LABELS), 0.3, 0),
                                           ("v2", [f"v2 {c}" for c in RVPBS_LABELS], 0.6, 1)):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = build_model(cfg, len(classes))
        out[name] = write_bundle(root / name, model, classes, cfg, score_threshold=threshold)
    return out


@pytest.fixture(scope="module")
def body() -> dict:
    rng = np.random.default_rng(0)
    img = np.full((192, 256, 3), (225, 205, 215), np.uint8)
    for _ in range(6):
        centre = (int(rng.integers(30, 226)), int(rng.integers(30, 162)))
        cv2.circle(img, centre, int(rng.integers(12, 30)), (120, 60, 150), -1)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return {"image": base64.b64encode(buf.getvalue()).decode(), "threshold": LOW}


def _labels(ctx: Ctx, body: dict) -> set[str]:
    """Labels of the cells the function returns for one request (which must be answered 200)."""
    response = function.handler(ctx.context, nuclio_sdk.Event(body=body, content_type="application/json"))
    assert isinstance(response, nuclio_sdk.Response) and response.status_code == 200, response.body
    labels = {item["label"] for item in json.loads(response.body)}
    assert labels, "the test bundles must return cells"
    return labels


def _flip_byte(path: Path, offset: int = 200) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _point_current(reg: Registry, version: str) -> None:
    """Re-point ``current`` by hand, bypassing the registry's verification."""
    tmp = reg.root / ".current-by-hand"
    os.symlink(version, tmp)
    os.replace(tmp, reg.current_path)


def test_a_promoted_version_is_served_without_reinit_and_a_corrupt_one_is_not(
        tmp_path: Path, bundles: dict[str, Path], body: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = Registry(tmp_path / "models")
    v1 = reg.add(bundles["v1"], {})
    reg.promote(v1)
    monkeypatch.setenv("WBC_BUNDLE_DIR", str(reg.current_path))
    monkeypatch.setenv("WBC_RELOAD_SECONDS", "0")
    # v2's renamed classes tell the versions apart; a real spec would refuse them (tests/test_contract.py)
    monkeypatch.setattr(function, "read_spec", lambda path=None: None)
    ctx = Ctx()
    function.init_context(ctx.context)
    handler = ctx.context.user_data.model
    assert handler.reload_seconds == 0 and handler.bundle_path == reg.path(v1) and handler.default_threshold == 0.3
    assert _labels(ctx, body) <= set(RVPBS_LABELS)

    v2 = reg.add(bundles["v2"], {})
    reg.promote(v2)
    assert _labels(ctx, body) <= V2_CLASSES
    assert ctx.context.user_data.model is handler, "no re-init"
    assert handler.bundle_path == reg.path(v2) and handler.default_threshold == 0.6
    reloaded = [line for line in ctx.lines("info") if "reloaded" in line]
    assert len(reloaded) == 1 and f"{reg.path(v1)} (v0001) -> {reg.path(v2)} (v0002)" in reloaded[0]

    v3 = reg.add(bundles["v1"], {})
    _flip_byte(reg.path(v3) / "model.pt")
    _point_current(reg, v3)
    for _ in range(3):
        assert _labels(ctx, body) <= V2_CLASSES
    errors = ctx.lines("error")
    assert len(errors) == 1, "one error line per bad bundle, not one per request"
    assert f"{reg.path(v3) / 'model.pt'} is corrupt" in errors[0] and str(reg.path(v2)) in errors[0]
    assert handler.bundle_path == reg.path(v2) and "corrupt" in (handler.last_reload_error or "")

    reg.rollback(v1)  # a good version again: picked up after the failure
    assert _labels(ctx, body) <= set(RVPBS_LABELS)
    assert handler.bundle_path == reg.path(v1) and handler.last_reload_error is None
    assert len(ctx.lines("error")) == 1


def test_reload_interval_and_reload_off(tmp_path: Path, bundles: dict[str, Path], body: dict) -> None:
    reg = Registry(tmp_path / "models")
    reg.promote(reg.add(bundles["v1"], {}))
    slow = ModelHandler(reg.current_path, device="cpu", reload_seconds=3600)
    off = ModelHandler(reg.current_path, device="cpu", reload_seconds=-1)
    reg.promote(reg.add(bundles["v2"], {}))
    assert _labels(Ctx(slow), body) <= set(RVPBS_LABELS), "not checked again before the interval"
    assert _labels(Ctx(off), body) <= set(RVPBS_LABELS)
    assert not off.maybe_reload() and off.bundle_path == reg.path("v0001")
    assert slow.maybe_reload(force=True) and slow.bundle_path == reg.path("v0002")
    assert _labels(Ctx(slow), body) <= V2_CLASSES
    assert not slow.maybe_reload(force=True), "unchanged: nothing to do"


def test_a_bundle_copied_in_place_is_picked_up_once_complete(tmp_path: Path, bundles: dict[str, Path],
                                                              body: dict) -> None:
    """The deploy.sh --mount case: files are copied into the served folder one after the other."""
    folder = shutil.copytree(bundles["v1"], tmp_path / "current")
    handler = ModelHandler(folder, device="cpu", reload_seconds=0)
    ctx = Ctx(handler)
    assert _labels(ctx, body) <= set(RVPBS_LABELS)
    shutil.copyfile(bundles["v2"] / "bundle.yaml", folder / "bundle.yaml")  # model.pt not copied yet
    assert _labels(ctx, body) <= set(RVPBS_LABELS)
    assert _labels(ctx, body) <= set(RVPBS_LABELS)
    assert len(ctx.lines("error")) == 1 and "model.pt" in ctx.lines("error")[0]
    shutil.copyfile(bundles["v2"] / "model.pt", folder / "model.pt")
    assert _labels(ctx, body) <= V2_CLASSES
    assert handler.bundle_path == folder.resolve() and len(ctx.lines("error")) == 1


def test_reload_interval_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WBC_RELOAD_SECONDS", raising=False)
    assert reload_interval() == 5.0
    for value, expected in (("0", 0.0), ("2.5", 2.5), ("-1", -1.0), ("soon", 5.0), ("inf", -1.0)):
        monkeypatch.setenv("WBC_RELOAD_SECONDS", value)
        assert reload_interval() == expected
