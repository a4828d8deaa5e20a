"""The simulated correction loop (issue 14), end to end on tiny data: the function pre-annotates, the simulated
expert corrects a batch in a new CVAT task (stand-in, real HTTP), ``python -m trainer retrain`` runs as a
subprocess, the function hot-reloads what was promoted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cvat_sync.client import CvatClient
from cvat_sync.config import Secret, Settings
from tests.cvat_standin import StandinCVAT
from tests.test_retrain import TINY_SEGMENTER
from tests.tiny_models import blob_segmenter
from trainer.correction_effort import EditRules
from trainer.correction_sim import WBC_LABEL, Annotator, Simulation, SimulationConfig, child_env
from trainer.synthetic import generate_task
from wbc_core.bundle import write_bundle
from wbc_core.data.masks import cvat_rle_decode, mask_to_polygon
from wbc_core.data.types import AnnotatedDataset
from wbc_core.split import validation_slots


def _data(folder: Path, n: int, seed: int) -> AnnotatedDataset:
    data = generate_task(folder, n_images=n, width=320, height=240, seed=seed)
    for record in data.images:           # class-agnostic truth, as the benchmark uses
        for cell in record.instances:
            cell.label = WBC_LABEL
        record.path = folder / "images" / record.name
    return data


def _simulation(tmp_path: Path, order: str, start: Path | None, pool: AnnotatedDataset, held: AnnotatedDataset,
                steps: int | None = None) -> tuple[StandinCVAT, Simulation]:
    seg = tmp_path / f"segmenter-{order}.yaml"
    seg.write_text(yaml.safe_dump({**TINY_SEGMENTER, "train": {**TINY_SEGMENTER["train"], "epochs": 2}}))
    cfg = SimulationConfig(order=order, seed=3, batch=4, cycles=1, minutes=0.2, min_steps=0, steps=steps,
                           start=str(start) if start else None,
                           segmenter_config=str(seg), val_fraction=0.5,
                           gate={"max_drop": {"mask_ap_any": 1.0}, "min": {"mask_ap_any": 0.0}})
    cvat = StandinCVAT(seed=3).start()
    client = CvatClient(Settings(url=cvat.url, token=Secret(cvat.admin_token)))
    created = client.create_task("pool", [{"name": WBC_LABEL, "type": "any"}])
    client.upload_task_images(created["id"], [(r.name, r.path.read_bytes()) for r in pool.images])
    env = {**child_env(cvat.url, cvat.admin_token), "WBC_NUM_THREADS": "2"}
    env.pop("CVAT_ACCESS_TOKEN", None)
    return cvat, Simulation(cfg, client, created["id"], pool, held, tmp_path / order, env)


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[AnnotatedDataset, AnnotatedDataset]:
    root = tmp_path_factory.mktemp("sim")
    return _data(root / "pool", 8, 21), _data(root / "held", 3, 22)


def test_from_no_model_every_cell_is_drawn_then_a_retrain_serves_a_model(
        tmp_path: Path, sets: tuple[AnnotatedDataset, AnnotatedDataset]) -> None:
    pool, held = sets
    cvat, sim = _simulation(tmp_path, "random", None, pool, held, steps=3)
    try:
        result = sim.run()
        first, after = result["curve"]
        assert first["corrected"] == 0 and first["version"] is None
        assert first["edits_per_frame"] == first["scratch_edits_per_frame"] > 0  # nothing shown: all drawn
        assert after["corrected"] == 4
        (cycle,) = result["cycles"]
        assert cycle["retrain"]["decision"] in ("promoted", "refused", "skipped: no validation frames yet")
        # the corrected batch is a CVAT task with the true cells as masks, its jobs completed
        task = cvat.task(cycle["task"])
        assert [f.name for f in task.frames] == result["batches"][0]["frames_names"]
        truth = {r.name: r for r in pool.images}
        assert len(task.shapes) == sum(len(truth[f.name].instances) for f in task.frames)
        assert all(cvat.job(j).state == "completed" for j in task.jobs)
        assert result["batch_edits"] == [sum(len(truth[f.name].instances) for f in task.frames)]
        if cycle["retrain"]["decision"] != "skipped: no validation frames yet":
            # the retrain trained exactly the 3 steps asked for, with the run's seed, and the cycle says so
            segmenter = yaml.safe_load((tmp_path / "random" / "retrain.yaml").read_text())["segmenter"]
            assert (segmenter["steps"], segmenter["seed"], segmenter["min_steps"]) == (3, 3, 0)
            assert cycle["retrain"]["train_steps"] == 3
        if cycle["retrain"]["decision"] == "promoted":
            assert after["version"] == sim.registry.current() == "v0001"
            assert sim.handler is not None and sim.handler.bundle_path.name == "v0001"  # served after the reload
    finally:
        cvat.stop()


def test_ranked_order_queues_what_rank_chose(tmp_path: Path,
                                             sets: tuple[AnnotatedDataset, AnnotatedDataset]) -> None:
    torch.set_num_threads(1)
    cfg, model = blob_segmenter(1, seed=4)
    start = write_bundle(tmp_path / "start", model, [WBC_LABEL], cfg, 0.02)
    pool, held = sets
    cvat, sim = _simulation(tmp_path, "ranked", start, pool, held)
    try:
        sim.reload()  # the start bundle is v0001 of the registry, and the function serves it
        assert sim.registry.current() == "v0001" and sim.handler is not None
        created = sim.choose(4)
        ranking = json.loads((sim.work / "rank" / "ranking.json").read_text())
        order = [r["name"] for r in ranking["ranking"]]
        side = {r["name"]: r["split"] for r in ranking["ranking"]}
        assert "val" in side.values() and "train" in side.values()  # (the pool holds both)
        # the top training-side frames and the retrain's share from the validation side (it needs one to gate),
        # in ranking order: the task the expert opens
        n_val = validation_slots(4, sim.cfg.val_fraction)
        assert created["frames"] == sorted(created["frames"], key=order.index)
        train_side = [n for n in order if side[n] == "train"]
        assert [n for n in created["frames"] if side[n] == "train"] == train_side[:4 - n_val]
        assert sum(side[n] == "val" for n in created["frames"]) == n_val == created["validation_frames"] >= 1
        assert created["frames"] == [f.name for f in cvat.task(created["id"]).frames]
        edits = sim.correct(created)
        assert len(edits) == 4 and sim.corrected == created["frames"] and sim.batch_tasks == [created["id"]]
        again = sim.choose(4)  # the next batch skips the frames already queued
        assert not set(again["frames"]) & set(created["frames"])
    finally:
        cvat.stop()


def test_the_annotator_saves_exactly_the_true_outlines(sets: tuple[AnnotatedDataset, AnnotatedDataset]) -> None:
    pool, _ = sets
    annotator = Annotator(pool, EditRules(check_labels=False))
    record = pool.images[0]
    shapes = annotator.shapes(record.name, label_id=7)
    assert len(shapes) == len(record.instances) and all(s["label_id"] == 7 for s in shapes)
    for shape, cell in zip(shapes, record.instances, strict=True):
        *rle, left, top, right, bottom = shape["points"]
        crop = cvat_rle_decode(rle, right - left + 1, bottom - top + 1)
        full = np.zeros((record.height, record.width), bool)
        full[top:bottom + 1, left:right + 1] = crop
        assert np.array_equal(full, cell.to_mask(record.height, record.width))
    perfect = annotator.edits(record, None)
    assert perfect.drawn == len(record.instances) and perfect.accepted == 0


def _decoded(shape: dict, height: int, width: int) -> np.ndarray:
    *rle, left, top, right, bottom = shape["points"]
    full = np.zeros((height, width), bool)
    full[top:bottom + 1, left:right + 1] = cvat_rle_decode(rle, right - left + 1, bottom - top + 1)
    return full


def test_the_annotator_saves_what_cvat_holds_after_its_corrections(
        sets: tuple[AnnotatedDataset, AnnotatedDataset]) -> None:
    """A shown cell the expert accepts is saved with the function's outline (CVAT keeps it as it came); a false
    cell is not saved; with ``ideal`` every cell is saved with its true outline."""
    from wbc_core.cvat_json import detection_to_cvat_results
    from wbc_core.detect import Cell, Detection

    pool, _ = sets
    record = next(r for r in pool.images if r.instances)
    true = record.instances[0].to_mask(record.height, record.width)
    shown = np.roll(true, 1, axis=1)                       # one pixel off: accepted as shown
    false = np.zeros_like(true)
    false[:12, :12] = True                                 # a cell where there is none
    cells = []
    for mask in (shown, false):
        ys, xs = np.nonzero(mask)
        cells.append(Cell(label=WBC_LABEL, score=0.95, box=(float(xs.min()), float(ys.min()), float(xs.max() + 1),
                                                             float(ys.max() + 1)),
                          mask_crop=mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1],
                          origin=(int(xs.min()), int(ys.min())), attributes={}))
        cells[-1].points = mask_to_polygon(cells[-1].mask_crop, offset=cells[-1].origin)
    results = detection_to_cvat_results(Detection(cells=cells, width=record.width, height=record.height,
                                                  threshold=0.5, max_cells=100))
    rules = EditRules(check_labels=False)
    saved = Annotator(pool, rules).shapes(record.name, 7, results)
    assert len(saved) == len(record.instances)
    assert np.array_equal(_decoded(saved[0], record.height, record.width), shown) and saved[0]["source"] == "auto"
    for shape, cell in zip(saved[1:], record.instances[1:], strict=True):   # not shown: drawn by the expert
        assert np.array_equal(_decoded(shape, record.height, record.width), cell.to_mask(record.height, record.width))
    ideal = Annotator(pool, rules, ideal=True).shapes(record.name, 7, results)
    assert np.array_equal(_decoded(ideal[0], record.height, record.width), true)


def test_a_retrain_without_validation_frames_is_skipped_and_any_other_failure_stops_the_run(
        tmp_path: Path, sets: tuple[AnnotatedDataset, AnnotatedDataset], monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    pool, held = sets
    sim = Simulation(SimulationConfig(), client=None, pool_task=1, truth=pool, held=held, work=tmp_path, env={})
    answers = iter([(2, "ERROR trainer: only 0 validation frames (gate.min_val_frames = 1); pull more"),
                    (1, "ERROR trainer: cannot reach CVAT")])

    def fake_run(*args: object, **kwargs: object) -> subprocess.CompletedProcess:
        code, err = next(answers)
        return subprocess.CompletedProcess(args, code, stdout="", stderr=err)

    monkeypatch.setattr(subprocess, "run", fake_run)
    skipped = sim.retrain()
    assert skipped["exit_code"] == 2 and skipped["decision"].startswith("skipped") and skipped["version"] is None
    with pytest.raises(RuntimeError, match=r"exit 1(.|\n)*cannot reach CVAT"):
        sim.retrain()
    assert "validation frames" in (tmp_path / "retrain.log").read_text()  # what the command said is kept


def test_a_step_count_under_one_is_refused() -> None:
    with pytest.raises(ValueError, match="steps must be >= 1"):
        SimulationConfig(steps=0)
