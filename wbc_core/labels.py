"""The label set: RV-PBS's 10 WBC classes by their exact CVAT names, and label maps.

CVAT matches a function's result to a task label by *exact name* and silently
drops anything else, so these strings are part of the contract. A label map
(YAML) says which dataset label becomes which model class; labels it does not
know are reported by the readers, never dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

RVPBS_LABELS: tuple[str, ...] = (
    "band cell",
    "basophil",
    "blast cell",
    "eosinophil",
    "lymphocyte",
    "monocyte",
    "neutrophil",
    "promyelocyte",
    "myelocyte",
    "metamyelocyte",
)

# Labels present in RV-PBS tasks that are not cell classes: known, deliberately not trained.
IGNORED_BY_DEFAULT: tuple[str, ...] = ("bg",)


@dataclass
class LabelMap:
    """Model classes (in order; class id = index + 1, 0 is background) and how dataset labels map onto them.

    ``aliases`` maps a dataset label to a class name (e.g. ``NEUTROPHIL: neutrophil``);
    ``ignore`` lists dataset labels that are known and deliberately left out.
    """

    classes: list[str] = field(default_factory=lambda: list(RVPBS_LABELS))
    aliases: dict[str, str] = field(default_factory=dict)
    ignore: list[str] = field(default_factory=lambda: list(IGNORED_BY_DEFAULT))

    def __post_init__(self) -> None:
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"label map has duplicate classes: {self.classes}")
        for src, dst in self.aliases.items():
            if dst not in self.classes:
                raise ValueError(f"label map alias {src!r} -> {dst!r}: {dst!r} is not one of the classes "
                                 f"{self.classes}")

    def class_of(self, label: str) -> str | None:
        """Model class for a dataset label; None if it is ignored or unknown (see :meth:`is_known`)."""
        if label in self.aliases:
            return self.aliases[label]
        if label in self.classes:
            return label
        return None

    def class_id(self, label: str) -> int | None:
        name = self.class_of(label)
        return None if name is None else self.classes.index(name) + 1

    def is_known(self, label: str) -> bool:
        return label in self.aliases or label in self.classes or label in self.ignore

    @classmethod
    def from_yaml(cls, path: str | Path) -> LabelMap:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"cannot read label map {path}: {exc}") from exc
        if not isinstance(data, dict) or "classes" not in data:
            raise ValueError(f"label map {path} must be a mapping with a 'classes' list")
        return cls(classes=[str(c) for c in data["classes"]],
                   aliases={str(k): str(v) for k, v in (data.get("aliases") or {}).items()},
                   ignore=[str(x) for x in (data.get("ignore") or [])])

    def to_dict(self) -> dict:
        return {"classes": list(self.classes), "aliases": dict(self.aliases), "ignore": list(self.ignore)}
