"""Peak memory of training on full-size 4032x3024 slides with the default CPU config.

The dataset decodes each JPEG lazily (at 1/2 or 1/4 scale) and rasterises polygons at the input
scale, so RSS must not grow with the number of slides. This trains a few steps on synthetic
4032x3024 slides and reports the peak RSS of the trainer and its data-loading worker, twice: with
N and with 3N slides (the two must be about equal).

    python benchmarks/train_memory.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys
from trainer.config import load_config
from trainer.data.loader import load_dataset
from trainer.train_segmenter import train_segmenter
task, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = load_config(None)
cfg.train.epochs = 1
cfg.train.threads = 2
data = load_dataset(task, label_map=cfg.labels, require_images=True)
cfg.train.max_minutes = None
data.images = data.images[: steps * cfg.train.batch_size]
train_segmenter(cfg, data, out, progress=False)
own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"frames": len(data.images), "peak_rss_mb": round(own, 1), "worker_peak_rss_mb": round(kids, 1)}))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--slides", type=int, default=6, help="N (the second run uses 3N)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from trainer.synthetic import generate_task

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        task = Path(tmp) / "task"
        generate_task(task, n_images=3 * args.slides, width=4032, height=3024, seed=5)
        for n in (args.slides, 3 * args.slides):
            steps = n // 2
            res = subprocess.run([sys.executable, "-c", CHILD, str(task), str(Path(tmp) / f"run{n}"), str(steps)],
                                 capture_output=True, text=True, check=True)
            runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
            logging.info("%s", runs[-1])
    peak = max(r["peak_rss_mb"] + r["worker_peak_rss_mb"] for r in runs)
    result = {
        "slide_size": [4032, 3024],
        "runs": runs,
        "peak_rss_mb_trainer_plus_worker": round(peak, 1),
        "target_mb": 4096,
        "met": peak <= 4096,
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    logging.info("peak RSS %.0f MB (trainer + data worker) -> %s", peak, args.out / "train_memory.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
