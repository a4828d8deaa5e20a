"""COCO instances JSON (as CVAT's "COCO 1.0" exports it): read an export and write one.

CVAT writes polygons as ``[[x1, y1, ...]]`` with ``iscrowd: 0``, mask shapes as uncompressed
column-major RLE over the whole image (``{"counts": [...], "size": [h, w]}``) with ``iscrowd: 1``,
rectangles with an empty ``segmentation`` and only a ``bbox`` ``[x, y, w, h]``, 1-based category
ids in label order and ``attributes: {occluded, rotation?, ...}``. The reader also accepts
compressed RLE (str counts) and multi-part polygons (merged into one mask crop).

CVAT's COCO has no place for a shape's ``source`` (``manual``, ``auto``, ``semi-auto``, ...); the writer keeps any
other than ``manual`` as an extra annotation key ``source`` (COCO readers ignore unknown keys) and the reader
takes it back, so a pulled task still says which cells the expert left as the function drew them.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np
from pycocotools import mask as coco_mask

from wbc_core.atomic import atomic_write_bytes
from wbc_core.data import masks as mask_ops
from wbc_core.data.cvat_xml import clip_to_frame, extract_zip, find_image, open_zip
from wbc_core.data.types import AnnotatedDataset, DatasetError, ImageRecord, Instance, check_frame_size

log = logging.getLogger(__name__)

_INSTANCES_RE = re.compile(r"(?:^|/)(?:annotations/)?instances_([^/]+)\.json$")


# --- locating the files ------------------------------------------------------------------------

def instances_files(folder: Path) -> list[Path]:
    """Instances JSON files of a COCO export folder: ``annotations/instances_*.json``, else ``*.json``."""
    found = sorted((folder / "annotations").glob("instances_*.json"))
    if not found:
        found = sorted(folder.glob("instances_*.json"))
    if not found:
        found = sorted(p for p in (folder / "annotations").glob("*.json")) + sorted(folder.glob("*.json"))
    return found


def _subset_of(json_path: Path) -> str | None:
    match = _INSTANCES_RE.search(json_path.as_posix())
    return match.group(1) if match else None


def coco_image_dirs(json_path: Path, images_dir: Path | None) -> list[Path]:
    """Where the frames of ``json_path`` may be: ``images/<subset>/``, ``images/``, the export folder."""
    if images_dir is not None:
        return [Path(images_dir)]
    base = json_path.parent.parent if json_path.parent.name == "annotations" else json_path.parent
    subset = _subset_of(json_path)
    dirs = [base / "images" / subset] if subset else []
    return [*dirs, base / "images", base]


# --- reading -------------------------------------------------------------------------------------

def read_coco(path: str | Path, images_dir: Path | None = None,
              extract_dir: Path | None = None) -> AnnotatedDataset:
    """Read a COCO instances export: the JSON file, its export folder or the export ``.zip``.

    A folder with several ``instances_<subset>.json`` files gives one dataset with all of them.
    """
    path = Path(path)
    if path.suffix.lower() == ".zip" and path.is_file():
        with open_zip(path) as zf:
            if not any(n.lower().endswith(".json") for n in zf.namelist()):
                raise DatasetError(f"{path}: the zip holds no COCO instances JSON; export the task as "
                                   "'COCO 1.0'")
        root_dir = extract_zip(path, extract_dir)
        dataset = read_coco(root_dir, images_dir)
        dataset.source = str(path)
        dataset.meta["extracted_to"] = str(root_dir)
        return dataset
    if path.is_dir():
        files = instances_files(path)
        if not files:
            raise DatasetError(f"{path}: folder has no annotations/instances_*.json; point at a COCO 1.0 "
                               "export (zip, folder or instances JSON)")
        parts = [read_coco_json(f, images_dir) for f in files]
        return parts[0] if len(parts) == 1 else _concat(parts, str(path))
    return read_coco_json(path, images_dir)


def _concat(parts: list[AnnotatedDataset], source: str) -> AnnotatedDataset:
    labels = list(dict.fromkeys(lbl for part in parts for lbl in part.labels))
    meta = {"format": "coco", "annotations_file": [p.meta["annotations_file"] for p in parts],
            "image_dirs": [d for p in parts for d in p.meta["image_dirs"]]}
    return AnnotatedDataset(images=[img for p in parts for img in p.images], labels=labels, source=source,
                            meta=meta)


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc}); the file is truncated or not a COCO export, "
                           "export the task again as 'COCO 1.0'") from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{path}: not a COCO instances file (no 'images' list)")
    for key in ("annotations", "categories"):
        if not isinstance(data.get(key, []), list):
            raise DatasetError(f"{path}: '{key}' must be a list")
    return data


def read_coco_json(path: str | Path, images_dir: Path | None = None) -> AnnotatedDataset:
    """Read one COCO instances JSON file (see :func:`read_coco`)."""
    path = Path(path)
    data = _load_json(path)
    dirs = coco_image_dirs(path, images_dir)
    categories = _categories(data.get("categories", []), path)
    records: dict[int, ImageRecord] = {}
    for index, img in enumerate(data["images"]):
        record = _image_record(img, index, path, dirs)
        if record.frame_id in records:
            raise DatasetError(f"{path}: two images have id {record.frame_id}; ids must be unique")
        records[record.frame_id] = record  # type: ignore[index]
    if not records:
        raise DatasetError(f"{path}: the file lists no images (zero frames); export a task that has images")
    empty = 0
    for index, ann in enumerate(data.get("annotations", [])):
        if not isinstance(ann, dict):
            raise DatasetError(f"{path}: annotation #{index} is not an object")
        where = f"{path}: annotation #{index} (id {ann.get('id')!r})"
        record = records.get(ann.get("image_id"))  # type: ignore[arg-type]
        if record is None:
            raise DatasetError(f"{where}: image_id {ann.get('image_id')!r} is not in 'images'")
        where = f"{where} on image {record.name!r}"
        label = categories.get(ann.get("category_id"))  # type: ignore[arg-type]
        if label is None:
            raise DatasetError(f"{where}: category_id {ann.get('category_id')!r} is not in 'categories' "
                               f"{sorted(categories)}")
        inst = parse_annotation(ann, label, record.width, record.height, where)
        if inst is None:
            empty += 1
            continue
        record.instances.append(inst)
    if empty:
        log.warning("%s: skipped %d annotations with an empty mask", path, empty)
    images = sorted(records.values(), key=lambda r: r.frame_id)  # type: ignore[arg-type, return-value]
    meta = {"format": "coco", "annotations_file": str(path), "image_dirs": [str(d) for d in dirs]}
    return AnnotatedDataset(images=images, labels=list(categories.values()), source=str(path), meta=meta)


def _categories(items: list, path: Path) -> dict[int, str]:
    out: dict[int, str] = {}
    for item in items:
        if not isinstance(item, dict) or "id" not in item or not item.get("name"):
            raise DatasetError(f"{path}: category {item!r} needs an 'id' and a 'name'")
        if item["id"] in out:
            raise DatasetError(f"{path}: category id {item['id']} is used twice")
        out[item["id"]] = str(item["name"])
    return out


def _image_record(img: dict, index: int, path: Path, dirs: list[Path]) -> ImageRecord:
    if not isinstance(img, dict) or not img.get("file_name"):
        raise DatasetError(f"{path}: image #{index} has no 'file_name'")
    where = f"{path}: image #{index} ({img['file_name']!r})"
    for key in ("id", "width", "height"):
        if not isinstance(img.get(key), (int, float)) or isinstance(img.get(key), bool):
            raise DatasetError(f"{where}: missing or non-numeric '{key}'")
    width, height = int(img["width"]), int(img["height"])
    check_frame_size(width, height, where)
    name = str(img["file_name"])
    return ImageRecord(name=name, width=width, height=height, path=find_image(name, dirs),
                       frame_id=int(img["id"]))


def _attributes(ann: dict) -> tuple[dict[str, str], bool, float | None]:
    raw = ann.get("attributes") or {}
    occluded = bool(raw.get("occluded", False))
    score = ann.get("score", raw.get("score"))
    attributes: dict[str, str] = {}
    for key, value in raw.items():
        if key in ("occluded", "rotation", "score"):
            continue
        attributes[str(key)] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return attributes, occluded, (float(score) if score is not None else None)


def parse_annotation(ann: dict, label: str, width: int, height: int, where: str) -> Instance | None:
    """One COCO annotation as an Instance (None when its mask is empty)."""
    attributes, occluded, score = _attributes(ann)
    common = {"label": label, "attributes": attributes, "occluded": occluded, "score": score,
              "source": str(ann.get("source") or "manual")}
    seg = ann.get("segmentation")
    if isinstance(seg, dict):
        crop = _rle_crop(seg, width, height, where)
        if crop is None:
            return None
        return Instance(mask_crop=crop[0], mask_origin=crop[1], **common)
    if isinstance(seg, list) and seg:
        parts = _polygon_parts(seg, width, height, where)
        if len(parts) == 1:
            return Instance(polygon=parts[0], **common)
        merged = polygons_to_crop(parts, width, height)
        if merged is None:
            return None
        return Instance(mask_crop=merged[0], mask_origin=merged[1], **common)
    if seg not in (None, []):
        raise DatasetError(f"{where}: 'segmentation' must be a polygon list, an RLE object or empty")
    return Instance(box=_bbox(ann.get("bbox"), width, height, where), **common)


def _bbox(bbox: object, width: int, height: int, where: str) -> tuple[float, float, float, float]:
    try:
        x, y, w, h = (float(v) for v in bbox)  # type: ignore[union-attr]
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{where}: an annotation without segmentation needs 'bbox' [x, y, w, h], "
                           f"got {bbox!r}") from exc
    if w < 0 or h < 0:
        raise DatasetError(f"{where}: bbox {bbox!r} has a negative size")
    (x0, y0), (x1, y1) = clip_to_frame(np.array([[x, y], [x + w, y + h]]), width, height, where)
    return float(x0), float(y0), float(x1), float(y1)


def _polygon_parts(seg: list, width: int, height: int, where: str) -> list[np.ndarray]:
    parts = []
    for i, flat in enumerate(seg):
        try:
            pts = np.asarray(flat, dtype=np.float64).reshape(-1, 2)
        except (TypeError, ValueError) as exc:
            raise DatasetError(f"{where}: polygon part #{i} is not a flat list of x, y numbers") from exc
        if len(np.unique(pts, axis=0)) < 3:
            raise DatasetError(f"{where}: polygon part #{i} needs at least 3 distinct points, got {len(pts)}")
        parts.append(clip_to_frame(pts, width, height, f"{where} polygon part #{i}"))
    return parts


def polygons_to_crop(parts: list[np.ndarray], width: int, height: int
                     ) -> tuple[np.ndarray, tuple[int, int]] | None:
    """Union of several polygons, rasterised like pycocotools, as a tight crop and its (left, top).

    Rasterises only the polygons' bounding area (shifted by whole pixels, which pycocotools'
    rasteriser is invariant to), so big frames cost no full-size mask.
    """
    allpts = np.concatenate(parts)
    x0, y0 = max(int(np.floor(allpts[:, 0].min())) - 1, 0), max(int(np.floor(allpts[:, 1].min())) - 1, 0)
    x1 = min(int(np.ceil(allpts[:, 0].max())) + 2, width)
    y1 = min(int(np.ceil(allpts[:, 1].max())) + 2, height)
    shift = np.array([x0, y0], dtype=np.float64)
    rles = coco_mask.frPyObjects([(p - shift).reshape(-1).tolist() for p in parts], y1 - y0, x1 - x0)
    local = coco_mask.decode(coco_mask.merge(rles)).astype(bool)
    tight = mask_ops.tight_crop(local)
    if tight is None:
        return None
    crop, (xtl, ytl, _, _) = tight
    return crop, (x0 + xtl, y0 + ytl)


def compressed_rle_counts(counts: str | bytes) -> list[int]:
    """Run lengths of a compressed COCO RLE string (pycocotools' ``rleFrString``, in Python).

    Used to check a compressed RLE before decoding it: pycocotools does not bounds-check runs.
    """
    data = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    out: list[int] = []
    p = 0
    while p < len(data):
        x, k, more = 0, 0, True
        while more:
            if p >= len(data):
                raise ValueError("compressed RLE string ends in the middle of a number")
            c = data[p] - 48
            if not 0 <= c < 64:
                raise ValueError(f"byte {data[p]!r} is not a compressed RLE character")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def _rle_crop(seg: dict, width: int, height: int, where: str) -> tuple[np.ndarray, tuple[int, int]] | None:
    counts = seg.get("counts")
    size = seg.get("size")
    if not isinstance(size, (list, tuple)) or [int(v) for v in size] != [height, width]:
        raise DatasetError(f"{where}: RLE size {size!r} does not match the image's [height, width] = "
                           f"[{height}, {width}]")
    try:
        if isinstance(counts, list):
            runs = [int(c) for c in counts]
        elif isinstance(counts, (str, bytes)):
            runs = compressed_rle_counts(counts)
        else:
            raise ValueError("'counts' must be a list or a string")
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{where}: bad RLE: {exc}") from exc
    if sum(runs) != width * height or any(r < 0 for r in runs):
        raise DatasetError(f"{where}: RLE covers {sum(runs)} pixels (or has negative runs), but the image is "
                           f"{width}x{height} = {width * height}")
    full = mask_ops.coco_rle_decode({"size": [height, width], "counts": runs}, height, width)
    tight = mask_ops.tight_crop(full)
    if tight is None:
        return None
    crop, (xtl, ytl, _, _) = tight
    return np.ascontiguousarray(crop), (xtl, ytl)


# --- writing -------------------------------------------------------------------------------------

def _round(v: float) -> float:
    return round(float(v), 2)


def _annotation(inst: Instance, ann_id: int, image_id: int, category_id: int, width: int, height: int
                ) -> dict | None:
    attributes: dict = {"occluded": bool(inst.occluded), **inst.attributes}
    ann: dict = {"id": ann_id, "image_id": image_id, "category_id": category_id}
    if inst.polygon is not None:
        pts = np.clip(inst.polygon, 0, [width, height])
        flat = [_round(v) for v in pts.reshape(-1)]
        area = float(coco_mask.area(coco_mask.merge(coco_mask.frPyObjects([flat], height, width))))
        x0, y0 = pts.min(axis=0)
        x1, y1 = pts.max(axis=0)
        ann.update(segmentation=[flat], area=area, iscrowd=0)
    elif inst.mask_crop is not None:
        full = mask_ops.place_crop(inst.mask_crop, inst.mask_origin, height, width)
        tight = mask_ops.tight_crop(full)
        if tight is None:
            return None
        _, (xtl, ytl, xbr, ybr) = tight
        x0, y0, x1, y1 = xtl, ytl, xbr + 1, ybr + 1
        ann.update(segmentation=mask_ops.coco_rle_encode(full, compressed=False), area=float(full.sum()),
                   iscrowd=1)
    elif inst.box is not None:
        x0, y0, x1, y1 = inst.box
        attributes["rotation"] = 0.0
        ann.update(segmentation=[], area=float((x1 - x0) * (y1 - y0)), iscrowd=0)
    else:
        return None
    ann["bbox"] = [_round(x0), _round(y0), _round(x1 - x0), _round(y1 - y0)]
    ann["attributes"] = attributes
    if inst.source and inst.source != "manual":
        ann["source"] = inst.source
    if inst.score is not None:
        ann["score"] = float(inst.score)
    return ann


def coco_dict(dataset: AnnotatedDataset) -> dict:
    """The dataset as a COCO instances dict (see :func:`write_coco`)."""
    labels = list(dict.fromkeys(dataset.labels))
    extra = [i.label for img in dataset.images for i in img.instances if i.label not in labels]
    labels += list(dict.fromkeys(extra))
    category = {name: i + 1 for i, name in enumerate(labels)}
    images, annotations = [], []
    skipped: Counter[str] = Counter()
    for image_id, image in enumerate(dataset.images, start=1):
        images.append({"id": image_id, "width": image.width, "height": image.height, "file_name": image.name,
                       "license": 0, "flickr_url": "", "coco_url": "", "date_captured": 0})
        for inst in image.instances:
            ann = _annotation(inst, len(annotations) + 1, image_id, category[inst.label], image.width,
                              image.height)
            if ann is None:
                skipped[inst.label] += 1
                continue
            annotations.append(ann)
    if skipped:
        log.warning("not written (no geometry inside the frame): %s", dict(skipped))
    return {
        "licenses": [{"name": "", "id": 0, "url": ""}],
        "info": {"contributor": "", "date_created": "", "description": "", "url": "", "version": "",
                 "year": ""},
        "categories": [{"id": category[name], "name": name, "supercategory": ""} for name in labels],
        "images": images,
        "annotations": annotations,
    }


def write_coco(dataset: AnnotatedDataset, path: Path) -> None:
    """Write ``dataset`` as a pycocotools-loadable COCO instances JSON (atomically), the way CVAT does:
    1-based category ids in ``dataset.labels`` order, polygons ``[[x, y, ...]]`` with ``iscrowd 0``,
    masks as uncompressed full-image RLE with ``iscrowd 1``, rectangles with an empty segmentation."""
    data = coco_dict(dataset)
    atomic_write_bytes(Path(path), json.dumps(data, separators=(",", ":")).encode("utf-8"))
    log.info("wrote %d frames, %d annotations to %s", len(data["images"]), len(data["annotations"]), path)
