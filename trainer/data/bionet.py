"""Bio-Net smear fields (a second lab and camera): WBC boxes only, plus RBC boxes as a scale ruler.

Layout (see ``../shared/data/bionet-wbc/README.md``): ``images/NNN.jpg`` (640x480) and the derived COCO
bbox-only files ``annotations/instances_{train,val,test}.json`` with categories ``WBC``, ``RBC`` and
``Platelets`` (``segmentation: []``). No licence is stated upstream: use it for experiments and evaluation,
never for weights that ship (``ship: false`` in a multi-set config).

:func:`load_bionet` gives every frame of a split with its WBC boxes as rectangle-only :class:`Instance`\\ s
(label ``wbc``, no outline: they can train the box/class heads, never the mask head). ``ImageRecord`` has no
per-frame metadata, so the red cells go into the dataset's ``meta``, keyed by frame name:

- ``meta["rbc_boxes"]``: ``{frame name: [[x0, y0, x1, y1], ...]}`` (native pixels);
- ``meta["rbc_diameter_px"]``: ``{frame name: median red-cell diameter}`` (see :func:`median_rbc_diameter`),
  read by the segmentation dataset's ``rbc`` scale mode;
- ``meta["frame_box_only"]``: ``{frame name: True}`` (every frame trains boxes only).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from wbc_core.data.types import AnnotatedDataset, DatasetError, ImageRecord, Instance

log = logging.getLogger(__name__)

WBC_LABEL = "wbc"
WBC_CATEGORY = "wbc"
RBC_CATEGORY = "rbc"
EDGE_PX = 2.0           # a red-cell box this close to the frame edge is probably cut off
MIN_INTERIOR_RBCS = 3   # fewer whole red cells than this: use every box


def median_rbc_diameter(boxes: Sequence[Sequence[float]], width: int, height: int) -> float | None:
    """Median red-cell diameter, ``(w + h) / 2`` of the boxes, leaving out boxes cut by the frame edge when at
    least :data:`MIN_INTERIOR_RBCS` whole ones remain. None without boxes."""
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not len(arr):
        return None
    interior = ((arr[:, 0] > EDGE_PX) & (arr[:, 1] > EDGE_PX) & (arr[:, 2] < width - EDGE_PX)
                & (arr[:, 3] < height - EDGE_PX))
    use = arr[interior] if interior.sum() >= MIN_INTERIOR_RBCS else arr
    sizes = ((use[:, 2] - use[:, 0]) + (use[:, 3] - use[:, 1])) / 2
    sizes = sizes[sizes > 0]
    return float(np.median(sizes)) if len(sizes) else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}; is it a COCO instances JSON?") from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list) or not isinstance(data.get("categories"), list):
        raise DatasetError(f"{path} is not a COCO instances JSON (needs 'images', 'annotations', 'categories')")
    return data


def _box(bbox: object, width: int, height: int, where: str) -> tuple[float, float, float, float] | None:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise DatasetError(f"{where}: bbox must be [x, y, w, h], got {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    if x1 - x0 < 1 or y1 - y0 < 1:
        return None
    return x0, y0, x1, y1


def _read_split(root: Path, split: str) -> tuple[list[ImageRecord], dict[str, list[list[float]]]]:
    path = root / "annotations" / f"instances_{split}.json"
    if not path.is_file():
        found = sorted(p.stem.removeprefix("instances_") for p in (root / "annotations").glob("instances_*.json"))
        raise DatasetError(f"{path} not found: Bio-Net split {split!r} does not exist (splits there: "
                           f"{found or 'none'}); is {root} the bionet-wbc folder?")
    data = _read_json(path)
    names = {int(c["id"]): str(c.get("name", "")) for c in data["categories"] if isinstance(c, dict) and "id" in c}
    wbc_ids = {cid for cid, name in names.items() if name.strip().lower() == WBC_CATEGORY}
    rbc_ids = {cid for cid, name in names.items() if name.strip().lower() == RBC_CATEGORY}
    if not wbc_ids:
        raise DatasetError(f"{path} has no WBC category (categories: {sorted(names.values())}); Bio-Net files "
                           "list 'WBC', 'RBC' and 'Platelets'")
    records: dict[int, ImageRecord] = {}
    rbc: dict[int, list[list[float]]] = {}
    missing: list[str] = []
    for img in data["images"]:
        try:
            image_id, name = int(img["id"]), str(img["file_name"])
            width, height = int(img["width"]), int(img["height"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(f"{path}: image entry {img!r} lacks id/file_name/width/height") from exc
        file = root / "images" / Path(name).name
        if not file.is_file():
            missing.append(str(file))
        records[image_id] = ImageRecord(name=Path(name).name, width=width, height=height, path=file,
                                        frame_id=image_id)
        rbc[image_id] = []
    if missing:
        raise DatasetError(f"{path}: {len(missing)} of {len(records)} images are missing, e.g. {missing[:3]}; "
                           "copy the whole bionet-wbc folder")
    for ann in data["annotations"]:
        rec = records.get(int(ann.get("image_id", -1)))
        if rec is None:
            raise DatasetError(f"{path}: annotation {ann.get('id')} refers to image {ann.get('image_id')}, which "
                               "the file does not list")
        cat = int(ann.get("category_id", -1))
        if cat not in wbc_ids and cat not in rbc_ids:
            continue
        box = _box(ann.get("bbox"), rec.width, rec.height, f"{path}: annotation {ann.get('id')}")
        if box is None:
            continue
        if cat in wbc_ids:
            occluded = bool((ann.get("attributes") or {}).get("occluded", False))
            rec.instances.append(Instance(label=WBC_LABEL, box=box, occluded=occluded))
        else:
            rbc[rec.frame_id].append([round(v, 2) for v in box])  # type: ignore[index]
    ordered = sorted(records.values(), key=lambda r: r.name)
    return ordered, {r.name: rbc[r.frame_id] for r in ordered}  # type: ignore[index]


def load_bionet(root: str | Path, split: str) -> AnnotatedDataset:
    """Frames of one Bio-Net split (``train``, ``val``, ``test``, or several joined by ``+``, e.g.
    ``train+val``) with their WBC boxes (rectangle-only instances, label ``wbc``) and, in ``meta``, their red
    cells (see the module docstring). Raises :class:`DatasetError` naming the file when the folder, the split
    or an image is missing, or the JSON has no WBC category."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"Bio-Net folder {root} not found; pass the bionet-wbc folder (e.g. "
                           "../shared/data/bionet-wbc)")
    records: list[ImageRecord] = []
    rbc_boxes: dict[str, list[list[float]]] = {}
    for part in [s.strip() for s in split.split("+") if s.strip()] or [split]:
        recs, boxes = _read_split(root, part)
        records += recs
        rbc_boxes.update(boxes)
    if not records:
        raise DatasetError(f"{root} split {split!r} has no frames")
    diameters = {}
    for rec in records:
        d = median_rbc_diameter(rbc_boxes.get(rec.name, []), rec.width, rec.height)
        if d is not None:
            diameters[rec.name] = d
    n_wbc = sum(len(r.instances) for r in records)
    log.info("Bio-Net %s: %d frames, %d WBC boxes, red-cell size known in %d frames (median %.1f px)", split,
             len(records), n_wbc, len(diameters), float(np.median(list(diameters.values()))) if diameters else 0.0)
    return AnnotatedDataset(images=records, labels=[WBC_LABEL], source=f"{root} ({split})",
                            meta={"rbc_boxes": rbc_boxes, "rbc_diameter_px": diameters,
                                  "frame_box_only": {r.name: True for r in records},
                                  "rectangles_without_outline": n_wbc})
