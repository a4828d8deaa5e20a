"""Choose a bundle's serving settings (red-cell input scale, score threshold) on validation splits, not test ones.

A segmenter trained with red cells ~``rbc_px`` across at its input (with scale jitter) may outline cells better
served a little larger; and its ``score_threshold`` trades missed cells for false ones. For every ``--rbc-px`` the
bundle is run once per frame of each set's **val** split (detections kept down to the scorer's AP threshold) and
scored at every ``--thresholds`` value with the generalisation benchmark's scorer (mask AP, box AP50, recall at
IoU 0.5, false cells per image).

The choice uses only ``--select-on`` (default ``bccd``, the set the shipped starter trained on; Bio-Net stays
unseen, its val rows are reported, not used): the ``rbc_px`` with the best mask AP (ties: the smaller, faster
one), then the highest threshold that keeps that set's recall at its best. Apply it with
``python -m trainer package-bundle SRC DST --rbc-px N --threshold T``.

    python benchmarks/serving_sweep.py --bundle models/starter --out benchmarks/results/serving_sweep_starter.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from generalisation import load_set, score_set  # noqa: E402

from wbc_core.bundle import BUNDLE_FILE  # noqa: E402
from wbc_core.detect import Detection, Predictor  # noqa: E402

log = logging.getLogger("serving_sweep")


class CachedPredictor:
    """One detection per frame, reused for every threshold (the scorer keeps cells down to its AP threshold)."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.cache: dict[str, Detection] = {}

    def detect(self, image: np.ndarray, threshold: float | None = None) -> Detection:
        key = hashlib.sha1(image.tobytes()).hexdigest()
        if key not in self.cache:
            self.cache[key] = self.predictor.detect(image, threshold=threshold)
        return self.cache[key]


def with_rbc_px(bundle: Path, rbc_px: float, folder: Path) -> Path:
    """A copy of ``bundle`` served with red cells ``rbc_px`` across (the weights untouched)."""
    copy = folder / f"rbc{rbc_px:g}"
    shutil.copytree(bundle, copy)
    meta = yaml.safe_load((copy / BUNDLE_FILE).read_text())
    scale = (meta.get("preprocessing") or {}).get("scale") or {}
    if scale.get("mode") != "rbc":
        raise SystemExit(f"{bundle}: its input scale is not the red-cell mode (preprocessing.scale.mode: rbc)")
    scale["rbc_px"] = float(rbc_px)
    (copy / BUNDLE_FILE).write_text(yaml.safe_dump(meta, sort_keys=False))
    return copy


def choose(rows: list[dict[str, Any]], on: str) -> dict[str, Any]:
    """The selection rule of the module doc, on set ``on``'s rows."""
    by_px: dict[float, list[dict[str, Any]]] = {}
    for row in rows:
        by_px.setdefault(row["rbc_px"], []).append(row)
    best_px = max(sorted(by_px), key=lambda px: (by_px[px][0][on]["mask_ap"] or by_px[px][0][on]["box_ap50"], -px))
    candidates = by_px[best_px]
    best_recall = max(r[on]["recall50"] for r in candidates)
    best = max((r for r in candidates if r[on]["recall50"] >= best_recall), key=lambda r: r["threshold"])
    return {"rbc_px": best_px, "score_threshold": best["threshold"], "selected_on": f"{on} val",
            "rule": "rbc_px with the best mask AP (ties: smaller); then the highest threshold keeping the best recall"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=REPO / "models" / "starter")
    ap.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--sets", default="bccd,bionet", help="sets whose val split is scored (comma-separated)")
    ap.add_argument("--select-on", default="bccd", help="the set the choice is made on")
    ap.add_argument("--rbc-px", default="48,64,72", help="red-cell diameters at the input to try")
    ap.add_argument("--thresholds", default="0.5,0.6,0.7,0.8,0.9")
    ap.add_argument("--out", type=Path, required=True, help="result JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    names = [s.strip() for s in args.sets.split(",") if s.strip()]
    if args.select_on not in names:
        raise SystemExit(f"--select-on {args.select_on} must be one of --sets {names}")
    sets = {name: load_set(name, args.data_root, "val") for name in names}
    thresholds = [float(t) for t in args.thresholds.split(",")]
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for px in [float(p) for p in args.rbc_px.split(",")]:
            predictor = CachedPredictor(Predictor(with_rbc_px(args.bundle, px, Path(tmp)), device="cpu"))
            for thr in thresholds:
                row: dict[str, Any] = {"rbc_px": px, "threshold": thr}
                for name, data in sets.items():
                    scored = score_set(predictor, data, thr, progress=False)  # type: ignore[arg-type]
                    row[name] = {k: scored[k] for k in ("mask_ap", "box_ap50", "recall50", "fp_per_image")}
                rows.append(row)
                log.info("%s", row)
    result = {"bundle": str(args.bundle), "split": "val", "frames": {n: len(d.images) for n, d in sets.items()},
              "rows": rows, "choice": choose(rows, args.select_on), "seconds": round(time.perf_counter() - t0, 1),
              "command": "python benchmarks/serving_sweep.py " + shlex.join(argv if argv is not None else sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["choice"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
