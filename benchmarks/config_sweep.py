"""Compare segmenter configs on BCCD: mask AP vs epoch, several configs in parallel on one GPU.

Used to choose the default CPU config: each variant trains for the number of epochs that fits the
CPU budget (epochs given per variant, from measured CPU seconds per image), so its final AP predicts
what the CPU benchmark (benchmarks/segmentation_bccd.py) will reach. The GPU only makes the search
fast; the chosen config is then trained and timed on the CPU.

    python benchmarks/config_sweep.py --bccd ../shared/data/bccd-wbc --out sweep/ [--only base640 ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import time
from pathlib import Path

VARIANTS: dict[str, dict] = {
    "base640": {"model": {"max_size": 640, "min_size": 480}, "train": {"epochs": 16}},
    "L4_640": {"model": {"max_size": 640, "min_size": 480, "mobilenet_levels": 4}, "train": {"epochs": 15}},
    "mr28_640": {"model": {"max_size": 640, "min_size": 480, "mask_resolution": 28}, "train": {"epochs": 12}},
    "base800": {"model": {"max_size": 800, "min_size": 600}, "train": {"epochs": 11}},
    "sgd640": {"model": {"max_size": 640, "min_size": 480},
               "train": {"epochs": 16, "optimizer": "sgd", "lr": 0.02}},
    "lr2e3_640": {"model": {"max_size": 640, "min_size": 480}, "train": {"epochs": 16, "lr": 2.0e-3}},
    "L4_mr28_640": {"model": {"max_size": 640, "min_size": 480, "mobilenet_levels": 4, "mask_resolution": 28},
                    "train": {"epochs": 11}},
    "L4_lr2e3_640": {"model": {"max_size": 640, "min_size": 480, "mobilenet_levels": 4},
                     "train": {"epochs": 15, "lr": 2.0e-3}},
}


def run_variant(name: str, bccd: str, out: str, runs: str, eval_every: int, max_minutes: float) -> None:
    import torch

    from trainer.config import TrainConfig
    from trainer.data.bccd import load_bccd
    from trainer.evaluate import evaluate_bundle
    from trainer.train_segmenter import train_segmenter
    from wbc_core.detect import Predictor

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    spec = VARIANTS[name]
    cfg = TrainConfig.from_dict({"model": spec["model"], "train": {"num_workers": 2, **spec["train"]},
                                 "labels": {"classes": ["wbc"], "ignore": []}})
    train = load_bccd(bccd, "trainval")
    test = load_bccd(bccd, "test")
    curve = []
    out_dir = Path(runs) / name
    t_start = time.time()

    def on_epoch(epoch: int, train_seconds: float, bundle_dir: Path) -> None:
        if epoch % eval_every and epoch != cfg.train.epochs:
            return
        m = evaluate_bundle(Predictor(bundle_dir), test, cfg.labels, progress=False)
        curve.append({"epoch": epoch, "train_seconds": round(train_seconds, 1), "mask_ap": m["segm"]["AP"],
                      "mask_ap50": m["segm"]["AP50"], "mask_ap75": m["segm"]["AP75"],
                      "box_ap50": m["bbox"]["AP50"]})
        (Path(out) / f"{name}.json").write_text(json.dumps({"variant": spec, "curve": curve}, indent=1))
        print(f"{name} epoch {epoch}: mask AP {m['segm']['AP']:.3f} AP75 {m['segm']['AP75']:.3f} "
              f"({time.time() - t_start:.0f}s)", flush=True)

    cfg.train.max_minutes = max_minutes
    train_segmenter(cfg, train, out_dir, on_epoch_end=on_epoch, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bccd", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", default="runs/sweep", help="where the trained runs go")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--eval-every", type=int, default=2)
    ap.add_argument("--max-minutes", type=float, default=8.0)
    args = ap.parse_args()
    names = args.only or list(VARIANTS)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=run_variant,
                         args=(n, args.bccd, args.out, args.runs, args.eval_every, args.max_minutes))
             for n in names]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    summary = {}
    for n in names:
        f = Path(args.out) / f"{n}.json"
        if f.exists():
            summary[n] = json.loads(f.read_text())
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=1))
    for n, s in summary.items():
        last = s["curve"][-1]
        print(f"{n:14s} epoch {last['epoch']:3d} mask AP {last['mask_ap']:.3f} AP50 {last['mask_ap50']:.3f} "
              f"AP75 {last['mask_ap75']:.3f}")


if __name__ == "__main__":
    main()
