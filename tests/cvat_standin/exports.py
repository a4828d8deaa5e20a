"""Export zips ("COCO 1.0", "CVAT for images 1.1") built from the stand-in's current task state, laid out like
the real CVAT 2.23.1 zips (captures README section 13), plus the export request ids and file names.

- COCO 1.0: ``annotations/instances_default.json`` (compact JSON from :func:`wbc_core.data.coco.coco_dict`,
  keys re-ordered as Datumaro writes them) and, with images, ``images/default/<frame name>``.
- CVAT for images 1.1: ``annotations.xml`` (written here, byte for byte in the real layout: task meta with
  segments and owner, labels with ``<type>``, ``<polygon>``/``<mask>``/``<box>`` with 2-decimal coordinates)
  and, with images, ``images/<frame name>``.

Both are stored (uncompressed) zips; deleted frames are left out. Shapes of other types (polyline, points,
ellipse, cuboid, skeleton) are left out with a warning: the stand-in does not export them.
"""

from __future__ import annotations

import json
import logging
import zipfile
from datetime import datetime, timezone
from io import BytesIO
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import numpy as np

from tests.cvat_standin.state import CvatState, Label, Task
from wbc_core.data.coco import coco_dict
from wbc_core.data.masks import cvat_rle_decode
from wbc_core.data.types import AnnotatedDataset, ImageRecord, Instance

log = logging.getLogger(__name__)

COCO = "COCO 1.0"
CVAT_IMAGES = "CVAT for images 1.1"
BUILT_FORMATS = (COCO, CVAT_IMAGES)

EXPORTERS = (
    "COCO 1.0", "COCO Keypoints 1.0", "CVAT for video 1.1", "CVAT for images 1.1", "Datumaro 1.0",
    "Datumaro 3D 1.0", "LabelMe 3.0", "Segmentation mask 1.1", "MOT 1.1", "MOTS PNG 1.0", "PASCAL VOC 1.1",
    "YOLO 1.1", "YOLOv8 Detection 1.0", "YOLOv8 Oriented Bounding Boxes 1.0", "YOLOv8 Segmentation 1.0",
    "YOLOv8 Pose 1.0", "YOLOv8 Classification 1.0", "ImageNet 1.0", "CamVid 1.0", "WiderFace 1.0",
    "VGGFace2 1.0", "Market-1501 1.0", "ICDAR Recognition 1.0", "ICDAR Localization 1.0",
    "ICDAR Segmentation 1.0", "Kitti Raw Format 1.0", "Sly Point Cloud Format 1.0", "KITTI 1.0", "LFW 1.0",
    "Cityscapes 1.0", "Open Images V6 1.0",
)
IMPORTERS = (
    "COCO 1.0", "COCO Keypoints 1.0", "CVAT 1.1", "Datumaro 1.0", "Datumaro 3D 1.0", "LabelMe 3.0",
    "Segmentation mask 1.1", "MOT 1.1", "MOTS PNG 1.0", "PASCAL VOC 1.1", "YOLO 1.1", "YOLOv8 Detection 1.0",
    "YOLOv8 Segmentation 1.0", "YOLOv8 Oriented Bounding Boxes 1.0", "YOLOv8 Pose 1.0",
    "YOLOv8 Classification 1.0", "ImageNet 1.0", "CamVid 1.0", "WiderFace 1.0", "VGGFace2 1.0",
    "Market-1501 1.0", "ICDAR Recognition 1.0", "ICDAR Localization 1.0", "ICDAR Segmentation 1.0",
    "Kitti Raw Format 1.0", "Sly Point Cloud Format 1.0", "KITTI 1.0", "LFW 1.0", "Cityscapes 1.0",
    "Open Images V6 1.0",
)
_3D = {"Datumaro 3D 1.0", "Kitti Raw Format 1.0", "Sly Point Cloud Format 1.0"}
_IMPORT_EXT = {"CVAT 1.1": "XML, ZIP", "COCO 1.0": "JSON, ZIP", "COCO Keypoints 1.0": "JSON, ZIP",
               "Datumaro 1.0": "JSON, ZIP", "Datumaro 3D 1.0": "JSON, ZIP"}


def format_entry(name: str, importer: bool) -> dict[str, Any]:
    """One ``/api/server/annotation/formats`` entry (``ext`` is exact only for the captured two)."""
    return {"name": name, "ext": _IMPORT_EXT.get(name, "ZIP") if importer else "ZIP",
            "version": name.rsplit(" ", 1)[-1], "enabled": True, "dimension": "3d" if name in _3D else "2d"}


def rq_id_for(task_id: int, fmt: str, save_images: bool, user_id: int, new_style: bool = False) -> str:
    """The deterministic export request id (README quirk 11); ``new_style`` is the >= 2.32 form."""
    sub = "dataset" if save_images else "annotations"
    if new_style:
        code = fmt.replace(" ", "_").replace(".", "~")
        return f"action=export&target=task&target_id={task_id}&user_id={user_id}&format={code}&subresource={sub}"
    code = fmt.replace(" ", "_").replace(".", "@")
    return f"export:task-{task_id}-{sub}-in-{code}-format-by-{user_id}"


def export_filename(task: Task, fmt: str, save_images: bool) -> str:
    """``task_<name>_<dataset|annotations>_<updated %Y_%m_%d_%H_%M_%S>_<format lower>.zip`` (spaces kept)."""
    sub = "dataset" if save_images else "annotations"
    return f"task_{task.name}_{sub}_{task.updated.strftime('%Y_%m_%d_%H_%M_%S')}_{fmt.lower()}.zip"


# --- CVAT API shapes -> trainer types --------------------------------------------------------------------

def shape_to_instance(shape: dict[str, Any], labels: dict[int, Label]) -> Instance | None:
    """One stored API shape as a :class:`wbc_core.data.types.Instance` (None for unsupported types)."""
    label = labels[shape["label_id"]]
    attr_names = {a["id"]: a["name"] for a in label.attributes}
    attributes = {attr_names.get(a.get("spec_id"), str(a.get("spec_id"))): str(a.get("value", ""))
                  for a in shape.get("attributes", [])}
    common = {"label": label.name, "attributes": attributes, "occluded": bool(shape.get("occluded")),
              "source": shape.get("source", "manual")}
    pts = [float(v) for v in shape["points"]]
    kind = shape["type"]
    if kind == "polygon":
        return Instance(polygon=np.asarray(pts).reshape(-1, 2), **common)
    if kind == "mask":
        left, top, right, bottom = (round(v) for v in pts[-4:])
        crop = cvat_rle_decode(pts[:-4], right - left + 1, bottom - top + 1)
        return Instance(mask_crop=crop, mask_origin=(left, top), **common)
    if kind == "rectangle":
        x0, y0, x1, y1 = pts[:4]
        return Instance(box=(x0, y0, x1, y1), **common)
    log.warning("stand-in export: a %s shape (id %s) is not exported", kind, shape.get("id"))
    return None


def _kept_frames(task: Task) -> list[int]:
    deleted = set(task.deleted_frames)
    return [i for i in range(len(task.frames)) if i not in deleted]


def _sorted_shapes(task: Task) -> list[dict[str, Any]]:
    return sorted(task.shapes, key=lambda s: (s["frame"], s["id"]))


def task_dataset(state: CvatState, task: Task) -> tuple[AnnotatedDataset, list[list[dict[str, Any]]]]:
    """The task as an AnnotatedDataset (kept frames only) and, per image, the shapes behind its instances."""
    labels = state.task_labels(task)
    by_id = {lbl.id: lbl for lbl in labels}
    per_frame: dict[int, list[dict[str, Any]]] = {}
    for shape in _sorted_shapes(task):
        per_frame.setdefault(shape["frame"], []).append(shape)
    images, sources = [], []
    for index in _kept_frames(task):
        frame = task.frames[index]
        record = ImageRecord(name=frame.name, width=frame.width, height=frame.height, frame_id=index)
        used = []
        for shape in per_frame.get(index, []):
            inst = shape_to_instance(shape, by_id)
            if inst is not None:
                record.instances.append(inst)
                used.append(shape)
        images.append(record)
        sources.append(used)
    dataset = AnnotatedDataset(images=images, labels=[lbl.name for lbl in labels], source=f"task {task.id}",
                               meta={"label_types": {lbl.name: lbl.type for lbl in labels},
                                     "label_colors": {lbl.name: lbl.color for lbl in labels}})
    return dataset, sources


_ANN_KEYS = ("id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd", "attributes")


def coco_json(state: CvatState, task: Task) -> bytes:
    """``instances_default.json`` as CVAT 2.23.1 writes it (compact, Datumaro key order)."""
    dataset, sources = task_dataset(state, task)
    data = coco_dict(dataset)
    shapes = [s for per_image in sources for s in per_image]
    anns = []
    if len(data["annotations"]) == len(shapes):
        for ann, shape in zip(data["annotations"], shapes, strict=True):
            if shape["type"] == "rectangle":
                ann["attributes"]["rotation"] = float(shape.get("rotation", 0.0))
    for ann in data["annotations"]:
        seg = ann.get("segmentation")
        if isinstance(seg, dict):  # Datumaro writes "counts" before "size"
            ann["segmentation"] = {"counts": seg["counts"], "size": seg["size"], **seg}
        ordered = {k: ann[k] for k in _ANN_KEYS if k in ann}
        ordered.update({k: v for k, v in ann.items() if k not in ordered})
        anns.append(ordered)
    data["annotations"] = anns
    return json.dumps(data, separators=(",", ":")).encode("utf-8")


# --- CVAT for images 1.1 XML -----------------------------------------------------------------------------

def _f2(v: float) -> str:
    return f"{float(v):.2f}"


def _dt(dt: datetime) -> str:
    return dt.isoformat(sep=" ")


def cvat_xml(state: CvatState, task: Task, base_url: str, dumped: datetime) -> bytes:
    """``annotations.xml`` in the layout of the real export (2-space indent, open/close tags on own lines)."""
    owner = state.users.get(task.owner_id)
    assignee = state.users.get(task.assignee_id) if task.assignee_id else None
    labels = state.task_labels(task)
    by_id = {lbl.id: lbl for lbl in labels}
    out: list[str] = ['<?xml version="1.0" encoding="utf-8"?>', "<annotations>", "  <version>1.1</version>",
                      "  <meta>", "    <task>"]

    def el(indent: int, tag: str, text: str | int | None) -> None:
        out.append(f"{' ' * indent}<{tag}>{escape(str(text) if text is not None else '')}</{tag}>")

    kept = _kept_frames(task)
    el(6, "id", task.id)
    el(6, "name", task.name)
    el(6, "size", len(task.frames))
    el(6, "mode", "annotation")
    el(6, "overlap", task.overlap or 0)
    el(6, "bugtracker", "")
    el(6, "created", _dt(task.created))
    el(6, "updated", _dt(task.updated))
    el(6, "subset", task.subset or "default")
    el(6, "start_frame", 0)
    el(6, "stop_frame", max(len(task.frames) - 1, 0))
    el(6, "frame_filter", "")
    out.append("      <segments>")
    for jid in task.jobs:
        job = state.jobs[jid]
        out.append("        <segment>")
        el(10, "id", job.id)
        el(10, "start", job.start_frame)
        el(10, "stop", job.stop_frame)
        el(10, "url", f"{base_url}/api/jobs/{job.id}")
        out.append("        </segment>")
    out.append("      </segments>")
    out.append("      <owner>")
    el(8, "username", owner.username if owner else "")
    el(8, "email", owner.email if owner else "")
    out.append("      </owner>")
    if assignee is None:
        el(6, "assignee", "")
    else:
        out.append("      <assignee>")
        el(8, "username", assignee.username)
        el(8, "email", assignee.email)
        out.append("      </assignee>")
    out.append("      <labels>")
    for lbl in labels:
        out.append("        <label>")
        el(10, "name", lbl.name)
        el(10, "color", lbl.color)
        el(10, "type", lbl.type)
        out.append("          <attributes>")
        for attr in lbl.attributes:
            out.append("            <attribute>")
            el(14, "name", attr["name"])
            el(14, "mutable", "True" if attr["mutable"] else "False")
            el(14, "input_type", attr["input_type"])
            el(14, "default_value", attr["default_value"])
            el(14, "values", "\n".join(attr["values"]))
            out.append("            </attribute>")
        out.append("          </attributes>")
        out.append("        </label>")
    out.append("      </labels>")
    out.append("    </task>")
    el(4, "dumped", _dt(dumped))
    out.append("  </meta>")
    per_frame: dict[int, list[dict[str, Any]]] = {}
    for shape in _sorted_shapes(task):
        per_frame.setdefault(shape["frame"], []).append(shape)
    for index in kept:
        frame = task.frames[index]
        out.append(f'  <image id="{index}" name={quoteattr(frame.name)} width="{frame.width}" '
                   f'height="{frame.height}">')
        for shape in per_frame.get(index, []):
            line = _xml_shape(shape, by_id)
            if line is None:
                continue
            out.append(f"    <{line[0]} {line[1]}>")
            lbl = by_id[shape["label_id"]]
            names = {a["id"]: a["name"] for a in lbl.attributes}
            for attr in shape.get("attributes", []):
                name = names.get(attr.get("spec_id"), str(attr.get("spec_id")))
                out.append(f"      <attribute name={quoteattr(name)}>{escape(str(attr.get('value', '')))}"
                           "</attribute>")
            out.append(f"    </{line[0]}>")
        out.append("  </image>")
    out.append("</annotations>")
    return ("\n".join(out) + "\n").encode("utf-8")


def _xml_shape(shape: dict[str, Any], labels: dict[int, Label]) -> tuple[str, str] | None:
    pts = [float(v) for v in shape["points"]]
    attrs = [("label", labels[shape["label_id"]].name), ("source", shape.get("source", "manual")),
             ("occluded", "1" if shape.get("occluded") else "0")]
    kind = shape["type"]
    if kind == "polygon":
        tag = "polygon"
        attrs.append(("points", ";".join(f"{_f2(x)},{_f2(y)}" for x, y in zip(pts[0::2], pts[1::2], strict=True))))
    elif kind == "mask":
        tag = "mask"
        left, top, right, bottom = (round(v) for v in pts[-4:])
        attrs += [("rle", ", ".join(str(round(v)) for v in pts[:-4])), ("left", str(left)),
                  ("top", str(top)), ("width", str(right - left + 1)), ("height", str(bottom - top + 1))]
    elif kind == "rectangle":
        tag = "box"
        attrs += [("xtl", _f2(pts[0])), ("ytl", _f2(pts[1])), ("xbr", _f2(pts[2])), ("ybr", _f2(pts[3]))]
        if shape.get("rotation"):
            attrs.append(("rotation", _f2(shape["rotation"])))
    else:
        log.warning("stand-in export: a %s shape (id %s) is not exported", kind, shape.get("id"))
        return None
    attrs.append(("z_order", str(int(shape.get("z_order", 0)))))
    if shape.get("group"):
        attrs.append(("group_id", str(int(shape["group"]))))
    return tag, " ".join(f"{k}={quoteattr(v)}" for k, v in attrs)


# --- the zip ---------------------------------------------------------------------------------------------

def build_zip(state: CvatState, task: Task, fmt: str, save_images: bool, base_url: str,
              when: datetime) -> bytes:
    """The export zip of ``task`` in ``fmt`` (one of :data:`BUILT_FORMATS`)."""
    stamp = when.astimezone(timezone.utc).timetuple()[:6]
    buf = BytesIO()

    def add(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
        info = zipfile.ZipInfo(name, date_time=stamp)
        info.external_attr = 0o100644 << 16
        info.compress_type = zipfile.ZIP_STORED
        zf.writestr(info, data)

    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        if fmt == COCO:
            if save_images:
                for index in _kept_frames(task):
                    add(zf, f"images/default/{task.frames[index].name}", task.frames[index].data)
            add(zf, "annotations/instances_default.json", coco_json(state, task))
        elif fmt == CVAT_IMAGES:
            add(zf, "annotations.xml", cvat_xml(state, task, base_url, when))
            if save_images:
                for index in _kept_frames(task):
                    add(zf, f"images/{task.frames[index].name}", task.frames[index].data)
        else:
            raise ValueError(f"the stand-in cannot build {fmt!r} exports (only {BUILT_FORMATS})")
    return buf.getvalue()
