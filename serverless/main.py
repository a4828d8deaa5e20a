"""Nuclio entry point of the ``wbc-maskrcnn`` CVAT detector (``handler: main:handler``).

In the image this file is ``/opt/nuclio/main.py`` and the ``serverless`` and ``trainer`` packages
sit beside it (``serverless/deploy.sh`` stages that layout); in the repository it is
``serverless/main.py``. Nothing here depends on ``/opt/nuclio``: the model bundle comes from
``$WBC_BUNDLE_DIR`` (set in ``function.yaml``), else from ``bundle/`` next to this file.

Hot reload: ``$WBC_BUNDLE_DIR`` may be a model registry's ``current`` symlink on a mounted volume
(``/models/current``). Every ``$WBC_RELOAD_SECONDS`` (default 5; 0 = every request; negative = never) a
worker checks, before a request, whether the bundle changed, and swaps in the newly promoted one without a
restart; a bundle that fails to load is logged and the old model keeps serving
(:meth:`serverless.model_handler.ModelHandler.maybe_reload`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from serverless.model_handler import ModelHandler

HERE = Path(__file__).resolve().parent
BUNDLE_ENV = "WBC_BUNDLE_DIR"
THREADS_ENV = "WBC_NUM_THREADS"
SPEC_FILES = ("function.yaml", "function-gpu.yaml")


def bundle_dir() -> Path:
    """``$WBC_BUNDLE_DIR``, else ``bundle/`` beside this file."""
    value = os.environ.get(BUNDLE_ENV, "").strip()
    return Path(value) if value else HERE / "bundle"


def read_spec() -> list[dict[str, Any]] | None:
    """The label spec of the function's ``function.yaml`` (None if it cannot be found or read)."""
    for folder in (HERE, HERE.parent):
        for name in SPEC_FILES:
            path = folder / name
            if path.is_file():
                try:
                    return list(json.loads(yaml.safe_load(path.read_text())["metadata"]["annotations"]["spec"]))
                except Exception:
                    return None
    return None


def spec_labels() -> set[str] | None:
    """Label names declared in the function's ``function.yaml`` (None if it cannot be found)."""
    spec = read_spec()
    return None if spec is None else {str(label["name"]) for label in spec}


def spec_attributes() -> frozenset[str]:
    """Attribute names the spec declares (on any label): only these are returned to CVAT."""
    spec = read_spec() or []
    return frozenset(str(a["name"]) for label in spec for a in label.get("attributes") or [])


def init_model(context: Any, directory: str | Path | None = None) -> ModelHandler:
    """Load the bundle once per worker into ``context.user_data.model``; log one line and re-raise on failure.

    Later bundle changes are picked up by the handler itself (hot reload, see the module doc)."""
    directory = Path(directory) if directory is not None else bundle_dir()
    threads = os.environ.get(THREADS_ENV, "").strip()
    if threads.isdigit() and int(threads) > 0:
        import torch

        torch.set_num_threads(int(threads))
    try:
        model = ModelHandler(directory)
        model.warmup()
    except Exception as exc:
        context.logger.error(f"cannot load the WBC model bundle from {directory} "
                             f"({BUNDLE_ENV}={os.environ.get(BUNDLE_ENV)!r}): {exc}")
        raise
    model.attributes = spec_attributes()
    declared = spec_labels()
    unknown = sorted(set(model.classes) - declared) if declared is not None else []
    if unknown:
        context.logger.warn(f"bundle classes {unknown} are not labels in function.yaml; CVAT drops such shapes "
                            "without a warning")
    context.logger.info_with("WBC model bundle loaded", bundle_dir=str(directory), bundle_path=str(model.bundle_path),
                             classes=model.classes, device=str(model.predictor.device),
                             default_threshold=model.default_threshold, reload_seconds=model.reload_seconds)
    context.user_data.model = model
    return model


def init_context(context: Any) -> None:
    init_model(context)


def handler(context: Any, event: Any) -> Any:
    return context.user_data.model.handle(context, event)
