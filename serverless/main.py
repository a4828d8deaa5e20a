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


def spec_file() -> Path | None:
    """The function's ``function.yaml`` (or ``function-gpu.yaml``): beside this file in the image, at the
    repository root in a checkout."""
    for folder in (HERE, HERE.parent):
        for name in SPEC_FILES:
            if (folder / name).is_file():
                return folder / name
    return None


def read_spec(path: Path | None = None) -> list[dict[str, Any]] | None:
    """The label spec of the function's yaml (None when there is no such file); a yaml that is there but
    unreadable raises ``ValueError`` naming it."""
    path = path or spec_file()
    if path is None:
        return None
    try:
        spec = json.loads(yaml.safe_load(path.read_text())["metadata"]["annotations"]["spec"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read the label spec (metadata.annotations.spec) of {path}: {exc}") from exc
    if not isinstance(spec, list):
        raise ValueError(f"{path}: metadata.annotations.spec must be a JSON list of labels")
    return spec


def set_threads() -> int | None:
    """``$WBC_NUM_THREADS`` torch threads for this worker (function.yaml sets it, so what is deployed is what
    the latency benchmark measures); None leaves torch's default."""
    threads = os.environ.get(THREADS_ENV, "").strip()
    if not threads:
        return None
    if not threads.isdigit() or int(threads) < 1:
        raise ValueError(f"{THREADS_ENV}={threads!r} must be a positive integer (torch threads per worker)")
    import torch

    torch.set_num_threads(int(threads))
    return int(threads)


def init_model(context: Any, directory: str | Path | None = None) -> ModelHandler:
    """Load the bundle once per worker into ``context.user_data.model``; log one line and re-raise on failure.

    The bundle is refused when it could return a label the function's spec does not declare (CVAT would
    drop such shapes without a word). Later bundle changes are picked up by the handler itself (hot reload,
    see the module doc)."""
    directory = Path(directory) if directory is not None else bundle_dir()
    try:
        threads = set_threads()
        spec = read_spec()
        model = ModelHandler(directory, spec=spec)
        model.warmup()
    except Exception as exc:
        context.logger.error(f"cannot serve the WBC model bundle from {directory} "
                             f"({BUNDLE_ENV}={os.environ.get(BUNDLE_ENV)!r}): {exc}")
        raise
    if spec is None:
        context.logger.warn("no function.yaml beside the function: the bundle's labels are not checked against "
                            "a spec; every attribute is returned")
    context.logger.info_with("WBC model bundle loaded", bundle_dir=str(directory), bundle_path=str(model.bundle_path),
                             labels=model.labels, attributes=sorted(model.attributes),
                             classifier=model.predictor.classifier is not None,
                             device=str(model.predictor.device), threads=threads,
                             default_threshold=model.default_threshold, max_cells=model.predictor.max_cells,
                             reload_seconds=model.reload_seconds)
    context.user_data.model = model
    return model


def self_check() -> None:
    """Import every module serving a bundle loads, a classifier's included (the image build runs this, so a
    missing dependency fails the build, not the first request)."""
    import importlib

    for name in ("nuclio_sdk", "torch", "torchvision", "cv2", "numpy", "PIL", "yaml", "pycocotools",
                 "wbc_core.detect", "wbc_core.classifier.infer", "wbc_core.cvat_json", "wbc_core.contract",
                 "serverless.model_handler"):
        importlib.import_module(name)
    spec = read_spec()
    print(f"self-check ok: serving modules import; spec {spec_file()} declares "
          f"{0 if spec is None else len(spec)} labels")


def init_context(context: Any) -> None:
    init_model(context)


def handler(context: Any, event: Any) -> Any:
    return context.user_data.model.handle(context, event)
