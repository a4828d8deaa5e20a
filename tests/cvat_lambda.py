"""What CVAT 2.23's lambda manager does with a Nuclio detector: list it from its yaml, store what it returns.

A test double of the server side (``cvat/apps/lambda_manager/views.py``: ``LambdaFunction.__init__``,
``_call_detector`` / ``parse_anno``), written from ../shared/reference/cvat-contract.md sections 1 and 2.4:

- listing: ``metadata.annotations.type`` must be a known kind; ``spec`` is a JSON string; duplicate label
  names or duplicate attribute names make the function invalid; an attribute without ``input_type`` or
  ``values`` is a KeyError;
- storing: with no explicit mapping, each model label maps to the task label of the same name and a compatible
  type (equal, task ``any``, model ``unknown``, or mask<->polygon); a result whose label is not mapped is
  **dropped without a word**; attributes are kept only when both the spec and the task label declare them,
  and their string values pass CVAT's checks; a mask becomes a polygon when ``conv_mask_to_poly`` is on and
  the item has ``points``, else CVAT run-length-encodes the flat crop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from wbc_core.data.masks import cvat_rle_encode, decode_cvat_function_mask

KINDS = ("detector", "interactor", "reid", "tracker")


class InvalidFunction(ValueError):
    """CVAT would leave this function out of its list."""


def list_function(path: Path) -> dict[str, Any]:
    """The function as ``GET /api/lambda/functions`` would list it (raises :class:`InvalidFunction`)."""
    doc = yaml.safe_load(Path(path).read_text())
    meta = doc["metadata"]
    annotations = meta.get("annotations") or {}
    kind = annotations.get("type")
    if kind not in KINDS:
        raise InvalidFunction(f"unknown function type {kind!r}")
    try:
        spec = json.loads(annotations.get("spec") or "[]")
    except json.JSONDecodeError as exc:
        raise InvalidFunction(f"spec is not JSON: {exc}") from exc
    names = [label["name"] for label in spec]
    if len(set(names)) != len(names):
        raise InvalidFunction("duplicate label names")
    labels = []
    for label in spec:
        attrs = label.get("attributes") or []
        attr_names = [a["name"] for a in attrs]
        if len(set(attr_names)) != len(attr_names):
            raise InvalidFunction(f"duplicate attribute names in label {label['name']!r}")
        labels.append({"name": label["name"], "type": label.get("type", "unknown"),
                       "attributes": [{"name": a["name"], "input_type": a["input_type"], "values": a["values"]}
                                      for a in attrs]})
    if not (doc.get("spec") or {}).get("description"):
        raise InvalidFunction("spec.description is required")
    return {"id": meta["name"], "kind": kind, "name": annotations.get("name", meta["name"]),
            "labels_v2": labels, "version": int(annotations.get("version", 1))}


@dataclass
class TaskLabel:
    name: str
    type: str = "any"
    attributes: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {input_type, values}


def _compatible(model_type: str, task_type: str) -> bool:
    return (model_type == task_type or task_type == "any" or model_type == "unknown"
            or {model_type, task_type} == {"mask", "polygon"})


def _valid_value(value: Any, spec: dict[str, Any]) -> bool:
    if not isinstance(value, str):
        return False
    kind = spec["input_type"]
    if kind == "number":
        return value.isnumeric()
    if kind == "checkbox":
        return value in ("true", "false")
    if kind in ("select", "radio"):
        return value in spec["values"]
    return True


def store_results(results: list[dict[str, Any]], function: dict[str, Any], task_labels: list[TaskLabel],
                  frame: int = 0, conv_mask_to_poly: bool = False) -> tuple[list[dict[str, Any]], int]:
    """The shapes CVAT stores for one frame's results, and how many results it dropped silently."""
    by_name = {label.name: label for label in task_labels}
    model_labels = {label["name"]: label for label in function["labels_v2"]}
    mapping = {name: by_name[name] for name, label in model_labels.items()
               if name in by_name and _compatible(label["type"], by_name[name].type)}
    stored, dropped = [], 0
    for item in results:
        task_label = mapping.get(item["label"])
        if task_label is None:
            dropped += 1  # views.py: `continue`, nothing logged, nothing returned
            continue
        declared = {a["name"] for a in model_labels[item["label"]]["attributes"]}
        attributes = {a["name"]: a["value"] for a in item.get("attributes") or []
                      if a["name"] in declared and a["name"] in task_label.attributes
                      and _valid_value(a["value"], task_label.attributes[a["name"]])}
        shape: dict[str, Any] = {"frame": frame, "label": task_label.name, "source": "auto", "attributes": attributes}
        if item["type"] == "mask" and conv_mask_to_poly and item.get("points"):
            shape.update(type="polygon", points=list(item["points"]))
        elif item["type"] == "mask":
            crop, box = decode_cvat_function_mask(item["mask"])
            shape.update(type="mask", points=[*cvat_rle_encode(crop), *box])
        else:
            shape.update(type=item["type"], points=list(item["points"]))
        stored.append(shape)
    return stored, dropped
