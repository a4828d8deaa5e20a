"""Real-data segmentation benchmark: train on BCCD train+val, evaluate on its 72-image test split.

Trains the default CPU config (trainer/configs/segmenter-cpu.yaml) from scratch. BCCD frames are
640x480 with WBCs ~145 px across, so the input size is set to the frames' own size (640/480)
instead of the 1008 px meant for 4032x3024 slides; everything else is the default. Writes
``segmentation_bccd.json`` (mask AP, mask AP50, box AP50, training time, peak RSS, learning curve,
config, git sha, command), ``segmentation_bccd_curve.png`` and overlays of a few test images.

    python benchmarks/segmentation_bccd.py --bccd ../shared/data/bccd-wbc --out benchmarks/results

The baseline of the latency benchmark (torchvision's maskrcnn_resnet50_fpn at its 800/1333 defaults,
same recipe, same time budget) is trained and scored the same way:

    python benchmarks/segmentation_bccd.py --bccd ../shared/data/bccd-wbc --out benchmarks/results \
        --config benchmarks/configs/maskrcnn-resnet50-torchvision.yaml --keep-input-size \
        --name segmentation_bccd_torchvision --run-dir runs/bccd-torchvision --max-minutes 58
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shlex
import sys
import time
from pathlib import Path

import torch

from trainer.config import load_config
from trainer.data.bccd import WBC_LABEL, load_bccd
from trainer.evaluate import evaluate_bundle, summary_line
from trainer.train_segmenter import git_sha, train_segmenter
from wbc_core.detect import Predictor
from wbc_core.labels import LabelMap

log = logging.getLogger("segmentation_bccd")


def peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024.0


def plot_curve(curve: list[dict], path: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    minutes = [c["train_seconds"] / 60 for c in curve]
    ax.plot(minutes, [c["mask_ap"] for c in curve], "o-", label="mask AP")
    ax.plot(minutes, [c["mask_ap75"] for c in curve], "s--", label="mask AP75", alpha=0.7)
    ax.plot(minutes, [c["box_ap"] for c in curve], "^:", label="box AP", alpha=0.7)
    ax.axhline(target, color="grey", lw=0.8, ls="--", label=f"target mask AP {target}")
    ax.set_xlabel("training minutes (2 CPU cores)")
    ax.set_ylabel("COCO AP on BCCD test (72 frames)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Mask R-CNN MobileNetV3-FPN from scratch: learning curve")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bccd", required=True, type=Path, help="the bccd-wbc folder (../shared/data/bccd-wbc)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--run-dir", type=Path, default=Path("runs/bccd-benchmark"))
    ap.add_argument("--config", type=Path, default=None, help="training config (default: the packaged CPU one)")
    ap.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    ap.add_argument("--max-minutes", type=float, default=59.0, help="training time limit")
    ap.add_argument("--eval-every", type=int, default=2, help="epochs between learning-curve points")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--keep-input-size", action="store_true",
                    help="train at the config's own min/max size instead of BCCD's native 640x480 "
                         "(for the torchvision baseline, benchmarks/configs/maskrcnn-resnet50-torchvision.yaml)")
    ap.add_argument("--name", default="segmentation_bccd", help="stem of the result files in --out")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    cfg = load_config(args.config)
    if not args.keep_input_size:
        cfg.model.max_size, cfg.model.min_size = 640, 480
    cfg.labels = LabelMap(classes=[WBC_LABEL], ignore=[])
    cfg.train.threads = args.threads
    cfg.train.max_minutes = args.max_minutes
    cfg.train.device = "cpu"
    if args.epochs:
        cfg.train.epochs = args.epochs
    train = load_bccd(args.bccd, "trainval")
    test = load_bccd(args.bccd, "test")
    log.info("BCCD: %d training frames, %d test frames", len(train), len(test))

    curve: list[dict] = []
    eval_seconds = 0.0

    def on_epoch(epoch: int, train_seconds: float, bundle_dir: Path) -> None:
        nonlocal eval_seconds
        if epoch % args.eval_every and epoch != cfg.train.epochs:
            return
        t0 = time.perf_counter()
        m = evaluate_bundle(Predictor(bundle_dir, device="cpu"), test, cfg.labels, progress=False)
        eval_seconds += time.perf_counter() - t0
        curve.append({"epoch": epoch, "train_seconds": round(train_seconds, 1), "mask_ap": m["segm"]["AP"],
                      "mask_ap50": m["segm"]["AP50"], "mask_ap75": m["segm"]["AP75"], "box_ap": m["bbox"]["AP"],
                      "box_ap50": m["bbox"]["AP50"]})
        log.info("epoch %d (%.1f min): %s", epoch, train_seconds / 60, summary_line(m))

    sha = git_sha()  # the code that runs is the code checked out now
    t_wall = time.perf_counter()
    bundle_dir = train_segmenter(cfg, train, args.run_dir, resume=args.resume, on_epoch_end=on_epoch)
    predictor = Predictor(bundle_dir, device="cpu")
    final = evaluate_bundle(predictor, test, cfg.labels, out_dir=args.out / f"{args.name}_eval", overlays=4)
    train_seconds = predictor.bundle.provenance["train_seconds"]
    if not curve or curve[-1]["mask_ap"] != final["segm"]["AP"]:
        curve.append({"epoch": predictor.bundle.provenance["epochs"], "train_seconds": train_seconds,
                      "mask_ap": final["segm"]["AP"], "mask_ap50": final["segm"]["AP50"],
                      "mask_ap75": final["segm"]["AP75"], "box_ap": final["bbox"]["AP"],
                      "box_ap50": final["bbox"]["AP50"]})
    result = {
        "mask_ap": final["segm"]["AP"],
        "mask_ap50": final["segm"]["AP50"],
        "mask_ap75": final["segm"]["AP75"],
        "box_ap": final["bbox"]["AP"],
        "box_ap50": final["bbox"]["AP50"],
        "train_seconds": train_seconds,
        "wall_seconds_incl_curve_evals": round(time.perf_counter() - t_wall, 1),
        "curve_eval_seconds": round(eval_seconds, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "seconds_per_test_frame": round(final["seconds_per_frame"], 3),
        "targets": {"mask_ap": 0.85, "mask_ap50": 0.99, "train_minutes": 60},
        "met": bool(final["segm"]["AP"] >= 0.85 and final["segm"]["AP50"] >= 0.99 and train_seconds < 3600),
        "train_frames": len(train),
        "test_frames": len(test),
        "test_cells": final["gt_cells"],
        "threads": args.threads,
        "curve": curve,
        "config": cfg.to_dict(),
        "git_sha": sha,
        "torch": str(torch.__version__),
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_curve(curve, args.out / f"{args.name}_curve.png", 0.85)
    log.info("final: %s; trained %.1f min; peak RSS %.0f MB -> %s", summary_line(final), train_seconds / 60,
             result["peak_rss_mb"], args.out / f"{args.name}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
