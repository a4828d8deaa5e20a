"""CVAT detector results: a serializer of :meth:`wbc_core.detect.Predictor.detect`'s output, nothing more.

Every cell becomes one ``mask`` item (``serverless/`` returns these to CVAT's Nuclio gateway):

- ``mask``: the flat 0/255 tight crop followed by its inclusive ``[xtl, ytl, xbr, ybr]`` in frame px
  (CVAT run-length-encodes it on its side);
- ``points``: the cell's polygon, which CVAT stores instead when "convert masks to polygons" is on (its
  AI-tools dialog needs it too);
- ``confidence`` as a string, ``label`` and the ``attributes`` the function's spec declares.

No cell is filtered here: threshold, cap and polygon validity are the ``detect`` contract's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from wbc_core.data.masks import cvat_function_mask_json
from wbc_core.detect import Cell, Detection


def cell_attributes(cell: Cell, declared: Iterable[str] | None = None) -> list[dict[str, str]]:
    """The cell's attributes as CVAT items (string values), limited to ``declared`` names when given."""
    keep = None if declared is None else set(declared)
    return [{"name": k, "value": str(v)} for k, v in cell.attributes.items() if keep is None or k in keep]


def cell_to_cvat_json(cell: Cell, declared: Iterable[str] | None = None) -> str:
    """One cell as the JSON text of a CVAT detector ``mask`` item.

    The mask is written as text directly (:func:`cvat_function_mask_json`): it is by far the largest part of
    the response."""
    if cell.points is None:
        raise ValueError("the cell has no polygon: cells come from Predictor.detect, which sets it")
    mask = cvat_function_mask_json(cell.mask_crop, offset=cell.origin)
    if mask is None:
        raise ValueError("the cell's mask is empty")
    item: dict[str, Any] = {
        "confidence": str(round(float(cell.score), 4)),
        "label": cell.label,
        "type": "mask",
        "points": [round(float(v), 2) for v in cell.points.reshape(-1)],
    }
    attributes = cell_attributes(cell, declared)
    if attributes:
        item["attributes"] = attributes
    head = json.dumps(item)
    return head[:-1] + ', "mask": ' + mask + "}"


def detection_to_cvat_json(detection: Detection, declared: Iterable[str] | None = None) -> str:
    """The response body CVAT gets: a JSON list of every cell of ``detection`` (highest score first)."""
    declared = None if declared is None else frozenset(declared)
    return "[" + ", ".join(cell_to_cvat_json(cell, declared) for cell in detection.cells) + "]"


def detection_to_cvat_json_within(detection: Detection, max_bytes: int, declared: Iterable[str] | None = None
                                  ) -> tuple[str, int]:
    """:func:`detection_to_cvat_json` holding at most ``max_bytes`` (UTF-8): the cells in order (highest score
    first) while they fit. Returns ``(body, cells left out)``; the caller says so (never silent)."""
    declared = None if declared is None else frozenset(declared)
    items: list[str] = []
    size = 2  # the brackets
    for n, cell in enumerate(detection.cells):
        item = cell_to_cvat_json(cell, declared)
        grow = len(item.encode()) + (2 if items else 0)
        if size + grow > max_bytes:
            return "[" + ", ".join(items) + "]", len(detection.cells) - n
        items.append(item)
        size += grow
    return "[" + ", ".join(items) + "]", 0


def detection_to_cvat_results(detection: Detection, declared: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """:func:`detection_to_cvat_json` as Python objects."""
    return json.loads(detection_to_cvat_json(detection, declared))
