"""The correction loop, simulated: an annotator corrects batches of frames in CVAT, and the model retrains after each.

This is the product's loop run end to end with a simulated expert, against a CVAT server (the tests' stand-in,
or a real one) and the real commands:

1. the **function** (:class:`serverless.model_handler.ModelHandler`, serving the registry's ``current``
   symlink) pre-annotates every held-back frame; :func:`trainer.correction_effort.count_edits` counts the
   edits the expert would make on each (the curve point for "frames corrected so far");
2. the next ``batch`` frames of the pool task are chosen, either in a seeded **random** order or **ranked**
   by the function's uncertainty (:func:`cvat_sync.rank.rank_task`), and put in a new CVAT task (the same
   ``--create-task`` path ``python -m cvat_sync rank`` uses);
3. the **annotator** opens them: the function's pre-annotation is compared with the truth (the edits spent
   on the batch), then the corrected frames are saved as the task's annotations over the REST API and its
   jobs are marked completed, as the expert does in CVAT. What is saved is what CVAT would hold: the cells
   the expert left as they were keep the function's outline, redrawn and drawn cells the true one
   (``ideal_expert``: the true outline of every cell, as if the expert redrew even what they accept);
4. one **retrain cycle** runs as a subprocess, exactly as cron runs it (``python -m trainer retrain``: pull the
   batch tasks, split, fine-tune from ``current``, gate, promote);
5. the function **hot-reloads** the promoted bundle, and the next cycle starts.

With no start bundle the first frames are drawn from scratch (there is nothing to pre-annotate with) and the
first retrain trains from the config's weights.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from trainer.correction_effort import (
    EditRules,
    FrameEdits,
    correct_frame,
    count_edits,
    instances_from_cvat_results,
    total,
)
from wbc_core.data.masks import cvat_mask_points
from wbc_core.data.types import AnnotatedDataset, ImageRecord
from wbc_core.split import VAL_FRACTION

log = logging.getLogger(__name__)

ORDERS = ("random", "ranked")
WBC_LABEL = "wbc"


@dataclass
class SimulationConfig:
    order: str = "random"                  # random | ranked
    seed: int = 0
    batch: int = 10                         # frames corrected per cycle
    cycles: int = 3                         # retrain cycles (frames corrected = batch x cycles)
    minutes: float = 3.0                    # fine-tuning budget of each retrain (segmenter.max_minutes)
    min_steps: int | None = None            # segmenter.min_steps of each retrain (None: the retrain default)
    # segmenter.steps of each retrain: exactly this many (None: ``minutes`` decides). Each retrain trains with
    # the run's seed, so a run repeats and the seeds of one order differ in training draws too
    steps: int | None = None
    # segmenter.ignore_unedited_outlines of each retrain (None: the retrain default)
    ignore_unedited_outlines: bool | None = None
    start: str | None = None                # bundle served before the first correction (None: no model)
    rules: EditRules = field(default_factory=lambda: EditRules(check_labels=False))
    weights: dict[str, float] | None = None  # ranking weights (None: wbc_core.uncertainty.DEFAULT_WEIGHTS)
    density_power: float | None = None      # ranking's typicality power (None: wbc_core.typicality.DENSITY_POWER)
    mirror: bool = True
    val_fraction: float = VAL_FRACTION
    retrain_timeout_s: float = 3600.0
    segmenter_config: str | None = None     # trainer config YAML for the retrain (default: the packaged CPU one)
    gate: dict[str, Any] | None = None      # the retrain's gate section (default: the retrain defaults)
    ideal_expert: bool = False              # save every cell's true outline, even those the expert accepted

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"order {self.order!r}: one of {', '.join(ORDERS)}")
        if self.batch < 1 or self.cycles < 0 or self.minutes <= 0:
            raise ValueError("batch >= 1, cycles >= 0 and minutes > 0 are needed")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1 (or None: minutes decides), not {self.steps}")


def encode_request(path: Path) -> dict[str, Any]:
    """The body CVAT sends the function for one frame."""
    return {"image": base64.b64encode(path.read_bytes()).decode("ascii")}


class Annotator:
    """The simulated expert: knows each frame's true cells and counts what correcting a pre-annotation costs."""

    def __init__(self, truth: AnnotatedDataset, rules: EditRules, ideal: bool = False) -> None:
        self.records = {r.name: r for r in truth.images}
        self.rules = rules
        self.ideal = ideal

    def edits(self, record: ImageRecord, results: list[dict[str, Any]] | None) -> FrameEdits:
        """Edits to turn the function's ``results`` (None: no model, nothing shown) into the truth of ``record``."""
        predicted = instances_from_cvat_results(results) if results else []
        return count_edits(predicted, record.instances, record.height, record.width, self.rules)

    def shapes(self, name: str, label_id: int, results: list[dict[str, Any]] | None = None
               ) -> list[dict[str, Any]]:
        """The CVAT API shapes (masks) of the frame once the expert has corrected the function's ``results``
        (None: nothing was shown); see :meth:`correct`."""
        return self.correct(self.records[name], results, label_id)[1]

    def correct(self, record: ImageRecord, results: list[dict[str, Any]] | None, label_id: int
                ) -> tuple[FrameEdits, list[dict[str, Any]]]:
        """One pass over the frame (:func:`trainer.correction_effort.correct_frame`): the edits, and the CVAT API
        shapes (masks, ``label_id``) it saves: the cells the expert left keep the function's outline, the rest
        have the true one. With ``ideal``, every cell is saved with its true outline (an upper bound: the expert
        redraws even the outlines they accept)."""
        predicted = instances_from_cvat_results(results) if results else []
        edits, cells = correct_frame(predicted, record.instances, record.height, record.width, self.rules)
        if self.ideal or not results:
            cells = [c for c in record.instances if c.has_outline]
        shapes = []
        for cell in cells:
            points = cvat_mask_points(cell.to_mask(record.height, record.width))
            if points is not None:
                shapes.append({"type": "mask", "label_id": label_id, "points": points, "source": cell.source})
        return edits, shapes


def function_results(handler: Any, record: ImageRecord) -> list[dict[str, Any]] | None:
    """What the function returns CVAT for the frame (its JSON results), or None with no model served."""
    if handler is None:
        return None
    text, _ = handler.infer(encode_request(record.path))
    return json.loads(text)


def held_back_edits(handler: Any, annotator: Annotator, held: AnnotatedDataset) -> dict[str, Any]:
    frames = [annotator.edits(r, function_results(handler, r)) for r in held.images]
    return summarise(frames)


def summarise(frames: list[FrameEdits]) -> dict[str, Any]:
    n = max(1, len(frames))
    tot = total(frames)
    return {"frames": len(frames), "edits_per_frame": tot.edits / n, "scratch_edits_per_frame": tot.scratch_edits / n,
            "ratio_to_scratch": tot.edits / tot.scratch_edits if tot.scratch_edits else None,
            "accepted_per_frame": tot.accepted / n, "totals": tot.to_dict()}


class Simulation:
    """One run of the loop (one order, one seed) on a pool task; see the module doc."""

    def __init__(self, cfg: SimulationConfig, client: Any, pool_task: int, truth: AnnotatedDataset,
                 held: AnnotatedDataset, work: Path, env: dict[str, str], progress: bool = False) -> None:
        from trainer.registry import Registry

        self.cfg, self.client, self.pool_task = cfg, client, pool_task
        self.annotator = Annotator(truth, cfg.rules, ideal=cfg.ideal_expert)
        self.held = held
        self.work = Path(work).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.progress = progress
        self.registry = Registry(self.work / "registry")
        if cfg.start and self.registry.current() is None:
            version = self.registry.add(cfg.start, {"note": "the bundle served before the first correction"})
            self.registry.promote(version, reason="simulation start")
        self.handler: Any = None
        self.rng = np.random.default_rng(cfg.seed)
        self.random_order = [truth.images[i].name for i in self.rng.permutation(len(truth.images))]
        self.batch_tasks: list[int] = []
        self.corrected: list[str] = []

    # the function
    def reload(self) -> None:
        from serverless.model_handler import ModelHandler

        if self.registry.current() is None:
            return
        if self.handler is None:
            self.handler = ModelHandler(self.registry.current_path, reload_seconds=-1)
        else:
            self.handler.maybe_reload(force=True)

    # choosing the next frames
    def choose(self, k: int) -> dict[str, Any]:
        from cvat_sync.rank import RankOptions, rank_task

        out = self.work / "rank"
        if self.cfg.order == "ranked" and self.handler is not None:
            options = RankOptions(out=out, create_task=k, mirror=self.cfg.mirror, progress=self.progress,
                                  task_name=f"batch {len(self.batch_tasks) + 1} (ranked)",
                                  val_fraction=self.cfg.val_fraction,
                                  **({"weights": self.cfg.weights} if self.cfg.weights else {}),
                                  **({} if self.cfg.density_power is None else
                                     {"density_power": self.cfg.density_power}))
            record = rank_task(self.client, self.pool_task, self.handler.predictor, options)
            created = record["created_task"]
            created["ranking_seconds"] = record["seconds"]
            return created
        return self.queue_random(k, out)

    def queue_random(self, k: int, out: Path) -> dict[str, Any]:
        from cvat_sync.rank import RankedFrame, RankOptions, add_queued, create_task_from_frames, label_list
        from wbc_core.uncertainty import FrameUncertainty

        meta = self.client.get_json(f"/api/tasks/{self.pool_task}/data/meta")
        number = {f["name"]: i for i, f in enumerate(meta["frames"])}
        names = [n for n in self.random_order if n not in self.corrected][:k]
        task = self.client.get_json(f"/api/tasks/{self.pool_task}")
        labels = list(self.client.paginate("/api/labels", {"task_id": self.pool_task}))
        frames = [RankedFrame(number[n], n, 0.0, FrameUncertainty()) for n in names]
        options = RankOptions(out=out, task_name=f"batch {len(self.batch_tasks) + 1} (random)")
        created = create_task_from_frames(self.client, task, label_list(labels), frames, options)
        add_queued(out, self.pool_task, created)
        return created

    # the expert
    def correct(self, created: dict[str, Any]) -> list[FrameEdits]:
        tid = created["id"]
        labels = {lab["name"]: lab["id"] for lab in self.client.paginate("/api/labels", {"task_id": tid})}
        if WBC_LABEL not in labels:
            raise ValueError(f"task {tid} has no {WBC_LABEL!r} label to save the corrected cells with")
        meta = self.client.get_json(f"/api/tasks/{tid}/data/meta")
        edits, shapes = [], []
        for frame, info in enumerate(meta["frames"]):
            name = info["name"]
            record = self.annotator.records[name]
            results = function_results(self.handler, record)
            frame_edits, frame_shapes = self.annotator.correct(record, results, labels[WBC_LABEL])
            edits.append(frame_edits)
            shapes += [{**s, "frame": frame} for s in frame_shapes]
            self.corrected.append(name)
        # PUT (replace) rather than PATCH action=create: the expert's final frames, and safe to repeat on a retry
        self.client.request("PUT", f"/api/tasks/{tid}/annotations",
                            json={"version": 0, "tags": [], "shapes": shapes, "tracks": []})
        for job in self.client.paginate("/api/jobs", {"task_id": tid}):
            self.client.request("PATCH", f"/api/jobs/{job['id']}", json={"state": "completed"})
        self.batch_tasks.append(tid)
        return edits

    # one retrain cycle, as cron runs it
    def retrain(self) -> dict[str, Any]:
        labels = self.work / "labels.yaml"
        labels.write_text(yaml.safe_dump({"classes": [WBC_LABEL]}))
        config = self.work / "retrain.yaml"
        config.write_text(yaml.safe_dump({
            "cvat": {"tasks": list(self.batch_tasks), "out": "pulled", "jobs": "completed"},
            "labels": "labels.yaml", "registry": "registry", "work_dir": "cycles", "keep_last": 3,
            "split": {"val_fraction": self.cfg.val_fraction},
            "segmenter": {"max_minutes": self.cfg.minutes, "first": "scratch", "seed": self.cfg.seed,
                          **({"steps": self.cfg.steps} if self.cfg.steps is not None else {}),
                          **({"min_steps": self.cfg.min_steps} if self.cfg.min_steps is not None else {}),
                          **({"ignore_unedited_outlines": self.cfg.ignore_unedited_outlines}
                             if self.cfg.ignore_unedited_outlines is not None else {}),
                          **({"config": str(Path(self.cfg.segmenter_config).resolve())}
                             if self.cfg.segmenter_config else {})},
            "classifier": {"steps": 0}, **({"gate": self.cfg.gate} if self.cfg.gate else {})}))
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "trainer", "retrain", "--config", str(config), "--no-progress"],
                              cwd=self.work, env=self.env, capture_output=True, text=True,
                              timeout=self.cfg.retrain_timeout_s)
        seconds = time.perf_counter() - t0
        with (self.work / "retrain.log").open("a") as fh:
            fh.write(done.stdout + done.stderr)
        if done.returncode == 2 and "validation frames" in done.stderr:
            # the real command refuses to gate without validation frames: the lab corrects more, then retrains
            log.warning("retrain skipped: none of the corrected frames fell on the validation side yet")
            return {"exit_code": 2, "decision": "skipped: no validation frames yet", "version": None,
                    "seconds": round(seconds, 1)}
        if done.returncode not in (0, 10):
            raise RuntimeError(f"trainer retrain failed (exit {done.returncode}); log in {self.work / 'retrain.log'}:"
                               f"\n{done.stderr[-2000:]}")
        report_path = sorted((self.work / "cycles").glob("cycle-*/report.json"))[-1]
        report = json.loads(report_path.read_text())
        losses = report_path.parent / "segmenter" / "losses.csv"
        return {"exit_code": done.returncode, "decision": report.get("decision"), "version": report.get("version"),
                "seconds": round(seconds, 1), "steps_s": report.get("steps_s"),
                "train_steps": len(losses.read_text().splitlines()) - 1 if losses.is_file() else None,
                "val_frames": report.get("data", {}).get("val_frames"),
                "train_frames": report.get("data", {}).get("train_frames")}

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        points, cycles, spent = [], [], []
        self.reload()
        for cycle in range(cfg.cycles + 1):
            t0 = time.perf_counter()
            point = {"corrected": len(self.corrected), "version": self.registry.current(),
                     **held_back_edits(self.handler, self.annotator, self.held)}
            points.append(point)
            log.info("%s seed %d, %d frames corrected (%s): %.3f edits/frame on %d held-back frames (scratch %.3f)",
                     cfg.order, cfg.seed, point["corrected"], point["version"] or "no model", point["edits_per_frame"],
                     point["frames"], point["scratch_edits_per_frame"])
            if cycle == cfg.cycles:
                break
            t1 = time.perf_counter()
            created = self.choose(cfg.batch)
            choose_s = time.perf_counter() - t1
            batch = self.correct(created)
            spent.append(summarise(batch) | {"frames_names": created["frames"]})
            retrain = self.retrain()
            self.reload()
            cycles.append({"cycle": cycle + 1, "task": created["id"], "choose_seconds": round(choose_s, 1),
                           "retrain": retrain, "cycle_seconds": round(time.perf_counter() - t0, 1)})
        return {"config": {**asdict(cfg), "rules": asdict(cfg.rules)}, "curve": points, "batches": spent,
                "cycles": cycles, "batch_edits": [b["totals"]["edits"] for b in spent]}


def child_env(url: str, token: str) -> dict[str, str]:
    """The environment the retrain subprocess gets: the CVAT server and token (never on a command line)."""
    repo = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "CVAT_URL": url, "CVAT_TOKEN": token,
            "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
