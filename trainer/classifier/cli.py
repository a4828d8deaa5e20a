"""``python -m trainer train-classifier``: crops, one method, evaluation on held-out target frames, the model.

Writes into ``--out``: ``metrics.json`` (every draw's accuracy, macro-F1, per-class precision/recall and
confusion matrix, with mean and spread), ``confusion.png`` (first draw), ``classifier.pt`` +
``classifier.yaml`` (the first draw's model and what inference needs), and with ``--bundle`` attaches that
classifier to a segmenter bundle so the pipeline uses it.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.classifier import METHODS, STAIN_METHODS
from wbc_core.data.types import DatasetError

if TYPE_CHECKING:
    from trainer.classifier.sources import CropSet
    from wbc_core.classifier.crops import CropConfig

log = logging.getLogger(__name__)


def _is_class_folders(path: Path) -> bool:
    from trainer.classifier.sources import is_bccd_folder
    from wbc_core.data.loader import sniff_format

    if not path.is_dir() or is_bccd_folder(path):
        return False
    try:
        sniff_format(path)
    except DatasetError:
        return True
    return False


def load_source(path: Path, crop: CropConfig, source_map: str | Path | None) -> CropSet:
    """A class-folder source (PBC-style, with a class map) or any annotated dataset the trainer reads."""
    from trainer.classifier.sources import SourceClassMap, load_folder_source, load_target

    if _is_class_folders(path):
        return load_folder_source(path, SourceClassMap.from_yaml(source_map), crop)
    out = load_target(path, crop)
    out.domain = "source"
    return out


def git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", type=Path, help="source domain: PBC-style class folders (<class>/<image>.jpg) or an "
                   "annotated export; needed by every method but target-only")
    p.add_argument("--target", type=Path, required=True, help="target domain: a CVAT/COCO export or cvat_sync folder "
                   "with labelled cells, or the bccd-wbc folder")
    p.add_argument("--method", choices=METHODS, required=True,
                   help="source-only: train on the source only; target-only: on labelled target cells only; "
                        "finetune: source, then target cells; dann: domain-adversarial on source + unlabelled target")
    p.add_argument("--stain-norm", choices=STAIN_METHODS, help="colour normalisation to the "
                   "target (default: the config's, none)")
    p.add_argument("--few-shot", type=int, metavar="K", help="use K labelled target cells per class (5 seeded draws); "
                   "default: none for source-only/dann, the whole labelled pool for target-only/finetune")
    p.add_argument("--config", type=Path, help="classifier YAML config (default: trainer/configs/classifier.yaml)")
    p.add_argument("--source-map", type=Path, help="class map of class-folder sources (default: "
                   "trainer/configs/classifier-source-pbc.yaml)")
    p.add_argument("--out", type=Path, required=True, help="run folder (metrics, confusion matrix, model)")
    p.add_argument("--bundle", type=Path, help="attach the trained classifier to this segmenter bundle")
    p.add_argument("--threads", type=int, help="torch threads (default: the config's; 0 = all cores)")


def run(args: argparse.Namespace) -> int:
    import torch
    import yaml

    from trainer.classifier.evaluate import plot_confusion
    from trainer.classifier.sources import load_target
    from trainer.classifier.train import Experiment, classifier_config, load_classifier_config, summarise_row
    from wbc_core.atomic import atomic_torch_save
    from wbc_core.bundle import CLASSIFIER_FILE
    from wbc_core.classifier.infer import TTA_VIEWS

    cfg = load_classifier_config(args.config)
    if args.stain_norm:
        cfg.stain_norm = args.stain_norm
    if args.threads is not None:
        cfg.train.threads = args.threads
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    method = args.method
    if method != "target-only" and args.source is None:
        raise ValueError(f"--method {method} needs --source")
    k: int | None
    if args.few_shot is not None:
        if args.few_shot < 0:
            raise ValueError("--few-shot K must be >= 0")
        k = args.few_shot
    else:
        k = 0 if method in ("source-only", "dann") else None
    t0 = time.perf_counter()
    source = load_source(args.source, cfg.crop, args.source_map or cfg.source_map) if args.source else None
    target = load_target(args.target, cfg.crop)
    exp = Experiment(source, target, cfg)
    row = exp.run(method, cfg.stain_norm, k)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = summarise_row(row)
    first = row["runs"][0]
    title = f"{method}, stain {cfg.stain_norm}, K={'all' if k is None else k} (draw 1 of {len(row['runs'])})"
    plot_confusion(first["metrics"], args.out / "confusion.png", title=title)
    provenance: dict[str, Any] = {"source": str(args.source) if args.source else None, "target": str(args.target),
                                  "method": method, "stain_norm": cfg.stain_norm, "k": k, "git_sha": git_sha(),
                                  "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                  "seconds": round(time.perf_counter() - t0, 1)}
    result = {"method": method, "stain_norm": cfg.stain_norm, "k": k, "summary": summary,
              "evaluation_crops": len(exp.eval), "labelled_pool": len(exp.pool),
              "runs": [{k2: v for k2, v in r.items()} for r in row["runs"]], "provenance": provenance,
              "config": cfg.to_dict()}
    # what test-time augmentation buys on these crops (the first model), to choose train.tta from data: each
    # view costs one more forward per cell at inference
    result["tta_views"] = {}
    for views in TTA_VIEWS:
        m = exp.evaluate(row["models"][0], cfg.stain_norm, tta=views)
        result["tta_views"][str(views)] = {"macro_f1": m["macro_f1"], "accuracy": m["accuracy"],
                                           **({"macro_f1_headline": m["macro_f1_headline"]}
                                              if "macro_f1_headline" in m else {})}
    log.info("macro-F1 by TTA views (first model): %s",
             ", ".join(f"{v}: {r['macro_f1']:.3f}" for v, r in result["tta_views"].items()))
    (args.out / "metrics.json").write_text(json.dumps(result, indent=1))
    trained = row["models"][0]
    config = classifier_config(trained, metrics={"accuracy": first["metrics"]["accuracy"],
                                                 "macro_f1": first["metrics"]["macro_f1"],
                                                 "evaluation_crops": len(exp.eval), "summary": summary},
                               provenance=provenance)
    state = {k: v.detach().cpu() for k, v in trained.model.state_dict().items()}
    atomic_torch_save(state, args.out / CLASSIFIER_FILE)
    (args.out / "classifier.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"{method} (stain {cfg.stain_norm}, K={'all' if k is None else k}) on {len(exp.eval)} held-out target "
          f"crops: accuracy {summary['accuracy']['mean']:.3f} +- {summary['accuracy']['std']:.3f}, macro-F1 "
          f"{summary['macro_f1']['mean']:.3f} +- {summary['macro_f1']['std']:.3f} over {len(row['runs'])} run(s)")
    for r in row["runs"]:
        health = (r["report"].get("dann") or {}).get("health")
        if health:
            print(f"DANN discriminator: {health['status']}: {health['message']}")
            break
    print(f"metrics: {args.out / 'metrics.json'}   confusion matrix: {args.out / 'confusion.png'}")
    if args.bundle:
        from wbc_core.bundle import attach_classifier

        attach_classifier(args.bundle, state, config)
        print(f"classifier attached to the bundle {args.bundle}")
    else:
        print(f"classifier: {args.out / CLASSIFIER_FILE} (attach it to a segmenter bundle with --bundle)")
    return 0
