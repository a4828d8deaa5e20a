"""One retraining cycle: pull -> split -> fine-tune -> evaluate -> gate -> promote -> report.

``python -m trainer retrain --config retrain.yaml`` (a scheduler runs it nightly; see the README):

1. **pull** the configured CVAT tasks/projects with :mod:`cvat_sync` (incremental: unchanged tasks cost a
   couple of requests and no image bytes), plus any local datasets listed under ``data``;
2. **split** every frame into train or validation by a hash of its *content* (sha256 of the image file)
   and a salt, so a frame keeps its side across cycles, tasks and renames, and validation frames never
   leak into training; frames of the optional ``frozen_test`` datasets are never trained on;
3. **fine-tune** the segmenter from the current bundle (when the registry is empty: from the shipped starter
   bundle ``models/starter``, or as ``segmenter.first`` says), keeping that bundle's architecture and input
   scale, and carry its crop classifier over, fine-tuned on the new labelled crops when ``classifier.steps`` > 0;
4. **evaluate** the candidate and the current bundle on the same validation (and frozen test) frames;
5. **gate**: promote only when no gated metric drops by more than its allowance plus ``gate.noise_z`` x the
   drop's standard error over the validation frames (:mod:`trainer.gate_noise`; and, for the first
   version, clears ``gate.min``); outlines are judged on the cells the expert touched (cells CVAT still holds
   as the function drew them carry that model's own outline: ``gate.ignore_unedited``); the registry's
   ``current`` pointer is switched atomically;
6. **report** (``report.json`` + ``report.md`` + ``metrics_by_version.png`` in the cycle folder), prune the
   registry to ``keep_last`` versions, and exit with a code a scheduler can act on (:data:`EXIT_CODES`).

A crash at any step leaves ``current`` untouched; the next run cleans up and starts over. One cycle
runs at a time (a lock in the registry folder).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from wbc_core.config_io import check_known, dataclass_from_dict, read_yaml_mapping
from wbc_core.data.types import UNEDITED_SOURCE, AnnotatedDataset, DatasetError, ImageRecord
from wbc_core.split import SALT, VAL_FRACTION, split_side

log = logging.getLogger(__name__)

PROMOTED, REFUSED, NOTHING_NEW, BUSY, FAILED = 0, 10, 11, 75, 1
EXIT_CODES = {
    PROMOTED: "the candidate passed the gate and is now current",
    REFUSED: "a candidate was trained and evaluated, but the gate refused it; current is unchanged",
    NOTHING_NEW: "no frame was added or changed since the current version; nothing trained",
    BUSY: "another retrain holds the lock; try again later",
    FAILED: "a step failed (message in the log); current is unchanged",
    2: "bad configuration or command line; cvat_sync's codes 3-6 are passed through from the pull step",
}


# --- configuration -------------------------------------------------------------------------------

@dataclass
class CvatConfig:
    tasks: list[int] = field(default_factory=list)
    projects: list[int] = field(default_factory=list)
    jobs: str = "completed"                 # completed | accepted | all (as cvat_sync pull --jobs)
    via: str = "api"                        # api | export
    config: str | None = None               # cvat_sync config file (0600); else env CVAT_URL, CVAT_ACCESS_TOKEN...
    out: str = "data/cvat"                  # where pulled tasks are kept between cycles


@dataclass
class SplitConfig:
    val_fraction: float = VAL_FRACTION      # cvat_sync rank --val-fraction must match (wbc_core.split)
    salt: str = SALT                        # changing it reshuffles every frame: do it never, or on purpose
    frozen_test: list[str] = field(default_factory=list)   # datasets only ever evaluated on


@dataclass
class SegmenterStep:
    config: str | None = None               # trainer config YAML (default: the packaged CPU config)
    max_minutes: float | None = 10.0
    epochs: int | None = None
    # a lab's first cycles hold a handful of frames: the config's epochs would end a fine-tune on 6 frames after
    # 42 steps, leaving most of max_minutes unused; raise the epochs to run at least this many steps (0: off)
    min_steps: int = 400
    # train exactly this many steps each cycle (None: max_minutes and min_steps decide). The same frames then give
    # the same candidate whatever else the server is doing; max_minutes still caps the cycle
    steps: int | None = None
    seed: int | None = None                 # training seed (None: the trainer config's)
    # cells the expert left as the function drew them (CVAT source "auto") carry the serving model's outline:
    # they train finding cells but not the mask head (False: learn their outlines too)
    ignore_unedited_outlines: bool = True
    from_current: bool = True               # fine-tune from the current bundle (False: from config weights)
    # what the first version (empty registry) fine-tunes from: "starter" (the shipped models/starter), "scratch"
    # (the config's weights), or a bundle folder
    first: str = "starter"
    finetune_lr_scale: float = 0.3          # fine-tuning uses the config's lr times this (and a short warm-up)

    def __post_init__(self) -> None:
        if not (isinstance(self.min_steps, int) and self.min_steps >= 0):
            raise ValueError(f"segmenter.min_steps must be a whole number >= 0, not {self.min_steps!r}")
        if self.steps is not None and not (isinstance(self.steps, int) and not isinstance(self.steps, bool)
                                           and self.steps >= 1):
            raise ValueError(f"segmenter.steps must be a whole number >= 1 (or null: the time budget decides), "
                             f"not {self.steps!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and not isinstance(self.seed, bool)):
            raise ValueError(f"segmenter.seed must be a whole number (or null), not {self.seed!r}")
        if not isinstance(self.ignore_unedited_outlines, bool):
            raise ValueError(f"segmenter.ignore_unedited_outlines must be true or false, not "
                             f"{self.ignore_unedited_outlines!r}")


@dataclass
class ClassifierStep:
    steps: int = 150                        # fine-tuning steps on the new labelled crops (0: carry over as is)
    lr: float = 5.0e-4


@dataclass
class GateConfig:
    # metric -> largest allowed drop (candidate vs current, absolute). Metrics: mask_ap (per class),
    # mask_ap_any (class-agnostic: finding and outlining cells), box_ap_any, found_any (class-agnostic box AP50
    # over every cell, unedited ones included: finding cells), macro_f1 (classifier).
    max_drop: dict[str, float] = field(default_factory=lambda: {"mask_ap_any": 0.02, "mask_ap": 0.03,
                                                                  "found_any": 0.03, "macro_f1": 0.03})
    min: dict[str, float] = field(default_factory=lambda: {"mask_ap_any": 0.0})   # floors (first version too)
    min_val_frames: int = 1
    # A drop is refused only when it exceeds max_drop + noise_z x its standard error over the frames it is
    # measured on (paired jackknife, trainer/gate_noise.py): on a lab's first handful of validation frames one
    # frame moves AP by several points. 0: the fixed allowance alone. macro_f1 has no noise term.
    noise_z: float = 1.0
    # Cells CVAT still holds as the function returned them (source "auto": the expert accepted them untouched)
    # are ignored regions in the outline scores (every metric but found_any): their outline is one model's own,
    # and scoring against it favours that model (trainer/gate_noise.py ignored_sources).
    ignore_unedited: bool = True

    def __post_init__(self) -> None:
        if not self.noise_z >= 0:
            raise ValueError(f"gate.noise_z must be >= 0 (0: the fixed allowance alone), got {self.noise_z}")


@dataclass
class RetrainConfig:
    cvat: CvatConfig | None = None
    data: list[str] = field(default_factory=list)          # local datasets always in the pool
    labels: str | None = None                               # label-map YAML (default: the 10 RV-PBS classes)
    registry: str = "models/registry"
    work_dir: str = "runs/retrain"
    keep_last: int = 5
    split: SplitConfig = field(default_factory=SplitConfig)
    segmenter: SegmenterStep = field(default_factory=SegmenterStep)
    classifier: ClassifierStep = field(default_factory=ClassifierStep)
    gate: GateConfig = field(default_factory=GateConfig)
    base_dir: Path = field(default=Path("."), repr=False)   # relative paths are relative to the config file

    def path(self, value: str | Path) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("base_dir")
        return out


def load_retrain_config(path: str | Path) -> RetrainConfig:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"retrain config {path} does not exist; start from trainer/configs/retrain.yaml")
    data = read_yaml_mapping(path, "retrain config")
    simple = {"data", "labels", "registry", "work_dir", "keep_last"}
    sections = {"cvat": CvatConfig, "split": SplitConfig, "segmenter": SegmenterStep,
                "classifier": ClassifierStep, "gate": GateConfig}
    check_known(data, simple | set(sections), f"keys in retrain config {path}")
    cfg = RetrainConfig(base_dir=path.resolve().parent, **{k: data[k] for k in simple if k in data})
    for key, cls in sections.items():
        if key == "cvat" and data.get("cvat") is None:
            continue
        setattr(cfg, key, dataclass_from_dict(cls, data.get(key), f"keys in retrain config section '{key}'"))
    first = cfg.segmenter.first
    if first not in ("starter", "scratch") and not (cfg.path(first) / "bundle.yaml").is_file():
        raise ValueError(f"retrain config {path}: segmenter.first must be 'starter', 'scratch' or a bundle folder; "
                         f"{cfg.path(first)} has no bundle.yaml")
    if cfg.cvat is None and not cfg.data:
        raise ValueError(f"retrain config {path}: nothing to train on; give 'cvat' (tasks/projects) and/or 'data'")
    if not 0 < cfg.split.val_fraction < 1:
        raise ValueError("split.val_fraction must be between 0 and 1")
    if cfg.keep_last < 2:
        raise ValueError("keep_last must be >= 2 (the current version and one to roll back to)")
    return cfg


# --- the stable split ----------------------------------------------------------------------------

def frame_key(record: ImageRecord, known: dict[str, str] | None = None) -> str:
    """A frame's identity: the sha256 of its image file (from cvat_sync's provenance when known)."""
    if known and record.name in known:
        return known[record.name]
    if record.path is None or not Path(record.path).is_file():
        raise DatasetError(f"frame {record.name} has no image file; retraining needs the images")
    from wbc_core.atomic import sha256_file

    return sha256_file(Path(record.path))


def _known_hashes(folder: Path) -> dict[str, str]:
    prov = folder / "cvat_sync.json"
    if not prov.is_file():
        return {}
    try:
        return {f["name"]: f["sha256"] for f in json.loads(prov.read_text()).get("frames", []) if f.get("sha256")}
    except (ValueError, KeyError, TypeError):
        return {}


@dataclass
class Pool:
    train: AnnotatedDataset
    val: AnnotatedDataset
    test: AnnotatedDataset | None
    frames: dict[str, dict[str, Any]]         # dataset -> {frames, train, val, cells}
    keys: list[str]                           # every train/val frame's identity (sorted), for "what is new"
    annotations: list[str]                    # frame identity + annotation digest, for "what changed"


def build_pool(cfg: RetrainConfig, dataset_dirs: list[Path]) -> Pool:
    from wbc_core.data.loader import load_dataset, merge_datasets
    from wbc_core.labels import LabelMap

    label_map = LabelMap.from_yaml(cfg.path(cfg.labels)) if cfg.labels else LabelMap()
    test_parts = [load_dataset(cfg.path(p), label_map=label_map, require_images=True) for p in cfg.split.frozen_test]
    test_keys = {frame_key(r) for part in test_parts for r in part.images}
    train: list[ImageRecord] = []
    val: list[ImageRecord] = []
    frames: dict[str, dict[str, Any]] = {}
    keys: list[str] = []
    annotations: list[str] = []
    labels: list[str] = []
    for folder in dataset_dirs:
        part = load_dataset(folder, label_map=label_map, require_images=True)
        labels += part.labels
        known = _known_hashes(Path(folder))
        stats = {"frames": len(part.images), "train": 0, "val": 0, "frozen_test_overlap": 0,
                 "cells": sum(len(r.outlined()) for r in part.images)}
        for record in part.images:
            key = frame_key(record, known)
            if key in test_keys:
                stats["frozen_test_overlap"] += 1
                continue
            side = split_side(key, cfg.split.salt, cfg.split.val_fraction)
            (val if side == "val" else train).append(record)
            stats[side] += 1
            keys.append(key)
            annotations.append(f"{key}:{annotation_digest(record)}")
        frames[str(folder)] = stats
    labels = list(dict.fromkeys(labels))
    test = merge_datasets(test_parts) if test_parts else None
    return Pool(train=AnnotatedDataset(images=train, labels=labels, source="retrain pool (train side)"),
                val=AnnotatedDataset(images=val, labels=labels, source="retrain pool (validation side)"),
                test=test, frames=frames, keys=sorted(keys), annotations=sorted(annotations))


def annotation_digest(record: ImageRecord) -> str:
    """A short digest of a frame's annotations (labels and outline extents), so a relabelled or redrawn
    cell counts as changed data even though the image is the same."""
    items = sorted(f"{inst.label}:{','.join(f'{v:.1f}' for v in (inst.box or ()))}" for inst in record.instances)
    return hashlib.sha256("|".join(items).encode()).hexdigest()[:16]


def data_signature(keys: list[str], annotations: list[str]) -> str:
    """Changes when a frame is added, removed, or its annotations change."""
    return hashlib.sha256("\n".join(sorted(keys) + sorted(annotations)).encode()).hexdigest()


# --- steps -----------------------------------------------------------------------------------------

class Cycle:
    """One retraining cycle; :meth:`run` returns the exit code."""

    def __init__(self, cfg: RetrainConfig, force: bool = False, progress: bool = True) -> None:
        from trainer.registry import Registry

        self.cfg = cfg
        self.force = force
        self.progress = progress
        self.registry = Registry(cfg.path(cfg.registry))
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        self.dir = cfg.path(cfg.work_dir) / f"cycle-{stamp}-{os.getpid()}"
        self.steps: dict[str, float] = {}
        self.report: dict[str, Any] = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                       "config": cfg.to_dict(), "steps_s": self.steps}

    def _timed(self, name: str, t0: float) -> None:
        self.steps[name] = round(time.perf_counter() - t0, 2)
        log.info("step %s done in %.1f s", name, self.steps[name])

    # 1. pull
    def pull(self) -> list[Path]:
        dirs = [self.cfg.path(p) for p in self.cfg.data]
        c = self.cfg.cvat
        if c is None or not (c.tasks or c.projects):
            return dirs
        from cvat_sync.client import CvatClient
        from cvat_sync.config import load_settings
        from cvat_sync.pull import Puller, PullOptions, pull_tasks
        from wbc_core.labels import LabelMap

        settings = load_settings(self.cfg.path(c.config) if c.config else None)
        out = self.cfg.path(c.out)
        label_map = LabelMap.from_yaml(self.cfg.path(self.cfg.labels)) if self.cfg.labels else LabelMap()
        options = PullOptions(out=out, jobs=c.jobs, via=c.via, label_map=label_map, progress=self.progress)
        with CvatClient(settings) as client:
            task_ids = list(dict.fromkeys(c.tasks))
            for project in c.projects:
                task_ids += [t for t in Puller(client, options).project_tasks(project) if t not in task_ids]
            reports = pull_tasks(client, task_ids, options)
            self.report["pull"] = {"server": settings.url, "requests": client.requests_made,
                                   "tasks": [{"task": r.task_id, "status": r.status, "frames": r.frames,
                                              "downloaded": r.downloaded, "jobs": r.jobs} for r in reports]}
        return [Path(r.out_dir) for r in reports] + dirs

    # 3. train
    def train(self, pool: Pool, current: Path | None) -> Path:
        from trainer.config import load_config
        from trainer.train_segmenter import train_segmenter

        seg = self.cfg.segmenter
        tcfg = load_config(self.cfg.path(seg.config) if seg.config else None)
        if self.cfg.labels:
            from wbc_core.labels import LabelMap

            tcfg.labels = LabelMap.from_yaml(self.cfg.path(self.cfg.labels))
        if seg.max_minutes:
            tcfg.train.max_minutes = seg.max_minutes
        if seg.epochs:
            tcfg.train.epochs = seg.epochs
        tcfg.train.min_steps = seg.min_steps
        if seg.steps is not None:
            tcfg.train.max_steps = seg.steps
        if seg.seed is not None:
            tcfg.train.seed = seg.seed
        if seg.ignore_unedited_outlines and UNEDITED_SOURCE not in tcfg.train.mask_skip_sources:
            tcfg.train.mask_skip_sources.append(UNEDITED_SOURCE)
        base = self.base_bundle(current)
        if base is not None:
            from trainer.config import finetune_from_bundle

            try:
                finetune_from_bundle(tcfg, base, seg.finetune_lr_scale)
            except ValueError as exc:
                raise ValueError(f"{exc} (retrain: set segmenter.from_current: false, or segmenter.first: "
                                 "scratch)") from exc
            log.info("segmenter: fine-tuning %s (%s)", base, "current version" if base == current else "starter")
        return train_segmenter(tcfg, pool.train, self.dir / "segmenter", progress=self.progress)

    def base_bundle(self, current: Path | None) -> Path | None:
        """The bundle this cycle fine-tunes: the current version, else (empty registry) ``segmenter.first``."""
        seg = self.cfg.segmenter
        if current is not None:
            return current if seg.from_current else None
        if seg.first == "scratch":
            return None
        if seg.first == "starter":
            from wbc_core.bundle import BUNDLE_FILE, STARTER_DIR

            if not (STARTER_DIR / BUNDLE_FILE).is_file():
                log.warning("no starter bundle at %s: the first version trains from the config's weights",
                            STARTER_DIR)
                return None
            return STARTER_DIR
        return self.cfg.path(seg.first)

    def carry_classifier(self, pool: Pool, current: Path | None, candidate: Path) -> dict[str, Any] | None:
        """Copy the base bundle's crop classifier (current version, else the starter) into the candidate,
        fine-tuned on the new crops."""
        base = self.base_bundle(current) if current is None else current
        if base is None:
            return None
        from wbc_core.bundle import load_bundle

        bundle = load_bundle(base)
        if bundle.classifier is None:
            return None
        from trainer.classifier.retrain import finetune_bundle_classifier

        return finetune_bundle_classifier(bundle, candidate, pool.train, steps=self.cfg.classifier.steps,
                                          lr=self.cfg.classifier.lr)

    # 4. evaluate
    def evaluate(self, bundle_dir: Path, data: AnnotatedDataset, name: str) -> tuple[dict[str, Any], list[Any]]:
        """The gate's metrics of the bundle on ``data``, and its detections (one per frame)."""
        from trainer.evaluate import evaluate_bundle_with_predictions
        from trainer.gate_noise import gated_values, ignored_sources
        from wbc_core.bundle import load_bundle
        from wbc_core.detect import Predictor
        from wbc_core.labels import LabelMap

        bundle = load_bundle(bundle_dir)
        label_map = LabelMap(classes=list(bundle.classes))
        predictor = Predictor(bundle, device="cpu" if not _cuda() else None)
        metrics, detections = evaluate_bundle_with_predictions(predictor, data, label_map,
                                                               out_dir=self.dir / "eval" / name, overlays=2,
                                                               progress=self.progress)
        ignore = ignored_sources(data, self.cfg.gate.ignore_unedited)
        out: dict[str, Any] = {**gated_values(data, detections, label_map, ignore),
                               "mask_ap50": metrics["segm"].get("AP50"), "frames": len(data.images),
                               "ignored_sources": list(ignore)}
        if ignore:
            out["all_cells"] = {"mask_ap": metrics["segm"]["AP"], "mask_ap_any": (
                metrics.get("class_agnostic") or metrics)["segm"]["AP"]}
        out["per_class_mask_ap"] = metrics["segm"].get("per_class", {})
        if bundle.classifier is not None:
            from trainer.classifier.retrain import classifier_macro_f1

            f1 = classifier_macro_f1(bundle, data)
            if f1 is not None:
                out["macro_f1"] = f1
        return out, detections

    def noise(self, data: AnnotatedDataset, candidate: list[Any], current: list[Any], bundle_dir: Path
              ) -> dict[str, float]:
        """Standard errors of the gated metrics' drop on ``data`` (:mod:`trainer.gate_noise`); {} when the gate
        ignores noise."""
        if not self.cfg.gate.noise_z:
            return {}
        from trainer.gate_noise import ignored_sources, paired_jackknife_se
        from wbc_core.bundle import load_bundle
        from wbc_core.labels import LabelMap

        label_map = LabelMap(classes=list(load_bundle(bundle_dir).classes))
        ignore = ignored_sources(data, self.cfg.gate.ignore_unedited)
        se = paired_jackknife_se(data, candidate, current, label_map, ignore_sources=ignore)
        return {k: round(v, 4) for k, v in se.items()}

    # 5. gate
    def gate(self, candidate: dict[str, dict[str, Any]], current: dict[str, dict[str, Any]] | None,
             noise: dict[str, dict[str, float]] | None = None) -> tuple[bool, list[str]]:
        """Promote or not: every floor met, and no metric dropping by more than its allowance plus
        ``gate.noise_z`` x its standard error on that split (``noise``: split -> metric -> standard error)."""
        reasons: list[str] = []
        ok = True
        for split, cand in candidate.items():
            if cand.get("not_judged"):
                reasons.append(f"{split}: {cand['not_judged']}")
            for metric, floor in self.cfg.gate.min.items():
                if metric in cand:
                    below = cand[metric] < floor
                    ok = ok and not below
                    reasons.append(f"{split} {metric} {cand[metric]:.3f} vs floor {floor}: "
                                   f"{'REFUSED' if below else 'ok'}")
            if current is None or split not in current:
                continue
            for metric, allowed in self.cfg.gate.max_drop.items():
                if metric not in cand or metric not in current[split]:
                    continue
                drop = current[split][metric] - cand[metric]
                se = ((noise or {}).get(split) or {}).get(metric, 0.0)
                limit = allowed + self.cfg.gate.noise_z * se
                verdict = "ok" if drop <= limit else "REFUSED"
                margin = f" + {self.cfg.gate.noise_z:g} x {se:.3f} noise" if se and self.cfg.gate.noise_z else ""
                reasons.append(f"{split} {metric}: current {current[split][metric]:.3f} -> candidate "
                               f"{cand[metric]:.3f} (drop {drop:+.3f}, allowed {allowed}{margin}) {verdict}")
                if drop > limit:
                    ok = False
        return ok, reasons

    def run(self) -> int:
        from trainer.registry import RegistryBusy

        try:
            with self.registry.lock():
                self.registry.clean_staging()
                return self._run_locked()
        except RegistryBusy as exc:
            log.error("%s", exc)
            return BUSY

    def _run_locked(self) -> int:
        t_all = time.perf_counter()
        self.dir.mkdir(parents=True, exist_ok=True)
        current_version = self.registry.current()
        current = self.registry.path(current_version) if current_version else None
        if current_version:
            self.registry.verify(current_version)
        self.report["current_version"] = current_version
        log.info("retrain cycle in %s; current version: %s", self.dir, current_version or "none")

        t0 = time.perf_counter()
        dirs = self.pull()
        self._timed("pull", t0)

        t0 = time.perf_counter()
        pool = build_pool(self.cfg, dirs)
        signature = data_signature(pool.keys, pool.annotations)
        previous = self.registry.show(current_version) if current_version else {}
        old_keys = set(previous.get("data", {}).get("frame_keys", []))
        old_annotations = set(previous.get("data", {}).get("annotations", []))
        added = [k for k in pool.keys if k not in old_keys]
        relabelled = [a for a in pool.annotations if a not in old_annotations and a.split(":")[0] in old_keys]
        self.report["data"] = {"datasets": pool.frames, "train_frames": len(pool.train.images),
                               "val_frames": len(pool.val.images),
                               "frozen_test_frames": len(pool.test.images) if pool.test else 0,
                               "frames_added_since_current": len(added),
                               "frames_relabelled_since_current": len(relabelled), "signature": signature}
        self._timed("split", t0)
        log.info("pool: %d train / %d validation frames (%d new, %d relabelled since %s)%s", len(pool.train.images),
                 len(pool.val.images), len(added), len(relabelled), current_version or "the start",
                 f", frozen test {len(pool.test.images)}" if pool.test else "")
        if current_version and previous.get("data", {}).get("signature") == signature and not self.force:
            self.report["decision"] = "nothing new"
            self._finish(t_all, None, NOTHING_NEW)
            return NOTHING_NEW
        if len(pool.val.images) < self.cfg.gate.min_val_frames:
            raise DatasetError(f"only {len(pool.val.images)} validation frames (gate.min_val_frames = "
                               f"{self.cfg.gate.min_val_frames}); pull more annotated frames or raise "
                               "split.val_fraction")

        t0 = time.perf_counter()
        candidate = self.train(pool, current)
        self._timed("train_segmenter", t0)
        t0 = time.perf_counter()
        self.report["classifier"] = self.carry_classifier(pool, current, candidate)
        self._timed("train_classifier", t0)

        t0 = time.perf_counter()
        sets = {"validation": pool.val, **({"frozen_test": pool.test} if pool.test else {})}
        cand_eval = {name: self.evaluate(candidate, data, f"candidate-{name}") for name, data in sets.items()}
        cand_metrics = {name: m for name, (m, _) in cand_eval.items()}
        cur_metrics, noise = None, {}
        if current is not None:
            cur_eval = {name: self.evaluate(current, data, f"current-{name}") for name, data in sets.items()}
            cur_metrics = {name: m for name, (m, _) in cur_eval.items()}
            noise = {name: self.noise(data, cand_eval[name][1], cur_eval[name][1], candidate)
                     for name, data in sets.items()}
        self._timed("evaluate", t0)
        self.report["metrics"] = {"candidate": cand_metrics, "current": cur_metrics}
        ok, reasons = self.gate(cand_metrics, cur_metrics, noise)
        self.report["gate"] = {"passed": ok, "checks": reasons, "noise_se": noise, "noise_z": self.cfg.gate.noise_z}
        for line in reasons:
            log.info("gate: %s", line)

        t0 = time.perf_counter()
        info = {"metrics": {"candidate": cand_metrics.get("validation"), **cand_metrics},
                "compared_with": current_version, "gate": self.report["gate"],
                "data": {"signature": signature, "frame_keys": pool.keys, "annotations": pool.annotations,
                         "datasets": pool.frames, "pulled": self.report.get("pull"), "frames_added": len(added),
                         "frames_relabelled": len(relabelled)},
                "git_sha": _git_sha(), "cycle_dir": str(self.dir)}
        version = self.registry.add(candidate, info)
        scores = {k: v for k, v in (cand_metrics.get("validation") or {}).items()
                  if k in ("mask_ap_any", "mask_ap", "box_ap_any", "macro_f1")}
        self.registry.record({"kind": "evaluated", "version": version, "metrics": scores, "passed": ok})
        if ok:
            self.registry.promote(version, reason="gate passed")
            log.info("promoted %s (was %s)", version, current_version or "none")
        else:
            self.registry.record({"kind": "refused", "version": version, "current": current_version,
                                  "checks": reasons})
            log.warning("candidate %s refused by the gate; current stays %s", version, current_version)
        self.report["version"] = version
        self.report["decision"] = "promoted" if ok else "refused"
        removed = self.registry.prune(self.cfg.keep_last)
        if removed:
            log.info("pruned %s (keep_last %d)", ", ".join(removed), self.cfg.keep_last)
        self._timed("promote", t0)
        code = PROMOTED if ok else REFUSED
        self._finish(t_all, version, code)
        return code

    def _finish(self, t_all: float, version: str | None, code: int) -> None:
        self.steps["total"] = round(time.perf_counter() - t_all, 2)
        self.report["exit_code"] = code
        self.report["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_report(self.dir, self.report, self.registry)
        log.info("report: %s", self.dir / "report.md")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _git_sha() -> str | None:
    from trainer.train_segmenter import git_sha

    return git_sha()


# --- report --------------------------------------------------------------------------------------

def write_report(folder: Path, report: dict[str, Any], registry: Any) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    lines = [f"# Retrain cycle {folder.name}", "",
             f"- decision: **{report.get('decision', 'failed')}** (exit code {report.get('exit_code')})",
             f"- current before: {report.get('current_version') or 'none'}; candidate: {report.get('version', '-')}"]
    data = report.get("data") or {}
    if data:
        lines.append(f"- frames: {data.get('train_frames')} train, {data.get('val_frames')} validation, "
                     f"{data.get('frozen_test_frames')} frozen test; {data.get('frames_added_since_current')} "
                     f"added and {data.get('frames_relabelled_since_current')} relabelled since the current version")
    lines.append("- seconds per step: " + ", ".join(f"{k} {v}" for k, v in report.get("steps_s", {}).items()))
    metrics = report.get("metrics") or {}
    if metrics:
        lines += ["", "| set | metric | current | candidate |", "|---|---|---|---|"]
        cand, cur = metrics.get("candidate") or {}, metrics.get("current") or {}
        for split, values in cand.items():
            for metric in ("mask_ap_any", "mask_ap", "box_ap_any", "macro_f1"):
                if metric in values:
                    old = (cur.get(split) or {}).get(metric)
                    lines.append(f"| {split} | {metric} | {'-' if old is None else f'{old:.3f}'} | "
                                 f"{values[metric]:.3f} |")
        per_class = (cand.get("validation") or {}).get("per_class_mask_ap") or {}
        if per_class:
            lines += ["", "Candidate mask AP per class (validation): " + ", ".join(
                f"{k} {v:.3f}" for k, v in per_class.items() if isinstance(v, (int, float)) and v >= 0)]
    gate = report.get("gate") or {}
    if gate:
        lines += ["", "Gate:"] + [f"- {c}" for c in gate.get("checks", [])]
    (folder / "report.md").write_text("\n".join(lines) + "\n")
    try:
        plot_versions(registry.history(), folder / "metrics_by_version.png")
    except Exception as exc:  # a plot must never fail the cycle
        log.warning("could not draw metrics_by_version.png: %s", exc)


def plot_versions(history: list[dict[str, Any]], path: Path) -> None:
    """Validation metrics of every candidate, promoted (filled) or refused (open), by version."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [e for e in history if e.get("kind") == "evaluated" and e.get("metrics")]
    if not points:
        return
    promoted = {e["version"] for e in history if e.get("kind") in ("promoted", "rollback")}
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for metric, colour in (("mask_ap_any", "tab:blue"), ("mask_ap", "tab:orange"), ("macro_f1", "tab:green")):
        xs = [e["version"] for e in points if metric in e["metrics"]]
        ys = [e["metrics"][metric] for e in points if metric in e["metrics"]]
        if not xs:
            continue
        ax.plot(xs, ys, color=colour, alpha=0.5, label=metric)
        for x, y in zip(xs, ys, strict=True):
            ax.scatter([x], [y], color=colour, facecolors=colour if x in promoted else "none", zorder=3)
    ax.set_ylim(0, 1)
    ax.set_xlabel("version (filled: promoted, open: refused)")
    ax.set_ylabel("validation score")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_retrain(config: str | Path, force: bool = False, progress: bool = True) -> int:
    """Run one cycle; returns the exit code (:data:`EXIT_CODES`). A failing step raises after writing
    the cycle's report; ``current`` is never touched before the gate has passed."""
    cycle = Cycle(load_retrain_config(config), force=force, progress=progress)
    return cycle.run()
