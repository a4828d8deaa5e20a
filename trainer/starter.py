"""Train the starter model: one class-agnostic WBC segmenter from every public set we may use, in one command.

``python -m trainer train-starter --config trainer/configs/starter.yaml --data-root ../shared/data --out runs/starter``
reads the sets the config lists (see :mod:`trainer.multiset`), checks them all, draws the synthetic slides
into ``--out``, trains with domain randomisation and red-cell scale normalisation, and writes the model bundle
to ``--out/bundle`` with each set's frames, cells, licence and attribution in its provenance.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import resources
from pathlib import Path

from trainer.multiset import ClassifierSpec
from trainer.train_segmenter import CHECKPOINT

log = logging.getLogger("trainer.starter")

DESCRIPTION = """\
Train the starter WBC segmenter on several training sets at once (class-agnostic: every white cell is
'wbc'; the crop classifier names the type later) and write a model bundle to OUT/bundle.

The config lists the sets with their kind (bccd, bionet, synthetic, export), path under --data-root, split,
sampling weight (share of batches), whether they have outlines (masks: true trains the mask head; masks: false
sets such as Bio-Net train only the box/class heads), licence, attribution and whether weights trained on them
may ship. The rest of the config is a normal training config (model, train, augment, scale). The bundle records
the scale mode, so inference sizes frames the same way, and every set's licence and attribution."""

EPILOG = """\
examples:
  # the starter, on every set the config lists (Bio-Net included: for experiments, not for shipping)
  python -m trainer train-starter --config trainer/configs/starter.yaml --data-root ../shared/data --out runs/starter
  # weights that may ship: only sets with ship: true (their licences go into the bundle's provenance)
  python -m trainer train-starter --data-root ../shared/data --out runs/starter-ship --ship --max-minutes 240
  # leave-one-set-out benchmark: train on everything but BCCD, then evaluate on BCCD's test split
  python -m trainer train-starter --data-root ../shared/data --out runs/loso-bccd --leave-out bccd
  # check the config and the data, print the plan, train nothing
  python -m trainer train-starter --data-root ../shared/data --out runs/starter --dry-run

An interrupted run continues with --resume (same --out). Exit codes: 0 done, 2 bad config or data, 130
interrupted."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``python -m trainer train-starter`` options."""
    p.add_argument("--config", type=Path, default=None,
                   help="multi-set YAML config (default: the packaged trainer/configs/starter.yaml)")
    p.add_argument("--data-root", type=Path, default=None,
                   help="folder the sets' relative paths start from (e.g. ../shared/data)")
    p.add_argument("--out", type=Path, required=True,
                   help="run directory: synthetic slides, checkpoints, losses.csv, loss curve and bundle/")
    p.add_argument("--ship", action="store_true",
                   help="train only on sets marked ship: true (licences that allow shipping the weights)")
    p.add_argument("--leave-out", action="append", default=[], metavar="SET",
                   help="leave this set out (repeatable), e.g. for a leave-one-set-out benchmark")
    p.add_argument("--max-minutes", type=float, help="stop training after this many minutes (a bundle is written)")
    p.add_argument("--max-steps", type=int, metavar="N",
                   help="train exactly N optimiser steps (the learning-rate schedule spans them), so a rerun "
                        "trains as much on a slow machine as on a fast one")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--dry-run", action="store_true", help="check the config and every set, print the plan, stop")
    p.add_argument("--no-classifier", action="store_true",
                   help="skip the crop classifier of the config's classifier: section (segmenter only)")
    p.add_argument("--classifier-run", type=Path, metavar="DIR",
                   help="attach the classifier already trained in DIR (python -m trainer train-classifier ... --out "
                        "DIR) instead of training the config's")
    p.add_argument("--package", type=Path, metavar="DIR",
                   help="also write the bundle for shipping to DIR (e.g. models/starter): fp16 segmenter, "
                        "licences in the provenance, at most --max-mb; needs --ship")
    p.add_argument("--max-mb", type=float, default=25.0, help="size limit of the packaged weights (default 25)")
    p.add_argument("--serve-rbc-px", type=float, metavar="PX",
                   help="package it to be served with red cells PX across (chosen on val splits by "
                        "benchmarks/serving_sweep.py; the shipped starter: 72)")
    p.add_argument("--serve-threshold", type=float, metavar="T",
                   help="package it with this default score threshold (the shipped starter: 0.9)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def default_config_path() -> Path:
    return Path(str(resources.files("trainer").joinpath("configs/starter.yaml")))


def run(args: argparse.Namespace) -> int:
    """Train the starter (errors propagate to the CLI, which words them)."""
    from trainer.multiset import build_training_data, load_multiset_config, select_sets
    from trainer.train_segmenter import train_segmenter

    config_path = args.config or default_config_path()
    cfg = load_multiset_config(config_path)
    if args.config is None:  # provenance names the packaged config, not this machine's install path
        cfg.source = "trainer/configs/starter.yaml (packaged)"
    if args.epochs:
        cfg.train.train.epochs = args.epochs
    if args.max_minutes:
        cfg.train.train.max_minutes = args.max_minutes
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise ValueError(f"--max-steps must be at least 1, not {args.max_steps}")
        cfg.train.train.max_steps = args.max_steps
    if args.device:
        cfg.train.train.device = args.device
    sets = select_sets(cfg, ship=args.ship, leave_out=args.leave_out)
    if args.package and not args.ship:
        raise ValueError("--package writes weights for shipping: add --ship (only sets whose licence allows it)")
    classifier = None if args.no_classifier else cfg.classifier
    if classifier is not None and args.ship and not classifier.ship:
        raise ValueError(f"{cfg.source}: the classifier's source ({classifier.licence!r}) may not ship; pass "
                         "--no-classifier or give a source whose licence allows shipping")
    out = Path(args.out)
    if (out / CHECKPOINT).exists() and not args.resume and not args.dry_run:
        raise FileExistsError(f"{out} already holds a training run; pass --resume to continue it or use a new --out")
    if args.dry_run:
        for s in sets:
            log.info("plan: %s weight %.2f, %s, licence %r, ship %s", s.where(), s.weight,
                     "outlines" if s.masks else "boxes only", s.licence, s.ship)
        log.info("plan: scale %s, %d epochs, batch %d, %s", cfg.train.scale.to_dict(), cfg.train.train.epochs,
                 cfg.train.train.batch_size,
                 f"exactly {cfg.train.train.max_steps} steps" if cfg.train.train.max_steps
                 else f"limit {cfg.train.train.max_minutes} min" if cfg.train.train.max_minutes else "no time limit")
        real = [s for s in sets if s.kind != "synthetic"]
        if real:  # load and check the real sets (reads only; synthetic slides are not drawn)
            build_training_data(cfg, real, args.data_root, out)
        print("dry run: config and data are fine; nothing trained")
        return 0
    data, provenance = build_training_data(cfg, sets, args.data_root, out)
    provenance["ship_build"] = bool(args.ship)
    provenance["left_out"] = list(args.leave_out)
    bundle = train_segmenter(cfg.train, data, out, resume=args.resume, provenance=provenance,
                             progress=not args.no_progress and sys.stderr.isatty())
    print(f"model bundle: {bundle}")
    if classifier is not None:
        attach_starter_classifier(classifier, cfg.base_dir, args.data_root, out, bundle, args.classifier_run)
    if args.package:
        from trainer.package import package_bundle

        licences = [{"set": s.name, "licence": s.licence, "attribution": s.attribution} for s in sets]
        if classifier is not None:
            licences.append({"set": f"classifier source {classifier.source}", "licence": classifier.licence,
                             "attribution": classifier.attribution})
        command = ("python -m trainer train-starter --data-root DATA --out OUT --ship --package "
                   f"{args.package}" + (f" --max-minutes {args.max_minutes:g}" if args.max_minutes else "")
                   + (f" --max-steps {args.max_steps}" if args.max_steps else "")
                   + (f" --serve-rbc-px {args.serve_rbc_px:g}" if args.serve_rbc_px else "")
                   + (f" --serve-threshold {args.serve_threshold:g}" if args.serve_threshold else ""))
        package_bundle(bundle, args.package, half=True, max_mb=args.max_mb,
                       provenance={"licences": licences, "reproduce": command, "packaged_from": str(bundle)},
                       rbc_px=args.serve_rbc_px, threshold=args.serve_threshold)
        print(f"packaged for shipping: {args.package}")
    return 0


def attach_starter_classifier(spec: ClassifierSpec, base_dir: Path | None, data_root: Path | None, out: Path,
                              bundle: Path, trained_in: Path | None = None) -> Path:
    """Train the config's crop classifier into ``out/classifier`` (or take the one in ``trained_in``) and attach
    it to ``bundle``, with its licence and attribution in its provenance."""
    import torch
    import yaml

    from trainer.classifier.cli import run as train_classifier
    from wbc_core.bundle import CLASSIFIER_FILE, attach_classifier

    def resolve(value: str, root: Path | None, what: str) -> Path:
        path = Path(value)
        if path.is_absolute():
            return path
        if root is None:
            raise ValueError(f"the classifier's {what} {value!r} is relative: pass --data-root")
        return root / path

    folder = trained_in
    if folder is None:
        folder = out / "classifier"
        config = resolve(spec.config, base_dir, "config") if spec.config else None
        args = argparse.Namespace(source=resolve(spec.source, data_root, "source"),
                                  target=resolve(spec.target, data_root, "target"), method=spec.method,
                                  stain_norm=spec.stain_norm, few_shot=None, config=config, source_map=None,
                                  out=folder, bundle=None, threads=None)
        train_classifier(args)
    weights, meta = folder / CLASSIFIER_FILE, folder / "classifier.yaml"
    for path in (weights, meta):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: train the classifier with 'python -m trainer "
                                    f"train-classifier ... --out {folder}' first")
    config = yaml.safe_load(meta.read_text())
    config.setdefault("provenance", {}).update({"licence": spec.licence, "attribution": spec.attribution})
    attach_classifier(bundle, torch.load(weights, map_location="cpu", weights_only=True), config)
    log.info("crop classifier from %s attached to %s (%d classes)", folder, bundle, len(config.get("classes") or []))
    return bundle
