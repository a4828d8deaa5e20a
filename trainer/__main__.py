"""``python -m trainer``: train and evaluate the WBC segmenter and the crop classifier, run retraining cycles,
manage the model registry, write synthetic slides, and run the end-to-end demo."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from wbc_core.bundle import BundleError, update_bundle_metrics
from wbc_core.data.types import AnnotatedDataset, DatasetError

log = logging.getLogger("trainer")

EPILOG = """examples:
  python -m trainer demo --out demo-output
  python -m trainer train-segmenter --data exports/task12.zip --data exports/task13/ --out runs/seg1
  python -m trainer train-segmenter --config my.yaml --data datasets/task-12 --out runs/seg1 --resume
  python -m trainer evaluate --bundle runs/seg1/bundle --data exports/task14.zip --out runs/seg1/eval
  python -m trainer synth --out synthetic-task --images 20
  python -m trainer retrain --config retrain.yaml
  python -m trainer registry list --root models/registry
  python -m trainer registry rollback v0003 --root models/registry
  python -m trainer train-classifier --source pbc/ --target exports/task12.zip --method finetune --few-shot 10 \\
      --stain-norm reinhard --out runs/cls1 --bundle runs/seg1/bundle

--data takes a CVAT for images 1.1 export (zip, folder or annotations.xml), a COCO 1.0 export
(zip, folder or instances JSON) or a cvat_sync dataset folder; repeat it to train on several tasks.

To pre-annotate slide images with a trained bundle (JSON + overlay per image), use
  python -m serverless annotate --help
the same pipeline the CVAT function runs.
"""


def _load_many(paths: list[Path], label_map, require_images: bool, extract_root: Path,
               strict: bool = False) -> AnnotatedDataset:
    """Load and concatenate several exports; zips are extracted under ``extract_root/<name>/``."""
    from wbc_core.data.loader import load_dataset, merge_datasets

    parts = [load_dataset(p, label_map=label_map, require_images=require_images, strict=strict,
                          extract_dir=extract_root / f"{i:02d}-{p.stem}" if p.suffix.lower() == ".zip" else None)
             for i, p in enumerate(paths)]
    return merge_datasets(parts)


def cmd_train(args: argparse.Namespace) -> int:
    from trainer.config import load_config
    from trainer.train_segmenter import train_segmenter
    from wbc_core.labels import LabelMap

    cfg = load_config(args.config)
    if args.labels:
        cfg.labels = LabelMap.from_yaml(args.labels)
    if args.epochs:
        cfg.train.epochs = args.epochs
    if args.max_minutes:
        cfg.train.max_minutes = args.max_minutes
    if args.weights:
        cfg.model.weights = args.weights
    if args.device:
        cfg.train.device = args.device
    data = _load_many(args.data, cfg.labels, require_images=True, extract_root=args.out / "data",
                      strict=args.strict_labels)
    bundle = train_segmenter(cfg, data, args.out, resume=args.resume)
    if args.val:
        metrics = _evaluate(bundle, args.val, cfg.labels, args.out / "eval", overlays=4)
        update_bundle_metrics(bundle, {"validation": [str(p) for p in args.val], "bbox": metrics["bbox"],
                                       "segm": metrics["segm"], "images": metrics["images"]})
    print(f"model bundle: {bundle}")
    return 0


def _evaluate(bundle: Path, data_paths: list[Path], label_map, out: Path, overlays: int,
              class_agnostic: bool = False) -> dict:
    from trainer.evaluate import evaluate_bundle, summary_line
    from wbc_core.detect import Predictor

    predictor = Predictor(bundle)
    label_map = label_map or _bundle_label_map(predictor)
    data = _load_many(data_paths, label_map, require_images=True, extract_root=out / "data")
    metrics = evaluate_bundle(predictor, data, label_map, out_dir=out, overlays=overlays,
                              class_agnostic=class_agnostic)
    print(summary_line(metrics))
    print(f"metrics: {out / 'metrics.json'}   overlays: {out}/overlay_*.png")
    return metrics


def _bundle_label_map(predictor):
    from wbc_core.labels import LabelMap

    return LabelMap(classes=list(predictor.classes))


def cmd_evaluate(args: argparse.Namespace) -> int:
    from wbc_core.labels import LabelMap

    label_map = LabelMap.from_yaml(args.labels) if args.labels else None
    _evaluate(args.bundle, args.data, label_map, args.out, args.overlays, args.class_agnostic)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from trainer.synthetic import generate_task

    data = generate_task(args.out, n_images=args.images, width=args.width, height=args.height, seed=args.seed)
    print(f"wrote {len(data.images)} synthetic slides with {sum(len(r.instances) for r in data.images)} cells "
          f"as a CVAT for images 1.1 export: {args.out / 'annotations.xml'}")
    return 0


def cmd_train_starter(args: argparse.Namespace) -> int:
    from trainer.starter import run

    return run(args)


def cmd_package_bundle(args: argparse.Namespace) -> int:
    from trainer.package import run

    return run(args)


def cmd_train_classifier(args: argparse.Namespace) -> int:
    from trainer.classifier.cli import run

    return run(args)


def cmd_registry(args: argparse.Namespace) -> int:
    from trainer.registry import run_cli

    return run_cli(args)


def cmd_retrain(args: argparse.Namespace) -> int:
    from cvat_sync.client import CvatError
    from trainer.retrain import run_retrain

    try:
        return run_retrain(args.config, force=args.force, progress=not args.no_progress and sys.stderr.isatty())
    except CvatError as exc:  # the pull step: cvat_sync's own exit codes (3 auth, 4 not found, 5 unreachable...)
        log.error("pull failed: %s", exc)
        return exc.exit_code


def cmd_demo(args: argparse.Namespace) -> int:
    from trainer.demo import run_demo

    run_demo(args.out, steps=args.steps, max_minutes=args.minutes)
    return 0


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="python -m trainer", description=__doc__, epilog=EPILOG, formatter_class=raw)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train-segmenter", help="train the Mask R-CNN segmenter and write a model bundle",
        description="Train the Mask R-CNN cell segmenter on annotated frames (CVAT/COCO exports or cvat_sync "
                    "folders) and write a model bundle to OUT/bundle, with checkpoints, losses.csv and a loss "
                    "curve in OUT; with --val, also evaluate the bundle and store its metrics in it.",
        epilog=EPILOG, formatter_class=raw)
    t.add_argument("--config", type=Path, help="YAML config (default: the packaged CPU config, "
                   "trainer/configs/segmenter-cpu.yaml)")
    t.add_argument("--data", type=Path, action="append", required=True, help="training data (repeatable)")
    t.add_argument("--val", type=Path, action="append", help="validation data, evaluated after training")
    t.add_argument("--out", type=Path, required=True, help="run directory (checkpoints, curves, bundle/)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    t.add_argument("--labels", type=Path, help="label-map YAML (default: the 10 RV-PBS classes)")
    t.add_argument("--strict-labels", action="store_true",
                   help="fail on labels the label map does not know (default: report and skip them)")
    t.add_argument("--epochs", type=int, help="override train.epochs")
    t.add_argument("--max-minutes", type=float, help="stop training after this many minutes")
    t.add_argument("--weights", help="initial weights: a file, or a torchvision weights name "
                   "(e.g. MaskRCNN_ResNet50_FPN_Weights.DEFAULT; needs a download)")
    t.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser(
        "evaluate", help="COCO bbox/segm AP of a bundle on annotated frames, with overlays",
        description="Run a model bundle on annotated frames and score it with COCO box and mask AP (per class "
                    "and class-agnostic). Reads the bundle and the --data exports; writes OUT/metrics.json and "
                    "overlay PNGs (ground truth green, predictions magenta).")
    e.add_argument("--bundle", type=Path, required=True, help="model bundle folder (holds bundle.yaml)")
    e.add_argument("--data", type=Path, action="append", required=True,
                   help="annotated frames to score on: a CVAT/COCO export or cvat_sync folder (repeatable)")
    e.add_argument("--out", type=Path, required=True, help="where metrics.json and overlay PNGs go")
    e.add_argument("--labels", type=Path, help="label-map YAML (default: the bundle's classes)")
    e.add_argument("--overlays", type=int, default=4, help="how many overlay PNGs to write (default 4)")
    e.add_argument("--class-agnostic", action="store_true", help="score detection/segmentation only")
    e.set_defaults(func=cmd_evaluate)

    s = sub.add_parser(
        "synth", help="write a synthetic Leishman-like smear task (CVAT for images 1.1)",
        description="Write synthetic Leishman-like smear slides with outlined white blood cells of the 10 "
                    "classes as a CVAT for images 1.1 export (OUT/annotations.xml + OUT/images/), for tests, "
                    "demos and trying the trainer without real data.")
    s.add_argument("--out", type=Path, required=True, help="folder to write the task into")
    s.add_argument("--images", type=int, default=12, help="number of slides (default 12)")
    s.add_argument("--width", type=int, default=1008, help="slide width in pixels (default 1008)")
    s.add_argument("--height", type=int, default=756, help="slide height in pixels (default 756)")
    s.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same slides")
    s.set_defaults(func=cmd_synth)

    from trainer.starter import DESCRIPTION as STARTER_DESCRIPTION
    from trainer.starter import EPILOG as STARTER_EPILOG
    from trainer.starter import add_arguments as add_starter_arguments

    st = sub.add_parser("train-starter", help="train the class-agnostic starter segmenter on several data sets at "
                        "once (domain randomisation, red-cell scale)", description=STARTER_DESCRIPTION,
                        epilog=STARTER_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_starter_arguments(st)
    st.set_defaults(func=cmd_train_starter)

    from trainer.package import DESCRIPTION as PACKAGE_DESCRIPTION
    from trainer.package import add_arguments as add_package_arguments

    pk = sub.add_parser("package-bundle", help="copy a bundle for shipping: fp16 segmenter weights, size check, "
                        "all or nothing", description=PACKAGE_DESCRIPTION,
                        epilog="example:\n  python -m trainer package-bundle runs/starter/bundle models/starter "
                        "--max-mb 25", formatter_class=raw)
    add_package_arguments(pk)
    pk.set_defaults(func=cmd_package_bundle)

    c = sub.add_parser(
        "train-classifier", help="train the WBC-type crop classifier (source-only, target-only, "
        "finetune, dann), evaluate it on held-out target frames, attach it to a bundle",
        description="Train the white-blood-cell type classifier on cell crops (from class folders and/or "
                    "annotated exports) with one method, evaluate it on held-out target frames, and write "
                    "metrics.json, confusion.png, classifier.pt and classifier.yaml to OUT; with --bundle, "
                    "attach the classifier to that segmenter bundle.",
        epilog=EPILOG, formatter_class=raw)
    from trainer.classifier.cli import add_arguments

    add_arguments(c)
    c.set_defaults(func=cmd_train_classifier)

    r = sub.add_parser(
        "registry", help="model registry: list, show, rollback, verify, prune versions",
        description="Manage the model registry (numbered, verified bundle versions vNNNN/ and the 'current' "
                    "symlink the CVAT function serves): list, show, roll back, verify or prune versions under "
                    "--root.")
    from trainer.registry import add_arguments as add_registry_arguments

    add_registry_arguments(r)
    r.set_defaults(func=cmd_registry)

    from trainer.retrain import EXIT_CODES

    rt = sub.add_parser(
        "retrain", help="one retraining cycle: pull from CVAT, split, fine-tune, evaluate, "
        "promote only if the gate holds (for cron/systemd/Kubernetes)",
        description="One retraining cycle as configured in --config: pull the tasks from CVAT, split them, "
                    "fine-tune the current bundle, evaluate candidate and current on the validation split, and "
                    "add the candidate to the registry, promoting it only if the gate holds; writes a report "
                    "per cycle.",
        formatter_class=raw,
        epilog="exit codes:\n" + "\n".join(f"  {k:>3}  {v}" for k, v in EXIT_CODES.items())
        + "\n\nexample config: trainer/configs/retrain.yaml")
    rt.add_argument("--config", type=Path, required=True, help="retrain YAML (see trainer/configs/retrain.yaml)")
    rt.add_argument("--force", action="store_true", help="train even when no frame changed since the current version")
    rt.add_argument("--no-progress", action="store_true", help="no progress bars (they are off without a terminal)")
    rt.set_defaults(func=cmd_retrain)

    from trainer.demo import DEFAULT_STEPS

    d = sub.add_parser(
        "demo", help="end to end on synthetic slides: generate, train, evaluate, predict",
        description="The whole loop on synthetic slides, no CVAT and no data needed: write a synthetic "
                    "training and test task, train the segmenter for --steps optimisation steps, evaluate it "
                    "on the test task and predict on a new 4032x3024 slide. Everything goes under --out "
                    "(bundle, metrics, overlays, loss curve, summary.json); an empty result is reported with "
                    "what to change.")
    d.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder (default demo-output)")
    d.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"training budget in optimisation steps, rounded up to whole epochs of 20 steps "
                        f"(default {DEFAULT_STEPS}: enough to find cells on the synthetic slides)")
    d.add_argument("--minutes", type=float, default=None,
                   help="optional extra cap: also stop training after this many minutes (default: no cap)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (DatasetError, BundleError, FileNotFoundError, FileExistsError, ValueError, OSError) as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; a run can be continued with --resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
