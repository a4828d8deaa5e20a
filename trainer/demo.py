"""The embedded-default main job: the whole loop on synthetic slides, no CVAT and no outside data.

1. write a synthetic training task and a held-out test task (CVAT for images 1.1 exports);
2. train the segmenter for a few minutes (the packaged demo config);
3. evaluate it on the test task (COCO AP, overlays);
4. predict on a new full-size 4032x3024 slide with the same pipeline the CVAT function uses;
5. print where everything is.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from importlib import resources
from pathlib import Path

import yaml

from trainer.config import TrainConfig
from trainer.data.loader import load_dataset
from trainer.evaluate import evaluate_bundle, summary_line
from trainer.overlay import draw_overlay, save_png
from trainer.predict import Predictor
from trainer.synthetic import generate_slide_jpeg, generate_task
from trainer.train_segmenter import train_segmenter

log = logging.getLogger(__name__)


def demo_config(minutes: float) -> TrainConfig:
    text = resources.files("trainer").joinpath("configs/segmenter-demo.yaml").read_text()
    cfg = TrainConfig.from_dict(yaml.safe_load(text))
    cfg.train.max_minutes = minutes
    return cfg


def run_demo(out: Path, minutes: float = 5.0, train_images: int = 40, test_images: int = 8) -> dict:
    out = Path(out)
    t0 = time.perf_counter()
    for sub in ("train-task", "test-task", "run"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
    out.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(minutes)
    log.info("1/4 writing synthetic tasks under %s", out)
    generate_task(out / "train-task", n_images=train_images, seed=1)
    generate_task(out / "test-task", n_images=test_images, seed=2)
    train = load_dataset(out / "train-task", label_map=cfg.labels, require_images=True)
    test = load_dataset(out / "test-task", label_map=cfg.labels, require_images=True)

    log.info("2/4 training the segmenter for up to %.1f min", minutes)
    bundle = train_segmenter(cfg, train, out / "run")

    log.info("3/4 evaluating on %d held-out synthetic slides", len(test))
    predictor = Predictor(bundle)
    metrics = evaluate_bundle(predictor, test, cfg.labels, out_dir=out / "evaluation", overlays=3)

    log.info("4/4 predicting on a new 4032x3024 slide")
    slide = out / "new-slide.jpg"
    generate_slide_jpeg(slide, 4032, 3024, seed=99)
    pred = predictor.predict_file(slide)
    overlay = out / "new-slide_overlay.png"
    save_png(draw_overlay(slide, [], pred.cells, pred.width, pred.height), overlay)
    cells = [{"label": c.label, "score": round(c.score, 3), "box": [round(v) for v in c.box]} for c in pred.cells]
    (out / "new-slide_cells.json").write_text(json.dumps(cells, indent=1))

    summary = {
        "evaluation": summary_line(metrics),
        "new_slide_cells": len(cells),
        "minutes_total": round((time.perf_counter() - t0) / 60, 1),
        "bundle": str(bundle),
        "metrics": str(out / "evaluation" / "metrics.json"),
        "overlays": str(out / "evaluation"),
        "new_slide_overlay": str(overlay),
        "loss_curve": str(out / "run" / "loss_curve.png"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("\nDemo finished in {minutes_total} min".format(**summary))
    print(f"  held-out synthetic slides: {summary['evaluation']}")
    print("    ('any label' scores finding and outlining cells; after a few minutes the 10-class labels are\n"
          "     still rough: longer training and the crop classifier refine them)")
    print(f"  model bundle:        {summary['bundle']}")
    print(f"  metrics:             {summary['metrics']}")
    print(f"  evaluation overlays: {summary['overlays']}/overlay_*.png")
    print(f"  loss curve:          {summary['loss_curve']}")
    print(f"  new slide:           {slide} -> {len(cells)} cells, overlay {overlay}")
    return summary
