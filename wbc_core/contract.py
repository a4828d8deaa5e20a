"""The contract between a model bundle and CVAT, defined once.

CVAT matches every shape a function returns to a task label **by exact name** and drops the others without
a word; it keeps only the attributes the function's ``spec`` declares, and checks their values. So the label
names and attributes a deployed function may return are computed here, from the bundle, and everything else
derives from them:

- the ``spec`` in ``function.yaml`` / ``function-gpu.yaml`` (``python -m serverless spec``, which
  ``serverless/deploy.sh`` runs on the bundle it deploys; a test keeps the committed files equal to what
  :func:`default_spec` generates);
- the start-up check of the Nuclio function and of the cvat-sdk function module (a bundle that could
  return a label the spec lacks is refused, instead of serving results CVAT would drop);
- the attributes every detected cell carries (:func:`segmenter_attributes`, and the classifier's merge).

The ``detect`` contract's cap lives here too: :data:`DEFAULT_MAX_CELLS` (cells per frame), and the response's:
:data:`MAX_RESPONSE_BYTES`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

#: The shape type every result has (``mask`` items carry ``points`` too, so polygon task labels work).
SHAPE_TYPE = "mask"
#: Cells returned per frame at most (a bundle may set ``max_cells``); the lowest-scoring ones are dropped
#: first and the cut is logged. RV-PBS has about 1.1 WBC per photo; 100 is far above any real smear field.
DEFAULT_MAX_CELLS = 100
#: A cell narrower than this many red-cell diameters (equivalent diameter of its mask) is not a WBC: the smallest,
#: a small lymphocyte, is ~7 um across (0.93 of a 7.5 um red cell); platelets, their clumps and debris are 2-5 um.
#: Applied when the red-cell size was measured on the frame (scale mode rbc); counted in Detection.too_small.
MIN_WBC_RBC_RATIO = 0.7
#: Largest response body (bytes) a frame's cells are serialised into; cells past it (the lowest-scoring) are
#: dropped and the cut logged. CVAT's mask format costs 4 bytes per pixel of each cell's box, so cells that do
#: not overlap fit in 4 bytes x the frame's pixels: 49 MB for a 12.2 MP slide. Only many overlapping outlines
#: (a broken or hostile model) reach this.
MAX_RESPONSE_BYTES = 64 * 2**20
#: Whose label a cell has.
DECIDED_BY = ("agree", "classifier", "segmenter")

#: Attributes every cell carries (what the segmenter said, and who decided the label).
SEGMENTER_ATTRIBUTES = {
    "segmenter_label": "the segmenter's label",
    "segmenter_score": "the segmenter's score, 3 decimals",
    "decided_by": "agree | classifier | segmenter: whose label the cell has (segmenter when there is no classifier)",
}
#: Attributes a cell carries only when the bundle has a crop classifier.
CLASSIFIER_ATTRIBUTES = {
    "classifier_label": "the classifier's most probable label",
    "classifier_score": "the classifier's probability of that label, 3 decimals",
}


class SpecMismatch(ValueError):
    """A bundle can return labels that the function's spec does not declare (CVAT would drop them)."""


@dataclass(frozen=True)
class AttributeSpec:
    """One attribute as CVAT's function spec declares it (values are always strings)."""

    name: str
    input_type: str = "text"
    values: tuple[str, ...] = ("",)

    def to_cvat(self) -> dict[str, Any]:
        return {"name": self.name, "input_type": self.input_type, "values": list(self.values)}


@dataclass(frozen=True)
class Contract:
    """What a bundle can return: label names (in spec order) and the attributes on every cell."""

    labels: tuple[str, ...]
    attributes: tuple[AttributeSpec, ...] = field(default_factory=tuple)

    @property
    def attribute_names(self) -> frozenset[str]:
        return frozenset(a.name for a in self.attributes)

    def spec(self) -> list[dict[str, Any]]:
        """The CVAT ``annotations.spec`` (ids are the label order)."""
        attrs = [a.to_cvat() for a in self.attributes]
        return [{"id": i, "name": name, "type": SHAPE_TYPE, "attributes": attrs} for i, name in enumerate(self.labels)]


def attribute_specs(with_classifier: bool) -> tuple[AttributeSpec, ...]:
    names = list(SEGMENTER_ATTRIBUTES) + (list(CLASSIFIER_ATTRIBUTES) if with_classifier else [])
    return tuple(AttributeSpec(n, "select", DECIDED_BY) if n == "decided_by" else AttributeSpec(n) for n in names)


def output_labels(classes: Sequence[str], classifier_classes: Sequence[str] | None) -> tuple[str, ...]:
    """Every label a cell can leave the pipeline with.

    Without a classifier: the segmenter's classes. With one over a single-class (detection-only) segmenter:
    the classifier's classes (it always names the cell). Over a typed segmenter: both (the merge may keep
    either side's label)."""
    if not classifier_classes:
        return tuple(classes)
    if len(classes) == 1:
        return tuple(classifier_classes)
    return tuple(dict.fromkeys([*classes, *classifier_classes]))


def contract_for(classes: Sequence[str], classifier_classes: Sequence[str] | None) -> Contract:
    return Contract(output_labels(classes, classifier_classes), attribute_specs(bool(classifier_classes)))


def default_contract() -> Contract:
    """The contract of the default bundle config: the 10 RV-PBS classes with a crop classifier."""
    from wbc_core.labels import RVPBS_LABELS

    return contract_for(RVPBS_LABELS, RVPBS_LABELS)


def spec_labels(spec: Iterable[dict[str, Any]]) -> list[str]:
    return [str(label["name"]) for label in spec]


def spec_attribute_names(spec: Iterable[dict[str, Any]]) -> frozenset[str]:
    return frozenset(str(a["name"]) for label in spec for a in label.get("attributes") or [])


def check_spec(contract: Contract, spec: list[dict[str, Any]], where: str = "the function spec") -> None:
    """Raise :class:`SpecMismatch` when the bundle can return a label ``spec`` does not declare."""
    declared = set(spec_labels(spec))
    missing = [label for label in contract.labels if label not in declared]
    if missing:
        raise SpecMismatch(
            f"the model bundle can return labels {missing} that {where} does not declare (it declares "
            f"{sorted(declared)}); CVAT would drop every such shape without a warning. Regenerate the spec from "
            "this bundle ('python -m serverless spec --bundle DIR --write function.yaml', which deploy.sh does) "
            "and give the CVAT task labels with the same names, or deploy a bundle trained on the spec's labels")


def spec_json(spec: list[dict[str, Any]]) -> str:
    """The spec as function.yaml holds it: a JSON list, one label per line."""
    lines = [json.dumps(label) for label in spec]
    return "[\n" + ",\n".join(f"  {line}" for line in lines) + "\n]"
