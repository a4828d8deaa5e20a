"""The WBC detector as a cvat-sdk auto-annotation function: CVAT pre-annotation without Nuclio.

A second entry point over the one ``detect`` contract (:meth:`wbc_core.detect.Predictor.detect`), for
``cvat-cli`` / ``cvat_sdk.auto_annotation`` **2.23.1** (pinned to the reference server, CVAT 2.23.1: the SDK
accepts servers of its own minor version and the next one)::

    pip install "cvat-sdk==2.23.1" "cvat-cli==2.23.1"        # or: pip install ".[cvat]"
    cvat-cli --server-host http://cvat.example.com --server-port 8080 --auth USER:PASS \\
        auto-annotate TASK_ID --function-module serverless.cvat_sdk_function \\
        -p bundle=str:/path/to/bundle [-p threshold=float:0.5] [-p max_cells=int:100] [-p device=str:cuda] \\
        [--conf-threshold 0.5] [--conv-mask-to-poly] [--clear-existing] [--allow-unmatched-labels]

The CLI sees :func:`create` and calls it with the ``-p`` parameters; ``bundle`` defaults to
``$WBC_BUNDLE_DIR``. In Python, pass ``create(bundle=...)`` (or this module itself, when ``$WBC_BUNDLE_DIR`` is
set: the module then has ``spec`` and ``detect`` too) to ``cvat_sdk.auto_annotation.annotate_task``.

What the function returns (what cvat-sdk 2.23.1's interface allows):

- ``spec``: one label per bundle contract label (:attr:`wbc_core.bundle.Bundle.contract`), id = its position,
  type ``mask``. The SDK's driver matches them to the task's labels **by name** and, unless
  ``--allow-unmatched-labels``, refuses to run when one is missing from the task (better than Nuclio's silent
  drop). **No attributes**: 2.23.1's driver raises ``BadFunctionError`` for a spec label with attributes and
  for a shape with attributes ("attribute support may be added in a future version"), so the contract's
  ``segmenter_label`` / ``decided_by`` / ``classifier_*`` attributes, which the Nuclio function returns, are
  not sent on this path.
- ``detect``: one ``mask`` shape per cell (``cvat_sdk.masks.encode_mask`` of the cell's native-resolution
  mask, bbox inclusive), or one ``polygon`` per cell when ``context.conv_mask_to_poly`` is true
  (``--conv-mask-to-poly``; the driver refuses masks then). Cells are the detect contract's final cells:
  threshold, ``max_cells`` cap and polygon validity are applied there, once.

Threshold: ``context.conf_threshold`` (``--conf-threshold``) when given, else ``-p threshold``, else the
bundle's default. An explicit 0 means "every candidate" here (the SDK's contract: return objects scoring
>= the value), unlike the Nuclio path where CVAT omits a 0 threshold and the bundle default applies.

The bundle and its model are loaded once per :func:`create` call, not per frame; torch is imported only
then, after the parameters are checked, so a wrong ``bundle`` path fails at once. Serving code: this module
imports only :mod:`wbc_core`, cvat-sdk, NumPy and Pillow (never ``trainer`` or ``cvat_sync``).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cvat_sdk.auto_annotation as cvataa
import numpy as np
import PIL.Image
from cvat_sdk import models
from cvat_sdk.masks import encode_mask

if TYPE_CHECKING:
    from wbc_core.contract import Contract
    from wbc_core.detect import Cell

log = logging.getLogger(__name__)

BUNDLE_ENV = "WBC_BUNDLE_DIR"
#: What to pass, quoted in every bundle error.
BUNDLE_HINT = (f"pass the model bundle directory with '-p bundle=str:DIR' to 'cvat-cli auto-annotate' "
               f"(create(bundle=DIR) in Python), or set {BUNDLE_ENV}")
#: The threshold an explicit 0 becomes: every candidate the segmenter keeps (Predictor treats 0 as "default").
EVERY_CANDIDATE = 1e-6
#: Polygon vertices are sent rounded to this many decimals (frame px).
POLYGON_DECIMALS = 2


class BundleParameterError(ValueError):
    """The ``bundle`` parameter is missing or does not name a loadable model bundle."""


def resolve_bundle(bundle: str | os.PathLike[str] | None) -> Path:
    """The bundle directory: ``bundle`` when given, else ``$WBC_BUNDLE_DIR``; checked to exist."""
    value = str(bundle).strip() if bundle is not None else os.environ.get(BUNDLE_ENV, "").strip()
    if not value:
        raise BundleParameterError(f"no model bundle given: {BUNDLE_HINT}")
    path = Path(value).expanduser()
    if not path.is_dir():
        what = "is a file, not a directory" if path.exists() else "does not exist"
        raise BundleParameterError(f"model bundle {path} {what}: {BUNDLE_HINT}")
    return path


def build_spec(contract: Contract) -> cvataa.DetectionFunctionSpec:
    """The function's spec: the contract's labels in order (id = index), type ``mask``, no attributes
    (cvat-sdk 2.23.1 refuses spec attributes, see the module doc)."""
    return cvataa.DetectionFunctionSpec(
        labels=[cvataa.label_spec(name, index, type="mask") for index, name in enumerate(contract.labels)])


def _to_rgb8(image: PIL.Image.Image) -> np.ndarray:
    """A frame as RGB uint8 (H, W, 3), EXIF orientation applied. CVAT's original chunks are already upright (it
    re-encodes EXIF-rotated frames), so the transpose is a no-op there; it matters for a frame that still
    carries the tag."""
    from wbc_core.data.images import oriented, pil_to_rgb8

    return pil_to_rgb8(oriented(image))


def mask_points(cell: Cell, width: int, height: int) -> list[float] | None:
    """The cell's mask as a CVAT ``mask`` shape's ``points``: run lengths + inclusive ``[x1, y1, x2, y2]``.

    Exactly ``encode_mask(cell.full_mask(height, width), bbox=<the crop's box>)``, computed on the crop alone
    (no frame-sized bitmap per cell). None when nothing of the mask lies inside the frame."""
    left, top = cell.origin
    h = min(cell.mask_crop.shape[0], height - top)
    w = min(cell.mask_crop.shape[1], width - left)
    if h <= 0 or w <= 0:
        return None
    crop = np.ascontiguousarray(cell.mask_crop[:h, :w], dtype=bool)
    if not crop.any():
        return None
    points = encode_mask(crop, bbox=[0, 0, w, h])
    points[-4:] = [left, top, left + w - 1, top + h - 1]
    return points


def polygon_points(cell: Cell) -> list[float] | None:
    """The cell's polygon (set by ``Predictor.detect``) as flat ``[x1, y1, x2, y2, ...]``; None under 3
    vertices."""
    if cell.points is None or len(cell.points) < 3:
        return None
    return [round(float(v), POLYGON_DECIMALS) for v in np.asarray(cell.points, dtype=float).reshape(-1)]


class WbcDetectionFunction:
    """A cvat-sdk detection function over one loaded bundle (what :func:`create` returns).

    ``spec`` and ``detect(context, image)`` are the ``cvat_sdk.auto_annotation.DetectionFunction`` protocol.
    ``threshold``: the default minimum score when the driver passes no ``conf_threshold`` (None: the bundle's
    own). ``max_cells``: cells per frame at most (None: the bundle's). ``detect`` may be called from one thread
    at a time per object (one model); a lock enforces that.
    """

    def __init__(self, bundle: str | os.PathLike[str] | None = None, threshold: float | None = None,
                 max_cells: int | None = None, device: str | None = None) -> None:
        directory = resolve_bundle(bundle)
        self.threshold = _check_threshold(threshold, "-p threshold")
        self.max_cells = _check_max_cells(max_cells)
        # torch comes in here, after the parameters are checked: a wrong path fails in a second
        from wbc_core.bundle import BundleError, load_bundle
        from wbc_core.detect import Predictor

        try:
            loaded = load_bundle(directory)
            self.predictor = Predictor(loaded, device=device)
        except BundleError as exc:
            raise BundleParameterError(f"cannot load the model bundle {directory}: {exc}. {BUNDLE_HINT}") from exc
        self.contract = loaded.contract
        self._spec = build_spec(self.contract)
        self._label_ids = {name: index for index, name in enumerate(self.contract.labels)}
        self._lock = threading.Lock()
        default = f"bundle default {self.predictor.default_threshold:g}"
        log.info("WBC auto-annotation function: bundle %s, labels %s, device %s, threshold %s, max_cells %s",
                 directory, list(self.contract.labels), self.predictor.device,
                 default if self.threshold is None else self.threshold,
                 self.predictor.max_cells if self.max_cells is None else self.max_cells)

    @property
    def spec(self) -> cvataa.DetectionFunctionSpec:
        return self._spec

    def effective_threshold(self, conf_threshold: float | None) -> float | None:
        """The threshold one frame is detected with: the driver's ``conf_threshold`` when given, else
        ``-p threshold``, else None (the bundle's default); an explicit 0 keeps every candidate."""
        value = conf_threshold if conf_threshold is not None else self.threshold
        if value is None:
            return None
        return float(value) if value > 0 else EVERY_CANDIDATE

    def detect(self, context: cvataa.DetectionFunctionContext, image: PIL.Image.Image
               ) -> list[models.LabeledShapeRequest]:
        """The cells of one frame as ``mask`` shapes (``polygon`` shapes when ``context.conv_mask_to_poly``)."""
        rgb = _to_rgb8(image)
        height, width = rgb.shape[:2]
        threshold = self.effective_threshold(_check_threshold(getattr(context, "conf_threshold", None),
                                                              "conf_threshold"))
        as_polygons = bool(getattr(context, "conv_mask_to_poly", False))
        with self._lock:
            detection = self.predictor.detect(rgb, threshold=threshold, max_cells=self.max_cells)
        shapes: list[models.LabeledShapeRequest] = []
        for cell in detection.cells:
            label_id = self._label_ids.get(cell.label)
            if label_id is None:  # the contract lists every label a cell can have; kept as a guard
                log.warning("cell label %r is not in the bundle's contract %s; skipped", cell.label,
                            list(self.contract.labels))
                continue
            if as_polygons:
                points = polygon_points(cell)
                if points is not None:
                    shapes.append(cvataa.polygon(label_id, points))
            else:
                points = mask_points(cell, width, height)
                if points is not None:
                    shapes.append(cvataa.mask(label_id, points))
        frame = getattr(context, "frame_name", "?")
        if shapes:
            log.debug("%s: %d cell(s) as %s (threshold %g)", frame, len(shapes),
                     "polygons" if as_polygons else "masks", detection.threshold)
        else:
            log.debug("%s: no cells (%s)", frame, detection.empty_reason)
        return shapes


def _check_threshold(value: Any, name: str) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number between 0 and 1 (-p threshold=float:0.5), got {value!r}") from None
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"{name} must be between 0 and 1, got {number}")
    return number


def _check_max_cells(value: Any) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if isinstance(value, bool) or number < 1 or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"max_cells must be a positive integer (-p max_cells=int:100), got {value!r}")
    return number


def create(bundle: str | None = None, threshold: float | None = None, max_cells: int | None = None,
           device: str | None = None) -> WbcDetectionFunction:
    """The function factory ``cvat-cli auto-annotate --function-module serverless.cvat_sdk_function`` calls
    with the ``-p NAME=TYPE:VALUE`` parameters: ``bundle`` (str; default ``$WBC_BUNDLE_DIR``), ``threshold``
    (float), ``max_cells`` (int), ``device`` (str, e.g. ``cuda``; default: CUDA when available).

    Raises :class:`BundleParameterError` (a ``ValueError``) naming the path and what to pass when the bundle is
    missing or cannot be loaded, ``ValueError`` for a bad threshold or ``max_cells``."""
    return WbcDetectionFunction(bundle, threshold=threshold, max_cells=max_cells, device=device)


_module_functions: dict[str, WbcDetectionFunction] = {}
_module_lock = threading.Lock()


def module_function() -> WbcDetectionFunction:
    """The function of ``$WBC_BUNDLE_DIR``, loaded once per bundle path (behind the module's ``spec`` and
    ``detect``)."""
    path = str(resolve_bundle(None).resolve())
    with _module_lock:
        if path not in _module_functions:
            _module_functions[path] = create(path)
        return _module_functions[path]


def __getattr__(name: str) -> Any:
    """Module-level ``spec`` and ``detect`` (the module itself is then a detection function), from
    ``$WBC_BUNDLE_DIR``; without it they do not exist (AttributeError saying what to do)."""
    if name in ("spec", "detect"):
        if not os.environ.get(BUNDLE_ENV, "").strip():
            raise AttributeError(f"module {__name__!r} has no {name!r} until {BUNDLE_ENV} names a model bundle; "
                                 "or use create(bundle=DIR) (cvat-cli: -p bundle=str:DIR)")
        return getattr(module_function(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
