"""Few-shot: a new lab's first 10 corrected frames, fine-tuned from the starter vs trained from scratch (issue 12).

One retrain-sized run each (``--minutes``, default 20: the issue's budget for one cycle on 2 cores), on the same
``--frames`` frames of a set's training split, drawn with ``--seed``:

- **starter**: the bundle given (``--starter``) fine-tuned the way ``trainer retrain`` fine-tunes its first
  version (:func:`trainer.config.finetune_from_bundle`: its weights, architecture and red-cell input scale, a
  gentler learning rate);
- **scratch**: the starter's recipe (``trainer/configs/starter.yaml``: architecture, scale, augmentation) from
  random weights.

Both, and the starter as it is, are scored on the set's test split with the generalisation benchmark's scorer
(mask AP where the set has outlines, box AP50, recall at IoU 0.5, false cells per image). The set should be one
the starter never saw (the shipped starter never saw Bio-Net; a ``--leave-out bccd`` starter never saw BCCD).

    python benchmarks/few_shot.py --starter models/starter --set bionet --data-root ../shared/data \\
        --out benchmarks/results/few_shot_bionet.json

``benchmarks/generalisation.py --few-shot benchmarks/results/few_shot_bionet.json`` folds the result in.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shlex
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from generalisation import load_set, score_set  # noqa: E402

from trainer.config import finetune_from_bundle  # noqa: E402
from trainer.multiset import build_training_data, load_multiset_config, subset_frames  # noqa: E402
from trainer.starter import default_config_path  # noqa: E402
from trainer.train_segmenter import git_sha, train_segmenter  # noqa: E402
from wbc_core.detect import Predictor  # noqa: E402

log = logging.getLogger("few_shot")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--starter", type=Path, default=REPO / "models" / "starter")
    p.add_argument("--set", required=True, help="a set of the starter config (bccd, bionet)")
    p.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--config", type=Path, default=None, help="multi-set config (default: the packaged starter's)")
    p.add_argument("--frames", type=int, default=10)
    p.add_argument("--minutes", type=float, default=20.0, help="training budget of each run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=REPO / "runs" / "few-shot")
    p.add_argument("--out", type=Path, required=True, help="result JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_multiset_config(args.config or default_config_path())
    spec = next((s for s in cfg.sets if s.name == args.set), None)
    if spec is None or spec.kind == "synthetic":
        raise SystemExit(f"--set {args.set}: not a real set of {cfg.source} ({[s.name for s in cfg.sets]})")
    work = args.work / f"{args.set}-seed{args.seed}"
    data, _ = build_training_data(cfg, [spec], args.data_root, work)
    rng = np.random.default_rng(args.seed)
    chosen = sorted(rng.choice(len(data.images), size=min(args.frames, len(data.images)), replace=False).tolist())
    few = subset_frames(data, chosen)
    test = load_set(args.set, args.data_root)
    result: dict = {"set": args.set, "frames": [r.name for r in few.images], "cells": sum(len(r.instances)
                                                                                           for r in few.images),
                    "minutes": args.minutes, "seed": args.seed, "starter_bundle": str(args.starter)}
    threshold = Predictor(args.starter).default_threshold
    result["starter_as_is"] = score_set(Predictor(args.starter), test, threshold, desc="starter as is")
    runs = {"starter": finetune_from_bundle(copy.deepcopy(cfg.train), args.starter),
            "scratch": copy.deepcopy(cfg.train)}
    for name, tcfg in runs.items():
        tcfg.train.max_minutes = args.minutes
        tcfg.train.epochs = 10_000  # the time budget ends it
        t0 = time.perf_counter()
        bundle = train_segmenter(tcfg, few, work / name, progress=False)
        result[f"{name}_train_seconds"] = round(time.perf_counter() - t0, 1)
        result[name] = score_set(Predictor(bundle), test, threshold, desc=name)
        log.info("%s: %s", name, result[name])
    result["git_sha"] = git_sha()
    result["command"] = "python benchmarks/few_shot.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"few_shot": {args.set: result}, "command": result["command"]}, indent=1))
    print(json.dumps({k: result[k] for k in ("starter_as_is", "starter", "scratch")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
