"""Training on several sets at once (the starter model): a config that lists the sets, and the merged dataset.

Config (YAML; ``trainer/configs/starter.yaml`` is the reference)::

    sets:
      - name: bccd              # unique; names the set in errors, --leave-out and the bundle's provenance
        kind: bccd              # bccd | bionet | synthetic | export
        path: bccd-wbc          # relative to --data-root (or absolute); not for synthetic
        split: train            # bccd: train/val/trainval/test; bionet: train/val/test or e.g. train+val
        weight: 0.4             # sampling weight: the share of training batches drawn from this set
        masks: true             # true: outlines train the mask head; false: boxes only (box/class heads)
        licence: MIT
        attribution: "BCCD (Shenggan, MIT); masks: Banik et al. 2020 (MIT)"
        ship: true              # may weights trained on it ship with the project?
      - {name: synth, kind: synthetic, frames: 300, width: 640, height: 480, seed: 0, weight: 0.2, masks: true,
         licence: "project's own (MIT)", attribution: "synthetic slides, trainer.synthetic", ship: true}
      - {name: task12, kind: export, path: exports/task12.zip, labels: [neutrophil, lymphocyte], ...}
    model: {...}     # the usual sections of a training config (trainer.config.TrainConfig)
    train: {...}
    augment: {...}
    scale: {...}

Keys per kind: every set takes ``name, kind, weight, masks, licence, attribution, ship``; ``bccd`` and ``bionet``
also ``path, split``; ``export`` also ``path`` (a CVAT for images 1.1 or COCO 1.0 export: zip, folder or file,
read by ``wbc_core.data.loader.load_dataset``), ``labels`` (which of its labels are white cells; default: any
RV-PBS class or "wbc") and ``images`` (image folder, if not beside the export); ``synthetic`` also ``frames,
width, height, seed, cells_per_image`` (slides generated into ``<out>/synthetic/<name>/`` by
``trainer.synthetic.generate_task``). Unknown keys are refused.

Every cell of every set becomes class ``wbc`` (the segmenter is class-agnostic; the crop classifier names the
type). The merged :class:`AnnotatedDataset` carries what :func:`trainer.train_segmenter.train_segmenter` needs
in ``meta``: ``frame_set`` (set index per frame), ``sets`` (one dict per set, with its ``weight``),
``frame_box_only`` and ``frame_rbc_px`` (known red-cell diameter per frame, for the ``rbc`` scale mode).
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trainer.config import TrainConfig
from trainer.data.bccd import bccd_rbc_boxes, load_bccd
from trainer.data.bionet import load_bionet, median_rbc_diameter
from wbc_core.config_io import read_yaml_mapping
from wbc_core.data.types import AnnotatedDataset, DatasetError
from wbc_core.labels import RVPBS_LABELS, LabelMap

log = logging.getLogger(__name__)

WBC = "wbc"
SET_KINDS = ("bccd", "bionet", "synthetic", "export")
COMMON_KEYS = ("name", "kind", "weight", "masks", "licence", "attribution", "ship")
KIND_KEYS = {
    "bccd": ("path", "split"),
    "bionet": ("path", "split"),
    "export": ("path", "labels", "images"),
    "synthetic": ("frames", "width", "height", "seed", "cells_per_image"),
}
DEFAULT_SPLIT = {"bccd": "train", "bionet": "train"}
BOX_ONLY_KINDS = ("bionet",)
# Labels of an export that are white cells when the set lists none (compared case-insensitively).
DEFAULT_WBC_LABELS = (*RVPBS_LABELS, "wbc", "white blood cell", "leukocyte", "leucocyte")
# Licences that do not allow shipping weights trained on the set.
NOT_SHIPPABLE = re.compile(r"^\s*(|none.*|unknown.*|n/?a|no licen[cs]e.*)\s*$", re.IGNORECASE)
# trainer.synthetic draws red cells 0.085-0.105 x the slide width across (_render_rbcs): the ruler for synthetic
# frames in the rbc scale mode.
SYNTHETIC_RBC_FRACTION = 0.095


class MultiSetError(ValueError):
    """The multi-set config is wrong; the message names the config file and the set."""


@dataclass
class SetSpec:
    """One training set of a multi-set config (see the module docstring)."""

    name: str
    kind: str
    weight: float = 1.0
    masks: bool = True
    licence: str = ""
    attribution: str = ""
    ship: bool = False
    path: str | None = None
    split: str | None = None
    labels: list[str] | None = None
    images: str | None = None
    frames: int = 200
    width: int = 640
    height: int = 480
    seed: int = 0
    cells_per_image: list[int] = field(default_factory=lambda: [1, 2])

    def where(self) -> str:
        return f"set {self.name!r} ({self.kind}{f' {self.path}' if self.path else ''})"


@dataclass
class ClassifierSpec:
    """The optional ``classifier:`` section: the crop classifier trained with the segmenter and attached to its
    bundle (``python -m trainer train-classifier`` with these arguments)."""

    source: str                  # class folders (PBC), relative to --data-root or absolute
    target: str                  # stain reference frames and evaluation crops (e.g. bccd-wbc)
    method: str = "source-only"
    stain_norm: str = "reinhard"
    config: str | None = None    # classifier YAML (relative to this config's folder); None: the packaged default
    licence: str = ""
    attribution: str = ""
    ship: bool = False


CLASSIFIER_KEYS = tuple(ClassifierSpec.__dataclass_fields__)


@dataclass
class MultiSetConfig:
    """The sets and the training config (``labels`` forced to the single class ``wbc``)."""

    sets: list[SetSpec]
    train: TrainConfig
    source: str = "multi-set config"
    classifier: ClassifierSpec | None = None
    base_dir: Path | None = None


def parse_classifier(item: Any, source: str) -> ClassifierSpec | None:
    """The ``classifier:`` section (None when absent)."""
    if item is None:
        return None
    where = f"{source}: classifier"
    if not isinstance(item, dict):
        raise MultiSetError(f"{where} must be a mapping with source, target, method, stain_norm, licence, ...")
    unknown = sorted(set(item) - set(CLASSIFIER_KEYS))
    if unknown:
        raise MultiSetError(f"{where}: unknown keys {unknown}; known: {list(CLASSIFIER_KEYS)}")
    for key in ("source", "target"):
        if not isinstance(item.get(key), str) or not item[key]:
            raise MultiSetError(f"{where}: {key} must name a folder (relative to --data-root), got {item.get(key)!r}")
    from trainer.classifier import METHODS, STAIN_METHODS

    spec = ClassifierSpec(**item)
    if spec.method not in METHODS:
        raise MultiSetError(f"{where}: method must be one of {METHODS}, not {spec.method!r}")
    if spec.stain_norm not in STAIN_METHODS:
        raise MultiSetError(f"{where}: stain_norm must be one of {STAIN_METHODS}, not {spec.stain_norm!r}")
    spec.ship = _bool(spec.ship, "ship", where)
    if spec.ship and NOT_SHIPPABLE.match(str(spec.licence)):
        raise MultiSetError(f"{where}: ship: true needs a licence that allows shipping weights (e.g. CC BY 4.0), "
                            f"got {spec.licence!r}")
    return spec


def _bool(value: Any, key: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise MultiSetError(f"{where}: {key} must be true or false, not {value!r}")
    return value


def _number(value: Any, key: str, where: str, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise MultiSetError(f"{where}: {key} must be {'an integer' if integer else 'a number'}, not {value!r}")
    return value


def parse_set(item: Any, index: int, source: str) -> SetSpec:
    """One entry of ``sets:``, checked (kind, keys, types, masks against what the kind has)."""
    where = f"{source}: sets[{index}]"
    if not isinstance(item, dict):
        raise MultiSetError(f"{where} must be a mapping with name, kind, weight, ..., not {item!r}")
    name = item.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise MultiSetError(f"{where}: 'name' must be a short name (letters, digits, _ . -), got {name!r}")
    where = f"{source}: set {name!r}"
    kind = item.get("kind")
    if kind not in SET_KINDS:
        raise MultiSetError(f"{where}: kind must be one of {list(SET_KINDS)}, not {kind!r}")
    known = (*COMMON_KEYS, *KIND_KEYS[kind])
    unknown = sorted(set(item) - set(known))
    if unknown:
        raise MultiSetError(f"{where}: unknown keys {unknown} for a {kind} set; known: {sorted(known)}")
    spec = SetSpec(name=name, kind=kind)
    if "weight" in item:
        spec.weight = float(_number(item["weight"], "weight", where))
    if spec.weight <= 0:
        raise MultiSetError(f"{where}: weight must be > 0 (leave the set out instead), got {spec.weight}")
    if "masks" not in item:
        raise MultiSetError(f"{where}: say whether it has outlines: masks: true (mask head) or false (boxes only)")
    spec.masks = _bool(item["masks"], "masks", where)
    spec.ship = _bool(item.get("ship", False), "ship", where)
    for key in ("licence", "attribution"):
        value = item.get(key, "")
        if not isinstance(value, str):
            raise MultiSetError(f"{where}: {key} must be a string, not {value!r}")
        setattr(spec, key, value.strip())
    if kind in ("bccd", "bionet", "export"):
        if not isinstance(item.get("path"), str) or not item["path"].strip():
            raise MultiSetError(f"{where}: needs a 'path' (relative to --data-root, or absolute)")
        spec.path = item["path"].strip()
    if kind in DEFAULT_SPLIT:
        split = item.get("split", DEFAULT_SPLIT[kind])
        if not isinstance(split, str) or not split.strip():
            raise MultiSetError(f"{where}: split must be a split name, not {split!r}")
        spec.split = split.strip()
    if kind == "export":
        labels = item.get("labels")
        if labels is not None and (not isinstance(labels, list) or not labels
                                   or not all(isinstance(x, str) for x in labels)):
            raise MultiSetError(f"{where}: labels must be a non-empty list of the export's WBC label names")
        spec.labels = labels
        if item.get("images") is not None:
            spec.images = str(item["images"])
    if kind == "synthetic":
        for key in ("frames", "width", "height", "seed"):
            if key in item:
                setattr(spec, key, int(_number(item[key], key, where, integer=True)))
        if spec.frames < 1 or spec.width < 64 or spec.height < 64:
            raise MultiSetError(f"{where}: needs frames >= 1 and width, height >= 64")
        cpi = item.get("cells_per_image", spec.cells_per_image)
        if not isinstance(cpi, list) or len(cpi) != 2 or not all(isinstance(x, int) for x in cpi) \
                or not 1 <= cpi[0] <= cpi[1]:
            raise MultiSetError(f"{where}: cells_per_image must be [min, max] with 1 <= min <= max, got {cpi!r}")
        spec.cells_per_image = list(cpi)
    if spec.masks and kind in BOX_ONLY_KINDS:
        raise MultiSetError(f"{where}: a {kind} set has boxes only, no outlines; set masks: false (it then trains "
                            "the box/class heads, never the mask head)")
    if spec.ship and NOT_SHIPPABLE.match(spec.licence):
        raise MultiSetError(f"{where}: ship: true needs a licence that allows shipping weights (e.g. MIT, "
                            f"CC BY 4.0), got {spec.licence!r}; set ship: false or give the licence")
    return spec


def parse_multiset(data: dict[str, Any], source: str = "multi-set config", base_dir: Path | None = None
                   ) -> MultiSetConfig:
    """A multi-set config from its YAML mapping: ``sets`` plus the sections of :class:`TrainConfig`."""
    data = dict(data or {})
    sets = data.pop("sets", None)
    classifier = parse_classifier(data.pop("classifier", None), source)
    if not isinstance(sets, list) or not sets:
        raise MultiSetError(f"{source}: needs a non-empty 'sets:' list (see trainer/configs/starter.yaml)")
    labels = data.pop("labels", None)
    if labels not in (None, {}) and not (isinstance(labels, dict) and list(labels.get("classes") or []) == [WBC]):
        raise MultiSetError(f"{source}: multi-set training is class-agnostic (every cell is {WBC!r}); drop the "
                            "'labels' section (the crop classifier names the cell types)")
    try:
        train = TrainConfig.from_dict(data, base_dir=base_dir)
    except (TypeError, ValueError) as exc:
        raise MultiSetError(f"{source}: {exc}") from exc
    train.labels = LabelMap(classes=[WBC], aliases={}, ignore=[])
    specs = [parse_set(item, i, source) for i, item in enumerate(sets)]
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise MultiSetError(f"{source}: set names must be unique; repeated: {dupes}")
    return MultiSetConfig(sets=specs, train=train, source=source, classifier=classifier, base_dir=base_dir)


def load_multiset_config(path: str | Path) -> MultiSetConfig:
    """Read and check a multi-set YAML config (errors name the file and the set)."""
    path = Path(path)
    try:
        data = read_yaml_mapping(path, "multi-set config")
    except ValueError as exc:
        raise MultiSetError(str(exc)) from exc
    return parse_multiset(data, source=str(path), base_dir=path.parent)


def select_sets(cfg: MultiSetConfig, ship: bool = False, leave_out: list[str] | tuple[str, ...] = ()
                ) -> list[SetSpec]:
    """The sets to train on: ``ship`` keeps only ``ship: true`` sets; ``leave_out`` drops sets by name."""
    names = [s.name for s in cfg.sets]
    unknown = [n for n in leave_out if n not in names]
    if unknown:
        raise MultiSetError(f"{cfg.source}: --leave-out {unknown}: no such set; sets: {names}")
    chosen = [s for s in cfg.sets if s.name not in leave_out and (s.ship or not ship)]
    if ship:
        dropped = [s.name for s in cfg.sets if not s.ship and s.name not in leave_out]
        if dropped:
            log.info("--ship: leaving out sets that may not ship in weights: %s", ", ".join(dropped))
    if not chosen:
        raise MultiSetError(f"{cfg.source}: no set left to train on (sets {names}, ship only: {ship}, "
                            f"left out: {list(leave_out)})")
    if not any(s.masks for s in chosen):
        raise MultiSetError(f"{cfg.source}: none of the sets {[s.name for s in chosen]} has outlines (masks: true), "
                            "so the mask head would not learn; keep a set with masks (e.g. bccd or synthetic)")
    return chosen


# --- loading -------------------------------------------------------------------------------------------------

def _resolve(spec: SetSpec, data_root: Path | None) -> Path:
    path = Path(spec.path or "")
    if path.is_absolute():
        return path
    if data_root is None:
        raise MultiSetError(f"{spec.where()}: the path is relative; pass --data-root (the folder holding the sets)")
    return Path(data_root) / path


def _norm(label: str) -> str:
    return re.sub(r"[\s_]+", " ", label.strip().lower())


def _relabel_wbc(data: AnnotatedDataset, spec: SetSpec) -> None:
    """Keep only white-cell instances (the set's ``labels``, or :data:`DEFAULT_WBC_LABELS`), all as ``wbc``."""
    wanted = {_norm(x) for x in (spec.labels or DEFAULT_WBC_LABELS)}
    found: dict[str, int] = {}
    dropped: dict[str, int] = {}
    for rec in data.images:
        kept = []
        for inst in rec.instances:
            if _norm(inst.label) in wanted:
                found[inst.label] = found.get(inst.label, 0) + 1
                inst.label = WBC
                kept.append(inst)
            else:
                dropped[inst.label] = dropped.get(inst.label, 0) + 1
        rec.instances = kept
    if not found:
        raise DatasetError(f"{spec.where()}: no WBC label among its labels {sorted(dropped) or data.labels}; list "
                           "the white-cell labels under 'labels:' for this set")
    if dropped:
        log.info("%s: left out shapes that are not white cells: %s", spec.where(), dropped)
    data.labels = [WBC]


def _load_real(spec: SetSpec, data_root: Path | None) -> tuple[AnnotatedDataset, list[float | None]]:
    """A bccd/bionet/export set, relabelled to ``wbc``, with the known red-cell diameter per frame."""
    from wbc_core.data.loader import load_dataset

    path = _resolve(spec, data_root)
    if not path.exists():
        raise DatasetError(f"{spec.where()}: {path} does not exist; check --data-root and the set's path")
    if spec.kind == "bccd":
        data = load_bccd(path, spec.split or "train")
        rbc_boxes = bccd_rbc_boxes(path, [r.name for r in data.images])
        rbc = [median_rbc_diameter(rbc_boxes.get(r.name, []), r.width, r.height) for r in data.images]
    elif spec.kind == "bionet":
        data = load_bionet(path, spec.split or "train")
        known = data.meta.get("rbc_diameter_px") or {}
        rbc = [known.get(r.name) for r in data.images]
    else:
        images = Path(spec.images) if spec.images else None
        if images is not None and not images.is_absolute() and data_root is not None:
            images = Path(data_root) / images
        data = load_dataset(path, label_map=None, require_images=True, images_dir=images)
        rbc = [None] * len(data.images)
    if not data.images:
        raise DatasetError(f"{spec.where()}: no frames in {path}; check the path and split")
    _relabel_wbc(data, spec)
    return data, rbc


def _synthetic(spec: SetSpec, out_dir: Path) -> tuple[AnnotatedDataset, list[float | None]]:
    """Synthetic slides in ``out_dir/synthetic/<name>/`` (reused when a complete earlier copy is there)."""
    from trainer.synthetic import generate_task
    from wbc_core.data.loader import load_dataset

    folder = out_dir / "synthetic" / spec.name
    data = None
    if (folder / "annotations.xml").is_file():
        try:
            data = load_dataset(folder, require_images=True)
        except DatasetError as exc:
            log.warning("%s: regenerating %s (%s)", spec.where(), folder, exc)
        if data is not None and (len(data.images) != spec.frames or data.meta.get("seed", spec.seed) != spec.seed):
            data = None
    if data is None:
        tmp = folder.with_name(f".{spec.name}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("%s: drawing %d slides of %dx%d into %s", spec.where(), spec.frames, spec.width, spec.height, folder)
        generate_task(tmp, n_images=spec.frames, width=spec.width, height=spec.height, seed=spec.seed,
                      cells_per_image=(spec.cells_per_image[0], spec.cells_per_image[1]))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.replace(folder)
        data = load_dataset(folder, require_images=True)
    _relabel_wbc(data, spec)
    return data, [SYNTHETIC_RBC_FRACTION * r.width for r in data.images]


def _check_set(data: AnnotatedDataset, spec: SetSpec) -> tuple[int, int]:
    """(frames, cells) of a loaded set; DatasetError when it is empty or, with masks: true, has no outline."""
    if not data.images:
        raise DatasetError(f"{spec.where()}: no frames; check the path and split")
    outlined = sum(len(r.outlined()) for r in data.images)
    boxed = sum(1 for r in data.images for i in r.instances if i.box is not None)
    if spec.masks:
        if outlined == 0:
            raise DatasetError(f"{spec.where()}: masks: true but its {boxed} white cells have boxes only, no "
                               "outlines; set masks: false to train the box/class heads on it")
        if boxed > outlined:
            log.warning("%s: %d of %d white cells have no outline; they are not trained on (masks: true)",
                        spec.where(), boxed - outlined, boxed)
        return len(data.images), outlined
    if boxed == 0:
        raise DatasetError(f"{spec.where()}: no white cell with a box")
    return len(data.images), boxed


def build_training_data(cfg: MultiSetConfig, sets: list[SetSpec], data_root: Path | None, out_dir: Path
                        ) -> tuple[AnnotatedDataset, dict[str, Any]]:
    """Load every set in ``sets`` (real sets first, all checked before anything is written; then synthetic
    slides under ``out_dir``) and merge them. Returns the dataset (see the module docstring for its ``meta``)
    and the provenance to store in the bundle (``datasets``: name, frames, cells, licence, attribution,
    weight per set)."""
    loaded: dict[str, tuple[AnnotatedDataset, list[float | None]]] = {}
    for spec in sets:
        if spec.kind == "synthetic":
            continue
        try:
            loaded[spec.name] = _load_real(spec, data_root)
        except DatasetError as exc:
            msg = str(exc)
            raise DatasetError(msg if msg.startswith(f"set {spec.name!r}") else f"{spec.where()}: {msg}") from exc
        _check_set(loaded[spec.name][0], spec)
    for spec in sets:
        if spec.kind == "synthetic":
            loaded[spec.name] = _synthetic(spec, Path(out_dir))
            _check_set(loaded[spec.name][0], spec)
    images, frame_set, box_only, rbc_px, infos = [], [], [], [], []
    total_weight = sum(s.weight for s in sets)
    for index, spec in enumerate(sets):
        data, rbc = loaded[spec.name]
        frames, cells = _check_set(data, spec)
        images += data.images
        frame_set += [index] * frames
        box_only += [not spec.masks] * frames
        rbc_px += rbc
        known = [d for d in rbc if d]
        infos.append({"name": spec.name, "kind": spec.kind, "split": spec.split, "frames": frames, "cells": cells,
                      "masks": spec.masks, "licence": spec.licence, "attribution": spec.attribution,
                      "ship": spec.ship, "weight": spec.weight, "share": round(spec.weight / total_weight, 4),
                      "rbc_px_median": round(float(np.median(known)), 1) if known else None})
        log.info("%s: %d frames, %d cells (%s), weight %.2f (%.0f%% of batches)%s", spec.where(), frames, cells,
                 "outlines" if spec.masks else "boxes only", spec.weight, 100 * spec.weight / total_weight,
                 f", red cells ~{np.median(known):.0f} px" if known else "")
    merged = AnnotatedDataset(images=images, labels=[WBC], source=" + ".join(s.name for s in sets),
                              meta={"frame_set": frame_set, "frame_box_only": box_only, "frame_rbc_px": rbc_px,
                                    "sets": infos})
    provenance = {"datasets": [{k: info[k] for k in ("name", "frames", "cells", "licence", "attribution", "weight")}
                               | {"kind": info["kind"], "split": info["split"], "masks": info["masks"],
                                  "ship": info["ship"]} for info in infos],
                  "all_sets_shippable": all(s.ship for s in sets),
                  "multiset_config": cfg.source}
    return merged, provenance


def subset_frames(data: AnnotatedDataset, indices: list[int] | np.ndarray) -> AnnotatedDataset:
    """The frames ``indices`` of a merged dataset, with its per-frame ``meta`` lists (``frame_set``,
    ``frame_box_only``, ``frame_rbc_px``) cut the same way (e.g. a few-shot subset of one set)."""
    idx = [int(i) for i in indices]
    if not idx or min(idx) < 0 or max(idx) >= len(data.images):
        raise ValueError(f"frame indices must lie in [0, {len(data.images)}), got {idx[:5]}...")
    meta = {k: ([v[i] for i in idx] if k.startswith("frame_") and isinstance(v, list) else v)
            for k, v in data.meta.items()}
    return AnnotatedDataset(images=[data.images[i] for i in idx], labels=list(data.labels),
                            source=f"{data.source} ({len(idx)} frames)", meta=meta)
