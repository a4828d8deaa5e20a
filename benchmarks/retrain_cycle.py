"""One retraining cycle on 50 new 4032x3024 frames, timed step by step (issue 6's target: <= 20 minutes).

A CVAT stand-in on 127.0.0.1 serves one task of ``--frames`` synthetic 4032x3024 slide photos (2.5-3 MB JPEGs)
with their polygons, all jobs completed. The registry starts with ``--bundle`` as its current version (the
model a lab would be serving), and ``python -m trainer retrain`` runs as a subprocess, exactly as cron
would run it: pull (all frames new), stable split, fine-tune of the segmenter from the current version for
``--minutes``, evaluation of candidate and current on the validation frames, gate, promotion. The seconds
of each step come from the cycle's own ``report.json``.

    python benchmarks/retrain_cycle.py --bundle runs/default-cpu/run/bundle --out benchmarks/results

Writes ``retrain_cycle.json`` (keys ``total_s``, ``steps``, ``frames_added``, ``promoted``, ``command``, ...)
and ``retrain_cycle.png`` (each step's share of the cycle).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger("retrain_cycle")
TARGET_S = 20 * 60


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = {k: v for k, v in result["steps"].items() if k != "total"}
    fig, ax = plt.subplots(figsize=(7, 2.6))
    left = 0.0
    for (name, seconds), colour in zip(steps.items(), plt.cm.tab10.colors, strict=False):
        ax.barh([0], [seconds / 60], left=left, color=colour, label=f"{name} {seconds / 60:.1f} min")
        left += seconds / 60
    ax.axvline(TARGET_S / 60, color="red", ls="--", lw=1, label="target 20 min")
    ax.set_yticks([])
    ax.set_xlabel("minutes")
    ax.set_title(f"one retrain cycle, {result['frames_added']} new 4032x3024 frames, 2 CPU cores: "
                 f"{result['total_s'] / 60:.1f} min")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.35))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="the version being served before the cycle (default: none, the "
                    "cycle then trains from scratch)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--frames", type=int, default=50)
    ap.add_argument("--minutes", type=float, default=10.0, help="segmenter fine-tuning budget (segmenter.max_minutes)")
    ap.add_argument("--work", type=Path, help="keep the site (registry, cycles, pulled data) here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from tests.cvat_standin import StandinCVAT, task_from_dataset
    from trainer.registry import Registry
    from trainer.synthetic import generate_task

    keep = args.work is not None
    work = args.work or Path(tempfile.mkdtemp(prefix="wbc-retrain-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    task_dir = work / "new-slides"
    if not (task_dir / "annotations.xml").is_file():
        log.info("rendering %d synthetic 4032x3024 slides", args.frames)
        generate_task(task_dir, n_images=args.frames, width=4032, height=3024, seed=500)
    site = (work / "site").resolve()
    registry = Registry(site / "registry")
    if args.bundle and registry.current() is None:
        version = registry.add(args.bundle, {"note": "the version served before the benchmark cycle"})
        registry.promote(version, reason="benchmark start")
    start_version = registry.current()
    frames = sorted((task_dir / "images").glob("*.jpg"))
    mb = sum(p.stat().st_size for p in frames) / len(frames) / 1e6
    with StandinCVAT(seed=2) as cvat:
        tid = task_from_dataset(cvat, task_dir, "new slides", segment_size=10)
        config = site / "retrain.yaml"
        config.write_text(yaml.safe_dump({
            "cvat": {"tasks": [tid], "out": "pulled"}, "registry": "registry", "work_dir": "cycles",
            "split": {"val_fraction": 0.2}, "segmenter": {"max_minutes": args.minutes}}))
        env = {**os.environ, "CVAT_URL": cvat.url, "CVAT_TOKEN": cvat.admin_token or "",
               "PYTHONPATH": str(REPO)}
        log.info("retrain cycle: %d frames (%.1f MB each), fine-tuning budget %.0f min", len(frames), mb,
                 args.minutes)
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "trainer", "retrain", "--config", str(config),
                               "--no-progress"], cwd=site, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    (site / "retrain.log").write_text(done.stdout + done.stderr)
    if done.returncode not in (0, 10):
        log.error("retrain failed (exit %d):\n%s", done.returncode, done.stderr[-4000:])
        return 1
    report = json.loads(sorted((site / "cycles").glob("cycle-*/report.json"))[-1].read_text())
    steps = report["steps_s"]
    result = {
        "total_s": steps["total"],
        "steps": steps,
        "step_share": {k: round(v / steps["total"], 3) for k, v in steps.items() if k != "total"},
        "frames_added": report["data"]["frames_added_since_current"],
        "promoted": report["decision"] == "promoted",
        "command": "python " + " ".join(shlex.quote(a) for a in ["benchmarks/retrain_cycle.py",
                                                                 *(argv if argv is not None else sys.argv[1:])]),
        "exit_code": done.returncode,
        "wall_s_with_process_start": round(wall, 1),
        "target_s": TARGET_S,
        "met": steps["total"] <= TARGET_S,
        "frames": len(frames), "mb_per_frame": round(mb, 2),
        "train_frames": report["data"]["train_frames"], "val_frames": report["data"]["val_frames"],
        "segmenter_minutes": args.minutes,
        "version_before": start_version, "version_after": report.get("version"),
        "metrics": report.get("metrics"), "gate": report.get("gate"),
        "pull": report.get("pull"),
        "machine": {"cpus": os.cpu_count()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "retrain_cycle.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    plot(result, args.out / "retrain_cycle.png")
    log.info("cycle %.1f min (%s), %d frames added, %s -> %s", steps["total"] / 60,
             ", ".join(f"{k} {v:.0f} s" for k, v in steps.items() if k != "total"), result["frames_added"],
             start_version, report.get("version") if result["promoted"] else f"{start_version} (refused)")
    if not keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
