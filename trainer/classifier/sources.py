"""Where classifier crops come from: PBC-style class folders (source) and annotated frames (target).

**Source folders** (``<root>/<class folder>/<file>.jpg``, e.g. PBC, Acevedo et al. 2020) are mapped onto the
CVAT labels with a YAML class map (packaged default: ``trainer/configs/classifier-source-pbc.yaml``)::

    folders:                 # folder -> CVAT label | by-prefix | exclude
      lymphocyte: lymphocyte
      neutrophil: by-prefix
      erythroblast: exclude
    prefixes:                # file-name prefix (before the first '_') -> label | exclude
      BNE: band cell
      SNE: neutrophil

A folder the map does not name, a ``by-prefix`` file whose prefix it does not name, a label that is not a
model label, an empty class folder and an unreadable image are errors that name the folder or file; what
the map excludes is logged with counts. Each source image shows one centred cell, much larger than a
detector crop shows it, so the cell is first found (:func:`estimate_cell`: its nucleus, grown by the
stained pixels that differ from the frame's two dominant colours, background and red cells) and then
cropped with the same function and margin as target cells: both domains see the cell at the same scale.

**Target frames** are any dataset :func:`wbc_core.data.loader.load_dataset` reads (CVAT for images 1.1,
COCO 1.0, ``cvat_sync`` folders; one crop per instance, from its mask or box) or the BCCD folder
(:func:`load_bccd_labelled`: the single-WBC, single-label images; type from ``labels.csv``).
"""

from __future__ import annotations

import csv
import logging
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml
from tqdm import tqdm

from wbc_core.classifier.crops import CropConfig, crop_cell, crop_instances
from wbc_core.classifier.stain import empty_stats, frame_stats, stack_stats
from wbc_core.data.images import ImageReadError, read_rgb
from wbc_core.data.types import AnnotatedDataset, DatasetError, ImageRecord, Instance
from wbc_core.labels import RVPBS_LABELS

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
EXCLUDE = "exclude"
BY_PREFIX = "by-prefix"
DEFAULT_SOURCE_MAP = "classifier-source-pbc.yaml"
#: Pipeline decode size: the Predictor decodes slides at the smallest JPEG reduction with a long side of at
#: least its model input (1008 px by default); training crops are cut from the same decode.
DECODE_LONG_SIDE = 1008


# --- the in-memory crop set ----------------------------------------------------------------------------

@dataclass
class CropSet:
    """Cell crops of one domain, kept in memory: raw (not normalised, not masked) uint8 pixels."""

    images: np.ndarray                 # (N, S, S, 3) uint8 RGB
    masks: np.ndarray                  # (N, S, S) bool
    has_mask: np.ndarray               # (N,) bool
    labels: list[str]                  # CVAT label per crop ("" = unlabelled)
    groups: list[str]                  # frame each crop comes from: splits are made by frame, never by crop
    stats: dict[str, np.ndarray]       # colour statistics of each crop's frame (see stain.frame_stats)
    domain: str = ""
    names: list[str] = field(default_factory=list)  # file / cell id, for messages
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray | list[int]) -> CropSet:
        idx = np.asarray(index, dtype=int)
        return CropSet(images=self.images[idx], masks=self.masks[idx], has_mask=self.has_mask[idx],
                       labels=[self.labels[i] for i in idx], groups=[self.groups[i] for i in idx],
                       stats={k: v[idx] for k, v in self.stats.items()}, domain=self.domain,
                       names=[self.names[i] for i in idx] if self.names else [], meta=dict(self.meta))

    def class_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(lbl for lbl in self.labels if lbl).items()))

    @property
    def classes(self) -> list[str]:
        return sorted({lbl for lbl in self.labels if lbl})

    @classmethod
    def empty(cls, size: int, domain: str = "") -> CropSet:
        return cls(images=np.zeros((0, size, size, 3), np.uint8), masks=np.zeros((0, size, size), bool),
                   has_mask=np.zeros(0, bool), labels=[], groups=[], stats=empty_stats(), domain=domain)

    @classmethod
    def concat(cls, parts: list[CropSet]) -> CropSet:
        if not parts:
            raise ValueError("nothing to concatenate")
        if len(parts) == 1:
            return parts[0]
        return cls(images=np.concatenate([p.images for p in parts]), masks=np.concatenate([p.masks for p in parts]),
                   has_mask=np.concatenate([p.has_mask for p in parts]),
                   labels=[x for p in parts for x in p.labels], groups=[x for p in parts for x in p.groups],
                   stats={k: np.concatenate([p.stats[k] for p in parts]) for k in parts[0].stats},
                   domain=parts[0].domain, names=[x for p in parts for x in p.names])


class _Builder:
    """Accumulates crops frame by frame."""

    def __init__(self, size: int, domain: str) -> None:
        self.size, self.domain = size, domain
        self.images: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.has_mask: list[np.ndarray] = []
        self.labels: list[str] = []
        self.groups: list[str] = []
        self.stats: list[dict[str, np.ndarray]] = []
        self.names: list[str] = []

    def add(self, images: np.ndarray, masks: np.ndarray, has_mask: np.ndarray, labels: list[str], group: str,
            stats: dict[str, np.ndarray], names: list[str]) -> None:
        self.images.append(images)
        self.masks.append(masks)
        self.has_mask.append(has_mask)
        self.labels += labels
        self.groups += [group] * len(labels)
        self.stats += [stats] * len(labels)
        self.names += names

    def build(self) -> CropSet:
        if not self.labels:
            return CropSet.empty(self.size, self.domain)
        return CropSet(images=np.concatenate(self.images), masks=np.concatenate(self.masks),
                       has_mask=np.concatenate(self.has_mask), labels=self.labels, groups=self.groups,
                       stats=stack_stats(self.stats), domain=self.domain, names=self.names)


# --- source class folders ------------------------------------------------------------------------------

@dataclass
class SourceClassMap:
    """How PBC-style class folders (and file-name prefixes) map onto the model's CVAT labels."""

    folders: dict[str, str]
    prefixes: dict[str, str] = field(default_factory=dict)
    labels: list[str] = field(default_factory=lambda: list(RVPBS_LABELS))
    cell_box: str = "estimate"   # estimate: find the centred cell; full: the image is already a tight crop

    def __post_init__(self) -> None:
        if self.cell_box not in ("estimate", "full"):
            raise ValueError(f"class map: cell_box must be 'estimate' or 'full', not {self.cell_box!r}")
        for kind, table, extra in (("folders", self.folders, (EXCLUDE, BY_PREFIX)), ("prefixes", self.prefixes,
                                                                                     (EXCLUDE,))):
            for key, value in table.items():
                if value not in self.labels and value not in extra:
                    raise ValueError(f"class map {kind}: {key!r} -> {value!r} is neither one of the labels "
                                     f"{self.labels} nor {' / '.join(extra)}")

    @classmethod
    def from_yaml(cls, path: str | Path | None = None) -> SourceClassMap:
        """Read a class map; None reads the packaged PBC map."""
        try:
            if path is None:
                text = resources.files("trainer").joinpath(f"configs/{DEFAULT_SOURCE_MAP}").read_text()
            else:
                text = Path(path).read_text()
            data = yaml.safe_load(text) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"cannot read class map {path}: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("folders"), dict):
            raise ValueError(f"class map {path or DEFAULT_SOURCE_MAP} needs a 'folders' mapping "
                             "(folder -> label | by-prefix | exclude)")
        labels = data.get("labels") or list(RVPBS_LABELS)
        return cls(folders={str(k): str(v) for k, v in data["folders"].items()},
                   prefixes={str(k): str(v) for k, v in (data.get("prefixes") or {}).items()},
                   labels=[str(x) for x in labels], cell_box=str(data.get("cell_box", "estimate")))

    def to_dict(self) -> dict[str, Any]:
        return {"folders": dict(self.folders), "prefixes": dict(self.prefixes), "labels": list(self.labels),
                "cell_box": self.cell_box}


def file_prefix(name: str) -> str:
    """PBC subtype prefix: the file name up to the first '_' (``BNE_12345.jpg`` -> ``BNE``)."""
    return Path(name).stem.split("_", 1)[0]


def plan_source(root: str | Path, class_map: SourceClassMap) -> tuple[list[tuple[Path, str]], dict[str, int]]:
    """``([(file, label), ...], {excluded folder-or-prefix: count})`` of a class-folder source; DatasetError on
    an unmapped folder or prefix, an empty class folder or no images at all."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"source {root} is not a folder; pass a folder of class folders (<class>/<image>.jpg)")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DatasetError(f"source {root} has no class folders; expected <class>/<image>.jpg")
    unknown = [p.name for p in folders if p.name not in class_map.folders]
    if unknown:
        raise DatasetError(f"source {root}: class folders not in the class map: {', '.join(unknown)}; add each under "
                           "'folders:' as a CVAT label, 'by-prefix' or 'exclude'")
    plan: list[tuple[Path, str]] = []
    excluded: Counter[str] = Counter()
    bad_prefix: dict[str, list[str]] = {}
    for folder in folders:
        target = class_map.folders[folder.name]
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DatasetError(f"source class folder {folder} is empty (no {'/'.join(IMAGE_SUFFIXES)} images); "
                               f"add images or map {folder.name!r} to 'exclude'")
        if target == EXCLUDE:
            excluded[f"{folder.name}/"] += len(files)
            continue
        for f in files:
            label = target
            if target == BY_PREFIX:
                prefix = file_prefix(f.name)
                if prefix not in class_map.prefixes:
                    bad_prefix.setdefault(f"{folder.name}/{prefix}", []).append(f.name)
                    continue
                label = class_map.prefixes[prefix]
                if label == EXCLUDE:
                    excluded[f"{folder.name}/{prefix}"] += 1
                    continue
            plan.append((f, label))
    if bad_prefix:
        listing = "; ".join(f"{k} ({len(v)} files, e.g. {v[0]})" for k, v in sorted(bad_prefix.items()))
        raise DatasetError(f"source {root}: file-name prefixes not in the class map: {listing}; add them under "
                           "'prefixes:' as a CVAT label or 'exclude'")
    if not plan:
        raise DatasetError(f"source {root}: the class map excludes every image ({dict(excluded)})")
    if excluded:
        log.info("source %s: excluded by the class map: %s", root,
                 ", ".join(f"{k} {n}" for k, n in sorted(excluded.items())))
    return plan, dict(excluded)


def _read_rgb_file(path: Path) -> np.ndarray:
    try:
        image, _ = read_rgb(path)
    except ImageReadError as exc:
        raise DatasetError(str(exc)) from exc
    return image


def estimate_cell(image: np.ndarray) -> tuple[tuple[float, float, float, float], np.ndarray] | None:
    """Box (x0, y0, x1, y1) and bool mask of the centred white cell of a single-cell image, or None.

    Pixels far (Lab distance) from the two dominant colours of the image border (background, red cells)
    are stained; the nucleus is the strongly stained blob(s) nearest the centre; the cell is the smoothed
    stained region connected to it, opened so that thin bridges to touching red cells are cut.
    """
    h, w = image.shape[:2]
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(np.float32)
    b = max(4, min(h, w) // 18)
    ring = np.concatenate([lab[:b].reshape(-1, 3), lab[-b:].reshape(-1, 3),
                           lab[:, :b].reshape(-1, 3), lab[:, -b:].reshape(-1, 3)])
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 1.0)
    cv2.setRNGSeed(0)
    _, _, centres = cv2.kmeans(ring, 2, None, criteria, 2, cv2.KMEANS_PP_CENTERS)
    dist = np.min(np.stack([np.linalg.norm(lab - c, axis=2) for c in centres]), axis=0)
    unit = min(h, w) / 360.0   # thresholds and kernels were set on 360 px PBC images
    nucleus = (cv2.GaussianBlur(dist, (0, 0), 2 * unit) > 50).astype(np.uint8)
    n, comp, st, cen = cv2.connectedComponentsWithStats(nucleus)
    cands = [i for i in range(1, n) if st[i, 4] >= 300 * unit * unit]
    if not cands:
        return None
    near = [i for i in cands if np.hypot(cen[i, 0] - w / 2, cen[i, 1] - h / 2) < 0.3 * min(h, w)]
    keep = near or [min(cands, key=lambda i: np.hypot(cen[i, 0] - w / 2, cen[i, 1] - h / 2))]
    nuc = np.isin(comp, keep)
    stained = (cv2.GaussianBlur(dist, (0, 0), 3 * unit) > 12).astype(np.uint8) | nuc.astype(np.uint8)
    k = max(3, round(13 * unit) | 1)
    stained = cv2.morphologyEx(stained, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    _, comp2 = cv2.connectedComponents(stained)
    ids = [i for i in np.unique(comp2[nuc]) if i != 0]
    cell = np.isin(comp2, ids) | nuc
    ys, xs = np.nonzero(cell)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)), cell


def load_folder_source(root: str | Path, class_map: SourceClassMap | None, crop: CropConfig,
                       domain: str = "source", progress: bool = True) -> CropSet:
    """Crops of a class-folder source (each image is its own frame)."""
    class_map = class_map or SourceClassMap.from_yaml(None)
    plan, excluded = plan_source(root, class_map)
    builder = _Builder(crop.size, domain)
    unreadable: list[str] = []
    not_found = 0
    for path, label in tqdm(plan, desc=f"crops {Path(root).name}", disable=not progress, leave=False):
        try:
            image = _read_rgb_file(path)
        except DatasetError as exc:
            unreadable.append(str(exc))
            continue
        h, w = image.shape[:2]
        found = estimate_cell(image) if class_map.cell_box == "estimate" else None
        if found is None:
            if class_map.cell_box == "estimate":
                not_found += 1
            box, mask = (0.0, 0.0, float(w), float(h)), None
            if class_map.cell_box == "estimate":  # no nucleus found: assume a centred cell of half the image
                box = (w / 4, h / 4, 3 * w / 4, 3 * h / 4)
        else:
            box, mask = found
        c = crop_cell(image, box, crop, mask=mask, mask_origin=(0, 0))
        has = np.array([c.mask is not None])
        m = c.mask if c.mask is not None else np.zeros((crop.size, crop.size), bool)
        builder.add(c.image[None], m[None], has, [label], str(path.relative_to(root)), frame_stats(image),
                    [str(path.relative_to(root))])
    if unreadable:
        shown = "\n  ".join(unreadable[:20])
        raise DatasetError(f"source {root}: {len(unreadable)} unreadable images:\n  {shown}\nremove or replace them")
    if not_found:
        log.warning("source %s: no nucleus found in %d of %d images; those crops assume a centred cell of half "
                    "the image size", root, not_found, len(plan))
    out = builder.build()
    out.meta = {"root": str(root), "excluded": excluded, "cell_not_found": not_found,
                "class_map": class_map.to_dict()}
    log.info("source %s: %d crops %s", root, len(out), out.class_counts())
    return out


# --- target frames -------------------------------------------------------------------------------------

def crops_from_dataset(dataset: AnnotatedDataset, crop: CropConfig, domain: str = "target",
                       decode_long_side: int = DECODE_LONG_SIDE, progress: bool = True) -> CropSet:
    """One crop per instance of every frame (mask when outlined, box otherwise), labelled with its label.

    Frames are decoded the way the pipeline decodes them (the cheapest JPEG reduction with a long side of at
    least ``decode_long_side``), so training crops look like the crops the pipeline classifies.
    """
    builder = _Builder(crop.size, domain)
    for record in tqdm(dataset.images, desc="crops", disable=not progress, leave=False):
        insts = [i for i in record.instances if i.box is not None]
        if not insts:
            continue
        if record.path is None:
            raise DatasetError(f"{dataset.source}: frame {record.name} has no image file; export with images")
        try:
            image, scale = read_rgb(record.path, min_long_side=decode_long_side)
        except ImageReadError as exc:
            raise DatasetError(f"{dataset.source}: {exc}") from exc
        items = []
        for inst in insts:
            if inst.mask_crop is not None:
                items.append((inst.box, inst.mask_crop, inst.mask_origin))
            elif inst.polygon is not None:
                items.append(_polygon_item(inst))
            else:
                items.append((inst.box, None, (0, 0)))
        images, masks, has_mask = crop_instances(image, items, crop, scale=scale)
        builder.add(images, masks, has_mask, [i.label for i in insts], record.name, frame_stats(image),
                    [f"{record.name}#{k}" for k in range(len(insts))])
    out = builder.build()
    out.meta = {"source": dataset.source}
    return out


def _polygon_item(inst: Instance) -> tuple[tuple[float, float, float, float], np.ndarray, tuple[int, int]]:
    from wbc_core.data.masks import polygon_to_mask

    x0, y0, x1, y1 = inst.box
    left, top = int(np.floor(x0)), int(np.floor(y0))
    w, h = int(np.ceil(x1)) - left + 1, int(np.ceil(y1)) - top + 1
    mask = polygon_to_mask(inst.polygon - np.array([left, top]), h, w)
    return inst.box, mask, (left, top)


BCCD_TYPES = {"NEUTROPHIL": "neutrophil", "EOSINOPHIL": "eosinophil", "LYMPHOCYTE": "lymphocyte",
              "MONOCYTE": "monocyte", "BASOPHIL": "basophil"}


def is_bccd_folder(path: str | Path) -> bool:
    path = Path(path)
    return (path / "labels.csv").is_file() and (path / "Annotations").is_dir() and (path / "JPEGImages").is_dir()


def _voc_wbc_boxes(xml_path: Path) -> list[tuple[float, float, float, float]]:
    boxes = []
    for obj in ET.parse(xml_path).getroot().iter("object"):
        if (obj.findtext("name") or "").strip() != "WBC":
            continue
        bb = obj.find("bndbox")
        boxes.append(tuple(float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")))
    return boxes


def _box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def load_bccd_labelled(root: str | Path) -> AnnotatedDataset:
    """BCCD frames with exactly one VOC ``WBC`` box and one non-blank type in ``labels.csv``, one labelled
    instance each: the hand-drawn mask component that matches the box (IoU >= 0.3), else the box.

    ``meta["split"]`` maps each frame name to ``trainval`` or ``test`` (BCCD's ``ImageSets/Main``);
    ``meta["excluded"]`` counts the frames left out and why.
    """
    from trainer.data.bccd import mask_instances

    root = Path(root)
    if not is_bccd_folder(root):
        raise DatasetError(f"{root} is not the bccd-wbc folder (labels.csv, Annotations/, JPEGImages/)")
    types: dict[int, str] = {}
    with open(root / "labels.csv", newline="") as fh:
        for row in csv.reader(fh):
            if len(row) >= 3 and row[1].strip().isdigit():
                types[int(row[1])] = row[2].strip()
    split: dict[str, str] = {}
    for name in ("trainval", "test"):
        f = root / "ImageSets" / "Main" / f"{name}.txt"
        if f.is_file():
            split.update({n.strip(): name for n in f.read_text().split()})
    records, excluded = [], Counter()
    for jpg in sorted((root / "JPEGImages").glob("BloodImage_*.jpg")):
        stem = jpg.stem
        xml = root / "Annotations" / f"{stem}.xml"
        kind = types.get(int(stem.split("_")[1]), "")
        if not xml.is_file():
            excluded["no annotation"] += 1
            continue
        boxes = _voc_wbc_boxes(xml)
        if len(boxes) != 1:
            excluded[f"{len(boxes)} WBC boxes"] += 1
            continue
        if not kind or "," in kind:
            excluded["blank label" if not kind else "several types"] += 1
            continue
        if kind.upper() not in BCCD_TYPES:
            raise DatasetError(f"{root / 'labels.csv'}: unknown type {kind!r} for {stem}")
        label = BCCD_TYPES[kind.upper()]
        box = boxes[0]
        inst = Instance(label=label, box=box)
        mask_png = root / "masks_nucleus_cytoplasm" / f"{stem.replace('BloodImage_', 'BloodImage_Mask_')}.png"
        if mask_png.is_file():
            comps = mask_instances(mask_png, label=label)
            best = max(comps, key=lambda c: _box_iou(c.box, box), default=None)
            if best is not None and _box_iou(best.box, box) >= 0.3:
                inst = best
        records.append(ImageRecord(name=jpg.name, width=640, height=480, path=jpg, instances=[inst]))
    ds = AnnotatedDataset(images=records, labels=sorted(set(BCCD_TYPES.values())), source=f"{root} (BCCD WBC types)")
    ds.meta["split"] = {r.name: split.get(Path(r.name).stem, "unknown") for r in records}
    ds.meta["excluded"] = dict(excluded)
    return ds


def load_target(path: str | Path, crop: CropConfig, progress: bool = True) -> CropSet:
    """Crops of a target: the BCCD folder, or any export :func:`wbc_core.data.loader.load_dataset` reads."""
    from wbc_core.data.loader import load_dataset
    from wbc_core.labels import LabelMap

    path = Path(path)
    if is_bccd_folder(path):
        dataset = load_bccd_labelled(path)
    else:
        dataset = load_dataset(path, label_map=LabelMap(), require_images=True)
    out = crops_from_dataset(dataset, crop, domain="target", progress=progress)
    out.meta.update({k: v for k, v in dataset.meta.items() if k in ("split", "excluded", "skipped_labels")})
    if not len(out):
        raise DatasetError(f"target {path} has no cells to crop")
    log.info("target %s: %d crops %s", path, len(out), out.class_counts())
    return out
