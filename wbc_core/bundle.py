"""Model bundle: everything inference needs, without the training config.

Layout of a bundle directory::

    bundle.yaml   format version, classes, model config, preprocessing, default threshold,
                  metrics, provenance, and the sha256 of every weights file
    model.pt      segmenter state dict
    classifier.pt optional WBC-type crop classifier (trainer.classifier); bundle.yaml then has a
                  ``classifier`` section: file, sha256 and config (classes, crop, stain reference, merge rule).
                  Bundles without it load and predict as before.

Loading verifies the checksums first, so a truncated copy or a half-synced volume fails with a
message naming the file instead of serving a broken model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from wbc_core.atomic import atomic_torch_save, atomic_write_bytes, sha256_file
from wbc_core.contract import DEFAULT_MAX_CELLS, Contract, contract_for
from wbc_core.model import SegmenterConfig, build_model

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "wbc-bundle/1"
BUNDLE_FILE = "bundle.yaml"
SEGMENTER_FILE = "model.pt"
CLASSIFIER_FILE = "classifier.pt"


#: The starter bundle shipped with the project (issue 12): a class-agnostic WBC segmenter trained on every
#: public set whose licence allows shipping, with a PBC crop classifier; used when no bundle is given.
STARTER_DIR = Path(__file__).resolve().parents[1] / "models" / "starter"


def default_bundle_dir() -> Path:
    """The bundle a command uses when none is given: ``$WBC_BUNDLE_DIR``, else the shipped starter."""
    import os

    value = os.environ.get("WBC_BUNDLE_DIR", "").strip()
    return Path(value) if value else STARTER_DIR


class BundleError(RuntimeError):
    """A bundle is missing, incomplete or corrupt; the message names the file."""


@dataclass
class Bundle:
    directory: Path
    classes: list[str]
    model_config: SegmenterConfig
    score_threshold: float
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    classifier: dict[str, Any] | None = None   # bundle.yaml's optional classifier section (file, sha256, config)

    @property
    def max_cells(self) -> int:
        """Cells returned per frame at most (``max_cells`` in bundle.yaml, else the contract's default)."""
        return int(self.raw.get("max_cells") or DEFAULT_MAX_CELLS)

    @property
    def scale(self) -> dict[str, Any] | None:
        """``preprocessing.scale`` of bundle.yaml: e.g. ``{"mode": "rbc", "rbc_px": 48, ...}`` (frames resized so
        red cells have that diameter at the model's input, wbc_core.scale), or None (fixed min/max size)."""
        value = (self.raw.get("preprocessing") or {}).get("scale")
        return dict(value) if isinstance(value, dict) else None

    @property
    def classifier_classes(self) -> list[str] | None:
        if not self.classifier:
            return None
        return [str(c) for c in (self.classifier.get("config") or {}).get("classes") or []]

    @property
    def contract(self) -> Contract:
        """The labels and attributes this bundle can return to CVAT (:mod:`wbc_core.contract`)."""
        return contract_for(self.classes, self.classifier_classes)

    @property
    def segmenter_path(self) -> Path:
        return self.directory / str((self.raw.get("segmenter") or {}).get("file", SEGMENTER_FILE))

    @property
    def classifier_path(self) -> Path | None:
        if not self.classifier:
            return None
        return self.directory / str(self.classifier.get("file", CLASSIFIER_FILE))

    def build_segmenter(self) -> torch.nn.Module:
        cfg = SegmenterConfig.from_dict({**self.model_config.to_dict(), "weights": None, "backbone_weights": None})
        model = build_model(cfg, len(self.classes))
        path = self.segmenter_path
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as exc:
            raise BundleError(f"cannot load segmenter weights {path}: {exc}") from exc
        return model.eval()


def write_bundle(directory: Path, model: torch.nn.Module, classes: list[str], model_config: SegmenterConfig,
                 score_threshold: float, metrics: dict[str, Any] | None = None,
                 provenance: dict[str, Any] | None = None, scale: dict[str, Any] | None = None) -> Path:
    """Write a bundle into ``directory`` (created; files replaced atomically, bundle.yaml last).

    ``scale``: how inference sizes a frame for the model (``preprocessing.scale``, see :attr:`Bundle.scale`);
    None: the fixed ``min_size``/``max_size`` resize."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / SEGMENTER_FILE
    atomic_torch_save(model.state_dict(), weights)
    meta = {
        "format": BUNDLE_FORMAT,
        "classes": list(classes),
        "segmenter": {"file": SEGMENTER_FILE, "sha256": sha256_file(weights), "config": model_config.to_dict()},
        "preprocessing": {"max_size": model_config.max_size, "min_size": model_config.min_size,
                          "colour": "RGB", "range": "0-1", **({"scale": dict(scale)} if scale else {})},
        "score_threshold": float(score_threshold),
        "metrics": metrics or {},
        "provenance": provenance or {},
    }
    atomic_write_bytes(directory / BUNDLE_FILE, yaml.safe_dump(meta, sort_keys=False).encode())
    return directory


def update_bundle_metrics(directory: Path, metrics: dict[str, Any]) -> None:
    path = Path(directory) / BUNDLE_FILE
    meta = yaml.safe_load(path.read_text())
    meta["metrics"] = metrics
    atomic_write_bytes(path, yaml.safe_dump(meta, sort_keys=False).encode())


def attach_classifier(directory: str | Path, state_dict: dict[str, Any], config: dict[str, Any]) -> Path:
    """Add (or replace) the optional crop classifier of an existing bundle: ``classifier.pt`` and a
    ``classifier`` section (file, sha256, config) in ``bundle.yaml``, written last and atomically."""
    directory = Path(directory)
    path = directory / BUNDLE_FILE
    if not path.is_file():
        raise BundleError(f"no model bundle at {directory}: {path} is missing; train the segmenter first")
    weights = directory / CLASSIFIER_FILE
    atomic_torch_save(state_dict, weights)
    meta = yaml.safe_load(path.read_text())
    meta["classifier"] = {"file": CLASSIFIER_FILE, "sha256": sha256_file(weights), "config": config}
    atomic_write_bytes(path, yaml.safe_dump(meta, sort_keys=False).encode())
    return directory


def _verify_classifier(directory: Path, meta_path: Path, section: Any) -> dict[str, Any] | None:
    if section is None:
        return None
    if not isinstance(section, dict) or not isinstance(section.get("config"), dict):
        raise BundleError(f"{meta_path}: the 'classifier' section needs 'file', 'sha256' and a 'config' mapping")
    _verified_file(directory, section, CLASSIFIER_FILE, "its classifier ")
    return section


def _verified_file(directory: Path, section: dict[str, Any], default_name: str, what: str = "") -> Path:
    """The weights file a bundle section names, checked to exist and to match its recorded sha256."""
    weights = directory / str(section.get("file", default_name))
    if not weights.is_file():
        raise BundleError(f"bundle {directory} is incomplete: {what}{weights} is missing")
    actual = sha256_file(weights)
    if section.get("sha256") and actual != section["sha256"]:
        raise BundleError(f"{weights} is corrupt: sha256 {actual[:12]}... does not match the bundle's "
                          f"{str(section['sha256'])[:12]}...; copy the bundle again")
    return weights


def load_bundle(directory: str | Path) -> Bundle:
    """Read and verify a bundle. Raises :class:`BundleError` naming the missing or corrupt file."""
    directory = Path(directory)
    meta_path = directory / BUNDLE_FILE
    if not meta_path.is_file():
        raise BundleError(f"no model bundle at {directory}: {meta_path} is missing. Train one with "
                          "'python -m trainer train-segmenter' or point WBC_BUNDLE_DIR at a bundle directory")
    try:
        meta = yaml.safe_load(meta_path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise BundleError(f"{meta_path} is not valid YAML: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{meta_path} is not a {BUNDLE_FORMAT} bundle (format: "
                          f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    seg = meta.get("segmenter") or {}
    _verified_file(directory, seg, SEGMENTER_FILE)
    try:
        cfg = SegmenterConfig.from_dict(seg.get("config") or {})
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{meta_path}: bad segmenter config: {exc}") from exc
    classes = [str(c) for c in meta.get("classes") or []]
    if not classes:
        raise BundleError(f"{meta_path} lists no classes")
    max_cells = meta.get("max_cells")
    if max_cells is not None and (isinstance(max_cells, bool) or not isinstance(max_cells, int) or max_cells < 1):
        raise BundleError(f"{meta_path}: max_cells must be a positive integer, got {max_cells!r}")
    return Bundle(directory=directory, classes=classes, model_config=cfg,
                  score_threshold=float(meta.get("score_threshold", 0.5)),
                  metrics=meta.get("metrics") or {}, provenance=meta.get("provenance") or {}, raw=meta,
                  classifier=_verify_classifier(directory, meta_path, meta.get("classifier")))
