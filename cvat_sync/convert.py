"""CVAT API annotations (``GET /api/{tasks,jobs}/{id}/annotations``) -> the trainer's in-memory types.

Pure functions, no HTTP. Shapes (CVAT 2.x, see the 2.23.1 captures):

- ``polygon``: ``points`` = flat ``[x1, y1, x2, y2, ...]`` in frame pixels;
- ``mask``: ``points`` = CVAT RLE over the tight box (row-major, starting with a background run) followed
  by the *inclusive* box ``[left, top, right, bottom]``; the server returns these numbers as floats;
- ``rectangle``: ``points`` = ``[xtl, ytl, xbr, ybr]``.

Other shape types (points, polylines, ellipses, skeletons) and tracks carry no cell outline usable for
training; they are counted and reported, not converted.

Shape attributes come as ``[{spec_id, value}]``; they are stored by attribute *name* (from the task's labels,
``GET /api/labels?task_id=``), as a dataset export stores them, so both ways of pulling give the same
``Instance.attributes``. An id the labels do not declare is kept as ``"attribute <id>"`` (and reported).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from wbc_core.data.masks import cvat_rle_decode
from wbc_core.data.types import MAX_FRAME_PIXELS, Instance

log = logging.getLogger(__name__)

SUPPORTED = ("polygon", "mask", "rectangle")


class ShapeError(ValueError):
    """A shape's geometry cannot be read (the message names the shape)."""


@dataclass
class Converted:
    """Instances per frame, plus what was left out and why (shown in the pull summary)."""

    frames: dict[int, list[Instance]] = field(default_factory=dict)
    skipped: Counter[str] = field(default_factory=Counter)
    unknown_attributes: Counter[int | str] = field(default_factory=Counter)  # attribute id -> values kept


def label_attribute_names(labels: list[dict]) -> dict[int, str]:
    """Attribute id -> name over a task's labels (``GET /api/labels`` results: ``attributes: [{id, name}]``)."""
    names: dict[int, str] = {}
    for label in labels:
        for attr in label.get("attributes") or []:
            try:
                names[int(attr["id"])] = str(attr["name"])
            except (KeyError, TypeError, ValueError):
                continue
    return names


def unknown_attribute_key(spec_id: object) -> str:
    return f"attribute {spec_id}"


def shape_attributes(shape: dict, names: dict[int, str] | None, unknown: Counter | None = None) -> dict[str, str]:
    """A shape's ``[{spec_id, value}]`` as ``{name: value}``; an id not in ``names`` stays under
    ``"attribute <id>"`` (and is counted in ``unknown``)."""
    out: dict[str, str] = {}
    for attr in shape.get("attributes") or []:
        spec_id = attr.get("spec_id")
        try:
            name = (names or {}).get(int(spec_id))
        except (TypeError, ValueError):
            name = None
        if name is None:
            name = unknown_attribute_key(spec_id)
            if unknown is not None:
                unknown[spec_id] += 1
        out[name] = str(attr.get("value"))
    return out


def shape_to_instance(shape: dict, label: str, attribute_names: dict[int, str] | None = None,
                      unknown_attributes: Counter | None = None,
                      frame_size: tuple[int, int] | None = None) -> Instance:
    """One CVAT API shape as an :class:`Instance` (raises :class:`ShapeError`). ``attribute_names`` maps
    attribute ids to names (see :func:`shape_attributes`); a mask may not be larger than ``frame_size``
    (width, height), or than :data:`MAX_FRAME_PIXELS` when it is not known."""
    kind = shape.get("type")
    where = f"shape {shape.get('id')} ({kind}, frame {shape.get('frame')})"
    raw = shape.get("points") or []
    if not isinstance(raw, list):
        raise ShapeError(f"{where}: points must be a list, got {type(raw).__name__}")
    try:
        points = [float(v) for v in raw]
    except (TypeError, ValueError):
        raise ShapeError(f"{where}: points must be numbers") from None
    if not all(math.isfinite(v) for v in points):
        raise ShapeError(f"{where}: points must be finite numbers")
    attributes = shape_attributes(shape, attribute_names, unknown_attributes)
    common = {"label": label, "occluded": bool(shape.get("occluded", False)),
              "source": str(shape.get("source") or "manual"), "attributes": attributes}
    if kind == "polygon":
        if len(points) < 6 or len(points) % 2:
            raise ShapeError(f"{where}: a polygon needs >= 3 x,y pairs, got {len(points)} numbers")
        return Instance(polygon=np.asarray(points).reshape(-1, 2), **common)
    if kind == "mask":
        if len(points) < 5:
            raise ShapeError(f"{where}: a mask needs RLE + [left, top, right, bottom], got {len(points)} numbers")
        left, top, right, bottom = (round(v) for v in points[-4:])
        width, height = right - left + 1, bottom - top + 1
        if width <= 0 or height <= 0:
            raise ShapeError(f"{where}: mask box [{left}, {top}, {right}, {bottom}] is empty")
        if frame_size is not None and (width > frame_size[0] + 1 or height > frame_size[1] + 1):
            raise ShapeError(f"{where}: mask box {width}x{height} is larger than the {frame_size[0]}x"
                             f"{frame_size[1]} frame")
        if width * height > MAX_FRAME_PIXELS:
            raise ShapeError(f"{where}: mask box {width}x{height} is larger than any frame")
        try:
            crop = cvat_rle_decode(points[:-4], width, height)
        except (ValueError, OverflowError) as exc:
            raise ShapeError(f"{where}: {exc}") from None
        return Instance(mask_crop=crop, mask_origin=(left, top), **common)
    if kind == "rectangle":
        if len(points) != 4:
            raise ShapeError(f"{where}: a rectangle needs 4 numbers, got {len(points)}")
        x0, y0, x1, y1 = points
        return Instance(box=(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), **common)
    raise ShapeError(f"{where}: unsupported shape type {kind!r}")


def _int(value: object) -> int | None:
    """A shape's frame or label id as an int (None when the server sent something else)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return int(value)
    except (ValueError, OverflowError):
        return None


def convert_annotations(annotations: dict, label_names: dict[int, str], frames: set[int] | None = None,
                        attribute_names: dict[int, str] | None = None,
                        frame_sizes: dict[int, tuple[int, int]] | None = None) -> Converted:
    """Shapes of an annotations response grouped by frame, for ``frames`` only (all when None).

    ``label_names`` maps CVAT label ids to names, ``attribute_names`` attribute ids to names (see
    :func:`label_attribute_names`). Shapes of unknown labels, unsupported types, broken geometry, and all tracks
    are counted in ``skipped`` under a reason. Attribute ids the labels do not declare are kept as
    ``"attribute <id>"``, counted in ``unknown_attributes`` and logged once (one warning per call).
    ``frame_sizes`` (frame -> (width, height)) bounds mask boxes. Malformed shapes (not an object, a frame or
    label that is not a number, points that are not finite numbers) are counted, never raised.
    """
    out = Converted()
    shapes = annotations.get("shapes") if isinstance(annotations, dict) else None
    for shape in shapes if isinstance(shapes, list) else []:
        frame = _int(shape.get("frame", -1)) if isinstance(shape, dict) else None
        label_id = _int(shape.get("label_id", -1)) if isinstance(shape, dict) else None
        if frame is None or label_id is None:
            out.skipped["malformed shapes"] += 1
            continue
        if frames is not None and frame not in frames:
            continue
        name = label_names.get(label_id)
        if name is None:
            out.skipped[f"label id {shape.get('label_id')} not in the task's labels"] += 1
            continue
        if shape.get("type") not in SUPPORTED:
            out.skipped[f"{shape.get('type')} shapes (no cell outline)"] += 1
            continue
        try:
            instance = shape_to_instance(shape, name, attribute_names, out.unknown_attributes,
                                         (frame_sizes or {}).get(frame))
        except (ShapeError, TypeError, ValueError, OverflowError, AttributeError):
            out.skipped["shapes with broken geometry"] += 1
            continue
        out.frames.setdefault(frame, []).append(instance)
    tracks = annotations.get("tracks") if isinstance(annotations, dict) else None
    if isinstance(tracks, list) and tracks:
        out.skipped["tracks (video annotation)"] += len(tracks)
    if out.unknown_attributes:
        log.warning("attribute id(s) %s are not declared by the task's labels; their values are kept as %s "
                    "(%d values)", sorted(out.unknown_attributes, key=str),
                    ", ".join(repr(unknown_attribute_key(k)) for k in sorted(out.unknown_attributes, key=str)),
                    sum(out.unknown_attributes.values()))
    return out
