"""Reading YAML configs into dataclasses: one place for the checks every config section makes.

Unknown keys are refused with the list of known ones (a typo must not silently fall back to a default), and a file
that is not a YAML mapping is refused with its path."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def check_known(data: dict[str, Any], known: Iterable[str], what: str) -> None:
    """Raise ``ValueError("unknown <what>: [...]; known: [...]")`` when ``data`` has keys outside ``known``."""
    known = sorted(known)
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown {what}: {unknown}; known: {known}")


def dataclass_from_dict(cls: type[T], data: Any, what: str) -> T:
    """``cls(**data)`` after checking that ``data`` is a mapping (None = all defaults) with only known keys."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be a mapping, not {type(data).__name__}")
    check_known(data, (f.name for f in fields(cls)), what)  # type: ignore[arg-type]
    return cls(**data)


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The YAML mapping in ``path`` (an empty file is ``{}``); ``ValueError`` naming the file otherwise."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read {what} {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} must be a YAML mapping")
    return data
