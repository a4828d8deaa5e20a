"""Real-data classifier benchmark: PBC (source) -> BCCD (target) WBC types, every method side by side.

Source: ``../shared/data/pbc-sample`` (CellaVision, May-Grünwald-Giemsa), mapped onto BCCD's five types by
``trainer/configs/classifier-source-pbc-bccd.yaml``. Target: the BCCD frames with exactly one WBC box and
one non-blank type (341 crops). A fixed labelled pool (<= 20 cells per class, <= 60% of a class, from BCCD's
trainval frames) is the only place labelled target cells are drawn from; every other crop is the evaluation
set, the same for every row. Headline: 4-class macro-F1 over neutrophil, eosinophil, lymphocyte, monocyte
(basophil, 2 crops, is reported as recall only).

Rows (each with and without stain normalisation): source-only (K=0), target-only (K=10, all), finetune
(K=5, 10, 20), dann (K=0). Few-shot rows are 5 seeded draws (mean and spread); rows without a draw use
``protocol.seeds`` training seeds. Writes ``classifier_pbc_to_bccd.json`` and one confusion-matrix PNG per
row (first draw) into ``--out``.

    python benchmarks/classifier_pbc_to_bccd.py --pbc ../shared/data/pbc-sample \
        --bccd ../shared/data/bccd-wbc --out benchmarks/results --threads 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.classifier.cli import git_sha
from trainer.classifier.evaluate import plot_confusion
from trainer.classifier.sources import SourceClassMap, load_folder_source, load_target
from trainer.classifier.train import Experiment, load_classifier_config

log = logging.getLogger("classifier_pbc_to_bccd")

NAME = "classifier_pbc_to_bccd"
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "trainer" / "configs" / "classifier-pbc-bccd.yaml"
ROWS = [("source-only", 0), ("target-only", 10), ("target-only", None), ("finetune", 5), ("finetune", 10),
        ("finetune", 20), ("dann", 0)]
TARGET_UNSUPERVISED = 0.60
TARGET_GAIN_OVER_TARGET_ONLY = 0.05
TARGET_GAP_TO_ALL_LABELS = 0.03
ROW_SECONDS_LIMIT = 15 * 60


def _mean(values: list[float]) -> float:
    return round(float(np.mean(values)), 4)


def row_record(row: dict[str, Any], headline: list[str], png: str) -> dict[str, Any]:
    runs = row["runs"]
    f1 = [r["metrics"]["macro_f1_headline"] for r in runs]
    acc = [r["metrics"]["accuracy"] for r in runs]
    baso = [r["metrics"]["per_class"].get("basophil", {}).get("recall", 0.0) for r in runs]
    per_class = {}
    for c in runs[0]["metrics"]["classes"]:
        per_class[c] = {key: _mean([r["metrics"]["per_class"][c][key] for r in runs])
                        for key in ("precision", "recall", "f1")}
        per_class[c]["support"] = runs[0]["metrics"]["per_class"][c]["support"]
    out = {"method": row["method"], "stain_norm": row["stain_norm"], "k": row["k"],
           "macro_f1_4": _mean(f1), "accuracy": _mean(acc), "basophil_recall": _mean(baso),
           "draws": len(runs), "seconds": row["seconds"],
           "macro_f1_4_std": round(float(np.std(f1)), 4), "macro_f1_4_min": round(min(f1), 4),
           "macro_f1_4_max": round(max(f1), 4), "accuracy_std": round(float(np.std(acc)), 4),
           "macro_f1_all_present": _mean([r["metrics"]["macro_f1"] for r in runs]),
           "per_draw": [{"labelled": r["labelled"], "macro_f1_4": r["metrics"]["macro_f1_headline"],
                         "accuracy": r["metrics"]["accuracy"]} for r in runs],
           "per_class_mean": per_class, "confusion_first_draw": runs[0]["metrics"]["confusion"],
           "confusion_classes": runs[0]["metrics"]["classes"], "confusion_png": png,
           "headline_classes": headline}
    pre = [r["report"].get("pretrain_seconds") for r in runs if r["report"].get("pretrain_seconds")]
    if pre:
        out["pretrain_seconds"] = pre[0]
    dann = [r["report"]["dann"] for r in runs if "dann" in r["report"]]
    if dann:
        out["dann"] = [{"health": d["health"],
                        "domain_accuracy_per_epoch": [round(e["domain_accuracy"], 3) for e in d["epochs"]],
                        "reversal_weight_per_epoch": [round(e["reversal_weight"], 3) for e in d["epochs"]]}
                       for d in dann]
    return out


def check_targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def best(method: str | tuple[str, ...], k: int | None) -> dict[str, Any] | None:
        methods = (method,) if isinstance(method, str) else method
        cands = [r for r in rows if r["method"] in methods and r["k"] == k]
        return max(cands, key=lambda r: r["macro_f1_4"]) if cands else None

    out: dict[str, Any] = {}
    unsup = best(("source-only", "dann"), 0)
    if unsup:
        out["unsupervised"] = {"target": f"4-class macro-F1 >= {TARGET_UNSUPERVISED} with K = 0",
                               "best_row": f"{unsup['method']} / {unsup['stain_norm']}",
                               "macro_f1_4": unsup["macro_f1_4"], "met": unsup["macro_f1_4"] >= TARGET_UNSUPERVISED}
    adapted, t10, tall = best("finetune", 10), best("target-only", 10), best("target-only", None)
    if adapted and t10 and tall:
        gain = round(adapted["macro_f1_4"] - t10["macro_f1_4"], 4)
        gap = round(tall["macro_f1_4"] - adapted["macro_f1_4"], 4)
        out["few_shot"] = {
            "target": f"best adapted K=10 >= best target-only K=10 + {TARGET_GAIN_OVER_TARGET_ONLY} and within "
                      f"{TARGET_GAP_TO_ALL_LABELS} of best target-only with all labels",
            "best_adapted_k10": f"finetune / {adapted['stain_norm']}: {adapted['macro_f1_4']}",
            "target_only_k10": f"{t10['stain_norm']}: {t10['macro_f1_4']}",
            "target_only_all": f"{tall['stain_norm']}: {tall['macro_f1_4']}",
            "gain_over_target_only_k10": gain, "gap_to_target_only_all": gap,
            "met": gain >= TARGET_GAIN_OVER_TARGET_ONLY and gap <= TARGET_GAP_TO_ALL_LABELS}
    slow = [f"{r['method']}/{r['stain_norm']}/k={r['k']}" for r in rows if r["seconds"] > ROW_SECONDS_LIMIT]
    out["row_time"] = {"target": f"each row <= {ROW_SECONDS_LIMIT} s", "slowest_seconds":
                       max((r["seconds"] for r in rows), default=0), "over": slow, "met": not slow}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pbc", type=Path, required=True, help="the pbc-sample folder (../shared/data/pbc-sample)")
    ap.add_argument("--bccd", type=Path, required=True, help="the bccd-wbc folder (../shared/data/bccd-wbc)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="classifier config of the benchmark")
    ap.add_argument("--stains", default="none,reinhard", help="comma-separated stain normalisations to run")
    ap.add_argument("--rows", default=None, help="only these rows, e.g. 'dann:0,finetune:10' (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default=NAME, help="result file stem")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto (the row-time target is for 2 CPU cores)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    cfg = load_classifier_config(args.config)
    cfg.train.threads = args.threads
    cfg.train.device = args.device
    rows_wanted = ROWS
    if args.rows:
        rows_wanted = []
        for spec in args.rows.split(","):
            method, k = spec.split(":")
            rows_wanted.append((method, None if k == "all" else int(k)))
    stains = [s.strip() for s in args.stains.split(",") if s.strip()]
    t0 = time.perf_counter()
    source = load_folder_source(args.pbc, SourceClassMap.from_yaml(cfg.source_map), cfg.crop)
    target = load_target(args.bccd, cfg.crop)
    crop_seconds = time.perf_counter() - t0
    exp = Experiment(source, target, cfg)
    headline = list(cfg.protocol.headline or [])
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for stain in stains:
        for method, k in rows_wanted:
            row = exp.run(method, stain, k)
            kname = "all" if k is None else str(k)
            png = f"{args.name}_{method}_{stain}_k{kname}.png"
            plot_confusion(row["runs"][0]["metrics"], args.out / png,
                           title=f"PBC -> BCCD: {method}, stain {stain}, K={kname} (draw 1 of {len(row['runs'])})")
            rec = row_record(row, headline, png)
            rows.append(rec)
            log.info("ROW %s / %s / K=%s: 4-class macro-F1 %.3f +- %.3f, accuracy %.3f, basophil recall %.2f, "
                     "%d draws, %.0f s", method, stain, kname, rec["macro_f1_4"], rec["macro_f1_4_std"],
                     rec["accuracy"], rec["basophil_recall"], rec["draws"], rec["seconds"])
            _write(args, exp, rows, crop_seconds, cfg, final=False)
    result = _write(args, exp, rows, crop_seconds, cfg, final=True)
    for key, check in result["targets"].items():
        print(f"{key}: {'MET' if check['met'] else 'NOT MET'} {json.dumps(check)}")
    print(f"results: {args.out / (args.name + '.json')}")
    return 0


def _write(args: argparse.Namespace, exp: Experiment, rows: list[dict[str, Any]], crop_seconds: float, cfg: Any,
           final: bool) -> dict[str, Any]:
    eval_counts = {c: exp.eval_labels.count(c) for c in sorted(set(exp.eval_labels))}
    pool_counts = {c: exp.pool_labels.count(c) for c in sorted(set(exp.pool_labels))}
    result = {
        "benchmark": "WBC-type classifier, PBC sample (source) -> BCCD single-WBC frames (target)",
        "complete": final,
        "command": " ".join(["python", *map(shlex.quote, sys.argv)]),
        "headline": "macro_f1_4: macro-F1 over neutrophil, eosinophil, lymphocyte, monocyte on the evaluation crops",
        "rows": rows,
        "targets": check_targets(rows),
        "evaluation_crops": len(exp.eval), "evaluation_per_class": eval_counts,
        "labelled_pool": len(exp.pool), "labelled_pool_per_class": pool_counts,
        "source_crops": len(exp.source) if exp.source is not None else 0,
        "source_per_class": exp.source.class_counts() if exp.source is not None else {},
        "source_excluded": (exp.source.meta or {}).get("excluded") if exp.source is not None else {},
        "target_crops": len(exp.target), "target_excluded_frames": exp.target.meta.get("excluded"),
        "crop_seconds": round(crop_seconds, 1),
        "notes": [
            "k = labelled target cells per class (0: none, null: the whole labelled pool); a class with fewer pool "
            "cells than k contributes all of them",
            "seconds = wall time of the row on this machine; finetune rows include the source pre-training once "
            "(shared by their draws), crop extraction is counted once in crop_seconds",
            "dann uses every BCCD WBC crop as unlabelled target data (labels never read), as it would use a lab's "
            "unlabelled slides; stain references are fitted on target frames' colour statistics (no labels)",
        ],
        "config": cfg.to_dict(),
        "git_sha": git_sha(),
        "machine": {"cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
                    "python": platform.python_version(), "device": args.device,
                    "gpu": torch.cuda.get_device_name() if args.device != "cpu" and torch.cuda.is_available()
                    else None},
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    path = args.out / f"{args.name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    return result


if __name__ == "__main__":
    sys.exit(main())
