"""Issue 6 end to end, with real processes: a CVAT stand-in on 127.0.0.1, ``python -m trainer retrain`` run as a
subprocess (as cron would), the registry, and the CVAT function (real nuclio-sdk events) serving from
``registry/current`` with hot reload.

cycle 1: task A -> v1 promoted; the function serves v1.
cycle 2: task B added in CVAT -> v2 fine-tuned from v1, promoted by the gate; the function serves v2, no restart.
cycle 3: nothing changed in CVAT -> exit 11, nothing trained.
cycle 4: every label in CVAT moved off its cell (corrupted) -> the candidate is refused on the frozen test set,
         ``current`` stays v2 and the function keeps serving v2.
A cycle whose segmenter config is broken fails with ``current`` untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cvat_standin import StandinCVAT, dataset_shapes, label_ids, task_from_dataset
from trainer.registry import Registry
from trainer.retrain import NOTHING_NEW, PROMOTED, REFUSED, frame_key, load_retrain_config
from trainer.synthetic import generate_task
from wbc_core.data.loader import load_dataset
from wbc_core.labels import RVPBS_LABELS
from wbc_core.split import split_side

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

TINY_SEGMENTER = {
    "model": {"max_size": 320, "min_size": 240, "mask_resolution": 14, "fpn_channels": 64},
    "train": {"epochs": 12, "batch_size": 2, "lr": 2.0e-3, "warmup_steps": 5, "checkpoint_every": 50,
              "num_workers": 0, "threads": 2, "device": "cpu"},
    "augment": {"blur_p": 0.0},
}


def _write_config(root: Path, tasks: list[int], epochs: int) -> Path:
    seg = dict(TINY_SEGMENTER, train={**TINY_SEGMENTER["train"], "epochs": epochs})
    (root / "segmenter.yaml").write_text(yaml.safe_dump(seg))
    # one class (any WBC): the tiny model learns where cells are within the test's budget, so its scores are
    # steady enough for the gate to tell a good cycle from a corrupted one
    (root / "labels.yaml").write_text(yaml.safe_dump({"classes": ["wbc"], "aliases": {n: "wbc" for n in RVPBS_LABELS}}))
    cfg = {"cvat": {"tasks": tasks, "out": "pulled"}, "registry": "registry", "work_dir": "cycles",
           "keep_last": 3, "labels": "labels.yaml",
           "split": {"val_fraction": 0.25, "frozen_test": ["frozen"]},
           # from the tiny config's random weights (the starter's own path: tests/test_retrain_starter.py)
           # the tiny config's epochs alone decide (min_steps 0): the retrain default of 400 steps is for real pools
           "segmenter": {"config": "segmenter.yaml", "max_minutes": None, "first": "scratch", "min_steps": 0},
           # the tiny model's scores move by a few points between fine-tunes; corrupted labels wipe them out
           "gate": {"max_drop": {"mask_ap_any": 0.15}, "min": {"mask_ap_any": 0.1}}}
    path = root / "retrain.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _retrain(config: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", "retrain", "--config", str(config), "--no-progress",
                           *extra], cwd=config.parent, env=env, capture_output=True, text=True, timeout=900)


def _serve(context: Any, image: bytes) -> Any:
    from serverless import main as function
    from serverless.__main__ import build_event, request_body

    return function.handler(context, build_event(request_body(image, 0.05)))


def test_split_is_a_stable_function_of_frame_content(tmp_path: Path) -> None:
    generate_task(tmp_path / "t", n_images=6, width=320, height=240, seed=5)
    data = load_dataset(tmp_path / "t")
    sides = {r.name: split_side(frame_key(r), "s", 0.5) for r in data.images}
    renamed = tmp_path / "t" / "images" / "renamed.jpg"
    first = sorted(data.images, key=lambda r: r.name)[0]
    renamed.write_bytes(Path(first.path).read_bytes())
    first.path = renamed
    assert split_side(frame_key(first), "s", 0.5) == sides[first.name]  # content, not name, decides
    assert set(sides.values()) <= {"train", "val"}


def test_config_errors_say_what_to_fix(tmp_path: Path) -> None:
    bad = tmp_path / "r.yaml"
    bad.write_text("registry: r\n")
    with pytest.raises(ValueError, match="nothing to train on"):
        load_retrain_config(bad)
    bad.write_text("data: [x]\nsplit: {val_fraction: 1.5}\n")
    with pytest.raises(ValueError, match="val_fraction"):
        load_retrain_config(bad)
    bad.write_text("data: [x]\nsegmentr: {}\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_retrain_config(bad)


def test_retrain_cycles_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "site"
    root.mkdir()
    generate_task(tmp_path / "A", n_images=16, width=640, height=480, seed=11)
    generate_task(tmp_path / "B", n_images=12, width=640, height=480, seed=13)
    generate_task(root / "frozen", n_images=6, width=640, height=480, seed=12)
    registry = Registry(root / "registry")
    with StandinCVAT(seed=1) as cvat:
        env = {**os.environ, "CVAT_URL": cvat.url, "CVAT_TOKEN": cvat.admin_token or "",
               "PYTHONPATH": str(REPO), "WBC_NUM_THREADS": "2"}
        env.pop("CVAT_ACCESS_TOKEN", None)
        task_a = task_from_dataset(cvat, tmp_path / "A", "A", segment_size=8)

        # cycle 1: from scratch on task A -> v1
        config = _write_config(root, [task_a], epochs=12)
        done = _retrain(config, env)
        assert done.returncode == PROMOTED, done.stderr[-3000:]
        assert registry.current() == "v0001"
        report = json.loads(next((root / "cycles").glob("cycle-*/report.json")).read_text())
        assert report["decision"] == "promoted" and report["data"]["frames_added_since_current"] == 16
        assert set(report["steps_s"]) >= {"pull", "split", "train_segmenter", "evaluate", "promote", "total"}

        # the function serves v1 from registry/current
        monkeypatch.setenv("WBC_BUNDLE_DIR", str(registry.current_path))
        monkeypatch.setenv("WBC_RELOAD_SECONDS", "0")
        from serverless import main as function
        from serverless.__main__ import make_context
        from wbc_core.bundle import load_bundle

        # deployed as deploy.sh does: the function's spec written from the served bundle (a 'wbc' segmenter)
        served_spec = load_bundle(registry.current_path).contract.spec()
        monkeypatch.setattr(function, "read_spec", lambda path=None: served_spec)
        context = make_context()
        function.init_context(context)
        slide = (root / "frozen" / "images").glob("*.jpg").__next__().read_bytes()
        assert _serve(context, slide).status_code == 200
        assert Path(context.user_data.model.bundle_path).name == "v0001"

        # cycle 2: task B added and corrected in CVAT -> v2 fine-tuned from v1
        task_b = task_from_dataset(cvat, tmp_path / "B", "B", segment_size=8)
        config = _write_config(root, [task_a, task_b], epochs=4)
        done = _retrain(config, env)
        assert done.returncode == PROMOTED, done.stdout[-2000:] + done.stderr[-3000:]
        assert registry.current() == "v0002"
        v2 = registry.show("v0002")
        assert v2["data"]["frames_added"] == 12 and v2["compared_with"] == "v0001"
        response = _serve(context, slide)  # the same worker, no re-init: now v2
        assert response.status_code == 200
        assert Path(context.user_data.model.bundle_path).name == "v0002"

        # cycle 3: nothing changed -> nothing trained
        done = _retrain(config, env)
        assert done.returncode == NOTHING_NEW, done.stderr[-2000:]
        assert registry.versions() == ["v0001", "v0002"]

        # a broken step (a segmenter config that does not exist) fails and leaves current alone
        broken = yaml.safe_load(config.read_text())
        broken["segmenter"]["config"] = "missing.yaml"
        (root / "broken.yaml").write_text(yaml.safe_dump(broken))
        done = _retrain(root / "broken.yaml", env, "--force")  # --force: train although nothing changed
        assert done.returncode not in (PROMOTED, REFUSED, NOTHING_NEW), done.stderr[-2000:]
        assert "missing.yaml" in done.stderr
        assert registry.current() == "v0002"

        # cycle 4: someone moved every outline off its cell -> refused on the frozen test set
        for tid, folder in ((task_a, "A"), (task_b, "B")):
            cvat.set_annotations(tid, dataset_shapes(tmp_path / folder, label_ids(cvat, tid), shift=0.5))
        done = _retrain(config, env)
        assert done.returncode == REFUSED, done.stdout[-2000:] + done.stderr[-3000:]
        assert registry.current() == "v0002"
        assert "v0003" in registry.versions()  # kept for inspection, never served
        assert any(e["kind"] == "refused" and e["version"] == "v0003" for e in registry.history())
        assert _serve(context, slide).status_code == 200
        assert Path(context.user_data.model.bundle_path).name == "v0002"
        last = sorted((root / "cycles").glob("cycle-*/report.md"))[-1].read_text()
        assert "REFUSED" in last
        assert (sorted((root / "cycles").glob("cycle-*"))[-1] / "metrics_by_version.png").is_file()
    assert isinstance(json.loads(response.body), list)  # what CVAT gets
