"""The cvat-sdk auto-annotation function module (``serverless/cvat_sdk_function.py``) against the CVAT 2.23.1
stand-in, through cvat-sdk's real driver (``cvat_sdk.auto_annotation.annotate_task``) and the real ``cvat-cli``.

The driver reads the task the way cvat-sdk 2.23.1 does (``/api/server/about``, ``POST /api/auth/login``,
``/api/tasks/{id}``, ``/api/labels?task_id=``, ``/api/tasks/{id}/data/meta``, the task's original chunks) and
uploads with ``PATCH /api/tasks/{id}/annotations/?action=create`` (``PUT`` with ``clear_existing``). The shapes
are read back over HTTP and compared with what :meth:`Predictor.detect` gives on the same frames.

A tiny untrained Mask R-CNN with amplified heads (as in ``test_serverless.py``) returns varied cells fast.
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("cvat_sdk")

import cvat_sdk.auto_annotation as cvataa
import requests
import torch
from cvat_sdk import Client
from cvat_sdk.core.client import Config
from cvat_sdk.masks import encode_mask
from PIL import Image

from serverless import cvat_sdk_function as aa
from tests.cvat_standin import StandinCVAT, synthetic_slide_jpeg
from tests.tiny_models import blob_segmenter
from wbc_core.bundle import write_bundle
from wbc_core.data.masks import cvat_rle_decode

REPO = Path(__file__).resolve().parents[1]
BUNDLE_LABELS = ["neutrophil", "lymphocyte", "monocyte"]
#: The task's labels: the bundle's plus one more, in another order, so task label ids differ from spec ids.
TASK_LABELS = [{"name": "basophil", "type": "polygon"}, {"name": "monocyte", "type": "polygon"},
               {"name": "lymphocyte", "type": "any"}, {"name": "neutrophil", "type": "mask"}]
W, H = 256, 192
LOW = 0.02  # the bundle's default threshold: above the model's box_score_thresh (0.01)


@dataclass(frozen=True)
class Ctx:
    """A ``DetectionFunctionContext`` for calling ``detect`` directly."""

    frame_name: str = "frame.jpg"
    conf_threshold: float | None = None
    conv_mask_to_poly: bool = False


# --- fixtures ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread while this module runs (restored afterwards): the model's input is 128x96, so
    more threads buy nothing, and on a busy 2-core machine they only contend with the stand-in's threads and the
    cvat-cli subprocesses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg, model = blob_segmenter(len(BUNDLE_LABELS), seed=1, detections=12)
    return write_bundle(tmp_path_factory.mktemp("bundle"), model, BUNDLE_LABELS, cfg, score_threshold=LOW)


@pytest.fixture(scope="module")
def fn(bundle: Path) -> aa.WbcDetectionFunction:
    return aa.create(bundle=str(bundle), device="cpu")


@pytest.fixture(scope="module")
def frames() -> list[tuple[str, bytes]]:
    return [(f"slide_{i}.jpg", synthetic_slide_jpeg(W, H, seed=i)) for i in range(3)]


@pytest.fixture(scope="module")
def expected(fn: aa.WbcDetectionFunction, frames: list[tuple[str, bytes]]) -> dict[int, list[Any]]:
    """The detect contract's cells per frame, on the frames as PIL decodes them (as the SDK does)."""
    out = {i: fn.predictor.detect(_rgb(data)).cells for i, (_, data) in enumerate(frames)}
    assert sum(len(c) for c in out.values()) >= 6, "the test model must return cells"
    return out


@pytest.fixture(scope="module")
def cvat() -> Iterator[StandinCVAT]:
    with StandinCVAT() as server:
        yield server


@pytest.fixture
def client(cvat: StandinCVAT, tmp_path: Path) -> Iterator[Client]:
    with Client(cvat.url, config=Config(cache_dir=tmp_path / "sdk-cache")) as c:
        c.login(("admin", "admin"))
        yield c


def _rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _task(cvat: StandinCVAT, frames: list[tuple[str, bytes]], labels: list[dict[str, Any]] = TASK_LABELS) -> int:
    return cvat.add_task("aa", frames=frames, labels=[dict(lbl) for lbl in labels], segment_size=2)


def _get(cvat: StandinCVAT, path: str, **params: Any) -> requests.Response:
    resp = requests.get(cvat.url + path, params=params, headers={"Authorization": f"Token {cvat.admin_token}"},
                        timeout=30)
    resp.raise_for_status()
    return resp


def _label_ids(cvat: StandinCVAT, task_id: int) -> dict[str, int]:
    return {lbl["name"]: lbl["id"] for lbl in _get(cvat, "/api/labels", task_id=task_id).json()["results"]}


def _shapes(cvat: StandinCVAT, task_id: int) -> list[dict[str, Any]]:
    return _get(cvat, f"/api/tasks/{task_id}/annotations").json()["shapes"]


def _mask_of(shape: dict[str, Any]) -> np.ndarray:
    left, top, right, bottom = (round(v) for v in shape["points"][-4:])
    full = np.zeros((H, W), bool)
    full[top:bottom + 1, left:right + 1] = cvat_rle_decode(shape["points"][:-4], right - left + 1, bottom - top + 1)
    return full


def _expected_shapes(expected: dict[int, list[Any]], ids: dict[str, int], polygons: bool = False,
                     labels: set[str] | None = None) -> list[tuple[int, int, str, list[float]]]:
    out = []
    for frame, cells in expected.items():
        for cell in cells:
            if labels is not None and cell.label not in labels:
                continue
            points = aa.polygon_points(cell) if polygons else aa.mask_points(cell, W, H)
            out.append((frame, ids[cell.label], "polygon" if polygons else "mask", [float(v) for v in points]))
    return sorted(out)


def _stored(shapes: list[dict[str, Any]]) -> list[tuple[int, int, str, list[float]]]:
    return sorted((s["frame"], s["label_id"], s["type"], s["points"]) for s in shapes)


def _same(got: list[tuple[int, int, str, list[float]]], want: list[tuple[int, int, str, list[float]]]) -> None:
    """``got == want``, with a readable message (frame, label id, type, bbox) when not."""
    def brief(items: list[tuple[int, int, str, list[float]]]) -> list[tuple[Any, ...]]:
        return [(f, lid, t, len(p), p[-4:] if t == "mask" else p[:4]) for f, lid, t, p in items]

    assert got == want, f"stored {brief(got)}\nexpected {brief(want)}"


# --- the function on its own ---------------------------------------------------------------------------------

def test_spec_is_the_bundle_contracts_labels_as_masks(fn: aa.WbcDetectionFunction) -> None:
    labels = fn.spec.labels
    assert [(lbl.name, lbl.id, lbl.type) for lbl in labels] == [(n, i, "mask") for i, n in enumerate(BUNDLE_LABELS)]
    assert all(not getattr(lbl, "attributes", None) for lbl in labels), "cvat-sdk 2.23.1 refuses spec attributes"
    assert list(fn.contract.labels) == BUNDLE_LABELS


def test_detect_returns_the_contracts_cells_as_masks_or_polygons(fn: aa.WbcDetectionFunction,
                                                                 frames: list[tuple[str, bytes]],
                                                                 expected: dict[int, list[Any]]) -> None:
    image = Image.open(io.BytesIO(frames[0][1]))
    cells = expected[0]
    masks = fn.detect(Ctx(), image)
    assert [(s.type.value, s.label_id, s.frame) for s in masks] == [
        ("mask", BUNDLE_LABELS.index(c.label), 0) for c in cells]
    for shape, cell in zip(masks, cells, strict=True):
        left, top = cell.origin
        h, w = cell.mask_crop.shape
        # the crop-only encoding is exactly encode_mask over the full-frame bitmap
        assert list(shape.points) == encode_mask(cell.full_mask(H, W), bbox=[left, top, left + w, top + h])
        assert not getattr(shape, "attributes", None)
    polygons = fn.detect(Ctx(conv_mask_to_poly=True), image)
    assert [s.type.value for s in polygons] == ["polygon"] * len(cells)
    assert all(len(s.points) >= 6 and len(s.points) % 2 == 0 for s in polygons)


def test_conf_threshold_wins_over_the_parameter_and_zero_keeps_every_candidate(
        fn: aa.WbcDetectionFunction, bundle: Path, frames: list[tuple[str, bytes]],
        expected: dict[int, list[Any]]) -> None:
    image = Image.open(io.BytesIO(frames[0][1]))
    scores = sorted(c.score for c in expected[0])
    cut = scores[len(scores) // 2]
    above = sum(s >= cut for s in scores)
    assert 0 < above < len(scores), "the test model must give varied scores"
    assert len(fn.detect(Ctx(conf_threshold=cut), image)) == above
    strict = aa.create(bundle=str(bundle), threshold=1.0, max_cells=2, device="cpu")
    # -p threshold when the driver passes none
    assert len(strict.detect(Ctx(), image)) == min(2, sum(s >= 1.0 for s in scores))
    assert len(strict.detect(Ctx(conf_threshold=cut), image)) == min(2, above)   # the driver's wins; the cap holds
    assert len(strict.detect(Ctx(conf_threshold=0.0), image)) == 2  # 0: every candidate (then the cap)
    assert fn.effective_threshold(None) is None and strict.effective_threshold(None) == 1.0


def test_grey_and_16_bit_frames_are_detected_as_rgb(fn: aa.WbcDetectionFunction,
                                                    frames: list[tuple[str, bytes]]) -> None:
    grey = Image.open(io.BytesIO(frames[0][1])).convert("L")
    deep = Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)
    assert deep.mode.startswith("I;16")
    assert len(fn.detect(Ctx(), deep)) == len(fn.detect(Ctx(), grey))


def test_a_missing_or_bad_bundle_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  bundle: Path) -> None:
    monkeypatch.delenv(aa.BUNDLE_ENV, raising=False)
    with pytest.raises(aa.BundleParameterError, match=r"no model bundle given: .*-p bundle=str:DIR"):
        aa.create()
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=rf"model bundle {re.escape(str(missing))} does not exist: .*-p bundle"):
        aa.create(bundle=str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"cannot load the model bundle .*empty.*bundle.yaml is missing.*"
                                         r"-p bundle=str:DIR"):
        aa.create(bundle=str(tmp_path / "empty"))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(bundle, corrupt)
    (corrupt / "model.pt").write_bytes(b"not weights")
    with pytest.raises(ValueError, match=r"model.pt is corrupt"):
        aa.create(bundle=str(corrupt))
    with pytest.raises(ValueError, match="between 0 and 1"):
        aa.create(bundle=str(bundle), threshold=1.5)
    with pytest.raises(ValueError, match="max_cells must be a positive integer"):
        aa.create(bundle=str(bundle), max_cells=0)


def test_module_level_spec_and_detect_come_from_the_env(bundle: Path, monkeypatch: pytest.MonkeyPatch,
                                                        cvat: StandinCVAT, client: Client,
                                                        frames: list[tuple[str, bytes]],
                                                        expected: dict[int, list[Any]]) -> None:
    monkeypatch.setattr(aa, "_module_functions", {})
    monkeypatch.delenv(aa.BUNDLE_ENV, raising=False)
    assert not hasattr(aa, "spec") and not hasattr(aa, "detect")
    with pytest.raises(AttributeError, match="WBC_BUNDLE_DIR"):
        _ = aa.spec
    monkeypatch.setenv(aa.BUNDLE_ENV, str(bundle))
    assert [lbl.name for lbl in aa.spec.labels] == BUNDLE_LABELS
    task_id = _task(cvat, frames)
    cvataa.annotate_task(client, task_id, aa)  # the module itself is the function
    _same(_stored(_shapes(cvat, task_id)), _expected_shapes(expected, _label_ids(cvat, task_id)))


# --- through cvat-sdk's driver against the stand-in ----------------------------------------------------------

def test_annotate_task_stores_masks_under_the_tasks_label_ids(cvat: StandinCVAT, client: Client,
                                                              fn: aa.WbcDetectionFunction,
                                                              frames: list[tuple[str, bytes]],
                                                              expected: dict[int, list[Any]]) -> None:
    task_id = _task(cvat, frames)
    ids = _label_ids(cvat, task_id)
    assert ids["neutrophil"] != BUNDLE_LABELS.index("neutrophil")
    cvat.reset_log()
    cvataa.annotate_task(client, task_id, fn)
    shapes = _shapes(cvat, task_id)
    _same(_stored(shapes), _expected_shapes(expected, ids))
    assert {s["source"] for s in shapes} == {"auto"} and {s["type"] for s in shapes} == {"mask"}
    assert {s["frame"] for s in shapes} == set(range(len(frames)))
    for shape in shapes:  # each stored mask decodes to the pipeline's own mask of that cell
        cell = next(c for c in expected[shape["frame"]] if aa.mask_points(c, W, H) == shape["points"])
        assert np.array_equal(_mask_of(shape), cell.full_mask(H, W))
    calls = [(e.method, e.path.rstrip("/"), e.query) for e in cvat.log]
    assert ("GET", f"/api/tasks/{task_id}/data", "number=0&quality=original&type=chunk") in calls
    assert ("PATCH", f"/api/tasks/{task_id}/annotations", "action=create") in calls
    assert all(e.status == 200 for e in cvat.log), [(e.method, e.path, e.status) for e in cvat.log]


def test_conv_mask_to_poly_stores_polygons(cvat: StandinCVAT, client: Client, fn: aa.WbcDetectionFunction,
                                           frames: list[tuple[str, bytes]],
                                           expected: dict[int, list[Any]]) -> None:
    task_id = _task(cvat, frames)
    cvataa.annotate_task(client, task_id, fn, conv_mask_to_poly=True)
    shapes = _shapes(cvat, task_id)
    _same(_stored(shapes), _expected_shapes(expected, _label_ids(cvat, task_id), polygons=True))
    assert {s["type"] for s in shapes} == {"polygon"}


def test_clear_existing_replaces_the_tasks_shapes(cvat: StandinCVAT, client: Client, fn: aa.WbcDetectionFunction,
                                                  frames: list[tuple[str, bytes]],
                                                  expected: dict[int, list[Any]]) -> None:
    task_id = _task(cvat, frames)
    ids = _label_ids(cvat, task_id)
    cvat.set_annotations(task_id, [{"type": "rectangle", "frame": 1, "label_id": ids["basophil"],
                                    "points": [1, 2, 30, 40]}])
    cvat.reset_log()
    cvataa.annotate_task(client, task_id, fn, clear_existing=True)
    assert [e.method for e in cvat.log if e.path.startswith(f"/api/tasks/{task_id}/annotations")] == ["PUT"]
    _same(_stored(_shapes(cvat, task_id)), _expected_shapes(expected, ids))


def test_bundle_labels_missing_from_the_task_fail_clearly(cvat: StandinCVAT, client: Client,
                                                          fn: aa.WbcDetectionFunction,
                                                          frames: list[tuple[str, bytes]],
                                                          expected: dict[int, list[Any]]) -> None:
    other = _task(cvat, frames, [{"name": "band cell", "type": "polygon"}, {"name": "basophil", "type": "polygon"}])
    cvat.reset_log()
    with pytest.raises(cvataa.BadFunctionError, match="label 'neutrophil' is not in dataset"):
        cvataa.annotate_task(client, other, fn)
    assert not [e for e in cvat.log if e.path.startswith(f"/api/tasks/{other}/annotations")], "nothing uploaded"
    assert _shapes(cvat, other) == []
    # with allow_unmatched_labels the cells of labels the task has are kept, the others dropped
    partial = _task(cvat, frames, [{"name": "neutrophil", "type": "mask"}, {"name": "basophil", "type": "polygon"}])
    cvataa.annotate_task(client, partial, fn, allow_unmatched_labels=True)
    _same(_stored(_shapes(cvat, partial)),
          _expected_shapes(expected, _label_ids(cvat, partial), labels={"neutrophil"}))


# --- the real cvat-cli -------------------------------------------------------------------------------------

def _cli(cvat: StandinCVAT, tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    """Start the real ``cvat-cli`` (the venv's script, else ``python -m cvat_cli``) against the stand-in."""
    script = Path(sys.executable).with_name("cvat-cli")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "cvat_cli"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "XDG_CACHE_HOME": str(tmp_path / "xdg-cache"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop(aa.BUNDLE_ENV, None)
    return subprocess.Popen([*command, "--server-host", "http://127.0.0.1", "--server-port", str(cvat.port),
                             "--auth", "admin:admin", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        _, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
    return process.returncode, stderr


def test_cvat_cli_auto_annotate_with_the_function_module(cvat: StandinCVAT, tmp_path: Path, bundle: Path,
                                                         frames: list[tuple[str, bytes]],
                                                         expected: dict[int, list[Any]]) -> None:
    """``cvat-cli ... auto-annotate TASK --function-module serverless.cvat_sdk_function -p bundle=str:DIR``;
    the run with a wrong bundle path goes at the same time (each process spends most of its time importing
    torch)."""
    if importlib.util.find_spec("cvat_cli") is None:
        pytest.skip("cvat-cli is not installed (pip install '.[cvat]')")
    task_id, other = _task(cvat, frames), _task(cvat, frames)
    module = ("--function-module", "serverless.cvat_sdk_function")
    missing = tmp_path / "no-bundle"
    bad = _cli(cvat, tmp_path, "auto-annotate", str(other), *module, "-p", f"bundle=str:{missing}")
    good = _cli(cvat, tmp_path, "auto-annotate", str(task_id), *module, "-p", f"bundle=str:{bundle}",
                "-p", "device=str:cpu")
    (code, stderr), (bad_code, bad_stderr) = _finish(good), _finish(bad)
    assert code == 0, stderr[-3000:]
    shapes = _shapes(cvat, task_id)
    want = _expected_shapes(expected, _label_ids(cvat, task_id))
    # another process: same cells and labels; masks equal up to float noise at the 0.5 mask threshold
    assert [s[:3] for s in _stored(shapes)] == [w[:3] for w in want]
    for got, exp in zip(_stored(shapes), want, strict=True):
        a, b = _mask_of({"points": got[3]}), _mask_of({"points": exp[3]})
        assert (a & b).sum() / (a | b).sum() > 0.98

    assert bad_code != 0
    assert f"model bundle {missing} does not exist" in bad_stderr, bad_stderr[-3000:]
    assert "-p bundle=str:DIR" in bad_stderr
    assert _shapes(cvat, other) == []


# --- the stand-in's additions ---------------------------------------------------------------------------------

def test_standin_serves_task_chunks_and_session_cookies_like_cvat(cvat: StandinCVAT,
                                                                 frames: list[tuple[str, bytes]]) -> None:
    task_id = _task(cvat, frames)
    resp = _get(cvat, f"/api/tasks/{task_id}/data", type="chunk", number=0, quality="original")
    assert resp.headers["content-type"] == "application/zip" and "content-length" in resp.headers
    body = resp.content
    assert resp.headers["x-checksum"] == str(zlib.crc32(body[:1000], zlib.crc32(str(len(body)).encode())))
    assert resp.headers["x-updated-date"] == _get(cvat, f"/api/tasks/{task_id}/data/meta").json()[
        "chunks_updated_date"]
    with zipfile.ZipFile(io.BytesIO(body)) as zf:
        assert zf.namelist() == ["000000.jpg", "000001.jpg", "000002.jpg"]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
        assert [zf.read(n) for n in zf.namelist()] == [data for _, data in frames]
    compressed = _get(cvat, f"/api/tasks/{task_id}/data", type="chunk", number=0, quality="compressed")
    with zipfile.ZipFile(io.BytesIO(compressed.content)) as zf:
        assert zf.namelist() == ["000000.jpeg", "000001.jpeg", "000002.jpeg"]
        assert Image.open(io.BytesIO(zf.read("000001.jpeg"))).size == (W, H)
    headers = {"Authorization": f"Token {cvat.admin_token}"}
    bad = requests.get(f"{cvat.url}/api/tasks/{task_id}/data", params={"type": "chunk", "number": 1},
                       headers=headers, timeout=30)
    assert (bad.status_code, bad.json()) == (400, "Invalid chunk number '1'. The chunk number should be in the "
                                                  "[0, 0] range")
    none = requests.get(f"{cvat.url}/api/tasks/{task_id}/data", params={"type": "chunk"}, headers=headers, timeout=30)
    assert (none.status_code, none.json()) == (400, ["Number is not specified"])
    login = requests.post(f"{cvat.url}/api/auth/login", json={"username": "admin", "password": "admin"}, timeout=30)
    assert {"csrftoken", "sessionid", "sessionfresh"} <= set(login.cookies.keys())
    assert login.json() == {"key": cvat.admin_token}
