"""Build a stand-in task from a real CVAT for images 1.1 XML (e.g. the RV-PBS exports), with synthetic slides.

The frames are simple generated JPEGs (a pink field, pale red cells, and a purple blob filling each annotated
cell), so a pulled dataset has images of the declared size whose cells sit where the polygons are.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from tests.cvat_standin.state import CvatState
from wbc_core.data.cvat_xml import label_color
from wbc_core.data.masks import cvat_rle_decode, cvat_rle_encode, tight_crop

log = logging.getLogger(__name__)


def synthetic_slide_jpeg(width: int, height: int, cells: list[np.ndarray] | None = None, seed: int = 0,
                         quality: int = 85) -> bytes:
    """A deterministic smear-like JPEG: pink background, pale red cells, purple ``cells`` (polygons (N, 2))."""
    rng = np.random.default_rng(seed)
    img = np.empty((height, width, 3), np.uint8)
    img[:] = (214, 196, 236)  # BGR: pale pink
    radius = max(4, int(min(width, height) * 0.035))
    for _ in range(max(8, (width * height) // (radius * radius * 12))):
        cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(radius * rng.uniform(0.8, 1.2))
        cv2.circle(img, (cx, cy), r, (170, 150, 225), -1, cv2.LINE_AA)
        cv2.circle(img, (cx, cy), max(1, r // 2), (190, 172, 232), -1, cv2.LINE_AA)
    for poly in cells or []:
        pts = np.round(np.asarray(poly, np.float64).reshape(-1, 2)).astype(np.int32)
        if len(pts) >= 3:
            cv2.fillPoly(img, [pts], (205, 160, 190), cv2.LINE_AA)
            centre = pts.mean(axis=0)
            inner = np.round(centre + (pts - centre) * 0.6).astype(np.int32)
            cv2.fillPoly(img, [inner], (140, 60, 110), cv2.LINE_AA)
    img = cv2.GaussianBlur(img, (0, 0), 1.2)
    noise = rng.normal(0, 1.0, (height // 4 + 1, width // 4 + 1, 3))  # low-frequency mottle, cheap to encode
    noise = cv2.resize(noise, (width, height), interpolation=cv2.INTER_LINEAR)
    img = np.clip(img.astype(np.float64) + noise * 2.0, 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("could not encode a synthetic slide")
    return buf.tobytes()


def _points(text: str) -> np.ndarray:
    return np.asarray([[float(v) for v in pair.split(",")] for pair in text.strip().split(";") if pair],
                      np.float64)


def task_from_cvat_xml(server: CvatState, xml_path: str | Path, frame_size: tuple[int, int] | None = (1008, 756),
                       *, name: str | None = None, max_frames: int | None = None, segment_size: int | None = None,
                       label_types: dict[str, str] | None = None, seed: int = 0, **task_kwargs: Any) -> int:
    """Create a task from a CVAT for images 1.1 ``annotations.xml``; returns the task id.

    Frames are ordered by ``<image id>`` (RV-PBS files list some in descending order), named as in the XML and
    drawn by :func:`synthetic_slide_jpeg` at ``frame_size`` (width, height), or at each image's declared size
    when ``frame_size`` is None. ``<polygon>``, ``<box>`` and ``<mask>`` shapes are scaled to the frame (2
    decimals); other shapes are skipped. Labels come from ``<meta>`` (or, without one, from the shapes) with
    the file's colours; their type is the file's ``<type>``, ``label_types[name]``, or ``"any"``.
    ``task_kwargs`` go to :meth:`CvatState.add_task` (``project_id``, ``org``, ``id``, ``job_ids``, ...).
    """
    xml_path = Path(xml_path)
    root = ET.parse(xml_path).getroot()
    label_specs: list[dict[str, Any]] = []
    declared = root.findall("./meta/task/labels/label") or root.findall("./meta/project/labels/label")
    for index, elem in enumerate(declared):
        lname = elem.findtext("name") or ""
        label_specs.append({"name": lname, "color": elem.findtext("color") or label_color(lname, index),
                            "type": elem.findtext("type") or (label_types or {}).get(lname, "any")})
    images = sorted(root.findall("./image"), key=lambda e: int(e.get("id", "0")))
    if max_frames is not None:
        images = images[:max_frames]
    known = {spec["name"] for spec in label_specs}
    for elem in images:
        for shape in elem:
            lname = shape.get("label")
            if lname and lname not in known:
                known.add(lname)
                label_specs.append({"name": lname, "color": label_color(lname, len(label_specs)),
                                    "type": (label_types or {}).get(lname, "any")})
    frames: list[tuple[str, bytes]] = []
    pending: list[tuple[int, str, str, list[float], bool]] = []  # frame, label, type, points, occluded
    for frame_index, elem in enumerate(images):
        native_w, native_h = int(elem.get("width", "0")), int(elem.get("height", "0"))
        width, height = frame_size if frame_size else (native_w, native_h)
        sx, sy = width / native_w, height / native_h
        cells = []
        for shape in elem:
            label = shape.get("label", "")
            occluded = shape.get("occluded") == "1"
            if shape.tag == "polygon":
                pts = _points(shape.get("points", "")) * [sx, sy]
                pts = np.clip(pts, 0, [width, height])
                cells.append(pts)
                pending.append((frame_index, label, "polygon", [round(float(v), 2) for v in pts.reshape(-1)],
                                occluded))
            elif shape.tag == "box":
                box = [float(shape.get(k, "0")) for k in ("xtl", "ytl", "xbr", "ybr")]
                scaled = [round(box[0] * sx, 2), round(box[1] * sy, 2), round(box[2] * sx, 2), round(box[3] * sy, 2)]
                pending.append((frame_index, label, "rectangle", scaled, occluded))
            elif shape.tag == "mask":
                points = _scaled_mask(shape, sx, sy, width, height)
                if points is not None:
                    pending.append((frame_index, label, "mask", points, occluded))
            else:
                log.debug("%s: skipping a <%s> shape", xml_path, shape.tag)
        frames.append((elem.get("name", f"frame_{frame_index:06d}.jpg"),
                       synthetic_slide_jpeg(width, height, cells, seed=seed * 100_003 + frame_index)))
    task_name = name or root.findtext("./meta/task/name") or xml_path.stem
    task_id = server.add_task(task_name, frames=frames, labels=label_specs, segment_size=segment_size,
                              **task_kwargs)
    label_ids = {lbl.name: lbl.id for lbl in server.task_labels(server.task(task_id))}
    shapes = [{"type": kind, "frame": frame, "label_id": label_ids[label], "points": points, "occluded": occ}
              for frame, label, kind, points, occ in pending if label in label_ids]
    server.set_annotations(task_id, shapes)
    log.info("stand-in task %d from %s: %d frames, %d shapes", task_id, xml_path, len(frames), len(shapes))
    return task_id


def _scaled_mask(shape: ET.Element, sx: float, sy: float, width: int, height: int) -> list[int] | None:
    left, top = int(shape.get("left", "0")), int(shape.get("top", "0"))
    w, h = int(shape.get("width", "0")), int(shape.get("height", "0"))
    rle = [int(v) for v in (shape.get("rle") or "").replace(" ", "").split(",") if v]
    crop = cvat_rle_decode(rle, w, h)
    if (sx, sy) == (1.0, 1.0):
        full_crop, x0, y0 = crop, left, top
    else:
        x0, y0 = round(left * sx), round(top * sy)
        new_w, new_h = max(1, round(w * sx)), max(1, round(h * sy))
        full_crop = cv2.resize(crop.astype(np.uint8), (new_w, new_h), interpolation=cv2.INTER_NEAREST) > 0
    canvas = np.zeros((height, width), bool)
    y1, x1 = min(y0 + full_crop.shape[0], height), min(x0 + full_crop.shape[1], width)
    canvas[y0:y1, x0:x1] = full_crop[:y1 - y0, :x1 - x0]
    tight = tight_crop(canvas)
    if tight is None:
        return None
    sub, box = tight
    return cvat_rle_encode(sub) + list(box)


def dataset_shapes(folder: str | Path, label_ids: dict[str, int], shift: float = 0.0) -> list[dict[str, Any]]:
    """The polygons of an annotated dataset folder (any export the trainer reads; frames in name order) as
    CVAT API shapes. ``shift`` > 0 corrupts them on purpose: every outline moves by that share of the frame
    (wrapping around), so it outlines background instead of its cell."""
    from wbc_core.data.loader import load_dataset

    shapes = []
    records = sorted(load_dataset(folder).images, key=lambda r: r.name)
    for frame, record in enumerate(records):
        for inst in record.instances:
            if inst.polygon is None:
                continue
            pts = inst.polygon.copy()
            if shift:
                size = np.array([record.width, record.height], np.float64)
                moved = pts.mean(axis=0) + shift * size
                pts = pts - pts.mean(axis=0) + np.mod(moved, size)
                pts = np.clip(pts, 0, size - 1)
            shapes.append({"type": "polygon", "frame": frame, "label_id": label_ids[inst.label],
                           "points": [round(float(v), 2) for v in pts.reshape(-1)]})
    return shapes


def task_from_dataset(server: CvatState, folder: str | Path, name: str, *, segment_size: int | None = None,
                      completed: bool = True, **task_kwargs: Any) -> int:
    """A task holding a dataset folder's own image files (byte for byte, name order) and its polygons, with the
    10 RV-PBS labels; every job ``completed`` unless told otherwise. Returns the task id."""
    from wbc_core.labels import RVPBS_LABELS

    folder = Path(folder)
    paths = sorted(p for p in (folder / "images").iterdir() if p.is_file())
    tid = server.add_task(name, frames=[(p.name, p.read_bytes()) for p in paths],
                          labels=[{"name": n, "type": "polygon"} for n in RVPBS_LABELS], segment_size=segment_size,
                          **task_kwargs)
    server.set_annotations(tid, dataset_shapes(folder, label_ids(server, tid)))
    if completed:
        for job in server.task(tid).jobs:
            server.set_job_state(job, state="completed")
    return tid


def label_ids(server: CvatState, task_id: int) -> dict[str, int]:
    return {lab.name: lab.id for lab in server.task_labels(server.task(task_id))}
