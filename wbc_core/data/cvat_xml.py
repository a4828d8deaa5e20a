"""CVAT for images 1.1 XML: read an export (file, folder or zip) and write one CVAT can import.

Reading accepts what CVAT and the RV-PBS files actually contain: ``<polygon points="x,y;x,y">``,
``<mask rle="r1, r2, ..." left top width height>`` (inclusive box: ``width = right - left + 1``),
``<box xtl ytl xbr ybr>``, ``<attribute name="...">value</attribute>`` children, images listed in
any id order, files without ``<meta>`` (the RV-PBS test subset) and polygons that overshoot the
frame by a rounding error. Anything else wrong raises :class:`DatasetError` naming the file, the
image and the shape.
"""

from __future__ import annotations

import logging
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from datetime import datetime, timezone
from itertools import pairwise
from pathlib import Path

import numpy as np

from wbc_core.atomic import atomic_write_bytes
from wbc_core.data import masks as mask_ops
from wbc_core.data.types import AnnotatedDataset, DatasetError, ImageRecord, Instance, check_frame_size

log = logging.getLogger(__name__)

ANNOTATIONS_XML = "annotations.xml"
# How far (px) a coordinate may lie outside the frame before it is an error; less is clipped.
BOUNDS_TOLERANCE = 1.0

# CVAT colours of the RV-PBS tasks (rvpbs-annotations/README.md); other labels get PALETTE colours.
RVPBS_COLORS: dict[str, str] = {
    "bg": "#c080c0",
    "band cell": "#33ddff",
    "basophil": "#fa3253",
    "blast cell": "#34d1b7",
    "eosinophil": "#ff007c",
    "lymphocyte": "#ff6037",
    "monocyte": "#ddff33",
    "neutrophil": "#b83df5",
    "promyelocyte": "#ffcc33",
    "myelocyte": "#24b353",
    "metamyelocyte": "#034257",
}
PALETTE: tuple[str, ...] = (
    "#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
    "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3",
)

_SHAPE_TAGS = ("polygon", "mask", "box")
_IGNORED_SHAPE_TAGS = ("polyline", "points", "ellipse", "cuboid", "skeleton", "tag")


# --- archives (shared with the COCO reader) -------------------------------------------------

def open_zip(path: Path) -> zipfile.ZipFile:
    """Open an export zip, turning a truncated or non-zip file into a DatasetError."""
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DatasetError(f"{path}: not a readable zip archive ({exc}); the download is probably "
                           "truncated, export the task from CVAT again") from exc


#: What an export zip may extract to at most (bytes), and how much larger than its compressed size: a real
#: export of JPEG frames barely compresses; a zip bomb is a small file that inflates to gigabytes.
MAX_EXTRACT_BYTES = 8 * 2**30
MAX_EXTRACT_RATIO = 200


def extract_zip(path: Path, dest: Path | None = None, max_bytes: int = MAX_EXTRACT_BYTES,
                max_ratio: float = MAX_EXTRACT_RATIO) -> Path:
    """Extract an export zip into ``dest`` (default: a new temporary folder) and return that folder.

    Refused (:class:`DatasetError`, nothing left extracted) when its members declare more than ``max_bytes``, or
    more than 64 MiB and ``max_ratio`` times the archive's size; the sizes are enforced while inflating too,
    since a zip can lie about them. Member names are made relative (no absolute paths, no ``..``)."""
    out = Path(dest) if dest is not None else Path(tempfile.mkdtemp(prefix="wbc-export-"))
    archive = max(path.stat().st_size, 1) if path.is_file() else 1
    written: list[Path] = []
    try:
        with open_zip(path) as zf:
            members = [i for i in zf.infolist() if not i.is_dir()]
            declared = sum(i.file_size for i in members)
            if declared > max_bytes or (declared > 64 * 2**20 and declared > archive * max_ratio):
                raise DatasetError(f"{path}: the archive would extract to {declared / 2**20:.0f} MB from "
                                   f"{archive / 2**20:.1f} MB (limits: {max_bytes / 2**20:.0f} MB, {max_ratio:g}x); "
                                   "refused as a zip bomb")
            out.mkdir(parents=True, exist_ok=True)
            total = 0
            for info in members:
                parts = [p for p in info.filename.replace("\\", "/").split("/") if p not in ("", ".", "..")]
                if not parts or ":" in parts[0]:
                    continue
                target = out.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                written.append(target)
                with zf.open(info) as src, open(target, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        total += len(chunk)
                        if total > declared or total > max_bytes:
                            raise DatasetError(f"{path}: the archive inflates past the sizes it declares "
                                               "(zip bomb?); refused")
                        dst.write(chunk)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, DatasetError) as exc:
        for f in written:
            f.unlink(missing_ok=True)
        if isinstance(exc, DatasetError):
            raise
        raise DatasetError(f"{path}: cannot extract the archive ({exc}); the download is probably "
                           "corrupt, export the task from CVAT again") from exc
    log.debug("extracted %s into %s", path, out)
    return out


# --- reading ---------------------------------------------------------------------------------

def read_cvat_xml(path: str | Path, images_dir: Path | None = None,
                  extract_dir: Path | None = None) -> AnnotatedDataset:
    """Read a CVAT for images 1.1 export.

    ``path`` is an ``annotations.xml``, a folder holding one, or the export ``.zip`` (extracted
    into ``extract_dir``, default a new temporary folder). Images are looked up in ``images_dir``
    if given, else in ``images/`` beside the XML, else beside the XML; ``ImageRecord.path`` is set
    only for files that exist (see ``loader.validate_images``).
    """
    path = Path(path)
    if path.suffix.lower() == ".zip" and path.is_file():
        with open_zip(path) as zf:
            if ANNOTATIONS_XML not in zf.namelist():
                raise DatasetError(f"{path}: the zip holds no {ANNOTATIONS_XML}; export the task as "
                                   "'CVAT for images 1.1'")
        root_dir = extract_zip(path, extract_dir)
        dataset = read_cvat_xml(root_dir / ANNOTATIONS_XML, images_dir)
        dataset.source = str(path)
        dataset.meta["extracted_to"] = str(root_dir)
        return dataset
    if path.is_dir():
        if not (path / ANNOTATIONS_XML).is_file():
            raise DatasetError(f"{path}: folder has no {ANNOTATIONS_XML}; point at a CVAT for images 1.1 "
                               "export (zip, folder or annotations.xml)")
        path = path / ANNOTATIONS_XML
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise DatasetError(f"{path}: not valid XML ({exc}); the file is truncated or not a CVAT "
                           "export, export the task again as 'CVAT for images 1.1'") from exc
    return parse_cvat_root(root, path, image_dirs(path.parent, images_dir))


def image_dirs(base: Path, images_dir: Path | None) -> list[Path]:
    """Folders searched for frame files, most specific first."""
    if images_dir is not None:
        return [Path(images_dir)]
    return [base / "images", base]


def find_image(name: str, dirs: list[Path], subset: str | None = None) -> Path | None:
    """The file of frame ``name`` in one of ``dirs`` (under ``subset`` first), or None. A name that would lead
    outside those folders (absolute, ``..``, a NUL) is never looked up (None, with a warning): an export names
    its frames, it never points at other files of the machine reading it."""
    parts = name.replace("\\", "/").split("/")
    if "\0" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in parts:
        log.warning("frame name %r points outside the dataset folder; not looked up (its image counts as "
                    "missing)", name)
        return None
    for folder in dirs:
        candidates = [folder / subset / name] if subset else []
        candidates.append(folder / name)
        for candidate in candidates:
            if candidate.is_file():
                return candidate
    return None


def parse_cvat_root(root: ET.Element, path: Path, dirs: list[Path]) -> AnnotatedDataset:
    """Turn a parsed ``<annotations>`` tree into an AnnotatedDataset (see :func:`read_cvat_xml`)."""
    if root.tag != "annotations":
        raise DatasetError(f"{path}: root element is <{root.tag}>, expected <annotations>; this is not a "
                           "CVAT for images 1.1 file")
    labels, colors, types = _declared_labels(root)
    declared = set(labels)
    skipped: Counter[str] = Counter()
    undeclared: Counter[str] = Counter()
    records: list[ImageRecord] = []
    seen_ids: dict[int, str] = {}
    for elem in root.findall("image"):
        record = _parse_image(elem, path, dirs, skipped)
        if record.frame_id in seen_ids:
            raise DatasetError(f"{path}: images {seen_ids[record.frame_id]!r} and {record.name!r} both have "
                               f"id {record.frame_id}; ids must be unique")
        seen_ids[record.frame_id] = record.name  # type: ignore[index]
        for inst in record.instances:
            if inst.label not in declared:
                declared.add(inst.label)
                labels.append(inst.label)
                if colors:  # a <meta> declared labels, and this one is not among them
                    undeclared[inst.label] += 1
        records.append(record)
    if not records:
        raise DatasetError(f"{path}: the task has no <image> elements (zero frames); export a task that "
                           "has images")
    records.sort(key=lambda r: r.frame_id)  # type: ignore[arg-type, return-value]
    if undeclared:
        log.warning("%s: labels used by shapes but not declared in <meta>: %s", path, dict(undeclared))
    if skipped:
        log.warning("%s: skipped shapes the trainer does not use: %s", path, dict(skipped))
    meta: dict = {"format": "cvat_xml", "annotations_file": str(path),
                  "image_dirs": [str(d) for d in dirs], "label_colors": colors, "label_types": types,
                  "skipped_shapes": dict(skipped)}
    task_name = root.findtext("meta/task/name") or root.findtext("meta/project/name")
    if task_name:
        meta["task_name"] = task_name
    size = root.findtext("meta/task/size")
    if size and size.strip().isdigit() and int(size) != len(records):
        log.warning("%s: <size> says %s frames but the file has %d <image> elements", path, size,
                    len(records))
    return AnnotatedDataset(images=records, labels=labels, source=str(path), meta=meta)


def _declared_labels(root: ET.Element) -> tuple[list[str], dict[str, str], dict[str, str]]:
    labels: list[str] = []
    colors: dict[str, str] = {}
    types: dict[str, str] = {}
    for scope in ("meta/task/labels/label", "meta/project/labels/label", "meta/job/labels/label"):
        for label in root.findall(scope):
            name = label.findtext("name")
            if not name or name in colors:
                continue
            labels.append(name)
            colors[name] = (label.findtext("color") or "").strip()
            types[name] = (label.findtext("type") or "any").strip()
    return labels, colors, types


def _int_attr(elem: ET.Element, key: str, where: str) -> int:
    value = elem.get(key)
    if value is None:
        raise DatasetError(f"{where}: missing attribute {key!r}")
    try:
        return int(float(value))
    except ValueError as exc:
        raise DatasetError(f"{where}: attribute {key}={value!r} is not a number") from exc


def _float_attr(elem: ET.Element, key: str, where: str) -> float:
    value = elem.get(key)
    if value is None:
        raise DatasetError(f"{where}: missing attribute {key!r}")
    try:
        return float(value)
    except ValueError as exc:
        raise DatasetError(f"{where}: attribute {key}={value!r} is not a number") from exc


def _parse_image(elem: ET.Element, path: Path, dirs: list[Path], skipped: Counter[str]) -> ImageRecord:
    name = elem.get("name")
    where = f"{path}: <image id={elem.get('id')!r} name={name!r}>"
    if not name:
        raise DatasetError(f"{where}: missing attribute 'name'")
    frame_id = _int_attr(elem, "id", where)
    width, height = _int_attr(elem, "width", where), _int_attr(elem, "height", where)
    check_frame_size(width, height, where)
    instances: list[Instance] = []
    for index, child in enumerate(list(elem)):
        shape_where = f"{where} shape #{index} <{child.tag} label={child.get('label')!r}>"
        if child.tag in _SHAPE_TAGS:
            inst = parse_shape(child, width, height, shape_where)
            if inst is not None:
                instances.append(inst)
        elif child.tag in _IGNORED_SHAPE_TAGS:
            skipped[child.tag] += 1
    return ImageRecord(name=name, width=width, height=height, path=find_image(name, dirs, elem.get("subset")),
                       instances=instances, frame_id=frame_id)


def _common(elem: ET.Element, where: str) -> dict:
    label = elem.get("label")
    if not label:
        raise DatasetError(f"{where}: shape has no label")
    attributes = {a.get("name", ""): (a.text or "") for a in elem.findall("attribute") if a.get("name")}
    return {"label": label, "attributes": attributes, "occluded": elem.get("occluded", "0") == "1",
            "source": elem.get("source") or "manual"}


def parse_shape(elem: ET.Element, width: int, height: int, where: str) -> Instance | None:
    """One ``<polygon>``, ``<mask>`` or ``<box>`` as an Instance (None for an empty mask, logged)."""
    common = _common(elem, where)
    if elem.tag == "polygon":
        return Instance(polygon=parse_points(elem.get("points"), width, height, where), **common)
    if elem.tag == "mask":
        crop, origin = parse_mask(elem, width, height, where)
        if not crop.any():
            log.warning("%s: mask has no foreground pixels; skipped", where)
            return None
        return Instance(mask_crop=crop, mask_origin=origin, **common)
    if elem.tag == "box":
        corners = np.array([[_float_attr(elem, "xtl", where), _float_attr(elem, "ytl", where)],
                            [_float_attr(elem, "xbr", where), _float_attr(elem, "ybr", where)]])
        corners = clip_to_frame(corners, width, height, where)
        (x0, y0), (x1, y1) = corners
        if x1 < x0 or y1 < y0:
            raise DatasetError(f"{where}: box has xbr < xtl or ybr < ytl")
        if float(elem.get("rotation", "0") or 0) != 0:
            log.warning("%s: rotated box read as its unrotated extent", where)
        return Instance(box=(float(x0), float(y0), float(x1), float(y1)), **common)
    raise DatasetError(f"{where}: unsupported shape <{elem.tag}>")


def parse_points(text: str | None, width: int, height: int, where: str) -> np.ndarray:
    """``"x,y;x,y;..."`` as an ``(N, 2)`` array inside the frame; >= 3 distinct points required."""
    if not text:
        raise DatasetError(f"{where}: polygon has no points")
    try:
        pts = np.array([[float(v) for v in pair.split(",")] for pair in text.strip().split(";") if pair],
                       dtype=np.float64)
    except ValueError as exc:
        raise DatasetError(f"{where}: points {text[:60]!r} are not 'x,y;x,y;...' numbers") from exc
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise DatasetError(f"{where}: points {text[:60]!r} are not 'x,y' pairs")
    if len(np.unique(pts, axis=0)) < 3:
        raise DatasetError(f"{where}: a polygon needs at least 3 distinct points, got {len(pts)}; delete or "
                           "redraw this shape in CVAT")
    return clip_to_frame(pts, width, height, where)


def clip_to_frame(pts: np.ndarray, width: int, height: int, where: str,
                  tolerance: float = BOUNDS_TOLERANCE) -> np.ndarray:
    """Clip points that overshoot the frame by <= ``tolerance`` px; farther out is a DatasetError."""
    if not np.isfinite(pts).all():
        raise DatasetError(f"{where}: coordinates are not finite numbers")
    lo = pts.min(axis=0)
    hi = pts.max(axis=0)
    if lo[0] < -tolerance or lo[1] < -tolerance or hi[0] > width + tolerance or hi[1] > height + tolerance:
        raise DatasetError(f"{where}: coordinates span x {lo[0]:.2f}..{hi[0]:.2f}, "
                           f"y {lo[1]:.2f}..{hi[1]:.2f}, outside the {width}x{height} frame; "
                           "is the image size in the export right?")
    return np.clip(pts, [0.0, 0.0], [float(width), float(height)])


def parse_mask(elem: ET.Element, width: int, height: int, where: str) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode a ``<mask rle left top width height>`` into its crop and (left, top)."""
    left, top = _int_attr(elem, "left", where), _int_attr(elem, "top", where)
    w, h = _int_attr(elem, "width", where), _int_attr(elem, "height", where)
    if w <= 0 or h <= 0:
        raise DatasetError(f"{where}: mask size {w}x{h} is not positive")
    if left < 0 or top < 0 or left + w > width or top + h > height:
        raise DatasetError(f"{where}: mask box left={left} top={top} width={w} height={h} lies outside the "
                           f"{width}x{height} frame")
    rle_text = elem.get("rle")
    if rle_text is None:
        raise DatasetError(f"{where}: mask has no 'rle' attribute")
    try:
        rle = [float(v) for v in rle_text.replace(",", " ").split()]
        crop = mask_ops.cvat_rle_decode(rle, w, h)
    except ValueError as exc:
        raise DatasetError(f"{where}: bad mask RLE: {exc}") from exc
    return crop, (left, top)


# --- writing ---------------------------------------------------------------------------------

def label_color(name: str, index: int, known: dict[str, str] | None = None) -> str:
    """Deterministic colour: the source's, else the RV-PBS one, else a fixed palette entry."""
    if known and known.get(name):
        return known[name]
    return RVPBS_COLORS.get(name, PALETTE[index % len(PALETTE)])


def _label_type(kinds: set[str], declared: str | None) -> str:
    """The source's label type if it fits the shapes written, else the one type used, else ``any``."""
    if declared and (declared == "any" or kinds <= {declared}):
        return declared
    if len(kinds) == 1:
        return next(iter(kinds))  # Instance.kind names are CVAT's: polygon, mask, rectangle
    return "any"


def _all_labels(dataset: AnnotatedDataset) -> list[str]:
    labels = list(dict.fromkeys(dataset.labels))
    for image in dataset.images:
        for inst in image.instances:
            if inst.label not in labels:
                labels.append(inst.label)
    return labels


def frame_ids(dataset: AnnotatedDataset) -> list[int]:
    """The dataset's frame ids when they are set and increasing, else 0..N-1 (keeps the order on re-read)."""
    ids = [img.frame_id for img in dataset.images]
    if all(i is not None for i in ids) and all(a < b for a, b in pairwise(ids)):  # type: ignore[operator]
        return [int(i) for i in ids]  # type: ignore[arg-type]
    return list(range(len(dataset.images)))


def _sub(parent: ET.Element, tag: str, text: str | None = None) -> ET.Element:
    elem = ET.SubElement(parent, tag)
    if text is not None:
        elem.text = text
    return elem


def _meta(dataset: AnnotatedDataset, task_name: str, labels: list[str], ids: list[int]) -> ET.Element:
    # a fixed dataset.meta["timestamp"] makes the file reproducible (the synthetic generator sets one)
    now = str(dataset.meta.get("timestamp") or datetime.now(timezone.utc).isoformat(sep=" "))
    kinds: dict[str, set[str]] = {name: set() for name in labels}
    attr_names: dict[str, dict[str, None]] = {name: {} for name in labels}
    for image in dataset.images:
        for inst in image.instances:
            kinds[inst.label].add(inst.kind)
            attr_names[inst.label].update(dict.fromkeys(inst.attributes))
    colors = dataset.meta.get("label_colors") or {}
    types = dataset.meta.get("label_types") or {}
    meta = ET.Element("meta")
    task = _sub(meta, "task")
    for tag, text in (("id", "0"), ("name", task_name), ("size", str(len(dataset.images))),
                      ("mode", "annotation"), ("overlap", "0"), ("bugtracker", ""), ("created", now),
                      ("updated", now), ("subset", "default"), ("start_frame", str(ids[0] if ids else 0)),
                      ("stop_frame", str(ids[-1] if ids else 0)), ("frame_filter", "")):
        _sub(task, tag, text)
    labels_elem = _sub(task, "labels")
    for index, name in enumerate(labels):
        label = _sub(labels_elem, "label")
        _sub(label, "name", name)
        _sub(label, "color", label_color(name, index, colors))
        _sub(label, "type", _label_type(kinds[name], types.get(name)))
        attributes = _sub(label, "attributes")
        for attr in attr_names[name]:
            a = _sub(attributes, "attribute")
            for tag, text in (("name", attr), ("mutable", "False"), ("input_type", "text"),
                              ("default_value", ""), ("values", "")):
                _sub(a, tag, text)
    _sub(meta, "dumped", now)
    return meta


def _fmt(v: float) -> str:
    return f"{float(v):.2f}"


def _shape_element(parent: ET.Element, inst: Instance, width: int, height: int, where: str) -> None:
    common = {"label": inst.label, "source": inst.source or "manual",
              "occluded": "1" if inst.occluded else "0"}
    if inst.polygon is not None:
        pts = np.clip(inst.polygon, 0, [width, height])
        elem = ET.SubElement(parent, "polygon", {
            **common, "points": ";".join(f"{_fmt(x)},{_fmt(y)}" for x, y in pts), "z_order": "0"})
    elif inst.mask_crop is not None:
        cropped = _frame_crop(inst, width, height)
        if cropped is None:
            log.warning("%s: mask has no foreground inside the frame; not written", where)
            return
        crop, (xtl, ytl, xbr, ybr) = cropped
        rle = mask_ops.cvat_rle_encode(crop)
        elem = ET.SubElement(parent, "mask", {
            **common, "rle": ", ".join(str(r) for r in rle), "left": str(xtl), "top": str(ytl),
            "width": str(xbr - xtl + 1), "height": str(ybr - ytl + 1), "z_order": "0"})
    elif inst.box is not None:
        x0, y0, x1, y1 = inst.box
        elem = ET.SubElement(parent, "box", {
            **common, "xtl": _fmt(x0), "ytl": _fmt(y0), "xbr": _fmt(x1), "ybr": _fmt(y1), "z_order": "0"})
    else:
        log.warning("%s: shape has no geometry; not written", where)
        return
    for name, value in inst.attributes.items():
        _sub(elem, "attribute", str(value)).set("name", name)


def _frame_crop(inst: Instance, width: int, height: int
                ) -> tuple[np.ndarray, tuple[int, int, int, int]] | None:
    """The instance's mask crop clipped to the frame and tightened, with its inclusive frame box."""
    crop = inst.mask_crop
    left, top = inst.mask_origin
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + crop.shape[1], width), min(top + crop.shape[0], height)  # type: ignore[union-attr]
    if x1 <= x0 or y1 <= y0:
        return None
    tight = mask_ops.tight_crop(crop[y0 - top:y1 - top, x0 - left:x1 - left])  # type: ignore[index]
    if tight is None:
        return None
    sub, (xtl, ytl, xbr, ybr) = tight
    return sub, (xtl + x0, ytl + y0, xbr + x0, ybr + y0)


def cvat_xml_bytes(dataset: AnnotatedDataset, task_name: str = "task") -> bytes:
    """The dataset as CVAT for images 1.1 XML (see :func:`write_cvat_xml`)."""
    labels = _all_labels(dataset)
    ids = frame_ids(dataset)
    root = ET.Element("annotations")
    _sub(root, "version", "1.1")
    root.append(_meta(dataset, task_name, labels, ids))
    for frame_id, image in zip(ids, dataset.images, strict=True):
        elem = ET.SubElement(root, "image", {"id": str(frame_id), "name": image.name,
                                             "width": str(image.width), "height": str(image.height)})
        for index, inst in enumerate(image.instances):
            _shape_element(elem, inst, image.width, image.height, f"image {image.name!r} shape #{index}")
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def write_cvat_xml(dataset: AnnotatedDataset, path: Path, task_name: str = "task") -> None:
    """Write ``dataset`` as a CVAT for images 1.1 ``annotations.xml`` (atomically).

    Polygons are written with 2 decimals, masks as CVAT RLE of their tight crop with an inclusive
    ``left/top/width/height`` box, rectangles as ``<box>``; labels get deterministic colours.
    """
    atomic_write_bytes(Path(path), cvat_xml_bytes(dataset, task_name))
    log.info("wrote %d frames to %s", len(dataset.images), path)

