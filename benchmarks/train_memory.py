"""Peak memory of training on full-size 4032x3024 slides with the default CPU config.

The dataset decodes each JPEG lazily (at 1/2 or 1/4 scale) and rasterises polygons at the input
scale, so memory must not grow with the number of slides. This trains one epoch on N and on 3N
synthetic 4032x3024 slides in a child process and samples, every 0.2 s, the trainer's RSS and the
PSS (proportional set size: shared pages split between processes, so a forked data-loading worker is
not counted twice) of the trainer and all its workers together.

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
import time
from pathlib import Path

CHILD = r"""
import sys
from trainer.config import load_config
from wbc_core.data.loader import load_dataset
from trainer.train_segmenter import train_segmenter
task, out, frames = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = load_config(None)
cfg.train.epochs = 1
cfg.train.threads = 2
data = load_dataset(task, label_map=cfg.labels, require_images=True)
data.images = data.images[:frames]
train_segmenter(cfg, data, out, progress=False)
"""


def _kb(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return pids


def measure(task: Path, out: Path, frames: int) -> dict:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(task), str(out), str(frames)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_rss = peak_pss = 0
    t0 = time.perf_counter()
    while proc.poll() is None:
        peak_rss = max(peak_rss, _kb(Path(f"/proc/{proc.pid}/status"), "VmRSS:"))
        peak_pss = max(peak_pss, sum(_kb(Path(f"/proc/{p}/smaps_rollup"), "Pss:") for p in _tree(proc.pid)))
        time.sleep(0.2)
    if proc.returncode != 0:
        raise RuntimeError(f"training child failed: {proc.stderr.read()[-2000:]}")
    return {"frames": frames, "seconds": round(time.perf_counter() - t0, 1),
            "trainer_peak_rss_mb": round(peak_rss / 1024, 1), "tree_peak_pss_mb": round(peak_pss / 1024, 1)}


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
            runs.append(measure(task, Path(tmp) / f"run{n}", n))
            logging.info("%s", runs[-1])
    peak_rss = max(r["trainer_peak_rss_mb"] for r in runs)
    peak_pss = max(r["tree_peak_pss_mb"] for r in runs)
    result = {
        "slide_size": [4032, 3024],
        "config": "trainer/configs/segmenter-cpu.yaml (1024 px input, batch 2, 1 data worker)",
        "runs": runs,
        "peak_rss_mb": peak_rss,
        "peak_pss_all_processes_mb": peak_pss,
        "target_mb": 4096,
        "met": max(peak_rss, peak_pss) <= 4096,
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    logging.info("peak RSS %.0f MB (trainer), peak PSS %.0f MB (trainer + worker) -> %s", peak_rss, peak_pss,
                 args.out / "train_memory.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
